//! The token cache of one fetched credential: a token-endpoint token, or a cloud's session
//! credentials ([`Fetched`] says what the cache needs to know of either).
//!
//! - A token is handed out until `exp - skew` (skew: 10% of its lifetime, at least 10 s).
//! - In the last quarter of that window the first request that sees it starts one refresh in
//!   the background and is served the still-valid token, so steady traffic never waits for
//!   the token endpoint.
//! - Concurrent misses for one key share a single fetch.
//! - A failed fetch is remembered for a short, doubling backoff (0.5 s up to 15 s): requests
//!   in that window fail fast with the same reason instead of piling onto a struggling
//!   endpoint; the first request after it tries again, so recovery needs no restart.
//! - Size is bounded; entries are keyed by everything the token is scoped to.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::oauth::{Failure, Token, skew};

/// What the cache needs to know of a fetched credential: when it was asked for, and how long
/// it lives.
pub(crate) trait Fetched: Send + Sync + 'static {
    /// When the request for it was sent.
    fn fetched_at(&self) -> Instant;
    /// Its lifetime as issued, when known.
    fn lifetime(&self) -> Option<Duration>;
}

impl Fetched for Token {
    fn fetched_at(&self) -> Instant {
        self.fetched_at
    }
    fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

/// First backoff after a failed fetch.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Most distinct keys held per credential.
const CAPACITY: u64 = 10_000;

/// A cached token and its timers.
/// The longest a token is cached, whatever lifetime it was issued with: it is fetched again
/// (ahead, at three quarters) at least this often.
pub(crate) const LONGEST_CACHED: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug)]
pub(crate) struct Entry<T = Token> {
    /// The token.
    pub(crate) token: T,
    refresh_at: Instant,
    cache_until: Instant,
    refreshing: AtomicBool,
}

impl<T: Fetched> Entry<T> {
    pub(crate) fn new(token: T) -> Self {
        // The lifetime is the token endpoint's word (`expires_in`, `exp`): untrusted, so held
        // to LONGEST_CACHED, and no arithmetic on it can overflow.
        let life = token
            .lifetime()
            .unwrap_or(Duration::from_secs(60))
            .min(LONGEST_CACHED);
        let start = token.fetched_at();
        let cache_until = start
            .checked_add(life.saturating_sub(skew(life)))
            .unwrap_or(start)
            .max(start);
        let refresh_at = start + cache_until.saturating_duration_since(start) * 3 / 4;
        Entry {
            token,
            refresh_at,
            cache_until,
            refreshing: AtomicBool::new(false),
        }
    }
}

struct EntryExpiry;

impl<T> moka::Expiry<String, Arc<Entry<T>>> for EntryExpiry {
    fn expire_after_create(&self, _: &String, e: &Arc<Entry<T>>, now: Instant) -> Option<Duration> {
        Some(e.cache_until.saturating_duration_since(now))
    }

    // A refreshed token replaces the old one: its own window applies, not what was left of
    // the old one's (moka's default for updates).
    fn expire_after_update(
        &self,
        _: &String,
        e: &Arc<Entry<T>>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.cache_until.saturating_duration_since(now))
    }
}

#[derive(Clone)]
struct Backoff {
    until: Instant,
    wait: Duration,
    reason: Arc<str>,
}

