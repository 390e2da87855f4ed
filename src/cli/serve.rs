//! `nbdbridge serve`: an NBD server over a local file or an imageio ticket
//! URL (engine transfers come with the transfer session; VM backups,
//! `--backup`, in the `backup` submodule).

mod backup;

use super::{CliError, announce};
use nbdbridge::Backend;
use nbdbridge::backend::file::FileBackend;
use nbdbridge::backend::imageio::{ImageioBackend, ImageioConfig, TlsOptions};
use nbdbridge::captive::{Captive, RunEnv};
use nbdbridge::engine::{self, Engine, embedded};
use nbdbridge::nbd::consts::QEMU_DIRTY_BITMAP;
use nbdbridge::nbd::{Export, Exports, HandshakeOptions, Listener, Server, ServerTls, TlsMode};
use nbdbridge::ovirt::{DiskStatus, Format};
use nbdbridge::progress::{Progress, Sample};
use nbdbridge::session::driver::{self, DriverOptions, OnInterrupt, redact_url, scrub};
use nbdbridge::session::{Direction, EngineClient, EngineConfig, Target};
use nbdbridge::shutdown::{self, Shutdown};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `nbdbridge serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").args(["file", "imageio_url", "engine_url"])))]
#[command(group(clap::ArgGroup::new("new_transfers").args(["disk", "backup"])))]
pub struct ServeArgs {
    /// Serve this local raw image file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Bridge straight to this imageio ticket URL
    /// (`https://HOST:54322/images/TICKET`): no engine, no phases.
    #[arg(long)]
    imageio_url: Option<String>,
    /// Engine API URL (`https://ENGINE/ovirt-engine/api`): serve an image
    /// transfer, created for `--disk` or attached with `--transfer`.
    #[arg(long, requires = "password_file")]
    engine_url: Option<String>,
    /// Engine user.
    #[arg(long, default_value = "admin@internal")]
    username: String,
    /// File holding the engine password.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// The disk to transfer: its id with `--engine-url`; without it, the
    /// name (or id) of a disk of the embedded engine, created when missing.
    #[arg(long, conflicts_with = "transfer")]
    disk: Option<String>,
    /// Host id to run the transfer on, or with `--backup` every disk's
    /// transfer (default: the engine picks a host that is up).
    #[arg(long, requires = "new_transfers")]
    host: Option<String>,
    /// Transfer direction for `--disk`.
    #[arg(long, value_enum, default_value = "upload")]
    direction: DirectionArg,
    /// Attach to this existing transfer (e.g. one paused earlier): of the
    /// engine at `--engine-url`, or without it of the embedded engine over
    /// `--data-dir`.
    #[arg(long)]
    transfer: Option<String>,
    /// Back up this VM (its name or id): start a backup of all its disks,
    /// serve each disk as its own export named by the disk id (its alias is
    /// the export description), end each disk's download once every byte
    /// of its data was read (or at the `--run` command's exit), then
    /// finalize the backup. Of the engine at `--engine-url`, or without it
    /// of the embedded engine over `--data-dir`. Stdout: the server's URI
    /// (its default export is the first disk), `backup=ID`, one `disk=ID
    /// uri=URI` line per disk, and at the end, once the backup succeeded
    /// and every disk was read, `checkpoint=ID` (the checkpoint to give
    /// `--from-checkpoint` next time; empty when the backup made none, as
    /// when no disk is enabled for incremental backup).
    #[arg(
        long,
        value_name = "VM",
        conflicts_with_all = ["disk", "transfer", "file", "imageio_url", "dirty_bitmap"]
    )]
    backup: Option<String>,
    /// With `--backup`: back up only what changed since this checkpoint
    /// (the `checkpoint=ID` an earlier backup printed). A disk taken
    /// incrementally offers the NBD meta context `qemu:dirty-bitmap:ID`
    /// and its download ends once its dirty data was read; a disk the
    /// backup takes whole (added since) is served in full.
    #[arg(long, value_name = "ID", requires = "backup")]
    from_checkpoint: Option<String>,
    /// Serve a transfer whose format is cow: clients then see the QCOW2
    /// file's own bytes instead of the guest data. Refused without this.
    #[arg(long)]
    allow_cow: bool,
    /// What SIGINT / SIGTERM does to an upload.
    #[arg(long, value_enum, default_value = "pause")]
    on_interrupt: InterruptArg,
    /// Size (bytes, or with K/M/G/T suffix) of a disk the embedded engine
    /// creates; for `--imageio-url`, the image size (default: from the
    /// extents).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Format of a disk the embedded engine creates.
    #[arg(long, value_enum, default_value = "raw")]
    format: FormatArg,
    /// Where the embedded engine keeps its database and disk images.
    #[arg(long, default_value = "nbdbridge-data")]
    data_dir: PathBuf,
    /// The ticket zeroes by punching holes (enables TRIM).
    #[arg(long)]
    sparse: bool,
    /// Do not verify the data server's TLS certificate.
    #[arg(long)]
    insecure: bool,
    /// Trust only this PEM CA file for the data server.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Listen on this unix socket (the default, in the temp dir).
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP HOST:PORT instead (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// NBD TLS (nbdkit's `--tls`): `on` offers it, `require` refuses
    /// plaintext clients. Needs `--tls-certificates`.
    #[arg(long, value_enum, default_value = "off")]
    tls: TlsArg,
    /// Directory with `server-cert.pem`, `server-key.pem` and (for
    /// `--tls-verify-peer`) `ca-cert.pem`, as qemu's tls-creds-x509 and
    /// nbdkit use it.
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Require client certificates signed by `ca-cert.pem`.
    #[arg(long)]
    tls_verify_peer: bool,
    /// Close connections that have not finished the NBD handshake within
    /// this many seconds (0: no limit).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    handshake_limit: u64,
    /// Most NBD clients served at once (qemu-nbd's `-e/--shared`; 0: no
    /// limit, i.e. 65536); more wait in the listen backlog until one leaves.
    #[arg(
        short = 'e',
        long,
        visible_alias = "shared",
        value_name = "N",
        default_value_t = nbdbridge::nbd::listener::MAX_CONNECTIONS,
        value_parser = parse_max_connections
    )]
    max_connections: usize,
    /// Export name.
    #[arg(long, default_value = "")]
    export_name: String,
    /// Export description shown by `nbdinfo --list`.
    #[arg(long)]
    description: Option<String>,
    /// Serve the ticket's dirty extents (`GET extents?context=dirty`) as the
    /// NBD meta context `qemu:dirty-bitmap:NAME`, for incremental backup
    /// tools. With `--imageio-url` (a ticket with `"dirty": true`) or
    /// `--engine-url --transfer ID` (the download transfer of an incremental
    /// backup); a ticket without dirty extents is refused at the start.
    #[arg(long, value_name = "NAME", value_parser = parse_bitmap)]
    dirty_bitmap: Option<String>,
    /// Once serving, run CMD through `sh -c` with `$uri`, `$exportname`,
    /// `$port`, `$unixsocket` and `$tls` set (nbdkit's captive mode), e.g.
    /// `--run 'qemu-img convert -n src.qcow2 "$uri"'`. Its exit decides: 0
    /// finalizes a transfer (an upload only if no command failed), non-zero
    /// pauses an upload (or cancels it with `--on-interrupt cancel`) and
    /// finalizes a download; serve then exits with CMD's status.
    #[arg(long, value_name = "CMD")]
    run: Option<String>,
    /// Write serve's process id to this file once it accepts clients
    /// (removed at exit).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Exit when the parent process exits, as on SIGTERM (an upload is
    /// paused, a download finalized).
    #[arg(long)]
    exit_with_parent: bool,
}

