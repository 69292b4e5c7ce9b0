//! Optional TLS for the HTTP and Postgres listeners: a PEM certificate chain and key
//! loaded into a rustls `ServerConfig`, and an `axum::serve::Listener` that completes the
//! TLS handshake before a connection reaches the router (Firehose delivers only to
//! HTTPS endpoints).
//!
//! rustls and tokio-rustls are reached through pgwire's re-export, the ones the Postgres
//! listener uses, so both listeners share one TLS stack.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datafusion_postgres::pgwire::tokio::tokio_rustls;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{debug, warn};

pub use tokio_rustls::TlsAcceptor;
pub use tokio_rustls::rustls::ServerConfig;

/// The stream [`TlsListener`] yields.
pub type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// ALPN of the HTTP listener (axum serves HTTP/1.1).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN of the Postgres listener, which clients connecting with direct TLS require.
pub const ALPN_POSTGRES: &[u8] = b"postgresql";

/// How long a client has to complete the TLS handshake on the HTTP listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server configuration from a PEM certificate chain (leaf first) and a PEM private
/// key (PKCS#8, PKCS#1 or SEC1), offering the `alpn` protocols; TLS 1.2 and 1.3.
///
/// The ring provider is named: rustls is built with two providers here, so it could not
/// pick a process default by itself.
pub fn server_config(cert: &Path, key: &Path, alpn: &[&[u8]]) -> io::Result<Arc<ServerConfig>> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("reading certificates from {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(bad(format!("no certificate in {}", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(format!(
            "reading the private key from {}: {e}",
            key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            bad(format!(
                "certificate {} and key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TCP listener that yields connections once their TLS handshake succeeded.
/// Handshakes run concurrently, each bounded by a timeout, so a slow or failing client
/// delays nobody else and never ends the accept loop.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream, SocketAddr)>>,
}

impl TlsListener {
    /// Wraps a bound listener.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> Self {
        Self {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Both branches are cancel-safe: axum drops this future at shutdown.
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            let error = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => return Some((tls, peer)),
                                Ok(Err(error)) => error.to_string(),
                                Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                            };
                            debug!(%peer, %error, "tls handshake failed");
                            ::metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES).increment(1);
                            None
                        });
                    }
                    Err(error) => match error.kind() {
                        io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset => {}
                        _ => {
                            warn!(%error, "https accept failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}
