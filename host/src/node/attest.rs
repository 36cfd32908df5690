//! Attested join, both sides.
//!
//! A joining node asks the leader for a nonce (`Challenge`), binds it and its TLS public key into
//! its evidence, and presents the evidence (`Attest`). The leader verifies it with
//! [`cloister_attestation::verify`] against the governed policy, and records the node in
//! `gov.nodes`: Trusted while the service is Opening, Pending after (a
//! `transition_node_to_trusted` proposal trusts it). Once Trusted, the leader answers with the
//! ledger secret sealed to the node's key, and the node may ask to `Join` Raft.
//!
//! The peer port admits only node certificates of the service CA; on top of that, every Raft,
//! forwarding and join request must come from a node that is Trusted in `gov.nodes`. A Retired
//! node is refused everything.

use std::time::Duration;

use anyhow::Context;
use cloister_attestation::mock::{MockConfig, MockFirmware, MockRoot};
use cloister_attestation::{Evidence, Kind, Nonce, NonceStore, Policy, Roots, Tcb};
use cloister_proto::peer::v1 as pb;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::AttestationSection;
use crate::consensus::{JOIN_RETRY_MS, NodeAddr, NodeId, Peers, types};
use crate::gov::{self, NodeRecord, NodeStatus};
use crate::kv::{KvError, Tx};

/// Authenticated alongside the sealed ledger secret.
pub const SECRET_AAD: &[u8] = b"cloister ledger secret for a joining node";

/// The DER SubjectPublicKeyInfo of a certificate (DER): what evidence binds.
pub fn spki_of(cert_der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    Ok(cert.public_key().raw.to_vec())
}

/// This node's source of evidence.
pub enum Attester {
    Snp { vcek_file: Option<std::path::PathBuf> },
    AzureVtpm { thim_url: String },
    Mock(Box<MockFirmware>),
}

impl Attester {
    pub fn from_config(a: &AttestationSection) -> anyhow::Result<Attester> {
        Ok(match a.kind {
            Kind::Snp => Attester::Snp { vcek_file: a.vcek_file.clone() },
            Kind::AzureVtpm => Attester::AzureVtpm { thim_url: a.thim_url.clone() },
            Kind::Mock => {
                let dir = a.mock_root.as_ref().context("attestation.kind = \"mock\" needs attestation.mock_root")?;
                let root = MockRoot::read_or_generate(dir)
                    .with_context(|| format!("reading the mock firmware's test root in {}", dir.display()))?;
                let mut config = MockConfig::default();
                if let Some(m) = &a.mock_measurement {
                    config.measurement = hex::decode(m)?.try_into().map_err(|_| anyhow::anyhow!("48 bytes"))?;
                }
                if let Some(h) = &a.mock_host_data {
                    config.host_data = hex::decode(h)?.try_into().map_err(|_| anyhow::anyhow!("32 bytes"))?;
                }
                Attester::Mock(Box::new(MockFirmware::new(&root, config)))
            }
        })
    }

    /// Evidence whose report_data (or vTPM user data) is `binding`.
    pub async fn evidence(&self, binding: [u8; 64]) -> anyhow::Result<Evidence> {
        match self {
            Attester::Mock(firmware) => Ok(Evidence::Mock(firmware.report(binding))),
            Attester::Snp { vcek_file } => {
                let source = match vcek_file {
                    Some(path) => cloister_attestation::snp::VcekSource::File(path),
                    None => cloister_attestation::snp::VcekSource::ExtendedReport,
                };
                cloister_attestation::snp::collect(binding, source).map(Evidence::Snp).map_err(anyhow::Error::msg)
            }
            #[cfg(feature = "azure")]
            Attester::AzureVtpm { thim_url } => {
                let timeout = Duration::from_millis(cloister_attestation::thim::THIM_TIMEOUT_MS);
                cloister_attestation::azure::collect_from_thim(&binding, thim_url, timeout)
                    .await
                    .map(Evidence::AzureVtpm)
                    .map_err(anyhow::Error::msg)
            }
            #[cfg(not(feature = "azure"))]
            Attester::AzureVtpm { .. } => {
                anyhow::bail!("this build has no Azure vTPM support: build with `--features azure` (needs libtss2-dev)")
            }
        }
    }
}

/// The policy the service's state says: its pinned roots and the governed allow-lists.
pub fn policy(tx: &Tx) -> Result<Policy, KvError> {
    let roots: Roots = gov::get(tx, gov::ATTESTATION_ROOT, gov::ROOT_KEY)?.unwrap_or(Roots::Amd);
    let keys = |map: &str| -> Result<std::collections::BTreeSet<String>, KvError> {
        Ok(gov::all::<serde_json::Value>(tx, map)?.into_iter().map(|(k, _)| k).collect())
    };
    let min: Option<gov::Tcb> = gov::get(tx, gov::MIN_TCB, gov::MIN_TCB_KEY)?;
    let min_tcb = min
        .map(|t| Tcb { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode, fmc: Some(t.fmc) })
        .unwrap_or_default();
    Ok(Policy { roots, measurements: keys(gov::MEASUREMENTS)?, host_data: keys(gov::HOST_DATA)?, min_tcb })
}

/// A node's standing, by the certificate it connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Trusted,
    Pending,
    Retired,
    /// Not in `gov.nodes`.
    Unknown,
    /// This node's state has no nodes at all yet: it is itself joining.
    NoState,
}

