//! NBD test harness: start a server over a raw file (ours by default, or
//! qemu-nbd as a stand-in), know its URI, make test images, and talk to it.
//!
//! `NBDBRIDGE_TEST_SERVER=qemu-nbd` runs every NBD test against qemu-nbd
//! instead of `nbdbridge serve`. That proves each test works with a known
//! good server; assertions where our contract is stricter than qemu-nbd are
//! guarded by [`ours`] (see `OUR_CONTRACT` notes in the tests).

use super::{Proc, bin, wait_until};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Which server the NBD tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `nbdbridge serve --file` (the default).
    Ours,
    /// `qemu-nbd`, the stand-in used to validate the tests themselves.
    QemuNbd,
}

/// The server chosen by `NBDBRIDGE_TEST_SERVER` (`nbdbridge` or `qemu-nbd`).
pub fn server_kind() -> ServerKind {
    match std::env::var("NBDBRIDGE_TEST_SERVER").as_deref() {
        Ok("qemu-nbd") => ServerKind::QemuNbd,
        Ok("") | Ok("nbdbridge") | Err(_) => ServerKind::Ours,
        Ok(other) => panic!("NBDBRIDGE_TEST_SERVER={other}: expected nbdbridge or qemu-nbd"),
    }
}

/// True when testing our own server: assertions on behaviour that our
/// contract pins down but qemu-nbd does differently run only then.
pub fn ours() -> bool {
    server_kind() == ServerKind::Ours
}

/// Whether the server under test can run (qemu-nbd must be installed when
/// it is the stand-in; our binary always exists).
pub fn require_server() -> bool {
    match server_kind() {
        ServerKind::Ours => true,
        ServerKind::QemuNbd => super::require("qemu-nbd"),
    }
}

/// How to serve the file.
#[derive(Debug, Clone)]
pub struct ServeOpts {
    /// `--read-only`.
    pub read_only: bool,
    /// `--export-name`.
    pub export_name: String,
    /// `--description`.
    pub description: Option<String>,
    /// Listen on 127.0.0.1 with a free port instead of a unix socket.
    pub tcp: bool,
    /// More `serve` flags (ours only, e.g. `--tls require`).
    pub args: Vec<String>,
}

impl Default for ServeOpts {
    fn default() -> Self {
        ServeOpts {
            read_only: false,
            export_name: "disk".to_string(),
            description: None,
            tcp: false,
            args: Vec::new(),
        }
    }
}

impl ServeOpts {
    /// The defaults, read-only.
    pub fn read_only() -> Self {
        ServeOpts {
            read_only: true,
            ..Self::default()
        }
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

/// A running NBD server; stopped when dropped.
#[derive(Debug)]
pub struct Server {
    /// The server process (SIGTERM on drop).
    pub proc: Proc,
    /// Its NBD URI, e.g. `nbd+unix:///disk?socket=/tmp/.../nbd.sock`.
    pub uri: String,
    /// Where it listens.
    pub endpoint: Endpoint,
    /// The export name.
    pub export: String,
    /// Holds the socket directory.
    _dir: tempfile::TempDir,
}

/// A connected byte stream to the server (unix or TCP), for raw tests.
#[derive(Debug)]
pub enum Conn {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

impl Conn {
    /// Set the read timeout (a deadline for every read).
    pub fn set_read_timeout(&self, t: Option<Duration>) {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t).expect("set_read_timeout"),
            Conn::Tcp(s) => s.set_read_timeout(t).expect("set_read_timeout"),
        }
    }
}

impl Server {
    /// Open a new raw connection (read timeout 10 s).
    pub fn connect(&self) -> Conn {
        let conn = match &self.endpoint {
            Endpoint::Unix(p) => Conn::Unix(
                UnixStream::connect(p).unwrap_or_else(|e| panic!("connect {}: {e}", p.display())),
            ),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).unwrap_or_else(|e| panic!("connect {a}: {e}"));
                s.set_nodelay(true).expect("nodelay");
                Conn::Tcp(s)
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(10)));
        conn
    }

    /// The URI for another export name on the same endpoint.
    pub fn uri_for(&self, export: &str) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Endpoint::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }

    /// Stop with SIGTERM and assert a clean exit 0 (our contract). qemu-nbd
    /// also exits 0 on SIGTERM.
    pub fn stop(mut self) {
        self.proc.signal(15);
        let status = self.proc.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "server did not exit 0 on SIGTERM: {status}"
        );
    }
}

