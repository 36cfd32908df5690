//! The `gov.*` tables: typed reads of their records, and the write set of genesis.
//!
//! The tables and their records are defined once, in `cloister_abi::gov`, and shared with
//! constitutions. All of them are public (kept in clear in the ledger). Apps may read
//! `gov.app_config` and `gov.users` and nothing else here; only genesis, the node's governance
//! engine, and the constitution's `apply` write them.

pub use cloister_abi::gov::*;

use crate::{KvError, Tx, WriteSet};

pub fn get<T: serde::de::DeserializeOwned>(tx: &Tx, map: &str, key: &[u8]) -> Result<Option<T>, KvError> {
    Ok(tx.get(map, key)?.map(|v| {
        serde_json::from_slice(&v).unwrap_or_else(|e| panic!("{map} holds a record that does not decode: {e}"))
    }))
}

fn put<T: serde::Serialize>(ws: &mut WriteSet, map: &str, key: &[u8], value: &T) {
    ws.put(map, key, &serde_json::to_vec(value).expect("governance records serialize"));
}

pub fn member(tx: &Tx, id: &str) -> Result<Option<MemberRecord>, KvError> {
    get(tx, MEMBERS, id.as_bytes())
}

pub fn user(tx: &Tx, id: &str) -> Result<Option<UserRecord>, KvError> {
    get(tx, USERS, id.as_bytes())
}

pub fn service(tx: &Tx) -> Result<Option<ServiceRecord>, KvError> {
    get(tx, SERVICE, SERVICE_KEY)
}

pub fn node(tx: &Tx, id: &str) -> Result<Option<NodeRecord>, KvError> {
    get(tx, NODES, id.as_bytes())
}

/// The standing of a member, read without building the rest of its record.
pub fn member_status(tx: &Tx, id: &str) -> Result<Option<MemberStatus>, KvError> {
    Ok(get::<views::Member>(tx, MEMBERS, id.as_bytes())?.map(|m| m.status))
}

/// Whether a user is registered, read without building its record.
pub fn is_user(tx: &Tx, id: &str) -> Result<bool, KvError> {
    Ok(get::<views::User>(tx, USERS, id.as_bytes())?.is_some())
}

/// The service's state, read without building the rest of its record.
pub fn service_state(tx: &Tx) -> Result<Option<ServiceState>, KvError> {
    Ok(get::<views::Service>(tx, SERVICE, SERVICE_KEY)?.map(|s| s.state))
}

/// The standing of a node, read without building its evidence (several KiB of JSON, for a node
/// that joined with SNP evidence). Every message on the peer listener is authorized by it.
pub fn node_status(tx: &Tx, id: &str) -> Result<Option<NodeStatus>, KvError> {
    Ok(get::<views::Node>(tx, NODES, id.as_bytes())?.map(|n| n.status))
}

/// The few fields that requests and peer messages read of a record, each time one arrives.
///
/// serde_json skips every other field without allocating, where decoding the whole record builds
/// its `serde_json::Value`s and strings: a `perf` profile of a leader taking forwarded writes put
/// 3.5% of its time in decoding whole node records, and `cargo bench -p cloister-store` reads a
/// node's standing in about half the time through the view. The fields a record must have are still
/// required (as `IgnoredAny`), so a record that lacks one fails here as it fails in full; the
/// store's tests check each view against its record.
mod views {
    use serde::Deserialize;
    use serde::de::IgnoredAny;

    use super::{MemberStatus, NodeStatus, ServiceState};

    #[derive(Deserialize)]
    pub(super) struct Member {
        #[serde(rename = "cert")]
        _cert: IgnoredAny,
        pub status: MemberStatus,
    }

    #[derive(Deserialize)]
    pub(super) struct User {
        #[serde(rename = "cert")]
        _cert: IgnoredAny,
    }

    #[derive(Deserialize)]
    pub(super) struct Service {
        pub state: ServiceState,
        #[serde(rename = "cert")]
        _cert: IgnoredAny,
    }

    #[derive(Deserialize)]
    pub(super) struct Node {
        #[serde(rename = "name")]
        _name: IgnoredAny,
        pub status: NodeStatus,
        #[serde(rename = "cert")]
        _cert: IgnoredAny,
    }
}

pub fn app(tx: &Tx) -> Result<Option<AppRecord>, KvError> {
    get(tx, APP, APP_KEY)
}