/// Counters and timings of one credential, resolved once so a hit touches no label map.
#[derive(Clone)]
pub(crate) struct CacheMetrics {
    /// Served from the cache.
    pub(crate) hit: Counter,
    /// Not cached: the request waited for a fetch.
    pub(crate) miss: Counter,
    /// Failed fast during a backoff.
    pub(crate) backoff: Counter,
    /// Fetch duration.
    pub(crate) fetch_seconds: Histogram,
    /// Fetch results by kind: `ok` and each [`Failure::kind`].
    pub(crate) fetch_result: Arc<dyn Fn(&'static str) -> Counter + Send + Sync>,
}

/// One credential's tokens.
pub(crate) struct TokenCache<T = Token> {
    name: String,
    entries: moka::future::Cache<String, Arc<Entry<T>>>,
    failures: moka::sync::Cache<String, Backoff>,
    metrics: CacheMetrics,
}

impl<T> std::fmt::Debug for TokenCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("name", &self.name)
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl<T: Fetched> TokenCache<T> {
    /// An empty cache.
    pub(crate) fn new(name: &str, metrics: CacheMetrics) -> Self {
        TokenCache {
            name: name.to_string(),
            entries: moka::future::Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(EntryExpiry)
                .build(),
            failures: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(BACKOFF_MAX * 4)
                .build(),
            metrics,
        }
    }

    /// Time a fetch and count its result.
    async fn timed<F>(metrics: &CacheMetrics, fetch: F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        let t = Instant::now();
        let r = fetch.await;
        metrics.fetch_seconds.observe(t.elapsed().as_secs_f64());
        (metrics.fetch_result)(match &r {
            Ok(_) => "ok",
            Err(f) => f.kind.as_str(),
        })
        .inc();
        r
    }

    fn fail(&self, key: &str, f: &Failure) {
        let wait = self
            .failures
            .get(key)
            .map_or(BACKOFF_MIN, |b| (b.wait * 2).min(BACKOFF_MAX));
        self.failures.insert(
            key.to_string(),
            Backoff {
                until: Instant::now() + wait,
                wait,
                reason: f.message.as_str().into(),
            },
        );
    }

    /// The token for `key`, fetching it on a miss. `make_fetch` builds a fetch that owns
    /// what it needs; it is only called on a miss or when a refresh is due, so a hit
    /// allocates nothing for it.
    pub(crate) async fn get<M, F>(
        self: &Arc<Self>,
        key: String,
        make_fetch: M,
    ) -> Result<Arc<Entry<T>>, String>
    where
        M: FnOnce() -> F,
        F: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        if let Some(e) = self.entries.get(&key).await {
            self.metrics.hit.inc();
            let now = Instant::now();
            if now >= e.refresh_at && !e.refreshing.swap(true, Ordering::AcqRel) {
                self.spawn_refresh(key, e.clone(), make_fetch());
            }
            return Ok(e);
        }
        if let Some(b) = self.failures.get(&key)
            && Instant::now() < b.until
        {
            self.metrics.backoff.inc();
            return Err(format!(
                "{} (retrying after {} ms)",
                b.reason,
                b.until
                    .saturating_duration_since(Instant::now())
                    .as_millis()
            ));
        }
        self.metrics.miss.inc();
        // The miss is boxed: its future (a token endpoint's or AWS's HTTP exchange) is ~15 KB,
        // and inline it made every request's future that large, hits included (BENCHMARKS.md,
        // "the request's future").
        Box::pin(self.fetch(key, make_fetch())).await
    }

