//! Prometheus metrics, served as text on the admin port at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of `chaperone_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// Matched route, or `none`.
    pub(crate) route: String,
    /// `allow` or `deny`.
    pub(crate) decision: &'static str,
    /// Status sent to the app.
    pub(crate) status: u16,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    /// Matched route, or `none`.
    pub(crate) route: String,
}

/// Labels of `chaperone_stripped_secrets_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StrippedLabels {
    /// Credential type.
    pub r#type: &'static str,
    /// Location kind (`header`, `query`, `userinfo`).
    pub(crate) location: String,
}

/// Labels of `chaperone_credentials_issued_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CredentialLabels {
    /// Credential name.
    pub(crate) credential: String,
    /// Credential kind.
    pub(crate) kind: &'static str,
    /// `ok` or `error`.
    pub(crate) result: &'static str,
}

/// Labels of `chaperone_token_cache_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    /// Credential name.
    pub(crate) credential: String,
    /// `hit`, `miss` or `backoff` (failed fast after a recent fetch error).
    pub(crate) result: &'static str,
}

/// A credential label alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CredentialName {
    /// Credential name.
    pub(crate) credential: String,
}

/// A proxy listener, by the stage it serves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StageLabel {
    /// Stage name.
    pub(crate) stage: String,
}

/// Labels of `chaperone_connections_closed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClosedLabels {
    /// Stage name.
    pub(crate) stage: String,
    /// `silent` (no request within header_read) or `idle` (nothing in flight, no traffic).
    pub(crate) reason: &'static str,
}

/// Labels of `chaperone_token_fetches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FetchLabels {
    /// Credential name.
    pub(crate) credential: String,
    /// `ok`, `local`, `unreachable`, `timeout`, `rejected` or `invalid_response`.
    pub(crate) result: &'static str,
}

/// Labels of `chaperone_credential_flags_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FlagLabels {
    /// Credential name.
    pub(crate) credential: String,
    /// `unrequested_scope`, `ttl_exceeds_max`, `lifetime_unknown` or `no_expiry`.
    pub(crate) flag: &'static str,
}

/// Labels of `chaperone_policy_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    /// `ok` or `rejected`.
    pub(crate) result: &'static str,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, decision and status.
    pub(crate) requests: Family<RequestLabels, Counter>,
    /// Request latency (arrival to end of response body), by route.
    pub(crate) duration: Family<RouteLabels, Histogram>,
    /// Embedded secrets found, by type and location.
    pub(crate) stripped: Family<StrippedLabels, Counter>,
    /// Credentials obtained (minted, read, fetched), by result.
    pub(crate) credentials_issued: Family<CredentialLabels, Counter>,
    /// Token cache lookups by credential and result.
    pub(crate) token_cache: Family<CacheLabels, Counter>,
    /// Token-endpoint fetches by credential and result.
    pub(crate) token_fetches: Family<FetchLabels, Counter>,
    /// Revocations of per-call tokens by credential and result.
    pub(crate) token_revocations: Family<FetchLabels, Counter>,
    /// Token-endpoint fetch latency by credential.
    pub(crate) token_fetch_duration: Family<CredentialName, Histogram>,
    /// Requests whose credential was broader or longer-lived than the route asks.
    pub(crate) credential_flags: Family<FlagLabels, Counter>,
    /// CONNECT tunnels open now.
    pub(crate) tunnels_open: Gauge,
    /// Upgraded connections (WebSocket) being relayed now.
    pub(crate) upgrades_open: Gauge,
    /// Purpose-log lines dropped because the writer fell behind.
    pub(crate) log_dropped: Counter,
    /// Policy reloads (file change, SIGHUP) by result.
    pub(crate) policy_reloads: Family<ResultLabel, Counter>,
    /// Client connections open now, per listener.
    pub(crate) connections_open: Family<StageLabel, Gauge>,
    /// Client connections refused for the listener's cap.
    pub(crate) connections_refused: Family<StageLabel, Counter>,
    /// Client connections the sidecar closed, by reason.
    pub(crate) connections_closed: Family<ClosedLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chaperone");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let stripped = Family::<StrippedLabels, Counter>::default();
        let credentials_issued = Family::<CredentialLabels, Counter>::default();
        let tunnels_open = Gauge::default();
        let upgrades_open = Gauge::default();
        let token_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "token_cache",
            "Token cache lookups by credential and result (hit, miss, backoff)",
            token_cache.clone(),
        );
        let token_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "token_fetches",
            "Token-endpoint fetches by credential and result (ok, local, unreachable, timeout, rejected, invalid_response)",
            token_fetches.clone(),
        );
        let token_revocations = Family::<FetchLabels, Counter>::default();
        registry.register(
            "token_revocations",
            "Revocations (RFC 7009) of per-call tokens once their response ended, by credential and result (ok, local, unreachable, timeout, rejected)",
            token_revocations.clone(),
        );
        let token_fetch_duration = Family::<CredentialName, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "token_fetch_duration_seconds",
            "Token-endpoint fetch latency, request sent to response read",
            token_fetch_duration.clone(),
        );
        let credential_flags = Family::<FlagLabels, Counter>::default();
        registry.register(
            "credential_flags",
            "Requests whose credential was broader or longer-lived than the route asks, by flag",
            credential_flags.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "requests",
            "Requests by route, decision and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request arrival to the end of the response body",
            duration.clone(),
        );
        registry.register(
            "stripped_secrets",
            "Embedded secrets found in requests, by type and location",
            stripped.clone(),
        );
        registry.register(
            "credentials_issued",
            "Credentials obtained for calls (minted, read or from the token cache), by credential, kind and result",
            credentials_issued.clone(),
        );
        registry.register(
            "tunnels_open",
            "CONNECT tunnels open now",
            tunnels_open.clone(),
        );
        registry.register(
            "upgrades_open",
            "Upgraded connections (WebSocket) being relayed now",
            upgrades_open.clone(),
        );
        registry.register(
            "log_dropped",
            "Purpose-log lines dropped because the writer fell behind",
            log_dropped.clone(),
        );
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads (file change or SIGHUP) by result: ok, or rejected (the last good policy stays in force)",
            policy_reloads.clone(),
        );
        let connections_open = Family::<StageLabel, Gauge>::default();
        registry.register(
            "connections_open",
            "Client connections open now, per proxy listener (stage)",
            connections_open.clone(),
        );
        let connections_refused = Family::<StageLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections refused because the listener had max_connections open",
            connections_refused.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Client connections closed by the sidecar: silent (no request within header_read) or idle (nothing in flight, no traffic for header_read)",
            connections_closed.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            stripped,
            credentials_issued,
            token_cache,
            token_fetches,
            token_revocations,
            token_fetch_duration,
            credential_flags,
            tunnels_open,
            upgrades_open,
            log_dropped,
            policy_reloads,
            connections_open,
            connections_refused,
            connections_closed,
        }
    }

    /// Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String");
        s
    }
}
