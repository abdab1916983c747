//! CONNECT: the pipeline decides ([`crate::pipeline::Pipeline::decide_connect`]), then this
//! module carries out the plan. Intercept: answer 200 and terminate the app's TLS ([`super::intercept`]), each
//! request inside going through the pipeline on its own. Blind: connect to the allowed
//! destination, answer 200, splice bytes both ways. Either way the CONNECT's own log line is
//! written when the tunnel ends (or by its guard, if the tunnel is cut).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::intercept::{Carried, OnTls};
use super::worker::Proxy;
use crate::egress::Egress;
use crate::error::{ErrorCode, ProxyBody, REQUEST_ID_HEADER, Rejection, full};
use crate::identify::Conn;
use crate::pipeline::{ConnectPlan, Exchange, TunnelMode};
use crate::policy::Guardrails;
use crate::purpose_log::ms;
use crate::target::Target;

/// Handle a CONNECT that came in on `conn` (not one inside an intercepted tunnel).
pub(crate) async fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let pipeline = &proxy.pipeline;
    let (mut parts, body) = req.into_parts();
    let (mut x, admitted) = pipeline.identify(&conn, &mut parts);
    if let Err(rej) = admitted {
        return pipeline.reject(x, rej);
    }
    x.log.kind = "tunnel";
    let plan = match pipeline.decide_connect(&mut x, &parts).await {
        Ok(plan) => plan,
        Err(rej) => return pipeline.reject(x, rej),
    };
    x.log.decision = "allow";
    let req = Request::from_parts(parts, body);
    let ConnectPlan {
        target,
        mode,
        lifted,
        address,
    } = plan;
    // Held until this returns, after any connect: a pinned name is reached at its pin only.
    let at = address.pinned();
    match mode {
        TunnelMode::Intercept => open(proxy, conn, target, req, x, OnTls::Terminate),
        TunnelMode::PlainOnly => open(proxy, conn, target, req, x, OnTls::Refuse),
        TunnelMode::Blind { sniff: false } => blind(proxy, target, lifted, at, req, x).await,
        TunnelMode::Blind { sniff: true } => {
            // Connect first, so an unreachable destination is a 502 the app can read, then
            // tell what the tunnel carries: TLS is spliced to this connection, plain HTTP
            // served through the pipeline (which makes its own).
            let pipeline = &proxy.pipeline;
            let timeouts = pipeline.timeouts;
            let way = pipeline.upstream.egress();
            let reach = Reach {
                guard: &pipeline.guardrails,
                lifted,
                at,
                timeout: timeouts.connect,
                egress: way,
            };
            match dial(&target, reach).await {
                Ok(upstream) => {
                    x.log.upstream_ms = Some(ms(x.log.started().elapsed()));
                    let on_tls = OnTls::Splice(upstream, timeouts.idle);
                    open(proxy, conn, target, req, x, on_tls)
                }
                Err(rej) => pipeline.reject(x, rej),
            }
        }
    }
}

/// Connect to the destination, answer 200, and splice until either side closes or the tunnel
/// idles out.
async fn blind(
    proxy: Arc<Proxy>,
    target: Target,
    lifted: Option<&'static str>,
    at: Option<IpAddr>,
    req: Request<Incoming>,
    mut x: Exchange,
) -> Response<ProxyBody> {
    let pipeline = &proxy.pipeline;
    let reach = Reach {
        guard: &pipeline.guardrails,
        lifted,
        at,
        timeout: pipeline.timeouts.connect,
        egress: pipeline.upstream.egress(),
    };
    let upstream = match dial(&target, reach).await {
        Ok(s) => s,
        Err(rej) => return pipeline.reject(x, rej),
    };
    x.log.upstream_ms = Some(ms(x.log.started().elapsed()));
    x.log.status = 200;
    x.log.answered_by = Some("chaperone");
    let response = tunnel_established(&x.caller.request_id);
    let (metrics, idle) = (pipeline.metrics.clone(), pipeline.timeouts.idle);
    tokio::spawn(async move {
        let Some((upgraded, mut x)) = switched(req, x).await else {
            return;
        };
        metrics.tunnels_open.inc();
        let (up, down, error) = splice(TokioIo::new(upgraded), upstream, idle).await;
        metrics.tunnels_open.dec();
        x.log.bytes_in = Some(up);
        x.log.bytes_out = down;
        x.log.error = error;
        x.log.finish();
    });
    response
}

