//! What a CONNECT tunnel carries, once answered 200: its first byte tells. Plain HTTP is
//! served through the pipeline (scheme `http`). TLS is intercepted (read the app's
//! ClientHello, present a leaf certificate for the requested name signed by the local CA,
//! then serve the decrypted HTTP/1.1 or HTTP/2 requests through the same pipeline, scheme
//! `https`), spliced unseen, or refused, as the pipeline's plan said.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::TlsSettings;
use super::rewind::Rewind;
use super::sniff::{Seen, sniff};
use super::worker::Proxy;
use crate::target::Target;
use crate::tls::{LeafIssuer, TlsError};

/// Everything interception needs, shared by all connections.
pub(crate) struct Interceptor {
    issuer: Arc<LeafIssuer>,
    sessions: Arc<ServerSessionMemoryCache>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The default provider with AES-128-GCM-SHA256 chosen first ([`app_hop_provider`]).
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The crypto the app's side of an intercepted tunnel is served with: rustls' defaults, with
/// the server's order of cipher suites, AES-128-GCM with SHA-256 first (as Go's TLS server
/// orders them when the CPU has AES instructions). Clients list AES-256-GCM with SHA-384
/// first, and SHA-384 runs on SHA-512, which x86 CPUs mostly lack instructions for: the
/// handshake's key schedule and transcript hash cost more with it than the whole signature
/// (BENCHMARKS.md, issue 21). AES-128 is 128-bit security, on a hop that does not leave the
/// pod. The upstream hop keeps rustls' client defaults.
fn app_hop_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    provider
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl Interceptor {
    /// Build from validated settings; `None` when no CA is configured.
    pub(crate) fn new(settings: &TlsSettings) -> Result<Option<Self>, TlsError> {
        use secrecy::ExposeSecret;
        let Some((cert, key)) = &settings.ca else {
            return Ok(None);
        };
        Ok(Some(Interceptor {
            issuer: Arc::new(LeafIssuer::from_pem(cert, key.expose_secret())?),
            // Shared across connections so returning clients resume their TLS sessions.
            sessions: ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsError(e.to_string()))?,
            provider: Arc::new(app_hop_provider()),
        }))
    }

    async fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let cert = self.issuer.get(name).await?;
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(cert)));
        cfg.ignore_client_order = true;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg.session_storage = self.sessions.clone();
        cfg.ticketer = self.ticketer.clone();
        Ok(Arc::new(cfg))
    }
}

/// What to do with a tunnel that turns out to carry TLS.
#[derive(Debug)]
pub(crate) enum OnTls {
    /// Terminate it with a leaf from the local CA and serve the requests inside.
    Terminate,
    /// Splice it, unseen, to this connection to the destination, until both sides close or
    /// nothing moves for the duration.
    Splice(TcpStream, Duration),
    /// Close it: only plain HTTP may pass.
    Refuse,
}

/// What a CONNECT tunnel carried, once it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Carried {
    /// Plain HTTP: the requests served.
    Plain(u64),
    /// TLS, terminated here: the requests served.
    Terminated(u64),
    /// TLS, spliced unseen: bytes from and to the app, and the error that ended it.
    Spliced {
        /// Bytes from the app.
        up: u64,
        /// Bytes to the app.
        down: u64,
        /// Why it ended, if not by both sides closing.
        error: Option<String>,
    },
}

