//! The governance endpoints both frontends share: signed writes go to the service's writer
//! (see [`crate::gov::engine`]); reads answer from committed state, as JSON.

use serde_json::{Value, json};

use super::error::ApiError;
use super::service::Service;
use crate::gov::{self, MemberRecord, UserRecord};
use cloister_store::Tx;

/// A governance read, as addressed by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GovRead {
    Proposals,
    Proposal(String),
    Members,
    Users,
    Endorsements,
    Service,
    Constitution,
    App,
    Recovery,
    RecoveryPrevious,
    LedgerSecrets,
}

impl GovRead {
    pub fn from_path(path: &str) -> Option<GovRead> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        Some(match parts.as_slice() {
            ["gov", "proposals"] => GovRead::Proposals,
            ["gov", "proposals", id] => GovRead::Proposal((*id).to_owned()),
            ["gov", "members"] => GovRead::Members,
            ["gov", "users"] => GovRead::Users,
            ["gov", "endorsements"] => GovRead::Endorsements,
            ["gov", "service"] => GovRead::Service,
            ["gov", "constitution"] => GovRead::Constitution,
            ["gov", "app"] => GovRead::App,
            ["gov", "recovery"] => GovRead::Recovery,
            ["gov", "recovery", "previous"] => GovRead::RecoveryPrevious,
            ["gov", "ledger_secrets"] => GovRead::LedgerSecrets,
            _ => return None,
        })
    }
}

/// Answers a governance read from committed state.
pub async fn read(service: &std::sync::Arc<Service>, what: GovRead) -> Result<Value, ApiError> {
    service.wait_readable().await?;
    if what == GovRead::App {
        let tx = service.store().begin()?;
        let Some(record) = gov::app(&tx)? else {
            return Err(ApiError::not_found("no app is installed"));
        };
        let module = service.app().await?;
        let config = table::<Value>(&tx, cloister_abi::gov::APP_CONFIG)?;
        return Ok(json!({
            "code_hash": record.code_hash,
            "manifest": module.as_ref().map(|m| m.manifest()),
            "config": config,
        }));
    }
    service.public_read(|tx| read_tables(tx, what)).await
}

fn read_tables(tx: &Tx, what: GovRead) -> Result<Value, ApiError> {
    Ok(match what {
        GovRead::Proposals => {
            let list: Vec<Value> = gov::all::<ProposalSummary>(tx, gov::PROPOSALS)?
                .into_iter()
                .map(|(id, p)| {
                    let actions: Vec<&str> = p.proposal.actions.iter().map(|a| a.name.as_str()).collect();
                    json!({ "proposal_id": id, "proposer": p.proposer, "state": p.state,
                            "created_at": p.created_at, "actions": actions, "reason": p.reason })
                })
                .collect();
            json!({ "proposals": list })
        }
        GovRead::Proposal(id) => {
            let p = gov::proposal(tx, &id)?.ok_or_else(|| ApiError::not_found(format!("no proposal {id}")))?;
            json!({ "proposal_id": id, "proposer": p.proposer, "state": p.state, "created_at": p.created_at,
                    "proposal": p.proposal, "reason": p.reason, "ballots": gov::ballots(tx, &id)? })
        }
        GovRead::Members => json!({ "members": table::<MemberRecord>(tx, gov::MEMBERS)? }),
        GovRead::Users => json!({ "users": table::<UserRecord>(tx, gov::USERS)? }),
        GovRead::Endorsements => {
            json!({ "endorsements": table::<gov::EndorsementRecord>(tx, gov::ENDORSEMENTS)? })
        }
        GovRead::Service => {
            let record = gov::service(tx)?.ok_or_else(|| ApiError::internal("gov.service is missing"))?;
            serde_json::to_value(record).expect("records serialize")
        }
        GovRead::Constitution => {
            let code = gov::constitution(tx)?.ok_or_else(|| ApiError::internal("gov.constitution is missing"))?;
            json!({ "code_hash": blake3::hash(&code).to_hex().to_string(), "bytes": code.len() })
        }
        GovRead::Recovery => {
            let record: gov::RecoveryRecord = gov::get(tx, gov::RECOVERY, gov::RECOVERY_KEY)?.ok_or_else(|| {
                ApiError::not_found(
                    "no recovery shares: the service has no recovery members (members with an encryption_key)",
                )
            })?;
            serde_json::to_value(record).expect("records serialize")
        }
        GovRead::RecoveryPrevious => {
            let record: gov::RecoveryRecord = gov::get(tx, gov::RECOVERY, gov::RECOVERY_PREVIOUS_KEY)?
                .ok_or_else(|| ApiError::not_found("this service was not recovered from a previous one"))?;
            if tx.get(gov::RECOVERY, gov::RECOVERY_PUBLIC_DONE_KEY)?.is_none() {
                return Err(ApiError::unavailable(
                    "the previous public state is still being written: shares are taken once it is",
                ));
            }
            serde_json::to_value(record).expect("records serialize")
        }
        GovRead::LedgerSecrets => {
            // The versions and who each was sealed to; the sealed secrets stay out of the answer.
            let rekeys: Vec<Value> = gov::all::<gov::LedgerSecretRecord>(tx, gov::LEDGER_SECRETS)?
                .into_iter()
                .map(|(_, r)| json!({ "version": r.version, "answers": r.answers, "nodes": r.nodes.keys().collect::<Vec<_>>() }))
                .collect();
            let version = rekeys.last().map_or(1, |r| r["version"].as_u64().unwrap_or(1));
            let requested = gov::service(tx)?.map_or(0, |s| s.rekeys_requested);
            json!({ "version": version, "rekeys_requested": requested, "rekeys": rekeys })
        }
        GovRead::App => unreachable!("answered by read()"),
    })
}

/// What the list of proposals shows of each: its actions' names, not their arguments (a module
/// each, for `set_app`), which serde skips without building them.
#[derive(serde::Deserialize)]
struct ProposalSummary {
    proposer: String,
    state: gov::ProposalState,
    created_at: u64,
    #[serde(default)]
    reason: Option<String>,
    proposal: ActionNames,
}

#[derive(serde::Deserialize)]
struct ActionNames {
    actions: Vec<ActionName>,
}

#[derive(serde::Deserialize)]
struct ActionName {
    name: String,
}

/// A whole governance table as a JSON object, id → record.
fn table<T: serde::de::DeserializeOwned + serde::Serialize>(tx: &Tx, map: &str) -> Result<Value, ApiError> {
    let entries: serde_json::Map<String, Value> = gov::all::<T>(tx, map)?
        .into_iter()
        .map(|(id, record)| (id, serde_json::to_value(record).expect("records serialize")))
        .collect();
    Ok(Value::Object(entries))
}
