//! Every sequence of engine answers, disk endings and signals up to a
//! useful length, for a backup of two disks, run through the machine with
//! a simulated engine and driver that check what each action may do (no
//! transfer opened for a backup that is not ready, none cancelled while
//! served, the backup finalized only once no transfer is open, nothing
//! after the finish, never stuck), and checked against the rules written a
//! second time as a plain oracle that re-reads the history.

use super::*;
use std::collections::VecDeque;

const DISKS: usize = 2;

/// One letter of the alphabet: what the engine answers, what a served
/// disk's rules do, a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    StartOk,
    StartRefused,
    /// The backup's phase, read by a poll (or while serving).
    Phase(BackupPhase),
    /// The backup cannot be followed (a poll, or while serving).
    Lost,
    OpenOk,
    OpenFail,
    /// Disk n's rules finalized its transfer after a whole read.
    DiskOk(usize),
    /// Disk n's transfer failed at the engine while served.
    DiskFail(usize),
    Signal,
    FinalizeOk,
    FinalizeFail,
}

/// The engine call the driver waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Start,
    Poll,
    Open(usize),
    Finalize,
}

/// The machine, with an engine and a driver around it.
#[derive(Debug, Clone)]
struct Sim {
    m: Machine,
    queue: VecDeque<Action>,
    pending: Option<Pending>,
    /// The backup at the engine (None: not created).
    backup: Option<BackupPhase>,
    finalize_sent: bool,
    /// Transfers open at the engine.
    open: [bool; DISKS],
    /// How each transfer ended, once it did.
    ended: [Option<DiskEnd>; DISKS],
    /// The NBD server runs.
    served: bool,
    serve_given: bool,
    /// A signal came (a second one is like the first).
    signalled: bool,
    finish: Option<Finish>,
    /// Every action given, in order.
    given: Vec<Action>,
}

impl Sim {
    fn new() -> Self {
        let m = Machine::new(DISKS);
        let first = m.start();
        let mut sim = Sim {
            m,
            queue: VecDeque::from(first),
            pending: None,
            backup: None,
            finalize_sent: false,
            open: [false; DISKS],
            ended: [None, None],
            served: false,
            serve_given: false,
            signalled: false,
            finish: None,
            given: Vec::new(),
        };
        sim.drain();
        sim
    }

    /// Whether `ev` can happen now.
    fn valid(&self, ev: Ev) -> bool {
        if self.finish.is_some() {
            return false;
        }
        let serving = self.m.state() == State::Serving;
        let polled = self.pending == Some(Pending::Poll);
        match ev {
            Ev::StartOk | Ev::StartRefused => self.pending == Some(Pending::Start),
            Ev::Phase(p) => {
                (polled || (serving && matches!(p, BackupPhase::Ready | BackupPhase::Failed)))
                    && self.plausible(p)
            }
            Ev::Lost => polled || serving,
            Ev::OpenOk | Ev::OpenFail => matches!(self.pending, Some(Pending::Open(_))),
            Ev::DiskOk(n) | Ev::DiskFail(n) => self.served && self.open[n],
            Ev::Signal => !self.signalled,
            Ev::FinalizeOk | Ev::FinalizeFail => self.pending == Some(Pending::Finalize),
        }
    }

    /// Whether the engine can show `p` next.
    fn plausible(&self, p: BackupPhase) -> bool {
        use BackupPhase::*;
        match (self.backup, self.finalize_sent) {
            (None, _) => false,
            (Some(now @ (Failed | Succeeded)), _) => p == now,
            (Some(_), true) => matches!(p, Finalizing | Succeeded | Failed),
            (Some(Ready), false) => matches!(p, Ready | Failed),
            (Some(_), false) => matches!(p, Starting | Ready | Failed),
        }
    }

    fn feed(&mut self, event: Event) {
        let actions = self.m.handle(event);
        self.queue.extend(actions);
    }

    /// The driver carries out actions in order until it waits on the
    /// engine.
    fn drain(&mut self) {
        while self.pending.is_none() {
            let Some(action) = self.queue.pop_front() else {
                break;
            };
            self.carry_out(action);
        }
    }

    fn end_disk(&mut self, n: usize, end: DiskEnd) {
        self.open[n] = false;
        self.ended[n] = Some(end.clone());
        self.feed(Event::DiskEnded(n, end));
    }

