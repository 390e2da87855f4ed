//! Helpers for the imageio data server tests: start our server or the real
//! ovirt-imageio daemon (private config, plain process), talk to them with
//! curl and with the real imageio Python client.

use super::{Proc, START_DEADLINE, bin, repo, require, run_ok, venv_python, wait_until};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Which server a test talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `nbdbridge imageio`.
    Ours,
    /// The real ovirt-imageio daemon from the venv.
    Daemon,
}

/// A running data server with its control socket, in a private temp dir.
#[derive(Debug)]
pub struct Server {
    /// Which one.
    pub kind: Kind,
    /// `http://127.0.0.1:PORT/images/`.
    pub base: String,
    /// Control API unix socket.
    pub control: PathBuf,
    /// Local data unix socket.
    pub local: PathBuf,
    /// Scratch dir for the server and the test's images.
    pub dir: tempfile::TempDir,
    proc: Proc,
}

/// The real daemon's entry point in the venv.
pub fn daemon_bin() -> PathBuf {
    repo().join(".venv/bin/ovirt-imageio")
}

/// Whether the venv with ovirt-imageio is there (skip locally, fail in CI).
pub fn have_venv() -> bool {
    require(&venv_python().to_string_lossy()) && require(&daemon_bin().to_string_lossy())
}

/// Start `nbdbridge imageio` on 127.0.0.1:0.
pub fn start_ours() -> Server {
    start_ours_with(&[])
}

/// Start `nbdbridge imageio` on 127.0.0.1:0 with extra arguments.
pub fn start_ours_with(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("ctl.sock");
    let local = dir.path().join("local.sock");
    let mut cmd = Command::new(bin());
    cmd.arg("imageio")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--control-socket")
        .arg(&control)
        .arg("--local-socket")
        .arg(&local)
        .args(extra);
    let proc = Proc::start_announcing("nbdbridge imageio", cmd);
    let base = proc.first_line.clone();
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/images/"),
        "contract line: {base}"
    );
    Server {
        kind: Kind::Ours,
        base,
        control,
        local,
        dir,
        proc,
    }
}

/// The real ovirt-imageio daemon, started by [`launch_daemon`]; stopped
/// when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// Its data port on 127.0.0.1.
    pub port: u16,
    /// Ticket control API unix socket.
    pub control: PathBuf,
    /// Local data unix socket.
    pub local: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// The process.
    pub proc: Proc,
}

/// Start the real ovirt-imageio daemon with a private config in `dir` (no
/// TLS, port 0, run dir, sockets and log in `dir`; IMAGEIO-API.md 1) and
/// wait until it is ready; the port is read from its log. The one launcher
/// of the daemon: the data server tests and the engine tests use it.
pub fn launch_daemon(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir.join("conf.d")).expect("conf.d");
    let control = dir.join("ctl.sock");
    let local = dir.join("local.sock");
    let log = dir.join("daemon.log");
    let conf = format!(
        "[daemon]\ndrop_privileges = false\nsystemd_enable = false\nrun_dir = {run}\n\
         [tls]\nenable = false\n\
         [remote]\nhost = 127.0.0.1\nport = 0\n\
         [local]\nenable = true\nsocket = {local}\n\
         [control]\ntransport = unix\nsocket = {control}\n\
         [handler_logfile]\nargs = ('{log}',)\n",
        run = dir.display(),
        local = local.display(),
        control = control.display(),
        log = log.display(),
    );
    std::fs::write(dir.join("conf.d/99-test.conf"), conf).expect("config");
    let mut cmd = Command::new(daemon_bin());
    cmd.arg("-c").arg(dir);
    let proc = Proc::start("ovirt-imageio", cmd);
    let mut port = None;
    wait_until("ovirt-imageio ready", START_DEADLINE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        port = text.lines().find_map(|l| {
            let rest = l
                .split("remote.service listening on ('127.0.0.1', ")
                .nth(1)?;
            rest.split(')').next()?.parse::<u16>().ok()
        });
        port.is_some() && text.contains("Ready for requests")
    });
    Daemon {
        port: port.expect("port"),
        control,
        local,
        log,
        proc,
    }
}

/// Start the real ovirt-imageio daemon in a temp dir of its own.
pub fn start_daemon() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = launch_daemon(dir.path());
    Server {
        kind: Kind::Daemon,
        base: format!("http://127.0.0.1:{}/images/", daemon.port),
        control: daemon.control,
        local: daemon.local,
        dir,
        proc: daemon.proc,
    }
}

/// Start the server of `kind`.
pub fn start(kind: Kind) -> Server {
    match kind {
        Kind::Ours => start_ours(),
        Kind::Daemon => start_daemon(),
    }
}

impl Server {
    /// URL of ticket `id`'s image.
    pub fn url(&self, id: &str) -> String {
        format!("{}{id}", self.base)
    }

