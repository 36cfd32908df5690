//! What the ledger records: transactions as the leader proposed them (public writes in clear,
//! private writes sealed), node and service changes, and signature entries; and how each entry is
//! hashed into a leaf and into the chain.
//!
//! - `content_digest` = blake3 (derive-key "cloister entry content v1") of the entry's payload;
//! - `leaf` = blake3 (derive-key "cloister ledger leaf v1") of (seqno, term, kind, content_digest,
//!   claims_digest): what a receipt proves;
//! - `chain_i` = blake3(chain_{i-1} ‖ leaf_i), with `chain_0` all zeroes.

use std::sync::LazyLock;

use ring::signature::{ECDSA_P384_SHA384_FIXED, EcdsaKeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use cloister_crypto::seal::{Purpose, SealError, Sealer, Unseal};
use cloister_store::{self as kv, WriteSet};

use super::remembered::Remembered;

/// Why a transaction was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxKind {
    /// The service's first transaction: members, users, app, service record.
    Genesis,
    /// An app handler's writes.
    App,
    /// A governance change.
    Gov,
    /// A signature over the ledger so far.
    Signature,
}

/// One transaction in the log: the writes a handler made on the leader, applied as they are by
/// every node (followers never run contract code). Private writes travel sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxEntry {
    /// Random id: the proposer learns the entry's position by it; it binds the sealed writes.
    pub uid: [u8; 16],
    pub kind: TxKind,
    /// Writes to public maps (`gov.*`, `public:*`), in clear.
    pub public: WriteSet,
    /// Writes to private maps, keys and values, sealed with the ledger secret. A byte string: in
    /// postcard the same bytes as a sequence of `u8`, but copied whole.
    #[serde(with = "serde_bytes")]
    pub private: Option<Vec<u8>>,
    /// A digest the app attached; its receipt proves it.
    pub claims_digest: Option<[u8; 32]>,
    pub signature: Option<SignaturePayload>,
}

impl std::fmt::Display for TxEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} tx {}", self.kind, hex::encode(&self.uid[..4]))
    }
}

impl TxEntry {
    /// A transaction whose private writes are sealed under `sealer`.
    pub fn new(kind: TxKind, writes: WriteSet, claims_digest: Option<[u8; 32]>, sealer: &Sealer) -> TxEntry {
        let uid = cloister_crypto::unique_bytes();
        let (public, private) = writes.split(kv::is_public);
        let private = (!private.is_empty()).then(|| {
            sealer.seal(Purpose::LedgerPrivate, &uid, &postcard::to_stdvec(&private).expect("write sets encode"))
        });
        TxEntry { uid, kind, public, private, claims_digest, signature: None }
    }

    pub fn signature(payload: SignaturePayload) -> TxEntry {
        TxEntry {
            uid: cloister_crypto::unique_bytes(),
            kind: TxKind::Signature,
            public: WriteSet::default(),
            private: None,
            claims_digest: None,
            signature: Some(payload),
        }
    }

    /// All the writes, private ones opened with `sealer` (one secret, or a service's versions).
    pub fn writes(&self, sealer: &impl Unseal) -> Result<WriteSet, WritesError> {
        let mut all = self.public_writes()?;
        if let Some(sealed) = &self.private {
            let plain = sealer.open(Purpose::LedgerPrivate, &self.uid, sealed)?;
            let private: WriteSet = postcard::from_bytes(&plain).map_err(|_| SealError)?;
            if let Some((map, _, _)) = private.iter().find(|(map, _, _)| kv::is_public(map)) {
                return Err(WritesError::Misplaced(map.to_owned()));
            }
            all.merge(private);
        }
        Ok(all)
    }

    /// The writes in clear, each checked to be to a public map: an entry [`TxEntry::new`] did
    /// not make (one planted in a stopped node's log) could otherwise write a private map
    /// without the ledger secret.
    pub fn public_writes(&self) -> Result<WriteSet, WritesError> {
        match self.public.iter().find(|(map, _, _)| !kv::is_public(map)) {
            Some((map, _, _)) => Err(WritesError::Misplaced(map.to_owned())),
            None => Ok(self.public.clone()),
        }
    }
}

/// Why a transaction's writes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WritesError {
    #[error(transparent)]
    Sealed(#[from] SealError),
    /// A write on the wrong side of the entry: a private map's in clear, or a public map's
    /// sealed.
    #[error(
        "a write to map {0} is on the wrong side of its entry: public maps are written in clear, private ones sealed"
    )]
    Misplaced(String),
}

/// What kind of ledger entry this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Genesis,
    App,
    Gov,
    Signature,
    /// A change of the network's nodes.
    Membership,
    /// A new leader's first entry.
    Blank,
}

