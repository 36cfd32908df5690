//! The replicated state machine: committed entries become ledger entries (files first, then the
//! index) and writes to the KV store, with the applied log id, the membership and the term
//! history, all in one redb transaction.
//!
//! Applying does not wait for the disk: the Raft log (`raft-log/`, synced once per group of
//! appends) is the write-ahead log. A batch commits without durability, and every
//! `raft.apply_durable_ms` ([`ApplyPacing::durable_every`]; and at every snapshot point, since
//! openraft then purges the log behind it) one commit syncs the ledger files and then the state
//! database, in that order and with no apply in between, so the durable index never runs ahead of
//! the durable files. After a crash the state database is as its last durable commit left it, the
//! node cuts the ledger files back to it, and openraft applies the log again from there.
//!
//! Followers never run contract code: they apply the write sets the leader proposed, after
//! checking every signature entry against their own tree.
//!
//! A snapshot openraft asks for to compact its log is a *point*: one durable commit of everything
//! applied, and its position recorded in the state database; the log may then be purged behind
//! it. A snapshot *file* (every KV entry, private ones sealed with their keys under the ledger
//! secret, the term history and the ledger's start state) is built only when one must be sent to
//! a node that is behind, from the state as it then is, and kept until a newer one replaces it;
//! no point is taken while one is being built.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::type_config::alias::SnapshotOf;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::settings::RaftSection;
use super::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig, decode, encode};
use cloister_crypto::seal::{Purpose, Sealer};
use cloister_crypto::secrets::LedgerSecrets;
use cloister_ledger::entry::{LedgerEntry, Payload, TxKind};
use cloister_ledger::files::StartState;
use cloister_ledger::txid::TxId;
use cloister_ledger::verify::{SnapshotEndorsements, SnapshotSeal};
use cloister_ledger::{Ledger, index};
use cloister_store::{self as kv, Store};
use redb::{ReadableTable, TableDefinition};

pub(crate) const APPLIED_LOG_ID_KEY: &str = "raft_applied";
const MEMBERSHIP: &str = "raft_membership";
/// The term history: the first log index of every term, keyed by term. One row is added when a
/// term's first entry is applied, so applying never re-encodes the history.
const TERMS: TableDefinition<u64, u64> = TableDefinition::new("raft_terms");
/// Entries applied per transaction, so a long catch-up does not hold all in memory.
const APPLY_BATCH_MAX: usize = 1024;
/// The most entries a batch may hold and still be applied on the Raft state machine's own tokio
/// task rather than on the blocking pool (see [`StateMachine::applies_inline`]).
const APPLY_INLINE_ENTRIES_MAX: usize = 4;
/// The most bytes of writes (public and sealed) such a batch may carry.
const APPLY_INLINE_BYTES_MAX: usize = 16 << 10;
/// The most committed app entries a node holds back to apply together (see
/// [`StateMachine::defers`]).
const APPLY_DEFER_ENTRIES_MAX: usize = 8;
/// Version 4 seals private entries in chunks ([`SNAPSHOT_CHUNK_BYTES`]); version 3 sealed each
/// alone. Version 3 named the ledger secret version its MAC and private entries are under, right
/// after the magic; version 2 had no such version, and version 1 no MAC. Older files are not read.
const SNAPSHOT_MAGIC: &[u8; 8] = b"CLSNAP4\0";
/// Plaintext bytes of private entries sealed together in one snapshot record (a chunk closes
/// before the entry that would take it past this; an entry larger than it is a chunk alone).
/// Sealing derives a key per blob (HKDF, then AES-GCM's key setup): sealing each entry alone was
/// about a quarter of a snapshot build's samples in a `perf` profile.
const SNAPSHOT_CHUNK_BYTES: usize = 64 << 10;
/// In place of a record's length: the records are over, and the MAC follows.
const END_OF_RECORDS: u32 = u32::MAX;
/// Largest record a snapshot file may hold: one state entry (a key and a sealed value within the
/// contract limits) or the term history, with room to spare.
const SNAPSHOT_RECORD_BYTES_MAX: usize = 64 << 20;
/// The state database's record of the newest snapshot point (a [`SnapshotPoint`]).
const SNAPSHOT_POINT: &str = "raft_snapshot_point";
/// How long openraft's request for a snapshot to send waits for the file build it starts. A
/// longer build goes on in the background: the snapshot goes out unsealed, so the send fails and
/// openraft asks again, and a request that finds the build running answers at once (see
/// [`StateMachine::file_when_built`]). openraft asks on the state machine's task, which applies
/// entries, so this is the longest a build stalls applying: once per build, not once per
/// request (openraft retries a failed send ten times at once, then every 200 ms).
const SNAPSHOT_FILE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// While a node catches up through a snapshot, snapshot points wait until the log since the
/// newest snapshot holds this many snapshot intervals (see [`StateMachine::point_due`]): the
/// bound keeps a node that never catches up (one that is down) from growing the log without end.
pub(crate) const CATCH_UP_INTERVALS_MAX: u64 = 4;

/// The terms of the log: `(term, first index of that term)`, in order. It answers which term a
/// committed index belongs to after the log itself has been purged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TermHistory(Vec<(u64, u64)>);

impl TermHistory {
    /// Reads the history from its table.
    fn read(txn: &impl TermsTable) -> io::Result<TermHistory> {
        let mut rows = Vec::new();
        txn.for_each_term(&mut |term, first| rows.push((term, first)))?;
        Ok(TermHistory(rows))
    }
}

/// Read access to the `TERMS` table, in a read or a write transaction.
trait TermsTable {
    fn for_each_term(&self, f: &mut dyn FnMut(u64, u64)) -> io::Result<()>;
}

impl TermsTable for redb::ReadTransaction {
    fn for_each_term(&self, f: &mut dyn FnMut(u64, u64)) -> io::Result<()> {
        let table = match self.open_table(TERMS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(io_other(e)),
        };
        for row in table.iter().map_err(io_other)? {
            let (term, first) = row.map_err(io_other)?;
            f(term.value(), first.value());
        }
        Ok(())
    }
}

/// Records the first index of every term among `applied` (`(term, index)` in log order) that
/// the table does not hold yet.
fn record_terms(txn: &redb::WriteTransaction, applied: impl IntoIterator<Item = (u64, u64)>) -> io::Result<()> {
    let mut table = txn.open_table(TERMS).map_err(io_other)?;
    let mut last = table.last().map_err(io_other)?.map(|(t, _)| t.value());
    for (term, index) in applied {
        if last.is_none_or(|l| term > l) {
            table.insert(term, index).map_err(io_other)?;
            last = Some(term);
        }
    }
    Ok(())
}

/// The term of the entry at `index`, if `index` is within the recorded history: the newest term
/// whose first index is at or before it (usually one of the last few rows).
fn term_of(read: &redb::ReadTransaction, index: u64) -> io::Result<Option<u64>> {
    let table = match read.open_table(TERMS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(io_other(e)),
    };
    for row in table.iter().map_err(io_other)?.rev() {
        let (term, first) = row.map_err(io_other)?;
        if first.value() <= index {
            return Ok(Some(term.value()));
        }
    }
    Ok(None)
}

/// What the rest of the node learns after each applied batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub last: Option<TxId>,
    /// Bumped whenever a batch wrote a `gov.` map.
    pub gov_version: u64,
}

impl Applied {
    /// Whether the applied state includes the log entry at `index`.
    pub fn covers(&self, index: u64) -> bool {
        self.last.is_some_and(|l| l.seqno >= index)
    }
}

/// A snapshot on disk.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
    /// What binds the snapshot to a signed ledger position: attached when the snapshot is sent
    /// ([`StateMachine::seal`]), checked when it is received ([`StateMachine::check_incoming`]).
    pub seal: Option<SnapshotSeal>,
}

struct StoredSnapshot {
    meta: SnapshotMeta,
    file: SnapshotFile,
    /// State records the file holds; 0 when unknown (a file adopted at start).
    records: u64,
}

/// A snapshot point: everything applied through `meta` was committed durably, so the log may be
/// purged behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotPoint {
    meta: SnapshotMeta,
    /// State records the state database held there.
    records: u64,
}

/// The node's newest snapshot point and file. The file may lag the point (files are built only
/// to be sent) or lead it (a file built to be sent covers the state as it was then).
#[derive(Default)]
struct Snapshots {
    point: Option<SnapshotPoint>,
    file: Option<StoredSnapshot>,
    /// While a file is being built: turns true when the build ends, built or failed.
    building: Option<watch::Receiver<bool>>,
}

impl Snapshots {
    /// The newest of the point and the file: the log may be purged behind it.
    fn newest(&self) -> Option<SnapshotPoint> {
        let file = self.file.as_ref().map(|f| SnapshotPoint { meta: f.meta.clone(), records: f.records });
        match (&self.point, file) {
            (Some(p), Some(f)) if f.meta.last_log_id > p.meta.last_log_id => Some(f),
            (Some(p), _) => Some(p.clone()),
            (None, f) => f,
        }
    }

    /// [`Snapshots::newest`]'s last log index and records (zeros when there is none).
    fn extent(&self) -> (u64, u64) {
        self.newest().map_or((0, 0), |s| (s.meta.last_log_id.map_or(0, |l| l.index), s.records))
    }

    /// The file, if it reaches the point: a snapshot that can be sent.
    fn file_to_send(&self) -> Option<(SnapshotMeta, SnapshotFile)> {
        let file = self.file.as_ref()?;
        let behind = self.point.as_ref().is_some_and(|p| p.meta.last_log_id > file.meta.last_log_id);
        (!behind).then(|| (file.meta.clone(), file.file.clone()))
    }
}

struct Inner {
    store: Store,
    /// Always present on a node. Absent only in openraft's storage suite, which feeds the state
    /// machine entries with gaps no Raft log has, and which a ledger rightly refuses.
    ledger: Option<Arc<Ledger>>,
    /// The service's ledger secrets: they open private writes and snapshot entries, and learn
    /// each rekey as its entry is applied. Absent only in openraft's storage suite.
    secrets: Option<Arc<LedgerSecrets>>,
    snapshot_dir: PathBuf,
    snapshots: Mutex<Snapshots>,
    /// Held while a snapshot file becomes the current one and the others are deleted.
    files: Mutex<()>,
    /// Set once Raft runs ([`StateMachine::start_sending_snapshots`]). Before, openraft's start
    /// asks for the current snapshot only for its metadata, and no file is built for that.
    sends_snapshots: std::sync::atomic::AtomicBool,
    /// The most entries a snapshot file waiting to be sent covers with no signature past them
    /// ([`StateMachine::seal_wanted`]).
    seal_wanted: watch::Sender<u64>,
    applied: watch::Sender<Applied>,
    /// `Applied::gov_version` alone, for what waits for governance changes: it changes only
    /// with them, so a waiter does not wake for every applied batch.
    gov_changes: watch::Sender<u64>,
    /// When applied state was last committed durably.
    durable_at: Mutex<std::time::Instant>,
    /// The index below which this node's Raft log is durable: no entry at or beyond it is
    /// applied (see `LogStore::durable`). Absent only in openraft's storage suite, which applies
    /// entries no log holds.
    log_durable: Option<watch::Receiver<u64>>,
    held: tokio::sync::Mutex<Held>,
    pacing: ApplyPacing,
    /// Readers waiting for an entry to apply ([`StateMachine::hold_nothing`]).
    readers_waiting: std::sync::atomic::AtomicUsize,
    /// Entries held back, or taken from the group and not yet published: a read has something to
    /// apply first only while this is above zero. It goes down after the group is published,
    /// and never after a failed apply, so readers then meet the failure.
    unpublished: std::sync::atomic::AtomicUsize,
    /// Set when applying committed entries failed (see [`StateMachine::apply_failed`]).
    apply_failed: std::sync::atomic::AtomicBool,
    counts: Counts,
}

/// When a node applies and when it makes applied state durable, from its `[raft]` settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ApplyPacing {
    /// The longest committed app entries are held back (`raft.apply_hold_ms`); zero holds none.
    pub hold_for: std::time::Duration,
    /// The longest between durable commits of applied state (`raft.apply_durable_ms`): at most
    /// this much applying is redone from the Raft log after a crash. Zero makes every apply
    /// durable.
    pub durable_every: std::time::Duration,
}

impl From<&crate::settings::RaftSection> for ApplyPacing {
    fn from(settings: &crate::settings::RaftSection) -> ApplyPacing {
        ApplyPacing {
            hold_for: std::time::Duration::from_millis(settings.apply_hold_ms),
            durable_every: std::time::Duration::from_millis(settings.apply_durable_ms),
        }
    }
}

impl Default for ApplyPacing {
    fn default() -> ApplyPacing {
        ApplyPacing::from(&crate::settings::RaftSection::default())
    }
}

/// What the state machine has done since the node started, for the node's metrics.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub signatures_applied: AtomicU64,
    /// Transactions that applied committed entries: `raft_apply_index`'s growth over this is
    /// the entries per batch.
    pub apply_batches: AtomicU64,
    /// Of those, the ones that also made everything applied before them durable.
    pub durable_commits: AtomicU64,
    /// Snapshot points taken (each with a durable commit).
    pub snapshots_built: AtomicU64,
    /// Snapshot files built to be sent (each with a durable commit).
    pub snapshot_files_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

/// Committed app entries a node holds back, so that several apply in one transaction (see
/// [`StateMachine::defers`]). Whatever applies takes this lock and applies what it holds before
/// anything newer, so entries still apply in log order.
#[derive(Default)]
struct Held {
    entries: Vec<EntryResponder<TypeConfig>>,
    /// Bytes of writes (public and sealed) the entries carry.
    bytes: usize,
    /// Counts the groups held so far: a timer set for one group leaves a later one alone.
    group: u64,
    /// The timer of the current group, stopped when the node stops.
    timer: Option<tokio::task::AbortHandle>,
    /// Set when the node stops: a timer still asleep then never takes the state machine again,
    /// so the databases close when the node lets them go.
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// Why applying failed: openraft stops the node on a failed apply, and until it does every
    /// later apply and read fails the same way rather than apply past a gap.
    failed: Option<String>,
}

