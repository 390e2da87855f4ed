//! The embedded oVirt side: the imageio-compatible data server started in
//! the engine's process and registered as its default host, so that one
//! machine with no oVirt installed runs the whole pipeline.

use super::HostSpec;
use crate::imageio::{Config, DataServer};
use std::path::Path;

/// Name of the embedded host.
pub const HOST_NAME: &str = "embedded";

/// File under `DATA_DIR/imageio` remembering the data server's port.
const PORT_FILE: &str = "port";

/// Start the data server for `data_dir` on loopback, with its control and
/// local sockets under `DATA_DIR/imageio`. The port stays the same across
/// restarts when it is still free (remembered in `DATA_DIR/imageio/port`),
/// so the `transfer_url` clients were given keeps working, as a real
/// host's does; a free port otherwise. The socket names
/// carry the process id, so a second engine started by mistake on the same
/// data dir (which then fails on the data dir lock) cannot take them over;
/// sockets left by processes that are gone are removed.
///
/// # Errors
/// The sockets or the port cannot be bound.
pub async fn start_data_server(data_dir: &Path) -> std::io::Result<DataServer> {
    let run = data_dir.join("imageio");
    // The data dir and this one are 0700 (see `private`): the control
    // socket installs tickets.
    super::private::dir(data_dir).map_err(std::io::Error::other)?;
    super::private::dir(&run).map_err(std::io::Error::other)?;
    remove_stale_sockets(&run);
    let pid = std::process::id();
    let config = |port: u16| {
        let mut c = Config::new(
            format!("127.0.0.1:{port}"),
            run.join(format!("imageio-control-{pid}.sock")),
        );
        c.local_socket = Some(run.join(format!("imageio-local-{pid}.sock")));
        c
    };
    let port_file = run.join(PORT_FILE);
    let last = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|t| t.trim().parse::<u16>().ok())
        .filter(|p| *p != 0);
    let server = match last {
        Some(port) => match DataServer::start(config(port)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(port, error = %e, "the data server's last port is taken; using a new one");
                DataServer::start(config(0)).await?
            }
        },
        None => DataServer::start(config(0)).await?,
    };
    if last != Some(server.addr().port()) {
        use std::io::Write;
        let mut f = super::private::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&port_file)?;
        writeln!(f, "{}", server.addr().port())?;
    }
    Ok(server)
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
