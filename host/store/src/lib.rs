//! Transactional maps over redb.
//!
//! A [`Tx`] reads committed state plus any pending write sets stacked on top of it, buffers its
//! own writes, and hands them out as a [`WriteSet`]. Applying a write set to the [`Store`] is one
//! redb transaction: all of it or none. The replication and ledger layers ship write sets, never
//! re-run code, so a write set is the unit everything above this module agrees on.
//!
//! With a [`Sealer`], nothing of a private map is in clear at rest: the table holds each entry
//! under a keyed digest of its key ([`Sealer::private_key_digest`]), and the key and value sealed
//! together, bound to that digest. Scans in key order go through an index of the private keys
//! that lives in memory only ([`KeyIndex`]). A private map enters it on its first scan (read back
//! from the sealed entries), so maps that are only ever read by key, and every map on a node
//! nobody scans on, cost no index at all. Public maps stay in clear.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use cloister_crypto::seal::{Purpose, Sealer};

pub mod gov;

/// Every map lives in this one table, keyed by `map name ‖ 0x00 ‖ key`.
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// Bookkeeping written atomically with the maps, e.g. the last applied transaction.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Separates a map's name from its keys in the table; map names are printable ASCII.
const MAP_SEPARATOR: u8 = 0;
/// Set in META once private entries are stored under digests; a sealed store without it holds
/// them the way stores did before, under their keys, and is converted when it opens.
const KEY_DIGESTS_META: &str = "private_keys_digested_v1";

/// The table keys (`map ‖ 0x00 ‖ key`, in clear) of every private entry of a sealed store, in
/// order. Cloning is cheap (a persistent tree), so each transaction holds the version that
/// matches its snapshot of the table.
/// Keys are shared (`Arc`), so the copy-on-write of a tree node costs reference counts, not
/// allocations.
type KeyIndex = imbl::OrdSet<Arc<[u8]>>;

/// The private maps a [`KeyIndex`] covers. A map enters when it is first scanned and stays.
type Indexed = Arc<BTreeSet<String>>;

/// The published [`KeyIndex`] and the maps it covers, with a version that changes whenever
/// either does.
#[derive(Default)]
struct Published {
    version: u64,
    keys: KeyIndex,
    indexed: Indexed,
}

/// An error of the state database, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("state database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("state database {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The stored name of an app's map: `{namespace}/{map}`. Governance maps keep their `gov.` name.
pub fn app_map(namespace: &str, map: &str) -> String {
    if map.starts_with(cloister_abi::abi::GOV_PREFIX) { map.to_owned() } else { format!("{namespace}/{map}") }
}

/// Whether the ledger keeps this stored map in clear: governance maps and `public:` app maps.
pub fn is_public(stored_map: &str) -> bool {
    match stored_map.split_once('/') {
        Some((_, map)) => map.starts_with(cloister_abi::abi::PUBLIC_PREFIX),
        None => stored_map.starts_with(cloister_abi::abi::GOV_PREFIX),
    }
}

fn full_key(map: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(map.len() + 1 + key.len());
    k.extend_from_slice(map.as_bytes());
    k.push(MAP_SEPARATOR);
    k.extend_from_slice(key);
    k
}

/// The map a table key belongs to.
pub fn map_of(full: &[u8]) -> &str {
    split_key(full).0
}

/// Splits what claims to be a table key (`map name ‖ 0x00 ‖ key`, the map name UTF-8) into its
/// map name and the key within the map, or says why it is not one.
fn split_table_key(full: &[u8]) -> Result<(&str, &[u8]), &'static str> {
    let at = full.iter().position(|&b| b == MAP_SEPARATOR).ok_or("no 0x00 separates its map name from its key")?;
    let map = std::str::from_utf8(&full[..at]).map_err(|_| "its map name is not UTF-8")?;
    Ok((map, &full[at + 1..]))
}

/// Splits what claims to be a table key into its map name and the key within the map, or None
/// if it is not one.
pub fn split_key_checked(full: &[u8]) -> Option<(&str, &[u8])> {
    split_table_key(full).ok()
}

/// What makes `full` not a table key, if anything: what [`split_key`] takes for granted.
fn table_key_fault(full: &[u8]) -> Option<&'static str> {
    split_table_key(full).err()
}

/// Splits a table key into its map name and the key within the map.
fn split_key(full: &[u8]) -> (&str, &[u8]) {
    // Write sets and snapshot records are checked as they are decoded; the store makes the rest.
    split_table_key(full).expect("a table key, checked where it came in")
}

/// The table-key bounds of a range within one map.
fn map_bounds(map: &str, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let lower = match lower {
        Bound::Unbounded => Bound::Included(full_key(map, &[])),
        b => b.map(|k| full_key(map, k)),
    };
    let upper = match upper {
        Bound::Unbounded => {
            let mut end = map.as_bytes().to_vec();
            end.push(MAP_SEPARATOR + 1);
            Bound::Excluded(end)
        }
        b => b.map(|k| full_key(map, k)),
    };
    (lower, upper)
}

