//! `nbdbridge engine`: the engine-compatible control plane (issue 4).

use super::CliError;
use nbdbridge::engine::{Engine, EngineConfig, HostSpec, Timing, TlsFiles, embedded};
use nbdbridge::shutdown::{self, Shutdown};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Options of `nbdbridge engine`.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// Database, password and disk images live here.
    #[arg(long)]
    data_dir: PathBuf,
    /// API address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// File with admin@internal's password (default: generated at first
    /// start into DATA_DIR/password, mode 0600).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// A data server host: NAME=CONTROL_SOCKET,DATA_URL (repeatable), e.g.
    /// a real ovirt-imageio daemon's control socket and data URL.
    #[arg(long = "host", value_name = "NAME=CONTROL_SOCKET,DATA_URL")]
    hosts: Vec<HostSpec>,
    /// TLS certificate (PEM) for https.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for https.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Ticket lifetime in seconds given to data servers; renewed before it
    /// runs out.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    ticket_timeout: u64,
    /// Default client inactivity timeout in seconds (0 disables).
    #[arg(long, default_value_t = 60)]
    inactivity_timeout: u64,
    /// Most API connections served at once; more wait in the listen
    /// backlog.
    #[arg(long, value_name = "N", default_value_t = nbdbridge::engine::MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// Seconds a client may take to send a request head (and to send the
    /// next one on a kept-alive connection); slower connections are closed.
    #[arg(long, value_name = "SECONDS", default_value_t = nbdbridge::engine::HEADER_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout: u64,
}

/// Run the engine until SIGINT / SIGTERM.
pub async fn run(args: EngineArgs) -> Result<ExitCode, CliError> {
    // The embedded data server is always a host. The engine picks the first
    // host when a transfer names none: the embedded one when no --host is
    // given, else the first --host (whoever registers a host means it to
    // carry the transfers).
    let data_server = embedded::start_data_server(&args.data_dir)
        .await
        .map_err(|e| format!("cannot start the embedded data server: {e}"))?;
    let mut hosts = args.hosts;
    hosts.push(embedded::host_spec(&data_server));
    let config = EngineConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        password_file: args.password_file.clone(),
        hosts,
        timing: Timing {
            ticket_timeout: args.ticket_timeout,
            inactivity_timeout: args.inactivity_timeout,
            ..Timing::default()
        },
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
        max_connections: args.max_connections as usize,
        header_timeout: std::time::Duration::from_secs(args.header_timeout),
    };
    let stop = Shutdown::new();
    let engine = Engine::start(config, stop.clone()).await?;
    if args.password_file.is_none() {
        eprintln!(
            "nbdbridge engine: the password of {} is in {}",
            nbdbridge::engine::USER,
            engine.password_path().display()
        );
    }
    for h in engine.hosts() {
        tracing::info!(host = %h.name, id = %h.id, data = %h.data_url, "host registered");
    }
    let mut signals = shutdown::Signals::install()?;
    super::announce(engine.url())?;
    let serving = tokio::spawn(engine.serve());
    let sig = signals.recv().await;
    tracing::info!(signal = sig, "stopping");
    stop.trigger();
    let _ = serving.await;
    data_server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
