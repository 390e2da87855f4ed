//! `serve --backup`: the driver of one VM backup. It carries out what the
//! backup's steps ([`crate::phases::backup`]) answer with, through the
//! engine client, and feeds the results back:
//! - start the backup of the VM's disks, poll it until it is `ready`;
//! - open one download transfer per disk with the backup's id (waiting out
//!   `initializing`, connecting its data server, mapping what a copy must
//!   read, checking the dirty extents of a disk backed up incrementally);
//! - serve every disk as its own export of one NBD server, named by the
//!   disk id and described by its alias, each behind its own gate and its
//!   own phase rules ([`crate::phases::Machine`], the download rules of
//!   `serve --disk --direction download`), which end its transfer by the
//!   coverage rule, a signal or the `--run` command's exit;
//! - once every disk's transfer ended, stop serving, finalize the backup and
//!   poll it until it `succeeded`; on any failure, stop serving, cancel the
//!   transfers still open and finalize the backup, so that nothing of it is
//!   left running (and say what is when the engine cannot be reached).

use super::driver::{
    DataOptions, ENGINE_OUTAGE, Judge, POLL, connect_data, data_coverage, keepalive_after,
    redact_url,
};
use super::engine_client::{Backup, BackupDisk, EngineClient, Vm};
use super::error::{Error, Result};
use super::transfer::{PHASE_DEADLINE, Target, TransferSession};
use crate::backend::Backend;
use crate::backend::gate::{Gate, GateState, GatedBackend};
use crate::backend::imageio::{ImageioBackend, TlsOptions};
use crate::captive::{Captive, RunEnv};
use crate::nbd::consts::QEMU_DIRTY_BITMAP;
use crate::nbd::{Answered, End, Export, Exports, HandshakeOptions, Listener, Observer, Server};
use crate::ovirt::{BackupPhase, Direction, DiskBackupMode, Phase};
use crate::phases::backup::{self as plan, DiskEnd, Event, Finish, Left, Machine, State};
use crate::phases::{self, Final, OnInterrupt};
use crate::shutdown::{self, Shutdown};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

/// First and longest pause between two reads of a backup that is moving.
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(2);
/// How long a backup may stay in one phase while we wait for it to move
/// (`starting` on a real engine freezes the VM and adds bitmaps to every
/// disk: give it time).
pub const BACKUP_DEADLINE: Duration = Duration::from_secs(600);
/// What the backup is called at the engine.
const DESCRIPTION: &str = "nbdbridge serve --backup";

/// Settings of a `serve --backup`.
#[derive(Debug)]
pub struct BackupOptions {
    /// The VM, by name or id.
    pub vm: String,
    /// Back up incrementally from this checkpoint.
    pub from_checkpoint: Option<String>,
    /// Pin the disks' transfers to this host.
    pub host_id: Option<String>,
    /// Where NBD clients connect.
    pub listener: Listener,
    /// TLS for the data servers.
    pub tls: TlsOptions,
    /// `--run`: run this through `sh -c` once serving; its exit decides.
    pub run: Option<String>,
    /// NBD TLS and the handshake deadline.
    pub handshake: HandshakeOptions,
    /// Most NBD clients served at once.
    pub max_connections: usize,
}

/// How a `serve --backup` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupOutcome {
    /// The VM.
    pub vm: Vm,
    /// The backup, if one was created.
    pub backup: Option<String>,
    /// Exit status of serve.
    pub status: i32,
    /// The checkpoint to print on success (empty: the backup created none).
    pub checkpoint: Option<String>,
    /// Why, in words, with what the user should do about anything left.
    pub message: String,
}

