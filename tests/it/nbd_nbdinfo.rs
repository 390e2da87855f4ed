//! nbdinfo: size, capabilities (--can / --is), the allocation map with
//! real offsets, JSON and export listing.

use crate::support;

use std::process::Command;
use support::nbd::{self, Run, ServeOpts};
use support::require;

const MIB: u64 = 1024 * 1024;

fn ready() -> bool {
    require("nbdinfo") && nbd::require_server()
}

fn nbdinfo(args: &[&str]) -> String {
    let out = nbd::run_client(Command::new("nbdinfo").args(args));
    String::from_utf8(out.stdout).expect("utf-8 nbdinfo output")
}

/// `nbdinfo --can WHAT` / `--is WHAT`: exit 0 = true, 2 = false.
fn can(flag: &str, what: &str, uri: &str) -> bool {
    let out = nbd::run_client_any(Command::new("nbdinfo").args([flag, what, uri]));
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        other => panic!(
            "nbdinfo {flag} {what} failed ({other:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn size_of_an_odd_sized_export() {
    if !ready() {
        return;
    }
    let size = 3 * MIB + 1234;
    let img = nbd::make_image(&[(MIB, Run::Data(1)), (size - MIB, Run::Hole)]);
    let server = nbd::serve_file(&img.path, &ServeOpts::read_only());
    let got: u64 = nbdinfo(&["--size", &server.uri])
        .trim()
        .parse()
        .expect("nbdinfo --size prints a number");
    if nbd::ours() {
        // OUR_CONTRACT: the exact file size.
        assert_eq!(got, size, "nbdinfo --size");
    } else {
        // qemu-nbd rounds a raw file up to 512-byte sectors.
        assert_eq!(got, size.div_ceil(512) * 512, "nbdinfo --size (qemu-nbd)");
    }
    server.stop();
}

#[test]
fn can_flags_writable_and_read_only() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(4 * MIB);
    let server = nbd::serve_file(&img.path, &ServeOpts::default());
    for what in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "multi-conn",
        "cache",
        "structured-reply",
    ] {
        assert!(
            can("--can", what, &server.uri),
            "writable export: --can {what} is false"
        );
    }
    assert!(
        !can("--is", "read-only", &server.uri),
        "writable export reported read-only"
    );
    assert!(
        !can("--is", "rotational", &server.uri),
        "export reported rotational"
    );
    server.stop();

    let server = nbd::serve_file(&img.path, &ServeOpts::read_only());
    assert!(
        can("--is", "read-only", &server.uri),
        "--read-only export not read-only"
    );
    for what in ["write", "trim", "zero", "fast-zero"] {
        assert!(
            !can("--can", what, &server.uri),
            "read-only export: --can {what} is true"
        );
    }
    for what in ["read", "flush", "df", "multi-conn", "cache"] {
        assert!(
            can("--can", what, &server.uri),
            "read-only export: --can {what} is false"
        );
    }
    server.stop();
}

#[test]
fn map_shows_holes_and_data_at_real_offsets() {
    if !ready() {
        return;
    }
    let img = nbd::make_image(&nbd::mixed_layout());
    let server = nbd::serve_file(&img.path, &ServeOpts::read_only());
    let map = nbdinfo(&["--map", &server.uri]);
    server.stop();
    // Lines: "offset length type description".
    let got: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "odd --map line: {l:?}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect();
    let want: Vec<(u64, u64, u32)> = nbd::file_extents(&img.path)
        .iter()
        .map(|&(o, n, data)| (o, n, if data { 0 } else { 3 }))
        .collect();
    assert!(
        want.len() >= 7,
        "the test image should have 7 extents: {want:?}"
    );
    assert_eq!(
        got, want,
        "nbdinfo --map vs the file's SEEK_DATA/SEEK_HOLE map:\n{map}"
    );
    assert!(
        map.contains("hole,zero") && map.contains("data"),
        "map text:\n{map}"
    );
}

#[test]
fn json_describes_the_export() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(2 * MIB);
    let opts = ServeOpts {
        export_name: "json-disk".into(),
        description: Some("described".into()),
        read_only: true,
        ..ServeOpts::default()
    };
    let server = nbd::serve_file(&img.path, &opts);
    let text = nbdinfo(&["--json", &server.uri]);
    server.stop();
    let v: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo --json");
    assert_eq!(v["protocol"], "newstyle-fixed", "{text}");
    assert_eq!(v["structured"], true, "{text}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "json-disk", "{text}");
    assert_eq!(e["description"], "described", "{text}");
    assert_eq!(e["export-size"], 2 * MIB, "{text}");
    assert_eq!(e["is_read_only"], true, "{text}");
    assert_eq!(e["can_multi_conn"], true, "{text}");
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation"]),
        "{text}"
    );
    assert_eq!(e["block_size_minimum"], 1, "{text}");
    assert_eq!(e["block_size_preferred"], 4096, "{text}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{text}");
}

#[test]
fn list_names_the_export() {
    if !ready() {
        return;
    }
    let img = nbd::empty_image(MIB);
    let opts = ServeOpts {
        export_name: "listed".into(),
        description: Some("the only one".into()),
        ..ServeOpts::default()
    };
    let server = nbd::serve_file(&img.path, &opts);
    let text = nbdinfo(&["--list", "--json", &server.uri]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo --list --json");
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "one export listed: {text}");
    assert_eq!(exports[0]["export-name"], "listed", "{text}");
    assert_eq!(exports[0]["description"], "the only one", "{text}");
    assert_eq!(exports[0]["export-size"], MIB, "{text}");
    // An unknown export name is refused.
    let out = nbd::run_client_any(Command::new("nbdinfo").arg(server.uri_for("nope")));
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded"
    );
    server.stop();
}
