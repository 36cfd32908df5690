//! Recovery shares in `gov.recovery`, kept by the leader in step with the recovery members (the
//! Active members with an encryption key), their keys, the recovery threshold and the service
//! identity. The cryptography is `cloister_crypto::recovery`'s; this module decides when an issue
//! is due and writes it.

use std::collections::BTreeMap;

use base64::Engine as _;
use cloister_crypto::{envelope, identity, recovery, secrets};
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
    /// The version of the ledger secret the shares wrap: the newest.
    ledger_secret_version: u64,
}

fn key_sha256(pem: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, pem.as_bytes()))
}

fn due(tx: &Tx, ledger_secret_version: u64) -> Result<Option<Due>, ApiError> {
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
    Ok(Some(Due { service: service_id, threshold: service.recovery_threshold, keys, ledger_secret_version }))
}

/// Whether replacing `current` by an issue of `due` takes a share from anyone who held one, or
/// raises the threshold.
fn takes_shares_away(current: &RecoveryRecord, due: &Due) -> bool {
    due.threshold > current.threshold
        || current
            .shares
            .iter()
            .any(|(id, share)| due.keys.get(id).is_none_or(|key| key_sha256(key) != share.encryption_key_sha256))
}

/// Whether the recorded shares (if any) cover exactly what is due.
fn covers(record: Option<&RecoveryRecord>, due: &Due) -> bool {
    match record {
        None => due.keys.is_empty(),
        Some(r) => {
            r.service == due.service
                && r.threshold == due.threshold
                && r.ledger_secret_version == due.ledger_secret_version
                && r.shares.len() == due.keys.len()
                && due.keys.iter().all(|(id, key)| {
                    r.shares.get(id).is_some_and(|share| share.encryption_key_sha256 == key_sha256(key))
                })
        }
    }
}

/// Whether `gov.recovery` lags the recovery members or the newest ledger secret (version
/// `ledger_secret_version`), as of `tx`.
pub(crate) fn lags(tx: &Tx, ledger_secret_version: u64) -> Result<bool, ApiError> {
    let Some(due) = due(tx, ledger_secret_version)? else { return Ok(false) };
    Ok(!covers(gov::get::<RecoveryRecord>(tx, gov::RECOVERY, gov::RECOVERY_KEY)?.as_ref(), &due))
}

/// Issues new shares of `secret` (the newest ledger secret, `version`) into `tx` if the recorded
/// ones lag, or removes them when no recovery member is left. Returns the new issue's version,
/// if it wrote one.
///
/// A change that takes shares away (a recovery member gone or with another key, a higher
/// threshold) is not served by a new issue of the same secret: the old issue's shares and
/// wrapped secret stay in the ledger's history, so whoever held enough of them would still open
/// the secret in use (one removed member, where the threshold was 1). Such a change asks for a
/// rekey instead (`gov.service.rekeys_requested`), whose transaction issues shares of the new
/// secret.
pub(crate) fn maintain(tx: &mut Tx, (version, secret): (u64, &[u8; 32])) -> Result<Option<u64>, ApiError> {
    let Some(due) = due(tx, version)? else { return Ok(None) };
    let current: Option<RecoveryRecord> = gov::get(tx, gov::RECOVERY, gov::RECOVERY_KEY)?;
    if covers(current.as_ref(), &due) {
        return Ok(None);
    }
    // The caller read the newest secret before the writer ran, and a rekey applied since has
    // issued shares of a newer one: an issue of the older secret would replace them.
    if current.as_ref().is_some_and(|c| c.ledger_secret_version > version) {
        return Ok(None);
    }
    if let Some(current) = &current
        && current.ledger_secret_version == version
        && takes_shares_away(current, &due)
    {
        let mut service = gov::service(tx)?.ok_or_else(|| ApiError::internal("gov.service is missing"))?;
        let last = gov::all::<gov::LedgerSecretRecord>(tx, gov::LEDGER_SECRETS)?.pop().map_or(0, |(_, r)| r.answers);
        if service.rekeys_requested <= last {
            service.rekeys_requested = last + 1;
            tx.put(gov::SERVICE, gov::SERVICE_KEY, &serde_json::to_vec(&service).expect("a service record serializes"));
        }
        return Ok(None);
    }
    if due.keys.is_empty() {
        tx.remove(gov::RECOVERY, gov::RECOVERY_KEY)?;
        return Ok(None);
    }
    let version = current.map_or(1, |r| r.version + 1);
    let record =
        issue(secret, due, version).map_err(|e| ApiError::internal(format!("issuing recovery shares: {e}")))?;
    tx.put(gov::RECOVERY, gov::RECOVERY_KEY, &serde_json::to_vec(&record).expect("a recovery record serializes"));
    Ok(Some(version))
}