/// Transfer direction.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Upload,
    Download,
}

/// NBD TLS mode.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TlsArg {
    Off,
    On,
    Require,
}

/// Disk format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Raw,
    Cow,
}

/// `1073741824`, `512M`, `1G`, `1GiB`, `2T`: binary multiples.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = t.get(digits.len()..).unwrap_or("").to_ascii_uppercase();
    let shift = match unit.as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("unknown size unit in '{s}'")),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Highest connection cap; `0` (qemu-nbd's "no limit") means this.
const MAX_CONNECTIONS_CAP: usize = 65536;

/// A connection cap: 1 to 65536, or 0 for qemu-nbd's "no limit" (65536).
fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Ok(MAX_CONNECTIONS_CAP),
        Ok(n) if n <= MAX_CONNECTIONS_CAP => Ok(n),
        _ => Err(format!(
            "'{s}': expected a number of clients from 1 to {MAX_CONNECTIONS_CAP} (0: no limit)"
        )),
    }
}

/// A bitmap name (`qemu:dirty-bitmap:` in front is accepted and dropped).
fn parse_bitmap(s: &str) -> Result<String, String> {
    let name = s.strip_prefix(QEMU_DIRTY_BITMAP).unwrap_or(s);
    if name.is_empty() {
        return Err("the bitmap name is empty".into());
    }
    if name.len() + QEMU_DIRTY_BITMAP.len() > 4096 {
        return Err("the bitmap name is longer than NBD allows".into());
    }
    Ok(name.to_string())
}