    fn carry_out(&mut self, action: Action) {
        assert!(
            self.finish.is_none(),
            "{action:?} after the finish {:?}",
            self.finish
        );
        self.given.push(action.clone());
        match action {
            Action::StartBackup => {
                assert!(self.backup.is_none(), "a second backup started");
                self.pending = Some(Pending::Start);
            }
            Action::PollBackup => {
                assert!(
                    self.backup.is_some(),
                    "polling a backup that does not exist"
                );
                self.pending = Some(Pending::Poll);
            }
            Action::OpenTransfer(n) => {
                assert_eq!(
                    self.backup,
                    Some(BackupPhase::Ready),
                    "a transfer opened for a backup that is not ready"
                );
                assert!(
                    self.m.abort().is_none(),
                    "a transfer opened after giving up"
                );
                assert!(
                    !self.open[n] && self.ended[n].is_none(),
                    "disk {n} opened twice"
                );
                assert!(
                    self.open.iter().take(n).all(|o| *o),
                    "disks are opened in order, the earlier ones still open"
                );
                self.pending = Some(Pending::Open(n));
            }
            Action::Serve => {
                assert!(!self.serve_given, "served twice");
                assert!(
                    self.open.iter().all(|o| *o),
                    "served before every disk opened"
                );
                self.served = true;
                self.serve_given = true;
            }
            Action::StopServing => {
                self.served = false;
                self.feed(Event::Stopped);
            }
            Action::CancelTransfer(n) => {
                assert!(
                    !self.served,
                    "a transfer cancelled while its export is served"
                );
                if self.open[n] {
                    self.end_disk(
                        n,
                        DiskEnd {
                            ok: false,
                            status: 1,
                            why: format!("disk {n} cancelled"),
                        },
                    );
                } else {
                    let end = self.ended[n]
                        .clone()
                        .unwrap_or_else(|| panic!("disk {n} cancelled but never opened"));
                    self.feed(Event::DiskEnded(n, end));
                }
            }
            Action::FinalizeBackup => {
                assert!(
                    self.open.iter().all(|o| !o),
                    "the backup finalized with a transfer open"
                );
                assert!(!self.served, "the backup finalized while served");
                assert!(
                    self.backup.is_some_and(|p| !p.is_finished()) && !self.finalize_sent,
                    "finalizing a backup that is not running: {:?}",
                    self.backup
                );
                self.pending = Some(Pending::Finalize);
            }
            Action::Finish(f) => {
                self.check_finish(&f);
                self.finish = Some(f);
            }
            Action::Log(_) => {}
        }
    }

    fn check_finish(&self, f: &Finish) {
        assert!(!self.served, "finished while serving: {f:?}");
        assert!(
            self.open.iter().all(|o| !o),
            "finished with a transfer open: {f:?}"
        );
        assert_eq!(
            f.checkpoint.is_some(),
            f.status == 0,
            "the checkpoint is printed exactly on success: {f:?}"
        );
        let running = self.backup.is_some_and(|p| !p.is_finished());
        match f.left {
            Left::Nothing => assert!(
                !running,
                "the backup is left {:?} and the finish does not say so: {f:?}",
                self.backup
            ),
            Left::Backup => assert!(
                running && !self.finalize_sent,
                "says the backup is left, but it is {:?}: {f:?}",
                self.backup
            ),
            Left::Finalizing => assert!(
                running && self.finalize_sent,
                "says the backup is finalizing, but it is {:?}: {f:?}",
                self.backup
            ),
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::StartOk => {
                self.pending = None;
                self.backup = Some(BackupPhase::Initializing);
                self.feed(Event::Started);
            }
            Ev::StartRefused => {
                self.pending = None;
                self.feed(Event::Refused("HTTP 409".into()));
            }
            Ev::Phase(phase) => {
                if self.pending == Some(Pending::Poll) {
                    self.pending = None;
                }
                self.backup = Some(phase);
                self.feed(Event::Backup {
                    phase,
                    checkpoint: Some("cp".into()),
                });
            }
            Ev::Lost => {
                if self.pending == Some(Pending::Poll) {
                    self.pending = None;
                }
                self.feed(Event::Lost("the engine is gone".into()));
            }
            Ev::OpenOk | Ev::OpenFail => {
                let Some(Pending::Open(n)) = self.pending.take() else {
                    unreachable!("no transfer is being opened");
                };
                if ev == Ev::OpenOk {
                    self.open[n] = true;
                    self.feed(Event::Opened(n));
                } else {
                    self.feed(Event::OpenFailed(n, format!("disk {n}: no host")));
                }
            }
            Ev::DiskOk(n) => self.end_disk(
                n,
                DiskEnd {
                    ok: true,
                    status: 0,
                    why: format!("disk {n} read"),
                },
            ),
            Ev::DiskFail(n) => self.end_disk(
                n,
                DiskEnd {
                    ok: false,
                    status: 1,
                    why: format!("disk {n} became cancelled_system"),
                },
            ),
            Ev::Signal => {
                self.signalled = true;
                let serving = self.m.state() == State::Serving;
                self.feed(Event::Interrupted("SIGTERM"));
                if serving {
                    // The driver stops serving and gives the signal to each
                    // disk's rules, which finalize a download.
                    self.served = false;
                    let open: Vec<usize> = (0..DISKS).filter(|&n| self.open[n]).collect();
                    for n in open {
                        self.end_disk(
                            n,
                            DiskEnd {
                                ok: true,
                                status: 1,
                                why: format!("disk {n}: interrupted by SIGTERM"),
                            },
                        );
                    }
                }
            }
            Ev::FinalizeOk => {
                self.pending = None;
                self.finalize_sent = true;
                self.backup = Some(BackupPhase::Finalizing);
                self.feed(Event::FinalizeSent);
            }
            Ev::FinalizeFail => {
                self.pending = None;
                self.feed(Event::FinalizeFailed("HTTP 409".into()));
            }
        }
        self.drain();
    }
}

