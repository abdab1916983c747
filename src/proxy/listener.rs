//! Proxy listeners: accept on TCP or a Unix socket, attest the caller, and serve each
//! connection on one of the worker threads ([`super::worker`]) with the one HTTP server
//! ([`super::http`]).
//!
//! A TCP listener is one socket per worker, all bound to the address with `SO_REUSEPORT`:
//! the kernel spreads new connections over them, and each worker accepts on its own event
//! loop. A connection is then accepted, attested and served on one thread, with no handoff.
//! Accepting on one thread and handing each socket to a worker cost a second thread's wakeup
//! per connection: 13% of the sidecar's CPU for clients that open a connection per request
//! (`benches/profile.sh --new-conns`, BENCHMARKS.md). A Unix-socket listener keeps one
//! acceptor that hands connections out in turn (Linux does not spread Unix sockets).
//!
//! `SO_REUSEPORT` lets another socket of the same user join the group. Before binding, a
//! probe without it must bind the address, so a second sidecar (or anything else) already
//! listening there is an error at start, as it was; only a process running as the sidecar's
//! own user could join afterwards, and that user is the sidecar's alone (deploy/README.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use super::attest;
use super::worker::Proxy;
use crate::identify::Attestation;
use crate::identify::{Conn, Identity};

/// A bound proxy listener.
pub(crate) enum Bound {
    /// One socket per worker, bound to one address ([`bind_tcp`]).
    Tcp(Vec<std::net::TcpListener>),
    Unix(UnixListener),
}

/// Bind `n` sockets to `addr` with `SO_REUSEPORT`, one for each worker's event loop. The
/// address must be free: a probe without `SO_REUSEPORT` binds it first (see the module's
/// comment). With port 0, the first socket's port is the others'.
pub(crate) fn bind_tcp(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |a: SocketAddr| -> std::io::Result<tokio::net::TcpSocket> {
        let s = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        Ok(s)
    };
    let mut addr = addr;
    if addr.port() != 0 {
        let probe = socket(addr)?;
        probe.bind(addr)?;
        drop(probe.listen(1)?);
    }
    let mut bound = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let s = socket(addr)?;
        s.set_reuseport(true)?;
        s.bind(addr)?;
        let l = s.listen(1024)?;
        addr = l.local_addr()?;
        // Out of the binding runtime: each is registered on its worker's event loop.
        bound.push(l.into_std()?);
    }
    Ok(bound)
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
    /// Connections open at most.
    pub(crate) max_connections: usize,
}

/// What every acceptor of one listener shares.
struct Listening {
    identity: Arc<Identity>,
    callers: Option<Arc<[u32]>>,
    serving: Serving,
    /// Connections open on this listener, across its acceptors.
    open: Arc<AtomicUsize>,
    open_gauge: prometheus_client::metrics::gauge::Gauge,
    refused: prometheus_client::metrics::counter::Counter,
}

impl Listening {
    /// Count a new connection open, or `None` when the listener is at `max_connections`.
    /// Each listener keeps at most that many open, so one stage's (or one client's)
    /// connections cannot take the descriptors every listener needs.
    fn admit(&self) -> Option<Held> {
        if self.open.load(Ordering::Acquire) >= self.serving.max_connections {
            self.refused.inc();
            return None;
        }
        Some(Held::new(self.open.clone(), self.open_gauge.clone()))
    }
}

pub(crate) async fn serve_proxy(
    listener: Bound,
    identity: Arc<Identity>,
    callers: Option<Arc<[u32]>>,
    workers: Arc<Vec<(tokio::runtime::Handle, Arc<Proxy>)>>,
    shutdown: watch::Receiver<bool>,
    serving: Serving,
) {
    let metrics = workers[0].1.pipeline.metrics.clone();
    let stage = crate::metrics::StageLabel {
        stage: identity.stage.clone(),
    };
    let listening = Arc::new(Listening {
        open_gauge: metrics.connections_open.get_or_create(&stage).clone(),
        refused: metrics.connections_refused.get_or_create(&stage).clone(),
        open: Arc::default(),
        identity,
        callers,
        serving,
    });
    match listener {
        Bound::Tcp(sockets) => {
            // One socket per worker as bound; cycled so that no socket, whose share of new
            // connections the kernel has already chosen, is left without an acceptor.
            let acceptors: Vec<_> = sockets
                .into_iter()
                .zip(workers.iter().cycle())
                .map(|(socket, (handle, proxy))| {
                    handle.spawn(accept_tcp(
                        socket,
                        listening.clone(),
                        proxy.clone(),
                        shutdown.clone(),
                    ))
                })
                .collect();
            drop(workers);
            for a in acceptors {
                let _ = a.await;
            }
        }
        Bound::Unix(l) => accept_unix(l, listening, workers, shutdown).await,
    }
}

