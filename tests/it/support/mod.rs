//! Shared harness for the integration tests: start our binary and real tools,
//! read contract lines, wait on conditions with deadlines, stop everything
//! in `Drop`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to print its contract line.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// The `nbdbridge` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nbdbridge"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test venv's python (ovirt-imageio, ovirt-engine-sdk-python).
pub fn venv_python() -> PathBuf {
    repo().join(".venv/bin/python")
}

/// Debian's own python3, which has the libnbd binding (python3-libnbd).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Whether a missing tool must fail the test: under `scripts/test`
/// (`NBDBRIDGE_TEST_STRICT=1`), which installs every tool first, and under
/// CI (`CI=true`). A bare `cargo test` skips instead.
pub fn strict() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("NBDBRIDGE_TEST_STRICT").as_deref() == Ok("1")
}

/// Whether `tool` can run. Missing tools skip a test on a developer machine,
/// but fail it under `scripts/test` and CI ([`strict`]), where the test
/// script installed them.
pub fn require(tool: &str) -> bool {
    let found = if tool.contains('/') {
        Path::new(tool).exists()
    } else {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !found {
        assert!(
            !strict(),
            "{tool} is required under scripts/test and CI; scripts/test installs it"
        );
        eprintln!("skipping: {tool} is not installed (run scripts/test)");
    }
    found
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// The first stdout line (the contract line), if one was awaited.
    pub first_line: String,
    /// The rest of stdout, line by line, read by a thread.
    pub lines: Option<mpsc::Receiver<String>>,
    name: String,
}

impl Proc {
    /// Start `cmd` (stdout piped, stderr inherited) and wait for its first
    /// stdout line.
    pub fn start_announcing(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = Proc {
            child: Some(child),
            first_line: String::new(),
            lines: None,
            name: name.to_string(),
        };
        match rx.recv_timeout(START_DEADLINE) {
            Ok(line) => proc.first_line = line,
            Err(_) => {
                let status = proc
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!("{name} printed no first line within {START_DEADLINE:?} (exit: {status:?})");
            }
        }
        proc.lines = Some(rx);
        proc
    }

    /// Start `cmd` without waiting for output.
    pub fn start(name: &str, mut cmd: Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child: Some(child),
            first_line: String::new(),
            lines: None,
            name: name.to_string(),
        }
    }

    /// Whether the process is still running (not exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Send a signal (e.g. `libc::SIGTERM` = 15, SIGKILL = 9) via `kill`.
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Wait for the process to exit within `deadline`; its exit status.
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("process running");
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < end,
                "{} did not exit within {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-15")
            .arg(child.id().to_string())
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Poll `cond` until it holds or `deadline` passes (then panic naming `what`).
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `cmd` to completion and assert it succeeded; its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes (xorshift), for test images.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub mod engine;
pub mod imageio;
pub mod nbd;
pub mod proxy;
pub mod tls;

/// The engine REST API as the serve tests drive it: log in, call, create
/// disks and transfers, read phases.
pub mod api {
    use super::engine::{element, first_id, http};
    use super::wait_until;
    use std::time::Duration;

    /// An engine at `url` (http) with its admin password file.
    #[derive(Debug, Clone)]
    pub struct Api {
        /// `http://127.0.0.1:PORT/ovirt-engine/api`.
        pub url: String,
        /// The admin password file.
        pub password_file: String,
    }

    impl Api {
        /// A bearer token.
        pub fn token(&self) -> String {
            let password = std::fs::read_to_string(&self.password_file).unwrap();
            let form = format!(
                "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password={}",
                password.trim()
            );
            let (status, _, body) = http(
                &self.url,
                "POST",
                "/ovirt-engine/sso/oauth/token",
                None,
                "application/x-www-form-urlencoded",
                form.as_bytes(),
            );
            assert_eq!(status, 200, "login: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }

        /// One API call: (status, body).
        pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
            let t = self.token();
            let (status, _, text) = http(
                &self.url,
                method,
                &format!("/ovirt-engine/api{path}"),
                Some(&t),
                "application/xml",
                body.as_bytes(),
            );
            (status, text)
        }

        /// Create a disk (`raw` or `cow`) and wait until it is `ok`; its id.
        pub fn new_disk(&self, alias: &str, format: &str, size: u64) -> String {
            let (status, xml) = self.call(
                "POST",
                "/disks",
                &format!(
                    "<disk><alias>{alias}</alias><format>{format}</format>\
                     <provisioned_size>{size}</provisioned_size></disk>"
                ),
            );
            assert!((200..300).contains(&status), "add disk: {status} {xml}");
            let id = first_id(&xml).unwrap().to_string();
            wait_until("disk ok", Duration::from_secs(30), || {
                element(&self.call("GET", &format!("/disks/{id}"), "").1, "status") == Some("ok")
            });
            id
        }

        /// Start a transfer of `disk` with the given direction and format;
        /// its id once it left `initializing`.
        pub fn new_transfer(&self, disk: &str, direction: &str, format: &str) -> String {
            let (status, xml) = self.call(
                "POST",
                "/imagetransfers",
                &format!(
                    "<image_transfer><disk id=\"{disk}\"/><direction>{direction}</direction>\
                     <format>{format}</format></image_transfer>"
                ),
            );
            assert!((200..300).contains(&status), "add transfer: {status} {xml}");
            let id = first_id(&xml).unwrap().to_string();
            wait_until("transfer set up", Duration::from_secs(30), || {
                self.phase(&id).as_deref() != Some("initializing")
            });
            id
        }

        /// The phase of transfer `id`.
        pub fn phase(&self, id: &str) -> Option<String> {
            let (_, xml) = self.call("GET", &format!("/imagetransfers/{id}"), "");
            element(&xml, "phase").map(str::to_string)
        }

        /// Run `action` on transfer `id`; the status.
        pub fn act(&self, id: &str, action: &str) -> u16 {
            self.call(
                "POST",
                &format!("/imagetransfers/{id}/{action}"),
                "<action/>",
            )
            .0
        }

        /// The phase of the newest transfer of `disk`.
        pub fn phase_of_disk_transfer(&self, disk: &str) -> Option<String> {
            let (_, xml) = self.call("GET", "/imagetransfers", "");
            xml.split("<image_transfer ")
                .filter(|t| t.contains(&format!("id=\"{disk}\"")))
                .last()
                .and_then(|t| element(t, "phase").map(str::to_string))
        }

        /// The id of the newest transfer of `disk`.
        pub fn transfer_of_disk(&self, disk: &str) -> Option<String> {
            let (_, xml) = self.call("GET", "/imagetransfers", "");
            xml.split("<image_transfer ")
                .filter(|t| t.contains(&format!("id=\"{disk}\"")))
                .last()
                .and_then(|t| first_id(&format!(" {t}")).map(str::to_string))
        }
    }
}

/// Run `cmd` (stdout and stderr captured) and wait at most `deadline` for
/// it to exit, whatever its status; a command still running then is killed
/// and the test fails showing what it printed.
pub fn output_within(cmd: &mut Command, deadline: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not exit within {deadline:?} (server hung?)\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}

/// A sparse qcow2 source: 64 MiB virtual, 3 MiB of data.
pub fn sparse_qcow2(path: &std::path::Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg("64M"),
    );
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x55 1M 2M",
                "-c",
                "write -P 0x66 40M 1M",
            ])
            .arg(path),
    );
}