/// The rules again, read from the history: once serve must have finished,
/// whether it succeeded (exit 0, the checkpoint printed) and what it says
/// is left running.
fn oracle(history: &[Ev]) -> Option<(bool, Left)> {
    let mut trouble = false;
    let mut read = 0;
    let mut finalize_sent = false;
    for &ev in history {
        match ev {
            Ev::StartRefused | Ev::Phase(BackupPhase::Failed) => {
                return Some((false, Left::Nothing));
            }
            Ev::Phase(BackupPhase::Succeeded) => return Some((!trouble, Left::Nothing)),
            Ev::FinalizeFail => return Some((false, Left::Backup)),
            Ev::FinalizeOk => finalize_sent = true,
            Ev::Lost if finalize_sent => return Some((false, Left::Finalizing)),
            Ev::Lost | Ev::OpenFail | Ev::DiskFail(_) => trouble = true,
            Ev::DiskOk(_) => read += 1,
            // Once every disk was read the backup is being finalized: a
            // signal changes nothing any more.
            Ev::Signal if read < DISKS => trouble = true,
            _ => {}
        }
    }
    None
}

fn alphabet() -> Vec<Ev> {
    let mut a = vec![
        Ev::StartOk,
        Ev::StartRefused,
        Ev::Phase(BackupPhase::Starting),
        Ev::Phase(BackupPhase::Ready),
        Ev::Phase(BackupPhase::Failed),
        Ev::Phase(BackupPhase::Finalizing),
        Ev::Phase(BackupPhase::Succeeded),
        Ev::Lost,
        Ev::OpenOk,
        Ev::OpenFail,
    ];
    for n in 0..DISKS {
        a.push(Ev::DiskOk(n));
        a.push(Ev::DiskFail(n));
    }
    a.extend([Ev::Signal, Ev::FinalizeOk, Ev::FinalizeFail]);
    a
}

/// Depth-first over every valid sequence up to `depth`; the number of
/// nodes and of sequences that reached a success.
fn explore(sim: &Sim, history: &mut Vec<Ev>, alphabet: &[Ev], depth: usize) -> (u64, u64) {
    let want = oracle(history);
    let got = sim.finish.as_ref().map(|f| (f.status == 0, f.left));
    assert_eq!(got, want, "after {history:?}: {:?}", sim.finish);
    if sim.finish.is_none() {
        assert!(
            sim.pending.is_some() || (sim.served && sim.open.iter().any(|o| *o)),
            "stuck in {:?} after {history:?}",
            sim.m.state()
        );
    }
    if sim.finish.is_some() || history.len() == depth {
        let success = u64::from(sim.finish.as_ref().is_some_and(|f| f.status == 0));
        return (1, success);
    }
    let (mut nodes, mut successes) = (1, 0);
    for &ev in alphabet {
        if !sim.valid(ev) {
            continue;
        }
        let mut next = sim.clone();
        next.step(ev);
        history.push(ev);
        let (n, s) = explore(&next, history, alphabet, depth);
        history.pop();
        nodes += n;
        successes += s;
    }
    (nodes, successes)
}