impl BackupOutcome {
    /// Exit 0?
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Back up the VM `options.vm` through `client` and serve its disks until
/// the backup ends; `announce` gets the stdout lines once clients can
/// connect (the server's URI first, then `backup=ID`, then one `disk=ID
/// uri=URI` per disk). `signals` were installed by the caller.
///
/// # Errors
/// The VM cannot be found or has no disks, or the engine failed before
/// any backup was started; every later failure is in the outcome.
pub async fn run<A>(
    client: Arc<EngineClient>,
    options: BackupOptions,
    signals: shutdown::Signals,
    announce: A,
) -> Result<BackupOutcome>
where
    A: FnOnce(&[String]) -> std::io::Result<()>,
{
    let vm = client.find_vm(&options.vm).await?.ok_or_else(|| {
        Error::Config(format!(
            "there is no VM '{}' (give its name or id)",
            options.vm
        ))
    })?;
    let disk_ids = client.vm_disk_ids(&vm.id).await?;
    if disk_ids.is_empty() {
        return Err(Error::Config(format!(
            "VM {} ({}) has no disks to back up",
            vm.name, vm.id
        )));
    }
    tracing::info!(vm = %vm.id, name = %vm.name, disks = disk_ids.len(),
        from = ?options.from_checkpoint, "backing up");
    let span = tracing::info_span!("backup", vm = %vm.name);
    let (disk_tx, disk_rx) = mpsc::unbounded_channel();
    let served = disk_ids.iter().map(|_| None).collect();
    let mut driver = BackupDriver {
        machine: Machine::new(disk_ids.len()),
        client,
        vm,
        disk_ids,
        from_checkpoint: options.from_checkpoint,
        host_id: options.host_id,
        tls: options.tls,
        run: options.run,
        handshake: options.handshake,
        max_connections: options.max_connections,
        listener: Some(options.listener),
        announce: Some(announce),
        backup: None,
        disks: Vec::new(),
        served,
        stop: Shutdown::new(),
        serving: None,
        child: Captive::none(),
        disk_tx,
        disk_rx,
        poll_pause: POLL_MIN,
        phase_since: None,
        engine_down_since: None,
        tick: POLL,
        next_tick: tokio::time::Instant::now(),
    };
    Ok(driver.drive(signals).instrument(span).await)
}

/// One disk being served: its transfer, its rules, its backend.
struct Served {
    disk: BackupDisk,
    session: TransferSession,
    judge: Arc<Judge>,
    gated: Arc<GatedBackend<ImageioBackend>>,
    /// `qemu:dirty-bitmap:NAME` is offered (an incremental disk).
    bitmap: Option<String>,
    /// How its transfer ended, once it did.
    end: Option<DiskEnd>,
}

impl Served {
    /// What `nbdinfo --list` shows: the alias, and what the export holds.
    fn description(&self) -> String {
        let alias = self
            .disk
            .disk
            .alias
            .as_deref()
            .unwrap_or(&self.disk.disk.id);
        match &self.bitmap {
            Some(b) => format!(
                "{alias} (incremental: changes since checkpoint {b} in {QEMU_DIRTY_BITMAP}{b})"
            ),
            None => format!("{alias} (full)"),
        }
    }
}

/// Tells each disk's rules what happens on its own export.
struct Router {
    judges: Vec<(String, Arc<Judge>)>,
    conns: Mutex<HashMap<u64, Arc<Judge>>>,
}

impl Router {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Judge>>> {
        match self.conns.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn judge_of(&self, conn: u64) -> Option<Arc<Judge>> {
        self.conns().get(&conn).cloned()
    }
}

impl Observer for Router {
    fn entered(&self, conn: u64, export: &str) {
        let Some(judge) = self
            .judges
            .iter()
            .find(|(name, _)| name == export)
            .map(|(_, j)| Arc::clone(j))
        else {
            return;
        };
        self.conns().insert(conn, Arc::clone(&judge));
        judge.connected(conn);
    }

    fn answered(&self, conn: u64, request: &Answered) {
        if let Some(judge) = self.judge_of(conn) {
            judge.answered(conn, request);
        }
    }

