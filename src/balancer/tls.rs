//! HTTPS for clients: rustls terminating TLS on a listener of its own
//! beside the plain one, offering h2 and HTTP/1.1 by ALPN.
//!
//! The certificate and key are read into a [`Tls`] handle; each new
//! connection takes the configuration current when it is accepted, so
//! [`Tls::reload`] (the binary calls it on SIGHUP) swaps the certificate
//! for new connections while open ones keep the session they have. A
//! reload that fails keeps the certificate in use.
//!
//! The handshake runs inside the connection's own task, on its first read
//! or write ([`Stream`]), so a slow handshake never holds the accept loop.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{Accept, TlsAcceptor};

/// Why a certificate or key could not be used. Each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificates in {path}")]
    Certificate {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read a private key in {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("the certificate in {certificate} and the key in {key} cannot serve TLS")]
    Config {
        certificate: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The HTTPS listener's certificate, reloadable; shared with whoever
/// triggers the reloads.
#[derive(Debug)]
pub struct Tls {
    certificate: PathBuf,
    key: PathBuf,
    config: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Reads the PEM certificate chain and private key.
    pub fn load(
        certificate: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<Arc<Tls>, TlsError> {
        let (certificate, key) = (certificate.into(), key.into());
        let config = server_config(&certificate, &key)?;
        Ok(Arc::new(Tls {
            certificate,
            key,
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Reads both files again; new connections get the new certificate,
    /// open ones are not touched. On an error the certificate in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.certificate, &self.key)?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The certificate file, for logs.
    pub fn certificate(&self) -> &Path {
        &self.certificate
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }
}

fn server_config(certificate: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: certificate.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: certificate.to_owned(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_owned(),
        source,
    })?;
    let config_error = |source| TlsError::Config {
        certificate: certificate.to_owned(),
        key: key.to_owned(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Marks a request that came over TLS, for `X-Forwarded-Proto`.
#[derive(Debug, Clone, Copy)]
struct Secure;

/// Marks `request` as having come over TLS when `secure`.
pub fn mark<B>(request: &mut http::Request<B>, secure: bool) {
    if secure {
        request.extensions_mut().insert(Secure);
    }
}

/// Whether the request was [`mark`]ed as come over TLS.
pub(crate) fn is_secure(extensions: &http::Extensions) -> bool {
    extensions.get::<Secure>().is_some()
}

/// A client connection: plain TCP, or TLS whose handshake runs on the
/// first read or write.
pub enum Stream {
    Plain(TcpStream),
    Handshaking(Box<Accept<TcpStream>>),
    Tls(Box<TlsStream<TcpStream>>),
    /// The handshake failed; the error was returned once.
    Failed,
}

impl Stream {
    /// `stream` as is, or to be wrapped in TLS with the certificate current
    /// now.
    pub fn new(stream: TcpStream, tls: Option<&Tls>) -> Stream {
        match tls {
            None => Stream::Plain(stream),
            Some(tls) => Stream::Handshaking(Box::new(tls.acceptor().accept(stream))),
        }
    }

    /// Drives the handshake; then the stream to read and write.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Pin<&mut dyn Io>>> {
        if let Stream::Handshaking(accept) = self {
            match ready!(Pin::new(accept.as_mut()).poll(cx)) {
                Ok(tls) => *self = Stream::Tls(Box::new(tls)),
                Err(error) => {
                    *self = Stream::Failed;
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(match self {
            Stream::Plain(stream) => Ok(Pin::new(stream as &mut dyn Io)),
            Stream::Tls(stream) => Ok(Pin::new(stream.as_mut() as &mut dyn Io)),
            Stream::Handshaking(_) | Stream::Failed => Err(io::ErrorKind::NotConnected.into()),
        })
    }
}

/// What [`Stream`] reads and writes through.
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

// Plain TCP, the common case, is called directly rather than through
// `dyn Io`, so that its calls can be inlined.
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Stream::Plain(stream) = this {
            return Pin::new(stream).poll_read(cx, buf);
        }
        ready!(this.poll_ready(cx))?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Stream::Plain(stream) = this {
            return Pin::new(stream).poll_write(cx, buf);
        }
        ready!(this.poll_ready(cx))?.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Stream::Plain(stream) = this {
            return Pin::new(stream).poll_flush(cx);
        }
        ready!(this.poll_ready(cx))?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.get_mut().poll_ready(cx))?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_bad_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let error = Tls::load(&missing, &garbage).expect_err("no such file");
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let error = Tls::load(&garbage, &garbage).expect_err("no certificate");
        assert_eq!(
            error.to_string(),
            format!("{} holds no PEM certificate", garbage.display())
        );
    }
}