/// Whether no key lies within the bounds. `BTreeMap::range` panics on a start after the end
/// and on an excluded start equal to an excluded end, and a contract may scan with any bounds:
/// such ranges are answered without calling it.
fn holds_nothing<K: Ord + ?Sized>(lower: Bound<&K>, upper: Bound<&K>) -> bool {
    match (lower, upper) {
        (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
        (Bound::Included(l), Bound::Included(u)) => l > u,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u)) | (Bound::Excluded(l), Bound::Included(u)) => {
            l >= u
        }
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Writes to apply atomically, by table key; `None` removes the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSet {
    #[serde(with = "byte_map")]
    entries: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// A write set's keys and values as byte strings rather than sequences of `u8`. In postcard the
/// two are the same bytes (a length, then the bytes), so every log, ledger and snapshot written
/// either way reads the same; but a byte string is copied whole, where a sequence is visited a
/// byte at a time, on every node, for every entry it receives, applies or snapshots.
mod byte_map {
    use std::collections::BTreeMap;

    use serde::de::{Deserializer, Error, MapAccess, Visitor};
    use serde::ser::Serializer;
    use serde_bytes::{ByteBuf, Bytes};

    type Map = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

    pub fn serialize<S: Serializer>(map: &Map, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (Bytes::new(k), v.as_deref().map(Bytes::new))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Map, D::Error> {
        struct ByteMap;
        impl<'de> Visitor<'de> for ByteMap {
            type Value = Map;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of byte strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Map, A::Error> {
                let mut map = Map::new();
                while let Some((k, v)) = access.next_entry::<ByteBuf, Option<ByteBuf>>()? {
                    // Every node splits each key into map and key as it applies the set, and
                    // takes the split for granted there: a key that does not split is refused
                    // here, as the set decodes.
                    if let Some(fault) = super::table_key_fault(&k) {
                        return Err(A::Error::custom(format_args!("a write set key is not a table key: {fault}")));
                    }
                    map.insert(k.into_vec(), v.map(ByteBuf::into_vec));
                }
                Ok(map)
            }
        }
        d.deserialize_map(ByteMap)
    }
}

impl WriteSet {
    pub fn put(&mut self, map: &str, key: &[u8], value: &[u8]) {
        self.entries.insert(full_key(map, key), Some(value.to_vec()));
    }

    pub fn remove(&mut self, map: &str, key: &[u8]) {
        self.entries.insert(full_key(map, key), None);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of written keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Total bytes of keys and values written.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum()
    }

    /// The write to `key` of `map`, if any: `Some(None)` is a removal.
    pub fn get(&self, map: &str, key: &[u8]) -> Option<Option<&[u8]>> {
        self.entries.get(&full_key(map, key)).map(Option::as_deref)
    }

    /// Each write as `(map, key, value or None for a removal)`, in map-then-key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8], Option<&[u8]>)> {
        self.entries.iter().map(|(full, v)| {
            let (map, key) = split_key(full);
            (map, key, v.as_deref())
        })
    }

    /// Splits into the writes whose map satisfies `pred` and the rest.
    pub fn split(self, pred: impl Fn(&str) -> bool) -> (WriteSet, WriteSet) {
        let (yes, no): (BTreeMap<_, _>, BTreeMap<_, _>) =
            self.entries.into_iter().partition(|(full, _)| pred(split_key(full).0));
        (WriteSet { entries: yes }, WriteSet { entries: no })
    }

    /// Adds another write set's writes (they win where both write a key).
    pub fn merge(&mut self, other: WriteSet) {
        self.entries.extend(other.entries);
    }

    /// This write set's entry for a table key: `Some(None)` is a removal.
    fn lookup(&self, full: &[u8]) -> Option<Option<&[u8]>> {
        self.entries.get(full).map(Option::as_deref)
    }

    /// The first entry (removals included) within the table-key bounds.
    fn first_in(&self, bounds: &(Bound<Vec<u8>>, Bound<Vec<u8>>)) -> Option<&[u8]> {
        let range = (bounds.0.as_ref(), bounds.1.as_ref());
        if holds_nothing(range.0, range.1) {
            return None;
        }
        self.entries.range::<Vec<u8>, _>(range).next().map(|(k, _)| k.as_slice())
    }
}

/// Each table key's newest pending write: the number of the write set that wrote it, and that
/// write set. Keys are shared (`Arc`) for the same reason as [`KeyIndex`]'s.
type Overlay = imbl::OrdMap<Arc<[u8]>, (u64, Arc<WriteSet>)>;

/// Write sets proposed and not yet applied, oldest first, merged so that a transaction finds a
/// key's newest pending write in one lookup however deep the stack is: a leader under load keeps
/// hundreds (up to its `pending_writes_max`), and reading through them one by one took about a
/// fifth of such a leader's CPU. A transaction takes the merged view as it stands, which is a
/// persistent map, so taking it costs a reference count, not a copy.
#[derive(Default)]
pub struct PendingWrites {
    /// The write sets, oldest first, with their numbers.
    layers: VecDeque<(u64, Arc<WriteSet>)>,
    newest: Overlay,
    next: u64,
}

impl PendingWrites {
    /// Stacks a write set on top: its writes win over every one below.
    pub fn push(&mut self, writes: Arc<WriteSet>) {
        let layer = self.next;
        self.next += 1;
        for full in writes.entries.keys() {
            self.newest.insert(Arc::from(full.as_slice()), (layer, writes.clone()));
        }
        self.layers.push_back((layer, writes));
    }

    /// Drops the `n` oldest write sets (all of them if fewer): they are applied, so a snapshot
    /// taken from now on holds them. A key a newer write set wrote keeps that one's value.
    pub fn drop_oldest(&mut self, n: usize) {
        let n = n.min(self.layers.len());
        for (layer, writes) in self.layers.drain(..n) {
            for full in writes.entries.keys() {
                if self.newest.get(full.as_slice()).is_some_and(|(newest, _)| *newest == layer) {
                    self.newest.remove(full.as_slice());
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.newest = Overlay::default();
    }

    /// How many write sets are stacked.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// A state database file's size before and after [`compact`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Compacts the state database file at `path` in place, for a node that is stopped. redb keeps
/// the pages a commit frees for reuse and grows its file by doubling while it is under 4 GiB, so
/// the file can be about twice what its pages hold (a 1 GiB file for 537 MB of pages after
/// 1,000,000 writes, measured by `just bench-join`); compacting moves the pages to the front and
/// shortens the file.
///
/// Every page's checksum is verified as the file opens, so a file damaged or altered outside
/// redb is refused, not rewritten. A file some process has open (a running node) is refused
/// too: redb locks it. The file must exist. No key is needed: sealed values move as they are.
pub fn compact(path: &Path) -> Result<Compacted, KvError> {
    let err = |e: redb::Error| KvError::Db { path: path.to_owned(), source: e };
    let size = || std::fs::metadata(path).map(|m| m.len()).map_err(|e| err(e.into()));
    let bytes_before = size()?;
    let mut db = Database::builder().set_check_integrity_on_open(true).open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => KvError::Invalid {
            path: path.to_owned(),
            message: "another process has it open: stop its node first".into(),
        },
        e => err(e.into()),
    })?;
    db.compact().map_err(|e| err(e.into()))?;
    drop(db);
    Ok(Compacted { bytes_before, bytes_after: size()? })
}

/// The state database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    sealer: Option<Arc<Sealer>>,
    /// With a sealer: the private keys. A commit publishes the union of the keys before and after
    /// it while it runs, then the keys after it, so whichever table snapshot a reader gets, the
    /// index it took alongside (see [`Store::begin_over`]) names every key that snapshot holds.
    index: Arc<Mutex<Published>>,
    /// Held by a commit from its first publish to its last, and by a new write batch while it
    /// takes the index: so a batch starts from the index its predecessor left, and no commit's
    /// publish lands after its successor's.
    commits: Arc<Mutex<()>>,
    /// Private maps a scan found unindexed while a write was running: the next write batch
    /// indexes them (see [`Store::index_soon`]).
    wanted: Arc<Mutex<BTreeSet<String>>>,
}

impl Store {
    /// Opens or creates the state database at `path`, with private values in clear (tests and
    /// tools only).
    pub fn open(path: &Path) -> Result<Store, KvError> {
        Store::open_with(path, None)
    }

    /// Opens or creates the state database at `path`, sealing private values with `sealer`.
    pub fn open_sealed(path: &Path, sealer: Arc<Sealer>) -> Result<Store, KvError> {
        Store::open_with(path, Some(sealer))
    }

    /// Every page's checksum is verified as the file opens: redb trusts a file it closed cleanly
    /// and may panic on one altered since (a node's data folder is the operator's to write), so
    /// an altered file is refused with an error naming it instead. It reads every committed page
    /// at every start, as redb's repair does after a crash anyway: 0.14–0.28 s for a 538 MB file
    /// of 1,000,000 entries here, against 1–4 ms unchecked.
    fn open_with(path: &Path, sealer: Option<Arc<Sealer>>) -> Result<Store, KvError> {
        let err = |e: redb::Error| KvError::Db { path: path.to_owned(), source: e };
        let db = Database::builder().set_check_integrity_on_open(true).create(path).map_err(|e| err(e.into()))?;
        let store = Store {
            db: Arc::new(db),
            path: path.to_owned(),
            sealer,
            index: Arc::default(),
            commits: Arc::default(),
            wanted: Arc::default(),
        };
        // Create the tables up front so read transactions never meet a missing table.
        let mut batch = store.write_batch()?;
        batch.txn().open_table(KV).map_err(|e| store.err(e))?;
        batch.txn().open_table(META).map_err(|e| store.err(e))?;
        if store.sealer.is_some() {
            batch.hide_private_keys()?;
        }
        batch.commit()?;
        if store.sealer.is_some() {
            store.check_sealer()?;
        }
        Ok(store)
    }

    /// Opens the first private entry, if there is one: a store sealed under another key fails
    /// when it opens, not at its first read of a private map.
    fn check_sealer(&self) -> Result<(), KvError> {
        let read = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = read.open_table(KV).map_err(|e| self.err(e))?;
        for item in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if self.hides(k.value()).is_some() {
                self.opened_entry(k.value(), v.value())?;
                break;
            }
        }
        Ok(())
    }

    /// Every key of the private `map` in `table`, read back from the sealed entries.
    fn map_keys(
        &self,
        table: &impl ReadableTable<&'static [u8], &'static [u8]>,
        map: &str,
    ) -> Result<KeyIndex, KvError> {
        let (lower, upper) = map_bounds(map, Bound::Unbounded, Bound::Unbounded);
        let range = (lower.as_ref().map(Vec::as_slice), upper.as_ref().map(Vec::as_slice));
        let mut keys = KeyIndex::new();
        for item in table.range::<&[u8]>(range).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            keys.insert(self.opened_entry(k.value(), v.value())?.0.into());
        }
        Ok(keys)
    }

    /// Adds the private `map` to the published index: at once if no write transaction is
    /// running, else in the next write batch. A scan calls it when it found the map unindexed;
    /// a reader never waits for a writer here.
    fn index_soon(&self, map: &str) {
        match self.db.try_begin_write() {
            Ok(txn) => {
                // Nothing else is written. A map whose entries do not open stays unindexed (its
                // scans read the keys from their own snapshots and report what fails there); the
                // maps the batch took from `wanted` are committed either way.
                if let Ok(mut batch) = self.batch_over(txn) {
                    let _ = batch.index_map(map);
                    let _ = batch.commit_nondurable();
                }
            }
            Err(_) => {
                self.wanted.lock().expect("wanted maps lock").insert(map.to_owned());
            }
        }
    }

    /// The sealer, if entries under this table key are private and hidden at rest.
    fn hides(&self, full: &[u8]) -> Option<&Sealer> {
        self.sealer.as_deref().filter(|_| !is_public(split_key(full).0))
    }

    /// The key the table stores an entry under: its own, or for a hidden entry
    /// `map ‖ 0x00 ‖ digest`.
    fn table_key<'k>(&self, full: &'k [u8]) -> Cow<'k, [u8]> {
        match self.hides(full) {
            Some(s) => Cow::Owned(full_key(split_key(full).0, &s.private_key_digest(full))),
            None => Cow::Borrowed(full),
        }
    }

    /// The sealer, when private values are sealed at rest.
    pub fn sealer(&self) -> Option<&Arc<Sealer>> {
        self.sealer.as_ref()
    }

    /// The stored form of an entry: for a hidden one, `u32 LE key length ‖ table key ‖ value`
    /// sealed and bound to the table key it is stored under.
    fn stored(&self, full: &[u8], table_key: &[u8], value: &[u8]) -> Vec<u8> {
        match self.hides(full) {
            Some(s) => {
                let mut plain = Vec::with_capacity(4 + full.len() + value.len());
                plain.extend_from_slice(&(full.len() as u32).to_le_bytes());
                plain.extend_from_slice(full);
                plain.extend_from_slice(value);
                s.seal(Purpose::StateValue, table_key, &plain)
            }
            None => value.to_vec(),
        }
    }

    /// A hidden entry as stored under `table_key`, opened: its table key in clear, and its value.
    fn opened_entry(&self, table_key: &[u8], stored: &[u8]) -> Result<(Vec<u8>, Vec<u8>), KvError> {
        let invalid = |message: String| KvError::Invalid {
            path: self.path.clone(),
            message: format!("{message} (map {})", split_key(table_key).0),
        };
        let sealer = self.hides(table_key).ok_or_else(|| invalid("not a hidden entry".into()))?;
        let plain = sealer.open(Purpose::StateValue, table_key, stored).map_err(|e| invalid(e.to_string()))?;
        let len = plain.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
        let (full, value) = match len {
            Some(len) if plain.len() >= 4 + len => plain[4..].split_at(len),
            _ => return Err(invalid("a sealed entry is shorter than its key".into())),
        };
        if split_key_checked(full).map(|(map, _)| map) != Some(split_key(table_key).0) {
            return Err(invalid("a sealed entry names a key of another map".into()));
        }
        Ok((full.to_vec(), value.to_vec()))
    }

    /// The value stored for `full` under `table_key`, opened for reading.
    fn opened(&self, full: &[u8], table_key: &[u8], stored: &[u8]) -> Result<Vec<u8>, KvError> {
        if self.hides(full).is_none() {
            return Ok(stored.to_vec());
        }
        let (key, value) = self.opened_entry(table_key, stored)?;
        if key != full {
            return Err(KvError::Invalid {
                path: self.path.clone(),
                message: format!("a sealed entry sits under another key's digest (map {})", split_key(full).0),
            });
        }
        Ok(value)
    }

    pub(crate) fn err(&self, e: impl Into<redb::Error>) -> KvError {
        KvError::Db { path: self.path.clone(), source: e.into() }
    }

    /// A transaction over the committed state.
    pub fn begin(&self) -> Result<Tx, KvError> {
        self.begin_with(Overlay::default())
    }

    /// A transaction over the committed state with pending write sets on top.
    pub fn begin_over(&self, pending: &PendingWrites) -> Result<Tx, KvError> {
        self.begin_with(pending.newest.clone())
    }

    fn begin_with(&self, pending: Overlay) -> Result<Tx, KvError> {
        loop {
            let (version, keys, indexed) = self.published();
            let read = self.db.begin_read().map_err(|e| self.err(e))?;
            // Unchanged across the snapshot: `keys` is the index of a commit, or the union around
            // one, that this snapshot falls within. Otherwise a commit ended in between; again.
            if self.published().0 == version {
                let base = read.open_table(KV).map_err(|e| self.err(e))?;
                let index = self.sealer.is_some().then_some((keys, indexed));
                return Ok(Tx {
                    read,
                    base,
                    index,
                    unindexed: Mutex::default(),
                    pending,
                    own: WriteSet::default(),
                    store: self.clone(),
                });
            }
        }
    }

    fn published(&self) -> (u64, KeyIndex, Indexed) {
        let published = self.index.lock().expect("key index lock");
        (published.version, published.keys.clone(), published.indexed.clone())
    }

    fn publish(&self, keys: KeyIndex, indexed: Indexed) {
        let mut published = self.index.lock().expect("key index lock");
        published.version += 1;
        published.keys = keys;
        published.indexed = indexed;
    }

    /// Whether a scan asked for a private map to be indexed while a write was running: the next
    /// write batch reads that map's keys back first, which is not a few microseconds.
    pub fn index_wanted(&self) -> bool {
        !self.wanted.lock().expect("wanted maps lock").is_empty()
    }

    /// Applies a write set atomically and durably.
    pub fn apply(&self, writes: &WriteSet) -> Result<(), KvError> {
        self.apply_all(&[writes], &[])
    }

    /// Applies several write sets, in order, and bookkeeping entries in one durable transaction.
    pub(crate) fn apply_all(&self, writes: &[&WriteSet], meta: &[(&str, &[u8])]) -> Result<(), KvError> {
        let mut batch = self.write_batch()?;
        for ws in writes {
            batch.apply(ws)?;
        }
        for (key, value) in meta {
            batch.put_meta(key, value)?;
        }
        batch.commit()
    }

    /// A write transaction for several kinds of writes that commit together.
    pub fn write_batch(&self) -> Result<WriteBatch<'_>, KvError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        self.batch_over(txn)
    }

    /// A write batch in `txn`, with the maps scans asked for indexed first.
    fn batch_over(&self, txn: redb::WriteTransaction) -> Result<WriteBatch<'_>, KvError> {
        // Write transactions run one at a time, and the last one has finished publishing: this is
        // the index it left.
        let (keys, indexed) = {
            let _committing = self.commits.lock().expect("commit lock");
            let (_, keys, indexed) = self.published();
            (keys, indexed)
        };
        let mut batch = WriteBatch {
            txn,
            store: self,
            before: keys.clone(),
            before_indexed: indexed.clone(),
            keys,
            indexed,
            removed: Vec::new(),
            cleared: false,
            changed: false,
        };
        let wanted = std::mem::take(&mut *self.wanted.lock().expect("wanted maps lock"));
        for map in wanted {
            // A map whose entries do not open stays unindexed; its scans report why.
            let _ = batch.index_map(&map);
        }
        Ok(batch)
    }

    /// A raw read transaction, for modules that keep their own tables in this database.
    pub fn read_txn(&self) -> Result<redb::ReadTransaction, KvError> {
        self.db.begin_read().map_err(|e| self.err(e))
    }

    /// A consistent read-only view of everything, for snapshots.
    pub fn export(&self) -> Result<Export, KvError> {
        let read = self.db.begin_read().map_err(|e| self.err(e))?;
        Ok(Export { read, store: self.clone() })
    }

    /// A bookkeeping entry.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let read = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = read.open_table(META).map_err(|e| self.err(e))?;
        let value = table.get(key).map_err(|e| self.err(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }
}