pub fn standing(tx: &Tx, cert_der: &[u8]) -> Result<Standing, KvError> {
    let id = crate::consensus::node_id_of(cert_der);
    match gov::node(tx, &id.to_string())? {
        Some(n) => Ok(match n.status {
            NodeStatus::Trusted => Standing::Trusted,
            NodeStatus::Pending => Standing::Pending,
            NodeStatus::Retired => Standing::Retired,
        }),
        None if tx.first_in(gov::NODES, std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)?.is_none() => {
            Ok(Standing::NoState)
        }
        None => Ok(Standing::Unknown),
    }
}

/// The joining side: attests to the leader at `peer_url` until the node is Trusted, and returns
/// the ledger secret the leader sealed to this node's key. A refused attestation ends the join.
pub async fn join(
    peers: &Peers,
    peer_url: &str,
    me: (NodeId, NodeAddr),
    cert_pem: &str,
    key_pem: &str,
    attester: &Attester,
    timeout: Duration,
) -> anyhow::Result<[u8; 32]> {
    let deadline = tokio::time::Instant::now() + timeout;
    let spki = spki_of(&crate::node::identity::cert_der(cert_pem.as_bytes())?)?;
    let node = types::encode(&me);
    let mut target = peer_url.to_owned();
    let mut logged_pending = false;
    loop {
        let attempt = async {
            let mut client = peers.client(&target)?;
            let nonce = client.challenge(pb::Blob::default()).await?.into_inner().data;
            let nonce = Nonce::from_slice(&nonce).map_err(|e| tonic::Status::internal(e.to_string()))?;
            let evidence = attester
                .evidence(cloister_attestation::binding(&spki, &nonce))
                .await
                .map_err(|e| tonic::Status::failed_precondition(format!("collecting evidence failed: {e:#}")))?;
            let request =
                pb::AttestRequest { node: node.clone(), evidence: evidence.to_json(), nonce: nonce.0.to_vec() };
            client.attest(request).await.map(|r| r.into_inner())
        };
        let status = match attempt.await {
            Ok(reply) if reply.status == "Trusted" => {
                let secret = cloister_attestation::seal::open_with(key_pem, SECRET_AAD, &reply.sealed_secret)
                    .map_err(|e| anyhow::anyhow!("the leader's sealed ledger secret: {e}"))?;
                return <[u8; 32]>::try_from(secret)
                    .map_err(|_| anyhow::anyhow!("the ledger secret has the wrong length"));
            }
            Ok(reply) => {
                if !logged_pending {
                    tracing::info!(status = %reply.status, "attested; waiting for a transition_node_to_trusted proposal");
                    logged_pending = true;
                }
                None
            }
            Err(status) => Some(status),
        };
        if let Some(status) = status {
            match status.code() {
                // The evidence was refused, or this node is retired: retrying cannot help.
                tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                    anyhow::bail!("joining the network at {peer_url} was refused: {}", status.message());
                }
                _ => {}
            }
            if let Some(leader) = status.metadata().get("x-cloister-leader").and_then(|v| v.to_str().ok())
                && !leader.is_empty()
            {
                target = leader.to_owned();
            }
            tracing::info!(target = %target, reason = status.message(), "attestation not accepted yet; retrying");
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("joining the network at {peer_url} did not complete within {} ms", timeout.as_millis());
        }
        tokio::time::sleep(Duration::from_millis(JOIN_RETRY_MS)).await;
    }
}

/// What the leader side keeps: the nonces it issued and the secret it hands to Trusted nodes.
pub struct Joins {
    pub nonces: NonceStore,
    secret: [u8; 32],
}

impl Joins {
    pub fn new(section: &AttestationSection, secret: [u8; 32]) -> Joins {
        Joins { nonces: NonceStore::new(Duration::from_secs(section.nonce_ttl_s)), secret }
    }

    /// The ledger secret sealed to the public key `spki` (DER).
    pub fn sealed_secret(&self, spki: &[u8]) -> anyhow::Result<Vec<u8>> {
        cloister_attestation::seal::seal_to(spki, SECRET_AAD, &self.secret).map_err(anyhow::Error::msg)
    }
}

/// The record a verified node gets, unless it has one.
pub fn record(
    name: &str,
    cert_der: &[u8],
    opening: bool,
    evidence: &Evidence,
    verified: &cloister_attestation::Verified,
) -> NodeRecord {
    NodeRecord {
        name: name.to_owned(),
        status: if opening { NodeStatus::Trusted } else { NodeStatus::Pending },
        cert: crate::node::identity::pem_of_der(cert_der),
        evidence: serde_json::to_value(evidence).expect("evidence serializes"),
        verified: serde_json::to_value(verified).expect("a verification result serializes"),
    }
}

/// On the leader, removes Retired nodes from Raft's membership, once a second, until cancelled.
pub async fn retire_removed(
    store: crate::kv::Store,
    consensus: crate::consensus::Consensus,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !consensus.is_leader() {
            continue;
        }
        let retired: Vec<NodeId> = match store.begin().and_then(|tx| gov::all::<NodeRecord>(&tx, gov::NODES)) {
            Ok(nodes) => nodes
                .into_iter()
                .filter(|(_, n)| n.status == NodeStatus::Retired)
                .filter_map(|(id, _)| id.parse().ok())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading gov.nodes failed");
                continue;
            }
        };
        let members: Vec<NodeId> = consensus.network().nodes.iter().filter_map(|n| n.id.parse().ok()).collect();
        for id in retired.into_iter().filter(|id| members.contains(id)) {
            tracing::info!(node = id, "removing a retired node from the network");
            if let Err(e) = consensus.remove(id).await {
                tracing::warn!(node = id, error = %e, "removing a retired node failed; retrying");
            }
        }
    }
}
