//! Attested join, both sides.
//!
//! Attestation goes both ways. A joining node sends the leader a nonce (`Challenge`); the leader
//! answers with its own evidence, bound to its certificate's key and that nonce, and a nonce of
//! its own. The joining node verifies the leader's evidence ([`LeaderCheck`]) before it binds the
//! leader's nonce and its TLS public key into its evidence and presents that (`Attest`). The
//! leader verifies it with [`cloister_attestation::verify`] against the governed policy, and
//! records the node in `gov.nodes`: Trusted while the service is Opening, Pending after (a
//! `transition_node_to_trusted` proposal trusts it). Once Trusted, the leader answers with the
//! ledger secret sealed to the node's key, and the node may ask to `Join` Raft.
//!
//! The peer port admits only node certificates of the service CA, and refuses a Retired node's
//! certificate in the TLS handshake itself. On top of that, every Raft, forwarding and join
//! request must come from a node that is Trusted in `gov.nodes`, which also shuts a node out of
//! connections it opened before it was retired.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cloister_attestation::mock::{MockConfig, MockFirmware, MockRoot};
use cloister_attestation::{Evidence, Kind, Nonce, NonceStore, Policy, Refusal, Roots, Tcb, Verified};
use cloister_proto::peer::v1 as pb;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::AttestationSection;
use crate::gov::{self, NodeRecord, NodeStatus};
use cloister_consensus::{JOIN_RETRY_MS, NodeAddr, NodeId, Peers, types};
use cloister_crypto::identity::KeyedCert;
use cloister_store::{KvError, Tx};

/// Authenticated alongside the sealed ledger secret.
pub(crate) const JOIN_SECRET_AAD: &[u8] = b"cloister ledger secret for a joining node";

/// The DER SubjectPublicKeyInfo of a certificate (DER): what evidence binds.
pub(crate) fn spki_of(cert_der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    Ok(cert.public_key().raw.to_vec())
}

/// The mock firmware's test root named by `attestation.mock_root` (generated there if absent).
pub fn mock_root(a: &AttestationSection) -> anyhow::Result<MockRoot> {
    let dir = a.mock_root.as_ref().context("mock attestation needs attestation.mock_root")?;
    MockRoot::read_or_generate(dir)
        .with_context(|| format!("reading the mock firmware's test root in {}", dir.display()))
}

/// Verifies `evidence` with the one verifier where no service policy is at hand: its own launch
/// claims stand in for the allowed host_data, and for the allowed measurements unless
/// `measurements` pins them. The chain to `roots`, the VCEK, the signature, the debug policy and
/// the binding to `expected` are checked as always. A new service's first node checks itself this
/// way, and a joining node checks the leader.
pub(crate) fn verify_claimed(
    evidence: &Evidence,
    roots: &Roots,
    measurements: Option<&BTreeSet<String>>,
    expected: &[u8; 64],
) -> Result<Verified, Refusal> {
    let (measurement, host_data) = cloister_attestation::verify::launch_claims(evidence)?;
    let policy = Policy {
        roots: roots.clone(),
        measurements: measurements.cloned().unwrap_or_else(|| [measurement].into()),
        host_data: [host_data].into(),
        min_tcb: Tcb::default(),
    };
    cloister_attestation::verify(evidence, &policy, Some(expected))
}

/// What a joining node checks of the leader before it presents its own evidence: a certificate
/// issued by the service CA, and evidence bound to that certificate's key and this node's nonce,
/// verified against this node's own roots (AMD's, or the mock root when this node runs the mock
/// firmware itself). The leader's measurement must be in `attestation.join_measurements` when that
/// is set; when it is empty any measurement passes, and is logged.
pub struct LeaderCheck {
    roots: Roots,
    measurements: BTreeSet<String>,
    service_ca: Vec<u8>,
}

impl LeaderCheck {
    pub(crate) fn from_config(a: &AttestationSection, service_ca_pem: &str) -> anyhow::Result<LeaderCheck> {
        let roots = match a.kind {
            Kind::Mock => Roots::Mock { ark: mock_root(a)?.ark_der() },
            Kind::Snp | Kind::AzureVtpm => Roots::Amd,
        };
        let service_ca = cloister_crypto::identity::cert_der(service_ca_pem.as_bytes())?.to_vec();
        let measurements = a.join_measurements.iter().map(|m| m.to_ascii_lowercase()).collect();
        Ok(LeaderCheck { roots, measurements, service_ca })
    }