/// What an interrupt does to an upload.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InterruptArg {
    Pause,
    Cancel,
}

/// Serve until the transfer ends (or, for `--file` / `--imageio-url`,
/// SIGINT / SIGTERM / SIGHUP or the `--run` command's exit), then finish
/// in-flight requests and flush.
pub async fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
    // First of all, so that no signal is lost, even one sent the moment
    // the parent dies.
    let signals = shutdown::Signals::install()?;
    if args.exit_with_parent {
        exit_with_parent()?;
    }
    let pid_file = PidFile::new(args.pid_file.clone());
    let code = serve_any(&args, signals, &pid_file).await;
    pid_file.remove();
    code
}

async fn serve_any(
    args: &ServeArgs,
    signals: shutdown::Signals,
    pid_file: &PidFile,
) -> Result<ExitCode, CliError> {
    if let Some(vm) = &args.backup {
        return backup::serve_backup(args, vm, signals, pid_file).await;
    }
    if let Some(name) = &args.dirty_bitmap {
        if args.disk.is_some() {
            return Err(format!(
                "--dirty-bitmap {name} needs the download transfer of an incremental backup, \
                 and the transfer serve creates for --disk is never one (it has no dirty \
                 extents); attach one with --engine-url ... --transfer ID, or serve its \
                 ticket with --imageio-url"
            )
            .into());
        }
        if args.file.is_some() {
            return Err(
                format!("--dirty-bitmap {name}: a local file keeps no dirty bitmap").into(),
            );
        }
    }
    if let Some(url) = &args.engine_url {
        return serve_transfer(args, url, signals, pid_file).await;
    }
    if args.disk.is_some() || args.transfer.is_some() {
        return serve_embedded(args, signals, pid_file).await;
    }
    if let Some(path) = &args.file {
        let backend = FileBackend::open(path, args.read_only)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), size = backend.size(), "local file");
        return serve(args, Arc::new(backend), signals, pid_file).await;
    }
    if let Some(url) = &args.imageio_url {
        let config = ImageioConfig {
            url: url.clone(),
            size: args.size,
            read_only: args.read_only,
            sparse: args.sparse.then_some(true),
            dirty_bitmap: args.dirty_bitmap.clone(),
            tls: TlsOptions {
                insecure: args.insecure,
                ca_file: args.ca_file.clone(),
            },
            use_unix_socket: true,
            max_connections: None,
        };
        let cannot = |e: nbdbridge::backend::Error| {
            format!(
                "cannot use {}: {}",
                redact_url(url),
                scrub(&e.to_string(), url)
            )
        };
        let backend = ImageioBackend::connect(config).await.map_err(cannot)?;
        if let Some(name) = &args.dirty_bitmap {
            driver::check_dirty(&backend, name).await.map_err(cannot)?;
            tracing::info!(context = %format!("{QEMU_DIRTY_BITMAP}{name}"), "dirty extents");
        }
        tracing::info!(url = %redact_url(url), size = backend.size(), "imageio ticket");
        return serve(args, Arc::new(backend), signals, pid_file).await;
    }
    Err(
        "give --disk NAME or --transfer ID (the embedded default), --file, --imageio-url or \
         --engine-url"
            .into(),
    )
}

