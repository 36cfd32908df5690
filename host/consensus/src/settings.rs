//! Replication settings: the `[raft]` section of a node's configuration.

use serde::{Deserialize, Serialize};

pub(crate) const HEARTBEAT_INTERVAL_MS: u64 = 150;
pub(crate) const ELECTION_TIMEOUT_MIN_MS: u64 = 750;
pub(crate) const ELECTION_TIMEOUT_MAX_MS: u64 = 1500;
pub(crate) const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 30_000;
pub(crate) const SNAPSHOT_AFTER_LOGS: u64 = 10_000;
pub(crate) const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1_000;
pub(crate) const ENTRIES_PER_APPEND_MAX: u64 = 300;
pub(crate) const FORWARD_HOPS_MAX: u32 = 3;
pub(crate) const JOIN_TIMEOUT_MS: u64 = 120_000;

/// Replication settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    /// How often the leader heartbeats, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Election timeouts, in milliseconds: a follower that hears no leader for a random time in
    /// this range stands for election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Time a snapshot transfer to a lagging node may take, in milliseconds.
    pub install_snapshot_timeout_ms: u64,
    /// Log entries after which a new snapshot is taken.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot before they are purged.
    pub logs_kept_after_snapshot: u64,
    /// Most log entries sent to a follower in one message.
    pub entries_per_append_max: u64,
    /// Most times a write may be forwarded before it is refused (503).
    pub forward_hops_max: u32,
    /// Time a joining node keeps asking to be admitted, in milliseconds.
    pub join_timeout_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS,
            install_snapshot_timeout_ms: INSTALL_SNAPSHOT_TIMEOUT_MS,
            snapshot_after_logs: SNAPSHOT_AFTER_LOGS,
            logs_kept_after_snapshot: LOGS_KEPT_AFTER_SNAPSHOT,
            entries_per_append_max: ENTRIES_PER_APPEND_MAX,
            forward_hops_max: FORWARD_HOPS_MAX,
            join_timeout_ms: JOIN_TIMEOUT_MS,
        }
    }
}
