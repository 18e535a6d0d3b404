//! Where a plugin's state lives: a sled tree per plugin holding its keys beside its
//! checkpoint, committed together.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::runtime::{StateError, StateView, Writes};
use crate::dead_letter::{DeadLetter, Quarantine};

const CHECKPOINT: &[u8] = b"c";
const PROCESSED: &[u8] = b"n";
const HASH: &[u8] = b"h";
const ORIGIN: &[u8] = b"o";
const DERIVED: &[u8] = b"d";
const QUARANTINE: &[u8] = b"q";
/// The record of a small commit being applied (see [`CommitWrites`]).
const PENDING: &[u8] = b"p";
const STATE: u8 = b's';
const DEAD_LETTER: u8 = b'x';

fn dead_letter_key(position: u64) -> [u8; 9] {
    let mut k = [DEAD_LETTER; 9];
    k[1..].copy_from_slice(&position.to_be_bytes());
    k
}

fn tree_name(plugin: &str) -> String {
    format!("plugin/{plugin}")
}

/// The tree of one version's state: generation 0 is the plugin's first tree (the only one
/// before versions were kept apart), later ones carry `#N`, a character no name has.
fn generation_tree(plugin: &str, generation: u32) -> String {
    match generation {
        0 => tree_name(plugin),
        g => format!("plugin/{plugin}#{g}"),
    }
}

/// The tree of one version's snapshots (copies of its state at past checkpoints).
fn snapshot_tree(plugin: &str, generation: u32) -> String {
    format!(
        "snapshot/{}",
        &generation_tree(plugin, generation)["plugin/".len()..]
    )
}

/// A snapshot's marker (`m` + checkpoint), written with its keys in one batch.
const SNAPSHOT_MARK: u8 = b'm';
/// A snapshot's key (`k` + checkpoint + state key).
const SNAPSHOT_KEY: u8 = b'k';

fn snapshot_key(kind: u8, checkpoint: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(kind);
    k.extend_from_slice(&checkpoint.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The generations of `plugin`'s stores that exist in `db`, in order.
pub fn generations(db: &sled::Db, plugin: &str) -> Vec<u32> {
    let base = tree_name(plugin);
    let mut found: Vec<u32> = db
        .tree_names()
        .iter()
        .filter_map(|n| {
            let n = std::str::from_utf8(n).ok()?;
            let rest = n.strip_prefix(base.as_str())?;
            match rest.strip_prefix('#') {
                None if rest.is_empty() => Some(0),
                Some(g) => g.parse().ok(),
                None => None,
            }
        })
        .collect();
    found.sort_unstable();
    found
}

fn state_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(STATE);
    k.extend_from_slice(key.as_bytes());
    k
}

fn u64_of(v: Option<sled::IVec>) -> Option<u64> {
    v.and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
}

/// Why the store of a plugin could not be read or written: the host's failure, never the
/// plugin's. Callers retry it (the runner, with backoff) or report it as a storage error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The state database failed (the message names what sled reported).
    #[error("{0}")]
    Storage(String),
    /// A record the host wrote cannot be decoded: the state database is damaged.
    #[error(
        "the stored {what} at {key} cannot be decoded ({message}); the state database is damaged"
    )]
    Corrupt {
        /// What kind of record (a dead letter, a quarantine).
        what: &'static str,
        /// Which one.
        key: String,
        /// What decoding said.
        message: String,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        Self::Storage(describe_error(&e))
    }
}

/// A storage error as text, with the names sled prints as byte lists (a tree's) as text.
fn describe_error(e: &sled::Error) -> String {
    match e {
        sled::Error::CollectionNotFound(name) => format!(
            "the sled tree {:?} does not exist (it was purged)",
            String::from_utf8_lossy(name)
        ),
        e => e.to_string(),
    }
}

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    key: impl FnOnce() -> String,
    bytes: &[u8],
) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what,
        key: key(),
        message: e.to_string(),
    })
}

fn encode(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("a record of the host's serializes")
}

