//! Signed governance requests: COSE_Sign1 messages (RFC 9052) signed with a member's key.
//!
//! The protected header carries the algorithm (ES384, the curve of Cloister identities), the
//! signer's id as `kid` (hex SHA-256 of its certificate DER), and Cloister labels:
//! [`MSG_TYPE`], [`CREATED_AT`] (seconds since the Unix epoch), [`SERVICE`] (the service the
//! request is for: the hex SHA-256 of its identity certificate's DER) and, for requests about
//! one proposal, [`PROPOSAL_ID`]. The payload is the request's JSON.

use coset::cbor::value::Value;
use coset::{CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, Label, iana};
use p384::elliptic_curve::scalar::IsHigh;
use ring::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};

use crate::identity::{self, KeyedCert};

pub(crate) const MSG_TYPE: &str = "cloister.gov.msg.type";
pub(crate) const CREATED_AT: &str = "cloister.gov.msg.created_at";
pub(crate) const PROPOSAL_ID: &str = "cloister.gov.msg.proposal_id";
/// A request names its service, so that a member of two services (one certificate on both)
/// cannot have a request it signed for one replayed to the other.
pub(crate) const SERVICE: &str = "cloister.gov.msg.service";

/// A governance write, as addressed by its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GovWrite {
    /// `POST /gov/proposals`
    Propose,
    /// `POST /gov/proposals/{id}/ballots`
    Vote(String),
    /// `POST /gov/proposals/{id}/withdraw`
    Withdraw(String),
    /// `POST /gov/members/ack`
    Ack,
    /// `POST /gov/recovery/share`: a recovery member's share, to a recovering service.
    RecoveryShare,
}

impl GovWrite {
    pub fn msg_type(&self) -> MsgType {
        match self {
            GovWrite::Propose => MsgType::Proposal,
            GovWrite::Vote(_) => MsgType::Ballot,
            GovWrite::Withdraw(_) => MsgType::Withdrawal,
            GovWrite::Ack => MsgType::Ack,
            GovWrite::RecoveryShare => MsgType::RecoveryShare,
        }
    }

    pub fn proposal_id(&self) -> Option<&str> {
        match self {
            GovWrite::Vote(id) | GovWrite::Withdraw(id) => Some(id),
            GovWrite::Propose | GovWrite::Ack | GovWrite::RecoveryShare => None,
        }
    }

    /// The REST path of this write.
    pub fn path(&self) -> String {
        match self {
            GovWrite::Propose => "/gov/proposals".into(),
            GovWrite::Vote(id) => format!("/gov/proposals/{id}/ballots"),
            GovWrite::Withdraw(id) => format!("/gov/proposals/{id}/withdraw"),
            GovWrite::Ack => "/gov/members/ack".into(),
            GovWrite::RecoveryShare => "/gov/recovery/share".into(),
        }
    }

    /// The write a REST path names, if any.
    pub fn from_path(path: &str) -> Option<GovWrite> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["gov", "proposals"] => Some(GovWrite::Propose),
            ["gov", "proposals", id, "ballots"] => Some(GovWrite::Vote((*id).to_owned())),
            ["gov", "proposals", id, "withdraw"] => Some(GovWrite::Withdraw((*id).to_owned())),
            ["gov", "members", "ack"] => Some(GovWrite::Ack),
            ["gov", "recovery", "share"] => Some(GovWrite::RecoveryShare),
            _ => None,
        }
    }
}

/// Seconds since the Unix epoch: the clock `created_at` is signed with and checked against.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What a signed request asks for; each governance endpoint takes exactly one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Proposal,
    Ballot,
    Withdrawal,
    Ack,
    RecoveryShare,
}

impl MsgType {
    pub fn as_str(self) -> &'static str {
        match self {
            MsgType::Proposal => "proposal",
            MsgType::Ballot => "ballot",
            MsgType::Withdrawal => "withdrawal",
            MsgType::Ack => "ack",
            MsgType::RecoveryShare => "recovery_share",
        }
    }
}

