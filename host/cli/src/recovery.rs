//! `cloister recovery`: a recovery member's tools. `share` fetches the service's current issue
//! of recovery shares (`GET /gov/recovery`), opens the member's own share with its encryption
//! key, and checks it against the share's public digest, so a member learns that its key still
//! opens its share without the share ever being printed or written.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine as _;
use clap::{Args as ClapArgs, Subcommand};

use cloister_client::Client;
use cloister_crypto::recovery::{self, Binding};
use cloister_store::gov::RecoveryRecord;

use crate::call::Target;

#[derive(Subcommand)]
pub enum RecoveryCommand {
    /// Check this member's recovery share: it opens with the member's encryption key and
    /// matches its public digest. The share itself is never shown. With --submit, to a
    /// Recovering service: open the share of the previous service and submit it, signed.
    Share(ShareArgs),
}

#[derive(ClapArgs)]
pub struct ShareArgs {
    #[command(flatten)]
    target: Target,
    /// The member's encryption key (PKCS#8 PEM). With `--as NAME`: the sandbox's
    /// NAME.enc.key.pem.
    #[arg(long)]
    encryption_key: Option<PathBuf>,
    /// Submit the share of the previous service to this Recovering service.
    #[arg(long)]
    submit: bool,
    /// With --submit: the certificate of the service identity the member knew before the
    /// disaster (its old `service_identity.pem`); the share goes only to a recovery of that service.
    #[arg(long, requires = "submit")]
    previous_identity: Option<PathBuf>,
}

pub async fn run(command: RecoveryCommand) -> anyhow::Result<ExitCode> {
    let RecoveryCommand::Share(args) = command;
    let resolved = args.target.resolve()?;
    let member = resolved.id.as_ref().context("name the member: --as NAME, or --cert and --key")?;
    let key_path = match &args.encryption_key {
        Some(path) => path.clone(),
        None => {
            args.target.party_encryption_key()?.context("name the member's encryption key: --encryption-key FILE")?
        }
    };
    let key_pem = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading the encryption key {}", key_path.display()))?;
    let client = Client::connect(&resolved.urls[0], &resolved.ca, Some(member)).await?;
    if args.submit {
        let expected = match &args.previous_identity {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                Some(cloister_crypto::identity::id_of_pem(&pem)?)
            }
            None => {
                eprintln!(
                    "note: without --previous-identity, nothing checks that the service being recovered is the one you knew"
                );
                None
            }
        };
        let answer = submit_share(&client, member, &key_pem, expected.as_deref()).await?;
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    let record = fetch(&client).await?;
    let id = member.id()?;
    open_own_share(&record, &id, &key_pem)?;
    println!(
        "member {id}: your share of issue {} opens with {} and matches its digest; {} of the {} recovery members' shares recover service {}",
        record.version,
        key_path.display(),
        record.threshold,
        record.shares.len(),
        record.service
    );
    Ok(ExitCode::SUCCESS)
}

/// The service's current issue of recovery shares.
pub async fn fetch(client: &Client) -> anyhow::Result<RecoveryRecord> {
    fetch_at(client, "/gov/recovery").await
}

async fn fetch_at(client: &Client, path: &str) -> anyhow::Result<RecoveryRecord> {
    let reply = client.get(path).await?;
    anyhow::ensure!(reply.status == 200, "GET {path} answered {}: {}", reply.status, reply.text());
    serde_json::from_slice(&reply.body).with_context(|| format!("GET {path} answered no recovery record"))
}

/// Opens `member`'s share of the previous service (`GET /gov/recovery/previous`) with its
/// encryption key and submits it, signed, to a Recovering service. With `expected_previous` (the
/// hex SHA-256 of the service identity the member knew), it submits nothing unless that is the
/// service being recovered: a node recovering a ledger of another making gets no real share.
/// Returns the service's answer: shares submitted, the threshold, and whether the private state
/// is being restored.
pub async fn submit_share(
    client: &Client,
    member: &cloister_crypto::identity::KeyedCert,
    key_pem: &str,
    expected_previous: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    // A recovering node takes shares once it has written the previous public state (503 before).
    let started = std::time::Instant::now();
    let previous = loop {
        let reply = client.get("/gov/recovery/previous").await?;
        if reply.status == 503 && started.elapsed() < PUBLIC_RESTORE_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        }
        anyhow::ensure!(reply.status == 200, "GET /gov/recovery/previous answered {}: {}", reply.status, reply.text());
        break serde_json::from_slice::<RecoveryRecord>(&reply.body).context("no recovery record")?;
    };
    if let Some(expected) = expected_previous {
        anyhow::ensure!(
            previous.service == expected,
            "the service being recovered is {}, not the service you knew ({expected}): no share submitted",
            previous.service
        );
    }
    let id = member.id()?;
    let share = open_own_share(&previous, &id, key_pem)?;
    let body = serde_json::json!({
        "service": previous.service,
        "version": previous.version,
        "member": id,
        "share": base64::engine::general_purpose::STANDARD.encode(&share),
    });
    client.gov_ok(member, &cloister_crypto::cose::GovWrite::RecoveryShare, &body).await
}

/// How long `submit_share` waits for a recovering node to write the previous public state.
pub const PUBLIC_RESTORE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Opens member `id`'s share of `record` with its encryption key (PKCS#8 PEM), checked against
/// its digest.
pub fn open_own_share(record: &RecoveryRecord, id: &str, key_pem: &str) -> anyhow::Result<Vec<u8>> {
    let share = record.shares.get(id).with_context(|| {
        format!(
            "member {id} holds no share of issue {}: it is no recovery member (Active, with an encryption key)",
            record.version
        )
    })?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sealed = b64.decode(&share.sealed).context("the sealed share is not base64")?;
    let digest: [u8; 32] = hex::decode(&share.digest)
        .ok()
        .and_then(|d| d.try_into().ok())
        .context("the share's digest is not 32 bytes of hex")?;
    let binding = Binding { service: &record.service, version: record.version, member: id };
    recovery::open_share(key_pem, binding, &sealed, &digest).map_err(anyhow::Error::msg)
}
