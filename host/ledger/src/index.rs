//! The ledger's index, kept in the state database so it commits with the state it describes:
//! the tree's complete-subtree hashes, each entry's leaf components and chain hash, the
//! signature entries, and where the ledger stands.
//!
//! Everything but the signatures is one table keyed by `(seqno, kind)`. The rows an entry adds
//! (its leaf record and the subtrees it completes) sit side by side at the table's right edge,
//! beside the state row, so applying a one-entry batch copies one path of one B-tree when it
//! commits. With a table for each kind, every applied batch copied a path in each of four trees:
//! the ledger bench's one-entry commits cost 37–42 µs per entry that way, 26–29 µs this way.

use redb::{ReadableTable, TableDefinition};

use super::entry::{LeafComponents, LedgerEntry, Payload, SignaturePayload, chain};
use super::files::StartState;
use super::merkle::{self, Hash, MerkleError, Nodes, NodesMut};
use super::verify::{SignatureRecord, SnapshotSeal};

/// `(seqno, kind)` → a row of the kind:
/// - `0..=63`, a level: the hash of the complete subtree at that level whose last leaf is
///   `seqno` (32 bytes), so subtree `(level, index)` is at seqno `(index + 1) · 2^level − 1`;
/// - [`LEAF`]: the entry's chain hash (32 bytes), then its leaf components (postcard);
/// - [`STATE_ROW`]: the [`LedgerState`] (postcard).
const INDEX: TableDefinition<(u64, u8), &[u8]> = TableDefinition::new("ledger_index");
/// Seqno → the signature entry's [`SignatureRecord`]: receipts and snapshot seals look for the
/// first signature after a seqno, a scan that this table keeps short.
const SIGNATURES: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_signatures");
const LEAF: u8 = 64;
/// After every entry's rows, and so beside the newest of them. No entry has this seqno: Raft's
/// indexes would need 2^64 entries to reach it, and [`Appender::append`] refuses it.
const STATE_ROW: (u64, u8) = (u64::MAX, u8::MAX);

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

/// Where subtree `(level, index)` is kept: under the seqno of its last leaf. None for a subtree
/// past the end of any possible tree.
fn node_key(level: u8, index: u64) -> Option<(u64, u8)> {
    let width = 1u64.checked_shl(level.into())?;
    let end = index.checked_add(1)?.checked_mul(width)? - 1;
    (level < LEAF && end != STATE_ROW.0).then_some((end, level))
}

fn read_node(
    table: &impl ReadableTable<(u64, u8), &'static [u8]>,
    level: u8,
    index: u64,
) -> Result<Option<Hash>, MerkleError> {
    let Some(key) = node_key(level, index) else { return Ok(None) };
    let Some(row) = table.get(key).map_err(storage)? else { return Ok(None) };
    let hash = row.value().try_into().map_err(|_| storage(format!("tree node ({level}, {index}) is not 32 bytes")))?;
    Ok(Some(hash))
}

/// Entry `seqno`'s chain hash and leaf components.
fn read_leaf(
    table: &impl ReadableTable<(u64, u8), &'static [u8]>,
    seqno: u64,
) -> Result<Option<(Hash, LeafComponents)>, MerkleError> {
    let Some(row) = table.get((seqno, LEAF)).map_err(storage)? else { return Ok(None) };
    let bytes = row.value();
    let (chain, components) = bytes
        .split_first_chunk::<32>()
        .ok_or_else(|| storage(format!("the leaf record of entry {seqno} is {} bytes", bytes.len())))?;
    Ok(Some((*chain, postcard::from_bytes(components).map_err(storage)?)))
}

/// Keeps entry `seqno`'s leaf record: its chain hash, then its leaf components as postcard bytes.
fn write_leaf(
    table: &mut redb::Table<'_, (u64, u8), &'static [u8]>,
    seqno: u64,
    chain: &Hash,
    components: &[u8],
) -> Result<(), MerkleError> {
    let record = [chain.as_slice(), components].concat();
    table.insert((seqno, LEAF), record.as_slice()).map_err(storage)?;
    Ok(())
}

