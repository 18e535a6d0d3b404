//! A filter in memory in front of the id index: it answers "certainly not indexed" for
//! most ids that are new, so an append or a lookup of a new id does not walk sled's tree.
//!
//! Indexed appends (a client's own ids, and the ids a handler fixes: tool starts and
//! outcomes) look every id up before they store it, and nearly every id is new: a lookup
//! in sled costs a few microseconds where this reads one cache line per layer. The filter is a
//! blocked Bloom filter (each id sets up to five bits of one 64-bit word) in layers that
//! each hold twice the one before, so it never needs a rebuild. It holds 2 bytes per id
//! it was given when its last layer is full and about 4 just after one is added (more
//! while it holds fewer than 200,000 ids, since the first layer takes 128 KiB): 1M ids
//! take 2-4 MB. An id the filter does not rule out is looked up in sled as before, so a
//! false positive costs only that lookup: about 0.4% of new ids per full layer, and the
//! layers add up (about 1-2% at a million ids, 3-5% at 10-100 million).
//! Ids are never taken out (an erased stream's ids stay in): that too only costs a lookup.
//!
//! At open the filter starts empty and answers "maybe" for every id until a background
//! scan has added every id sled holds; the writer adds each id it stages from the start,
//! so no id the index holds is ever ruled out.

use std::hash::{BuildHasher, Hasher};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Ids the first layer is sized for; each later layer holds twice the one before.
const FIRST_CAPACITY: usize = 64 * 1024;
/// Bits of a layer for each id it is sized for.
const BITS_PER_ID: usize = 16;
/// Bits each id sets in its word.
const PROBES: u32 = 5;

/// Which ids the id index may hold.
pub(super) struct IdFilter {
    layers: RwLock<Vec<Layer>>,
    /// Set once every id the index held at open has been added.
    complete: AtomicBool,
}

struct Layer {
    words: Box<[AtomicU64]>,
    /// Ids this layer is sized for; the next id beyond it opens a new layer.
    capacity: usize,
    added: AtomicUsize,
}

impl Layer {
    fn new(capacity: usize) -> Self {
        let words = (capacity * BITS_PER_ID / 64).next_power_of_two();
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            capacity,
            added: AtomicUsize::new(0),
        }
    }

    fn slot(&self, hash: u64) -> (&AtomicU64, u64) {
        let word = &self.words[(hash as usize) & (self.words.len() - 1)];
        // The bits come from the hash's high half, the word from its low bits.
        let mut mask = 0u64;
        for i in 0..PROBES {
            mask |= 1 << ((hash >> (32 + 6 * i)) & 63);
        }
        (word, mask)
    }
}

impl IdFilter {
    /// An empty filter that rules nothing out until [`IdFilter::completed`] is called.
    pub(super) fn new() -> Self {
        Self {
            layers: RwLock::new(vec![Layer::new(FIRST_CAPACITY)]),
            complete: AtomicBool::new(false),
        }
    }

    /// Records that `id` may be in the index. Call before the id's position can be read
    /// as durable.
    pub(super) fn add(&self, id: &str) {
        self.add_bytes(id.as_bytes());
    }

    fn add_bytes(&self, id: &[u8]) {
        let hash = hash(id);
        let full = {
            let layers = self.layers.read().expect("id filter lock");
            let last = layers.last().expect("a layer");
            let (word, mask) = last.slot(hash);
            word.fetch_or(mask, Ordering::Release);
            last.added.fetch_add(1, Ordering::Relaxed) + 1 >= last.capacity
        };
        if full {
            let mut layers = self.layers.write().expect("id filter lock");
            let last = layers.last().expect("a layer");
            if last.added.load(Ordering::Relaxed) >= last.capacity {
                let next = last.capacity * 2;
                layers.push(Layer::new(next));
            }
        }
    }

    /// Marks the filter as holding every id of the index (the scan at open is done).
    pub(super) fn completed(&self) {
        self.complete.store(true, Ordering::Release);
    }

    /// Whether the scan at open is done (until then nothing is ruled out).
    pub(super) fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// False only when `id` is certainly not in the index.
    pub(super) fn may_hold(&self, id: &str) -> bool {
        if !self.complete.load(Ordering::Acquire) {
            return true;
        }
        let hash = hash(id.as_bytes());
        let layers = self.layers.read().expect("id filter lock");
        layers.iter().any(|layer| {
            let (word, mask) = layer.slot(hash);
            word.load(Ordering::Acquire) & mask == mask
        })
    }

    /// Bytes the filter holds.
    pub(super) fn bytes(&self) -> usize {
        let layers = self.layers.read().expect("id filter lock");
        layers.iter().map(|l| l.words.len() * 8).sum()
    }
}

/// Adds every id `db`'s index holds to `filter`, then marks it complete; stops early when
/// `closing` is set. A failed scan leaves the filter ruling nothing out (every lookup asks
/// sled, as without it).
pub(super) fn fill(db: &sled::Db, filter: &IdFilter, closing: &AtomicBool) {
    let began = std::time::Instant::now();
    let mut n = 0u64;
    for item in db.scan_prefix([crate::log::codec::ID_PREFIX]) {
        let key = match item {
            Ok((key, _)) => key,
            Err(e) => {
                tracing::warn!(
                    "the id filter's scan of the index failed, so id lookups all ask the index: {e}"
                );
                return;
            }
        };
        // Keys are the prefix and the id's text.
        filter.add_bytes(&key[1..]);
        n += 1;
        if n % 4096 == 0 && closing.load(Ordering::Acquire) {
            return;
        }
    }
    filter.completed();
    tracing::debug!(
        ids = n,
        ms = began.elapsed().as_millis() as u64,
        bytes = filter.bytes(),
        "id filter filled"
    );
}

/// A fixed-key hash: the same id always lands on the same bits. An id chosen to collide
/// only costs its appender a lookup in sled.
fn hash(id: &[u8]) -> u64 {
    let mut h = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().build_hasher();
    h.write(id);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_ruled_out_until_the_scan_is_done() {
        let f = IdFilter::new();
        assert!(f.may_hold("never-added"));
        f.completed();
        assert!(!f.may_hold("never-added"));
    }

    #[test]
    fn no_added_id_is_ruled_out_across_layers_and_few_new_ones_pass() {
        let f = IdFilter::new();
        f.completed();
        let n = FIRST_CAPACITY * 6; // three layers (1 + 2 + 4)
        for i in 0..n {
            f.add(&format!("id-{i}"));
        }
        assert!(f.layers.read().unwrap().len() >= 3);
        for i in 0..n {
            assert!(f.may_hold(&format!("id-{i}")), "id-{i} was added");
        }
        let passed = (0..100_000)
            .filter(|i| f.may_hold(&format!("new-{i}")))
            .count();
        // Each layer's false positives add up; far fewer than the 100,000 lookups saved.
        assert!(
            passed < 3_000,
            "{passed} of 100,000 new ids were not ruled out"
        );
        assert!(f.bytes() <= n * 4, "{} bytes for {n} ids", f.bytes());
    }

    #[test]
    fn ids_added_from_two_threads_while_it_grows_are_all_held() {
        let f = std::sync::Arc::new(IdFilter::new());
        f.completed();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for i in 0..FIRST_CAPACITY * 3 {
                        f.add(&format!("{t}-{i}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..2 {
            for i in 0..FIRST_CAPACITY * 3 {
                assert!(f.may_hold(&format!("{t}-{i}")));
            }
        }
    }
}
