//! `cloister gov` and `cloister app deploy`: sign governance requests with a member's key and
//! send them. The answer (JSON) goes to stdout; the exit code is non-zero unless it is 2xx.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine as _;
use serde_json::{Value, json};

use super::call::Target;
use cloister_client::Client;
use cloister_crypto::cose::GovWrite;
use cloister_crypto::identity::KeyedCert;

#[derive(clap::Subcommand)]
pub(crate) enum GovCommand {
    /// File a proposal: --action NAME, repeated, with no --args or one per --action in order;
    /// or --file proposal.json.
    Propose {
        /// An action's name.
        #[arg(long = "action", conflicts_with = "file")]
        actions: Vec<String>,
        /// JSON arguments: none at all, or one per --action, the n-th for the n-th (`{}` for an
        /// action without arguments).
        #[arg(long = "args")]
        args: Vec<String>,
        /// A proposal document: {"actions": [{"name", "args"}]}.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Vote on an open proposal.
    Vote {
        id: String,
        #[arg(long, conflicts_with = "reject", required_unless_present = "reject")]
        approve: bool,
        #[arg(long)]
        reject: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Withdraw your own open proposal.
    Withdraw {
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Acknowledge your membership, which makes you an Active member.
    Ack {
        #[command(flatten)]
        target: Target,
    },
    /// List the proposals and their states.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show one proposal, with its ballots.
    Show {
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::Subcommand)]
pub(crate) enum AppCommand {
    /// Propose installing FILE.wasm as the service's app (a `set_app` proposal).
    Deploy {
        wasm: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Write an app this binary ships (its wasm) to a file, e.g. for genesis.
    Export {
        #[arg(value_enum)]
        app: crate::sandbox::SandboxApp,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The proposal that `--action`/`--args` pairs describe.
fn actions_of(names: &[String], args: &[String]) -> anyhow::Result<Value> {
    anyhow::ensure!(!names.is_empty(), "name at least one --action, or give --file");
    // The two lists arrive apart, without their places on the command line: with fewer
    // --args than --action, which action each belongs to would be a guess.
    anyhow::ensure!(
        args.is_empty() || args.len() == names.len(),
        "{} --args for {} --action: give none, or one per --action in order (`{{}}` for an action without arguments)",
        args.len(),
        names.len()
    );
    let mut actions = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let args: Value = match args.get(i) {
            Some(text) => serde_json::from_str(text).with_context(|| format!("--args of {name} is not JSON"))?,
            None => json!({}),
        };
        actions.push(json!({ "name": name, "args": args }));
    }
    Ok(json!({ "actions": actions }))
}

async fn signed(target: &Target, write: GovWrite, payload: Value) -> anyhow::Result<ExitCode> {
    let (client, who) = target.connect().await?;
    let who: KeyedCert = who.context("governance requests are signed: give --cert/--key or --as NAME")?;
    let reply = client.gov(&who, &write, &payload).await?;
    show(reply)
}

async fn read(target: &Target, path: &str) -> anyhow::Result<ExitCode> {
    let (client, _): (Client, _) = target.connect().await?;
    show(client.get(path).await?)
}

fn show(reply: cloister_client::Reply) -> anyhow::Result<ExitCode> {
    eprintln!("HTTP {}{}", reply.status, reply.tx_id().map(|t| format!("  tx {t}")).unwrap_or_default());
    println!("{}", reply.text());
    Ok(if (200..300).contains(&reply.status) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub(crate) async fn run_gov(command: GovCommand) -> anyhow::Result<ExitCode> {
    match command {
        GovCommand::Propose { actions, args, file, target } => {
            let proposal = match file {
                Some(path) => serde_json::from_slice(
                    &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                )
                .with_context(|| format!("{} is not JSON", path.display()))?,
                None => actions_of(&actions, &args)?,
            };
            signed(&target, GovWrite::Propose, proposal).await
        }
        GovCommand::Vote { id, approve, reject: _, target } => {
            signed(&target, GovWrite::Vote(id), json!({ "approve": approve })).await
        }
        GovCommand::Withdraw { id, target } => signed(&target, GovWrite::Withdraw(id), json!({})).await,
        GovCommand::Ack { target } => signed(&target, GovWrite::Ack, json!({})).await,
        GovCommand::List { target } => read(&target, "/gov/proposals").await,
        GovCommand::Show { id, target } => read(&target, &format!("/gov/proposals/{id}")).await,
    }
}

pub(crate) async fn run_app(command: AppCommand) -> anyhow::Result<ExitCode> {
    match command {
        AppCommand::Deploy { wasm, target } => {
            let bytes = std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
            let code = base64::engine::general_purpose::STANDARD.encode(&bytes);
            let proposal = json!({ "actions": [{ "name": "set_app", "args": { "wasm": code } }] });
            signed(&target, GovWrite::Propose, proposal).await
        }
        AppCommand::Export { app, out } => {
            std::fs::write(&out, app.wasm()).with_context(|| format!("writing {}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The n-th --args is the n-th --action's; fewer --args than --action (but some) is refused,
    /// since which action each belongs to would be a guess (before, the first actions got them).
    #[test]
    fn args_pair_with_actions_by_position_or_not_at_all() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let both = actions_of(&names(&["a", "b"]), &names(&["{}", r#"{"x":1}"#])).unwrap();
        assert_eq!(both["actions"][1], json!({ "name": "b", "args": { "x": 1 } }));
        let none = actions_of(&names(&["a", "b"]), &[]).unwrap();
        assert_eq!(none["actions"][0]["args"], json!({}));
        let e = actions_of(&names(&["a", "b"]), &names(&[r#"{"x":1}"#])).unwrap_err().to_string();
        assert!(e.contains("1 --args for 2 --action"), "{e}");
        assert!(actions_of(&names(&["a"]), &names(&["{}", "{}"])).is_err());
    }
}
