//! `serve` for a transfer: the NBD server over the transfer's imageio URL,
//! driven by the phase rules of DESIGN.md.
//!
//! - the last client leaves with NBD_CMD_DISC, after writing and flushing
//!   (upload) or reading (download): finalize, wait for the end phase;
//! - the last client vanishes without DISC during an upload: pause, keep
//!   listening; the next client resumes it;
//! - idle clients: keep the ticket and the transfer alive;
//! - SIGINT / SIGTERM: finish in-flight requests, flush, pause an upload
//!   (or cancel it) / finalize a download, exit non-zero;
//! - after a resume the transfer may be served by another data server: the
//!   backend behind the gate is swapped before requests pass again;
//! - a data server that cannot be used (at the start or after a resume):
//!   pause an upload (a download the bridge created is cancelled), exit
//!   non-zero naming the URLs tried, tickets redacted;
//! - `dirty_bitmap`: the ticket's dirty extents are served as
//!   `qemu:dirty-bitmap:<name>`; a ticket without them is refused at the
//!   start (only incremental backup transfers have them);
//! - on a terminal, a progress line (bytes, rate, phase).

use super::engine_client::EngineClient;
use super::error::{Error, Result};
use super::gate::{Gate, GateState, GatedBackend};
use super::transfer::{Target, TransferSession};
use crate::backend::imageio::{ImageioBackend, ImageioConfig, TlsOptions};
use crate::backend::{Backend, ExtentContext};
use crate::nbd::{End, Export, Exports, Listener, Observer, Server};
use crate::ovirt::Direction;
use crate::ovirt::Phase;
use crate::progress::{Progress, Sample};
use crate::shutdown::{self, Shutdown};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the session looks at the engine while serving.
const POLL: Duration = Duration::from_secs(5);
/// How long the engine may stay unreachable while serving (a restart)
/// before the bridge gives up.
const ENGINE_OUTAGE: Duration = Duration::from_secs(120);

/// What to do with an upload on SIGINT / SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInterrupt {
    /// Pause it (resume later with `--transfer ID`).
    #[default]
    Pause,
    /// Cancel it (the partial disk is removed).
    Cancel,
}

/// Settings of a transfer `serve`.
#[derive(Debug)]
pub struct DriverOptions {
    /// Where NBD clients connect.
    pub listener: Listener,
    /// Export name.
    pub export_name: String,
    /// TLS for the data server.
    pub tls: TlsOptions,
    /// Upload on interrupt.
    pub on_interrupt: OnInterrupt,
    /// Serve a transfer whose format is `cow` (the QCOW2 file's bytes).
    pub allow_cow: bool,
    /// Draw the progress line (when stderr is a terminal).
    pub progress: bool,
    /// Serve the ticket's dirty extents as `qemu:dirty-bitmap:<name>`.
    pub dirty_bitmap: Option<String>,
    /// Most NBD clients served at once (`serve --max-connections`).
    pub max_connections: usize,
}

/// How a transfer `serve` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Transfer id.
    pub transfer: String,
    /// The last phase seen.
    pub phase: Phase,
    /// Exit 0?
    pub success: bool,
    /// Why, in words.
    pub message: String,
}

#[derive(Debug)]
enum Event {
    Connected,
    Closed(Option<End>),
}

struct Watcher {
    tx: mpsc::UnboundedSender<Event>,
}

impl Observer for Watcher {
    fn connected(&self, _conn: u64) {
        let _ = self.tx.send(Event::Connected);
    }

    fn disconnected(&self, _conn: u64, end: Option<End>) {
        let _ = self.tx.send(Event::Closed(end));
    }
}