/// A ledger entry's payload.
// Nearly every entry is a transaction: boxing it would allocate for the common case.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    Tx(TxEntry),
    /// The new membership, postcard-encoded.
    Membership(Vec<u8>),
    Blank,
}

impl Payload {
    pub fn kind(&self) -> EntryKind {
        match self {
            Payload::Tx(tx) => match tx.kind {
                TxKind::Genesis => EntryKind::Genesis,
                TxKind::App => EntryKind::App,
                TxKind::Gov => EntryKind::Gov,
                TxKind::Signature => EntryKind::Signature,
            },
            Payload::Membership(_) => EntryKind::Membership,
            Payload::Blank => EntryKind::Blank,
        }
    }

    pub fn claims_digest(&self) -> Option<[u8; 32]> {
        match self {
            Payload::Tx(tx) => tx.claims_digest,
            _ => None,
        }
    }

    pub fn signature(&self) -> Option<&SignaturePayload> {
        match self {
            Payload::Tx(tx) => tx.signature.as_ref(),
            _ => None,
        }
    }

    pub fn content_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("cloister entry content v1");
        h.update(&postcard::to_stdvec(self).expect("payloads encode"));
        *h.finalize().as_bytes()
    }
}

/// One entry as a ledger file stores it: the payload, its position, and the chain through it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub seqno: u64,
    pub term: u64,
    pub payload: Payload,
    pub chain: [u8; 32],
}

impl LedgerEntry {
    pub fn components(&self) -> LeafComponents {
        LeafComponents {
            seqno: self.seqno,
            term: self.term,
            kind: self.payload.kind(),
            content_digest: self.payload.content_digest(),
            claims_digest: self.payload.claims_digest(),
        }
    }
}

/// What a leaf commits to; a receipt carries exactly these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafComponents {
    pub seqno: u64,
    pub term: u64,
    pub kind: EntryKind,
    #[serde(with = "hex_bytes")]
    pub content_digest: [u8; 32],
    #[serde(with = "hex_option")]
    pub claims_digest: Option<[u8; 32]>,
}

impl LeafComponents {
    pub fn leaf(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("cloister ledger leaf v1");
        h.update(
            &postcard::to_stdvec(&(self.seqno, self.term, self.kind, self.content_digest, self.claims_digest))
                .expect("leaves encode"),
        );
        *h.finalize().as_bytes()
    }
}

/// `chain_i = blake3(chain_{i-1} ‖ leaf_i)`.
pub fn chain(previous: &[u8; 32], leaf: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(previous);
    h.update(leaf);
    *h.finalize().as_bytes()
}

/// A leader's signature over the ledger up to `tree_size` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignaturePayload {
    pub tree_size: u64,
    #[serde(with = "hex_bytes")]
    pub root: [u8; 32],
    /// The chain hash through entry `tree_size`.
    #[serde(with = "hex_bytes")]
    pub chain: [u8; 32],
    pub node_id: u64,
    /// The signing node's certificate (DER), issued by the service CA.
    #[serde(with = "hex_vec")]
    pub node_cert: Vec<u8>,
    /// ECDSA P-384 (r ‖ s) over [`SignaturePayload::signed_bytes`].
    #[serde(with = "hex_vec")]
    pub signature: Vec<u8>,
}

impl SignaturePayload {
    /// The bytes a node signs: a domain, the tree size, the root, the chain head, its id.
    pub(crate) fn signed_bytes(tree_size: u64, root: &[u8; 32], chain: &[u8; 32], node_id: u64) -> Vec<u8> {
        let mut out = b"cloister ledger signature v1\0".to_vec();
        out.extend_from_slice(&tree_size.to_be_bytes());
        out.extend_from_slice(root);
        out.extend_from_slice(chain);
        out.extend_from_slice(&node_id.to_be_bytes());
        out
    }

    pub fn sign(tree_size: u64, root: [u8; 32], chain: [u8; 32], signer: &NodeSigner) -> SignaturePayload {
        let bytes = Self::signed_bytes(tree_size, &root, &chain, signer.node_id);
        let signature =
            signer.key.sign(&ring::rand::SystemRandom::new(), &bytes).expect("ECDSA signs").as_ref().to_vec();
        SignaturePayload {
            tree_size,
            root,
            chain,
            node_id: signer.node_id,
            node_cert: signer.cert_der.clone(),
            signature,
        }
    }

    /// Checks the signature, that the certificate is the node's, and that the service CA
    /// issued it. Each failure says which.
    pub fn verify(&self, service_ca_der: &[u8]) -> Result<(), String> {
        issued_by(&self.node_cert, service_ca_der)?;
        self.verify_by_node()
    }

