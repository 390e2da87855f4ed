//! The README's main job: `nbdbridge serve --disk NAME --size SIZE` with
//! the embedded engine and data server, driven by qemu-img and nbdcopy
//! (the data server in serve's own process, reached without a socket).

use crate::support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::{Proc, bin, require, run_ok};

/// `serve --data-dir DATA --socket SOCK ARGS`, its stderr in `SOCK.log`.
fn serve(data: &Path, sock: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stderr(std::fs::File::create(log_path(sock)).unwrap());
    Proc::start_announcing("nbdbridge serve (embedded)", cmd)
}

fn log_path(sock: &Path) -> std::path::PathBuf {
    sock.with_extension("log")
}

/// Wait for `serve` on `sock` to exit; assert exit 0 and that it logged
/// the transfer's `finished_success`.
fn assert_finished(mut serve: Proc, sock: &Path, what: &str) {
    let status = serve.wait_exit(Duration::from_secs(60));
    let log = std::fs::read_to_string(log_path(sock)).unwrap_or_default();
    assert!(status.success(), "{what} serve: {status}\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("transfer finished_success ")),
        "{what}: the transfer finished_success:\n{log}"
    );
    // The data server is in serve's process: no socket between them.
    assert!(
        log.lines()
            .any(|l| l.contains("imageio backend ready") && l.contains("in_process=true")),
        "{what}: the backend reached the embedded data server in-process:\n{log}"
    );
}

/// `serve --disk NAME --size SIZE EXTRA` in `dir`, a probe, `qemu-img
/// convert -n -f FORMAT -O raw SRC URI`: serve finalizes and exits 0.
fn upload(data: &Path, dir: &Path, name: &str, size: &str, src: &Path, format: &str) {
    upload_with(data, dir, name, size, src, format, &[]);
}

fn upload_with(
    data: &Path,
    dir: &Path,
    name: &str,
    size: &str,
    src: &Path,
    format: &str,
    extra: &[&str],
) {
    let sock = dir.join(format!("up-{name}.sock"));
    let mut args = vec!["--disk", name, "--size", size];
    args.extend_from_slice(extra);
    let up = serve(data, &sock, &args);
    let uri = up.first_line.clone();
    assert!(uri.starts_with("nbd+unix:///"), "{uri}");
    // A probe does not end the transfer.
    run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", format, "-O", "raw"])
            .arg(src)
            .arg(&uri),
    );
    assert_finished(up, &sock, "upload");
}

/// `serve --disk NAME --direction download` in `dir`: `check` looks at the
/// URI first, then `qemu-img compare -f FORMAT -F raw SRC URI` says
/// identical and serve finalizes and exits 0.
fn download_compare(
    data: &Path,
    dir: &Path,
    name: &str,
    src: &Path,
    format: &str,
    check: impl FnOnce(&str),
) {
    let sock = dir.join(format!("down-{name}.sock"));
    let down = serve(data, &sock, &["--disk", name, "--direction", "download"]);
    let uri = down.first_line.clone();
    check(&uri);
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", format, "-F", "raw"])
            .arg(src)
            .arg(&uri),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    assert_finished(down, &sock, "download");
}