    fn disconnected(&self, conn: u64, end: Option<End>) {
        let judge = self.conns().remove(&conn);
        if let Some(judge) = judge {
            judge.disconnected(conn, end);
        }
    }
}

struct BackupDriver<A> {
    machine: Machine,
    client: Arc<EngineClient>,
    vm: Vm,
    disk_ids: Vec<String>,
    from_checkpoint: Option<String>,
    host_id: Option<String>,
    tls: TlsOptions,
    run: Option<String>,
    handshake: HandshakeOptions,
    max_connections: usize,
    listener: Option<Listener>,
    announce: Option<A>,
    /// The backup as last read.
    backup: Option<Backup>,
    /// The backup's disks and how it takes each, read once it is ready.
    disks: Vec<BackupDisk>,
    /// Each disk (as `disk_ids`), once its transfer is open.
    served: Vec<Option<Served>>,
    /// Stops the NBD server.
    stop: Shutdown,
    serving: Option<tokio::task::JoinHandle<()>>,
    child: Captive,
    /// What each disk's rules decide, tagged with the disk.
    disk_tx: mpsc::UnboundedSender<(usize, phases::Action)>,
    disk_rx: mpsc::UnboundedReceiver<(usize, phases::Action)>,
    poll_pause: Duration,
    /// The backup's phase as last read, and since when.
    phase_since: Option<(Option<BackupPhase>, Instant)>,
    engine_down_since: Option<Instant>,
    /// How often the disks' transfers and the backup are looked at while
    /// serving.
    tick: Duration,
    next_tick: tokio::time::Instant,
}

/// A signal that already came, without waiting for one.
async fn signal_now(signals: &mut shutdown::Signals) -> Option<&'static str> {
    tokio::select! {
        biased;
        sig = signals.recv() => Some(sig),
        () = std::future::ready(()) => None,
    }
}

impl<A> BackupDriver<A>
where
    A: FnOnce(&[String]) -> std::io::Result<()>,
{
    async fn drive(&mut self, mut signals: shutdown::Signals) -> BackupOutcome {
        let mut queue: VecDeque<plan::Action> = self.machine.start().into();
        loop {
            // Between two steps, a signal is heard (the steps that wait
            // for the engine are bounded).
            if let Some(sig) = signal_now(&mut signals).await {
                self.interrupted(sig, &mut queue).await;
            }
            if let Some(action) = queue.pop_front() {
                if let plan::Action::Finish(f) = action {
                    return self.finish(f).await;
                }
                if let Some(event) = self.carry_out(action).await {
                    queue.extend(self.machine.handle(event));
                }
                continue;
            }
            let serving = self.machine.state() == State::Serving;
            tokio::select! {
                sig = signals.recv() => self.interrupted(sig, &mut queue).await,
                code = self.child.exited() => {
                    tracing::info!(status = code, "the --run command exited");
                    self.stop_serving().await;
                    for s in self.served.iter().flatten() {
                        if s.end.is_none() {
                            s.judge.feed(phases::Event::RunExited(code));
                        }
                    }
                }
                Some((n, action)) = self.disk_rx.recv() => {
                    if let Some(event) = self.disk_action(n, action).await {
                        queue.extend(self.machine.handle(event));
                    }
                }
                () = tokio::time::sleep_until(self.next_tick), if serving => {
                    self.next_tick = tokio::time::Instant::now() + self.tick;
                    for event in self.watch().await {
                        queue.extend(self.machine.handle(event));
                    }
                }
            }
        }
    }

    /// SIGINT, SIGTERM, SIGHUP: while serving, in-flight requests finish
    /// and each disk's rules finalize its download (as `serve --disk
    /// --direction download` does); before, the backup is given up.
    async fn interrupted(&mut self, sig: &'static str, queue: &mut VecDeque<plan::Action>) {
        tracing::info!(signal = sig, "interrupted");
        if self.machine.state() == State::Serving {
            self.stop_serving().await;
            for s in self.served.iter().flatten() {
                if s.end.is_none() {
                    s.judge.feed(phases::Event::Signal(sig));
                }
            }
        }
        queue.extend(self.machine.handle(Event::Interrupted(sig)));
    }

    /// Carry out one step; the event it answers with, if any.
    async fn carry_out(&mut self, action: plan::Action) -> Option<Event> {
        match action {
            plan::Action::StartBackup => Some(self.start_backup().await),
            plan::Action::PollBackup => Some(self.poll_backup().await),
            plan::Action::OpenTransfer(n) => Some(self.open_disk(n).await),
            plan::Action::Serve => self.serve_exports(),
            plan::Action::StopServing => {
                self.stop_serving().await;
                Some(Event::Stopped)
            }
            plan::Action::CancelTransfer(n) => Some(self.cancel_disk(n).await),
            plan::Action::FinalizeBackup => Some(self.finalize_backup().await),
            plan::Action::Log(line) => {
                tracing::info!("{line}");
                None
            }
            // Handled by the loop.
            plan::Action::Finish(_) => None,
        }
    }

    async fn start_backup(&mut self) -> Event {
        match self
            .client
            .add_backup(
                &self.vm.id,
                &self.disk_ids,
                self.from_checkpoint.as_deref(),
                DESCRIPTION,
            )
            .await
        {
            Ok(b) => {
                tracing::info!(backup = %b.id, from = ?b.from_checkpoint_id, "backup started");
                self.backup = Some(b);
                self.poll_pause = POLL_MIN;
                self.phase_since = None;
                Event::Started
            }
            Err(e) => Event::Refused(e.to_string()),
        }
    }

    /// Wait a little (backing off while the phase stays), read the backup.
    async fn poll_backup(&mut self) -> Event {
        let Some(id) = self.backup.as_ref().map(|b| b.id.clone()) else {
            return Event::Lost("no backup was created".into());
        };
        loop {
            tokio::time::sleep(self.poll_pause).await;
            self.poll_pause = (self.poll_pause * 2).min(POLL_MAX);
            let b = match self.client.backup(&self.vm.id, &id).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => {
                    return Event::Lost(format!("backup {id} is gone: {e}"));
                }
                Err(e) => {
                    let since = *self.engine_down_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > ENGINE_OUTAGE {
                        return Event::Lost(e.to_string());
                    }
                    tracing::warn!(error = %e, "cannot read the backup; retrying");
                    continue;
                }
            };
            self.engine_down_since = None;
            match self.phase_since {
                Some((seen, since)) if seen == b.phase => {
                    if since.elapsed() > BACKUP_DEADLINE {
                        let phase = b
                            .phase
                            .map_or("in a phase we do not know", BackupPhase::as_str);
                        return Event::Lost(format!(
                            "backup {id} is still {phase} after {BACKUP_DEADLINE:?}"
                        ));
                    }
                }
                _ => {
                    tracing::info!(backup = %id, phase = b.phase.map_or("?", BackupPhase::as_str),
                        "backup {}", b.phase.map_or("?", BackupPhase::as_str));
                    self.phase_since = Some((b.phase, Instant::now()));
                    self.poll_pause = POLL_MIN;
                }
            }
            let Some(phase) = b.phase else {
                // A phase we do not know: wait for one we do.
                continue;
            };
            let checkpoint = b.to_checkpoint_id.clone();
            self.backup = Some(b);
            return Event::Backup { phase, checkpoint };
        }
    }

