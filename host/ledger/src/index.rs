//! The ledger's index, kept in the state database so it commits with the state it describes:
//! the tree's complete-subtree hashes, each entry's leaf components and chain hash, and the
//! signature entries.

use redb::{ReadableTable, TableDefinition};

use super::entry::{LeafComponents, LedgerEntry, Payload, SignaturePayload, chain};
use super::files::StartState;
use super::merkle::{self, Hash, MerkleError, Nodes, NodesMut};
use super::verify::{SignatureRecord, SnapshotSeal};

const NODES: TableDefinition<(u8, u64), &[u8; 32]> = TableDefinition::new("ledger_nodes");
const LEAVES: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_leaves");
const CHAINS: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("ledger_chains");
const SIGNATURES: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_signatures");
/// `(size, chain head, first seqno held)`.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_state");
const STATE_KEY: &str = "state";

/// Where the ledger stands. Seqnos are Raft indexes and start at 0; the tree's leaf `i` is
/// entry `i`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerState {
    /// The next seqno: entries `0..size` are in the tree.
    pub size: u64,
    /// The chain hash through entry `size - 1` (zeroes while empty).
    pub chain: Hash,
    /// The first seqno this node holds (0, or the first after the snapshot it started from).
    pub first: u64,
}

fn storage(e: impl std::fmt::Display) -> MerkleError {
    MerkleError::Storage(e.to_string())
}

/// Why an entry cannot join this node's ledger.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("ledger entry {seqno}: {message}")]
    Refused { seqno: u64, message: String },
    #[error(transparent)]
    Merkle(#[from] MerkleError),
}

/// The tree's nodes as the [`Appender`] holds them, open for its batch.
type NodeTable<'t> = redb::Table<'t, (u8, u64), &'static [u8; 32]>;

impl Nodes for NodeTable<'_> {
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        Ok(self.get((level, index)).map_err(storage)?.map(|v| *v.value()))
    }
}

impl NodesMut for NodeTable<'_> {
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), MerkleError> {
        self.insert((level, index), &hash).map_err(storage)?;
        Ok(())
    }
}

struct ReadNodes(redb::ReadOnlyTable<(u8, u64), &'static [u8; 32]>);

impl Nodes for ReadNodes {
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        Ok(self.0.get((level, index)).map_err(storage)?.map(|v| *v.value()))
    }
}

/// Creates the tables, so reads never meet a missing table.
pub fn create(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(NODES)?;
    txn.open_table(LEAVES)?;
    txn.open_table(CHAINS)?;
    txn.open_table(SIGNATURES)?;
    let mut state = txn.open_table(STATE)?;
    if state.get(STATE_KEY)?.is_none() {
        let fresh = postcard::to_stdvec(&LedgerState { size: 0, chain: [0; 32], first: 0 }).expect("encodes");
        state.insert(STATE_KEY, fresh.as_slice())?;
    }
    Ok(())
}

pub fn state(read: &redb::ReadTransaction) -> Result<LedgerState, MerkleError> {
    let table = read.open_table(STATE).map_err(storage)?;
    let bytes = table.get(STATE_KEY).map_err(storage)?.ok_or_else(|| storage("the ledger state is missing"))?;
    postcard::from_bytes(bytes.value()).map_err(storage)
}

/// Appends entries to the index inside a write transaction, checking signature entries against
/// the tree as it stands. It holds the index's tables open for the batch: opening a redb table
/// costs a lookup in the table tree, and three opens per entry were a visible share of applying.
pub struct Appender<'t> {
    nodes: NodeTable<'t>,
    leaves: redb::Table<'t, u64, &'static [u8]>,
    chains: redb::Table<'t, u64, &'static [u8; 32]>,
    signatures: redb::Table<'t, u64, &'static [u8]>,
    state_table: redb::Table<'t, &'static str, &'static [u8]>,
    state: LedgerState,
    service_cert: Vec<u8>,
}