/// Serve `target` through `client` until the transfer ends; `announce` is
/// called with the NBD URI once clients can connect.
///
/// # Errors
/// The transfer could not be set up or the engine failed.
pub async fn run(
    client: Arc<EngineClient>,
    target: Target,
    options: DriverOptions,
    announce: impl FnOnce(&str) -> std::io::Result<()>,
) -> Result<Outcome> {
    let mut session =
        TransferSession::open(Arc::clone(&client), &target, options.allow_cow).await?;
    let direction = session.transfer().direction;
    let size = match &session.transfer().disk_id {
        Some(id) => client.disk(id).await?.provisioned_size,
        None => None,
    };
    let data = DataOptions {
        size,
        direction,
        tls: options.tls.clone(),
        dirty_bitmap: options.dirty_bitmap.clone(),
    };
    let (backend, mut data_url) = match connect_data(&session, &data).await {
        Ok(found) => found,
        Err(e) => {
            let created = matches!(target, Target::Disk { .. });
            return Err(leave_transfer(&mut session, created, e).await);
        }
    };
    let gate = Gate::new(GateState::Open);
    let gated = Arc::new(GatedBackend::new(Arc::new(backend), gate.clone()));
    let export = Export::new(options.export_name.clone(), None, Arc::clone(&gated));
    let stop = Shutdown::new();
    let (tx, mut events) = mpsc::unbounded_channel();
    let server = Arc::new(
        Server::new(Exports::single(export), stop.clone())
            .with_observer(Arc::new(Watcher { tx }))
            .with_max_connections(options.max_connections),
    );
    let mut signals =
        shutdown::Signals::install().map_err(|e| Error::Config(format!("signals: {e}")))?;
    let uri = options.listener.uri(&options.export_name);
    let mut serving = Some(tokio::spawn(Arc::clone(&server).serve(options.listener)));
    announce(&uri).map_err(|e| Error::Config(format!("cannot print the URI: {e}")))?;
    tracing::info!(%uri, transfer = %session.transfer().id, ?direction, "serving the transfer");

    let stats = {
        let server = Arc::clone(&server);
        let name = options.export_name.clone();
        move || {
            server
                .exports()
                .find(&name)
                .map(|e| e.stats().snapshot())
                .unwrap_or_default()
        }
    };
    let progress = options.progress.then(|| {
        let stats = stats.clone();
        let phases = session.phases();
        let (label, size) = (direction.as_str(), gated.size());
        Progress::start(label, size, move || {
            let s = stats();
            Sample {
                done: match direction {
                    Direction::Upload => s.bytes_written,
                    Direction::Download => s.bytes_read,
                },
                phase: Some(*phases.borrow()),
            }
        })
    });
    let keepalive_every = Duration::from_secs(
        session
            .transfer()
            .inactivity_timeout
            .unwrap_or(60)
            .clamp(3, 120)
            / 3,
    );
    let mut active: usize = 0;
    let mut last_io = (0u64, 0u64);
    let mut last_activity = Instant::now();
    let mut poll = tokio::time::interval(POLL.min(keepalive_every));
    let mut engine_down_since: Option<Instant> = None;

    let outcome = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Connected) => {
                    active += 1;
                    if gate.state() == GateState::Closed {
                        tracing::info!("a client is back: resuming");
                        session.resume().await?;
                        if let Err(e) = follow_data_url(&session, &gated, &mut data_url, &data).await {
                            gate.set(GateState::Ended);
                            gated.inner().set_ended();
                            stop.trigger();
                            let e = leave_transfer(&mut session, false, e).await;
                            break Outcome {
                                transfer: session.transfer().id.clone(),
                                phase: session.transfer().phase,
                                success: false,
                                message: e.to_string(),
                            };
                        }
                        gate.set(GateState::Open);
                    }
                }
                Some(Event::Closed(end)) => {
                    active = active.saturating_sub(1);
                    if active > 0 {
                        continue;
                    }
                    let s = stats();
                    match end {
                        Some(End::Disconnect) => {
                            let done = match direction {
                                Direction::Upload => s.writes_completed > 0 && s.flushed && s.write_failures == 0,
                                Direction::Download => s.bytes_read > 0,
                            };
                            if done {
                                tracing::info!(written = s.bytes_written, read = s.bytes_read, "last client left: finalizing");
                                break finish(&mut session, &gate, &stop, &mut serving, &gated.inner(), FinishHow::Finalize).await?;
                            }
                            if direction == Direction::Upload && s.write_failures > 0 {
                                tracing::warn!(
                                    failed_writes = s.write_failures,
                                    "last client left but writes failed: not finalizing; \
                                     a new client may write again"
                                );
                            } else if direction == Direction::Upload && s.writes_completed > 0 {
                                tracing::warn!(
                                    "last client left without flushing after its last write: \
                                     not finalizing (nbdcopy needs --flush); a new client may \
                                     finish the upload"
                                );
                            }
                        }
                        _ if direction == Direction::Upload => {
                            tracing::info!("last client vanished without NBD_CMD_DISC: pausing");
                            gate.set(GateState::Closed);
                            if let Err(e) = gated.inner().flush_all().await {
                                tracing::warn!(error = %e, "flush before pausing failed");
                            }
                            session.pause().await?;
                        }
                        _ => tracing::info!("last client vanished; downloads cannot pause: waiting"),
                    }
                }
                None => return Err(Error::Config("the NBD server stopped".into())),
            },
            sig = signals.recv() => {
                tracing::info!(signal = sig, "interrupted");
                let how = match (direction, options.on_interrupt) {
                    (Direction::Download, _) => FinishHow::Finalize,
                    (Direction::Upload, OnInterrupt::Pause) => FinishHow::Pause,
                    (Direction::Upload, OnInterrupt::Cancel) => FinishHow::Cancel,
                };
                let mut out = finish(&mut session, &gate, &stop, &mut serving, &gated.inner(), how).await?;
                out.success = false;
                break out;
            }
            _ = poll.tick() => {
                let phase = match session.refresh().await {
                    Ok(p) => {
                        engine_down_since = None;
                        p
                    }
                    Err(e) if !e.is_not_found() => {
                        let since = *engine_down_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > ENGINE_OUTAGE {
                            return Err(e);
                        }
                        tracing::warn!(error = %e, "cannot read the transfer; retrying");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if phase.is_failing() || phase.is_finished() {
                    gate.set(GateState::Ended);
                    gated.inner().set_ended();
                    stop.trigger();
                    break Outcome {
                        transfer: session.transfer().id.clone(),
                        phase,
                        success: false,
                        message: format!("the transfer became {phase} while serving"),
                    };
                }
                let s = stats();
                let io = (s.bytes_read, s.bytes_written);
                if io != last_io {
                    last_io = io;
                    last_activity = Instant::now();
                } else if gate.state() == GateState::Open && last_activity.elapsed() >= keepalive_every {
                    if let Err(e) = gated.inner().keepalive().await {
                        tracing::warn!(error = %e, "keepalive failed");
                    }
                    let _ = session.act(super::Action::Extend).await;
                    last_activity = Instant::now();
                }
            }
        }
    };
    stop.trigger();
    if let Some(task) = serving {
        let _ = task.await;
    }
    if let Some(p) = progress {
        p.finish();
    }
    Ok(outcome)
}

