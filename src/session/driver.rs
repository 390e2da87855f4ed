//! `serve` for a transfer: the NBD server over the transfer's imageio URL,
//! with every decision left to the phase rules ([`crate::phases`]).
//!
//! The driver only feeds the rules their events (the NBD observer does it
//! from the connections' tasks; signals, the engine's phase, ticks and the
//! `--run` command's exit come through the loop here) and carries out the
//! actions they answer with, in order, feeding the results back:
//! - flush every data connection, pause, resume (following a data URL
//!   that changed after the resume), stop serving;
//! - keep the ticket and the transfer alive while clients are idle;
//! - finish: finalize, pause, cancel or leave the transfer, and exit.
//!
//! A data server that cannot be used (at the start or after a resume):
//! pause an upload (a download the bridge created is cancelled), exit
//! non-zero naming the URLs tried, tickets redacted.

use super::engine_client::EngineClient;
use super::error::{Error, Result};
use super::transfer::{Target, TransferSession};
use crate::backend::gate::{Gate, GateState, GatedBackend};
use crate::backend::imageio::{ImageioBackend, ImageioConfig, TlsOptions};
use crate::backend::{Backend, ExtentContext};
use crate::captive::{Captive, RunEnv};
use crate::nbd::consts::*;
use crate::nbd::{Answered, End, Export, Exports, HandshakeOptions, Listener, Observer, Server};
use crate::ovirt::{Direction, Format, Phase};
use crate::phases::{self, Action, Coverage, Ending, Event, Final, Machine, Op, RangeSet};
use crate::progress::{Progress, Sample};
use crate::shutdown::{self, Shutdown};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

pub use crate::phases::OnInterrupt;

/// How often the session looks at the engine while serving.
pub(super) const POLL: Duration = Duration::from_secs(5);
/// How long the engine may stay unreachable while serving (a restart)
/// before the bridge gives up.
pub(super) const ENGINE_OUTAGE: Duration = Duration::from_secs(120);

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
    /// `--run`: run this through `sh -c` once serving; its exit decides.
    pub run: Option<String>,
    /// The command line that serves this transfer again, without its
    /// target: `--transfer ID` is added to it in the resume hint.
    pub resume_args: Vec<String>,
    /// NBD TLS and the handshake deadline.
    pub handshake: HandshakeOptions,
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
    /// Exit status of serve.
    pub status: i32,
    /// Why, in words.
    pub message: String,
}

impl Outcome {
    /// Exit 0?
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// The command that resumes transfer `id`, ready to paste into a shell.
pub fn resume_command(args: &[String], id: &str) -> String {
    let mut words: Vec<&str> = args.iter().map(String::as_str).collect();
    words.extend(["--transfer", id]);
    shlex::try_join(words.iter().copied()).unwrap_or_else(|_| words.join(" "))
}

/// The rules of one transfer, fed from every connection's task; what they
/// decide goes to the driver loop, the gate moves at once. (`serve
/// --backup` has one per disk, each behind its own export.)
pub(super) struct Judge {
    machine: Mutex<Machine>,
    gate: Gate,
    stop: Shutdown,
    actions: mpsc::UnboundedSender<Action>,
    started: Instant,
    /// Milliseconds since `started` of the last answered request.
    last_request: AtomicU64,
}

impl Judge {
    /// The rules `machine` over `gate`: `stop` fires once they admit no
    /// new client, their actions go to `actions`.
    pub(super) fn new(
        machine: Machine,
        gate: Gate,
        stop: Shutdown,
        actions: mpsc::UnboundedSender<Action>,
    ) -> Self {
        Judge {
            machine: Mutex::new(machine),
            gate,
            stop,
            actions,
            started: Instant::now(),
            last_request: AtomicU64::new(0),
        }
    }

    /// Feed the rules one event; their actions go to the driver.
    pub(super) fn feed(&self, event: Event) {
        let mut machine = match self.machine.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let actions = machine.handle(event);
        self.gate.set(match machine.gate() {
            phases::Gate::Open => GateState::Open,
            phases::Gate::Closed => GateState::Closed,
            phases::Gate::Ended => GateState::Ended,
        });
        if !machine.admits() {
            // Decided: new clients are refused from now on (the handshake
            // answers NBD_REP_ERR_SHUTDOWN).
            self.stop.trigger();
        }
        for action in actions {
            let _ = self.actions.send(action);
        }
    }