impl<'t> Appender<'t> {
    pub fn new(txn: &'t redb::WriteTransaction, service_cert: Vec<u8>) -> Result<Self, MerkleError> {
        let state_table = txn.open_table(STATE).map_err(storage)?;
        let state = {
            let bytes =
                state_table.get(STATE_KEY).map_err(storage)?.ok_or_else(|| storage("the ledger state is missing"))?;
            postcard::from_bytes(bytes.value()).map_err(storage)?
        };
        Ok(Appender {
            nodes: txn.open_table(NODES).map_err(storage)?,
            leaves: txn.open_table(LEAVES).map_err(storage)?,
            chains: txn.open_table(CHAINS).map_err(storage)?,
            signatures: txn.open_table(SIGNATURES).map_err(storage)?,
            state_table,
            state,
            service_cert,
        })
    }

    pub fn state(&self) -> LedgerState {
        self.state
    }

    /// Adds the entry at `seqno`, returning it as the ledger files store it.
    pub fn append(&mut self, seqno: u64, term: u64, payload: Payload) -> Result<LedgerEntry, IndexError> {
        let refuse = |message: String| IndexError::Refused { seqno, message };
        if seqno != self.state.size {
            return Err(refuse(format!("expected seqno {}", self.state.size)));
        }
        let mut entry = LedgerEntry { seqno, term, payload, chain: [0; 32] };
        let components = entry.components();
        let leaf = components.leaf();
        if let Some(sig) = entry.payload.signature() {
            self.check_signature(sig, seqno).map_err(refuse)?;
            let record = SignatureRecord { seqno, term, payload: sig.clone() };
            let bytes = postcard::to_stdvec(&record).expect("encodes");
            self.signatures.insert(seqno, bytes.as_slice()).map_err(storage)?;
        }
        merkle::append(&mut self.nodes, seqno, &leaf)?;
        entry.chain = chain(&self.state.chain, &leaf);
        let comps = postcard::to_stdvec(&components).expect("encodes");
        self.leaves.insert(seqno, comps.as_slice()).map_err(storage)?;
        self.chains.insert(seqno, &entry.chain).map_err(storage)?;
        self.state.size = seqno + 1;
        self.state.chain = entry.chain;
        Ok(entry)
    }

    fn check_signature(&self, sig: &SignaturePayload, seqno: u64) -> Result<(), String> {
        if sig.tree_size == 0 || sig.tree_size > seqno {
            return Err(format!("the signature covers {} entries, impossible at seqno {seqno}", sig.tree_size));
        }
        if sig.tree_size <= self.state.first {
            // It covers only entries before the snapshot this node started from (a leader signs
            // its tree while later entries are already in flight): this node holds no tree to
            // compare with, so it checks the signature itself; nodes holding those entries check
            // the root, and `cloister ledger verify` does on the files that hold them.
            tracing::info!(seqno, tree_size = sig.tree_size, "a signature predates this node's snapshot");
            return sig.verify(&self.service_cert);
        }
        let root = merkle::root(&self.nodes, sig.tree_size).map_err(|e| e.to_string())?;
        if root != sig.root {
            return Err(format!(
                "the signed root {} differs from this node's root {} of the first {} entries",
                hex::encode(sig.root),
                hex::encode(root),
                sig.tree_size
            ));
        }
        let chain_at = if sig.tree_size == self.state.size {
            Some(self.state.chain)
        } else {
            let got = self.chains.get(sig.tree_size - 1).map_err(|e| e.to_string())?;
            got.map(|v| *v.value())
        };
        if chain_at != Some(sig.chain) {
            return Err(format!(
                "the signed chain head differs from this node's chain through entry {}",
                sig.tree_size - 1
            ));
        }
        sig.verify(&self.service_cert)
    }

