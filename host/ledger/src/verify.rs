//! Offline verification of a ledger folder, and of single receipts.
//!
//! Walking the files in order, it recomputes every leaf, the chain and the Merkle tree, and
//! checks every signature entry: its root and chain against the recomputed ones, its certificate
//! against the service certificate, its signature. The first fault stops it, naming the seqno.
//! A node runs the same walk on its own ledger when it starts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::entry::{Endorsement, LeafComponents, LedgerEntry, Payload, SignaturePayload, TxKind, chain};
use super::files::{self, Record, Tail};
use super::merkle::{self, Hash, MemoryNodes, NodesMut};
use super::remembered::Remembered;

/// What a successful walk found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    pub files: usize,
    pub entries: u64,
    pub signatures: u64,
    /// The first seqno the files hold (after a snapshot, not 1).
    pub first_seqno: Option<u64>,
    pub last_seqno: Option<u64>,
    /// The largest tree size a verified signature covers.
    pub last_signed: Option<u64>,
    /// The seqno of the last signature entry.
    pub last_signature: Option<u64>,
    /// The nodes whose signatures were verified.
    pub signers: std::collections::BTreeSet<u64>,
    /// The chain hash through the last entry.
    #[serde(skip)]
    pub chain: Hash,
    /// What the signatures were checked against.
    pub anchor: Anchor,
    /// When a service identity was given, its certificate's SHA-256 (hex): every signature's
    /// signer carries its endorsement (a walk that cannot tie one to it faults).
    pub identity: Option<String>,
}

/// The service certificate a walk trusted, by its SHA-256 fingerprint (hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "sha256", rename_all = "kebab-case")]
pub enum Anchor {
    /// No signature needed one: the folder holds none.
    #[default]
    None,
    /// The certificate the caller gave.
    Given(String),
    /// The certificate the folder's own genesis entry records: it proves the folder is
    /// self-consistent, not that it is the service's, since whoever wrote the folder wrote that too.
    Genesis(String),
}

fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, cert_der))
}

/// Why a walk failed.
#[derive(Debug, Clone, PartialEq)]
pub enum VerifyError {
    /// A fault: the ledger was altered, or is missing entries.
    Fault { seqno: Option<u64>, file: PathBuf, message: String },
    /// The last file ends with an incomplete entry: what a crash mid-write leaves. The rest
    /// verified; cutting the file at `valid_bytes` repairs it.
    TornTail { file: PathBuf, valid_bytes: u64, report: Box<VerifyReport> },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Fault { seqno: Some(s), file, message } => {
                write!(f, "seqno {s} ({}): {message}", file.display())
            }
            VerifyError::Fault { seqno: None, file, message } => write!(f, "{}: {message}", file.display()),
            VerifyError::TornTail { file, report, .. } => write!(
                f,
                "{} ends with an incomplete entry after seqno {}",
                file.display(),
                report.last_seqno.unwrap_or(0)
            ),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Public tables as the ledger's writes leave them: map → key → value (UTF-8 where possible).
pub type PublicTables = BTreeMap<String, BTreeMap<String, String>>;

fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        _ => format!("hex:{}", hex::encode(bytes)),
    }
}

/// The service certificate a genesis entry records in `gov.service`, if this is one.
fn genesis_service_cert(entry: &LedgerEntry) -> Option<Vec<u8>> {
    let Payload::Tx(tx) = &entry.payload else { return None };
    if tx.kind != TxKind::Genesis {
        return None;
    }
    let (_, _, value) = tx
        .public
        .iter()
        .find(|(map, key, _)| *map == cloister_store::gov::SERVICE && *key == cloister_store::gov::SERVICE_KEY)?;
    let record: cloister_store::gov::ServiceRecord = serde_json::from_slice(value?).ok()?;
    cloister_crypto::identity::cert_der(record.cert.as_bytes()).ok().map(|c| c.to_vec())
}

