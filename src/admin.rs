//! The admin server: `/healthz`, `/readyz`, `/metrics`, `/.well-known/jwks.json`.
//! It binds loopback by default and serves nothing secret.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::credentials::Credentials;
use crate::error::{ProxyBody, full};
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// Set once config, keys and policy are loaded and listeners are bound.
    pub(crate) ready: Arc<AtomicBool>,
    /// Metrics to expose.
    pub(crate) metrics: Arc<Metrics>,
    /// For the JWKS, and whether the secret stores have been read.
    pub(crate) credentials: Arc<Credentials>,
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Answer one admin request.
pub(crate) fn route(state: &AdminState, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if !state.ready.load(Ordering::Acquire) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n");
            }
            // A credential read from a secret store at start fails its routes closed until
            // the first read: traffic should not be sent here before it.
            let unread = state.credentials.unread_stores();
            if unread.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: no value read yet from the secret store for {}\n",
                        unread.join(", ")
                    ),
                )
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/.well-known/jwks.json" => {
            let mut r = respond(
                StatusCode::OK,
                "application/jwk-set+json",
                serde_json::to_vec(&state.credentials.jwks()).unwrap_or_default(),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=60"),
            );
            r
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// How long a client has to send a request head (and an idle connection is kept).
const HEADER_READ: Duration = Duration::from_secs(10);

/// Serve until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let st = state.clone();
                let svc = service_fn(move |req| {
                    let r = route(&st, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                tokio::spawn(async move {
                    let _ = crate::proxy::http::Server::new(HEADER_READ)
                        .serve(stream, svc)
                        .await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}
