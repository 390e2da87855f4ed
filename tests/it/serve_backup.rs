//! `nbdbridge serve --backup VM` on the embedded default (a VM of the
//! embedded engine, made through its REST API by `nbdbridge engine` on the
//! same data dir, which is then stopped) and with `--engine-url` (an
//! engine whose host is the real ovirt-imageio daemon): the VM's disks
//! filled through `serve --disk`, backed up by serve and copied by real
//! clients from one NBD server with one export per disk.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::api::Api;
use support::engine::{Engine, Imageio, element, first_id};
use support::{Proc, bin, require, run_ok, wait_until};

const MIB: usize = 1 << 20;
/// The QCOW2 disk enabled for incremental backup.
const COW_SIZE: usize = 16 * MIB;
/// The raw disk (full backups only).
const RAW_SIZE: usize = 8 * MIB;
const VM: &str = "vm-bk";

fn have_tools() -> bool {
    require("qemu-img") && require("qemu-nbd") && require("qemu-io") && require("nbdinfo")
}

/// `nbdbridge engine` on `data`, and its API.
fn engine(data: &Path) -> (Engine, Api) {
    let engine = Engine::start(data, &[], &[]);
    let api = Api {
        url: engine.url.clone(),
        password_file: engine.password_file.to_string_lossy().into_owned(),
    };
    (engine, api)
}

/// Stop the engine (SIGTERM) so that serve's embedded one can open the
/// data dir.
fn stop(mut engine: Engine) {
    engine.proc.signal(15);
    let status = engine.proc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "engine exit: {status}");
}

/// qemu-nbd processes the engines started on `data`, killed at the end
/// (an engine that stops keeps those of open transfers running).
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let Ok(run) = std::fs::read_dir(self.0.join("run")) else {
            return;
        };
        let data = self.0.to_string_lossy().into_owned();
        for entry in run.flatten() {
            if entry.path().extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("qemu-nbd") && cmdline.contains(&data) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

/// Create a disk and wait until it is `ok`; its id.
fn new_disk(api: &Api, alias: &str, format: &str, size: usize, incremental: bool) -> String {
    let backup = if incremental {
        "<backup>incremental</backup>"
    } else {
        ""
    };
    let (status, xml) = api.call(
        "POST",
        "/disks",
        &format!(
            "<disk><alias>{alias}</alias>{backup}<format>{format}</format>\
             <provisioned_size>{size}</provisioned_size></disk>"
        ),
    );
    assert!((200..300).contains(&status), "add disk: {status} {xml}");
    let id = first_id(&xml).unwrap().to_string();
    wait_until("disk ok", Duration::from_secs(30), || {
        element(&api.call("GET", &format!("/disks/{id}"), "").1, "status") == Some("ok")
    });
    id
}

/// Create VM `name` with `disks` attached; its id.
fn new_vm(api: &Api, name: &str, disks: &[&str]) -> String {
    let (status, xml) = api.call(
        "POST",
        "/vms",
        &format!(
            "<vm><name>{name}</name><cluster><name>Default</name></cluster>\
             <template><name>Blank</name></template></vm>"
        ),
    );
    assert!((200..300).contains(&status), "add vm: {status} {xml}");
    let id = first_id(&xml).unwrap().to_string();
    for disk in disks {
        let (status, xml) = api.call(
            "POST",
            &format!("/vms/{id}/diskattachments"),
            &format!(
                "<disk_attachment><active>true</active><bootable>false</bootable>\
                 <interface>virtio_scsi</interface><disk id=\"{disk}\"/></disk_attachment>"
            ),
        );
        assert!(
            (200..300).contains(&status),
            "attach {disk}: {status} {xml}"
        );
    }
    id
}

/// `serve --engine-url` for `disk` (an upload), with `client` run on its
/// URI; serve must finalize and exit 0.
fn upload_with(api: &Api, dir: &Path, disk: &str, client: impl FnOnce(&str)) {
    let sock = dir.join(format!("up-{}.sock", &disk[..8]));
    let log = sock.with_extension("log");
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--engine-url", &api.url, "--password-file"])
        .arg(&api.password_file)
        .args(["--disk", disk, "--socket"])
        .arg(&sock)
        .stderr(std::fs::File::create(&log).unwrap());
    let mut up = Proc::start_announcing("nbdbridge serve (upload)", cmd);
    client(up.first_line.as_str());
    let status = up.wait_exit(Duration::from_secs(60));
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "upload serve: {status}\n{log}");
}

