//! Which task ids may be stored (both modes' stores keep one): a Bloom filter, so that a `PushTask` with
//! a new caller-chosen id (the common case) is not a store read. "No" is
//! certain and "maybe" is looked up: the store decides, the filter only
//! saves reads.
//!
//! Sized at open for twice the stored tasks (at least a million ids), 10
//! bits and 7 hashes an id: 1 % false "maybe" at that size, more past it,
//! until the next start sizes it again. Ids of removed tasks stay in it
//! (a "maybe" more). Until the stored ids are loaded, every id is a "maybe".

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const BITS_PER_ID: u64 = 10;
const HASHES: u64 = 7;
const MIN_IDS: u64 = 1 << 20;

pub struct IdFilter {
    words: Vec<AtomicU64>,
    bits: u64,
    ready: AtomicBool,
    keys: std::hash::RandomState,
}

impl IdFilter {
    /// A filter for about twice `stored` ids.
    pub fn new(stored: u64) -> IdFilter {
        let ids = (stored * 2).max(MIN_IDS);
        let words = (ids * BITS_PER_ID).div_ceil(64);
        IdFilter {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            bits: words * 64,
            ready: AtomicBool::new(false),
            keys: std::hash::RandomState::new(),
        }
    }

    fn hashes(&self, id: &str) -> (u64, u64) {
        let mut h = self.keys.build_hasher();
        h.write(id.as_bytes());
        let a = h.finish();
        // Double hashing: bit i is a + i·b.
        (a, a.rotate_left(32) | 1)
    }

    pub fn insert(&self, id: &str) {
        let (a, b) = self.hashes(id);
        for i in 0..HASHES {
            let bit = a.wrapping_add(i.wrapping_mul(b)) % self.bits;
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// May `id` be stored? Always true until [`IdFilter::set_ready`].
    pub fn may_contain(&self, id: &str) -> bool {
        if !self.ready.load(Ordering::Acquire) {
            return true;
        }
        let (a, b) = self.hashes(id);
        (0..HASHES).all(|i| {
            let bit = a.wrapping_add(i.wrapping_mul(b)) % self.bits;
            self.words[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
        })
    }

    /// Every stored id is in: "no" answers are certain from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Bytes the filter holds.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// The filter once it is sized (at the first load, from the number of
/// stored tasks), and the ids created before that.
#[derive(Default)]
pub struct Ids {
    inner: Mutex<(Option<Arc<IdFilter>>, Vec<String>)>,
}

impl Ids {
    pub fn insert(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &inner.0 {
            Some(f) => f.insert(id),
            None => inner.1.push(id.to_string()),
        }
    }

    /// Insert the ids of the tasks `writes` create.
    pub fn insert_created(&self, writes: &[crate::store::TaskWrite]) {
        for w in writes.iter().filter(|w| w.expected_last_seq.is_none()) {
            self.insert(&w.task.task_id);
        }
    }

    pub fn may_contain(&self, id: &str) -> bool {
        let f = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        f.is_none_or(|f| f.may_contain(id))
    }

    /// Size the filter for `stored` ids and load every task id `copy`
    /// holds into it, off the caller's thread (ids inserted meanwhile go in
    /// as they come; until it is done every id is a "maybe"). Once: later
    /// calls do nothing.
    pub fn fill_from(&self, stored: u64, copy: Arc<crate::store::sqlite::SqliteStore>) {
        let Some(filter) = self.install(stored) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("agenthub-ids".into())
            .spawn(move || match copy.for_each_task_id(|id| filter.insert(id)) {
                Ok(()) => filter.set_ready(),
                Err(e) => tracing::warn!(error = %e, "could not read the stored task ids; every unknown id is looked up"),
            });
    }

    /// Size the filter for `stored` ids, once: the filter to fill, or
    /// `None` if it already was.
    fn install(&self, stored: u64) -> Option<Arc<IdFilter>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.0.is_some() {
            return None;
        }
        let f = Arc::new(IdFilter::new(stored));
        for id in inner.1.drain(..) {
            f.insert(&id);
        }
        inner.0 = Some(f.clone());
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_ids_are_maybes_and_few_others_are() {
        let f = IdFilter::new(0);
        assert!(f.may_contain("anything"), "not ready: every id is a maybe");
        for i in 0..100_000 {
            f.insert(&format!("task-{i}"));
        }
        f.set_ready();
        assert!((0..100_000).all(|i| f.may_contain(&format!("task-{i}"))));
        let false_maybes = (0..100_000)
            .filter(|i| f.may_contain(&format!("other-{i}")))
            .count();
        assert!(false_maybes < 1_000, "{false_maybes} false maybes");
    }
}