/// One event less in unoptimized builds (`cargo test`); the optimized run
/// goes the full depth.
fn depth(full: usize) -> usize {
    if cfg!(debug_assertions) {
        full - 1
    } else {
        full
    }
}

#[test]
fn every_sequence_follows_the_rules_and_leaves_nothing_running() {
    // The shortest success takes 8 events (start, ready, two opens, two
    // disks read, finalize, succeeded). A model of this search gave 36,966
    // sequences (1,176 successes) at depth 14 and 23,887 (644) at 13; the
    // floors are about half of that, so that a search that stopped early
    // fails.
    let full = 14;
    let (nodes, successes) = explore(&Sim::new(), &mut Vec::new(), &alphabet(), depth(full));
    eprintln!("backup: {nodes} sequences, {successes} successes");
    let floor = if depth(full) == full { 18_000 } else { 12_000 };
    assert!(nodes > floor, "{nodes} sequences");
    assert!(successes > 100, "{successes} successes");
}

fn run(events: &[Ev]) -> Sim {
    let mut sim = Sim::new();
    for &ev in events {
        assert!(
            sim.valid(ev),
            "{ev:?} cannot happen now ({:?})",
            sim.m.state()
        );
        sim.step(ev);
    }
    sim
}

fn steps(sim: &Sim) -> Vec<Action> {
    sim.given
        .iter()
        .filter(|a| !matches!(a, Action::Log(_)))
        .cloned()
        .collect()
}

#[test]
fn a_full_backup_of_two_disks_in_order() {
    let sim = run(&[
        Ev::StartOk,
        Ev::Phase(BackupPhase::Starting),
        Ev::Phase(BackupPhase::Ready),
        Ev::OpenOk,
        Ev::OpenOk,
        Ev::DiskOk(1),
        Ev::DiskOk(0),
        Ev::FinalizeOk,
        Ev::Phase(BackupPhase::Finalizing),
        Ev::Phase(BackupPhase::Succeeded),
    ]);
    assert_eq!(
        steps(&sim),
        vec![
            Action::StartBackup,
            Action::PollBackup,
            Action::PollBackup,
            Action::OpenTransfer(0),
            Action::OpenTransfer(1),
            Action::Serve,
            Action::StopServing,
            Action::FinalizeBackup,
            Action::PollBackup,
            Action::PollBackup,
            Action::Finish(Finish {
                status: 0,
                checkpoint: Some("cp".into()),
                why: "every disk was read and the backup succeeded".into(),
                left: Left::Nothing,
            }),
        ]
    );
}

#[test]
fn a_transfer_failing_while_served_ends_the_other_and_finalizes_the_backup() {
    let sim = run(&[
        Ev::StartOk,
        Ev::Phase(BackupPhase::Ready),
        Ev::OpenOk,
        Ev::OpenOk,
        Ev::DiskFail(0),
    ]);
    assert_eq!(
        steps(&sim)[4..],
        [
            Action::Serve,
            Action::StopServing,
            Action::CancelTransfer(1),
            Action::FinalizeBackup,
        ]
    );
    let sim = run(&[
        Ev::StartOk,
        Ev::Phase(BackupPhase::Ready),
        Ev::OpenOk,
        Ev::OpenOk,
        Ev::DiskFail(0),
        Ev::FinalizeOk,
        Ev::Phase(BackupPhase::Succeeded),
    ]);
    let f = sim.finish.expect("finished");
    assert_eq!((f.status, f.checkpoint, f.left), (1, None, Left::Nothing));
    assert!(
        f.why.contains("disk 0 became cancelled_system"),
        "{}",
        f.why
    );
}

#[test]
fn a_signal_while_the_backup_starts_waits_for_ready_then_finalizes_it() {
    let sim = run(&[
        Ev::Signal,
        Ev::StartOk,
        Ev::Phase(BackupPhase::Starting),
        Ev::Phase(BackupPhase::Ready),
    ]);
    assert_eq!(
        steps(&sim),
        vec![
            Action::StartBackup,
            Action::PollBackup,
            Action::PollBackup,
            Action::FinalizeBackup,
        ]
    );
    let sim = run(&[
        Ev::Signal,
        Ev::StartOk,
        Ev::Phase(BackupPhase::Ready),
        Ev::FinalizeFail,
    ]);
    let f = sim.finish.expect("finished");
    assert_eq!((f.status, f.left), (1, Left::Backup));
    assert!(f.why.starts_with("interrupted by SIGTERM"), "{}", f.why);
}

