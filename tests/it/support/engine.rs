//! Engine test helpers: `nbdbridge engine` with either kind of host (its
//! embedded data server, or a real ovirt-imageio daemon registered with
//! `--host`), and the SDK scripts in `tests/python/` run with the test
//! venv's python.

use super::imageio::{Daemon, daemon_bin, launch_daemon};
use super::{Proc, bin, repo, require, run_ok, venv_python};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Whether the venv (SDK + imageio) and qemu tools are there; skips
/// locally, fails under CI.
pub fn have_tools() -> bool {
    let venv = venv_python();
    require(&venv.to_string_lossy())
        && require(&daemon_bin().to_string_lossy())
        && require("qemu-img")
        && require("qemu-nbd")
}

/// A real ovirt-imageio daemon running as a plain process.
#[derive(Debug)]
pub struct Imageio {
    /// Its ticket control socket.
    pub control: PathBuf,
    /// Its data URL, `http://127.0.0.1:PORT`.
    pub data_url: String,
    daemon: Daemon,
}

impl Imageio {
    /// Start the daemon with a private config in `dir`.
    pub fn start(dir: &Path) -> Imageio {
        let daemon = launch_daemon(dir);
        Imageio {
            control: daemon.control.clone(),
            data_url: format!("http://127.0.0.1:{}", daemon.port),
            daemon,
        }
    }

    /// `NAME=CONTROL,DATA_URL` for `--host`.
    pub fn host_arg(&self, name: &str) -> String {
        format!("{name}={},{}", self.control.display(), self.data_url)
    }

    /// Kill the daemon (SIGKILL) and wait until it is gone.
    pub fn kill(&mut self) {
        self.daemon.proc.signal(9);
        self.daemon.proc.wait_exit(Duration::from_secs(10));
    }
}

/// Which data server carries the bytes of an engine's transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// The engine's embedded data server (the engine runs without
    /// `--host`).
    Embedded,
    /// A real ovirt-imageio daemon registered as `--host h1=...`.
    Daemon,
}

impl HostKind {
    /// The name of the host that carries the transfers.
    pub fn host_name(self) -> &'static str {
        match self {
            HostKind::Embedded => "embedded",
            HostKind::Daemon => "h1",
        }
    }
}

/// `nbdbridge engine` on 127.0.0.1:0.
#[derive(Debug)]
pub struct Engine {
    /// The API URL it announced.
    pub url: String,
    /// The admin password file.
    pub password_file: PathBuf,
    /// The process.
    pub proc: Proc,
}

impl Engine {
    /// Start the engine on `data_dir` with `hosts` (`--host` values) and
    /// extra arguments.
    pub fn start(data_dir: &Path, hosts: &[String], extra: &[&str]) -> Engine {
        let mut cmd = Command::new(bin());
        cmd.arg("engine")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0");
        for h in hosts {
            cmd.arg("--host").arg(h);
        }
        cmd.args(extra);
        let proc = Proc::start_announcing("nbdbridge engine", cmd);
        let url = proc.first_line.clone();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.ends_with("/ovirt-engine/api"),
            "bad contract line {url:?}"
        );
        Engine {
            url,
            password_file: data_dir.join("password"),
            proc,
        }
    }
}

impl Engine {
    /// The admin password (first line of the password file).
    pub fn password(&self) -> String {
        let text = std::fs::read_to_string(&self.password_file).unwrap();
        text.lines().next().unwrap_or("").to_string()
    }

    /// Log in as admin@internal; the bearer token.
    pub fn token(&self) -> String {
        let (status, _, body) = login(&self.url, &self.password());
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["access_token"].as_str().unwrap().to_string()
    }

    /// `POST /disks` with the XML `body`; asserts 201, the new disk's id.
    pub fn add_disk(&self, token: &str, body: &str) -> String {
        let (status, _, reply) = http(
            &self.url,
            "POST",
            "/ovirt-engine/api/disks",
            Some(token),
            "application/xml",
            body.as_bytes(),
        );
        assert_eq!(status, 201, "{reply}");
        first_id(&reply).unwrap().to_string()
    }
}

/// The SSO password grant for admin@internal with `password` (already
/// form-encoded): (status, content type, body).
pub fn login(url: &str, password: &str) -> (u16, String, String) {
    let body = format!(
        "grant_type=password&scope=ovirt-app-api&username=admin%40internal&password={password}"
    );
    http(
        url,
        "POST",
        "/ovirt-engine/sso/oauth/token",
        None,
        "application/x-www-form-urlencoded",
        body.as_bytes(),
    )
}

