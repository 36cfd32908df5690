//! `cloister call`: a thin HTTPS client for app and node endpoints.
//!
//! The body goes to stdout; the status line and transaction id go to stderr; the exit code is
//! non-zero unless the answer is 2xx.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::sandbox::SandboxFile;
use cloister_client::Client;
use cloister_crypto::identity::{self, KeyedCert};

#[derive(clap::Args)]
pub struct Args {
    /// HTTP method, e.g. GET or POST.
    method: String,
    /// Path, e.g. /app/report or /node/health, optionally with ?query.
    path: String,
    /// Request body: text, or @FILE to read a file.
    #[arg(long)]
    data: Option<String>,
    /// Content type of the body; by default guessed from @FILE's extension (.csv, .json).
    #[arg(long)]
    content_type: Option<String>,
    #[command(flatten)]
    target: Target,
}

/// Which node to reach and as whom: explicit files, or a sandbox folder and one of its parties.
#[derive(clap::Args)]
pub struct Target {
    /// The node's HTTPS URL; by default the sandbox's.
    #[arg(long, env = "CLOISTER_URL")]
    url: Option<String>,
    /// Client certificate (PEM).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The certificate to pin: the service identity (`identity` of GET /gov/service); by default
    /// the sandbox's service_identity.pem.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// A sandbox folder to take the URL, CA and identities from.
    #[arg(long, default_value = "sandbox")]
    sandbox: PathBuf,
    /// Act as this sandbox party or user (e.g. member0, user0) instead of --cert/--key.
    #[arg(long = "as")]
    as_party: Option<String>,
}

/// Where a [`Target`] leads: node URLs (the chosen one first, then the sandbox's other nodes),
/// the certificate to pin, and the identity to present.
pub struct Resolved {
    pub urls: Vec<String>,
    pub ca: Vec<u8>,
    pub id: Option<KeyedCert>,
}

impl Target {
    /// Reads the files the target names.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let sandbox = || SandboxFile::read(&self.sandbox);
        let mut urls = match &self.url {
            Some(url) => vec![url.clone()],
            None => {
                let sandbox = sandbox()?;
                let mut urls = vec![sandbox.rest_url.clone()];
                urls.extend(sandbox.nodes.iter().map(|n| n.rest_url.clone()));
                urls
            }
        };
        let mut seen = std::collections::HashSet::new();
        urls.retain(|u| seen.insert(u.clone()));
        let ca = match &self.cacert {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("reading the service certificate {}", path.display()))?
            }
            None => sandbox()?.client_roots()?,
        };
        let id = match (&self.as_party, &self.cert, &self.key) {
            (Some(name), _, _) => {
                let sandbox = sandbox()?;
                let party = sandbox
                    .parties
                    .into_iter()
                    .chain(sandbox.users)
                    .find(|p| &p.name == name)
                    .with_context(|| format!("the sandbox has no party or user named {name}"))?;
                Some(identity::read_pair(&party.cert, &party.key)?)
            }
            (None, Some(cert), Some(key)) => Some(identity::read_pair(cert, key)?),
            _ => None,
        };
        Ok(Resolved { urls, ca, id })
    }

    /// Connects to the chosen node, presenting the chosen identity (if any), and returns that
    /// identity too.
    /// With `--as NAME`, where the sandbox keeps NAME's encryption key for recovery shares:
    /// `NAME.enc.key.pem` beside its certificate.
    pub fn party_encryption_key(&self) -> anyhow::Result<Option<PathBuf>> {
        let Some(name) = &self.as_party else { return Ok(None) };
        let sandbox = SandboxFile::read(&self.sandbox)?;
        let party = sandbox
            .parties
            .iter()
            .find(|p| &p.name == name)
            .with_context(|| format!("the sandbox has no member named {name}"))?;
        let dir = party.cert.parent().unwrap_or(std::path::Path::new("."));
        Ok(Some(cloister_crypto::envelope::key_files(dir, name).0))
    }

    pub async fn connect(&self) -> anyhow::Result<(Client, Option<KeyedCert>)> {
        let Resolved { urls, ca, id } = self.resolve()?;
        Ok((Client::connect(&urls[0], &ca, id.as_ref()).await?, id))
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (body, guessed) = match &args.data {
        None => (Vec::new(), None),
        Some(d) => match d.strip_prefix('@') {
            Some(file) => {
                let guess = match std::path::Path::new(file).extension().and_then(|e| e.to_str()) {
                    Some("csv") => "text/csv",
                    _ => "application/json",
                };
                (std::fs::read(file).with_context(|| format!("reading {file}"))?, Some(guess))
            }
            None => (d.clone().into_bytes(), Some("application/json")),
        },
    };
    let content_type = args.content_type.as_deref().or(guessed);
    let (client, _) = args.target.connect().await?;
    let reply = client.request(&args.method.to_ascii_uppercase(), &args.path, content_type, body).await?;
    eprintln!("HTTP {}{}", reply.status, reply.tx_id().map(|t| format!("  tx {t}")).unwrap_or_default());
    println!("{}", reply.text());
    Ok(if (200..300).contains(&reply.status) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
