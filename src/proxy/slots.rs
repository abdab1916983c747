//! A cap on the connections a pool keeps open to one upstream (scheme, host and port):
//! `max_connections_per_upstream`. A connect past the cap waits for one of those connections
//! to close, up to the connect timeout, then fails with 503 `too_many_connections`. Meanwhile
//! the pool's checkout races the wait, so a connection that comes back idle serves the waiting
//! request ([`crate::proxy::pool`] does this for every connect).
//!
//! One cap per pool, not one shared by every worker: a pool's idle connections hold slots, and
//! only the same pool can reuse them, so a cap shared across pools could be filled by one
//! pool's idle connections while another waits for nothing. The guarantee is therefore per
//! worker: a runaway or hostile client cannot hold more than the cap open to one upstream
//! from one worker, however many streams it opens and resets.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::egress::Chained;
use crate::error::BoxError;

/// Default `max_connections_per_upstream`.
pub(crate) const DEFAULT_PER_UPSTREAM: usize = 256;

/// The open connections of one pool, by upstream.
pub(crate) struct Slots {
    max: usize,
    open: Mutex<HashMap<Box<str>, usize>>,
    /// Woken whenever a connection closes.
    freed: Notify,
}

/// One open connection's place in [`Slots`]; given back when dropped.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    key: Box<str>,
}

/// The cap was reached and no connection closed within the wait.
#[derive(Debug)]
pub(crate) struct Saturated {
    upstream: String,
    max: usize,
    waited: Duration,
}

impl std::fmt::Display for Saturated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections to {} are open and busy (max_connections_per_upstream); none came free within {:?}",
            self.max, self.upstream, self.waited
        )
    }
}

impl std::error::Error for Saturated {}

impl Slots {
    /// At most `max` open connections to each upstream.
    pub(crate) fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            open: Mutex::new(HashMap::new()),
            freed: Notify::new(),
        })
    }

    /// A slot now, if the upstream has fewer than the cap open.
    fn try_take(self: &Arc<Self>, key: &str) -> Option<Slot> {
        let mut open = self.open.lock();
        match open.get_mut(key) {
            Some(n) if *n >= self.max => return None,
            Some(n) => *n += 1,
            None => {
                open.insert(key.into(), 1);
            }
        }
        Some(Slot {
            slots: self.clone(),
            key: key.into(),
        })
    }

    /// A slot, waiting up to `wait` for one to come free.
    pub(crate) async fn take(
        self: &Arc<Self>,
        key: &str,
        wait: Duration,
    ) -> Result<Slot, Saturated> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a close between the look and the wait is seen.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_take(key) {
                return Ok(slot);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Saturated {
                    upstream: key.to_string(),
                    max: self.max,
                    waited: wait,
                });
            }
        }
    }

    /// Connections open to `key` (for tests).
    #[cfg(test)]
    fn open(&self, key: &str) -> usize {
        self.open.lock().get(key).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut open = self.slots.open.lock();
            if let Some(n) = open.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    // No entry outlives its connections: the map holds only upstreams with
                    // a connection open.
                    open.remove(&self.key);
                }
            }
        }
        self.slots.freed.notify_waiters();
    }
}

/// The key a URI's connections are counted under, and pooled under
/// ([`crate::proxy::pool`]): `scheme://authority`.
pub(crate) fn key(uri: &Uri) -> Box<str> {
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map_or("", |a| a.as_str());
    let mut key = String::with_capacity(scheme.len() + 3 + authority.len());
    key.push_str(scheme);
    key.push_str("://");
    key.push_str(authority);
    key.into_boxed_str()
}

/// A connector whose connections each hold a slot of `slots` while open
/// ([`Chained::hold`]).
#[derive(Clone)]
pub(crate) struct Capped<C> {
    inner: C,
    slots: Arc<Slots>,
    /// How long a connect waits for a slot.
    wait: Duration,
}

impl<C> Capped<C> {
    pub(crate) fn new(inner: C, slots: Arc<Slots>, wait: Duration) -> Self {
        Capped { inner, slots, wait }
    }
}

impl<C, T> tower::Service<Uri> for Capped<C>
where
    C: tower::Service<Uri, Response = Chained<T>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    T: Send + 'static,
{
    type Response = Chained<T>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let key = key(&uri);
        let slots = self.slots.clone();
        let wait = self.wait;
        // The connect starts only once a slot is held: a clone makes it then.
        let inner = self.inner.clone();
        Box::pin(async move {
            let slot = slots.take(&key, wait).await?;
            let mut io = tower::ServiceExt::oneshot(inner, uri)
                .await
                .map_err(Into::into)?;
            io.hold(slot);
            Ok(io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_past_the_cap_waits_for_a_close_and_entries_go_with_their_connections() {
        let slots = Slots::new(2);
        let a = slots.take("http://a:80", Duration::ZERO).await.unwrap();
        let b = slots.take("http://a:80", Duration::ZERO).await.unwrap();
        // Another upstream has its own count.
        let other = slots.take("http://b:80", Duration::ZERO).await.unwrap();
        let full = slots
            .take("http://a:80", Duration::from_millis(20))
            .await
            .err()
            .expect("the cap holds");
        assert!(
            full.to_string().contains("2 connections to http://a:80"),
            "{full}"
        );
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take("http://a:80", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(a);
        let c = waiting.await.unwrap().expect("a close frees a slot");
        assert_eq!(slots.open("http://a:80"), 2);
        drop((b, c, other));
        assert!(
            slots.open.lock().is_empty(),
            "no entry without a connection"
        );
    }
}