/// Parse the contract URI (`nbd`, `nbds`, `nbd+unix`, `nbds+unix`) into the
/// endpoint and export name, percent-decoding both (the `url` crate parses).
pub fn parse_uri(uri: &str) -> (Endpoint, String) {
    use std::os::unix::ffi::OsStringExt;
    let url = url::Url::parse(uri).unwrap_or_else(|e| panic!("not a URI: {uri:?}: {e}"));
    let decode = |s: &str| -> Vec<u8> { percent_encoding::percent_decode_str(s).collect() };
    let name = String::from_utf8(decode(url.path().trim_start_matches('/')))
        .unwrap_or_else(|_| panic!("export name is not UTF-8: {uri:?}"));
    match url.scheme() {
        "nbd+unix" | "nbds+unix" => {
            let query = url.query().unwrap_or("");
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .unwrap_or_else(|| panic!("unix URI without ?socket=: {uri:?}"));
            let path = std::ffi::OsString::from_vec(decode(socket));
            (Endpoint::Unix(PathBuf::from(path)), name)
        }
        "nbd" | "nbds" => {
            let host = match url.host() {
                Some(url::Host::Ipv6(a)) => format!("[{a}]"),
                Some(h) => h.to_string(),
                None => panic!("TCP URI without a host: {uri:?}"),
            };
            let port = url.port().unwrap_or(10809);
            (Endpoint::Tcp(format!("{host}:{port}")), name)
        }
        _ => panic!("not an NBD URI: {uri:?}"),
    }
}

/// Serve `path` with the server under test; returns once it accepts clients.
pub fn serve_file(path: &Path, opts: &ServeOpts) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nbd.sock");
    match server_kind() {
        ServerKind::Ours => {
            let mut cmd = Command::new(bin());
            cmd.arg("serve").arg("--file").arg(path);
            cmd.arg("--export-name").arg(&opts.export_name);
            if opts.read_only {
                cmd.arg("--read-only");
            }
            if let Some(d) = &opts.description {
                cmd.arg("--description").arg(d);
            }
            cmd.args(&opts.args);
            if opts.tcp {
                cmd.arg("--listen").arg("127.0.0.1:0");
            } else {
                cmd.arg("--socket").arg(&sock);
            }
            let proc = Proc::start_announcing("nbdbridge serve", cmd);
            let uri = proc.first_line.trim().to_string();
            let (endpoint, export) = parse_uri(&uri);
            assert_eq!(
                export, opts.export_name,
                "the URI {uri:?} names another export than --export-name"
            );
            match (&endpoint, opts.tcp) {
                (Endpoint::Unix(p), false) => assert_eq!(p, &sock, "URI socket != --socket"),
                (Endpoint::Tcp(a), true) => assert!(
                    a.starts_with("127.0.0.1:") && !a.ends_with(":0"),
                    "URI must name the real port: {uri:?}"
                ),
                _ => panic!("URI {uri:?} does not match the requested transport"),
            }
            Server {
                proc,
                uri,
                endpoint,
                export: opts.export_name.clone(),
                _dir: dir,
            }
        }
        ServerKind::QemuNbd => {
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["--persistent", "-f", "raw"]);
            // Sharing and discard settings; NBDBRIDGE_TEST_QEMU_NBD_ARGS
            // replaces them, to check that tests fail against a server that
            // behaves wrongly (e.g. `--shared=1`, `--discard=ignore`).
            match std::env::var("NBDBRIDGE_TEST_QEMU_NBD_ARGS") {
                Ok(args) => cmd.args(args.split_whitespace()),
                Err(_) => cmd.args(["--shared=0", "--discard=unmap"]),
            };
            cmd.arg("-x").arg(&opts.export_name);
            if opts.read_only {
                cmd.arg("--read-only");
            }
            if let Some(d) = &opts.description {
                cmd.arg("-D").arg(d);
            }
            let endpoint = if opts.tcp {
                let port = free_port();
                cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
                Endpoint::Tcp(format!("127.0.0.1:{port}"))
            } else {
                cmd.arg("-k").arg(&sock);
                Endpoint::Unix(sock.clone())
            };
            cmd.arg(path);
            let proc = Proc::start("qemu-nbd", cmd);
            let ready = || match &endpoint {
                Endpoint::Unix(p) => UnixStream::connect(p).is_ok(),
                Endpoint::Tcp(a) => TcpStream::connect(a).is_ok(),
            };
            let end = std::time::Instant::now() + super::START_DEADLINE;
            while !ready() {
                assert!(
                    std::time::Instant::now() < end,
                    "qemu-nbd did not listen in time"
                );
                assert!(
                    !exited(proc.pid()),
                    "qemu-nbd exited early (see its stderr)"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut server = Server {
                proc,
                uri: String::new(),
                endpoint,
                export: opts.export_name.clone(),
                _dir: dir,
            };
            server.uri = server.uri_for(&opts.export_name);
            server
        }
    }
}

