//! `cloister ledger verify` and `cloister receipt verify`: offline audit with nothing but files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use cloister_crypto::identity;
use cloister_ledger::verify::{self, Anchor, PublicTables, Receipt, VerifyError};

#[derive(clap::Subcommand)]
pub(crate) enum LedgerCommand {
    /// Recompute the chain, the Merkle tree and every signature of a ledger folder.
    Verify {
        /// A node's ledger folder (or its data folder, which holds `ledger/`).
        dir: PathBuf,
        /// The service certificate (PEM) to check signatures against. Without it, the one the
        /// folder's genesis entry records is used, and the last line of the output says so.
        #[arg(long)]
        service_cert: Option<PathBuf>,
        /// The service identity's certificate (PEM; the sandbox writes service_identity.pem): each
        /// signer's endorsement in force must carry its signature, so that a ledger written by
        /// whoever holds a certificate of the operator's CA does not pass for the service's.
        #[arg(long)]
        service_identity: Option<PathBuf>,
        /// Print the public tables as the ledger's signed entries leave them, as JSON.
        #[arg(long)]
        print_public: bool,
    },
}

#[derive(clap::Subcommand)]
pub(crate) enum ReceiptCommand {
    /// Check a receipt (JSON from GET /app/receipt) against the service identity's certificate
    /// (the `identity` of GET /gov/service; the sandbox writes it to service_identity.pem).
    Verify {
        receipt: PathBuf,
        #[arg(long, alias = "service-cert")]
        service_identity: PathBuf,
        /// The application claim the receipt should prove (TEXT, or @FILE for a file's bytes):
        /// its SHA-256 must be the receipt's claims digest.
        #[arg(long)]
        claim: Option<String>,
        /// For a receipt from before a recovery: GET /gov/service of the recovered service (JSON),
        /// whose `previous_identities` the service identity endorsed.
        #[arg(long)]
        service_record: Option<PathBuf>,
    },
}

fn service_cert_der(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(identity::cert_der(&pem).with_context(|| path.display().to_string())?.to_vec())
}

pub(crate) fn run_ledger(command: LedgerCommand) -> anyhow::Result<ExitCode> {
    let LedgerCommand::Verify { dir, service_cert, service_identity, print_public } = command;
    let dir = if dir.join("ledger").is_dir() { dir.join("ledger") } else { dir };
    let cert = service_cert.as_deref().map(service_cert_der).transpose()?;
    let identity = service_identity.as_deref().map(service_cert_der).transpose()?;
    let mut public = PublicTables::new();
    let result = verify::verify_dir(&dir, cert.as_deref(), identity.as_deref(), print_public.then_some(&mut public));
    match result {
        Ok(r) => {
            println!(
                "verified {} entries in {} file(s) (seqno {}..={}): {} signatures by {} node(s) checked, last signed seqno {}",
                r.entries,
                r.files,
                r.first_seqno.unwrap_or(0),
                r.last_seqno.unwrap_or(0),
                r.signatures,
                r.signers.len(),
                r.last_signed.map_or("none".into(), |s| (s - 1).to_string())
            );
            // Entries from the last signed tree's size on are covered by no signature, but for a
            // ledger that ends with the signature over everything before it.
            let signed = r.last_signed.unwrap_or(r.first_seqno.unwrap_or(0));
            let ends_signed = r.last_signature.is_some() && r.last_signature == r.last_signed;
            if let Some(last) = r.last_seqno.filter(|&last| last >= signed && !(ends_signed && last == signed)) {
                println!(
                    "entries {signed}..={last} are covered by no signature: only the hash chain links them, \
                     which whoever wrote the folder can recompute, so nothing here vouches for them{}",
                    if print_public { " (the public tables below leave them out)" } else { "" }
                );
            }
            if print_public {
                println!("{}", serde_json::to_string_pretty(&public)?);
            }
            match &r.identity {
                None => println!(
                    "service identity: not checked; pass --service-identity to require every signer's \
                     endorsement to carry its signature"
                ),
                Some(sha256) => println!(
                    "service identity: every signer's endorsement carries its signature ({} signatures; sha256 {sha256})",
                    r.signatures
                ),
            }
            // Last, so that nobody reads "verified" without what it was verified against.
            match &r.anchor {
                Anchor::Given(sha256) => println!("trust anchor: the service certificate given (sha256 {sha256})"),
                Anchor::Genesis(sha256) => println!(
                    "trust anchor: NONE GIVEN. The signatures were checked against the service certificate in this \
                     folder's own genesis entry (sha256 {sha256}), which whoever wrote the folder chose; pass \
                     --service-cert with the certificate you trust"
                ),
                Anchor::None => println!("trust anchor: none needed, the folder holds no signature"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ VerifyError::TornTail { .. }) => {
            eprintln!("ledger verification failed: {e} (a node cuts such a tail when it starts)");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("ledger verification failed at {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(crate) fn run_receipt(command: ReceiptCommand) -> anyhow::Result<ExitCode> {
    let ReceiptCommand::Verify { receipt, service_identity, claim, service_record } = command;
    let previous: Vec<cloister_store::gov::PreviousIdentity> = match &service_record {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let record: cloister_store::gov::ServiceRecord = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a service record (GET /gov/service)", path.display()))?;
            record.previous_identities
        }
    };
    let claim = match claim.as_deref() {
        Some(c) => Some(match c.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("reading the claim from {file}"))?,
            None => c.as_bytes().to_vec(),
        }),
        None => None,
    };
    let text = std::fs::read(&receipt).with_context(|| format!("reading {}", receipt.display()))?;
    let parsed: Receipt =
        serde_json::from_slice(&text).with_context(|| format!("{} is not a receipt", receipt.display()))?;
    match verify::verify_receipt_with_previous(&parsed, &service_cert_der(&service_identity)?, &previous) {
        Ok((v, via)) => {
            if let Some(i) = via {
                let id = identity::id_of_pem(previous[i].cert.as_bytes())?;
                println!(
                    "a previous service issued this receipt: its identity {id} is endorsed by the service identity"
                );
            }
            if let Some(claim) = &claim {
                let digest = cloister_ledger::entry::claim_digest(claim);
                if v.claims_digest != Some(digest) {
                    let proved = v.claims_digest.map(hex::encode).unwrap_or_else(|| "none".into());
                    eprintln!(
                        "receipt verification failed: the claim's SHA-256 is {}, and the receipt proves claims \
                         digest {proved}: this is not the claim transaction {} committed",
                        hex::encode(digest),
                        v.tx_id
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
            let claims = v.claims_digest.map(hex::encode).unwrap_or_else(|| "none".into());
            println!(
                "receipt verified: transaction {} committed, signed by node {}; claims digest {claims}{}",
                v.tx_id,
                v.signed_by,
                if claim.is_some() { ", which is the claim's" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("receipt verification failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