/// Bytes the file really occupies on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The one image file of the embedded data dir.
fn only_image(data: &Path) -> std::path::PathBuf {
    let images: Vec<_> = std::fs::read_dir(data.join("images"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    images.into_iter().next().unwrap()
}

#[test]
fn qcow2_upload_finalizes_and_downloads_identical_with_holes_kept() {
    if !(require("qemu-img") && require("qemu-io") && require("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("src.qcow2");
    support::sparse_qcow2(&src);

    upload(&data, tmp.path(), "demo", "64M", &src, "qcow2");
    let used = allocated(&only_image(&data));
    assert!(
        used < 16 << 20,
        "holes stayed holes: {used} bytes allocated"
    );

    download_compare(&data, tmp.path(), "demo", &src, "qcow2", |uri| {
        let map = run_ok(Command::new("nbdinfo").arg("--map").arg(uri));
        let map = String::from_utf8_lossy(&map.stdout);
        assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
    });
}

/// A raw source of 40 MiB + 1.5 KiB (a multiple of 512, not of 1 MiB):
/// data at both ends, a hole in the middle. The disk gets exactly its
/// size and bytes.
#[test]
fn raw_upload_of_an_odd_size_finalizes_and_downloads_identical() {
    if !(require("qemu-img") && require("nbdinfo")) {
        return;
    }
    const SIZE: usize = (40 << 20) + 3 * 512;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("src.raw");
    let mut bytes = support::pattern(21, 1 << 20);
    bytes.resize(SIZE - (64 << 10) - 1536, 0);
    bytes.extend_from_slice(&support::pattern(22, (64 << 10) + 1536));
    assert_eq!(bytes.len(), SIZE);
    std::fs::write(&src, &bytes).unwrap();

    upload(&data, tmp.path(), "odd", &SIZE.to_string(), &src, "raw");
    let image = only_image(&data);
    assert!(
        std::fs::read(&image).unwrap() == bytes,
        "the disk holds exactly the source"
    );
    assert!(
        allocated(&image) < 8 << 20,
        "the hole stayed a hole: {} bytes allocated",
        allocated(&image)
    );

    download_compare(&data, tmp.path(), "odd", &src, "raw", |uri| {
        let out = run_ok(Command::new("nbdinfo").arg("--size").arg(uri));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            SIZE.to_string(),
            "the disk has the source's size"
        );
    });
}

#[test]
fn a_missing_disk_without_size_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .args(["--disk", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("there is no disk 'nope'") && err.contains("--size"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no URI is printed on failure");
}

/// Under a pseudo-terminal (`script`), serve draws the progress line
/// (bytes / size, rate, phase) and clears it; with stderr in a file there
/// is no progress line, only one log line per phase change.
#[test]
fn progress_line_on_a_terminal_only() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    if !(require("script") && require("qemu-img") && require(support::SYSTEM_PYTHON)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sock = tmp.path().join("tty.sock");
    let typescript = tmp.path().join("tty.out");
    let serve_line = format!(
        "{} serve --data-dir {} --socket {} --disk tty --size 64M",
        bin().display(),
        data.display(),
        sock.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qfec", &serve_line])
        .arg(&typescript)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut tty = Proc::start("script", cmd);
    let shown = || std::fs::read_to_string(&typescript).unwrap_or_default();
    support::wait_until("the URI on the terminal", Duration::from_secs(60), || {
        shown().contains("nbd+unix:///")
    });
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // A client that writes 1 MiB, flushes, then waits for a word to leave
    // with NBD_CMD_DISC.
    let script = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(b'y' * 1048576, 0)\nh.flush()\nprint('ready', flush=True)\n\
         sys.stdin.readline()\nh.shutdown()\n"
    );
    let mut client = std::process::Command::new(support::SYSTEM_PYTHON)
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    support::wait_until("the progress line", Duration::from_secs(30), || {
        shown().contains("\r\x1b[Kupload 1.0 MiB / 64.0 MiB (1%), ")
    });
    let text = shown();
    assert!(text.contains("B/s, transferring"), "{text:?}");
    writeln!(client.stdin.take().unwrap(), "go").unwrap();
    assert!(client.wait().unwrap().success());
    let status = tty.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "serve under a tty: {status}");
    let text = shown();
    let last_draw = text.rfind("upload 1.0 MiB").unwrap();
    assert!(
        text[last_draw..].contains("\r\x1b[K"),
        "the line is cleared after its last draw: {text:?}"
    );

    // Not a terminal: no progress, one line per phase change.
    let log = tmp.path().join("down.log");
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--socket")
        .arg(tmp.path().join("down.sock"))
        .args(["--disk", "tty", "--direction", "download"])
        .stderr(std::fs::File::create(&log).unwrap());
    let mut down = Proc::start_announcing("nbdbridge serve (download)", cmd);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&down.first_line)
            .arg(tmp.path().join("copy.raw")),
    );
    let status = down.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "download serve: {status}");
    let copy = std::fs::read(tmp.path().join("copy.raw")).unwrap();
    assert!(
        copy[..1 << 20].iter().all(|&b| b == b'y'),
        "the upload landed"
    );
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!err.contains('\r') && !err.contains("B/s"), "{err:?}");
    for phase in ["transferring", "finished_success"] {
        let n = err
            .lines()
            .filter(|l| l.contains(&format!("transfer {phase} ")))
            .count();
        assert_eq!(n, 1, "one line for {phase}:\n{err}");
    }
}

