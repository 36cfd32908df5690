//! Sealing with the ledger secret: AES-256-GCM from ring, with a fresh key per sealed value.
//!
//! Every sealed blob is `salt(16) ‖ ciphertext ‖ tag`; its key is HKDF-SHA256 of the ledger secret
//! with the purpose and the random salt as info, and its nonce is zero. A key is never used twice
//! (2^-64 salt collisions over 2^32 seals), so no nonce bookkeeping is needed. The associated
//! data binds a blob to where it belongs (a table key, a transaction), so blobs cannot be moved.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

const SALT_BYTES: usize = 16;
pub(crate) const SECRET_BYTES: usize = 32;

/// What a sealed blob is for; part of its key derivation, so blobs of one purpose never open as
/// another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Private writes inside a ledger entry (and so in the Raft log and ledger files).
    LedgerPrivate,
    /// A value of a private map in the state database.
    StateValue,
    /// A private map entry (key and value) inside a snapshot.
    SnapshotEntry,
    /// The ledger secret itself, at rest under a node's sealing key.
    SecretAtRest,
    /// The ledger secret wrapped for recovery, under a key that only a threshold of recovery
    /// members' shares rebuild (`gov.recovery`).
    RecoveryWrap,
    /// A ledger secret sealed under its successor after a rekey (`crate::secrets`), so holders
    /// of the newest secret can open every older one.
    PreviousSecret,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::LedgerPrivate => b"cloister ledger private v1",
            Purpose::StateValue => b"cloister state value v1",
            Purpose::SnapshotEntry => b"cloister snapshot entry v1",
            Purpose::SecretAtRest => b"cloister secret at rest v1",
            Purpose::RecoveryWrap => b"cloister recovery wrap v1",
            Purpose::PreviousSecret => b"cloister previous ledger secret v1",
        }
    }
}

/// Why a blob did not open: it was changed, moved, or sealed under another secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a sealed blob does not open: it was altered, moved, or sealed under another ledger secret")]
pub struct SealError;

struct OkmLen;

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        32
    }
}

/// Opens sealed blobs: a [`Sealer`] with its one secret, or a service's
/// [`LedgerSecrets`](crate::secrets::LedgerSecrets) with any of theirs.
pub trait Unseal {
    fn open(&self, purpose: Purpose, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError>;
}

impl Unseal for Sealer {
    fn open(&self, purpose: Purpose, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        Sealer::open(self, purpose, aad, sealed)
    }
}

/// Seals and opens blobs under one secret.
pub struct Sealer {
    prk: hkdf::Prk,
    /// The key of [`Sealer::private_key_digest`], derived once.
    key_digest_key: [u8; 32],
}

/// HKDF info for the key that hides private map keys at rest.
const KEY_DIGEST_LABEL: &[u8] = b"cloister private map key digest v1";
/// HKDF info for the key of snapshot MACs.
const SNAPSHOT_MAC_LABEL: &[u8] = b"cloister snapshot mac v1";
/// HKDF info for the key of forwarded calls' caller MACs.
const FORWARD_MAC_LABEL: &[u8] = b"cloister forwarded caller mac v1";

impl std::fmt::Debug for Sealer {
    // Never show the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// The 32-byte key HKDF expands from `prk` for `label`.
fn derived_key(prk: &hkdf::Prk, label: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    prk.expand(&[label], OkmLen).and_then(|okm| okm.fill(&mut key)).expect("HKDF fills 32 bytes");
    key
}

impl Sealer {
    pub fn new(secret: &[u8; SECRET_BYTES]) -> Sealer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cloister sealing v1").extract(secret);
        let key_digest_key = derived_key(&prk, KEY_DIGEST_LABEL);
        Sealer { prk, key_digest_key }
    }

    /// A MAC over a whole snapshot file (BLAKE3 in keyed mode), under a key derived from the
    /// ledger secret: only holders of the secret can make a snapshot a node will install.
    pub fn snapshot_mac(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&derived_key(&self.prk, SNAPSHOT_MAC_LABEL))
    }