/// The first issue of shares, for a new service's genesis transaction, so that a service has
/// shares from its first entry on: `members` are (id, encryption key PEM) of the recovery members.
pub(crate) fn genesis_issue(
    secret: &[u8; 32],
    identity_cert: &str,
    members: impl IntoIterator<Item = (String, String)>,
    threshold: u32,
) -> anyhow::Result<Option<RecoveryRecord>> {
    let keys: BTreeMap<String, String> = members.into_iter().collect();
    if keys.is_empty() {
        return Ok(None);
    }
    let service = identity::id_of_pem(identity_cert.as_bytes())?;
    issue(secret, Due { service, threshold, keys, ledger_secret_version: 1 }, 1).map(Some).map_err(anyhow::Error::msg)
}

fn issue(secret: &[u8; 32], due: Due, version: u64) -> Result<RecoveryRecord, String> {
    let mut members: Vec<(String, Vec<u8>)> = Vec::with_capacity(due.keys.len());
    for (id, pem) in &due.keys {
        let der = envelope::public_key_der(pem).map_err(|e| format!("member {id}'s encryption key: {e}"))?;
        // Also at genesis, which no proposal's check sees: one key would open two shares.
        if let Some((other, _)) = members.iter().find(|(_, d)| *d == der) {
            return Err(format!("members {other} and {id} have the same encryption key: each needs its own"));
        }
        members.push((id.clone(), der));
    }
    let issued = recovery::issue(secret, &due.service, version, due.threshold, &members)?;
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
    Ok(RecoveryRecord {
        version,
        threshold: due.threshold,
        service: due.service,
        wrapped_secret: b64(&issued.wrapped_secret),
        ledger_secret_version: due.ledger_secret_version,
        shares,
    })
}

/// The private map where a recovering service keeps the shares members submitted, by member id,
/// sealed like any private write; removed once a threshold of them rebuilt the previous secret.
pub(crate) const SUBMITTED_SHARES: &str = "node/recovery_submitted";
/// The private map of earlier services' ledger secrets, by the hex SHA-256 of their identity's
/// certificate: what opens the previous ledger's private entries.
pub(crate) const PREVIOUS_SECRETS: &str = "node/previous_ledger_secrets";

/// What a recovery member submits: its share, and the binding it opened it under.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSubmission {
    pub service: String,
    pub version: u64,
    pub member: String,
    /// base64
    pub share: String,
}