fn read_state(table: &impl ReadableTable<(u64, u8), &'static [u8]>) -> Result<LedgerState, MerkleError> {
    let bytes = table.get(STATE_ROW).map_err(storage)?.ok_or_else(|| storage("the ledger state is missing"))?;
    postcard::from_bytes(bytes.value()).map_err(storage)
}

fn write_state(table: &mut redb::Table<'_, (u64, u8), &'static [u8]>, state: &LedgerState) -> Result<(), MerkleError> {
    let bytes = postcard::to_stdvec(state).expect("encodes");
    table.insert(STATE_ROW, bytes.as_slice()).map_err(storage)?;
    Ok(())
}

/// The index as the [`Appender`] holds it, open for its batch.
struct IndexTable<'t>(redb::Table<'t, (u64, u8), &'static [u8]>);

impl Nodes for IndexTable<'_> {
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        read_node(&self.0, level, index)
    }
}

impl NodesMut for IndexTable<'_> {
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), MerkleError> {
        let key =
            node_key(level, index).ok_or_else(|| storage(format!("tree node ({level}, {index}) is out of range")))?;
        self.0.insert(key, hash.as_slice()).map_err(storage)?;
        Ok(())
    }
}

struct ReadIndex(redb::ReadOnlyTable<(u64, u8), &'static [u8]>);

impl Nodes for ReadIndex {
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        read_node(&self.0, level, index)
    }
}

fn open_read(read: &redb::ReadTransaction) -> Result<ReadIndex, MerkleError> {
    Ok(ReadIndex(read.open_table(INDEX).map_err(storage)?))
}

/// Creates the tables, so reads never meet a missing table, and moves an index kept in the
/// earlier separate tables into them.
pub fn create(txn: &redb::WriteTransaction) -> Result<(), MerkleError> {
    txn.open_table(SIGNATURES).map_err(storage)?;
    let mut index = IndexTable(txn.open_table(INDEX).map_err(storage)?);
    if separate_tables::held(txn)? {
        separate_tables::move_into(txn, &mut index)?;
    }
    if index.0.get(STATE_ROW).map_err(storage)?.is_none() {
        write_state(&mut index.0, &LedgerState { size: 0, chain: [0; 32], first: 0 })?;
    }
    Ok(())
}

pub fn state(read: &redb::ReadTransaction) -> Result<LedgerState, MerkleError> {
    read_state(&open_read(read)?.0)
}

/// Appends entries to the index inside a write transaction, checking signature entries against
/// the tree as it stands. It holds the index's tables open for the batch: opening a redb table
/// costs a lookup in the table tree.
pub struct Appender<'t> {
    index: IndexTable<'t>,
    signatures: redb::Table<'t, u64, &'static [u8]>,
    state: LedgerState,
    service_cert: Vec<u8>,
}

