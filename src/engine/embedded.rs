//! The embedded oVirt side: the imageio-compatible data server started in
//! the engine's process and registered as its default host, so that one
//! machine with no oVirt installed runs the whole pipeline.

use super::HostSpec;
use crate::imageio::{Config, DataServer};
use std::path::Path;

/// Name of the embedded host.
pub const HOST_NAME: &str = "embedded";

/// Start the data server for `data_dir` on loopback (a free port), with its
/// control and local sockets under `DATA_DIR/imageio`. The socket names
/// carry the process id, so a second engine started by mistake on the same
/// data dir (which then fails on the data dir lock) cannot take them over;
/// sockets left by processes that are gone are removed.
///
/// # Errors
/// The sockets or the port cannot be bound.
pub async fn start_data_server(data_dir: &Path) -> std::io::Result<DataServer> {
    let run = data_dir.join("imageio");
    std::fs::create_dir_all(&run)?;
    remove_stale_sockets(&run);
    let pid = std::process::id();
    let mut config = Config::new(
        "127.0.0.1:0",
        run.join(format!("imageio-control-{pid}.sock")),
    );
    config.local_socket = Some(run.join(format!("imageio-local-{pid}.sock")));
    DataServer::start(config).await
}

/// Remove `imageio-*-PID.sock` files whose process is gone.
fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("imageio-")
            .and_then(|r| r.strip_suffix(".sock"))
            .and_then(|r| r.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The `--host` entry of a running data server.
pub fn host_spec(server: &DataServer) -> HostSpec {
    HostSpec {
        name: HOST_NAME.to_string(),
        control_socket: server.control_socket().to_path_buf(),
        data_url: format!("http://{}", server.addr()),
    }
}