/// Upload the raw image `src` into `disk` with `qemu-img convert`.
fn upload(api: &Api, dir: &Path, disk: &str, src: &Path) {
    upload_with(api, dir, disk, |uri| {
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(src)
                .arg(uri),
        );
    });
}

/// A raw image of `size` bytes: `data` written at each offset, zero
/// elsewhere.
fn image(path: &Path, size: usize, data: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    for (offset, d) in data {
        bytes[*offset..offset + d.len()].copy_from_slice(d);
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// `serve --backup VM EXTRA` on the embedded default over `data`.
struct Backup {
    serve: Proc,
    log: PathBuf,
    uri: String,
    backup: String,
    /// Disk id -> its export's URI.
    disks: BTreeMap<String, String>,
}

impl Backup {
    fn start(f: &Fixture, dir: &Path, extra: &[&str], disks: usize) -> Backup {
        let sock = dir.join("backup.sock");
        let log = dir.join("backup.log");
        let mut cmd = f.backup_cmd(&sock);
        cmd.args(extra).stderr(std::fs::File::create(&log).unwrap());
        let serve = Proc::start_announcing("nbdbridge serve --backup", cmd);
        let uri = serve.first_line.clone();
        assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");
        let mut b = Backup {
            serve,
            log,
            uri,
            backup: String::new(),
            disks: BTreeMap::new(),
        };
        let line = b.next_line();
        b.backup = line
            .strip_prefix("backup=")
            .unwrap_or_else(|| panic!("a backup= line: {line:?}"))
            .to_string();
        for _ in 0..disks {
            let line = b.next_line();
            let (disk, uri) = line
                .strip_prefix("disk=")
                .and_then(|l| l.split_once(" uri="))
                .unwrap_or_else(|| panic!("a disk=ID uri=URI line: {line:?}"));
            assert!(
                uri.starts_with(&format!("nbd+unix:///{disk}?socket=")),
                "{line}"
            );
            b.disks.insert(disk.to_string(), uri.to_string());
        }
        b
    }

    /// The next stdout line.
    fn next_line(&self) -> String {
        self.serve
            .lines
            .as_ref()
            .unwrap()
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no more stdout from serve:\n{}", self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nbdinfo --list --json`: export name -> description.
    fn list(&self) -> BTreeMap<String, String> {
        let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &self.uri]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["export-name"].as_str().unwrap().to_string(),
                    e["description"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Copy disk `disk` with `qemu-img convert` and compare it with
    /// `expected`.
    fn copy_compare(&self, dir: &Path, disk: &str, expected: &Path) {
        let copy = dir.join(format!("{disk}.raw"));
        let _ = std::fs::remove_file(&copy);
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(&self.disks[disk])
                .arg(&copy),
        );
        let out = run_ok(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(expected)
                .arg(&copy),
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("identical"),
            "disk {disk}"
        );
    }

    /// Wait for the checkpoint line and exit 0; the checkpoint.
    fn finish(mut self) -> (String, String) {
        let line = self.next_line();
        let checkpoint = line
            .strip_prefix("checkpoint=")
            .unwrap_or_else(|| panic!("a checkpoint= line: {line:?}\n{}", self.log()))
            .to_string();
        let status = self.serve.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "serve --backup: {status}\n{}", self.log());
        (self.backup, checkpoint)
    }
}

/// Where the backup runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// `serve --backup` on the embedded default over the data dir (no
    /// engine running on it meanwhile).
    Embedded,
    /// `serve --backup --engine-url` against `nbdbridge engine`, whose
    /// host is the real ovirt-imageio daemon.
    Daemon,
}

/// The engine (and its daemon host) that stays up for [`Site::Daemon`].
struct Running {
    engine: Engine,
    api: Api,
    _imageio: Imageio,
}

/// A data dir with VM `VM` and its two disks, their data uploaded: with no
/// engine running on it ([`Site::Embedded`]) or with the engine up
/// ([`Site::Daemon`]).
struct Fixture {
    running: Option<Running>,
    data: PathBuf,
    cow: String,
    cow_src: PathBuf,
    cow_bytes: Vec<u8>,
    raw: String,
    raw_src: PathBuf,
    vm: String,
    _leftovers: Leftovers,
}

fn fixture(dir: &Path, site: Site) -> Fixture {
    let data = dir.join("data");
    let leftovers = Leftovers(data.clone());
    let imageio = (site == Site::Daemon).then(|| Imageio::start(&dir.join("imageio")));
    let hosts: Vec<String> = imageio.iter().map(|d| d.host_arg("h1")).collect();
    let engine = Engine::start(&data, &hosts, &[]);
    let api = Api {
        url: engine.url.clone(),
        password_file: engine.password_file.to_string_lossy().into_owned(),
    };
    let cow = new_disk(&api, "bk-cow", "cow", COW_SIZE, true);
    let raw = new_disk(&api, "bk-raw", "raw", RAW_SIZE, false);
    let vm = new_vm(&api, VM, &[cow.as_str(), raw.as_str()]);
    let cow_src = dir.join("cow-src.raw");
    let cow_bytes = image(
        &cow_src,
        COW_SIZE,
        &[
            (0, support::pattern(1, MIB)),
            (8 * MIB, support::pattern(2, MIB / 2)),
        ],
    );
    let raw_src = dir.join("raw-src.raw");
    image(&raw_src, RAW_SIZE, &[(MIB, support::pattern(3, 2 * MIB))]);
    upload(&api, dir, &cow, &cow_src);
    upload(&api, dir, &raw, &raw_src);
    let running = match imageio {
        Some(imageio) => Some(Running {
            engine,
            api,
            _imageio: imageio,
        }),
        None => {
            stop(engine);
            None
        }
    };
    Fixture {
        running,
        data,
        cow,
        cow_src,
        cow_bytes,
        raw,
        raw_src,
        vm,
        _leftovers: leftovers,
    }
}

impl Fixture {
    /// Run `f` with the engine's API: the running one, or one started on
    /// the data dir for the time of `f`.
    fn with_api<T>(&self, f: impl FnOnce(&Api) -> T) -> T {
        if let Some(r) = &self.running {
            return f(&r.api);
        }
        let (engine, api) = engine(&self.data);
        let out = f(&api);
        stop(engine);
        out
    }

    /// `serve --backup VM` on `sock`, with the engine found as
    /// [`Fixture::serve_args`] says.
    fn backup_cmd(&self, sock: &Path) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args(self.serve_args())
            .arg("--socket")
            .arg(sock)
            .args(["--backup", VM]);
        cmd
    }

    /// Where serve finds the engine: the data dir, or the running engine.
    fn serve_args(&self) -> Vec<String> {
        match &self.running {
            None => vec![
                "--data-dir".into(),
                self.data.to_string_lossy().into_owned(),
            ],
            Some(r) => vec![
                "--engine-url".into(),
                r.engine.url.clone(),
                "--password-file".into(),
                r.api.password_file.clone(),
            ],
        }
    }
}