/// `--exit-with-parent`: the parent's death arrives as SIGTERM (Linux
/// `PR_SET_PDEATHSIG`, as nbdkit does), handled like any SIGTERM.
fn exit_with_parent() -> Result<(), CliError> {
    let parent = std::os::unix::process::parent_id();
    // SAFETY: prctl(PR_SET_PDEATHSIG, signal) only sets a flag of this
    // process; it reads and writes no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };
    if r != 0 {
        return Err(format!(
            "--exit-with-parent: prctl: {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    if std::os::unix::process::parent_id() != parent {
        // The parent died before the flag was set: act as if told now.
        // SAFETY: raise(3) a signal whose handler is installed.
        unsafe {
            libc::raise(libc::SIGTERM);
        }
    }
    Ok(())
}

/// `--pid-file`: written once clients can connect, removed at exit.
#[derive(Debug)]
struct PidFile {
    path: Option<PathBuf>,
    written: std::sync::atomic::AtomicBool,
}

impl PidFile {
    fn new(path: Option<PathBuf>) -> Self {
        PidFile {
            path,
            written: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Write the pid (atomically: a reader never sees a partial file).
    fn write(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
        std::fs::rename(&tmp, path)?;
        self.written
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn remove(&self) {
        if let Some(path) = &self.path {
            if self.written.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Ready: the pid file, then the URI line.
fn ready(pid_file: &PidFile, uri: &str) -> std::io::Result<()> {
    pid_file
        .write()
        .map_err(|e| std::io::Error::other(format!("--pid-file: {e}")))?;
    announce(uri).map_err(std::io::Error::other)
}

/// The embedded engine and data server over `--data-dir`, running in this
/// process.
struct Embedded {
    data_server: nbdbridge::imageio::DataServer,
    stop: Shutdown,
    engine_task: tokio::task::JoinHandle<()>,
    url: String,
    password: String,
}

impl Embedded {
    /// Start both.
    async fn start(data_dir: &Path) -> Result<Self, CliError> {
        let data_server = embedded::start_data_server(data_dir)
            .await
            .map_err(|e| format!("cannot start the embedded data server: {e}"))?;
        let stop = Shutdown::new();
        let engine = Engine::start(
            engine::EngineConfig {
                data_dir: data_dir.to_path_buf(),
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                password_file: None,
                hosts: vec![embedded::host_spec(&data_server)],
                timing: engine::Timing::default(),
                tls: None,
                max_connections: engine::MAX_CONNECTIONS,
                header_timeout: engine::HEADER_TIMEOUT,
            },
            stop.clone(),
        )
        .await
        .map_err(|e| format!("cannot start the embedded engine: {e}"))?;
        let password = std::fs::read_to_string(engine.password_path())?;
        let url = engine.url().to_string();
        let engine_task = tokio::spawn(engine.serve());
        Ok(Embedded {
            data_server,
            stop,
            engine_task,
            url,
            password: password.trim_end_matches(['\n', '\r']).to_string(),
        })
    }

    /// A client logged in to the engine.
    async fn client(&self) -> nbdbridge::session::Result<EngineClient> {
        EngineClient::connect(EngineConfig {
            url: self.url.clone(),
            username: engine::USER.to_string(),
            password: self.password.clone(),
            tls: TlsOptions::default(),
        })
        .await
    }

    /// Stop the engine, then the data server.
    async fn stop(self) {
        self.stop.trigger();
        let _ = self.engine_task.await;
        self.data_server.shutdown().await;
    }
}

/// The embedded default: engine and data server in this process over
/// `--data-dir`, the disk created when missing, then the transfer served.
async fn serve_embedded(
    args: &ServeArgs,
    signals: shutdown::Signals,
    pid_file: &PidFile,
) -> Result<ExitCode, CliError> {
    let embedded = Embedded::start(&args.data_dir).await?;
    let result = async {
        let client = Arc::new(embedded.client().await?);
        let target = match (&args.disk, &args.transfer) {
            (Some(name), _) => {
                let disk = embedded_disk(&client, name, args).await?;
                held_by(&client, &disk, name, args).await?;
                Target::Disk {
                    disk_id: disk,
                    host_id: None,
                    direction: direction(args),
                }
            }
            (None, Some(id)) => Target::Transfer(id.clone()),
            (None, None) => return Err("give --disk NAME or --transfer ID".into()),
        };
        let options = driver_options(args, TlsOptions::default()).await?;
        let outcome = driver::run(Arc::clone(&client), target, options, signals, |uri| {
            ready(pid_file, uri)
        })
        .await;
        client.logout().await;
        Ok::<_, CliError>(outcome?)
    }
    .await;
    embedded.stop().await;
    report(result?)
}

/// The id of the embedded disk called (or identified by) `name`, created
/// with `--size` and `--format` when missing, once it is `ok`.
async fn embedded_disk(
    client: &EngineClient,
    name: &str,
    args: &ServeArgs,
) -> Result<String, CliError> {
    if let Some(d) = client.find_disk(name).await? {
        tracing::info!(disk = %d.id, name, status = d.status.map_or("unknown", DiskStatus::as_str), "disk");
        return Ok(d.id);
    }
    let size = args.size.ok_or_else(|| {
        format!(
            "there is no disk '{name}' in {}; give --size to create it",
            args.data_dir.display()
        )
    })?;
    let format = match args.format {
        FormatArg::Raw => Format::Raw,
        FormatArg::Cow => Format::Cow,
    };
    let d = client.add_disk(name, size, format, None).await?;
    tracing::info!(disk = %d.id, name, size, %format, "disk created");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = client.disk(&d.id).await?;
        if now.status == Some(DiskStatus::Ok) {
            return Ok(d.id);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "disk '{name}' is still {}",
                now.status.map_or("in an unknown state", DiskStatus::as_str)
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A disk locked by a transfer that is not over (e.g. an upload paused
/// when its client vanished) cannot get another: say which one holds it
/// and the command that resumes it, instead of the engine's bare 409.
async fn held_by(
    client: &EngineClient,
    disk_id: &str,
    name: &str,
    args: &ServeArgs,
) -> Result<(), CliError> {
    let transfers = match client.transfers().await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list transfers");
            return Ok(());
        }
    };
    let Some(t) = transfers.into_iter().find(|t| {
        t.disk_id.as_deref() == Some(disk_id) && !t.phase.is_finished() && !t.phase.is_failing()
    }) else {
        return Ok(());
    };
    Err(format!(
        "disk '{name}' is held by {} transfer {} ({}); resume it with: {}",
        t.direction.as_str(),
        t.id,
        t.phase,
        driver::resume_command(&resume_args(args), &t.id)
    )
    .into())
}

/// This command line without its target (`--disk`, `--size`, `--format`,
/// `--direction`, `--host`, `--transfer`), as absolute paths where the
/// embedded engine is concerned: `--transfer ID` added to it resumes the
/// transfer from any directory.
fn resume_args(args: &ServeArgs) -> Vec<String> {
    const TARGET: [&str; 7] = [
        "--disk",
        "--size",
        "--format",
        "--direction",
        "--host",
        "--transfer",
        "--data-dir",
    ];
    let argv: Vec<String> = std::env::args().collect();
    let mut out: Vec<String> = Vec::with_capacity(argv.len() + 2);
    out.push(
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| argv.first().cloned().unwrap_or_else(|| "nbdbridge".into())),
    );
    let mut words = argv.into_iter().skip(1);
    while let Some(w) = words.next() {
        let name = w.split('=').next().unwrap_or("");
        if TARGET.contains(&name) {
            if !w.contains('=') {
                words.next();
            }
            continue;
        }
        out.push(w);
    }
    if args.engine_url.is_none() {
        let dir = std::path::absolute(&args.data_dir).unwrap_or_else(|_| args.data_dir.clone());
        out.push("--data-dir".into());
        out.push(dir.display().to_string());
    }
    out
}

fn direction(args: &ServeArgs) -> Direction {
    match args.direction {
        DirectionArg::Upload => Direction::Upload,
        DirectionArg::Download => Direction::Download,
    }
}

async fn driver_options(args: &ServeArgs, tls: TlsOptions) -> Result<DriverOptions, CliError> {
    // Credentials first: a bad --tls-certificates fails before binding.
    let handshake = handshake_options(args)?;
    Ok(DriverOptions {
        listener: listen(args).await?,
        export_name: args.export_name.clone(),
        tls,
        on_interrupt: match args.on_interrupt {
            InterruptArg::Pause => OnInterrupt::Pause,
            InterruptArg::Cancel => OnInterrupt::Cancel,
        },
        allow_cow: args.allow_cow,
        progress: nbdbridge::progress::stderr_is_terminal(),
        dirty_bitmap: args.dirty_bitmap.clone(),
        run: args.run.clone(),
        resume_args: resume_args(args),
        handshake,
        max_connections: args.max_connections,
    })
}

/// TLS and the handshake deadline from the flags.
fn handshake_options(args: &ServeArgs) -> Result<HandshakeOptions, CliError> {
    let mode = match args.tls {
        TlsArg::Off => TlsMode::Off,
        TlsArg::On => TlsMode::On,
        TlsArg::Require => TlsMode::Require,
    };
    let tls = match (&args.tls_certificates, mode) {
        (_, TlsMode::Off) if args.tls_verify_peer => {
            return Err("--tls-verify-peer needs --tls on or --tls require".into());
        }
        (_, TlsMode::Off) => None,
        (None, _) => return Err("--tls on/require needs --tls-certificates DIR".into()),
        (Some(dir), mode) => {
            ServerTls::load(dir, mode, args.tls_verify_peer).map_err(|e| e.to_string())?
        }
    };
    Ok(HandshakeOptions {
        tls,
        limit: (args.handshake_limit > 0)
            .then_some(std::time::Duration::from_secs(args.handshake_limit)),
    })
}

fn report(outcome: driver::Outcome) -> Result<ExitCode, CliError> {
    if outcome.success() {
        tracing::info!(phase = %outcome.phase, "{}", outcome.message);
    } else {
        eprintln!("nbdbridge: {}", outcome.message);
    }
    Ok(exit_code(outcome.status))
}

/// An exit status as the process's exit code (0..=255; anything else 1).
fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

/// Log in to the engine at `url` with `--username` and `--password-file`;
/// the client, and the TLS settings for its data servers.
async fn engine_client(
    args: &ServeArgs,
    url: &str,
) -> Result<(EngineClient, TlsOptions), CliError> {
    let password_file = args
        .password_file
        .as_ref()
        .ok_or("--engine-url needs --password-file")?;
    let password = std::fs::read_to_string(password_file)
        .map_err(|e| format!("cannot read {}: {e}", password_file.display()))?;
    let tls = TlsOptions {
        insecure: args.insecure,
        ca_file: args.ca_file.clone(),
    };
    let client = EngineClient::connect(EngineConfig {
        url: url.to_string(),
        username: args.username.clone(),
        password: password.trim_end_matches(['\n', '\r']).to_string(),
        tls: tls.clone(),
    })
    .await
    .map_err(|e| format!("cannot log in to the engine at {url}: {e}"))?;
    Ok((client, tls))
}

async fn serve_transfer(
    args: &ServeArgs,
    url: &str,
    signals: shutdown::Signals,
    pid_file: &PidFile,
) -> Result<ExitCode, CliError> {
    let (client, tls) = engine_client(args, url).await?;
    let target = match (&args.disk, &args.transfer) {
        (Some(disk), _) => Target::Disk {
            disk_id: disk.clone(),
            host_id: args.host.clone(),
            direction: direction(args),
        },
        (None, Some(id)) => Target::Transfer(id.clone()),
        (None, None) => return Err("--engine-url needs --disk or --transfer".into()),
    };
    if let Target::Disk { disk_id, .. } = &target {
        held_by(&client, disk_id, disk_id, args).await?;
    }
    let options = driver_options(args, tls).await?;
    let client = Arc::new(client);
    let result = driver::run(Arc::clone(&client), target, options, signals, |uri| {
        ready(pid_file, uri)
    })
    .await;
    client.logout().await;
    report(result?)
}

async fn listen(args: &ServeArgs) -> Result<Listener, CliError> {
    let listener = match (&args.listen, &args.socket) {
        (Some(addr), _) => Listener::tcp(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        (None, Some(path)) => Listener::unix(path.clone())
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?,
        (None, None) => Listener::unix_private()
            .map_err(|e| format!("cannot make a private socket in the temp dir: {e}"))?,
    };
    if listener.is_remote() && matches!(args.tls, TlsArg::Off) {
        tracing::warn!(
            "listening on a non-loopback address without TLS: anyone who can reach it can \
             read and write the disk (use --tls require --tls-certificates DIR)"
        );
    }
    Ok(listener)
}

async fn serve<B: Backend>(
    args: &ServeArgs,
    backend: Arc<B>,
    mut signals: shutdown::Signals,
    pid_file: &PidFile,
) -> Result<ExitCode, CliError> {
    let handshake = handshake_options(args)?;
    let listener = listen(args).await?;
    let export = Export::new(
        args.export_name.clone(),
        args.description.clone(),
        Arc::clone(&backend),
    );
    let shutdown = Shutdown::new();
    let server = Arc::new(
        Server::new(Exports::single(export), shutdown.clone())
            .with_handshake(handshake)
            .with_max_connections(args.max_connections),
    );
    let env = RunEnv::of(
        &listener,
        &args.export_name,
        server.handshake_options().tls_mode(),
    );
    tracing::info!(uri = %env.uri, "serving");
    let serving = tokio::spawn(Arc::clone(&server).serve(listener));
    ready(pid_file, &env.uri)?;
    let mut child = match &args.run {
        Some(cmd) => Captive::start(cmd, &env),
        None => Captive::none(),
    };
    let progress = {
        let server = Arc::clone(&server);
        let name = args.export_name.clone();
        Progress::start("served", backend.size(), move || {
            let s = server
                .exports()
                .find(&name)
                .map(|e| e.stats().snapshot())
                .unwrap_or_default();
            Sample {
                done: s.bytes_read.saturating_add(s.bytes_written),
                phase: None,
            }
        })
    };

    // Until a signal, or the --run command's exit (whose status is ours).
    let code = tokio::select! {
        signal = signals.recv() => {
            tracing::info!(signal, "stopping: finishing in-flight requests");
            0
        }
        code = child.exited() => code,
    };
    progress.finish();
    shutdown.trigger();
    serving.await?;
    child.end().await;
    backend.flush().await?;
    tracing::info!("stopped");
    Ok(exit_code(code))
}

#[cfg(test)]
mod tests {
    use super::{parse_bitmap, parse_max_connections, parse_size};

    #[test]
    fn connection_caps() {
        assert_eq!(parse_max_connections("1"), Ok(1));
        assert_eq!(parse_max_connections("128"), Ok(128));
        assert_eq!(parse_max_connections("0"), Ok(65536));
        assert!(parse_max_connections("65537").is_err());
        assert!(parse_max_connections("x").is_err());
    }

    #[test]
    fn bitmap_names() {
        assert_eq!(parse_bitmap("b1").as_deref(), Ok("b1"));
        assert_eq!(parse_bitmap("qemu:dirty-bitmap:b1").as_deref(), Ok("b1"));
        assert!(parse_bitmap("").is_err());
        assert!(parse_bitmap("qemu:dirty-bitmap:").is_err());
        assert!(parse_bitmap(&"x".repeat(4096)).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
