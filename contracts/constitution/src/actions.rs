//! The actions this constitution knows: their argument checks and their effects.

use base64::Engine as _;
use cloister_sdk::gov::{
    self, Action, AppRecord, MemberRecord, MemberStatus, NodeRecord, NodeStatus, ServiceRecord, ServiceState, Tcb,
    UserRecord,
};
use cloister_sdk::{Map, raw};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const MEMBERS: Map<String, MemberRecord> = Map::new(gov::MEMBERS);
const USERS: Map<String, UserRecord> = Map::new(gov::USERS);
const NODES: Map<String, NodeRecord> = Map::new(gov::NODES);
const APP: Map<String, AppRecord> = Map::new(gov::APP);
const APP_CONFIG: Map<String, Value> = Map::new(gov::APP_CONFIG);
const SERVICE: Map<String, ServiceRecord> = Map::new(gov::SERVICE);
const MEASUREMENTS: Map<String, bool> = Map::new(gov::MEASUREMENTS);
const HOST_DATA: Map<String, bool> = Map::new(gov::HOST_DATA);
const MIN_TCB: Map<String, Tcb> = Map::new(gov::MIN_TCB);
const AZURE_PCRS: Map<String, gov::PcrSet> = Map::new(gov::AZURE_PCRS);

/// Longest free-form `data` of a member or user, as JSON.
const DATA_BYTES_MAX: usize = 4096;
/// Most settings one `set_app_config` may touch.
const APP_CONFIG_KEYS_MAX: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMember {
    cert: String,
    #[serde(default)]
    encryption_key: Option<String>,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetUser {
    cert: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wasm {
    wasm: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppConfig {
    config: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Threshold {
    threshold: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Measurement {
    measurement: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostData {
    host_data: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PcrSetArgs {
    pcrs: gov::PcrSet,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MinTcb {
    tcb: Tcb,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeId {
    node_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

fn args<T: DeserializeOwned>(action: &Action) -> Result<T, String> {
    let value = if action.args.is_null() { Value::Object(Default::default()) } else { action.args.clone() };
    serde_json::from_value(value).map_err(|e| format!("bad arguments: {e}"))
}

/// The id of a certificate: hex SHA-256 of its DER.
pub fn cert_id(cert_pem: &str) -> Result<String, String> {
    use sha2::Digest;
    let pem = pem::parse(cert_pem).map_err(|e| format!("cert is not PEM: {e}"))?;
    if pem.tag() != "CERTIFICATE" {
        return Err(format!("cert is a PEM {}, not a CERTIFICATE", pem.tag()));
    }
    let digest = sha2::Sha256::digest(pem.contents());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn wasm_bytes(args: &Wasm) -> Result<Vec<u8>, String> {
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(&args.wasm).map_err(|e| format!("wasm is not base64: {e}"))?;
    if !bytes.starts_with(b"\0asm") {
        return Err("wasm does not start with the wasm magic number".into());
    }
    Ok(bytes)
}

fn hex_of_len(value: &str, bytes: usize, what: &str) -> Result<String, String> {
    let lower = value.to_ascii_lowercase();
    if lower.len() != 2 * bytes || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{what} must be {bytes} bytes of hex, got {value:?}"));
    }
    Ok(lower)
}

fn small_data(data: &Value) -> Result<(), String> {
    let len = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
    if len > DATA_BYTES_MAX {
        return Err(format!("data is {len} bytes of JSON; at most {DATA_BYTES_MAX}"));
    }
    Ok(())
}

fn service() -> Result<ServiceRecord, String> {
    SERVICE.get(&key(gov::SERVICE_KEY)).ok_or_else(|| "gov.service is missing".to_owned())
}

/// The recovery members: Active members with an encryption key, who each hold a recovery share.
fn recovery_members() -> Vec<String> {
    MEMBERS
        .iter()
        .filter(|(_, m)| m.status == MemberStatus::Active && m.encryption_key.is_some())
        .map(|(id, _)| id)
        .collect()
}

/// Refuses a change that would leave fewer recovery members than the recovery threshold: the
/// shares of the members left could no longer recover the service.
fn keeps_recovery_threshold(losing: &str) -> Result<(), String> {
    let members = recovery_members();
    if !members.iter().any(|id| id == losing) {
        return Ok(());
    }
    let threshold = service()?.recovery_threshold as usize;
    if members.len() - 1 < threshold {
        return Err(format!(
            "member {losing} holds one of {} recovery shares and the recovery threshold is {threshold}: lower the threshold first",
            members.len()
        ));
    }
    Ok(())
}

fn key(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks an action's arguments against the current state, without changing anything.
pub fn validate(action: &Action) -> Result<(), String> {
    match action.name.as_str() {
        "set_member" => {
            let a: SetMember = args(action)?;
            cert_id(&a.cert)?;
            if let Some(k) = &a.encryption_key {
                let pem = pem::parse(k).map_err(|e| format!("encryption_key is not PEM: {e}"))?;
                if pem.tag() != "PUBLIC KEY" {
                    return Err(format!("encryption_key is a PEM {}, not a PUBLIC KEY", pem.tag()));
                }
            } else {
                keeps_recovery_threshold(&cert_id(&a.cert)?)?;
            }
            small_data(&a.data)
        }
        "remove_member" => {
            let a: ById = args(action)?;
            let member = MEMBERS.get(&a.id).ok_or_else(|| format!("no member {}", a.id))?;
            let active = MEMBERS.iter().filter(|(_, m)| m.status == MemberStatus::Active).count();
            if member.status == MemberStatus::Active && active == 1 {
                return Err("the last active member cannot be removed".into());
            }
            keeps_recovery_threshold(&a.id)
        }
        "set_user" => {
            let a: SetUser = args(action)?;
            cert_id(&a.cert)?;
            small_data(&a.data)
        }
        "remove_user" => {
            let a: ById = args(action)?;
            USERS.get(&a.id).map(drop).ok_or_else(|| format!("no user {}", a.id))
        }
        "set_app" | "set_constitution" => wasm_bytes(&args(action)?).map(drop),
        "remove_app" => {
            args::<NoArgs>(action)?;
            APP.get(&key(gov::APP_KEY)).map(drop).ok_or_else(|| "no app is installed".to_owned())
        }
        "set_app_config" => {
            let a: AppConfig = args(action)?;
            if a.config.is_empty() || a.config.len() > APP_CONFIG_KEYS_MAX {
                return Err(format!("config must name 1..={APP_CONFIG_KEYS_MAX} settings"));
            }
            Ok(())
        }
        "transition_service_to_open" => {
            args::<NoArgs>(action)?;
            match service()?.state {
                ServiceState::Opening => Ok(()),
                ServiceState::Open => Err("the service is already open".into()),
                ServiceState::Recovering => {
                    Err("the service is recovering: a threshold of recovery members must submit their shares first"
                        .into())
                }
            }
        }
        "trigger_ledger_rekey" => {
            args::<NoArgs>(action)?;
            service().map(drop)
        }
        "set_recovery_threshold" => {
            let a: Threshold = args(action)?;
            let recovery = recovery_members().len();
            if a.threshold == 0 || a.threshold as usize > recovery {
                return Err(format!(
                    "threshold must be between 1 and the {recovery} recovery members (Active members with an encryption_key)"
                ));
            }
            Ok(())
        }
        "add_snp_measurement" | "remove_snp_measurement" => {
            hex_of_len(&args::<Measurement>(action)?.measurement, 48, "measurement").map(drop)
        }
        "add_snp_host_data" | "remove_snp_host_data" => {
            hex_of_len(&args::<HostData>(action)?.host_data, 32, "host_data").map(drop)
        }
        "set_snp_minimum_tcb" => args::<MinTcb>(action).map(drop),
        "add_azure_pcr_set" => gov::checked_pcr_set(&args::<PcrSetArgs>(action)?.pcrs).map(drop),
        "remove_azure_pcr_set" => {
            let set = gov::checked_pcr_set(&args::<PcrSetArgs>(action)?.pcrs)?;
            AZURE_PCRS.get(&gov::pcr_set_key(&set)).map(drop).ok_or_else(|| "no such PCR set is allowed".to_owned())
        }
        "transition_node_to_trusted" => {
            let a: NodeId = args(action)?;
            match NODES.get(&a.node_id) {
                Some(n) if n.status == NodeStatus::Pending => Ok(()),
                Some(n) => Err(format!("node {} is {:?}, not Pending", a.node_id, n.status)),
                None => Err(format!("no node {}", a.node_id)),
            }
        }
        "remove_node" => {
            let a: NodeId = args(action)?;
            match NODES.get(&a.node_id) {
                Some(n) if n.status != NodeStatus::Retired => Ok(()),
                Some(_) => Err(format!("node {} is already retired", a.node_id)),
                None => Err(format!("no node {}", a.node_id)),
            }
        }
        other => Err(format!("unknown action {other:?}")),
    }
}

/// Asks the node to rotate the ledger secret (`gov.service.rekeys_requested`, which the leader
/// answers with a new version in `gov.ledger_secrets`).
fn request_rekey() -> Result<(), String> {
    let mut s = service()?;
    s.rekeys_requested += 1;
    SERVICE.insert(&key(gov::SERVICE_KEY), &s);
    Ok(())
}

/// Performs an action. It validates again first: the state may have changed since the proposal.
pub fn apply(action: &Action) -> Result<(), String> {
    validate(action)?;
    match action.name.as_str() {
        "set_member" => {
            let a: SetMember = args(action)?;
            let id = cert_id(&a.cert)?;
            // Re-proposing a member keeps its status; a new one must acknowledge first.
            let status = MEMBERS.get(&id).map_or(MemberStatus::Accepted, |m| m.status);
            MEMBERS.insert(&id, &MemberRecord { cert: a.cert, status, encryption_key: a.encryption_key, data: a.data });
        }
        "remove_member" => {
            MEMBERS.remove(&args::<ById>(action)?.id);
        }
        "set_user" => {
            let a: SetUser = args(action)?;
            USERS.insert(&cert_id(&a.cert)?, &UserRecord { cert: a.cert, data: a.data });
        }
        "remove_user" => {
            USERS.remove(&args::<ById>(action)?.id);
        }
        "set_app" => {
            let wasm = wasm_bytes(&args(action)?)?;
            let code_hash = blake3::hash(&wasm).to_hex().to_string();
            if let Some(old) = APP.get(&key(gov::APP_KEY)) {
                raw::remove(gov::APP_CODE, old.code_hash.as_bytes());
            }
            raw::put(gov::APP_CODE, code_hash.as_bytes(), &wasm);
            APP.insert(&key(gov::APP_KEY), &AppRecord { code_hash });
        }
        "remove_app" => {
            if let Some(old) = APP.get(&key(gov::APP_KEY)) {
                raw::remove(gov::APP_CODE, old.code_hash.as_bytes());
            }
            APP.remove(&key(gov::APP_KEY));
        }
        "set_app_config" => {
            for (name, value) in args::<AppConfig>(action)?.config {
                if value.is_null() {
                    APP_CONFIG.remove(&name);
                } else {
                    APP_CONFIG.insert(&name, &value);
                }
            }
        }
        "set_constitution" => {
            raw::put(gov::CONSTITUTION, gov::CONSTITUTION_KEY, &wasm_bytes(&args(action)?)?);
        }
        "transition_service_to_open" => {
            let mut s = service()?;
            s.state = ServiceState::Open;
            SERVICE.insert(&key(gov::SERVICE_KEY), &s);
        }
        "set_recovery_threshold" => {
            let mut s = service()?;
            s.recovery_threshold = args::<Threshold>(action)?.threshold;
            SERVICE.insert(&key(gov::SERVICE_KEY), &s);
        }
        "trigger_ledger_rekey" => request_rekey()?,
        "add_snp_measurement" => {
            MEASUREMENTS.insert(&hex_of_len(&args::<Measurement>(action)?.measurement, 48, "measurement")?, &true);
        }
        "remove_snp_measurement" => {
            MEASUREMENTS.remove(&hex_of_len(&args::<Measurement>(action)?.measurement, 48, "measurement")?);
        }
        "add_snp_host_data" => {
            HOST_DATA.insert(&hex_of_len(&args::<HostData>(action)?.host_data, 32, "host_data")?, &true);
        }
        "remove_snp_host_data" => {
            HOST_DATA.remove(&hex_of_len(&args::<HostData>(action)?.host_data, 32, "host_data")?);
        }
        "set_snp_minimum_tcb" => {
            MIN_TCB.insert(&key(gov::MIN_TCB_KEY), &args::<MinTcb>(action)?.tcb);
        }
        "add_azure_pcr_set" => {
            let set = gov::checked_pcr_set(&args::<PcrSetArgs>(action)?.pcrs)?;
            AZURE_PCRS.insert(&gov::pcr_set_key(&set), &set);
        }
        "remove_azure_pcr_set" => {
            let set = gov::checked_pcr_set(&args::<PcrSetArgs>(action)?.pcrs)?;
            AZURE_PCRS.remove(&gov::pcr_set_key(&set));
        }
        "transition_node_to_trusted" | "remove_node" => {
            let id = args::<NodeId>(action)?.node_id;
            let mut node = NODES.get(&id).ok_or_else(|| format!("no node {id}"))?;
            node.status = if action.name == "remove_node" { NodeStatus::Retired } else { NodeStatus::Trusted };
            NODES.insert(&id, &node);
            // A retired node keeps its copy of the ledger secret: what is written from now on is
            // sealed under a new one it is not given.
            if action.name == "remove_node" {
                request_rekey()?;
            }
        }
        other => return Err(format!("unknown action {other:?}")),
    }
    Ok(())
}
