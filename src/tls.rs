//! TLS and mutual TLS on the gRPC port, with certificates that rotate without a restart.
//!
//! tonic's built-in TLS fixes the certificate when the server starts, so the gateway accepts TLS
//! itself: a task accepts TCP connections, runs each handshake in its own task (a slow client
//! cannot hold up the others), and hands finished connections to tonic through
//! `serve_with_incoming_shutdown`. Every handshake takes the rustls `ServerConfig` in force at
//! that moment; a reload (SIGHUP, or the files' content changing) builds a new one from the
//! files and swaps it in. Swapping the whole config rather than only the certified key (a
//! `ResolvesServerCert`) is what lets the client CA rotate too; connections already open keep
//! their session and are not dropped. A reload that fails (a half-written file, a key that does
//! not match its certificate) leaves the previous config serving.
//!
//! With a client CA, connecting clients must present a certificate it signed (or may, with
//! `CXGW_TLS_CLIENT_AUTH=optional`); its common name and subject alternative names (DNS, URI,
//! e-mail) travel with the connection as [`TlsConnectInfo`], where the auth layer maps them to a
//! caller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::shutdown::Drain;

/// Whether clients must present a certificate when a client CA is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Connections without a certificate signed by the client CA are refused in the handshake.
    Required,
    /// A certificate is verified when sent; callers without one authenticate with a token.
    Optional,
}

/// The files TLS is built from (`CXGW_TLS_*`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM bundle of the CAs that sign client certificates; set for mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Longest a TLS handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
}

/// The TLS configuration in force, rebuilt from the files on reload.
pub struct ReloadingTls {
    settings: TlsSettings,
    state: RwLock<Loaded>,
}

struct Loaded {
    config: Arc<rustls::ServerConfig>,
    /// SHA-256 over the files' bytes, to skip rebuilding when nothing changed.
    digest: [u8; 32],
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(settings: &TlsSettings) -> anyhow::Result<Files> {
        let read = |setting: &str, path: &PathBuf| {
            std::fs::read(path)
                .with_context(|| format!("{setting}: cannot read `{}`", path.display()))
        };
        Ok(Files {
            cert: read("CXGW_TLS_CERT_FILE", &settings.cert_file)?,
            key: read("CXGW_TLS_KEY_FILE", &settings.key_file)?,
            client_ca: settings
                .client_ca_file
                .as_ref()
                .map(|path| read("CXGW_TLS_CLIENT_CA_FILE", path))
                .transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            // Length-prefixed so that moving bytes from one file to the next changes the digest.
            let bytes = part.map_or(&[][..], Vec::as_slice);
            context.update(&(bytes.len() as u64).to_be_bytes());
            context.update(bytes);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        out
    }
}

impl ReloadingTls {
    /// Builds the first configuration; an error names the setting whose file is wrong.
    pub fn load(settings: TlsSettings) -> anyhow::Result<ReloadingTls> {
        let files = Files::read(&settings)?;
        let config = build(&settings, &files)?;
        Ok(ReloadingTls {
            state: RwLock::new(Loaded {
                config: Arc::new(config),
                digest: files.digest(),
            }),
            settings,
        })
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // Only an `Arc` is cloned or replaced under the lock, so a poisoned lock is consistent.
        Arc::clone(
            &self
                .state
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .config,
        )
    }

    /// Reads the files again; returns whether a new configuration is now in force.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let files = Files::read(&self.settings)?;
        let digest = files.digest();
        if self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .digest
            == digest
        {
            return Ok(false);
        }
        let config = build(&self.settings, &files)?;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Loaded {
            config: Arc::new(config),
            digest,
        };
        Ok(true)
    }
}

fn build(settings: &TlsSettings, files: &Files) -> anyhow::Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("CXGW_TLS_CERT_FILE: not a PEM certificate chain")?;
    anyhow::ensure!(
        !certs.is_empty(),
        "CXGW_TLS_CERT_FILE: no certificate in `{}`",
        settings.cert_file.display()
    );
    // The error of a key parse is not shown: it could quote key material.
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|_| {
        anyhow::anyhow!(
            "CXGW_TLS_KEY_FILE: no PEM private key in `{}`",
            settings.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no safe protocol version")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.context("CXGW_TLS_CLIENT_CA_FILE: not a PEM certificate")?;
                roots
                    .add(cert)
                    .context("CXGW_TLS_CLIENT_CA_FILE: not a usable CA certificate")?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "CXGW_TLS_CLIENT_CA_FILE: no certificate in the file"
            );
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            }
            .build()
            .context("CXGW_TLS_CLIENT_CA_FILE: cannot build the client verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("CXGW_TLS_CERT_FILE and CXGW_TLS_KEY_FILE do not form a usable key pair")?;
    // gRPC runs over HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What tonic puts in every request's extensions for a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    remote_addr: Option<SocketAddr>,
    client_names: Option<Arc<[String]>>,
}

impl TlsConnectInfo {
    pub fn new(remote_addr: Option<SocketAddr>, client_names: Option<Vec<String>>) -> Self {
        Self {
            remote_addr,
            client_names: client_names.map(Arc::from),
        }
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// The verified client certificate's common name and subject alternative names, if the
    /// client presented one.
    pub fn client_names(&self) -> Option<&[String]> {
        self.client_names.as_deref()
    }
}

/// One accepted TLS connection, as tonic serves it.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The common name and subject alternative names of a DER certificate. A certificate that does
/// not parse yields no names (the handshake already verified it; it just identifies nobody).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_cert::Certificate;
    use x509_cert::der::Decode as _;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;

