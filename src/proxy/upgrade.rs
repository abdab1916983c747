//! Upgrades: WebSocket, the one protocol an HTTP/1.1 request may switch to through Chaperone
//! with `Upgrade` (RFC 9110 §7.8; see [`requested`] for why only it). The handshake is a request like any other: it goes through every stage
//! (identify, strip and inject on its headers, policy with `context.upgrade`); this module
//! only keeps the two upgrade headers across the hop (they are hop-by-hop, so the forward
//! stage would drop them) and, once the upstream answered 101, relays bytes both ways until
//! either side closes, then writes the handshake's log line with the bytes each way.
//!
//! The pipeline hands over a [`Handoff`] with the 101; [`relay`] is started by the proxy
//! beside the response it sends, since only the proxy holds the client's connection.
//!
//! Upgrades are an HTTP/1.1 mechanism: the handshake goes upstream over HTTP/1.1 whatever
//! the pool would otherwise negotiate. WebSocket over HTTP/2 (RFC 8441's extended CONNECT)
//! is not offered: no mainstream WebSocket client needs it from a proxy.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::drain::Drain;
use super::idle::IdleTimeout;
use crate::metrics::Metrics;
use crate::purpose_log::{Completion, LogGuard, UpgradeLog};

/// The protocol a request asks to switch to: its `Upgrade` header, when its `Connection`
/// header names `upgrade` (both are needed, RFC 9110 §7.8). Only HTTP/1.1 requests can ask,
/// and only for WebSocket: after a switch the connection is relayed unseen, so a protocol
/// that carries more requests (`h2c`, which Java's HttpClient offers on every `http://`
/// request) would carry them past the pipeline. Any other `Upgrade` is dropped as the
/// hop-by-hop header it is, and the request served as a plain one.
pub(crate) fn requested(version: http::Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != http::Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers.get(header::UPGRADE)?;
    (asks && protocol_name(protocol) == "websocket").then(|| protocol.clone())
}

/// The first protocol an `Upgrade` value names, lower-cased without its version
/// (`websocket`, `h2c`): what policy sees as `context.upgrade` and the log line says.
pub(crate) fn protocol_name(value: &HeaderValue) -> String {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .next()
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Put the upgrade headers back on a message whose hop-by-hop headers were removed: the
/// upgrade is asked for (or agreed to) again on the next hop, and nothing else the app's
/// `Connection` header named comes along.
pub(crate) fn restore(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol.clone());
}

/// What the pipeline hands over with a 101: the upstream's side of the switched
/// connection, the handshake's log line (written at close), and how long both sides may be
/// silent together.
pub(crate) struct Handoff {
    /// The upstream connection, once hyper gives it up.
    pub(crate) upstream: OnUpgrade,
    /// The handshake's line; the relay fills in `upgrade` and how it ended.
    pub(crate) log: LogGuard,
    /// Longest silence in both directions at once (`timeouts.idle`).
    pub(crate) idle: Duration,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

/// Relay an upgraded connection: wait for both sides to switch, then copy bytes both ways
/// until one side closes (its close is passed on), either fails, both fall silent for
/// `idle`, or shutdown's grace period ends. The line says how it ended:
/// - both sides closed in turn: `complete`;
/// - the app's side failed (reset, or went away before switching): `client_closed`;
/// - the upstream's side failed, or the connection fell silent: `response_incomplete`,
///   with the reason in `error`;
/// - cut at the end of the shutdown grace period: `shutdown`.
///
/// Shutdown waits for open relays up to its grace period ([`Drain`]), so a conversation in
/// progress can finish; what still runs then is cut.
pub(crate) async fn relay(
    client: OnUpgrade,
    handoff: Handoff,
    drain: Arc<Drain>,
    grace: Duration,
    metrics: Arc<Metrics>,
) {
    let Handoff {
        upstream,
        mut log,
        idle,
    } = handoff;
    let _draining = drain.enter();
    let (client, upstream) = match tokio::try_join!(
        async { client.await.map_err(|e| (Completion::ClientClosed, e)) },
        async {
            upstream
                .await
                .map_err(|e| (Completion::ResponseIncomplete, e))
        },
    ) {
        Ok(both) => both,
        Err((how, e)) => {
            log.completion = how;
            log.error = Some(format!("the connection did not switch protocols: {e}"));
            log.finish();
            return;
        }
    };
    metrics.upgrades_open.inc();
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let mut app = IdleTimeout::new(&mut client, idle);
    let cut = async {
        drain.signalled().await;
        tokio::time::sleep(grace).await;
    };
    let ended = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut app, &mut upstream) => Some(r),
        () = cut => None,
    };
    metrics.upgrades_open.dec();
    let (bytes_in, bytes_out) = app.counts();
    let (how, error) = match ended {
        Some(Ok(_)) => (Completion::Complete, None),
        Some(Err(_)) if app.idled() => (
            Completion::ResponseIncomplete,
            Some(format!(
                "nothing either way for {idle:?} (timeouts.idle); closed"
            )),
        ),
        Some(Err(e)) if app.failed() => (
            Completion::ClientClosed,
            Some(format!("the app's side failed: {e}")),
        ),
        Some(Err(e)) => (
            Completion::ResponseIncomplete,
            Some(format!("the upstream's side failed: {e}")),
        ),
        None => (
            Completion::Shutdown,
            Some("open at the end of the shutdown grace period; closed".into()),
        ),
    };
    if let Some(u) = log.upgrade.as_mut() {
        u.bytes_in = bytes_in;
        u.bytes_out = bytes_out;
    }
    log.completion = how;
    log.error = error;
    log.finish();
}

/// What the log line says of an upgrade asked for with `value`, before any byte moved.
pub(crate) fn log_entry(value: &HeaderValue) -> UpgradeLog {
    UpgradeLog {
        protocol: protocol_name(value),
        bytes_in: 0,
        bytes_out: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_needs_both_headers_and_http_1_1() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested(http::Version::HTTP_11, &ws).unwrap(), "websocket");
        assert!(requested(http::Version::HTTP_2, &ws).is_none());
        assert!(requested(http::Version::HTTP_10, &ws).is_none());
        let no_connection = headers(&[("upgrade", "websocket")]);
        assert!(requested(http::Version::HTTP_11, &no_connection).is_none());
        let no_upgrade = headers(&[("connection", "upgrade")]);
        assert!(requested(http::Version::HTTP_11, &no_upgrade).is_none());
        // A token that merely contains the word is not it.
        let lookalike = headers(&[("connection", "upgraded"), ("upgrade", "websocket")]);
        assert!(requested(http::Version::HTTP_11, &lookalike).is_none());
        // h2c would carry further requests past the pipeline: not an upgrade we pass.
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(requested(http::Version::HTTP_11, &h2c).is_none());
    }

    #[test]
    fn protocol_names_are_the_first_token_without_version() {
        let name = |s: &'static str| protocol_name(&HeaderValue::from_static(s));
        assert_eq!(name("websocket"), "websocket");
        assert_eq!(name("WebSocket"), "websocket");
        assert_eq!(name("HTTP/2.0, SHTTP/1.3"), "http");
        assert_eq!(name(" h2c "), "h2c");
    }

    #[test]
    fn restore_asks_for_the_upgrade_and_nothing_else() {
        let mut h = headers(&[("connection", "upgrade, x-hop"), ("x-keep", "1")]);
        crate::proxy::upstream::strip_hop_by_hop(&mut h);
        restore(&mut h, &HeaderValue::from_static("websocket"));
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.len(), 3, "{h:?}");
    }
}
