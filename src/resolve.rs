//! Names resolved for policy, and connections held to the address policy saw.
//!
//! When some policy reads `context.address`, a destination named by host name is resolved
//! before policy decides, and the address policy saw is *pinned*: the upstream connector
//! reaches that name at that address only. Without the pin the connect would resolve again,
//! and DNS could answer otherwise between the decision and the connect (rebinding a
//! permitted name onto a forbidden range).
//!
//! A pin lasts while a request decided with it is in flight, and [`PIN_TTL`] after; requests
//! to the name meanwhile are decided with the same address (as they would reuse the same
//! pooled connection). Once a pin is neither held nor fresh, the next request resolves anew.
//! The table is bounded: pins that are neither held nor fresh are dropped whenever more than
//! [`UNHELD_MAX`] names are pinned, and held ones are as many as the requests in flight.
//!
//! With no policy reading the address, nothing here runs: no lookup before policy, no pins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a pin outlives the last request decided with it.
pub(crate) const PIN_TTL: Duration = Duration::from_secs(30);

/// Pinned names kept beyond those held, before the stale are dropped.
const UNHELD_MAX: usize = 4096;

/// The pinned addresses, shared by the pipeline and every worker's connector.
#[derive(Default)]
pub struct Pins {
    /// Whether the policy in force reads `context.address`; while it does, the connector
    /// reaches a name only at its pin.
    on: AtomicBool,
    map: Mutex<HashMap<Box<str>, Entry>>,
}

impl std::fmt::Debug for Pins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pins")
            .field("on", &self.on.load(Ordering::Relaxed))
            .field("names", &self.map.lock().len())
            .finish()
    }
}

struct Entry {
    addr: IpAddr,
    /// When the last holder let go (or the pin was made).
    at: Instant,
    held: usize,
}

impl Entry {
    fn live(&self) -> bool {
        self.held > 0 || self.at.elapsed() < PIN_TTL
    }
}

/// One request's hold on a name's pin; let go when dropped.
pub(crate) struct Pinned {
    pins: Arc<Pins>,
    name: Box<str>,
    /// The address the name is pinned to.
    pub(crate) addr: IpAddr,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pinned({} at {})", self.name, self.addr)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut map = self.pins.map.lock();
        if let Some(e) = map.get_mut(&self.name) {
            e.held = e.held.saturating_sub(1);
            if e.held == 0 {
                e.at = Instant::now();
            }
        }
    }
}

/// Why a connect found no pin to use.
#[derive(Debug)]
pub(crate) struct Unpinned;

impl Pins {
    /// An empty table, off.
    pub(crate) fn new() -> Arc<Pins> {
        Arc::default()
    }

    /// Say whether the policy in force reads the address (cheap when unchanged).
    pub(crate) fn set_on(&self, on: bool) {
        if self.on.load(Ordering::Relaxed) != on {
            self.on.store(on, Ordering::Relaxed);
        }
    }

    /// The address `name` is pinned to, held while the returned guard lives. Without a pin
    /// that is held or fresh, the name is resolved (within `within`) and `choose` picks the
    /// address from the answer (it refuses guarded ones).
    pub(crate) async fn hold(
        self: &Arc<Self>,
        name: &str,
        within: Duration,
        choose: impl FnOnce(Vec<IpAddr>) -> Result<IpAddr, String>,
    ) -> Result<Pinned, String> {
        if let Some(p) = self.existing(name) {
            return Ok(p);
        }
        let answer = tokio::time::timeout(within, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| format!("resolving {name} took longer than {within:?}"))?
            .map_err(|e| format!("cannot resolve {name}: {e}"))?;
        let addr = choose(answer.map(|a| a.ip()).collect())?;
        let mut map = self.map.lock();
        // Another request may have pinned it meanwhile: theirs stands.
        if let Some(e) = map.get_mut(name)
            && e.live()
        {
            e.held += 1;
            return Ok(self.pinned(name, e.addr));
        }
        if map.len() >= UNHELD_MAX {
            map.retain(|_, e| e.live());
            if map.len() >= UNHELD_MAX {
                map.retain(|_, e| e.held > 0);
            }
        }
        map.insert(
            name.into(),
            Entry {
                addr,
                at: Instant::now(),
                held: 1,
            },
        );
        Ok(self.pinned(name, addr))
    }

