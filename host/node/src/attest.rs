//! Attested join, both sides.
//!
//! Attestation goes both ways. A joining node sends the leader a nonce (`Challenge`); the leader
//! answers with its own evidence, bound to its certificate's key and that nonce, and a nonce of
//! its own. The joining node verifies the leader's evidence ([`LeaderCheck`]) before it binds the
//! leader's nonce and its TLS public key into its evidence and presents that (`Attest`). The
//! leader verifies it with [`cloister_attestation::verify`] against the governed policy, and
//! records the node in `gov.nodes`: Trusted while the service is Opening, Pending after (a
//! `transition_node_to_trusted` proposal trusts it). Once Trusted, the leader answers with the
//! ledger secret sealed to the node's key and signed over the join transcript, and the node may
//! ask to `Join` Raft. The joining node requires the TLS server of its join connection, and the
//! signer of the secret, to be the leader whose evidence it verified; until it holds `gov.nodes`
//! it takes Raft messages from that leader alone ([`admit_peer`]).
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
use cloister_attestation::{Evidence, Kind, Nonce, NonceStore, Policy, Refusal, Roots, Tcb, Verified, azure};
use cloister_crypto::secrets::LedgerSecrets;
use cloister_proto::peer::v1 as pb;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::AttestationSection;
use crate::gov::{self, NodeRecord, NodeStatus};
use cloister_consensus::{JOIN_RETRY_MS, NodeAddr, NodeId, PeerRpc, types};
use cloister_crypto::envelope::KeyPair;
use cloister_crypto::identity::KeyedCert;
use cloister_store::{KvError, Tx};

/// Authenticated alongside the sealed ledger secret.
pub(crate) const JOIN_SECRET_AAD: &[u8] = b"cloister ledger secret for a joining node";
/// Domain separation for the leader's signature over a join ([`join_transcript`]).
const JOIN_TRANSCRIPT_CONTEXT: &[u8] = b"cloister join transcript v2\0";
/// Domain separation for what a joining node's evidence binds ([`join_binding`]).
const JOIN_BINDING_CONTEXT: &[u8] = b"cloister joining node keys v1\0";

/// What a joining node's evidence binds, with the leader's nonce: its TLS key and the encryption
/// key it generated in its guest (both DER SubjectPublicKeyInfo, length-prefixed) under a context
/// of their own. The leader seals the ledger secret to the encryption key, which never leaves the
/// guest, so whoever holds the node's TLS key (its operator, say) still cannot open it. A leader's
/// answer to a challenge binds its TLS key alone (`cloister_attestation::binding` over the DER,
/// which starts with a SEQUENCE tag where these bytes start with the context), so evidence one
/// node gave as a leader never passes for a joining node's.
pub(crate) fn join_binding(tls_spki: &[u8], encryption_spki: &[u8], nonce: &Nonce) -> [u8; 64] {
    let mut keys = JOIN_BINDING_CONTEXT.to_vec();
    for part in [tls_spki, encryption_spki] {
        keys.extend_from_slice(&(part.len() as u64).to_be_bytes());
        keys.extend_from_slice(part);
    }
    cloister_attestation::binding(&keys, nonce)
}

/// What the leader signs when it hands a joining node the ledger secret: both nonces, the
/// leader's and the joining node's TLS keys, the joining node's encryption key (each DER
/// SubjectPublicKeyInfo) and the sealed secret, each length-prefixed. A joining node accepts a
/// secret only with the signature of the leader whose evidence it verified, over its own nonce
/// and keys, so a relay (or any other holder of a service-CA certificate) can neither substitute
/// a secret of its own nor pass on one meant for another exchange.
pub(crate) fn join_transcript(
    joiner_nonce: &[u8],
    leader_nonce: &[u8],
    leader_spki: &[u8],
    joiner_spki: &[u8],
    joiner_encryption_spki: &[u8],
    sealed_secret: &[u8],
) -> Vec<u8> {
    let mut out = JOIN_TRANSCRIPT_CONTEXT.to_vec();
    for part in [joiner_nonce, leader_nonce, leader_spki, joiner_spki, joiner_encryption_spki, sealed_secret] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Checks an ECDSA P-384 (r ‖ s) signature by the key of `cert_der` over `message`.
fn check_signed_by(cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| format!("the leader's certificate does not parse: {e}"))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P384_SHA384_FIXED,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(message, signature).map_err(|_| "the signature does not verify under the leader's key".to_owned())
}

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
    // On Azure its own PCRs (those a new service allows first) stand in the same way; whether
    // they are the quote's is still checked.
    let azure_pcrs = match evidence {
        Evidence::AzureVtpm(e) => [azure::pcr_subset(e, &azure::GENESIS_PCRS)].into(),
        _ => Default::default(),
    };
    let policy = Policy {
        roots: roots.clone(),
        measurements: measurements.cloned().unwrap_or_else(|| [measurement].into()),
        host_data: [host_data].into(),
        min_tcb: Tcb::default(),
        azure_pcrs,
    };
    cloister_attestation::verify(evidence, &policy, Some(expected))
}

/// What a joining node checks of the leader before it presents its own evidence: a certificate
/// issued by the service CA, and evidence bound to that certificate's key and this node's nonce,
/// verified against this node's own roots (AMD's, or the mock root when this node runs the mock
/// firmware itself), with a measurement this node accepts ([`LeaderMeasurements`]).
pub struct LeaderCheck {
    roots: Roots,
    measurements: LeaderMeasurements,
    service_ca: Vec<u8>,
    /// The client side of a join connection: mutual TLS with the service CA and this node's
    /// certificate (see [`join_client`]).
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// The launch measurements a joining node accepts from the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderMeasurements {
    /// Those `attestation.join_measurements` names: a node joining a leader that runs other code
    /// (a code update) names the leader's there.
    Listed(BTreeSet<String>),
    /// With none named, this node's own: an operator's certificate in a guest running code of the
    /// operator's choosing under the same roots could otherwise pass for the leader.
    Own(String),
}

