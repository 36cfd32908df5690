//! The ledger's Merkle tree: RFC 6962 shape with blake3 (tree leaf = H(0x00 ‖ leaf), node =
//! H(0x01 ‖ left ‖ right)), exactly as `ct-merkle` hashes it.
//!
//! *Why not `ct-merkle`'s tree itself:* it keeps every node in memory and proves inclusion only
//! in the tree at its current size. Receipts need proofs in the tree *at the size a signature
//! covered*, from a tree that outlives restarts. So this module persists the hash of every
//! complete subtree, `(level, index)` → hash, and computes any root or audit path at any size in
//! O(log n) lookups. Verification is `ct-merkle`'s, and the tests check both trees agree.

use std::collections::HashMap;

use ct_merkle::{InclusionProof, RootHash};

pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("tree node ({level}, {index}) is not on this node (its ledger starts after it)")]
    Missing { level: u8, index: u64 },
    #[error("the tree's storage failed: {0}")]
    Storage(String),
    #[error("leaf {index} is not in a tree of {size} leaves")]
    OutOfRange { index: u64, size: u64 },
}

/// Read access to stored complete-subtree hashes.
pub trait Nodes {
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError>;
}

/// Write access to stored complete-subtree hashes.
pub trait NodesMut: Nodes {
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), MerkleError>;
}

/// An in-memory node store, for offline verification and tests.
#[derive(Default)]
pub struct MemoryNodes(HashMap<(u8, u64), Hash>);

impl Nodes for MemoryNodes {
    fn node(&self, level: u8, index: u64) -> Result<Option<Hash>, MerkleError> {
        Ok(self.0.get(&(level, index)).copied())
    }
}

impl NodesMut for MemoryNodes {
    fn set_node(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), MerkleError> {
        self.0.insert((level, index), hash);
        Ok(())
    }
}

pub(crate) fn leaf_node(leaf: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0x00]);
    h.update(leaf);
    *h.finalize().as_bytes()
}

pub fn parent(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0x01]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

fn get(nodes: &impl Nodes, level: u8, index: u64) -> Result<Hash, MerkleError> {
    nodes.node(level, index)?.ok_or(MerkleError::Missing { level, index })
}

/// Appends `leaf` as leaf number `size` (0-based), storing it and every subtree it completes.
pub fn append(nodes: &mut impl NodesMut, size: u64, leaf: &Hash) -> Result<(), MerkleError> {
    let mut hash = leaf_node(leaf);
    let (mut level, mut index) = (0u8, size);
    nodes.set_node(level, index, hash)?;
    while index % 2 == 1 {
        hash = parent(&get(nodes, level, index - 1)?, &hash);
        level += 1;
        index /= 2;
        nodes.set_node(level, index, hash)?;
    }
    Ok(())
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The hash of leaves `[start, start + len)`, a range RFC 6962's recursion produces (so `start`
/// is a multiple of the largest power of two in `len`'s left part).
fn range_hash(nodes: &impl Nodes, start: u64, len: u64) -> Result<Hash, MerkleError> {
    if len.is_power_of_two() && start.is_multiple_of(len) {
        return get(nodes, len.trailing_zeros() as u8, start / len);
    }
    let k = split(len);
    Ok(parent(&range_hash(nodes, start, k)?, &range_hash(nodes, start + k, len - k)?))
}

/// The root of the tree of the first `size` leaves.
pub fn root(nodes: &impl Nodes, size: u64) -> Result<Hash, MerkleError> {
    if size == 0 {
        return Ok(*blake3::hash(b"").as_bytes());
    }
    range_hash(nodes, 0, size)
}

/// The audit path of leaf `index` in the tree of `size` leaves (RFC 6962 PATH), bottom-up.
pub fn path(nodes: &impl Nodes, index: u64, size: u64) -> Result<Vec<Hash>, MerkleError> {
    if index >= size {
        return Err(MerkleError::OutOfRange { index, size });
    }
    let mut out = Vec::new();
    let (mut start, mut len, mut m) = (0u64, size, index);
    // Descend from the root, recording each sibling; the path is read bottom-up.
    let mut siblings = Vec::new();
    while len > 1 {
        let k = split(len);
        if m < k {
            siblings.push(range_hash(nodes, start + k, len - k)?);
            len = k;
        } else {
            siblings.push(range_hash(nodes, start, k)?);
            start += k;
            m -= k;
            len -= k;
        }
    }
    out.extend(siblings.into_iter().rev());
    Ok(out)
}

/// The complete subtrees that make up the tree of `size` leaves, largest first: all a node needs
/// to continue the tree from that size (after installing a snapshot).
pub(crate) fn frontier(nodes: &impl Nodes, size: u64) -> Result<Vec<(u8, u64, Hash)>, MerkleError> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for level in (0..64u8).rev() {
        let width = 1u64 << level;
        if size & width != 0 {
            out.push((level, start / width, get(nodes, level, start / width)?));
            start += width;
        }
    }
    Ok(out)
}