/// One worker's acceptor on its own socket of a TCP listener: connections are attested and
/// served on this worker's event loop.
async fn accept_tcp(
    socket: std::net::TcpListener,
    listening: Arc<Listening>,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "a worker cannot accept on its listener socket");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                };
                let Some(held) = listening.admit() else {
                    if let Ok(s) = stream.into_std() {
                        refuse(&s, listening.serving.max_connections);
                    }
                    continue;
                };
                let (listening, proxy) = (listening.clone(), proxy.clone());
                tokio::spawn(async move {
                    let _held = held;
                    let _ = stream.set_nodelay(true);
                    let conn = tcp_conn(&listening, &stream, peer);
                    serve_conn(stream, conn, proxy).await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    // Connections already accepted finish on their own: each saw the shutdown signal
    // through the drain ([`super::http::Connection::until_drained`]).
    drop(listener);
}

/// A Unix-socket listener's one acceptor: each connection goes to the next worker.
async fn accept_unix(
    listener: UnixListener,
    listening: Arc<Listening>,
    workers: Arc<Vec<(tokio::runtime::Handle, Arc<Proxy>)>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next = 0usize;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted.and_then(|(s, _)| s.into_std()) {
                    Ok(s) => s,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                };
                let Some(held) = listening.admit() else {
                    refuse(&stream, listening.serving.max_connections);
                    continue;
                };
                // The socket moves to the worker's event loop.
                let (handle, proxy) = &workers[next % workers.len()];
                next = next.wrapping_add(1);
                let (listening, proxy) = (listening.clone(), proxy.clone());
                handle.spawn(async move {
                    let _held = held;
                    let Ok(stream) = UnixStream::from_std(stream) else { return };
                    let (attestation, label) = match stream.peer_cred() {
                        Ok(cred) => (
                            attest::attest_uid(cred.uid(), "the connection", listening.callers.as_deref()),
                            format!("unix:pid={}", cred.pid().unwrap_or(0)),
                        ),
                        Err(e) => (
                            Attestation::Refused(format!("caller not attested: no peer credentials: {e}")),
                            "unix".to_string(),
                        ),
                    };
                    // A local caller: policy sees the loopback address.
                    let local = SocketAddr::from(([127, 0, 0, 1], 0));
                    let conn = conn(listening.identity.clone(), local, label, attestation);
                    serve_conn(stream, conn, proxy).await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(workers);
}

/// The caller of a TCP connection, attested once per connection when the listener admits
/// only some UIDs (reading the kernel's socket table is a few file reads).
fn tcp_conn(listening: &Listening, stream: &TcpStream, peer: SocketAddr) -> Arc<Conn> {
    let attestation = match (stream.local_addr(), listening.callers.as_deref()) {
        (_, None) => Attestation::Unchecked,
        (Ok(local), admitted) => attest::attest(peer, local, admitted),
        (Err(e), _) => Attestation::Refused(format!("caller not attested: {e}")),
    };
    conn(
        listening.identity.clone(),
        peer,
        peer.to_string(),
        attestation,
    )
}

/// An accept failed (out of file descriptors and the like): back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A connection counted open until it ends.
struct Held {
    open: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Held {
    fn new(open: Arc<AtomicUsize>, gauge: prometheus_client::metrics::gauge::Gauge) -> Held {
        open.fetch_add(1, Ordering::AcqRel);
        gauge.inc();
        Held { open, gauge }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Answer a connection over the cap with a 503 that says why (best effort: written only if
/// the socket takes it at once), and close it.
fn refuse<S>(s: &S, max: usize)
where
    for<'a> &'a S: std::io::Write,
    S: Shutdown,
{
    let body = format!(
        r#"{{"error":"too_many_connections","reason":"this listener has {max} connections open (max_connections)"}}"#
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.nonblocking();
    let _ = std::io::Write::write(&mut &*s, answer.as_bytes());
    s.close();
}

/// The two std sockets [`refuse`] answers on.
trait Shutdown {
    fn nonblocking(&self);
    fn close(&self);
}

impl Shutdown for std::net::TcpStream {
    fn nonblocking(&self) {
        let _ = self.set_nonblocking(true);
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Shutdown for std::os::unix::net::UnixStream {
    fn nonblocking(&self) {
        let _ = self.set_nonblocking(true);
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
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

async fn serve_conn<I>(io: I, conn: Arc<Conn>, proxy: Arc<Proxy>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let label = conn.label.clone();
    let (io, heads) = super::framing::Watched::new(io);
    let (logger, caller, worker) = (proxy.pipeline.clone(), conn.clone(), proxy.clone());
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
    // Boxed once here: passed down by value, the connection's state would be copied into
    // each future that awaits it, and an idle connection's task carried every copy.
    let conn = Box::pin(worker.server.serve(io, svc).until_drained(&worker.drain));
    match super::framing::serve_watched(conn, &heads, header_read).await {
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

#[cfg(test)]
mod tests {
    use super::bind_tcp;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    /// One socket per worker on one port, and the kernel spreads connections over them all.
    #[tokio::test]
    async fn one_socket_per_worker_and_connections_spread() {
        let socks = bind_tcp("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addr = socks[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(socks.iter().all(|s| s.local_addr().unwrap() == addr));
        let clients: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut accepted = Vec::new();
        for s in &socks {
            s.set_nonblocking(true).unwrap();
            let mut n = 0;
            while s.accept().is_ok() {
                n += 1;
            }
            accepted.push(n);
        }
        assert_eq!(
            accepted.iter().sum::<usize>(),
            clients.len(),
            "{accepted:?}"
        );
        assert!(
            accepted.iter().all(|&n| n > 0),
            "each socket takes some: {accepted:?}"
        );
    }

    /// An address already listened on is an error at start, whether by another sidecar
    /// (with `SO_REUSEPORT` itself) or anything else; and the group admits no plain socket.
    #[tokio::test]
    async fn a_taken_address_is_refused() {
        let socks = bind_tcp("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr: SocketAddr = socks[0].local_addr().unwrap();
        let again = bind_tcp(addr, 2).expect_err("a second sidecar on the same port");
        assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse);
        assert!(TcpListener::bind(addr).is_err(), "nor a plain listener");
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = bind_tcp(plain.local_addr().unwrap(), 2).expect_err("held by another");
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    }
}