pub fn app_code(tx: &Tx, code_hash: &str) -> Result<Option<Vec<u8>>, KvError> {
    tx.get(APP_CODE, code_hash.as_bytes())
}

pub fn constitution(tx: &Tx) -> Result<Option<Vec<u8>>, KvError> {
    tx.get(CONSTITUTION, CONSTITUTION_KEY)
}

pub fn proposal(tx: &Tx, id: &str) -> Result<Option<ProposalRecord>, KvError> {
    get(tx, PROPOSALS, id.as_bytes())
}

pub fn ballots(tx: &Tx, id: &str) -> Result<Ballots, KvError> {
    Ok(get(tx, BALLOTS, id.as_bytes())?.unwrap_or_default())
}

/// Every entry of a governance map, decoded, in key order.
pub fn all<T: serde::de::DeserializeOwned>(tx: &Tx, map: &str) -> Result<Vec<(String, T)>, KvError> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let lower = match &after {
            Some(k) => std::ops::Bound::Excluded(k.as_slice()),
            None => std::ops::Bound::Unbounded,
        };
        let Some((key, value)) = tx.first_in(map, lower, std::ops::Bound::Unbounded)? else {
            return Ok(out);
        };
        let value =
            serde_json::from_slice(&value).unwrap_or_else(|e| panic!("{map} holds a record that does not decode: {e}"));
        out.push((String::from_utf8_lossy(&key).into_owned(), value));
        after = Some(key);
    }
}

/// The ids of the Active members: the ones whose ballots count.
pub fn active_members(tx: &Tx) -> Result<Vec<String>, KvError> {
    Ok(all::<MemberRecord>(tx, MEMBERS)?
        .into_iter()
        .filter(|(_, m)| m.status == MemberStatus::Active)
        .map(|(id, _)| id)
        .collect())
}

/// The private map (outside every contract's namespace, so only the node writes or reads it,
/// and sealed like any private map) holding the service identity's key, PKCS#8 PEM: a node has it
/// only once it holds the ledger secret, that is once it is Trusted.
pub const SERVICE_IDENTITY_MAP: &str = "node/service_identity";
pub const SERVICE_IDENTITY_KEY: &[u8] = b"key";

/// The service identity's private key (PEM), if this service has one.
pub fn service_identity_key(tx: &Tx) -> Result<Option<String>, KvError> {
    Ok(tx.get(SERVICE_IDENTITY_MAP, SERVICE_IDENTITY_KEY)?.map(|k| String::from_utf8_lossy(&k).into_owned()))
}

/// Writes a service identity: its certificate into `service`, its key into the sealed map.
pub fn put_service_identity(ws: &mut WriteSet, service: &mut ServiceRecord, cert_pem: &str, key_pem: &str) {
    service.identity = Some(cert_pem.to_owned());
    ws.put(SERVICE_IDENTITY_MAP, SERVICE_IDENTITY_KEY, key_pem.as_bytes());
    put(ws, SERVICE, SERVICE_KEY, service);
}

/// What a new service starts with.
pub struct Genesis {
    pub service_cert: String,
    /// The service identity: certificate and key (PEM), generated by the first node.
    pub identity: (String, String),
    /// The first node's certificate's SHA-256 (hex), for its endorsement.
    pub node_cert_sha256: String,
    /// (id, certificate PEM, encryption key PEM of a recovery member).
    pub members: Vec<(String, String, Option<String>)>,
    /// Recovery shares needed to recover the service.
    pub recovery_threshold: u32,
    pub users: Vec<(String, String)>,
    /// The constitution's wasm, already checked by the runtime.
    pub constitution: Vec<u8>,
    /// The app's wasm, already checked by the runtime.
    pub app: Option<Vec<u8>>,
    /// The first node: (id, name, certificate PEM).
    pub node: (String, String, String),
    pub attestation: GenesisAttestation,
}

/// A new service's first node, as its first transaction records it: Trusted, endorsed, and its
/// attestation's roots and values the service's first allowed ones.
pub struct FirstNode<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// Its certificate (PEM), and the hex SHA-256 of its DER.
    pub cert: &'a str,
    pub cert_sha256: &'a str,
    pub attestation: &'a GenesisAttestation,
}

