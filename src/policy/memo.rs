//! A small bounded memo for the decision path's caches (entities, slices, contexts).
//!
//! Reads take a shared lock and clone the value (each an `Arc` or cheap to clone); a full
//! memo is cleared whole. Chosen over moka here because moka's housekeeping runs inline on
//! some calls and put the 99th percentile of a 2 µs decision at 8 µs (BENCHMARKS.md); these
//! caches hold a sidecar's few request shapes, so eviction order does not matter.

use parking_lot::RwLock;
use std::collections::HashMap;

pub(super) struct Memo<V> {
    map: RwLock<HashMap<String, V>>,
    cap: usize,
}

impl<V: Clone> Memo<V> {
    pub(super) fn new(cap: usize) -> Self {
        Memo {
            map: RwLock::new(HashMap::new()),
            cap,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.map.read().get(key).cloned()
    }

    pub(super) fn insert(&self, key: String, value: V) {
        let mut map = self.map.write();
        if map.len() >= self.cap {
            map.clear();
        }
        map.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::Memo;

    #[test]
    fn bounded_by_clearing() {
        let m = Memo::new(2);
        m.insert("a".into(), 1);
        m.insert("b".into(), 2);
        assert_eq!(m.get("a"), Some(1));
        m.insert("c".into(), 3);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.get("c"), Some(3));
    }
}
