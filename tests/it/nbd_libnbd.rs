//! libnbd's Python binding (Debian's python3-libnbd, run with
//! /usr/bin/python3) for what the command-line clients cannot reach:
//! simple vs structured replies, block status, odd ranges, error replies,
//! FUA / FLUSH / TRIM / WRITE_ZEROES / CACHE, 64 requests in flight,
//! multi-conn and option negotiation. Each script in `tests/python/` exits
//! non-zero with the failed check on stderr.
//!
//! libnbd 1.14 cannot negotiate extended headers, so every connection here
//! uses compact requests (simple or structured replies); `nbd_raw.rs` and
//! the qemu tools cover extended headers.

use crate::support;

use support::nbd::{self, Run, ServeOpts};
use support::{SYSTEM_PYTHON, require};

const MIB: u64 = 1024 * 1024;

/// Whether the libnbd binding and the server can run here.
fn ready() -> bool {
    if !require(SYSTEM_PYTHON) || !nbd::require_server() {
        return false;
    }
    let ok = std::process::Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            !support::strict(),
            "python3-libnbd is required under scripts/test and CI; scripts/test installs it"
        );
        eprintln!("skipping: {SYSTEM_PYTHON} has no `import nbd` (apt-get install python3-libnbd)");
    }
    ok
}

fn path(img: &nbd::Image) -> &str {
    img.path.to_str().expect("utf-8 temp path")
}

#[test]
fn simple_and_structured_replies_and_sparse_reads() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&nbd::mixed_layout());
    let server = nbd::serve_file(&img.path, &ServeOpts::read_only());
    nbd::run_python("replies.py", &[&server.uri, path(&img)]);
    server.stop();
}

#[test]
fn block_status_matches_file_holes() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&nbd::mixed_layout());
    let server = nbd::serve_file(&img.path, &ServeOpts::read_only());
    nbd::run_python("block_status.py", &[&server.uri, path(&img)]);
    server.stop();
}

#[test]
fn out_of_range_and_bad_flags_get_errno_and_connection_goes_on() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&[(MIB, Run::Data(7)), (3 * MIB, Run::Hole)]);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    nbd::run_python("errors.py", &[&server.uri]);
    server.stop();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&nbd::mixed_layout());
    let before = std::fs::read(&img.path).expect("read image");
    let server = nbd::serve_file(&img.path, &ServeOpts::read_only());
    nbd::run_python("readonly.py", &[&server.uri, path(&img)]);
    server.stop();
    assert!(
        std::fs::read(&img.path).expect("read image") == before,
        "a read-only export changed the file"
    );
}

#[test]
fn write_flush_fua_trim_zero_cache() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(16 * MIB);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    nbd::run_python("commands.py", &[&server.uri, path(&img)]);
    server.stop();
}

#[test]
fn sixty_four_requests_in_flight() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&[(8 * MIB, Run::Data(11)), (8 * MIB, Run::Hole)]);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    nbd::run_python("inflight.py", &[&server.uri, path(&img)]);
    server.stop();
}

#[test]
fn multi_conn_flush_is_visible_everywhere() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(16 * MIB);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    nbd::run_python("multiconn.py", &[&server.uri, path(&img)]);
    server.stop();
}

#[test]
fn option_negotiation_list_info_meta_unknown_export() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(4 * MIB + 512);
    let opts = ServeOpts {
        export_name: "vm-disk-1".into(),
        description: Some("a test disk".into()),
        ..ServeOpts::default()
    };
    let server = nbd::serve_file(&img.path, &opts);
    let size = (4 * MIB + 512).to_string();
    nbd::run_python(
        "options.py",
        &[&server.uri, "vm-disk-1", "a test disk", &size],
    );
    server.stop();
}

#[test]
fn tcp_listener_serves_the_same_protocol() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&nbd::mixed_layout());
    let opts = ServeOpts {
        tcp: true,
        read_only: true,
        ..ServeOpts::default()
    };
    let server = nbd::serve_file(&img.path, &opts);
    assert!(
        server.uri.starts_with("nbd://127.0.0.1:"),
        "TCP URI: {}",
        server.uri
    );
    nbd::run_python("block_status.py", &[&server.uri, path(&img)]);
    server.stop();
}