    /// A miss: fetch once for `key`; concurrent misses for it wait on this one fetch.
    async fn fetch<F>(self: &Arc<Self>, key: String, fetch: F) -> Result<Arc<Entry<T>>, String>
    where
        F: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        self.entries
            .try_get_with(key.clone(), async {
                match Self::timed(&self.metrics, fetch).await {
                    Ok(t) => {
                        self.failures.invalidate(&key);
                        Ok(Arc::new(Entry::new(t)))
                    }
                    Err(f) => {
                        self.fail(&key, &f);
                        Err(f.message)
                    }
                }
            })
            .await
            .map_err(|e: Arc<String>| (*e).clone())
    }

    fn spawn_refresh<F>(self: &Arc<Self>, key: String, old: Arc<Entry<T>>, fetch: F)
    where
        F: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            match Self::timed(&me.metrics, fetch).await {
                Ok(t) => {
                    me.entries.insert(key, Arc::new(Entry::new(t))).await;
                }
                Err(f) => {
                    tracing::warn!(credential = %me.name, error = %f, "token refresh failed; the current token is served until it expires");
                    // Let a later request retry, after a pause.
                    tokio::time::sleep(BACKOFF_MIN * 2).await;
                    old.refreshing.store(false, Ordering::Release);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::family::Family;
    use secrecy::{ExposeSecret, SecretString};
    use std::sync::atomic::AtomicUsize;

    fn metrics() -> (CacheMetrics, Family<Vec<(String, String)>, Counter>) {
        let results = Family::<Vec<(String, String)>, Counter>::default();
        let r = results.clone();
        (
            CacheMetrics {
                hit: Counter::default(),
                miss: Counter::default(),
                backoff: Counter::default(),
                fetch_seconds: Histogram::new([0.1]),
                fetch_result: Arc::new(move |k| {
                    r.get_or_create(&vec![("result".into(), k.into())]).clone()
                }),
            },
            results,
        )
    }

    fn token(value: &str, lifetime: Duration, fetched_at: Instant) -> Token {
        Token {
            value: SecretString::from(value.to_string()),
            jti: None,
            expires_at: 0,
            lifetime: Some(lifetime),
            scopes: vec![],
            unrequested_scopes: vec![],
            fetched_at,
        }
    }

    #[test]
    fn windows_follow_the_lifetime() {
        let t0 = Instant::now();
        let e = Entry::new(token("x", Duration::from_secs(120), t0));
        assert_eq!(e.cache_until - t0, Duration::from_secs(108));
        assert_eq!(e.refresh_at - t0, Duration::from_secs(81));
        let e = Entry::new(token("x", Duration::from_secs(5), t0));
        assert_eq!(e.cache_until, t0, "shorter than the skew: never cached");
        // An endpoint's absurd lifetime is held to LONGEST_CACHED, without overflow.
        let e = Entry::new(token("x", Duration::from_secs(u64::MAX), t0));
        assert_eq!(
            e.cache_until - t0,
            LONGEST_CACHED - LONGEST_CACHED / 10,
            "the usual skew of the bounded lifetime"
        );
    }

    #[tokio::test]
    async fn refresh_ahead_serves_the_old_token_and_fetches_once_in_the_background() {
        let (m, _) = metrics();
        let cache = Arc::new(TokenCache::new("c", m.clone()));
        let fetches = Arc::new(AtomicUsize::new(0));
        // Fetched 81 s ago with a 120 s lifetime: past the refresh point, still valid.
        let stale = Instant::now() - Duration::from_secs(85);
        let make = |n: Arc<AtomicUsize>, at: Instant| {
            move || async move {
                let i = n.fetch_add(1, Ordering::SeqCst);
                Ok(token(&format!("t{i}"), Duration::from_secs(120), at))
            }
        };
        let first = cache
            .get("k".into(), make(fetches.clone(), stale))
            .await
            .unwrap();
        assert_eq!(first.token.value.expose_secret(), "t0");
        for _ in 0..5 {
            let e = cache
                .get("k".into(), make(fetches.clone(), Instant::now()))
                .await
                .unwrap();
            assert_eq!(
                e.token.value.expose_secret(),
                "t0",
                "served while refreshing"
            );
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "one refresh for many hits"
        );
        let e = cache
            .get("k".into(), make(fetches.clone(), Instant::now()))
            .await
            .unwrap();
        assert_eq!(e.token.value.expose_secret(), "t1");
        assert_eq!(m.miss.get(), 1);
        assert_eq!(m.hit.get(), 6);
    }

    #[tokio::test]
    async fn failures_back_off_and_then_retry() {
        let (m, results) = metrics();
        let cache = Arc::new(TokenCache::new("c", m.clone()));
        let attempts = Arc::new(AtomicUsize::new(0));
        let failing = |n: Arc<AtomicUsize>| {
            move || async move {
                n.fetch_add(1, Ordering::SeqCst);
                Err(Failure {
                    kind: crate::credentials::oauth::FailureKind::Unreachable,
                    message: "token endpoint unreachable: connection refused".into(),
                })
            }
        };
        let e = cache
            .get("k".into(), failing(attempts.clone()))
            .await
            .unwrap_err();
        assert!(e.contains("connection refused"), "{e}");
        let e = cache
            .get("k".into(), failing(attempts.clone()))
            .await
            .unwrap_err();
        assert!(e.contains("retrying after"), "{e}");
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "no fetch during the backoff"
        );
        assert_eq!(m.backoff.get(), 1);
        assert_eq!(
            results
                .get_or_create(&vec![("result".into(), "unreachable".into())])
                .get(),
            1
        );
        tokio::time::sleep(BACKOFF_MIN + Duration::from_millis(50)).await;
        let ok = cache
            .get("k".into(), || async {
                Ok(token("fresh", Duration::from_secs(120), Instant::now()))
            })
            .await
            .unwrap();
        assert_eq!(ok.token.value.expose_secret(), "fresh");
        // A later failure starts from the shortest backoff again.
        assert!(cache.failures.get("k").is_none());
    }
}