/// `POST /gov/recovery/share`: checks a member's share against the previous service's issue and
/// keeps it; at the threshold, rebuilds the previous ledger secret and keeps that instead (the
/// leader's upkeep then restores the private state). Each refusal names what is wrong.
pub(crate) fn submit_share(
    tx: &mut Tx,
    request: &cloister_crypto::cose::SignedRequest,
) -> Result<serde_json::Value, crate::gov::GovError> {
    use crate::gov::{Refusal, refuse};
    let service = gov::service(tx)?.ok_or_else(|| crate::gov::GovError::Internal("gov.service is missing".into()))?;
    if service.state != gov::ServiceState::Recovering {
        return Err(refuse(
            Refusal::Conflict,
            "NotRecovering",
            format!("the service is {:?}: shares are taken only while it is Recovering", service.state),
        ));
    }
    let previous: RecoveryRecord = gov::get(tx, gov::RECOVERY, gov::RECOVERY_PREVIOUS_KEY)?.ok_or_else(|| {
        crate::gov::GovError::Internal("a recovering service without the previous service's shares".into())
    })?;
    if tx.get(gov::RECOVERY, gov::RECOVERY_PUBLIC_DONE_KEY)?.is_none() {
        return Err(refuse(
            Refusal::Conflict,
            "PublicStateRestoring",
            "the previous public state is still being written: submit the share again in a moment",
        ));
    }
    let submitted: ShareSubmission = serde_json::from_slice(&request.payload).map_err(|e| {
        refuse(
            Refusal::Malformed,
            "BadShare",
            format!("the body is no share submission {{service, version, member, share}}: {e}"),
        )
    })?;
    let signer = request.signer.as_str();
    if submitted.service != previous.service {
        return Err(refuse(
            Refusal::Malformed,
            "ShareOfAnotherService",
            format!(
                "this share belongs to service {}; the service being recovered is {}",
                submitted.service, previous.service
            ),
        ));
    }
    if submitted.version != previous.version {
        return Err(refuse(
            Refusal::Malformed,
            "StaleShare",
            format!(
                "this share is of issue {}; the previous service's last issue is {}",
                submitted.version, previous.version
            ),
        ));
    }
    if submitted.member != signer {
        return Err(refuse(
            Refusal::Forbidden,
            "ShareOfAnotherMember",
            format!("member {signer} submitted member {}'s share: each member submits its own", submitted.member),
        ));
    }
    let expected = previous.shares.get(signer).ok_or_else(|| {
        refuse(Refusal::Forbidden, "NoShare", format!("member {signer} held no share of the previous service"))
    })?;
    let share = base64::engine::general_purpose::STANDARD
        .decode(&submitted.share)
        .map_err(|e| refuse(Refusal::Malformed, "BadShare", format!("the share is not base64: {e}")))?;
    let binding = recovery::Binding { service: &previous.service, version: previous.version, member: signer };
    if hex::encode(recovery::share_digest(binding, &share)) != expected.digest {
        return Err(refuse(
            Refusal::Forbidden,
            "ForgedShare",
            format!("the share does not match member {signer}'s share digest in the previous service's issue"),
        ));
    }
    if tx.get(PREVIOUS_SECRETS, previous.service.as_bytes())?.is_some() {
        return Err(refuse(
            Refusal::Conflict,
            "AlreadyRestoring",
            "a threshold of shares is in: the previous ledger secret is back and the private state is being restored",
        ));
    }
    if tx.get(SUBMITTED_SHARES, signer.as_bytes())?.is_some() {
        return Err(refuse(
            Refusal::Conflict,
            "ShareAlreadySubmitted",
            format!("member {signer} already submitted its share"),
        ));
    }
    tx.put(SUBMITTED_SHARES, signer.as_bytes(), &share);
    let mut shares = Vec::new();
    for id in previous.shares.keys() {
        if let Some(share) = tx.get(SUBMITTED_SHARES, id.as_bytes())? {
            shares.push(share);
        }
    }
    let restoring = shares.len() >= previous.threshold as usize;
    if restoring {
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(&previous.wrapped_secret)
            .map_err(|e| crate::gov::GovError::Internal(format!("the previous wrapped secret: {e}")))?;
        let secret =
            recovery::recover_secret(&shares, previous.threshold, &previous.service, previous.version, &wrapped)
                .map_err(|e| crate::gov::GovError::Internal(format!("the submitted shares: {e}")))?;
        tx.put(PREVIOUS_SECRETS, previous.service.as_bytes(), &secret);
        for id in previous.shares.keys() {
            tx.remove(SUBMITTED_SHARES, id.as_bytes())?;
        }
    }
    Ok(serde_json::json!({
        "submitted": shares.len(),
        "threshold": previous.threshold,
        "restoring": restoring,
    }))
}

/// Where a recovering node keeps its copy of the previous service's ledger files, in its data
/// folder: what the private state is restored from once the shares are in.
pub const PREVIOUS_LEDGER_DIR: &str = "previous-ledger";

/// Maps a recovered service does not take from the previous one's public state: its nodes,
/// their endorsements and the service record are its own, the previous issue of shares moves to
/// [`gov::RECOVERY_PREVIOUS_KEY`], and the attestation root is the new genesis's.
const NOT_RESTORED_PUBLIC: &[&str] =
    &[gov::NODES, gov::ENDORSEMENTS, gov::SERVICE, gov::RECOVERY, gov::ATTESTATION_ROOT, gov::LEDGER_SECRETS];
/// Private maps that are the service's own, never the previous one's: its identity's key, and the
/// shares submitted to it.
const NOT_RESTORED_PRIVATE: &[&str] = &[gov::SERVICE_IDENTITY_MAP, SUBMITTED_SHARES];

