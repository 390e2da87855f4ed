//! serve's decisions in the flows people run, with real clients, on both
//! kinds of data server (ours, `nbdbridge imageio`, and the real
//! ovirt-imageio daemon), each behind a fault-injecting HTTP proxy and
//! registered as the host of `nbdbridge engine`:
//! - a probe after a vanished writer does not finalize; nbdcopy with its
//!   defaults (no --flush) completes the upload;
//! - a download survives `qemu-img info` and `nbdinfo --map` and ends after
//!   the copy;
//! - one of nbdcopy's connections cut mid-upload pauses it; a rerun
//!   completes it;
//! - a FLUSH that fails at the data server, the client's or serve's own,
//!   never leads to finalize;
//! - `--run` in both directions, and with a failing command;
//! - SIGHUP, `--exit-with-parent` with `--pid-file`, and the printed resume
//!   command run verbatim.

use crate::support;

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::api::Api;
use support::engine::{Engine, have_tools};
use support::imageio::Kind;
use support::proxy::{HttpFaults, NbdRelay};
use support::{Proc, bin, output_within, pattern, require, run_ok, wait_until};

const SIZE: u64 = 64 << 20;
const EXIT: Duration = Duration::from_secs(90);
const CLIENT: Duration = Duration::from_secs(120);

/// A data server of `kind` behind a fault proxy, registered as host `h1`
/// of an engine.
struct Bed {
    api: Api,
    proxy: HttpFaults,
    dir: tempfile::TempDir,
    data: PathBuf,
    // Dropped last: the engine first, then the data server.
    _engine: Engine,
    _server: support::imageio::Server,
}

