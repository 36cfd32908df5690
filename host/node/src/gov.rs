//! Governance requests on the leader: check the signed request, record it, and let the
//! constitution validate, resolve and apply proposals.
//!
//! Everything here runs on the writer thread, over the applied state plus this leader's pending
//! writes, so requests are checked and applied in one order (a replay cannot slip between two
//! checks). A refused request writes nothing; an accepted one commits as one `Gov` transaction
//! holding the request, its effects, and the proposal's new state. When `apply` fails, its
//! writes are undone and the proposal is recorded as Failed with the reason.

use std::sync::Arc;

use base64::Engine as _;
use cloister_abi::abi::{Privilege, RequestHead};
use cloister_abi::{Caller, Mode};
use serde::Deserialize;
use serde_json::{Value, json};

pub use cloister_store::gov::*;

use cloister_crypto::cose::{self, GovWrite, SignedRequest};
use cloister_runtime::{ExecError, Invocation, LoadedModule, Runtime};
use cloister_store::{KvError, Tx};

/// The namespace of the constitution's own maps.
pub(crate) const CONSTITUTION_NAMESPACE: &str = "constitution";

/// Default of `[gov] request_window_s`.
pub(crate) const REQUEST_WINDOW_S: u64 = 300;

/// Default of `[gov] proposals_open_per_member_max`.
pub(crate) const PROPOSALS_OPEN_PER_MEMBER_MAX: usize = 16;

