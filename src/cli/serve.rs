//! `nbdbridge serve`: an NBD server over a local file (transfer sources
//! come with the imageio backend).

use super::{CliError, announce};
use nbdbridge::backend::file::FileBackend;
use nbdbridge::nbd::{Export, Exports, Listener, Server};
use nbdbridge::shutdown::{self, Shutdown};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `nbdbridge serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Serve this local raw image file.
    #[arg(long)]
    file: PathBuf,
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
    let backend = FileBackend::open(&args.file, args.read_only)
        .map_err(|e| format!("cannot open {}: {e}", args.file.display()))?;
    let backend = Arc::new(backend);
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
    tracing::info!(file = %args.file.display(), size = backend_size(&backend), %uri, "serving");
    let serving = tokio::spawn(Arc::clone(&server).serve(listener));
    announce(&uri)?;

    let signal = shutdown::signal().await?;
    tracing::info!(signal, "stopping: finishing in-flight requests");
    shutdown.trigger();
    serving.await?;
    use nbdbridge::Backend;
    backend.flush().await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn backend_size(b: &FileBackend) -> u64 {
    use nbdbridge::Backend;
    b.size()
}
