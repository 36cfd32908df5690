//! The Raft log, as a write-ahead log of its own ([`super::wal`]) in `raft-log/` beside the
//! state database. On append, the leader's proposers learn where their entries landed.
//!
//! Group commit: Raft's own task writes each append into the log's current segment, one
//! `pwrite` into the page cache under the log's lock, so the entries are readable, and the
//! leader replicates them, at once. One thread, the [`LogSyncer`], makes them durable: it wakes
//! for the appends (and other writes) that wait, takes what to sync under the lock, syncs it
//! without the lock (one `fdatasync`, while later writes go on), and only then tells Raft those
//! appends are flushed: an entry counts towards a commit quorum only once it is on disk. So the
//! leader's sync runs while its followers receive and sync the same entries, and the writes
//! proposed during a sync share the next one. The vote, truncations and purges wait for a sync
//! before they are answered; a purge deletes old segments only after that. The committed log id
//! is written without waiting for a sync (see [`LogStore::save_committed`]).
//!
//! No runtime thread waits for a sync. An earlier version handed every append to a writer
//! thread and waited for its answer: two thread wake-ups before the leader could replicate, about
//! 0.1 ms on a 2-core VM, and as much again on each follower before its sync.
//!
//! What the log has made durable is published as an index ([`LogStore::durable`]): the state
//! machine applies no entry beyond it, so applied state never runs ahead of this node's durable
//! log (a crash could otherwise leave a state, or a state a node had served, that its own log
//! cannot account for).
//!
//! A data folder from before the write-ahead log holds the log in `raft.redb`; opening moves its
//! entries and its vote, committed and purged log ids into `raft-log/`, syncs them, and only then
//! deletes the old file.

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, mpsc};

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use tokio::sync::{oneshot, watch};

use super::network::REPLICATION_BATCH_BYTES_MAX;
use super::types::{Entry, LogId, TypeConfig, Vote, decode, encode};
use super::wal::{self, Index, SEGMENT_BYTES, Wal};

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

/// Who waits for the next sync.
enum Waiter {
    /// An append, reported flushed to Raft.
    Flushed(IOFlushed<TypeConfig>),
    /// A write that must be durable before it is answered.
    Reply(oneshot::Sender<io::Result<()>>),
}