/// Why the governance engine refused or failed a request. The frontends turn it into their one
/// error shape; nothing here knows about HTTP.
#[derive(Debug, thiserror::Error)]
pub enum GovError {
    /// The request breaks a rule: `code` names the rule, `kind` says what sort of refusal it is.
    #[error("{message}")]
    Refused { kind: Refusal, code: &'static str, message: String },
    /// The constitution failed to run (a trap, a limit).
    #[error("the constitution failed: {0}")]
    Constitution(#[from] ExecError),
    /// The state database failed.
    #[error("the node's state database failed: {0}")]
    Store(#[from] KvError),
    /// The service's own governance state is not as it must be (no constitution, a resolution
    /// only the node may decide).
    #[error("{0}")]
    Internal(String),
}

/// What sort of refusal a [`GovError::Refused`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request does not parse, or its content is not valid.
    Malformed,
    /// The signer is unknown, or its signature does not verify.
    Unauthenticated,
    /// The signer is known but may not do this.
    Forbidden,
    /// The request names a proposal that does not exist.
    NotFound,
    /// The request conflicts with the state: a replay, a proposal no longer Open.
    Conflict,
    /// The service cannot judge the request yet; the same request may pass later.
    Unavailable,
}

/// A ballot's payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ballot {
    pub approve: bool,
}

/// What the node checks about a governance request besides its signature.
pub struct RequestPolicy {
    /// How far `created_at` may be from the node's clock, either way, in seconds.
    pub request_window_s: u64,
    /// The node's clock, in seconds since the Unix epoch.
    pub now: u64,
    /// How many Open proposals one member may have; one more is refused until one closes.
    pub proposals_open_per_member_max: usize,
}

/// Handles one signed governance write and hands the transaction back. On success it holds
/// everything to commit, and the JSON is the answer; on error the caller must discard it.
pub fn execute(
    runtime: &Runtime,
    tx: Tx,
    write: &GovWrite,
    bytes: &[u8],
    policy: &RequestPolicy,
) -> (Tx, Result<Value, GovError>) {
    let mut slot = TxSlot(Some(tx));
    let result = handle(runtime, &mut slot, write, bytes, policy);
    (slot.0.expect("the transaction is back from the runtime"), result)
}

fn handle(
    runtime: &Runtime,
    tx: &mut TxSlot,
    write: &GovWrite,
    bytes: &[u8],
    policy: &RequestPolicy,
) -> Result<Value, GovError> {
    let request = authenticate(tx, write, bytes, policy)?;
    let answer = match write {
        GovWrite::Propose => propose(runtime, tx, &request, policy)?,
        GovWrite::Vote(id) => vote(runtime, tx, &request, id)?,
        GovWrite::Withdraw(id) => withdraw(tx, &request, id)?,
        GovWrite::Ack => ack(tx, &request)?,
        GovWrite::RecoveryShare => crate::recovery::submit_share(tx, &request)?,
    };
    // A recovery share never enters the public ledger: its history keeps the digest (the key)
    // and who sent it, not the message.
    let cose = match write {
        GovWrite::RecoveryShare => String::new(),
        _ => base64::engine::general_purpose::STANDARD.encode(bytes),
    };
    let record = HistoryRecord {
        cose,
        signer: request.signer.clone(),
        msg_type: request.msg_type.clone(),
        created_at: request.created_at,
    };
    put_json(tx, HISTORY, request.digest().as_bytes(), &record);
    put_json(tx, REQUEST_TIMES, request_time_key(&request).as_bytes(), &request.created_at);
    Ok(answer)
}

/// Where the newest accepted `created_at` of a member's requests of one kind (about one proposal)
/// is kept: a request signed before it is superseded.
fn request_time_key(request: &SignedRequest) -> String {
    format!("{}/{}/{}", request.signer, request.msg_type, request.proposal_id.as_deref().unwrap_or_default())
}

fn put_json<T: serde::Serialize>(tx: &mut Tx, map: &str, key: &[u8], value: &T) {
    tx.put(map, key, &serde_json::to_vec(value).expect("governance records serialize"));
}

pub(crate) fn refuse(kind: Refusal, code: &'static str, message: impl Into<String>) -> GovError {
    GovError::Refused { kind, code, message: message.into() }
}

/// The checks a request must pass before it may queue for the writer: it parses, is addressed to
/// this endpoint, is dated within the window, and carries a valid signature of a member; and a
/// proposal passes the checks only the node makes ([`proposal_checks`]: each wasm it carries
/// compiles, each certificate parses). They need only committed state, so they run on the
/// blocking pool, and neither a forged request nor a member's module costs the writer a
/// compile: the writer runs them again (with the replay and standing checks) over the state it
/// executes on, finding the module compiled in the runtime's cache. Returns a proposal's
/// compiled modules: whoever holds them until the writer has run the proposal keeps them in
/// that cache.
pub fn precheck(
    runtime: &Runtime,
    tx: &Tx,
    write: &GovWrite,
    bytes: &[u8],
    policy: &RequestPolicy,
) -> Result<Vec<Arc<LoadedModule>>, GovError> {
    let (request, _) = verified(tx, write, bytes, policy)?;
    // Accepted requests are public (`gov.history`): a copy sent again is refused here, before a
    // proposal's modules compile and before it queues for the writer.
    not_replayed(tx, &request)?;
    if *write != GovWrite::Propose {
        return Ok(Vec::new());
    }
    room_for_a_proposal(tx, &request.signer, policy)?;
    Ok(proposal_checks(runtime, &request)?.1)
}

/// The id governance requests to this service must be signed for: the hex SHA-256 of its
/// identity certificate's DER (as recovery shares name it).
fn service_id(tx: &Tx) -> Result<String, GovError> {
    let identity = service(tx)?.and_then(|s| s.identity).ok_or_else(|| {
        refuse(
            Refusal::Unavailable,
            "NoServiceIdentity",
            "this service has no identity yet, and requests are signed for it: its leader creates one shortly",
        )
    })?;
    cloister_crypto::identity::id_of_pem(identity.as_bytes())
        .map_err(|e| GovError::Internal(format!("the service identity's certificate: {e:#}")))
}

/// Refuses a signed request already accepted (its digest is in `gov.history`).
fn not_replayed(tx: &Tx, request: &SignedRequest) -> Result<(), GovError> {
    if tx.get(HISTORY, request.digest().as_bytes())?.is_some() {
        return Err(refuse(
            Refusal::Conflict,
            "Replay",
            "this signed request (its signed content, however encoded) was already accepted; sign a new one",
        ));
    }
    Ok(())
}

/// A proposal's actions, parsed, each through [`node_checks`]; and the modules they carry.
fn proposal_checks(runtime: &Runtime, request: &SignedRequest) -> Result<(Proposal, Vec<Arc<LoadedModule>>), GovError> {
    let proposal: Proposal = serde_json::from_slice(&request.payload).map_err(|e| {
        refuse(
            Refusal::Malformed,
            "MalformedProposal",
            format!("the proposal is not {{\"actions\": [{{\"name\", \"args\"}}]}}: {e}"),
        )
    })?;
    let mut modules = Vec::new();
    for (i, action) in proposal.actions.iter().enumerate() {
        let module = node_checks(runtime, action)
            .map_err(|e| refuse(Refusal::Malformed, "InvalidProposal", format!("action {i} ({}): {e}", action.name)))?;
        modules.extend(module);
    }
    Ok((proposal, modules))
}

/// Parses, dates, attributes and verifies a request, and checks the signer's standing.
fn authenticate(tx: &Tx, write: &GovWrite, bytes: &[u8], policy: &RequestPolicy) -> Result<SignedRequest, GovError> {
    let (request, member) = verified(tx, write, bytes, policy)?;
    not_replayed(tx, &request)?;
    if let Some(last) = get::<u64>(tx, REQUEST_TIMES, request_time_key(&request).as_bytes())?
        && request.created_at < last
    {
        return Err(refuse(
            Refusal::Conflict,
            "Superseded",
            format!(
                "{} already had a {} {}signed at {last} accepted; this one was signed earlier ({}) and is superseded",
                request.signer,
                request.msg_type,
                request.proposal_id.as_ref().map(|p| format!("on proposal {p} ")).unwrap_or_default(),
                request.created_at
            ),
        ));
    }
    match (write, member.status) {
        (GovWrite::Ack, MemberStatus::Accepted)
        | (
            GovWrite::Propose | GovWrite::Vote(_) | GovWrite::Withdraw(_) | GovWrite::RecoveryShare,
            MemberStatus::Active,
        ) => Ok(request),
        (GovWrite::Ack, MemberStatus::Active) => {
            Err(refuse(Refusal::Conflict, "AlreadyActive", format!("member {} is already active", request.signer)))
        }
        (_, status) => Err(refuse(
            Refusal::Forbidden,
            "MemberNotActive",
            format!(
                "member {} is {status:?}: it must acknowledge (cloister gov ack) before it governs",
                request.signer
            ),
        )),
    }
}

/// Parses, dates and attributes a request, and verifies its signature: everything about it that
/// needs no more than committed state.
fn verified(
    tx: &Tx,
    write: &GovWrite,
    bytes: &[u8],
    policy: &RequestPolicy,
) -> Result<(SignedRequest, MemberRecord), GovError> {
    let request = cose::parse(bytes).map_err(|e| refuse(Refusal::Malformed, "MalformedSignedRequest", e))?;
    let expected = write.msg_type().as_str();
    if request.msg_type != expected {
        return Err(refuse(
            Refusal::Malformed,
            "WrongMessageType",
            format!("this endpoint takes a {expected:?} message, not {:?}", request.msg_type),
        ));
    }
    if request.proposal_id.as_deref() != write.proposal_id() {
        return Err(refuse(
            Refusal::Malformed,
            "ProposalIdMismatch",
            format!(
                "the signed proposal_id {:?} does not match the path's {:?}",
                request.proposal_id,
                write.proposal_id()
            ),
        ));
    }
    let service = service_id(tx)?;
    if request.service != service {
        return Err(refuse(
            Refusal::Malformed,
            "WrongService",
            format!("this request is signed for service {}; this is service {service}", request.service),
        ));
    }
    let skew = policy.now.abs_diff(request.created_at);
    if skew > policy.request_window_s {
        return Err(refuse(
            Refusal::Malformed,
            "RequestOutsideWindow",
            format!(
                "created_at {} is {skew} s from the node's clock {}; requests must be within {} s (request_window_s)",
                request.created_at, policy.now, policy.request_window_s
            ),
        ));
    }
    let Some(member) = member(tx, &request.signer)? else {
        return Err(if user(tx, &request.signer)?.is_some() {
            refuse(Refusal::Forbidden, "NotAMember", format!("{} is a user; only members may govern", request.signer))
        } else {
            refuse(
                Refusal::Unauthenticated,
                "UnknownSigner",
                format!("{} is not a member of this service", request.signer),
            )
        });
    };
    request.verify(&member.cert).map_err(|e| {
        let code = match cloister_crypto::identity::id_of_pem(member.cert.as_bytes()) {
            Ok(id) if id == request.signer => BAD_SIGNATURE,
            // A constitution recorded the member under another id than its certificate's.
            _ => "SignatureNotVerified",
        };
        refuse(Refusal::Unauthenticated, code, e)
    })?;
    Ok((request, member))
}

/// The refusal of a signature that does not verify against the certificate its signer's id
/// names. An id is its certificate's digest, so no node's state makes such a request valid: a
/// follower refuses it itself, where it forwards a signer it does not know (yet).
pub const BAD_SIGNATURE: &str = "BadSignature";

fn ack(tx: &mut Tx, request: &SignedRequest) -> Result<Value, GovError> {
    let mut record = member(tx, &request.signer)?.expect("authenticate found the member");
    record.status = MemberStatus::Active;
    put_json(tx, MEMBERS, request.signer.as_bytes(), &record);
    Ok(json!({ "member": request.signer, "status": record.status }))
}

/// Writes a proposal's record, and keeps [`PROPOSALS_OPEN`] in step with its state.
fn store_proposal(tx: &mut Tx, id: &str, record: &ProposalRecord) -> Result<(), KvError> {
    put_json(tx, PROPOSALS, id.as_bytes(), record);
    let key = open_proposal_key(&record.proposer, id);
    if record.state == ProposalState::Open {
        put_json(tx, PROPOSALS_OPEN, key.as_bytes(), &record.created_at);
    } else {
        tx.remove(PROPOSALS_OPEN, key.as_bytes())?;
    }
    Ok(())
}

/// The refusal of a proposal whose proposer has `proposals_open_per_member_max` Open. A follower
/// that finds it forwards the proposal all the same: its state may lag the leader's, and the
/// leader's bound is the service's.
pub const TOO_MANY_OPEN_PROPOSALS: &str = "TooManyOpenProposals";

/// A proposal's state, read without its actions (a module each, for `set_app`).
#[derive(Deserialize)]
struct Standing {
    state: ProposalState,
}

/// A proposal's key in [`PROPOSALS_OPEN`].
pub(crate) fn open_proposal_key(proposer: &str, id: &str) -> String {
    format!("{proposer}/{id}")
}

/// Refuses a proposal from a member who has `proposals_open_per_member_max` Open already: the
/// bound on each member's share of what the others must review and vote on. (Not on the state's
/// growth: a closed proposal stays, with its record, as every accepted request does in the
/// history.)
fn room_for_a_proposal(tx: &Tx, member: &str, policy: &RequestPolicy) -> Result<(), GovError> {
    use std::ops::Bound::{Excluded, Included};
    // Member ids are hex: their keys run from `{member}/` to just before `{member}0`.
    let (first, past) = (format!("{member}/"), format!("{member}0"));
    let mut open = 0;
    let mut after: Option<Vec<u8>> = None;
    while open < policy.proposals_open_per_member_max {
        let lower = after.as_deref().map_or(Included(first.as_bytes()), Excluded);
        let Some((key, _)) = tx.first_in(PROPOSALS_OPEN, lower, Excluded(past.as_bytes()))? else {
            return Ok(());
        };
        // Counted only while Open: a leader of an older version, during a rolling upgrade,
        // closes proposals without taking them out of the index.
        let id = String::from_utf8_lossy(&key[first.len()..]).into_owned();
        if get::<Standing>(tx, PROPOSALS, id.as_bytes())?.is_some_and(|p| p.state == ProposalState::Open) {
            open += 1;
        }
        after = Some(key);
    }
    Err(refuse(
        Refusal::Conflict,
        TOO_MANY_OPEN_PROPOSALS,
        format!(
            "member {member} has {open} Open proposals, the most one member may have \
             (gov.proposals_open_per_member_max); withdraw one, or let one resolve"
        ),
    ))
}

fn open_proposal(tx: &Tx, id: &str) -> Result<ProposalRecord, GovError> {
    let record = proposal(tx, id)?.ok_or_else(|| refuse(Refusal::NotFound, "NotFound", format!("no proposal {id}")))?;
    if record.state != ProposalState::Open {
        return Err(refuse(
            Refusal::Conflict,
            "ProposalNotOpen",
            format!("proposal {id} is {:?}, no longer Open", record.state),
        ));
    }
    Ok(record)
}

fn withdraw(tx: &mut Tx, request: &SignedRequest, id: &str) -> Result<Value, GovError> {
    let mut record = open_proposal(tx, id)?;
    if record.proposer != request.signer {
        return Err(refuse(
            Refusal::Forbidden,
            "NotProposer",
            format!("only the proposer {} may withdraw proposal {id}", record.proposer),
        ));
    }
    record.state = ProposalState::Withdrawn;
    store_proposal(tx, id, &record)?;
    Ok(json!({ "proposal_id": id, "state": record.state }))
}

fn propose(
    runtime: &Runtime,
    tx: &mut TxSlot,
    request: &SignedRequest,
    policy: &RequestPolicy,
) -> Result<Value, GovError> {
    room_for_a_proposal(tx, &request.signer, policy)?;
    let (proposal, _modules) = proposal_checks(runtime, request)?;
    let constitution = load_constitution(runtime, tx)?;
    let caller = Caller::member(&request.signer);
    let validated = invoke(runtime, &constitution, tx, &caller, "/validate", &request.payload, Mode::Readonly)?;
    if !validated.is_success() {
        let message = validated.error_message();
        return Err(refuse(
            Refusal::Malformed,
            "InvalidProposal",
            format!("the constitution refused the proposal: {message}"),
        ));
    }
    // A proposal's id is its request's identity: what the proposer signed.
    let id = request.digest();
    let record = ProposalRecord {
        proposer: request.signer.clone(),
        proposal,
        state: ProposalState::Open,
        created_at: request.created_at,
        reason: None,
    };
    store_proposal(tx, &id, &record)?;
    put_json(tx, BALLOTS, id.as_bytes(), &Ballots::new());
    resolve(runtime, &constitution, tx, &caller, &id, record)
}

fn vote(runtime: &Runtime, tx: &mut TxSlot, request: &SignedRequest, id: &str) -> Result<Value, GovError> {
    let record = open_proposal(tx, id)?;
    let ballot: Ballot = serde_json::from_slice(&request.payload).map_err(|e| {
        refuse(Refusal::Malformed, "MalformedBallot", format!("a ballot is {{\"approve\": true|false}}: {e}"))
    })?;
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
) -> Result<Value, GovError> {
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
            GovError::Internal(format!(
                "the constitution's /resolve answered {} without a resolution: {}",
                answer.head.status,
                String::from_utf8_lossy(&answer.body)
            ))
        })?;
    record.state = match resolution.state {
        ProposalState::Accepted => apply(runtime, constitution, tx, caller, id, &mut record)?,
        s @ (ProposalState::Open | ProposalState::Rejected) => s,
        other => {
            return Err(GovError::Internal(format!(
                "the constitution resolved to {other:?}, which only the node decides"
            )));
        }
    };
    store_proposal(tx, id, &record)?;
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
) -> Result<ProposalState, GovError> {
    let savepoint = tx.savepoint();
    let internal = |e: KvError| GovError::Internal(e.to_string());
    let before = Before {
        service: service(tx).map_err(internal)?,
        nodes: all::<NodeRecord>(tx, NODES).map_err(internal)?.into_iter().collect(),
        writes: tx.savepoint(),
    };
    let input = ApplyInput { proposal_id: id.to_owned(), proposal: record.proposal.clone() };
    let body = serde_json::to_vec(&input).expect("apply inputs serialize");
    let failure = match invoke(runtime, constitution, tx, caller, "/apply", &body, Mode::Readwrite) {
        Err(e) => Some(format!("apply trapped: {e}")),
        Ok(r) if !r.is_success() => Some(format!("apply refused: {}", r.error_message())),
        Ok(_) => check_effects(runtime, tx, &before).err(),
    };
    if let Some(reason) = failure {
        tx.restore(savepoint);
        tracing::warn!(proposal = id, %reason, "proposal failed");
        record.reason = Some(reason);
        return Ok(ProposalState::Failed);
    }
    restore_node_records(tx, &before);
    // Accepting new code makes proposals filed against the old code moot.
    let replaces = |name: &str| record.proposal.actions.iter().any(|a| a.name == name);
    let (constitution_changed, app_changed) = (replaces("set_constitution"), replaces("set_app"));
    if app_changed || constitution_changed {
        let what = if constitution_changed { "the constitution" } else { "the app" };
        // Every Open proposal, found from the proposals themselves (read without their
        // actions), not from `gov.proposals_open`: a state from before that index holds Open
        // proposals it does not name.
        let open: Vec<String> = all::<Standing>(tx, PROPOSALS)?
            .into_iter()
            .filter(|(other, p)| other != id && p.state == ProposalState::Open)
            .map(|(other, _)| other)
            .collect();
        for other in open {
            let mut p = proposal(tx, &other)?.expect("listed just now, in this transaction");
            p.state = ProposalState::Dropped;
            p.reason = Some(format!("{what} changed when proposal {id} was accepted"));
            store_proposal(tx, &other, &p)?;
        }
    }
    Ok(ProposalState::Accepted)
}