impl<'t> Appender<'t> {
    pub fn new(txn: &'t redb::WriteTransaction, service_cert: Vec<u8>) -> Result<Self, MerkleError> {
        let index = txn.open_table(INDEX).map_err(storage)?;
        let state = read_state(&index)?;
        Ok(Appender {
            index: IndexTable(index),
            signatures: txn.open_table(SIGNATURES).map_err(storage)?,
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
        if seqno == STATE_ROW.0 {
            return Err(refuse("the ledger is full".into()));
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
        merkle::append(&mut self.index, seqno, &leaf)?;
        entry.chain = chain(&self.state.chain, &leaf);
        let encoded = postcard::to_stdvec(&components).expect("encodes");
        write_leaf(&mut self.index.0, seqno, &entry.chain, &encoded)?;
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
        let root = merkle::root(&self.index, sig.tree_size).map_err(|e| e.to_string())?;
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
            read_leaf(&self.index.0, sig.tree_size - 1).map_err(|e| e.to_string())?.map(|(chain, _)| chain)
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
        write_state(&mut self.index.0, &self.state)?;
        Ok(self.state)
    }
}

/// The start state at the current size: what a snapshot carries so a node can continue.
pub fn start_state(read: &redb::ReadTransaction) -> Result<StartState, MerkleError> {
    let index = open_read(read)?;
    let s = read_state(&index.0)?;
    Ok(StartState { next: s.size, chain: s.chain, frontier: merkle::frontier(&index, s.size)? })
}

/// Replaces the index with a start state (when a snapshot is installed).
pub fn reset(txn: &redb::WriteTransaction, start: &StartState) -> Result<(), MerkleError> {
    let mut index = IndexTable(txn.open_table(INDEX).map_err(storage)?);
    index.0.retain(|_, _| false).map_err(storage)?;
    for (level, at, hash) in &start.frontier {
        index.set_node(*level, *at, *hash)?;
    }
    txn.open_table(SIGNATURES).map_err(storage)?.retain(|_, _| false).map_err(storage)?;
    write_state(&mut index.0, &LedgerState { size: start.next, chain: start.chain, first: start.next })
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
    let index = open_read(read)?;
    let s = read_state(&index.0)?;
    if seqno < s.first {
        return Ok(Err(ReceiptUnavailable::NotHeld { first: s.first }));
    }
    let Some((_, leaf)) = read_leaf(&index.0, seqno)? else { return Ok(Err(ReceiptUnavailable::NotFound)) };
    let signatures = read.open_table(SIGNATURES).map_err(storage)?;
    for item in signatures.range(seqno + 1..).map_err(storage)? {
        let (_, bytes) = item.map_err(storage)?;
        let record: SignatureRecord = postcard::from_bytes(bytes.value()).map_err(storage)?;
        if record.payload.tree_size > seqno {
            let proof = merkle::path(&index, seqno, record.payload.tree_size)?;
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
        let index = open_read(read)?;
        let leaves = (next..signature.payload.tree_size)
            .map(|seqno| {
                let (_, components) =
                    read_leaf(&index.0, seqno)?.ok_or(MerkleError::Missing { level: 0, index: seqno })?;
                Ok(components.leaf())
            })
            .collect::<Result<Vec<_>, MerkleError>>()?;
        return Ok(Some(SnapshotSeal { signature, leaves }));
    }
    Ok(None)
}

/// The root and chain head over the first `size` entries, for signing.
pub fn signing_view(read: &redb::ReadTransaction) -> Result<(u64, Hash, Hash), MerkleError> {
    let index = open_read(read)?;
    let s = read_state(&index.0)?;
    Ok((s.size, merkle::root(&index, s.size)?, s.chain))
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

/// The index as nodes kept it before it was one table: a table each for the tree's nodes, the
/// leaf components, the chain hashes and the state. A node that finds them moves their rows into
/// the one table when it opens its ledger, in the same transaction that deletes them.
mod separate_tables {
    use redb::{ReadableTable, TableDefinition, TableHandle};

    use super::{IndexTable, LedgerState, MerkleError, NodesMut, storage, write_leaf, write_state};

    pub(super) const NODES: TableDefinition<(u8, u64), &[u8; 32]> = TableDefinition::new("ledger_nodes");
    pub(super) const LEAVES: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_leaves");
    pub(super) const CHAINS: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("ledger_chains");
    pub(super) const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_state");
    pub(super) const STATE_KEY: &str = "state";

    pub(super) fn held(txn: &redb::WriteTransaction) -> Result<bool, MerkleError> {
        Ok(txn.list_tables().map_err(storage)?.any(|t| t.name() == STATE.name()))
    }

    pub(super) fn move_into(txn: &redb::WriteTransaction, index: &mut IndexTable<'_>) -> Result<(), MerkleError> {
        let state: LedgerState = {
            let table = txn.open_table(STATE).map_err(storage)?;
            let bytes = table.get(STATE_KEY).map_err(storage)?.ok_or_else(|| storage("the ledger state is missing"))?;
            postcard::from_bytes(bytes.value()).map_err(storage)?
        };
        let mut nodes = 0u64;
        for row in txn.open_table(NODES).map_err(storage)?.iter().map_err(storage)? {
            let (key, hash) = row.map_err(storage)?;
            let (level, at) = key.value();
            index.set_node(level, at, *hash.value())?;
            nodes += 1;
        }
        let chains = txn.open_table(CHAINS).map_err(storage)?;
        let mut leaves = 0u64;
        for row in txn.open_table(LEAVES).map_err(storage)?.iter().map_err(storage)? {
            let (seqno, components) = row.map_err(storage)?;
            let seqno = seqno.value();
            let chain = chains
                .get(seqno)
                .map_err(storage)?
                .ok_or_else(|| storage(format!("entry {seqno} has no chain hash")))?;
            write_leaf(&mut index.0, seqno, chain.value(), components.value())?;
            leaves += 1;
        }
        drop(chains);
        write_state(&mut index.0, &state)?;
        txn.delete_table(NODES).map_err(storage)?;
        txn.delete_table(LEAVES).map_err(storage)?;
        txn.delete_table(CHAINS).map_err(storage)?;
        txn.delete_table(STATE).map_err(storage)?;
        tracing::info!(nodes, leaves, size = state.size, "moved the ledger index into one table");
        Ok(())
    }
}

/// Why an entry cannot join this node's ledger.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("ledger entry {seqno}: {message}")]
    Refused { seqno: u64, message: String },
    #[error(transparent)]
    Merkle(#[from] MerkleError),
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

    /// Every complete subtree of trees up to 300 leaves has a key of its own, none of them a
    /// leaf record's or the state's, under the seqno of its last leaf; subtrees past the end of
    /// any possible tree have none.
    #[test]
    fn each_subtree_is_kept_under_its_last_leaf_and_nothing_else_is() {
        let mut seen = std::collections::HashSet::new();
        for size in 1..=300u64 {
            for level in 0..9u8 {
                let width = 1u64 << level;
                if size % width == 0 {
                    let key = node_key(level, size / width - 1).unwrap();
                    assert_eq!(key, (size - 1, level));
                    assert!(seen.insert(key), "{key:?} twice");
                }
            }
        }
        assert!(seen.iter().all(|&(seqno, kind)| kind < LEAF && (seqno, kind) != STATE_ROW));
        assert_eq!(node_key(63, 1), None, "ends past u64::MAX");
        assert_eq!(node_key(0, u64::MAX), None);
        assert_eq!(node_key(64, 0), None);
        assert_eq!(node_key(1, u64::MAX / 2), None, "would sit on the state row");
    }

    /// A state database that kept the index in separate tables (nodes, leaves, chains, state)
    /// opens with the same ledger as one built in the single table: the same state, root,
    /// frontier, receipts and seals, and the next entry appends alike. The old tables are gone.
    #[test]
    fn an_index_in_separate_tables_moves_into_one_and_reads_the_same() {
        use redb::TableHandle;

        struct Recording(MemoryNodes, Vec<(u8, u64, Hash)>);
        impl Nodes for Recording {
            fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
                self.0.node(level, index)
            }
        }
        impl NodesMut for Recording {
            fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), MerkleError> {
                self.1.push((level, index, hash));
                self.0.set_node(level, index, hash)
            }
        }

        let (_dir, one_table, ca, ca_der) = fixture();
        let node = signer(&ca);
        let old_dir = tempfile::tempdir().unwrap();
        let separate = cloister_store::Store::open(&old_dir.path().join("state.redb")).unwrap();
        let mut recorded = Recording(MemoryNodes::default(), Vec::new());
        let (mut leaves, mut signatures) = (Vec::new(), Vec::new());
        {
            let batch = one_table.write_batch().unwrap();
            create(batch.txn()).unwrap();
            let mut appender = Appender::new(batch.txn(), ca_der.clone()).unwrap();
            let mut chain_head = [0; 32];
            for seqno in 0..41 {
                let payload = if seqno % 10 == 9 {
                    let root = merkle::root(&recorded, seqno).unwrap();
                    Payload::Tx(TxEntry::signature(SignaturePayload::sign(seqno, root, chain_head, &node)))
                } else {
                    Payload::Blank
                };
                let entry = appender.append(seqno, 2, payload).unwrap();
                let components = entry.components();
                merkle::append(&mut recorded, seqno, &components.leaf()).unwrap();
                if let Some(sig) = entry.payload.signature() {
                    signatures.push(SignatureRecord { seqno, term: 2, payload: sig.clone() });
                }
                leaves.push((components, entry.chain));
                chain_head = entry.chain;
            }
            appender.finish().unwrap();
            batch.commit().unwrap();
        }
        let state_before = LedgerState { size: 41, chain: leaves[40].1, first: 0 };
        {
            // As a node of the earlier layout wrote them.
            let batch = separate.write_batch().unwrap();
            let txn = batch.txn();
            let mut nodes = txn.open_table(separate_tables::NODES).unwrap();
            for (level, index, hash) in &recorded.1 {
                nodes.insert((*level, *index), hash).unwrap();
            }
            let mut leaf_table = txn.open_table(separate_tables::LEAVES).unwrap();
            let mut chains = txn.open_table(separate_tables::CHAINS).unwrap();
            for (components, chain) in &leaves {
                leaf_table.insert(components.seqno, postcard::to_stdvec(components).unwrap().as_slice()).unwrap();
                chains.insert(components.seqno, chain).unwrap();
            }
            let mut sigs = txn.open_table(SIGNATURES).unwrap();
            for record in &signatures {
                sigs.insert(record.seqno, postcard::to_stdvec(record).unwrap().as_slice()).unwrap();
            }
            let state = postcard::to_stdvec(&state_before).unwrap();
            txn.open_table(separate_tables::STATE)
                .unwrap()
                .insert(separate_tables::STATE_KEY, state.as_slice())
                .unwrap();
            drop((nodes, leaf_table, chains, sigs));
            batch.commit().unwrap();
        }

        let batch = separate.write_batch().unwrap();
        create(batch.txn()).unwrap();
        batch.commit().unwrap();

        let (moved, reference) = (separate.read_txn().unwrap(), one_table.read_txn().unwrap());
        assert_eq!(state(&moved).unwrap(), state_before);
        assert_eq!(signing_view(&moved).unwrap(), signing_view(&reference).unwrap());
        assert_eq!(start_state(&moved).unwrap(), start_state(&reference).unwrap());
        assert_eq!(last_signed(&moved).unwrap(), Some((39, 39)));
        for seqno in [0, 8, 9, 17, 38] {
            let (a, b) =
                (receipt_parts(&moved, seqno).unwrap().unwrap(), receipt_parts(&reference, seqno).unwrap().unwrap());
            assert_eq!((a.leaf, a.signature.seqno, a.proof), (b.leaf, b.signature.seqno, b.proof), "seqno {seqno}");
        }
        assert_eq!(receipt_parts(&moved, 40).unwrap().err(), Some(ReceiptUnavailable::NotYetSigned));
        assert_eq!(
            snapshot_seal(&moved, 35).unwrap().unwrap().leaves,
            snapshot_seal(&reference, 35).unwrap().unwrap().leaves
        );
        let names: Vec<String> = moved.list_tables().unwrap().map(|t| t.name().to_string()).collect();
        assert!(
            !names
                .iter()
                .any(|n| ["ledger_nodes", "ledger_leaves", "ledger_chains", "ledger_state"].contains(&n.as_str())),
            "{names:?}"
        );
        drop((moved, reference));

        let next = |store: &cloister_store::Store| {
            let batch = store.write_batch().unwrap();
            create(batch.txn()).unwrap();
            let mut appender = Appender::new(batch.txn(), ca_der.clone()).unwrap();
            let entry = appender.append(41, 3, Payload::Blank).unwrap();
            appender.finish().unwrap();
            batch.commit().unwrap();
            (entry.chain, signing_view(&store.read_txn().unwrap()).unwrap())
        };
        assert_eq!(next(&separate), next(&one_table), "the moved index goes on as the other does");
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