impl Bed {
    fn start(kind: Kind) -> Bed {
        let server = support::imageio::start(kind);
        let upstream: SocketAddr = server
            .base
            .trim_start_matches("http://")
            .trim_end_matches("/images/")
            .parse()
            .unwrap();
        let proxy = HttpFaults::start(upstream);
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("engine");
        let host = format!(
            "h1={},{}",
            server.control.display(),
            proxy.images_url().trim_end_matches("/images/")
        );
        let engine = Engine::start(&data, &[host], &[]);
        let api = Api {
            url: engine.url.clone(),
            password_file: engine.password_file.to_string_lossy().into_owned(),
        };
        Bed {
            api,
            proxy,
            dir,
            data,
            _engine: engine,
            _server: server,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `serve --engine-url … ARGS` on socket `NAME.sock`, stderr in
    /// `NAME.log`.
    fn serve(&self, name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args(["--engine-url", &self.api.url])
            .args(["--password-file", &self.api.password_file])
            .arg("--socket")
            .arg(self.path(&format!("{name}.sock")))
            .args(args)
            .stderr(std::fs::File::create(self.path(&format!("{name}.log"))).unwrap());
        Proc::start_announcing("nbdbridge serve", cmd)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    fn phase(&self, disk: &str) -> String {
        self.api.phase_of_disk_transfer(disk).unwrap_or_default()
    }

    fn wait_phase(&self, disk: &str, phase: &str) {
        wait_until(phase, EXIT, || self.phase(disk) == phase);
    }

    fn image(&self, disk: &str) -> PathBuf {
        self.data.join("images").join(disk)
    }

    /// A new raw disk of SIZE and a sparse source file with data in three
    /// places.
    fn disk_and_source(&self, name: &str) -> (String, PathBuf) {
        let disk = self.api.new_disk(name, "raw", SIZE);
        let src = self.path(&format!("{name}.raw"));
        write_sparse(&src);
        (disk, src)
    }
}

/// SIZE bytes, data at 0 (8 MiB), 40 MiB (4 KiB) and the last 64 KiB.
fn write_sparse(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&pattern(7, 8 << 20), 0).unwrap();
    f.write_all_at(&pattern(9, 4096), 40 << 20).unwrap();
    f.write_all_at(&pattern(5, 64 << 10), SIZE - (64 << 10))
        .unwrap();
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn ok(cmd: &mut Command) -> std::process::Output {
    let out = output_within(cmd, CLIENT);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(cmd: &mut Command) -> std::process::Output {
    let out = output_within(cmd, CLIENT);
    assert!(!out.status.success(), "{cmd:?} was expected to fail");
    out
}

/// A libnbd client that writes 1 MiB, flushes and dies without DISC.
fn vanishing_writer(uri: &str) {
    let script = format!(
        "import nbd, os\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'x' * (1 << 20), 0)\nh.flush()\nos._exit(0)\n"
    );
    run_ok(Command::new(support::SYSTEM_PYTHON).arg("-c").arg(&script));
}

/// A libnbd client that writes, says `ready` and stays connected.
fn lingering_client(uri: &str) -> Proc {
    let script = format!(
        "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'x' * 65536, 0)\nprint('ready', flush=True)\ntime.sleep(300)\n"
    );
    let mut cmd = Command::new(support::SYSTEM_PYTHON);
    cmd.arg("-c").arg(script);
    let p = Proc::start_announcing("libnbd client", cmd);
    assert_eq!(p.first_line, "ready");
    p
}

fn tools() -> bool {
    have_tools() && require("nbdcopy") && require("nbdinfo")
}

fn finished(bed: &Bed, bridge: &mut Proc, name: &str, disk: &str) {
    let status = bridge.wait_exit(EXIT);
    assert!(status.success(), "serve: {status}\n{}", bed.log(name));
    assert_eq!(bed.phase(disk), "finished_success", "{}", bed.log(name));
}

/// Issue reproduction 1 and 3: a writer vanishes (paused), nbdinfo probes
/// (resumed, paused again: never finalized), serve keeps running; then the
/// README's `nbdcopy SRC "$URI"`, without --flush, completes the upload.
fn probe_after_a_vanished_writer_pauses_again(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, src) = bed.disk_and_source("probe");
    let mut bridge = bed.serve("probe", &["--disk", &disk]);
    let uri = bridge.first_line.clone();
    vanishing_writer(&uri);
    bed.wait_phase(&disk, "paused_user");
    ok(Command::new("nbdinfo").arg(&uri));
    wait_until("paused again after the probe", EXIT, || {
        bed.log("probe").contains("wrote nothing") && bed.phase(&disk) == "paused_user"
    });
    assert!(
        bridge.running(),
        "serve keeps listening:\n{}",
        bed.log("probe")
    );
    assert!(
        !bed.log("probe").contains("finalized"),
        "{}",
        bed.log("probe")
    );

    ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    finished(&bed, &mut bridge, "probe", &disk);
    assert!(same(&src, &bed.image(&disk)), "the disk holds the source");
}

/// Issue reproduction 2: `qemu-img info`, then `nbdinfo --map`, then
/// `qemu-img convert` of a download all succeed; the transfer is finalized
/// after the convert; the bytes are identical.
fn download_survives_probes_and_ends_after_the_copy(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, src) = bed.disk_and_source("down");
    std::fs::copy(&src, bed.image(&disk)).unwrap();
    let mut bridge = bed.serve("down", &["--disk", &disk, "--direction", "download"]);
    let uri = bridge.first_line.clone();
    ok(Command::new("qemu-img").args(["info", &uri]));
    ok(Command::new("nbdinfo").args(["--map", &uri]));
    wait_until("coverage logged", EXIT, || {
        bed.log("down").contains("keep serving")
    });
    assert!(
        bridge.running(),
        "probes do not end a download:\n{}",
        bed.log("down")
    );
    assert_eq!(bed.phase(&disk), "transferring");
    let out = bed.path("out.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&out));
    finished(&bed, &mut bridge, "down", &disk);
    assert!(same(&src, &out), "the copy is identical");
}

/// nbdcopy with 4 connections through a relay that cuts one of them
/// mid-upload: nbdcopy fails, the upload pauses; a rerun completes it.
fn one_cut_connection_pauses_and_a_rerun_completes(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, src) = bed.disk_and_source("cut");
    let mut bridge = bed.serve("cut", &["--disk", &disk]);
    let uri = bridge.first_line.clone();
    let relay = NbdRelay::start(&bed.path("relay.sock"), &bed.path("cut.sock"));
    relay.cut(2 << 20);
    fails(
        Command::new("nbdcopy")
            .args(["--connections=4", "--request-size=262144"])
            .arg(&src)
            .arg(relay.uri()),
    );
    assert_eq!(relay.cuts(), 1, "the relay cut one connection");
    bed.wait_phase(&disk, "paused_user");
    assert!(bridge.running());
    let log = bed.log("cut");
    assert!(
        log.contains("vanished") || log.contains("protocol error") || log.contains("failed"),
        "the pause names its reason:\n{log}"
    );
    ok(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&src)
        .arg(&uri));
    finished(&bed, &mut bridge, "cut", &disk);
    assert!(same(&src, &bed.image(&disk)));
}

/// A FLUSH that fails at the data server never leads to finalize: the
/// client's own (nbdcopy --flush fails, the upload pauses), then serve's final
/// flush after nbdcopy (pauses again); a clean rerun finalizes.
fn a_failed_flush_never_finalizes(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, src) = bed.disk_and_source("flush");
    let mut bridge = bed.serve("flush", &["--disk", &disk]);
    let uri = bridge.first_line.clone();