/// Serve what a CONNECT tunnel carries, as its first bytes tell ([`sniff`]): plain HTTP, which
/// clients such as undici's proxy agents and Python WebSocket clients tunnel for `http://` and
/// `ws://` URLs, is served as it is, each request through the pipeline on its own; TLS is
/// handled as `on_tls` says; any other protocol is spliced when the tunnel may be blind
/// (`on_tls` splices) and refused otherwise. Returns what was carried, or why the tunnel
/// failed before a request.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    conn: Arc<crate::identify::Conn>,
    mut origin: Target,
    upgraded: Upgraded,
    on_tls: OnTls,
) -> Result<Carried, String> {
    let drain = proxy.drain.clone();
    let _guard = drain.enter();
    let handshake_timeout = proxy.pipeline.timeouts.header_read;
    let mut io = TokioIo::new(upgraded);
    let server = match &on_tls {
        OnTls::Splice(upstream, _) => Some(upstream),
        _ => None,
    };
    let (seen, read) = sniff(&mut io, handshake_timeout, server).await?;
    let io = Rewind::new(read, io);
    let interceptor = match (seen, on_tls, proxy.interceptor.clone()) {
        (Seen::Http, ..) => {
            origin.scheme = "http";
            let requests = serve_http(proxy, conn, origin, io).await;
            return Ok(Carried::Plain(requests));
        }
        (_, OnTls::Splice(upstream, idle), _) => {
            let (up, down, error) = super::connect::splice(io, upstream, idle).await;
            return Ok(Carried::Spliced { up, down, error });
        }
        (Seen::Tls, OnTls::Terminate, Some(i)) => i,
        (Seen::Tls, OnTls::Terminate, None) => {
            return Err("interception is not configured".into());
        }
        (Seen::Tls, OnTls::Refuse, _) => {
            return Err(
                "the tunnel carries TLS, which cannot pass: a route injects a credential here and no CA is configured to intercept (set tls.ca_cert and tls.ca_key)"
                    .into(),
            );
        }
        // Neither HTTP nor TLS, in a tunnel opened for requests to be seen: nothing to serve,
        // and policy permitted no blind tunnel.
        (Seen::Other | Seen::ServerFirst, ..) => {
            return Err(
                "the tunnel carries neither HTTP nor TLS; only a CONNECT that policy permits as a blind tunnel may carry other protocols"
                    .into(),
            );
        }
    };
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io)
            .await
            .map_err(|e| format!("reading the ClientHello failed: {e}"))?;
        // The certificate names what the app asked for (SNI), else the CONNECT host.
        let name = start
            .client_hello()
            .server_name()
            .map(str::to_ascii_lowercase)
            .unwrap_or_else(|| origin.host.clone());
        let config = interceptor
            .server_config(&name)
            .await
            .map_err(|e| e.to_string())?;
        start
            .into_stream(config)
            .await
            .map_err(|e| format!("TLS handshake with the app failed: {e}"))
    };
    let tls = match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!(
                "TLS handshake with the app did not finish within {handshake_timeout:?}"
            ));
        }
    };
    origin.scheme = "https";
    let requests = serve_http(proxy, conn, origin, tls).await;
    Ok(Carried::Terminated(requests))
}

/// Serve the requests on a tunnel's stream (decrypted, or plain) through the pipeline, with
/// `origin` as every request's destination; returns how many were served.
async fn serve_http<I>(
    proxy: Arc<Proxy>,
    conn: Arc<crate::identify::Conn>,
    origin: Target,
    io: I,
) -> u64
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let worker = proxy.clone();
    let served = Arc::new(AtomicU64::new(0));
    let conn_client = conn.client;
    let counter = served.clone();
    let origin = Arc::new(origin);
    let (logger, caller) = (proxy.pipeline.clone(), conn.clone());
    let (io, heads) = super::framing::Watched::new(io);
    let svc = service_fn(move |mut req| {
        heads.mark(&mut req);
        counter.fetch_add(1, Ordering::Relaxed);
        let (p, c, o) = (proxy.clone(), conn.clone(), origin.clone());
        async move { Ok::<_, std::convert::Infallible>(p.serve(c, Some(o), req).await) }
    });
    // Boxed, as on the listener: awaited by value, the connection's state is copied into
    // each future on the way (`proxy::listener::serve_conn`).
    let result = Box::pin(worker.server.serve(io, svc).until_drained(&worker.drain)).await;
    if let Err(e) = result {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            logger.refused_by_parser(&caller, h);
        }
        tracing::debug!(client = %conn_client, error = %e, "intercepted connection ended with an error");
    }
    served.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that lists AES-256-GCM-SHA384 first (rustls' and OpenSSL's default order)
    /// is served AES-128-GCM-SHA256: the server's order decides on the app's hop.
    #[tokio::test]
    async fn the_app_hop_prefers_aes_128_gcm_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::tls::init_ca(dir.path(), 30, false).unwrap();
        let cert = std::fs::read_to_string(cert).unwrap();
        let settings = TlsSettings {
            ca: Some((cert.clone(), std::fs::read_to_string(key).unwrap().into())),
            ..TlsSettings::default()
        };
        let interceptor = Interceptor::new(&settings).unwrap().unwrap();
        let server_cfg = interceptor.server_config("api.example.org").await.unwrap();

        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let client_cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        assert_eq!(
            client_cfg.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client prefers AES-256"
        );
        let name = rustls::pki_types::ServerName::try_from("api.example.org").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        // Shuttle records both ways until both sides are done with the handshake.
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking(), "the handshake completed");
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}
