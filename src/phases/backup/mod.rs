//! The steps of `serve --backup`: one VM backup (the oVirt 4.4+ model) as
//! a pure state machine, kept apart from every kind of I/O as the phase
//! rules of one transfer are ([`crate::phases::Machine`]). It takes
//! [`Event`]s (the engine's answers, the backup's phase as polled, each
//! disk's transfer ending, signals) and answers with [`Action`]s that the
//! driver (`session::backup`) carries out, in order, feeding their results
//! back as events.
//!
//! The way through:
//! 1. start the backup of the VM's disks ([`Action::StartBackup`]);
//! 2. poll it until it is `ready` ([`Action::PollBackup`]);
//! 3. open one download transfer per disk, one after the other, each with
//!    the backup's id ([`Action::OpenTransfer`]);
//! 4. serve every disk as its own export of one NBD server
//!    ([`Action::Serve`]); from here each disk's transfer follows its own
//!    phase rules (a download ends by the coverage rule, a signal or the
//!    `--run` command's exit finalizes it), and its end comes back as
//!    [`Event::DiskEnded`];
//! 5. once every disk's transfer ended, stop serving
//!    ([`Action::StopServing`]), finalize the backup
//!    ([`Action::FinalizeBackup`]) and poll it until it `succeeded`;
//! 6. finish: exit 0 and print the new checkpoint only when every disk
//!    was finalized after being read, nothing failed and no signal came.
//!
//! Whatever fails on the way (the engine refuses, a transfer cannot be
//! opened or fails while served, the backup fails or is lost, a signal
//! before serving), the way back leaves nothing running: stop serving,
//! cancel every transfer still open, finalize the backup (after waiting
//! for `ready`: engines refuse to stop a backup that is still starting),
//! and say in [`Finish::left`] what could not be ended.

use crate::ovirt::BackupPhase;

#[cfg(test)]
mod tests;

/// How one disk's transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEnd {
    /// The transfer reached `finished_success`.
    pub ok: bool,
    /// The exit status its phase rules gave (0: the disk was read whole
    /// and its last client left cleanly, or the `--run` command exited 0).
    pub status: i32,
    /// Why, in words (names the disk).
    pub why: String,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Result of [`Action::StartBackup`]: the engine created the backup.
    Started,
    /// Result of [`Action::StartBackup`]: the engine refused (or could not
    /// be reached); no backup exists.
    Refused(String),
    /// The backup's phase as read: the answer to [`Action::PollBackup`],
    /// or read by the driver while the disks are served.
    Backup {
        /// The phase.
        phase: BackupPhase,
        /// The checkpoint the backup creates, when the engine says.
        checkpoint: Option<String>,
    },
    /// The backup cannot be followed any more: the engine unreachable for
    /// too long, the backup gone, or a phase that outlasted its deadline.
    Lost(String),
    /// Result of [`Action::OpenTransfer`]: disk `n`'s transfer is
    /// `transferring` and its data server connected.
    Opened(usize),
    /// Result of [`Action::OpenTransfer`]: it failed; whatever was created
    /// for it was cancelled.
    OpenFailed(usize, String),
    /// Result of [`Action::Serve`]: serving could not start.
    ServeFailed(String),
    /// Disk `n`'s transfer ended: its rules finalized it, the engine ended
    /// it, or [`Action::CancelTransfer`] did.
    DiskEnded(usize, DiskEnd),
    /// Result of [`Action::StopServing`].
    Stopped,
    /// Result of [`Action::FinalizeBackup`]: the engine took it.
    FinalizeSent,
    /// Result of [`Action::FinalizeBackup`]: the engine refused, or could
    /// not be reached.
    FinalizeFailed(String),
    /// SIGINT, SIGTERM, SIGHUP, or the parent went away. While the disks
    /// are served, the driver also gives it to each disk's rules (which
    /// finalize a download); their ends come back as [`Event::DiskEnded`].
    Interrupted(&'static str),
}

/// What may be left running when serve ends, for the user to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Nothing: no backup was created, or it ended.
    Nothing,
    /// The backup was not finalized (the engine refused or could not be
    /// reached): it still holds the VM's disks.
    Backup,
    /// The backup was finalized but not seen to succeed.
    Finalizing,
}

