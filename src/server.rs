//! Start-up and shutdown: build every stage from the configuration, bind the listeners, serve
//! until told to stop, then drain in-flight requests within the grace deadline.
//!
//! Threading: an acceptor task hands each client connection to one of N worker threads, each
//! running a single-threaded event loop with its own upstream pool. A request, the upstream
//! connection it rides and the tasks between them then share a thread, so a proxied request
//! costs no cross-thread wakeups (measured: they were most of the added latency on the shared
//! multi-threaded runtime; see BENCHMARKS.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::attest::{self, Attestation};
use crate::config::{Config, Identity, ListenAddr};
use crate::credentials::Credentials;
use crate::fingerprint::Fingerprinter;
use crate::forward::Upstream;
use crate::identify::Conn;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::policy::{Guardrails, PolicyEngine, PolicyStore};
use crate::purpose_log::{LogWriterGuard, PurposeLog};
use crate::route::RouteTable;

/// Largest request head (request line and headers) a client may send; more gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Errors at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A stage could not be built.
    #[error("{0}")]
    Build(String),
}

/// A running sidecar.
pub struct Running {
    /// Bound proxy listener addresses, main listener first, then stages in config order.
    pub proxy_addrs: Vec<SocketAddr>,
    /// Every proxy listener as bound (TCP with its real port, or a Unix socket), in config
    /// order: main first, then stages.
    pub listening: Vec<ListenAddr>,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log_guard: LogWriterGuard,
    pipeline: Arc<Pipeline>,
    grace: Duration,
    workers: Workers,
    drain: Arc<crate::drain::Drain>,
}

impl Running {
    /// The JWKS document served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        self.pipeline.credentials.jwks()
    }

    /// Stop accepting, let in-flight requests finish within the grace period, flush the log.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let all = futures_join(self.tasks);
        if tokio::time::timeout(self.grace + Duration::from_secs(1), all)
            .await
            .is_err()
        {
            tracing::warn!("listeners did not stop in time");
        }
        // Intercepted connections were told by the same signal; give them the same grace.
        if !self.drain.wait_idle(self.grace).await {
            tracing::warn!(
                "intercepted connections still open at the shutdown deadline; closing them"
            );
        }
        drop(self.pipeline);
        let workers = self.workers;
        let guard = self.log_guard;
        tokio::task::spawn_blocking(move || {
            workers.stop();
            guard.finish();
        })
        .await
        .ok();
    }
}

