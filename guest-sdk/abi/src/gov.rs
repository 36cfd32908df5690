//! The governance tables and the records in them, shared by the node and constitutions.
//!
//! Every `gov.*` map is public: its writes stay in clear in the ledger, for audit. Keys are the
//! UTF-8 bytes of the id named on each map; values are JSON, except where a map says "raw".
//! Only the node and the constitution's `apply` write them; apps read [`crate::abi::GOV_READABLE`].
//!
//! The constitution ABI: the node calls three `POST` endpoints of the constitution module, each
//! with a JSON body, under the proposer's or voter's identity:
//! - `/validate` with a [`Proposal`]: 2xx when every action's arguments are acceptable, else an
//!   error whose message the proposer sees (read-only);
//! - `/resolve` with a [`ResolveInput`]: a [`Resolution`] (read-only);
//! - `/apply` with an [`ApplyInput`]: writes the tables (read-write, with write access to `gov.*`).
//!   Any error or trap marks the proposal Failed and keeps none of its writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Members by id (hex SHA-256 of the certificate DER): [`MemberRecord`].
pub const MEMBERS: &str = "gov.members";
/// Users by id: [`UserRecord`].
pub const USERS: &str = "gov.users";
/// Nodes by id: [`NodeRecord`].
pub const NODES: &str = "gov.nodes";
/// Proposals by id: [`ProposalRecord`].
pub const PROPOSALS: &str = "gov.proposals";
/// The Open proposals by proposer: key `"{member}/{proposal_id}"`, value the proposal's
/// `created_at` (seconds, JSON). The node adds a proposal as it opens and removes it as it leaves
/// Open; it counts a member's proposals against `gov.proposals_open_per_member_max`.
pub const PROPOSALS_OPEN: &str = "gov.proposals_open";
/// Ballots by proposal id: [`Ballots`].
pub const BALLOTS: &str = "gov.ballots";
/// Every accepted signed request, verbatim, by the hex blake3 of its bytes: [`HistoryRecord`].
pub const HISTORY: &str = "gov.history";
/// The newest `created_at` among each member's accepted requests of one kind, per proposal: key
/// `"{member}/{msg_type}/{proposal_id}"` (no proposal id for proposals and acks), value the
/// seconds as JSON. A request signed before it is refused as superseded.
pub const REQUEST_TIMES: &str = "gov.request_times";
/// Key [`CONSTITUTION_KEY`]: the constitution's wasm (raw bytes).
pub const CONSTITUTION: &str = "gov.constitution";
pub const CONSTITUTION_KEY: &[u8] = b"wasm";
/// Key [`APP_KEY`]: the installed app's [`AppRecord`].
pub const APP: &str = "gov.app";
pub const APP_KEY: &[u8] = b"app";
/// The installed app's wasm (raw bytes), keyed by its hex blake3 hash.
pub const APP_CODE: &str = "gov.app_code";
/// The app's settings: one JSON value per setting name.
pub const APP_CONFIG: &str = "gov.app_config";
/// Key [`SERVICE_KEY`]: the [`ServiceRecord`].
pub const SERVICE: &str = "gov.service";
pub const SERVICE_KEY: &[u8] = b"service";
/// Trusted SNP launch measurements, by lower-case hex (48 bytes); the value is `true`.
pub const MEASUREMENTS: &str = "gov.attestation.measurements";
/// Trusted SNP host_data values, by lower-case hex (32 bytes); the value is `true`.
pub const HOST_DATA: &str = "gov.attestation.host_data";
/// Allowed Azure vTPM PCR sets, keyed by [`pcr_set_key`]; the value is the [`PcrSet`]. Evidence of
/// kind `azure-vtpm` must match one: every PCR an entry names must hold the entry's value.
pub const AZURE_PCRS: &str = "gov.attestation.azure_pcrs";
/// PCRs a vTPM bank has: indices are below this.
pub const PCR_COUNT: u8 = 24;
/// PCR index → SHA-256 value, lower-case hex.
pub type PcrSet = BTreeMap<u8, String>;

/// The key of a PCR set in [`AZURE_PCRS`]: `index=value` pairs in index order, joined by `,`.
pub fn pcr_set_key(set: &PcrSet) -> String {
    set.iter().map(|(i, v)| format!("{i}={v}")).collect::<Vec<_>>().join(",")
}