    /// Saves where the ledger stands.
    pub fn finish(mut self) -> Result<LedgerState, MerkleError> {
        let bytes = postcard::to_stdvec(&self.state).expect("encodes");
        self.state_table.insert(STATE_KEY, bytes.as_slice()).map_err(storage)?;
        Ok(self.state)
    }
}

/// The start state at the current size: what a snapshot carries so a node can continue.
pub fn start_state(read: &redb::ReadTransaction) -> Result<StartState, MerkleError> {
    let s = state(read)?;
    let nodes = ReadNodes(read.open_table(NODES).map_err(storage)?);
    Ok(StartState { next: s.size, chain: s.chain, frontier: merkle::frontier(&nodes, s.size)? })
}

/// Replaces the index with a start state (when a snapshot is installed).
pub fn reset(txn: &redb::WriteTransaction, start: &StartState) -> Result<(), MerkleError> {
    let mut nodes = txn.open_table(NODES).map_err(storage)?;
    nodes.retain(|_, _| false).map_err(storage)?;
    for (level, index, hash) in &start.frontier {
        nodes.insert((*level, *index), hash).map_err(storage)?;
    }
    txn.open_table(LEAVES).map_err(storage)?.retain(|_, _| false).map_err(storage)?;
    txn.open_table(CHAINS).map_err(storage)?.retain(|_, _| false).map_err(storage)?;
    txn.open_table(SIGNATURES).map_err(storage)?.retain(|_, _| false).map_err(storage)?;
    let state = LedgerState { size: start.next, chain: start.chain, first: start.next };
    let bytes = postcard::to_stdvec(&state).expect("encodes");
    txn.open_table(STATE).map_err(storage)?.insert(STATE_KEY, bytes.as_slice()).map_err(storage)?;
    Ok(())
}

/// What a receipt needs for `seqno`: the leaf, the first signature covering it, and the proof.
pub struct ReceiptParts {
    pub leaf: LeafComponents,
    pub signature: SignatureRecord,
    pub proof: Vec<Hash>,
}

/// Why a receipt cannot be given yet, or here.
#[derive(Debug, PartialEq, Eq)]
pub enum ReceiptUnavailable {
    /// No signature entry covers the transaction yet.
    NotYetSigned,
    /// This node's ledger starts after the transaction.
    NotHeld {
        first: u64,
    },
    NotFound,
}

pub fn receipt_parts(
    read: &redb::ReadTransaction,
    seqno: u64,
) -> Result<Result<ReceiptParts, ReceiptUnavailable>, MerkleError> {
    let s = state(read)?;
    if seqno < s.first {
        return Ok(Err(ReceiptUnavailable::NotHeld { first: s.first }));
    }
    let leaves = read.open_table(LEAVES).map_err(storage)?;
    let Some(leaf) = leaves.get(seqno).map_err(storage)? else { return Ok(Err(ReceiptUnavailable::NotFound)) };
    let leaf: LeafComponents = postcard::from_bytes(leaf.value()).map_err(storage)?;
    let signatures = read.open_table(SIGNATURES).map_err(storage)?;
    for item in signatures.range(seqno + 1..).map_err(storage)? {
        let (_, bytes) = item.map_err(storage)?;
        let record: SignatureRecord = postcard::from_bytes(bytes.value()).map_err(storage)?;
        if record.payload.tree_size > seqno {
            let nodes = ReadNodes(read.open_table(NODES).map_err(storage)?);
            let proof = merkle::path(&nodes, seqno, record.payload.tree_size)?;
            return Ok(Ok(ReceiptParts { leaf, signature: record, proof }));
        }
    }
    Ok(Err(ReceiptUnavailable::NotYetSigned))
}

