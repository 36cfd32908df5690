//! `cloister ca` and `cloister node csr`: the operator's certificate authority, and certificates
//! for node keys the operator never holds.
//!
//! A node in a confidential VM generates its key there (`cloister node csr`) and publishes only a
//! certificate signing request; the operator's CA certifies that key (`cloister ca sign`) for the
//! names the operator chooses, and the certificate goes back to the VM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use cloister_crypto::identity::{self, ServiceCa};

#[derive(Subcommand)]
pub(crate) enum CaCommand {
    /// Create the operator's CA: OUT/NAME.cert.pem (give it to nodes and clients) and
    /// OUT/NAME.key.pem (keep it offline; it signs node certificates).
    Init {
        /// The CA certificate's common name.
        #[arg(long, default_value = "Cloister service CA")]
        subject: String,
        /// File name prefix.
        #[arg(long, default_value = "service")]
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Certify the key of a node's certificate signing request (from `cloister node csr`) for
    /// the given host names and addresses; prints the certificate (PEM) or writes it to --out.
    Sign {
        /// The request (PEM).
        csr: PathBuf,
        /// The node's name, which the request must carry as its common name.
        #[arg(long)]
        name: String,
        /// A DNS name or IP address clients and peers reach the node by (repeat for more).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// The CA's certificate.
        #[arg(long)]
        ca_cert: PathBuf,
        /// The CA's private key.
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub(crate) fn run(command: CaCommand) -> anyhow::Result<ExitCode> {
    match command {
        CaCommand::Init { subject, name, out } => {
            let cert = out.join(format!("{name}.cert.pem"));
            refuse_to_replace(
                &[&cert, &out.join(format!("{name}.key.pem"))],
                "a new CA would not certify the nodes the old one did",
            )?;
            ServiceCa::generate(&subject)?.keyed.write(&out, &name)?;
            println!("wrote {} and {}", cert.display(), out.join(format!("{name}.key.pem")).display());
            Ok(ExitCode::SUCCESS)
        }
        CaCommand::Sign { csr, name, hosts, ca_cert, ca_key, out } => {
            let ca = ServiceCa::load(identity::read_pair(&ca_cert, &ca_key)?)?;
            let request = std::fs::read_to_string(&csr).with_context(|| format!("reading {}", csr.display()))?;
            let cert = ca.sign_node_csr(&request, &name, &hosts).with_context(|| format!("{}", csr.display()))?;
            match out {
                Some(path) => identity::write_durably(&path, cert.as_bytes(), false)?,
                None => print!("{cert}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Refuses to write keys where any of `paths` exists: a key written over would be lost for
/// good (`why` says what it held).
pub(crate) fn refuse_to_replace(paths: &[&Path], why: &str) -> anyhow::Result<()> {
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        anyhow::bail!("{} exists: {why}; remove it first if you mean it", existing.display());
    }
    Ok(())
}

/// `cloister node csr`: the node's key (generated here, unless `key` already holds one, so a
/// rerun asks again for the same key) and a signing request for it.
pub(crate) fn node_csr(name: &str, key: &Path, out: &Path) -> anyhow::Result<ExitCode> {
    let existing = match std::fs::read_to_string(key) {
        Ok(pem) => Some(pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", key.display())),
    };
    let (key_pem, csr_pem) = identity::node_csr(name, existing.as_deref())?;
    if existing.is_none() {
        identity::write_private(key, key_pem.as_bytes())?;
    }
    identity::write_durably(out, csr_pem.as_bytes(), false)?;
    let verb = if existing.is_some() { "kept" } else { "generated" };
    eprintln!("{verb} the node key {} (it stays here); wrote the request {}", key.display(), out.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_key_is_certified_without_leaving_its_folder() {
        let vm = tempfile::tempdir().unwrap();
        let operator = tempfile::tempdir().unwrap();
        run(CaCommand::Init { subject: "ops".into(), name: "service".into(), out: operator.path().into() }).unwrap();
        let err = run(CaCommand::Init { subject: "ops".into(), name: "service".into(), out: operator.path().into() })
            .unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        // A key alone, its certificate gone, is not written over either.
        let ca_cert = operator.path().join("service.cert.pem");
        let ca_cert_pem = std::fs::read(&ca_cert).unwrap();
        std::fs::remove_file(&ca_cert).unwrap();
        let kept = std::fs::read(operator.path().join("service.key.pem")).unwrap();
        let err = run(CaCommand::Init { subject: "ops".into(), name: "service".into(), out: operator.path().into() })
            .unwrap_err();
        assert!(err.to_string().contains("service.key.pem exists"), "{err}");
        assert_eq!(std::fs::read(operator.path().join("service.key.pem")).unwrap(), kept);
        std::fs::write(&ca_cert, ca_cert_pem).unwrap();
        let (key, csr) = (vm.path().join("node.key.pem"), vm.path().join("node.csr.pem"));
        node_csr("vm0", &key, &csr).unwrap();
        let first_key = std::fs::read_to_string(&key).unwrap();
        node_csr("vm0", &key, &csr).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), first_key, "a rerun keeps the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let ca = identity::KeyedCert::read(operator.path(), "service").unwrap();
        let cert = vm.path().join("node.cert.pem");
        run(CaCommand::Sign {
            csr: csr.clone(),
            name: "vm0".into(),
            hosts: vec!["10.0.0.10".into()],
            ca_cert: operator.path().join("service.cert.pem"),
            ca_key: operator.path().join("service.key.pem"),
            out: Some(cert.clone()),
        })
        .unwrap();
        let node = identity::read_pair(&cert, &key).unwrap();
        // The pair the node starts with is usable for TLS under the CA: a server config loads it.
        cloister_crypto::tls::server_config(&node, &ca.cert_pem).expect("a usable pair");
    }
}