    /// Verifies the leader's answer to a challenge that carried `nonce`.
    pub fn verify(&self, reply: &pb::ChallengeReply, nonce: &Nonce) -> Result<Verified, String> {
        let (_, ca) = X509Certificate::from_der(&self.service_ca).map_err(|e| format!("the service CA: {e}"))?;
        let (_, cert) = X509Certificate::from_der(&reply.cert)
            .map_err(|e| format!("the leader's certificate does not parse: {e}"))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| "the leader's certificate is not issued by the service CA".to_owned())?;
        let evidence = Evidence::from_json(&reply.evidence).map_err(|e| e.to_string())?;
        let pin = (!self.measurements.is_empty()).then_some(&self.measurements);
        let expected = cloister_attestation::binding(cert.public_key().raw, nonce);
        verify_claimed(&evidence, &self.roots, pin, &expected).map_err(|refusal| match refusal.check {
            // The verifier names the service's allow-list; here the list is this node's own.
            cloister_attestation::Check::Measurement => {
                let (measurement, _) = cloister_attestation::verify::launch_claims(&evidence).unwrap_or_default();
                let detail = format!("measurement {measurement} is not in attestation.join_measurements");
                Refusal::new(refusal.check, detail).to_string()
            }
            _ => refusal.to_string(),
        })
    }
}

/// This node's source of evidence.
pub enum Attester {
    Snp { vcek_file: Option<std::path::PathBuf> },
    AzureVtpm { thim_url: String },
    Mock(Box<MockFirmware>),
}