/// Checks a PCR set as governance may allow it, returning it with lower-case values: 1 to
/// [`PCR_COUNT`] PCRs, each index below [`PCR_COUNT`], each value 32 bytes of hex.
pub fn checked_pcr_set(set: &PcrSet) -> Result<PcrSet, String> {
    if set.is_empty() {
        return Err("a PCR set names at least one PCR".into());
    }
    set.iter()
        .map(|(i, v)| {
            if *i >= PCR_COUNT {
                return Err(format!("PCR {i} does not exist: a vTPM bank has PCRs 0 to {}", PCR_COUNT - 1));
            }
            let lower = v.to_ascii_lowercase();
            if lower.len() != 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("PCR {i} must be 32 bytes of hex (SHA-256), got {v:?}"));
            }
            Ok((*i, lower))
        })
        .collect()
}
/// Key [`MIN_TCB_KEY`]: the lowest acceptable [`Tcb`].
pub const MIN_TCB: &str = "gov.attestation.min_tcb";
pub const MIN_TCB_KEY: &[u8] = b"min_tcb";
/// Key [`ROOT_KEY`]: the roots of trust the service pins, fixed at genesis: AMD's, or the test
/// ARK of a service configured for mock attestation.
pub const ATTESTATION_ROOT: &str = "gov.attestation.root";
pub const ROOT_KEY: &[u8] = b"root";

/// A member's lifecycle: accepted by a proposal, active once it acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    Accepted,
    Active,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member's certificate (PEM); the hash of its DER is the member's id.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Pending,
    Trusted,
    Retired,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub status: NodeStatus,
    /// The node's certificate (PEM).
    pub cert: String,
    /// The attestation evidence it joined with, if any (JSON, by kind).
    #[serde(default)]
    pub evidence: serde_json::Value,
    /// What verifying that evidence established (measurement, TCB, chip, root), if verified.
    #[serde(default)]
    pub verified: serde_json::Value,
    /// The key (SPKI PEM, P-384) the node generated inside its guest and bound into that
    /// evidence: what the leader seals each new ledger secret to. None for a node recorded by an
    /// older version, which gets them sealed to its certificate's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
}

/// The installed app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// Hex blake3 of the wasm; the code is in [`APP_CODE`] under this key.
    pub code_hash: String,
}

/// Whether the service takes app calls yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceState {
    Opening,
    Open,
    /// Started from a previous service's ledger (`cloister node recover`): its public state is
    /// back, and its private state waits for a threshold of recovery shares. Then Opening.
    Recovering,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub state: ServiceState,
    /// The operator's service CA certificate (PEM): it issues node certificates for transport.
    pub cert: String,
    /// Members whose shares recover the service.
    #[serde(default = "one")]
    pub recovery_threshold: u32,
    /// The service identity's certificate (PEM): a key the service itself generated at genesis
    /// and only its Trusted nodes hold. Receipts are checked against it. Absent only in a
    /// service from before identities, until its leader creates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The identities of the services this one was recovered from, each endorsed by this
    /// service's identity, so receipts they issued still verify against it. Node-written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_identities: Vec<PreviousIdentity>,
    /// Counts the ledger rekeys the constitution asked for (`trigger_ledger_rekey`, and removing
    /// a node). The leader rekeys while the newest [`LedgerSecretRecord::answers`] is lower.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rekeys_requested: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A previous service's identity, endorsed by the current one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousIdentity {
    /// Its certificate (PEM).
    pub cert: String,
    /// The current identity's ECDSA P-384 signature (r ‖ s, 96 bytes, base64) over
    /// `"cloister previous identity v1" ‖ 0x00 ‖` the certificate's DER.
    pub endorsement: String,
}

/// The context an endorsement of a previous identity is signed under.
pub const PREVIOUS_IDENTITY_CONTEXT: &[u8] = b"cloister previous identity v1\0";

