//! `cloister-crypto`: the keys, certificates and primitives every other Cloister crate shares.
//!
//! - [`identity`]: P-384 identities, the service CA, node certificates, and ids from certificates;
//! - [`seal`]: AES-256-GCM sealing under the ledger secret;
//! - [`envelope`]: secrets sealed to a P-384 public key (a joining node's, a recovery member's);
//! - [`recovery`]: the ledger secret wrapped, and its key split into members' recovery shares;
//! - [`cose`]: COSE_Sign1 governance requests, signed and verified;
//! - [`tls`]: the rustls configurations of clients, the client port and the peer port.
//!
//! It knows nothing of storage, contracts or consensus.

/// Unit and property tests measure their allocations (see `cloister-test-support`).
#[cfg(test)]
#[global_allocator]
static ALLOC: cloister_test_support::TrackingAllocator = cloister_test_support::TrackingAllocator;

pub mod cose;
pub mod envelope;
pub mod identity;
pub mod recovery;
pub mod seal;
pub mod secrets;
pub mod tls;

/// A node's id: the first eight bytes of the SHA-256 of its certificate (DER).
pub type NodeId = u64;

/// A node's id from its certificate: the first eight bytes of its SHA-256.
pub fn node_id_of(cert_der: &[u8]) -> NodeId {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// `N` bytes from the operating system's random source, for tokens and nonces.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("the OS random source works");
    bytes
}
