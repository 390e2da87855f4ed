//! The `nbdbridge` command line: parse, start tracing, run one subcommand.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    nbdbridge::telemetry::init();
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking_threads())
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbdbridge: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "nbdbridge: {}",
                nbdbridge::telemetry::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Threads for blocking file I/O: enough to keep a disk queue busy, few
/// enough not to thrash a small machine (`NBDBRIDGE_IO_THREADS` overrides).
fn blocking_threads() -> usize {
    std::env::var("NBDBRIDGE_IO_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(16)
}