    /// How long no request has moved (nor a keepalive).
    pub(super) fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last_request.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Something moved now (a request, or a keepalive serve sent).
    pub(super) fn touch(&self) {
        self.last_request.store(
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The gate the rules move.
    pub(super) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// What the download still misses, for the log (None: an upload).
    pub(super) fn coverage(&self) -> Option<(bool, String)> {
        let machine = match self.machine.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        machine.coverage().map(|c| (c.complete(), c.summary()))
    }
}

impl Observer for Judge {
    fn connected(&self, conn: u64) {
        self.feed(Event::Opened(conn));
    }

    fn answered(&self, conn: u64, request: &Answered) {
        self.touch();
        let op = match request.command {
            NBD_CMD_READ => Op::Read {
                offset: request.offset,
                len: request.len,
            },
            NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM => Op::Write,
            NBD_CMD_FLUSH => Op::Flush,
            NBD_CMD_BLOCK_STATUS => Op::Described {
                offset: request.offset,
                len: request.len,
            },
            _ => Op::Other,
        };
        self.feed(Event::Request {
            conn,
            op,
            ok: request.ok,
        });
    }

    fn disconnected(&self, conn: u64, end: Option<End>) {
        let how = match end {
            Some(End::Disconnect) => Ending::Clean,
            Some(End::Vanished) => Ending::Vanished,
            Some(End::Shutdown) => Ending::Stopped,
            None => Ending::Broken,
        };
        self.feed(Event::Ended { conn, how });
    }
}

/// Serve `target` through `client` until the transfer ends; `announce` is
/// called with the NBD URI once clients can connect. `signals` were
/// installed by the caller before anything started, so none is lost.
///
/// # Errors
/// The transfer could not be set up or the engine failed.
pub async fn run(
    client: Arc<EngineClient>,
    target: Target,
    options: DriverOptions,
    signals: shutdown::Signals,
    announce: impl FnOnce(&str) -> std::io::Result<()>,
) -> Result<Outcome> {
    let session = TransferSession::open(Arc::clone(&client), &target, options.allow_cow).await?;
    let span = tracing::info_span!("transfer", id = %session.transfer().id);
    serve(client, session, target, options, signals, announce)
        .instrument(span)
        .await
}

async fn serve(
    client: Arc<EngineClient>,
    mut session: TransferSession,
    target: Target,
    options: DriverOptions,
    signals: shutdown::Signals,
    announce: impl FnOnce(&str) -> std::io::Result<()>,
) -> Result<Outcome> {
    let direction = session.transfer().direction;
    let size = match (&session.transfer().disk_id, session.transfer().format) {
        // A cow transfer (`--allow-cow`) moves the QCOW2 file itself: its
        // size is the file's, which the data server's extents give, not the
        // disk's virtual size (reads past the file's end would fail).
        (_, Some(Format::Cow)) | (None, _) => None,
        (Some(id), _) => client.disk(id).await?.provisioned_size,
    };
    let data = DataOptions {
        size,
        direction,
        tls: options.tls.clone(),
        dirty_bitmap: options.dirty_bitmap.clone(),
    };
    let created = matches!(target, Target::Disk { .. });
    let (backend, data_url) = match connect_data(&session, &data).await {
        Ok(found) => found,
        Err(e) => {
            return Err(leave_transfer(&mut session, created, e, &options.resume_args).await);
        }
    };
    let coverage = match direction {
        Direction::Upload => None,
        Direction::Download => match data_coverage(&backend, data.dirty_bitmap.is_some()).await {
            Ok(c) => Some(c),
            Err(e) => {
                let e = Error::DataServer(format!("cannot map the disk's data: {e}"));
                return Err(leave_transfer(&mut session, created, e, &options.resume_args).await);
            }
        },
    };
    if let Some(c) = &coverage {
        tracing::info!("a download ends once {} has been read", c.summary());
    }
    let keepalive_after = keepalive_after(&session);
    let machine = Machine::new(
        phases::Config {
            direction,
            captive: options.run.is_some(),
            on_interrupt: options.on_interrupt,
            keepalive_after,
        },
        coverage,
    );

    let gate = Gate::new(GateState::Open);
    let gated = Arc::new(GatedBackend::new(Arc::new(backend), gate.clone()));
    let export = Export::new(options.export_name.clone(), None, Arc::clone(&gated));
    let stop = Shutdown::new();
    let (tx, actions) = mpsc::unbounded_channel();
    let judge = Arc::new(Judge::new(machine, gate, stop.clone(), tx));
    let server = Arc::new(
        Server::new(Exports::single(export), stop.clone())
            .with_observer(Arc::clone(&judge) as Arc<dyn Observer>)
            .with_handshake(options.handshake.clone())
            .with_max_connections(options.max_connections),
    );
    let env = RunEnv::of(
        &options.listener,
        &options.export_name,
        options.handshake.tls_mode(),
    );
    let serving = tokio::spawn(Arc::clone(&server).serve(options.listener));
    announce(&env.uri).map_err(|e| Error::Config(format!("cannot print the URI: {e}")))?;
    tracing::info!(uri = %env.uri, ?direction, "serving the transfer");

    let child = match &options.run {
        Some(cmd) => Captive::start(cmd, &env),
        None => Captive::none(),
    };
    let progress = options.progress.then(|| {
        let server = Arc::clone(&server);
        let name = options.export_name.clone();
        let phases = session.phases();
        let (label, size) = (direction.as_str(), gated.size());
        Progress::start(label, size, move || {
            let s = server
                .exports()
                .find(&name)
                .map(|e| e.stats().snapshot())
                .unwrap_or_default();
            Sample {
                done: match direction {
                    Direction::Upload => s.bytes_written,
                    Direction::Download => s.bytes_read,
                },
                phase: Some(*phases.borrow()),
            }
        })
    });

    let mut driver = Driver {
        session,
        judge,
        gated,
        data_url,
        data,
        stop,
        serving: Some(serving),
        child,
        resume_args: options.resume_args,
    };
    let outcome = driver.drive(actions, signals).await;
    // Whatever ended it, nothing may pass the gate any more (requests held
    // there fail now instead of at their deadline).
    driver.judge.gate.set(GateState::Ended);
    driver.stop_serving().await;
    driver.child.end().await;
    if let Some(p) = progress {
        p.finish();
    }
    outcome
}

/// How often a quiet serve keeps the ticket alive: a third of the
/// transfer's inactivity timeout (60 s when the engine gives none), so
/// a keepalive that is late or lost still leaves time for the next.
pub(super) fn keepalive_after(session: &TransferSession) -> Duration {
    Duration::from_secs(
        session
            .transfer()
            .inactivity_timeout
            .unwrap_or(60)
            .clamp(3, 120)
            / 3,
    )
}

struct Driver {
    session: TransferSession,
    judge: Arc<Judge>,
    gated: Arc<GatedBackend<ImageioBackend>>,
    data_url: String,
    data: DataOptions,
    stop: Shutdown,
    serving: Option<tokio::task::JoinHandle<()>>,
    child: Captive,
    resume_args: Vec<String>,
}

impl Driver {
    async fn drive(
        &mut self,
        mut actions: mpsc::UnboundedReceiver<Action>,
        mut signals: shutdown::Signals,
    ) -> Result<Outcome> {
        let mut poll = tokio::time::interval(POLL.min(keepalive_after(&self.session)));
        let mut engine_down_since: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                action = actions.recv() => {
                    let Some(action) = action else {
                        return Err(Error::Config("the rules stopped".into()));
                    };
                    if let Some(outcome) = self.carry_out(action).await? {
                        return Ok(outcome);
                    }
                }
                sig = signals.recv() => {
                    tracing::info!(signal = sig, "interrupted");
                    self.judge.feed(Event::Signal(sig));
                }
                code = self.child.exited() => {
                    self.judge.feed(Event::RunExited(code));
                }
                _ = poll.tick() => {
                    match self.session.refresh().await {
                        Ok(phase) => {
                            engine_down_since = None;
                            self.judge.feed(Event::Engine(phase));
                        }
                        Err(e) if !e.is_not_found() => {
                            let since = *engine_down_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > ENGINE_OUTAGE {
                                return Err(e);
                            }
                            tracing::warn!(error = %e, "cannot read the transfer; retrying");
                        }
                        Err(e) => return Err(e),
                    }
                    self.judge.feed(Event::Tick { quiet: self.judge.quiet() });
                }
            }
        }
    }