/// What `apply` left must still be usable: an app and a constitution that load, and the
/// service record's node-written parts as they were (its identity's certificate and the previous
/// identities it endorses; its state may only go from Opening to Open), and no more recovery
/// shares needed than there are recovery members to hold them. And `apply` wrote nothing only
/// the node writes: the maps of [`NODE_REQUEST_MAPS`], the endorsements, recovery shares, ledger
/// secrets and attestation roots, and any part of a `gov.nodes` record but its status.
fn check_effects(runtime: &Runtime, tx: &Tx, before: &Before) -> Result<(), String> {
    for (map, key, value) in tx.writes().iter() {
        if before.writes.get(map, key) == Some(value) {
            // Written by the node, as it handled the request, before `apply` ran.
            continue;
        }
        let checked = match value {
            _ if NODE_REQUEST_MAPS.contains(&map) => {
                Err(format!("{map} is written by the node alone, as it handles governance requests"))
            }
            Some(value) if map == NODES => check_record(map, value).and_then(|()| node_kept(before, key, value)),
            Some(value) if map == MEMBERS || map == USERS => {
                check_record(map, value).and_then(|()| keyed_by_its_certificate(map, key, value))
            }
            Some(value) => check_record(map, value),
            None if [ENDORSEMENTS, RECOVERY, LEDGER_SECRETS, NODES].contains(&map) => {
                Err(format!("{map} is written by the node alone; a constitution cannot remove from it"))
            }
            // Without its roots the service has no attestation policy, and no node could join.
            None if map == ATTESTATION_ROOT => Err(format!("{map} is fixed at genesis; no proposal removes it")),
            None => Ok(()),
        };
        checked.map_err(|e| format!("{e} (key {:?})", String::from_utf8_lossy(key)))?;
    }
    let after = service(tx).map_err(|e| e.to_string())?;
    let before = before.service.as_ref();
    if after.as_ref().and_then(|s| s.identity.as_deref()) != before.and_then(|s| s.identity.as_deref()) {
        return Err(format!(
            "{SERVICE}.identity is the service identity's certificate, which the node alone writes (at genesis)"
        ));
    }
    if let (Some(before), Some(after)) = (before, &after) {
        if after.previous_identities != before.previous_identities {
            return Err(format!("{SERVICE}.previous_identities are the node's, written when it recovers a service"));
        }
        if after.rekeys_requested < before.rekeys_requested {
            return Err(format!("{SERVICE}.rekeys_requested only grows: a rekey asked for cannot be taken back"));
        }
        let allowed =
            after.state == before.state || (before.state == ServiceState::Opening && after.state == ServiceState::Open);
        if !allowed {
            return Err(format!(
                "{SERVICE}.state may go from Opening to Open by vote, not from {:?} to {:?}",
                before.state, after.state
            ));
        }
        let recovery_members = all::<MemberRecord>(tx, MEMBERS)
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|(_, m)| m.status == MemberStatus::Active && m.encryption_key.is_some())
            .count();
        if recovery_members > 0
            && (after.recovery_threshold == 0 || after.recovery_threshold as usize > recovery_members)
        {
            return Err(format!(
                "the recovery threshold {} exceeds the {recovery_members} recovery members",
                after.recovery_threshold
            ));
        }
    }
    recovery_members_fit(tx)?;
    if let Some(record) = app(tx).map_err(|e| e.to_string())? {
        let code = app_code(tx, &record.code_hash)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("gov.app names code {} that gov.app_code lacks", record.code_hash))?;
        runtime.load(&code).map_err(|e| format!("the new app does not load: {e}"))?;
    }
    let code = constitution(tx).map_err(|e| e.to_string())?.ok_or("the constitution was removed")?;
    let module = runtime.load(&code).map_err(|e| format!("the new constitution does not load: {e}"))?;
    is_constitution(&module)
}