/// Walks a ledger folder. Without `service_cert` (DER), the one the genesis entry records is
/// used; a ledger that starts after a snapshot then needs it given. `public` gets the public
/// tables as the entries signatures cover leave them: an entry after the last signature is
/// linked by the hash chain alone, which whoever wrote the folder can recompute.
pub fn verify_dir(
    dir: &Path,
    service_cert: Option<&[u8]>,
    identity: Option<&[u8]>,
    mut public: Option<&mut PublicTables>,
) -> Result<VerifyReport, VerifyError> {
    let paths = files::chunk_paths(dir).map_err(|e| VerifyError::Fault {
        seqno: None,
        file: dir.to_owned(),
        message: format!("cannot list the ledger folder: {e}"),
    })?;
    let mut report = VerifyReport { files: paths.len(), ..Default::default() };
    let mut service_cert = service_cert.map(<[u8]>::to_vec);
    if let Some(cert) = &service_cert {
        report.anchor = Anchor::Given(fingerprint(cert));
    }
    let mut nodes = MemoryNodes::default();
    let mut chains: BTreeMap<u64, Hash> = BTreeMap::new();
    let mut chain_head = [0u8; 32];
    // Each entry's public writes, printable, until a signature covers it.
    type Writes = Vec<(String, String, Option<String>)>;
    let mut unsigned: std::collections::VecDeque<(u64, Writes)> = Default::default();
    let mut next: Option<u64> = None;
    // The first seqno after the snapshot start record, when the ledger starts from one.
    let mut snapshot_next: Option<u64> = None;
    // The service's endorsements as the entries so far leave them, by node id; checked from the
    // first one on (a ledger from before endorsements has none until its leader writes them).
    let mut endorsements: Option<BTreeMap<u64, cloister_store::gov::EndorsementRecord>> = None;
    // Whether they are all here: after a snapshot start, those written before it are not.
    let mut endorsements_whole = true;
    let mut identity_check = identity.map(IdentityCheck::new);
    for (i, path) in paths.iter().enumerate() {
        let fault = |seqno: Option<u64>, message: String| VerifyError::Fault { seqno, file: path.clone(), message };
        let chunk = files::read_chunk(path).map_err(|e| fault(next, format!("cannot read the file: {e}")))?;
        if let Tail::Corrupt { offset: 0, reason } = &chunk.tail {
            return Err(fault(next, reason.clone()));
        }
        let starts_fresh = matches!(chunk.records.first(), Some(Record::Start(_)));
        if starts_fresh && i > 0 {
            // A node sets the older files aside when it installs a snapshot; a start record past
            // the oldest file would let a folder skip entries (or swap history) unnoticed.
            return Err(fault(
                Some(chunk.first_seqno),
                "a snapshot start record heads a file that is not the oldest: the entries before it are \
                 not vouched for by anything in this folder"
                    .into(),
            ));
        }
        match next {
            Some(n) if chunk.first_seqno > n => {
                return Err(fault(
                    Some(n),
                    format!(
                        "entries {n}..{} are missing: this file starts at {}",
                        chunk.first_seqno - 1,
                        chunk.first_seqno
                    ),
                ));
            }
            Some(n) if chunk.first_seqno < n => {
                return Err(fault(
                    Some(n),
                    format!(
                        "this file starts at entry {}, which the files before it already hold: the files overlap",
                        chunk.first_seqno
                    ),
                ));
            }
            None if chunk.first_seqno != 0 && !starts_fresh => {
                return Err(fault(
                    Some(1),
                    format!("the ledger starts at seqno {} without a snapshot start record", chunk.first_seqno),
                ));
            }
            _ => {}
        }
        for (k, record) in chunk.records.iter().enumerate() {
            match record {
                Record::Start(s) => {
                    if k != 0 || s.next != chunk.first_seqno {
                        return Err(fault(Some(s.next), "a snapshot start record is out of place".into()));
                    }
                    nodes = MemoryNodes::default();
                    for (level, index, hash) in &s.frontier {
                        nodes.set_node(*level, *index, *hash).expect("memory nodes never fail");
                    }
                    chains.clear();
                    if let Some(last) = s.next.checked_sub(1) {
                        chains.insert(last, s.chain);
                    }
                    chain_head = s.chain;
                    next = Some(s.next);
                    snapshot_next = Some(s.next);
                    endorsements_whole = false;
                }
                Record::Entry(e) => {
                    let expected = next.unwrap_or(0);
                    if e.seqno != expected {
                        return Err(fault(Some(expected), format!("expected seqno {expected}, found {}", e.seqno)));
                    }
                    let leaf = e.components().leaf();
                    let computed = chain(&chain_head, &leaf);
                    if computed != e.chain {
                        return Err(fault(
                            Some(e.seqno),
                            "the chain hash does not match: this entry or the one before it was altered".into(),
                        ));
                    }
                    merkle::append(&mut nodes, e.seqno, &leaf).map_err(|err| fault(Some(e.seqno), err.to_string()))?;
                    chain_head = computed;
                    chains.insert(e.seqno, computed);
                    // Only a genesis at the head of a ledger that starts from nothing, before any
                    // signature, is taken as the anchor.
                    if service_cert.is_none() && report.signatures == 0 && snapshot_next.is_none() {
                        service_cert = genesis_service_cert(e);
                        if let Some(cert) = &service_cert {
                            report.anchor = Anchor::Genesis(fingerprint(cert));
                        }
                    }
                    if let Some(sig) = e.payload.signature() {
                        let ca = service_cert.as_deref().ok_or_else(|| {
                            fault(
                                Some(e.seqno),
                                "no service certificate to check signatures against: pass --service-cert".into(),
                            )
                        })?;
                        if snapshot_next.is_some_and(|first| sig.tree_size <= first) {
                            // It covers only entries before the snapshot this ledger starts from
                            // (a leader signs its tree while later entries are in flight): no
                            // tree here to compare with, so it is checked by its signature, as
                            // the node checked it when it applied it (`index::Appender`).
                            sig.verify(ca).map_err(|m| fault(Some(e.seqno), m))?;
                        } else {
                            check_signature(sig, e.seqno, &nodes, &chains, ca).map_err(|m| fault(Some(e.seqno), m))?;
                        }
                        if let Some(endorsed) = &endorsements {
                            check_endorsed(sig, endorsed, endorsements_whole).map_err(|m| fault(Some(e.seqno), m))?;
                        }
                        report.signatures += 1;
                        report.last_signed = report.last_signed.max(Some(sig.tree_size));
                        report.last_signature = Some(e.seqno);
                        report.signers.insert(sig.node_id);
                        if let Some(tables) = public.as_deref_mut() {
                            while let Some((_, writes)) = unsigned.pop_front_if(|(seqno, _)| *seqno < sig.tree_size) {
                                for (map, key, value) in writes {
                                    let table = tables.entry(map).or_default();
                                    match value {
                                        Some(v) => table.insert(key, v),
                                        None => table.remove(&key),
                                    };
                                }
                            }
                        }
                    }
                    if let Some(check) = identity_check.as_mut() {
                        check.entry(e, endorsements_whole).map_err(|m| fault(Some(e.seqno), m))?;
                    }
                    if let Payload::Tx(tx) = &e.payload {
                        for (map, key, value) in tx.public.iter() {
                            if map == cloister_store::gov::ENDORSEMENTS {
                                note_endorsement(endorsements.get_or_insert_default(), key, value)
                                    .map_err(|m| fault(Some(e.seqno), m))?;
                            }
                        }
                    }
                    if let (Some(_), Payload::Tx(tx)) = (public.as_deref(), &e.payload)
                        && !tx.public.is_empty()
                    {
                        let writes = tx.public.iter();
                        let writes = writes.map(|(m, k, v)| (m.to_owned(), printable(k), v.map(printable))).collect();
                        unsigned.push_back((e.seqno, writes));
                    }
                    report.entries += 1;
                    report.first_seqno.get_or_insert(e.seqno);
                    report.last_seqno = Some(e.seqno);
                    next = Some(e.seqno + 1);
                }
            }
        }
        if report.first_seqno.is_none() && starts_fresh {
            report.first_seqno = next;
        }
        match chunk.tail {
            Tail::Clean => {}
            Tail::Torn { valid_bytes } if i + 1 == paths.len() => {
                report.chain = chain_head;
                report.identity = identity.map(fingerprint);
                return Err(VerifyError::TornTail { file: path.clone(), valid_bytes, report: Box::new(report) });
            }
            Tail::Torn { .. } => {
                return Err(fault(
                    next,
                    "the entry after this point is incomplete, and this is not the last file".into(),
                ));
            }
            Tail::Corrupt { reason, .. } => return Err(fault(next, format!("unreadable entry: {reason}"))),
        }
    }
    report.chain = chain_head;
    report.identity = identity.map(fingerprint);
    Ok(report)
}

/// The node id a key of `gov.endorsements` names, in the one form a node writes it (decimal,
/// no sign, no leading zero). `parse` alone took `+7` and `007` for node 7: a ledger could then
/// reopen a retired node's endorsement under another key, which this walk read as node 7's and
/// [`check_signers_endorsed_by`], comparing keys as text, did not see as a change of the closed
/// record.
fn node_id_key(key: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(key).ok()?;
    text.parse::<u64>().ok().filter(|id| id.to_string() == text)
}

/// Records a write to `gov.endorsements`.
fn note_endorsement(
    endorsed: &mut BTreeMap<u64, cloister_store::gov::EndorsementRecord>,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), String> {
    let id = node_id_key(key)
        .ok_or_else(|| format!("gov.endorsements has a key that is not a node id: {}", printable(key)))?;
    match value {
        Some(v) => {
            let record =
                serde_json::from_slice(v).map_err(|e| format!("gov.endorsements[{id}] does not parse: {e}"))?;
            endorsed.insert(id, record);
        }
        None => {
            endorsed.remove(&id);
        }
    }
    Ok(())
}

/// Checks that every signature among `entries` (a ledger from its genesis, in order) was made by
/// a node whose endorsement in force at that point carries the service identity's signature
/// (`identity`: the identity certificate's DER), and that an endorsement, once closed, never
/// changes again (no replay of an older, open record). [`verify_dir`] checks each signature and
/// its signer's bounds against the endorsements the ledger records; this ties those records to
/// the identity, so that whoever holds ledger files cannot make a ledger of their own, with
/// signers of their own, pass for the service's. Given entries up to a signature, it checks the
/// signatures among them: a signature over them sits after them, so a caller that wants that
/// one checked passes it too, or walks with [`verify_dir`] and the identity (as a recovery does).
pub fn check_signers_endorsed_by(entries: &[LedgerEntry], identity: &[u8]) -> Result<(), String> {
    let mut check = IdentityCheck::new(identity);
    entries.iter().try_for_each(|e| check.entry(e, true))
}

