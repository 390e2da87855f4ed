//! Every sequence of client events up to a useful length, from a small
//! alphabet (two connection slots, writes, failures, the three ways a
//! connection ends, serve's own flush failing, signals, `--run` exits),
//! run through the machine and checked against the rules table written a
//! second time as a plain oracle that re-reads the history. A second
//! search lets the driver's answers arrive late (any interleaving of
//! client events and action results) and checks the invariants that must
//! hold whatever the timing.

use super::*;

/// Node floors one event short of the full depth (see [`floor`]).
const UPLOADS_7: u64 = 100_000;
const DOWNLOADS_7: u64 = 140_000;
const RUN_6: u64 = 20_000;
const RACE_6: u64 = 30_000;

/// One letter of the alphabet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Open(usize),
    Write(usize),
    /// A command answered with an error (any kind).
    Fail(usize),
    /// READ of data region `r` (download).
    Read(usize, usize),
    End(usize, Ending),
    /// serve's next flush of the data server fails.
    FlushFails,
    Signal,
    Exit(i32),
    /// The driver finishes the oldest action it was given (race search).
    Deliver,
}

/// Data regions of the download disk (size 40).
const REGIONS: [(u64, u64); 2] = [(0, 10), (20, 30)];
const SIZE: u64 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Transferring,
    Paused,
    Ended(Final, i32),
}

/// The machine with a driver that carries out its actions.
#[derive(Debug, Clone)]
struct Sim {
    m: Machine,
    /// Connection id in each slot.
    slots: [Option<u64>; 2],
    next_id: u64,
    flush_fails: bool,
    /// Actions given to the driver and not finished (race search).
    queue: Vec<Action>,
    status: Status,
    settle: bool,
    /// Steps taken, and every action given with the step it was given at.
    now: usize,
    given: Vec<(usize, Action)>,
}

impl Sim {
    fn new(direction: Direction, captive: bool, settle: bool) -> Self {
        let coverage = (direction == Direction::Download).then(|| Coverage::new(SIZE, REGIONS));
        let config = Config {
            direction,
            captive,
            on_interrupt: OnInterrupt::Pause,
            keepalive_after: Duration::from_secs(20),
        };
        Sim {
            m: Machine::new(config, coverage),
            slots: [None, None],
            next_id: 1,
            flush_fails: false,
            queue: Vec::new(),
            status: Status::Transferring,
            settle,
            now: 0,
            given: Vec::new(),
        }
    }

    /// Whether `ev` makes sense now.
    fn valid(&self, ev: Ev) -> bool {
        match ev {
            Ev::Open(s) => self.slots[s].is_none(),
            Ev::Write(s) | Ev::Fail(s) | Ev::Read(s, _) | Ev::End(s, _) => self.slots[s].is_some(),
            Ev::Deliver => !self.queue.is_empty(),
            Ev::FlushFails => !self.flush_fails,
            Ev::Signal | Ev::Exit(_) => true,
        }
    }

    fn feed(&mut self, event: Event) {
        let actions = self.m.handle(event);
        for a in &actions {
            self.given.push((self.now, a.clone()));
        }
        self.queue.extend(actions);
        if self.settle {
            while !self.queue.is_empty() {
                self.deliver();
            }
        }
    }

    /// The driver finishes its oldest action.
    fn deliver(&mut self) {
        let action = self.queue.remove(0);
        match action {
            Action::Flush => {
                let ok = !std::mem::take(&mut self.flush_fails);
                self.feed(Event::Flushed { ok });
            }
            Action::Pause { .. } => {
                self.status = Status::Paused;
                self.feed(Event::Paused);
            }
            Action::Resume => {
                self.status = Status::Transferring;
                self.feed(Event::Resumed);
            }
            Action::StopServing => {
                let ids: Vec<u64> = self.slots.iter_mut().filter_map(Option::take).collect();
                for id in ids {
                    self.feed(Event::Ended {
                        conn: id,
                        how: Ending::Stopped,
                    });
                }
                self.feed(Event::Stopped);
            }
            Action::Finish { how, status, .. } => {
                let how = if how == Final::Pause && self.status == Status::Paused {
                    Final::Leave
                } else {
                    how
                };
                self.status = Status::Ended(how, status);
                self.slots = [None, None];
            }
            Action::KeepAlive | Action::Log(_) => {}
        }
    }

