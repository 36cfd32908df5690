//! The certificate a node serves to clients. Clients pin the service identity, so a node serves
//! its operator-issued certificate only until the service identity has certified its key; then it
//! serves that certificate, renews it at half its validity while it stays endorsed and Trusted,
//! and goes back to the operator-issued one once it is not. A node the service never trusted has
//! nothing a client pinning the service identity accepts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloister_crypto::identity::{self, ENDORSED_TLS_CERT_VALIDITY, KeyedCert};
use cloister_crypto::tls::SwappableCert;
use cloister_store::{Store, gov};

/// How often a node looks at its standing to decide which certificate to serve.
pub(crate) const ENDORSED_CERT_POLL_MS: u64 = 1000;
/// Where a node that serves an endorsed certificate writes the service identity's certificate,
/// in its data folder: what operators and local clients pin.
pub const SERVICE_IDENTITY_FILE: &str = "service_identity.pem";

/// What to serve now: the service identity's certificate and key, if this node is endorsed and
/// Trusted and holds them.
fn endorsement_material(store: &Store, id: &str, cert_sha256: &str) -> anyhow::Result<Option<KeyedCert>> {
    let tx = store.begin()?;
    let endorsed = gov::get::<gov::EndorsementRecord>(&tx, gov::ENDORSEMENTS, id.as_bytes())?
        .is_some_and(|e| e.until.is_none() && e.cert_sha256 == cert_sha256);
    let trusted = gov::node_status(&tx, id)? == Some(gov::NodeStatus::Trusted);
    if !(endorsed && trusted) {
        return Ok(None);
    }
    let cert = gov::service(&tx)?.and_then(|s| s.identity);
    let key = gov::service_identity_key(&tx)?;
    Ok(cert.zip(key).map(|(cert_pem, key_pem)| KeyedCert { cert_pem, key_pem }))
}

/// A node's client-facing certificate, kept in step with its standing.
pub struct EndorsedCert {
    store: Store,
    node: KeyedCert,
    name: String,
    service_ca_pem: String,
    served: Arc<SwappableCert>,
    data_dir: PathBuf,
    id: String,
    cert_sha256: String,
    hosts: Vec<String>,
    /// When the certificate being served was issued by the service identity, if it was.
    issued: Option<Instant>,
}

impl EndorsedCert {
    pub(crate) fn new(
        store: Store,
        node: KeyedCert,
        name: String,
        service_ca_pem: String,
        served: Arc<SwappableCert>,
        data_dir: PathBuf,
    ) -> anyhow::Result<EndorsedCert> {
        let der = identity::cert_der(node.cert_pem.as_bytes())?;
        let id = cloister_crypto::node_id_of(&der).to_string();
        let (cert_sha256, hosts) = (identity::id_of_der(&der), identity::cert_hosts(&der)?);
        Ok(EndorsedCert { store, node, name, service_ca_pem, served, data_dir, id, cert_sha256, hosts, issued: None })
    }

    /// Serves what the node's standing calls for now: a fresh certificate from the service
    /// identity when the current one is past half its validity (or from the operator), the
    /// operator's once the node is no longer endorsed.
    pub(crate) fn refresh(&mut self) -> anyhow::Result<()> {
        match endorsement_material(&self.store, &self.id, &self.cert_sha256)? {
            Some(_) if self.issued.is_some_and(|at| at.elapsed() < ENDORSED_TLS_CERT_VALIDITY / 2) => {}
            Some(service_identity) => {
                let leaf = identity::endorse_tls_cert(&service_identity, &self.node, &self.name, &self.hosts)?;
                // The file first: whoever reads it can pin what the listeners serve next.
                let file = self.data_dir.join(SERVICE_IDENTITY_FILE);
                identity::write_durably(&file, service_identity.cert_pem.as_bytes(), false)?;
                self.served.set(&format!("{leaf}{}", service_identity.cert_pem), &self.node.key_pem)?;
                if self.issued.is_none() {
                    tracing::info!("serving clients a certificate from the service identity");
                }
                self.issued = Some(Instant::now());
            }
            None if self.issued.is_some() => {
                self.served.set(&format!("{}{}", self.node.cert_pem, self.service_ca_pem), &self.node.key_pem)?;
                self.issued = None;
                tracing::warn!("no longer endorsed: serving the operator's certificate, which clients refuse");
            }
            None => {}
        }
        Ok(())
    }

    /// Refreshes every [`ENDORSED_CERT_POLL_MS`] until cancelled.
    pub(crate) async fn run(mut self, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(ENDORSED_CERT_POLL_MS)) => {}
            }
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, "updating the certificate served to clients failed");
            }
        }
    }
}
