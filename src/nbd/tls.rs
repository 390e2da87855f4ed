//! NBD over TLS (`NBD_OPT_STARTTLS`): the modes, and the server credentials
//! loaded from a directory laid out as qemu's `tls-creds-x509` and nbdkit's
//! `--tls-certificates` expect it.
//!
//! - [`TlsMode::On`] offers TLS (SELECTIVETLS in the spec, every export
//!   available both ways); [`TlsMode::Require`] refuses plaintext
//!   (FORCEDTLS): every option but STARTTLS and ABORT gets
//!   `NBD_REP_ERR_TLS_REQD`.
//! - `verify_peer`: clients must present a certificate signed by
//!   `ca-cert.pem` (authorization by certificate).
//!
//! TLS-PSK (nbdkit's `--tls-psk`, qemu's `tls-creds-psk`) is not offered:
//! rustls implements no PSK cipher suites.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// The CA certificate (PEM) clients' certificates must chain to.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain (PEM), leaf first.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub const SERVER_KEY: &str = "server-key.pem";

/// Whether the server offers or requires TLS (nbdkit's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: STARTTLS gets `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// TLS offered; plaintext clients are served too.
    On,
    /// TLS required before any other option.
    Require,
}

/// Why the TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct Error(String);

/// The server side of NBD TLS: the mode and the acceptor.
#[derive(Clone)]
pub struct ServerTls {
    mode: TlsMode,
    acceptor: TlsAcceptor,
    verify_peer: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

impl ServerTls {
    /// Load `server-cert.pem` and `server-key.pem` from `dir` (and, with
    /// `verify_peer`, `ca-cert.pem`). `None` when `mode` is [`TlsMode::Off`].
    ///
    /// # Errors
    /// A file is missing or unreadable, or the key does not match.
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<Option<Self>, Error> {
        if mode == TlsMode::Off {
            return Ok(None);
        }
        let bad = |file: &Path, e: &dyn std::fmt::Display| {
            Error(format!("cannot load {}: {e}", file.display()))
        };
        let cert_path = dir.join(SERVER_CERT);
        let certs = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&cert_path, &e))?;
        if certs.is_empty() {
            return Err(bad(&cert_path, &"no certificate in it"));
        }
        let key_path = dir.join(SERVER_KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error(e.to_string()))?;
        let builder = if verify_peer {
            let ca_path = dir.join(CA_CERT);
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(&ca_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(&ca_path, &e))?;
            for ca in cas {
                roots.add(ca).map_err(|e| bad(&ca_path, &e))?;
            }
            if roots.is_empty() {
                return Err(bad(&ca_path, &"no certificate in it"));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad(&ca_path, &e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            Error(format!(
                "{} and {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
        Ok(Some(ServerTls {
            mode,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verify_peer,
        }))
    }

    /// On or Require.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether clients must present a certificate.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    /// The acceptor that runs the TLS handshake after STARTTLS.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loads_nothing() {
        let r = ServerTls::load(Path::new("/nonexistent"), TlsMode::Off, false);
        assert!(matches!(r, Ok(None)));
    }

    #[test]
    fn missing_files_are_named() {
        let err = ServerTls::load(Path::new("/nonexistent-dir"), TlsMode::Require, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/nonexistent-dir/server-cert.pem"), "{err}");
    }
}