/// The seal of a snapshot of the first `next` entries: the first signature whose tree reaches
/// them, and the leaves from `next` to that tree's end. None until such a signature is applied.
pub fn snapshot_seal(read: &redb::ReadTransaction, next: u64) -> Result<Option<SnapshotSeal>, MerkleError> {
    let signatures = read.open_table(SIGNATURES).map_err(storage)?;
    for item in signatures.range(next..).map_err(storage)? {
        let (_, bytes) = item.map_err(storage)?;
        let signature: SignatureRecord = postcard::from_bytes(bytes.value()).map_err(storage)?;
        if signature.payload.tree_size < next {
            continue;
        }
        let table = read.open_table(LEAVES).map_err(storage)?;
        let leaves = (next..signature.payload.tree_size)
            .map(|seqno| {
                let bytes =
                    table.get(seqno).map_err(storage)?.ok_or(MerkleError::Missing { level: 0, index: seqno })?;
                let components: LeafComponents = postcard::from_bytes(bytes.value()).map_err(storage)?;
                Ok(components.leaf())
            })
            .collect::<Result<Vec<_>, MerkleError>>()?;
        return Ok(Some(SnapshotSeal { signature, leaves }));
    }
    Ok(None)
}

/// The root and chain head over the first `size` entries, for signing.
pub fn signing_view(read: &redb::ReadTransaction) -> Result<(u64, Hash, Hash), MerkleError> {
    let s = state(read)?;
    let nodes = ReadNodes(read.open_table(NODES).map_err(storage)?);
    Ok((s.size, merkle::root(&nodes, s.size)?, s.chain))
}

