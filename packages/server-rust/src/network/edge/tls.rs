//! Loading (and reloading) the rustls configuration behind HTTPS/WSS.
//!
//! Certificates are read when the server starts, so a missing file, a PEM without a
//! certificate or a key that does not match the certificate stops
//! [`NetworkModule::start`](crate::network::NetworkModule::start) with an error naming the file,
//! before the node ever reports ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use tokio_util::sync::CancellationToken;

use crate::network::config::TlsConfig;

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file {}: {error}", path.display())]
    Read {
        /// Which file: certificate, private key or client CA.
        what: &'static str,
        /// The path from [`TlsConfig`].
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A file was read but does not hold what it should.
    #[error("invalid {what} file {}: {problem}", path.display())]
    Invalid {
        /// Which file: certificate, private key or client CA.
        what: &'static str,
        /// The path from [`TlsConfig`].
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the combination (for example a key that does not match the certificate).
    #[error("TLS certificate {} and key {} do not work together: {error}", cert.display(), key.display())]
    Rejected {
        /// The certificate path.
        cert: PathBuf,
        /// The key path.
        key: PathBuf,
        /// rustls's reason.
        error: rustls::Error,
    },
}

/// Replaces the server certificate of a running TLS server without a restart.
///
/// Connections already open keep the certificate they were established with; new handshakes
/// use the reloaded one. Obtain it from
/// [`NetworkModule::tls_reloader`](crate::network::NetworkModule::tls_reloader).
#[derive(Clone)]
pub struct TlsReloader {
    paths: TlsConfig,
    live: RustlsConfig,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader").field("paths", &self.paths).finish_non_exhaustive()
    }
}

impl TlsReloader {
    pub(crate) fn load(paths: &TlsConfig) -> Result<Self, TlsError> {
        let config = server_config(paths)?;
        Ok(Self { paths: paths.clone(), live: RustlsConfig::from_config(config) })
    }

    /// Re-reads the certificate, key and client CA from their paths and swaps them in.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the bad file; the server then keeps the certificate it had.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.paths)?;
        self.live.reload_from_config(config);
        tracing::info!(cert = %self.paths.cert_path.display(), "TLS certificate reloaded");
        Ok(())
    }

    pub(crate) fn rustls_config(&self) -> RustlsConfig {
        self.live.clone()
    }
}

fn server_config(paths: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certificates("TLS certificate", &paths.cert_path)?;
    let key_pem = read_file("TLS private key", &paths.key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::Invalid {
        what: "TLS private key",
        path: paths.key_path.clone(),
        problem: format!("no usable PEM private key ({err})"),
    })?;
    let rejected = |error| TlsError::Rejected {
        cert: paths.cert_path.clone(),
        key: paths.key_path.clone(),
        error,
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rejected)?;
    let builder = match &paths.ca_cert_path {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certificates("client CA", ca_path)? {
                roots.add(ca).map_err(|err| TlsError::Invalid {
                    what: "client CA",
                    path: ca_path.clone(),
                    problem: err.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| TlsError::Invalid {
                    what: "client CA",
                    path: ca_path.clone(),
                    problem: err.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(rejected)?;
    // WebSocket upgrades need HTTP/1.1; h2 serves plain requests more efficiently.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { what, path: path.to_owned(), error })
}

fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let invalid = |problem: String| TlsError::Invalid { what, path: path.to_owned(), problem };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("unreadable PEM ({err})")))?;
    if certs.is_empty() {
        return Err(invalid("no PEM certificate found".into()));
    }
    Ok(certs)
}
/// Wraps axum-server's TLS acceptor: counts (and logs at debug level) failed handshakes,
/// which axum-server drops silently, and abandons the handshakes still pending when the
/// listener closes, so a client that never finishes one cannot hold up a shutdown.
#[derive(Clone)]
pub(crate) struct TlsAcceptor<A> {
    pub(crate) inner: A,
    pub(crate) failures: metrics::Counter,
    /// Cancelled when the server stops accepting.
    pub(crate) listener_closed: CancellationToken,
}

impl<I, S, A> axum_server::accept::Accept<I, S> for TlsAcceptor<A>
where
    A: axum_server::accept::Accept<I, S>,
    A::Future: Send + 'static,
{
    type Stream = A::Stream;
    type Service = A::Service;
    type Future =
        futures_util::future::BoxFuture<'static, std::io::Result<(A::Stream, A::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let handshake = self.inner.accept(stream, service);
        let failures = self.failures.clone();
        let listener_closed = self.listener_closed.clone();
        Box::pin(async move {
            let result = tokio::select! {
                result = handshake => result,
                () = listener_closed.cancelled() => {
                    tracing::debug!("TLS handshake abandoned: the server is shutting down");
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server is shutting down",
                    ));
                }
            };
            if let Err(err) = &result {
                failures.increment(1);
                tracing::debug!(%err, "TLS handshake failed");
            }
            result
        })
    }
}
