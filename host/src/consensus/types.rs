//! What the replicated log carries, and the openraft type configuration around it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::kv::WriteSet;
use crate::txid::TxId;

/// A node's id in the network: the first eight bytes of the SHA-256 of its certificate.
pub type NodeId = u64;

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

/// Why a transaction was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxKind {
    /// The service's first transaction: members, users, app, service record.
    Genesis,
    /// An app handler's writes.
    App,
    /// A governance change.
    Gov,
}

/// One transaction in the log: the writes a handler made on the leader, applied as they are by
/// every node (followers never run contract code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxEntry {
    /// Random id the proposer uses to learn the entry's position when it is appended.
    pub uid: [u8; 16],
    pub kind: TxKind,
    pub writes: WriteSet,
    /// A digest the app attached; its receipt will prove it.
    pub claims_digest: Option<[u8; 32]>,
}

impl fmt::Display for TxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} tx {} ({} writes)",
            self.kind,
            hex::encode(&self.uid[..4]),
            self.writes.len()
        )
    }
}

impl TxEntry {
    pub fn new(kind: TxKind, writes: WriteSet, claims_digest: Option<[u8; 32]>) -> TxEntry {
        let mut uid = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uid)
            .expect("the OS random source works");
        TxEntry {
            uid,
            kind,
            writes,
            claims_digest,
        }
    }
}

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
pub type LeaderId = openraft::type_config::alias::LeaderIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;

/// The transaction id of a log position.
pub fn tx_id(log_id: &LogId) -> TxId {
    TxId {
        term: log_id.leader_id.term,
        seqno: log_id.index,
    }
}

/// Encodes a value for the log, the network or a snapshot.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("consensus values always encode")
}

/// Decodes a value; the error says what failed to decode.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> std::io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what} does not decode: {e}"),
        )
    })
}
