//! Replication settings: the `[raft]` section of a node's configuration.

use serde::{Deserialize, Serialize};

pub(crate) const HEARTBEAT_INTERVAL_MS: u64 = 150;
pub(crate) const ELECTION_TIMEOUT_MIN_MS: u64 = 750;
pub(crate) const ELECTION_TIMEOUT_MAX_MS: u64 = 1500;
pub(crate) const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 30_000;
pub(crate) const SNAPSHOT_AFTER_LOGS: u64 = 10_000;
pub(crate) const SNAPSHOT_AFTER_LOGS_MAX: u64 = 50_000;
pub(crate) const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1_000;
pub(crate) const ENTRIES_PER_APPEND_MAX: u64 = 300;
pub(crate) const APPENDS_IN_FLIGHT_MAX: usize = 2;
pub(crate) const FORWARD_HOPS_MAX: u32 = 3;
pub(crate) const JOIN_TIMEOUT_MS: u64 = 120_000;
pub(crate) const APPLY_HOLD_MS: u64 = 5;
pub(crate) const APPLY_DURABLE_MS: u64 = 500;

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
    /// Fewest log entries applied after a snapshot before the next is taken.
    pub snapshot_after_logs: u64,
    /// Most log entries applied after a snapshot before the next is taken (or
    /// `snapshot_after_logs`, if that is larger). Between the two, the next snapshot waits for as
    /// many entries as the last one held state records (see [`RaftSection::snapshot_interval`]).
    pub snapshot_after_logs_max: u64,
    /// Log entries kept behind a snapshot before they are purged.
    pub logs_kept_after_snapshot: u64,
    /// Most log entries sent to a follower in one message.
    pub entries_per_append_max: u64,
    /// Most AppendEntries messages the leader has sent a follower without their reply. One is
    /// send-and-wait; two let the next entries (or a new commit index) go out while the
    /// follower still syncs the last ones, and the entries proposed meanwhile still share one
    /// message. More sends smaller messages under load, which costs CPU per write.
    pub appends_in_flight_max: usize,
    /// Most times a write may be forwarded before it is refused (503).
    pub forward_hops_max: u32,
    /// Time a joining node keeps asking to be admitted, in milliseconds.
    pub join_timeout_ms: u64,
    /// Longest a node holds committed app entries back to apply several together, in
    /// milliseconds; 0 applies each batch as it comes. A read through the API applies what is
    /// held first, so only what watches the files and metrics sees the delay (see
    /// `StateMachine::defers`).
    pub apply_hold_ms: u64,
    /// Longest time between durable commits of applied state, in milliseconds; 0 makes every
    /// apply durable. The Raft log is durable on its own, so this bounds only what a node
    /// applies again from its log after a crash (a snapshot point, and a snapshot file's build,
    /// also commit durably).
    /// A durable commit writes every page the commits since the last one changed and syncs the
    /// ledger files and the state database: rarer ones write no more pages in all (a page changed
    /// twice is written once), in larger bursts.
    pub apply_durable_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS,
            install_snapshot_timeout_ms: INSTALL_SNAPSHOT_TIMEOUT_MS,
            snapshot_after_logs: SNAPSHOT_AFTER_LOGS,
            snapshot_after_logs_max: SNAPSHOT_AFTER_LOGS_MAX,
            logs_kept_after_snapshot: LOGS_KEPT_AFTER_SNAPSHOT,
            entries_per_append_max: ENTRIES_PER_APPEND_MAX,
            appends_in_flight_max: APPENDS_IN_FLIGHT_MAX,
            forward_hops_max: FORWARD_HOPS_MAX,
            join_timeout_ms: JOIN_TIMEOUT_MS,
            apply_hold_ms: APPLY_HOLD_MS,
            apply_durable_ms: APPLY_DURABLE_MS,
        }
    }
}

impl RaftSection {
    /// Log entries to apply after a snapshot of `records` state records before the next one: as
    /// many as it holds, within [`RaftSection::snapshot_after_logs`] and
    /// [`RaftSection::snapshot_after_logs_max`].
    ///
    /// A snapshot is a point (a durable commit) since session 59; before, every one built a
    /// file that read, opened and sealed again every record of the state, so at a fixed interval
    /// its cost per write grew with the state: at 10,000 entries and a million records, each
    /// write paid for a hundred. Waiting for as many entries as the last snapshot held (the rule
    /// of the Raft dissertation, §5.1.3: snapshot when the log outgrows the snapshot) bounded
    /// that to about one record per write, and still spaces the durable commits of points. The
    /// cap bounds the log a node keeps, and what a node that joins or falls behind replays after
    /// installing the snapshot.
    pub fn snapshot_interval(&self, records: u64) -> u64 {
        let most = self.snapshot_after_logs_max.max(self.snapshot_after_logs);
        records.clamp(self.snapshot_after_logs, most)
    }
}

#[cfg(test)]
mod tests {
    use super::RaftSection;

    #[test]
    fn the_snapshot_interval_follows_the_state_within_its_bounds() {
        let r = RaftSection { snapshot_after_logs: 10_000, snapshot_after_logs_max: 50_000, ..RaftSection::default() };
        assert_eq!(r.snapshot_interval(0), 10_000, "unknown or small state: the least");
        assert_eq!(r.snapshot_interval(10_001), 10_001);
        assert_eq!(r.snapshot_interval(49_999), 49_999);
        assert_eq!(r.snapshot_interval(50_000), 50_000);
        assert_eq!(r.snapshot_interval(5_000_000), 50_000, "a large state: the most");
        // A maximum below the minimum does not lower it: the interval is then fixed.
        let fixed = RaftSection { snapshot_after_logs: 500, snapshot_after_logs_max: 1, ..RaftSection::default() };
        assert_eq!((fixed.snapshot_interval(0), fixed.snapshot_interval(10_000)), (500, 500));
    }
}
