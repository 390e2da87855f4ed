//! The phase rules of `serve`: when a transfer is finalized, paused,
//! resumed, cancelled or left alone. The product's heart, kept apart from
//! every kind of I/O: a state machine that takes [`Event`]s (connections
//! opening and ending, requests finishing, signals, the engine's phase,
//! the `--run` command's exit, the results of its own actions) and answers
//! with [`Action`]s that the driver (`session::driver`) carries out, in
//! order, feeding their results back as events.
//!
//! The rules (DESIGN.md, "Phase rules"), in the words used here:
//! - a **period** runs from serving (or a resume) to the next pause or end,
//!   and every decision reads the period's own record ([`Period`]);
//! - an upload is finalized when the last connection of the period ends
//!   with NBD_CMD_DISC and the period wrote, had no failed command of any
//!   kind and no vanished or broken connection; serve then flushes every
//!   data connection itself, and a failure there pauses instead;
//! - a period with no write and no failure (a probe) changes nothing; one
//!   that began with a resume pauses again; every other end of a period
//!   pauses, naming the reason;
//! - a download is finalized when the last connection ends with DISC and
//!   the disk is covered ([`Coverage`]); until then it keeps serving;
//! - with `--run`, the command's exit is the judge, not the clients;
//! - a signal pauses (or cancels) an upload and finalizes a download.
//!
//! [`backup`] holds the steps of `serve --backup` around these rules (one
//! machine here per disk of the backup).

pub mod backup;
pub mod coverage;
pub mod ranges;

#[cfg(test)]
mod tests;

pub use coverage::Coverage;
pub use ranges::RangeSet;

use crate::ovirt::{Direction, Phase};
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

/// What SIGINT / SIGTERM / SIGHUP (and a failed `--run` command) do to an
/// upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInterrupt {
    /// Pause it (resume later with `--transfer ID`).
    #[default]
    Pause,
    /// Cancel it (the partial disk is removed).
    Cancel,
}

/// How a connection's transmission phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent NBD_CMD_DISC.
    Clean,
    /// The socket closed without NBD_CMD_DISC.
    Vanished,
    /// The server dropped it for a protocol error.
    Broken,
    /// serve stopped it (shutting down): says nothing of the client.
    Stopped,
}

impl Ending {
    fn describe(self) -> &'static str {
        match self {
            Ending::Clean => "ended cleanly",
            Ending::Vanished => "vanished without NBD_CMD_DISC",
            Ending::Broken => "was dropped for a protocol error",
            Ending::Stopped => "was stopped by serve",
        }
    }
}

/// What a finished request was, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// READ of `[offset, offset + len)`.
    Read {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// WRITE, WRITE_ZEROES or TRIM: anything that changes the disk.
    Write,
    /// FLUSH.
    Flush,
    /// BLOCK_STATUS whose reply described `[offset, offset + len)`.
    Described {
        /// First byte.
        offset: u64,
        /// Length described.
        len: u64,
    },
    /// Anything else (CACHE).
    Other,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client finished the handshake.
    Opened(u64),
    /// A request of connection `conn` was answered; `ok` is false when it
    /// was answered with an error (refused by validation included).
    Request {
        /// Connection.
        conn: u64,
        /// What it was.
        op: Op,
        /// Answered without error.
        ok: bool,
    },
    /// A connection left transmission.
    Ended {
        /// Connection.
        conn: u64,
        /// How.
        how: Ending,
    },
    /// SIGINT, SIGTERM, SIGHUP, or the parent went away
    /// (`--exit-with-parent`); the name is for the log.
    Signal(&'static str),
    /// The engine showed this phase (polled).
    Engine(Phase),
    /// The `--run` command exited with this status (128 + N when killed by
    /// signal N).
    RunExited(i32),
    /// Periodic tick: how long no request has moved.
    Tick {
        /// Time since the last request.
        quiet: Duration,
    },
    /// Result of [`Action::Flush`].
    Flushed {
        /// Every data connection flushed.
        ok: bool,
    },
    /// Result of [`Action::Pause`]: the transfer is paused.
    Paused,
    /// Result of [`Action::Resume`]: the transfer is `transferring` again
    /// and its data server connected.
    Resumed,
    /// Result of [`Action::StopServing`]: no connection is left and the
    /// listener is closed.
    Stopped,
}

/// The engine action that ends serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Final {
    /// Finalize the transfer (wait for its end phase).
    Finalize,
    /// Flush what was written, pause the transfer, say how to resume it.
    Pause,
    /// Cancel the transfer.
    Cancel,
    /// Leave the transfer as it is (already paused, or ended by the engine).
    Leave,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Flush every data connection; answer [`Event::Flushed`].
    Flush,
    /// Pause the transfer (requests are held meanwhile): flush what can be
    /// flushed, pause, answer [`Event::Paused`].
    Pause {
        /// Why, for the one log line.
        reason: String,
    },
    /// Resume the transfer and follow its data URL; answer
    /// [`Event::Resumed`].
    Resume,
    /// Stop listening and let every connection finish its in-flight
    /// requests; answer [`Event::Stopped`].
    StopServing,
    /// Stop serving (in-flight requests finish), do `how`, exit.
    Finish {
        /// The engine action.
        how: Final,
        /// Exit status of serve.
        status: i32,
        /// Why, in words.
        why: String,
    },
    /// Keep the ticket and the transfer alive.
    KeepAlive,
    /// One line for the log.
    Log(String),
}

