//! Governance state: the `gov.*` tables, their records, and genesis.
//!
//! All governance tables are public (kept in clear in the ledger). Apps may read
//! `gov.app_config` and nothing else here; only genesis and governance write them.

use serde::{Deserialize, Serialize};

use crate::kv::{KvError, Tx, WriteSet};

pub const MEMBERS: &str = "gov.members";
pub const USERS: &str = "gov.users";
/// Key [`APP_KEY`]: the installed app's [`AppRecord`].
pub const APP: &str = "gov.app";
/// The installed app's wasm, keyed by its hex blake3 hash.
pub const APP_CODE: &str = "gov.app_code";
pub const APP_CONFIG: &str = "gov.app_config";
/// Key [`SERVICE_KEY`]: the [`ServiceRecord`].
pub const SERVICE: &str = "gov.service";

pub const APP_KEY: &[u8] = b"app";
pub const SERVICE_KEY: &[u8] = b"service";

/// A member's lifecycle: accepted by a proposal, active once it acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    Accepted,
    Active,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member's certificate (PEM); its hash is the member's id.
    pub cert: String,
    pub status: MemberStatus,
    /// Public key (PEM) for sharing recovery secrets with the member, if it has one.
    #[serde(default)]
    pub encryption_key: Option<String>,
    /// Free-form data about the member.
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub cert: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// The installed app: its code hash and manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// Hex blake3 of the wasm; the code is in [`APP_CODE`] under this key.
    pub code_hash: String,
    pub manifest: cloister_sdk::abi::Manifest,
}

/// Whether the service takes user calls yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceState {
    Opening,
    Open,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub state: ServiceState,
    /// The service CA certificate (PEM).
    pub cert: String,
}

fn get<T: serde::de::DeserializeOwned>(tx: &Tx, map: &str, key: &[u8]) -> Result<Option<T>, KvError> {
    Ok(tx.get(map, key)?.map(|v| {
        serde_json::from_slice(&v).unwrap_or_else(|e| panic!("{map} holds a record that does not decode: {e}"))
    }))
}

fn put<T: Serialize>(ws: &mut WriteSet, map: &str, key: &[u8], value: &T) {
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

pub fn app(tx: &Tx) -> Result<Option<AppRecord>, KvError> {
    get(tx, APP, APP_KEY)
}

pub fn app_code(tx: &Tx, code_hash: &str) -> Result<Option<Vec<u8>>, KvError> {
    tx.get(APP_CODE, code_hash.as_bytes())
}

/// What a new service starts with.
pub struct Genesis {
    pub service_cert: String,
    pub members: Vec<(String, String)>,
    pub users: Vec<(String, String)>,
    /// The app's wasm and manifest, already checked by the runtime.
    pub app: Option<(Vec<u8>, cloister_sdk::abi::Manifest)>,
    pub state: ServiceState,
}

impl Genesis {
    /// The genesis transaction: members (active), users, the app, and the service record.
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
        if let Some((wasm, manifest)) = &self.app {
            let code_hash = blake3::hash(wasm).to_hex().to_string();
            ws.put(APP_CODE, code_hash.as_bytes(), wasm);
            put(&mut ws, APP, APP_KEY, &AppRecord { code_hash, manifest: manifest.clone() });
        }
        put(&mut ws, SERVICE, SERVICE_KEY, &ServiceRecord { state: self.state, cert: self.service_cert.clone() });
        ws
    }
}