/// [`check_signers_endorsed_by`], one entry at a time, for a walk that streams the ledger.
pub struct IdentityCheck<'a> {
    identity: &'a [u8],
    /// The endorsement records in force, by the key they are written under.
    records: BTreeMap<String, cloister_store::gov::EndorsementRecord>,
    /// Closed records as they were closed: certificate digest and `until`.
    closed: BTreeMap<String, (String, Option<u64>)>,
}

impl<'a> IdentityCheck<'a> {
    pub fn new(identity: &'a [u8]) -> Self {
        IdentityCheck { identity, records: BTreeMap::new(), closed: BTreeMap::new() }
    }

    /// Checks the next entry. `whole`: the walk started at genesis, so every endorsement made
    /// so far has been seen. After a snapshot start, a signer with no record seen may have been
    /// endorsed before it, but nothing walked ties it to the identity, so it is refused as well:
    /// counted apart and passed, it let a folder that starts at a made-up snapshot, with
    /// signers of anyone's making, verify.
    pub fn entry(&mut self, e: &LedgerEntry, whole: bool) -> Result<(), String> {
        use cloister_store::gov::{ENDORSEMENTS, EndorsementRecord};
        if let Some(sig) = e.payload.signature() {
            let id = sig.node_id.to_string();
            let record = self.records.get(&id).ok_or_else(|| match whole {
                true => format!("entry {}: node {id} signed, but no endorsement of it is in force", e.seqno),
                false => format!(
                    "entry {}: node {id} signed, and no endorsement of it is in this folder, which starts at a \
                     snapshot: nothing here ties it to the service identity; verify a ledger folder that starts \
                     at genesis",
                    e.seqno
                ),
            })?;
            let signature = record.signature.as_deref().ok_or_else(|| {
                format!("entry {}: node {id}'s endorsement carries no signature by the service identity", e.seqno)
            })?;
            cloister_crypto::identity::verify_hex(self.identity, &record.message(&id), signature).map_err(|m| {
                format!("entry {}: node {id}'s endorsement is not the service identity's ({m})", e.seqno)
            })?;
        }
        let Payload::Tx(tx) = &e.payload else { return Ok(()) };
        for (map, key, value) in tx.public.iter() {
            if map != ENDORSEMENTS {
                continue;
            }
            let id = String::from_utf8_lossy(key).into_owned();
            let record: Option<EndorsementRecord> = value
                .map(serde_json::from_slice)
                .transpose()
                .map_err(|err| format!("entry {}: gov.endorsements[{id}] does not parse: {err}", e.seqno))?;
            if let Some(before) = self.closed.get(&id)
                && record.as_ref().map(|r| (&r.cert_sha256, r.until)) != Some((&before.0, before.1))
            {
                return Err(format!("entry {}: node {id}'s endorsement was closed, and it changes again", e.seqno));
            }
            match record {
                Some(r) => {
                    if r.until.is_some() {
                        self.closed.insert(id.clone(), (r.cert_sha256.clone(), r.until));
                    }
                    self.records.insert(id, r);
                }
                None => drop(self.records.remove(&id)),
            }
        }
        Ok(())
    }
}

/// A signature must come from a node the service endorsed at that point: with this certificate,
/// and over a tree that ends before its endorsement did.
fn check_endorsed(
    sig: &SignaturePayload,
    endorsed: &BTreeMap<u64, cloister_store::gov::EndorsementRecord>,
    whole: bool,
) -> Result<(), String> {
    let Some(record) = endorsed.get(&sig.node_id) else {
        // Past a snapshot start, a signer with no record since may have been endorsed before
        // it (the node checked it then, as it applied it): only the whole ledger can tell.
        return match whole {
            true => Err(format!("node {} signed, but the service never endorsed it", sig.node_id)),
            false => Ok(()),
        };
    };
    if record.cert_sha256 != hex::encode(super::entry::cert_sha256(&sig.node_cert)) {
        return Err(format!("node {} signed with a certificate other than the one the service endorsed", sig.node_id));
    }
    match record.until {
        Some(until) if sig.tree_size > until => Err(format!(
            "node {} was retired: its endorsement ended at {until} entries, and it signed a tree of {}",
            sig.node_id, sig.tree_size
        )),
        _ => Ok(()),
    }
}

/// Checks a signature entry at `seqno` against the recomputed tree and chain.
fn check_signature(
    sig: &SignaturePayload,
    seqno: u64,
    nodes: &MemoryNodes,
    chains: &BTreeMap<u64, Hash>,
    ca: &[u8],
) -> Result<(), String> {
    if sig.tree_size == 0 || sig.tree_size > seqno {
        return Err(format!(
            "the signature claims a tree of {} entries, which its position cannot cover",
            sig.tree_size
        ));
    }
    let root = merkle::root(nodes, sig.tree_size).map_err(|e| e.to_string())?;
    if root != sig.root {
        return Err(format!(
            "the signed root {} is not the root of the first {} entries",
            hex::encode(sig.root),
            sig.tree_size
        ));
    }
    let last = sig.tree_size - 1;
    match chains.get(&last) {
        Some(c) if *c == sig.chain => {}
        Some(_) => return Err(format!("the signed chain head is not the chain through entry {last}")),
        None => return Err(format!("entry {last} is not in this ledger, so its signature cannot be checked")),
    }
    sig.verify(ca)
}

/// The endorsements a snapshot's state holds, gathered while it is read, for [`SnapshotSeal::check`].
#[derive(Debug, Default)]
pub struct SnapshotEndorsements(BTreeMap<u64, cloister_store::gov::EndorsementRecord>);

impl SnapshotEndorsements {
    /// Records one `gov.endorsements` row of the snapshot.
    pub fn note(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        note_endorsement(&mut self.0, key, Some(value))
    }
}

/// What binds a snapshot to a signed ledger position: the first signature entry whose tree
/// reaches the snapshot's last entry, and the leaves from the snapshot's end to that tree's end.
/// The snapshot's Merkle frontier and chain head, extended by those leaves, must give the signed
/// root and chain head, and the signer must be a node the snapshot's service endorsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSeal {
    pub signature: SignatureRecord,
    pub leaves: Vec<Hash>,
}

impl SnapshotSeal {
    /// Checks the seal against the snapshot's ledger start state and the endorsements its state
    /// holds. An error names what does not hold.
    pub fn check(&self, start: &files::StartState, endorsed: &SnapshotEndorsements) -> Result<(), String> {
        let sig = &self.signature.payload;
        if sig.tree_size == 0 || sig.tree_size < start.next || self.signature.seqno < sig.tree_size {
            return Err(format!(
                "the seal's signature (entry {}, over {} entries) does not cover the snapshot's {} entries",
                self.signature.seqno, sig.tree_size, start.next
            ));
        }
        if self.leaves.len() as u64 != sig.tree_size - start.next {
            return Err(format!(
                "the seal carries {} leaves, and {} lie between the snapshot and the signed tree",
                self.leaves.len(),
                sig.tree_size - start.next
            ));
        }
        let mut nodes = MemoryNodes::default();
        for (level, index, hash) in &start.frontier {
            nodes.set_node(*level, *index, *hash).map_err(|e| e.to_string())?;
        }
        let mut chain_head = start.chain;
        for (seqno, leaf) in (start.next..).zip(&self.leaves) {
            merkle::append(&mut nodes, seqno, leaf).map_err(|e| e.to_string())?;
            chain_head = chain(&chain_head, leaf);
        }
        let root = merkle::root(&nodes, sig.tree_size).map_err(|e| e.to_string())?;
        if root != sig.root || chain_head != sig.chain {
            return Err(format!(
                "the snapshot's ledger position ({} entries) is not part of the tree node {} signed at entry {}",
                start.next, sig.node_id, self.signature.seqno
            ));
        }
        sig.verify_by_node()?;
        check_endorsed(sig, &endorsed.0, true)
    }
}

