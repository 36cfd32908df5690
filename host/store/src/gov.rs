//! The `gov.*` tables: typed reads of their records, and the write set of genesis.
//!
//! The tables and their records are defined once, in `cloister_abi::gov`, and shared with
//! constitutions. All of them are public (kept in clear in the ledger). Apps may read
//! `gov.app_config` and nothing else here; only genesis, the node's governance engine, and the
//! constitution's `apply` write them.

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

/// What a new service starts with.
pub struct Genesis {
    pub service_cert: String,
    pub members: Vec<(String, String)>,
    pub users: Vec<(String, String)>,
    /// The constitution's wasm, already checked by the runtime.
    pub constitution: Vec<u8>,
    /// The app's wasm, already checked by the runtime.
    pub app: Option<Vec<u8>>,
    /// The first node: (id, name, certificate PEM).
    pub node: (String, String, String),
    pub attestation: GenesisAttestation,
}

/// What genesis records about attestation: the pinned roots, the first node's measurement and
/// host_data (the first allowed values), and its evidence with the verification result.
pub struct GenesisAttestation {
    pub roots: serde_json::Value,
    pub measurement: String,
    pub host_data: String,
    /// On Azure: the first node's PCRs that a new service allows first.
    pub azure_pcrs: Option<PcrSet>,
    pub evidence: serde_json::Value,
    pub verified: serde_json::Value,
}

impl Genesis {
    /// The genesis transaction: members (Active), users, the constitution, the app, the first
    /// node (Trusted), and the service record (Opening).
    pub fn write_set(&self) -> WriteSet {
        let mut ws = WriteSet::default();
        for (id, cert) in &self.members {
            let record = MemberRecord {
                cert: cert.clone(),
                status: MemberStatus::Active,
                encryption_key: None,
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
        let node = NodeRecord {
            name: name.clone(),
            status: NodeStatus::Trusted,
            cert: cert.clone(),
            evidence: self.attestation.evidence.clone(),
            verified: self.attestation.verified.clone(),
        };
        put(&mut ws, NODES, id.as_bytes(), &node);
        put(&mut ws, ATTESTATION_ROOT, ROOT_KEY, &self.attestation.roots);
        put(&mut ws, MEASUREMENTS, self.attestation.measurement.as_bytes(), &true);
        put(&mut ws, HOST_DATA, self.attestation.host_data.as_bytes(), &true);
        if let Some(set) = &self.attestation.azure_pcrs {
            put(&mut ws, AZURE_PCRS, pcr_set_key(set).as_bytes(), set);
        }
        let service =
            ServiceRecord { state: ServiceState::Opening, cert: self.service_cert.clone(), recovery_threshold: 1 };
        put(&mut ws, SERVICE, SERVICE_KEY, &service);
        ws
    }
}