/// What `check_effects` compares a constitution's `apply` against: the state before it ran, and
/// the transaction's writes then.
struct Before {
    service: Option<ServiceRecord>,
    nodes: std::collections::BTreeMap<String, NodeRecord>,
    writes: cloister_store::WriteSet,
}

/// The maps the node writes as it handles a governance request: the proposals and their states
/// (and the index of Open ones, which bounds a member's), the ballots, each accepted request
/// (`gov.history`, which refuses a replay) and the newest time a member signed at (which refuses
/// an older request). A constitution that wrote them could forge a proposal's outcome, clear the
/// way for a replay, or fill a member's share of Open proposals.
const NODE_REQUEST_MAPS: [&str; 5] = [PROPOSALS, PROPOSALS_OPEN, BALLOTS, HISTORY, REQUEST_TIMES];

/// That a member or user record written by a constitution is filed under its certificate's id,
/// and that certificate is one PEM block. Members vote on the certificate a proposal shows; a
/// record filed under another id admits whoever holds that id's certificate (a user is known by
/// the id alone), and a member filed so could sign nothing (its signatures are checked against
/// the record's certificate).
fn keyed_by_its_certificate(map: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Record {
        cert: String,
    }
    let record: Record = serde_json::from_slice(value).map_err(|e| format!("{map} cannot hold this record: {e}"))?;
    let der = cloister_crypto::identity::single_cert_der(record.cert.as_bytes()).map_err(|e| format!("{map}: {e}"))?;
    let id = cloister_crypto::identity::id_of_der(&der);
    if key != id.as_bytes() {
        return Err(format!("{map} files a record under its certificate's id ({id}), not another"));
    }
    Ok(())
}

