//! The Raft log on redb, in its own file beside the state database.
//!
//! Entries are keyed by index and postcard-encoded; the vote, the committed log id and the last
//! purged log id live in a small meta table. Every write is one redb transaction. Appends,
//! truncations, purges and votes commit durably (one fsync each); the
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
/// Largest append written on the Raft core's own thread rather than the blocking pool: a commit
/// group under load is a few KiB to tens of KiB.
const APPEND_HERE_BYTES_MAX: usize = 256 << 10;

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

    /// Runs a write transaction and commits it with `durability`, on this thread. A
    /// [`redb::Durability::None`] commit is lost in a crash unless a later durable commit (the next
    /// append) carries it; redb then opens at the last durable commit, never a torn one.
    ///
    /// The Raft core awaits every log write before it goes on, so running it on the blocking pool
    /// gained no concurrency, only two thread handoffs per commit group (there and back), which
    /// on two cores cost more than the write: 1 node, 1 client, kv put 809 -> 1,118 writes/s.
    /// Only short writes run here: an append of up to [`APPEND_HERE_BYTES_MAX`] and a meta row.
    /// Longer appends (a follower catching up takes up to `REPLICATION_BATCH_BYTES_MAX` at once),
    /// truncations and purges (which can cover a million entries) go to the blocking pool
    /// ([`Self::write_apart`]), so no runtime thread stalls for long.
    fn write_here(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        txn.set_durability(durability).map_err(io_err)?;
        f(&txn).map_err(io_err)?;
        txn.commit().map_err(io_err)
    }

    /// Runs a write transaction on the blocking pool and commits it durably.
    async fn write_apart(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    ) -> io::Result<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write_here(redb::Durability::Immediate, f))
            .await
            .map_err(|e| io::Error::other(format!("raft log write task failed: {e}")))?
    }

    fn put_meta(&self, key: &'static str, value: &[u8], durability: redb::Durability) -> io::Result<()> {
        self.write_here(durability, |txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
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
        self.put_meta(VOTE, &encode(vote), redb::Durability::Immediate)
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
        self.put_meta(COMMITTED, &encode(&committed), redb::Durability::None)
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
        let bytes: usize = encoded.iter().map(|(_, e)| e.len()).sum();
        let insert = move |txn: &redb::WriteTransaction| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        };
        let result = if bytes <= APPEND_HERE_BYTES_MAX {
            self.write_here(redb::Durability::Immediate, insert)
        } else {
            self.write_apart(insert).await
        };
        if result.is_ok() {
            self.watch.appended(&entries);
        }
        let report = result.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string()));
        callback.io_completed(report);
        result
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        self.write_apart(move |txn| {
            let mut table = txn.open_table(LOG)?;
            table.retain_in(from.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let upto = log_id.index;
        let purged = encode(&log_id);
        self.write_apart(move |txn| {
            txn.open_table(META)?.insert(PURGED, purged.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
    }
}
