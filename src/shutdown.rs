//! An orderly stop: one [`Shutdown`] handle is cloned into every task; any
//! clone can trigger it, all can wait for it.

use tokio::sync::watch;

/// A cheap, cloneable shutdown signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new, untriggered signal.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }

    /// Tell every holder to stop.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the stop was asked for.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Wait until the stop is asked for.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone: nobody can trigger any more,
        // which we treat as a stop.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// SIGINT, SIGTERM and SIGHUP handlers, installed at once so that a signal
/// that arrives right after a contract line is printed is not lost.
/// (`--exit-with-parent` makes the parent's death a SIGTERM.)
#[derive(Debug)]
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers now (before announcing anything).
    ///
    /// # Errors
    /// The handlers cannot be installed.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Wait for the next SIGINT, SIGTERM or SIGHUP; its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