impl Held {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(reason) => Err(io_other(format!("an earlier apply failed: {reason}"))),
            None => Ok(()),
        }
    }
}

/// See [`StateMachine::hold_nothing`].
pub(crate) struct HoldNothing(Arc<Inner>);

impl Drop for HoldNothing {
    fn drop(&mut self) {
        self.0.readers_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The state machine handle; clones share everything.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

fn io_other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl StateMachine {
    pub(crate) fn new(
        store: Store,
        ledger: Arc<Ledger>,
        secrets: Arc<LedgerSecrets>,
        snapshot_dir: PathBuf,
        log_durable: watch::Receiver<u64>,
        pacing: ApplyPacing,
    ) -> anyhow::Result<StateMachine> {
        StateMachine::with(store, Some(ledger), Some(secrets), snapshot_dir, Some(log_durable), pacing)
    }

    /// A state machine that keeps no ledger, for openraft's storage suite only.
    #[cfg(test)]
    pub(crate) fn without_ledger(
        store: Store,
        secrets: Option<Arc<LedgerSecrets>>,
        snapshot_dir: PathBuf,
    ) -> anyhow::Result<StateMachine> {
        let batch = store.write_batch()?;
        index::create(batch.txn())?;
        batch.commit()?;
        let sm = StateMachine::with(store, None, secrets, snapshot_dir, None, ApplyPacing::default())?;
        sm.start_sending_snapshots();
        Ok(sm)
    }

    fn with(
        store: Store,
        ledger: Option<Arc<Ledger>>,
        secrets: Option<Arc<LedgerSecrets>>,
        snapshot_dir: PathBuf,
        log_durable: Option<watch::Receiver<u64>>,
        pacing: ApplyPacing,
    ) -> anyhow::Result<StateMachine> {
        std::fs::create_dir_all(&snapshot_dir)?;
        let sm = StateMachine {
            inner: Arc::new(Inner {
                store,
                ledger,
                secrets,
                snapshot_dir,
                snapshots: Mutex::default(),
                files: Mutex::default(),
                sends_snapshots: Default::default(),
                seal_wanted: watch::Sender::new(0),
                applied: watch::Sender::new(Applied::default()),
                gov_changes: watch::Sender::new(0),
                durable_at: Mutex::new(std::time::Instant::now()),
                log_durable,
                held: tokio::sync::Mutex::default(),
                pacing,
                readers_waiting: Default::default(),
                unpublished: Default::default(),
                apply_failed: Default::default(),
                counts: Counts::default(),
            }),
        };
        let last = sm.meta::<Option<LogId>>(APPLIED_LOG_ID_KEY)?.flatten();
        sm.inner.applied.send_modify(|a| a.last = last.as_ref().map(super::types::tx_id));
        sm.adopt_latest_snapshot_file()?;
        sm.inner.snapshots.lock().expect("snapshot lock").point = sm.meta::<SnapshotPoint>(SNAPSHOT_POINT)?;
        Ok(sm)
    }

    /// From now on, a request for the current snapshot builds its file if need be: Raft runs,
    /// and asks for it to send it.
    pub(crate) fn start_sending_snapshots(&self) {
        self.inner.sends_snapshots.store(true, Ordering::Release);
    }

    /// Rises to the entries a snapshot file covers when it is to be sent and no signature reaches
    /// past its last entry yet. On a quiet service that last entry is the leader's last
    /// signature, which covers the entries before it but not itself, and nothing would make the
    /// leader sign again: its signer watches this and signs once more.
    pub(crate) fn seal_wanted(&self) -> watch::Receiver<u64> {
        self.inner.seal_wanted.subscribe()
    }

    pub(crate) fn counts(&self) -> &Counts {
        &self.inner.counts
    }

    /// Notifications after each applied batch.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Applied> {
        self.inner.applied.subscribe()
    }

    /// Whether the published applied state includes the log entry at `index`.
    pub(crate) fn applied_through(&self, index: u64) -> bool {
        self.inner.applied.borrow().covers(index)
    }

    /// Notifications of [`StateMachine::gov_version`]'s changes only.
    pub(crate) fn gov_changes(&self) -> watch::Receiver<u64> {
        self.inner.gov_changes.subscribe()
    }

    /// How many applied batches (and installed snapshots) have changed a `gov.` map, published
    /// after the state database holds them.
    pub(crate) fn gov_version(&self) -> u64 {
        self.inner.applied.borrow().gov_version
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        let bytes = self.inner.store.meta(key).map_err(io_other)?;
        bytes.map(|b| decode(&b, key)).transpose()
    }

    /// The term of the applied entry at `index`, if the history reaches back that far.
    pub(crate) fn term_of(&self, index: u64) -> io::Result<Option<u64>> {
        term_of(&self.inner.store.read_txn().map_err(io_other)?, index)
    }

    /// After a restart, the newest snapshot file on disk is the current file again. A file
    /// still being written or received when the node stopped (`.tmp`, each as large as the
    /// state) is deleted: nothing at start is building or receiving one.
    fn adopt_latest_snapshot_file(&self) -> anyhow::Result<()> {
        let mut newest: Option<(u64, PathBuf, SnapshotMeta)> = None;
        for entry in std::fs::read_dir(&self.inner.snapshot_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?;
            } else if path.extension().is_some_and(|e| e == "snap") {
                // A file of an older format (or a damaged one) is passed over: openraft builds
                // a new snapshot when it needs one.
                let meta = match read_head(&path) {
                    Ok(meta) => meta,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "passing over an unreadable snapshot file");
                        continue;
                    }
                };
                let index = meta.last_log_id.map_or(0, |l| l.index);
                if newest.as_ref().is_none_or(|(i, ..)| index > *i) {
                    newest = Some((index, path, meta));
                }
            }
        }
        if let Some((_, path, meta)) = newest {
            self.inner.snapshots.lock().expect("snapshot lock").file =
                Some(StoredSnapshot { meta, file: SnapshotFile { path, seal: None }, records: 0 });
        }
        Ok(())
    }

    /// Applies a batch of entries: ledger files first (durably), then the index, the writes and
    /// the bookkeeping in one durable transaction. Returns whether a `gov.` map changed.
    ///
    /// `may_sync` lets it be the batch that makes everything durable when
    /// [`ApplyPacing::durable_every`] has passed; a batch applied on a tokio worker passes `false`.
    fn apply_batch(&self, batch: &[(LogId, Payload, Option<StoredMembership>)], may_sync: bool) -> io::Result<bool> {
        let store = &self.inner.store;
        let mut membership = None;
        let mut writes = Vec::new();
        let mut gov_touched = false;
        let mut txn = store.write_batch().map_err(io_other)?;
        let mut entries: Vec<LedgerEntry> = Vec::with_capacity(batch.len());
        let mut signatures = 0;
        {
            let ledger = self.inner.ledger.as_ref();
            let service_cert = ledger.map(|l| l.service_cert().to_vec()).unwrap_or_default();
            let mut appender = index::Appender::new(txn.txn(), service_cert).map_err(io_other)?;
            for (log_id, payload, m) in batch {
                if let Payload::Tx(tx) = payload {
                    if tx.kind == TxKind::Signature {
                        signatures += 1;
                    }
                    let ws = match (&self.inner.secrets, &tx.private) {
                        (Some(s), _) => tx.writes(s.as_ref()),
                        (None, None) => tx.public_writes(),
                        (None, Some(_)) => {
                            return Err(io_other(
                                "a transaction has private writes but this node has no ledger secret",
                            ));
                        }
                    }
                    .map_err(|e| io_other(format!("ledger entry {}: {e}", log_id.index)))?;
                    self.learn_secrets(&ws).map_err(|e| io_other(format!("ledger entry {}: {e}", log_id.index)))?;
                    gov_touched |= ws.iter().any(|(map, _, _)| map.starts_with(cloister_abi::abi::GOV_PREFIX));
                    writes.push(ws);
                }
                if m.is_some() {
                    membership = m.clone();
                }
                if ledger.is_some() {
                    let entry = appender.append(log_id.index, log_id.leader_id.term, payload.clone()).map_err(|e| {
                        tracing::error!(error = %e, "refusing a ledger entry: this node stops applying");
                        io_other(e)
                    })?;
                    entries.push(entry);
                }
            }
            appender.finish().map_err(io_other)?;
        }
        if let Some(ledger) = &self.inner.ledger {
            ledger.append(&entries)?;
        }
        for ws in &writes {
            txn.apply(ws).map_err(io_other)?;
        }
        let last = batch.last().map(|(l, ..)| *l);
        txn.put_meta(APPLIED_LOG_ID_KEY, &encode(&last)).map_err(io_other)?;
        record_terms(txn.txn(), batch.iter().map(|(log_id, ..)| (log_id.leader_id.term, log_id.index)))?;
        if let Some(m) = membership {
            txn.put_meta(MEMBERSHIP, &encode(&m)).map_err(io_other)?;
        }
        let mut durable_at = self.inner.durable_at.lock().expect("durability clock lock");
        if may_sync && durable_at.elapsed() >= self.inner.pacing.durable_every {
            self.commit_durably(txn)?;
            *durable_at = std::time::Instant::now();
        } else {
            txn.commit_nondurable().map_err(io_other)?;
        }
        self.inner.counts.apply_batches.fetch_add(1, Ordering::Relaxed);
        self.inner.counts.signatures_applied.fetch_add(signatures, Ordering::Relaxed);
        Ok(gov_touched)
    }

    /// Makes everything applied so far durable: the ledger files, then the state database, while
    /// holding the store's write transaction so that no apply runs in between.
    fn checkpoint(&self) -> io::Result<()> {
        self.checkpoint_with(|_| Ok(()))
    }

    /// [`StateMachine::checkpoint`], with `also` writing into the same durable commit first.
    fn checkpoint_with<T>(&self, also: impl FnOnce(&mut kv::WriteBatch<'_>) -> io::Result<T>) -> io::Result<T> {
        let mut txn = self.inner.store.write_batch().map_err(io_other)?;
        let written = also(&mut txn)?;
        self.commit_durably(txn)?;
        *self.inner.durable_at.lock().expect("durability clock lock") = std::time::Instant::now();
        Ok(written)
    }

    /// Syncs the ledger files, then commits `txn` durably: the durable index never runs ahead of
    /// the durable files. `txn` excludes any other apply in between.
    fn commit_durably(&self, txn: kv::WriteBatch<'_>) -> io::Result<()> {
        if let Some(ledger) = &self.inner.ledger {
            ledger.sync()?;
        }
        txn.commit().map_err(io_other)?;
        self.inner.counts.durable_commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn publish(&self, last: Option<LogId>, gov_touched: bool) {
        let mut gov_version = None;
        self.inner.applied.send_modify(|a| {
            a.last = last.as_ref().map(super::types::tx_id);
            if gov_touched {
                a.gov_version += 1;
                gov_version = Some(a.gov_version);
            }
        });
        if let Some(version) = gov_version {
            self.inner.gov_changes.send_replace(version);
        }
    }

    /// Takes a snapshot point: commits everything applied durably, and records its position in
    /// the same commit. It writes no file: one is built only when a snapshot must be sent
    /// ([`StateMachine::build_file`]).
    fn take_point(&self) -> io::Result<SnapshotPoint> {
        let point = self.checkpoint_with(|txn| {
            let meta = snapshot_meta(|key| txn.meta(key))?;
            let point = SnapshotPoint { meta, records: txn.entries().map_err(io_other)? };
            txn.put_meta(SNAPSHOT_POINT, &encode(&point)).map_err(io_other)?;
            Ok(point)
        })?;
        // An install that committed after this point may already have published a newer one.
        let mut snapshots = self.inner.snapshots.lock().expect("snapshot lock");
        if snapshots.point.as_ref().is_none_or(|p| p.meta.last_log_id <= point.meta.last_log_id) {
            snapshots.point = Some(point.clone());
        }
        Ok(point)
    }

    /// Builds a snapshot file of the state as it is, to be sent, and keeps it unless a newer one
    /// took its place meanwhile.
    fn build_file(&self) -> io::Result<SnapshotOf<TypeConfig, SnapshotFile>> {
        let export = self.inner.store.export().map_err(io_other)?;
        // Sealed under the newest secret whose record the exported state holds, so that a node
        // installing it learns that secret from the snapshot itself if it lacks it.
        let version = export
            .last_key_of(kv::gov::LEDGER_SECRETS)
            .map_err(io_other)?
            .map_or(1, |k| cloister_crypto::secrets::version_of(&k));
        let sealer = self.sealer_of(version)?;
        // What the file covers is made durable first, so that a file never leads the state a
        // restarted node finds (openraft would install it over that state).
        self.checkpoint()?;
        let meta = snapshot_meta(|key| export.meta(key))?;
        let history = encode(&TermHistory::read(export.txn())?);
        let start = index::start_state(export.txn()).map_err(io_other)?;
        let path = self.inner.snapshot_dir.join(snapshot_name(&meta));
        let tmp = path.with_extension("tmp");
        let mut records = 0u64;
        let written = (|| -> io::Result<()> {
            let mut out = Maced::new(BufWriter::new(std::fs::File::create(&tmp)?), sealer.as_deref());
            write_head(&mut out, version, &meta)?;
            write_record(&mut out, &history)?;
            write_record(&mut out, &encode(&start))?;
            let mut chunk = PrivateChunk::default();
            export
                .for_each_opened(|k, v| {
                    records += 1;
                    // Private entries are sealed, key included, in chunks under the ledger secret
                    // (the state database's own key never leaves the node); public ones stay in
                    // clear.
                    let record = match &sealer {
                        Some(s) if !kv::is_public(kv::map_of(k)) => match chunk.add(k, v) {
                            Some(full) => encode(&SnapshotRecord::Private(full.seal(s))),
                            None => return Ok(()),
                        },
                        _ => encode(&SnapshotRecord::Public(k.to_vec(), v.to_vec())),
                    };
                    write_record(&mut out, &record)
                        .map_err(|e| kv::KvError::Invalid { path: tmp.clone(), message: e.to_string() })
                })
                .map_err(io_other)?;
            if let Some(s) = &sealer
                && !chunk.plain.is_empty()
            {
                write_record(&mut out, &encode(&SnapshotRecord::Private(chunk.seal(s))))?;
            }
            write_end(out)?.into_inner().map_err(|e| io_other(e.error()))?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path)?;
        cloister_crypto::identity::sync_dir(&self.inner.snapshot_dir)?;
        let file = SnapshotFile { path, seal: None };
        self.file_built(StoredSnapshot { meta: meta.clone(), file: file.clone(), records });
        Ok(Snapshot { meta, snapshot: file })
    }

    /// Keeps a file just built, unless an installed snapshot overtook the build (then the build
    /// is dropped). It waits for an install in progress to put its own file in place first.
    fn file_built(&self, built: StoredSnapshot) {
        let files = self.inner.files.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.replace_file(built, true, &files);
    }

    /// The last log index the newest snapshot (point or file) covers, and the state records it
    /// holds (0 when unknown).
    #[cfg(test)]
    fn snapshot_extent(&self) -> (u64, u64) {
        self.inner.snapshots.lock().expect("snapshot lock").extent()
    }

    /// Whether openraft should take a snapshot point, with entries applied through `last` and
    /// the last point asked for at `asked_at`: once the entries applied since the newest
    /// snapshot reach [`RaftSection::snapshot_interval`]; never while a file is being built to
    /// be sent; and while a node is `catching_up` through a snapshot, only once the log since
    /// the newest snapshot holds [`CATCH_UP_INTERVALS_MAX`] intervals. A point taken during a
    /// build leaves the file behind it, unsendable, and one taken while the file is on its way
    /// purges the entries the node needs after it: either way the node needs another snapshot,
    /// and under load, on a state whose build, send and install outlast the time between
    /// points, it would never catch up.
    pub(crate) fn point_due(&self, last: u64, asked_at: u64, settings: &RaftSection, catching_up: bool) -> bool {
        let snapshots = self.inner.snapshots.lock().expect("snapshot lock");
        let (covered, records) = snapshots.extent();
        let interval = settings.snapshot_interval(records);
        let deferred = catching_up && last.saturating_sub(covered) < interval.saturating_mul(CATCH_UP_INTERVALS_MAX);
        snapshots.building.is_none() && !deferred && last.saturating_sub(covered.max(asked_at)) >= interval
    }

    /// A snapshot to send: the file if it reaches the newest point; otherwise, once Raft runs,
    /// one built now, if that takes at most [`SNAPSHOT_FILE_WAIT`]. `None` while a build goes on
    /// (a request that finds one running does not wait), and before Raft runs.
    async fn file_when_built(&self) -> Option<(SnapshotMeta, SnapshotFile)> {
        /// Ends a build, however it ends: the next request may start another.
        struct BuildEnds(StateMachine, watch::Sender<bool>);
        impl Drop for BuildEnds {
            fn drop(&mut self) {
                self.0.inner.snapshots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).building = None;
                self.1.send_replace(true);
            }
        }
        let (ends, mut done) = {
            let mut snapshots = self.inner.snapshots.lock().expect("snapshot lock");
            if let Some(ready) = snapshots.file_to_send() {
                return Some(ready);
            }
            // A build under way (another request started it) is not waited for: every request
            // would stall applying again.
            if !self.inner.sends_snapshots.load(Ordering::Acquire) || snapshots.building.is_some() {
                return None;
            }
            let (built, done) = watch::channel(false);
            snapshots.building = Some(done.clone());
            (BuildEnds(self.clone(), built), done)
        };
        // Spawned with the lock released: a task the runtime refuses is dropped here, and its
        // guard takes the lock.
        tokio::task::spawn_blocking(move || match ends.0.build_file() {
            Ok(_) => _ = ends.0.inner.counts.snapshot_files_built.fetch_add(1, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "building a snapshot file to send failed; the next send tries again"),
        });
        // Timing out leaves the build running: a later request finds its file.
        let _ = tokio::time::timeout(SNAPSHOT_FILE_WAIT, done.wait_for(|built| *built)).await;
        self.inner.snapshots.lock().expect("snapshot lock").file_to_send()
    }

    /// Makes `new` the current file, unless `newer_only` and the current one is newer, and
    /// deletes the other files. The caller holds `files`, so that no other file takes its place
    /// meanwhile.
    fn replace_file(&self, new: StoredSnapshot, newer_only: bool, _files: &std::sync::MutexGuard<'_, ()>) {
        let keep = {
            let mut snapshots = self.inner.snapshots.lock().expect("snapshot lock");
            let older = snapshots.file.as_ref().is_some_and(|f| f.meta.last_log_id > new.meta.last_log_id);
            if !(newer_only && older) {
                snapshots.file = Some(new);
            }
            snapshots.file.as_ref().map(|f| f.file.path.clone())
        };
        if let Ok(dir) = std::fs::read_dir(&self.inner.snapshot_dir) {
            for entry in dir.flatten() {
                let p = entry.path();
                if keep.as_ref() != Some(&p) && p.extension().is_some_and(|e| e == "snap") {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    /// Replaces the whole state with a snapshot's, and continues the ledger from its start state.
    fn install(&self, meta: &SnapshotMeta, snapshot: &SnapshotFile) -> io::Result<()> {
        self.install_stepwise(meta, snapshot, &mut |_| Ok(()))
    }

    /// [`StateMachine::install`], calling `after` once each durable step is taken: a test stops
    /// there, as a crash would.
    fn install_stepwise(
        &self,
        meta: &SnapshotMeta,
        snapshot: &SnapshotFile,
        after: &mut dyn FnMut(InstallStep) -> io::Result<()>,
    ) -> io::Result<()> {
        let path = &snapshot.path;
        let invalid = |m: &str| invalid_snapshot(path, m);
        // Checked when it arrived; installing it again at a restart may need them anew.
        self.learn_secrets_from_snapshot(path)?;
        let (mut input, version) = self.open_snapshot(path)?;
        let sealer = self.sealer_of(version)?;
        let (head, history, start) = read_preamble(&mut input, path)?;
        if head != *meta {
            return Err(invalid(METADATA_MISMATCH));
        }
        let store = &self.inner.store;
        let mut txn = store.write_batch().map_err(io_other)?;
        txn.clear().map_err(io_other)?;
        // Private entries are written as any write is, sealed under this node's state key.
        let mut private = kv::WriteSet::default();
        let mut records = 0u64;
        while let Some(record) = read_record(&mut input)? {
            match decode::<SnapshotRecord>(&record, "a snapshot entry")? {
                SnapshotRecord::Public(k, v) => {
                    records += 1;
                    txn.insert_stored(&k, &v).map_err(io_other)?;
                }
                SnapshotRecord::Private(sealed) => {
                    let sealer = sealer
                        .as_ref()
                        .ok_or_else(|| invalid("it holds private entries but this node has no ledger secret"))?;
                    let plain = sealer
                        .open(Purpose::SnapshotEntry, b"", &sealed)
                        .map_err(|_| invalid("a sealed chunk does not open"))?;
                    let mut rest = plain.as_slice();
                    while !rest.is_empty() {
                        let ((full, value), after) = postcard::take_from_bytes::<(&[u8], &[u8])>(rest)
                            .map_err(|e| invalid(&format!("a private snapshot entry does not decode: {e}")))?;
                        rest = after;
                        records += 1;
                        let (map, key) =
                            kv::split_key_checked(full).ok_or_else(|| invalid("a private entry has no map name"))?;
                        if kv::is_public(map) {
                            return Err(invalid("a sealed entry names a public map"));
                        }
                        private.put(map, key, value);
                        if private.len() >= APPLY_BATCH_MAX {
                            txn.apply(&std::mem::take(&mut private)).map_err(io_other)?;
                        }
                    }
                }
            }
        }
        txn.apply(&private).map_err(io_other)?;
        // Nothing is committed, and so nothing installed, unless the whole file verifies.
        check_end(input, path)?;
        index::reset(txn.txn(), &start).map_err(io_other)?;
        txn.put_meta(APPLIED_LOG_ID_KEY, &encode(&meta.last_log_id)).map_err(io_other)?;
        txn.put_meta(MEMBERSHIP, &encode(&meta.last_membership)).map_err(io_other)?;
        // The installed state is the newest point: the one before described the state replaced.
        let point = SnapshotPoint { meta: meta.clone(), records };
        txn.put_meta(SNAPSHOT_POINT, &encode(&point)).map_err(io_other)?;
        let history: TermHistory = decode(&history, "a term history")?;
        {
            let mut terms = txn.txn().open_table(TERMS).map_err(io_other)?;
            terms.retain(|_, _| false).map_err(io_other)?;
            for (term, first) in history.0 {
                terms.insert(term, first).map_err(io_other)?;
            }
        }
        // The file takes its place first: once the state says it is at the snapshot, the
        // snapshot must be on disk, for openraft purges the log up to the state at restart.
        // Killed in between, the node restarts with the newer file and the older state, and
        // installs the file again.
        let final_path = self.inner.snapshot_dir.join(snapshot_name(meta));
        // Until the file is the current one: a file build ending meanwhile would delete it.
        let files = self.inner.files.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::fs::rename(path, &final_path)?;
        cloister_crypto::identity::sync_dir(&self.inner.snapshot_dir)?;
        after(InstallStep::FileInPlace)?;
        txn.commit().map_err(io_other)?;
        after(InstallStep::StateCommitted)?;
        if let Some(ledger) = &self.inner.ledger {
            ledger.restart_at(start)?;
        }
        self.inner.snapshots.lock().expect("snapshot lock").point = Some(point);
        self.replace_file(
            StoredSnapshot { meta: meta.clone(), file: SnapshotFile { path: final_path, seal: None }, records },
            false,
            &files,
        );
        drop(files);
        self.publish(meta.last_log_id, true);
        tracing::info!(last = ?meta.last_log_id.as_ref().map(super::types::tx_id), "installed a snapshot");
        Ok(())
    }

    /// The seal of the snapshot in `path`: the first applied signature whose tree reaches its
    /// last entry, with the leaves in between. None without a ledger, or before such a signature
    /// (then [`StateMachine::seal_wanted`] asks for one).
    fn seal(&self, path: &Path) -> io::Result<Option<SnapshotSeal>> {
        if self.inner.ledger.is_none() {
            return Ok(None);
        }
        let mut input = BufReader::new(std::fs::File::open(path)?);
        read_magic(&mut input, path)?;
        let (_, _, start) = read_preamble(&mut input, path)?;
        let read = self.inner.store.read_txn().map_err(io_other)?;
        let seal = index::snapshot_seal(&read, start.next).map_err(io_other)?;
        if seal.is_none() {
            self.inner.seal_wanted.send_if_modified(|wanted| {
                let rises = start.next > *wanted;
                *wanted = (*wanted).max(start.next);
                rises
            });
        }
        Ok(seal)
    }

    /// Checks a received snapshot before it is installed, so that a bad one is refused to its
    /// sender and the node runs on: its MAC, and its seal, which must bind the snapshot's ledger
    /// position to a signature by a node the snapshot's own state shows endorsed. (Installing
    /// checks the MAC again; a failure there stops the node, as any storage failure does.)
    pub(crate) fn check_incoming(&self, meta: &SnapshotMeta, snapshot: &SnapshotFile) -> io::Result<()> {
        if self.inner.ledger.is_none() {
            return Ok(());
        }
        let path = &snapshot.path;
        let invalid = |m: &str| invalid_snapshot(path, m);
        let seal =
            snapshot.seal.as_ref().ok_or_else(|| invalid("it has no seal binding it to a signed ledger position"))?;
        self.learn_secrets_from_snapshot(path)?;
        let (mut input, _) = self.open_snapshot(path)?;
        let (head, _, start) = read_preamble(&mut input, path)?;
        if head != *meta {
            return Err(invalid(METADATA_MISMATCH));
        }
        let mut endorsed = SnapshotEndorsements::default();
        while let Some(record) = read_record(&mut input)? {
            if let SnapshotRecord::Public(k, v) = decode::<SnapshotRecord>(&record, "a snapshot entry")?
                && let Some((kv::gov::ENDORSEMENTS, key)) = kv::split_key_checked(&k)
            {
                endorsed.note(key, &v).map_err(|e| invalid(&e))?;
            }
        }
        check_end(input, path)?;
        seal.check(&start, &endorsed).map_err(|e| invalid(&format!("its seal does not hold: {e}")))
    }

    /// Adds the ledger secret versions that the records of `gov.ledger_secrets` in `ws` seal to
    /// this node, before the next entry (which may be sealed under one) is opened.
    fn learn_secrets(&self, ws: &kv::WriteSet) -> Result<(), cloister_crypto::secrets::LearnError> {
        let Some(secrets) = &self.inner.secrets else { return Ok(()) };
        for (map, key, value) in ws.iter() {
            if map == kv::gov::LEDGER_SECRETS
                && let Some(value) = value
                && let Some(version) = secrets.learn(key, value)?
            {
                tracing::info!(version, "learned a new ledger secret version");
            }
        }
        Ok(())
    }

    /// A node that fell behind a rekey and is sent a snapshot under a version it lacks learns
    /// the versions from the snapshot's own `gov.ledger_secrets` (each sealed to it, and each
    /// proven to follow the one it holds) before its MAC is checked under the newest.
    fn learn_secrets_from_snapshot(&self, path: &Path) -> io::Result<()> {
        let Some(secrets) = &self.inner.secrets else { return Ok(()) };
        let mut input = BufReader::new(std::fs::File::open(path)?);
        let version = read_magic(&mut input, path)?;
        if secrets.get(version).is_some() {
            return Ok(());
        }
        read_preamble(&mut input, path)?;
        while let Some(record) = read_record(&mut input)? {
            if let SnapshotRecord::Public(k, v) = decode::<SnapshotRecord>(&record, "a snapshot entry")?
                && let Some((kv::gov::LEDGER_SECRETS, key)) = kv::split_key_checked(&k)
                && let Some(version) = secrets.learn(key, &v).map_err(|e| invalid_snapshot(path, &e.to_string()))?
            {
                tracing::info!(version, "learned a new ledger secret version from a snapshot");
            }
        }
        Ok(())
    }

    /// The sealer of ledger secret `version`; none in openraft's storage suite.
    fn sealer_of(&self, version: u64) -> io::Result<Option<Arc<Sealer>>> {
        let Some(secrets) = &self.inner.secrets else { return Ok(None) };
        secrets.get(version).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "this node does not hold ledger secret version {version} (it holds {secrets:?}): it was not \
                     Trusted at that rekey; a retired node cannot follow the service on"
                ),
            )
        })
    }

    /// Opens a snapshot file for reading under the MAC of the secret version it names.
    fn open_snapshot(&self, path: &Path) -> io::Result<(Maced<BufReader<std::fs::File>>, u64)> {
        let mut raw = BufReader::new(std::fs::File::open(path)?);
        let version = read_magic(&mut raw, path)?;
        let sealer = self.sealer_of(version)?;
        let mut input = Maced::new(raw, sealer.as_deref());
        input.mac.update(SNAPSHOT_MAGIC);
        input.mac.update(&version.to_le_bytes());
        Ok((input, version))
    }

    /// The file of a snapshot not built yet: its name, and no seal, so a send of it fails and
    /// openraft asks again.
    fn unbuilt_file(&self, meta: &SnapshotMeta) -> SnapshotFile {
        SnapshotFile { path: self.inner.snapshot_dir.join(snapshot_name(meta)), seal: None }
    }

    /// A fresh path in the snapshot folder, for receiving a snapshot.
    pub(crate) fn incoming_path(&self) -> PathBuf {
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).expect("OS random");
        self.inner.snapshot_dir.join(format!("incoming-{}.tmp", hex::encode(id)))
    }
}

