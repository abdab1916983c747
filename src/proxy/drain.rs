//! Shutdown draining for every client connection (on a listener, inside a CONNECT tunnel,
//! upgraded to a WebSocket): they learn that shutdown began, stop taking new requests, and
//! shutdown waits until they are done or the grace period ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Shared between the server and the connections it drains.
#[derive(Debug)]
pub(crate) struct Drain {
    signal: watch::Receiver<bool>,
    active: AtomicUsize,
    idle: Notify,
}

/// Held by a connection while it is being served.
#[derive(Debug)]
pub(crate) struct Guard(Arc<Drain>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// A drain that fires when `signal` becomes true.
    pub(crate) fn new(signal: watch::Receiver<bool>) -> Arc<Drain> {
        Arc::new(Drain {
            signal,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Register a connection.
    pub(crate) fn enter(self: &Arc<Self>) -> Guard {
        self.active.fetch_add(1, Ordering::AcqRel);
        Guard(self.clone())
    }

    /// Resolves when shutdown begins.
    pub(crate) async fn signalled(&self) {
        let mut rx = self.signal.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Wait until every registered connection is done, at most `grace`. True if all were.
    pub(crate) async fn wait_idle(&self, grace: Duration) -> bool {
        let done = async {
            loop {
                let notified = self.idle.notified();
                if self.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(grace, done).await.is_ok()
    }
}
