//! Governance requests on the leader: check the signed request, record it, and let the
//! constitution validate, resolve and apply proposals.
//!
//! Everything here runs on the writer thread, over the applied state plus this leader's pending
//! writes, so requests are checked and applied in one order (a replay cannot slip between two
//! checks). A refused request writes nothing; an accepted one commits as one `Gov` transaction
//! holding the request, its effects, and the proposal's new state. When `apply` fails, its
//! writes are undone and the proposal is recorded as Failed with the reason.

use base64::Engine as _;
use cloister_sdk::abi::{Privilege, RequestHead};
use cloister_sdk::{Caller, Mode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::cose::{self, MsgType, SignedRequest};
use super::*;
use crate::api::error::ApiError;
use crate::kv::Tx;
use crate::wasm::{Invocation, LoadedModule, Runtime};

/// The namespace of the constitution's own maps.
pub const CONSTITUTION_NAMESPACE: &str = "constitution";

/// Default of `[gov] request_window_s`.
pub const REQUEST_WINDOW_S: u64 = 300;

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
    fn msg_type(&self) -> MsgType {
        match self {
            GovWrite::Propose => MsgType::Proposal,
            GovWrite::Vote(_) => MsgType::Ballot,
            GovWrite::Withdraw(_) => MsgType::Withdrawal,
            GovWrite::Ack => MsgType::Ack,
        }
    }

    fn proposal_id(&self) -> Option<&str> {
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

/// A ballot's payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ballot {
    pub approve: bool,
}

/// What the node checks about a governance request besides its signature.
pub struct Policy {
    /// How far `created_at` may be from the node's clock, either way, in seconds.
    pub request_window_s: u64,
    /// The node's clock, in seconds since the Unix epoch.
    pub now: u64,
}

/// Handles one signed governance write and hands the transaction back. On success it holds
/// everything to commit, and the JSON is the answer; on error the caller must discard it.
pub fn execute(
    runtime: &Runtime,
    tx: Tx,
    write: &GovWrite,
    bytes: &[u8],
    policy: &Policy,
) -> (Tx, Result<Value, ApiError>) {
    let mut slot = TxSlot(Some(tx));
    let result = handle(runtime, &mut slot, write, bytes, policy);
    (slot.0.expect("the transaction is back from the runtime"), result)
}

fn handle(
    runtime: &Runtime,
    tx: &mut TxSlot,
    write: &GovWrite,
    bytes: &[u8],
    policy: &Policy,
) -> Result<Value, ApiError> {
    let request = authenticate(tx, write, bytes, policy)?;
    let answer = match write {
        GovWrite::Propose => propose(runtime, tx, &request, bytes)?,
        GovWrite::Vote(id) => vote(runtime, tx, &request, id)?,
        GovWrite::Withdraw(id) => withdraw(tx, &request, id)?,
        GovWrite::Ack => ack(tx, &request)?,
    };
    let record = HistoryRecord {
        cose: base64::engine::general_purpose::STANDARD.encode(bytes),
        signer: request.signer.clone(),
        msg_type: request.msg_type.clone(),
        created_at: request.created_at,
    };
    put_json(tx, HISTORY, request_digest(bytes).as_bytes(), &record);
    Ok(answer)
}

/// The id of a request: hex blake3 of its bytes. A proposal's id is its request's id.
pub fn request_digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn put_json<T: serde::Serialize>(tx: &mut Tx, map: &str, key: &[u8], value: &T) {
    tx.put(map, key, &serde_json::to_vec(value).expect("governance records serialize"));
}

fn refuse(status: u16, code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(status, code, message)
}

/// Parses, dates, attributes and verifies a request, and checks the signer's standing.
fn authenticate(tx: &Tx, write: &GovWrite, bytes: &[u8], policy: &Policy) -> Result<SignedRequest, ApiError> {
    let request = cose::parse(bytes).map_err(|e| refuse(400, "MalformedSignedRequest", e))?;
    let expected = write.msg_type().as_str();
    if request.msg_type != expected {
        return Err(refuse(
            400,
            "WrongMessageType",
            format!("this endpoint takes a {expected:?} message, not {:?}", request.msg_type),
        ));
    }
    if request.proposal_id.as_deref() != write.proposal_id() {
        return Err(refuse(
            400,
            "ProposalIdMismatch",
            format!(
                "the signed proposal_id {:?} does not match the path's {:?}",
                request.proposal_id,
                write.proposal_id()
            ),
        ));
    }
    let skew = policy.now.abs_diff(request.created_at);
    if skew > policy.request_window_s {
        return Err(refuse(
            400,
            "RequestOutsideWindow",
            format!(
                "created_at {} is {skew} s from the node's clock {}; requests must be within {} s (request_window_s)",
                request.created_at, policy.now, policy.request_window_s
            ),
        ));
    }
    let Some(member) = member(tx, &request.signer)? else {
        return Err(if user(tx, &request.signer)?.is_some() {
            refuse(403, "NotAMember", format!("{} is a user; only members may govern", request.signer))
        } else {
            refuse(401, "UnknownSigner", format!("{} is not a member of this service", request.signer))
        });
    };
    request.verify(&member.cert).map_err(|e| refuse(401, "BadSignature", e))?;
    if tx.get(HISTORY, request_digest(bytes).as_bytes())?.is_some() {
        return Err(refuse(409, "Replay", "this exact signed request was already accepted; sign a new one"));
    }
    match (write, member.status) {
        (GovWrite::Ack, MemberStatus::Accepted)
        | (GovWrite::Propose | GovWrite::Vote(_) | GovWrite::Withdraw(_), MemberStatus::Active) => Ok(request),
        (GovWrite::Ack, MemberStatus::Active) => {
            Err(refuse(409, "AlreadyActive", format!("member {} is already active", request.signer)))
        }
        (_, status) => Err(refuse(
            403,
            "MemberNotActive",
            format!(
                "member {} is {status:?}: it must acknowledge (cloister gov ack) before it governs",
                request.signer
            ),
        )),
    }
}

fn ack(tx: &mut Tx, request: &SignedRequest) -> Result<Value, ApiError> {
    let mut record = member(tx, &request.signer)?.expect("authenticate found the member");
    record.status = MemberStatus::Active;
    put_json(tx, MEMBERS, request.signer.as_bytes(), &record);
    Ok(json!({ "member": request.signer, "status": record.status }))
}

fn open_proposal(tx: &Tx, id: &str) -> Result<ProposalRecord, ApiError> {
    let record = proposal(tx, id)?.ok_or_else(|| ApiError::not_found(format!("no proposal {id}")))?;
    if record.state != ProposalState::Open {
        return Err(refuse(409, "ProposalNotOpen", format!("proposal {id} is {:?}, no longer Open", record.state)));
    }
    Ok(record)
}

fn withdraw(tx: &mut Tx, request: &SignedRequest, id: &str) -> Result<Value, ApiError> {
    let mut record = open_proposal(tx, id)?;
    if record.proposer != request.signer {
        return Err(refuse(
            403,
            "NotProposer",
            format!("only the proposer {} may withdraw proposal {id}", record.proposer),
        ));
    }
    record.state = ProposalState::Withdrawn;
    put_json(tx, PROPOSALS, id.as_bytes(), &record);
    Ok(json!({ "proposal_id": id, "state": record.state }))
}

fn propose(runtime: &Runtime, tx: &mut TxSlot, request: &SignedRequest, bytes: &[u8]) -> Result<Value, ApiError> {
    let proposal: Proposal = serde_json::from_slice(&request.payload).map_err(|e| {
        refuse(400, "MalformedProposal", format!("the proposal is not {{\"actions\": [{{\"name\", \"args\"}}]}}: {e}"))
    })?;
    for (i, action) in proposal.actions.iter().enumerate() {
        node_checks(runtime, action)
            .map_err(|e| refuse(400, "InvalidProposal", format!("action {i} ({}): {e}", action.name)))?;
    }
    let constitution = load_constitution(runtime, tx)?;
    let caller = Caller::member(&request.signer);
    let validated = invoke(runtime, &constitution, tx, &caller, "/validate", &request.payload, Mode::Readonly)?;
    if !validated.is_success() {
        let message = ApiError::from_app(validated.head.status, &validated.body).message;
        return Err(refuse(400, "InvalidProposal", format!("the constitution refused the proposal: {message}")));
    }
    let id = request_digest(bytes);
    let record = ProposalRecord {
        proposer: request.signer.clone(),
        proposal,
        state: ProposalState::Open,
        created_at: request.created_at,
        reason: None,
    };
    put_json(tx, PROPOSALS, id.as_bytes(), &record);
    put_json(tx, BALLOTS, id.as_bytes(), &Ballots::new());
    resolve(runtime, &constitution, tx, &caller, &id, record)
}

fn vote(runtime: &Runtime, tx: &mut TxSlot, request: &SignedRequest, id: &str) -> Result<Value, ApiError> {
    let record = open_proposal(tx, id)?;
    let ballot: Ballot = serde_json::from_slice(&request.payload)
        .map_err(|e| refuse(400, "MalformedBallot", format!("a ballot is {{\"approve\": true|false}}: {e}")))?;
    let mut ballots = ballots(tx, id)?;
    ballots.insert(request.signer.clone(), ballot.approve);
    put_json(tx, BALLOTS, id.as_bytes(), &ballots);
    let constitution = load_constitution(runtime, tx)?;
    resolve(runtime, &constitution, tx, &Caller::member(&request.signer), id, record)
}

/// Asks the constitution for the proposal's state, and applies it once Accepted.
fn resolve(
    runtime: &Runtime,
    constitution: &LoadedModule,
    tx: &mut TxSlot,
    caller: &Caller,
    id: &str,
    mut record: ProposalRecord,
) -> Result<Value, ApiError> {
    let input = ResolveInput {
        proposal_id: id.to_owned(),
        proposer: record.proposer.clone(),
        proposal: record.proposal.clone(),
        ballots: ballots(tx, id)?,
        members: active_members(tx)?,
    };
    let body = serde_json::to_vec(&input).expect("resolve inputs serialize");
    let answer = invoke(runtime, constitution, tx, caller, "/resolve", &body, Mode::Readonly)?;
    let resolution: Resolution =
        (answer.is_success()).then(|| serde_json::from_slice(&answer.body).ok()).flatten().ok_or_else(|| {
            ApiError::internal(format!(
                "the constitution's /resolve answered {} without a resolution: {}",
                answer.head.status,
                String::from_utf8_lossy(&answer.body)
            ))
        })?;
    record.state = match resolution.state {
        ProposalState::Accepted => apply(runtime, constitution, tx, caller, id, &mut record)?,
        s @ (ProposalState::Open | ProposalState::Rejected) => s,
        other => {
            return Err(ApiError::internal(format!(
                "the constitution resolved to {other:?}, which only the node decides"
            )));
        }
    };
    put_json(tx, PROPOSALS, id.as_bytes(), &record);
    Ok(json!({ "proposal_id": id, "state": record.state, "reason": record.reason }))
}

/// Runs `apply` and the node's checks of its effects; on any failure undoes them and reports
/// Failed. On success, `set_constitution` or `set_app` drops the other Open proposals.
fn apply(
    runtime: &Runtime,
    constitution: &LoadedModule,
    tx: &mut TxSlot,
    caller: &Caller,
    id: &str,
    record: &mut ProposalRecord,
) -> Result<ProposalState, ApiError> {
    let savepoint = tx.savepoint();
    let input = ApplyInput { proposal_id: id.to_owned(), proposal: record.proposal.clone() };
    let body = serde_json::to_vec(&input).expect("apply inputs serialize");
    let failure = match invoke(runtime, constitution, tx, caller, "/apply", &body, Mode::Readwrite) {
        Err(e) => Some(format!("apply trapped: {}", e.message)),
        Ok(r) if !r.is_success() => {
            Some(format!("apply refused: {}", ApiError::from_app(r.head.status, &r.body).message))
        }
        Ok(_) => check_effects(runtime, tx).err(),
    };
    if let Some(reason) = failure {
        tx.restore(savepoint);
        tracing::warn!(proposal = id, %reason, "proposal failed");
        record.reason = Some(reason);
        return Ok(ProposalState::Failed);
    }
    // Accepting new code makes proposals filed against the old code moot.
    let replaces = |name: &str| record.proposal.actions.iter().any(|a| a.name == name);
    let (constitution_changed, app_changed) = (replaces("set_constitution"), replaces("set_app"));
    if app_changed || constitution_changed {
        let what = if constitution_changed { "the constitution" } else { "the app" };
        for (other, mut p) in all::<ProposalRecord>(tx, PROPOSALS)? {
            if other != id && p.state == ProposalState::Open {
                p.state = ProposalState::Dropped;
                p.reason = Some(format!("{what} changed when proposal {id} was accepted"));
                put_json(tx, PROPOSALS, other.as_bytes(), &p);
            }
        }
    }
    Ok(ProposalState::Accepted)
}

/// What `apply` left must still be usable: an app and a constitution that load.
fn check_effects(runtime: &Runtime, tx: &Tx) -> Result<(), String> {
    if let Some(record) = app(tx).map_err(|e| e.to_string())? {
        let code = app_code(tx, &record.code_hash)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("gov.app names code {} that gov.app_code lacks", record.code_hash))?;
        runtime.load(&code).map_err(|e| format!("the new app does not load: {e}"))?;
    }
    let code = super::constitution(tx).map_err(|e| e.to_string())?.ok_or("the constitution was removed")?;
    let module = runtime.load(&code).map_err(|e| format!("the new constitution does not load: {e}"))?;
    is_constitution(&module)
}