    fn step(&mut self, ev: Ev) {
        self.now += 1;
        if matches!(self.status, Status::Ended(..)) && ev != Ev::Deliver {
            return;
        }
        match ev {
            Ev::Open(s) => {
                let id = self.next_id;
                self.next_id += 1;
                if self.m.admits() {
                    self.slots[s] = Some(id);
                    self.feed(Event::Opened(id));
                }
            }
            Ev::Write(s) | Ev::Fail(s) => {
                if let Some(id) = self.slots[s] {
                    // A request waits while the gate is closed; one that
                    // passes an ended gate fails.
                    match self.m.gate() {
                        Gate::Closed => {}
                        Gate::Ended => self.feed(Event::Request {
                            conn: id,
                            op: Op::Write,
                            ok: false,
                        }),
                        Gate::Open => self.feed(Event::Request {
                            conn: id,
                            op: Op::Write,
                            ok: matches!(ev, Ev::Write(_)),
                        }),
                    }
                }
            }
            Ev::Read(s, r) => {
                if let Some(id) = self.slots[s]
                    && self.m.gate() == Gate::Open
                {
                    let (a, b) = REGIONS[r];
                    self.feed(Event::Request {
                        conn: id,
                        op: Op::Read {
                            offset: a,
                            len: b - a,
                        },
                        ok: true,
                    });
                }
            }
            Ev::End(s, how) => {
                if let Some(id) = self.slots[s].take() {
                    self.feed(Event::Ended { conn: id, how });
                }
            }
            Ev::FlushFails => self.flush_fails = true,
            Ev::Signal => self.feed(Event::Signal("SIGTERM")),
            Ev::Exit(code) => self.feed(Event::RunExited(code)),
            Ev::Deliver => self.deliver(),
        }
    }
}

/// The rules table, again: read the history from the start.
fn oracle(direction: Direction, captive: bool, history: &[Ev]) -> Status {
    let upload = direction == Direction::Upload;
    let mut status = Status::Transferring;
    let mut open = [false, false];
    let mut period_start = 0;
    let mut resumed = false;
    let mut flush_fails = false;
    let mut read = [false, false];
    for (i, &ev) in history.iter().enumerate() {
        if matches!(status, Status::Ended(..)) {
            break;
        }
        let period = history.get(period_start..i).unwrap_or_default();
        let writes = period.iter().filter(|e| matches!(e, Ev::Write(_))).count();
        let failures = period.iter().filter(|e| matches!(e, Ev::Fail(_))).count();
        let unclean = period
            .iter()
            .any(|e| matches!(e, Ev::End(_, how) if *how != Ending::Clean));
        match ev {
            Ev::Open(s) => {
                open[s] = true;
                if status == Status::Paused {
                    status = Status::Transferring;
                    period_start = i;
                    resumed = true;
                }
            }
            Ev::Read(s, r) if open[s] => read[r] = true,
            Ev::End(s, how) if open[s] => {
                open[s] = false;
                if open.iter().any(|o| *o) || captive {
                    continue;
                }
                let unclean = unclean || how != Ending::Clean;
                if !upload {
                    if how == Ending::Clean && read.iter().all(|r| *r) {
                        status = Status::Ended(Final::Finalize, 0);
                    }
                } else if writes == 0 && failures == 0 {
                    if resumed {
                        status = Status::Paused;
                        period_start = i + 1;
                        resumed = false;
                    }
                } else if failures == 0 && !unclean && !std::mem::take(&mut flush_fails) {
                    status = Status::Ended(Final::Finalize, 0);
                } else {
                    status = Status::Paused;
                    period_start = i + 1;
                    resumed = false;
                }
            }
            Ev::FlushFails => flush_fails = true,
            Ev::Signal => {
                status = match (upload, status) {
                    (false, _) => Status::Ended(Final::Finalize, 1),
                    (true, Status::Paused) => Status::Ended(Final::Leave, 1),
                    (true, _) => Status::Ended(Final::Pause, 1),
                };
            }
            Ev::Exit(code) => {
                status = match (upload, status, code) {
                    (false, _, code) => Status::Ended(Final::Finalize, code),
                    (true, Status::Paused, 0) => Status::Ended(Final::Leave, 1),
                    (true, Status::Paused, code) => Status::Ended(Final::Leave, code),
                    (true, _, 0) => {
                        if failures == 0 && !unclean && !std::mem::take(&mut flush_fails) {
                            Status::Ended(Final::Finalize, 0)
                        } else {
                            Status::Ended(Final::Pause, 1)
                        }
                    }
                    (true, _, code) => Status::Ended(Final::Pause, code),
                };
            }
            _ => {}
        }
    }
    status
}