/// The durable steps of installing a snapshot, in the order they are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InstallStep {
    /// The file is in the snapshot folder under its final name, the newest there.
    FileInPlace,
    /// The state database holds the snapshot's state, and says so in its applied log id.
    StateCommitted,
}

/// A record of a snapshot file's state. Its bytes are byte strings: in postcard the same bytes
/// as sequences of `u8`, but copied whole.
#[derive(Serialize, Deserialize)]
enum SnapshotRecord {
    /// A public map's entry: table key and value, in clear.
    Public(#[serde(with = "serde_bytes")] Vec<u8>, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Private maps' entries: a [`PrivateChunk`], sealed with the ledger secret version the file
    /// names.
    Private(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// Private entries gathered for one sealed snapshot record: each `(full key, value)` encoded in
/// turn, up to [`SNAPSHOT_CHUNK_BYTES`].
#[derive(Default)]
struct PrivateChunk {
    plain: Vec<u8>,
}

impl PrivateChunk {
    /// Adds an entry. When it does not fit, returns the chunk so far, full, and keeps the entry
    /// for the next.
    fn add(&mut self, full: &[u8], value: &[u8]) -> Option<PrivateChunk> {
        let entry = encode(&(serde_bytes::Bytes::new(full), serde_bytes::Bytes::new(value)));
        let closed = (!self.plain.is_empty() && self.plain.len() + entry.len() > SNAPSHOT_CHUNK_BYTES)
            .then(|| std::mem::take(self));
        self.plain.extend_from_slice(&entry);
        closed
    }

    fn seal(&self, sealer: &Sealer) -> Vec<u8> {
        sealer.seal(Purpose::SnapshotEntry, b"", &self.plain)
    }
}

/// The snapshot metadata of a state: its applied log id and membership, as `meta` reads them
/// from the state database (in a read or a write transaction).
fn snapshot_meta(meta: impl Fn(&str) -> Result<Option<Vec<u8>>, kv::KvError>) -> io::Result<SnapshotMeta> {
    let read = |key: &str| meta(key).map_err(io_other);
    let last_log_id: Option<LogId> =
        read(APPLIED_LOG_ID_KEY)?.map(|b| decode(&b, APPLIED_LOG_ID_KEY)).transpose()?.flatten();
    let last_membership: StoredMembership =
        read(MEMBERSHIP)?.map(|b| decode(&b, MEMBERSHIP)).transpose()?.unwrap_or_default();
    Ok(SnapshotMeta { last_log_id, last_membership })
}

fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(l) => format!("{}-{}.snap", l.leader_id.term, l.index),
        None => "0-0.snap".to_owned(),
    }
}

/// A reader or writer that MACs every byte through it: a snapshot's MAC covers the file from its
/// magic to the end-of-records marker.
struct Maced<T> {
    inner: T,
    mac: blake3::Hasher,
}

impl<T> Maced<T> {
    /// Under the key of a ledger secret; without one (openraft's storage suite), a plain hash,
    /// which still catches damage.
    fn new(inner: T, sealer: Option<&Sealer>) -> Maced<T> {
        let mac = sealer.map_or_else(blake3::Hasher::new, |s| s.snapshot_mac());
        Maced { inner, mac }
    }