    /// Carry out one action; the outcome once serve is over.
    async fn carry_out(&mut self, action: Action) -> Result<Option<Outcome>> {
        match action {
            Action::Log(line) => tracing::info!("{line}"),
            Action::KeepAlive => {
                if let Err(e) = self.gated.inner().keepalive().await {
                    tracing::warn!(error = %e, "keepalive failed");
                }
                if let Err(e) = self.session.act(crate::ovirt::Action::Extend).await {
                    tracing::debug!(error = %e, "extend failed");
                }
                self.judge.touch();
            }
            Action::Flush => {
                let ok = match self.gated.inner().flush_all().await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "flushing the data server failed");
                        false
                    }
                };
                self.judge.feed(Event::Flushed { ok });
            }
            Action::Pause { reason } => {
                tracing::warn!(
                    "pausing transfer {}: {reason}; run the client again to resume it",
                    self.session.transfer().id
                );
                if let Err(e) = self.gated.inner().flush_all().await {
                    tracing::warn!(error = %e, "flush before pausing failed");
                }
                self.session.pause().await?;
                self.judge.feed(Event::Paused);
            }
            Action::Resume => {
                self.session.resume().await?;
                if let Err(e) =
                    follow_data_url(&self.session, &self.gated, &mut self.data_url, &self.data)
                        .await
                {
                    self.gated.inner().set_ended();
                    self.judge.gate.set(GateState::Ended);
                    self.stop.trigger();
                    let e = leave_transfer(&mut self.session, false, e, &self.resume_args).await;
                    return Ok(Some(Outcome {
                        transfer: self.session.transfer().id.clone(),
                        phase: self.session.transfer().phase,
                        status: 1,
                        message: e.to_string(),
                    }));
                }
                self.judge.feed(Event::Resumed);
            }
            Action::StopServing => {
                self.stop_serving().await;
                self.judge.feed(Event::Stopped);
            }
            Action::Finish { how, status, why } => {
                return self.finish(how, status, why).await.map(Some);
            }
        }
        Ok(None)
    }

    /// Stop listening; wait until every connection finished its requests.
    async fn stop_serving(&mut self) {
        self.stop.trigger();
        if let Some(task) = self.serving.take() {
            let _ = task.await;
        }
    }

    async fn finish(&mut self, how: Final, status: i32, why: String) -> Result<Outcome> {
        tracing::info!(?how, status, "{why}");
        // Stop the NBD side first and let in-flight requests finish, then
        // make what they wrote durable before telling the engine.
        self.stop_serving().await;
        self.child.end().await;
        let id = self.session.transfer().id.clone();
        let backend = self.gated.inner();
        let resume = resume_command(&self.resume_args, &id);
        let (phase, status, message) = match how {
            Final::Finalize => {
                let phase = self.session.finalize().await?;
                let status = if phase == Phase::FinishedSuccess {
                    status
                } else {
                    status.max(1)
                };
                (
                    phase,
                    status,
                    format!("transfer {id} finalized: {phase} ({why})"),
                )
            }
            Final::Pause => {
                if !backend.capabilities().read_only {
                    if let Err(e) = backend.flush_all().await {
                        tracing::warn!(error = %e, "flush before pausing failed");
                    }
                }
                self.session.pause().await?;
                let phase = self.session.transfer().phase;
                (
                    phase,
                    status.max(1),
                    format!("{why}; transfer {id} is {phase}; resume it with: {resume}"),
                )
            }
            Final::Cancel => {
                let phase = self.session.cancel().await?;
                (
                    phase,
                    status.max(1),
                    format!("{why}; transfer {id} cancelled: {phase}"),
                )
            }
            Final::Leave => {
                let phase = self.session.transfer().phase;
                let hint = if phase.is_paused() {
                    format!("; resume it with: {resume}")
                } else {
                    String::new()
                };
                (
                    phase,
                    status.max(1),
                    format!("{why}; transfer {id} is {phase}{hint}"),
                )
            }
        };
        backend.set_ended();
        Ok(Outcome {
            transfer: id,
            phase,
            status,
            message,
        })
    }
}