/// Run `tests/python/NAME` with the venv python; its stdout.
pub fn run_script(name: &str, args: &[&str]) -> String {
    let script = repo().join("tests/python").join(name);
    let out = run_ok(Command::new(venv_python()).arg(script).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One HTTP/1.1 exchange (Connection: close) with the engine at `url`'s
/// host: (status, content type, body).
pub fn http(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let hostport = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\
         Version: 4\r\nAccept: application/xml\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A peer may answer (413) before reading a large body and close.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// The text of the first `<name>` element in `xml`.
pub fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(&xml[start..end])
}

/// The first `id="..."` attribute in `xml`.
pub fn first_id(xml: &str) -> Option<&str> {
    let start = xml.find(" id=\"")? + 5;
    let end = xml[start..].find('"')? + start;
    Some(&xml[start..end])
}

/// A temp dir with an engine whose transfers go to a host of `kind`, and
/// a work dir for the scripts.
#[derive(Debug)]
pub struct Setup {
    /// Which host carries the transfers.
    pub kind: HostKind,
    /// The engine (stopped on drop, before the daemon).
    pub engine: Engine,
    /// The daemon, for [`HostKind::Daemon`].
    pub imageio: Option<Imageio>,
    /// Scratch files of the scripts.
    pub work: String,
    /// The engine's password file.
    pub password_file: String,
    /// The engine's data dir.
    pub data: PathBuf,
    /// Everything lives here.
    pub tmp: tempfile::TempDir,
    hosts: Vec<String>,
    extra: Vec<String>,
}

impl Setup {
    /// A real daemon registered as host `h1` (the default host), with
    /// `more_hosts` and `extra` engine arguments.
    pub fn start(more_hosts: &[String], extra: &[&str]) -> Setup {
        Setup::on_host(HostKind::Daemon, more_hosts, extra)
    }

    /// Start the daemon (for [`HostKind::Daemon`]) and the engine, with
    /// `more_hosts` registered after it and `extra` engine arguments.
    /// Scripts name the host they use ([`HostKind::host_name`]), since a
    /// `--host` becomes the default host.
    pub fn on_host(kind: HostKind, more_hosts: &[String], extra: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let imageio = match kind {
            HostKind::Embedded => None,
            HostKind::Daemon => Some(Imageio::start(&tmp.path().join("imageio"))),
        };
        let data = tmp.path().join("engine");
        let mut hosts: Vec<String> = imageio
            .iter()
            .map(|d| d.host_arg(kind.host_name()))
            .collect();
        hosts.extend_from_slice(more_hosts);
        let engine = Engine::start(&data, &hosts, extra);
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        Setup {
            kind,
            password_file: engine.password_file.to_string_lossy().into_owned(),
            work: work.to_string_lossy().into_owned(),
            engine,
            imageio,
            data,
            tmp,
            hosts,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The name of the host that carries the transfers.
    pub fn host(&self) -> &'static str {
        self.kind.host_name()
    }

    /// Kill the engine (SIGKILL: no chance to clean up) and start it again
    /// on the same data dir, hosts and arguments. With the embedded host,
    /// its data server dies and comes back with it.
    pub fn restart_engine(&mut self) {
        self.engine.proc.signal(9);
        self.engine.proc.wait_exit(Duration::from_secs(10));
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.engine = Engine::start(&self.data, &self.hosts, &extra);
    }

    /// Run `script` with API_URL PASSWORD_FILE, then `args`; assert every
    /// line of `expect` is in its output.
    pub fn run(&self, script: &str, args: &[&str], expect: &[&str]) -> String {
        let mut all = vec![self.engine.url.as_str(), self.password_file.as_str()];
        all.extend_from_slice(args);
        let out = run_script(script, &all);
        for step in expect {
            assert!(out.contains(step), "missing {step:?} in:\n{out}");
        }
        out
    }
}

/// Whether process `pid` has exited (gone, or a zombie not reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

impl Drop for Setup {
    /// Stop the engine, then any qemu-nbd it left: the engine keeps them
    /// running when it stops (a restarted engine takes them over), so a
    /// test that failed mid-transfer would leak them.
    fn drop(&mut self) {
        let pid = self.engine.proc.pid();
        if pid == 0 {
            return;
        }
        self.engine.proc.signal(15);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !exited(pid) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let Ok(run) = std::fs::read_dir(self.data.join("run")) else {
            return;
        };
        let data = self.data.to_string_lossy().into_owned();
        for entry in run.flatten() {
            if entry.path().extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(nbd) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            else {
                continue;
            };
            // Only a qemu-nbd serving this data dir (pids get reused).
            let cmdline = std::fs::read(format!("/proc/{nbd}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("qemu-nbd") && cmdline.contains(&data) {
                let _ = Command::new("kill").arg(nbd.to_string()).status();
            }
        }
    }
}