    /// A path in the scratch dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A control API request.
    pub fn control(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let mut args = vec![
            "--unix-socket".to_string(),
            self.control.to_string_lossy().into_owned(),
            "-X".into(),
            method.into(),
        ];
        if let Some(b) = body {
            args.push("--data-binary".into());
            args.push(b.into());
        }
        args.push(format!("http://localhost{path}"));
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Install a ticket and assert the server took it.
    pub fn add_ticket(&self, ticket: &Value) {
        let id = ticket["uuid"].as_str().expect("uuid");
        let r = self.control("PUT", &format!("/tickets/{id}"), Some(&ticket.to_string()));
        assert_eq!(r.status, 200, "{:?} PUT ticket: {}", self.kind, r.text());
    }

    /// The ticket status JSON.
    pub fn ticket_status(&self, id: &str) -> Value {
        let r = self.control("GET", &format!("/tickets/{id}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// The daemon's log (empty for ours: it logs to stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM the server and wait for its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.proc.signal(15);
        self.proc.wait_exit(std::time::Duration::from_secs(10))
    }
}

/// A ticket JSON for `path`.
pub fn ticket(id: &str, path: &Path, size: u64, ops: &[&str]) -> Value {
    serde_json::json!({
        "uuid": id,
        "size": size,
        "url": format!("file://{}", path.display()),
        "timeout": 300,
        "ops": ops,
    })
}

/// An HTTP response seen by curl.
#[derive(Debug)]
pub struct Resp {
    /// Status code (0 when no response came).
    pub status: u16,
    /// Headers of the final response, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// curl's exit code (18: body shorter than announced).
    pub exit: i32,
}

impl Resp {
    /// First header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Assert an error status and its one-line text body.
    pub fn assert_error(&self, status: u16, text: &str) {
        assert_eq!(
            (self.status, self.text().trim_end()),
            (status, text),
            "headers: {:?}",
            self.headers
        );
        assert!(
            self.header("content-type")
                .is_some_and(|v| v.starts_with("text/plain")),
            "{:?}",
            self.headers
        );
    }
}

/// Run curl with `args` (plus -s, header and body capture).
pub fn curl(args: &[&str]) -> Resp {
    let dir = tempfile::tempdir().expect("tempdir");
    let hdr = dir.path().join("h");
    let body = dir.path().join("b");
    let out = Command::new("curl")
        .arg("-s")
        .arg("-D")
        .arg(&hdr)
        .arg("-o")
        .arg(&body)
        .args(args)
        .output()
        .expect("run curl");
    let head = std::fs::read_to_string(&hdr).unwrap_or_default();
    // With 100-continue there are several header blocks: keep the last.
    let block = head
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("HTTP/"))
        .last()
        .unwrap_or("");
    let mut lines = block.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
        exit: out.status.code().unwrap_or(-1),
    }
}

/// Run the real imageio Python client (tests/imageio/client.py) and assert
/// it succeeded.
pub fn client(args: &[&str]) -> Output {
    run_ok(
        Command::new(venv_python())
            .arg(repo().join("tests/imageio/client.py"))
            .args(args),
    )
}

/// Allocated bytes of a file (`du`).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A `qemu-nbd` serving a QCOW2 image on a unix socket, started like the
/// engine starts it for `format=raw` transfers (src/engine/qemu.rs);
/// stopped when dropped.
#[derive(Debug)]
pub struct QemuNbd {
    /// The unix socket.
    pub socket: PathBuf,
    proc: Proc,
}

impl QemuNbd {
    /// Serve `image` (qcow2) on `socket` with `--shared=shared`; wait until
    /// it accepts connections.
    pub fn start(image: &Path, socket: &Path, shared: u32) -> QemuNbd {
        let shared = format!("--shared={shared}");
        QemuNbd::start_with(
            image,
            socket,
            &[
                "--format=qcow2",
                shared.as_str(),
                "--persistent",
                "--allocation-depth",
                "--discard=unmap",
            ],
        )
    }

    /// Serve `image` on `socket` with the qemu-nbd options `args`; wait
    /// until it accepts connections.
    pub fn start_with(image: &Path, socket: &Path, args: &[&str]) -> QemuNbd {
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--socket={}", socket.display()))
            .args(args)
            .arg(image);
        let proc = Proc::start("qemu-nbd", cmd);
        wait_until("qemu-nbd listening", START_DEADLINE, || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
        QemuNbd {
            socket: socket.to_path_buf(),
            proc,
        }
    }

    /// The `nbd:unix:` ticket URL of this server.
    pub fn url(&self) -> String {
        format!("nbd:unix:{}", self.socket.display())
    }

    /// The `nbd+unix://` URI for qemu-img and friends.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM qemu-nbd and wait for it to exit.
    pub fn stop(&mut self) {
        self.proc.signal(15);
        self.proc.wait_exit(std::time::Duration::from_secs(10));
    }
}

/// Create an empty QCOW2 image of `size` bytes.
pub fn create_qcow2(path: &Path, size: u64) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string()),
    );
}

/// A ticket JSON for an `nbd:` URL.
pub fn nbd_ticket(id: &str, url: &str, size: u64, ops: &[&str]) -> Value {
    serde_json::json!({
        "uuid": id,
        "size": size,
        "url": url,
        "timeout": 300,
        "ops": ops,
    })
}
