//! `--run CMD`, nbdkit's captive mode: once the server accepts clients,
//! run CMD through `sh -c` with the server's address in its environment
//! (`uri`, `exportname`, `port`, `unixsocket`, `tls`, as nbdkit sets them;
//! `serve --backup` adds `backup`, `disks` and `uris`),
//! so `--run 'qemu-img convert -n src.qcow2 "$uri"'` works as it does with
//! nbdkit; the server ends when CMD exits.

use crate::nbd::{Listener, TlsMode};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long the command has to exit after SIGTERM when the server ends
/// before it.
const GRACE: Duration = Duration::from_secs(10);

/// What the command is told of the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunEnv {
    /// The NBD URI (`$uri`).
    pub uri: String,
    /// The export name (`$exportname`).
    pub export: String,
    /// The TCP port (`$port`), empty on a unix socket.
    pub port: Option<u16>,
    /// The unix socket (`$unixsocket`), empty on TCP.
    pub unixsocket: Option<String>,
    /// `$tls`: 0 off, 1 offered, 2 required (nbdkit's values).
    pub tls: u8,
    /// More variables for this kind of server (a backup's `$disks`).
    pub extra: Vec<(String, String)>,
}

impl RunEnv {
    /// The environment for a server on `listener` exporting `export` with
    /// NBD TLS `tls`.
    pub fn of(listener: &Listener, export: &str, tls: TlsMode) -> Self {
        let (port, unixsocket) = match listener {
            Listener::Unix(_, path) => (None, Some(path.display().to_string())),
            Listener::Tcp(l) => (l.local_addr().ok().map(|a| a.port()), None),
        };
        RunEnv {
            uri: listener.uri(export, tls),
            export: export.to_string(),
            port,
            unixsocket,
            tls: match tls {
                TlsMode::Off => 0,
                TlsMode::On => 1,
                TlsMode::Require => 2,
            },
            extra: Vec::new(),
        }
    }
}

/// The running command.
#[derive(Debug)]
pub struct Captive {
    child: Option<Child>,
    /// The status to report at once: the command could not be started.
    failed: Option<i32>,
}

impl Captive {
    /// Start `cmd` through `sh -c` with `env` (standard input: /dev/null).
    ///
    /// # Errors
    /// `sh` cannot be started.
    pub fn spawn(cmd: &str, env: &RunEnv) -> std::io::Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("uri", &env.uri)
            .env("exportname", &env.export)
            .env("port", env.port.map(|p| p.to_string()).unwrap_or_default())
            .env("unixsocket", env.unixsocket.as_deref().unwrap_or(""))
            .env("tls", env.tls.to_string())
            .envs(env.extra.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()?;
        tracing::info!(pid = child.id(), command = cmd, "--run command started");
        Ok(Captive {
            child: Some(child),
            failed: None,
        })
    }

    /// Start `cmd` as [`Captive::spawn`] does; if `sh` itself cannot be
    /// started, say so and report status 127 (a shell's "cannot run") as
    /// the command's exit, so the rules decide as for a failed command.
    pub fn start(cmd: &str, env: &RunEnv) -> Self {
        Captive::spawn(cmd, env).unwrap_or_else(|e| {
            tracing::error!(error = %e, command = cmd, "cannot start the --run command");
            Captive {
                child: None,
                failed: Some(127),
            }
        })
    }

    /// No command (waiting on it never ends).
    pub fn none() -> Self {
        Captive {
            child: None,
            failed: None,
        }
    }

    /// Wait until the command exits; its status as a shell shows it (128 +
    /// N when killed by signal N). Never returns when there is no command
    /// (or it was already reaped), so it can sit in a `select!`.
    pub async fn exited(&mut self) -> i32 {
        if let Some(code) = self.failed.take() {
            return code;
        }
        let Some(child) = &mut self.child else {
            return std::future::pending().await;
        };
        let code = match child.wait().await {
            Ok(status) => exit_code(status),
            Err(e) => {
                tracing::warn!(error = %e, "cannot wait for the --run command");
                1
            }
        };
        self.child = None;
        tracing::info!(status = code, "the --run command exited");
        code
    }

    /// The server is ending before the command: SIGTERM, then SIGKILL after
    /// a grace period.
    pub async fn end(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on our own child, which `child` has not reaped,
            // so its pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_command_sees_the_server_and_its_status_comes_back() {
        let env = RunEnv {
            uri: "nbd+unix:///x?socket=/tmp/s".into(),
            export: "x".into(),
            port: None,
            unixsocket: Some("/tmp/s".into()),
            tls: 0,
            extra: vec![("disks".into(), "a b".into())],
        };
        let mut c = Captive::spawn(
            r#"test "$uri" = 'nbd+unix:///x?socket=/tmp/s' && test "$exportname" = x && test -z "$port" && test "$unixsocket" = /tmp/s && test "$tls" = 0 && test "$disks" = 'a b' && exit 7"#,
            &env,
        )
        .unwrap();
        assert_eq!(c.exited().await, 7);
        let mut killed = Captive::spawn("kill -9 $$", &env).unwrap();
        assert_eq!(killed.exited().await, 128 + 9);
    }

    #[tokio::test]
    async fn a_command_still_running_is_ended() {
        let mut c = Captive::spawn("exec sleep 600", &RunEnv::default()).unwrap();
        c.end().await;
        assert!(c.child.is_none());
    }
}
