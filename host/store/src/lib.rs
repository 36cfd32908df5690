//! Transactional maps over redb.
//!
//! A [`Tx`] reads committed state plus any pending write sets stacked on top of it, buffers its
//! own writes, and hands them out as a [`WriteSet`]. Applying a write set to the [`Store`] is one
//! redb transaction: all of it or none. The replication and ledger layers ship write sets, never
//! re-run code, so a write set is the unit everything above this module agrees on.
//!
//! With a [`Sealer`], values of private maps are sealed at rest (bound to their table key) and
//! opened on read; public maps stay in clear.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use cloister_crypto::seal::{Purpose, Sealer};

pub mod gov;

/// Every map lives in this one table, keyed by `map name ‖ 0x00 ‖ key`.
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// Bookkeeping written atomically with the maps, e.g. the last applied transaction.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Separates a map's name from its keys in the table; map names are printable ASCII.
const MAP_SEPARATOR: u8 = 0;

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

/// Splits a table key into its map name and the key within the map.
fn split_key(full: &[u8]) -> (&str, &[u8]) {
    let at = full.iter().position(|&b| b == MAP_SEPARATOR).expect("table keys hold a map separator");
    let map = std::str::from_utf8(&full[..at]).expect("map names are ASCII");
    (map, &full[at + 1..])
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

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Writes to apply atomically, by table key; `None` removes the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSet {
    entries: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
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
        self.entries.range::<Vec<u8>, _>((bounds.0.as_ref(), bounds.1.as_ref())).next().map(|(k, _)| k.as_slice())
    }
}

/// The state database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    sealer: Option<Arc<Sealer>>,
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

    fn open_with(path: &Path, sealer: Option<Arc<Sealer>>) -> Result<Store, KvError> {
        let err = |e: redb::Error| KvError::Db { path: path.to_owned(), source: e };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let store = Store { db: Arc::new(db), path: path.to_owned(), sealer };
        // Create the tables up front so read transactions never meet a missing table.
        let batch = store.write_batch()?;
        batch.txn().open_table(KV).map_err(|e| store.err(e))?;
        batch.txn().open_table(META).map_err(|e| store.err(e))?;
        batch.commit()?;
        Ok(store)
    }

    /// The sealer, when private values are sealed at rest.
    pub fn sealer(&self) -> Option<&Arc<Sealer>> {
        self.sealer.as_ref()
    }

    /// The stored form of a value: sealed for private maps when sealing is on.
    fn stored(&self, full: &[u8], value: &[u8]) -> Vec<u8> {
        match &self.sealer {
            Some(s) if !is_public(split_key(full).0) => s.seal(Purpose::StateValue, full, value),
            _ => value.to_vec(),
        }
    }

    /// A value as stored, opened for reading.
    fn opened(&self, full: &[u8], stored: &[u8]) -> Result<Vec<u8>, KvError> {
        match &self.sealer {
            Some(s) if !is_public(split_key(full).0) => s.open(Purpose::StateValue, full, stored).map_err(|e| {
                KvError::Invalid { path: self.path.clone(), message: format!("{e} (map {})", split_key(full).0) }
            }),
            _ => Ok(stored.to_vec()),
        }
    }

    pub(crate) fn err(&self, e: impl Into<redb::Error>) -> KvError {
        KvError::Db { path: self.path.clone(), source: e.into() }
    }

    /// A transaction over the committed state.
    pub fn begin(&self) -> Result<Tx, KvError> {
        self.begin_over(Vec::new())
    }

    /// A transaction over the committed state with pending write sets on top, oldest first.
    pub fn begin_over(&self, pending: Vec<Arc<WriteSet>>) -> Result<Tx, KvError> {
        let read = self.db.begin_read().map_err(|e| self.err(e))?;
        let base = read.open_table(KV).map_err(|e| self.err(e))?;
        Ok(Tx { base, pending, own: WriteSet::default(), store: self.clone() })
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
        Ok(WriteBatch { txn, store: self })
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

/// A consistent read-only view of the whole store, for building snapshots.
pub struct Export {
    read: redb::ReadTransaction,
    store: Store,
}

impl Export {
    /// Calls `f` on every table entry (`map ‖ 0x00 ‖ key`, value) in order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), KvError>) -> Result<(), KvError> {
        let table = self.read.open_table(KV).map_err(|e| self.store.err(e))?;
        for item in table.iter().map_err(|e| self.store.err(e))? {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            f(k.value(), v.value())?;
        }
        Ok(())
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
}

impl WriteBatch<'_> {
    pub fn apply(&mut self, writes: &WriteSet) -> Result<(), KvError> {
        let mut table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        for (full, value) in &writes.entries {
            match value {
                Some(v) => table.insert(full.as_slice(), self.store.stored(full, v).as_slice()),
                None => table.remove(full.as_slice()),
            }
            .map_err(|e| self.store.err(e))?;
        }
        Ok(())
    }

    pub fn put_meta(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let mut table = self.txn.open_table(META).map_err(|e| self.store.err(e))?;
        table.insert(key, value).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// Removes every map entry (before installing a snapshot).
    pub fn clear(&mut self) -> Result<(), KvError> {
        let mut table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        table.retain(|_, _| false).map_err(|e| self.store.err(e))
    }

    /// Inserts a table entry exactly as stored elsewhere (from a snapshot).
    pub fn insert_stored(&mut self, full: &[u8], stored: &[u8]) -> Result<(), KvError> {
        let mut table = self.txn.open_table(KV).map_err(|e| self.store.err(e))?;
        table.insert(full, stored).map_err(|e| self.store.err(e))?;
        Ok(())
    }

    /// The raw transaction, for modules that keep their own tables in this database.
    pub fn txn(&self) -> &redb::WriteTransaction {
        &self.txn
    }

    pub fn commit(self) -> Result<(), KvError> {
        self.txn.commit().map_err(|e| self.store.err(e))
    }
}

/// One transaction: a consistent snapshot, pending write sets, and its own buffered writes.
pub struct Tx {
    base: ReadOnlyTable<&'static [u8], &'static [u8]>,
    pending: Vec<Arc<WriteSet>>,
    own: WriteSet,
    store: Store,
}

impl Tx {
    /// The newest value of a table key across own writes, pending write sets and the snapshot.
    fn lookup(&self, full: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        for layer in std::iter::once(&self.own).chain(self.pending.iter().rev().map(|p| &**p)) {
            if let Some(v) = layer.lookup(full) {
                return Ok(v.map(<[u8]>::to_vec));
            }
        }
        let got = self.base.get(full).map_err(|e| self.store.err(e))?;
        got.map(|v| self.store.opened(full, v.value())).transpose()
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
        let mut bounds = map_bounds(map, lower, upper);
        loop {
            let base_first = self
                .base
                .range::<&[u8]>((bounds.0.as_ref().map(Vec::as_slice), bounds.1.as_ref().map(Vec::as_slice)))
                .map_err(|e| self.store.err(e))?
                .next()
                .transpose()
                .map_err(|e| self.store.err(e))?
                .map(|(k, _)| k.value().to_vec());
            let layered = std::iter::once(&self.own)
                .chain(self.pending.iter().map(|p| &**p))
                .filter_map(|l| l.first_in(&bounds))
                .min()
                .map(<[u8]>::to_vec);
            let Some(candidate) = [base_first, layered].into_iter().flatten().min() else {
                return Ok(None);
            };
            if let Some(value) = self.lookup(&candidate)? {
                let (_, key) = split_key(&candidate);
                return Ok(Some((key.to_vec(), value)));
            }
            bounds.0 = Bound::Excluded(candidate);
        }
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
