//! `nbdbridge imageio`: the data server on its own (issue 3).

use super::CliError;
use nbdbridge::imageio::{Config, DataServer};
use std::path::PathBuf;
use std::process::ExitCode;

/// Options of `nbdbridge imageio`.
#[derive(Debug, clap::Args)]
pub struct ImageioArgs {
    /// Data API address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:54322")]
    listen: String,
    /// Unix socket of the ticket control API.
    #[arg(long)]
    control_socket: PathBuf,
    /// Unix socket serving the data API locally.
    #[arg(long)]
    local_socket: Option<PathBuf>,
    /// Most connections served at once on each data listener (TCP, local
    /// socket); more wait in the listen backlog.
    #[arg(long, value_name = "N", default_value_t = nbdbridge::imageio::MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// Seconds a client may take to send a whole request head once it
    /// began; slower connections are closed.
    #[arg(long, value_name = "SECONDS", default_value_t = nbdbridge::imageio::HEADER_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
}

/// Run the data server until SIGINT / SIGTERM.
pub async fn run(args: ImageioArgs) -> Result<ExitCode, CliError> {
    let mut config = Config::new(args.listen, args.control_socket);
    config.local_socket = args.local_socket;
    config.max_connections = args.max_connections as usize;
    config.header_timeout = std::time::Duration::from_secs(args.header_timeout);
    // Handlers are installed before the URL is printed, so a signal sent
    // right after the contract line still stops the server in order.
    let mut signals = nbdbridge::shutdown::Signals::install()?;
    let server = DataServer::start(config).await?;
    super::announce(server.url())?;
    let name = signals.recv().await;
    tracing::info!(signal = name, "stopping");
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