/// One bookkeeping entry of the closed state database at `path`, read without its key (`None`
/// when there is no such file, or an empty one). It is opened as [`Store`] opens it, every
/// page's checksum verified and a file a crash left unclosed repaired; no entry of it is written
/// (redb updates its header as it opens and closes).
pub fn meta_of(path: &Path, key: &str) -> Result<Option<Vec<u8>>, KvError> {
    // An empty file is what a crash leaves between the store's creating the file and its first
    // commit: the store opens it as new, and it holds nothing.
    match std::fs::metadata(path) {
        Ok(file) if file.len() > 0 => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KvError::Invalid { path: path.to_owned(), message: e.to_string() }),
    }
    let err = |e: redb::Error| KvError::Db { path: path.to_owned(), source: e };
    let db = Database::builder().set_check_integrity_on_open(true).open(path).map_err(|e| err(e.into()))?;
    let read = db.begin_read().map_err(|e| err(e.into()))?;
    let table = match read.open_table(META) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(err(e.into())),
    };
    let value = table.get(key).map_err(|e| err(e.into()))?;
    Ok(value.map(|v| v.value().to_vec()))
}

/// A consistent read-only view of the whole store, for building snapshots.
pub struct Export {
    read: redb::ReadTransaction,
    store: Store,
}