/// Whether `path` proves `leaf` at `index` in the tree of `size` leaves with `root` (ct-merkle's
/// verification).
pub fn verify(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    let root = RootHash::<blake3::Hasher>::new((*root).into(), size);
    let proof = InclusionProof::<blake3::Hasher>::from_bytes(path.concat());
    root.verify_inclusion(leaf, index, &proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_merkle::mem_backed_tree::MemoryBackedTree;

    fn leaf(i: u64) -> Hash {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    /// For every size up to 70 and every leaf: the root equals ct-merkle's, the path verifies,
    /// and a path to a historical size verifies against that size's root.
    #[test]
    fn agrees_with_ct_merkle_at_every_size() {
        let mut ours = MemoryNodes::default();
        let mut reference = MemoryBackedTree::<blake3::Hasher, Hash>::new();
        let mut roots = Vec::new();
        for size in 1..=70u64 {
            append(&mut ours, size - 1, &leaf(size - 1)).unwrap();
            reference.push(leaf(size - 1));
            let r = root(&ours, size).unwrap();
            assert_eq!(&r[..], reference.root().as_bytes().as_slice(), "root at size {size}");
            roots.push(r);
            for i in 0..size {
                let p = path(&ours, i, size).unwrap();
                let theirs = reference.prove_inclusion(i as usize);
                assert_eq!(p.concat(), theirs.as_bytes(), "path of {i} at size {size}");
                assert!(verify(&leaf(i), i, size, &p, &r));
            }
        }
        // Proofs against old sizes still verify against those sizes' roots, not the new root.
        let p = path(&ours, 5, 20).unwrap();
        assert!(verify(&leaf(5), 5, 20, &p, &roots[19]));
        assert!(!verify(&leaf(5), 5, 20, &p, &roots[69]));
        assert!(!verify(&leaf(6), 5, 20, &p, &roots[19]));
        assert!(path(&ours, 20, 20).is_err());
    }

    #[test]
    fn a_frontier_is_enough_to_continue() {
        let mut full = MemoryNodes::default();
        for i in 0..37 {
            append(&mut full, i, &leaf(i)).unwrap();
        }
        let mut resumed = MemoryNodes::default();
        for (level, index, hash) in frontier(&full, 37).unwrap() {
            resumed.set_node(level, index, hash).unwrap();
        }
        for i in 37..100 {
            append(&mut full, i, &leaf(i)).unwrap();
            append(&mut resumed, i, &leaf(i)).unwrap();
            assert_eq!(root(&resumed, i + 1).unwrap(), root(&full, i + 1).unwrap());
        }
        assert_eq!(path(&resumed, 80, 100).unwrap(), path(&full, 80, 100).unwrap());
        assert!(matches!(path(&resumed, 3, 100), Err(MerkleError::Missing { .. })));
    }
}
