//! The `cloister` command line: run a node, run a local sandbox network, make identities, call
//! app endpoints, govern, and audit.

mod attestation;
mod bench;
mod ca;
mod call;
mod console;
mod gov;
mod ingest;
mod ledger;
pub mod local;
pub mod recovery;
pub mod sandbox;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cloister_crypto::identity;
use cloister_node::Node;
use cloister_node::config::NodeConfig;

#[derive(Parser)]
#[command(name = "cloister", version, about = "Confidential multi-party applications on WebAssembly")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Run a local network: service identity, parties, nodes, and the reconcile app.
    Sandbox(sandbox::Args),
    /// Write a new identity: NAME.key.pem and a self-signed NAME.cert.pem in DIR, and an
    /// encryption key pair for recovery shares, NAME.enc.key.pem and NAME.enc.pub.pem.
    Keygen {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Call an app or node endpoint over HTTPS.
    Call(call::Args),
    Console(console::Args),
    Ingest(ingest::Args),
    /// Measure a running node (by default the sandbox's) over HTTPS.
    Bench(bench::Args),
    /// A recovery member's part in disaster recovery.
    Recovery {
        #[command(subcommand)]
        command: recovery::RecoveryCommand,
    },
    /// Audit a ledger offline.
    Ledger {
        #[command(subcommand)]
        command: ledger::LedgerCommand,
    },
    /// Check a transaction receipt offline.
    Receipt {
        #[command(subcommand)]
        command: ledger::ReceiptCommand,
    },
    /// Govern the service: signed proposals, ballots, withdrawals and acknowledgements.
    Gov {
        #[command(subcommand)]
        command: gov::GovCommand,
    },
    /// Manage the service's app (by proposal).
    App {
        #[command(subcommand)]
        command: gov::AppCommand,
    },
    /// The operator's certificate authority: create it, certify node keys.
    Ca {
        #[command(subcommand)]
        command: ca::CaCommand,
    },
    /// Check attestation evidence offline.
    Attestation {
        #[command(subcommand)]
        command: attestation::AttestationCommand,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start a node from its configuration file; stops cleanly on SIGINT or SIGTERM.
    Start {
        #[arg(long)]
        config: PathBuf,
        /// The kind of evidence this node presents (overrides `attestation.kind`).
        #[arg(long)]
        attestation: Option<cloister_attestation::Kind>,
        /// With mock attestation: the launch measurement to report (hex, 48 bytes), for instance to
        /// rehearse a refusal (overrides `attestation.mock_measurement`).
        #[arg(long)]
        mock_measurement: Option<String>,
    },
    /// Start a new service from a previous service's ledger folder, on a new data folder: it
    /// verifies the ledger, restores its public state, and waits (Recovering) for a threshold of
    /// recovery members to submit their shares (`cloister recovery share --submit`).
    Recover {
        #[arg(long)]
        config: PathBuf,
        /// The previous service's ledger folder (a node's `data/ledger`, whole).
        #[arg(long)]
        ledger: PathBuf,
    },
    /// Compact a stopped node's state database (`state.redb` in its data folder), giving back
    /// the free pages redb keeps for reuse. Refused while the node runs, and for a file whose
    /// page checksums do not verify.
    Compact {
        #[arg(long)]
        config: PathBuf,
    },
    /// Generate this node's key where it runs (or keep the one in --key) and write a certificate
    /// signing request for it, for `cloister ca sign`: the key never leaves this machine.
    Csr {
        /// The node's name: the request's common name.
        #[arg(long)]
        name: String,
        /// The node's private key file (created owner-only if absent).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the request (PEM).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Entry point of the `cloister` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Whatever still runs on the blocking pool (a compilation, a read) does not keep a stopped
    // node's process alive: dropping the runtime would wait for it without end.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    code
}

/// How long the process waits, once its command is done, for work left on tokio's blocking pool.
const RUNTIME_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CLOISTER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node { command: NodeCommand::Recover { config, ledger } } => {
            let mut config = NodeConfig::load(&config)?;
            anyhow::ensure!(
                config.network.join.is_none(),
                "a recovering node starts a new service: its configuration must not name [network] join"
            );
            anyhow::ensure!(
                !cloister_node::holds_state(&config.node.data_dir),
                "{} already holds a node's state: a recovery starts on a new data folder",
                config.node.data_dir.display()
            );
            config.network.recover = Some(std::path::absolute(&ledger)?);
            config.check().map_err(anyhow::Error::msg)?;
            run_node(config).await
        }
        Command::Node { command: NodeCommand::Start { config, attestation, mock_measurement } } => {
            let mut config = NodeConfig::load(&config)?;
            if let Some(kind) = attestation {
                config.attestation.kind = kind;
            }
            if mock_measurement.is_some() {
                config.attestation.mock_measurement = mock_measurement;
            }
            config.check().map_err(anyhow::Error::msg)?;
            run_node(config).await
        }
        Command::Node { command: NodeCommand::Compact { config } } => {
            let config = NodeConfig::load(&config)?;
            let path = cloister_node::state_file(&config.node.data_dir);
            let done = cloister_store::compact(&path)?;
            println!(
                "compacted {}: {} bytes, now {} ({} MB given back)",
                path.display(),
                done.bytes_before,
                done.bytes_after,
                done.bytes_before.saturating_sub(done.bytes_after) / 1_000_000
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Node { command: NodeCommand::Csr { name, key, out } } => ca::node_csr(&name, &key, &out),
        Command::Sandbox(args) => sandbox::run(args).await,
        Command::Keygen { name, out } => {
            let (private, public) = cloister_crypto::envelope::key_files(&out, &name);
            let (cert, key) = (out.join(format!("{name}.cert.pem")), out.join(format!("{name}.key.pem")));
            ca::refuse_to_replace(
                &[&cert, &key, &private, &public],
                "its key signs this identity's requests, or opens its recovery shares",
            )?;
            let id = identity::generate_identity(&name)?;
            id.write(&out, &name)?;
            let (private, public) = cloister_crypto::envelope::write_key_pair(&out, &name)?;
            println!("wrote {0}/{name}.cert.pem and {0}/{name}.key.pem", out.display());
            println!(
                "wrote {} and {}: the encryption key pair for recovery shares (set_member's encryption_key takes the .pub.pem)",
                private.display(),
                public.display()
            );
            println!("id: {}", id.id()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Call(args) => call::run(args).await,
        Command::Console(args) => console::run(args).await,
        Command::Ingest(args) => ingest::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Recovery { command } => recovery::run(command).await,
        Command::Ledger { command } => ledger::run_ledger(command),
        Command::Receipt { command } => ledger::run_receipt(command),
        Command::Gov { command } => gov::run_gov(command).await,
        Command::App { command } => gov::run_app(command).await,
        Command::Ca { command } => ca::run(command),
        Command::Attestation { command } => attestation::run(command).await,
    }
}

/// Runs a node until the process is asked to stop (SIGINT, SIGTERM) or the node fails (a join
/// not accepted in time), then stops it; a failure ends the process with an error.
async fn run_node(config: NodeConfig) -> anyhow::Result<ExitCode> {
    let node = Node::start(config).await?;
    let failed = tokio::select! {
        () = shutdown_signal() => None,
        reason = node.failed() => Some(reason),
    };
    node.shutdown().await;
    match failed {
        None => Ok(ExitCode::SUCCESS),
        Some(reason) => Err(anyhow::anyhow!("the node stopped: {reason}")),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `keygen` in a folder that held the member's keys wrote new ones over them: the member's
    /// signing key and the key that opens its recovery shares were gone for good.
    #[tokio::test]
    async fn keygen_never_writes_over_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap();
        let keygen = || Cli::parse_from(["cloister", "keygen", "--name", "member0", "--out", out]);
        run(keygen()).await.unwrap();
        let written: Vec<_> = ["cert.pem", "key.pem", "enc.key.pem", "enc.pub.pem"]
            .map(|file| dir.path().join(format!("member0.{file}")))
            .into_iter()
            .map(|path| (std::fs::read(&path).unwrap(), path))
            .collect();
        for (_, path) in &written {
            // Any one of the four, alone, is enough to refuse.
            let others: Vec<_> = written.iter().filter(|(_, p)| p != path).map(|(_, p)| p).collect();
            let moved: Vec<_> = others.iter().map(|p| (p.with_extension("away"), *p)).collect();
            for (away, p) in &moved {
                std::fs::rename(p, away).unwrap();
            }
            let err = run(keygen()).await.unwrap_err();
            assert!(err.to_string().contains(&format!("{} exists", path.display())), "{err}");
            for (away, p) in &moved {
                std::fs::rename(away, p).unwrap();
            }
        }
        for (bytes, path) in &written {
            assert_eq!(&std::fs::read(path).unwrap(), bytes, "{} is as it was", path.display());
        }
    }
}