    // The client's own FLUSH fails (nbdcopy --flush sends one at the end
    // and reports it; qemu-img convert writes with cache=unsafe and sends
    // none).
    bed.proxy.fail("PATCH", "flush", 1);
    fails(Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri));
    assert_eq!(bed.proxy.injected(), 1, "the flush was refused");
    bed.wait_phase(&disk, "paused_user");
    assert!(bridge.running(), "{}", bed.log("flush"));

    // nbdcopy sends no FLUSH: serve's own flush fails now.
    bed.proxy.fail("PATCH", "flush", 1);
    ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    wait_until("serve's flush refused", EXIT, || bed.proxy.injected() == 2);
    wait_until("paused again", EXIT, || {
        bed.log("flush")
            .contains("serve's flush of the data server failed")
            && bed.phase(&disk) == "paused_user"
    });
    assert!(bridge.running(), "{}", bed.log("flush"));

    ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    finished(&bed, &mut bridge, "flush", &disk);
    assert!(same(&src, &bed.image(&disk)));
}

/// `--run` uploads with qemu-img and nbdcopy (exit 0, finalized,
/// identical); a failing command pauses the upload and serve exits with
/// its status.
fn run_uploads(kind: Kind) {
    let bed = Bed::start(kind);
    for (name, cmd) in [
        (
            "run-qemu",
            "qemu-img convert -n -f raw -O raw \"$SRC\" \"$uri\"",
        ),
        ("run-copy", "nbdcopy \"$SRC\" \"$uri\""),
    ] {
        let (disk, src) = bed.disk_and_source(name);
        let out = output_within(
            Command::new(bin())
                .arg("serve")
                .args(["--engine-url", &bed.api.url])
                .args(["--password-file", &bed.api.password_file])
                .arg("--socket")
                .arg(bed.path(&format!("{name}.sock")))
                .args(["--disk", &disk, "--run", cmd])
                .env("SRC", &src),
            CLIENT,
        );
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(bed.phase(&disk), "finished_success");
        assert!(same(&src, &bed.image(&disk)), "{name}");
    }
    let (disk, src) = bed.disk_and_source("run-fail");
    let out = output_within(
        Command::new(bin())
            .arg("serve")
            .args(["--engine-url", &bed.api.url])
            .args(["--password-file", &bed.api.password_file])
            .arg("--socket")
            .arg(bed.path("run-fail.sock"))
            .args([
                "--disk",
                &disk,
                "--run",
                "nbdcopy \"$SRC\" \"$uri\" && exit 3",
            ])
            .env("SRC", &src),
        CLIENT,
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bed.phase(&disk), "paused_user");
}

/// `--run` downloads with nbdcopy and qemu-img: finalized, identical.
fn run_downloads(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, src) = bed.disk_and_source("rundown");
    std::fs::copy(&src, bed.image(&disk)).unwrap();
    for (i, cmd) in [
        "nbdcopy \"$uri\" \"$OUT\"",
        "qemu-img info \"$uri\" && qemu-img convert -f raw -O raw \"$uri\" \"$OUT\"",
    ]
    .iter()
    .enumerate()
    {
        let out_file = bed.path(&format!("out{i}.raw"));
        let out = output_within(
            Command::new(bin())
                .arg("serve")
                .args(["--engine-url", &bed.api.url])
                .args(["--password-file", &bed.api.password_file])
                .arg("--socket")
                .arg(bed.path(&format!("rundown{i}.sock")))
                .args(["--disk", &disk, "--direction", "download", "--run", cmd])
                .env("OUT", &out_file),
            CLIENT,
        );
        assert!(
            out.status.success(),
            "{cmd}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(bed.phase(&disk), "finished_success");
        assert!(same(&src, &out_file), "{cmd}");
    }
}