/// The service's endorsement of a node, by node id, written by the leader once the node is
/// Trusted (at genesis for the first node) and closed once it is Retired. A node signs the ledger
/// only while its endorsement is in its state and open; so a signature over a tree of `T`
/// entries by node N is valid iff N's endorsement was written before entry `T - 1` and
/// `until` is absent or above `T - 1`.
pub const ENDORSEMENTS: &str = "gov.endorsements";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndorsementRecord {
    /// Lower-case hex SHA-256 of the node's certificate (DER).
    pub cert_sha256: String,
    /// The service identity's ECDSA P-384 signature (r ‖ s, hex) over
    /// [`EndorsementRecord::message`]: anyone holding the identity's certificate checks offline
    /// that the service endorsed this node, so a ledger cannot name signers of its own making.
    /// Absent in records written before, or before the service had an identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Set when the node is Retired: the leader's applied seqno when it saw the retirement, at or
    /// after the retirement itself. Signatures over entries from here on are not the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

/// The context an identity's signature of a node endorsement is made under.
pub const NODE_ENDORSEMENT_CONTEXT: &[u8] = b"cloister node endorsement v1\0";

impl EndorsementRecord {
    /// What the service identity signs for node `node_id`: the context, the node id and the
    /// certificate digest (each length-prefixed), and the bound if there is one.
    pub fn message(&self, node_id: &str) -> Vec<u8> {
        let mut m = NODE_ENDORSEMENT_CONTEXT.to_vec();
        for part in [node_id.as_bytes(), self.cert_sha256.as_bytes()] {
            m.extend_from_slice(&(part.len() as u32).to_be_bytes());
            m.extend_from_slice(part);
        }
        match self.until {
            Some(until) => {
                m.push(1);
                m.extend_from_slice(&until.to_be_bytes());
            }
            None => m.push(0),
        }
        m
    }
}

/// The recovery shares: the ledger secret wrapped under a key split by Shamir secret sharing,
/// one share per recovery member (an Active member with an encryption key), each sealed to that
/// member's key. The leader alone writes it, and writes it again whenever the recovery members,
/// their keys or the threshold change. Public: nothing in it opens without a threshold of shares.
pub const RECOVERY: &str = "gov.recovery";
pub const RECOVERY_KEY: &[u8] = b"shares";
/// In a recovered service, the previous service's issue: what submitted shares are checked
/// against.
pub const RECOVERY_PREVIOUS_KEY: &[u8] = b"previous";
/// In a recovered service, present once the previous public state is all written: shares are
/// taken from then on.
pub const RECOVERY_PUBLIC_DONE_KEY: &[u8] = b"public_restored";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryRecord {
    /// Counts issues of shares, from 1; part of every share's binding, so a share from an older
    /// issue never passes for one of this issue.
    pub version: u64,
    /// How many shares rebuild the wrapping key.
    pub threshold: u32,
    /// Hex SHA-256 of the service identity's certificate (DER): the service the shares belong to.
    pub service: String,
    /// The ledger secret, sealed under the wrapping key (base64).
    pub wrapped_secret: String,
    /// The version of the ledger secret wrapped (see [`LEDGER_SECRETS`]): the newest when the
    /// shares were issued, from which a recovery walks back to the older ones.
    #[serde(default = "one_u64")]
    pub ledger_secret_version: u64,
    /// By member id.
    pub shares: BTreeMap<String, RecoveryShare>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryShare {
    /// The share, sealed to the member's encryption key (base64).
    pub sealed: String,
    /// A digest of the share bound to the service, the member and the version (hex): what a
    /// recovering node checks a submitted share against.
    pub digest: String,
    /// Hex SHA-256 of the encryption key (PEM as recorded) the share was sealed to.
    pub encryption_key_sha256: String,
}

fn one() -> u32 {
    1
}

fn one_u64() -> u64 {
    1
}

/// The ledger secrets after the first, by version (u64 big-endian; the first is version 1 and
/// has no record). Written by the leader alone, when it rekeys; public: each new secret is
/// sealed to the keys of the nodes Trusted then, and each previous secret under its successor.
pub const LEDGER_SECRETS: &str = "gov.ledger_secrets";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSecretRecord {
    pub version: u64,
    /// The [`ServiceRecord::rekeys_requested`] this rekey answered.
    pub answers: u64,
    /// The previous version's secret sealed under this one (base64), so that holders of the
    /// newest secret open every older one.
    pub previous_sealed: String,
    /// This version's secret sealed to each Trusted node's key (base64), by node id.
    pub nodes: BTreeMap<String, String>,
}

/// An SNP TCB version: the security version numbers of each component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later only.
    #[serde(default)]
    pub fmc: u8,
}

/// One change a proposal asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub name: String,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// What a member proposes: a list of actions, applied together or not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposal {
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProposalState {
    Open,
    Accepted,
    Withdrawn,
    Rejected,
    /// `apply` trapped or refused: nothing of it was kept.
    Failed,
    /// The constitution or the app changed while it was open.
    Dropped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalRecord {
    pub proposer: String,
    pub proposal: Proposal,
    pub state: ProposalState,
    /// When the proposer signed it (seconds since the Unix epoch).
    pub created_at: u64,
    /// Why it failed, for Failed and Dropped proposals.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A proposal's ballots: member id → approve.
pub type Ballots = BTreeMap<String, bool>;

/// The input of `/resolve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolveInput {
    pub proposal_id: String,
    pub proposer: String,
    pub proposal: Proposal,
    pub ballots: Ballots,
    /// The Active members: only their ballots count.
    pub members: Vec<String>,
}

/// The output of `/resolve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// Open, Accepted or Rejected.
    pub state: ProposalState,
}

/// The input of `/apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyInput {
    pub proposal_id: String,
    pub proposal: Proposal,
}

/// One accepted signed request, as the node stored it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The COSE_Sign1 message, base64 (standard alphabet, padded).
    pub cose: String,
    pub signer: String,
    pub msg_type: String,
    pub created_at: u64,
}
