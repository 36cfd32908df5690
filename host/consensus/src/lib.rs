//! Replication with openraft: the type configuration, the redb log store, the state machine that
//! applies write sets to the KV store, and the gRPC network between nodes.
//!
//! This is the only module that imports openraft. Everything else sees [`Consensus`]: propose a
//! transaction, ask who leads, ask a transaction's fate, add or remove a node.

/// Unit and property tests measure their allocations (see `cloister-test-support`).
#[cfg(test)]
#[global_allocator]
static ALLOC: cloister_test_support::TrackingAllocator = cloister_test_support::TrackingAllocator;

mod forward;
mod log_store;
mod network;
mod server;
pub mod settings;
mod state_machine;
pub mod types;
mod wal;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ReadPolicy, ServerState};
use serde::{Deserialize, Serialize};

pub use network::{
    ENTRY_BYTES_MAX, PEER_MESSAGE_BYTES_MAX, Peers, REPLICATION_BATCH_BYTES_MAX, REPLICATION_BYTES_PER_S_MIN,
};

/// How long a joining node waits between attempts to attest or to be admitted.
pub const JOIN_RETRY_MS: u64 = 500;

/// The Raft log's folder in a node's data folder.
pub const LOG_DIR: &str = "raft-log";

/// Whether a data folder's Raft log holds anything (an entry, a vote): a node whose log is
/// missing, or holds nothing, has never been part of a network. Reads the log without changing
/// it; a log in the older format counts as holding something.
pub fn log_begun(data_dir: &Path) -> anyhow::Result<bool> {
    if data_dir.join(log_store::REDB_LOG_FILE).exists() {
        return Ok(true);
    }
    let dir = data_dir.join(LOG_DIR);
    wal::holds_anything(&dir).map_err(|e| anyhow::anyhow!("raft log {}: {e}", dir.display()))
}

/// Whether the closed state database at `state_file` has applied a log entry: a node whose log
/// is gone but whose state is not was part of a network (its state holds the membership Raft
/// counts). Reads the file without its key, and writes no entry of it.
pub fn state_begun(state_file: &Path) -> anyhow::Result<bool> {
    let key = state_machine::APPLIED_LOG_ID_KEY;
    let Some(bytes) = kv::meta_of(state_file, key)? else { return Ok(false) };
    Ok(types::decode::<Option<types::LogId>>(&bytes, key)?.is_some())
}

pub use forward::{FORWARDS_IN_FLIGHT_MAX, ForwardError, Forwards};
pub use server::{Forwarder, PeerRpc, PeerService};
pub use state_machine::Applied;
pub use types::{NodeAddr, NodeId, TxEntry, TxKind};

use cloister_ledger::txid::TxId;
use cloister_store as kv;
use log_store::{AppendWatch, LogStore};
pub use settings::RaftSection;
use state_machine::{ApplyPacing, StateMachine};
use types::{Raft, tx_id};

pub use cloister_crypto::node_id_of;

/// The bytes a transaction takes in the replicated log, as it is sent to peers (within a few
/// bytes of framing): compare with [`ENTRY_BYTES_MAX`].
pub fn entry_bytes(entry: &TxEntry) -> usize {
    types::encode(entry).len()
}

/// Why a proposal did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead; the entry never reached a log, so it is safe to run elsewhere.
    #[error("this node does not lead{}", leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { leader: Option<NodeAddr> },
    /// Leadership changed after the entry was appended: it may yet commit or be dropped.
    /// `tx_id` is known when the entry was appended here; `/node/tx` tells its fate.
    #[error("leadership changed before {} was known to commit: {reason}", tx_id.map(|t| format!("transaction {t}")).unwrap_or_else(|| "the entry".into()))]
    Unknown { tx_id: Option<TxId>, reason: String },
    /// Consensus has stopped on this node.
    #[error("consensus has stopped on this node: {0}")]
    Stopped(String),
    /// This node leads, but has heard from no majority within its lease
    /// (`election_timeout_max_ms`), so openraft takes no write from it; the entry never reached
    /// a log. Forwarded to the leader this node names, itself, it was refused again,
    /// `forward_hops_max` times.
    #[error(
        "this node leads, but has not heard from a majority of the nodes within its lease \
         (raft.election_timeout_max_ms), so it takes no writes: is a majority of nodes up? retry shortly"
    )]
    LeaseExpired,
}

