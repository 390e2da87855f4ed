//! `nbdbridge serve`: an NBD server over a local file or an imageio ticket
//! URL (engine transfers come with the transfer session).

use super::{CliError, announce};
use nbdbridge::Backend;
use nbdbridge::backend::file::FileBackend;
use nbdbridge::backend::imageio::{ImageioBackend, ImageioConfig, TlsOptions};
use nbdbridge::nbd::{Export, Exports, Listener, Server};
use nbdbridge::session::driver::{self, DriverOptions, OnInterrupt};
use nbdbridge::session::{Direction, EngineClient, EngineConfig, Target};
use nbdbridge::shutdown::{self, Shutdown};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `nbdbridge serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["file", "imageio_url", "engine_url"])))]
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
    /// Disk id to transfer (with `--engine-url`).
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
    /// What SIGINT / SIGTERM does to an upload.
    #[arg(long, value_enum, default_value = "pause")]
    on_interrupt: InterruptArg,
    /// Image size in bytes for `--imageio-url` (default: from the extents).
    #[arg(long)]
    size: Option<u64>,
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
    /// Export name.
    #[arg(long, default_value = "")]
    export_name: String,
    /// Export description shown by `nbdinfo --list`.
    #[arg(long)]
    description: Option<String>,
}

/// Transfer direction.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    Upload,
    Download,
}

/// What an interrupt does to an upload.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum InterruptArg {
    Pause,
    Cancel,
}

/// Serve until SIGINT / SIGTERM, then finish in-flight requests and flush.
pub async fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
    if let Some(url) = &args.engine_url {
        return serve_transfer(&args, url).await;
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
            dirty_bitmap: None,
            tls: TlsOptions {
                insecure: args.insecure,
                ca_file: args.ca_file.clone(),
            },
            use_unix_socket: true,
            max_connections: None,
        };
        let backend = ImageioBackend::connect(config)
            .await
            .map_err(|e| format!("cannot use {}: {e}", redact_url(url)))?;
        tracing::info!(url = %redact_url(url), size = backend.size(), "imageio ticket");
        return serve(&args, Arc::new(backend)).await;
    }
    Err("give --file or --imageio-url".into())
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
    .await?;
    let target = match (&args.disk, &args.transfer) {
        (Some(disk), _) => Target::Disk {
            disk_id: disk.clone(),
            host_id: args.host.clone(),
            direction: match args.direction {
                DirectionArg::Upload => Direction::Upload,
                DirectionArg::Download => Direction::Download,
            },
        },
        (None, Some(id)) => Target::Transfer(id.clone()),
        (None, None) => return Err("--engine-url needs --disk or --transfer".into()),
    };
    let options = DriverOptions {
        listener: listen(args).await?,
        export_name: args.export_name.clone(),
        tls,
        on_interrupt: match args.on_interrupt {
            InterruptArg::Pause => OnInterrupt::Pause,
            InterruptArg::Cancel => OnInterrupt::Cancel,
        },
    };
    let client = Arc::new(client);
    let result = driver::run(Arc::clone(&client), target, options, |uri| {
        announce(uri).map_err(std::io::Error::other)
    })
    .await;
    client.logout().await;
    let outcome = result?;
    if outcome.success {
        tracing::info!(phase = %outcome.phase, "{}", outcome.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("nbdbridge: {}", outcome.message);
        Ok(ExitCode::FAILURE)
    }
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
    let server = Arc::new(Server::new(Exports::single(export), shutdown.clone()));
    let uri = listener.uri(&args.export_name);
    tracing::info!(%uri, "serving");
    let mut signals = shutdown::Signals::install()?;
    let serving = tokio::spawn(Arc::clone(&server).serve(listener));
    announce(&uri)?;

    let signal = signals.recv().await;
    tracing::info!(signal, "stopping: finishing in-flight requests");
    shutdown.trigger();
    serving.await?;
    backend.flush().await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// A ticket URL with the ticket (a bearer secret) cut short.
fn redact_url(url: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, ticket)) => format!("{base}/{}", nbdbridge::telemetry::redact(ticket)),
        None => url.to_string(),
    }
}