/// That a constitution's write to `gov.nodes` changes a node's status alone: the node writes a
/// record when the node attests, and what that record says the node is (its certificate, the
/// evidence and what verifying it found, the encryption key each rekey is sealed to) stays. A
/// constitution that could swap the encryption key, or the certificate, would have the next
/// rekey sealed to a key of its choosing.
///
/// A constitution built before records held an encryption key writes a record back without it:
/// that counts as kept, and [`restore_node_records`] puts the key back.
fn node_kept(before: &Before, key: &[u8], value: &[u8]) -> Result<(), String> {
    let id = String::from_utf8_lossy(key);
    let after: NodeRecord =
        serde_json::from_slice(value).map_err(|e| format!("{NODES} cannot hold this record: {e}"))?;
    let Some(was) = before.nodes.get(id.as_ref()) else {
        return Err(format!("{NODES} records are written by the node alone, when a node attests"));
    };
    let encryption_key = after.encryption_key.clone().or_else(|| was.encryption_key.clone());
    let kept = NodeRecord { status: was.status, encryption_key, ..after };
    if kept != *was {
        return Err(format!("a proposal may change a node's status in {NODES}, nothing else of its record"));
    }
    Ok(())
}

/// Writes each `gov.nodes` record a passing `apply` wrote as the record was, with the status the
/// constitution gave it: what [`node_kept`] let pass as kept is kept.
fn restore_node_records(tx: &mut TxSlot, before: &Before) {
    let written: Vec<(String, NodeStatus)> = tx
        .writes()
        .iter()
        .filter(|(map, key, value)| *map == NODES && before.writes.get(map, key) != Some(*value))
        .filter_map(|(_, key, value)| {
            let after: NodeRecord = serde_json::from_slice(value?).ok()?;
            Some((String::from_utf8_lossy(key).into_owned(), after.status))
        })
        .collect();
    for (id, status) in written {
        let was = before.nodes.get(&id).expect("node_kept let only recorded nodes pass");
        put_json(tx, NODES, id.as_bytes(), &NodeRecord { status, ..was.clone() });
    }
}