    /// A MAC over a call one node forwards to another in its client's name (BLAKE3 in keyed
    /// mode), under a key derived from the ledger secret: a node certificate alone, which the
    /// operator may hold, cannot name a caller.
    pub fn forward_mac(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&derived_key(&self.prk, FORWARD_MAC_LABEL))
    }

    /// A keyed digest (BLAKE3 in keyed mode, a PRF) of a private map's table key: what the state
    /// database stores in its place, so that equal keys still meet and nothing about a key shows
    /// but that it is one. Only holders of the ledger secret can compute or test one.
    pub fn private_key_digest(&self, table_key: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.key_digest_key, table_key).as_bytes()
    }

    /// A fresh random secret from the operating system.
    pub fn generate_secret() -> [u8; SECRET_BYTES] {
        let mut secret = [0u8; SECRET_BYTES];
        SystemRandom::new().fill(&mut secret).expect("the OS random source works");
        secret
    }

    fn key(&self, purpose: Purpose, salt: &[u8]) -> LessSafeKey {
        let info = [purpose.label(), salt];
        let okm = self.prk.expand(&info, OkmLen).expect("HKDF output of 32 bytes");
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).expect("HKDF fills 32 bytes");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES key"))
    }

    pub fn seal(&self, purpose: Purpose, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let salt: [u8; SALT_BYTES] = crate::unique_bytes();
        let key = self.key(purpose, &salt);
        let mut out = Vec::with_capacity(SALT_BYTES + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&salt);
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut out[SALT_BYTES..])
            .expect("AES-GCM seals any length we use");
        out.extend_from_slice(tag.as_ref());
        out
    }

    pub fn open(&self, purpose: Purpose, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SALT_BYTES + AES_256_GCM.tag_len() {
            return Err(SealError);
        }
        let (salt, body) = sealed.split_at(SALT_BYTES);
        let key = self.key(purpose, salt);
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut body)
            .map_err(|_| SealError)?;
        Ok(plain.to_vec())
    }
}

/// The key that protects a node's copy of the ledger secret at rest, derived from the node's
/// private key (which lives outside the data folder). A host that reads only the data folder
/// cannot open the secret; one that also reads the node key can: where the platform offers a key
/// of its own, [`sealing_key_with_platform`] binds the secret to it too.
pub fn sealing_key_from_node_key(node_key_pem: &str) -> anyhow::Result<Sealer> {
    let der = crate::identity::private_key(node_key_pem.as_bytes())?;
    sealing_key_from(b"cloister node sealing key v1", der.secret_der())
}

/// The at-rest key from the node's private key and a key the platform derives for this guest
/// (on SEV-SNP, the firmware's `MSG_KEY_REQ` key bound to the launch measurement): both are
/// needed, so neither a stolen node key nor a data folder moved to a guest with another
/// measurement opens the secret.
pub fn sealing_key_with_platform(node_key_pem: &str, platform_key: &[u8; 32]) -> anyhow::Result<Sealer> {
    let der = crate::identity::private_key(node_key_pem.as_bytes())?;
    // Length-prefixed, so no two pairs of inputs make one input.
    let node = der.secret_der();
    let mut ikm = (node.len() as u32).to_be_bytes().to_vec();
    ikm.extend_from_slice(node);
    ikm.extend_from_slice(platform_key);
    sealing_key_from(b"cloister node and platform sealing key v1", &ikm)
}

fn sealing_key_from(label: &[u8], ikm: &[u8]) -> anyhow::Result<Sealer> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, label).extract(ikm);
    let mut key = [0u8; SECRET_BYTES];
    prk.expand(&[b"ledger secret".as_slice()], OkmLen)
        .and_then(|okm| okm.fill(&mut key))
        .map_err(|_| anyhow::anyhow!("deriving the sealing key failed"))?;
    Ok(Sealer::new(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_open_only_with_their_secret_purpose_and_context() {
        let sealer = Sealer::new(&Sealer::generate_secret());
        let blob = sealer.seal(Purpose::StateValue, b"map\0key", b"plain value");
        assert!(!blob.windows(11).any(|w| w == b"plain value"));
        assert_eq!(sealer.open(Purpose::StateValue, b"map\0key", &blob).unwrap(), b"plain value");
        assert_eq!(sealer.open(Purpose::StateValue, b"map\0other", &blob), Err(SealError));
        assert_eq!(sealer.open(Purpose::SnapshotEntry, b"map\0key", &blob), Err(SealError));
        let other = Sealer::new(&Sealer::generate_secret());
        assert_eq!(other.open(Purpose::StateValue, b"map\0key", &blob), Err(SealError));
        for i in 0..blob.len() {
            let mut flipped = blob.clone();
            flipped[i] ^= 1;
            assert_eq!(sealer.open(Purpose::StateValue, b"map\0key", &flipped), Err(SealError), "byte {i}");
        }
        assert_eq!(sealer.open(Purpose::StateValue, b"", &blob[..10]), Err(SealError));
        assert_ne!(blob, sealer.seal(Purpose::StateValue, b"map\0key", b"plain value"), "fresh salt each time");
    }
}