/// Answer 200 and serve what the tunnel carries ([`super::intercept::serve`]): plain HTTP
/// through the pipeline, TLS as `on_tls` says. The CONNECT itself is logged when the tunnel
/// ends (kind `intercept` when requests inside were served, `tunnel` when TLS was spliced),
/// with any handshake failure or refusal.
fn open(
    proxy: Arc<Proxy>,
    conn: Arc<Conn>,
    target: Target,
    req: Request<Incoming>,
    mut x: Exchange,
    on_tls: OnTls,
) -> Response<ProxyBody> {
    x.log.kind = "intercept";
    x.log.scheme = "https".into();
    x.log.status = 200;
    x.log.answered_by = Some("chaperone");
    let refuse_tls = matches!(on_tls, OnTls::Refuse);
    let (metrics, splicing) = (
        proxy.pipeline.metrics.clone(),
        matches!(on_tls, OnTls::Splice(..)),
    );
    let response = tunnel_established(&x.caller.request_id);
    tokio::spawn(async move {
        let Some((upgraded, mut x)) = switched(req, x).await else {
            return;
        };
        let client = conn.client;
        if splicing {
            metrics.tunnels_open.inc();
        }
        let carried = super::intercept::serve(proxy, conn, target, upgraded, on_tls).await;
        if splicing {
            metrics.tunnels_open.dec();
        }
        match carried {
            Ok(Carried::Terminated(requests)) => {
                x.log.reason = Some(format!(
                    "intercepted: {requests} request(s), each authorized and logged on its own"
                ));
            }
            Ok(Carried::Plain(requests)) => {
                x.log.scheme = "http".into();
                x.log.reason = Some(format!(
                    "plain HTTP in the tunnel: {requests} request(s), each authorized and logged on its own"
                ));
            }
            Ok(Carried::Spliced { up, down, error }) => {
                x.log.kind = "tunnel";
                x.log.bytes_in = Some(up);
                x.log.bytes_out = down;
                x.log.error = error;
            }
            Err(e) if refuse_tls => {
                x.log.decision = "deny";
                x.log.error = Some("policy_denied".into());
                x.log.reason = Some(e);
            }
            Err(e) => {
                tracing::warn!(client = %client, host = %x.log.host, error = %e, "intercepted TLS handshake failed");
                x.log.error = Some(format!("tls_handshake_failed: {e}"));
            }
        }
        x.log.finish();
    });
    response
}

/// The app's side of a tunnel once the 200 went out; `None` (the line written with the
/// reason) when the connection was gone before it switched.
async fn switched(req: Request<Incoming>, mut x: Exchange) -> Option<(Upgraded, Exchange)> {
    match hyper::upgrade::on(req).await {
        Ok(u) => Some((u, x)),
        Err(e) => {
            x.log.error = Some(format!("upgrade failed: {e}"));
            x.log.finish();
            None
        }
    }
}

/// The empty 200 that opens a CONNECT tunnel (blind or intercepted).
fn tunnel_established(request_id: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::new()));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER.clone(), v);
    }
    resp
}

/// How a tunnel reaches its destination.
pub(crate) struct Reach<'a> {
    pub(crate) guard: &'a Guardrails,
    /// The guardrail kind a policy allowed for this destination as named (an IP literal or a
    /// metadata host name); other guardrails still hold.
    pub(crate) lifted: Option<&'a str>,
    /// The address a name is pinned to for policy, the only one to connect to.
    pub(crate) at: Option<IpAddr>,
    pub(crate) timeout: Duration,
    pub(crate) egress: &'a Egress,
}