/// A transaction handed to Raft, whose outcome is still to come.
pub struct Proposal {
    uid: [u8; 16],
    appended: tokio::sync::oneshot::Receiver<types::LogId>,
    /// Fires when Raft commits the entry (a majority holds it durably), before this node applies
    /// it; dropped unanswered when it does not commit here.
    commit: openraft::type_config::alias::OneshotReceiverOf<types::TypeConfig, types::LogId>,
    acknowledged: Arc<AtomicU64>,
    complete: openraft::type_config::alias::OneshotReceiverOf<
        types::TypeConfig,
        openraft::raft::ClientWriteResult<types::TypeConfig>,
    >,
    watch: Arc<AppendWatch>,
}

/// Refuses to start on a Raft state that openraft's own checks reject. openraft recovers its
/// state at start-up (re-applying committed entries, purging a log the state machine is ahead of,
/// building a missing snapshot) and then checks how the pieces relate: purged ≤ snapshot ≤
/// committed ≤ the last log entry, and more. It runs those checks only in a debug build, where a
/// failure panics; a release node would run on in a state openraft does not expect. This runs
/// the same recovery and the same checks in every build, and stops with what failed. openraft
/// takes no recovered state from outside, so its own start recovers again, and finds nothing left
/// to do: the cost is a few reads.
pub(crate) async fn check_start_state(id: NodeId, log: &mut LogStore, sm: &mut StateMachine) -> anyhow::Result<()> {
    use validit::Validate;
    let state = openraft::storage::StorageHelper::new(log, sm)
        .with_id(id)
        .get_initial_state()
        .await
        .map_err(|e| anyhow::anyhow!("this node's raft log and state cannot be recovered: {e}"))?;
    state.validate().map_err(|e| {
        anyhow::anyhow!(
            "this node's raft log, snapshot and state machine disagree ({e}); the node will not run on them: \
             retire it (a remove_node proposal) and add a node with an empty data folder in its place"
        )
    })
}

impl Proposal {
    /// Waits until the transaction is committed: held durably by a majority, so no later leader
    /// can lose it. `None` when it did not commit through this node; [`Proposal::outcome`] then
    /// says why. A caller that answers a client here has acknowledged a write this node has
    /// not applied yet, so the commit is recorded for [`Consensus::wait_acknowledged`] first.
    pub async fn committed(&mut self) -> Option<TxId> {
        let log_id = (&mut self.commit).await.ok()?;
        self.acknowledged.fetch_max(log_id.index, Ordering::AcqRel);
        Some(tx_id(&log_id))
    }

    /// Waits until the transaction is committed and applied on this node, or fails.
    pub async fn outcome(mut self) -> Result<TxId, ProposeError> {
        let result = self.complete.await;
        self.watch.forget(&self.uid);
        let known = self.appended.try_recv().ok().as_ref().map(tx_id);
        match result {
            Ok(Ok(response)) => Ok(tx_id(&response.log_id)),
            Ok(Err(ClientWriteError::ForwardToLeader(f))) if known.is_none() => match f.reason {
                openraft::errors::ForwardReason::LeaseExpired => Err(ProposeError::LeaseExpired),
                _ => Err(ProposeError::NotLeader { leader: f.leader_node }),
            },
            Ok(Err(ClientWriteError::PreconditionFailed(_))) if known.is_none() => {
                Err(ProposeError::NotLeader { leader: None })
            }
            Ok(Err(e)) => Err(ProposeError::Unknown { tx_id: known, reason: e.to_string() }),
            Err(_) => Err(ProposeError::Unknown { tx_id: known, reason: "consensus stopped before answering".into() }),
        }
    }
}