    let Ok(cert) = Certificate::from_der(der) else {
        return Vec::new();
    };
    let tbs = cert.tbs_certificate();
    let mut names = Vec::new();
    if let Ok(Some(common_name)) = tbs.subject().common_name() {
        names.push(common_name.value().into_owned());
    }
    if let Ok(Some((_critical, SubjectAltName(general_names)))) =
        tbs.get_extension::<SubjectAltName>()
    {
        for name in general_names {
            match name {
                GeneralName::DnsName(name)
                | GeneralName::UniformResourceIdentifier(name)
                | GeneralName::Rfc822Name(name) => names.push(name.to_string()),
                _ => {}
            }
        }
    }
    names
}

/// Channel capacity between the acceptor and tonic: finished handshakes waiting to be served.
/// tonic takes them as fast as it can spawn a connection task, so a handful is plenty.
const ACCEPTED_BACKLOG: usize = 64;
/// Handshakes in progress at once; beyond this, new TCP connections wait to be handshaken, so a
/// flood of idle connections cannot make the gateway hold unbounded handshake state.
const MAX_CONCURRENT_HANDSHAKES: usize = 512;

/// Accepts TCP connections on `listener`, handshakes each with the configuration in force, and
/// yields the finished connections until `drain` fires.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    drain: Drain,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConnection>> {
    let (sender, receiver) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(accept_loop(listener, tls, drain, sender));
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    drain: Drain,
    sender: mpsc::Sender<std::io::Result<TlsConnection>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let timeout = tls.settings().handshake_timeout;
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return,
            },
            () = drain.clone().signaled() => return,
        };
        let (tcp, remote_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and similar: pause rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.clone().signaled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let sender = sender.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let client_names = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| certificate_names(leaf.as_ref()));
                    let info = TlsConnectInfo::new(Some(remote_addr), client_names);
                    // A closed channel means the server stopped; the connection just closes.
                    let _ = sender.send(Ok(TlsConnection { stream, info })).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(peer = %remote_addr, %error, "tls handshake failed");
                }
                Err(_elapsed) => {
                    tracing::debug!(peer = %remote_addr, "tls handshake timed out");
                }
            }
        });
    }
}