/// A parsed (not yet verified) signed request.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub msg_type: String,
    pub created_at: u64,
    pub proposal_id: Option<String>,
    /// The service the request is for: the hex SHA-256 of its identity certificate's DER.
    pub service: String,
    /// The signer's id, from `kid`.
    pub signer: String,
    pub payload: Vec<u8>,
    message: CoseSign1,
}

/// Signs a governance request as `who`, for the service whose id (the hex SHA-256 of its
/// identity certificate's DER) is `service`.
pub fn sign(
    who: &KeyedCert,
    msg_type: MsgType,
    proposal_id: Option<&str>,
    created_at: u64,
    service: &str,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let key = identity::signing_key(&who.key_pem, "the signing key")?;
    let mut header = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES384)
        .key_id(who.id()?.into_bytes())
        .text_value(MSG_TYPE.into(), Value::Text(msg_type.as_str().into()))
        .text_value(CREATED_AT.into(), Value::Integer(created_at.into()))
        .text_value(SERVICE.into(), Value::Text(service.into()));
    if let Some(id) = proposal_id {
        header = header.text_value(PROPOSAL_ID.into(), Value::Text(id.into()));
    }
    let rng = ring::rand::SystemRandom::new();
    let mut failure = None;
    let message = CoseSign1Builder::new()
        .protected(header.build())
        .payload(payload.to_vec())
        .create_signature(&[], |data| match key.sign(&rng, data) {
            // ECDSA signs with a random nonce, so `s` is high half the time; the low-S twin of a
            // signature verifies the same, and the node accepts only that one.
            Ok(sig) => low_s(sig.as_ref()),
            Err(e) => {
                failure = Some(e);
                Vec::new()
            }
        })
        .build();
    if let Some(e) = failure {
        anyhow::bail!("signing failed: {e}");
    }
    message.to_vec().map_err(|e| anyhow::anyhow!("encoding the COSE message failed: {e}"))
}

/// The low-S form of a fixed-size (`r ‖ s`) P-384 signature: `s` replaced by `n − s` when it is in
/// the upper half of the group order. Bytes that are no signature are returned unchanged.
fn low_s(signature: &[u8]) -> Vec<u8> {
    match p384::ecdsa::Signature::from_slice(signature) {
        Ok(sig) => sig.normalize_s().unwrap_or(sig).to_bytes().to_vec(),
        Err(_) => signature.to_vec(),
    }
}

/// Parses a COSE_Sign1 request and its Cloister headers. Each malformation is named.
///
/// A request has exactly one encoding: the untagged COSE_Sign1 array with definite lengths and
/// minimal integers (as [`sign`] writes it), an empty unprotected header, and a low-S signature.
/// Anything else is refused, so a signed request cannot be re-encoded into a second, different
/// looking copy of itself.
pub fn parse(bytes: &[u8]) -> Result<SignedRequest, String> {
    let message = CoseSign1::from_slice(bytes).map_err(|e| format!("the body is not a COSE_Sign1 message: {e}"))?;
    if !message.unprotected.is_empty() {
        return Err("the unprotected header must be empty: everything a request says is signed".into());
    }
    match message.clone().to_vec() {
        Ok(canonical) if canonical == bytes => {}
        _ => {
            return Err("the message is not in canonical form (an untagged COSE_Sign1 array with definite \
                        lengths and minimal encodings, as `cloister gov` writes it)"
                .into());
        }
    }
    match p384::ecdsa::Signature::from_slice(&message.signature) {
        Ok(sig) if bool::from(sig.s().is_high()) => {
            return Err("the signature is not in low-S form (s must not exceed half the group order)".into());
        }
        Ok(_) => {}
        Err(_) => return Err("the signature is not a 96-byte ES384 signature (r ‖ s)".into()),
    }
    let header = &message.protected.header;
    if header.alg != Some(coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES384)) {
        return Err(format!("the protected header must name algorithm ES384, not {:?}", header.alg));
    }
    let signer = String::from_utf8(header.key_id.clone())
        .ok()
        .filter(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("the protected header's kid must be the signer's id (64 hex characters)")?;
    let label = |name: &str| header.rest.iter().find(|(l, _)| *l == Label::Text(name.into())).map(|(_, v)| v);
    let text = |name: &str| match label(name) {
        Some(Value::Text(t)) => Ok(Some(t.clone())),
        None => Ok(None),
        Some(_) => Err(format!("protected header {name} must be text")),
    };
    let msg_type = text(MSG_TYPE)?.ok_or_else(|| format!("the protected header lacks {MSG_TYPE}"))?;
    let created_at = match label(CREATED_AT) {
        Some(Value::Integer(i)) => u64::try_from(*i).map_err(|_| format!("{CREATED_AT} is out of range"))?,
        Some(_) => return Err(format!("protected header {CREATED_AT} must be an integer")),
        None => return Err(format!("the protected header lacks {CREATED_AT}")),
    };
    let proposal_id = text(PROPOSAL_ID)?;
    let service = text(SERVICE)?
        .filter(|s| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            format!("the protected header's {SERVICE} must be the service's id (64 lowercase hex characters)")
        })?;
    let payload = message.payload.clone().ok_or("the message carries no payload (detached payloads are refused)")?;
    Ok(SignedRequest { msg_type, created_at, proposal_id, service, signer, payload, message })
}