    fn tag(&self) -> [u8; 32] {
        *self.mac.finalize().as_bytes()
    }
}

impl<W: Write> Write for Maced<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.mac.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Maced<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.mac.update(&buf[..n]);
        Ok(n)
    }
}

/// Ends a snapshot: the end-of-records marker, then the MAC of everything up to it.
fn write_end<W: Write>(mut out: Maced<W>) -> io::Result<W> {
    out.write_all(&END_OF_RECORDS.to_le_bytes())?;
    let tag = out.tag();
    let mut inner = out.inner;
    inner.write_all(&tag)?;
    Ok(inner)
}

/// After [`read_record`] has met the end-of-records marker: checks the MAC that follows it.
fn check_end<R: Read>(mut input: Maced<R>, path: &Path) -> io::Result<()> {
    let expected = input.tag();
    let mut tag = [0u8; 32];
    input.inner.read_exact(&mut tag)?;
    let mut rest = [0u8; 1];
    if tag != expected || input.inner.read(&mut rest)? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "snapshot {}: its MAC does not verify under this service's ledger secret: it was altered, cut, \
                 extended or made by a node without the secret; nothing of it was installed",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn write_record(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u32).to_le_bytes())?;
    out.write_all(bytes)
}

/// Reads one length-prefixed record; `None` at the end-of-records marker.
fn read_record(input: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a snapshot ends before its MAC"));
        }
        Err(e) => return Err(e),
    }
    if u32::from_le_bytes(len) == END_OF_RECORDS {
        return Ok(None);
    }
    let len = u32::from_le_bytes(len) as usize;
    // The length comes from a file (or a peer's transfer): checked before anything is allocated.
    if len > SNAPSHOT_RECORD_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a snapshot record claims {len} bytes; at most {SNAPSHOT_RECORD_BYTES_MAX} (SNAPSHOT_RECORD_BYTES_MAX)"
            ),
        ));
    }
    // Grown as bytes arrive, not reserved at the claimed length: a short file costs what it holds.
    let mut buf = Vec::new();
    (&mut *input).take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a snapshot record is cut short"));
    }
    Ok(Some(buf))
}

fn write_head(out: &mut impl Write, secret_version: u64, meta: &SnapshotMeta) -> io::Result<()> {
    out.write_all(SNAPSHOT_MAGIC)?;
    out.write_all(&secret_version.to_le_bytes())?;
    write_record(out, &encode(meta))
}

/// Reads the magic and the ledger secret version a snapshot is sealed under.
fn read_magic(input: &mut impl Read, path: &Path) -> io::Result<u64> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic)?;
    if &magic != SNAPSHOT_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a Cloister snapshot of this version", path.display()),
        ));
    }
    let mut version = [0u8; 8];
    input.read_exact(&mut version)?;
    Ok(u64::from_le_bytes(version))
}

fn read_head_from(input: &mut impl Read) -> io::Result<SnapshotMeta> {
    let head =
        read_record(input)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "snapshot lacks its head"))?;
    decode(&head, "snapshot metadata")
}

fn invalid_snapshot(path: &Path, message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot {}: {message}", path.display()))
}

/// A snapshot's first records, after the magic: its metadata, the term history (encoded) and the
/// ledger's start.
/// Why a snapshot whose message carries other metadata than its file is refused. The file's
/// head is under its MAC, the message's is not: a peer could send a genuine file with a
/// membership of its choosing, which the install recorded and openraft adopted.
const METADATA_MISMATCH: &str = "the metadata sent with it (its last entry and membership) is not the file's own";

fn read_preamble(input: &mut impl Read, path: &Path) -> io::Result<(SnapshotMeta, Vec<u8>, StartState)> {
    let head = read_head_from(input)?;
    let history = read_record(input)?.ok_or_else(|| invalid_snapshot(path, "the term history is missing"))?;
    let start = read_record(input)?.ok_or_else(|| invalid_snapshot(path, "the ledger start is missing"))?;
    Ok((head, history, decode(&start, "a ledger start")?))
}

fn read_head(path: &Path) -> io::Result<SnapshotMeta> {
    let mut input = BufReader::new(std::fs::File::open(path)?);
    read_magic(&mut input, path)?;
    read_head_from(&mut input)
}

type Responder = openraft::storage::ApplyResponder<TypeConfig>;

/// The bytes of writes (public and sealed) `batch` carries, if it holds app transactions only.
fn app_bytes(batch: &[EntryResponder<TypeConfig>]) -> Option<usize> {
    batch.iter().try_fold(0, |bytes, (entry, _)| match &entry.payload {
        EntryPayload::Normal(tx) if tx.kind == TxKind::App => {
            Some(bytes + tx.public.bytes() + tx.private.as_ref().map_or(0, Vec::len))
        }
        _ => None,
    })
}

/// Whether `entry` writes a `gov.` map in clear, where every such write is.
fn writes_gov(entry: &crate::types::Entry) -> bool {
    let EntryPayload::Normal(tx) = &entry.payload else { return false };
    tx.public.iter().any(|(map, ..)| map.starts_with(cloister_abi::abi::GOV_PREFIX))
}

impl StateMachine {
    /// Waits until this node's log is durable through `batch`. An entry can commit before this
    /// node's own sync is done (a majority of the others holds it); applying it then could make a
    /// state durable, or serve one, that this node's log loses in a crash. The leader's sync
    /// starts as it replicates, so it has normally finished by the time the commit comes.
    async fn wait_log_durable(&self, batch: &[EntryResponder<TypeConfig>]) -> io::Result<()> {
        let (Some(durable), Some((last, _))) = (&self.inner.log_durable, batch.last()) else {
            return Ok(());
        };
        let last = last.index();
        if *durable.borrow() > last {
            return Ok(());
        }
        let mut durable = durable.clone();
        durable.wait_for(|&d| d > last).await.map(|_| ()).map_err(|_| io_other("the raft log has closed"))
    }

    /// Whether `batch` is cheap enough to apply right here, on the tokio worker running the
    /// state machine's task: a few app transactions with small write sets, and no durable commit
    /// due. Handing a batch to the blocking pool wakes one of its threads and, when it is done,
    /// a worker again; at one client that is the size of most batches, and the two hand-offs
    /// cost more than applying one entry (a non-durable redb commit and a ledger file write,
    /// tens of µs). Signature entries (a P-384 verification each), governance and membership
    /// changes, large write sets and the periodic durable commit (an `fdatasync` of the ledger
    /// files and of the state database) keep going to the blocking pool, and so does the batch
    /// that first indexes a private map a scan asked for (reading its keys back from the sealed
    /// entries: see `cloister_store`). A snapshot point or a snapshot file's build holds the
    /// state database's write transaction while it syncs: an inline apply that meets it waits
    /// for that sync on the worker, once per snapshot.
    ///
    /// A group of held-back entries ([`StateMachine::defers`]) applies inline up to
    /// [`APPLY_DEFER_ENTRIES_MAX`] entries (`entries_max`), under the same byte limit.
    fn applies_inline(&self, batch: &[EntryResponder<TypeConfig>], entries_max: usize) -> bool {
        batch.len() <= entries_max
            && !self.durable_commit_due()
            && app_bytes(batch).is_some_and(|b| b <= APPLY_INLINE_BYTES_MAX)
    }

    /// Whether the next apply should make the applied state durable, or first index a map a
    /// scan asked for: both are work for the blocking pool.
    fn durable_commit_due(&self) -> bool {
        self.inner.durable_at.lock().expect("durability clock lock").elapsed() >= self.inner.pacing.durable_every
            || self.inner.store.index_wanted()
    }