/// How serve ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// Exit status.
    pub status: i32,
    /// The checkpoint to print (`checkpoint=ID`; empty when the backup
    /// created none): only on success, when every disk was read whole.
    pub checkpoint: Option<String>,
    /// Why, in words.
    pub why: String,
    /// What may be left running.
    pub left: Left,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the backup; answer [`Event::Started`] or [`Event::Refused`].
    StartBackup,
    /// Wait a little (backing off), read the backup; answer
    /// [`Event::Backup`] or [`Event::Lost`].
    PollBackup,
    /// Create disk `n`'s download transfer for the backup, wait until it
    /// is `transferring`, connect its data server and map what a copy
    /// reads; answer [`Event::Opened`] or [`Event::OpenFailed`].
    OpenTransfer(usize),
    /// Serve every disk as its own export of one NBD server, print the
    /// URIs, start the `--run` command; each disk then follows its own
    /// phase rules. Answer nothing, or [`Event::ServeFailed`].
    Serve,
    /// Stop listening, let in-flight requests finish, end the `--run`
    /// command; answer [`Event::Stopped`].
    StopServing,
    /// Cancel disk `n`'s transfer (answer [`Event::DiskEnded`]; a transfer
    /// that already ended is answered with how it ended).
    CancelTransfer(usize),
    /// Finalize the backup; answer [`Event::FinalizeSent`] or
    /// [`Event::FinalizeFailed`].
    FinalizeBackup,
    /// Exit.
    Finish(Finish),
    /// One line for the log.
    Log(String),
}

/// Where the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// [`Action::StartBackup`] given.
    Starting,
    /// Polling the backup until it is `ready`.
    WaitingReady,
    /// [`Action::OpenTransfer`] given for this disk.
    Opening(usize),
    /// The disks are served; each ends by its own rules.
    Serving,
    /// [`Action::StopServing`] given.
    Stopping,
    /// [`Action::CancelTransfer`] given for every disk still open.
    Cancelling,
    /// [`Action::FinalizeBackup`] given.
    Finalizing,
    /// Polling the backup until it `succeeded`.
    WaitingSucceeded,
    /// [`Action::Finish`] given; everything else is ignored.
    Done,
}

/// One disk, as far as the machine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// No transfer open.
    Closed,
    /// Its transfer is open.
    Open,
    /// Its transfer ended (`true`: `finished_success`).
    Ended(bool),
}

/// The steps of one `serve --backup`.
#[derive(Debug, Clone)]
pub struct Machine {
    state: State,
    disks: Vec<Disk>,
    /// Why the backup is given up (the first reason).
    abort: Option<String>,
    /// The signal that came while the disks were served.
    interrupted: Option<&'static str>,
    /// The first disk end that was not a clean success, in words.
    trouble: Option<String>,
    /// The highest exit status a disk's rules gave.
    status: i32,
    /// The checkpoint the backup creates, as last read.
    checkpoint: Option<String>,
    /// A phase the backup reached without us after it was ready
    /// (someone else finalized it, or the engine failed it).
    engine_moved: Option<BackupPhase>,
}

impl Machine {
    /// A machine for a backup of `disks` disks; [`Machine::start`] gives
    /// the first action.
    pub fn new(disks: usize) -> Self {
        Machine {
            state: State::Starting,
            disks: vec![Disk::Closed; disks],
            abort: None,
            interrupted: None,
            trouble: None,
            status: 0,
            checkpoint: None,
            engine_moved: None,
        }
    }

    /// The first action: start the backup.
    pub fn start(&self) -> Vec<Action> {
        vec![Action::StartBackup]
    }

    /// Where it is.
    pub fn state(&self) -> State {
        self.state
    }

    /// Each disk.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Why the backup is being given up, if it is.
    pub fn abort(&self) -> Option<&str> {
        self.abort.as_deref()
    }