/// A QCOW2 disk (`--format cow`) on the embedded host: the transfer moves
/// guest data through the engine's qemu-nbd behind an `nbd:unix:` ticket of
/// the embedded data server; the disk stays a valid QCOW2 holding exactly
/// the source's guest data.
#[test]
fn cow_disk_upload_goes_through_qemu_nbd_and_stays_qcow2() {
    if !(require("qemu-img") && require("qemu-io") && require("qemu-nbd") && require("nbdinfo")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let src = tmp.path().join("src.qcow2");
    support::sparse_qcow2(&src);

    upload_with(
        &data,
        tmp.path(),
        "cowdisk",
        "64M",
        &src,
        "qcow2",
        &["--format", "cow"],
    );
    let image = only_image(&data);
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&image),
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 64 << 20, "{info}");
    assert!(info.get("backing-filename").is_none(), "{info}");
    run_ok(Command::new("qemu-img").args(["check", "-q"]).arg(&image));
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&src)
            .arg(&image),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));

    download_compare(&data, tmp.path(), "cowdisk", &src, "qcow2", |_| {});
}

/// The embedded default as a user meets a paused upload: a writer vanishes
/// (paused), SIGINT ends serve and prints the command that resumes it;
/// `serve --disk` on the held disk names the transfer and that command
/// instead of a bare 409; the printed command, run verbatim from another
/// directory, serves the transfer again (`--transfer ID` without
/// `--engine-url`) and nbdcopy completes it.
#[test]
fn a_paused_upload_is_named_and_resumed_verbatim() {
    if !(require("nbdcopy") && require(support::SYSTEM_PYTHON)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sock = tmp.path().join("held.sock");
    let src = tmp.path().join("src.raw");
    let mut bytes = support::pattern(3, 8 << 20);
    bytes.resize(64 << 20, 0);
    std::fs::write(&src, &bytes).unwrap();

    let mut up = serve(&data, &sock, &["--disk", "held", "--size", "64M"]);
    let script = format!(
        "import nbd, os\nh = nbd.NBD()\nh.connect_uri({:?})\n\
         h.pwrite(b'x' * 65536, 0)\nos._exit(0)\n",
        up.first_line
    );
    run_ok(Command::new(support::SYSTEM_PYTHON).arg("-c").arg(&script));
    support::wait_until("paused", Duration::from_secs(60), || {
        std::fs::read_to_string(log_path(&sock))
            .unwrap_or_default()
            .contains("transfer paused_user")
    });
    up.signal(2);
    let status = up.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "an interrupted upload exits non-zero");
    let log = std::fs::read_to_string(log_path(&sock)).unwrap();
    let resume = log
        .lines()
        .find_map(|l| l.split("resume it with: ").nth(1))
        .unwrap_or_else(|| panic!("no resume command:\n{log}"))
        .trim()
        .to_string();

    // The first command line but its target (the resume command keeps
    // `--socket`, so another socket would name another command).
    let again = support::output_within(
        Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--socket")
            .arg(&sock)
            .args(["--disk", "held"]),
        Duration::from_secs(60),
    );
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("is held by upload transfer") && err.contains(&resume),
        "names the transfer and the command: {err}\nwant: {resume}"
    );
    assert!(again.stdout.is_empty(), "no URI");

    let elsewhere = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&resume).current_dir(elsewhere.path());
    let mut resumed = Proc::start_announcing("the printed resume command", cmd);
    run_ok(Command::new("nbdcopy").arg(&src).arg(&resumed.first_line));
    let status = resumed.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "resumed serve: {status}");
    assert!(
        std::fs::read(only_image(&data)).unwrap() == bytes,
        "the disk holds exactly the source"
    );
}
