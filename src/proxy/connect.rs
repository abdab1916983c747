//! CONNECT tunnels: connect to the allowed destination, then splice bytes both ways.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{ErrorCode, Rejection};
use crate::policy::Guardrails;
use crate::route::Target;

/// Resolve once, refuse guarded addresses, connect to the first address that answers.
///
/// The address checked is the address connected to, so DNS cannot rebind a name onto the
/// metadata endpoint between the check and the connect. `lifted` is the guardrail kind a
/// policy allowed for this destination as named (an IP literal or a metadata host name);
/// other guardrails still hold.
pub async fn connect(
    target: &Target,
    guard: &Guardrails,
    lifted: Option<&str>,
    timeout: Duration,
) -> Result<TcpStream, Rejection> {
    let unreachable = |m: String| Rejection::new(ErrorCode::UpstreamUnreachable, m);
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| {
        Rejection::new(
            ErrorCode::UpstreamTimeout,
            format!("resolving {} timed out", target.host),
        )
    })?
    .map_err(|e| unreachable(format!("cannot resolve {}: {e}", target.host)))?
    .collect();
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

/// Splice the upgraded client connection and the upstream until both sides close or the
/// tunnel is idle for `idle`. Returns bytes (client to upstream, upstream to client).
pub async fn splice(
    req: Request<Incoming>,
    mut upstream: TcpStream,
    idle: Duration,
) -> Result<(u64, u64), (u64, u64, String)> {
    let upgraded = hyper::upgrade::on(req)
        .await
        .map_err(|e| (0, 0, format!("upgrade failed: {e}")))?;
    let mut client = TokioIo::new(upgraded);
    let mut client = crate::proxy::idle::IdleTimeout::new(&mut client, idle);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => Ok((up, down)),
        Err(e) => {
            let (up, down) = client.counts();
            Err((up, down, format!("tunnel closed: {e}")))
        }
    }
}
