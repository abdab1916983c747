//! Proxy listeners: accept on TCP or a Unix socket, attest the caller, and hand each
//! connection to one of the worker threads ([`super::worker`]), where the one HTTP server
//! ([`super::http`]) serves it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use super::attest;
use super::worker::Proxy;
use crate::identify::Attestation;
use crate::identify::{Conn, Identity};

/// A bound proxy listener.
pub(crate) enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection, detached from the acceptor's event loop to move to a worker.
enum Accepted {
    Tcp(std::net::TcpStream, SocketAddr),
    Unix(std::os::unix::net::UnixStream),
}

impl Bound {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Bound::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok(Accepted::Tcp(s.into_std()?, peer))
            }
            Bound::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(Accepted::Unix(s.into_std()?))
            }
        }
    }
}

/// Bind a Unix-socket listener: a stale socket from an earlier run is replaced (anything
/// else at the path is an error), and the socket is made connectable by every user, since
/// admission is decided per connection from the kernel's peer credentials.
pub(crate) fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// How a listener serves its connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving {
    /// Drain deadline on shutdown.
    pub(crate) grace: Duration,
    /// A client's first request head must arrive within this; an idle connection is closed
    /// after it.
    pub(crate) header_read: Duration,
    /// Connections open at most.
    pub(crate) max_connections: usize,
}

pub(crate) async fn serve_proxy(
    listener: Bound,
    identity: Arc<Identity>,
    callers: Option<Arc<[u32]>>,
    workers: Arc<Vec<(tokio::runtime::Handle, Arc<Proxy>)>>,
    mut shutdown: watch::Receiver<bool>,
    serving: Serving,
) {
    let Serving {
        grace,
        header_read,
        max_connections,
    } = serving;
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(super::http::builder(header_read));
    let mut next = 0usize;
    let metrics = workers[0].1.pipeline.metrics.clone();
    let stage = crate::metrics::StageLabel {
        stage: identity.stage.clone(),
    };
    let open_gauge = metrics.connections_open.get_or_create(&stage).clone();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let accepted = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Each listener keeps at most max_connections open, so one stage's (or one
                // client's) connections cannot take the descriptors every listener needs.
                if open.load(std::sync::atomic::Ordering::Acquire) >= max_connections {
                    metrics.connections_refused.get_or_create(&stage).inc();
                    refuse(accepted, max_connections);
                    continue;
                }
                let held = Held::new(open.clone(), open_gauge.clone());
                // Round-robin over the workers; the socket moves to the worker's event loop.
                let (handle, proxy) = &workers[next % workers.len()];
                next = next.wrapping_add(1);
                let (identity, callers, proxy, builder, watcher) = (identity.clone(), callers.clone(), proxy.clone(), builder.clone(), graceful.watcher());
                handle.spawn(async move {
                    let _held = held;
                    // Attested on the worker, once per connection: reading the kernel's
                    // socket table is a few file reads, off the accept loop.
                    match accepted {
                        Accepted::Tcp(stream, peer) => {
                            let Ok(stream) = TcpStream::from_std(stream) else { return };
                            let _ = stream.set_nodelay(true);
                            let attestation = match (stream.local_addr(), callers.as_deref()) {
                                (_, None) => Attestation::Unchecked,
                                (Ok(local), admitted) => attest::attest(peer, local, admitted),
                                (Err(e), _) => Attestation::Refused(format!("caller not attested: {e}")),
                            };
                            let conn = conn(identity, peer, peer.to_string(), attestation);
                            serve_conn(stream, conn, proxy, &builder, watcher).await;
                        }
                        Accepted::Unix(stream) => {
                            let Ok(stream) = UnixStream::from_std(stream) else { return };
                            let (attestation, label) = match stream.peer_cred() {
                                Ok(cred) => (
                                    attest::attest_uid(cred.uid(), "the connection", callers.as_deref()),
                                    format!("unix:pid={}", cred.pid().unwrap_or(0)),
                                ),
                                Err(e) => (
                                    Attestation::Refused(format!("caller not attested: no peer credentials: {e}")),
                                    "unix".to_string(),
                                ),
                            };
                            // A local caller: policy sees the loopback address.
                            let local = SocketAddr::from(([127, 0, 0, 1], 0));
                            let conn = conn(identity, local, label, attestation);
                            serve_conn(stream, conn, proxy, &builder, watcher).await;
                        }
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(workers);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, "in-flight requests still running at the shutdown deadline; closing them");
    }
}

/// A connection counted open until it ends.
struct Held {
    open: Arc<std::sync::atomic::AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Held {
    fn new(
        open: Arc<std::sync::atomic::AtomicUsize>,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Held {
        open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        gauge.inc();
        Held { open, gauge }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Answer a connection over the cap with a 503 that says why (best effort: written only if
/// the socket takes it at once), and close it.
fn refuse(accepted: Accepted, max: usize) {
    let body = format!(
        r#"{{"error":"too_many_connections","reason":"this listener has {max} connections open (max_connections)"}}"#
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    match accepted {
        Accepted::Tcp(s, _) => {
            let _ = s.set_nonblocking(true);
            let _ = std::io::Write::write(&mut &s, answer.as_bytes());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        Accepted::Unix(s) => {
            let _ = s.set_nonblocking(true);
            let _ = std::io::Write::write(&mut &s, answer.as_bytes());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn conn(
    identity: Arc<Identity>,
    client: SocketAddr,
    label: String,
    attestation: Attestation,
) -> Arc<Conn> {
    if let Attestation::Refused(why) = &attestation {
        tracing::warn!(client = %label, stage = %identity.stage, reason = %why, "caller refused on a stage listener");
    }
    Arc::new(Conn {
        identity,
        client,
        label,
        attestation,
    })
}

async fn serve_conn<I>(
    io: I,
    conn: Arc<Conn>,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let label = conn.label.clone();
    let (io, heads) = super::framing::Watched::new(io);
    let (logger, caller) = (proxy.pipeline.clone(), conn.clone());
    let header_read = proxy.pipeline.timeouts.header_read;
    let watched = heads.clone();
    let svc = service_fn(move |mut req| {
        watched.mark(&mut req);
        let in_flight = watched.begin();
        let (p, c) = (proxy.clone(), conn.clone());
        async move {
            let _in_flight = in_flight;
            Ok::<_, Infallible>(p.serve(c, None, req).await)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    match super::framing::serve_watched(watcher.watch(conn), &heads, header_read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // A request the parser refused never reached a stage; it gets its line here.
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                logger.refused_by_parser(&caller, h);
            }
            tracing::debug!(client = %label, error = %e, "client connection ended with an error");
        }
        Err(why) => {
            logger
                .metrics
                .connections_closed
                .get_or_create(&crate::metrics::ClosedLabels {
                    stage: caller.identity.stage.clone(),
                    reason: why.as_str(),
                })
                .inc();
            tracing::debug!(client = %label, reason = why.as_str(), "client connection closed");
        }
    }
}