impl LeaderCheck {
    /// The check `a` configures. With no `join_measurements`, this node reads its own
    /// measurement from a report of its own.
    pub(crate) async fn from_config(
        a: &AttestationSection,
        service_ca_pem: &str,
        node: &KeyedCert,
        attester: &Attester,
    ) -> anyhow::Result<LeaderCheck> {
        let roots = match a.kind {
            Kind::Mock => Roots::Mock { ark: mock_root(a)?.ark_der() },
            Kind::Snp | Kind::AzureVtpm => Roots::Amd,
        };
        let service_ca = cloister_crypto::identity::cert_der(service_ca_pem.as_bytes())?.to_vec();
        let measurements = if a.join_measurements.is_empty() {
            let own = attester.evidence([0; 64]).await.context("collecting this node's evidence")?;
            let (measurement, _) = cloister_attestation::verify::launch_claims(&own)?;
            tracing::info!(%measurement, "attestation.join_measurements is empty: the leader must run this node's measurement");
            LeaderMeasurements::Own(measurement)
        } else {
            LeaderMeasurements::Listed(a.join_measurements.iter().map(|m| m.to_ascii_lowercase()).collect())
        };
        let tls = cloister_crypto::tls::client_config(service_ca_pem.as_bytes(), Some(node), true)?;
        Ok(LeaderCheck { roots, measurements, service_ca, tls: Some(tls) })
    }