    fn existing(self: &Arc<Self>, name: &str) -> Option<Pinned> {
        let mut map = self.map.lock();
        let e = map.get_mut(name).filter(|e| e.live())?;
        e.held += 1;
        let addr = e.addr;
        drop(map);
        Some(self.pinned(name, addr))
    }

    fn pinned(self: &Arc<Self>, name: &str, addr: IpAddr) -> Pinned {
        Pinned {
            pins: self.clone(),
            name: name.into(),
            addr,
        }
    }

    /// For the connector: where to reach `name`. `Ok(Some)` its pin; `Ok(None)` resolve as
    /// usual (no policy reads the address); `Err` when policy reads it and no decision
    /// pinned this name (a connect that outlived its request), which must not connect.
    pub(crate) fn for_connect(&self, name: &str) -> Result<Option<IpAddr>, Unpinned> {
        if !self.on.load(Ordering::Relaxed) {
            // Pins left from a policy that read the address are not used once none does.
            return Ok(None);
        }
        match self.map.lock().get(name) {
            Some(e) => Ok(Some(e.addr)),
            None => Err(Unpinned),
        }
    }

    /// Names pinned (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(a: Vec<IpAddr>) -> Result<IpAddr, String> {
        a.into_iter().next().ok_or_else(|| "none".to_string())
    }

    #[tokio::test]
    async fn a_pin_holds_while_held_and_the_connector_uses_only_it() {
        let pins = Pins::new();
        assert!(
            matches!(pins.for_connect("localhost"), Ok(None)),
            "off: resolve as usual"
        );
        pins.set_on(true);
        assert!(
            pins.for_connect("localhost").is_err(),
            "on: no pin, no connect"
        );

        let one = pins
            .hold("localhost", Duration::from_secs(5), first)
            .await
            .unwrap();
        assert!(one.addr.is_loopback());
        assert_eq!(pins.for_connect("localhost").unwrap(), Some(one.addr));
        // A second request is decided with the same address, without asking DNS: its
        // `choose` would refuse anything.
        let two = pins
            .hold("localhost", Duration::from_secs(5), |_| {
                Err("asked again".into())
            })
            .await
            .unwrap();
        assert_eq!(two.addr, one.addr);
        drop((one, two));
        // Fresh after the last holder: still the pin.
        assert!(pins.for_connect("localhost").unwrap().is_some());

        // A refusal from `choose` (every address guarded) pins nothing.
        let err = pins
            .hold(
                "ip6-localhost-nonexistent.invalid",
                Duration::from_secs(5),
                first,
            )
            .await
            .unwrap_err();
        assert!(err.contains("cannot resolve"), "{err}");
        assert_eq!(pins.len(), 1);
        // Off again (the policy no longer reads the address): the pin is not used.
        pins.set_on(false);
        assert!(matches!(pins.for_connect("localhost"), Ok(None)));
    }

    #[tokio::test]
    async fn stale_unheld_pins_are_dropped_when_the_table_is_full_and_held_ones_stay() {
        let pins = Pins::new();
        let held = pins
            .hold("localhost", Duration::from_secs(5), first)
            .await
            .unwrap();
        {
            let mut map = pins.map.lock();
            for i in 0..UNHELD_MAX {
                map.insert(
                    format!("n{i}.example").into(),
                    Entry {
                        addr: IpAddr::from([192, 0, 2, 1]),
                        at: Instant::now() - PIN_TTL * 2,
                        held: 0,
                    },
                );
            }
        }
        pins.set_on(true);
        let _ = pins
            .hold("127.0.0.1", Duration::from_secs(5), first)
            .await
            .unwrap();
        assert_eq!(pins.len(), 2, "the stale went, the held stayed");
        assert_eq!(pins.for_connect("localhost").unwrap(), Some(held.addr));
    }
}