/// Whether requests may reach the data server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Pass.
    Open,
    /// Wait (paused or resuming).
    Closed,
    /// Fail (serve is ending).
    Ended,
}

/// Fixed settings of one serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Upload or download.
    pub direction: Direction,
    /// `--run`: the command's exit decides, not the clients.
    pub captive: bool,
    /// What an interrupt does to an upload.
    pub on_interrupt: OnInterrupt,
    /// Keep the transfer alive after this long without a request.
    pub keepalive_after: Duration,
}

/// What one period did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Period {
    /// Successful writes (WRITE, WRITE_ZEROES, TRIM).
    pub writes: u64,
    /// Commands answered with an error, and failed flushes of serve's own.
    pub failures: u64,
    /// The first connection that did not end cleanly, and how.
    pub unclean: Option<Ending>,
    /// The period began with a resume.
    pub resumed: bool,
}

impl Period {
    /// No write and no failure: a probe.
    fn probe(&self) -> bool {
        self.writes == 0 && self.failures == 0
    }

    /// Why this period is not clean, in words (None: no failure, and every
    /// connection ended cleanly).
    fn trouble(&self) -> Option<String> {
        if let Some(how) = self.unclean {
            return Some(format!("a connection {}", how.describe()));
        }
        if self.failures > 0 {
            return Some(format!(
                "{} command(s) failed in this period",
                self.failures
            ));
        }
        None
    }
}

/// Where the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// `transferring`; requests pass.
    Serving,
    /// Upload: the last client left cleanly; serve flushes before
    /// finalizing. A client that connects now is served instead.
    FinalFlush,
    /// A pause was asked for; requests wait.
    Pausing,
    /// Paused; the next client resumes.
    Paused,
    /// A resume was asked for; requests wait.
    Resuming,
    /// `--run` exited 0 on an upload: stop serving, flush, then judge.
    Closing(Closing),
    /// A final action was given; everything else is ignored.
    Done,
}

/// Steps of [`State::Closing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Waiting for [`Event::Stopped`].
    Stopping,
    /// Waiting for [`Event::Flushed`].
    Flushing,
}

/// The rules of one serve.
#[derive(Debug, Clone)]
pub struct Machine {
    config: Config,
    state: State,
    active: BTreeSet<u64>,
    period: Period,
    coverage: Option<Coverage>,
    /// A signal or the command's exit that came while the engine was
    /// pausing or resuming: handled once it answers.
    pending: Option<Event>,
    /// Which period each flush asked for and not answered yet belongs to
    /// (the driver answers in order): a failure counts against its own
    /// period, and only the newest flush may lead to a finalize.
    flushes: VecDeque<u64>,
    /// The current period's number.
    period_no: u64,
}

impl Machine {
    /// A machine for a transfer that is `transferring`. `coverage` is what
    /// a download must read (None for uploads).
    pub fn new(config: Config, coverage: Option<Coverage>) -> Self {
        Machine {
            config,
            state: State::Serving,
            active: BTreeSet::new(),
            period: Period::default(),
            coverage,
            pending: None,
            flushes: VecDeque::new(),
            period_no: 0,
        }
    }

    /// Where it is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The current period's record.
    pub fn period(&self) -> &Period {
        &self.period
    }

    /// Connections in transmission.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// The download's coverage.
    pub fn coverage(&self) -> Option<&Coverage> {
        self.coverage.as_ref()
    }

    /// Whether a new client may be admitted (false once a final action was
    /// given: serve is going away).
    pub fn admits(&self) -> bool {
        self.state != State::Done
    }