/// A transaction's fate, as this node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxStatus {
    /// Not yet known to be committed.
    Pending,
    Committed,
    /// Its position was committed with another transaction: it will never commit.
    Invalid,
}

/// One node of the network, for `/node/network`.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkNode {
    pub id: String,
    pub name: String,
    pub role: &'static str,
    pub rest_url: String,
    pub grpc_url: String,
    pub peer_url: String,
}

/// The network as this node sees it, for `/node/network`.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkStatus {
    pub this_node: String,
    pub leader: Option<String>,
    pub term: u64,
    pub committed: Option<String>,
    pub applied: Option<String>,
    pub nodes: Vec<NetworkNode>,
}

/// Where this node's Raft stands and what its state machine has done, for the node's metrics.
/// Positions are log indexes (seqnos); 0 when there is none yet.
#[derive(Debug, Clone, Default)]
pub struct RaftStats {
    pub term: u64,
    pub is_leader: bool,
    pub last_log: u64,
    pub committed: u64,
    pub applied: u64,
    pub snapshot: u64,
    /// On a leader, each follower's name and how many entries it lacks of the leader's log.
    pub lag: Vec<(String, u64)>,
    pub signatures_applied: u64,
    /// Transactions that applied committed entries, and those of them (or of snapshot points
    /// and snapshot file builds) that made the applied state durable.
    pub apply_batches: u64,
    pub durable_commits: u64,
    /// Snapshot points taken: each a durable commit the log may be purged behind.
    pub snapshots_built: u64,
    /// Snapshot files built to be sent to a node that is behind.
    pub snapshot_files_built: u64,
    pub snapshots_installed: u64,
    /// Calls this node forwarded to the leader whose answers it awaits.
    pub forwards_waiting: u64,
}