/// After a resume: if the transfer's data URL changed (the engine chose
/// another host), connect to the new one and swap it in behind the gate,
/// which is still closed.
async fn follow_data_url(
    session: &TransferSession,
    gated: &GatedBackend<ImageioBackend>,
    data_url: &mut String,
    data: &DataOptions,
) -> Result<()> {
    let t = session.transfer();
    if t.transfer_url.as_ref() == Some(data_url) || t.proxy_url.as_ref() == Some(data_url) {
        return Ok(());
    }
    let (backend, url) = connect_data(session, data).await?;
    tracing::info!(
        from = %redact_url(data_url),
        to = %redact_url(&url),
        "the transfer moved to another data server"
    );
    let old = gated.swap(Arc::new(backend)).map_err(|e| {
        Error::DataServer(format!(
            "{}: {}",
            redact_url(&url),
            scrub(&e.to_string(), &url)
        ))
    })?;
    old.set_ended();
    *data_url = url;
    Ok(())
}

/// A ticket URL with the ticket (a bearer secret) cut short.
pub fn redact_url(url: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, ticket)) => format!("{base}/{}", crate::telemetry::redact(ticket)),
        None => url.to_string(),
    }
}

/// `message` with every appearance of `url`'s ticket cut short (transport
/// errors quote the whole URL).
pub fn scrub(message: &str, url: &str) -> String {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    match path.trim_end_matches('/').rsplit_once('/') {
        Some((_, ticket)) if !ticket.is_empty() => {
            message.replace(ticket, &crate::telemetry::redact(ticket))
        }
        _ => message.to_string(),
    }
}

/// The data server cannot be used: leave the transfer where a later
/// `serve --transfer ID` can pick it up, and say so. An upload is paused (a
/// cancel would remove its disk); a download the bridge created is
/// cancelled (downloads cannot pause); one it attached to is left alone.
async fn leave_transfer(session: &mut TransferSession, created: bool, err: Error) -> Error {
    let id = session.transfer().id.clone();
    let direction = session.transfer().direction;
    tracing::warn!(transfer = %id, error = %err, "the data server cannot be used");
    let what = match direction {
        Direction::Upload => match session.pause().await {
            Ok(()) => format!(
                "transfer {id} is {}; once the data server is reachable, resume it with: \
                 nbdbridge serve ... --transfer {id}",
                session.transfer().phase
            ),
            Err(e) => format!("pausing transfer {id} failed too: {e}"),
        },
        Direction::Download if created => match session.cancel().await {
            Ok(phase) => format!("transfer {id} cancelled: {phase}"),
            Err(e) => format!("cancelling transfer {id} failed too: {e}"),
        },
        Direction::Download => format!("transfer {id} is left {}", session.transfer().phase),
    };
    match err {
        Error::DataServer(why) => Error::DataServer(format!("{why}; {what}")),
        other => Error::DataServer(format!("{other}; {what}")),
    }
}

