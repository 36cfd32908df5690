//! Recovery shares in `gov.recovery`, kept by the leader in step with the recovery members (the
//! Active members with an encryption key), their keys, the recovery threshold and the service
//! identity. The cryptography is `cloister_crypto::recovery`'s; this module decides when an issue
//! is due and writes it.

use std::collections::BTreeMap;

use base64::Engine as _;
use cloister_crypto::{envelope, identity, recovery};
use cloister_store::Tx;
use cloister_store::gov::{self, MemberStatus, RecoveryRecord, RecoveryShare};

use crate::api::ApiError;

/// What the shares must cover as of a state: the service, the threshold, and each recovery
/// member's encryption key.
#[derive(Debug, PartialEq, Eq)]
struct Due {
    service: String,
    threshold: u32,
    /// Member id → encryption key (PEM).
    keys: BTreeMap<String, String>,
}

fn key_sha256(pem: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, pem.as_bytes()))
}

fn due(tx: &Tx) -> Result<Option<Due>, ApiError> {
    let Some(service) = gov::service(tx)? else { return Ok(None) };
    // A service from before identities gets one first (`maintain_endorsements`).
    let Some(identity_cert) = service.identity else { return Ok(None) };
    let service_id = identity::id_of_pem(identity_cert.as_bytes())
        .map_err(|e| ApiError::internal(format!("the service identity's certificate: {e:#}")))?;
    let keys: BTreeMap<String, String> = gov::all::<gov::MemberRecord>(tx, gov::MEMBERS)?
        .into_iter()
        .filter(|(_, m)| m.status == MemberStatus::Active)
        .filter_map(|(id, m)| m.encryption_key.map(|k| (id, k)))
        .collect();
    Ok(Some(Due { service: service_id, threshold: service.recovery_threshold, keys }))
}

/// Whether the recorded shares (if any) cover exactly what is due.
fn covers(record: Option<&RecoveryRecord>, due: &Due) -> bool {
    match record {
        None => due.keys.is_empty(),
        Some(r) => {
            r.service == due.service
                && r.threshold == due.threshold
                && r.shares.len() == due.keys.len()
                && due.keys.iter().all(|(id, key)| {
                    r.shares.get(id).is_some_and(|share| share.encryption_key_sha256 == key_sha256(key))
                })
        }
    }
}

/// Whether `gov.recovery` lags the recovery members, as of `tx`.
pub(crate) fn lags(tx: &Tx) -> Result<bool, ApiError> {
    let Some(due) = due(tx)? else { return Ok(false) };
    Ok(!covers(gov::get::<RecoveryRecord>(tx, gov::RECOVERY, gov::RECOVERY_KEY)?.as_ref(), &due))
}

/// Issues new shares of `secret` into `tx` if the recorded ones lag, or removes them when no
/// recovery member is left. Returns the new issue's version, if it wrote one.
pub(crate) fn maintain(tx: &mut Tx, secret: &[u8; 32]) -> Result<Option<u64>, ApiError> {
    let Some(due) = due(tx)? else { return Ok(None) };
    let current: Option<RecoveryRecord> = gov::get(tx, gov::RECOVERY, gov::RECOVERY_KEY)?;
    if covers(current.as_ref(), &due) {
        return Ok(None);
    }
    if due.keys.is_empty() {
        tx.remove(gov::RECOVERY, gov::RECOVERY_KEY)?;
        return Ok(None);
    }
    let version = current.map_or(1, |r| r.version + 1);
    let mut members = Vec::with_capacity(due.keys.len());
    for (id, pem) in &due.keys {
        let der = envelope::public_key_der(pem)
            .map_err(|e| ApiError::internal(format!("member {id}'s encryption key: {e}")))?;
        members.push((id.clone(), der));
    }
    let issued = recovery::issue(secret, &due.service, version, due.threshold, &members)
        .map_err(|e| ApiError::internal(format!("issuing recovery shares: {e}")))?;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let shares = issued
        .shares
        .iter()
        .map(|s| {
            let share = RecoveryShare {
                sealed: b64(&s.sealed),
                digest: hex::encode(s.digest),
                encryption_key_sha256: key_sha256(&due.keys[&s.member]),
            };
            (s.member.clone(), share)
        })
        .collect();
    let record = RecoveryRecord {
        version,
        threshold: due.threshold,
        service: due.service,
        wrapped_secret: b64(&issued.wrapped_secret),
        shares,
    };
    tx.put(gov::RECOVERY, gov::RECOVERY_KEY, &serde_json::to_vec(&record).expect("a recovery record serializes"));
    Ok(Some(version))
}