    /// Take `event`; the actions to carry out, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::Done {
            return out;
        }
        match event {
            Event::Started => {
                if self.state == State::Starting {
                    self.state = State::WaitingReady;
                    out.push(Action::PollBackup);
                }
            }
            Event::Refused(why) => {
                if self.state == State::Starting {
                    self.done(
                        1,
                        None,
                        format!("cannot start the backup: {why}"),
                        Left::Nothing,
                        &mut out,
                    );
                }
            }
            Event::Backup { phase, checkpoint } => {
                if checkpoint.is_some() {
                    self.checkpoint = checkpoint;
                }
                self.backup(phase, &mut out);
            }
            Event::Lost(why) => self.lost(why, &mut out),
            Event::Opened(n) => {
                if self.state == State::Opening(n) {
                    if let Some(d) = self.disks.get_mut(n) {
                        *d = Disk::Open;
                    }
                    if self.abort.is_some() {
                        self.wind_down(&mut out);
                    } else {
                        self.open(n + 1, &mut out);
                    }
                }
            }
            Event::OpenFailed(n, why) => {
                if self.state == State::Opening(n) {
                    self.give_up(why, &mut out);
                    self.wind_down(&mut out);
                }
            }
            Event::ServeFailed(why) => {
                if self.state == State::Serving {
                    self.give_up(why, &mut out);
                }
            }
            Event::DiskEnded(n, end) => self.disk_ended(n, end, &mut out),
            Event::Stopped => {
                if self.state == State::Stopping {
                    self.wind_down(&mut out);
                }
            }
            Event::FinalizeSent => {
                if self.state == State::Finalizing {
                    self.state = State::WaitingSucceeded;
                    out.push(Action::PollBackup);
                }
            }
            Event::FinalizeFailed(why) => {
                if self.state == State::Finalizing {
                    let why = match &self.abort {
                        Some(first) => format!("{first}; then finalizing the backup failed: {why}"),
                        None => format!("finalizing the backup failed: {why}"),
                    };
                    self.done(self.status.max(1), None, why, Left::Backup, &mut out);
                }
            }
            Event::Interrupted(sig) => match self.state {
                State::Starting | State::WaitingReady | State::Opening(_) => {
                    self.give_up(format!("interrupted by {sig}"), &mut out);
                }
                // The disks' rules finalize each download; their ends
                // come back one by one.
                State::Serving if self.interrupted.is_none() => {
                    self.interrupted = Some(sig);
                }
                // Already on the way out: a signal changes nothing.
                _ => {}
            },
        }
        out
    }

    /// The backup's phase was read.
    fn backup(&mut self, phase: BackupPhase, out: &mut Vec<Action>) {
        match self.state {
            State::WaitingReady => match phase {
                BackupPhase::Initializing | BackupPhase::Starting => out.push(Action::PollBackup),
                BackupPhase::Ready => {
                    if self.abort.is_some() {
                        self.wind_down(out);
                    } else if self.disks.is_empty() {
                        self.give_up("the backup has no disks".into(), out);
                        self.wind_down(out);
                    } else {
                        out.push(Action::Log(
                            "the backup is ready: opening the disks' transfers".into(),
                        ));
                        self.open(0, out);
                    }
                }
                BackupPhase::Failed => {
                    let why = self.abort.clone().map_or_else(
                        || "the backup failed before it was ready".to_string(),
                        |a| format!("{a}; then the backup failed before it was ready"),
                    );
                    self.done(1, None, why, Left::Nothing, out);
                }
                BackupPhase::Finalizing | BackupPhase::Succeeded => {
                    // Someone else stopped it: nothing of ours to end.
                    self.done(
                        1,
                        None,
                        format!("the backup became {phase} before it was ready"),
                        Left::Nothing,
                        out,
                    );
                }
            },
            State::Serving | State::Opening(_) | State::Stopping | State::Cancelling => {
                if phase != BackupPhase::Ready {
                    if self.engine_moved.is_none() {
                        self.engine_moved = Some(phase);
                    }
                    self.give_up(
                        format!("the backup became {phase} while its disks were served"),
                        out,
                    );
                }
            }
            State::WaitingSucceeded => match phase {
                BackupPhase::Succeeded => self.succeeded(out),
                BackupPhase::Failed => {
                    let why = self.abort.clone().map_or_else(
                        || "the backup failed while it was finalized".to_string(),
                        |a| format!("{a}; then the backup failed while it was finalized"),
                    );
                    self.done(self.status.max(1), None, why, Left::Nothing, out);
                }
                _ => out.push(Action::PollBackup),
            },
            State::Starting | State::Finalizing | State::Done => {}
        }
    }

    /// The backup cannot be followed.
    fn lost(&mut self, why: String, out: &mut Vec<Action>) {
        match self.state {
            State::WaitingReady => {
                // No waiting for `ready` any more: try to finalize it now.
                self.give_up(format!("lost track of the backup: {why}"), out);
                self.wind_down(out);
            }
            State::WaitingSucceeded => {
                let why = match &self.abort {
                    Some(first) => format!("{first}; then lost track of the backup: {why}"),
                    None => format!("lost track of the backup while it was finalized: {why}"),
                };
                self.done(self.status.max(1), None, why, Left::Finalizing, out);
            }
            State::Serving | State::Stopping | State::Cancelling | State::Opening(_) => {
                self.give_up(format!("lost track of the backup: {why}"), out);
            }
            State::Starting | State::Finalizing | State::Done => {}
        }
    }

    /// Give the backup up for `why` (the first reason is kept); while the
    /// disks are served, start the way back at once. Elsewhere the way
    /// back starts when the step in progress answers.
    fn give_up(&mut self, why: String, out: &mut Vec<Action>) {
        if self.abort.is_none() {
            out.push(Action::Log(format!("giving the backup up: {why}")));
            self.abort = Some(why);
        }
        if self.state == State::Serving {
            self.wind_down(out);
        }
    }

    /// Open disk `n`'s transfer, or serve once every disk has one.
    fn open(&mut self, n: usize, out: &mut Vec<Action>) {
        if n < self.disks.len() {
            self.state = State::Opening(n);
            out.push(Action::OpenTransfer(n));
        } else {
            self.state = State::Serving;
            out.push(Action::Serve);
        }
    }

    fn disk_ended(&mut self, n: usize, end: DiskEnd, out: &mut Vec<Action>) {
        if self.disks.get(n) != Some(&Disk::Open) {
            return;
        }
        self.disks[n] = Disk::Ended(end.ok);
        self.status = self.status.max(end.status);
        if (!end.ok || end.status != 0) && self.trouble.is_none() {
            self.trouble = Some(end.why.clone());
        }
        if !end.ok {
            self.give_up(end.why, out);
            if self.state == State::Cancelling && !self.any_open() {
                self.wind_down(out);
            }
            return;
        }
        if matches!(self.state, State::Serving | State::Cancelling) && !self.any_open() {
            self.wind_down(out);
        }
    }

    fn any_open(&self) -> bool {
        self.disks.contains(&Disk::Open)
    }

    /// The next step of the way out: stop serving, cancel what is open,
    /// finalize the backup (or, when the engine already moved it, follow
    /// it or finish).
    fn wind_down(&mut self, out: &mut Vec<Action>) {
        if self.state == State::Serving {
            self.state = State::Stopping;
            out.push(Action::StopServing);
            return;
        }
        let open: Vec<usize> = self
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == Disk::Open)
            .map(|(n, _)| n)
            .collect();
        if !open.is_empty() {
            self.state = State::Cancelling;
            out.extend(open.into_iter().map(Action::CancelTransfer));
            return;
        }
        match self.engine_moved {
            None => {
                self.state = State::Finalizing;
                out.push(Action::FinalizeBackup);
            }
            Some(BackupPhase::Finalizing) => {
                self.state = State::WaitingSucceeded;
                out.push(Action::PollBackup);
            }
            Some(phase) => {
                let why = self
                    .abort
                    .clone()
                    .unwrap_or_else(|| format!("the backup became {phase}"));
                self.done(self.status.max(1), None, why, Left::Nothing, out);
            }
        }
    }

    /// The backup succeeded: a success only if nothing went wrong.
    fn succeeded(&mut self, out: &mut Vec<Action>) {
        let all_read = self.disks.iter().all(|d| *d == Disk::Ended(true));
        let why = self
            .abort
            .clone()
            .or_else(|| self.interrupted.map(|s| format!("interrupted by {s}")))
            .or_else(|| self.trouble.clone());
        match why {
            None if all_read && self.status == 0 => {
                let checkpoint = self.checkpoint.clone().unwrap_or_default();
                self.done(
                    0,
                    Some(checkpoint),
                    "every disk was read and the backup succeeded".into(),
                    Left::Nothing,
                    out,
                );
            }
            why => {
                let why = why.unwrap_or_else(|| "not every disk was read".into());
                self.done(self.status.max(1), None, why, Left::Nothing, out);
            }
        }
    }

    fn done(
        &mut self,
        status: i32,
        checkpoint: Option<String>,
        why: String,
        left: Left,
        out: &mut Vec<Action>,
    ) {
        self.state = State::Done;
        out.push(Action::Finish(Finish {
            status,
            checkpoint,
            why,
            left,
        }));
    }
}