/// Refuses a member set the node could not issue recovery shares to: more members with keys
/// (recovery members, or Accepted ones that become so by acknowledging) than one issue serves
/// (`RECOVERY_MEMBERS_MAX`), or two members with one encryption key (whose
/// holder would open both shares, and count twice towards the threshold). Either way every
/// later issue would fail, and with it every rekey, so a retired node's secret would go on
/// opening what is written after it left.
fn recovery_members_fit(tx: &Tx) -> Result<(), String> {
    let members = all::<MemberRecord>(tx, MEMBERS).map_err(|e| e.to_string())?;
    // An Accepted member with a key becomes a recovery member by its own acknowledgement, which
    // no proposal checks: it counts already.
    let recovery = members.iter().filter(|(_, m)| m.encryption_key.is_some());
    let max = cloister_crypto::recovery::RECOVERY_MEMBERS_MAX;
    if recovery.count() > max {
        return Err(format!(
            "more than {max} members with encryption keys (RECOVERY_MEMBERS_MAX): one issue of shares serves at most that many"
        ));
    }
    let mut keys = std::collections::HashMap::new();
    for (id, member) in &members {
        let Some(pem) = &member.encryption_key else { continue };
        let der =
            cloister_crypto::envelope::public_key_der(pem).map_err(|e| format!("member {id}'s encryption key: {e}"))?;
        if let Some(other) = keys.insert(der, id) {
            return Err(format!(
                "members {other} and {id} have the same encryption key: each recovery member needs its own"
            ));
        }
    }
    Ok(())
}