    fn backup_id(&self) -> Option<String> {
        self.backup.as_ref().map(|b| b.id.clone())
    }

    /// Open disk `n`'s transfer and everything its export needs.
    async fn open_disk(&mut self, n: usize) -> Event {
        let Some(disk_id) = self.disk_ids.get(n).cloned() else {
            return Event::OpenFailed(n, format!("there is no disk number {n}"));
        };
        match self.open_one(n, &disk_id).await {
            Ok(served) => {
                if let Some(slot) = self.served.get_mut(n) {
                    *slot = Some(served);
                }
                Event::Opened(n)
            }
            Err(why) => Event::OpenFailed(n, format!("disk {disk_id}: {why}")),
        }
    }

    async fn open_one(&mut self, n: usize, disk_id: &str) -> std::result::Result<Served, String> {
        let backup_id = self
            .backup_id()
            .ok_or_else(|| "no backup was created".to_string())?;
        if self.disks.is_empty() {
            match self.client.backup_disks(&self.vm.id, &backup_id).await {
                Ok(d) => self.disks = d,
                Err(e) => tracing::warn!(error = %e, "cannot list the backup's disks"),
            }
        }
        let disk = match self.disks.iter().find(|d| d.disk.id == disk_id) {
            Some(d) => d.clone(),
            None => BackupDisk {
                disk: self
                    .client
                    .disk(disk_id)
                    .await
                    .map_err(|e| format!("cannot read the disk: {e}"))?,
                mode: None,
            },
        };
        let t = self
            .client
            .add_backup_transfer(disk_id, &backup_id, self.host_id.as_deref())
            .await
            .map_err(|e| format!("cannot start its download: {e}"))?;
        let mut session = match TransferSession::open(
            Arc::clone(&self.client),
            &Target::Transfer(t.id.clone()),
            false,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                cancel_transfer(&self.client, &t.id).await;
                return Err(format!("transfer {}: {e}", t.id));
            }
        };
        // A disk the backup takes incrementally must come with its dirty
        // extents: without them a backup tool would copy everything (and
        // the coverage rule would wait for all of it).
        let bitmap = match (&self.from_checkpoint, disk.mode) {
            (None, _) | (_, Some(DiskBackupMode::Full)) => None,
            (Some(c), _) => Some(c.clone()),
        };
        let data = DataOptions {
            size: disk.disk.provisioned_size,
            direction: Direction::Download,
            tls: self.tls.clone(),
            dirty_bitmap: bitmap.clone(),
        };
        let (backend, url) = match connect_data(&session, &data).await {
            Ok(found) => found,
            Err(e) => {
                let why = cancel_session(&mut session, e.to_string()).await;
                return Err(why);
            }
        };
        let coverage = match data_coverage(&backend, bitmap.is_some()).await {
            Ok(c) => c,
            Err(e) => {
                let why =
                    cancel_session(&mut session, format!("cannot map the disk's data: {e}")).await;
                return Err(why);
            }
        };
        tracing::info!(disk = %disk_id, transfer = %t.id, url = %redact_url(&url),
            size = backend.size(), bitmap = ?bitmap,
            "serving; its download ends once {} has been read", coverage.summary());
        let machine = phases::Machine::new(
            phases::Config {
                direction: Direction::Download,
                captive: self.run.is_some(),
                on_interrupt: OnInterrupt::Pause,
                keepalive_after: keepalive_after(&session),
            },
            Some(coverage),
        );
        self.tick = self.tick.min(keepalive_after(&session));
        let gate = Gate::new(GateState::Open);
        let gated = Arc::new(GatedBackend::new(Arc::new(backend), gate.clone()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let all = self.disk_tx.clone();
        tokio::spawn(async move {
            while let Some(action) = rx.recv().await {
                if all.send((n, action)).is_err() {
                    break;
                }
            }
        });
        let judge = Arc::new(Judge::new(machine, gate, Shutdown::new(), tx));
        Ok(Served {
            disk,
            session,
            judge,
            gated,
            bitmap,
            end: None,
        })
    }

    /// One NBD server, one export per disk (named by its id); print the
    /// lines; start `--run`.
    fn serve_exports(&mut self) -> Option<Event> {
        let Some(listener) = self.listener.take() else {
            return Some(Event::ServeFailed("serve already listened".into()));
        };
        let tls = self.handshake.tls_mode();
        let mut exports = Vec::new();
        let mut judges = Vec::new();
        let mut env = RunEnv::of(&listener, "", tls);
        let mut lines = vec![env.uri.clone()];
        let backup = self.backup_id();
        if let Some(id) = &backup {
            lines.push(format!("backup={id}"));
        }
        let (mut disks, mut uris) = (Vec::new(), Vec::new());
        for s in self.served.iter().flatten() {
            let name = s.disk.disk.id.clone();
            let uri = listener.uri(&name, tls);
            lines.push(format!("disk={name} uri={uri}"));
            disks.push(name.clone());
            uris.push(uri);
            exports.push(Arc::new(Export::new(
                name.clone(),
                Some(s.description()),
                Arc::clone(&s.gated),
            )));
            judges.push((name, Arc::clone(&s.judge)));
        }
        let observer: Arc<dyn Observer> = Arc::new(Router {
            judges,
            conns: Mutex::new(HashMap::new()),
        });
        let server = Arc::new(
            Server::new(Exports::new(exports), self.stop.clone())
                .with_observer(observer)
                .with_handshake(self.handshake.clone())
                .with_max_connections(self.max_connections),
        );
        self.serving = Some(tokio::spawn(server.serve(listener)));
        if let Some(announce) = self.announce.take() {
            if let Err(e) = announce(lines.as_slice()) {
                return Some(Event::ServeFailed(format!("cannot print the URI: {e}")));
            }
        }
        tracing::info!(uri = %env.uri, disks = lines.len().saturating_sub(2), "serving the backup's disks");
        if let Some(cmd) = &self.run {
            // For `--run`: the disks' ids and URIs, in the same order,
            // space-separated (ids are UUIDs, URIs are percent-encoded).
            env.extra = vec![
                ("backup".into(), backup.unwrap_or_default()),
                ("disks".into(), disks.join(" ")),
                ("uris".into(), uris.join(" ")),
            ];
            self.child = Captive::start(cmd, &env);
        }
        self.next_tick = tokio::time::Instant::now() + self.tick;
        None
    }

    /// Stop listening, let every connection finish its requests, end the
    /// `--run` command.
    async fn stop_serving(&mut self) {
        self.stop.trigger();
        if let Some(task) = self.serving.take() {
            let _ = task.await;
        }
        self.child.end().await;
    }

    /// What disk `n`'s rules decided.
    async fn disk_action(&mut self, n: usize, action: phases::Action) -> Option<Event> {
        let Some(Some(s)) = self.served.get_mut(n) else {
            return None;
        };
        if s.end.is_some() {
            return None;
        }
        match action {
            phases::Action::Log(line) => {
                tracing::info!(disk = %s.disk.disk.id, "{line}");
            }
            phases::Action::KeepAlive => {
                if let Err(e) = s.gated.inner().keepalive().await {
                    tracing::warn!(disk = %s.disk.disk.id, error = %e, "keepalive failed");
                }
                if let Err(e) = s.session.act(crate::ovirt::Action::Extend).await {
                    tracing::debug!(disk = %s.disk.disk.id, error = %e, "extend failed");
                }
                s.judge.touch();
            }
            phases::Action::Finish { how, status, why } => {
                return Some(Event::DiskEnded(n, end_disk(s, how, status, why).await));
            }
            // A download's rules never flush, pause, resume or stop
            // serving.
            other => tracing::debug!(?other, "not an action of a download"),
        }
        None
    }

    /// Cancel disk `n`'s transfer (one that already ended says how).
    async fn cancel_disk(&mut self, n: usize) -> Event {
        let Some(Some(s)) = self.served.get_mut(n) else {
            return Event::DiskEnded(
                n,
                DiskEnd {
                    ok: false,
                    status: 1,
                    why: format!("disk number {n} has no transfer"),
                },
            );
        };
        if let Some(end) = &s.end {
            return Event::DiskEnded(n, end.clone());
        }
        Event::DiskEnded(
            n,
            end_disk(s, Final::Cancel, 1, "the backup is given up".into()).await,
        )
    }

    async fn finalize_backup(&mut self) -> Event {
        let Some(id) = self.backup_id() else {
            return Event::FinalizeFailed("no backup was created".into());
        };
        match self.client.finalize_backup(&self.vm.id, &id).await {
            Ok(()) => {
                tracing::info!(backup = %id, "backup finalize");
                self.poll_pause = POLL_MIN;
                self.phase_since = None;
                Event::FinalizeSent
            }
            Err(e) => Event::FinalizeFailed(e.to_string()),
        }
    }

    /// While serving: each open transfer's phase to its rules (and a tick
    /// for the keepalive), the backup's phase to the steps.
    async fn watch(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let mut down: Option<String> = None;
        for (n, slot) in self.served.iter_mut().enumerate() {
            let Some(s) = slot else { continue };
            if s.end.is_some() {
                continue;
            }
            match s.session.refresh().await {
                Ok(phase) => s.judge.feed(phases::Event::Engine(phase)),
                Err(e) if e.is_not_found() => {
                    s.judge.gate().set(GateState::Ended);
                    s.gated.inner().set_ended();
                    let end = DiskEnd {
                        ok: false,
                        status: 1,
                        why: format!(
                            "disk {}: transfer {} is gone: {e}",
                            s.disk.disk.id,
                            s.session.transfer().id
                        ),
                    };
                    s.end = Some(end.clone());
                    events.push(Event::DiskEnded(n, end));
                    continue;
                }
                Err(e) => down = Some(e.to_string()),
            }
            s.judge.feed(phases::Event::Tick {
                quiet: s.judge.quiet(),
            });
        }
        if let Some(id) = self.backup_id() {
            match self.client.backup(&self.vm.id, &id).await {
                Ok(b) => {
                    if let Some(phase) = b.phase {
                        events.push(Event::Backup {
                            phase,
                            checkpoint: b.to_checkpoint_id.clone(),
                        });
                    }
                    self.backup = Some(b);
                }
                Err(e) if e.is_not_found() => {
                    events.push(Event::Lost(format!("backup {id} is gone: {e}")));
                }
                Err(e) => down = Some(e.to_string()),
            }
        }
        match down {
            None => self.engine_down_since = None,
            Some(e) => {
                let since = *self.engine_down_since.get_or_insert_with(Instant::now);
                if since.elapsed() > ENGINE_OUTAGE {
                    events.push(Event::Lost(e));
                } else {
                    tracing::warn!(error = %e, "cannot read the engine; retrying");
                }
            }
        }
        events
    }

    /// The end: nothing served any more; the outcome, with what the user
    /// should do about anything left.
    async fn finish(&mut self, f: Finish) -> BackupOutcome {
        self.stop_serving().await;
        let backup = self.backup_id();
        let checkpoint_made = self
            .backup
            .as_ref()
            .and_then(|b| b.to_checkpoint_id.clone());
        let mut message = f.why;
        if let Some(id) = &backup {
            let vm = &self.vm.id;
            match f.left {
                Left::Nothing if f.status == 0 => {
                    message = format!("backup {id} of VM {} succeeded: {message}", self.vm.name);
                }
                Left::Nothing => {
                    message.push_str(&format!("; backup {id} was ended"));
                    if let Some(c) = checkpoint_made {
                        message.push_str(&format!(
                            ", but its checkpoint {c} marks a backup that is not complete: do \
                             not use it with --from-checkpoint (back up again from the last \
                             checkpoint serve printed, or without --from-checkpoint)"
                        ));
                    }
                }
                Left::Backup => message.push_str(&format!(
                    "; backup {id} of VM {} may still be running and holds its disks: \
                     finalize it through the engine API (POST /vms/{vm}/backups/{id}/finalize) \
                     once the engine answers, after ending any of its image transfers still open",
                    self.vm.name
                )),
                Left::Finalizing => message.push_str(&format!(
                    "; backup {id} was finalized but not seen to succeed: check it \
                     (GET /vms/{vm}/backups/{id})"
                )),
            }
        }
        BackupOutcome {
            vm: self.vm.clone(),
            backup,
            status: f.status,
            checkpoint: f.checkpoint,
            message,
        }
    }
}

/// End disk `s`'s transfer as its rules (or the steps) decided.
async fn end_disk(s: &mut Served, how: Final, status: i32, why: String) -> DiskEnd {
    // Nothing reaches the data server any more.
    s.judge.gate().set(GateState::Ended);
    let disk = s.disk.disk.id.clone();
    let id = s.session.transfer().id.clone();
    // A command may exit 0 without having read a disk whole: that backup
    // is not complete, whatever the command thinks.
    let status = match (how, s.judge.coverage()) {
        (Final::Finalize, Some((false, summary))) if status == 0 => {
            tracing::warn!(disk = %disk, "the disk was not read whole: {summary}");
            1
        }
        _ => status,
    };
    let end = match how {
        Final::Finalize => match s.session.finalize().await {
            Ok(Phase::FinishedSuccess) => DiskEnd {
                ok: true,
                status,
                why: format!("disk {disk}: {why}; transfer {id} finished_success"),
            },
            Ok(phase) => DiskEnd {
                ok: false,
                status: status.max(1),
                why: format!("disk {disk}: {why}; but transfer {id} ended {phase}"),
            },
            Err(e) => DiskEnd {
                ok: false,
                status: status.max(1),
                why: format!("disk {disk}: finalizing transfer {id} failed: {e}"),
            },
        },
        Final::Leave => DiskEnd {
            ok: false,
            status: status.max(1),
            why: format!(
                "disk {disk}: {why}; transfer {id} is {}",
                s.session.transfer().phase
            ),
        },
        // Downloads are never paused: a pause asked for ends it as a cancel.
        Final::Cancel | Final::Pause => match s.session.cancel().await {
            Ok(phase) => DiskEnd {
                ok: false,
                status: status.max(1),
                why: format!("disk {disk}: {why}; transfer {id} cancelled: {phase}"),
            },
            Err(e) => DiskEnd {
                ok: false,
                status: status.max(1),
                why: format!("disk {disk}: {why}; cancelling transfer {id} failed: {e}"),
            },
        },
    };
    s.gated.inner().set_ended();
    if end.ok {
        tracing::info!(disk = %disk, transfer = %id, "{}", end.why);
    } else {
        tracing::warn!(disk = %disk, transfer = %id, "{}", end.why);
    }
    s.end = Some(end.clone());
    end
}

/// A transfer opened for a disk that cannot be served: cancel it; `why`
/// with what became of it.
async fn cancel_session(session: &mut TransferSession, why: String) -> String {
    let id = session.transfer().id.clone();
    match session.cancel().await {
        Ok(phase) => format!("{why}; transfer {id} cancelled: {phase}"),
        Err(e) => format!("{why}; cancelling transfer {id} failed too: {e}"),
    }
}

/// Cancel transfer `id` that never became `transferring` (best effort,
/// bounded): the backup cannot be finalized while it is open.
async fn cancel_transfer(client: &EngineClient, id: &str) {
    if let Err(e) = client.action(id, crate::ovirt::Action::Cancel).await {
        tracing::debug!(transfer = %id, error = %e, "cancel refused");
    }
    let end = Instant::now() + PHASE_DEADLINE;
    let mut pause = POLL_MIN;
    while Instant::now() < end {
        match client.transfer(id).await {
            Ok(t) if t.phase.is_finished() => return,
            Ok(_) => {}
            Err(e) if e.is_not_found() => return,
            Err(e) => tracing::debug!(transfer = %id, error = %e, "cannot read the transfer"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
    tracing::warn!(transfer = %id, "the transfer did not end after a cancel");
}

#[cfg(test)]
mod tests {
    use super::Router;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[test]
    fn a_router_without_the_export_ignores_its_connections() {
        use crate::nbd::Observer;
        let router = Router {
            judges: Vec::new(),
            conns: Mutex::new(HashMap::new()),
        };
        router.entered(1, "nope");
        router.disconnected(1, None);
        assert!(router.judge_of(1).is_none());
    }
}
