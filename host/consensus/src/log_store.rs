//! The Raft log on redb, in its own file beside the state database.
//!
//! Entries are keyed by index and postcard-encoded; the vote, the committed log id and the last
//! purged log id live in a small meta table. On append, the leader's proposers learn where their
//! entries landed.
//!
//! Group commit: every write to the log goes through one thread, the [`LogWriter`], in the order
//! it was asked for. It takes the jobs queued since its last pass, commits each append without
//! durability and answers it at once (so the entries are readable, and the leader replicates
//! them, while this node has not synced yet), then makes the whole pass durable with one durable
//! commit (one `fdatasync`; redb makes every earlier commit durable with it) and only then tells
//! Raft those appends are flushed: an entry counts towards a commit quorum only once it is on
//! disk. So the leader's sync runs while its followers receive and sync the same entries. The
//! Raft core awaits each append, so a pass holds at most one; the writes proposed during a sync
//! are batched by Raft into its next append, and so share the next sync. The vote, truncations
//! and purges are durable before they are answered, in order with the appends queued before them.
//! The committed log id is written without a sync of its own (see [`LogStore::save_committed`]).
//!
//! No runtime thread ever waits for the disk or for redb's write lock, which the writer holds
//! through each sync: a runtime thread blocked there left the node's tasks one thread short on
//! two cores (an earlier version wrote appends on the Raft core's thread).
//!
//! What the log has made durable is published as an index ([`LogStore::durable`]): the state
//! machine applies no entry beyond it, so applied state never runs ahead of this node's durable
//! log (a crash could otherwise leave a state, or a state a node had served, that its own log
//! cannot account for).

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak, mpsc};

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

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

/// A write to the log database, run in one redb transaction on the writer thread.
type Write = Box<dyn FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send>;

enum Job {
    /// Entries through index `last`: committed without durability and answered on `written` at
    /// once, then made durable with the pass, and only then reported on `flushed`.
    Append { write: Write, last: u64, written: oneshot::Sender<io::Result<()>>, flushed: IOFlushed<TypeConfig> },
    /// A write that waits for no sync of its own: it reaches the disk with the next one.
    Lazy { write: Write },
    /// A write that must be durable, after everything queued before it. A truncation lowers the
    /// durable index to `lowers_to`: the entries after it are gone, and their replacements are not
    /// durable yet.
    Durable { write: Write, lowers_to: Option<u64>, reply: oneshot::Sender<io::Result<()>> },
}

/// The one thread that writes the log. It holds the database weakly; when the last
/// [`LogStore`] goes, the queue closes and dropping the writer waits for the thread, so the
/// database file is closed by then (a node restarted in the same process opens it again).
struct LogWriter {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LogWriter {
    fn start(db: &Arc<Database>, durable: watch::Sender<u64>) -> io::Result<LogWriter> {
        let (jobs, queue) = mpsc::channel();
        let db = Arc::downgrade(db);
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || LogWriter::run(&db, &queue, &durable))?;
        Ok(LogWriter { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) })
    }

    fn send(&self, job: Job) -> io::Result<()> {
        let jobs = self.jobs.lock().expect("log writer queue lock");
        jobs.as_ref().ok_or_else(writer_gone)?.send(job).map_err(|_| writer_gone())
    }

    /// One pass per wake: the jobs queued by then, in order, and one sync for their appends. A
    /// job queued during the pass waits for the next, so a steady stream of appends still syncs.
    fn run(db: &Weak<Database>, queue: &mpsc::Receiver<Job>, durable: &watch::Sender<u64>) {
        while let Ok(first) = queue.recv() {
            let pass: Vec<Job> = std::iter::once(first).chain(queue.try_iter()).collect();
            let mut flushes = Vec::new();
            for job in pass {
                match job {
                    Job::Append { write, last, written, flushed } => {
                        let result = LogWriter::commit(db, redb::Durability::None, write);
                        match &result {
                            Ok(()) => flushes.push((last, flushed)),
                            Err(e) => flushed.io_completed(Err(io::Error::new(e.kind(), e.to_string()))),
                        }
                        let _ = written.send(result);
                    }
                    Job::Lazy { write } => {
                        if let Err(e) = LogWriter::commit(db, redb::Durability::None, write) {
                            tracing::warn!(error = %e, "a raft log write without a sync failed");
                        }
                    }
                    Job::Durable { write, lowers_to, reply } => {
                        LogWriter::sync(db, &mut flushes, durable);
                        let result = LogWriter::commit(db, redb::Durability::Immediate, write);
                        if let (Ok(()), Some(to)) = (&result, lowers_to) {
                            durable.send_modify(|d| *d = (*d).min(to));
                        }
                        let _ = reply.send(result);
                    }
                }
            }
            LogWriter::sync(db, &mut flushes, durable);
        }
    }

    /// One durable commit for all `flushes`; then the durable index moves to the last of them,
    /// and each is reported.
    fn sync(db: &Weak<Database>, flushes: &mut Vec<(u64, IOFlushed<TypeConfig>)>, durable: &watch::Sender<u64>) {
        let Some(&(last, _)) = flushes.last() else { return };
        let result = LogWriter::commit(db, redb::Durability::Immediate, Box::new(|_| Ok(())));
        if result.is_ok() {
            durable.send_modify(|d| *d = last);
        }
        for (_, flushed) in flushes.drain(..) {
            flushed.io_completed(result.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string())));
        }
    }

    fn commit(db: &Weak<Database>, durability: redb::Durability, write: Write) -> io::Result<()> {
        let db = db.upgrade().ok_or_else(|| io::Error::other("raft log database: closed"))?;
        let mut txn = db.begin_write().map_err(io_err)?;
        txn.set_durability(durability).map_err(io_err)?;
        write(&txn).map_err(io_err)?;
        txn.commit().map_err(io_err)
    }
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
    io::Error::other("raft log database: the writer thread has stopped")
}