/// Whether `value`, written to `map`, decodes as the record the node reads that map as. This is
/// the write-side pair of the assertion in `cloister_store::gov::get`, which stops the node on a
/// record it cannot decode: an `apply` whose writes fail here is refused (the proposal Fails), so
/// no committed governance record can trip that assertion.
pub(crate) fn check_record(map: &str, value: &[u8]) -> Result<(), String> {
    fn decodes<T: serde::de::DeserializeOwned>(map: &str, value: &[u8]) -> Result<(), String> {
        serde_json::from_slice::<T>(value).map(|_| ()).map_err(|e| format!("{map} cannot hold this record: {e}"))
    }
    match map {
        MEMBERS => decodes::<MemberRecord>(map, value),
        USERS => decodes::<UserRecord>(map, value),
        NODES => decodes::<NodeRecord>(map, value),
        APP => decodes::<AppRecord>(map, value),
        SERVICE => decodes::<ServiceRecord>(map, value),
        PROPOSALS => decodes::<ProposalRecord>(map, value),
        PROPOSALS_OPEN => decodes::<u64>(map, value),
        BALLOTS => decodes::<Ballots>(map, value),
        HISTORY => decodes::<HistoryRecord>(map, value),
        REQUEST_TIMES => decodes::<u64>(map, value),
        MIN_TCB => decodes::<Tcb>(map, value),
        ENDORSEMENTS => Err(format!("{map} is written by the node alone, as gov.nodes changes")),
        RECOVERY => Err(format!("{map} is written by the node alone, as the recovery members change")),
        LEDGER_SECRETS => Err(format!("{map} is written by the node alone, when it rekeys the ledger")),
        AZURE_PCRS => serde_json::from_slice::<PcrSet>(value)
            .map_err(|e| format!("{map} cannot hold this record: {e}"))
            .and_then(|set| checked_pcr_set(&set).map(drop)),
        // What a joining node's evidence must chain to: swapped by a vote for a root of the
        // constitution's choosing (a mock one), any report signed under it would pass.
        ATTESTATION_ROOT => Err(format!("{map} is fixed at genesis; no proposal changes it")),
        _ => Ok(()),
    }
}