/// Bytes of state (keys and values) in one restore entry: a quarter of the largest log entry,
/// leaving room for sealing and encoding.
pub const RESTORE_ENTRY_BYTES: usize = cloister_consensus::ENTRY_BYTES_MAX / 4;

type State = BTreeMap<(String, Vec<u8>), Vec<u8>>;

/// The state the entries leave, of the maps `keep` admits: each write in ledger order.
fn fold<'a>(writes: impl Iterator<Item = cloister_store::WriteSet>, keep: impl Fn(&str) -> bool + 'a) -> State {
    let mut state = State::new();
    for ws in writes {
        for (map, key, value) in ws.iter().filter(|(map, _, _)| keep(map)) {
            match value {
                Some(v) => state.insert((map.to_owned(), key.to_vec()), v.to_vec()),
                None => state.remove(&(map.to_owned(), key.to_vec())),
            };
        }
    }
    state
}

/// Cuts a state into write sets of about [`RESTORE_ENTRY_BYTES`].
fn chunks(state: State) -> Vec<cloister_store::WriteSet> {
    let mut out = vec![cloister_store::WriteSet::default()];
    let mut bytes = 0;
    for ((map, key), value) in state {
        let size = map.len() + key.len() + value.len();
        if bytes + size > RESTORE_ENTRY_BYTES && bytes > 0 {
            out.push(cloister_store::WriteSet::default());
            bytes = 0;
        }
        out.last_mut().expect("one write set at least").put(&map, &key, &value);
        bytes += size;
    }
    out.retain(|ws| !ws.is_empty());
    out
}

fn transactions(
    entries: Vec<cloister_ledger::entry::LedgerEntry>,
) -> impl Iterator<Item = cloister_ledger::entry::TxEntry> {
    entries.into_iter().filter_map(|e| match e.payload {
        cloister_ledger::entry::Payload::Tx(tx) => Some(tx),
        _ => None,
    })
}

/// What a recovering node starts from: the previous ledger verified and copied into the data
/// folder, its public state, the previous service record and issue of shares.
pub(crate) struct Previous {
    pub service: gov::ServiceRecord,
    pub shares: RecoveryRecord,
    /// The public state to restore, in write sets of about [`RESTORE_ENTRY_BYTES`].
    pub public: Vec<cloister_store::WriteSet>,
    /// How far the copy reaches: recorded at the recovery's genesis, and required of the copy at
    /// each later read of it.
    pub extent: Extent,
    /// The attestation roots the previous service pinned (`gov.attestation.root`), if it recorded
    /// them: the recovered service must pin the same.
    pub roots: Option<serde_json::Value>,
}

/// How far a verified copy of the previous ledger reaches: the entries its signatures cover, and
/// the chain hash through the last of them. The copy sits in the data folder, where whoever
/// writes the folder could cut it back to an earlier signature after the public state was
/// restored from it; recorded in `gov.recovery` at the recovery's genesis, the extent makes a
/// changed copy restore nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Extent {
    signed: u64,
    chain: String,
}

/// Where [`Extent`] is kept, in `gov.recovery`.
const EXTENT_KEY: &[u8] = b"previous_ledger";

impl Extent {
    /// Refuses a copy whose extent is not the one recorded at the recovery's genesis.
    fn check(&self, tx: &Tx) -> anyhow::Result<()> {
        let Some(recorded) = gov::get::<Extent>(tx, gov::RECOVERY, EXTENT_KEY)? else {
            // A recovery an older version started, before extents: it goes on unchecked.
            tracing::warn!("the recovery recorded no extent of the previous ledger (an older version started it)");
            return Ok(());
        };
        anyhow::ensure!(
            *self == recorded,
            "the previous ledger copy changed since the recovery started: it reaches entry {} (chain {}), and it \
             reached entry {} (chain {})",
            self.signed,
            self.chain,
            recorded.signed,
            recorded.chain
        );
        Ok(())
    }
}