    /// Verifies the leader's answer to a challenge that carried `nonce`.
    pub fn verify(&self, reply: &pb::ChallengeReply, nonce: &Nonce) -> Result<Verified, String> {
        let (_, ca) = X509Certificate::from_der(&self.service_ca).map_err(|e| format!("the service CA: {e}"))?;
        let (_, cert) = X509Certificate::from_der(&reply.cert)
            .map_err(|e| format!("the leader's certificate does not parse: {e}"))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| "the leader's certificate is not issued by the service CA".to_owned())?;
        let evidence = Evidence::from_json(&reply.evidence).map_err(|e| e.to_string())?;
        let pin = match &self.measurements {
            LeaderMeasurements::Listed(listed) => listed.clone(),
            LeaderMeasurements::Own(own) => [own.clone()].into(),
        };
        let expected = cloister_attestation::binding(cert.public_key().raw, nonce);
        verify_claimed(&evidence, &self.roots, Some(&pin), &expected).map_err(|refusal| match refusal.check {
            // The verifier names the service's allow-list; here the list is this node's own.
            cloister_attestation::Check::Measurement => {
                let (measurement, _) = cloister_attestation::verify::launch_claims(&evidence).unwrap_or_default();
                let detail = match &self.measurements {
                    LeaderMeasurements::Listed(_) => {
                        format!("measurement {measurement} is not in attestation.join_measurements")
                    }
                    LeaderMeasurements::Own(own) => format!(
                        "measurement {measurement} is not this node's own ({own}); attestation.join_measurements \
                         names any other a leader may run"
                    ),
                };
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

    /// A key the platform derives for this guest and no other, which the node's at-rest key mixes
    /// in: on SEV-SNP the firmware's `MSG_KEY_REQ` key, bound to the chip, the launch measurement
    /// and the guest policy; the mock firmware's counterpart. None on Azure vTPM, where the
    /// paravisor, not the guest, holds the SNP firmware interface (see the README).
    pub fn platform_key(&self) -> anyhow::Result<Option<[u8; 32]>> {
        match self {
            Attester::Mock(firmware) => Ok(Some(firmware.derived_key())),
            Attester::Snp { .. } => cloister_attestation::snp::derived_key().map(Some).map_err(anyhow::Error::msg),
            Attester::AzureVtpm { .. } => Ok(None),
        }
    }

    /// Evidence whose report_data (or vTPM user data) is `binding`.
    pub async fn evidence(&self, binding: [u8; 64]) -> anyhow::Result<Evidence> {
        match self {
            Attester::Mock(firmware) => Ok(Evidence::Mock(firmware.report(binding))),
            Attester::Snp { vcek_file } => {
                // A firmware request (and perhaps a file read): off the async workers.
                let vcek_file = vcek_file.clone();
                tokio::task::spawn_blocking(move || {
                    let source = match &vcek_file {
                        Some(path) => cloister_attestation::snp::VcekSource::File(path),
                        None => cloister_attestation::snp::VcekSource::ExtendedReport,
                    };
                    cloister_attestation::snp::collect(binding, source)
                })
                .await?
                .map(Evidence::Snp)
                .map_err(anyhow::Error::msg)
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
    let min_tcb = min.as_ref().map(policy_tcb).unwrap_or_default();
    let azure_pcrs = gov::all::<gov::PcrSet>(tx, gov::AZURE_PCRS)?.into_iter().map(|(_, set)| set).collect();
    Ok(Some(Policy {
        roots,
        measurements: keys(gov::MEASUREMENTS)?,
        host_data: keys(gov::HOST_DATA)?,
        min_tcb,
        azure_pcrs,
    }))
}

/// A governed TCB (`gov.attestation.min_tcb`) as the verifier's policy takes it.
fn policy_tcb(t: &gov::Tcb) -> Tcb {
    Tcb { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode, fmc: Some(t.fmc) }
}

/// A reported TCB as governance records it (0 for the FMC level firmware without one omits).
pub(crate) fn governed_tcb(t: &Tcb) -> gov::Tcb {
    gov::Tcb { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode, fmc: t.fmc.unwrap_or(0) }
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
    match gov::node_status(tx, &id.to_string())? {
        Some(status) => Ok(match status {
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

/// Whether a peer with `cert`, of `standing` here, may make a request of kind `rpc`. Attest is
/// open to any certificate of the service CA (the evidence decides); everything else needs a
/// Trusted node. A node that is itself joining (no `gov.nodes` yet) accepts Raft messages only
/// from `join_leader`, the leader whose evidence it verified and whose signature its secret
/// carries: any other certificate of the service CA (a Pending, refused or Retired node's, or
/// one the operator issued to nobody) could otherwise install a forged snapshot on it.
pub(crate) fn admit_peer(
    standing: Standing,
    rpc: PeerRpc,
    cert: &[u8],
    join_leader: Option<&[u8]>,
) -> Result<(), String> {
    // The node id is a hash of the certificate: worked out only for a refusal's message.
    let id = || cloister_crypto::node_id_of(cert);
    match (standing, rpc) {
        (Standing::Retired, _) => Err(format!("node {} is retired; its connections are refused", id())),
        (Standing::Trusted, _) | (_, PeerRpc::Attest) => Ok(()),
        (Standing::NoState, PeerRpc::Raft) if join_leader == Some(cert) => Ok(()),
        (Standing::NoState, PeerRpc::Raft) => Err(format!(
            "this node is joining and accepts Raft messages only from the leader it attested; node {} is not it",
            id()
        )),
        (standing, rpc) => {
            Err(format!("node {} is {standing:?} in gov.nodes; {rpc:?} requests need a Trusted node", id()))
        }
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

/// What a join gives a new node.
pub struct Joined {
    /// Every ledger secret version of the service, oldest first.
    pub secrets: Vec<(u64, [u8; 32])>,
    /// The certificate (DER) of the leader whose evidence this node verified, and who signed the
    /// secret over the join transcript: until this node holds `gov.nodes`, the only node whose
    /// Raft messages it accepts.
    pub leader_cert: Vec<u8>,
}

/// The joining side: attests to the leader at `peer_url` until the node is Trusted, and returns
/// the ledger secret the leader sealed to this node's key and signed over the join transcript. A
/// refused attestation, or a secret that is not the attested leader's, ends the join.
pub async fn join(
    peer_url: &str,
    me: (NodeId, NodeAddr),
    identity: &KeyedCert,
    encryption: &KeyPair,
    attester: &Attester,
    leader: &LeaderCheck,
    timeout: Duration,
) -> anyhow::Result<Joined> {
    let deadline = tokio::time::Instant::now() + timeout;
    let spki = spki_of(&cloister_crypto::identity::cert_der(identity.cert_pem.as_bytes())?)?;
    let node = types::encode(&me);
    let mut target = peer_url.to_owned();
    let mut logged_pending = false;
    let mut logged_leader = false;
    loop {
        let attempt = async {
            let tls = leader.tls.clone().ok_or_else(|| tonic::Status::internal("no TLS client configuration"))?;
            let (mut client, seen) = join_client(&target, tls)?;
            let mine = Nonce::random();
            let challenge = client.challenge(pb::ChallengeRequest { nonce: mine.0.to_vec() }).await?.into_inner();
            let theirs = leader.verify(&challenge, &mine).map_err(|e| {
                tonic::Status::failed_precondition(format!("this node refused the leader's evidence: {e}"))
            })?;
            let relayed = |e: String| tonic::Status::failed_precondition(format!("this node refused the leader: {e}"));
            check_tls_peer(&seen, &challenge.cert).map_err(relayed)?;
            if !logged_leader {
                tracing::info!(measurement = %theirs.measurement, root = %theirs.root, "verified the leader's evidence");
                logged_leader = true;
            }
            let nonce = Nonce::from_slice(&challenge.nonce).map_err(|e| tonic::Status::internal(e.to_string()))?;
            let evidence = attester
                .evidence(join_binding(&spki, &encryption.spki_der, &nonce))
                .await
                .map_err(|e| tonic::Status::failed_precondition(format!("collecting evidence failed: {e:#}")))?;
            let request = pb::AttestRequest {
                node: node.clone(),
                evidence: evidence.to_json(),
                nonce: nonce.0.to_vec(),
                joiner_nonce: mine.0.to_vec(),
                encryption_key: encryption.spki_der.clone(),
            };
            let reply = client.attest(request).await?.into_inner();
            // The channel may have reconnected in between: the answer too must come from the leader.
            check_tls_peer(&seen, &challenge.cert).map_err(relayed)?;
            Ok::<_, tonic::Status>((reply, mine, challenge))
        };
        let status = match attempt.await {
            Ok((reply, mine, challenge)) if reply.status == "Trusted" => {
                return accept_secret(identity, encryption, &mine, challenge, &reply);
            }
            Ok((reply, ..)) => {
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

/// The certificate (DER) the TLS server of a join connection presented, as its connector saw it
/// on the latest (re)connection.
type SeenCert = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// A connection for one join attempt: mutual TLS as on any peer connection (the service CA, this
/// node's certificate, HTTP/2), through a connector that records the server's certificate, so
/// that the joining node can require it to be the one whose evidence it verified. The channel
/// speaks `http://` to tonic because the connector does the TLS itself.
fn join_client(
    peer_url: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(pb::peer_client::PeerClient<tonic::transport::Channel>, SeenCert), tonic::Status> {
    let bad = || tonic::Status::invalid_argument(format!("bad peer URL {peer_url}"));
    let uri: http::Uri = peer_url.parse().map_err(|_| bad())?;
    let host = uri.host().ok_or_else(bad)?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let authority = uri.authority().ok_or_else(bad)?.to_string();
    let seen = SeenCert::default();
    let recorder = seen.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, seen, host) = (tls.clone(), recorder.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
            *seen.lock().expect("seen certificate lock") = cert;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|_| bad())?
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(connector);
    let client = pb::peer_client::PeerClient::new(channel)
        .max_decoding_message_size(cloister_consensus::PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(cloister_consensus::PEER_MESSAGE_BYTES_MAX);
    Ok((client, seen))
}

/// That the TLS server of a join connection is the leader whose evidence came over it: a node
/// that relays another's challenge reply holds a service-CA certificate, just not that one.
fn check_tls_peer(seen: &SeenCert, leader_cert: &[u8]) -> Result<(), String> {
    match seen.lock().expect("seen certificate lock").as_deref() {
        Some(cert) if cert == leader_cert => Ok(()),
        Some(cert) => Err(format!(
            "the TLS server is node {}, not node {} whose evidence it sent: a relay",
            cloister_crypto::node_id_of(cert),
            cloister_crypto::node_id_of(leader_cert)
        )),
        None => Err("no TLS server certificate was seen on the join connection".to_owned()),
    }
}

/// The joining side's last step: the secret in `reply` is accepted only with the signature of
/// the leader whose `challenge` this node verified, over this exchange's transcript (`mine` is the
/// nonce this node sent), and only if it opens with this node's encryption key.
fn accept_secret(
    identity: &KeyedCert,
    encryption: &KeyPair,
    mine: &Nonce,
    challenge: pb::ChallengeReply,
    reply: &pb::AttestReply,
) -> anyhow::Result<Joined> {
    let own_spki = spki_of(&cloister_crypto::identity::cert_der(identity.cert_pem.as_bytes())?)?;
    let leader_spki = spki_of(&challenge.cert)?;
    let transcript =
        join_transcript(&mine.0, &challenge.nonce, &leader_spki, &own_spki, &encryption.spki_der, &reply.sealed_secret);
    check_signed_by(&challenge.cert, &transcript, &reply.transcript_signature).map_err(|e| {
        anyhow::anyhow!("refused the ledger secret: it is not signed by the leader this node attested: {e}")
    })?;
    let secret = cloister_crypto::envelope::open_with(&encryption.private_pem, JOIN_SECRET_AAD, &reply.sealed_secret)
        .map_err(|e| anyhow::anyhow!("the leader's sealed ledger secret: {e}"))?;
    let secrets = cloister_crypto::secrets::decode(&secret)
        .map_err(|e| anyhow::anyhow!("the leader's sealed ledger secrets: {e}"))?;
    Ok(Joined { secrets, leader_cert: challenge.cert })
}

// A joining node asks for a challenge once a retry; faster than that is refused.
const _: () = assert!(cloister_attestation::CHALLENGE_INTERVAL_MS < JOIN_RETRY_MS);

/// Challenges a leader answers at once; one more is refused (Resource Exhausted, which a joining
/// node retries) before a nonce is issued. Each costs the leader a report from its platform (a
/// firmware request on SNP, a TPM quote on Azure): `CHALLENGE_INTERVAL_MS` meters one node
/// certificate, and this bounds them all, however many certificates the service CA issued.
pub const CHALLENGES_INFLIGHT_MAX: usize = 4;

/// What a node keeps for joins. As a leader: the nonces it issued, the secret it hands to
/// Trusted nodes, and what it needs to attest itself and sign the secret. As a joiner: the
/// certificate of the leader it attested.
pub struct Joins {
    pub nonces: NonceStore,
    secrets: Arc<LedgerSecrets>,
    attester: Arc<Attester>,
    cert_der: Vec<u8>,
    spki: Vec<u8>,
    key: ring::signature::EcdsaKeyPair,
    /// This node's join leader, while it may still be joining (see [`Joined::leader_cert`]).
    pub(crate) join_leader: Option<Vec<u8>>,
    /// The nodes whose new encryption key this leader is recording (`record_new_key`): one task
    /// each, however often a Pending node asks meanwhile.
    pub(crate) key_updates: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Challenges being answered: at most [`CHALLENGES_INFLIGHT_MAX`].
    challenges: Arc<tokio::sync::Semaphore>,
}

impl Joins {
    /// The ledger secrets, for the leader's issue of recovery shares and its rekeys.
    pub(crate) fn ledger_secrets(&self) -> &Arc<LedgerSecrets> {
        &self.secrets
    }

    pub fn new(
        section: &AttestationSection,
        secrets: Arc<LedgerSecrets>,
        attester: Arc<Attester>,
        node: &KeyedCert,
        join_leader: Option<Vec<u8>>,
    ) -> anyhow::Result<Joins> {
        let cert_der = cloister_crypto::identity::cert_der(node.cert_pem.as_bytes())?.to_vec();
        let spki = spki_of(&cert_der)?;
        let key = cloister_crypto::identity::signing_key(&node.key_pem, "the node key")?;
        Ok(Joins {
            nonces: NonceStore::new(Duration::from_secs(section.nonce_ttl_s)),
            secrets,
            attester,
            cert_der,
            spki,
            key,
            join_leader,
            key_updates: Default::default(),
            challenges: Arc::new(tokio::sync::Semaphore::new(CHALLENGES_INFLIGHT_MAX)),
        })
    }

    /// The answer to a joining node's challenge carrying `their_nonce`: a nonce for its evidence,
    /// and this node's evidence bound to this node's key and `their_nonce`. The nonce is the
    /// node's (`holder`, its id) alone, and one it asked for within `CHALLENGE_INTERVAL_MS` of
    /// the one before is refused before this node collects evidence: each costs a report. So is
    /// one past [`CHALLENGES_INFLIGHT_MAX`] answered at once, from any nodes.
    pub async fn challenge(&self, holder: NodeId, their_nonce: &[u8]) -> Result<pb::ChallengeReply, tonic::Status> {
        let theirs = Nonce::from_slice(their_nonce).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let answering = self.challenges.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "this node is answering {CHALLENGES_INFLIGHT_MAX} challenges already (CHALLENGES_INFLIGHT_MAX); retry"
            ))
        })?;
        let nonce = self.nonces.issue(holder).map_err(|e| tonic::Status::resource_exhausted(e.to_string()))?;
        // The collection holds the slot until it is done, even if the asker hangs up first: the
        // platform is busy with the report either way.
        let (attester, binding) = (self.attester.clone(), cloister_attestation::binding(&self.spki, &theirs));
        let collection = tokio::spawn(async move {
            let evidence = attester.evidence(binding).await;
            drop(answering);
            evidence
        });
        let evidence = collection
            .await
            .map_err(|e| tonic::Status::internal(format!("collecting the leader's evidence stopped: {e}")))?
            .map_err(|e| tonic::Status::unavailable(format!("collecting the leader's evidence failed: {e:#}")))?;
        Ok(pb::ChallengeReply { nonce: nonce.0.to_vec(), evidence: evidence.to_json(), cert: self.cert_der.clone() })
    }

    /// The ledger secret sealed to the joining node's encryption key `encryption_spki` (DER), and
    /// this node's signature over the join transcript: the joiner's nonce, the nonce it redeemed
    /// (`leader_nonce`), the keys (this node's, the joiner's TLS key `spki` and its encryption
    /// key) and the sealed secret.
    pub(crate) fn grant_secret(
        &self,
        joiner_nonce: &[u8],
        leader_nonce: &[u8],
        spki: &[u8],
        encryption_spki: &[u8],
    ) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let sealed = cloister_crypto::envelope::seal_to(
            encryption_spki,
            JOIN_SECRET_AAD,
            &cloister_crypto::secrets::encode(&self.secrets.all()),
        )
        .map_err(anyhow::Error::msg)?;
        let transcript = join_transcript(joiner_nonce, leader_nonce, &self.spki, spki, encryption_spki, &sealed);
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), &transcript)
            .map_err(|_| anyhow::anyhow!("signing the join transcript failed"))?;
        Ok((sealed, signature.as_ref().to_vec()))
    }
}

/// A node's new encryption key, and the evidence that bound it, for its `gov.nodes` record.
#[derive(Clone)]
pub(crate) struct KeyUpdate {
    pub node: String,
    pub encryption_key: String,
    pub evidence: serde_json::Value,
    pub verified: serde_json::Value,
}

/// How many times, and how often, the leader tries to record a node's new encryption key.
pub(crate) const KEY_UPDATE_ATTEMPTS: u32 = 120;
pub(crate) const KEY_UPDATE_RETRY_MS: u64 = 1_000;

/// The record a verified node gets, unless it has one.
pub fn record(
    name: &str,
    cert_der: &[u8],
    encryption_key_pem: String,
    opening: bool,
    evidence: &Evidence,
    verified: &cloister_attestation::Verified,
) -> NodeRecord {
    NodeRecord {
        name: name.to_owned(),
        status: if opening { NodeStatus::Trusted } else { NodeStatus::Pending },
        cert: cloister_crypto::identity::pem_of_der(cert_der),
        evidence: serde_json::to_value(evidence).expect("evidence serializes"),
        verified: verified_json(verified),
        encryption_key: Some(encryption_key_pem),
    }
}

/// A verification result as a node record keeps it, with when it was made (`verified_at`, Unix
/// seconds by the verifying node's clock).
pub(crate) fn verified_json(verified: &cloister_attestation::Verified) -> serde_json::Value {
    let mut v = serde_json::to_value(verified).expect("a verification result serializes");
    v["verified_at"] = cloister_crypto::cose::unix_now().into();
    v
}

/// How often the leader looks for Retired nodes still in Raft's membership.
pub(crate) const RETIRE_POLL_MS: u64 = 1000;

/// Waits for the next `RETIRE_POLL_MS` tick at which this node leads; false once cancelled.
async fn leader_tick(consensus: &cloister_consensus::Consensus, cancel: &tokio_util::sync::CancellationToken) -> bool {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(RETIRE_POLL_MS)) => {}
        }
        if consensus.is_leader() {
            return true;
        }
    }
}

/// On the leader, keeps the service's endorsements in step with gov.nodes
/// ([`Service::maintain_endorsements`]), every `RETIRE_POLL_MS`, until cancelled. Holds the service
/// weakly, so a node shutting down closes its databases.
pub(crate) async fn maintain_endorsements(
    service: std::sync::Weak<crate::api::service::Service>,
    consensus: cloister_consensus::Consensus,
    cancel: tokio_util::sync::CancellationToken,
) {
    while leader_tick(&consensus, &cancel).await {
        let Some(service) = service.upgrade() else { return };
        match service.maintain_endorsements().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "updated the service's endorsements"),
            Err(e) => tracing::debug!(error = ?e, "updating the endorsements did not commit; retrying"),
        }
        match service.rotate_ledger_secret().await {
            Ok(None) => {}
            Ok(Some(version)) => tracing::info!(version, "rekeyed the ledger: a new ledger secret version"),
            Err(e) => tracing::warn!(error = ?e, "rekeying the ledger did not commit; retrying"),
        }
        match service.maintain_recovery_shares().await {
            Ok(None) => {}
            Ok(Some(version)) => tracing::info!(version, "issued recovery shares"),
            Err(e) => tracing::warn!(error = ?e, "issuing recovery shares did not commit; retrying"),
        }
    }
}

/// On the leader of a Recovering service, restores the previous ledger's public state, then its
/// private state once a threshold of recovery shares is in (`Service::restore_previous_state`),
/// until cancelled. A recovering node restarted part-way resumes here.
pub(crate) async fn restore_recovered(
    service: std::sync::Weak<crate::api::service::Service>,
    consensus: cloister_consensus::Consensus,
    data_dir: std::path::PathBuf,
    cancel: tokio_util::sync::CancellationToken,
) {
    while leader_tick(&consensus, &cancel).await {
        let Some(service) = service.upgrade() else { return };
        if let Err(e) = service.restore_previous_state(&data_dir).await {
            tracing::warn!(error = ?e, "restoring the previous service's state failed; retrying");
        }
    }
}

/// On the leader, removes Retired nodes from Raft's membership, every `RETIRE_POLL_MS`, until
/// cancelled.
pub(crate) async fn retire_removed(
    store: cloister_store::Store,
    consensus: cloister_consensus::Consensus,
    cancel: tokio_util::sync::CancellationToken,
) {
    while leader_tick(&consensus, &cancel).await {
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

    /// The id of the joining node the tests challenge for.
    const JOINER: NodeId = 7;

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
        let leader =
            Joins::new(&AttestationSection::default(), Arc::new(LedgerSecrets::first([7; 32])), attester, &cert, None)
                .unwrap();
        let service_ca = cloister_crypto::identity::cert_der(ca.keyed.cert_pem.as_bytes()).unwrap().to_vec();
        let measurements = match measurements {
            [] => LeaderMeasurements::Own(hex::encode(default_measurement())),
            listed => LeaderMeasurements::Listed(listed.iter().cloned().collect()),
        };
        let check = LeaderCheck { roots: Roots::Mock { ark: root.ark_der() }, measurements, service_ca, tls: None };
        Fixture { leader, check, ca }
    }

    fn der_of(keyed: &KeyedCert) -> Vec<u8> {
        cloister_crypto::identity::cert_der(keyed.cert_pem.as_bytes()).unwrap().to_vec()
    }

    #[tokio::test]
    async fn a_joining_node_verifies_the_leader_and_refuses_what_is_not_its_own_challenge() {
        let f = fixture(&[]);
        let mine = Nonce::random();
        let reply = f.leader.challenge(JOINER, &mine.0).await.unwrap();
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

    /// Why a secret was refused. (`Joined` holds a secret, so it has no `Debug` to unwrap with.)
    fn refusal(result: anyhow::Result<Joined>) -> String {
        match result {
            Ok(_) => panic!("the secret was accepted"),
            Err(e) => e.to_string(),
        }
    }

    /// The secret a genuine leader grants in one exchange (asked for as node `holder`), as the
    /// joining node receives it.
    async fn genuine_exchange(
        f: &Fixture,
        holder: NodeId,
        joiner: &KeyedCert,
        encryption: &KeyPair,
    ) -> (Nonce, pb::ChallengeReply, pb::AttestReply) {
        let mine = Nonce::random();
        let challenge = f.leader.challenge(holder, &mine.0).await.unwrap();
        f.check.verify(&challenge, &mine).unwrap();
        let spki = spki_of(&der_of(joiner)).unwrap();
        let (sealed_secret, transcript_signature) =
            f.leader.grant_secret(&mine.0, &challenge.nonce, &spki, &encryption.spki_der).unwrap();
        let reply = pb::AttestReply { status: "Trusted".into(), sealed_secret, transcript_signature };
        (mine, challenge, reply)
    }

    /// The attack: a relay between a joining node and the genuine leader (any holder of a
    /// service-CA certificate can be one) forwards the leader's challenge reply, which verifies,
    /// then answers the joining node's Attest with a ledger secret of its own, sealed to the
    /// joining node's public key. Before the leader signed the transcript the joiner accepted
    /// it, and with it whatever state the relay then replicated.
    #[tokio::test]
    async fn a_joining_node_accepts_only_a_secret_the_attested_leader_signed_for_this_exchange() {
        let f = fixture(&[]);
        let joiner = f.ca.issue_node_cert("joiner", &["127.0.0.1".into()]).unwrap();
        let encryption = KeyPair::generate().unwrap();
        let (mine, challenge, reply) = genuine_exchange(&f, JOINER, &joiner, &encryption).await;
        let joined =
            accept_secret(&joiner, &encryption, &mine, challenge.clone(), &reply).expect("the genuine exchange");
        assert_eq!((joined.secrets, joined.leader_cert.clone()), (vec![(1, [7; 32])], challenge.cert.clone()));
        // The grant is sealed to the encryption key alone: the TLS key, which the operator may
        // hold, does not open it.
        assert!(cloister_crypto::envelope::open_with(&joiner.key_pem, JOIN_SECRET_AAD, &reply.sealed_secret).is_err());

        let spki = spki_of(&der_of(&joiner)).unwrap();
        let relays_secret =
            cloister_crypto::envelope::seal_to(&encryption.spki_der, JOIN_SECRET_AAD, &[0x66; 32]).unwrap();
        let refusals = [
            // The relay's own secret, under the leader's signature of another.
            pb::AttestReply { sealed_secret: relays_secret.clone(), ..reply.clone() },
            // The relay's secret, signed by the relay's own (service-CA) key.
            {
                let relay = f.ca.issue_node_cert("relay", &["127.0.0.1".into()]).unwrap();
                let attester =
                    Arc::new(Attester::Mock(Box::new(MockFirmware::new(&MockRoot::generate(), MockConfig::default()))));
                let relay = Joins::new(
                    &AttestationSection::default(),
                    Arc::new(LedgerSecrets::first([0x66; 32])),
                    attester,
                    &relay,
                    None,
                )
                .unwrap();
                let (sealed_secret, transcript_signature) =
                    relay.grant_secret(&mine.0, &challenge.nonce, &spki, &encryption.spki_der).unwrap();
                pb::AttestReply { status: "Trusted".into(), sealed_secret, transcript_signature }
            },
            // No signature at all, as a leader sent before.
            pb::AttestReply { transcript_signature: Vec::new(), ..reply.clone() },
        ];
        for forged in refusals {
            let err = refusal(accept_secret(&joiner, &encryption, &mine, challenge.clone(), &forged));
            assert!(err.contains("not signed by the leader this node attested"), "{err}");
        }
        // A genuine grant from another exchange (another joiner nonce), replayed.
        tokio::time::sleep(Duration::from_millis(cloister_attestation::CHALLENGE_INTERVAL_MS)).await;
        let (_, other_challenge, other_reply) = genuine_exchange(&f, JOINER, &joiner, &encryption).await;
        let err = refusal(accept_secret(&joiner, &encryption, &mine, other_challenge, &other_reply));
        assert!(err.contains("not signed by the leader this node attested"), "{err}");
    }

    /// The attack's other half: a relay forwards a genuine leader's challenge reply over a TLS
    /// connection of its own (any service-CA certificate will do for TLS). The join connection
    /// records the certificate the server presented, and the joining node requires it to be
    /// the one whose evidence came back.
    #[tokio::test]
    async fn a_join_connection_names_the_tls_server_and_a_relay_is_refused() {
        let ca = ServiceCa::generate("test service").unwrap();
        let relay = ca.issue_node_cert("relay", &["127.0.0.1".into()]).unwrap();
        let leader = ca.issue_node_cert("leader", &["127.0.0.1".into()]).unwrap();
        let joiner = ca.issue_node_cert("joiner", &["127.0.0.1".into()]).unwrap();
        let server = cloister_crypto::tls::server_config(&relay, &ca.keyed.cert_pem).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Completes each TLS handshake, then hangs up: the gRPC call fails after it.
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tokio_rustls::TlsAcceptor::from(server.clone()).accept(tcp).await;
            }
        });
        let tls = cloister_crypto::tls::client_config(ca.keyed.cert_pem.as_bytes(), Some(&joiner), true).unwrap();
        let (mut client, seen) = join_client(&format!("https://{addr}"), tls).unwrap();
        assert!(check_tls_peer(&seen, &der_of(&leader)).unwrap_err().contains("no TLS server"));
        client.challenge(pb::ChallengeRequest { nonce: vec![0; 32] }).await.expect_err("the server hangs up");
        check_tls_peer(&seen, &der_of(&relay)).expect("the certificate the server presented");
        let err = check_tls_peer(&seen, &der_of(&leader)).unwrap_err();
        assert!(
            err.contains("a relay") && err.contains(&cloister_crypto::node_id_of(&der_of(&relay)).to_string()),
            "{err}"
        );
    }

    /// The attack: a node with no state yet (it holds the secret, not yet `gov.nodes`) took Raft
    /// messages, InstallSnapshot included, from any certificate of the service CA.
    #[test]
    fn a_joining_node_takes_raft_messages_from_its_attested_leader_alone() {
        let ca = ServiceCa::generate("test service").unwrap();
        let leader = der_of(&ca.issue_node_cert("leader", &[]).unwrap());
        let stranger = der_of(&ca.issue_node_cert("never trusted", &[]).unwrap());
        admit_peer(Standing::NoState, PeerRpc::Raft, &leader, Some(&leader)).expect("the attested leader");
        for pinned in [Some(leader.as_slice()), None] {
            let err = admit_peer(Standing::NoState, PeerRpc::Raft, &stranger, pinned).unwrap_err();
            assert!(err.contains("only from the leader it attested"), "{err}");
        }
        for rpc in [PeerRpc::Forward, PeerRpc::Join] {
            assert!(admit_peer(Standing::NoState, rpc, &leader, Some(&leader)).is_err(), "{rpc:?}");
        }
        // Once it holds gov.nodes, standing decides, and its join leader has no special rights.
        assert!(admit_peer(Standing::Unknown, PeerRpc::Raft, &leader, Some(&leader)).is_err());
        assert!(admit_peer(Standing::Pending, PeerRpc::Raft, &stranger, Some(&leader)).is_err());
        assert!(admit_peer(Standing::Retired, PeerRpc::Attest, &stranger, None).unwrap_err().contains("retired"));
        admit_peer(Standing::Trusted, PeerRpc::Raft, &stranger, Some(&leader)).expect("a Trusted node");
        admit_peer(Standing::Unknown, PeerRpc::Attest, &stranger, None).expect("evidence decides");
    }

    #[tokio::test]
    async fn pinned_leader_measurements_are_enforced() {
        let other = "ab".repeat(48);
        let f = fixture(std::slice::from_ref(&other));
        let mine = Nonce::random();
        let reply = f.leader.challenge(JOINER, &mine.0).await.unwrap();
        let err = f.check.verify(&reply, &mine).unwrap_err();
        let expected =
            format!("measurement {} is not in attestation.join_measurements", hex::encode(default_measurement()));
        assert!(err.contains("check `measurement`") && err.contains(&expected), "{err}");

        let f = fixture(&[hex::encode(default_measurement()), other]);
        let reply = f.leader.challenge(JOINER, &mine.0).await.unwrap();
        assert!(f.check.verify(&reply, &mine).is_ok());
    }

    #[tokio::test]
    async fn with_none_pinned_a_joining_node_accepts_only_a_leader_of_its_own_measurement() {
        let f = fixture(&[hex::encode(default_measurement())]);
        let dir = tempfile::tempdir().unwrap();
        let node = f.ca.issue_node_cert("joiner", &["127.0.0.1".into()]).unwrap();
        let check = async |mock_measurement: Option<String>| {
            let section = AttestationSection {
                kind: Kind::Mock,
                mock_root: Some(dir.path().to_owned()),
                mock_measurement,
                ..Default::default()
            };
            let attester = Attester::from_config(&section).unwrap();
            let check = LeaderCheck::from_config(&section, &f.ca.keyed.cert_pem, &node, &attester).await.unwrap();
            // The leader's evidence is under the fixture's mock root, not this node's.
            LeaderCheck { roots: f.check.roots.clone(), ..check }
        };
        let mine = Nonce::random();
        let reply = f.leader.challenge(JOINER, &mine.0).await.unwrap();

        let other = check(Some("ab".repeat(48))).await;
        assert_eq!(other.measurements, LeaderMeasurements::Own("ab".repeat(48)));
        let err = other.verify(&reply, &mine).unwrap_err();
        assert!(err.contains("check `measurement`") && err.contains("is not this node's own"), "{err}");

        let same = check(None).await;
        assert_eq!(same.measurements, LeaderMeasurements::Own(hex::encode(default_measurement())));
        same.verify(&reply, &mine).expect("a leader of this node's own measurement");
    }

    #[test]
    fn there_is_no_policy_until_genesis_pins_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let store = cloister_store::Store::open(&dir.path().join("state.redb")).unwrap();
        assert_eq!(policy(&store.begin().unwrap()).unwrap(), None, "no default roots to judge by");
        let mut ws = cloister_store::WriteSet::default();
        ws.put(gov::ATTESTATION_ROOT, gov::ROOT_KEY, &serde_json::to_vec(&Roots::Amd).unwrap());
        ws.put(gov::MEASUREMENTS, "ab".repeat(48).as_bytes(), b"{}");
        let pcrs: gov::PcrSet = [(7, "cd".repeat(32))].into();
        ws.put(gov::AZURE_PCRS, gov::pcr_set_key(&pcrs).as_bytes(), &serde_json::to_vec(&pcrs).unwrap());
        store.apply(&ws).unwrap();
        let policy = policy(&store.begin().unwrap()).unwrap().expect("a policy once the roots are pinned");
        assert_eq!((policy.roots, policy.measurements), (Roots::Amd, ["ab".repeat(48)].into()));
        assert!(policy.host_data.is_empty());
        assert_eq!(policy.azure_pcrs, [pcrs].into(), "the governed PCR sets");
        // What the constitution may write there is checked as the node reads it.
        assert!(crate::gov::check_record(gov::AZURE_PCRS, br#"{"7":"cdcd"}"#).unwrap_err().contains("PCR 7"));
        assert!(crate::gov::check_record(gov::AZURE_PCRS, br#"{"99":""}"#).is_err());
    }

    #[tokio::test]
    async fn a_node_asking_for_challenges_in_a_loop_gets_one_per_interval() {
        let f = fixture(&[]);
        let mine = Nonce::random();
        f.leader.challenge(JOINER, &mine.0).await.unwrap();
        let status = f.leader.challenge(JOINER, &mine.0).await.unwrap_err();
        // Not one of the codes that end a join: the joining node retries, after JOIN_RETRY_MS.
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("at most one per"), "{status:?}");
        f.leader.challenge(JOINER + 1, &mine.0).await.expect("another node is not held back");
        tokio::time::sleep(Duration::from_millis(cloister_attestation::CHALLENGE_INTERVAL_MS)).await;
        f.leader.challenge(JOINER, &mine.0).await.expect("the node may ask again after the interval");
    }

    /// Each node certificate is metered by the interval, but the service CA can issue any number:
    /// whoever holds many asked for reports from all of them at once. Past
    /// `CHALLENGES_INFLIGHT_MAX` being answered, any node is refused before it is issued a nonce
    /// (so the refusal does not count against its interval) and retries.
    #[tokio::test]
    async fn the_leader_answers_only_so_many_challenges_at_once() {
        let f = fixture(&[]);
        let mine = Nonce::random();
        let answering = f.leader.challenges.try_acquire_many(CHALLENGES_INFLIGHT_MAX as u32).unwrap();
        for holder in JOINER..JOINER + 3 {
            let status = f.leader.challenge(holder, &mine.0).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("CHALLENGES_INFLIGHT_MAX"), "{status:?}");
        }
        drop(answering);
        f.leader.challenge(JOINER, &mine.0).await.expect("answered once a slot is free, at once");
    }

    #[tokio::test]
    async fn the_leader_refuses_a_challenge_without_a_proper_nonce() {
        let f = fixture(&[]);
        for nonce in [&[][..], &[1; 31][..], &[1; 33][..]] {
            let status = f.leader.challenge(JOINER, nonce).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
    }
}