/// The checks only the node can make, before the constitution sees the proposal.
fn node_checks(runtime: &Runtime, action: &Action) -> Result<Option<Arc<LoadedModule>>, String> {
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
            Ok(Some(module))
        }
        "set_member" | "set_user" => {
            let pem = field("cert").ok_or("args.cert (PEM) is missing")?;
            let der =
                cloister_crypto::identity::single_cert_der(pem.as_bytes()).map_err(|e| format!("args.cert: {e}"))?;
            x509_parser::parse_x509_certificate(&der).map_err(|e| format!("args.cert does not parse: {e}"))?;
            if let Some(key) = field("encryption_key") {
                cloister_crypto::envelope::public_key_der(key).map_err(|e| format!("args.encryption_key: {e}"))?;
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Whether a module offers the constitution's three endpoints.
pub(crate) fn is_constitution(module: &LoadedModule) -> Result<(), String> {
    for path in ["/validate", "/resolve", "/apply"] {
        if module.manifest().find("POST", path).is_none() {
            return Err(format!("the module is no constitution: it has no POST {path}"));
        }
    }
    Ok(())
}

fn load_constitution(runtime: &Runtime, tx: &Tx) -> Result<Arc<LoadedModule>, GovError> {
    let code = constitution(tx)?
        .ok_or_else(|| GovError::Internal("gov.constitution is empty: the service never ran genesis".into()))?;
    runtime.load(&code).map_err(|e| GovError::Internal(format!("the installed constitution does not load: {e}")))
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
) -> Result<cloister_runtime::AppResponse, GovError> {
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
    result.map(|o| o.response).map_err(GovError::Constitution)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests are signed for the service's identity: until a service has one (one from
    /// before identities, until its leader makes one), every request waits, refused 503.
    #[test]
    fn requests_are_judged_against_the_service_identity_once_there_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let unavailable = |tx: &Tx| {
            matches!(
                service_id(tx),
                Err(GovError::Refused { kind: Refusal::Unavailable, code: "NoServiceIdentity", .. })
            )
        };
        let mut tx = store.begin().unwrap();
        assert!(unavailable(&tx), "no gov.service at all");
        // As a service from before identities recorded it: the fields since are absent.
        let mut service: ServiceRecord = serde_json::from_value(json!({ "state": "Opening", "cert": "" })).unwrap();
        tx.put(SERVICE, SERVICE_KEY, &serde_json::to_vec(&service).unwrap());
        assert!(unavailable(&tx), "a service from before identities");
        let identity = cloister_crypto::identity::generate_service_identity("test").unwrap();
        service.identity = Some(identity.cert_pem.clone());
        tx.put(SERVICE, SERVICE_KEY, &serde_json::to_vec(&service).unwrap());
        let id = cloister_crypto::identity::id_of_pem(identity.cert_pem.as_bytes()).unwrap();
        assert_eq!(service_id(&tx).unwrap(), id);
    }

    /// A member set the node could not issue shares to is refused: past `RECOVERY_MEMBERS_MAX`
    /// recovery members, or two members with one encryption key. Accepted, each made every
    /// later issue, and with it every rekey, fail.
    #[test]
    fn recovery_members_must_fit_one_issue_and_hold_keys_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let max = cloister_crypto::recovery::RECOVERY_MEMBERS_MAX;
        let keys: Vec<String> = (0..=max).map(|_| cloister_crypto::envelope::generate_key().unwrap().1).collect();
        let member = |key: &str, status| MemberRecord {
            cert: String::new(),
            status,
            encryption_key: Some(key.to_owned()),
            data: Value::Null,
        };
        let with = |members: &[(String, MemberRecord)]| {
            let mut tx = store.begin().unwrap();
            for (id, record) in members {
                tx.put(MEMBERS, id.as_bytes(), &serde_json::to_vec(record).unwrap());
            }
            recovery_members_fit(&tx)
        };
        let active = |n: usize| -> Vec<_> {
            (0..n).map(|i| (format!("m{i}"), member(&keys[i], MemberStatus::Active))).collect()
        };
        with(&active(max)).expect("as many as one issue serves");
        let err = with(&active(max + 1)).unwrap_err();
        assert!(err.contains("RECOVERY_MEMBERS_MAX"), "{err}");
        // One more that has not acknowledged yet counts: its acknowledgement makes it one, unchecked.
        let mut pending = active(max);
        pending.push(("late".into(), member(&keys[max], MemberStatus::Accepted)));
        let err = with(&pending).unwrap_err();
        assert!(err.contains("RECOVERY_MEMBERS_MAX"), "{err}");

        let mut twice = active(2);
        twice.push(("copy".into(), member(&keys[0], MemberStatus::Accepted)));
        let err = with(&twice).unwrap_err();
        assert!(err.contains("the same encryption key"), "{err}");
    }

    /// During a rolling upgrade a leader of an older version closes proposals without taking
    /// them out of `gov.proposals_open`; its proposer could not withdraw them (no longer Open),
    /// so they would have counted against it for good. Only Open ones count.
    #[test]
    fn only_open_proposals_count_against_their_proposer() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let policy = RequestPolicy { request_window_s: 60, now: 0, proposals_open_per_member_max: 1 };
        let member = "ab".repeat(32);
        let mut tx = store.begin().unwrap();
        let record = |state| ProposalRecord {
            proposer: member.clone(),
            proposal: Proposal { actions: Vec::new() },
            state,
            created_at: 0,
            reason: None,
        };
        // Closed by an older leader: its record says Accepted, its index entry stayed.
        put_json(&mut tx, PROPOSALS, b"p1", &record(ProposalState::Accepted));
        put_json(&mut tx, PROPOSALS_OPEN, open_proposal_key(&member, "p1").as_bytes(), &0u64);
        room_for_a_proposal(&tx, &member, &policy).expect("a stale entry does not count");
        store_proposal(&mut tx, "p2", &record(ProposalState::Open)).unwrap();
        let err = room_for_a_proposal(&tx, &member, &policy).unwrap_err();
        assert!(err.to_string().contains("has 1 Open proposals"), "{err}");
        room_for_a_proposal(&tx, &"cd".repeat(32), &policy).expect("another member's count is its own");
    }
}