/// The copy of the previous ledger in `dir`, verified (`report`: the walk anchored on its own
/// genesis) and held to the service identity it names: every signature in it, the last one
/// included, must be by a node that identity endorsed. Members pin that identity
/// (`--previous-identity`), and nobody without its key makes a ledger that passes for it.
/// Returns the entries signatures cover, that identity (DER), and the copy's extent.
fn verified_copy(
    dir: &std::path::Path,
    report: &cloister_ledger::verify::VerifyReport,
) -> anyhow::Result<(Vec<cloister_ledger::entry::LedgerEntry>, Vec<u8>, Extent)> {
    use anyhow::Context as _;
    let signed = report.last_signed.filter(|&n| n > 0).with_context(|| {
        format!("the previous ledger {} holds no signature: nothing vouches for its entries", dir.display())
    })?;
    let entries = signed_entries(dir, signed)?;
    let identity = last_service_identity(&entries)?;
    // The whole folder again, now against the identity. The covered entries alone leave out the
    // signature over them, which sits after them: a ledger of anyone's making, with no
    // endorsement in it and one signature at its end by a node of their own, passed that way.
    let held = cloister_ledger::verify::verify_dir(dir, None, Some(&identity), None)
        .map_err(|e| anyhow::anyhow!("the previous ledger {} is not its service's: {e}", dir.display()))?;
    anyhow::ensure!(
        held.last_signed == Some(signed),
        "the previous ledger {} changed while it was being read",
        dir.display()
    );
    let chain = hex::encode(entries.last().expect("signed entries start at genesis").chain);
    Ok((entries, identity, Extent { signed, chain }))
}

/// Copies the previous service's ledger folder to `data_dir/`[`PREVIOUS_LEDGER_DIR`] and reads
/// the copy ([`load_previous`]).
pub(crate) fn read_previous(folder: &std::path::Path, data_dir: &std::path::Path) -> anyhow::Result<Previous> {
    use anyhow::Context as _;
    let copy = data_dir.join(PREVIOUS_LEDGER_DIR);
    std::fs::create_dir_all(&copy).with_context(|| format!("creating {}", copy.display()))?;
    for file in std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))? {
        let path = file?.path();
        if path.extension().is_some_and(|e| e == "ledger") {
            let to = copy.join(path.file_name().expect("a file"));
            std::fs::copy(&path, &to).with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
        }
    }
    load_previous(data_dir)
}

/// Verifies the copy of the previous ledger in `data_dir` (hash chain, Merkle tree and
/// signatures, anchored on its own genesis; a torn last record, what a crash leaves, is cut off),
/// and reads its public state up to the last entry a signature covers: an unsigned tail is the
/// host's to forge, so it is not recovered.
pub(crate) fn load_previous(data_dir: &std::path::Path) -> anyhow::Result<Previous> {
    use anyhow::Context as _;
    let copy = data_dir.join(PREVIOUS_LEDGER_DIR);
    let folder = &copy;
    let report = match cloister_ledger::verify::verify_dir(&copy, None, None, None) {
        Ok(report) => report,
        Err(cloister_ledger::verify::VerifyError::TornTail { file, valid_bytes, report }) => {
            tracing::warn!(file = %file.display(), valid_bytes, "the previous ledger ends with a torn record: cut off");
            std::fs::OpenOptions::new().write(true).open(&file)?.set_len(valid_bytes)?;
            *report
        }
        Err(e) => anyhow::bail!("the previous ledger {} does not verify: {e}", folder.display()),
    };
    let (entries, _, extent) = verified_copy(&copy, &report)?;
    tracing::info!(
        entries = entries.len(),
        unsigned = report.entries.saturating_sub(extent.signed),
        "the previous ledger verifies"
    );
    let mut public = fold(transactions(entries).map(|tx| tx.public), |_| true);
    let record = |public: &mut State, map: &str, key: &[u8]| public.remove(&(map.to_owned(), key.to_vec()));
    let service: gov::ServiceRecord = record(&mut public, gov::SERVICE, gov::SERVICE_KEY)
        .map(|v| serde_json::from_slice(&v))
        .transpose()?
        .context("the previous ledger has no gov.service")?;
    let shares: RecoveryRecord = record(&mut public, gov::RECOVERY, gov::RECOVERY_KEY)
        .map(|v| serde_json::from_slice(&v))
        .transpose()?
        .context("the previous service issued no recovery shares (it had no recovery members): its private state cannot be recovered")?;
    let identity = service.identity.as_deref().context("the previous service has no identity")?;
    anyhow::ensure!(
        shares.service == identity::id_of_pem(identity.as_bytes())?,
        "the previous service's shares are bound to service {}, not to its identity",
        shares.service
    );
    anyhow::ensure!(
        shares.threshold >= 1 && shares.threshold as usize <= shares.shares.len(),
        "the previous service's threshold {} does not fit its {} shares",
        shares.threshold,
        shares.shares.len()
    );
    let roots = public
        .get(&(gov::ATTESTATION_ROOT.to_owned(), gov::ROOT_KEY.to_vec()))
        .map(|v| serde_json::from_slice(v))
        .transpose()
        .context("the previous gov.attestation.root does not parse")?;
    Ok(Previous { service, shares, public: chunks(restored_public(public)?), extent, roots })
}

