//! Start-up and shutdown: build every stage from the configuration, bind the listeners, serve
//! until told to stop, then drain in-flight requests within the grace deadline.

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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::{Config, Identity};
use crate::credentials::Credentials;
use crate::fingerprint::Fingerprinter;
use crate::forward::Upstream;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::policy::{Guardrails, PolicyEngine};
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
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    log_guard: LogWriterGuard,
    pipeline: Arc<Pipeline>,
    grace: Duration,
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
        drop(self.pipeline);
        // Every PurposeLog handle lives in the pipeline, which the tasks held; with those
        // gone the writer drains its queue and exits.
        tokio::task::spawn_blocking(move || self.log_guard.finish())
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
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let build = |e: String| StartError::Build(e);
    let metrics = Arc::new(Metrics::new());
    let fingerprinter =
        Fingerprinter::from_file_or_random(cfg.strip.fingerprint_key_file.as_deref())
            .map_err(|e| build(format!("fingerprint key: {e}")))?;
    let credentials = Arc::new(
        Credentials::new(&cfg.credentials, fingerprinter.clone())
            .map_err(|e| build(e.to_string()))?,
    );
    let policy = PolicyEngine::compile(&cfg.policy).map_err(|e| build(e.to_string()))?;

    let mut listeners = Vec::new();
    for l in &cfg.listeners {
        let sock = TcpListener::bind(l.addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: l.addr,
                source,
            })?;
        listeners.push((sock, Arc::new(l.identity.clone())));
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
    let proxy_addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|(l, _)| l.local_addr().ok())
        .collect();
    let mut own = proxy_addrs.clone();
    own.push(admin_addr);

    let (log, log_guard) = PurposeLog::start(cfg.log_format, &cfg.log_output, metrics.clone())
        .map_err(|e| build(format!("purpose log: {e}")))?;
    let pseudonym = format!(
        "chaperone-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let pipeline = Arc::new(Pipeline {
        routes: RouteTable::new(cfg.routes.clone()),
        policy,
        guardrails: Guardrails::new(own),
        credentials: credentials.clone(),
        fingerprinter,
        strip_mode: cfg.strip.mode,
        log,
        metrics: metrics.clone(),
        upstream: Upstream::new(&cfg.timeouts),
        via: HeaderValue::from_str(&format!("1.1 {pseudonym}")).expect("ascii"),
        pseudonym,
        timeouts: cfg.timeouts,
    });
    credentials.spawn_file_watch(Duration::from_secs(2));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (sock, identity) in listeners {
        tasks.push(tokio::spawn(serve_proxy(
            sock,
            identity,
            pipeline.clone(),
            shutdown_rx.clone(),
            cfg.timeouts.shutdown_grace,
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
        admin_addr,
        shutdown,
        tasks,
        log_guard,
        pipeline,
        grace: cfg.timeouts.shutdown_grace,
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

async fn serve_proxy(
    listener: TcpListener,
    identity: Arc<Identity>,
    pipeline: Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(http_builder(pipeline.timeouts.header_read));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                serve_conn(stream, peer, &identity, &pipeline, &builder, &graceful);
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(pipeline);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?grace, "in-flight requests still running at the shutdown deadline; closing them");
    }
}

fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    identity: &Arc<Identity>,
    pipeline: &Arc<Pipeline>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let identity = identity.clone();
    let pipeline = pipeline.clone();
    let svc = service_fn(move |req| {
        let p = pipeline.clone();
        let id = identity.clone();
        async move { Ok::<_, Infallible>(p.handle(id, peer, req).await) }
    });
    let builder = builder.clone();
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
        }
    });
}