/// A signature entry, as a receipt carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureRecord {
    pub seqno: u64,
    pub term: u64,
    pub payload: SignaturePayload,
}

/// Proof that a transaction was committed: everything to check it offline against the service
/// certificate alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub tx_id: String,
    /// The leaf's components: the verifier recomputes the leaf from them.
    pub leaf: LeafComponents,
    /// The audit path from the leaf to the signed root, bottom-up, hex.
    pub proof: Vec<String>,
    pub signature: SignatureRecord,
    /// The signing node's certificate (PEM).
    pub node_cert: String,
    /// The service identity's endorsement of the signing node, made when the receipt was issued.
    #[serde(default)]
    pub endorsement: Option<Endorsement>,
    /// The operator's service CA (PEM), for convenience: it plays no part in verification.
    pub service_cert: String,
    /// The service identity's certificate (PEM), for convenience: verification uses the one given.
    #[serde(default)]
    pub service_identity: String,
}

/// What a verified receipt proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReceipt {
    pub tx_id: String,
    pub claims_digest: Option<[u8; 32]>,
    pub signed_by: u64,
}

/// Checks a receipt with nothing but the service identity's certificate (DER): the service
/// identity endorsed the signing node for this signature, the node signed the root, and the proof
/// leads from the transaction's leaf to that root. A certificate from the operator's CA counts
/// for nothing here: the CA can issue one to anybody.
pub fn verify_receipt(receipt: &Receipt, service_identity: &[u8]) -> Result<VerifiedReceipt, String> {
    ReceiptVerifier::new(service_identity).verify(receipt)
}

/// Whether `service_identity` (a certificate's DER) endorsed `previous`, a previous service's
/// identity that a recovery carried forward.
pub fn previous_identity_endorsed(
    service_identity: &[u8],
    previous: &cloister_store::gov::PreviousIdentity,
) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let (_, current) = x509_parser::parse_x509_certificate(service_identity)
        .map_err(|e| format!("the service identity's certificate does not parse: {e}"))?;
    let der = cloister_crypto::identity::cert_der(previous.cert.as_bytes()).map_err(|e| e.to_string())?.to_vec();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(&previous.endorsement)
        .map_err(|e| format!("a previous identity's endorsement is not base64: {e}"))?;
    let mut message = cloister_store::gov::PREVIOUS_IDENTITY_CONTEXT.to_vec();
    message.extend_from_slice(&der);
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P384_SHA384_FIXED,
        current.public_key().subject_public_key.data.as_ref(),
    )
    .verify(&message, &signature)
    .map_err(|_| "the service identity did not endorse this previous identity".to_owned())?;
    Ok(der)
}

/// [`verify_receipt`], and for a receipt a previous service issued (before a recovery), against
/// the previous identity that `service_identity` endorsed (`previous_identities` of the current
/// `gov.service`). Returns the verified receipt and the previous identity used, if any.
pub fn verify_receipt_with_previous(
    receipt: &Receipt,
    service_identity: &[u8],
    previous: &[cloister_store::gov::PreviousIdentity],
) -> Result<(VerifiedReceipt, Option<usize>), String> {
    let current = match verify_receipt(receipt, service_identity) {
        Ok(v) => return Ok((v, None)),
        Err(e) => e,
    };
    for (i, p) in previous.iter().enumerate() {
        let der = previous_identity_endorsed(service_identity, p)?;
        if let Ok(v) = verify_receipt(receipt, &der) {
            return Ok((v, Some(i)));
        }
    }
    Err(if previous.is_empty() {
        current
    } else {
        format!("{current}; nor does it verify against any of the {} previous identities it endorsed", previous.len())
    })
}

/// Signatures (with their endorsement and node certificate) a [`ReceiptVerifier`] remembers as
/// checked; past it, it forgets them all and starts over.
pub const RECEIPT_SIGNATURES_CACHED_MAX: usize = 4096;

/// [`verify_receipt`] for many receipts against one service identity: the signature entry, the
/// endorsement and the node certificate of a receipt are checked once (two ECDSA P-384
/// verifications and two X.509 parses) and remembered by their digest, so receipts that share a
/// signature entry cost only their leaf and Merkle path after the first.
pub struct ReceiptVerifier {
    service_identity: Vec<u8>,
    checked: Remembered<[u8; 32]>,
}

impl ReceiptVerifier {
    pub fn new(service_identity: &[u8]) -> ReceiptVerifier {
        ReceiptVerifier {
            service_identity: service_identity.to_vec(),
            checked: Remembered::new(RECEIPT_SIGNATURES_CACHED_MAX),
        }
    }

    pub fn verify(&self, receipt: &Receipt) -> Result<VerifiedReceipt, String> {
        let leaf = &receipt.leaf;
        if receipt.tx_id != format!("{}.{}", leaf.term, leaf.seqno) {
            return Err(format!("the receipt is for {} but its leaf is {}.{}", receipt.tx_id, leaf.term, leaf.seqno));
        }
        let sig = &receipt.signature.payload;
        // Everything the signature checks depend on, so a remembered digest stands for exactly them.
        let digest = {
            let mut h = blake3::Hasher::new_derive_key("cloister receipt signature check v1");
            h.update(&postcard::to_stdvec(&(sig, &receipt.endorsement)).expect("receipt parts encode"));
            h.update(receipt.node_cert.as_bytes());
            *h.finalize().as_bytes()
        };
        if !self.checked.knows(&digest) {
            self.check_signature(receipt)?;
            self.checked.remember(digest);
        }
        if leaf.seqno >= sig.tree_size {
            return Err(format!("the signature covers entries 0..{}, not entry {}", sig.tree_size, leaf.seqno));
        }
        let proof = receipt
            .proof
            .iter()
            .map(|h| hex::decode(h).ok().and_then(|b| <Hash>::try_from(b).ok()))
            .collect::<Option<Vec<Hash>>>()
            .ok_or("the proof is not a list of 32-byte hex hashes")?;
        if !merkle::verify(&leaf.leaf(), leaf.seqno, sig.tree_size, &proof, &sig.root) {
            return Err("the proof does not lead from the leaf to the signed root".into());
        }
        Ok(VerifiedReceipt { tx_id: receipt.tx_id.clone(), claims_digest: leaf.claims_digest, signed_by: sig.node_id })
    }