/// What of the previous public state the new service takes: not the maps that are each service's
/// own ([`NOT_RESTORED_PUBLIC`]), and each Open proposal named in `gov.proposals_open`. A ledger
/// from before that index has Open proposals it does not name: named, they count against their
/// proposers' `gov.proposals_open_per_member_max`, and accepting new code drops them, like those
/// filed since.
fn restored_public(mut public: State) -> anyhow::Result<State> {
    public.retain(|(map, _), _| !NOT_RESTORED_PUBLIC.contains(&map.as_str()));
    let mut open = Vec::new();
    for ((map, id), value) in public.iter() {
        if map != gov::PROPOSALS {
            continue;
        }
        let record: gov::ProposalRecord = serde_json::from_slice(value)
            .map_err(|e| anyhow::anyhow!("a previous gov.proposals record does not decode: {e}"))?;
        if record.state == gov::ProposalState::Open {
            let key = crate::gov::open_proposal_key(&record.proposer, &String::from_utf8_lossy(id));
            open.push(((gov::PROPOSALS_OPEN.to_owned(), key.into_bytes()), serde_json::to_vec(&record.created_at)?));
        }
    }
    public.extend(open);
    Ok(public)
}

/// The identity certificate (DER) the last `gov.service` record among `entries` names.
fn last_service_identity(entries: &[cloister_ledger::entry::LedgerEntry]) -> anyhow::Result<Vec<u8>> {
    let mut last = None;
    for e in entries {
        if let cloister_ledger::entry::Payload::Tx(tx) = &e.payload {
            for (map, key, value) in tx.public.iter() {
                if map == gov::SERVICE && key == gov::SERVICE_KEY {
                    last = value;
                }
            }
        }
    }
    let service: gov::ServiceRecord =
        serde_json::from_slice(last.ok_or_else(|| anyhow::anyhow!("the previous ledger has no gov.service"))?)?;
    let pem = service.identity.ok_or_else(|| anyhow::anyhow!("the previous service has no identity"))?;
    Ok(identity::cert_der(pem.as_bytes())?.to_vec())
}

/// The entries of a verified ledger folder that signatures cover: seqnos below `signed`.
fn signed_entries(dir: &std::path::Path, signed: u64) -> anyhow::Result<Vec<cloister_ledger::entry::LedgerEntry>> {
    let mut entries = cloister_ledger::files::read_entries(dir)?;
    anyhow::ensure!(
        entries.first().is_some_and(|e| e.seqno == 0),
        "the previous ledger {} does not start at its genesis (a node that installed a snapshot keeps older files in \
         before-*/): recover from a folder holding the whole ledger",
        dir.display()
    );
    entries.retain(|e| e.seqno < signed);
    Ok(entries)
}

/// The first transaction of a recovered service: this node (Trusted, endorsed), the service
/// record (Recovering, a new identity that endorses every previous one), and the previous issue
/// of shares, which submitted shares are checked against.
pub(crate) fn recovery_genesis(
    previous: &Previous,
    first: gov::FirstNode<'_>,
    service_cert: &str,
    identity: &identity::KeyedCert,
) -> anyhow::Result<cloister_store::WriteSet> {
    let signer = identity::signing_key(&identity.key_pem, "the new service identity")?;
    let rng = ring::rand::SystemRandom::new();
    let mut previous_identities = previous.service.previous_identities.clone();
    let old =
        previous.service.identity.clone().ok_or_else(|| anyhow::anyhow!("the previous service has no identity"))?;
    previous_identities.push(gov::PreviousIdentity { cert: old, endorsement: String::new() });
    for p in &mut previous_identities {
        let der = identity::cert_der(p.cert.as_bytes())?;
        let mut message = gov::PREVIOUS_IDENTITY_CONTEXT.to_vec();
        message.extend_from_slice(&der);
        let signature = signer.sign(&rng, &message).map_err(|_| anyhow::anyhow!("signing an endorsement failed"))?;
        p.endorsement = base64::engine::general_purpose::STANDARD.encode(signature.as_ref());
    }
    let mut ws = cloister_store::WriteSet::default();
    first.write(&mut ws, &identity.key_pem)?;
    let mut service = gov::ServiceRecord {
        state: gov::ServiceState::Recovering,
        cert: service_cert.to_owned(),
        recovery_threshold: previous.service.recovery_threshold,
        identity: None,
        previous_identities,
        rekeys_requested: 0,
    };
    gov::put_service_identity(&mut ws, &mut service, &identity.cert_pem, &identity.key_pem);
    ws.put(gov::RECOVERY, gov::RECOVERY_PREVIOUS_KEY, &serde_json::to_vec(&previous.shares)?);
    ws.put(gov::RECOVERY, EXTENT_KEY, &serde_json::to_vec(&previous.extent)?);
    Ok(ws)
}

