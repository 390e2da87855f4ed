//! `nbdbridge imageio`: the data server on its own (issue 3).

use super::CliError;
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
}

/// Run the data server until SIGINT / SIGTERM.
pub async fn run(args: ImageioArgs) -> Result<ExitCode, CliError> {
    let _ = args;
    Err("the imageio data server is not built yet".into())
}