    /// Whether a node holds `batch` back, after the entries `held` holds already, to apply them
    /// together. At one client every batch is a single entry, and most of applying it is paid
    /// per batch: the state database's commit, opening the ledger's tables, the term and
    /// applied-id rows, the hand-offs between tasks. Only app transactions are held, none
    /// writing a `gov.` map (peer standings and identities follow those at once; governance
    /// writes are answered once applied), up to [`APPLY_DEFER_ENTRIES_MAX`] entries and
    /// [`APPLY_INLINE_BYTES_MAX`] bytes, not when a durable commit is due, and not while a
    /// reader waits for an entry to apply ([`StateMachine::hold_nothing`]). On the leader an
    /// app write is answered at commit; its writer runs later writes over it until it applies,
    /// as it does while any write is unapplied.
    ///
    /// openraft counts an entry applied when `apply` returns, so a held entry is applied
    /// before anything observes the state it belongs to: before the next entry that is not
    /// held, a snapshot point or install, openraft reading the applied state, the node
    /// stopping, and every read of the state through the API ([`StateMachine::apply_held`]);
    /// and after at most `raft.apply_hold_ms` in any case (0 holds nothing). A crash loses
    /// nothing: a held entry is in this node's durable log, and the applied id in the state
    /// database is older than it, so openraft applies it again at restart. What watches the
    /// state without such a read is at most that much behind Raft's applied index: the ledger
    /// files, the batch metrics, the signer, the snapshot scheduler.
    fn defers(&self, held: &Held, batch: &[EntryResponder<TypeConfig>]) -> bool {
        if self.inner.pacing.hold_for.is_zero()
            || self.inner.readers_waiting.load(Ordering::Acquire) > 0
            || held.entries.len() + batch.len() > APPLY_DEFER_ENTRIES_MAX
            || batch.iter().any(|(entry, _)| writes_gov(entry))
            || self.durable_commit_due()
        {
            return false;
        }
        app_bytes(batch).is_some_and(|b| held.bytes + b <= APPLY_INLINE_BYTES_MAX)
    }