/// A plugin's stored state and checkpoint.
///
/// Clones share one tree and one count of dead letters (kept, so a status read never
/// scans the tree).
#[derive(Clone)]
pub struct PluginStore {
    tree: sled::Tree,
    /// Copies of the state at past checkpoints, for time travel.
    snapshots: sled::Tree,
    generation: u32,
    dead_letters: Arc<AtomicUsize>,
    /// Commits hold it for writing and [`PluginStore::consistent`] reads for reading, so a
    /// read of several keys never sees half a batch.
    commits: Arc<RwLock<()>>,
    /// Odd while a commit applies, bumped twice by each: a read that sees the same even
    /// value before and after saw no commit.
    sequence: Arc<AtomicU64>,
}

impl PluginStore {
    /// Opens (or creates) the store of `plugin` in `db`. Counts its dead letters (a scan of
    /// their keys): call it off the async threads.
    pub fn open(db: &sled::Db, plugin: &str) -> StoreResult<Self> {
        Self::open_generation(db, plugin, 0)
    }

    /// Opens (or creates) the store of one version of `plugin`: each version an upgrade
    /// builds beside the live one has its own generation. Call it off the async threads,
    /// and never for a generation a live handle commits to: opening finishes a commit a
    /// crash interrupted, outside that handle's commit lock.
    pub fn open_generation(db: &sled::Db, plugin: &str, generation: u32) -> StoreResult<Self> {
        let tree = db.open_tree(generation_tree(plugin, generation))?;
        if CommitWrites::finish_pending(&tree)? {
            tracing::info!(
                plugin,
                generation,
                "finished a commit that was being applied when the host stopped"
            );
        }
        let snapshots = db.open_tree(snapshot_tree(plugin, generation))?;
        let mut count = 0;
        for key in tree.scan_prefix([DEAD_LETTER]).keys() {
            key?;
            count += 1;
        }
        Ok(Self {
            tree,
            snapshots,
            generation,
            dead_letters: Arc::new(AtomicUsize::new(count)),
            commits: Arc::default(),
            sequence: Arc::default(),
        })
    }

    /// Which of the plugin's stores this is (0 for the first).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Runs `read` with no commit in between, and answers with the checkpoint the state it
    /// read reflects: every event before it is folded in.
    pub fn consistent<T>(
        &self,
        read: impl FnOnce(&Self) -> StoreResult<T>,
    ) -> StoreResult<(u64, T)> {
        let _held = self.commits.read().expect("commit lock");
        let checkpoint = self.checkpoint()?.unwrap_or(0);
        Ok((checkpoint, read(self)?))
    }

    /// Keeps a copy of the state as it stands at `checkpoint` (call it right after the
    /// commit of that checkpoint), in one batch, and drops the oldest copies past `keep`.
    /// Costs one pass over the state.
    pub fn snapshot(&self, checkpoint: u64, keep: usize) -> StoreResult<()> {
        let mut b = sled::Batch::default();
        {
            let _held = self.commits.read().expect("commit lock");
            for entry in self.tree.scan_prefix([STATE]) {
                let (k, v) = entry?;
                b.insert(snapshot_key(SNAPSHOT_KEY, checkpoint, &k[1..]), v);
            }
        }
        b.insert(snapshot_key(SNAPSHOT_MARK, checkpoint, &[]), &[][..]);
        self.snapshots.apply_batch(b)?;
        let marks = self.snapshot_checkpoints()?;
        for old in marks.iter().take(marks.len().saturating_sub(keep)) {
            let mut b = sled::Batch::default();
            b.remove(snapshot_key(SNAPSHOT_MARK, *old, &[]));
            for k in self
                .snapshots
                .scan_prefix(snapshot_key(SNAPSHOT_KEY, *old, &[]))
                .keys()
            {
                b.remove(k?);
            }
            self.snapshots.apply_batch(b)?;
        }
        Ok(())
    }

    /// The checkpoints of the snapshots kept, oldest first.
    pub fn snapshot_checkpoints(&self) -> StoreResult<Vec<u64>> {
        self.snapshots
            .scan_prefix([SNAPSHOT_MARK])
            .keys()
            .map(|k| {
                let k = k?;
                Ok(u64::from_be_bytes(
                    k[1..9].try_into().expect("a marker's checkpoint"),
                ))
            })
            .collect()
    }