    /// Checks the signature under the key of the certificate it carries, and that the
    /// certificate is the named node's; not who issued it.
    pub fn verify_by_node(&self) -> Result<(), String> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.node_cert)
            .map_err(|e| format!("the signing node's certificate does not parse: {e}"))?;
        if cloister_crypto::node_id_of(&self.node_cert) != self.node_id {
            return Err(format!("the signature names node {} but carries another node's certificate", self.node_id));
        }
        let key = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, cert.public_key().subject_public_key.data.as_ref());
        key.verify(&Self::signed_bytes(self.tree_size, &self.root, &self.chain, self.node_id), &self.signature)
            .map_err(|_| "the signature does not verify under the signing node's key".to_owned())
    }
}

/// Most pairs of certificates whose issuance check [`SignaturePayload::verify`] remembers; past
/// it the memory starts over. A ledger's signature entries carry the certificates of its few
/// nodes, all issued by one service certificate (one more per recovery).
pub const ISSUANCE_CHECKS_REMEMBERED_MAX: usize = 256;

/// Issuance checks that passed, by the SHA-256 of the node's certificate and then the service
/// certificate's. Every signature entry carries its node's certificate, and checking who issued
/// it is an ECDSA P-384 verification, as costly as the entry's own signature's; every node checks
/// every signature entry as it applies it, and the same node signs entry after entry. The check
/// is a function of the two certificates' bytes, so a remembered pass is the check's answer.
static ISSUED: LazyLock<Remembered<[u8; 64]>> = LazyLock::new(|| Remembered::new(ISSUANCE_CHECKS_REMEMBERED_MAX));

/// Whether the certificate `service_ca_der` issued `node_cert` (both DER).
fn issued_by(node_cert: &[u8], service_ca_der: &[u8]) -> Result<(), String> {
    let mut pair = [0u8; 64];
    pair[..32].copy_from_slice(ring::digest::digest(&ring::digest::SHA256, node_cert).as_ref());
    pair[32..].copy_from_slice(ring::digest::digest(&ring::digest::SHA256, service_ca_der).as_ref());
    if ISSUED.knows(&pair) {
        return Ok(());
    }
    let (_, cert) = x509_parser::parse_x509_certificate(node_cert)
        .map_err(|e| format!("the signing node's certificate does not parse: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(service_ca_der)
        .map_err(|e| format!("the service certificate does not parse: {e}"))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| "the signing node's certificate was not issued by the service certificate".to_owned())?;
    ISSUED.remember(pair);
    Ok(())
}

/// The service identity's statement, made when a receipt is issued, that a node's ledger
/// signatures over trees of at most `tree_size_max` entries are the service's. For a node still
/// Trusted that is the ledger's size at the time; for a retired one, where its endorsement
/// ended. A node never Trusted gets none. Whoever holds an endorsement can show it for any
/// signature below its bound, but none reaches past a retirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endorsement {
    pub node_id: u64,
    /// SHA-256 of the node's certificate (DER).
    #[serde(with = "hex_bytes")]
    pub node_cert_sha256: [u8; 32],
    pub tree_size_max: u64,
    /// Whether the node was retired, so that `tree_size_max` is final.
    pub retired: bool,
    /// ECDSA P-384 (r ‖ s) by the service identity over [`Endorsement::signed_bytes`].
    #[serde(with = "hex_vec")]
    pub signature: Vec<u8>,
}

impl Endorsement {
    fn signed_bytes(node_id: u64, node_cert_sha256: &[u8; 32], tree_size_max: u64, retired: bool) -> Vec<u8> {
        let mut out = b"cloister node endorsement v1\0".to_vec();
        out.extend_from_slice(&node_id.to_be_bytes());
        out.extend_from_slice(node_cert_sha256);
        out.extend_from_slice(&tree_size_max.to_be_bytes());
        out.push(u8::from(retired));
        out
    }

    /// Issues one with the service identity's key (PKCS#8 PEM).
    pub fn issue(
        node_cert_der: &[u8],
        tree_size_max: u64,
        retired: bool,
        identity_key_pem: &str,
    ) -> anyhow::Result<Endorsement> {
        let rng = ring::rand::SystemRandom::new();
        let key = cloister_crypto::identity::signing_key(identity_key_pem, "the service identity key")?;
        let node_id = cloister_crypto::node_id_of(node_cert_der);
        let node_cert_sha256 = cert_sha256(node_cert_der);
        let bytes = Self::signed_bytes(node_id, &node_cert_sha256, tree_size_max, retired);
        let signature = key.sign(&rng, &bytes).map_err(|_| anyhow::anyhow!("ECDSA signing failed"))?;
        Ok(Endorsement { node_id, node_cert_sha256, tree_size_max, retired, signature: signature.as_ref().to_vec() })
    }

