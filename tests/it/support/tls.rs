//! Test certificates for NBD TLS, made with `openssl` in a temp dir, laid
//! out as qemu's tls-creds-x509 and nbdkit / libnbd expect them:
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem` for the server;
//! `ca-cert.pem`, `client-cert.pem`, `client-key.pem` for clients.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificate directories for one test.
#[derive(Debug)]
pub struct Certs {
    /// The server's directory (`--tls-certificates`).
    pub server: PathBuf,
    /// A client with the CA and a client certificate signed by it.
    pub client: PathBuf,
    /// A client with the CA only (no client certificate).
    pub anonymous: PathBuf,
    /// A client that trusts another CA, with a certificate from that CA.
    pub wrong_ca: PathBuf,
    /// Holds everything.
    _dir: tempfile::TempDir,
}

fn openssl(args: &[&str], cwd: &Path) {
    super::run_ok(Command::new("openssl").args(args).current_dir(cwd));
}

/// A CA (`ca-cert.pem`, `ca-key.pem`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
}

/// A certificate `PREFIX-cert.pem` / `PREFIX-key.pem` in `out`, signed by
/// the CA in `ca`, with the given extensions.
fn make_leaf(ca: &Path, out: &Path, prefix: &str, cn: &str, ext: &str) {
    let ext_file = out.join(format!("{prefix}.ext"));
    std::fs::write(&ext_file, ext).expect("write extensions");
    let key = out.join(format!("{prefix}-key.pem"));
    let csr = out.join(format!("{prefix}.csr"));
    let cert = out.join(format!("{prefix}-cert.pem"));
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
            "-subj",
            &format!("/CN={cn}"),
        ],
        ca,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &s(&cert),
            "-days",
            "2",
            "-extfile",
            &s(&ext_file),
        ],
        ca,
    );
    let _ = std::fs::remove_file(csr);
    let _ = std::fs::remove_file(ext_file);
}

// keyEncipherment as well: qemu's tls-creds-x509 refuses a certificate
// whose key usage does not permit it ("usage does not permit key
// encipherment"), as `certtool` templates for qemu set it.
const SERVER_EXT: &str = "basicConstraints=CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=serverAuth\n\
    subjectAltName=IP:127.0.0.1,DNS:localhost\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

impl Certs {
    /// Make a CA, a server certificate (subjectAltName IP:127.0.0.1 and
    /// DNS:localhost), client certificates, and a second, unrelated CA.
    pub fn make() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let ca = root.join("ca");
        let other = root.join("other-ca");
        let server = root.join("server");
        let client = root.join("client");
        let anonymous = root.join("anonymous");
        let wrong_ca = root.join("wrong-ca");
        for d in [&ca, &other, &server, &client, &anonymous, &wrong_ca] {
            std::fs::create_dir(d).expect("mkdir");
        }
        make_ca(&ca, "nbdbridge test CA");
        make_ca(&other, "another CA");
        make_leaf(&ca, &server, "server", "localhost", SERVER_EXT);
        make_leaf(&ca, &client, "client", "client", CLIENT_EXT);
        make_leaf(&other, &wrong_ca, "client", "stranger", CLIENT_EXT);
        for d in [&server, &client, &anonymous] {
            std::fs::copy(ca.join("ca-cert.pem"), d.join("ca-cert.pem")).expect("copy CA");
        }
        std::fs::copy(other.join("ca-cert.pem"), wrong_ca.join("ca-cert.pem")).expect("copy CA");
        Certs {
            server,
            client,
            anonymous,
            wrong_ca,
            _dir: dir,
        }
    }
}