/// Asks Raft to take a snapshot point once the entries applied since the current snapshot (or
/// since the last time it asked) reach [`RaftSection::snapshot_interval`] for the records that
/// snapshot holds, no snapshot file is being built to be sent, and, on a leader, no node is
/// catching up through a snapshot (within a bound: `StateMachine::point_due`). Ends when Raft
/// stops.
async fn schedule_snapshots(raft: Raft, sm: StateMachine, settings: RaftSection) {
    let mut applied = sm.subscribe();
    let mut running = raft.metrics();
    let mut asked_at = 0;
    loop {
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            // Raft's metrics close when its core stops.
            changed = running.changed() => if changed.is_err() { return } else { continue },
        }
        let Some(last) = applied.borrow_and_update().last.map(|t| t.seqno) else { continue };
        let catching_up = {
            let metrics = running.borrow_watched();
            catching_up(metrics.purged.as_ref(), metrics.replication.as_ref())
        };
        if sm.point_due(last, asked_at, &settings, catching_up) {
            asked_at = last;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

/// Whether a node this leader replicates to needs entries the log no longer holds, so that it
/// catches up through a snapshot: its matched entry is before the last purged one. `replication`
/// is the leader's view of each node's matched entry (openraft reports it only on a leader).
fn catching_up(purged: Option<&types::LogId>, replication: Option<&BTreeMap<NodeId, Option<types::LogId>>>) -> bool {
    let Some(purged) = purged else { return false };
    replication
        .is_some_and(|nodes| nodes.values().any(|matched| matched.as_ref().is_none_or(|m| m.index < purged.index)))
}

/// The node's replication handle; clones share everything.
#[derive(Clone)]
pub struct Consensus {
    raft: Raft,
    sm: StateMachine,
    watch: Arc<AppendWatch>,
    peers: Peers,
    forwards: Forwards,
    id: NodeId,
    me: NodeAddr,
    forward_hops_max: u32,
    /// `raft.install_snapshot_timeout_ms`: how long a snapshot's receiver waits for its next chunk.
    install_snapshot_timeout: std::time::Duration,
    /// Turns true once this node has applied the service's commit covering its own log (see
    /// [`Consensus::wait_recovered`]).
    recovered: tokio::sync::watch::Receiver<bool>,
    /// The newest log index whose commit a caller of [`Proposal::committed`] may have
    /// acknowledged (see [`Consensus::wait_acknowledged`]).
    acknowledged: Arc<AtomicU64>,
    /// The tasks that run beside Raft, each holding a part of it (the snapshot scheduler holds
    /// the state machine, and with it the state database): [`Consensus::shutdown`] ends them.
    beside: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Cancelled as [`Consensus::shutdown`] begins: the streams other nodes hold open to this
    /// one's peer server end then (see [`Consensus::stopping`]).
    stopping: tokio_util::sync::CancellationToken,
}

impl Consensus {
    /// Opens the log (`raft-log/`) and snapshots under `data_dir`, and starts Raft.
    pub async fn start(
        settings: &RaftSection,
        data_dir: &Path,
        id: NodeId,
        me: NodeAddr,
        (store, ledger, secrets): (
            kv::Store,
            Arc<cloister_ledger::Ledger>,
            Arc<cloister_crypto::secrets::LedgerSecrets>,
        ),
        peers: Peers,
    ) -> anyhow::Result<Consensus> {
        let watch = Arc::new(AppendWatch::default());
        let mut log = LogStore::open(&data_dir.join(LOG_DIR), watch.clone())?;
        let pacing = ApplyPacing::from(settings);
        let sm = StateMachine::new(store, ledger, secrets, data_dir.join("snapshots"), log.durable(), pacing)?;
        check_start_state(id, &mut log, &mut sm.clone()).await?;
        let config = openraft::Config {
            cluster_name: "cloister".into(),
            heartbeat_interval: settings.heartbeat_interval_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            install_snapshot_timeout: settings.install_snapshot_timeout_ms,
            // Snapshots are asked for by `schedule_snapshots`, at an interval that follows the state.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: settings.logs_kept_after_snapshot,
            purge_batch_size: 64,
            max_payload_entries: settings.entries_per_append_max,
            // A leader replicates entries before its own sync finishes (group commit), so after a
            // crash it may have lost entries its followers hold. Resuming leadership in the same
            // term would reissue different entries under those same log ids; an election in a
            // new term cannot.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(|e| anyhow::anyhow!("raft settings are inconsistent: {e}"))?;
        let network = network::NetworkFactory { peers: peers.clone(), in_flight_max: settings.appends_in_flight_max };
        let raft = Raft::new(id, Arc::new(config), network, log, sm.clone()).await?;
        sm.start_sending_snapshots();
        let scheduler = tokio::spawn(schedule_snapshots(raft.clone(), sm.clone(), settings.clone()));
        let (set_recovered, recovered) = tokio::sync::watch::channel(false);
        let waiting = raft.clone();
        let recovery = tokio::spawn(async move {
            // Ends with an error only when Raft stops first; nothing is left to serve then.
            if waiting.wait_for_recovery(None).await.is_ok() {
                let _ = set_recovered.send(true);
            }
        });
        Ok(Consensus {
            raft,
            sm,
            watch,
            forwards: Forwards::new(peers.clone()),
            peers,
            id,
            me,
            forward_hops_max: settings.forward_hops_max,
            install_snapshot_timeout: std::time::Duration::from_millis(settings.install_snapshot_timeout_ms),
            recovered,
            acknowledged: Arc::default(),
            beside: Arc::new(std::sync::Mutex::new(vec![scheduler, recovery])),
            stopping: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Runs a write on the leader at `peer_url`, over this node's forwarding stream to it.
    /// Runs `request` on node `leader`, at `peer_url` (its certificate must be that node's).
    pub async fn forward(
        &self,
        leader: NodeId,
        peer_url: &str,
        request: cloister_proto::peer::v1::ForwardRequest,
    ) -> Result<cloister_proto::peer::v1::ForwardReply, ForwardError> {
        self.forwards.call(leader, peer_url, request).await
    }

    pub fn forward_hops_max(&self) -> u32 {
        self.forward_hops_max
    }

    pub(crate) fn install_snapshot_timeout(&self) -> std::time::Duration {
        self.install_snapshot_timeout
    }

    pub async fn is_initialized(&self) -> anyhow::Result<bool> {
        Ok(self.raft.is_initialized().await?)
    }

    /// Starts a new network with this node as its only voter.
    pub async fn initialize(&self) -> anyhow::Result<()> {
        self.raft.initialize(BTreeMap::from([(self.id, self.me.clone())])).await?;
        Ok(())
    }

    fn metrics(&self) -> openraft::RaftMetrics<types::TypeConfig> {
        self.read_metrics(Clone::clone)
    }

    /// Reads Raft's latest metrics in place. Every app write asks a field or two of them several
    /// times (whether this node leads, in which term, whether it has caught up); a clone would
    /// copy the membership and replication maps each time.
    fn read_metrics<R>(&self, read: impl FnOnce(&openraft::RaftMetrics<types::TypeConfig>) -> R) -> R {
        read(&self.raft.metrics().borrow_watched())
    }

    pub fn stats(&self) -> RaftStats {
        use std::sync::atomic::Ordering::Relaxed;
        let m = self.metrics();
        let index = |l: &Option<types::LogId>| l.as_ref().map_or(0, |l| l.index);
        let last_log = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership();
        let lag = m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, matched)| {
                let name = membership.get_node(id).map_or_else(|| id.to_string(), |a| a.name.clone());
                (name, last_log.saturating_sub(index(matched)))
            })
            .collect();
        let counts = self.sm.counts();
        RaftStats {
            term: m.current_term,
            is_leader: m.state == ServerState::Leader && m.current_leader == Some(self.id),
            last_log,
            committed: index(&m.local_committed),
            applied: index(&m.last_applied),
            snapshot: index(&m.snapshot),
            lag,
            signatures_applied: counts.signatures_applied.load(Relaxed),
            apply_batches: counts.apply_batches.load(Relaxed),
            durable_commits: counts.durable_commits.load(Relaxed),
            snapshots_built: counts.snapshots_built.load(Relaxed),
            snapshot_files_built: counts.snapshot_files_built.load(Relaxed),
            snapshots_installed: counts.snapshots_installed.load(Relaxed),
            forwards_waiting: self.forwards.waiting(),
        }
    }

    /// The voters of the membership this node holds, read from Raft's own state (its metrics
    /// may lag a start).
    pub async fn voters(&self) -> anyhow::Result<BTreeSet<NodeId>> {
        Ok(self.raft.with_raft_state(|state| state.membership_state.effective().voter_ids().collect()).await?)
    }

    pub fn is_leader(&self) -> bool {
        self.read_metrics(|m| m.state == ServerState::Leader && m.current_leader == Some(self.id))
    }

    /// The current leader and its addresses, if one is known.
    pub fn leader(&self) -> Option<(NodeId, NodeAddr)> {
        self.read_metrics(|m| {
            let id = m.current_leader?;
            Some((id, m.membership_config.membership().get_node(&id)?.clone()))
        })
    }

    /// Whether this node leads and has applied everything before its own term, so executing on
    /// top of its applied state sees every earlier transaction.
    pub fn caught_up(&self) -> bool {
        self.read_metrics(|m| {
            m.state == ServerState::Leader
                && m.last_applied.as_ref().is_some_and(|l| l.leader_id.term == m.current_term)
        })
    }

    /// Waits, up to `timeout`, until this node's applied state covers everything it could have
    /// served before it last stopped; false if the timeout passed first.
    ///
    /// The committed log id is saved without an fsync (see `log_store`), and applying does not
    /// wait for the disk either, so after a crash a node restarts with an older applied state
    /// than it had. Its log still holds everything it applied, and the state comes back once the
    /// service's commit covers that log and the node has applied it: a leader's first entry in
    /// its term, or a leader's heartbeat to a follower. Until then, reads of this node's state
    /// could go back in time, so the API holds them here. A node that cannot reach a majority
    /// never gets there: it refuses reads rather than serve a state older than it served.
    pub async fn wait_recovered(&self, timeout: Duration) -> bool {
        // Every read asks: once recovered, answer without a timer or a clone.
        if *self.recovered.borrow() {
            return true;
        }
        let mut recovered = self.recovered.clone();
        matches!(tokio::time::timeout(timeout, recovered.wait_for(|r| *r)).await, Ok(Ok(_)))
    }

    /// Records that this node answered a client for a write the leader committed at `index`:
    /// a write this node forwarded, which the leader answered once committed, often before the
    /// commit reaches this node. A read through this node that follows the answer then waits
    /// for it ([`Consensus::wait_acknowledged`]), as it does for writes this node led.
    pub fn acknowledge(&self, index: u64) {
        self.acknowledged.fetch_max(index, Ordering::AcqRel);
    }

    /// Whether this node has acknowledged a write it has not applied yet: a read would wait
    /// for it in [`Consensus::wait_acknowledged`].
    pub fn acknowledged_pending(&self) -> bool {
        let acknowledged = self.acknowledged.load(Ordering::Acquire);
        acknowledged > 0 && !self.sm.applied_through(acknowledged)
    }

    /// Waits until this node has applied every write it acknowledged at commit
    /// ([`Proposal::committed`], [`Consensus::acknowledge`]), or the timeout passes. Such a write
    /// is answered before this node applies it, so a read that follows the answer waits here,
    /// and sees it: a read never sees a state older than a write this node acknowledged before
    /// the read arrived.
    pub async fn wait_acknowledged(&self, timeout: Duration) -> bool {
        if !self.acknowledged_pending() {
            return true;
        }
        let acknowledged = self.acknowledged.load(Ordering::Acquire);
        let mut applied = self.sm.subscribe();
        // The write may be held back to apply with others, or about to be: not while this waits.
        let _waiting = self.sm.hold_nothing();
        let applied = async {
            self.sm.apply_held().await.ok()?;
            applied.wait_for(|a| a.covers(acknowledged)).await.ok().map(|_| ())
        };
        matches!(tokio::time::timeout(timeout, applied).await, Ok(Some(())))
    }

    /// Applies the committed app entries this node holds back to apply together (see
    /// `StateMachine::defers`): a read of this node's state asks first, and so sees every entry
    /// this node has counted applied, as it would if nothing were held back.
    pub async fn apply_held(&self) -> std::io::Result<()> {
        self.sm.apply_held().await
    }

    /// Whether this node failed to apply committed entries: it stops, and until it has stopped
    /// its writer must not execute new writes over a state that lacks them.
    pub fn apply_failed(&self) -> bool {
        self.sm.apply_failed()
    }

    /// The entries a snapshot file this node is to send covers, when no signature reaches past
    /// them yet: the signer signs again once it has nothing else to sign (see
    /// `StateMachine::seal_wanted`). Only rises.
    pub fn seal_wanted(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.seal_wanted()
    }

    /// What this node has applied, as a receiver that changes after every applied batch.
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<Applied> {
        self.sm.subscribe()
    }

    /// Changes whenever an applied batch or an installed snapshot changes a `gov.` map, and only
    /// after the state database holds the change: a reader that takes it before it begins a
    /// transaction reads governance state at least as new as the version says.
    pub fn gov_version(&self) -> u64 {
        self.sm.gov_version()
    }

    /// Changes with [`Consensus::gov_version`] only, to the new version: for what waits for
    /// governance changes without waking for every applied batch.
    pub fn gov_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.gov_changes()
    }

    /// The term this node is in.
    pub fn term(&self) -> u64 {
        self.read_metrics(|m| m.current_term)
    }

    /// Waits until [`Consensus::caught_up`], or leadership is lost, or the timeout passes.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let id = self.id;
        let waiter = self.raft.wait(Some(timeout));
        let outcome = waiter
            .metrics(
                |m| {
                    m.state != ServerState::Leader
                        || (m.current_leader == Some(id)
                            && m.last_applied.as_ref().is_some_and(|l| l.leader_id.term == m.current_term))
                },
                "leader caught up",
            )
            .await;
        outcome.is_ok() && self.caught_up()
    }

    /// Waits until some node leads.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<()> {
        let waiter = self.raft.wait(Some(timeout));
        waiter.metrics(|m| m.current_leader.is_some(), "a leader").await?;
        Ok(())
    }

    /// Proposes a transaction and waits until it is committed and applied here.
    pub async fn propose(&self, entry: TxEntry) -> Result<TxId, ProposeError> {
        self.submit(entry, None).await?.outcome().await
    }

    /// Hands a transaction to Raft and returns at once; proposals reach the log in the order of
    /// `submit` calls. With `term`, the write is refused unless this node still leads in that
    /// term, so state computed under one leadership never commits under another.
    pub async fn submit(&self, entry: TxEntry, term: Option<u64>) -> Result<Proposal, ProposeError> {
        let uid = entry.uid;
        let appended = self.watch.watch(uid);
        let (responder, commit, complete) = openraft::impls::ProgressResponder::new();
        let mut write = self.raft.write(entry).responder(responder);
        if let Some(term) = term {
            use openraft::vote::RaftLeaderIdExt;
            write = write.with_leader(types::LeaderId::new_committed(term, self.id));
        }
        if let Err(e) = write.await {
            self.watch.forget(&uid);
            return Err(ProposeError::Stopped(e.to_string()));
        }
        Ok(Proposal {
            uid,
            appended,
            commit,
            acknowledged: self.acknowledged.clone(),
            complete,
            watch: self.watch.clone(),
        })
    }

    /// A linearizable read barrier: confirms leadership with a quorum, then waits until this
    /// node has applied everything committed before the read.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader { leader: f.leader_node })
            }
            Err(e) => Err(ProposeError::Unknown { tx_id: None, reason: e.to_string() }),
        }
    }

    /// What this node knows of a transaction's fate. Sound: a `Committed` or `Invalid` answer
    /// never changes; `Pending` turns into one of them once this node applies that far.
    pub fn tx_status(&self, tx: TxId) -> std::io::Result<TxStatus> {
        let applied = self.sm.subscribe().borrow().last;
        if applied.is_none_or(|a| a.seqno < tx.seqno) {
            return Ok(TxStatus::Pending);
        }
        Ok(match self.sm.term_of(tx.seqno)? {
            Some(term) if term == tx.term => TxStatus::Committed,
            Some(_) => TxStatus::Invalid,
            None => TxStatus::Invalid,
        })
    }

    /// Whether node `id` has acknowledged entries of this leader's log: it holds Raft state (its
    /// log, its vote) that a new data folder would have lost. False on a follower, and for a node
    /// nothing was replicated to.
    pub fn holds_replicated_log(&self, id: NodeId) -> bool {
        self.read_metrics(|m| m.replication.as_ref().and_then(|r| r.get(&id)).is_some_and(Option::is_some))
    }

    pub fn network(&self) -> NetworkStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, addr)| NetworkNode {
                id: id.to_string(),
                name: addr.name.clone(),
                role: if m.current_leader == Some(*id) {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                },
                rest_url: addr.rest_url.clone(),
                grpc_url: addr.grpc_url.clone(),
                peer_url: addr.peer_url.clone(),
            })
            .collect();
        NetworkStatus {
            this_node: self.id.to_string(),
            leader: m.current_leader.map(|l| l.to_string()),
            term: m.current_term,
            committed: m.local_committed.as_ref().map(|l| tx_id(l).to_string()),
            applied: m.last_applied.as_ref().map(|l| tx_id(l).to_string()),
            nodes,
        }
    }

    /// Adds a node: first as a learner until it has caught up, then as a voter. Only the leader
    /// adds nodes; others answer UNAVAILABLE naming the leader.
    pub(crate) async fn add_voter(&self, id: NodeId, addr: NodeAddr) -> Result<Vec<u64>, tonic::Status> {
        if !self.is_leader() {
            return Err(self.not_leader_status());
        }
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let is_voter = membership.voter_ids().any(|v| v == id);
        if !is_voter {
            tracing::info!(node = %addr, id, "adding a node as a learner");
            self.raft.add_learner(id, addr.clone(), true).await.map_err(|e| match e.forward_to_leader() {
                Some(_) => self.not_leader_status(),
                None => tonic::Status::unavailable(format!("adding the learner failed: {e}")),
            })?;
            tracing::info!(node = %addr, id, "promoting the node to voter");
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("promoting the node failed: {e}")))?;
        }
        Ok(self.metrics().membership_config.membership().voter_ids().collect())
    }

    /// Asks the network at `peer_url` to admit this node, following leader hints, until it does.
    pub async fn join(&self, peer_url: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut target = peer_url.to_owned();
        let request = cloister_proto::peer::v1::JoinRequest { node: types::encode(&(self.id, self.me.clone())) };
        loop {
            let outcome = match self.peers.client(&target, None) {
                Ok(mut client) => client.join(request.clone()).await,
                Err(status) => Err(status),
            };
            match outcome {
                Ok(_) => return Ok(()),
                Err(status) => {
                    if let Some(leader) = status.metadata().get("x-cloister-leader").and_then(|v| v.to_str().ok())
                        && !leader.is_empty()
                    {
                        target = leader.to_owned();
                    }
                    if tokio::time::Instant::now() > deadline {
                        anyhow::bail!("joining the network at {peer_url} failed: {}", status.message());
                    }
                    tracing::info!(target = %target, reason = status.message(), "join not accepted yet; retrying");
                    tokio::time::sleep(Duration::from_millis(JOIN_RETRY_MS)).await;
                }
            }
        }
    }

    /// Removes a node from the voters and the network.
    pub async fn remove(&self, id: NodeId) -> anyhow::Result<()> {
        self.raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false).await?;
        self.raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false).await?;
        Ok(())
    }

    /// Resolves once this node's consensus begins to stop. Each stream another node holds open
    /// to the peer server (a leader's appends, a follower's forwards, a snapshot on its way) ends
    /// then: such a stream stays open for as long as its sender runs, and it held its connection,
    /// and with it this node's consensus and state database, after the node had stopped.
    pub(crate) fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stopping.clone().cancelled_owned()
    }

    /// The peer gRPC service for this node.
    pub fn peer_service(&self, forwarder: Arc<dyn Forwarder>) -> PeerService {
        PeerService { consensus: self.clone(), forwarder }
    }

    /// UNAVAILABLE, naming the leader (metadata `x-cloister-leader`) so the caller can follow.
    pub fn not_leader_status(&self) -> tonic::Status {
        let hint = self.leader().map(|(_, l)| l.peer_url).unwrap_or_default();
        let mut status = tonic::Status::unavailable(format!("not the leader; ask {hint}"));
        if let Ok(v) = hint.parse() {
            status.metadata_mut().insert("x-cloister-leader", v);
        }
        status
    }

    pub async fn shutdown(&self) {
        self.stopping.cancel();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        // A node that stops leaves its ledger files and state holding everything it applied.
        if let Err(e) = self.sm.apply_held_and_stop().await {
            tracing::warn!(error = %e, "applying the entries held back failed as the node stopped");
        }
        // Each would end once it saw Raft stop, at a moment of its own: ended here, nothing of
        // them holds the state database after this returns.
        let beside = std::mem::take(&mut *self.beside.lock().expect("background tasks lock"));
        for task in beside {
            task.abort();
            let _ = task.await;
        }
    }
}