impl Export {
    /// Calls `f` on every table entry as stored (`map ‖ 0x00 ‖ key` or, for a hidden private
    /// entry, its digest; the value as stored), in table order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), KvError>) -> Result<(), KvError> {
        let table = self.read.open_table(KV).map_err(|e| self.store.err(e))?;
        for item in table.iter().map_err(|e| self.store.err(e))? {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            f(k.value(), v.value())?;
        }
        Ok(())
    }

    /// Like [`Export::for_each`], but with each hidden private entry opened: its table key in
    /// clear (`map ‖ 0x00 ‖ key`) and its value. What leaves the store this way is plain: the
    /// caller seals it for wherever it goes (a snapshot seals it under the ledger secret, and the
    /// receiving store under its own key).
    pub fn for_each_opened(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), KvError>) -> Result<(), KvError> {
        self.for_each(|k, v| match self.store.hides(k) {
            Some(_) => {
                let (full, value) = self.store.opened_entry(k, v)?;
                f(&full, &value)
            }
            None => f(k, v),
        })
    }

    /// The last key of a public `map`, if it has any entry.
    pub fn last_key_of(&self, map: &str) -> Result<Option<Vec<u8>>, KvError> {
        let table = self.read.open_table(KV).map_err(|e| self.store.err(e))?;
        let (start, mut end) = (full_key(map, b""), full_key(map, b""));
        *end.last_mut().expect("a separator") += 1;
        let last = table.range(start.as_slice()..end.as_slice()).map_err(|e| self.store.err(e))?.next_back();
        Ok(last.transpose().map_err(|e| self.store.err(e))?.map(|(k, _)| split_key(k.value()).1.to_vec()))
    }

    /// The read transaction, for modules that keep their own tables in this database.
    pub fn txn(&self) -> &redb::ReadTransaction {
        &self.read
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let table = self.read.open_table(META).map_err(|e| self.store.err(e))?;
        let value = table.get(key).map_err(|e| self.store.err(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }
}

/// Writes that commit together, durably, in one redb transaction.
pub struct WriteBatch<'s> {
    txn: redb::WriteTransaction,
    store: &'s Store,
    /// The private key index and the maps it covers at the last commit, and as this batch
    /// leaves them.
    before: KeyIndex,
    before_indexed: Indexed,
    keys: KeyIndex,
    indexed: Indexed,
    /// Keys this batch removed from the index: with `keys`, the union published while it commits.
    removed: Vec<Arc<[u8]>>,
    /// Whether the batch cleared every map (then the union takes all of `before`).
    cleared: bool,
    /// Whether the batch changed the private key index (added or removed a key, or a map).
    changed: bool,
}

