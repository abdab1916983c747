//! A small bounded memo for the decision path's caches (entities, slices, contexts).
//!
//! Reads take a shared lock and clone the value (each an `Arc` or cheap to clone); a full
//! memo is cleared whole. Chosen over moka here because moka's housekeeping runs inline on
//! some calls and put the 99th percentile of a 2 µs decision at 8 µs (BENCHMARKS.md); these
//! caches hold a sidecar's few request shapes, so eviction order does not matter.
//!
//! Bounded twice: by entries and by bytes (each key's length plus the size its caller
//! reckons for the value), because keys hold client-chosen text (a destination host) and a
//! stream of distinct ones must not grow the sidecar past its memory limit.

use parking_lot::RwLock;
use std::collections::HashMap;

pub(super) struct Memo<V> {
    map: RwLock<(HashMap<String, V>, usize)>,
    cap: usize,
    bytes: usize,
}

impl<V: Clone> Memo<V> {
    /// At most `cap` entries and `bytes` bytes of keys and values.
    pub(super) fn new(cap: usize, bytes: usize) -> Self {
        Memo {
            map: RwLock::new((HashMap::new(), 0)),
            cap,
            bytes,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.map.read().0.get(key).cloned()
    }

    /// Keep `value` under `key`; `size` is what the value holds beyond the memo's own
    /// bookkeeping (0 for a value shared with other entries).
    pub(super) fn insert(&self, key: String, value: V, size: usize) {
        let cost = key.len() + size + ENTRY_OVERHEAD;
        if cost > self.bytes {
            return;
        }
        let mut guard = self.map.write();
        let (map, used) = &mut *guard;
        if map.len() >= self.cap || *used + cost > self.bytes {
            map.clear();
            *used = 0;
        }
        if map.insert(key, value).is_none() {
            *used += cost;
        }
    }

    /// Bytes held now, by the memo's reckoning.
    #[cfg(test)]
    pub(super) fn used(&self) -> usize {
        self.map.read().1
    }
}

/// A hash map entry's own cost: the key's `String` and the value's pointer, and the table's
/// slack.
const ENTRY_OVERHEAD: usize = 64;

#[cfg(test)]
mod tests {
    use super::Memo;

    #[test]
    fn bounded_by_clearing() {
        let m = Memo::new(2, 1 << 20);
        m.insert("a".into(), 1, 0);
        m.insert("b".into(), 2, 0);
        assert_eq!(m.get("a"), Some(1));
        m.insert("c".into(), 3, 0);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.get("c"), Some(3));
    }

    #[test]
    fn bounded_by_bytes() {
        let m = Memo::new(1_000_000, 10_000);
        for i in 0..10_000 {
            m.insert(format!("{i:0>200}"), i, 100);
            assert!(m.used() <= 10_000, "{}", m.used());
        }
        assert!(m.get(&format!("{:0>200}", 9_999)).is_some());
        // One entry larger than the whole budget is not kept at all.
        m.insert("x".repeat(20_000), 0, 0);
        assert!(m.get(&"x".repeat(20_000)).is_none());
    }
}