/// A free TCP port on 127.0.0.1 (only for qemu-nbd, which cannot pick one).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A generated test image in a temp dir.
#[derive(Debug)]
pub struct Image {
    /// The image path.
    pub path: PathBuf,
    /// Holds the directory.
    pub dir: tempfile::TempDir,
}

/// One run of an image layout: `Data(seed)` is pseudo-random data,
/// `Hole` is left unallocated (reads as zeros).
#[derive(Debug, Clone, Copy)]
pub enum Run {
    /// Pseudo-random bytes from this seed.
    Data(u64),
    /// A hole.
    Hole,
}

/// Make a sparse raw image from `(len, run)` pieces. Lengths should be
/// multiples of 64 KiB so that holes are real holes on any file system.
pub fn make_image(layout: &[(u64, Run)]) -> Image {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let file = std::fs::File::create(&path).expect("create image");
    let mut offset = 0u64;
    for &(len, run) in layout {
        if let Run::Data(seed) = run {
            let data = super::pattern(seed ^ offset, len as usize);
            file.write_all_at(&data, offset).expect("write image");
        }
        offset += len;
    }
    file.set_len(offset).expect("set_len");
    file.sync_all().expect("sync image");
    Image { path, dir }
}

/// An empty (all hole) raw image of `size` bytes.
pub fn empty_image(size: u64) -> Image {
    make_image(&[(size, Run::Hole)])
}

/// The standard test layout used by several client tests (8 MiB):
/// data, hole, data, hole, data at odd-ish but 64 KiB aligned places.
pub fn mixed_layout() -> Vec<(u64, Run)> {
    const K: u64 = 1024;
    vec![
        (1024 * K, Run::Data(1)),
        (2048 * K, Run::Hole),
        (512 * K, Run::Data(2)),
        (1536 * K, Run::Hole),
        (64 * K, Run::Data(3)),
        (2944 * K, Run::Hole),
        (64 * K, Run::Data(4)),
    ]
}

/// Data/hole extents of a local file from SEEK_DATA / SEEK_HOLE:
/// `(offset, len, is_data)`, merged.
pub fn file_extents(path: &Path) -> Vec<(u64, u64, bool)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    let size = f.metadata().expect("metadata").len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on an open fd.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 { size } else { data as u64 };
        if data > pos {
            out.push((pos, data - pos, false));
        }
        if data >= size {
            break;
        }
        // SAFETY: lseek on an open fd.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole as u64 };
        out.push((data, hole - data, true));
        pos = hole;
    }
    out
}

/// Assert two files have the same bytes; names the first differing offset.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap_or_else(|e| panic!("read {}: {e}", a.display()));
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("read {}: {e}", b.display()));
    assert_eq!(
        x.len(),
        y.len(),
        "{} is {} bytes but {} is {}",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i} ({:#04x} vs {:#04x})",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}

/// Run the python script `tests/python/NAME` with Debian's python3 (which
/// has `import nbd`) and the given arguments; assert it exits 0.
pub fn run_python(name: &str, args: &[&str]) -> std::process::Output {
    let script = super::repo().join("tests/python").join(name);
    let mut cmd = Command::new(super::SYSTEM_PYTHON);
    cmd.arg(&script).args(args);
    cmd.env("NBDBRIDGE_TEST_OURS", if ours() { "1" } else { "0" });
    run_client(&mut cmd)
}

/// How long one client command may run before the test fails (a server
/// that stops answering must fail the test, not hang it).
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(180);

/// Run a client command to completion within [`CLIENT_DEADLINE`]; its
/// output, whatever the exit status. On timeout the client is killed and
/// the test fails showing what it printed.
pub fn run_client_any(cmd: &mut Command) -> std::process::Output {
    super::output_within(cmd, CLIENT_DEADLINE)
}

/// [`run_client_any`], asserting exit 0 (the failure shows both outputs).
pub fn run_client(cmd: &mut Command) -> std::process::Output {
    let out = run_client_any(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Wait until `n` bytes can be read, or EOF / timeout; true when the peer
/// closed the connection (EOF or reset) before sending anything else.
pub fn closed_by_peer(conn: &mut Conn, deadline: Duration) -> bool {
    conn.set_read_timeout(Some(deadline));
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            // Replies to a request sent before the bad one may still come.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                return true;
            }
            Err(_) => return false,
        }
    }
}

/// Whether process `pid` has exited (gone or a zombie).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// Wait until the process `pid` has exited, within `deadline`.
pub fn wait_exited(pid: u32, deadline: Duration) {
    wait_until(&format!("process {pid} to exit"), deadline, || exited(pid));
}