/// The backup `id` of the fixture's VM as the engine shows it: (phase,
/// from_checkpoint_id, to_checkpoint_id).
fn backup_state(f: &Fixture, id: &str) -> (String, Option<String>, Option<String>) {
    f.with_api(|api| backup_state_of(api, &f.vm, id))
}

fn backup_state_of(api: &Api, vm: &str, id: &str) -> (String, Option<String>, Option<String>) {
    let (status, xml) = api.call("GET", &format!("/vms/{vm}/backups/{id}"), "");
    assert_eq!(status, 200, "{xml}");
    let got = (
        element(&xml, "phase").unwrap_or("").to_string(),
        element(&xml, "from_checkpoint_id").map(str::to_string),
        element(&xml, "to_checkpoint_id").map(str::to_string),
    );
    let (_, checkpoints) = api.call("GET", &format!("/vms/{vm}/checkpoints"), "");
    if let Some(c) = &got.2 {
        assert!(checkpoints.contains(c.as_str()), "{checkpoints}");
    }
    got
}

/// A full backup of both disks; the checkpoint it printed.
fn full_backup(f: &Fixture, dir: &Path) -> String {
    let b = Backup::start(f, dir, &[], 2);
    let mut want = vec![f.cow.clone(), f.raw.clone()];
    want.sort();
    assert_eq!(
        b.disks.keys().cloned().collect::<Vec<_>>(),
        want,
        "one disk= line per disk"
    );
    // One export per disk, named by its id, described by its alias.
    let list = b.list();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(list[&f.cow].contains("bk-cow"), "{list:?}");
    assert!(list[&f.raw].contains("bk-raw"), "{list:?}");
    assert!(list[&f.cow].contains("full"), "{list:?}");
    // A probe ends nothing.
    run_ok(Command::new("nbdinfo").arg(&b.disks[&f.cow]));
    b.copy_compare(dir, &f.cow, &f.cow_src);
    b.copy_compare(dir, &f.raw, &f.raw_src);
    let (backup, checkpoint) = b.finish();
    assert!(
        !checkpoint.is_empty(),
        "a disk enabled for incremental backup makes a checkpoint"
    );
    let (phase, from, to) = backup_state(f, &backup);
    assert_eq!(phase, "succeeded");
    assert_eq!(from, None);
    assert_eq!(to.as_deref(), Some(checkpoint.as_str()));
    checkpoint
}