    /// The service identity endorsed the node for this signature, and the node signed it.
    fn check_signature(&self, receipt: &Receipt) -> Result<(), String> {
        let sig = &receipt.signature.payload;
        let node_cert = cloister_crypto::identity::cert_der(receipt.node_cert.as_bytes()).map_err(|e| e.to_string())?;
        if node_cert.as_ref() != sig.node_cert.as_slice() {
            return Err("the receipt's node certificate is not the one that signed".into());
        }
        let endorsement = receipt.endorsement.as_ref().ok_or_else(|| {
            format!(
                "the receipt carries no endorsement by the service identity: nothing vouches for node {}",
                sig.node_id
            )
        })?;
        endorsement.covers(&self.service_identity, sig)?;
        sig.verify_by_node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{NodeSigner, TxEntry, cert_sha256};
    use crate::files::{LedgerFiles, StartState, set_aside_dir};
    use crate::index;
    use cloister_crypto::identity::{self, ServiceCa};

    /// One node's ledger, built through the index as a node builds it.
    struct Built {
        _dir: tempfile::TempDir,
        store: cloister_store::Store,
        ca: identity::KeyedCert,
        ca_der: Vec<u8>,
        signer: NodeSigner,
        replica: MemoryNodes,
        entries: Vec<LedgerEntry>,
    }

    impl Built {
        fn new() -> Built {
            let dir = tempfile::tempdir().unwrap();
            let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
            let batch = store.write_batch().unwrap();
            index::create(batch.txn()).unwrap();
            batch.commit().unwrap();
            let ca = ServiceCa::generate("svc").unwrap();
            let ca_der = identity::cert_der(ca.keyed.cert_pem.as_bytes()).unwrap().to_vec();
            let node = ca.issue_node_cert("node", &["localhost".into()]).unwrap();
            let signer = NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap();
            Built {
                _dir: dir,
                store,
                ca: ca.keyed,
                ca_der,
                signer,
                replica: MemoryNodes::default(),
                entries: Vec::new(),
            }
        }

        fn push(&mut self, appender: &mut index::Appender, payload: Payload) {
            let seqno = appender.state().size;
            let entry = appender.append(seqno, 1, payload).unwrap();
            merkle::append(&mut self.replica, seqno, &entry.components().leaf()).unwrap();
            self.entries.push(entry);
        }

        /// Appends blank entries up to `size`, then a signature entry over them.
        fn sign_through(&mut self, size: u64) {
            let store = self.store.clone();
            let batch = store.write_batch().unwrap();
            let mut appender = index::Appender::new(batch.txn(), self.ca_der.clone()).unwrap();
            while appender.state().size < size {
                self.push(&mut appender, Payload::Blank);
            }
            let root = merkle::root(&self.replica, size).unwrap();
            let chain = self.entries.last().unwrap().chain;
            let sig = SignaturePayload::sign(size, root, chain, &self.signer);
            self.push(&mut appender, Payload::Tx(TxEntry::signature(sig)));
            appender.finish().unwrap();
            batch.commit().unwrap();
        }

        fn start_at(&self, next: u64) -> StartState {
            StartState {
                next,
                chain: self.entries[next as usize - 1].chain,
                frontier: merkle::frontier(&self.replica, next).unwrap(),
            }
        }

        /// The signer's endorsement record: open, and signed by nobody yet.
        fn open_endorsement(&self) -> cloister_store::gov::EndorsementRecord {
            cloister_store::gov::EndorsementRecord {
                cert_sha256: hex::encode(cert_sha256(&self.signer.cert_der)),
                until: None,
                signature: None,
            }
        }

        /// Appends a governance transaction of these public writes.
        fn gov(&mut self, writes: cloister_store::WriteSet) {
            let store = self.store.clone();
            let batch = store.write_batch().unwrap();
            let mut appender = index::Appender::new(batch.txn(), self.ca_der.clone()).unwrap();
            let sealer = cloister_crypto::seal::Sealer::new(&[0; 32]);
            self.push(&mut appender, Payload::Tx(TxEntry::new(TxKind::Gov, writes, None, &sealer)));
            appender.finish().unwrap();
            batch.commit().unwrap();
        }

        fn write(&self, dir: &Path, start: Option<u64>, seqnos: std::ops::RangeInclusive<u64>) {
            let mut files = LedgerFiles::open(dir, 1 << 30).unwrap();
            if let Some(next) = start {
                files.restart_at(self.start_at(next)).unwrap();
            }
            files.append(&self.entries[*seqnos.start() as usize..=*seqnos.end() as usize]).unwrap();
        }
    }

    /// The attack: a folder whose first file ends at seqno 5 and whose second starts, with a
    /// snapshot start record, at 20. Entries 6 to 19 are gone, yet before this check the walk
    /// passed, because it took any start record as a fresh beginning.
    #[test]
    fn a_start_record_past_the_oldest_file_is_a_gap_and_a_fault() {
        let mut built = Built::new();
        built.sign_through(5);
        built.sign_through(29);

        let after_snapshot = tempfile::tempdir().unwrap();
        built.write(after_snapshot.path(), Some(20), 20..=29);
        let report =
            verify_dir(after_snapshot.path(), Some(&built.ca_der), None, None).expect("a ledger after a snapshot");
        assert_eq!((report.first_seqno, report.last_seqno, report.signatures), (Some(20), Some(29), 1));
        assert_eq!(report.anchor, Anchor::Given(fingerprint(&built.ca_der)));

        let spliced = tempfile::tempdir().unwrap();
        built.write(spliced.path(), None, 0..=5);
        verify_dir(spliced.path(), Some(&built.ca_der), None, None).expect("the first file alone verifies");
        let second = files::chunk_paths(after_snapshot.path()).unwrap().remove(0);
        std::fs::copy(&second, spliced.path().join(second.file_name().unwrap())).unwrap();
        let err = verify_dir(spliced.path(), Some(&built.ca_der), None, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Fault { seqno: Some(20), message, .. } if message.contains("not the oldest")),
            "{err}"
        );

        // A node opening a folder that older code left this way (a follower that installed a
        // snapshot kept its older files in place) sets the older files aside first.
        files::set_aside_before_newest_start(spliced.path()).unwrap();
        let report = verify_dir(spliced.path(), Some(&built.ca_der), None, None).expect("the run from the snapshot");
        assert_eq!((report.first_seqno, report.last_seqno), (Some(20), Some(29)));
        let aside = verify_dir(&set_aside_dir(spliced.path(), 20), Some(&built.ca_der), None, None).unwrap();
        assert_eq!((aside.first_seqno, aside.last_seqno), (Some(0), Some(5)));
    }

    /// Blank entries up to seqno `at`, then a signature entry there over the first `size` only,
    /// signed by `stranger` or else `built`'s own node: a leader signs its tree while later
    /// entries are already in flight.
    fn sign_behind(built: &mut Built, at: u64, size: u64, stranger: Option<&NodeSigner>) {
        let store = built.store.clone();
        let batch = store.write_batch().unwrap();
        let mut appender = index::Appender::new(batch.txn(), built.ca_der.clone()).unwrap();
        while appender.state().size < at {
            built.push(&mut appender, Payload::Blank);
        }
        let root = merkle::root(&built.replica, size).unwrap();
        let chain = built.entries[size as usize - 1].chain;
        let sig = SignaturePayload::sign(size, root, chain, stranger.unwrap_or(&built.signer));
        built.push(&mut appender, Payload::Tx(TxEntry::signature(sig)));
        appender.finish().unwrap();
        batch.commit().unwrap();
    }

