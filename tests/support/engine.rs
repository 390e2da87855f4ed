//! Engine test helpers: a real ovirt-imageio daemon with a private config,
//! `nbdbridge engine` registered with it, and the SDK scripts in
//! `tests/python/` run with the test venv's python.

use super::{Proc, bin, repo, require, run_ok, venv_python, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Whether the venv (SDK + imageio) and qemu tools are there; skips
/// locally, fails under CI.
pub fn have_tools() -> bool {
    let venv = venv_python();
    let imageio = repo().join(".venv/bin/ovirt-imageio");
    require(&venv.to_string_lossy())
        && require(&imageio.to_string_lossy())
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
    _proc: Proc,
}

impl Imageio {
    /// Start the daemon with a private config in `dir` (IMAGEIO-API.md 1).
    pub fn start(dir: &Path) -> Imageio {
        let conf = dir.join("conf.d");
        std::fs::create_dir_all(&conf).unwrap();
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let log = dir.join("daemon.log");
        let control = run.join("control.sock");
        std::fs::write(
            conf.join("99-test.conf"),
            format!(
                "[daemon]\ndrop_privileges = false\nsystemd_enable = false\nrun_dir = {run}\n\n\
                 [tls]\nenable = false\n\n[remote]\nhost = 127.0.0.1\nport = 0\n\n\
                 [local]\nenable = true\nsocket = {run}/local.sock\n\n\
                 [control]\ntransport = unix\nsocket = {control}\n\n\
                 [handler_logfile]\nargs = ('{log}',)\n",
                run = run.display(),
                control = control.display(),
                log = log.display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(repo().join(".venv/bin/ovirt-imageio"));
        cmd.arg("-c").arg(dir);
        let proc = Proc::start("ovirt-imageio", cmd);
        let mut port = None;
        wait_until("ovirt-imageio ready", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if port.is_none() {
                port = text
                    .lines()
                    .find_map(|l| l.split("remote.service listening on ('127.0.0.1', ").nth(1))
                    .and_then(|rest| rest.split(')').next())
                    .and_then(|p| p.parse::<u16>().ok());
            }
            port.is_some() && text.contains("Ready for requests")
        });
        let port = port.unwrap();
        Imageio {
            control,
            data_url: format!("http://127.0.0.1:{port}"),
            _proc: proc,
        }
    }

    /// `NAME=CONTROL,DATA_URL` for `--host`.
    pub fn host_arg(&self, name: &str) -> String {
        format!("{name}={},{}", self.control.display(), self.data_url)
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

/// A temp dir with a real imageio daemon registered as host `h1` of an
/// engine, and a work dir for the scripts.
#[derive(Debug)]
pub struct Setup {
    /// The engine (stopped on drop, before the daemon).
    pub engine: Engine,
    /// The daemon.
    pub imageio: Imageio,
    /// Scratch files of the scripts.
    pub work: String,
    /// The engine's password file.
    pub password_file: String,
    /// The engine's data dir.
    pub data: PathBuf,
    /// Everything lives here.
    pub tmp: tempfile::TempDir,
}

impl Setup {
    /// Start the daemon and the engine (with `more_hosts` and `extra`
    /// engine arguments).
    pub fn start(more_hosts: &[String], extra: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let imageio = Imageio::start(&tmp.path().join("imageio"));
        let data = tmp.path().join("engine");
        let mut hosts = vec![imageio.host_arg("h1")];
        hosts.extend_from_slice(more_hosts);
        let engine = Engine::start(&data, &hosts, extra);
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        Setup {
            password_file: engine.password_file.to_string_lossy().into_owned(),
            work: work.to_string_lossy().into_owned(),
            engine,
            imageio,
            data,
            tmp,
        }
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
