//! What the replicated log carries, and the openraft type configuration around it.

use std::fmt;

use serde::{Deserialize, Serialize};

use cloister_ledger::txid::TxId;

pub use cloister_crypto::NodeId;

/// Where a node can be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub name: String,
    /// `https://host:port` of the peer (node-to-node) listener.
    pub peer_url: String,
    pub rest_url: String,
    pub grpc_url: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.peer_url)
    }
}

pub use cloister_ledger::entry::{TxEntry, TxKind};

openraft::declare_raft_types!(
    /// Cloister's Raft types: transactions in, nothing out (the proposer learns the outcome from
    /// the commit itself).
    pub TypeConfig:
        D = TxEntry,
        R = (),
        NodeId = NodeId,
        Node = NodeAddr,
);

pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachine>;
pub(crate) type LeaderId = openraft::type_config::alias::LeaderIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub(crate) type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;

/// The transaction id of a log position.
pub fn tx_id(log_id: &LogId) -> TxId {
    TxId { term: log_id.leader_id.term, seqno: log_id.index }
}

/// Encodes a value for the log, the network or a snapshot.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("consensus values always encode")
}

/// Decodes a value; the error says what failed to decode.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> std::io::Result<T> {
    postcard::from_bytes(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what} does not decode: {e}")))
}

/// Property tests: any bytes as any message a peer decodes (a vote, an append-entries request, a
/// snapshot head, a join request, a log entry) are refused with an error, never a panic, never an
/// allocation out of proportion to the input.
#[cfg(test)]
mod fuzz {
    use cloister_test_support::proptest::prelude::*;
    use cloister_test_support::{config, largest_allocation};
    use openraft::raft::{AppendEntriesRequest, VoteRequest};

    use super::*;

    /// serde pre-allocates at most 1 MiB for a claimed sequence length; the rest grows with input.
    fn bounded(largest: usize, input: usize) -> bool {
        largest <= 8 * input + (1 << 20) + 65_536
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_peer_message_is_refused_or_read(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let n = bytes.len();
            let (_, a) = largest_allocation(|| decode::<VoteRequest<TypeConfig>>(&bytes, "a vote request").is_ok());
            let (_, b) = largest_allocation(|| decode::<AppendEntriesRequest<TypeConfig>>(&bytes, "an append-entries request").is_ok());
            let (_, c) = largest_allocation(|| decode::<(Vote, SnapshotMeta)>(&bytes, "a snapshot head").is_ok());
            let (_, d) = largest_allocation(|| decode::<(NodeId, NodeAddr)>(&bytes, "a join request").is_ok());
            let (_, e) = largest_allocation(|| decode::<Entry>(&bytes, "a log entry").is_ok());
            for largest in [a, b, c, d, e] {
                prop_assert!(bounded(largest, n), "allocated {largest} bytes for {n}");
            }
        }
    }
}