/// The last signature entry: its seqno and the tree size it covers.
pub fn last_signed(read: &redb::ReadTransaction) -> Result<Option<(u64, u64)>, MerkleError> {
    let signatures = read.open_table(SIGNATURES).map_err(storage)?;
    let last = signatures.last().map_err(storage)?;
    last.map(|(seqno, bytes)| {
        let record: SignatureRecord = postcard::from_bytes(bytes.value()).map_err(storage)?;
        Ok((seqno.value(), record.payload.tree_size))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{NodeSigner, TxEntry};
    use crate::merkle::MemoryNodes;
    use cloister_crypto::identity::{self, ServiceCa};

    fn signer(ca: &ServiceCa) -> NodeSigner {
        let node = ca.issue_node_cert("node", &["localhost".into()]).unwrap();
        NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap()
    }

    /// A fresh state database with the index tables, and a service CA (with its DER).
    fn fixture() -> (tempfile::TempDir, cloister_store::Store, ServiceCa, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let ca = ServiceCa::generate("svc").unwrap();
        let ca_der = identity::cert_der(ca.keyed.cert_pem.as_bytes()).unwrap().to_vec();
        (dir, store, ca, ca_der)
    }

    /// A follower refuses a signature entry that does not match its own tree, naming the seqno.
    #[test]
    fn signatures_are_checked_against_this_nodes_tree() {
        let (_dir, store, ca, ca_der) = fixture();
        let batch = store.write_batch().unwrap();
        create(batch.txn()).unwrap();
        let mut appender = Appender::new(batch.txn(), ca_der).unwrap();
        let mut replica = MemoryNodes::default();
        let mut chain_head = [0; 32];
        for seqno in 0..5 {
            let entry = appender.append(seqno, 1, Payload::Blank).unwrap();
            merkle::append(&mut replica, seqno, &entry.components().leaf()).unwrap();
            chain_head = entry.chain;
        }
        let root = merkle::root(&replica, 5).unwrap();
        let good = SignaturePayload::sign(5, root, chain_head, &signer(&ca));
        appender.append(5, 1, Payload::Tx(TxEntry::signature(good.clone()))).expect("a matching signature passes");

        let mut wrong_root = good.clone();
        wrong_root.root[0] ^= 1;
        let err = appender.append(6, 1, Payload::Tx(TxEntry::signature(wrong_root))).unwrap_err();
        assert!(matches!(&err, IndexError::Refused { seqno: 6, message } if message.contains("root")), "{err}");

        let stranger = ServiceCa::generate("another service").unwrap();
        let forged = SignaturePayload::sign(5, root, chain_head, &signer(&stranger));
        let err = appender.append(6, 1, Payload::Tx(TxEntry::signature(forged))).unwrap_err();
        assert!(err.to_string().contains("ledger entry 6") && err.to_string().contains("not issued"), "{err}");
    }

    /// A snapshot's seal binds its ledger position to a signature by an endorsed node: the
    /// genuine seal passes; a moved position, a missing leaf, a signer the snapshot's service
    /// never endorsed or had retired, and a position no signature reaches yet are each refused.
    #[test]
    fn a_snapshot_seal_holds_only_for_its_own_position_and_an_endorsed_signer() {
        let (_dir, store, ca, ca_der) = fixture();
        let node = signer(&ca);
        let batch = store.write_batch().unwrap();
        create(batch.txn()).unwrap();
        let mut appender = Appender::new(batch.txn(), ca_der).unwrap();
        let mut replica = MemoryNodes::default();
        let mut chains = Vec::new();
        let mut chain_head = [0; 32];
        for seqno in 0..10 {
            let payload = if seqno == 5 || seqno == 9 {
                let root = merkle::root(&replica, seqno).unwrap();
                Payload::Tx(TxEntry::signature(SignaturePayload::sign(seqno, root, chain_head, &node)))
            } else {
                Payload::Blank
            };
            let entry = appender.append(seqno, 1, payload).unwrap();
            merkle::append(&mut replica, seqno, &entry.components().leaf()).unwrap();
            chain_head = entry.chain;
            chains.push(entry.chain);
        }
        appender.finish().unwrap();
        batch.commit().unwrap();
        let read = store.read_txn().unwrap();
        let start_at = |next: u64| StartState {
            next,
            chain: chains[next as usize - 1],
            frontier: merkle::frontier(&replica, next).unwrap(),
        };
        let endorsed = |until: Option<u64>| {
            let mut e = crate::verify::SnapshotEndorsements::default();
            let record = cloister_store::gov::EndorsementRecord {
                cert_sha256: hex::encode(crate::entry::cert_sha256(&node.cert_der)),
                until,
                signature: None,
            };
            e.note(node.node_id.to_string().as_bytes(), &serde_json::to_vec(&record).unwrap()).unwrap();
            e
        };

        let seal = snapshot_seal(&read, 7).unwrap().expect("entry 9 signs a tree of 9 entries");
        assert_eq!((seal.signature.seqno, seal.leaves.len()), (9, 2));
        seal.check(&start_at(7), &endorsed(None)).expect("the genuine seal holds");
        let at_signature = snapshot_seal(&read, 9).unwrap().unwrap();
        assert!(at_signature.leaves.is_empty());
        at_signature.check(&start_at(9), &endorsed(None)).expect("a snapshot ending where the tree does");

        let err = seal.check(&start_at(6), &endorsed(None)).unwrap_err();
        assert!(err.contains("carries 2 leaves"), "{err}");
        let mut moved = start_at(7);
        moved.frontier[0].2[0] ^= 1;
        let err = seal.check(&moved, &endorsed(None)).unwrap_err();
        assert!(err.contains("is not part of the tree"), "{err}");
        let mut rechained = start_at(7);
        rechained.chain[0] ^= 1;
        assert!(seal.check(&rechained, &endorsed(None)).unwrap_err().contains("is not part of the tree"));
        let mut short = seal.clone();
        short.leaves.pop();
        assert!(short.check(&start_at(7), &endorsed(None)).unwrap_err().contains("carries 1 leaves"));
        let err = seal.check(&start_at(7), &Default::default()).unwrap_err();
        assert!(err.contains("never endorsed"), "{err}");
        let err = seal.check(&start_at(7), &endorsed(Some(8))).unwrap_err();
        assert!(err.contains("retired"), "{err}");
        assert!(snapshot_seal(&read, 10).unwrap().is_none(), "no signature reaches entry 9 yet");
    }
}