impl SignedRequest {
    /// The request's identity: hex blake3 of the COSE Sig_structure, the exact bytes the signature
    /// covers (protected header and payload). Replay detection and proposal ids use it, so
    /// nothing outside the signature can make a request look new.
    pub fn digest(&self) -> String {
        blake3::hash(&self.message.tbs_data(&[])).to_hex().to_string()
    }

    /// Checks the signature under the public key of `cert_pem`.
    pub fn verify(&self, cert_pem: &str) -> Result<(), String> {
        let der = identity::cert_der(cert_pem.as_bytes()).map_err(|e| format!("the signer's certificate: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("the signer's certificate does not parse: {e}"))?;
        let key = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, cert.public_key().subject_public_key.data.to_vec());
        self.message
            .verify_signature(&[], |sig, data| key.verify(data, sig))
            .map_err(|_| format!("the signature does not verify under the key of {}", self.signer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service's id, as a request names it.
    pub(super) const SERVICE_A: &str = "5e7a0c1f5e7a0c1f5e7a0c1f5e7a0c1f5e7a0c1f5e7a0c1f5e7a0c1f5e7a0c1f";

    #[test]
    fn signs_and_verifies_and_refuses_tampering() {
        let alice = identity::generate_identity("alice").unwrap();
        let bob = identity::generate_identity("bob").unwrap();
        let bytes =
            sign(&alice, MsgType::Ballot, Some("p1"), 1_700_000_000, SERVICE_A, br#"{"approve":true}"#).unwrap();
        let request = parse(&bytes).unwrap();
        assert_eq!(request.msg_type, "ballot");
        assert_eq!(request.created_at, 1_700_000_000);
        assert_eq!(request.proposal_id.as_deref(), Some("p1"));
        assert_eq!(request.service, SERVICE_A);
        assert_eq!(request.signer, alice.id().unwrap());
        request.verify(&alice.cert_pem).unwrap();
        let err = request.verify(&bob.cert_pem).unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
        // Flipping any byte either breaks the structure or the signature.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            if let Ok(r) = parse(&bad) {
                assert!(r.verify(&alice.cert_pem).is_err(), "flipping byte {i} went unnoticed");
            }
        }
        assert!(parse(b"not cbor").unwrap_err().contains("not a COSE_Sign1"));
    }

    /// Every way of re-encoding a genuine signed request without the key: each still carries a
    /// valid signature over the same Sig_structure, and each is refused by name.
    #[test]
    fn a_signed_request_has_exactly_one_encoding() {
        let alice = identity::generate_identity("alice").unwrap();
        let bytes =
            sign(&alice, MsgType::Ballot, Some("p1"), 1_700_000_000, SERVICE_A, br#"{"approve":true}"#).unwrap();
        let genuine = parse(&bytes).unwrap();
        genuine.verify(&alice.cert_pem).unwrap();
        let refused = |bad: &[u8], why: &str| {
            let err = parse(bad).map(|r| r.digest()).expect_err("a re-encoded request must be refused");
            assert!(err.contains(why), "expected {why:?}, got {err:?}");
        };

        // An entry added to the unprotected header (what the superseded-ballot attack did).
        let mut m = CoseSign1::from_slice(&bytes).unwrap();
        m.unprotected.rest.push((Label::Int(99), Value::Integer(1.into())));
        let extra = m.to_vec().unwrap();
        assert!(
            CoseSign1::from_slice(&extra)
                .unwrap()
                .verify_signature(&[], |sig, data| {
                    let key =
                        x509_parser::parse_x509_certificate(&identity::cert_der(alice.cert_pem.as_bytes()).unwrap())
                            .unwrap()
                            .1
                            .public_key()
                            .subject_public_key
                            .data
                            .to_vec();
                    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, key).verify(data, sig)
                })
                .is_ok()
        );
        refused(&extra, "unprotected header must be empty");

        // The high-S twin of the signature, which ECDSA verification accepts.
        let mut m = CoseSign1::from_slice(&bytes).unwrap();
        let sig = p384::ecdsa::Signature::from_slice(&m.signature).unwrap();
        let high = p384::ecdsa::Signature::from_scalars(sig.r(), -sig.s()).unwrap();
        assert!(bool::from(high.s().is_high()));
        m.signature = high.to_bytes().to_vec();
        refused(&m.to_vec().unwrap(), "low-S");

        // The protected header's map re-encoded in another order: no longer what was signed.
        let mut m = CoseSign1::from_slice(&bytes).unwrap();
        m.protected.original_data = None;
        m.protected.header.rest.reverse();
        let reordered = m.to_vec().unwrap();
        assert_ne!(reordered, bytes);
        let request = parse(&reordered).expect("a reordered protected map is still one encoding");
        assert_ne!(request.digest(), genuine.digest(), "it is another request");
        assert!(request.verify(&alice.cert_pem).is_err(), "whose signature does not verify");

        // The outer array with an indefinite length.
        let mut indefinite = bytes.clone();
        assert_eq!(indefinite[0], 0x84, "a definite array of four");
        indefinite[0] = 0x9f;
        indefinite.push(0xff);
        refused(&indefinite, "canonical form");

        // Tagged as COSE_Sign1 (tag 18).
        let mut tagged = vec![0xd2];
        tagged.extend_from_slice(&bytes);
        assert!(parse(&tagged).is_err(), "a tagged message is refused");

        // The payload's length in a longer form than needed (0x58 len instead of 0x40 + len).
        let payload_at = bytes.windows(17).position(|w| w[1..] == br#"{"approve":true}"#[..]).unwrap();
        assert_eq!(bytes[payload_at], 0x50, "a 16-byte bstr header");
        let mut long = bytes[..payload_at].to_vec();
        long.extend_from_slice(&[0x58, 16]);
        long.extend_from_slice(&bytes[payload_at + 1..]);
        refused(&long, "canonical form");
    }

    #[test]
    fn the_identity_is_what_was_signed() {
        let alice = identity::generate_identity("alice").unwrap();
        let payload = br#"{"approve":true}"#;
        let one =
            parse(&sign(&alice, MsgType::Ballot, Some("p1"), 1_700_000_000, SERVICE_A, payload).unwrap()).unwrap();
        // ECDSA's random nonce makes a second signature of the same request differ in bytes…
        let two =
            parse(&sign(&alice, MsgType::Ballot, Some("p1"), 1_700_000_000, SERVICE_A, payload).unwrap()).unwrap();
        assert_ne!(one.message.signature, two.message.signature);
        // …but not in identity: it is the same request.
        assert_eq!(one.digest(), two.digest());
        let later =
            parse(&sign(&alice, MsgType::Ballot, Some("p1"), 1_700_000_001, SERVICE_A, payload).unwrap()).unwrap();
        assert_ne!(one.digest(), later.digest());
    }

    /// The service is part of what was signed: the same request for another service is another
    /// request, and one that names no service, or not as an id, is refused by name.
    #[test]
    fn a_request_names_its_service() {
        let alice = identity::generate_identity("alice").unwrap();
        let service_b = "b".repeat(64);
        let one = parse(&sign(&alice, MsgType::Ack, None, 1_700_000_000, SERVICE_A, b"{}").unwrap()).unwrap();
        let other = parse(&sign(&alice, MsgType::Ack, None, 1_700_000_000, &service_b, b"{}").unwrap()).unwrap();
        assert_eq!(other.service, service_b);
        assert_ne!(one.digest(), other.digest());
        for bad in ["", "b", &"g".repeat(64), &"b".repeat(65), &"B".repeat(64)] {
            let err = parse(&sign(&alice, MsgType::Ack, None, 1_700_000_000, bad, b"{}").unwrap()).unwrap_err();
            assert!(err.contains(SERVICE) && err.contains("64 lowercase hex"), "{bad:?}: {err}");
        }
        let mut m =
            CoseSign1::from_slice(&sign(&alice, MsgType::Ack, None, 1_700_000_000, SERVICE_A, b"{}").unwrap()).unwrap();
        m.protected.original_data = None;
        m.protected.header.rest.retain(|(label, _)| *label != Label::Text(SERVICE.into()));
        let err = parse(&m.to_vec().unwrap()).unwrap_err();
        assert!(err.contains(SERVICE), "{err}");
    }

    #[test]
    fn signatures_are_written_low_s() {
        let alice = identity::generate_identity("alice").unwrap();
        for i in 0..32 {
            let bytes = sign(&alice, MsgType::Ack, None, 1_700_000_000 + i, SERVICE_A, b"{}").unwrap();
            parse(&bytes).expect("every signature the signer writes parses");
        }
    }
}

/// Property tests: any bytes, and any mutation of a genuine request, are refused by name or
/// (unchanged) accepted; never a panic, never an allocation out of proportion to the input.
#[cfg(test)]
mod fuzz {
    use std::sync::OnceLock;

    use cloister_test_support::proptest::prelude::*;
    use cloister_test_support::{config, largest_allocation};

    use super::*;

    fn genuine() -> &'static (KeyedCert, Vec<u8>) {
        static GENUINE: OnceLock<(KeyedCert, Vec<u8>)> = OnceLock::new();
        GENUINE.get_or_init(|| {
            let alice = identity::generate_identity("alice").unwrap();
            let bytes =
                sign(&alice, MsgType::Proposal, None, 1_700_000_000, super::tests::SERVICE_A, br#"{"actions":[]}"#)
                    .unwrap();
            (alice, bytes)
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_bytes_are_refused_by_name(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let (result, largest) = largest_allocation(|| parse(&bytes).map(|r| r.digest()));
            prop_assert!(largest <= 16 * bytes.len() + 65_536, "allocated {largest} bytes for {}", bytes.len());
            if let Err(e) = result {
                prop_assert!(!e.is_empty());
            }
        }

        #[test]
        fn a_mutated_request_never_verifies(
            edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            insert in prop::option::of((any::<usize>(), any::<u8>())),
        ) {
            let (alice, bytes) = genuine();
            let mut bad = bytes.clone();
            for (at, value) in &edits {
                let i = at % bad.len();
                bad[i] ^= value | 1;
            }
            if let Some((at, value)) = insert {
                bad.insert(at % (bad.len() + 1), value);
            }
            let (result, largest) = largest_allocation(|| parse(&bad));
            prop_assert!(largest <= 16 * bad.len() + 65_536);
            if let Ok(request) = result {
                prop_assert!(bad == *bytes || request.verify(&alice.cert_pem).is_err(), "a changed request verified");
            }
        }
    }
}
