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
//!
//! A memo whose entries describe one second (a request context holds the request's time)
//! is kept with [`Memo::insert_in_second`]: the first entry of a later second drops the
//! earlier seconds' entries, which no request can hit again. Without that, a steady load
//! added an entry per second per request shape until the byte bound cleared the memo, and
//! the sidecar's RSS rose and fell by megabytes over a quarter of an hour (BENCHMARKS.md,
//! the 30-minute soak).

use parking_lot::RwLock;
use std::collections::HashMap;

pub(super) struct Memo<V> {
    map: RwLock<Held<V>>,
    cap: usize,
    bytes: usize,
}

struct Held<V> {
    map: HashMap<String, V>,
    /// Bytes held, by the memo's reckoning.
    used: usize,
    /// The latest second an entry was kept for (0 for a memo not kept by seconds).
    second: u64,
}

impl<V: Clone> Memo<V> {
    /// At most `cap` entries and `bytes` bytes of keys and values.
    pub(super) fn new(cap: usize, bytes: usize) -> Self {
        Memo {
            map: RwLock::new(Held {
                map: HashMap::new(),
                used: 0,
                second: 0,
            }),
            cap,
            bytes,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<V> {
        self.map.read().map.get(key).cloned()
    }

    /// Keep `value` under `key`; `size` is what the value holds beyond the memo's own
    /// bookkeeping (0 for a value shared with other entries).
    pub(super) fn insert(&self, key: String, value: V, size: usize) {
        self.insert_with(key, value, size, None);
    }

    /// [`Self::insert`] for an entry that describes the Unix second `second`: a later
    /// second's first entry drops every earlier one, and an entry for a second already
    /// passed is not kept.
    pub(super) fn insert_in_second(&self, key: String, value: V, size: usize, second: u64) {
        self.insert_with(key, value, size, Some(second));
    }

    fn insert_with(&self, key: String, value: V, size: usize, second: Option<u64>) {
        let cost = key.len() + size + ENTRY_OVERHEAD;
        if cost > self.bytes {
            return;
        }
        let mut guard = self.map.write();
        let held = &mut *guard;
        if let Some(second) = second {
            if second < held.second {
                return;
            }
            if second > held.second {
                held.map.clear();
                held.used = 0;
                held.second = second;
            }
        }
        if held.map.len() >= self.cap || held.used + cost > self.bytes {
            held.map.clear();
            held.used = 0;
        }
        if held.map.insert(key, value).is_none() {
            held.used += cost;
        }
    }

    /// Bytes held now, by the memo's reckoning.
    #[cfg(test)]
    pub(super) fn used(&self) -> usize {
        self.map.read().used
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.read().map.len()
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

    #[test]
    fn a_later_second_drops_the_earlier_ones() {
        let m = Memo::new(100, 1 << 20);
        m.insert_in_second("a@10".into(), 1, 0, 10);
        m.insert_in_second("b@10".into(), 2, 0, 10);
        assert_eq!(
            (m.len(), m.get("a@10")),
            (2, Some(1)),
            "one second's entries kept"
        );
        m.insert_in_second("a@11".into(), 3, 0, 11);
        assert_eq!(m.get("a@10"), None, "an earlier second's entry is dropped");
        assert_eq!(m.get("b@10"), None);
        assert_eq!((m.len(), m.get("a@11")), (1, Some(3)));
        // A request timed in the second before (a slow one, finishing late) is answered but
        // not kept: its key cannot be asked for again.
        m.insert_in_second("c@10".into(), 4, 0, 10);
        assert_eq!((m.len(), m.get("c@10")), (1, None));
    }

    /// Steady traffic of a few shapes over many seconds holds a few entries, not one per
    /// shape per second until the byte bound is reached.
    #[test]
    fn steady_traffic_holds_one_seconds_worth() {
        let m = Memo::new(1_000_000, 1 << 20);
        for second in 1..=600 {
            for shape in 0..5 {
                let key = format!("shape{shape}\0{second}");
                if m.get(&key).is_none() {
                    m.insert_in_second(key, shape, 100, second);
                }
            }
            assert_eq!(m.len(), 5, "second {second}");
        }
        let key_len = format!("shape0\0{}", 600).len();
        assert_eq!(m.used(), 5 * (key_len + 100 + super::ENTRY_OVERHEAD));
    }
}