/// Resolve once, refuse guarded addresses, connect to the first address that answers.
///
/// The address checked is the address connected to, so DNS cannot rebind a name onto the
/// metadata endpoint between the check and the connect. `lifted` is the guardrail kind a
/// policy allowed for this destination as named (an IP literal or a metadata host name);
/// other guardrails still hold.
///
/// A destination the upstream proxy covers is reached through a CONNECT tunnel of its own
/// (the proxy resolves the name; policy decided on it as named).
pub(crate) async fn dial(target: &Target, reach: Reach<'_>) -> Result<TcpStream, Rejection> {
    let Reach {
        guard,
        lifted,
        at,
        timeout,
        egress,
    } = reach;
    let unreachable = |m: String| Rejection::new(ErrorCode::UpstreamUnreachable, m);
    // `None` at once when the destination is reached directly.
    match tokio::time::timeout(timeout, egress.tunnel(&target.host, target.port)).await {
        Ok(None) => {}
        Ok(Some(Ok(s))) => {
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
        Ok(Some(Err(e))) => return Err(unreachable(crate::error::innermost(&*e).to_string())),
        Err(_) => {
            return Err(Rejection::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "the tunnel through the upstream proxy to {} did not open within {timeout:?}",
                    target.host
                ),
            ));
        }
    }
    // A name pinned for policy is reached at its pin only (`crate::resolve`).
    let resolved = match at {
        Some(ip) => Ok(Ok(vec![SocketAddr::new(ip, target.port)])),
        None => tokio::time::timeout(
            timeout,
            tokio::net::lookup_host((target.host.as_str(), target.port)),
        )
        .await
        .map(|r| r.map(Iterator::collect)),
    };
    let addrs: Vec<SocketAddr> = resolved
        .map_err(|_| {
            Rejection::new(
                ErrorCode::UpstreamTimeout,
                format!("resolving {} timed out", target.host),
            )
        })?
        .map_err(|e| unreachable(format!("cannot resolve {}: {e}", target.host)))?;
    let mut refused = None;
    let mut last_err = None;
    for addr in addrs {
        if let Some(hit) = guard.check_addr(addr)
            && Some(hit.kind) != lifted
        {
            refused = Some(hit.why);
            continue;
        }
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            // The address connected to is checked too, as the plain-HTTP connector does:
            // `0.0.0.0` is answered by whatever listens on this host.
            Ok(Ok(s))
                if let Ok(peer) = s.peer_addr()
                    && let Some(hit) = guard.check_addr(peer)
                    && Some(hit.kind) != lifted =>
            {
                refused = Some(hit.why);
            }
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last_err = Some(format!("cannot connect to {addr}: {e}")),
            Err(_) => last_err = Some(format!("connecting to {addr} timed out")),
        }
    }
    match (last_err, refused) {
        (Some(e), _) => Err(unreachable(e)),
        (None, Some(why)) => Err(Rejection::new(
            ErrorCode::PolicyDenied,
            format!(
                "guardrail: {} resolves to a refused address: {why}",
                target.host
            ),
        )),
        (None, None) => Err(unreachable(format!("{} has no addresses", target.host))),
    }
}

/// Splice the app's side of a tunnel and the upstream until both sides close or nothing
/// moves for `idle`. Returns bytes (from the app, to the app) and the error that ended it.
pub(crate) async fn splice<I>(
    mut client: I,
    mut upstream: TcpStream,
    idle: Duration,
) -> (u64, u64, Option<String>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = crate::proxy::idle::IdleTimeout::new(&mut client, idle);
    let ended = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let (up, down) = client.counts();
    (up, down, ended.err().map(|e| format!("tunnel closed: {e}")))
}