fn alphabet(direction: Direction, captive: bool, race: bool) -> Vec<Ev> {
    let mut a = Vec::new();
    for s in 0..2 {
        a.push(Ev::Open(s));
        a.push(Ev::Fail(s));
        for how in [Ending::Clean, Ending::Vanished, Ending::Broken] {
            a.push(Ev::End(s, how));
        }
        match direction {
            Direction::Upload => a.push(Ev::Write(s)),
            Direction::Download => {
                a.push(Ev::Read(s, 0));
                a.push(Ev::Read(s, 1));
            }
        }
    }
    if direction == Direction::Upload {
        a.push(Ev::FlushFails);
    }
    a.push(Ev::Signal);
    if captive {
        a.push(Ev::Exit(0));
        a.push(Ev::Exit(3));
    }
    if race {
        a.push(Ev::Deliver);
    }
    a
}

/// Depth-first over every valid sequence up to `depth`, calling `check` at
/// every node; the number of nodes.
fn explore(
    sim: &Sim,
    history: &mut Vec<Ev>,
    alphabet: &[Ev],
    depth: usize,
    check: &mut dyn FnMut(&Sim, &[Ev]),
) -> u64 {
    check(sim, history);
    if history.len() == depth || matches!(sim.status, Status::Ended(..)) {
        return 1;
    }
    let mut n = 1;
    for &ev in alphabet {
        if !sim.valid(ev) {
            continue;
        }
        let mut next = sim.clone();
        next.step(ev);
        history.push(ev);
        n += explore(&next, history, alphabet, depth, check);
        history.pop();
    }
    n
}

fn against_the_oracle(direction: Direction, captive: bool, depth: usize) -> u64 {
    let sim = Sim::new(direction, captive, true);
    let alphabet = alphabet(direction, captive, false);
    explore(
        &sim,
        &mut Vec::new(),
        &alphabet,
        depth,
        &mut |sim, history| {
            let want = oracle(direction, captive, history);
            assert_eq!(
                sim.status, want,
                "{direction:?} captive={captive} after {history:?}"
            );
        },
    )
}

/// How deep to search: one event less in unoptimized builds (`cargo
/// test`), where a node costs about ten times more; the optimized run
/// (`cargo test --release`) goes the full depth.
fn depth(full: usize) -> usize {
    if cfg!(debug_assertions) {
        full - 1
    } else {
        full
    }
}

/// At least this many nodes must have been searched (a floor, about half
/// of what each depth gives, so that a search that stopped early fails).
fn floor(full: usize, at_full: u64, one_less: u64) -> u64 {
    if depth(full) == full {
        at_full
    } else {
        one_less
    }
}

#[test]
fn uploads_follow_the_rules_table() {
    let n = against_the_oracle(Direction::Upload, false, depth(8));
    eprintln!("uploads: {n} sequences");
    assert!(n > floor(8, 1_000_000, UPLOADS_7), "{n} sequences");
}

#[test]
fn downloads_follow_the_rules_table() {
    let n = against_the_oracle(Direction::Download, false, depth(8));
    eprintln!("downloads: {n} sequences");
    assert!(n > floor(8, 500_000, DOWNLOADS_7), "{n} sequences");
}

#[test]
fn run_commands_judge_uploads_and_downloads() {
    for direction in [Direction::Upload, Direction::Download] {
        let n = against_the_oracle(direction, true, depth(7));
        eprintln!("run {direction:?}: {n} sequences");
        assert!(n > floor(7, 100_000, RUN_6), "{n} sequences");
    }
}

/// The period an upload was finalized on, read from the history: since
/// the last pause the machine asked for (or the start).
fn finalize_is_justified(sim: &Sim, history: &[Ev]) -> Result<(), String> {
    let Some(at) = sim
        .given
        .iter()
        .find(|(_, a)| {
            matches!(
                a,
                Action::Finish {
                    how: Final::Finalize,
                    ..
                }
            )
        })
        .map(|(i, _)| *i)
    else {
        return Ok(());
    };
    let since = sim
        .given
        .iter()
        .filter(|(i, a)| *i <= at && matches!(a, Action::Pause { .. }))
        .map(|(i, _)| *i)
        .next_back()
        .unwrap_or(0);
    let period = history.get(since..at).unwrap_or_default();
    if !period.iter().any(|e| matches!(e, Ev::Write(_))) {
        return Err("finalized a period that wrote nothing".into());
    }
    if period.iter().any(|e| matches!(e, Ev::Fail(_))) {
        return Err("finalized a period with a failure".into());
    }
    if period
        .iter()
        .any(|e| matches!(e, Ev::End(_, how) if *how != Ending::Clean))
    {
        return Err("finalized a period with a vanished or broken connection".into());
    }
    if sim.slots.iter().any(Option::is_some) && sim.m.admits() {
        return Err("finalized with a client connected".into());
    }
    Ok(())
}