    /// The gate the requests pass.
    pub fn gate(&self) -> Gate {
        match self.state {
            State::Serving | State::FinalFlush | State::Closing(_) => Gate::Open,
            State::Pausing | State::Paused | State::Resuming => Gate::Closed,
            State::Done => Gate::Ended,
        }
    }

    fn upload(&self) -> bool {
        self.config.direction == Direction::Upload
    }

    /// Take `event`; the actions to carry out, in order.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::Done {
            return out;
        }
        match event {
            Event::Opened(conn) => self.opened(conn, &mut out),
            Event::Request { conn, op, ok } => self.request(conn, op, ok),
            Event::Ended { conn, how } => self.ended(conn, how, &mut out),
            Event::Signal(_) | Event::RunExited(_) => {
                if matches!(self.state, State::Pausing | State::Resuming) {
                    // The engine is busy with our last ask: answer this once
                    // it is done. A signal wins over an earlier exit.
                    if self.pending.is_none() || matches!(event, Event::Signal(_)) {
                        self.pending = Some(event);
                    }
                } else {
                    self.terminal(event, &mut out);
                }
            }
            Event::Engine(phase) => {
                if phase.is_failing() || phase.is_finished() || phase == Phase::PausedSystem {
                    self.finish(
                        Final::Leave,
                        1,
                        format!("the transfer became {phase} while serving"),
                        &mut out,
                    );
                }
            }
            Event::Tick { quiet } => {
                if self.state == State::Serving && quiet >= self.config.keepalive_after {
                    out.push(Action::KeepAlive);
                }
            }
            Event::Flushed { ok } => self.flushed(ok, &mut out),
            Event::Paused => {
                if self.state == State::Pausing {
                    self.state = State::Paused;
                    if let Some(ev) = self.pending.take() {
                        self.terminal(ev, &mut out);
                    } else if !self.active.is_empty() {
                        self.resume(&mut out);
                    }
                }
            }
            Event::Resumed => {
                if self.state == State::Resuming {
                    self.state = State::Serving;
                    if let Some(ev) = self.pending.take() {
                        self.terminal(ev, &mut out);
                    } else if self.active.is_empty() {
                        // Whoever asked for the resume left before it was
                        // done: the period is over with nothing in it.
                        self.period_over(Ending::Clean, &mut out);
                    }
                }
            }
            Event::Stopped => {
                if self.state == State::Closing(Closing::Stopping) {
                    self.state = State::Closing(Closing::Flushing);
                    self.flush(&mut out);
                }
            }
        }
        out
    }

    fn opened(&mut self, conn: u64, out: &mut Vec<Action>) {
        match self.state {
            State::Serving | State::Pausing | State::Resuming => {
                self.active.insert(conn);
            }
            State::FinalFlush => {
                self.active.insert(conn);
                self.state = State::Serving;
                out.push(Action::Log(
                    "a client connected before the upload was finalized: serving it first".into(),
                ));
            }
            State::Paused => {
                self.active.insert(conn);
                out.push(Action::Log("a client is back: resuming".into()));
                self.resume(out);
            }
            State::Closing(_) | State::Done => {}
        }
    }

    fn request(&mut self, conn: u64, op: Op, ok: bool) {
        if !self.active.contains(&conn) {
            return;
        }
        if !ok {
            self.period.failures += 1;
            return;
        }
        match op {
            Op::Write => self.period.writes += 1,
            Op::Read { offset, len } => {
                if let Some(c) = &mut self.coverage {
                    c.read(offset, len);
                }
            }
            Op::Described { offset, len } => {
                if let Some(c) = &mut self.coverage {
                    c.described(offset, len);
                }
            }
            Op::Flush | Op::Other => {}
        }
    }

    fn ended(&mut self, conn: u64, how: Ending, out: &mut Vec<Action>) {
        if !self.active.remove(&conn) {
            return;
        }
        if how != Ending::Clean && how != Ending::Stopped && self.period.unclean.is_none() {
            self.period.unclean = Some(how);
        }
        if self.active.is_empty() && self.state == State::Serving {
            self.period_over(how, out);
        }
    }

    /// The last connection of the period is gone (`how`: the last one's end).
    fn period_over(&mut self, how: Ending, out: &mut Vec<Action>) {
        if self.config.captive {
            // The command judges when it exits.
            return;
        }
        if !self.upload() {
            let Some(c) = &self.coverage else {
                return;
            };
            if how == Ending::Clean && c.complete() {
                self.finish(
                    Final::Finalize,
                    0,
                    "the last client left and every byte of data was read".into(),
                    out,
                );
            } else {
                out.push(Action::Log(format!(
                    "the last client {}; {}: keep serving",
                    how.describe(),
                    c.summary()
                )));
            }
            return;
        }
        if self.period.probe() {
            if self.period.resumed {
                self.pause("the clients since the resume wrote nothing".into(), out);
            } else {
                out.push(Action::Log(
                    "the last client left without writing: nothing changes".into(),
                ));
            }
            return;
        }
        match self.period.trouble() {
            None => {
                self.state = State::FinalFlush;
                out.push(Action::Log(
                    "the last client left cleanly after writing: flushing, then finalizing".into(),
                ));
                self.flush(out);
            }
            Some(why) => self.pause(why, out),
        }
    }

    fn flush(&mut self, out: &mut Vec<Action>) {
        self.flushes.push_back(self.period_no);
        out.push(Action::Flush);
    }

    fn flushed(&mut self, ok: bool, out: &mut Vec<Action>) {
        let of = self.flushes.pop_front();
        if !ok && of == Some(self.period_no) {
            self.period.failures += 1;
        }
        if self.flushes.back() == Some(&self.period_no) {
            // A newer flush of this period is on its way: judge on that one.
            return;
        }
        match self.state {
            State::FinalFlush => match self.period.trouble() {
                None => self.finish(
                    Final::Finalize,
                    0,
                    "the last client left cleanly after writing, and everything is flushed".into(),
                    out,
                ),
                Some(_) if !ok => {
                    self.pause("serve's flush of the data server failed".into(), out);
                }
                Some(why) => self.pause(why, out),
            },
            State::Closing(Closing::Flushing) => match self.period.trouble() {
                None => self.finish(
                    Final::Finalize,
                    0,
                    "the command exited 0 and everything is flushed".into(),
                    out,
                ),
                Some(why) => {
                    let why = if ok {
                        why
                    } else {
                        "serve's flush of the data server failed".into()
                    };
                    self.finish(
                        Final::Pause,
                        1,
                        format!("the command exited 0, but {why}"),
                        out,
                    );
                }
            },
            // A client came during the final flush: the failure (counted
            // above) belongs to its period.
            _ => {}
        }
    }

    /// A signal or the command's exit.
    fn terminal(&mut self, event: Event, out: &mut Vec<Action>) {
        let interrupt = match self.config.on_interrupt {
            OnInterrupt::Pause => Final::Pause,
            OnInterrupt::Cancel => Final::Cancel,
        };
        match event {
            Event::Signal(name) => {
                let how = match (self.upload(), self.state) {
                    (false, _) => Final::Finalize,
                    (true, State::Paused) if interrupt == Final::Pause => Final::Leave,
                    (true, _) => interrupt,
                };
                self.finish(how, 1, format!("interrupted by {name}"), out);
            }
            Event::RunExited(0) if !self.upload() => {
                self.finish(Final::Finalize, 0, "the command exited 0".into(), out);
            }
            Event::RunExited(0) => {
                if self.state == State::Paused {
                    self.finish(
                        Final::Leave,
                        1,
                        "the command exited 0 while the transfer was paused".into(),
                        out,
                    );
                } else {
                    self.state = State::Closing(Closing::Stopping);
                    out.push(Action::StopServing);
                }
            }
            Event::RunExited(status) => {
                let how = if !self.upload() {
                    Final::Finalize
                } else if self.state == State::Paused && interrupt == Final::Pause {
                    Final::Leave
                } else {
                    interrupt
                };
                self.finish(
                    how,
                    status,
                    format!("the command exited with status {status}"),
                    out,
                );
            }
            _ => {}
        }
    }

    fn pause(&mut self, reason: String, out: &mut Vec<Action>) {
        self.state = State::Pausing;
        self.new_period(false);
        out.push(Action::Pause { reason });
    }

    fn resume(&mut self, out: &mut Vec<Action>) {
        self.state = State::Resuming;
        self.new_period(true);
        out.push(Action::Resume);
    }

    fn new_period(&mut self, resumed: bool) {
        self.period_no += 1;
        self.period = Period {
            resumed,
            ..Period::default()
        };
    }

    fn finish(&mut self, how: Final, status: i32, why: String, out: &mut Vec<Action>) {
        self.state = State::Done;
        out.push(Action::Finish { how, status, why });
    }
}