/// The log store; clones share the database, so every reader sees every append.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    watch: Arc<AppendWatch>,
    writer: Arc<LogWriter>,
    durable: watch::Receiver<u64>,
}

impl LogStore {
    pub fn open(path: &Path, watch: Arc<AppendWatch>) -> anyhow::Result<LogStore> {
        let db = Database::create(path).map_err(|e| anyhow::anyhow!("raft log {}: {e}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        let db = Arc::new(db);
        // Everything in the file at open is durable.
        let last = db.begin_read()?.open_table(LOG)?.last()?.map(|(k, _)| k.value());
        let (durable_tx, durable) = watch::channel(last.unwrap_or(0));
        let writer = Arc::new(LogWriter::start(&db, durable_tx)?);
        Ok(LogStore { db, watch, writer, durable })
    }

    /// The index through which this node's log is durable: every entry at or below it that the
    /// log holds survives a crash.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let read = self.db.begin_read().map_err(io_err)?;
        let table = read.open_table(META).map_err(io_err)?;
        let value = table.get(key).map_err(io_err)?;
        value.map(|v| decode(v.value(), key)).transpose()
    }

    /// Commits a write durably on the writer thread, after every job queued before it.
    async fn write_durably(
        &self,
        lowers_to: Option<u64>,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static,
    ) -> io::Result<()> {
        let (reply, done) = oneshot::channel();
        self.writer.send(Job::Durable { write: Box::new(write), lowers_to, reply })?;
        done.await.map_err(|_| writer_gone())?
    }
}

fn put_meta(
    key: &'static str,
    value: Vec<u8>,
) -> impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error> + Send + 'static {
    move |txn| {
        txn.open_table(META)?.insert(key, value.as_slice())?;
        Ok(())
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
        self.write_durably(None, put_meta(VOTE, encode(vote))).await
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
        self.writer.send(Job::Lazy { write: Box::new(put_meta(COMMITTED, encode(&committed))) })
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
        let Some(last) = entries.last().map(|e| e.index()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let encoded: Vec<(u64, Vec<u8>)> = entries.iter().map(|e| (e.index(), encode(e))).collect();
        let write = Box::new(move |txn: &redb::WriteTransaction| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        });
        let (written, done) = oneshot::channel();
        self.writer.send(Job::Append { write, last, written, flushed: callback })?;
        done.await.map_err(|_| writer_gone())??;
        // Readable now; durable, and reported flushed, once the writer's sync of this pass is done.
        self.watch.appended(&entries);
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        self.write_durably(Some(from.saturating_sub(1)), move |txn| {
            let mut table = txn.open_table(LOG)?;
            table.retain_in(from.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let upto = log_id.index;
        let purged = encode(&log_id);
        self.write_durably(None, move |txn| {
            txn.open_table(META)?.insert(PURGED, purged.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
    }
}