/// Each test on both sites.
macro_rules! on_both_sites {
    ($flow:ident) => {
        mod $flow {
            #[test]
            fn embedded_default() {
                super::$flow(super::Site::Embedded)
            }
            #[test]
            fn engine_with_the_real_daemon() {
                super::$flow(super::Site::Daemon)
            }
        }
    };
}

fn have_daemon(site: Site) -> bool {
    site == Site::Embedded || support::engine::have_tools()
}

on_both_sites!(a_full_backup_serves_one_export_per_disk_and_prints_the_checkpoint);
fn a_full_backup_serves_one_export_per_disk_and_prints_the_checkpoint(site: Site) {
    if !(have_tools() && have_daemon(site)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = fixture(tmp.path(), site);
    full_backup(&f, tmp.path());
}

/// Depends on the embedded data server reading the QCOW2 bitmap of a
/// dirty `nbd:` ticket (until then it reports the whole disk dirty, or no
/// dirty extents at all).
#[test]
fn an_incremental_backup_offers_the_changes_as_a_dirty_bitmap() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir, Site::Embedded);
    let first = full_backup(&f, dir);

    // Change 64 KiB of the cow disk, through the engine's qemu-nbd.
    const CHANGE: usize = 64 << 10;
    f.with_api(|api| {
        upload_with(api, dir, &f.cow, |uri| {
            run_ok(
                Command::new("qemu-io")
                    .args(["-f", "raw", "-c", "write -P 0x77 4M 64k"])
                    .arg(uri),
            );
        })
    });
    let mut now = f.cow_bytes.clone();
    now[4 * MIB..4 * MIB + CHANGE].fill(0x77);
    let cow_now = dir.join("cow-now.raw");
    std::fs::write(&cow_now, &now).unwrap();

    let b = Backup::start(&f, dir, &["--from-checkpoint", first.as_str()], 2);
    let list = b.list();
    let context = format!("qemu:dirty-bitmap:{first}");
    assert!(list[&f.cow].contains("incremental"), "{list:?}");
    assert!(list[&f.cow].contains(&context), "{list:?}");
    assert!(
        list[&f.raw].contains("full"),
        "the raw disk is taken whole: {list:?}"
    );
    let map = run_ok(
        Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .arg(&b.disks[&f.cow]),
    );
    let map = String::from_utf8_lossy(&map.stdout).into_owned();
    let dirty: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.get(2) == Some(&"1")).then(|| (w[0].parse().unwrap(), w[1].parse().unwrap()))
        })
        .collect();
    let at = (4 * MIB) as u64;
    assert!(
        dirty
            .iter()
            .any(|(o, l)| *o <= at && at + (CHANGE as u64) <= o + l),
        "the changed range is dirty:\n{map}"
    );
    let total: u64 = dirty.iter().map(|(_, l)| l).sum();
    assert!(
        total <= (MIB as u64),
        "only the change is dirty, not the first upload ({total} bytes):\n{map}"
    );
    // A full read covers the dirty data too.
    b.copy_compare(dir, &f.cow, &cow_now);
    b.copy_compare(dir, &f.raw, &f.raw_src);
    let (backup, second) = b.finish();
    assert!(!second.is_empty() && second != first, "{first} {second}");
    let (phase, from, to) = backup_state(&f, &backup);
    assert_eq!(phase, "succeeded");
    assert_eq!(from.as_deref(), Some(first.as_str()));
    assert_eq!(to.as_deref(), Some(second.as_str()));
}