impl WriteBatch<'_> {
    /// Adds every key of the private `map` to the index, which covers it from now on. An empty
    /// map is left out: a scan of any name would otherwise grow the set of covered maps, and
    /// reading an empty map's keys back costs its next scan nothing.
    fn index_map(&mut self, map: &str) -> Result<(), KvError> {
        if self.store.sealer.is_none() || is_public(map) || self.indexed.contains(map) {
            return Ok(());
        }
        let keys = self.store.map_keys(&self.txn.open_table(KV).map_err(|e| self.store.err(e))?, map)?;
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            self.keys.insert(key);
        }
        Arc::make_mut(&mut self.indexed).insert(map.to_owned());
        self.changed = true;
        Ok(())
    }

    /// Whether the index covers the map of this hidden table key.
    fn indexes(&self, full: &[u8]) -> bool {
        self.indexed.contains(split_key(full).0)
    }

    pub fn apply(&mut self, writes: &WriteSet) -> Result<(), KvError> {
        let mut table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        for (full, value) in &writes.entries {
            let table_key = self.store.table_key(full);
            let hidden = self.store.hides(full).is_some();
            match value {
                Some(v) => {
                    let stored = self.store.stored(full, &table_key, v);
                    table.insert(&*table_key, stored.as_slice()).map_err(|e| self.store.err(e))?;
                    // An overwritten key is in the index already: inserting it again would copy
                    // the index's path to it (shared with every reader's view) for nothing.
                    if hidden && self.indexes(full) && !self.keys.contains(full.as_slice()) {
                        self.keys.insert(Arc::from(full.as_slice()));
                        self.changed = true;
                    }
                }
                None => {
                    table.remove(&*table_key).map_err(|e| self.store.err(e))?;
                    if hidden && let Some(key) = self.keys.remove(full.as_slice()) {
                        self.removed.push(key);
                        self.changed = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Converts a sealed store's private entries stored under their keys (as before digests) to
    /// hidden ones, once; then marks the store as converted.
    fn hide_private_keys(&mut self) -> Result<(), KvError> {
        let store = self.store;
        if self
            .txn
            .open_table(META)
            .map_err(|e| store.err(e))?
            .get(KEY_DIGESTS_META)
            .map_err(|e| store.err(e))?
            .is_some()
        {
            return Ok(());
        }
        let sealer = store.sealer.clone().expect("only a sealed store hides keys");
        let mut table = self.txn.open_table(KV).map_err(|e| store.err(e))?;
        let mut old = Vec::new();
        for item in table.iter().map_err(|e| store.err(e))? {
            let (k, v) = item.map_err(|e| store.err(e))?;
            if store.hides(k.value()).is_some() {
                old.push((k.value().to_vec(), v.value().to_vec()));
            }
        }
        for (full, sealed) in old {
            let value = sealer.open(Purpose::StateValue, &full, &sealed).map_err(|e| KvError::Invalid {
                path: store.path.clone(),
                message: format!("converting a private entry: {e} (map {})", split_key(&full).0),
            })?;
            table.remove(full.as_slice()).map_err(|e| store.err(e))?;
            let table_key = store.table_key(&full);
            table.insert(&*table_key, store.stored(&full, &table_key, &value).as_slice()).map_err(|e| store.err(e))?;
        }
        drop(table);
        self.put_meta(KEY_DIGESTS_META, b"1")
    }

    /// A bookkeeping entry, as this batch leaves it so far.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let table = self.txn.open_table(META).map_err(|e| self.store.err(e))?;
        let value = table.get(key).map_err(|e| self.store.err(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// How many map entries the store holds, as this batch leaves it so far.
    pub fn entries(&self) -> Result<u64, KvError> {
        let table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        table.len().map_err(|e| self.store.err(e))
    }

    pub fn put_meta(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let mut table = self.txn.open_table(META).map_err(|e| self.store.err(e))?;
        table.insert(key, value).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Removes every map entry (before installing a snapshot).
    pub fn clear(&mut self) -> Result<(), KvError> {
        let mut table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        table.retain(|_, _| false).map_err(|e| self.store.err(e))?;
        // The keys of maps this batch indexed at its start are in no published index yet: they
        // join `before`, so the union published while the batch commits still names them for a
        // reader whose snapshot is older (an index may hold more keys than a snapshot).
        self.before = self.before.clone().union(std::mem::take(&mut self.keys));
        self.cleared = true;
        self.changed = true;
        Ok(())
    }

    /// Inserts a table entry exactly as another node of the service stored it (from a
    /// snapshot, as [`Export::for_each`] gave it). A hidden entry must open under the ledger
    /// secret and be stored under its own key's digest.
    pub fn insert_stored(&mut self, table_key: &[u8], stored: &[u8]) -> Result<(), KvError> {
        // A snapshot's records are checked whole only at its end (its MAC): each key is checked
        // here before anything splits it.
        if let Some(fault) = table_key_fault(table_key) {
            return Err(KvError::Invalid {
                path: self.store.path.clone(),
                message: format!("a stored record's key is not a table key: {fault}"),
            });
        }
        if self.store.hides(table_key).is_some() {
            let (full, _) = self.store.opened_entry(table_key, stored)?;
            if *self.store.table_key(&full) != *table_key {
                return Err(KvError::Invalid {
                    path: self.store.path.clone(),
                    message: format!("a sealed entry sits under another key's digest (map {})", map_of(table_key)),
                });
            }
            if self.indexes(&full) {
                self.keys.insert(full.into());
                self.changed = true;
            }
        }
        let mut table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        table.insert(table_key, stored).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// The raw transaction, for modules that keep their own tables in this database.
    pub fn txn(&self) -> &redb::WriteTransaction {
        &self.txn
    }

    /// Commits without waiting for the disk: the batch is visible at once, and persists with the
    /// next durable commit. After a crash before one, the database is as the last durable commit
    /// left it (the state machine replays the Raft log from there).
    pub fn commit_nondurable(mut self) -> Result<(), KvError> {
        self.txn.set_durability(redb::Durability::None).map_err(|e| KvError::Invalid {
            path: self.store.path.clone(),
            message: format!("a commit without durability: {e}"),
        })?;
        self.commit()
    }

    /// Commits durably: this batch and every non-durable commit before it are on disk when this
    /// returns.
    pub fn commit(self) -> Result<(), KvError> {
        let WriteBatch { txn, store, before, before_indexed, keys, indexed, removed, cleared, changed } = self;
        if store.sealer.is_none() || !changed {
            return txn.commit().map_err(|e| store.err(e));
        }
        let _committing = store.commits.lock().expect("commit lock");
        let mut during = if cleared { before.clone().union(keys.clone()) } else { keys.clone() };
        during.extend(removed);
        // A map this batch indexed is covered by `during` as the snapshot before the commit
        // has it: its keys were read at the batch's start, and the ones it removed are in.
        store.publish(during, indexed.clone());
        match txn.commit() {
            Ok(()) => {
                store.publish(keys, indexed);
                Ok(())
            }
            Err(e) => {
                store.publish(before, before_indexed);
                Err(store.err(e))
            }
        }
    }
}

/// One transaction: a consistent snapshot, pending write sets, and its own buffered writes.
pub struct Tx {
    read: redb::ReadTransaction,
    base: ReadOnlyTable<&'static [u8], &'static [u8]>,
    /// In a sealed store, the private keys `base` may hold of the maps the index covers
    /// (possibly more: a lookup decides), and those maps.
    index: Option<(KeyIndex, Indexed)>,
    /// The keys of private maps the index did not cover, read from `base` on their first scan.
    unindexed: Mutex<HashMap<String, KeyIndex>>,
    pending: Overlay,
    own: WriteSet,
    store: Store,
}

impl Tx {
    /// The newest value of a table key across own writes, pending write sets and the snapshot.
    fn lookup(&self, full: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let newest = self.own.lookup(full).or_else(|| self.pending.get(full).and_then(|(_, layer)| layer.lookup(full)));
        if let Some(v) = newest {
            return Ok(v.map(<[u8]>::to_vec));
        }
        let table_key = self.store.table_key(full);
        let got = self.base.get(&*table_key).map_err(|e| self.store.err(e))?;
        got.map(|v| self.store.opened(full, &table_key, v.value())).transpose()
    }

    pub fn get(&self, map: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.lookup(&full_key(map, key))
    }

    pub fn put(&mut self, map: &str, key: &[u8], value: &[u8]) {
        self.own.put(map, key, value)
    }

    /// Removes a key; returns whether it was present.
    pub fn remove(&mut self, map: &str, key: &[u8]) -> Result<bool, KvError> {
        let existed = self.get(map, key)?.is_some();
        self.own.remove(map, key);
        Ok(existed)
    }

    /// The first live entry of `map` within the bounds, in key order.
    ///
    /// Each layer proposes its first key in range; the smallest wins, and its value is resolved
    /// through all layers. A removal there shadows it, so the search continues after it.
    pub fn first_in(&self, map: &str, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> Result<Option<Entry>, KvError> {
        self.first_in_counting(map, lower, upper, &mut 0)
    }

    /// [`Tx::first_in`], adding to `passed` the removed keys it passed over on its way: the
    /// work a caller may want to charge for.
    pub fn first_in_counting(
        &self,
        map: &str,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        passed: &mut usize,
    ) -> Result<Option<Entry>, KvError> {
        let mut bounds = map_bounds(map, lower, upper);
        let index = if self.index.is_some() && !is_public(map) { Some(self.keys_of(map)?) } else { None };
        loop {
            let range = (bounds.0.as_ref().map(Vec::as_slice), bounds.1.as_ref().map(Vec::as_slice));
            // Before any layer's `range`: the bounds are a contract's, and the start rises past
            // each removed key until it may meet the end.
            if holds_nothing(range.0, range.1) {
                return Ok(None);
            }
            let base_first = match &index {
                Some(keys) => keys.range::<_, [u8]>(range).next().map(|k| k.to_vec()),
                None => self
                    .base
                    .range::<&[u8]>(range)
                    .map_err(|e| self.store.err(e))?
                    .next()
                    .transpose()
                    .map_err(|e| self.store.err(e))?
                    .map(|(k, _)| k.value().to_vec()),
            };
            let pending = self.pending.range::<_, [u8]>(range).next().map(|(k, _)| &**k);
            let layered = [self.own.first_in(&bounds), pending].into_iter().flatten().min().map(<[u8]>::to_vec);
            let Some(candidate) = [base_first, layered].into_iter().flatten().min() else {
                return Ok(None);
            };
            if let Some(value) = self.lookup(&candidate)? {
                let (_, key) = split_key(&candidate);
                return Ok(Some((key.to_vec(), value)));
            }
            *passed += 1;
            bounds.0 = Bound::Excluded(candidate);
        }
    }

    /// The private keys of `map` that this snapshot may hold (possibly more). A map the index
    /// does not cover yet is read back from the snapshot's sealed entries once per transaction,
    /// and the store is asked to index it for those that follow (unless it is empty).
    fn keys_of(&self, map: &str) -> Result<KeyIndex, KvError> {
        let (keys, indexed) = self.index.as_ref().expect("only a sealed store indexes keys");
        if indexed.contains(map) {
            return Ok(keys.clone());
        }
        let mut unindexed = self.unindexed.lock().expect("unindexed keys lock");
        if let Some(keys) = unindexed.get(map) {
            return Ok(keys.clone());
        }
        let keys = self.store.map_keys(&self.base, map)?;
        unindexed.insert(map.to_owned(), keys.clone());
        drop(unindexed);
        if !keys.is_empty() {
            self.store.index_soon(map);
        }
        Ok(keys)
    }

    /// The redb snapshot under this transaction, for modules that keep their own tables in this
    /// database and must read them as of the same moment.
    pub fn snapshot(&self) -> &redb::ReadTransaction {
        &self.read
    }

    /// The writes buffered so far.
    pub fn writes(&self) -> &WriteSet {
        &self.own
    }

    /// A copy of the writes so far, to [`Tx::restore`] if what follows must be undone.
    pub fn savepoint(&self) -> WriteSet {
        self.own.clone()
    }

    /// Forgets every write since `savepoint` was taken.
    pub fn restore(&mut self, savepoint: WriteSet) {
        self.own = savepoint;
    }

    /// Ends the transaction, returning its writes.
    pub fn into_writes(self) -> WriteSet {
        self.own
    }
}

#[cfg(test)]
mod tests;
