//! Cloister's default constitution.
//!
//! - `/validate` checks every action's name and arguments, so a malformed proposal is refused
//!   before anyone votes on it;
//! - `/resolve` accepts a proposal once a strict majority of Active members approve it, and
//!   rejects it once such a majority is impossible;
//! - `/apply` performs the actions, writing the `gov.*` tables.
//!
//! The node runs these endpoints itself (see `cloister_sdk::gov`); nobody calls them over the
//! network. The node has already checked what only it can check: that wasm in `set_app` and
//! `set_constitution` loads, and that certificates parse.

mod actions;

use cloister_sdk::gov::{ApplyInput, Proposal, ProposalState, Resolution, ResolveInput};
use cloister_sdk::{Auth, Error, Mode, Request, Response, Router, export};

fn validate(req: &Request) -> Result<Response, Error> {
    let proposal: Proposal = req.json()?;
    if proposal.actions.is_empty() {
        return Err(Error::bad_request("a proposal needs at least one action"));
    }
    for (i, action) in proposal.actions.iter().enumerate() {
        actions::validate(action).map_err(|e| Error::bad_request(format!("action {i} ({}): {e}", action.name)))?;
    }
    Ok(Response::status(204))
}

/// Strict majority of the Active members; ballots of anyone else do not count.
pub fn resolve_votes(input: &ResolveInput) -> ProposalState {
    let n = input.members.len();
    let counted =
        |approve: bool| input.members.iter().filter(|m| input.ballots.get(*m).is_some_and(|&b| b == approve)).count();
    let (yes, no) = (counted(true), counted(false));
    if 2 * yes > n {
        ProposalState::Accepted
    } else if 2 * (n - no) <= n {
        // Even if every remaining member approved, approvals could not exceed half.
        ProposalState::Rejected
    } else {
        ProposalState::Open
    }
}

fn resolve(req: &Request) -> Result<Response, Error> {
    let input: ResolveInput = req.json()?;
    Ok(Response::json(&Resolution { state: resolve_votes(&input) }))
}

fn apply(req: &Request) -> Result<Response, Error> {
    let input: ApplyInput = req.json()?;
    for (i, action) in input.proposal.actions.iter().enumerate() {
        actions::apply(action).map_err(|e| Error::bad_request(format!("action {i} ({}): {e}", action.name)))?;
    }
    Ok(Response::status(204))
}

pub fn router() -> Router {
    Router::new()
        .route("POST", "/validate", Mode::Readonly, Auth::Members, validate)
        .route("POST", "/resolve", Mode::Readonly, Auth::Members, resolve)
        .route("POST", "/apply", Mode::Readwrite, Auth::Members, apply)
}

export!(router);

#[cfg(test)]
mod tests;