#[test]
fn an_unknown_vm_is_a_clear_error_with_nothing_on_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .args(["--backup", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("there is no VM 'nope'"), "{err}");
    assert!(out.stdout.is_empty(), "no URI is printed on failure");
}

on_both_sites!(an_incremental_backup_restored_onto_the_full_one_equals_the_disk);
/// The NBD flow a backup tool runs: a full backup converted into
/// `full.qcow2`; writes (data and zeroes) to the disk through `serve
/// --disk`; an incremental backup restored by a libnbd script that copies
/// only the dirty extents into an overlay backed by `full.qcow2`. The
/// restored chain equals the disk at each checkpoint, and the incremental
/// read a small part of what the full did.
fn an_incremental_backup_restored_onto_the_full_one_equals_the_disk(site: Site) {
    if !(have_tools() && have_daemon(site) && require(support::SYSTEM_PYTHON)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir, site);

    // Full: the cow disk into full.qcow2, the raw disk read whole.
    let full = dir.join("full.qcow2");
    let b = Backup::start(&f, dir, &[], 2);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&b.disks[&f.cow])
            .arg(&full),
    );
    b.copy_compare(dir, &f.raw, &f.raw_src);
    let (_, first) = b.finish();
    assert!(!first.is_empty());
    compare_qcow2(&full, &f.cow_src, "the full backup");

    // Writes after the checkpoint: data over a hole, zeroes over data.
    f.with_api(|api| {
        upload_with(api, dir, &f.cow, |uri| {
            run_ok(
                Command::new("qemu-io")
                    .args(["-f", "raw", "-c", "write -P 0x5a 6M 192k"])
                    .args(["-c", "write -z 256k 128k"])
                    .arg(uri),
            );
        })
    });
    let mut now = f.cow_bytes.clone();
    now[6 * MIB..6 * MIB + (192 << 10)].fill(0x5a);
    now[256 << 10..384 << 10].fill(0);
    let cow_now = dir.join("cow-now.raw");
    std::fs::write(&cow_now, &now).unwrap();

    // Incremental: only the dirty extents, into an overlay on the full.
    let overlay = dir.join("incr.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&full)
            .arg(&overlay),
    );
    let ov_sock = dir.join("overlay.sock");
    let mut qemu_nbd = Proc::start("qemu-nbd (overlay)", {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "qcow2", "-k"]).arg(&ov_sock).arg(&overlay);
        cmd
    });
    wait_until("qemu-nbd on the overlay", support::START_DEADLINE, || {
        std::os::unix::net::UnixStream::connect(&ov_sock).is_ok()
    });
    let b = Backup::start(&f, dir, &["--from-checkpoint", first.as_str()], 2);
    let context = format!("qemu:dirty-bitmap:{first}");
    let out = run_ok(
        Command::new(support::SYSTEM_PYTHON)
            .arg(support::repo().join("tests/python/backup_incremental.py"))
            .arg(&b.disks[&f.cow])
            .arg(&context)
            .arg(format!("nbd+unix:///?socket={}", ov_sock.display())),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (read, dirty) = stdout
        .trim()
        .strip_prefix("read ")
        .and_then(|r| r.split_once(" dirty "))
        .and_then(|(r, d)| Some((r.parse::<u64>().ok()?, d.parse::<u64>().ok()?)))
        .unwrap_or_else(|| panic!("'read N dirty M': {stdout:?}"));
    b.copy_compare(dir, &f.raw, &f.raw_src);
    let (_, second) = b.finish();
    assert!(!second.is_empty() && second != first, "{first} {second}");
    qemu_nbd.signal(15);
    qemu_nbd.wait_exit(Duration::from_secs(30));

    compare_qcow2(&overlay, &cow_now, "full + incremental");
    compare_qcow2(&full, &f.cow_src, "the full backup, under the overlay");
    // The bitmap's granularity is 64 KiB and both changes are aligned to
    // it: exactly the changed data is read, the zeroes are not.
    assert_eq!(read, 192 << 10, "bytes the incremental read");
    assert_eq!(dirty, (192 + 128) << 10, "dirty bytes");
    let full_data = (MIB + MIB / 2) as u64;
    assert!(
        read * 6 <= full_data,
        "the incremental read {read} bytes, the full {full_data}"
    );
}