/// SIGHUP pauses an upload and prints the command that resumes it; that
/// command, run verbatim through a shell, serves the transfer again and
/// nbdcopy completes it.
fn sighup_pauses_and_the_printed_command_resumes(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, src) = bed.disk_and_source("hup");
    let mut bridge = bed.serve("hup", &["--disk", &disk]);
    let client = lingering_client(&bridge.first_line);
    bridge.signal(libc_sighup());
    let status = bridge.wait_exit(EXIT);
    drop(client);
    assert!(!status.success(), "SIGHUP exits non-zero");
    assert_eq!(bed.phase(&disk), "paused_user");
    let log = bed.log("hup");
    let resume = log
        .lines()
        .find_map(|l| l.split("resume it with: ").nth(1))
        .unwrap_or_else(|| panic!("no resume command in:\n{log}"))
        .trim()
        .to_string();
    assert!(resume.contains("--transfer"), "{resume}");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&resume);
    let mut again = Proc::start_announcing("the printed resume command", cmd);
    ok(Command::new("nbdcopy").arg(&src).arg(&again.first_line));
    let status = again.wait_exit(EXIT);
    assert!(status.success(), "resumed serve: {status}");
    assert_eq!(bed.phase(&disk), "finished_success");
    assert!(same(&src, &bed.image(&disk)));
}

fn libc_sighup() -> i32 {
    1
}

/// `--exit-with-parent`: serve's parent dies, serve pauses the upload,
/// removes its `--pid-file` and exits.
fn exit_with_parent_pauses(kind: Kind) {
    let bed = Bed::start(kind);
    let (disk, _src) = bed.disk_and_source("orphan");
    let pid_file = bed.path("serve.pid");
    let script = format!(
        "{bin} serve --engine-url {url} --password-file {pw} --socket {sock} --disk {disk} \
         --exit-with-parent --pid-file {pid} 2>{log} & exec sleep 600",
        bin = bin().display(),
        url = bed.api.url,
        pw = bed.api.password_file,
        sock = bed.path("orphan.sock").display(),
        pid = pid_file.display(),
        log = bed.path("orphan.log").display(),
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&script);
    let mut parent = Proc::start("serve's parent", cmd);
    wait_until("pid file", EXIT, || pid_file.exists());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uri = format!("nbd+unix:///?socket={}", bed.path("orphan.sock").display());
    let client = lingering_client(&uri);
    parent.signal(9);
    parent.wait_exit(EXIT);
    wait_until("serve exited", EXIT, || {
        !Path::new(&format!("/proc/{pid}")).exists() || zombie(pid)
    });
    drop(client);
    assert_eq!(bed.phase(&disk), "paused_user", "{}", bed.log("orphan"));
    assert!(!pid_file.exists(), "the pid file is removed");
    assert!(
        bed.log("orphan").contains("SIGTERM"),
        "{}",
        bed.log("orphan")
    );
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

macro_rules! on_both_data_servers {
    ($($name:ident),+ $(,)?) => {
        mod ours {
            $(#[test] fn $name() { if super::tools() { super::$name(super::Kind::Ours) } })+
        }
        mod daemon {
            $(#[test] fn $name() { if super::tools() { super::$name(super::Kind::Daemon) } })+
        }
    };
}

on_both_data_servers!(
    probe_after_a_vanished_writer_pauses_again,
    download_survives_probes_and_ends_after_the_copy,
    one_cut_connection_pauses_and_a_rerun_completes,
    a_failed_flush_never_finalizes,
    run_uploads,
    run_downloads,
    sighup_pauses_and_the_printed_command_resumes,
    exit_with_parent_pauses,
);