    /// Holds `batch` back; the first entries of a group set its timer.
    fn hold(&self, held: &mut Held, batch: Vec<EntryResponder<TypeConfig>>) {
        held.bytes += app_bytes(&batch).unwrap_or(0);
        self.inner.unpublished.fetch_add(batch.len(), Ordering::AcqRel);
        let first = held.entries.is_empty();
        held.entries.extend(batch);
        if !first {
            return;
        }
        held.group += 1;
        let group = held.group;
        // Weak: a timer keeps neither the state machine nor its databases open.
        let inner = Arc::downgrade(&self.inner);
        let hold_for = self.inner.pacing.hold_for;
        let stopped = held.stopped.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(hold_for).await;
            if stopped.load(Ordering::Acquire) {
                return;
            }
            let Some(inner) = inner.upgrade() else { return };
            let sm = StateMachine { inner };
            let mut held = sm.inner.held.lock().await;
            if held.group == group
                && let Err(e) = sm.apply_held_then(&mut held, Vec::new()).await
            {
                tracing::error!(error = %e, "applying held-back entries failed: this node stops applying");
            }
        });
        held.timer = Some(timer.abort_handle());
    }

    /// While the guard lives nothing is held back: a reader waiting for an entry to apply does
    /// not wait out a group's timer. Take it, then [`StateMachine::apply_held`], then wait.
    pub(crate) fn hold_nothing(&self) -> HoldNothing {
        self.inner.readers_waiting.fetch_add(1, Ordering::AcqRel);
        HoldNothing(self.inner.clone())
    }

    /// Applies the entries held back, if any, so that the state includes everything openraft
    /// has counted applied. With nothing held it returns at once, without the group's lock
    /// (which an apply holds through a durable commit, and an install through its whole run).
    ///
    /// The apply runs on its own task: a caller may give up (a reader's patience, a client that
    /// went away), and the group, once taken from [`Held`], must still be applied, published
    /// and answered, with the lock held until it is.
    pub(crate) async fn apply_held(&self) -> io::Result<()> {
        if self.inner.unpublished.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let sm = self.clone();
        tokio::spawn(async move {
            let mut held = sm.inner.held.lock().await;
            sm.apply_held_then(&mut held, Vec::new()).await
        })
        .await
        .map_err(io_other)?
    }

    /// Whether applying committed entries failed on this node. openraft stops at its next
    /// apply; until then a held group that failed to apply has dropped its writes' responders,
    /// and a leader must not execute new writes over a state that lacks them.
    pub(crate) fn apply_failed(&self) -> bool {
        self.inner.apply_failed.load(Ordering::Acquire)
    }

    /// [`StateMachine::apply_held`], for a node that stops: no timer applies anything after.
    pub(crate) async fn apply_held_and_stop(&self) -> io::Result<()> {
        let mut held = self.inner.held.lock().await;
        held.stopped.store(true, Ordering::Release);
        if let Some(timer) = held.timer.take() {
            timer.abort();
        }
        self.apply_held_then(&mut held, Vec::new()).await
    }

    /// Applies the entries `held` holds, then `batch`, as one batch, and answers `batch`'s
    /// responders. A failure is remembered in `held`.
    async fn apply_held_then(&self, held: &mut Held, batch: Vec<EntryResponder<TypeConfig>>) -> io::Result<()> {
        held.check()?;
        let taken = held.entries.len();
        let (entries_max, batch) = if held.entries.is_empty() {
            (APPLY_INLINE_ENTRIES_MAX, batch)
        } else {
            held.bytes = 0;
            let mut all = std::mem::take(&mut held.entries);
            all.extend(batch);
            (APPLY_DEFER_ENTRIES_MAX, all)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let applied = if self.applies_inline(&batch, entries_max) {
            self.apply_entries(batch, false)
        } else {
            let sm = self.clone();
            tokio::task::spawn_blocking(move || sm.apply_entries(batch, true)).await.map_err(io_other).flatten()
        };
        let (last, gov_touched, responders) = applied.inspect_err(|e| {
            held.failed = Some(e.to_string());
            self.inner.apply_failed.store(true, Ordering::Release);
        })?;
        self.publish(last, gov_touched);
        self.inner.unpublished.fetch_sub(taken, Ordering::AcqRel);
        for responder in responders {
            responder.send(());
        }
        Ok(())
    }

    /// Applies `batch`: the last log id applied, whether a `gov.` map changed, and the
    /// responders to answer once the result is published.
    fn apply_entries(
        &self,
        batch: Vec<EntryResponder<TypeConfig>>,
        may_sync: bool,
    ) -> io::Result<(Option<LogId>, bool, Vec<Responder>)> {
        let rows: Vec<_> = batch
            .iter()
            .map(|(entry, _)| {
                let payload = match &entry.payload {
                    EntryPayload::Normal(tx) => Payload::Tx(tx.clone()),
                    EntryPayload::Membership(m) => Payload::Membership(encode(m)),
                    EntryPayload::Blank => Payload::Blank,
                };
                let m = entry.get_membership().map(|m| StoredMembership::new(Some(entry.log_id()), m));
                (entry.log_id(), payload, m)
            })
            .collect();
        let gov_touched = self.apply_batch(&rows, may_sync).inspect_err(|_| {
            // Before the batch, and with it its responders, is dropped: a leader's writer that
            // sees its writes fail then sees this too.
            self.inner.apply_failed.store(true, Ordering::Release);
        })?;
        let last = rows.last().map(|(l, ..)| *l);
        Ok((last, gov_touched, batch.into_iter().filter_map(|(_, r)| r).collect()))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    /// A snapshot point (see the module's documentation): openraft keeps only its metadata, and
    /// asks [`RaftStateMachine::get_current_snapshot`] for a file to send.
    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, SnapshotFile>> {
        // The point covers what the state database holds; held-back entries would only make it
        // shorter than openraft expects.
        self.apply_held().await?;
        let sm = self.clone();
        let point = tokio::task::spawn_blocking(move || sm.take_point()).await.map_err(io_other)??;
        self.inner.counts.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let file = self.unbuilt_file(&point.meta);
        Ok(Snapshot { meta: point.meta, snapshot: file })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        self.apply_held().await?;
        let applied = self.meta::<Option<LogId>>(APPLIED_LOG_ID_KEY)?.flatten();
        let membership = self.meta(MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<S>(&mut self, mut entries: S) -> io::Result<()>
    where
        S: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + Send,
    {
        let mut pending = Vec::new();
        loop {
            let next = entries.try_next().await?;
            let end = next.is_none();
            if let Some(item) = next {
                pending.push(item);
            }
            if pending.len() >= APPLY_BATCH_MAX || (end && !pending.is_empty()) {
                let batch = std::mem::take(&mut pending);
                self.wait_log_durable(&batch).await?;
                let mut held = self.inner.held.lock().await;
                held.check()?;
                if self.defers(&held, &batch) {
                    self.hold(&mut held, batch);
                } else {
                    self.apply_held_then(&mut held, batch).await?;
                }
            }
            if end {
                return Ok(());
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotFile) -> io::Result<()> {
        // Held-back entries apply first, and nothing applies while the state is replaced.
        let mut held = self.inner.held.lock().await;
        self.apply_held_then(&mut held, Vec::new()).await?;
        let sm = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || sm.install(&meta, &snapshot)).await.map_err(io_other)??;
        self.inner.counts.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The newest snapshot, asked for at start (for its metadata) and to be sent. Once Raft
    /// runs, its file is built when asked for if the one there is older than the newest point;
    /// a build longer than [`SNAPSHOT_FILE_WAIT`] goes on in the background, and the snapshot is
    /// answered with the point's metadata and no file yet.
    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>> {
        let Some(newest) = self.inner.snapshots.lock().expect("snapshot lock").newest() else { return Ok(None) };
        let Some((meta, mut file)) = self.file_when_built().await else {
            return Ok(Some(Snapshot { snapshot: self.unbuilt_file(&newest.meta), meta: newest.meta }));
        };
        // It is asked for to be sent: it goes with the seal of its position once a signature
        // reaches it. A file replaced meanwhile is no storage failure: the sender finds no seal
        // and retries.
        file.seal = self.seal(&file.path).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "sealing the current snapshot failed; it is not sent yet");
            None
        });
        Ok(Some(Snapshot { meta, snapshot: file }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cloister_ledger::entry::TxEntry;

    use super::*;
    use crate::types::Entry;

    cloister_test_support::proptest::proptest! {
        #![proptest_config(cloister_test_support::config())]

        /// Any bytes as a snapshot's record stream: records are read until one is refused, never
        /// a panic, never an allocation beyond the record limit.
        #[test]
        fn any_snapshot_record_stream_is_read_or_refused(bytes in cloister_test_support::proptest::collection::vec(cloister_test_support::proptest::prelude::any::<u8>(), 0..4096)) {
            let mut input = std::io::Cursor::new(bytes.clone());
            let (_, largest) = cloister_test_support::largest_allocation(|| {
                while let Ok(Some(_)) = read_record(&mut input) {}
            });
            cloister_test_support::proptest::prop_assert!(largest <= 4 * bytes.len() + 1024, "allocated {} bytes", largest);
        }
    }

    #[test]
    fn a_snapshot_record_longer_than_its_limit_is_refused_before_allocation() {
        let mut claims_4_gib = std::io::Cursor::new([0xfe, 0xff, 0xff, 0xff, 1, 2, 3]);
        let err = read_record(&mut claims_4_gib).unwrap_err();
        assert!(err.to_string().contains("SNAPSHOT_RECORD_BYTES_MAX"), "{err}");
        let mut at_limit = (SNAPSHOT_RECORD_BYTES_MAX as u32).to_le_bytes().to_vec();
        at_limit.extend(std::iter::repeat_n(7u8, SNAPSHOT_RECORD_BYTES_MAX));
        assert_eq!(
            read_record(&mut std::io::Cursor::new(at_limit)).unwrap().map(|r| r.len()),
            Some(SNAPSHOT_RECORD_BYTES_MAX)
        );
        assert_eq!(read_record(&mut std::io::Cursor::new(END_OF_RECORDS.to_le_bytes())).unwrap(), None, "the end");
        let err = read_record(&mut std::io::Cursor::new([])).unwrap_err();
        assert!(err.to_string().contains("before its MAC"), "a file cut at a record boundary: {err}");
    }

    /// A node of the service with a sealed store holding `entries`, and its snapshot.
    fn node_with(secret: [u8; 32], entries: &[(&str, &str, &str)]) -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Arc::new(LedgerSecrets::first(secret));
        // Each node's own state key: snapshots never depend on it.
        let state_key = Arc::new(cloister_crypto::seal::Sealer::new(&cloister_crypto::seal::Sealer::generate_secret()));
        let store = Store::open_sealed(&dir.path().join("state.redb"), state_key).unwrap();
        let mut tx = store.begin().unwrap();
        for (map, k, v) in entries {
            tx.put(map, k.as_bytes(), v.as_bytes());
        }
        store.apply(&tx.into_writes()).unwrap();
        let sm = StateMachine::without_ledger(store, Some(secrets), dir.path().join("snapshots")).unwrap();
        (dir, sm)
    }

    fn contents(sm: &StateMachine, map: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        let tx = sm.inner.store.begin().unwrap();
        let mut out = Vec::new();
        let mut lower = std::ops::Bound::Unbounded;
        while let Some((k, v)) =
            tx.first_in(map, lower.as_ref().map(Vec::as_slice), std::ops::Bound::Unbounded).unwrap()
        {
            lower = std::ops::Bound::Excluded(k.clone());
            out.push((k, v));
        }
        out
    }

    fn app_entry(index: u64, kind: TxKind, bytes: usize) -> EntryResponder<TypeConfig> {
        let tx = TxEntry {
            uid: [0; 16],
            kind,
            public: Default::default(),
            private: Some(vec![7; bytes]),
            claims_digest: None,
            signature: None,
        };
        (Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 0, index), tx), None)
    }

    /// A few small app transactions apply on the state machine's own task; a batch with more
    /// of them, larger ones, any other kind of entry, or the durable commit due goes to the
    /// blocking pool.
    #[test]
    fn only_a_few_small_app_transactions_apply_inline() {
        let (_dir, sm) = node_with([1; 32], &[("app/m", "k", "v")]);
        let batch = |n: u64, kind| (1..=n).map(|i| app_entry(i, kind, 100)).collect::<Vec<_>>();
        let max = APPLY_INLINE_ENTRIES_MAX as u64;
        assert!(sm.applies_inline(&batch(1, TxKind::App), APPLY_INLINE_ENTRIES_MAX));
        assert!(sm.applies_inline(&batch(max, TxKind::App), APPLY_INLINE_ENTRIES_MAX));
        assert!(!sm.applies_inline(&batch(max + 1, TxKind::App), APPLY_INLINE_ENTRIES_MAX));
        for kind in [TxKind::Gov, TxKind::Signature, TxKind::Genesis] {
            assert!(!sm.applies_inline(&batch(1, kind), APPLY_INLINE_ENTRIES_MAX), "{kind:?}");
        }
        let blank = (Entry::new_blank(openraft::testing::log_id::<TypeConfig>(1, 0, 1)), None);
        assert!(!sm.applies_inline(&[blank], APPLY_INLINE_ENTRIES_MAX));
        assert!(sm.applies_inline(&[app_entry(1, TxKind::App, APPLY_INLINE_BYTES_MAX)], APPLY_INLINE_ENTRIES_MAX));
        assert!(!sm.applies_inline(&[app_entry(1, TxKind::App, APPLY_INLINE_BYTES_MAX + 1)], APPLY_INLINE_ENTRIES_MAX));
        // A scan met a running write: the next batch indexes its map first.
        let open = sm.inner.store.write_batch().unwrap();
        assert_eq!(contents(&sm, "app/m").len(), 1);
        drop(open);
        assert!(!sm.applies_inline(&batch(1, TxKind::App), APPLY_INLINE_ENTRIES_MAX), "a map is to be indexed");
        sm.inner.store.write_batch().unwrap().commit().unwrap();
        assert!(sm.applies_inline(&batch(1, TxKind::App), APPLY_INLINE_ENTRIES_MAX));
        let due = std::time::Instant::now().checked_sub(sm.inner.pacing.durable_every).unwrap();
        *sm.inner.durable_at.lock().unwrap() = due;
        assert!(!sm.applies_inline(&batch(1, TxKind::App), APPLY_INLINE_ENTRIES_MAX), "the durable commit is due");
    }

    /// An app transaction at `index` writing key `k{index}` of `app/m`, as a follower is sent it
    /// (no responder).
    fn app_write(index: u64) -> io::Result<EntryResponder<TypeConfig>> {
        let mut ws = kv::WriteSet::default();
        ws.put("app/m", format!("k{index}").as_bytes(), b"v");
        let tx = TxEntry::new(TxKind::App, ws, None, &LedgerSecrets::first([1; 32]).current().1);
        Ok((Entry::new_normal(openraft::testing::log_id::<TypeConfig>(1, 0, index), tx), None))
    }

    /// Batches applied, and those of them that committed durably.
    fn counts(sm: &StateMachine) -> (u64, u64) {
        let c = &sm.inner.counts;
        (c.apply_batches.load(Ordering::Relaxed), c.durable_commits.load(Ordering::Relaxed))
    }

    /// The last index the state database says it has applied.
    async fn applied_index(sm: &mut StateMachine) -> Option<u64> {
        sm.applied_state().await.unwrap().0.map(|l| l.index)
    }

    /// Small batches apply inline without a durable commit until `raft.apply_durable_ms` has
    /// passed; the next one then goes to the blocking pool and makes everything applied so far
    /// durable, and is not held back for it.
    #[tokio::test]
    async fn small_batches_still_commit_durably_every_interval() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        let durable_at = |sm: &StateMachine| *sm.inner.durable_at.lock().unwrap();
        let before = durable_at(&sm);
        sm.apply(futures::stream::iter([app_write(1)])).await.unwrap();
        sm.apply_held().await.unwrap();
        assert_eq!(durable_at(&sm), before, "applied inline, with no durable commit");
        assert_eq!(counts(&sm), (1, 0));
        let due = before.checked_sub(sm.inner.pacing.durable_every).unwrap();
        *sm.inner.durable_at.lock().unwrap() = due;
        sm.apply(futures::stream::iter([app_write(2)])).await.unwrap();
        assert!(durable_at(&sm) > before, "the batch after the interval committed durably");
        assert_eq!(counts(&sm), (2, 1));
        assert_eq!(contents(&sm, "app/m").len(), 2);
    }

    /// A node holds single app entries back up to `APPLY_DEFER_ENTRIES_MAX` and applies
    /// them in one batch with the next: nothing of them is in the state, or published, until
    /// then; openraft reading the applied state applies them first.
    #[tokio::test]
    async fn app_entries_apply_in_groups_up_to_the_limit() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        let max = APPLY_DEFER_ENTRIES_MAX as u64;
        for i in 1..=max {
            sm.apply(futures::stream::iter([app_write(i)])).await.unwrap();
        }
        assert_eq!(counts(&sm), (0, 0), "{max} entries held");
        assert!(contents(&sm, "app/m").is_empty());
        assert_eq!(sm.subscribe().borrow().last, None, "nothing published");
        sm.apply(futures::stream::iter([app_write(max + 1)])).await.unwrap();
        assert_eq!(counts(&sm), (1, 0), "one more than the limit: all of them in one batch");
        assert_eq!(contents(&sm, "app/m").len(), max as usize + 1);
        assert_eq!(sm.subscribe().borrow().last.map(|t| t.seqno), Some(max + 1));

        sm.apply(futures::stream::iter([app_write(max + 2), app_write(max + 3)])).await.unwrap();
        assert_eq!(counts(&sm), (1, 0));
        assert_eq!(applied_index(&mut sm).await, Some(max + 3), "reading the applied state applies them");
        assert_eq!(counts(&sm), (2, 0));

        sm.apply(futures::stream::iter([app_write(max + 4)])).await.unwrap();
        sm.apply_held_and_stop().await.unwrap();
        assert_eq!(counts(&sm), (3, 0), "a node that stops applies what it holds");
        assert_eq!(contents(&sm, "app/m").len(), max as usize + 4);
    }

    /// Whatever is not an app entry to hold applies at once, after what is held and in the same
    /// batch: a blank entry (a new leader's), a governance write, an app entry writing a `gov.`
    /// map, one larger than the byte limit; and nothing is held while a reader waits.
    #[tokio::test]
    async fn other_entries_apply_at_once_after_the_held_ones() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        let held = |sm: &StateMachine| sm.inner.held.try_lock().unwrap().entries.len();
        sm.apply(futures::stream::iter([app_write(1)])).await.unwrap();
        assert_eq!(held(&sm), 1);
        let blank = Entry::new_blank(openraft::testing::log_id::<TypeConfig>(1, 0, 2));
        sm.apply(futures::stream::iter([Ok((blank, None))])).await.unwrap();
        assert_eq!((held(&sm), counts(&sm).0), (0, 1), "one batch: the held entry, then the blank");
        assert_eq!(contents(&sm, "app/m").len(), 1);
        assert_eq!(applied_index(&mut sm).await, Some(2));

        let mut gov = kv::WriteSet::default();
        gov.put("gov.nodes", b"n", b"{}");
        let sealer = LedgerSecrets::first([1; 32]).current().1;
        let tx = |index, kind, ws: &kv::WriteSet| {
            (
                Entry::new_normal(
                    openraft::testing::log_id::<TypeConfig>(1, 0, index),
                    TxEntry::new(kind, ws.clone(), None, &sealer),
                ),
                None,
            )
        };
        let none = Default::default();
        assert!(!sm.defers(&Held::default(), &[tx(3, TxKind::Gov, &none)]), "a governance transaction");
        assert!(!sm.defers(&Held::default(), &[tx(3, TxKind::App, &gov)]), "an app transaction writing gov.nodes");
        assert!(!sm.defers(&Held::default(), &[app_entry(3, TxKind::App, APPLY_INLINE_BYTES_MAX + 1)]), "too large");
        assert!(sm.defers(&Held::default(), &[app_entry(3, TxKind::App, APPLY_INLINE_BYTES_MAX)]));
        let full = Held { bytes: 1, ..Held::default() };
        assert!(!sm.defers(&full, &[app_entry(3, TxKind::App, APPLY_INLINE_BYTES_MAX)]), "the group's bytes count");
        let waiting = sm.hold_nothing();
        assert!(!sm.defers(&Held::default(), &[app_entry(3, TxKind::App, 10)]), "a reader waits");
        drop(waiting);
        assert!(sm.defers(&Held::default(), &[app_entry(3, TxKind::App, 10)]));
        let due = std::time::Instant::now().checked_sub(sm.inner.pacing.durable_every).unwrap();
        *sm.inner.durable_at.lock().unwrap() = due;
        assert!(!sm.defers(&Held::default(), &[app_entry(3, TxKind::App, 10)]), "a durable commit is due");
    }

    /// A held entry applies by itself after `raft.apply_hold_ms` when nothing else comes.
    #[tokio::test]
    async fn a_held_entry_applies_on_its_own_within_the_age_limit() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        let mut applied = sm.subscribe();
        let start = std::time::Instant::now();
        sm.apply(futures::stream::iter([app_write(1)])).await.unwrap();
        assert!(contents(&sm, "app/m").is_empty());
        tokio::time::timeout(std::time::Duration::from_secs(10), applied.wait_for(|a| a.last.is_some()))
            .await
            .unwrap()
            .unwrap();
        let waited = start.elapsed();
        assert!(waited >= sm.inner.pacing.hold_for, "applied after {waited:?}, before its time");
        assert_eq!(contents(&sm, "app/m").len(), 1);
        assert_eq!(counts(&sm), (1, 0));
    }

    /// A state machine over a new node's store and folder, paced by `pacing`.
    fn node_paced(pacing: ApplyPacing) -> (tempfile::TempDir, StateMachine) {
        let (dir, node) = node_with([1; 32], &[]);
        let secrets = Arc::new(LedgerSecrets::first([1; 32]));
        let store = node.inner.store.clone();
        let sm = StateMachine::with(store, None, Some(secrets), dir.path().join("snapshots"), None, pacing).unwrap();
        (dir, sm)
    }

    /// `raft.apply_hold_ms = 0` holds nothing: each batch applies as it comes.
    #[tokio::test]
    async fn with_no_hold_each_batch_applies_as_it_comes() {
        let (_dir, mut sm) = node_paced(ApplyPacing { hold_for: Duration::ZERO, ..ApplyPacing::default() });
        for i in 1..=3 {
            sm.apply(futures::stream::iter([app_write(i)])).await.unwrap();
            assert_eq!(counts(&sm), (i, 0));
            assert_eq!(contents(&sm, "app/m").len(), i as usize);
        }
    }

    /// `raft.apply_durable_ms = 0` makes every apply durable: nothing is held back, and each
    /// batch commits durably.
    #[tokio::test]
    async fn with_no_durable_interval_every_apply_is_durable() {
        let (_dir, mut sm) = node_paced(ApplyPacing { durable_every: Duration::ZERO, ..ApplyPacing::default() });
        for i in 1..=3 {
            sm.apply(futures::stream::iter([app_write(i)])).await.unwrap();
            assert_eq!(counts(&sm), (i, i), "batch {i} applied at once and durably");
            assert_eq!(contents(&sm, "app/m").len(), i as usize);
        }
    }

    /// At the longest `raft.apply_durable_ms` no apply commits durably, and a snapshot point
    /// still does (openraft purges the log behind it), as does a snapshot file's build.
    #[tokio::test]
    async fn with_the_longest_durable_interval_a_snapshot_still_commits_durably() {
        let pacing = ApplyPacing { hold_for: Duration::ZERO, durable_every: Duration::from_millis(u64::MAX) };
        let (_dir, mut sm) = node_paced(pacing);
        for i in 1..=3 {
            sm.apply(futures::stream::iter([app_write(i)])).await.unwrap();
        }
        assert_eq!(counts(&sm), (3, 0), "three batches, none durable");
        sm.build_snapshot().await.unwrap();
        assert_eq!(counts(&sm), (3, 1), "the point committed everything applied durably");
        sm.apply(futures::stream::iter([app_write(4)])).await.unwrap();
        assert_eq!(counts(&sm), (4, 1));
        sm.build_file().unwrap();
        assert_eq!(counts(&sm), (4, 2), "the file's build committed everything applied durably first");
    }

    /// The `.snap` files in a node's snapshot folder.
    fn snapshot_files(sm: &StateMachine) -> Vec<PathBuf> {
        let dir = std::fs::read_dir(&sm.inner.snapshot_dir).unwrap();
        dir.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "snap")).collect()
    }

    /// Asks for the snapshot to send until its file is built and the build has ended (the file
    /// is published a moment before the build's task counts it and ends), as openraft's
    /// retries do.
    async fn file_once_built(sm: &mut StateMachine) -> SnapshotOf<TypeConfig, SnapshotFile> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let s = sm.get_current_snapshot().await.unwrap().unwrap();
                if s.snapshot.path.exists() && sm.inner.snapshots.lock().unwrap().building.is_none() {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the build ends once the write transaction does")
    }

    fn files_built(sm: &StateMachine) -> u64 {
        sm.inner.counts.snapshot_files_built.load(Ordering::Relaxed)
    }

    /// A snapshot openraft takes to compact its log is a point: a durable commit that records
    /// its position, with no file; a restart reads it back, and openraft's start, which asks for
    /// the current snapshot, gets the point without a file being built. A file is built only
    /// when a snapshot is asked for to be sent, from the state as it then is; asked again, the
    /// same file goes; it installs whole on another node; and a newer point makes the next
    /// request build anew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_point_writes_no_file_and_a_file_is_built_to_be_sent() {
        let log_id = |index| openraft::testing::log_id::<TypeConfig>(2, 0, index);
        let rows = [("app/m", "PARTY1", "v1"), ("app/m", "PARTY2", "v2"), ("app/public:t", "k", "open")];
        let (dir, mut source) = node_with([1; 32], &rows);
        set_applied(&source, log_id(100));
        let point = source.build_snapshot().await.unwrap();
        assert_eq!(point.meta.last_log_id, Some(log_id(100)));
        assert_eq!(snapshot_files(&source), Vec::<PathBuf>::new(), "a point writes no file");
        assert_eq!(source.snapshot_extent(), (100, 3));
        let restarted = StateMachine::with(
            source.inner.store.clone(),
            None,
            Some(Arc::new(LedgerSecrets::first([1; 32]))),
            dir.path().join("snapshots"),
            None,
            ApplyPacing::default(),
        )
        .unwrap();
        assert_eq!(restarted.snapshot_extent(), (100, 3), "a restart reads the point back");
        // openraft's start asks for the current snapshot for its metadata: no file is built.
        let at_start = restarted.clone().get_current_snapshot().await.unwrap().expect("the point");
        assert_eq!(at_start.meta.last_log_id, Some(log_id(100)));
        assert!(at_start.snapshot.seal.is_none() && !at_start.snapshot.path.exists());
        assert_eq!((files_built(&restarted), snapshot_files(&restarted).len()), (0, 0), "nothing built at start");
        drop(restarted);

        set_applied(&source, log_id(120));
        let sent = source.get_current_snapshot().await.unwrap().expect("a snapshot to send");
        assert_eq!(sent.meta.last_log_id, Some(log_id(120)), "built from the state as it is");
        assert_eq!(snapshot_files(&source), std::slice::from_ref(&sent.snapshot.path));
        let again = source.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!((again.meta.last_log_id, again.snapshot.path), (sent.meta.last_log_id, sent.snapshot.path.clone()));
        assert_eq!(files_built(&source), 1, "asked again, the same file goes");

        let (_b, target) = node_with([1; 32], &[("app/m", "TARGETS OWN", "x")]);
        let path = target.incoming_path();
        std::fs::copy(&sent.snapshot.path, &path).unwrap();
        target.install(&sent.meta, &SnapshotFile { path, seal: None }).unwrap();
        assert_eq!(contents(&target, "app/m"), contents(&source, "app/m"));
        assert_eq!(contents(&target, "app/public:t"), [(b"k".to_vec(), b"open".to_vec())]);
        assert_eq!(target.snapshot_extent(), (120, 3), "the installed state is the target's point");

        set_applied(&source, log_id(150));
        source.build_snapshot().await.unwrap();
        let newer = source.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(newer.meta.last_log_id, Some(log_id(150)), "a file behind the newest point is built anew");
        assert_eq!(files_built(&source), 2);
        assert_eq!(snapshot_files(&source), [newer.snapshot.path], "the older file is gone");
    }

    /// The edge of [`SNAPSHOT_FILE_WAIT`]: a file whose build takes longer (here its durable
    /// commit waits behind a write transaction) is answered with the point and no file, so a
    /// send fails and openraft asks again; the build goes on, once, and a later request gets
    /// its file. openraft asks on the task that applies entries and retries a failed send ten
    /// times at once: only the request that starts the build waits for it, so a slow build
    /// stalls applying once, not once per retry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_file_slower_than_the_wait_goes_out_on_a_later_request() {
        let at = openraft::testing::log_id::<TypeConfig>(2, 0, 100);
        let (_dir, mut sm) = node_with([1; 32], &[("app/m", "PARTY1", "v1")]);
        set_applied(&sm, at);
        sm.build_snapshot().await.unwrap();
        let store = sm.inner.store.clone();
        let busy = store.write_batch().unwrap();
        let asked = std::time::Instant::now();
        let unbuilt = sm.get_current_snapshot().await.unwrap().expect("the point");
        assert!(asked.elapsed() >= SNAPSHOT_FILE_WAIT, "answered after {:?}", asked.elapsed());
        assert_eq!(unbuilt.meta.last_log_id, Some(at));
        assert!(unbuilt.snapshot.seal.is_none() && !unbuilt.snapshot.path.exists(), "no file to send yet");
        for retry in 0..10 {
            let asked = std::time::Instant::now();
            let unbuilt = sm.get_current_snapshot().await.unwrap().expect("the point");
            assert!(!unbuilt.snapshot.path.exists(), "retry {retry}: the build cannot end while the write does");
            assert!(asked.elapsed() < SNAPSHOT_FILE_WAIT, "retry {retry} waited {:?} for the build", asked.elapsed());
        }
        drop(busy);
        let sent = file_once_built(&mut sm).await;
        assert_eq!(sent.meta.last_log_id, Some(at));
        assert_eq!(files_built(&sm), 1, "one build, however often it was asked for");
    }

    /// No point is due while a file is being built to be sent: a point taken then would leave
    /// the file behind it, unsendable, and under load a build that outlasts the time between
    /// points would never send one. Once the build ends the point is due again, and the file,
    /// which reaches the newest point, goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_point_is_due_while_a_snapshot_file_is_being_built() {
        let settings = RaftSection { snapshot_after_logs: 10, snapshot_after_logs_max: 10, ..RaftSection::default() };
        let log_id = |index| openraft::testing::log_id::<TypeConfig>(2, 0, index);
        let (_dir, mut sm) = node_with([1; 32], &[("app/m", "PARTY1", "v1")]);
        set_applied(&sm, log_id(100));
        sm.build_snapshot().await.unwrap();
        assert!(!sm.point_due(109, 0, &settings, false), "9 entries since the point");
        assert!(sm.point_due(110, 0, &settings, false), "10 entries since the point");
        assert!(!sm.point_due(110, 105, &settings, false), "asked at 105");
        // While a node catches up through a snapshot: up to four intervals, and not beyond.
        assert!(!sm.point_due(139, 0, &settings, true), "39 entries since the point, a node catching up");
        assert!(sm.point_due(140, 0, &settings, true), "40 entries since the point, a node catching up");
        set_applied(&sm, log_id(130));
        let store = sm.inner.store.clone();
        let busy = store.write_batch().unwrap();
        let unbuilt = sm.get_current_snapshot().await.unwrap().expect("the point");
        assert_eq!(unbuilt.meta.last_log_id, Some(log_id(100)), "the point goes while the file is built");
        assert!(sm.inner.snapshots.lock().unwrap().building.is_some(), "the build waits for the write");
        assert!(!sm.point_due(1_000, 0, &settings, false), "no point while the file is built");
        drop(busy);
        let sent = file_once_built(&mut sm).await;
        assert_eq!(sent.meta.last_log_id, Some(log_id(130)), "the file reaches past the newest point");
        assert!(sm.point_due(1_000, 0, &settings, false), "due again once the build ended");
    }

    /// A file build that ends while a snapshot is being installed waits until the installed
    /// file is the current one, and then drops itself: it does not delete the installed file
    /// (which would leave every later send failing to open it).
    #[test]
    fn a_file_build_ending_during_an_install_leaves_the_installed_file() {
        let log_id = |index| openraft::testing::log_id::<TypeConfig>(2, 0, index);
        let (_a, source) = node_with([1; 32], &[("app/m", "from-snapshot", "s")]);
        set_applied(&source, log_id(200));
        let newer = source.build_file().unwrap();
        let (_b, target) = node_with([1; 32], &[("app/m", "own", "t")]);
        set_applied(&target, log_id(50));
        let older = target.build_file().unwrap();
        let mut older = Some(StoredSnapshot { meta: older.meta, file: older.snapshot, records: 1 });
        let path = target.incoming_path();
        std::fs::copy(&newer.snapshot.path, &path).unwrap();
        let mut ending = None;
        target
            .install_stepwise(&newer.meta, &SnapshotFile { path, seal: None }, &mut |step| {
                if matches!(step, InstallStep::FileInPlace) {
                    let (builder, older) = (target.clone(), older.take().expect("one file in place"));
                    ending = Some(std::thread::spawn(move || builder.file_built(older)));
                    // Time for the build's end to run, if nothing holds it back.
                    std::thread::sleep(Duration::from_millis(300));
                }
                Ok(())
            })
            .unwrap();
        ending.expect("the install put its file in place").join().unwrap();
        let (meta, file) = target.inner.snapshots.lock().unwrap().file_to_send().expect("a file");
        assert_eq!(meta.last_log_id, Some(log_id(200)), "the installed file is the current one");
        assert!(file.path.exists(), "and it is on disk");
        assert_eq!(snapshot_files(&target), [file.path], "the older file is gone");
    }

    /// Installing a snapshot applies the held entries first and holds the lock throughout, so
    /// no timer applies them over the installed state.
    #[tokio::test]
    async fn a_snapshot_install_applies_the_held_entries_first() {
        let (_a, source) = node_with([1; 32], &[("app/m", "from-snapshot", "s")]);
        let snapshot = source.build_file().unwrap();
        let (_b, mut target) = node_with([1; 32], &[]);
        target.apply(futures::stream::iter([app_write(1)])).await.unwrap();
        let path = target.incoming_path();
        std::fs::copy(&snapshot.snapshot.path, &path).unwrap();
        target.install_snapshot(&snapshot.meta, SnapshotFile { path, seal: None }).await.unwrap();
        assert_eq!(counts(&target).0, 1, "the held entry applied before the install");
        tokio::time::sleep(target.inner.pacing.hold_for * 4).await;
        assert_eq!(contents(&target, "app/m"), contents(&source, "app/m"), "and not after it");
    }

    /// A reader that gives up while the held group applies on the blocking pool (a durable
    /// commit was due) does not cancel the apply: the group is applied and published all the
    /// same. (Cancelled, it had been taken from the group and then left applied in the state
    /// database but never published, and its writes' responders dropped.)
    #[tokio::test]
    async fn a_reader_that_gives_up_does_not_cancel_the_held_apply() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        sm.apply(futures::stream::iter([app_write(1)])).await.unwrap();
        assert_eq!(counts(&sm), (0, 0), "held");
        let due = std::time::Instant::now().checked_sub(sm.inner.pacing.durable_every).unwrap();
        *sm.inner.durable_at.lock().unwrap() = due;
        let gave_up = futures::FutureExt::now_or_never(sm.apply_held());
        assert!(gave_up.is_none(), "polled once, then dropped, with the apply under way");
        let mut applied = sm.subscribe();
        let published = applied.wait_for(|a| a.last.map(|t| t.seqno) == Some(1));
        tokio::time::timeout(std::time::Duration::from_secs(10), published)
            .await
            .expect("published although its reader gave up")
            .unwrap();
        assert_eq!(contents(&sm, "app/m").len(), 1);
        assert_eq!(counts(&sm), (1, 1), "one batch, with the durable commit");
        tokio::time::timeout(std::time::Duration::from_secs(10), sm.apply_held())
            .await
            .expect("nothing is left to apply")
            .unwrap();
    }

    /// A read waits for the group's lock only while something is held: an apply keeps the lock
    /// through a durable commit, and an install through its whole run.
    #[tokio::test]
    async fn a_read_waits_for_the_lock_only_while_entries_are_held() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        let short = std::time::Duration::from_millis(200);
        let busy = sm.inner.held.lock().await;
        tokio::time::timeout(short, sm.apply_held()).await.expect("nothing held: no wait").unwrap();
        drop(busy);
        sm.apply(futures::stream::iter([app_write(1)])).await.unwrap();
        let busy = sm.inner.held.lock().await;
        assert!(tokio::time::timeout(short, sm.apply_held()).await.is_err(), "held: the read waits");
        drop(busy);
        tokio::time::timeout(std::time::Duration::from_secs(10), sm.apply_held()).await.unwrap().unwrap();
        assert_eq!(contents(&sm, "app/m").len(), 1);
    }

    /// A held group that fails to apply marks the state machine failed (a leader's writer stops
    /// executing over it), and every later read meets the failure instead of reading past it.
    #[tokio::test]
    async fn a_held_group_that_fails_to_apply_is_remembered() {
        let (_dir, mut sm) = node_with([1; 32], &[]);
        // Private bytes no ledger secret opens.
        sm.apply(futures::stream::iter([Ok(app_entry(1, TxKind::App, 10))])).await.unwrap();
        assert!(!sm.apply_failed(), "held, not yet applied");
        assert!(sm.apply_held().await.is_err());
        assert!(sm.apply_failed());
        assert!(sm.apply_held().await.is_err(), "a later read fails the same way");
        assert!(sm.apply(futures::stream::iter([app_write(2)])).await.is_err(), "and so does the next apply");
    }

    /// Snapshot records and chunk entries encode their bytes as byte strings: the same bytes as
    /// the sequences of `u8` that earlier snapshot files hold, so those install as before.
    #[test]
    fn snapshot_records_encode_as_before() {
        #[derive(Serialize)]
        enum Before {
            Public(Vec<u8>, Vec<u8>),
            Private(Vec<u8>),
        }
        let (k, v) = (b"map\0key".to_vec(), vec![7u8; 300]);
        assert_eq!(
            encode(&SnapshotRecord::Public(k.clone(), v.clone())),
            encode(&Before::Public(k.clone(), v.clone()))
        );
        assert_eq!(encode(&SnapshotRecord::Private(v.clone())), encode(&Before::Private(v.clone())));
        let mut chunk = PrivateChunk::default();
        assert!(chunk.add(&k, &v).is_none());
        assert_eq!(chunk.plain, encode(&(k.clone(), v.clone())));
        let (read, rest) = postcard::take_from_bytes::<(&[u8], &[u8])>(&chunk.plain).unwrap();
        assert_eq!((read, rest.len()), ((&k[..], &v[..]), 0));
    }

    /// Private entries travel sealed in chunks of about [`SNAPSHOT_CHUNK_BYTES`]: a state of
    /// several chunks, with an entry larger than a chunk, arrives whole; the file holds far fewer
    /// records than entries; and both nodes count the state's records for the next interval.
    #[test]
    fn private_entries_are_sealed_in_chunks_and_install_whole() {
        let small: Vec<(String, String)> = (0..3000).map(|i| (format!("K{i:05}"), format!("value {i}"))).collect();
        let big = "b".repeat(SNAPSHOT_CHUNK_BYTES + 1);
        let mut rows: Vec<(&str, &str, &str)> = small.iter().map(|(k, v)| ("app/m", k.as_str(), v.as_str())).collect();
        rows.push(("app/m", "BIG", &big));
        rows.push(("app/public:t", "k", "open"));
        let (_a, source) = node_with([1; 32], &rows);
        let snapshot = source.build_file().unwrap();
        let (_b, target) = node_with([1; 32], &[("app/m", "TARGETS OWN", "x")]);
        let path = target.incoming_path();
        std::fs::copy(&snapshot.snapshot.path, &path).unwrap();
        target.install(&snapshot.meta, &SnapshotFile { path, seal: None }).unwrap();
        assert_eq!(contents(&target, "app/m"), contents(&source, "app/m"));
        assert_eq!(contents(&target, "app/m").len(), 3001);
        assert_eq!(contents(&target, "app/public:t"), [(b"k".to_vec(), b"open".to_vec())]);
        // Records: the term history and start, the public entry, and a handful of sealed chunks.
        let bytes = std::fs::read(&snapshot.snapshot.path).unwrap();
        let mut cursor = std::io::Cursor::new(&bytes[SNAPSHOT_MAGIC.len() + 8..]);
        let mut file_records = 0;
        while read_record(&mut cursor).unwrap().is_some() {
            file_records += 1;
        }
        assert!(file_records < 10, "{file_records} records for 3,002 entries");
        assert_eq!(source.snapshot_extent().1, 3002);
        assert_eq!(target.snapshot_extent().1, 3002);
    }

    /// The attack: a snapshot file altered in any way (a record dropped, replayed from an older
    /// snapshot, a byte changed, the file cut or extended), or made by a node without the ledger
    /// secret, was installed as long as each record decoded. Now the MAC over the whole file is
    /// checked before anything commits: each is refused and the receiving node's state is as it was.
    #[test]
    fn a_snapshot_installs_only_if_its_mac_verifies_and_then_whole() {
        let rows = [("app/m", "PARTY1", "v1"), ("app/m", "PARTY2", "v2"), ("app/public:t", "k", "open")];
        let (_a, source) = node_with([1; 32], &rows);
        let snapshot = source.build_file().unwrap();
        let bytes = std::fs::read(&snapshot.snapshot.path).unwrap();
        let (_b, target) = node_with([1; 32], &[("app/m", "TARGETS OWN", "x")]);
        let before = contents(&target, "app/m");

        let install = |bytes: &[u8]| {
            let path = target.incoming_path();
            std::fs::write(&path, bytes).unwrap();
            target.install(&snapshot.meta, &SnapshotFile { path, seal: None })
        };
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        let mut extended = bytes.clone();
        extended.push(0);
        // The last entry record dropped, everything else (the MAC included) kept.
        // The magic, then the secret version.
        let prefix = SNAPSHOT_MAGIC.len() + 8;
        let mut cursor = std::io::Cursor::new(&bytes[prefix..]);
        let mut starts = Vec::new();
        loop {
            let at = cursor.position() as usize + prefix;
            if read_record(&mut cursor).unwrap().is_none() {
                break;
            }
            starts.push(at);
        }
        let (last, end) = (starts[starts.len() - 1], bytes.len() - 36);
        let dropped = [&bytes[..last], &bytes[end..]].concat();
        let (_c, stranger) = node_with([2; 32], &[("app/public:t", "k", "forged")]);
        let forged = std::fs::read(stranger.build_file().unwrap().snapshot.path).unwrap();
        let cases = [
            ("a flipped byte", flipped),
            ("the MAC cut short", bytes[..bytes.len() - 1].to_vec()),
            ("the MAC and marker gone", bytes[..bytes.len() - 36].to_vec()),
            ("a byte appended", extended),
            ("a record dropped", dropped),
            ("another service's snapshot", forged),
        ];
        for (what, bad) in cases {
            let err = install(&bad).expect_err(what);
            assert!(!err.to_string().is_empty(), "{what}");
            assert_eq!(contents(&target, "app/m"), before, "{what}: nothing was installed");
        }
        install(&bytes).expect("the genuine snapshot installs");
        let installed = contents(&target, "app/m");
        assert_eq!(installed, [(b"PARTY1".to_vec(), b"v1".to_vec()), (b"PARTY2".to_vec(), b"v2".to_vec())]);
        assert_eq!(contents(&target, "app/public:t"), [(b"k".to_vec(), b"open".to_vec())]);
    }

    /// The attack: a peer sends a genuine snapshot file (its MAC holds) with metadata of its
    /// own in the message: a membership it chose, which the install recorded and openraft
    /// adopted, since only the last log id was compared with the file's head. Now the whole
    /// metadata must be the file's, or nothing is installed.
    #[test]
    fn a_snapshot_installs_only_with_the_metadata_its_file_carries() {
        let (_a, source) = node_with([1; 32], &[("app/m", "PARTY1", "v1")]);
        let snapshot = source.build_file().unwrap();
        let (_b, target) = node_with([1; 32], &[("app/m", "TARGETS OWN", "x")]);
        let before = contents(&target, "app/m");
        let install = |meta: &SnapshotMeta| {
            let path = target.incoming_path();
            std::fs::copy(&snapshot.snapshot.path, &path).unwrap();
            target.install(meta, &SnapshotFile { path, seal: None })
        };
        let mut other = snapshot.meta.clone();
        let forged_at = openraft::testing::log_id::<TypeConfig>(9, 7, 1);
        other.last_membership = StoredMembership::new(Some(forged_at), other.last_membership.membership().clone());
        let err = install(&other).expect_err("another membership");
        assert!(err.to_string().contains(METADATA_MISMATCH), "{err}");
        assert_eq!(contents(&target, "app/m"), before, "nothing was installed");
        install(&snapshot.meta).expect("the file's own metadata");
        assert_eq!(contents(&target, "app/m"), [(b"PARTY1".to_vec(), b"v1".to_vec())]);
    }

    /// A file a build or a receive left half-written when the node stopped (each as large as
    /// the state) was never deleted: nothing cleaned `.tmp` files in the snapshot folder, so
    /// repeated sends passed over, or builds that failed, could fill the disk. A start deletes
    /// them, and keeps the snapshot files.
    #[test]
    fn files_left_half_written_or_received_are_deleted_at_start() {
        let (dir, source) = node_with([1; 32], &[("app/m", "PARTY1", "v1")]);
        let built = source.build_file().unwrap().snapshot.path;
        drop(source);
        let snapshots = built.parent().unwrap().to_path_buf();
        for name in ["incoming-0123456789abcdef.tmp", "00000000000000000001-00000000000000000010.tmp"] {
            std::fs::write(snapshots.join(name), b"half").unwrap();
        }
        let state_key = Arc::new(Sealer::new(&Sealer::generate_secret()));
        let store = Store::open_sealed(&dir.path().join("state-2.redb"), state_key).unwrap();
        let _sm = StateMachine::without_ledger(store, None, snapshots.clone()).unwrap();
        let left: Vec<_> = std::fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(left, [built], "only the snapshot file is left");
    }

    /// Records `applied` as the state's applied log id, as applying up to it would.
    fn set_applied(sm: &StateMachine, applied: LogId) {
        let mut txn = sm.inner.store.write_batch().unwrap();
        txn.put_meta(APPLIED_LOG_ID_KEY, &encode(&Some(applied))).unwrap();
        txn.commit().unwrap();
    }

    /// A follower's data folder (its state key kept, so it can be opened again): state and an own
    /// snapshot at index 10, and a log holding 6..=12 (5 and before purged).
    struct Follower {
        dir: tempfile::TempDir,
        state_key: Arc<Sealer>,
        secrets: Arc<LedgerSecrets>,
    }

    impl Follower {
        async fn create(secret: [u8; 32]) -> Follower {
            use openraft::storage::{IOFlushed, RaftLogStorage};
            use openraft::type_config::TypeConfigExt;
            let follower = Follower {
                dir: tempfile::tempdir().unwrap(),
                state_key: Arc::new(Sealer::new(&Sealer::generate_secret())),
                secrets: Arc::new(LedgerSecrets::first(secret)),
            };
            let (sm, mut log) = follower.open();
            set_applied(&sm, openraft::testing::log_id::<TypeConfig>(1, 0, 10));
            sm.build_file().unwrap();
            let entries: Vec<_> = (1..=12).map(|i| openraft::testing::blank_ent::<TypeConfig>(1, 0, i)).collect();
            let (flushed, done) = TypeConfig::oneshot();
            log.append(entries, IOFlushed::signal(flushed)).await.unwrap();
            done.await.unwrap().unwrap();
            log.purge(openraft::testing::log_id::<TypeConfig>(1, 0, 5)).await.unwrap();
            follower
        }

        fn open(&self) -> (StateMachine, super::super::log_store::LogStore) {
            use super::super::log_store::{AppendWatch, LogStore};
            let store = Store::open_sealed(&self.dir.path().join("state.redb"), self.state_key.clone()).unwrap();
            let sm = StateMachine::without_ledger(store, Some(self.secrets.clone()), self.dir.path().join("snapshots"))
                .unwrap();
            let log = LogStore::open(&self.dir.path().join("raft-log"), Arc::new(AppendWatch::default())).unwrap();
            (sm, log)
        }
    }

    /// The crash: a follower far behind is sent a snapshot, and is killed after the install
    /// committed the state but before the file took its place. It restarted with its state at
    /// the snapshot and its log behind it, so openraft purged its log up to the state, past the
    /// older snapshot file it found: a purged log beyond the snapshot, which openraft's own check
    /// refuses (in a debug build it panicked, and the node never came up). Now the file takes its
    /// place before the state commits: a node killed after any step of an install restarts to a
    /// state openraft accepts, at the snapshot (installing it again from its file if need be).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_killed_after_any_step_of_a_snapshot_install_restarts_at_the_snapshot() {
        use openraft::storage::StorageHelper;
        use validit::Validate;
        let rows = [("app/m", "PARTY1", "v1"), ("app/public:t", "k", "open")];
        let (_a, source) = node_with([1; 32], &rows);
        let at = openraft::testing::log_id::<TypeConfig>(2, 0, 100);
        set_applied(&source, at);
        let snapshot = source.build_file().unwrap();
        for step in [InstallStep::FileInPlace, InstallStep::StateCommitted] {
            let follower = Follower::create([1; 32]).await;
            {
                let (sm, _log) = follower.open();
                let path = sm.incoming_path();
                std::fs::copy(&snapshot.snapshot.path, &path).unwrap();
                let killed = sm.install_stepwise(&snapshot.meta, &SnapshotFile { path, seal: None }, &mut |s| {
                    if s == step { Err(io::Error::other("killed")) } else { Ok(()) }
                });
                assert!(killed.is_err(), "{step:?}: the install stops there");
            }
            let (mut sm, mut log) = follower.open();
            let state = StorageHelper::new(&mut log, &mut sm)
                .with_id(1)
                .get_initial_state()
                .await
                .unwrap_or_else(|e| panic!("killed after {step:?}: the node does not start: {e}"));
            state.validate().unwrap_or_else(|e| panic!("killed after {step:?}: openraft refuses the state: {e}"));
            assert_eq!(state.snapshot_meta.last_log_id, Some(at), "{step:?}");
            assert_eq!(sm.meta::<Option<LogId>>(APPLIED_LOG_ID_KEY).unwrap().flatten(), Some(at), "{step:?}");
            assert_eq!(contents(&sm, "app/m"), contents(&source, "app/m"), "{step:?}");
        }
    }

    /// openraft checks its start-up state only in a debug build; `check_start_state` runs the
    /// same checks in every build. A state machine ahead of both its log and its newest snapshot
    /// (what the old install order left after a kill) makes openraft's recovery purge the log
    /// past that snapshot, which its checks refuse: the start stops, naming the relation. The
    /// same folder before its state moved starts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_state_that_openraft_rejects_stops_the_start_in_every_build() {
        let follower = Follower::create([1; 32]).await;
        {
            let (mut sm, mut log) = follower.open();
            crate::check_start_state(1, &mut log, &mut sm).await.expect("a consistent folder starts");
        }
        set_applied(&follower.open().0, openraft::testing::log_id::<TypeConfig>(2, 0, 100));
        let (mut sm, mut log) = follower.open();
        let refused = crate::check_start_state(1, &mut log, &mut sm).await.expect_err("the start stops");
        let message = format!("{refused:#}");
        assert!(message.contains("disagree") && message.contains("purge_upto"), "{message}");
    }

    #[test]
    fn the_term_table_answers_for_every_index_and_grows_one_row_per_term() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        for batch in [vec![(1, 1), (1, 2)], vec![(3, 3), (3, 9)], vec![(3, 10)], vec![(4, 11)]] {
            let txn = store.write_batch().unwrap();
            record_terms(txn.txn(), batch).unwrap();
            txn.commit().unwrap();
        }
        let read = store.read_txn().unwrap();
        assert_eq!(TermHistory::read(&read).unwrap().0, vec![(1, 1), (3, 3), (4, 11)]);
        assert_eq!(term_of(&read, 0).unwrap(), None);
        assert_eq!(term_of(&read, 2).unwrap(), Some(1));
        assert_eq!(term_of(&read, 10).unwrap(), Some(3));
        assert_eq!(term_of(&read, 1000).unwrap(), Some(4));
    }
}