/// `qemu-img compare` of a QCOW2 image (with its backing chain) and a raw
/// one: identical.
fn compare_qcow2(image: &Path, raw: &Path, what: &str) {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(image)
            .arg(raw),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("identical"),
        "{what}"
    );
}

on_both_sites!(a_client_that_vanishes_half_way_leaves_the_backup_to_the_next);
/// A backup client killed half-way through a disk ends nothing: the backup
/// stays `ready` and the next client's full copy completes it.
fn a_client_that_vanishes_half_way_leaves_the_backup_to_the_next(site: Site) {
    if !(have_tools() && have_daemon(site) && require(support::SYSTEM_PYTHON)) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir, site);
    let b = Backup::start(&f, dir, &[], 2);
    // Read the first MiB of data, then die without NBD_CMD_DISC.
    let out = run_ok(
        Command::new(support::SYSTEM_PYTHON)
            .args([
                "-c",
                "import nbd, os, sys\n\
                 h = nbd.NBD()\n\
                 h.connect_uri(sys.argv[1])\n\
                 assert len(h.pread(1 << 20, 0)) == 1 << 20\n\
                 print('read', flush=True)\n\
                 os._exit(0)\n",
            ])
            .arg(&b.disks[&f.cow]),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "read");
    // Still served (a round trip), and the backup is still ready.
    assert_eq!(b.list().len(), 2);
    if site == Site::Daemon {
        let (phase, _, _) = f.with_api(|api| backup_state_of(api, &f.vm, &b.backup));
        assert_eq!(phase, "ready", "a vanished client finalizes nothing");
    }
    b.copy_compare(dir, &f.cow, &f.cow_src);
    b.copy_compare(dir, &f.raw, &f.raw_src);
    let (backup, checkpoint) = b.finish();
    assert!(!checkpoint.is_empty());
    let (phase, _, to) = backup_state(&f, &backup);
    assert_eq!(phase, "succeeded");
    assert_eq!(to.as_deref(), Some(checkpoint.as_str()));
}

