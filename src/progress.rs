//! Progress on a terminal: one stderr line, rewritten in place (`\r`) about
//! once a second, with the bytes moved, the size, the rate and the transfer
//! phase.
//!
//! Log lines share stderr with it: [`StderrWriter`] (the tracing writer)
//! clears the progress line before a log line and draws it again after, so
//! the two never mix. When stderr is not a terminal nothing of this is
//! drawn; the one log line per phase change is the record there.

use crate::ovirt::Phase;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often the line is redrawn.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The rate is averaged over this many refreshes.
const RATE_WINDOW: usize = 5;
/// Erase the current terminal line: carriage return, erase to end of line.
const CLEAR: &str = "\r\x1b[K";

/// The progress line on screen now, if any (shared with log lines).
static SHOWN: Mutex<Option<String>> = Mutex::new(None);

fn shown() -> MutexGuard<'static, Option<String>> {
    SHOWN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether stderr is a terminal (progress is drawn only then).
pub fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The tracing writer for stderr: a log line clears the progress line and
/// redraws it after itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrWriter;

/// One log record being written (holds the screen while it lives).
#[derive(Debug)]
pub struct LogWriter {
    shown: MutexGuard<'static, Option<String>>,
    cleared: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter {
            shown: shown(),
            cleared: false,
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if !self.cleared && self.shown.is_some() {
            err.write_all(CLEAR.as_bytes())?;
            self.cleared = true;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if let (true, Some(line)) = (self.cleared, self.shown.as_ref()) {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
            let _ = err.flush();
        }
    }
}

/// Columns of the terminal on stderr, if it says.
fn terminal_width() -> Option<usize> {
    // SAFETY: winsize is plain integers, for which all zeroes is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ only writes the winsize it is given.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// `line` cut to fit `width` columns (one short of it, so the cursor never
/// wraps to the next line).
fn fit(line: String, width: Option<usize>) -> String {
    match width {
        Some(w) if line.chars().count() >= w => line.chars().take(w.saturating_sub(1)).collect(),
        _ => line,
    }
}

/// Draw `line` in place of the current progress line.
fn draw(line: String) {
    let line = fit(line, terminal_width());
    let mut shown = shown();
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{CLEAR}{line}");
    let _ = err.flush();
    *shown = Some(line);
}

/// Remove the progress line from the screen.
fn clear() {
    let mut shown = shown();
    if shown.take().is_some() {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(CLEAR.as_bytes());
        let _ = err.flush();
    }
}

/// What the display samples each refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Bytes moved so far.
    pub done: u64,
    /// The transfer's phase, when there is a transfer.
    pub phase: Option<Phase>,
}

/// A running progress display; stop it with [`Progress::finish`] (or drop).
#[derive(Debug)]
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Draw progress for `label` (`upload`, `download`, `served`) of `size`
    /// bytes, sampling `sample` each [`REFRESH`] — only when stderr is a
    /// terminal; otherwise the display does nothing.
    pub fn start(
        label: &'static str,
        size: u64,
        sample: impl Fn() -> Sample + Send + Sync + 'static,
    ) -> Progress {
        if !stderr_is_terminal() {
            return Progress { task: None };
        }
        let sample = Arc::new(sample);
        let task = tokio::spawn(async move {
            let mut rate = Rate::default();
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let s = sample();
                let bps = rate.add(Instant::now(), s.done);
                draw(format_line(label, s.done, size, bps, s.phase));
            }
        });
        Progress { task: Some(task) }
    }

    /// Stop drawing and clear the line.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes per second over the last few samples.
#[derive(Debug, Default)]
struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    fn add(&mut self, at: Instant, done: u64) -> f64 {
        self.samples.push_back((at, done));
        while self.samples.len() > RATE_WINDOW {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
                b1.saturating_sub(b0) as f64 / (t1 - t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// `12.0 MiB`: binary units, one decimal from KiB up.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// The progress line:
/// `upload 12.0 MiB / 64.0 MiB (18%), 3.0 MiB/s, transferring`.
pub fn format_line(
    label: &str,
    done: u64,
    size: u64,
    bytes_per_sec: f64,
    phase: Option<Phase>,
) -> String {
    let mut line = format!("{label} {}", format_bytes(done));
    if size > 0 {
        // Clients may write a range twice: never show more than 100%.
        let pct = (u128::from(done) * 100 / u128::from(size)).min(100);
        line.push_str(&format!(" / {} ({pct}%)", format_bytes(size)));
    }
    let bps = if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
        bytes_per_sec as u64
    } else {
        0
    };
    line.push_str(&format!(", {}/s", format_bytes(bps)));
    if let Some(p) = phase {
        line.push_str(&format!(", {p}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fit_the_terminal() {
        let line = "upload 1.0 MiB / 64.0 MiB (1%), 3.0 MiB/s, transferring".to_string();
        assert_eq!(fit(line.clone(), None), line);
        assert_eq!(fit(line.clone(), Some(200)), line);
        assert_eq!(fit(line.clone(), Some(21)), "upload 1.0 MiB / 64.");
        assert_eq!(fit(line, Some(1)), "");
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(64 << 20), "64.0 MiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn lines() {
        assert_eq!(
            format_line(
                "upload",
                12 << 20,
                64 << 20,
                3.0 * 1048576.0,
                Some(Phase::Transferring)
            ),
            "upload 12.0 MiB / 64.0 MiB (18%), 3.0 MiB/s, transferring"
        );
        assert_eq!(
            format_line("download", 0, 1 << 30, 0.0, Some(Phase::PausedUser)),
            "download 0 B / 1.0 GiB (0%), 0 B/s, paused_user"
        );
        assert_eq!(
            format_line("upload", 80 << 20, 64 << 20, f64::NAN, None),
            "upload 80.0 MiB / 64.0 MiB (100%), 0 B/s"
        );
        assert_eq!(
            format_line("served", 512, 0, 512.0, None),
            "served 512 B, 512 B/s"
        );
    }

    #[test]
    fn rate_over_the_window() {
        let mut r = Rate::default();
        let t = Instant::now();
        assert_eq!(r.add(t, 0), 0.0);
        assert_eq!(r.add(t + Duration::from_secs(1), 1000), 1000.0);
        assert_eq!(r.add(t + Duration::from_secs(2), 3000), 1500.0);
        for i in 3..10 {
            r.add(t + Duration::from_secs(i), 3000);
        }
        assert_eq!(
            r.add(t + Duration::from_secs(10), 3000),
            0.0,
            "old bursts leave the window"
        );
    }
}
