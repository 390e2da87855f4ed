//! `nbdbridge serve --backup VM [--from-checkpoint ID]`: back up a VM of
//! the embedded engine over `--data-dir` (the default) or of the engine at
//! `--engine-url`, serving every disk as its own export of one NBD server
//! (`session::backup` drives it, `phases::backup` decides).
//!
//! Stdout, one line each, for scripts:
//! 1. the server's NBD URI, once clients can connect (its default export,
//!    the empty name, is the first disk), as every `serve` prints first;
//! 2. `backup=ID`;
//! 3. one `disk=DISK_ID uri=URI` per disk, in the VM's order (the export
//!    name is the disk id);
//! 4. at the end, only when the backup succeeded and every disk was read
//!    whole: `checkpoint=ID`, the checkpoint the next incremental backup
//!    starts from (`--from-checkpoint ID`); empty after `=` when the backup
//!    created none (no disk is enabled for incremental backup).

use super::{
    Embedded, PidFile, ServeArgs, engine_client, exit_code, handshake_options, listen, ready,
};
use crate::cli::{CliError, announce};
use nbdbridge::backend::imageio::TlsOptions;
use nbdbridge::session::EngineClient;
use nbdbridge::session::backup::{self, BackupOptions, BackupOutcome};
use nbdbridge::shutdown;
use std::process::ExitCode;
use std::sync::Arc;

/// Back up VM `vm` and serve its disks until the backup ends.
pub(super) async fn serve_backup(
    args: &ServeArgs,
    vm: &str,
    signals: shutdown::Signals,
    pid_file: &PidFile,
) -> Result<ExitCode, CliError> {
    let result = match &args.engine_url {
        Some(url) => {
            let (client, tls) = engine_client(args, url).await?;
            let client = Arc::new(client);
            let outcome = back_up(args, vm, Arc::clone(&client), tls, signals, pid_file).await;
            client.logout().await;
            outcome
        }
        None => {
            let embedded = Embedded::start(&args.data_dir).await?;
            let outcome = async {
                let client = Arc::new(embedded.client().await?);
                let outcome = back_up(
                    args,
                    vm,
                    Arc::clone(&client),
                    TlsOptions::default(),
                    signals,
                    pid_file,
                )
                .await;
                client.logout().await;
                outcome
            }
            .await;
            embedded.stop().await;
            outcome
        }
    };
    report(result?)
}

async fn back_up(
    args: &ServeArgs,
    vm: &str,
    client: Arc<EngineClient>,
    tls: TlsOptions,
    signals: shutdown::Signals,
    pid_file: &PidFile,
) -> Result<BackupOutcome, CliError> {
    // Credentials first: a bad --tls-certificates fails before the backup.
    let handshake = handshake_options(args)?;
    let options = BackupOptions {
        vm: vm.to_string(),
        from_checkpoint: args.from_checkpoint.clone(),
        host_id: args.host.clone(),
        listener: listen(args).await?,
        tls,
        run: args.run.clone(),
        handshake,
        max_connections: args.max_connections,
    };
    let outcome = backup::run(client, options, signals, |lines| {
        let mut lines = lines.iter();
        if let Some(uri) = lines.next() {
            ready(pid_file, uri)?;
        }
        for line in lines {
            announce(line).map_err(std::io::Error::other)?;
        }
        Ok(())
    })
    .await?;
    Ok(outcome)
}

/// The message on stderr (a log line on success), the checkpoint line on
/// stdout, the exit status.
fn report(outcome: BackupOutcome) -> Result<ExitCode, CliError> {
    if outcome.success() {
        tracing::info!(backup = ?outcome.backup, "{}", outcome.message);
    } else {
        eprintln!("nbdbridge: {}", outcome.message);
    }
    if let Some(checkpoint) = &outcome.checkpoint {
        announce(&format!("checkpoint={checkpoint}"))?;
    }
    Ok(exit_code(outcome.status))
}
