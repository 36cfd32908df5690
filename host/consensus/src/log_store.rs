//! The Raft log on redb, in its own file beside the state database.
//!
//! Entries are keyed by index and postcard-encoded; the vote, the committed log id and the last
//! purged log id live in a small meta table. Every write is one redb transaction run on the
//! blocking pool. Appends, truncations, purges and votes commit durably (one fsync each); the
//! committed log id does not, so a commit group costs one fsync on each node, its append (see
//! [`LogStore::save_committed`]). On append, the leader's proposers learn where their entries landed.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::network::REPLICATION_BATCH_BYTES_MAX;
use super::types::{Entry, LogId, TypeConfig, Vote, decode, encode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

fn io_err(e: impl Into<redb::Error>) -> io::Error {
    io::Error::other(format!("raft log database: {}", e.into()))
}

/// Proposers waiting to learn the log id their entry was appended at, by entry uid.
#[derive(Default)]
pub(crate) struct AppendWatch {
    waiting: Mutex<HashMap<[u8; 16], oneshot::Sender<LogId>>>,
}

impl AppendWatch {
    /// Registers interest in the entry with this uid.
    pub fn watch(&self, uid: [u8; 16]) -> oneshot::Receiver<LogId> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("append watch lock").insert(uid, tx);
        rx
    }

    pub(crate) fn forget(&self, uid: &[u8; 16]) {
        self.waiting.lock().expect("append watch lock").remove(uid);
    }

    fn appended(&self, entries: &[Entry]) {
        let mut waiting = self.waiting.lock().expect("append watch lock");
        if waiting.is_empty() {
            return;
        }
        for entry in entries {
            if let EntryPayload::Normal(tx) = &entry.payload
                && let Some(w) = waiting.remove(&tx.uid)
            {
                let _ = w.send(entry.log_id());
            }
        }
    }
}

/// The log store; clones share the database, so every reader sees every append.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    watch: Arc<AppendWatch>,
}

impl LogStore {
    pub fn open(path: &Path, watch: Arc<AppendWatch>) -> anyhow::Result<LogStore> {
        let db = Database::create(path).map_err(|e| anyhow::anyhow!("raft log {}: {e}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LogStore { db: Arc::new(db), watch })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let read = self.db.begin_read().map_err(io_err)?;
        let table = read.open_table(META).map_err(io_err)?;
        let value = table.get(key).map_err(io_err)?;
        value.map(|v| decode(v.value(), key)).transpose()
    }

    /// Runs a write transaction on the blocking pool and commits it durably.
    async fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    ) -> io::Result<()> {
        self.write_with(redb::Durability::Immediate, f).await
    }

    /// Runs a write transaction on the blocking pool and commits it with `durability`. A
    /// [`redb::Durability::None`] commit is lost in a crash unless a later durable commit (the next
    /// append) carries it; redb then opens at the last durable commit, never a torn one.
    async fn write_with(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    ) -> io::Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut txn = db.begin_write().map_err(io_err)?;
            txn.set_durability(durability).map_err(io_err)?;
            f(&txn).map_err(io_err)?;
            txn.commit().map_err(io_err)
        })
        .await
        .map_err(|e| io::Error::other(format!("raft log write task failed: {e}")))?
    }

    async fn put_meta(&self, key: &'static str, value: Vec<u8>, durability: redb::Durability) -> io::Result<()> {
        self.write_with(durability, move |txn| {
            txn.open_table(META)?.insert(key, value.as_slice())?;
            Ok(())
        })
        .await
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let read = self.db.begin_read().map_err(io_err)?;
        let table = read.open_table(LOG).map_err(io_err)?;
        let mut entries = Vec::new();
        for item in table.range::<u64>(bounds(&range)).map_err(io_err)? {
            let (_, v) = item.map_err(io_err)?;
            entries.push(decode(v.value(), "a log entry")?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.meta(VOTE)
    }

    /// Entries from `start` for one AppendEntries message: up to `end`, but no more than
    /// [`REPLICATION_BATCH_BYTES_MAX`] of them by stored size (at least one), so a batch never
    /// exceeds the peer message cap however large its entries are.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        let read = self.db.begin_read().map_err(io_err)?;
        let table = read.open_table(LOG).map_err(io_err)?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for item in table.range::<u64>(start..end).map_err(io_err)? {
            let (_, v) = item.map_err(io_err)?;
            bytes += v.value().len();
            if !entries.is_empty() && bytes > REPLICATION_BATCH_BYTES_MAX {
                break;
            }
            entries.push(decode(v.value(), "a log entry")?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.meta(PURGED)?;
        let read = self.db.begin_read().map_err(io_err)?;
        let table = read.open_table(LOG).map_err(io_err)?;
        let last = table.last().map_err(io_err)?;
        let last_log_id = match last {
            Some((_, v)) => Some(decode::<Entry>(v.value(), "a log entry")?.log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.put_meta(VOTE, encode(vote), redb::Durability::Immediate).await
    }

    /// Records the committed log id without an fsync. It is a hint for restart, not a promise:
    /// an entry counts as committed because a majority holds it durably in their logs, and a
    /// leader re-commits everything in its log with the first entry of its term. After a crash
    /// the node reads an older committed id (at worst the one the last durable append carried),
    /// re-applies less from its log at start, and learns the rest from the leader. What the state
    /// machine applied survives or is rebuilt from the log either way, and reads wait until it is
    /// back (`Consensus::wait_recovered`). Syncing it cost a second fsync per commit group on every
    /// node.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.put_meta(COMMITTED, encode(&committed), redb::Durability::None).await
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let encoded: Vec<(u64, Vec<u8>)> = entries.iter().map(|e| (e.index(), encode(e))).collect();
        let result = self
            .write(move |txn| {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
            .await;
        if result.is_ok() {
            self.watch.appended(&entries);
        }
        let report = result.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string()));
        callback.io_completed(report);
        result
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        self.write(move |txn| {
            let mut table = txn.open_table(LOG)?;
            table.retain_in(from.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let upto = log_id.index;
        let purged = encode(&log_id);
        self.write(move |txn| {
            txn.open_table(META)?.insert(PURGED, purged.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
    }
}