/// The checks only the node can make, before the constitution sees the proposal.
fn node_checks(runtime: &Runtime, action: &Action) -> Result<(), String> {
    let field = |name: &str| action.args.get(name).and_then(Value::as_str);
    match action.name.as_str() {
        "set_app" | "set_constitution" => {
            let b64 = field("wasm").ok_or("args.wasm (base64) is missing")?;
            let wasm = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("args.wasm is not base64: {e}"))?;
            let module = runtime.load(&wasm).map_err(|e| format!("the wasm is refused: {e}"))?;
            if action.name == "set_constitution" {
                is_constitution(&module)?;
            }
            Ok(())
        }
        "set_member" | "set_user" => {
            let pem = field("cert").ok_or("args.cert (PEM) is missing")?;
            let der = crate::node::identity::cert_der(pem.as_bytes()).map_err(|e| format!("args.cert: {e}"))?;
            x509_parser::parse_x509_certificate(&der).map_err(|e| format!("args.cert does not parse: {e}"))?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether a module offers the constitution's three endpoints.
pub fn is_constitution(module: &LoadedModule) -> Result<(), String> {
    for path in ["/validate", "/resolve", "/apply"] {
        if module.manifest().find("POST", path).is_none() {
            return Err(format!("the module is no constitution: it has no POST {path}"));
        }
    }
    Ok(())
}

fn load_constitution(runtime: &Runtime, tx: &Tx) -> Result<std::sync::Arc<LoadedModule>, ApiError> {
    let code = super::constitution(tx)?
        .ok_or_else(|| ApiError::internal("gov.constitution is empty: the service never ran genesis"))?;
    runtime.load(&code).map_err(|e| ApiError::internal(format!("the installed constitution does not load: {e}")))
}

/// Runs one of the constitution's endpoints over `tx`. A read-only mode keeps it from writing;
/// `/apply` runs read-write, and its caller undoes its writes unless it answers 2xx.
fn invoke(
    runtime: &Runtime,
    module: &LoadedModule,
    tx: &mut TxSlot,
    caller: &Caller,
    path: &str,
    body: &[u8],
    mode: Mode,
) -> Result<cloister_sdk::Response, ApiError> {
    let head = RequestHead {
        method: "POST".into(),
        path: path.into(),
        route: path.into(),
        params: Default::default(),
        query: String::new(),
        headers: Default::default(),
        caller: caller.clone(),
        request_id: format!("gov{path}"),
    };
    let inv =
        Invocation { head: &head, body, mode, namespace: CONSTITUTION_NAMESPACE, privilege: Privilege::Constitution };
    let owned = tx.0.take().expect("the transaction is back from the runtime");
    let (back, result) = runtime.execute(module, inv, owned);
    tx.0 = Some(back);
    result.map(|o| o.response).map_err(ApiError::from)
}

/// The request's transaction, lent to the runtime (which takes it by value) for each call.
struct TxSlot(Option<Tx>);

impl std::ops::Deref for TxSlot {
    type Target = Tx;
    fn deref(&self) -> &Tx {
        self.0.as_ref().expect("the transaction is back from the runtime")
    }
}

impl std::ops::DerefMut for TxSlot {
    fn deref_mut(&mut self) -> &mut Tx {
        self.0.as_mut().expect("the transaction is back from the runtime")
    }
}