/// What a download must read: the data extents (not reported as zero) of
/// `base:allocation`, and with a dirty bitmap only the dirty ones of those.
///
/// # Errors
/// The data server could not list the extents.
pub(super) async fn data_coverage(
    backend: &ImageioBackend,
    dirty: bool,
) -> crate::backend::Result<Coverage> {
    let size = backend.size();
    let mut data = RangeSet::new();
    walk_extents(backend, ExtentContext::Allocation, size, |e| {
        if !e.zero {
            data.insert(e.offset, e.offset.saturating_add(e.len));
        }
    })
    .await?;
    if dirty {
        walk_extents(backend, ExtentContext::Dirty, size, |e| {
            if !e.zero {
                // Clean: nothing to copy there.
                data.remove(e.offset, e.offset.saturating_add(e.len));
            }
        })
        .await?;
    }
    Ok(Coverage::new(size, data.runs()))
}

/// Every extent of `context` over the whole image, in order.
async fn walk_extents(
    backend: &ImageioBackend,
    context: ExtentContext,
    size: u64,
    mut each: impl FnMut(&crate::backend::Extent),
) -> crate::backend::Result<()> {
    let mut offset = 0;
    while offset < size {
        let list = backend
            .extents(context, offset, size - offset, 1 << 16)
            .await?;
        let mut next = offset;
        for e in &list {
            each(e);
            next = next.max(e.offset.saturating_add(e.len));
        }
        if next <= offset {
            return Err(crate::backend::Error::new(
                crate::backend::ErrorKind::Io,
                format!("the data server's extents stop at {offset} of {size} bytes"),
            ));
        }
        offset = next;
    }
    Ok(())
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
async fn leave_transfer(
    session: &mut TransferSession,
    created: bool,
    err: Error,
    resume_args: &[String],
) -> Error {
    let id = session.transfer().id.clone();
    let direction = session.transfer().direction;
    tracing::warn!(transfer = %id, error = %err, "the data server cannot be used");
    let what = match direction {
        Direction::Upload => match session.pause().await {
            Ok(()) => format!(
                "transfer {id} is {}; once the data server is reachable, resume it with: {}",
                session.transfer().phase,
                resume_command(resume_args, &id)
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
pub(super) struct DataOptions {
    /// The image size (None: from the data server's extents).
    pub(super) size: Option<u64>,
    /// Upload or download (a download's backend is read-only).
    pub(super) direction: Direction,
    /// TLS for the data server.
    pub(super) tls: TlsOptions,
    /// Serve the ticket's dirty extents as `qemu:dirty-bitmap:<name>`
    /// (checked at connect).
    pub(super) dirty_bitmap: Option<String>,
}

/// Open the data connection: the host's `transfer_url`, else the engine's
/// `proxy_url`; the backend and the URL it uses.
///
/// # Errors
/// [`Error::DataServer`] naming each URL tried and why it failed.
pub(super) async fn connect_data(
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
    use super::{redact_url, resume_command, scrub};

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

    #[test]
    fn the_resume_command_is_quoted_for_a_shell() {
        let args: Vec<String> = [
            "/usr/bin/nbdbridge",
            "serve",
            "--data-dir",
            "/tmp/my data",
            "--run",
            "qemu-img convert -n a.qcow2 \"$uri\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cmd = resume_command(&args, "t-1");
        assert_eq!(
            shlex::split(&cmd).unwrap(),
            [&args[..], &["--transfer".into(), "t-1".into()]].concat()
        );
    }
}