    /// Checks that the service identity (its certificate, DER) made this endorsement, and that
    /// it covers `sig`: the same node and certificate, a tree within the bound.
    pub fn covers(&self, identity_cert_der: &[u8], sig: &SignaturePayload) -> Result<(), String> {
        let (_, identity) = x509_parser::parse_x509_certificate(identity_cert_der)
            .map_err(|e| format!("the service identity certificate does not parse: {e}"))?;
        let key =
            UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, identity.public_key().subject_public_key.data.as_ref());
        let bytes = Self::signed_bytes(self.node_id, &self.node_cert_sha256, self.tree_size_max, self.retired);
        key.verify(&bytes, &self.signature).map_err(|_| {
            "the endorsement is not signed by the service identity: nothing vouches for the signing node".to_owned()
        })?;
        if self.node_id != sig.node_id || self.node_cert_sha256 != cert_sha256(&sig.node_cert) {
            return Err(format!(
                "the endorsement is for node {}, but node {} signed: the signing node was never endorsed",
                self.node_id, sig.node_id
            ));
        }
        if sig.tree_size > self.tree_size_max {
            return Err(if self.retired {
                format!(
                    "node {} was retired: its endorsement covers trees of at most {} entries, and this signature is \
                     over {}",
                    sig.node_id, self.tree_size_max, sig.tree_size
                )
            } else {
                format!(
                    "the endorsement covers trees of at most {} entries, and this signature is over {}",
                    self.tree_size_max, sig.tree_size
                )
            });
        }
        Ok(())
    }
}

/// SHA-256 of a certificate (DER), as endorsements name it.
pub fn cert_sha256(cert_der: &[u8]) -> [u8; 32] {
    sha256(cert_der)
}

/// The claims digest an app attaches for a claim, by convention: SHA-256 of the claim's bytes.
/// A receipt proves the digest; whoever holds the claim checks it against this.
pub fn claim_digest(claim: &[u8]) -> [u8; 32] {
    sha256(claim)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().try_into().expect("32 bytes")
}

/// A node's signing identity: its key and certificate.
pub struct NodeSigner {
    pub node_id: u64,
    pub cert_der: Vec<u8>,
    key: EcdsaKeyPair,
}

impl NodeSigner {
    pub fn new(cert_pem: &str, key_pem: &str) -> anyhow::Result<NodeSigner> {
        let cert_der = cloister_crypto::identity::cert_der(cert_pem.as_bytes())?.to_vec();
        let key = cloister_crypto::identity::signing_key(key_pem, "the node key")?;
        Ok(NodeSigner { node_id: cloister_crypto::node_id_of(&cert_der), cert_der, key })
    }
}

/// Hex strings for fixed-size byte arrays in JSON.
pub mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&hex::encode(bytes)) } else { serde::Serialize::serialize(bytes, s) }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if d.is_human_readable() {
            let s: String = serde::Deserialize::deserialize(d)?;
            let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
            v.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes of hex"))
        } else {
            serde::Deserialize::deserialize(d)
        }
    }
}

/// Hex strings for optional 32-byte arrays in JSON.
pub(crate) mod hex_option {
    pub fn serialize<S: serde::Serializer>(bytes: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) if s.is_human_readable() => s.serialize_some(&hex::encode(b)),
            other => serde::Serialize::serialize(other, s),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        if d.is_human_readable() {
            let s: Option<String> = serde::Deserialize::deserialize(d)?;
            s.map(|s| {
                let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
                v.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes of hex"))
            })
            .transpose()
        } else {
            serde::Deserialize::deserialize(d)
        }
    }
}

/// Hex strings for byte vectors in JSON.
pub(crate) mod hex_vec {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&hex::encode(bytes)) } else { serde::Serialize::serialize(bytes, s) }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            let s: String = serde::Deserialize::deserialize(d)?;
            hex::decode(&s).map_err(serde::de::Error::custom)
        } else {
            serde::Deserialize::deserialize(d)
        }
    }
}

/// Write sets and sealed private writes encode their bytes as byte strings. These check that
/// the encoding is the one every log, ledger and snapshot written before used, bytes as
/// sequences of `u8`: the same bytes out, and each reads the other's.
#[cfg(test)]
mod encoding {
    use std::collections::BTreeMap;

    use cloister_test_support::config;
    use cloister_test_support::proptest::prelude::*;

