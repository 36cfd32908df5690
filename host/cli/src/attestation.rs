//! `cloister attestation verify`: checks a piece of evidence offline, with the same verifier the
//! nodes use, against a policy file or the policy a running service enforces.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use cloister_attestation::{Evidence, Policy};

use cloister_client::Client;

#[derive(Subcommand)]
pub(crate) enum AttestationCommand {
    /// Verify evidence (JSON: an `Evidence`, or a node entry of `/node/attestations`).
    Verify {
        /// The evidence file.
        evidence: PathBuf,
        /// A policy file (JSON, as `GET /node/attestation/policy` returns it).
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        policy: Option<PathBuf>,
        /// A node's REST URL: verify against the policy that service enforces.
        #[arg(long, requires = "cacert")]
        url: Option<String>,
        /// The certificate to pin for `--url`: the service identity's.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// The report_data binding to expect (hex, 64 bytes). Without it the binding of the node's
        /// key and nonce is not checked, and the output says so.
        #[arg(long)]
        binding: Option<String>,
    },
    /// Write a mock SNP firmware root (a test ARK and ASK, with their keys) to OUT, for nodes run
    /// with `attestation.kind = "mock"` in rehearsals and tests. Evidence it signs passes only a
    /// service whose genesis chose `attestation = "mock"` with this root.
    MockRoot {
        #[arg(long)]
        out: PathBuf,
    },
}

/// What a verdict under `policy` does not show, to say beside it: under a mock root (a service's
/// own, with `--url` the one the node being checked names) evidence proves nothing of hardware.
fn roots_warning(policy: &Policy) -> Option<&'static str> {
    match policy.roots {
        cloister_attestation::Roots::Amd => None,
        cloister_attestation::Roots::Mock { .. } => Some(
            "warning: this verdict rests on a MOCK root (a test ARK the service chose at genesis), \
             not AMD's: anyone holding that root's keys signs such evidence, so it proves nothing \
             about the hardware or what runs on it",
        ),
    }
}

pub async fn run(command: AttestationCommand) -> anyhow::Result<ExitCode> {
    let (evidence, policy, url, cacert, binding) = match command {
        AttestationCommand::Verify { evidence, policy, url, cacert, binding } => {
            (evidence, policy, url, cacert, binding)
        }
        AttestationCommand::MockRoot { out } => {
            anyhow::ensure!(!out.exists(), "{} exists; a mock root is written once", out.display());
            cloister_attestation::mock::MockRoot::generate().write(&out)?;
            println!("wrote the mock firmware root to {}", out.display());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let text = std::fs::read(&evidence).with_context(|| format!("reading {}", evidence.display()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", evidence.display()))?;
    let json = json.get("evidence").cloned().unwrap_or(json);
    let evidence: Evidence = serde_json::from_value(json).context("the file holds no valid evidence")?;
    let policy: Policy = match (policy, url) {
        (Some(path), _) => {
            let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice(&text).with_context(|| format!("{} is not a valid policy", path.display()))?
        }
        (None, Some(url)) => {
            let cacert = cacert.context("--url needs --cacert")?;
            let ca = std::fs::read(&cacert).with_context(|| format!("reading {}", cacert.display()))?;
            let client = Client::connect(&url, &ca, None).await?;
            let json = client.get("/node/attestation/policy").await?.json().context("the service's policy")?;
            serde_json::from_value(json).context("the service's policy does not decode")?
        }
        (None, None) => anyhow::bail!("give --policy FILE or --url URL"),
    };
    let expected = match binding {
        Some(hex_text) => Some(
            <[u8; 64]>::try_from(hex::decode(hex_text.trim()).context("--binding is not hex")?)
                .map_err(|_| anyhow::anyhow!("--binding must be 64 bytes"))?,
        ),
        None => None,
    };
    match cloister_attestation::verify(&evidence, &policy, expected.as_ref()) {
        Ok(verified) => {
            println!("{}", serde_json::to_string_pretty(&verified)?);
            if expected.is_none() {
                eprintln!("note: the report_data binding was not checked (no --binding given)");
            }
            if let Some(warning) = roots_warning(&policy) {
                eprintln!("{warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(refusal) => {
            eprintln!("refused: {refusal}");
            println!("{}", serde_json::to_string_pretty(&refusal)?);
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A verdict under a mock root, the node's own with `--url`, passed without a word.
    #[test]
    fn a_verdict_under_a_mock_root_says_so() {
        let mut policy = Policy {
            roots: cloister_attestation::Roots::Amd,
            measurements: Default::default(),
            host_data: Default::default(),
            min_tcb: Default::default(),
            azure_pcrs: Default::default(),
        };
        assert_eq!(roots_warning(&policy), None);
        policy.roots = cloister_attestation::Roots::Mock { ark: vec![1, 2, 3] };
        assert!(roots_warning(&policy).unwrap().contains("MOCK root"));
    }
}