/// A backup from a checkpoint that was removed is refused with the
/// engine's reason, prints no URI, and leaves no backup running; a full
/// backup still works after it.
#[test]
fn a_backup_from_a_removed_checkpoint_is_refused_and_leaves_none_running() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir, Site::Embedded);
    let first = full_backup(&f, dir);
    let second = full_backup(&f, dir);
    f.with_api(|api| {
        let (status, xml) = api.call("DELETE", &format!("/vms/{}/checkpoints/{first}", f.vm), "");
        assert!(
            (200..300).contains(&status),
            "remove {first}: {status} {xml}"
        );
    });
    let out = f
        .backup_cmd(&dir.join("refused.sock"))
        .args(["--from-checkpoint", first.as_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&first) && err.contains("does not exist"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no URI is printed on failure");
    let backups = f.with_api(|api| api.call("GET", &format!("/vms/{}/backups", f.vm), "").1);
    for phase in ["initializing", "starting", "ready", "finalizing"] {
        assert!(
            !backups.contains(&format!("<phase>{phase}</phase>")),
            "no backup left {phase}: {backups}"
        );
    }
    // The remaining checkpoint still serves as a base.
    let b = Backup::start(&f, dir, &["--from-checkpoint", second.as_str()], 2);
    b.copy_compare(dir, &f.cow, &f.cow_src);
    b.copy_compare(dir, &f.raw, &f.raw_src);
    let (_, third) = b.finish();
    assert!(!third.is_empty() && third != second);
}

/// A `--run` command that copies every disk, found by `$disks` and
/// `$uris` alone, into `DIR/DISK_ID.out` (exit 1 at the first failure).
fn copy_every_disk(dir: &Path) -> String {
    format!(
        "set -- $uris && for disk in $disks; do \
         nbdcopy \"$1\" \"{}/$disk.out\" || exit 1; shift; done && test $# = 0",
        dir.display()
    )
}

/// `serve --backup VM --run CMD`: a CMD that copies every disk (found by
/// `$disks` and `$uris`, or by hand) ends the backup with exit 0 and the
/// checkpoint line; a CMD that exits 0 having
/// read only one disk makes the backup incomplete (exit 1, no checkpoint).
#[test]
fn run_copies_every_disk_or_the_backup_is_incomplete() {
    if !(have_tools() && require("nbdcopy")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir, Site::Embedded);
    let run = |cmd: String| {
        f.backup_cmd(&dir.join("run.sock"))
            .args(["--run", cmd.as_str()])
            .output()
            .unwrap()
    };
    let copy = |disk: &str, to: &Path| {
        format!(
            "nbdcopy \"nbd+unix:///{disk}?socket=$unixsocket\" '{}'",
            to.display()
        )
    };
    let (cow_out, raw_out) = (dir.join("cow.out"), dir.join("raw.out"));

    // Every disk by the variables alone: `$disks` and `$uris` pair up.
    let out = run(format!(
        "echo \"$backup\" > '{}/backup.id' && {}",
        dir.display(),
        copy_every_disk(dir)
    ));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let checkpoint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint="))
        .unwrap_or_else(|| panic!("a checkpoint line: {stdout}"));
    assert!(!checkpoint.is_empty(), "{stdout}");
    let backup = stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup="))
        .unwrap_or_else(|| panic!("a backup line: {stdout}"));
    assert_eq!(
        std::fs::read_to_string(dir.join("backup.id"))
            .unwrap()
            .trim(),
        backup
    );
    let by_vars = |disk: &str| std::fs::read(dir.join(format!("{disk}.out"))).unwrap();
    assert_eq!(by_vars(&f.cow), f.cow_bytes);
    assert_eq!(by_vars(&f.raw), std::fs::read(&f.raw_src).unwrap());

    // The same with the URIs built by hand.
    let out = run(format!(
        "{} && {}",
        copy(&f.cow, &cow_out),
        copy(&f.raw, &raw_out)
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(std::fs::read(&cow_out).unwrap(), f.cow_bytes);
    assert_eq!(
        std::fs::read(&raw_out).unwrap(),
        std::fs::read(&f.raw_src).unwrap()
    );

    let out = run(copy(&f.cow, &dir.join("only-cow.out")));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!stdout.contains("checkpoint="), "{stdout}");
    let backup = stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup="))
        .unwrap_or_else(|| panic!("a backup line: {stdout}"))
        .to_string();
    let (phase, _, _) = backup_state(&f, &backup);
    assert_eq!(phase, "succeeded", "the engine's backup still ended: {err}");
}

/// `serve --backup VM --host ID` creates every disk's transfer on that host:
/// the embedded engine's own host serves the backup; a host the engine
/// does not know fails it before anything is served (exit 1, a message
/// naming the host, no checkpoint line) and leaves no backup running.
#[test]
fn host_pins_the_backup_transfers() {
    if !(have_tools() && require("nbdcopy")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let f = fixture(dir, Site::Embedded);
    let host = f.with_api(|api| {
        let (status, xml) = api.call("GET", "/hosts", "");
        assert_eq!(status, 200, "{xml}");
        first_id(&xml).expect("a host").to_string()
    });
    let run = |host: &str| {
        f.backup_cmd(&dir.join("host.sock"))
            .args(["--host", host, "--run", &copy_every_disk(dir)])
            .output()
            .unwrap()
    };

    let out = run(&host);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout.lines().any(|l| l.starts_with("checkpoint=")),
        "{stdout}"
    );
    let backup = stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup="))
        .expect("a backup line")
        .to_string();
    f.with_api(|api| {
        let (_, xml) = api.call("GET", "/imagetransfers", "");
        let of_backup: Vec<&str> = xml
            .split("<image_transfer ")
            .filter(|t| t.contains(&format!("<backup id=\"{backup}\"")))
            .collect();
        assert_eq!(of_backup.len(), 2, "one transfer per disk: {xml}");
        for t in of_backup {
            let on = t.split("<host ").nth(1).and_then(first_id);
            assert_eq!(on, Some(host.as_str()), "{t}");
        }
    });
    assert_eq!(
        std::fs::read(dir.join(format!("{}.out", f.cow))).unwrap(),
        f.cow_bytes
    );

    let out = run("no-such-host");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no-such-host"), "the host is named: {err}");
    assert!(!stdout.contains("checkpoint="), "{stdout}");
    if let Some(id) = stdout.lines().find_map(|l| l.strip_prefix("backup=")) {
        let (phase, _, _) = backup_state(&f, id);
        assert!(
            phase == "succeeded" || phase == "failed",
            "the backup was ended: {phase}"
        );
    }
}