/// What a recovering service's leader writes next (`Service::restore_previous_state`).
pub(crate) enum Restore {
    Nothing,
    /// The previous public state, then [`gov::RECOVERY_PUBLIC_DONE_KEY`].
    Public(Vec<cloister_store::WriteSet>),
    /// The previous private state, then the service is Opening.
    Private(Vec<cloister_store::WriteSet>),
}

/// In a Recovering service: the previous public state until it is all written, then, once a
/// threshold of shares brought the previous ledger secret back, the previous private state; each
/// in write sets of about [`RESTORE_ENTRY_BYTES`], from the verified copy of the previous ledger.
pub(crate) fn next_restore(tx: &Tx, data_dir: &std::path::Path) -> anyhow::Result<Restore> {
    let Some(service) = gov::service(tx)? else { return Ok(Restore::Nothing) };
    if service.state != gov::ServiceState::Recovering {
        return Ok(Restore::Nothing);
    }
    if tx.get(gov::RECOVERY, gov::RECOVERY_PUBLIC_DONE_KEY)?.is_none() {
        let previous = load_previous(data_dir)?;
        previous.extent.check(tx)?;
        return Ok(Restore::Public(previous.public));
    }
    Ok(private_state(tx, data_dir)?.map_or(Restore::Nothing, Restore::Private))
}