/// `record` for node `node_id`, signed by the service identity (its key, PEM).
pub fn signed_endorsement(
    identity_key_pem: &str,
    node_id: &str,
    record: EndorsementRecord,
) -> anyhow::Result<EndorsementRecord> {
    let record = EndorsementRecord { signature: None, ..record };
    let signature =
        cloister_crypto::identity::sign_hex(identity_key_pem, "the service identity", &record.message(node_id))?;
    Ok(EndorsementRecord { signature: Some(signature), ..record })
}

impl FirstNode<'_> {
    /// Writes the first node's records, its endorsement signed by the new service identity.
    pub fn write(&self, ws: &mut WriteSet, identity_key_pem: &str) -> anyhow::Result<()> {
        let node = NodeRecord {
            name: self.name.to_owned(),
            status: NodeStatus::Trusted,
            cert: self.cert.to_owned(),
            evidence: self.attestation.evidence.clone(),
            verified: self.attestation.verified.clone(),
            encryption_key: Some(self.attestation.encryption_key.clone()),
        };
        put(ws, NODES, self.id.as_bytes(), &node);
        put(ws, ATTESTATION_ROOT, ROOT_KEY, &self.attestation.roots);
        put(ws, MEASUREMENTS, self.attestation.measurement.as_bytes(), &true);
        put(ws, HOST_DATA, self.attestation.host_data.as_bytes(), &true);
        put(ws, MIN_TCB, MIN_TCB_KEY, &self.attestation.min_tcb);
        if let Some(set) = &self.attestation.azure_pcrs {
            put(ws, AZURE_PCRS, pcr_set_key(set).as_bytes(), set);
        }
        let endorsement = EndorsementRecord { cert_sha256: self.cert_sha256.to_owned(), until: None, signature: None };
        put(ws, ENDORSEMENTS, self.id.as_bytes(), &signed_endorsement(identity_key_pem, self.id, endorsement)?);
        Ok(())
    }
}

/// What genesis records about attestation: the pinned roots, the first node's measurement and
/// host_data (the first allowed values), and its evidence with the verification result.
pub struct GenesisAttestation {
    pub roots: serde_json::Value,
    pub measurement: String,
    pub host_data: String,
    /// On Azure: the first node's PCRs that a new service allows first.
    pub azure_pcrs: Option<PcrSet>,
    /// The first node's reported TCB: the lowest a joining node's may be, until a proposal
    /// (`set_min_tcb`) moves it. Without one, any AMD-signed VCEK passed, however old the
    /// firmware it was issued for.
    pub min_tcb: Tcb,
    pub evidence: serde_json::Value,
    pub verified: serde_json::Value,
    /// The first node's encryption key (SPKI PEM), bound into its evidence.
    pub encryption_key: String,
}

impl Genesis {
    /// The genesis transaction: members (Active), users, the constitution, the app, the first
    /// node (Trusted), and the service record (Opening).
    pub fn write_set(&self) -> anyhow::Result<WriteSet> {
        let mut ws = WriteSet::default();
        for (id, cert, encryption_key) in &self.members {
            let record = MemberRecord {
                cert: cert.clone(),
                status: MemberStatus::Active,
                encryption_key: encryption_key.clone(),
                data: Default::default(),
            };
            put(&mut ws, MEMBERS, id.as_bytes(), &record);
        }
        for (id, cert) in &self.users {
            put(&mut ws, USERS, id.as_bytes(), &UserRecord { cert: cert.clone(), data: Default::default() });
        }
        ws.put(CONSTITUTION, CONSTITUTION_KEY, &self.constitution);
        if let Some(wasm) = &self.app {
            let code_hash = blake3::hash(wasm).to_hex().to_string();
            ws.put(APP_CODE, code_hash.as_bytes(), wasm);
            put(&mut ws, APP, APP_KEY, &AppRecord { code_hash });
        }
        let (id, name, cert) = &self.node;
        let first = FirstNode { id, name, cert, cert_sha256: &self.node_cert_sha256, attestation: &self.attestation };
        first.write(&mut ws, &self.identity.1)?;
        let mut service = ServiceRecord {
            state: ServiceState::Opening,
            cert: self.service_cert.clone(),
            recovery_threshold: self.recovery_threshold,
            identity: None,
            previous_identities: Vec::new(),
            rekeys_requested: 0,
        };
        put_service_identity(&mut ws, &mut service, &self.identity.0, &self.identity.1);
        Ok(ws)
    }
}
