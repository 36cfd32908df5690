//! Signed governance requests: COSE_Sign1 messages (RFC 9052) signed with a member's key.
//!
//! The protected header carries the algorithm (ES384, the curve of Cloister identities), the
//! signer's id as `kid` (hex SHA-256 of its certificate DER), and three Cloister labels:
//! [`MSG_TYPE`], [`CREATED_AT`] (seconds since the Unix epoch) and, for requests about one
//! proposal, [`PROPOSAL_ID`]. The payload is the request's JSON.

use coset::cbor::value::Value;
use coset::{CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, Label, iana};
use ring::signature::{ECDSA_P384_SHA384_FIXED, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey};

use crate::identity::{self, KeyedCert};

pub(crate) const MSG_TYPE: &str = "cloister.gov.msg.type";
pub(crate) const CREATED_AT: &str = "cloister.gov.msg.created_at";
pub(crate) const PROPOSAL_ID: &str = "cloister.gov.msg.proposal_id";

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
}

impl GovWrite {
    pub fn msg_type(&self) -> MsgType {
        match self {
            GovWrite::Propose => MsgType::Proposal,
            GovWrite::Vote(_) => MsgType::Ballot,
            GovWrite::Withdraw(_) => MsgType::Withdrawal,
            GovWrite::Ack => MsgType::Ack,
        }
    }

    pub fn proposal_id(&self) -> Option<&str> {
        match self {
            GovWrite::Vote(id) | GovWrite::Withdraw(id) => Some(id),
            GovWrite::Propose | GovWrite::Ack => None,
        }
    }

    /// The REST path of this write.
    pub fn path(&self) -> String {
        match self {
            GovWrite::Propose => "/gov/proposals".into(),
            GovWrite::Vote(id) => format!("/gov/proposals/{id}/ballots"),
            GovWrite::Withdraw(id) => format!("/gov/proposals/{id}/withdraw"),
            GovWrite::Ack => "/gov/members/ack".into(),
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
}

impl MsgType {
    pub fn as_str(self) -> &'static str {
        match self {
            MsgType::Proposal => "proposal",
            MsgType::Ballot => "ballot",
            MsgType::Withdrawal => "withdrawal",
            MsgType::Ack => "ack",
        }
    }
}

/// A parsed (not yet verified) signed request.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub msg_type: String,
    pub created_at: u64,
    pub proposal_id: Option<String>,
    /// The signer's id, from `kid`.
    pub signer: String,
    pub payload: Vec<u8>,
    message: CoseSign1,
}

/// Signs a governance request as `who`.
pub fn sign(
    who: &KeyedCert,
    msg_type: MsgType,
    proposal_id: Option<&str>,
    created_at: u64,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let key_der = identity::private_key(who.key_pem.as_bytes())?;
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P384_SHA384_FIXED_SIGNING,
        key_der.secret_der(),
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| anyhow::anyhow!("the signing key is not an ECDSA P-384 PKCS#8 key: {e}"))?;
    let mut header = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES384)
        .key_id(who.id()?.into_bytes())
        .text_value(MSG_TYPE.into(), Value::Text(msg_type.as_str().into()))
        .text_value(CREATED_AT.into(), Value::Integer(created_at.into()));
    if let Some(id) = proposal_id {
        header = header.text_value(PROPOSAL_ID.into(), Value::Text(id.into()));
    }
    let rng = ring::rand::SystemRandom::new();
    let mut failure = None;
    let message = CoseSign1Builder::new()
        .protected(header.build())
        .payload(payload.to_vec())
        .create_signature(&[], |data| match key.sign(&rng, data) {
            Ok(sig) => sig.as_ref().to_vec(),
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

/// Parses a COSE_Sign1 request and its Cloister headers. Each malformation is named.
pub fn parse(bytes: &[u8]) -> Result<SignedRequest, String> {
    let message = CoseSign1::from_slice(bytes).map_err(|e| format!("the body is not a COSE_Sign1 message: {e}"))?;
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
    let payload = message.payload.clone().ok_or("the message carries no payload (detached payloads are refused)")?;
    Ok(SignedRequest { msg_type, created_at, proposal_id, signer, payload, message })
}

impl SignedRequest {
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

    #[test]
    fn signs_and_verifies_and_refuses_tampering() {
        let alice = identity::generate_identity("alice").unwrap();
        let bob = identity::generate_identity("bob").unwrap();
        let bytes = sign(&alice, MsgType::Ballot, Some("p1"), 1_700_000_000, br#"{"approve":true}"#).unwrap();
        let request = parse(&bytes).unwrap();
        assert_eq!(request.msg_type, "ballot");
        assert_eq!(request.created_at, 1_700_000_000);
        assert_eq!(request.proposal_id.as_deref(), Some("p1"));
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
}