/// Once the previous ledger secret is back, the previous ledger's private state.
fn private_state(tx: &Tx, data_dir: &std::path::Path) -> anyhow::Result<Option<Vec<cloister_store::WriteSet>>> {
    let previous: RecoveryRecord = gov::get(tx, gov::RECOVERY, gov::RECOVERY_PREVIOUS_KEY)?
        .ok_or_else(|| anyhow::anyhow!("a recovering service without the previous issue of shares"))?;
    let Some(secret) = tx.get(PREVIOUS_SECRETS, previous.service.as_bytes())? else { return Ok(None) };
    let secret =
        <[u8; 32]>::try_from(secret).map_err(|_| anyhow::anyhow!("a previous ledger secret is not 32 bytes"))?;
    let dir = data_dir.join(PREVIOUS_LEDGER_DIR);
    let report = cloister_ledger::verify::verify_dir(&dir, None, None, None)
        .map_err(|e| anyhow::anyhow!("the previous ledger copy {} does not verify: {e}", dir.display()))?;
    let (entries, identity, extent) = verified_copy(&dir, &report)?;
    extent.check(tx)?;
    anyhow::ensure!(
        identity::id_of_der(&identity) == previous.service,
        "the previous ledger copy is another service's than the one whose shares were submitted"
    );
    let entries: Vec<_> = transactions(entries).collect();
    // The shares wrap the newest secret; each rekey's record seals the one before under it.
    let mut chain = BTreeMap::new();
    for tx in &entries {
        for (map, key, value) in tx.public.iter() {
            if map == gov::LEDGER_SECRETS
                && let Some(value) = value
            {
                let record: gov::LedgerSecretRecord = serde_json::from_slice(value)?;
                chain
                    .insert(record.version, base64::engine::general_purpose::STANDARD.decode(&record.previous_sealed)?);
                anyhow::ensure!(
                    key == secrets::version_key(record.version),
                    "a ledger secret record under another key"
                );
            }
        }
    }
    let all = secrets::walk_back((previous.ledger_secret_version, secret), &chain).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        all.first().is_some_and(|(v, _)| *v == 1),
        "the previous ledger's secrets do not chain back to version 1 from version {}",
        previous.ledger_secret_version
    );
    let secrets = secrets::LedgerSecrets::new(all).map_err(anyhow::Error::msg)?;
    let mut writes = Vec::new();
    for tx in entries {
        let all = tx.writes(&secrets).map_err(|e| anyhow::anyhow!("a previous private entry does not open: {e}"))?;
        writes.push(all);
    }
    let state = fold(writes.into_iter(), |map| !cloister_store::is_public(map) && !NOT_RESTORED_PRIVATE.contains(&map));
    Ok(Some(chunks(state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A previous ledger from before `gov.proposals_open`: its Open proposals come back named
    /// there, its closed ones not; and its nodes do not come back at all.
    #[test]
    fn a_previous_states_open_proposals_are_indexed() {
        let record = |proposer: &str, state| gov::ProposalRecord {
            proposer: proposer.into(),
            proposal: gov::Proposal { actions: Vec::new() },
            state,
            created_at: 7,
            reason: None,
        };
        let mut public = State::new();
        for (id, r) in [
            ("p1", record("m0", gov::ProposalState::Open)),
            ("p2", record("m0", gov::ProposalState::Accepted)),
            ("p3", record("m1", gov::ProposalState::Open)),
            ("p4", record("m1", gov::ProposalState::Withdrawn)),
        ] {
            public.insert((gov::PROPOSALS.into(), id.into()), serde_json::to_vec(&r).unwrap());
        }
        public.insert((gov::NODES.into(), b"n0".to_vec()), b"{}".to_vec());
        let public = restored_public(public).unwrap();
        let index: Vec<_> = public
            .iter()
            .filter(|((map, _), _)| map == gov::PROPOSALS_OPEN)
            .map(|((_, key), value)| (String::from_utf8_lossy(key).into_owned(), value.clone()))
            .collect();
        assert_eq!(index, [("m0/p1".to_owned(), b"7".to_vec()), ("m1/p3".to_owned(), b"7".to_vec())]);
        assert_eq!(public.len(), 6, "the proposals themselves are kept as they were");
    }

    /// An issue is never of an older secret than the one recorded: the share upkeep reads the
    /// newest secret before the writer runs, and a rekey applied in between has already issued
    /// shares of a newer one (before, the older issue replaced them, and a recovery from a
    /// ledger signed then could not walk back to the newer secret).
    #[test]
    fn shares_of_an_older_secret_never_replace_those_of_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        let mut tx = store.begin().unwrap();
        let identity = identity::generate_service_identity("svc").unwrap();
        let service = gov::ServiceRecord {
            state: gov::ServiceState::Open,
            cert: String::new(),
            recovery_threshold: 1,
            identity: Some(identity.cert_pem),
            previous_identities: Vec::new(),
            rekeys_requested: 0,
        };
        tx.put(gov::SERVICE, gov::SERVICE_KEY, &serde_json::to_vec(&service).unwrap());
        let member = gov::MemberRecord {
            cert: String::new(),
            status: MemberStatus::Active,
            encryption_key: Some(envelope::generate_key().unwrap().1),
            data: serde_json::Value::Null,
        };
        tx.put(gov::MEMBERS, b"m0", &serde_json::to_vec(&member).unwrap());
        assert_eq!(maintain(&mut tx, (2, &[2; 32])).unwrap(), Some(1), "the first issue, of version 2");
        assert_eq!(maintain(&mut tx, (1, &[1; 32])).unwrap(), None, "nothing of version 1");
        let record: RecoveryRecord = gov::get(&tx, gov::RECOVERY, gov::RECOVERY_KEY).unwrap().unwrap();
        assert_eq!((record.version, record.ledger_secret_version), (1, 2));
    }

    /// Two members with one encryption key get no shares, at genesis either (no proposal's check
    /// sees its members): the key's holder would open both.
    #[test]
    fn an_issue_to_two_members_with_one_key_is_refused() {
        let identity = identity::generate_service_identity("svc").unwrap();
        let key = envelope::generate_key().unwrap().1;
        let members = [("m0".to_owned(), key.clone()), ("m1".to_owned(), key)];
        let err = genesis_issue(&[1; 32], &identity.cert_pem, members, 1).unwrap_err();
        assert!(format!("{err:#}").contains("the same encryption key"), "{err:#}");
    }
}
