//! `nbdbridge serve`: an NBD server over a local file (more sources later).

use super::CliError;
use std::path::PathBuf;
use std::process::ExitCode;

/// Options of `nbdbridge serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Serve this local raw image file.
    #[arg(long)]
    file: PathBuf,
}

/// Serve until SIGINT / SIGTERM.
pub async fn run(args: ServeArgs) -> Result<ExitCode, CliError> {
    let _ = args;
    Err("not built yet".into())
}
