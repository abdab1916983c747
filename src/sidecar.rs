//! Start-up and shutdown: the composition root. Builds every stage from the validated
//! [`Config`], hands the pipeline to the proxy's listeners, serves until told to stop, then
//! drains in-flight requests within the grace deadline.
//!
//! Threading: an acceptor task hands each client connection to one of N worker threads, each
//! running a single-threaded event loop with its own upstream pool. A request, the upstream
//! connection it rides and the tasks between them then share a thread, so a proxied request
//! costs no cross-thread wakeups (measured: they were most of the added latency on the shared
//! multi-threaded runtime; see BENCHMARKS.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderValue;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::egress::Egress;
use crate::fingerprint::Fingerprinter;
use crate::metrics::Metrics;
use crate::pipeline::{Interception, Pipeline};
use crate::policy::{Guardrails, PolicyEngine, PolicyStore};
use crate::proxy::ListenAddr;
use crate::proxy::drain::Drain;
use crate::proxy::listener::{Bound, bind_tcp, bind_unix, serve_proxy};
use crate::proxy::upstream::Upstream;
use crate::proxy::worker::{Proxy, Workers};
use crate::purpose_log::{LogWriterGuard, PurposeLog};
use crate::route::RouteTable;

/// Errors at start-up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
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
pub(crate) struct Running {
    /// Bound proxy listener addresses, main listener first, then stages in config order.
    pub(crate) proxy_addrs: Vec<SocketAddr>,
    /// Every proxy listener as bound (TCP with its real port, or a Unix socket), in config
    /// order: main first, then stages.
    pub(crate) listening: Vec<ListenAddr>,
    /// Bound admin address.
    pub(crate) admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log_guard: LogWriterGuard,
    pipeline: Arc<Pipeline>,
    grace: Duration,
    workers: Workers,
    drain: Arc<Drain>,
}

impl Running {
    /// Stop accepting, let in-flight requests finish within the grace period, flush the log.
    pub(crate) async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let all = futures_join(self.tasks);
        if tokio::time::timeout(self.grace + Duration::from_secs(1), all)
            .await
            .is_err()
        {
            tracing::warn!("listeners did not stop in time");
        }
        // Every connection was told by the same signal, and finishes the requests it has in
        // flight (`proxy::http::Connection::until_drained`); they get the grace period and a
        // moment more: upgraded (WebSocket) relays cut themselves at the grace period and
        // write their own lines, with the bytes each way, if they get to.
        if !self
            .drain
            .wait_idle(self.grace + Duration::from_millis(500))
            .await
        {
            tracing::warn!(
                "in-flight requests still running at the shutdown deadline; closing them"
            );
        }
        // Whatever still runs now is cut by the deadline: its line says `shutdown`.
        self.pipeline.log.shutdown_deadline_passed();
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

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Build every stage and bind every listener. The sidecar is ready when this returns.
/// Raise the soft limit on open files to the hard one (as Go does for every program; the
/// `rlimit` crate wraps the two system calls safely): a sidecar holds a client and an
/// upstream descriptor per connection, and the common soft default, 1024, is reached by a
/// thousand idle sockets. Warn when the listeners' caps could still exhaust it.
fn descriptors(listeners: usize, max_connections: usize) {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => return,
    };
    let needed = (listeners as u64)
        .saturating_mul(max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if soft < needed {
        tracing::warn!(
            open_files = soft,
            needed,
            "the open-files limit is below what max_connections allows on every listener (a client and an upstream descriptor each); lower max_connections or raise the limit"
        );
    }
}

pub(crate) async fn start(cfg: Config) -> Result<Running, StartError> {
    let build = |e: String| StartError::Build(e);
    descriptors(cfg.listeners.len(), cfg.max_connections);
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
    // Every connection out (upstreams, tunnels, token endpoints) goes the same way.
    let egress = Egress::new(cfg.upstream_proxy.as_ref());
    let credentials = Arc::new(
        Credentials::new_via(
            &cfg.credentials,
            fingerprinter.clone(),
            upstream_tls.clone(),
            metrics.clone(),
            &egress,
        )
        .map_err(|e| build(e.to_string()))?,
    );
    let policy = match &cfg.policy_engine {
        Some(compiled) => compiled.clone(),
        None => Arc::new(PolicyEngine::compile(&cfg.policy).map_err(|e| build(e.to_string()))?),
    };
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
                let socks = bind_tcp(*addr, cfg.workers).map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
                let local = socks[0].local_addr().map_err(|e| build(e.to_string()))?;
                listening.push(ListenAddr::Tcp(local));
                Bound::Tcp(socks)
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

    let intercept = crate::proxy::intercept::Interceptor::new(&cfg.tls)
        .map_err(|e| build(format!("tls: {e}")))?
        .map(Arc::new);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let drain = Drain::new(shutdown_rx.clone());
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
        upstream: Upstream::new(
            &cfg.timeouts,
            &[],
            upstream_tls.clone(),
            Arc::new(guardrails),
            egress,
            cfg.max_connections_per_upstream,
            crate::resolve::Pins::new(),
        ),
        upstream_tls,
        interception: match &intercept {
            Some(_) => Interception::On {
                passthrough: cfg.tls.passthrough.clone(),
            },
            None => Interception::Off,
        },
        via: HeaderValue::from_str(&format!("1.1 {pseudonym}")).expect("ascii"),
        pseudonym,
        mcp_resources: Arc::default(),
        timeouts: cfg.timeouts,
    });
    credentials.spawn_file_watch(Duration::from_secs(2));
    credentials.spawn_store_reads();
    policy.spawn_watch(Duration::from_secs(2));

    let ready = Arc::new(AtomicBool::new(false));
    let workers = Workers::spawn(cfg.workers).map_err(|e| build(format!("worker threads: {e}")))?;
    let per_worker: Arc<Vec<(tokio::runtime::Handle, Arc<Proxy>)>> = Arc::new(
        workers
            .handles
            .iter()
            .map(|h| {
                let proxy = Proxy {
                    pipeline: Arc::new(pipeline.for_worker()),
                    interceptor: intercept.clone(),
                    drain: drain.clone(),
                    server: crate::proxy::http::Server::new(cfg.timeouts.header_read),
                };
                (h.clone(), Arc::new(proxy))
            })
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
            crate::proxy::listener::Serving {
                max_connections: cfg.max_connections,
            },
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
