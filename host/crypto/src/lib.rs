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

/// Bytes of the operating system's random source each thread fetches at once for [`unique_bytes`].
const UNIQUE_POOL_BYTES: usize = 4096;

/// `N` bytes from the operating system's random source, served from a per-thread buffer that one
/// `getrandom` refills [`UNIQUE_POOL_BYTES`] at a time. For values that must never repeat but
/// are not secret (a sealed blob's salt, a transaction's id): each write seals a few, and a
/// system call apiece was a tenth of a busy node's system calls. Keys and tokens use
/// [`random_bytes`], so no secret sits in a buffer before it is needed.
pub fn unique_bytes<const N: usize>() -> [u8; N] {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<(usize, [u8; UNIQUE_POOL_BYTES])> =
            const { RefCell::new((UNIQUE_POOL_BYTES, [0; UNIQUE_POOL_BYTES])) };
    }
    const { assert!(N <= UNIQUE_POOL_BYTES) };
    POOL.with_borrow_mut(|(used, pool)| {
        if UNIQUE_POOL_BYTES - *used < N {
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), pool).expect("the OS random source works");
            *used = 0;
        }
        let bytes: [u8; N] = pool[*used..*used + N].try_into().expect("N bytes");
        // Never served twice.
        pool[*used..*used + N].fill(0);
        *used += N;
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_bytes_never_repeat_across_pool_refills() {
        // Three pools' worth of 16-byte draws, so the buffer is refilled twice on the way.
        let draws = 3 * UNIQUE_POOL_BYTES / 16;
        let seen: std::collections::HashSet<[u8; 16]> = (0..draws).map(|_| unique_bytes()).collect();
        assert_eq!(seen.len(), draws);
        assert!(!seen.contains(&[0; 16]), "a served slice was zero: the pool was not refilled");
        // Draws that do not divide the pool still come whole from one refill.
        let odd: std::collections::HashSet<[u8; 24]> = (0..draws).map(|_| unique_bytes()).collect();
        assert_eq!(odd.len(), draws);
    }
}