#[test]
fn an_open_that_fails_cancels_the_transfers_opened_before() {
    let sim = run(&[
        Ev::StartOk,
        Ev::Phase(BackupPhase::Ready),
        Ev::OpenOk,
        Ev::OpenFail,
    ]);
    assert_eq!(
        steps(&sim)[2..],
        [
            Action::OpenTransfer(0),
            Action::OpenTransfer(1),
            Action::CancelTransfer(0),
            Action::FinalizeBackup,
        ]
    );
}

#[test]
fn a_backup_without_a_checkpoint_prints_an_empty_one() {
    let mut m = Machine::new(1);
    assert_eq!(m.start(), vec![Action::StartBackup]);
    let mut all = Vec::new();
    for event in [
        Event::Started,
        Event::Backup {
            phase: BackupPhase::Ready,
            checkpoint: None,
        },
        Event::Opened(0),
        Event::DiskEnded(
            0,
            DiskEnd {
                ok: true,
                status: 0,
                why: "read".into(),
            },
        ),
        Event::Stopped,
        Event::FinalizeSent,
        Event::Backup {
            phase: BackupPhase::Succeeded,
            checkpoint: None,
        },
    ] {
        all.extend(m.handle(event));
    }
    let Some(Action::Finish(f)) = all.last() else {
        panic!("no finish: {all:?}");
    };
    assert_eq!((f.status, f.checkpoint.as_deref()), (0, Some("")));
}

#[test]
fn a_run_command_exiting_non_zero_finalizes_but_prints_no_checkpoint() {
    let mut m = Machine::new(1);
    let mut all = m.start();
    for event in [
        Event::Started,
        Event::Backup {
            phase: BackupPhase::Ready,
            checkpoint: Some("c1".into()),
        },
        Event::Opened(0),
        Event::DiskEnded(
            0,
            DiskEnd {
                ok: true,
                status: 3,
                why: "the command exited with status 3".into(),
            },
        ),
        Event::Stopped,
        Event::FinalizeSent,
        Event::Backup {
            phase: BackupPhase::Succeeded,
            checkpoint: Some("c1".into()),
        },
    ] {
        all.extend(m.handle(event));
    }
    assert!(all.contains(&Action::FinalizeBackup), "{all:?}");
    let Some(Action::Finish(f)) = all.last() else {
        panic!("no finish: {all:?}");
    };
    assert_eq!((f.status, f.checkpoint.as_deref()), (3, None));
    assert!(f.why.contains("status 3"), "{}", f.why);
}

#[test]
fn a_backup_someone_else_finalized_while_served_is_followed_to_its_end() {
    let mut m = Machine::new(1);
    let mut all = m.start();
    for event in [
        Event::Started,
        Event::Backup {
            phase: BackupPhase::Ready,
            checkpoint: None,
        },
        Event::Opened(0),
        Event::Backup {
            phase: BackupPhase::Finalizing,
            checkpoint: None,
        },
        Event::Stopped,
        Event::DiskEnded(
            0,
            DiskEnd {
                ok: false,
                status: 1,
                why: "cancelled".into(),
            },
        ),
        Event::Backup {
            phase: BackupPhase::Succeeded,
            checkpoint: None,
        },
    ] {
        all.extend(m.handle(event));
    }
    let given: Vec<&Action> = all
        .iter()
        .filter(|a| !matches!(a, Action::Log(_)))
        .collect();
    assert_eq!(
        given[4..given.len() - 1],
        [
            &Action::StopServing,
            &Action::CancelTransfer(0),
            &Action::PollBackup
        ]
    );
    assert!(!all.contains(&Action::FinalizeBackup), "{all:?}");
    let Some(Action::Finish(f)) = all.last() else {
        panic!("no finish: {all:?}");
    };
    assert_eq!((f.status, f.left), (1, Left::Nothing));
}

#[test]
fn serving_that_cannot_start_ends_everything() {
    let mut m = Machine::new(1);
    let mut all = m.start();
    for event in [
        Event::Started,
        Event::Backup {
            phase: BackupPhase::Ready,
            checkpoint: None,
        },
        Event::Opened(0),
        Event::ServeFailed("cannot print the URI".into()),
        Event::Stopped,
        Event::DiskEnded(
            0,
            DiskEnd {
                ok: false,
                status: 1,
                why: "cancelled".into(),
            },
        ),
    ] {
        all.extend(m.handle(event));
    }
    assert_eq!(all.last(), Some(&Action::FinalizeBackup), "{all:?}");
    assert_eq!(m.state(), State::Finalizing);
}
