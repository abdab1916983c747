//! Worker threads, each running a single-threaded event loop with its own [`Proxy`]: its
//! copy of the pipeline (with its own upstream pool) and the transport pieces. A request, the
//! upstream connection it rides and the tasks between them then share a thread, so a proxied
//! request costs no cross-thread wakeups (measured: they were most of the added latency on the
//! shared multi-threaded runtime; see BENCHMARKS.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::{connect, drain, intercept, upgrade};
use crate::error::ProxyBody;
use crate::identify::Conn;
use crate::pipeline::{Pipeline, Reply};
use crate::target::Target;

/// What one worker thread serves requests with: its copy of the pipeline, and the transport
/// pieces that act on the pipeline's decisions.
#[derive(Debug)]
pub(crate) struct Proxy {
    /// The stages (this worker's copy, with its own upstream pool).
    pub(crate) pipeline: Arc<Pipeline>,
    /// TLS interception, when a local CA is configured.
    pub(crate) interceptor: Option<Arc<intercept::Interceptor>>,
    /// Shutdown draining for every client connection.
    pub(crate) drain: Arc<drain::Drain>,
    /// The HTTP server this worker's client connections are served with, on the listeners
    /// and inside intercepted tunnels alike.
    pub(crate) server: super::http::Server,
}

impl Proxy {
    /// Serve one request from `conn`: a CONNECT (on the listener itself) is the proxy's to
    /// carry out once the pipeline has decided; every other request is the pipeline's. `origin`
    /// is the tunnel's destination for a request decrypted from an intercepted CONNECT.
    ///
    /// A 101 from the pipeline (a WebSocket handshake the upstream accepted) is sent, and the
    /// switched connection relayed beside it ([`upgrade::relay`]).
    ///
    /// The request's future is boxed here, made for each request and freed when it ends.
    /// hyper keeps a connection's in-flight slot, sized for the service's future, for as long
    /// as the connection lives, so an idle keep-alive connection that had served one request
    /// held the whole pipeline's future: ~24 KB while a token fetch was inline in it, ~8 KB
    /// since that is boxed on a miss. Boxed here, an idle connection held ~20 KB in all, not
    /// ~28 KB, for one allocation per request (17 KB since `super::http` reads the version
    /// itself; `benches/idle-conns.sh`, BENCHMARKS.md).
    pub(crate) fn serve(
        self: Arc<Self>,
        conn: Arc<Conn>,
        origin: Option<Arc<Target>>,
        req: Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> {
        Box::pin(self.serve_one(conn, origin, req))
    }

    async fn serve_one(
        self: Arc<Self>,
        conn: Arc<Conn>,
        origin: Option<Arc<Target>>,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT && origin.is_none() {
            return connect::handle(self, conn, req).await;
        }
        // The app's side of a switch, if the request asks for one: only the transport holds it.
        let app_side =
            upgrade::requested(req.version(), req.headers()).map(|_| hyper::upgrade::on(&mut req));
        match self.pipeline.clone().handle(conn, origin, req).await {
            Reply::Response(resp) => resp,
            Reply::Switch(resp, handoff) => {
                if let Some(app_side) = app_side {
                    tokio::spawn(upgrade::relay(
                        app_side,
                        handoff,
                        self.drain.clone(),
                        self.pipeline.timeouts.shutdown_grace,
                        self.pipeline.metrics.clone(),
                    ));
                }
                resp
            }
        }
    }
}

/// Worker threads, each running a current-thread runtime until stopped.
pub(crate) struct Workers {
    pub(crate) handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    pub(crate) fn spawn(n: usize) -> std::io::Result<Workers> {
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
    pub(crate) fn stop(self) {
        drop(self.stops);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