    use super::*;

    /// [`TxEntry`] as it was derived before, without the byte-string attributes.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Before {
        uid: [u8; 16],
        kind: TxKind,
        public: WriteSetBefore,
        private: Option<Vec<u8>>,
        claims_digest: Option<[u8; 32]>,
        signature: Option<SignaturePayload>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct WriteSetBefore {
        entries: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..300)
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn entries_encode_as_before_and_read_either_way(
            uid in any::<[u8; 16]>(),
            writes in prop::collection::vec(("[a-z:]{1,12}", bytes(), prop::option::of(bytes())), 0..20),
            private in prop::option::of(bytes()),
            claims_digest in prop::option::of(any::<[u8; 32]>()),
        ) {
            let mut public = WriteSet::default();
            for (map, key, value) in &writes {
                match value {
                    Some(v) => public.put(map, key, v),
                    None => public.remove(map, key),
                }
            }
            let now = TxEntry { uid, kind: TxKind::App, public, private, claims_digest, signature: None };
            let encoded = postcard::to_stdvec(&now).unwrap();
            let before: Before = postcard::from_bytes(&encoded).unwrap();
            prop_assert_eq!(before.public.entries.len(), now.public.len());
            prop_assert_eq!(&postcard::to_stdvec(&before).unwrap(), &encoded);
            prop_assert_eq!(postcard::from_bytes::<TxEntry>(&encoded).unwrap(), now);
        }
    }
}

#[cfg(test)]
mod issuance {
    use cloister_crypto::identity::ServiceCa;

    use super::*;

    fn signed_by(ca: &ServiceCa, name: &str) -> SignaturePayload {
        let node = ca.issue_node_cert(name, &["localhost".into()]).unwrap();
        let signer = NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap();
        SignaturePayload::sign(3, [1; 32], [2; 32], &signer)
    }

    fn der(ca: &ServiceCa) -> Vec<u8> {
        cloister_crypto::identity::cert_der(ca.keyed.cert_pem.as_bytes()).unwrap().to_vec()
    }

    /// A pass is remembered for its pair of certificates only: the same node certificate under
    /// another service certificate, and another service's node under the first, are checked
    /// and refused however often the first pair passed.
    #[test]
    fn a_remembered_issuance_answers_for_its_own_pair_only() {
        let (ours, theirs) = (ServiceCa::generate("ours").unwrap(), ServiceCa::generate("theirs").unwrap());
        let (mine, foreign) = (signed_by(&ours, "mine"), signed_by(&theirs, "foreign"));
        for _ in 0..2 {
            mine.verify(&der(&ours)).unwrap();
            foreign.verify(&der(&theirs)).unwrap();
        }
        let refused = "the signing node's certificate was not issued by the service certificate";
        assert_eq!(mine.verify(&der(&theirs)).unwrap_err(), refused);
        assert_eq!(foreign.verify(&der(&ours)).unwrap_err(), refused);
        // The node's own signature is still checked on a remembered pair.
        let mut forged = mine.clone();
        forged.tree_size += 1;
        assert!(forged.verify(&der(&ours)).unwrap_err().contains("does not verify"));
    }
}

#[cfg(test)]
mod sides {
    use super::*;

    /// An entry's writes open only if each is on its side: a public map's in clear, a private
    /// map's sealed. (An entry planted in a stopped node's log with a private map's write in
    /// clear changed that private map without the ledger secret.)
    #[test]
    fn a_write_on_the_wrong_side_of_its_entry_is_refused() {
        let sealer = Sealer::new(&Sealer::generate_secret());
        let mut writes = WriteSet::default();
        writes.put("app/public:m", b"k", b"public");
        writes.put("app/m", b"k", b"private");
        let genuine = TxEntry::new(TxKind::App, writes, None, &sealer);
        assert_eq!(genuine.writes(&sealer).unwrap().len(), 2);

        let mut planted = genuine.clone();
        planted.public.put("app/m", b"k", b"forged");
        assert_eq!(planted.writes(&sealer), Err(WritesError::Misplaced("app/m".into())));
        assert_eq!(planted.public_writes(), Err(WritesError::Misplaced("app/m".into())));

        let mut sealed_public = WriteSet::default();
        sealed_public.put("gov.members", b"k", b"v");
        let plain = postcard::to_stdvec(&sealed_public).unwrap();
        let hidden =
            TxEntry { private: Some(sealer.seal(Purpose::LedgerPrivate, &genuine.uid, &plain)), ..genuine.clone() };
        assert_eq!(hidden.writes(&sealer), Err(WritesError::Misplaced("gov.members".into())));
    }
}