/// Worker threads, each running a current-thread runtime until stopped.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn spawn(n: usize) -> std::io::Result<Workers> {
        let mut w = Workers {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            w.handles.push(rt.handle().clone());
            w.stops.push(stop_tx);
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("chaperone-w{i}"))
                    .spawn(move || {
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    })?,
            );
        }
        Ok(w)
    }

    /// Stop every worker (tasks still running are dropped) and join the threads.
    fn stop(self) {
        drop(self.stops);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Build every stage and bind every listener. The sidecar is ready when this returns.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let build = |e: String| StartError::Build(e);
    let metrics = Arc::new(Metrics::new());
    let fingerprinter =
        Fingerprinter::from_file_or_random(cfg.strip.fingerprint_key_file.as_deref())
            .map_err(|e| build(format!("fingerprint key: {e}")))?;
    // Roots for upstream TLS and token endpoints. Required when interception is on (the
    // proxy then originates TLS itself); otherwise a machine without a system store still
    // runs, and an https token endpoint fails closed with a certificate error.
    let upstream_tls = Arc::new(match crate::tls::client_config(&cfg.tls.upstream_roots) {
        Ok(c) => c,
        Err(e) if cfg.tls.ca.is_some() => return Err(build(e.to_string())),
        Err(e) => {
            tracing::warn!(error = %e, "no roots for upstream TLS; https token endpoints will fail");
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    });
    let credentials = Arc::new(
        Credentials::new(
            &cfg.credentials,
            fingerprinter.clone(),
            upstream_tls.clone(),
            metrics.clone(),
        )
        .map_err(|e| build(e.to_string()))?,
    );
    let policy = PolicyEngine::compile(&cfg.policy).map_err(|e| build(e.to_string()))?;
    let policy = Arc::new(PolicyStore::new(
        policy,
        cfg.policy.clone(),
        metrics.clone(),
    ));

    let mut listeners = Vec::new();
    let mut listening = Vec::new();
    for l in &cfg.listeners {
        let bound = match &l.addr {
            ListenAddr::Tcp(addr) => {
                let sock = TcpListener::bind(*addr)
                    .await
                    .map_err(|source| StartError::Bind {
                        addr: *addr,
                        source,
                    })?;
                let local = sock.local_addr().map_err(|e| build(e.to_string()))?;
                listening.push(ListenAddr::Tcp(local));
                Bound::Tcp(sock)
            }
            ListenAddr::Unix(path) => {
                let sock = bind_unix(path)
                    .map_err(|e| build(format!("cannot listen on unix:{}: {e}", path.display())))?;
                listening.push(l.addr.clone());
                Bound::Unix(sock)
            }
        };
        listeners.push((bound, Arc::new(l.identity.clone()), l.callers.clone()));
    }
    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.admin,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| build(e.to_string()))?;
    let proxy_addrs: Vec<SocketAddr> = listening.iter().filter_map(ListenAddr::tcp).collect();
    let mut own = proxy_addrs.clone();
    own.push(admin_addr);

    let intercept = crate::intercept::Interceptor::new(&cfg.tls)
        .map_err(|e| build(format!("tls: {e}")))?
        .map(Arc::new);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let drain = crate::drain::Drain::new(shutdown_rx.clone());
    let (log, log_guard) = PurposeLog::start(cfg.log_format, &cfg.log_output, metrics.clone())
        .map_err(|e| build(format!("purpose log: {e}")))?;
    let pseudonym = format!(
        "chaperone-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let guardrails = Guardrails::new(own);
    let pipeline = Arc::new(Pipeline {
        routes: Arc::new(RouteTable::new(cfg.routes.clone())),
        policy: policy.clone(),
        guardrails: guardrails.clone(),
        credentials: credentials.clone(),
        fingerprinter,
        strip_mode: cfg.strip.mode,
        body_max_bytes: usize::try_from(cfg.strip.body_max_bytes).unwrap_or(usize::MAX),
        log,
        metrics: metrics.clone(),
        upstream: Upstream::new(&cfg.timeouts, upstream_tls.clone(), Arc::new(guardrails)),
        upstream_tls,
        intercept,
        drain: drain.clone(),
        via: HeaderValue::from_str(&format!("1.1 {pseudonym}")).expect("ascii"),
        pseudonym,
        timeouts: cfg.timeouts,
    });
    credentials.spawn_file_watch(Duration::from_secs(2));
    policy.spawn_watch(Duration::from_secs(2));

    let ready = Arc::new(AtomicBool::new(false));
    let workers = Workers::spawn(cfg.workers).map_err(|e| build(format!("worker threads: {e}")))?;
    let per_worker: Arc<Vec<(tokio::runtime::Handle, Arc<Pipeline>)>> = Arc::new(
        workers
            .handles
            .iter()
            .map(|h| (h.clone(), Arc::new(pipeline.for_worker())))
            .collect(),
    );
    let mut tasks = Vec::new();
    for (sock, identity, callers) in listeners {
        tasks.push(tokio::spawn(serve_proxy(
            sock,
            identity,
            callers.map(Arc::from),
            per_worker.clone(),
            shutdown_rx.clone(),
            cfg.timeouts.shutdown_grace,
            cfg.timeouts.header_read,
        )));
    }
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        admin::AdminState {
            ready: ready.clone(),
            metrics,
            credentials,
        },
        shutdown_rx,
    )));
    ready.store(true, Ordering::Release);
    Ok(Running {
        proxy_addrs,
        listening,
        admin_addr,
        shutdown,
        tasks,
        log_guard,
        pipeline,
        grace: cfg.timeouts.shutdown_grace,
        workers,
        drain,
    })
}

fn http_builder(header_read: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    b.http2().timer(TokioTimer::new());
    b
}

/// A bound proxy listener.
enum Bound {
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
fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
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

async fn serve_proxy(
    listener: Bound,
    identity: Arc<Identity>,
    callers: Option<Arc<[u32]>>,
    workers: Arc<Vec<(tokio::runtime::Handle, Arc<Pipeline>)>>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    header_read: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(http_builder(header_read));
    let mut next = 0usize;
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
                // Round-robin over the workers; the socket moves to the worker's event loop.
                let (handle, pipeline) = &workers[next % workers.len()];
                next = next.wrapping_add(1);
                let (identity, callers, pipeline, builder, watcher) = (identity.clone(), callers.clone(), pipeline.clone(), builder.clone(), graceful.watcher());
                handle.spawn(async move {
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
                            serve_conn(stream, conn, pipeline, &builder, watcher).await;
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
                            serve_conn(stream, conn, pipeline, &builder, watcher).await;
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
    pipeline: Arc<Pipeline>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let label = conn.label.clone();
    let svc = service_fn(move |req| {
        let (p, c) = (pipeline.clone(), conn.clone());
        async move { Ok::<_, Infallible>(p.handle(c, None, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(client = %label, error = %e, "client connection ended with an error");
    }
}
