//! Subcommands. Each prints its contract line (a URI or URL) as the first
//! stdout line once it accepts clients; logs go to stderr.

mod engine;
mod imageio;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A boxed error for start-up failures, printed with its causes.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// nbdbridge: serve oVirt image transfers to any NBD client.
#[derive(Debug, Parser)]
#[command(name = "nbdbridge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an image over NBD.
    Serve(Box<serve::ServeArgs>),
    /// Run the imageio-compatible data server.
    Imageio(imageio::ImageioArgs),
    /// Run the engine-compatible ImageTransfer service.
    Engine(engine::EngineArgs),
}

/// Run the chosen subcommand.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Imageio(args) => imageio::run(args).await,
        Command::Engine(args) => engine::run(args).await,
    }
}

/// Print the contract line on stdout and flush it.
pub fn announce(line: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
