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
pub(crate) type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;

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