    /// The latest snapshot at or before `checkpoint`: its checkpoint and state.
    pub fn snapshot_before(&self, checkpoint: u64) -> StoreResult<Option<(u64, MemState)>> {
        let range =
            snapshot_key(SNAPSHOT_MARK, 0, &[])..=snapshot_key(SNAPSHOT_MARK, checkpoint, &[]);
        let Some(mark) = self.snapshots.range(range).keys().next_back() else {
            return Ok(None);
        };
        let at = u64::from_be_bytes(mark?[1..9].try_into().expect("a marker's checkpoint"));
        let mut state = BTreeMap::new();
        for entry in self
            .snapshots
            .scan_prefix(snapshot_key(SNAPSHOT_KEY, at, &[]))
        {
            let (k, v) = entry?;
            state.insert(
                String::from_utf8_lossy(&k[9..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
        Ok(Some((at, MemState(RwLock::new(state)))))
    }

    /// Runs `read` (a plugin's query, which may take as long as its time limit) without
    /// holding commits up: it runs again when a commit came in between, and only its last
    /// try holds them. Answers like [`PluginStore::consistent`].
    pub fn optimistic<T>(
        &self,
        mut read: impl FnMut(&Self) -> StoreResult<T>,
    ) -> StoreResult<(u64, T)> {
        for _ in 0..3 {
            let before = self.sequence.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let checkpoint = self.checkpoint()?.unwrap_or(0);
            let value = read(self)?;
            std::sync::atomic::fence(Ordering::Acquire);
            if self.sequence.load(Ordering::Acquire) == before {
                return Ok((checkpoint, value));
            }
        }
        self.consistent(read)
    }

    fn apply(&self, b: CommitWrites) -> StoreResult<()> {
        let _held = self.commits.write().expect("commit lock");
        self.sequence.fetch_add(1, Ordering::AcqRel);
        let applied = b.apply(&self.tree);
        self.sequence.fetch_add(1, Ordering::AcqRel);
        Ok(applied?)
    }

    /// Deletes everything stored for the plugin. The tree itself is dropped only when this
    /// is its last handle: sled's iterators never end on a dropped tree, so a tree someone
    /// may still read is emptied and kept. Call it only once the plugin's runner stopped,
    /// off the async threads.
    pub fn purge(self, db: &sled::Db) -> StoreResult<()> {
        self.wipe()?;
        if Arc::strong_count(&self.dead_letters) == 1 {
            db.drop_tree(self.tree.name())?;
            db.drop_tree(self.snapshots.name())?;
        } else {
            self.tree.flush()?;
        }
        Ok(())
    }

    /// The position the plugin resumes from, if it ever committed.
    pub fn checkpoint(&self) -> StoreResult<Option<u64>> {
        Ok(u64_of(self.tree.get(CHECKPOINT)?))
    }

    /// Events handled since the state was started.
    pub fn processed(&self) -> StoreResult<u64> {
        Ok(u64_of(self.tree.get(PROCESSED)?).unwrap_or(0))
    }

    /// Hash of the component that built this state.
    pub fn component_hash(&self) -> StoreResult<Option<String>> {
        Ok(self
            .tree
            .get(HASH)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Starts the state over for the component with `hash`: empty, beginning at `origin`,
    /// with no dead letters and no quarantine (they were the old component's). Whether the
    /// plugin ever derived events is kept: they stay in the log.
    pub fn reset(&self, hash: &str, origin: u64) -> StoreResult<()> {
        let derived = self.has_derived()?;
        self.wipe()?;
        let mut b = CommitWrites::default();
        if derived {
            b.insert(DERIVED, [1u8]);
        }
        b.insert(HASH, hash.as_bytes());
        b.insert(CHECKPOINT, origin.to_be_bytes());
        b.insert(ORIGIN, origin.to_be_bytes());
        self.apply(b)
    }

    /// Deletes everything stored, as one commit for readers. The component hash and the
    /// checkpoint go first, durably: a crash halfway leaves a store no component claims,
    /// which the next load starts over, never stale state under a checkpoint of 0.
    fn wipe(&self) -> StoreResult<()> {
        let _held = self.commits.write().expect("commit lock");
        self.sequence.fetch_add(1, Ordering::AcqRel);
        let wiped = (|| {
            let mut b = sled::Batch::default();
            b.remove(HASH);
            b.remove(CHECKPOINT);
            self.tree.apply_batch(b)?;
            self.tree.flush()?;
            self.snapshots.clear()?;
            self.tree.clear()?;
            self.dead_letters.store(0, Ordering::Relaxed);
            Ok::<_, sled::Error>(())
        })();
        self.sequence.fetch_add(1, Ordering::AcqRel);
        Ok(wiped?)
    }

    /// Records that the component with `hash` now builds this state as it stands (an
    /// upgrade that keeps the state, or an extractor's or tool's, which go on from their
    /// checkpoint).
    pub fn adopt(&self, hash: &str) -> StoreResult<()> {
        self.tree.insert(HASH, hash.as_bytes())?;
        self.tree.flush()?;
        Ok(())
    }

    /// True once the plugin has (possibly) appended derived events under its name.
    pub fn has_derived(&self) -> StoreResult<bool> {
        Ok(self.tree.get(DERIVED)?.is_some())
    }

    /// Records, durably, that the plugin is about to append derived events; a runner that
    /// starts later knows it must look for them before deriving again.
    pub fn mark_derived(&self) -> StoreResult<()> {
        if !self.has_derived()? {
            self.tree.insert(DERIVED, &[1u8][..])?;
            self.tree.flush()?;
        }
        Ok(())
    }

    /// The position the state began at (replays for time travel start here).
    pub fn origin(&self) -> StoreResult<u64> {
        Ok(u64_of(self.tree.get(ORIGIN)?).unwrap_or(0))
    }

    /// Commits a batch's writes with the new checkpoint and count, atomically.
    pub fn commit(&self, writes: &Writes, checkpoint: u64, processed: u64) -> StoreResult<()> {
        self.commit_with(writes, checkpoint, processed, &[], None)
    }

    /// Commits like [`PluginStore::commit`], together with dead letters and, when given,
    /// a quarantine: a crash keeps all or none of them.
    pub fn commit_with(
        &self,
        writes: &Writes,
        checkpoint: u64,
        processed: u64,
        dead_letters: &[DeadLetter],
        quarantine: Option<&Quarantine>,
    ) -> StoreResult<()> {
        let mut b = CommitWrites::default();
        b.state(writes);
        let mut new = 0;
        for letter in dead_letters {
            let key = dead_letter_key(letter.position);
            if !self.tree.contains_key(key)? {
                new += 1;
            }
            b.insert(key, encode(letter));
        }
        if let Some(q) = quarantine {
            b.insert(QUARANTINE, encode(q));
        }
        b.insert(CHECKPOINT, checkpoint.to_be_bytes());
        b.insert(PROCESSED, processed.to_be_bytes());
        self.apply(b)?;
        self.dead_letters.fetch_add(new, Ordering::Relaxed);
        // Dead letters and quarantines are the operator's to see and act on, and rare:
        // durable at once, so a crash never runs the failing events (and their
        // announcements) again.
        if !dead_letters.is_empty() || quarantine.is_some() {
            self.tree.flush()?;
        }
        Ok(())
    }

    /// Commits the writes of a dead letter handled on retry and removes the dead letter,
    /// atomically; the checkpoint stays where it is.
    pub fn commit_retried(&self, writes: &Writes, position: u64) -> StoreResult<()> {
        let mut b = CommitWrites::default();
        b.state(writes);
        let key = dead_letter_key(position);
        let existed = self.tree.contains_key(key)?;
        b.remove(key);
        self.apply(b)?;
        // An operator's retry: durable at once, like the dead letter it settles.
        self.tree.flush()?;
        if existed {
            self.dead_letters.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The dead letters in position order.
    pub fn dead_letters(&self) -> StoreResult<Vec<DeadLetter>> {
        self.tree
            .scan_prefix([DEAD_LETTER])
            .map(|r| {
                let (k, v) = r?;
                decode("dead letter", || self.describe_key(&k), &v)
            })
            .collect()
    }

    fn describe_key(&self, key: &[u8]) -> String {
        let tree = String::from_utf8_lossy(&self.tree.name()).into_owned();
        match key.split_first() {
            Some((&DEAD_LETTER, rest)) => match <[u8; 8]>::try_from(rest) {
                Ok(p) => format!("position {} of {tree}", u64::from_be_bytes(p)),
                Err(_) => format!("a malformed key of {tree}"),
            },
            _ => tree,
        }
    }

    /// How many dead letters there are (a count kept beside the tree: no scan).
    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.load(Ordering::Relaxed)
    }

    /// The dead letter at `position`.
    pub fn dead_letter(&self, position: u64) -> StoreResult<Option<DeadLetter>> {
        let key = dead_letter_key(position);
        self.tree
            .get(key)?
            .map(|v| decode("dead letter", || self.describe_key(&key), &v))
            .transpose()
    }

    /// Stores (replaces) a dead letter, under its position.
    pub fn put_dead_letter(&self, letter: &DeadLetter) -> StoreResult<()> {
        let old = self
            .tree
            .insert(&dead_letter_key(letter.position)[..], encode(letter))?;
        if old.is_none() {
            self.dead_letters.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Removes the dead letter at `position`; false when there was none.
    pub fn remove_dead_letter(&self, position: u64) -> StoreResult<bool> {
        let removed = self.tree.remove(dead_letter_key(position))?.is_some();
        if removed {
            self.dead_letters.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    /// Why the plugin is quarantined, if it is.
    pub fn quarantine(&self) -> StoreResult<Option<Quarantine>> {
        self.tree
            .get(QUARANTINE)?
            .map(|v| decode("quarantine", || self.describe_key(QUARANTINE), &v))
            .transpose()
    }

    /// Clears the quarantine, durably.
    pub fn clear_quarantine(&self) -> StoreResult<()> {
        self.tree.remove(QUARANTINE)?;
        self.tree.flush()?;
        Ok(())
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self
            .tree
            .get(state_key(key))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Up to `limit` keys starting with `prefix`, in key order.
    pub fn scan(&self, prefix: &str, limit: usize) -> StoreResult<Vec<(String, String)>> {
        self.tree
            .scan_prefix(state_key(prefix))
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    String::from_utf8_lossy(&k[1..]).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect()
    }
}

/// How two stores' states compare, key by key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// Keys with equal values in both.
    pub same: u64,
    /// Keys in both with different values.
    pub differ: u64,
    /// Keys only in the first store.
    pub only_in_first: u64,
    /// Keys only in the second store.
    pub only_in_second: u64,
    /// Up to the sample size of the keys that are not the same: key, first's value,
    /// second's value.
    pub sample: Vec<(String, Option<String>, Option<String>)>,
    /// SHA-256 (hex) of each side's keys and values, in key order.
    pub hashes: (String, String),
}

/// One side of a comparison: state entries in key order.
type Entries<'a> = Box<dyn Iterator<Item = StoreResult<(Vec<u8>, Vec<u8>)>> + 'a>;

impl PluginStore {
    /// This store's state entries in key order (keys without their prefix).
    fn entries(&self) -> Entries<'_> {
        Box::new(self.tree.scan_prefix([STATE]).map(|r| {
            let (k, v) = r?;
            Ok((k[1..].to_vec(), v.to_vec()))
        }))
    }

    /// Compares this store's state with `other`'s key by key, in one pass over both in
    /// key order, keeping up to `sample` of the keys that are not the same.
    pub fn compare(&self, other: &PluginStore, sample: usize) -> StoreResult<Comparison> {
        compare_entries(self.entries(), other.entries(), sample)
    }

    /// Compares this store's state with `state` (a replay's), like [`PluginStore::compare`].
    pub fn compare_with(&self, state: &MemState, sample: usize) -> StoreResult<Comparison> {
        let map = state.0.read().expect("scratch state lock");
        let theirs: Entries<'_> = Box::new(
            map.iter()
                .map(|(k, v)| Ok((k.as_bytes().to_vec(), v.as_bytes().to_vec()))),
        );
        compare_entries(self.entries(), theirs, sample)
    }
}

/// Walks two sides in key order: counts, a sample, and a SHA-256 of each side.
fn compare_entries(a: Entries<'_>, b: Entries<'_>, sample: usize) -> StoreResult<Comparison> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    use sha2::Digest;
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let (mut ha, mut hb) = (sha2::Sha256::new(), sha2::Sha256::new());
    let digest = |h: &mut sha2::Sha256, k: &[u8], v: &[u8]| {
        for part in [k, v] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    };
    let mut c = Comparison::default();
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => return Err(a.next().expect("peeked").unwrap_err()),
            (_, Some(Err(_))) => return Err(b.next().expect("peeked").unwrap_err()),
            (Some(Ok(_)), None) => std::cmp::Ordering::Less,
            (None, Some(Ok(_))) => std::cmp::Ordering::Greater,
            (Some(Ok((ka, _))), Some(Ok((kb, _)))) => ka.cmp(kb),
        };
        let (key, first, second) = match order {
            std::cmp::Ordering::Less => {
                let (k, v) = a.next().expect("peeked")?;
                digest(&mut ha, &k, &v);
                c.only_in_first += 1;
                (k, Some(v), None)
            }
            std::cmp::Ordering::Greater => {
                let (k, v) = b.next().expect("peeked")?;
                digest(&mut hb, &k, &v);
                c.only_in_second += 1;
                (k, None, Some(v))
            }
            std::cmp::Ordering::Equal => {
                let (k, va) = a.next().expect("peeked")?;
                let (_, vb) = b.next().expect("peeked")?;
                digest(&mut ha, &k, &va);
                digest(&mut hb, &k, &vb);
                if va == vb {
                    c.same += 1;
                    continue;
                }
                c.differ += 1;
                (k, Some(va), Some(vb))
            }
        };
        if c.sample.len() < sample {
            c.sample.push((
                text(&key),
                first.as_deref().map(text),
                second.as_deref().map(text),
            ));
        }
    }
    c.hashes = (hex(&ha.finalize()), hex(&hb.finalize()));
    Ok(c)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl StateView for PluginStore {
    fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        PluginStore::get(self, key).map_err(|e| StateError(e.to_string()))
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StateError> {
        self.scan(prefix, usize::MAX)
            .map_err(|e| StateError(e.to_string()))
    }
}

/// Commits up to about this size (keys and values) are applied through a commit record;
/// larger ones, a catch-up's, as one sled batch.
const SMALL_COMMIT_BYTES: usize = 64 * 1024;

/// One commit's writes to a store, in order, applied so that a crash keeps all or none.
///
/// A sled `Batch` is atomic, but sled writes out and `sync_file_range`s its IO buffers
/// around every batch: two synchronous disk waits per commit, which for a projection
/// following live traffic is two per append. So a small commit is first recorded under
/// [`PENDING`] as one insert (atomic by itself), then applied key by key, then the record
/// is removed; none of it waits for the disk. sled recovers a prefix of its writes, so a
/// store opened after a crash holds either no record (the commit is whole or absent) or
/// the record of the last commit, which opening applies again (the writes are values, not
/// increments, so applying twice is applying once). Durability comes from sled's flush
/// schedule (`flush_every_ms`, 500 ms) and the explicit flushes of the host (a commit with
/// dead letters or a quarantine is flushed at once): a crash loses at most the commits of
/// the last interval, and the plugin runs those batches again from its durable checkpoint.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct CommitWrites(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl CommitWrites {
    fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.0
            .push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }

    fn state(&mut self, writes: &Writes) {
        for (k, v) in writes {
            match v {
                Some(v) => self.insert(state_key(k), v.as_bytes()),
                None => self.remove(state_key(k)),
            }
        }
    }

    fn into_batch(self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in self.0 {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b
    }

    /// Applies the writes to `tree` (see the type's documentation).
    fn apply(self, tree: &sled::Tree) -> sled::Result<()> {
        // The record's size, near enough, without encoding a catch-up's whole batch.
        let size: usize = self
            .0
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8)
            .sum();
        if size > SMALL_COMMIT_BYTES {
            // A record a failed small commit left must not outlive a later commit.
            let mut b = self.into_batch();
            b.remove(PENDING);
            return tree.apply_batch(b);
        }
        let record = postcard::to_allocvec(&self).expect("a commit record serializes");
        tree.insert(PENDING, record)?;
        for (k, v) in self.0 {
            match v {
                Some(v) => tree.insert(k, v)?,
                None => tree.remove(k)?,
            };
        }
        tree.remove(PENDING)?;
        Ok(())
    }

    /// Finishes a commit a crash interrupted: applies the record left in `tree`, if any,
    /// and removes it, atomically and durably.
    fn finish_pending(tree: &sled::Tree) -> StoreResult<bool> {
        let Some(record) = tree.get(PENDING)? else {
            return Ok(false);
        };
        let writes: CommitWrites =
            postcard::from_bytes(&record).map_err(|e| StoreError::Corrupt {
                what: "commit record",
                key: String::from_utf8_lossy(PENDING).into_owned(),
                message: e.to_string(),
            })?;
        let mut b = writes.into_batch();
        b.remove(PENDING);
        tree.apply_batch(b)?;
        tree.flush()?;
        Ok(true)
    }
}

/// State in memory: the scratch store of a replay (time travel).
#[derive(Default)]
pub struct MemState(pub RwLock<BTreeMap<String, String>>);

impl MemState {
    /// Applies a call's writes.
    pub fn apply(&self, writes: Writes) {
        let mut m = self.0.write().expect("scratch state lock");
        for (k, v) in writes {
            match v {
                Some(v) => m.insert(k, v),
                None => m.remove(&k),
            };
        }
    }
}

impl StateView for MemState {
    fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(self.0.read().expect("scratch state lock").get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, StateError> {
        Ok(self
            .0
            .read()
            .expect("scratch state lock")
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(pairs: &[(&str, Option<&str>)]) -> Writes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn a_commit_is_whole_after_a_crash_left_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = PluginStore::open(&db, "p").unwrap();
        store
            .commit(&writes(&[("a", Some("1")), ("b", Some("1"))]), 10, 10)
            .unwrap();
        // A crash after the record of the next commit and one of its writes: the prefix
        // sled recovers.
        let mut next = CommitWrites::default();
        next.state(&writes(&[("a", Some("2")), ("b", None), ("c", Some("2"))]));
        next.insert(CHECKPOINT, 20u64.to_be_bytes());
        next.insert(PROCESSED, 20u64.to_be_bytes());
        let tree = db.open_tree(tree_name("p")).unwrap();
        tree.insert(PENDING, postcard::to_allocvec(&next).unwrap())
            .unwrap();
        tree.insert(state_key("a"), "2").unwrap();
        drop((store, tree));

        let store = PluginStore::open(&db, "p").unwrap();
        assert_eq!(store.checkpoint().unwrap(), Some(20));
        assert_eq!(store.get("a").unwrap().as_deref(), Some("2"));
        assert_eq!(store.get("b").unwrap(), None);
        assert_eq!(store.get("c").unwrap().as_deref(), Some("2"));
        assert!(
            db.open_tree(tree_name("p"))
                .unwrap()
                .get(PENDING)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn small_and_large_commits_leave_no_record_and_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = PluginStore::open(&db, "p").unwrap();
        store
            .commit(&writes(&[("k", Some("small"))]), 1, 1)
            .unwrap();
        let big = "v".repeat(SMALL_COMMIT_BYTES);
        let large: Writes = (0..3)
            .map(|i| (format!("big-{i}"), Some(big.clone())))
            .collect();
        store.commit(&large, 2, 2).unwrap();
        store.commit(&writes(&[("k", None)]), 3, 3).unwrap();
        let tree = db.open_tree(tree_name("p")).unwrap();
        assert!(tree.get(PENDING).unwrap().is_none());
        assert_eq!(store.checkpoint().unwrap(), Some(3));
        assert_eq!(store.get("k").unwrap(), None);
        assert_eq!(store.get("big-2").unwrap().as_deref(), Some(big.as_str()));
    }
}