impl Waiter {
    fn complete(self, result: &io::Result<()>) {
        let result = result.as_ref().map(|_| ()).map_err(copy);
        match self {
            Waiter::Flushed(flushed) => flushed.io_completed(result),
            Waiter::Reply(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

/// The one thread that syncs the log. When the last [`LogStore`] goes, the queue closes and
/// dropping the syncer waits for the thread, so the log's last writes are synced by then.
struct LogSyncer {
    waiters: Mutex<Option<mpsc::Sender<Waiter>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LogSyncer {
    fn start(wal: Arc<Mutex<Wal>>) -> io::Result<LogSyncer> {
        let (waiters, queue) = mpsc::channel();
        let thread =
            std::thread::Builder::new().name("raft-log-sync".into()).spawn(move || LogSyncer::run(&wal, &queue))?;
        Ok(LogSyncer { waiters: Mutex::new(Some(waiters)), thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, waiter: Waiter) -> io::Result<()> {
        let waiters = self.waiters.lock().expect("log syncer queue lock");
        waiters.as_ref().ok_or_else(syncer_gone)?.send(waiter).map_err(|_| syncer_gone())
    }

    /// One sync per wake, for every waiter queued by then: each was queued after its write, so
    /// the sync covers it. Writes go on during the sync; the next wake covers them.
    fn run(wal: &Mutex<Wal>, queue: &mpsc::Receiver<Waiter>) {
        while let Ok(first) = queue.recv() {
            let waiters: Vec<Waiter> = std::iter::once(first).chain(queue.try_iter()).collect();
            let result = LogSyncer::sync(wal);
            for waiter in waiters {
                waiter.complete(&result);
            }
        }
    }

    fn sync(wal: &Mutex<Wal>) -> io::Result<()> {
        let unsynced = wal.lock().expect("raft log lock").take_unsynced()?;
        let result = unsynced.run();
        wal.lock().expect("raft log lock").synced(&unsynced, result)
    }
}

fn copy(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

impl Drop for LogSyncer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has synced for the waiters queued.
        drop(self.waiters.lock().expect("log syncer queue lock").take());
        if let Some(thread) = self.thread.lock().expect("log syncer thread lock").take()
            && thread.join().is_err()
        {
            tracing::error!("the raft log sync thread panicked");
        }
    }
}

fn syncer_gone() -> io::Error {
    io::Error::other("raft log: the sync thread has stopped")
}

/// The log store; clones share the log, so every reader sees every append.
#[derive(Clone)]
pub(crate) struct LogStore {
    wal: Arc<Mutex<Wal>>,
    index: Arc<RwLock<Index>>,
    watch: Arc<AppendWatch>,
    syncer: Arc<LogSyncer>,
}

impl LogStore {
    /// Opens the log in the folder `dir`, first moving a `raft.redb` beside it into it.
    pub fn open(dir: &Path, watch: Arc<AppendWatch>) -> anyhow::Result<LogStore> {
        LogStore::open_with(dir, SEGMENT_BYTES, watch)
    }

    pub(crate) fn open_with(dir: &Path, segment_bytes: u64, watch: Arc<AppendWatch>) -> anyhow::Result<LogStore> {
        let old = dir.with_file_name(REDB_LOG_FILE);
        if old.exists() && !dir.exists() {
            migrate(&old, dir, segment_bytes)?;
        }
        let (wal, index) =
            Wal::open(dir, segment_bytes).map_err(|e| anyhow::anyhow!("raft log {}: {e}", dir.display()))?;
        let wal = Arc::new(Mutex::new(wal));
        let syncer = Arc::new(LogSyncer::start(wal.clone())?);
        if old.exists() {
            std::fs::remove_file(&old)?;
        }
        Ok(LogStore { wal, index, watch, syncer })
    }

    /// The index below which this node's log is durable: every entry below it that the log
    /// holds survives a crash.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.index.read().expect("raft log index lock").durable()
    }

    #[cfg(test)]
    pub(crate) fn is_synced(&self, index: u64) -> bool {
        self.index.read().expect("raft log index lock").is_synced(index)
    }

    fn meta<T: serde::de::DeserializeOwned>(
        &self,
        get: impl Fn(&Index) -> Option<&[u8]>,
        what: &str,
    ) -> io::Result<Option<T>> {
        let index = self.index.read().expect("raft log index lock");
        get(&index).map(|v| decode(v, what)).transpose()
    }

    /// Writes to the log here (into the page cache), under its lock.
    fn write<T>(&self, write: impl FnOnce(&mut Wal) -> io::Result<T>) -> io::Result<T> {
        write(&mut self.wal.lock().expect("raft log lock"))
    }

    /// Waits for a sync that covers every write made so far.
    async fn synced(&self) -> io::Result<()> {
        let (reply, done) = oneshot::channel();
        self.syncer.send(Waiter::Reply(reply))?;
        done.await.map_err(|_| syncer_gone())?
    }
}

/// The log's file before the write-ahead log, in the data folder.
pub(crate) const REDB_LOG_FILE: &str = "raft.redb";

/// Moves a redb log into a new write-ahead log: built in a temporary folder, synced, then
/// renamed into place, so a crash part-way leaves the old file to migrate again.
fn migrate(old: &Path, dir: &Path, segment_bytes: u64) -> anyhow::Result<()> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let db = redb::Database::open(old).map_err(|e| anyhow::anyhow!("raft log {}: {e}", old.display()))?;
    let read = db.begin_read()?;
    let building = dir.with_extension("migrating");
    if building.exists() {
        std::fs::remove_dir_all(&building)?;
    }
    let (mut wal, _) = Wal::open(&building, segment_bytes)?;
    let meta = read.open_table(META)?;
    let get = |key: &str| -> anyhow::Result<Option<Vec<u8>>> { Ok(meta.get(key)?.map(|v| v.value().to_vec())) };
    if let Some(purged) = get("purged")? {
        let log_id: LogId = decode(&purged, "the purged log id")?;
        wal.purge(log_id.index, purged)?;
    }
    let mut batch = Vec::new();
    for item in read.open_table(LOG)?.iter()? {
        let (_, bytes) = item?;
        let entry: Entry = decode(bytes.value(), "a log entry")?;
        batch.push((entry.log_id(), bytes.value().to_vec()));
        if batch.len() == 1024 {
            wal.append(&std::mem::take(&mut batch))?;
        }
    }
    wal.append(&batch)?;
    if let Some(vote) = get("vote")? {
        wal.save_vote(vote)?;
    }
    if let Some(committed) = get("committed")? {
        wal.save_committed(committed)?;
    }
    wal.sync()?;
    drop(wal);
    std::fs::rename(&building, dir)?;
    File::open(dir.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    tracing::info!(from = %old.display(), to = %dir.display(), "moved the raft log into its write-ahead log");
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        wal::read(&self.index, from, to, usize::MAX)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.meta(Index::vote, "the vote")
    }

    /// Entries from `start` for one AppendEntries message: up to `end`, but no more than
    /// [`REPLICATION_BATCH_BYTES_MAX`] of them by stored size (at least one), so a batch never
    /// exceeds the peer message cap however large its entries are.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        wal::read(&self.index, start, end, REPLICATION_BATCH_BYTES_MAX)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.meta(Index::purged, "the purged log id")?;
        let last = self.index.read().expect("raft log index lock").last_log_id();
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.write(|wal| wal.save_vote(encode(vote)))?;
        self.synced().await
    }

    /// Records the committed log id without an fsync. It is a hint for restart, not a promise:
    /// an entry counts as committed because a majority holds it durably in their logs, and a
    /// leader re-commits everything in its log with the first entry of its term. After a crash
    /// the node reads an older committed id (at worst the one the last durable append carried),
    /// re-applies less from its log at start, and learns the rest from the leader. What the state
    /// machine applied survives or is rebuilt from the log either way, and reads wait until it is
    /// back (`Consensus::wait_recovered`). Syncing it cost a second fsync per commit group on every
    /// node.
    ///
    /// Nor does the core wait for the disk: the record lands in the page cache, and reaches the
    /// disk with the next sync.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.write(|wal| wal.save_committed(encode(&committed)))
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.meta::<Option<LogId>>(Index::committed, "the committed log id")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        let encoded: Vec<(LogId, Vec<u8>)> = entries.iter().map(|e| (e.log_id(), encode(e))).collect();
        if let Err(e) = self.write(|wal| wal.append(&encoded)) {
            callback.io_completed(Err(copy(&e)));
            return Err(e);
        }
        // Readable now; durable, and reported flushed, once the next sync is done.
        self.watch.appended(&entries);
        self.syncer.send(Waiter::Flushed(callback))
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        // The durable index drops below `from` at once: what replaces those entries is not
        // durable until a later sync.
        self.write(|wal| wal.truncate(from))?;
        self.synced().await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.write(|wal| wal.purge(log_id.index, encode(&log_id)))?;
        self.synced().await?;
        self.write(Wal::delete_purged)
    }
}