fn race(sim: &Sim, history: &mut Vec<Ev>, alphabet: &[Ev], depth: usize) -> u64 {
    if let Err(e) = finalize_is_justified(sim, history) {
        panic!("{e}: {history:?}");
    }
    // Let the driver finish everything: a client still connected must not
    // wait at a closed gate with nothing left that would open it, and the
    // gate is open only on a transfer that is transferring.
    let mut drained = sim.clone();
    while drained.valid(Ev::Deliver) {
        drained.step(Ev::Deliver);
    }
    if !matches!(drained.status, Status::Ended(..)) {
        if drained.m.active() > 0 {
            assert_eq!(
                drained.m.gate(),
                Gate::Open,
                "a client waits forever after {history:?}"
            );
        }
        let open = drained.m.gate() == Gate::Open;
        assert_eq!(
            open,
            drained.status == Status::Transferring,
            "gate and transfer disagree after {history:?}"
        );
    }
    if history.len() == depth || matches!(sim.status, Status::Ended(..)) {
        return 1;
    }
    let mut n = 1;
    for &ev in alphabet {
        if !sim.valid(ev) {
            continue;
        }
        let mut next = sim.clone();
        next.step(ev);
        history.push(ev);
        n += race(&next, history, alphabet, depth);
        history.pop();
    }
    n
}

#[test]
fn whatever_the_timing_no_partial_upload_is_finalized_and_no_client_waits_forever() {
    let alphabet = alphabet(Direction::Upload, false, true);
    let sim = Sim::new(Direction::Upload, false, false);
    let n = race(&sim, &mut Vec::new(), &alphabet, depth(7));
    eprintln!("race: {n} sequences");
    assert!(n > floor(7, 400_000, RACE_6), "{n} sequences");
}

#[test]
fn the_issue_reproductions() {
    // A writer vanishes after a flush; nbdinfo (no write) then connects and
    // leaves cleanly: the transfer is paused again, never finalized.
    let mut sim = Sim::new(Direction::Upload, false, true);
    for ev in [
        Ev::Open(0),
        Ev::Write(0),
        Ev::End(0, Ending::Vanished),
        Ev::Open(1),
        Ev::End(1, Ending::Clean),
    ] {
        sim.step(ev);
    }
    assert_eq!(sim.status, Status::Paused);
    // qemu-img info on a download reads the header and leaves: not the end.
    let mut sim = Sim::new(Direction::Download, false, true);
    for ev in [Ev::Open(0), Ev::Read(0, 0), Ev::End(0, Ending::Clean)] {
        sim.step(ev);
    }
    assert_eq!(sim.status, Status::Transferring);
    for ev in [
        Ev::Open(1),
        Ev::Read(1, 0),
        Ev::Read(1, 1),
        Ev::End(1, Ending::Clean),
    ] {
        sim.step(ev);
    }
    assert_eq!(sim.status, Status::Ended(Final::Finalize, 0));
    // nbdcopy sends no FLUSH: writes and DISC are enough.
    let mut sim = Sim::new(Direction::Upload, false, true);
    for ev in [
        Ev::Open(0),
        Ev::Open(1),
        Ev::Write(0),
        Ev::Write(1),
        Ev::End(0, Ending::Clean),
        Ev::End(1, Ending::Clean),
    ] {
        sim.step(ev);
    }
    assert_eq!(sim.status, Status::Ended(Final::Finalize, 0));
}

#[test]
fn a_client_during_the_final_flush_is_served_and_judged_with_its_period() {
    let mut sim = Sim::new(Direction::Upload, false, false);
    sim.step(Ev::Open(0));
    sim.step(Ev::Write(0));
    sim.step(Ev::End(0, Ending::Clean));
    assert_eq!(sim.m.state(), State::FinalFlush);
    sim.step(Ev::Open(1));
    assert_eq!(sim.m.state(), State::Serving);
    // The flush finishes now: no finalize while a client is connected.
    while sim.valid(Ev::Deliver) {
        sim.step(Ev::Deliver);
    }
    assert_eq!(sim.status, Status::Transferring);
    sim.step(Ev::End(1, Ending::Vanished));
    while sim.valid(Ev::Deliver) {
        sim.step(Ev::Deliver);
    }
    assert_eq!(sim.status, Status::Paused);
}
