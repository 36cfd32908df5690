//! The Raft log, as a write-ahead log of its own ([`super::wal`]) in `raft-log/` beside the
//! state database. On append, the leader's proposers learn where their entries landed.
//!
//! Group commit: every write to the log goes through one thread, the [`LogWriter`], in the order
//! it was asked for. It takes the jobs queued since its last pass, writes each append into the
//! page cache and answers it at once (so the entries are readable, and the leader replicates
//! them, while this node has not synced yet), then makes the whole pass durable with one
//! `fdatasync` and only then tells Raft those appends are flushed: an entry counts towards a
//! commit quorum only once it is on disk. So the leader's sync runs while its followers receive
//! and sync the same entries. The Raft core awaits each append, so a pass holds at most one; the
//! writes proposed during a sync are batched by Raft into its next append, and so share the next
//! sync. The vote, truncations and purges are durable before they are answered, in order with the
//! appends queued before them. The committed log id is written without a sync of its own (see
//! [`LogStore::save_committed`]).
//!
//! No runtime thread ever waits for the disk: a runtime thread blocked there left the node's
//! tasks one thread short on two cores (an earlier version wrote appends on the Raft core's
//! thread).
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

/// A write to the log, other than an append.
enum Op {
    Vote(Vec<u8>),
    Committed(Vec<u8>),
    Truncate(u64),
    Purge(u64, Vec<u8>),
}

impl Op {
    fn run(self, wal: &mut Wal) -> io::Result<()> {
        match self {
            Op::Vote(v) => wal.save_vote(v),
            Op::Committed(c) => wal.save_committed(c),
            Op::Truncate(from) => wal.truncate(from),
            Op::Purge(upto, id) => wal.purge(upto, id),
        }
    }
}

enum Job {
    /// Entries (each with its log id and bytes): written and answered on `written` at once, then
    /// made durable with the pass, and only then reported on `flushed`.
    Append { entries: Vec<(LogId, Vec<u8>)>, written: oneshot::Sender<io::Result<()>>, flushed: IOFlushed<TypeConfig> },
    /// A write that waits for no sync of its own: it reaches the disk with the next one.
    Lazy(Op),
    /// A write that must be durable, after everything queued before it. A truncation lowers the
    /// durable index to `lowers_to`: the entries after it are gone, and their replacements are not
    /// durable yet.
    Durable { op: Op, lowers_to: Option<u64>, reply: oneshot::Sender<io::Result<()>> },
}

/// The one thread that writes the log. When the last [`LogStore`] goes, the queue closes and
/// dropping the writer waits for the thread, so the log's files are written and closed by then.
struct LogWriter {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LogWriter {
    fn start(wal: Wal, durable: watch::Sender<u64>) -> io::Result<LogWriter> {
        let (jobs, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || LogWriter::run(wal, &queue, &durable))?;
        Ok(LogWriter { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, job: Job) -> io::Result<()> {
        let jobs = self.jobs.lock().expect("log writer queue lock");
        jobs.as_ref().ok_or_else(writer_gone)?.send(job).map_err(|_| writer_gone())
    }

    /// One pass per wake: the jobs queued by then, in order, and one sync for their appends. A
    /// job queued during the pass waits for the next, so a steady stream of appends still syncs.
    fn run(mut wal: Wal, queue: &mpsc::Receiver<Job>, durable: &watch::Sender<u64>) {
        while let Ok(first) = queue.recv() {
            let pass: Vec<Job> = std::iter::once(first).chain(queue.try_iter()).collect();
            let mut flushes = Vec::new();
            for job in pass {
                match job {
                    Job::Append { entries, written, flushed } => {
                        let result = wal.append(&entries);
                        match (&result, entries.last()) {
                            (Ok(()), Some((last, _))) => flushes.push((last.index, flushed)),
                            (Ok(()), None) => flushed.io_completed(Ok(())),
                            (Err(e), _) => flushed.io_completed(Err(copy(e))),
                        }
                        let _ = written.send(result);
                    }
                    Job::Lazy(op) => {
                        if let Err(e) = op.run(&mut wal) {
                            tracing::warn!(error = %e, "a raft log write without a sync failed");
                        }
                    }
                    Job::Durable { op, lowers_to, reply } => {
                        LogWriter::sync(&mut wal, &mut flushes, durable);
                        let result = op.run(&mut wal).and_then(|()| wal.sync());
                        if let (Ok(()), Some(to)) = (&result, lowers_to) {
                            durable.send_modify(|d| *d = (*d).min(to));
                        }
                        let _ = reply.send(result);
                    }
                }
            }
            LogWriter::sync(&mut wal, &mut flushes, durable);
        }
    }

    /// One sync for all `flushes`; then the durable index moves to the last of them, and each is
    /// reported.
    fn sync(wal: &mut Wal, flushes: &mut Vec<(u64, IOFlushed<TypeConfig>)>, durable: &watch::Sender<u64>) {
        let Some(&(last, _)) = flushes.last() else { return };
        let result = wal.sync();
        if result.is_ok() {
            durable.send_modify(|d| *d = last);
        }
        for (_, flushed) in flushes.drain(..) {
            flushed.io_completed(result.as_ref().map(|_| ()).map_err(copy));
        }
    }
}

fn copy(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has done the jobs queued.
        drop(self.jobs.lock().expect("log writer queue lock").take());
        if let Some(thread) = self.thread.lock().expect("log writer thread lock").take()
            && thread.join().is_err()
        {
            tracing::error!("the raft log writer thread panicked");
        }
    }
}

fn writer_gone() -> io::Error {
    io::Error::other("raft log: the writer thread has stopped")
}

/// The log store; clones share the log, so every reader sees every append.
#[derive(Clone)]
pub(crate) struct LogStore {
    index: Arc<RwLock<Index>>,
    watch: Arc<AppendWatch>,
    writer: Arc<LogWriter>,
    durable: watch::Receiver<u64>,
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
        // Everything in the log at open is durable.
        let last = index.read().expect("raft log index lock").last_index();
        let (durable_tx, durable) = watch::channel(last.unwrap_or(0));
        let writer = Arc::new(LogWriter::start(wal, durable_tx)?);
        if old.exists() {
            std::fs::remove_file(&old)?;
        }
        Ok(LogStore { index, watch, writer, durable })
    }

    /// The index through which this node's log is durable: every entry at or below it that the
    /// log holds survives a crash.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
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

    /// Writes durably on the writer thread, after every job queued before it.
    async fn write_durably(&self, lowers_to: Option<u64>, op: Op) -> io::Result<()> {
        let (reply, done) = oneshot::channel();
        self.writer.send(Job::Durable { op, lowers_to, reply })?;
        done.await.map_err(|_| writer_gone())?
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
        self.write_durably(None, Op::Vote(encode(vote))).await
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
    /// Nor does the core wait for it: the write is queued behind the appends before it and
    /// answered at once.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        self.writer.send(Job::Lazy(Op::Committed(encode(&committed))))
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
        let encoded = entries.iter().map(|e| (e.log_id(), encode(e))).collect();
        let (written, done) = oneshot::channel();
        self.writer.send(Job::Append { entries: encoded, written, flushed: callback })?;
        done.await.map_err(|_| writer_gone())??;
        // Readable now; durable, and reported flushed, once the writer's sync of this pass is done.
        self.watch.appended(&entries);
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        self.write_durably(Some(from.saturating_sub(1)), Op::Truncate(from)).await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.write_durably(None, Op::Purge(log_id.index, encode(&log_id))).await
    }
}
