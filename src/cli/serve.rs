//! `nbdbridge serve`: an NBD server over a local file or an imageio ticket
//! URL (engine transfers come with the transfer session).

use super::{CliError, announce};
use nbdbridge::Backend;
use nbdbridge::backend::file::FileBackend;
use nbdbridge::backend::imageio::{ImageioBackend, ImageioConfig, TlsOptions};
use nbdbridge::engine::{self, Engine, embedded};
use nbdbridge::nbd::consts::QEMU_DIRTY_BITMAP;
use nbdbridge::nbd::{Export, Exports, Listener, Server};
use nbdbridge::ovirt::{DiskStatus, Format};
use nbdbridge::progress::{Progress, Sample};
use nbdbridge::session::driver::{self, DriverOptions, OnInterrupt, redact_url, scrub};
use nbdbridge::session::{Direction, EngineClient, EngineConfig, Target};
use nbdbridge::shutdown::{self, Shutdown};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `nbdbridge serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").args(["file", "imageio_url", "engine_url"])))]
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
    /// Host id to run the transfer on (default: the engine picks).
    #[arg(long, requires = "disk")]
    host: Option<String>,
    /// Transfer direction for `--disk`.
    #[arg(long, value_enum, default_value = "upload")]
    direction: DirectionArg,
    /// Attach to this existing transfer (e.g. one paused earlier).
    #[arg(long)]
    transfer: Option<String>,
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
}

/// Transfer direction.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Upload,
    Download,
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

/// Serve until SIGINT / SIGTERM, then finish in-flight requests and flush.
pub async fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
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
        return serve_transfer(&args, url).await;
    }
    if let Some(disk) = &args.disk {
        return serve_embedded(&args, disk).await;
    }
    if let Some(path) = &args.file {
        let backend = FileBackend::open(path, args.read_only)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), size = backend.size(), "local file");
        return serve(&args, Arc::new(backend)).await;
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
        return serve(&args, Arc::new(backend)).await;
    }
    Err("give --disk NAME (the embedded default), --file, --imageio-url or --engine-url".into())
}

/// The embedded default: engine and data server in this process over
/// `--data-dir`, the disk created when missing, then the transfer served.
async fn serve_embedded(args: &ServeArgs, name: &str) -> Result<ExitCode, CliError> {
    let data_server = embedded::start_data_server(&args.data_dir)
        .await
        .map_err(|e| format!("cannot start the embedded data server: {e}"))?;
    let stop = Shutdown::new();
    let engine = Engine::start(
        engine::EngineConfig {
            data_dir: args.data_dir.clone(),
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
    let result = async {
        let client = Arc::new(
            EngineClient::connect(EngineConfig {
                url,
                username: engine::USER.to_string(),
                password: password.trim_end_matches(['\n', '\r']).to_string(),
                tls: TlsOptions::default(),
            })
            .await?,
        );
        let disk = embedded_disk(&client, name, args).await?;
        let target = Target::Disk {
            disk_id: disk,
            host_id: None,
            direction: direction(args),
        };
        let options = driver_options(args, TlsOptions::default()).await?;
        let outcome = driver::run(Arc::clone(&client), target, options, |uri| {
            announce(uri).map_err(std::io::Error::other)
        })
        .await;
        client.logout().await;
        Ok::<_, CliError>(outcome?)
    }
    .await;
    stop.trigger();
    let _ = engine_task.await;
    data_server.shutdown().await;
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

fn direction(args: &ServeArgs) -> Direction {
    match args.direction {
        DirectionArg::Upload => Direction::Upload,
        DirectionArg::Download => Direction::Download,
    }
}

async fn driver_options(args: &ServeArgs, tls: TlsOptions) -> Result<DriverOptions, CliError> {
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
        max_connections: args.max_connections,
    })
}

fn report(outcome: driver::Outcome) -> Result<ExitCode, CliError> {
    if outcome.success {
        tracing::info!(phase = %outcome.phase, "{}", outcome.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("nbdbridge: {}", outcome.message);
        Ok(ExitCode::FAILURE)
    }
}

async fn serve_transfer(args: &ServeArgs, url: &str) -> Result<ExitCode, CliError> {
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
    let target = match (&args.disk, &args.transfer) {
        (Some(disk), _) => Target::Disk {
            disk_id: disk.clone(),
            host_id: args.host.clone(),
            direction: direction(args),
        },
        (None, Some(id)) => Target::Transfer(id.clone()),
        (None, None) => return Err("--engine-url needs --disk or --transfer".into()),
    };
    let options = driver_options(args, tls).await?;
    let client = Arc::new(client);
    let result = driver::run(Arc::clone(&client), target, options, |uri| {
        announce(uri).map_err(std::io::Error::other)
    })
    .await;
    client.logout().await;
    report(result?)
}

async fn listen(args: &ServeArgs) -> Result<Listener, CliError> {
    Ok(match (&args.listen, &args.socket) {
        (Some(addr), _) => Listener::tcp(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        (None, socket) => {
            let path = socket.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("nbdbridge-{}.sock", std::process::id()))
            });
            Listener::unix(path.clone())
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?
        }
    })
}

async fn serve<B: Backend>(args: &ServeArgs, backend: Arc<B>) -> Result<ExitCode, CliError> {
    let listener = listen(args).await?;
    let export = Export::new(
        args.export_name.clone(),
        args.description.clone(),
        Arc::clone(&backend),
    );
    let shutdown = Shutdown::new();
    let server = Arc::new(
        Server::new(Exports::single(export), shutdown.clone())
            .with_max_connections(args.max_connections),
    );
    let uri = listener.uri(&args.export_name);
    tracing::info!(%uri, "serving");
    let mut signals = shutdown::Signals::install()?;
    let serving = tokio::spawn(Arc::clone(&server).serve(listener));
    announce(&uri)?;
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

    let signal = signals.recv().await;
    progress.finish();
    tracing::info!(signal, "stopping: finishing in-flight requests");
    shutdown.trigger();
    serving.await?;
    backend.flush().await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
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
