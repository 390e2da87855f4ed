//! `nbdbridge serve`: an NBD server over a local file or an imageio ticket
//! URL (engine transfers come with the transfer session).

use super::{CliError, announce};
use nbdbridge::Backend;
use nbdbridge::backend::file::FileBackend;
use nbdbridge::backend::imageio::{ImageioBackend, ImageioConfig, TlsOptions};
use nbdbridge::nbd::{Export, Exports, Listener, Server};
use nbdbridge::shutdown::{self, Shutdown};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `nbdbridge serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["file", "imageio_url"])))]
pub struct ServeArgs {
    /// Serve this local raw image file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Bridge straight to this imageio ticket URL
    /// (`https://HOST:54322/images/TICKET`): no engine, no phases.
    #[arg(long)]
    imageio_url: Option<String>,
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

/// Serve until SIGINT / SIGTERM, then finish in-flight requests and flush.
pub async fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
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

async fn serve<B: Backend>(args: &ServeArgs, backend: Arc<B>) -> Result<ExitCode, CliError> {
    let listener = match (&args.listen, &args.socket) {
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
    };
    let export = Export::new(
        args.export_name.clone(),
        args.description.clone(),
        Arc::clone(&backend),
    );
    let shutdown = Shutdown::new();
    let server = Arc::new(Server::new(Exports::single(export), shutdown.clone()));
    let uri = listener.uri(&args.export_name);
    tracing::info!(%uri, "serving");
    let serving = tokio::spawn(Arc::clone(&server).serve(listener));
    announce(&uri)?;

    let signal = shutdown::signal().await?;
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