    /// A node that installed a snapshot at 18 (its files start at 19) and then applied a
    /// signature at 20 over the first 18 entries accepted it by its signature, having no tree
    /// before 19 to compare with. The walk its restart runs asked for that tree instead ("tree
    /// node (0, 16) is not on this node"), so such a node refused to start ever again. The join
    /// benchmark's new node applied exactly such a signature. The walk now checks it as the
    /// node did, and still refuses one the service's nodes did not sign.
    #[test]
    fn a_signature_over_entries_before_the_snapshot_start_verifies_by_its_signature() {
        let mut built = Built::new();
        built.sign_through(5);
        sign_behind(&mut built, 20, 18, None);
        built.sign_through(25);
        let dir = tempfile::tempdir().unwrap();
        built.write(dir.path(), Some(19), 19..=25);
        let report = verify_dir(dir.path(), Some(&built.ca_der), None, None).expect("the ledger after the snapshot");
        assert_eq!((report.first_seqno, report.last_seqno, report.signatures), (Some(19), Some(25), 2));

        // The same position signed by a node of another CA (the chain made to match, as whoever
        // writes the folder can) is refused.
        let stranger = node(&ServiceCa::generate("another").unwrap(), "stranger");
        let honest = &built.entries[20];
        let theirs = honest.payload.signature().expect("entry 20 is the signature");
        let forged = SignaturePayload::sign(theirs.tree_size, theirs.root, theirs.chain, &stranger);
        let mut entry = LedgerEntry { payload: Payload::Tx(TxEntry::signature(forged)), ..honest.clone() };
        entry.chain = crate::entry::chain(&built.entries[19].chain, &entry.components().leaf());
        let dir = tempfile::tempdir().unwrap();
        let mut files = LedgerFiles::open(dir.path(), 1 << 30).unwrap();
        files.restart_at(built.start_at(19)).unwrap();
        files.append(&[built.entries[19].clone(), entry]).unwrap();
        let err = verify_dir(dir.path(), Some(&built.ca_der), None, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Fault { seqno: Some(20), message, .. } if message.contains("certificate")),
            "{err}"
        );
    }

    /// A receipt for entry `seqno` signed over the first `size` entries by `signer`, as a
    /// node of `built`'s ledger (or anybody holding `signer`'s key) would make it.
    fn receipt(built: &Built, seqno: u64, size: u64, signer: &NodeSigner, endorsement: Option<Endorsement>) -> Receipt {
        let root = merkle::root(&built.replica, size).unwrap();
        let chain = built.entries[size as usize - 1].chain;
        let payload = SignaturePayload::sign(size, root, chain, signer);
        let pem = pem_of(&signer.cert_der);
        Receipt {
            tx_id: format!("1.{seqno}"),
            leaf: built.entries[seqno as usize].components(),
            proof: merkle::path(&built.replica, seqno, size).unwrap().iter().map(hex::encode).collect(),
            signature: SignatureRecord { seqno: size, term: 1, payload },
            node_cert: pem,
            endorsement,
            service_cert: String::new(),
            service_identity: String::new(),
        }
    }

    fn pem_of(der: &[u8]) -> String {
        identity::pem_of_der(der)
    }

    fn node(ca: &ServiceCa, name: &str) -> NodeSigner {
        let cert = ca.issue_node_cert(name, &["localhost".into()]).unwrap();
        NodeSigner::new(&cert.cert_pem, &cert.key_pem).unwrap()
    }

    /// The attacks: the operator's CA issues a certificate to a node the service never trusted
    /// (or a retired node's operator keeps its key), and signs a root of its own. Before the
    /// service identity a receipt needed only a certificate of the CA, so both verified. Now a
    /// receipt must carry the service identity's endorsement of its signer, covering the tree it
    /// signed: the never-trusted node has none (and cannot make one), and a retired node's ends
    /// where it retired.
    #[test]
    fn receipts_need_the_service_identitys_endorsement_of_their_signer() {
        let mut built = Built::new();
        built.sign_through(29);
        let ca = ServiceCa::load(built.ca.clone()).unwrap();
        let service = identity::generate_service_identity("test").unwrap();
        let service_der = identity::cert_der(service.cert_pem.as_bytes()).unwrap().to_vec();
        let endorse = |signer: &NodeSigner, max: u64, retired: bool| {
            Some(Endorsement::issue(&signer.cert_der, max, retired, &service.key_pem).unwrap())
        };

        // A trusted node's receipt verifies with nothing but the service identity.
        let trusted = node(&ca, "trusted");
        let good = receipt(&built, 12, 20, &trusted, endorse(&trusted, 25, false));
        assert_eq!(verify_receipt(&good, &service_der).unwrap().signed_by, trusted.node_id);
        // The operator's CA is no anchor for receipts.
        assert!(verify_receipt(&good, &built.ca_der).unwrap_err().contains("not signed by the service identity"));

        // Never trusted: no endorsement, or another node's, or one the attacker made itself.
        let rogue = node(&ca, "never trusted");
        for (what, endorsement) in [
            ("none", None),
            ("the trusted node's", endorse(&trusted, 25, false)),
            ("its own", {
                let fake = identity::generate_service_identity("forged").unwrap();
                Some(Endorsement::issue(&rogue.cert_der, 25, false, &fake.key_pem).unwrap())
            }),
        ] {
            let forged = receipt(&built, 12, 20, &rogue, endorsement);
            let err = verify_receipt(&forged, &service_der).unwrap_err();
            assert!(
                err.contains("no endorsement") || err.contains("never endorsed") || err.contains("not signed by"),
                "{what}: {err}"
            );
        }

        // Retired: its endorsement ends at 20 entries; a signature over more is refused, naming
        // the retirement, while its signatures from before still verify.
        let retired = node(&ca, "retired");
        let before = receipt(&built, 12, 20, &retired, endorse(&retired, 20, true));
        verify_receipt(&before, &service_der).expect("a signature from before the retirement");
        let after = receipt(&built, 24, 29, &retired, endorse(&retired, 20, true));
        let err = verify_receipt(&after, &service_der).unwrap_err();
        assert!(err.contains("was retired") && err.contains("at most 20 entries"), "{err}");
        // An endorsement from while it was trusted reaches no further than the ledger did then.
        let stale = receipt(&built, 24, 29, &retired, endorse(&retired, 22, false));
        assert!(verify_receipt(&stale, &service_der).unwrap_err().contains("at most 22 entries"));

        // A verifier that has checked a signature once still checks each receipt's own leaf and
        // path, and checks anew any receipt whose signature, endorsement or certificate differs.
        let verifier = ReceiptVerifier::new(&service_der);
        for seqno in [3, 12, 19] {
            let shared = receipt(&built, seqno, 20, &trusted, good.endorsement.clone());
            assert_eq!(verifier.verify(&shared).unwrap().tx_id, format!("1.{seqno}"));
        }
        let mut other_leaf = good.clone();
        other_leaf.leaf.claims_digest = Some([7; 32]);
        assert!(verifier.verify(&other_leaf).unwrap_err().contains("does not lead from the leaf"));
        let mut other_path = good.clone();
        other_path.proof.reverse();
        assert!(verifier.verify(&other_path).is_err());
        let mut resigned = good.clone();
        resigned.signature.payload.signature[10] ^= 1;
        assert!(verifier.verify(&resigned).is_err(), "a changed signature is checked, not remembered");
        let rogue_receipt = receipt(&built, 12, 20, &rogue, None);
        assert!(verifier.verify(&rogue_receipt).unwrap_err().contains("no endorsement"));
    }

    /// The walk holds every signature to the endorsements the ledger records: a signer the
    /// service never endorsed, or one past its retirement, is a fault naming the seqno.
    #[test]
    fn the_walk_refuses_signatures_the_service_did_not_endorse() {
        let walk = |built: &Built, endorsements: &[(u64, Option<u64>)], signer: &NodeSigner| {
            let mut endorsed = BTreeMap::new();
            for (id, until) in endorsements {
                let cert_sha256 = hex::encode(cert_sha256(&signer.cert_der));
                let record = cloister_store::gov::EndorsementRecord { cert_sha256, until: *until, signature: None };
                endorsed.insert(*id, record);
            }
            let root = merkle::root(&built.replica, 20).unwrap();
            let sig = SignaturePayload::sign(20, root, built.entries[19].chain, signer);
            check_endorsed(&sig, &endorsed, true)
        };
        let mut built = Built::new();
        built.sign_through(25);
        let ca = ServiceCa::load(built.ca.clone()).unwrap();
        let signer = node(&ca, "signer");
        walk(&built, &[(signer.node_id, None)], &signer).expect("endorsed, open");
        walk(&built, &[(signer.node_id, Some(20))], &signer).expect("a tree within the endorsement");
        let err = walk(&built, &[(signer.node_id, Some(19))], &signer).unwrap_err();
        assert!(err.contains("was retired"), "{err}");
        let err = walk(&built, &[(signer.node_id + 1, None)], &signer).unwrap_err();
        assert!(err.contains("never endorsed"), "{err}");
    }

    #[test]
    fn an_endorsement_key_names_a_node_in_one_form_only() {
        assert_eq!(node_id_key(b"7"), Some(7));
        assert_eq!(node_id_key(b"18446744073709551615"), Some(u64::MAX));
        for other in [&b"+7"[..], b"07", b"007", b" 7", b"7 ", b"", b"0x7", b"18446744073709551616"] {
            assert_eq!(node_id_key(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    /// A node that installed a snapshot has no endorsement made before it in its folder. The
    /// first `gov.endorsements` write after it (a node joining, or one retiring) began the
    /// walk's record of endorsements with that one node, so the next signature by any other
    /// node was "never endorsed", and the node, whose start runs this walk, never started
    /// again. A signer with no record since the snapshot now passes there; the whole ledger
    /// still holds every signer to its record.
    #[test]
    fn after_a_snapshot_start_a_signer_endorsed_before_it_still_verifies() {
        use cloister_store::gov::{ENDORSEMENTS, EndorsementRecord};
        let mut built = Built::new();
        built.sign_through(5);
        {
            let store = built.store.clone();
            let batch = store.write_batch().unwrap();
            let mut appender = index::Appender::new(batch.txn(), built.ca_der.clone()).unwrap();
            while appender.state().size < 10 {
                built.push(&mut appender, Payload::Blank);
            }
            let another = EndorsementRecord { cert_sha256: "00".repeat(32), until: None, signature: None };
            let mut ws = cloister_store::WriteSet::default();
            ws.put(ENDORSEMENTS, b"424242", &serde_json::to_vec(&another).unwrap());
            let sealer = cloister_crypto::seal::Sealer::new(&[0; 32]);
            built.push(&mut appender, Payload::Tx(TxEntry::new(TxKind::Gov, ws, None, &sealer)));
            appender.finish().unwrap();
            batch.commit().unwrap();
        }
        built.sign_through(15);
        let from_snapshot = tempfile::tempdir().unwrap();
        built.write(from_snapshot.path(), Some(8), 8..=15);
        let report =
            verify_dir(from_snapshot.path(), Some(&built.ca_der), None, None).expect("the folder after a snapshot");
        assert_eq!((report.first_seqno, report.last_seqno, report.signatures), (Some(8), Some(15), 1));
        let whole = tempfile::tempdir().unwrap();
        built.write(whole.path(), None, 0..=15);
        let err = verify_dir(whole.path(), Some(&built.ca_der), None, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Fault { seqno: Some(15), message, .. } if message.contains("never endorsed")),
            "{err}"
        );
    }

    /// The attack: whoever holds ledger files writes a ledger of their own (its own genesis, its
    /// own node, endorsement records that name that node) and it verified, because endorsements
    /// were public records anyone could write. Now a recovery also requires each signer's
    /// endorsement to carry the service identity's signature, and a closed one to stay closed.
    #[test]
    fn signers_must_be_endorsed_by_the_service_identity() {
        use cloister_store::gov::{ENDORSEMENTS, EndorsementRecord, signed_endorsement};
        let built = Built::new();
        let service = identity::generate_service_identity("svc").unwrap();
        let service_der = identity::cert_der(service.cert_pem.as_bytes()).unwrap().to_vec();
        let stranger = identity::generate_service_identity("stranger").unwrap();
        let id = built.signer.node_id.to_string();
        let open = built.open_endorsement();
        let sealer = cloister_crypto::seal::Sealer::new(&[0; 32]);
        let endorse = |record: Option<&EndorsementRecord>| {
            let mut ws = cloister_store::WriteSet::default();
            match record {
                Some(r) => ws.put(ENDORSEMENTS, id.as_bytes(), &serde_json::to_vec(r).unwrap()),
                None => ws.remove(ENDORSEMENTS, id.as_bytes()),
            }
            LedgerEntry {
                seqno: 0,
                term: 1,
                chain: [0; 32],
                payload: Payload::Tx(TxEntry::new(TxKind::Gov, ws, None, &sealer)),
            }
        };
        let root = merkle::root(&built.replica, 1).unwrap_or([0; 32]);
        let signature = || LedgerEntry {
            seqno: 1,
            term: 1,
            chain: [0; 32],
            payload: Payload::Tx(TxEntry::signature(SignaturePayload::sign(1, root, [0; 32], &built.signer))),
        };
        let check = |entries: &[LedgerEntry]| check_signers_endorsed_by(entries, &service_der);

        let signed = signed_endorsement(&service.key_pem, &id, open.clone()).unwrap();
        check(&[endorse(Some(&signed)), signature()]).expect("endorsed by the identity");
        let err = check(&[endorse(Some(&open)), signature()]).unwrap_err();
        assert!(err.contains("carries no signature"), "{err}");
        let foreign = signed_endorsement(&stranger.key_pem, &id, open.clone()).unwrap();
        let err = check(&[endorse(Some(&foreign)), signature()]).unwrap_err();
        assert!(err.contains("not the service identity's"), "{err}");
        // A signed record names a node id: it does not pass for another node.
        let other = signed_endorsement(&service.key_pem, "12345", open.clone()).unwrap();
        let err = check(&[endorse(Some(&other)), signature()]).unwrap_err();
        assert!(err.contains("not the service identity's"), "{err}");
        let err = check(&[signature()]).unwrap_err();
        assert!(err.contains("no endorsement of it is in force"), "{err}");
        // Past a snapshot start, a signer with no record seen may have been endorsed before it,
        // but nothing walked ties it to the identity: refused, saying so.
        let err = IdentityCheck::new(&service_der).entry(&signature(), false).unwrap_err();
        assert!(err.contains("starts at a snapshot"), "{err}");
        // Closed, then the older open record replayed (directly, or after a removal).
        let closed =
            signed_endorsement(&service.key_pem, &id, EndorsementRecord { until: Some(1), ..open.clone() }).unwrap();
        check(&[endorse(Some(&signed)), endorse(Some(&closed)), endorse(Some(&closed))]).expect("closed stays closed");
        for replay in [vec![endorse(Some(&signed))], vec![endorse(None), endorse(Some(&signed))]] {
            let mut entries = vec![endorse(Some(&signed)), endorse(Some(&closed))];
            entries.extend(replay);
            entries.push(signature());
            let err = check(&entries).unwrap_err();
            assert!(err.contains("was closed, and it changes again"), "{err}");
        }
    }

    /// `ledger verify --service-identity`: each signer's endorsement in force must carry the
    /// identity's signature. Checked against the operator's CA alone, a ledger whose endorsement
    /// records anyone wrote (here one signed by another identity) verifies, and whoever holds a
    /// certificate of that CA can write such a ledger.
    #[test]
    fn a_walk_given_the_service_identity_holds_every_signer_to_it() {
        use cloister_store::gov::{ENDORSEMENTS, signed_endorsement};
        let mut built = Built::new();
        let der = |keyed: &identity::KeyedCert| identity::cert_der(keyed.cert_pem.as_bytes()).unwrap().to_vec();
        let service = identity::generate_service_identity("svc").unwrap();
        let stranger = identity::generate_service_identity("stranger").unwrap();
        let id = built.signer.node_id.to_string();
        let open = built.open_endorsement();
        let endorsed_by = |keyed: &identity::KeyedCert| {
            let record = signed_endorsement(&keyed.key_pem, &id, open.clone()).unwrap();
            let mut ws = cloister_store::WriteSet::default();
            ws.put(ENDORSEMENTS, id.as_bytes(), &serde_json::to_vec(&record).unwrap());
            ws
        };
        built.gov(endorsed_by(&service));
        built.sign_through(5);
        // Seqno 6 replaces the record with one the stranger signed; the signature at 10 rests on it.
        built.gov(endorsed_by(&stranger));
        built.sign_through(10);
        let walk = |start: Option<u64>, seqnos: std::ops::RangeInclusive<u64>, identity: &[u8]| {
            let dir = tempfile::tempdir().unwrap();
            built.write(dir.path(), start, seqnos);
            verify_dir(dir.path(), Some(&built.ca_der), Some(identity), None)
        };
        let faulted_at_10 = |r: Result<VerifyReport, VerifyError>| {
            let err = r.unwrap_err();
            assert!(
                matches!(&err, VerifyError::Fault { seqno: Some(10), message, .. }
                    if message.contains("not the service identity's")),
                "{err}"
            );
        };

        let report = walk(None, 0..=5, &der(&service)).expect("signed by a node the identity endorsed");
        assert_eq!(report.signatures, 1);
        assert_eq!(report.identity, Some(fingerprint(&der(&service))));
        let err = walk(None, 0..=5, &der(&stranger)).unwrap_err();
        assert!(matches!(&err, VerifyError::Fault { seqno: Some(5), .. }), "{err}");
        // The CA alone passes the whole ledger; the identity does not.
        let dir = tempfile::tempdir().unwrap();
        built.write(dir.path(), None, 0..=10);
        assert!(verify_dir(dir.path(), Some(&built.ca_der), None, None).unwrap().identity.is_none());
        faulted_at_10(walk(None, 0..=10, &der(&service)));
        // From a snapshot after the stranger's record, nothing walked holds the signer's
        // endorsement, and nothing ties the signer to the identity: a folder made up from a
        // snapshot start on, with no endorsement in it, would pass otherwise. From a snapshot
        // before the record, the record is walked and refused.
        let err = walk(Some(7), 7..=10, &der(&service)).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Fault { seqno: Some(10), message, .. } if message.contains("starts at a snapshot")),
            "{err}"
        );
        faulted_at_10(walk(Some(6), 6..=10, &der(&service)));
    }

    /// The public tables a walk prints are those the signed entries leave: a write after the
    /// last signature is linked by the hash chain alone, which whoever wrote the folder can
    /// recompute (before, it was printed with the rest, and `ledger verify` passed).
    #[test]
    fn the_public_tables_leave_out_the_entries_after_the_last_signature() {
        let mut built = Built::new();
        let write = |key: &str| {
            let mut ws = cloister_store::WriteSet::default();
            ws.put("gov.t", key.as_bytes(), b"v");
            ws
        };
        built.gov(write("signed"));
        built.sign_through(5);
        built.gov(write("unsigned"));
        let dir = tempfile::tempdir().unwrap();
        built.write(dir.path(), None, 0..=6);
        let mut tables = PublicTables::new();
        let report = verify_dir(dir.path(), Some(&built.ca_der), None, Some(&mut tables)).unwrap();
        assert_eq!((report.last_signed, report.last_signature, report.last_seqno), (Some(5), Some(5), Some(6)));
        let keys: Vec<_> = tables["gov.t"].keys().cloned().collect();
        assert_eq!(keys, ["signed"]);
    }

    /// A later file that starts before the entries the files before it hold (here a copy of the
    /// first under a later name) is an overlap, named as one: the gap message took one from its
    /// start seqno and overflowed on a copy of the first file.
    #[test]
    fn files_that_overlap_are_a_fault_named_as_such() {
        let mut built = Built::new();
        built.sign_through(5);
        let dir = tempfile::tempdir().unwrap();
        built.write(dir.path(), None, 0..=5);
        let first = files::chunk_paths(dir.path()).unwrap().remove(0);
        std::fs::copy(&first, dir.path().join(format!("{:016}.ledger", 6))).unwrap();
        let err = verify_dir(dir.path(), Some(&built.ca_der), None, None).unwrap_err();
        assert!(
            matches!(&err, VerifyError::Fault { seqno: Some(6), message, .. } if message.contains("overlap")),
            "{err}"
        );
    }

    /// A node that installs a snapshot sets its older files aside, where they still verify, and
    /// its ledger folder holds one unbroken run.
    #[test]
    fn installing_a_snapshot_sets_the_older_files_aside() {
        let mut built = Built::new();
        built.sign_through(5);
        built.sign_through(29);
        let dir = tempfile::tempdir().unwrap();
        built.write(dir.path(), None, 0..=5);
        built.write(dir.path(), Some(20), 20..=29);

        let names: Vec<_> = files::chunk_paths(dir.path()).unwrap().iter().map(|p| files::first_seqno_of(p)).collect();
        assert_eq!(names, [Some(20)]);
        let report = verify_dir(dir.path(), Some(&built.ca_der), None, None).unwrap();
        assert_eq!((report.first_seqno, report.last_seqno), (Some(20), Some(29)));
        let aside = verify_dir(&set_aside_dir(dir.path(), 20), Some(&built.ca_der), None, None).unwrap();
        assert_eq!((aside.first_seqno, aside.last_seqno), (Some(0), Some(5)));
    }
}