/// What every data connection of a transfer is opened with.
#[derive(Debug, Clone)]
struct DataOptions {
    size: Option<u64>,
    direction: Direction,
    tls: TlsOptions,
    dirty_bitmap: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinishHow {
    Finalize,
    Pause,
    Cancel,
}

async fn finish(
    session: &mut TransferSession,
    gate: &Gate,
    stop: &Shutdown,
    serving: &mut Option<tokio::task::JoinHandle<()>>,
    backend: &ImageioBackend,
    how: FinishHow,
) -> Result<Outcome> {
    // Stop the NBD side first and let in-flight requests finish, then make
    // what they wrote durable before telling the engine.
    stop.trigger();
    if let Some(task) = serving.take() {
        let _ = task.await;
    }
    if how != FinishHow::Cancel && !backend.capabilities().read_only {
        if let Err(e) = backend.flush_all().await {
            tracing::warn!(error = %e, "final flush failed");
        }
    }
    let id = session.transfer().id.clone();
    let outcome = match how {
        FinishHow::Finalize => {
            gate.set(GateState::Ended);
            let phase = session.finalize().await?;
            Outcome {
                success: phase == Phase::FinishedSuccess,
                message: format!("transfer {id} finalized: {phase}"),
                transfer: id,
                phase,
            }
        }
        FinishHow::Pause => {
            session.pause().await?;
            gate.set(GateState::Ended);
            let phase = session.transfer().phase;
            Outcome {
                success: false,
                message: format!(
                    "transfer {id} is {phase}; resume it with: nbdbridge serve ... --transfer {id}"
                ),
                transfer: id,
                phase,
            }
        }
        FinishHow::Cancel => {
            gate.set(GateState::Ended);
            let phase = session.cancel().await?;
            Outcome {
                success: false,
                message: format!("transfer {id} cancelled: {phase}"),
                transfer: id,
                phase,
            }
        }
    };
    Ok(outcome)
}

/// Open the data connection: the host's `transfer_url`, else the engine's
/// `proxy_url`; the backend and the URL it uses.
///
/// # Errors
/// [`Error::DataServer`] naming each URL tried and why it failed.
async fn connect_data(
    session: &TransferSession,
    data: &DataOptions,
) -> Result<(ImageioBackend, String)> {
    let t = session.transfer();
    let mut urls: Vec<&String> = t.transfer_url.iter().chain(t.proxy_url.iter()).collect();
    urls.dedup();
    if urls.is_empty() {
        return Err(Error::DataServer(format!(
            "the engine gave transfer {} no transfer_url nor proxy_url",
            t.id
        )));
    }
    let mut failures = Vec::new();
    for url in urls {
        match connect_one(url, data).await {
            Ok(b) => return Ok((b, url.clone())),
            Err(e) => {
                let why = format!("{}: {}", redact_url(url), scrub(&e.to_string(), url));
                tracing::warn!(error = %why, "data URL unusable");
                failures.push(why);
            }
        }
    }
    Err(Error::DataServer(failures.join("; ")))
}

/// One data URL, with the dirty extents checked when they are wanted.
async fn connect_one(url: &str, data: &DataOptions) -> crate::backend::Result<ImageioBackend> {
    let config = ImageioConfig {
        url: url.to_string(),
        size: data.size,
        read_only: data.direction == Direction::Download,
        sparse: None,
        dirty_bitmap: data.dirty_bitmap.clone(),
        tls: data.tls.clone(),
        use_unix_socket: true,
        max_connections: None,
    };
    let backend = ImageioBackend::connect(config).await?;
    if let Some(name) = &data.dirty_bitmap {
        check_dirty(&backend, name).await?;
    }
    Ok(backend)
}

/// Ask the data server for the dirty extents once, so that a ticket without
/// them fails at the start instead of at the backup tool's first
/// BLOCK_STATUS. (The answer is kept: later queries are served from it.)
///
/// # Errors
/// The server has no dirty extents for this ticket (imageio answers 404:
/// only tickets with `"dirty": true` of incremental backups have them,
/// and its file backend has none at all).
pub async fn check_dirty(backend: &ImageioBackend, name: &str) -> crate::backend::Result<()> {
    match backend
        .extents(ExtentContext::Dirty, 0, backend.size(), 1)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => Err(crate::backend::Error::new(
            e.kind(),
            format!(
                "no dirty extents for qemu:dirty-bitmap:{name} ({e}); imageio serves them \
                 only for tickets with \"dirty\": true, which the engine gives only to the \
                 download transfers of an incremental backup"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{redact_url, scrub};

    #[test]
    fn tickets_are_cut_short_in_urls_and_messages() {
        let url = "http://127.0.0.1:9/images/0123456789abcdef";
        assert_eq!(redact_url(url), "http://127.0.0.1:9/images/01234567…");
        let msg = format!("OPTIONS: error sending request for url ({url}): refused");
        assert_eq!(
            scrub(&msg, url),
            "OPTIONS: error sending request for url (http://127.0.0.1:9/images/01234567…): refused"
        );
        assert_eq!(scrub("no url here", url), "no url here");
        assert_eq!(
            scrub("host:54322 kept", "http://host:54322/"),
            "host:54322 kept"
        );
    }
}
