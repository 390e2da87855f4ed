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