impl Attester {
    pub(crate) fn from_config(a: &AttestationSection) -> anyhow::Result<Attester> {
        Ok(match a.kind {
            Kind::Snp => Attester::Snp { vcek_file: a.vcek_file.clone() },
            Kind::AzureVtpm => Attester::AzureVtpm { thim_url: a.thim_url.clone() },
            Kind::Mock => {
                let root = mock_root(a)?;
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

/// The policy the service's state says: its pinned roots and the governed allow-lists. None until
/// the genesis transaction that pins the roots has committed: a leader elected moments before has
/// no policy yet, and must not judge evidence by a default one.
pub fn policy(tx: &Tx) -> Result<Option<Policy>, KvError> {
    let Some(roots) = gov::get::<Roots>(tx, gov::ATTESTATION_ROOT, gov::ROOT_KEY)? else {
        return Ok(None);
    };
    let keys = |map: &str| -> Result<std::collections::BTreeSet<String>, KvError> {
        Ok(gov::all::<serde_json::Value>(tx, map)?.into_iter().map(|(k, _)| k).collect())
    };
    let min: Option<gov::Tcb> = gov::get(tx, gov::MIN_TCB, gov::MIN_TCB_KEY)?;
    let min_tcb = min
        .map(|t| Tcb { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode, fmc: Some(t.fmc) })
        .unwrap_or_default();
    Ok(Some(Policy { roots, measurements: keys(gov::MEASUREMENTS)?, host_data: keys(gov::HOST_DATA)?, min_tcb }))
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
    let id = cloister_crypto::node_id_of(cert_der);
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

/// The peer listener's handshake check: a retired node's certificate is refused before any
/// request; every other standing is decided per request (`Service::authorize_peer`), because a
/// joining node must reach `Challenge` and `Attest` before it is Trusted. Fails closed.
pub(crate) fn handshake_gate(tx: &Tx, cert_der: &[u8]) -> Result<(), String> {
    let id = || cloister_crypto::node_id_of(cert_der);
    match standing(tx, cert_der) {
        Ok(Standing::Retired) => Err(format!("node {} is retired", id())),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("reading gov.nodes for node {}: {e}", id())),
    }
}

/// The joining side: attests to the leader at `peer_url` until the node is Trusted, and returns
/// the ledger secret the leader sealed to this node's key. A refused attestation ends the join.
pub async fn join(
    peers: &Peers,
    peer_url: &str,
    me: (NodeId, NodeAddr),
    identity: &KeyedCert,
    attester: &Attester,
    leader: &LeaderCheck,
    timeout: Duration,
) -> anyhow::Result<[u8; 32]> {
    let deadline = tokio::time::Instant::now() + timeout;
    let spki = spki_of(&cloister_crypto::identity::cert_der(identity.cert_pem.as_bytes())?)?;
    let node = types::encode(&me);
    let mut target = peer_url.to_owned();
    let mut logged_pending = false;
    let mut logged_leader = false;
    loop {
        let attempt = async {
            let mut client = peers.client(&target)?;
            let mine = Nonce::random();
            let challenge = client.challenge(pb::ChallengeRequest { nonce: mine.0.to_vec() }).await?.into_inner();
            let theirs = leader.verify(&challenge, &mine).map_err(|e| {
                tonic::Status::failed_precondition(format!("this node refused the leader's evidence: {e}"))
            })?;
            if !logged_leader {
                tracing::info!(measurement = %theirs.measurement, root = %theirs.root, "verified the leader's evidence");
                logged_leader = true;
            }
            let nonce = Nonce::from_slice(&challenge.nonce).map_err(|e| tonic::Status::internal(e.to_string()))?;
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
                let secret =
                    cloister_attestation::seal::open_with(&identity.key_pem, JOIN_SECRET_AAD, &reply.sealed_secret)
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

/// What the leader side keeps: the nonces it issued, the secret it hands to Trusted nodes, and
/// what it needs to attest itself to joining nodes.
pub struct Joins {
    pub nonces: NonceStore,
    secret: [u8; 32],
    attester: Arc<Attester>,
    cert_der: Vec<u8>,
    spki: Vec<u8>,
}

impl Joins {
    pub fn new(
        section: &AttestationSection,
        secret: [u8; 32],
        attester: Arc<Attester>,
        cert_der: Vec<u8>,
    ) -> anyhow::Result<Joins> {
        let spki = spki_of(&cert_der)?;
        Ok(Joins {
            nonces: NonceStore::new(Duration::from_secs(section.nonce_ttl_s)),
            secret,
            attester,
            cert_der,
            spki,
        })
    }

    /// The answer to a joining node's challenge carrying `their_nonce`: a nonce for its evidence,
    /// and this node's evidence bound to this node's key and `their_nonce`.
    pub async fn challenge(&self, their_nonce: &[u8]) -> Result<pb::ChallengeReply, tonic::Status> {
        let theirs = Nonce::from_slice(their_nonce).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let evidence = self
            .attester
            .evidence(cloister_attestation::binding(&self.spki, &theirs))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("collecting the leader's evidence failed: {e:#}")))?;
        Ok(pb::ChallengeReply {
            nonce: self.nonces.issue().0.to_vec(),
            evidence: evidence.to_json(),
            cert: self.cert_der.clone(),
        })
    }

    /// The ledger secret sealed to the public key `spki` (DER).
    pub(crate) fn sealed_secret(&self, spki: &[u8]) -> anyhow::Result<Vec<u8>> {
        cloister_attestation::seal::seal_to(spki, JOIN_SECRET_AAD, &self.secret).map_err(anyhow::Error::msg)
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
        cert: cloister_crypto::identity::pem_of_der(cert_der),
        evidence: serde_json::to_value(evidence).expect("evidence serializes"),
        verified: serde_json::to_value(verified).expect("a verification result serializes"),
    }
}

/// How often the leader looks for Retired nodes still in Raft's membership.
pub(crate) const RETIRE_POLL_MS: u64 = 1000;

/// On the leader, removes Retired nodes from Raft's membership, every `RETIRE_POLL_MS`, until
/// cancelled.
pub(crate) async fn retire_removed(
    store: cloister_store::Store,
    consensus: cloister_consensus::Consensus,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(RETIRE_POLL_MS)) => {}
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

#[cfg(test)]
mod tests {
    use cloister_attestation::mock::default_measurement;

    use super::*;
    use cloister_crypto::identity::ServiceCa;

    /// A leader running the mock firmware, and a joining node's check of it.
    struct Fixture {
        leader: Joins,
        check: LeaderCheck,
        ca: ServiceCa,
    }

    fn fixture(measurements: &[String]) -> Fixture {
        let root = MockRoot::generate();
        let ca = ServiceCa::generate("test service").unwrap();
        let cert = ca.issue_node_cert("leader", &["127.0.0.1".into()]).unwrap();
        let attester = Arc::new(Attester::Mock(Box::new(MockFirmware::new(&root, MockConfig::default()))));
        let cert_der = cloister_crypto::identity::cert_der(cert.cert_pem.as_bytes()).unwrap().to_vec();
        let leader = Joins::new(&AttestationSection::default(), [7; 32], attester, cert_der).unwrap();
        let service_ca = cloister_crypto::identity::cert_der(ca.keyed.cert_pem.as_bytes()).unwrap().to_vec();
        let check = LeaderCheck {
            roots: Roots::Mock { ark: root.ark_der() },
            measurements: measurements.iter().cloned().collect(),
            service_ca,
        };
        Fixture { leader, check, ca }
    }

    fn der_of(keyed: &KeyedCert) -> Vec<u8> {
        cloister_crypto::identity::cert_der(keyed.cert_pem.as_bytes()).unwrap().to_vec()
    }

    #[tokio::test]
    async fn a_joining_node_verifies_the_leader_and_refuses_what_is_not_its_own_challenge() {
        let f = fixture(&[]);
        let mine = Nonce::random();
        let reply = f.leader.challenge(&mine.0).await.unwrap();
        let verified = f.check.verify(&reply, &mine).unwrap();
        assert_eq!((verified.root.as_str(), verified.binding_checked), ("mock", true));
        assert_eq!(verified.measurement, hex::encode(default_measurement()));
        assert_eq!(reply.nonce.len(), 32, "the leader's own nonce for the joining node");

        // The leader's evidence replayed to another challenge.
        let err = f.check.verify(&reply, &Nonce::random()).unwrap_err();
        assert!(err.contains("check `binding`"), "{err}");
        // A genuine leader's evidence relayed with another node's certificate of the same CA.
        let impostor = f.ca.issue_node_cert("impostor", &["127.0.0.1".into()]).unwrap();
        let relayed = pb::ChallengeReply { cert: der_of(&impostor), ..reply.clone() };
        let err = f.check.verify(&relayed, &mine).unwrap_err();
        assert!(err.contains("check `binding`"), "{err}");
        // A certificate from another CA.
        let stranger = ServiceCa::generate("another service").unwrap().issue_node_cert("leader", &[]).unwrap();
        let foreign = pb::ChallengeReply { cert: der_of(&stranger), ..reply.clone() };
        assert_eq!(
            f.check.verify(&foreign, &mine).unwrap_err(),
            "the leader's certificate is not issued by the service CA"
        );
        // Garbage in place of the certificate or the evidence.
        let garbled = pb::ChallengeReply { cert: b"not a certificate".to_vec(), ..reply.clone() };
        assert!(f.check.verify(&garbled, &mine).unwrap_err().contains("does not parse"));
        let garbled = pb::ChallengeReply { evidence: b"{\"kind\":".to_vec(), ..reply.clone() };
        assert!(f.check.verify(&garbled, &mine).unwrap_err().contains("check `format`"));
        // Mock evidence to a node that expects AMD's roots.
        let amd = LeaderCheck { roots: Roots::Amd, ..f.check };
        assert!(amd.verify(&reply, &mine).unwrap_err().contains("check `root`"));
    }

    #[tokio::test]
    async fn pinned_leader_measurements_are_enforced() {
        let other = "ab".repeat(48);
        let f = fixture(std::slice::from_ref(&other));
        let mine = Nonce::random();
        let reply = f.leader.challenge(&mine.0).await.unwrap();
        let err = f.check.verify(&reply, &mine).unwrap_err();
        let expected =
            format!("measurement {} is not in attestation.join_measurements", hex::encode(default_measurement()));
        assert!(err.contains("check `measurement`") && err.contains(&expected), "{err}");

        let f = fixture(&[hex::encode(default_measurement()), other]);
        let reply = f.leader.challenge(&mine.0).await.unwrap();
        assert!(f.check.verify(&reply, &mine).is_ok());
    }

    #[test]
    fn there_is_no_policy_until_genesis_pins_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        assert_eq!(policy(&store.begin().unwrap()).unwrap(), None, "no default roots to judge by");
        let mut ws = cloister_store::WriteSet::default();
        ws.put(gov::ATTESTATION_ROOT, gov::ROOT_KEY, &serde_json::to_vec(&Roots::Amd).unwrap());
        ws.put(gov::MEASUREMENTS, "ab".repeat(48).as_bytes(), b"{}");
        store.apply(&ws).unwrap();
        let policy = policy(&store.begin().unwrap()).unwrap().expect("a policy once the roots are pinned");
        assert_eq!((policy.roots, policy.measurements), (Roots::Amd, ["ab".repeat(48)].into()));
        assert!(policy.host_data.is_empty());
    }

    #[tokio::test]
    async fn the_leader_refuses_a_challenge_without_a_proper_nonce() {
        let f = fixture(&[]);
        for nonce in [&[][..], &[1; 31][..], &[1; 33][..]] {
            let status = f.leader.challenge(nonce).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
    }
}
