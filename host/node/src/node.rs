//! The node's lifecycle: open its state and log, start or join the network, start the
//! listeners, and stop cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{NodeInfo, Service, ServiceForwarder, ServiceParts, rest, server};
use crate::attest::{self, Attester};
use crate::config::NodeConfig;
use crate::gov;
use base64::Engine as _;
use cloister_consensus::{self as consensus, Consensus, NodeAddr, Peers};
use cloister_crypto::envelope::KeyPair;
use cloister_crypto::identity;
use cloister_crypto::seal::{self, Purpose, Sealer};
use cloister_crypto::secrets::{self, LedgerSecrets, Rekeyed};
use cloister_crypto::tls;
use cloister_ledger::entry::{NodeSigner, TxEntry, TxKind};
use cloister_ledger::{self as ledger, Ledger};
use cloister_runtime::Runtime;
use cloister_store::Store;

/// The node's copy of the ledger secret, sealed at rest under a key from the node's private key
/// and, where the platform derives one, the platform's key for this guest
/// (`seal::sealing_key_with_platform`, `Attester::platform_key`).
const SECRET_FILE: &str = "ledger.secret";
const SECRET_AT_REST_AAD: &[u8] = b"cloister ledger secret";
/// The certificate of the leader a joining node attested (`attest::Joined::leader_cert`), sealed
/// at rest like the secret, so that a node restarted before its first replication still accepts
/// Raft messages from that leader alone.
const JOIN_LEADER_FILE: &str = "join-leader.sealed";
const JOIN_LEADER_AT_REST_AAD: &[u8] = b"cloister join leader";
/// The key the state database seals private values under: this node's own, random, sealed at rest
/// like the secret. It never leaves the node (snapshots carry entries sealed under the ledger
/// secret instead), so no other node's secret, a retired one's included, opens this database.
const STATE_KEY_FILE: &str = "state.key";
const STATE_KEY_AT_REST_AAD: &[u8] = b"cloister state database key";
/// The encryption key this node generated in its guest (`envelope::KeyPair`), sealed at rest like
/// the secret: what the leader seals the ledger secret to when the node joins, and each rekey
/// after. Its public half is bound into the node's evidence and recorded in `gov.nodes`; the
/// private half never leaves the guest, so an operator who holds the node's TLS key opens none.
const ENCRYPTION_KEY_FILE: &str = "encryption.key";
const ENCRYPTION_KEY_AT_REST_AAD: &[u8] = b"cloister node encryption key";

/// The key that seals a node's files at rest: from the node key and, where the platform derives
/// one, the platform's key for this guest.
struct AtRest {
    sealing: Sealer,
    /// The node key alone, what older versions sealed to: such a file is resealed once.
    node_only: Option<Sealer>,
    platform: bool,
}

impl AtRest {
    fn new(node: &identity::KeyedCert, attester: &Attester) -> anyhow::Result<AtRest> {
        Ok(match attester.platform_key()? {
            Some(key) => AtRest {
                sealing: seal::sealing_key_with_platform(&node.key_pem, &key)?,
                node_only: Some(seal::sealing_key_from_node_key(&node.key_pem)?),
                platform: true,
            },
            None => {
                AtRest { sealing: seal::sealing_key_from_node_key(&node.key_pem)?, node_only: None, platform: false }
            }
        })
    }

    fn write(&self, path: &std::path::Path, aad: &[u8], plain: &[u8]) -> std::io::Result<()> {
        identity::write_private(path, &self.sealing.seal(Purpose::SecretAtRest, aad, plain))
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }

    fn open(&self, path: &std::path::Path, aad: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.open_as(path, aad, true)
    }

    /// Opens a file that only this version writes: one sealed to the node key alone is no older
    /// version's, but the work of someone who holds the node key (its operator), and is refused.
    fn open_own(&self, path: &std::path::Path, aad: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.open_as(path, aad, false)
    }

    fn open_as(&self, path: &std::path::Path, aad: &[u8], older_versions: bool) -> anyhow::Result<Vec<u8>> {
        let sealed = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if let Ok(plain) = self.sealing.open(Purpose::SecretAtRest, aad, &sealed) {
            return Ok(plain);
        }
        // A file an older version sealed to the node key alone: sealed to the platform now, once.
        if let Some(node_only) = self.node_only.as_ref().filter(|_| older_versions)
            && let Ok(plain) = node_only.open(Purpose::SecretAtRest, aad, &sealed)
        {
            tracing::warn!(file = %path.display(), "sealed to the node key alone by an older version: sealing it to this platform too");
            self.write(path, aad, &plain)?;
            return Ok(plain);
        }
        Err(anyhow::anyhow!(
            "{} does not open with this node's key{}: the node key was replaced{}. This data folder cannot serve here: \
             start the node on a new data folder to join the network again, or recover the service (cloister node recover)",
            path.display(),
            if self.platform { " and this platform's derived key" } else { "" },
            if self.platform {
                ", or this guest is not the one that sealed it (another chip, or another launch measurement)"
            } else {
                ""
            }
        ))
    }
}

/// Learns each rekey sealed to this node (`gov.ledger_secrets`) and keeps every version in
/// `ledger.secret`, sealed at rest.
struct SecretKeeper {
    id: String,
    /// This node's encryption key, and its TLS key, to which rekeys were sealed for a node
    /// recorded by an older version (with no encryption key in `gov.nodes`).
    encryption_pem: String,
    key_pem: String,
    at_rest: AtRest,
    path: std::path::PathBuf,
}

impl cloister_crypto::secrets::Keeper for SecretKeeper {
    fn unwrap(&self, key: &[u8], value: &[u8]) -> Result<Option<Rekeyed>, String> {
        let record: gov::LedgerSecretRecord =
            serde_json::from_slice(value).map_err(|e| format!("a ledger secret record: {e}"))?;
        if key != secrets::version_key(record.version) {
            return Err(format!("the record of version {} is under another key", record.version));
        }
        let Some(sealed) = record.nodes.get(&self.id) else { return Ok(None) };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| e.to_string());
        let (aad, sealed) = (secrets::node_aad(record.version), b64(sealed)?);
        let plain = cloister_crypto::envelope::open_with(&self.encryption_pem, &aad, &sealed)
            .or_else(|_| cloister_crypto::envelope::open_with(&self.key_pem, &aad, &sealed))
            .map_err(|e| e.to_string())?;
        let secret = <[u8; 32]>::try_from(plain).map_err(|_| "the new secret is not 32 bytes".to_owned())?;
        Ok(Some(Rekeyed { version: record.version, secret, previous_sealed: b64(&record.previous_sealed)? }))
    }

    fn persist(&self, all: &[(u64, [u8; 32])]) -> std::io::Result<()> {
        self.at_rest.write(&self.path, SECRET_AT_REST_AAD, &secrets::encode(all))
    }
}

/// What a node holds sealed at rest, opened.
struct Opened {
    secrets: LedgerSecrets,
    /// Whether the secrets were on disk before this start (not generated, nor granted by a join).
    found: bool,
    /// The certificate of the leader a joining node attested, if it joined.
    join_leader: Option<Vec<u8>>,
    state_key: Sealer,
    /// The public half (SPKI DER) of the node's encryption key.
    encryption_spki: Vec<u8>,
}

/// This node's encryption key: generated here, in the guest, on a new data folder (or one an
/// older version wrote), and sealed at rest. Where the platform derives a key, only a file sealed
/// with it opens: a key planted by whoever holds the node key alone would be theirs to use.
fn encryption_key(data_dir: &std::path::Path, at_rest: &AtRest) -> anyhow::Result<KeyPair> {
    let path = data_dir.join(ENCRYPTION_KEY_FILE);
    if path.exists() {
        let pem = String::from_utf8(at_rest.open_own(&path, ENCRYPTION_KEY_AT_REST_AAD)?)
            .map_err(|_| anyhow::anyhow!("{} holds no key", path.display()))?;
        return KeyPair::from_private_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    let pair = KeyPair::generate()?;
    at_rest.write(&path, ENCRYPTION_KEY_AT_REST_AAD, pair.private_pem.as_bytes())?;
    Ok(pair)
}

/// The ledger secrets: this node's sealed copy, or (for a new node) sealed to it by the leader of
/// the network it joins once its attestation makes it Trusted, or (for a new service) generated.
/// With them, the certificate of the leader a joining node attested, if it joined, the state
/// database's key, and the node's encryption key.
async fn ledger_secrets(
    config: &NodeConfig,
    node: &identity::KeyedCert,
    me: (consensus::NodeId, NodeAddr),
    attester: &Attester,
    service_cert: &str,
) -> anyhow::Result<Opened> {
    let path = config.node.data_dir.join(SECRET_FILE);
    let found = path.exists();
    // Before anything is written here, and before a join asks the network for secrets: the log
    // and the state, read without opening them. A join keeps its secrets before either holds
    // anything, so a folder whose log or state has begun without them lost them.
    let data_dir = &config.node.data_dir;
    if !found
        && (cloister_consensus::log_begun(data_dir)? || cloister_consensus::state_begun(&crate::state_file(data_dir))?)
    {
        return Err(secret_missing(&path));
    }
    let at_rest = AtRest::new(node, attester)?;
    let encryption = encryption_key(data_dir, &at_rest)?;
    let leader_path = data_dir.join(JOIN_LEADER_FILE);
    let (all, leader) = if found {
        // Whether a node that found secrets may use them is decided once its log is open
        // (`secrets_fit_the_log`).
        let all = secrets::decode(&at_rest.open(&path, SECRET_AT_REST_AAD)?)
            .map_err(|e| anyhow::anyhow!("{} holds no ledger secrets: {e}", path.display()))?;
        let leader = leader_path.exists().then(|| at_rest.open(&leader_path, JOIN_LEADER_AT_REST_AAD)).transpose()?;
        (all, leader)
    } else {
        match &config.network.join {
            Some(url) => {
                let timeout = Duration::from_millis(config.raft.join_timeout_ms);
                let leader =
                    attest::LeaderCheck::from_config(&config.attestation, service_cert, node, attester).await?;
                let joined = attest::join(url, me.clone(), node, &encryption, attester, &leader, timeout).await?;
                at_rest.write(&leader_path, JOIN_LEADER_AT_REST_AAD, &joined.leader_cert)?;
                at_rest.write(&path, SECRET_AT_REST_AAD, &secrets::encode(&joined.secrets))?;
                (joined.secrets, Some(joined.leader_cert))
            }
            // Kept by `first_transaction`, as the new service's log begins.
            None => (vec![(1, Sealer::generate_secret())], None),
        }
    };
    let state_key_path = config.node.data_dir.join(STATE_KEY_FILE);
    let state_key = if state_key_path.exists() {
        at_rest.open(&state_key_path, STATE_KEY_AT_REST_AAD)?
    } else {
        // A state database an older version wrote is sealed under the first ledger secret: it
        // keeps that key. A new one gets a key of its own.
        let key = match crate::state_file(&config.node.data_dir).exists() {
            true => all[0].1,
            false => Sealer::generate_secret(),
        };
        at_rest.write(&state_key_path, STATE_KEY_AT_REST_AAD, &key)?;
        key.to_vec()
    };
    let state_key = <[u8; 32]>::try_from(state_key)
        .map_err(|_| anyhow::anyhow!("{} holds no state key", state_key_path.display()))?;
    let encryption_spki = encryption.spki_der;
    let keeper = SecretKeeper {
        id: me.0.to_string(),
        encryption_pem: encryption.private_pem,
        key_pem: node.key_pem.clone(),
        at_rest,
        path,
    };
    let secrets = LedgerSecrets::new(all).map_err(anyhow::Error::msg)?.with_keeper(Box::new(keeper));
    Ok(Opened { secrets, found, join_leader: leader, state_key: Sealer::new(&state_key), encryption_spki })
}

/// Refuses secrets that do not fit the log, decided on the opened log (Raft's own notion of a log
/// that has begun) before anything is served. With a log that holds nothing (none at all, an
/// empty folder in its place, or anything Raft does not count) this node is about to run a
/// genesis or a recovery, or to join. Only a join may find secrets here (granted before a
/// crash): a genesis or a recovery would wrap them into a new service's recovery shares, and
/// whoever wrote its configuration (the operator, naming itself the one recovery member) would
/// open the old service's secret. A new service's own secret is kept only as its log begins
/// (`first_transaction`), so a genesis that failed before then leaves none behind to be refused.
/// (Secrets missing beside a log or a state that has begun were refused as they were read, in
/// `ledger_secrets`; the check here of that case stays for a log only Raft counts as begun.)
async fn secrets_fit_the_log(config: &NodeConfig, consensus: &Consensus, found: bool) -> anyhow::Result<()> {
    if config.network.join.is_some() {
        return Ok(());
    }
    let path = config.node.data_dir.join(SECRET_FILE);
    match (found, consensus.is_initialized().await?) {
        (true, false) => anyhow::bail!(
            "{} holds ledger secrets, but this node's Raft log holds nothing: a new service (a genesis or a \
             recovery) starts on an empty data folder, never on the secrets of another. Start the node again on \
             an empty data folder",
            path.display()
        ),
        (false, true) => Err(secret_missing(&path)),
        _ => Ok(()),
    }
}

/// The refusal of a node whose ledger secrets file is gone while its log or state shows it took
/// part in a network.
fn secret_missing(path: &std::path::Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is missing, but this node's data folder already holds a network's state (its Raft log or state.redb)",
        path.display()
    )
}

/// Stops a node whose encryption key is not the one its `gov.nodes` record holds (if the record
/// holds one): the rekeys are sealed to the recorded key, so such a node would stall at the next.
/// Its `encryption.key` was removed or replaced, or the node joined again from another folder.
fn own_encryption_key_recorded(store: &Store, id: consensus::NodeId, own: &[u8]) -> anyhow::Result<()> {
    let Some(record) = gov::node(&store.begin()?, &id.to_string())? else { return Ok(()) };
    let Some(pem) = &record.encryption_key else { return Ok(()) };
    let recorded = cloister_crypto::envelope::public_key_der(pem).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        recorded == own,
        "this node's {ENCRYPTION_KEY_FILE} is not the key gov.nodes records for it, which the ledger secret's \
         rekeys are sealed to: the file was removed or replaced, or the node joined again from another data \
         folder. Start it on a new data folder to join again"
    );
    Ok(())
}

/// The ledger secret versions a stopped node's data folder holds, opened as the node opens them
/// (with its key and this platform's derived key): what an operator who holds both can read.
pub fn read_ledger_secrets(config: &NodeConfig) -> anyhow::Result<Vec<(u64, [u8; 32])>> {
    let node = identity::read_pair(&config.tls.node_cert, &config.tls.node_key)?;
    let at_rest = AtRest::new(&node, &Attester::from_config(&config.attestation)?)?;
    let path = config.node.data_dir.join(SECRET_FILE);
    secrets::decode(&at_rest.open(&path, SECRET_AT_REST_AAD)?).map_err(anyhow::Error::msg)
}

/// How long a new service's first node may take to elect itself.
const GENESIS_ELECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// In a data folder, the marker of a genesis (or a recovery) whose first transaction has not
/// committed yet: see `first_transaction`.
pub const GENESIS_PENDING_FILE: &str = "genesis.pending";

/// How long [`Node::shutdown`] waits for its servers to close their connections (the requests in
/// flight to finish, the streams other nodes hold to end) before it closes those left.
pub const SERVERS_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server has to end once its connections are closed: they fail at their next poll.
const CLOSED_CONNECTIONS_END_TIMEOUT: Duration = Duration::from_secs(2);

/// A running node.
pub struct Node {
    pub rest_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub id: consensus::NodeId,
    service: Arc<Service>,
    consensus: Consensus,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The REST and gRPC servers: [`Node::shutdown`] waits for them to close their connections
    /// while consensus still runs.
    client_servers: Vec<tokio::task::JoinHandle<()>>,
    /// The peer server: waited for once consensus has stopped.
    peer_servers: Vec<tokio::task::JoinHandle<()>>,
    /// Closes every connection the servers still have (see [`server::accept`]).
    close_connections: CancellationToken,
    /// Why the node cannot go on, once it cannot (see [`Node::failed`]).
    failure: tokio::sync::watch::Receiver<Option<String>>,
}

/// Serves a tonic router over the connections of an accept loop until cancelled, with at most
/// `streams_max` streams open on one connection (tonic sets no limit of its own).
fn serve_grpc(
    conns: tokio::sync::mpsc::Receiver<std::io::Result<server::Conn>>,
    routes: tonic::service::Routes,
    streams_max: u32,
    budget: Option<server::BodyBudget>,
    cancel: CancellationToken,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conns);
        // A body over the budget ends its call UNAVAILABLE: tonic answers with the first
        // `Status` in a body error's chain.
        let charge =
            tower::util::MapRequestLayer::new(move |req: axum::http::Request<tonic::body::Body>| match &budget {
                Some(budget) => {
                    type Info = tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;
                    let info = req.extensions().get::<Info>();
                    let address = info.and_then(|i| i.get_ref().remote_addr()).map(|a| a.ip());
                    req.map(|body| {
                        let charged = budget.charge(body, address);
                        tonic::body::Body::new(http_body_util::BodyExt::map_err(charged, |e| {
                            match server::OverBudget::caused(&*e) {
                                true => Box::new(tonic::Status::unavailable(e.to_string())) as tower::BoxError,
                                false => e,
                            }
                        }))
                    })
                }
                None => req,
            });
        let served = tonic::transport::Server::builder()
            .max_concurrent_streams(streams_max)
            .layer(charge)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, cancel.cancelled())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the {what} server failed");
        }
    })
}

impl Node {
    /// Opens the node's state, starts serving, and starts or joins the network if it is new.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let data_dir = &config.node.data_dir;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data folder {}", data_dir.display()))?;
        let metrics = Arc::new(crate::metrics::Metrics::new(ledger::dir(data_dir)));
        let runtime = Arc::new(Runtime::new(config.wasm.clone())?.with_observer(metrics.clone()));
        let service_cert = std::fs::read_to_string(&config.tls.service_cert)
            .with_context(|| format!("reading the service certificate {}", config.tls.service_cert.display()))?;
        let node_cert = identity::read_pair(&config.tls.node_cert, &config.tls.node_key)?;
        let node_cert_der = identity::cert_der(node_cert.cert_pem.as_bytes())?.to_vec();
        let id = consensus::node_id_of(&node_cert_der);
        let peers = Peers::new(&service_cert, &node_cert);
        let attester = Arc::new(Attester::from_config(&config.attestation)?);

        let rest_listener = bind(&config.node.rest_addr).await?;
        let grpc_listener = bind(&config.node.grpc_addr).await?;
        let peer_listener = bind(&config.node.peer_addr).await?;
        let (rest_addr, grpc_addr, peer_addr) =
            (rest_listener.local_addr()?, grpc_listener.local_addr()?, peer_listener.local_addr()?);
        let me = NodeAddr {
            name: config.node.name.clone(),
            peer_url: format!("https://{peer_addr}"),
            rest_url: format!("https://{rest_addr}"),
            grpc_url: format!("https://{grpc_addr}"),
        };
        let Opened { secrets, found, join_leader, state_key, encryption_spki } =
            ledger_secrets(&config, &node_cert, (id, me.clone()), &attester, &service_cert).await?;
        let secrets = Arc::new(secrets);
        let store = Store::open_sealed(&crate::state_file(data_dir), Arc::new(state_key))?;
        own_encryption_key_recorded(&store, id, &encryption_spki)?;
        let service_cert_der = identity::cert_der(service_cert.as_bytes())?.to_vec();
        let ledger = Arc::new(Ledger::open(&ledger::dir(data_dir), service_cert_der, &config.ledger, &store)?);
        let storage = (store.clone(), ledger, secrets.clone());
        let consensus = Consensus::start(&config.raft, data_dir, id, me.clone(), storage, peers).await?;
        if let Err(e) = secrets_fit_the_log(&config, &consensus, found).await {
            consensus.shutdown().await;
            return Err(e);
        }
        let info = NodeInfo { name: me.name.clone(), rest_url: me.rest_url.clone(), grpc_url: me.grpc_url.clone() };
        let built = || -> anyhow::Result<Service> {
            let joins =
                attest::Joins::new(&config.attestation, secrets.clone(), attester.clone(), &node_cert, join_leader)?;
            let parts = ServiceParts {
                runtime: runtime.clone(),
                store: store.clone(),
                consensus: consensus.clone(),
                joins: Arc::new(joins),
                metrics,
            };
            Service::new(parts, config.limits.clone(), config.gov.clone(), info)
        };
        let service = match built() {
            Ok(service) => Arc::new(service),
            Err(e) => {
                consensus.shutdown().await;
                return Err(e);
            }
        };
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let (mut client_servers, mut peer_servers) = (Vec::new(), Vec::new());
        let close_connections = CancellationToken::new();
        let (fail, failure) = tokio::sync::watch::channel(None);
        // Whatever fails from here stops what started before it: in a process that goes on (a
        // test, an embedding), a failed start leaves no Raft running and the data folder free.
        let begun = async {
            let limits = &config.limits;
            let accept_limits = server::AcceptLimits::of(limits);
            let (tls, served) = tls::swappable_server_config(&node_cert, &service_cert)?;
            let mut endorsed_cert = crate::endorsed::EndorsedCert::new(
                store.clone(),
                node_cert.clone(),
                config.node.name.clone(),
                service_cert.clone(),
                served,
                data_dir.clone(),
            )?;
            // The gate holds the service weakly, as the forwarder does, so a shut-down node's
            // handshakes in flight do not keep its databases open.
            let weak = Arc::downgrade(&service);
            let gate: tls::PeerGate = Arc::new(move |cert| {
                let service = weak.upgrade().ok_or("the node is shutting down")?;
                service.gov_read(|tx| Ok(attest::handshake_gate(tx, cert))).map_err(|e| e.to_string())?
            });
            let peer_tls = tls::peer_server_config(&node_cert, &service_cert, gate)?;

            let forwarder = Arc::new(ServiceForwarder(Arc::downgrade(&service)));
            let peer_service =
                cloister_proto::peer::v1::peer_server::PeerServer::new(consensus.peer_service(forwarder))
                    .max_decoding_message_size(consensus::PEER_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(consensus::PEER_MESSAGE_BYTES_MAX);
            // Nodes keep their connections to each other open between writes, and a follower's
            // forwarding stream may sit idle for as long as no client writes through it. What bounds
            // an idle connection here is its node certificate's count.
            let peer_limits = server::AcceptLimits {
                idle_timeout: None,
                per_node_max: Some(limits.connections_per_node_max),
                ..accept_limits
            };
            let conns = server::accept(peer_listener, peer_tls, peer_limits, cancel.clone(), close_connections.clone());
            let streams_max = config.limits.streams_per_connection_max;
            peer_servers.push(serve_grpc(
                conns,
                tonic::service::Routes::new(peer_service),
                streams_max,
                None,
                cancel.clone(),
                "peer",
            ));

            let signer = NodeSigner::new(&node_cert.cert_pem, &node_cert.key_pem)?;
            tasks.push(tokio::spawn(crate::signer::run_signer(
                consensus.clone(),
                store.clone(),
                signer,
                config.ledger.clone(),
                cancel.clone(),
            )));
            tasks.push(tokio::spawn(attest::retire_removed(store.clone(), consensus.clone(), cancel.clone())));
            tasks.push(tokio::spawn(attest::maintain_endorsements(
                Arc::downgrade(&service),
                consensus.clone(),
                cancel.clone(),
            )));
            tasks.push(tokio::spawn(crate::api::service::keep_modules_compiled(
                Arc::downgrade(&service),
                consensus.gov_changes(),
                cancel.clone(),
            )));
            tasks.push(tokio::spawn(attest::restore_recovered(
                Arc::downgrade(&service),
                consensus.clone(),
                data_dir.clone(),
                cancel.clone(),
            )));
            let pending = data_dir.join(GENESIS_PENDING_FILE);
            let initialized = consensus.is_initialized().await?;
            // A node that has not joined yet asks to join, and so does one the network added as a
            // learner and never made a voter (its last start gave up in between): a node already
            // a learner is promoted.
            let voters = consensus.voters().await?;
            // A learner asks again only while Trusted: a retired node is out of the voters too.
            let trusted =
                || gov::node_status(&store.begin()?, &id.to_string()).map(|s| s == Some(gov::NodeStatus::Trusted));
            let rejoin = initialized && !voters.contains(&id) && trusted()?;
            let joining = config.network.join.as_ref().filter(|_| !initialized || rejoin);
            if let Some(url) = joining {
                let (consensus, url) = (consensus.clone(), url.clone());
                let timeout = Duration::from_millis(config.raft.join_timeout_ms);
                tasks.push(tokio::spawn(async move {
                    match consensus.join(&url, timeout).await {
                        Ok(()) => tracing::info!(%url, "joined the network"),
                        Err(e) => {
                            tracing::error!(error = %e, "joining the network failed");
                            let _ = fail.send(Some(format!("{e:#}")));
                        }
                    }
                }));
            } else if !initialized {
                let node = (node_cert.cert_pem.as_str(), encryption_spki.as_slice(), attester.as_ref());
                match &config.network.recover {
                    None => genesis(&config, &consensus, &runtime, &service_cert, node, &secrets).await?,
                    Some(folder) => recover(&config, folder, &consensus, &service_cert, node, &secrets).await?,
                }
            } else if pending.exists() {
                // A genesis or a recovery began on this folder and its start ended before it knew
                // the first transaction committed. A network another node has joined has one: a
                // join is admitted against the attestation policy that transaction writes. With
                // this node the one voter, it applies the transaction once it has elected itself
                // again, if it committed; if not, the folder holds a network with no service,
                // which no later start would make, and is refused.
                if voters == std::collections::BTreeSet::from([id]) {
                    anyhow::ensure!(
                        consensus.wait_recovered(GENESIS_ELECTION_TIMEOUT).await,
                        "a genesis or a recovery on this data folder stopped before it knew its first transaction \
                         committed ({} is left), and this node, the network's one voter, did not catch up on its \
                         own log within {GENESIS_ELECTION_TIMEOUT:?} to find out: start it again",
                        pending.display()
                    );
                    anyhow::ensure!(
                        gov::service(&store.begin()?)?.is_some(),
                        "a genesis or a recovery on this data folder stopped before its first transaction \
                         committed ({} is left): the folder holds no service and never will. Start the node \
                         again on an empty data folder",
                        pending.display()
                    );
                }
                first_transaction_done(&pending)?;
            }
            // A node already endorsed (the first node after genesis, any Trusted node after a restart)
            // serves its certificate from the service identity from the first client handshake.
            if let Err(e) = endorsed_cert.refresh() {
                let e = format!("{e:#}");
                tracing::warn!(error = %e, "choosing the certificate to serve clients failed; the operator's serves");
            }
            tasks.push(tokio::spawn(endorsed_cert.run(cancel.clone())));
            // Clients are served only once a new network's genesis has committed, so nobody sees a
            // service without its members or app.
            let conns =
                server::accept(rest_listener, tls.clone(), accept_limits, cancel.clone(), close_connections.clone());
            let budget = server::BodyBudget::new(limits);
            client_servers.push(tokio::spawn(server::serve_http(
                conns,
                rest::router(service.clone()),
                limits.clone(),
                budget.clone(),
                cancel.clone(),
            )));
            let conns = server::accept(grpc_listener, tls, accept_limits, cancel.clone(), close_connections.clone());
            let routes = crate::api::grpc::routes(service.clone())?;
            client_servers.push(serve_grpc(conns, routes, streams_max, Some(budget), cancel.clone(), "gRPC"));
            anyhow::Ok(())
        }
        .await;
        let node = Node {
            rest_addr,
            grpc_addr,
            peer_addr,
            id,
            service,
            consensus,
            cancel,
            tasks,
            client_servers,
            peer_servers,
            close_connections,
            failure,
        };
        match begun {
            Ok(()) => {
                tracing::info!(name = %me.name, id, %rest_addr, %grpc_addr, %peer_addr, "node started");
                Ok(node)
            }
            Err(e) => {
                node.shutdown().await;
                Err(e)
            }
        }
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Resolves once the node has failed in a way it cannot mend while it runs, with the reason:
    /// a join the network did not accept within `raft.join_timeout_ms` (a restart tries again).
    /// Never resolves otherwise; whoever runs the node stops it then, and exits with the reason.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.clone();
        match failure.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The join ended well, and nothing else reports.
            Err(_) => std::future::pending().await,
        }
    }

    pub fn consensus(&self) -> &Consensus {
        &self.consensus
    }

    pub fn rest_url(&self) -> String {
        format!("https://{}", self.rest_addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("https://{}", self.grpc_addr)
    }

    pub fn peer_url(&self) -> String {
        format!("https://{}", self.peer_addr)
    }

    /// Stops accepting, lets open requests finish, stops consensus, and closes the state, so the
    /// data folder can be reopened as soon as this returns.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        // Each server closes its connections once what they carry is done, and a connection holds
        // its server's share of the node (the peer server's, its consensus and state): they are
        // waited for, together up to SERVERS_DRAIN_TIMEOUT. First the client servers, whose
        // requests in flight finish (a write commits through consensus, still running); then
        // the peer server, whose streams other nodes hold open end as consensus stops.
        let deadline = tokio::time::Instant::now() + SERVERS_DRAIN_TIMEOUT;
        let mut left = drain(self.client_servers, deadline).await;
        self.consensus.shutdown().await;
        left.extend(drain(self.peer_servers, deadline).await);
        // What is still open past the deadline (a client that stalled mid-request, a peer that
        // stopped answering) is closed; its server then ends at once.
        self.close_connections.cancel();
        if !left.is_empty() {
            tracing::warn!("closed the connections still open {SERVERS_DRAIN_TIMEOUT:?} after the node began to stop");
            left = drain(left, tokio::time::Instant::now() + CLOSED_CONNECTIONS_END_TIMEOUT).await;
        }
        for task in self.tasks.into_iter().chain(left) {
            task.abort();
            let _ = task.await;
        }
        drop(self.consensus);
        // The listeners held the other references; dropping the last one joins the writer thread
        // and closes the databases, which blocks, so it happens off the async threads.
        let mut service = self.service;
        for _ in 0..100 {
            match Arc::try_unwrap(service) {
                Ok(s) => {
                    let _ = tokio::task::spawn_blocking(move || drop(s)).await;
                    tracing::info!("node stopped");
                    return;
                }
                Err(still_shared) => {
                    service = still_shared;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tracing::warn!("node stopped, but its service was still referenced after 5 s");
    }
}

/// Waits for each server until `deadline`; those still running are returned.
async fn drain(
    mut servers: Vec<tokio::task::JoinHandle<()>>,
    deadline: tokio::time::Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    while let Some(server) = servers.last_mut() {
        if tokio::time::timeout_at(deadline, server).await.is_err() {
            break;
        }
        servers.pop();
    }
    servers
}

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))
}

/// Starts a new network with this node alone and commits the genesis transaction: the members,
/// the users, the constitution, the app, this node, and the service record (Opening).
async fn genesis(
    config: &NodeConfig,
    consensus: &Consensus,
    runtime: &Runtime,
    service_cert: &str,
    node: (&str, &[u8], &Attester),
    secrets: &LedgerSecrets,
) -> anyhow::Result<()> {
    let node_cert = node.0;
    let read_ids = |paths: &[std::path::PathBuf]| -> anyhow::Result<Vec<(String, String)>> {
        paths
            .iter()
            .map(|p| {
                let pem = std::fs::read_to_string(p)
                    .with_context(|| format!("reading genesis certificate {}", p.display()))?;
                // One certificate block and nothing else, as a proposal's must be: a record
                // written here is held to it whenever a constitution rewrites it.
                let der = identity::single_cert_der(pem.as_bytes()).with_context(|| p.display().to_string())?;
                Ok((identity::id_of_der(&der), pem))
            })
            .collect()
    };
    let app = match &config.genesis.app {
        None => None,
        Some(path) => {
            let wasm = std::fs::read(path).with_context(|| format!("reading the genesis app {}", path.display()))?;
            runtime.load(&wasm).with_context(|| format!("the genesis app {} is refused", path.display()))?;
            Some(wasm)
        }
    };
    let constitution = match &config.genesis.constitution {
        None => cloister_bundled::CONSTITUTION.to_vec(),
        Some(path) => std::fs::read(path).with_context(|| format!("reading the constitution {}", path.display()))?,
    };
    let module = runtime.load(&constitution).context("the genesis constitution is refused")?;
    gov::is_constitution(&module).map_err(|e| anyhow::anyhow!("the genesis constitution is refused: {e}"))?;
    let certs: Vec<_> = config.genesis.members.iter().map(|m| m.cert().to_owned()).collect();
    let mut members = Vec::new();
    for ((id, cert), member) in read_ids(&certs)?.into_iter().zip(&config.genesis.members) {
        let key = match member.encryption_key() {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the encryption key {}", path.display()))?;
                cloister_crypto::envelope::public_key_der(&pem)
                    .map_err(|e| anyhow::anyhow!("the encryption key {}: {e}", path.display()))?;
                Some(pem)
            }
        };
        members.push((id, cert, key));
    }
    anyhow::ensure!(!members.is_empty(), "genesis needs at least one member ([genesis] members)");
    let recovery_members = members.iter().filter(|m| m.2.is_some()).count() as u32;
    let recovery_threshold = match config.genesis.recovery_threshold {
        None => recovery_members / 2 + 1,
        Some(t) if t >= 1 && t <= recovery_members.max(1) => t,
        Some(t) => anyhow::bail!(
            "[genesis] recovery_threshold = {t}, but there are {recovery_members} recovery members (members with an encryption_key)"
        ),
    };
    let attestation = genesis_attestation(config, node).await?;
    // The service's own identity: generated here, inside the first node, and kept only sealed
    // (in the ledger and the state database, under the ledger secret).
    let service_identity = identity::generate_service_identity("Cloister")?;
    let genesis = gov::Genesis {
        attestation,
        service_cert: service_cert.to_owned(),
        identity: (service_identity.cert_pem, service_identity.key_pem),
        node_cert_sha256: identity::id_of_pem(node_cert.as_bytes())?,
        members,
        recovery_threshold,
        users: read_ids(&config.genesis.users)?,
        constitution,
        app,
        node: (consensus.id().to_string(), config.node.name.clone(), node_cert.to_owned()),
    };
    let mut writes = genesis.write_set()?;
    let recovery_members = genesis.members.iter().filter_map(|(id, _, key)| Some((id.clone(), key.clone()?)));
    if let Some(shares) = crate::recovery::genesis_issue(
        &secrets.current_secret().1,
        &genesis.identity.0,
        recovery_members,
        recovery_threshold,
    )? {
        writes.put(gov::RECOVERY, gov::RECOVERY_KEY, &serde_json::to_vec(&shares)?);
    }
    let tx = first_transaction(consensus, writes, secrets, &config.node.data_dir).await?;
    tracing::info!(members = genesis.members.len(), users = genesis.users.len(), %tx, "genesis committed");
    Ok(())
}

/// Starts a new network with this node alone and commits its genesis transaction. The new
/// service's ledger secret is kept first (nothing was sealed with it before), then the network
/// exists once `initialize` returns, and the service only once the transaction commits: a
/// marker file says so in between, so a start that ends there is not taken for a service.
async fn first_transaction(
    consensus: &Consensus,
    writes: cloister_store::WriteSet,
    secrets: &LedgerSecrets,
    data_dir: &std::path::Path,
) -> anyhow::Result<cloister_ledger::txid::TxId> {
    secrets.persist().context("keeping the new service's ledger secret")?;
    let pending = data_dir.join(GENESIS_PENDING_FILE);
    let begun = async {
        identity::write_durably(&pending, b"a genesis began here; its first transaction has not committed\n", false)?;
        consensus.initialize().await?;
        anyhow::Ok(())
    };
    if let Err(e) = begun.await {
        // Nothing was sealed with the secret while the log has not begun: a start that failed
        // here (the marker not written, a full disk) takes the secret back, or every later start
        // would refuse the folder as another service's secrets.
        if !consensus.is_initialized().await.unwrap_or(true) {
            let kept = data_dir.join(SECRET_FILE);
            for file in [&kept, &pending] {
                if let Err(e) = std::fs::remove_file(file).and_then(|()| identity::sync_dir(data_dir))
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(error = %e, file = %file.display(), "taking back a genesis that did not begin");
                }
            }
        }
        return Err(e);
    }
    consensus.wait_for_leader(GENESIS_ELECTION_TIMEOUT).await.context("the first node did not elect itself")?;
    let tx = consensus
        .propose(TxEntry::new(TxKind::Genesis, writes, None, &secrets.current().1))
        .await
        .map_err(|e| anyhow::anyhow!("the genesis transaction did not commit: {e}"))?;
    first_transaction_done(&pending)?;
    Ok(tx)
}

/// Removes the marker of a genesis under way, durably, once its first transaction committed.
fn first_transaction_done(pending: &std::path::Path) -> anyhow::Result<()> {
    let context = || format!("removing {}", pending.display());
    std::fs::remove_file(pending).with_context(context)?;
    identity::sync_dir(pending.parent().unwrap_or(std::path::Path::new("."))).with_context(context)
}

/// Starts a new service from a previous service's ledger folder, with this node alone: its
/// public state restored, Recovering until a threshold of recovery members submit their shares
/// (see `crate::recovery`).
async fn recover(
    config: &NodeConfig,
    folder: &std::path::Path,
    consensus: &Consensus,
    service_cert: &str,
    node: (&str, &[u8], &Attester),
    secrets: &LedgerSecrets,
) -> anyhow::Result<()> {
    let node_cert = node.0;
    let previous = crate::recovery::read_previous(folder, &config.node.data_dir)?;
    let attestation = genesis_attestation(config, node).await?;
    // The roots stay the previous service's: a recovery configured for others (the mock root, or
    // another test root) would take the previous ledger secret, rebuilt from the members' shares,
    // to nodes that no firmware the previous service trusted vouches for.
    let amd = serde_json::to_value(cloister_attestation::Roots::Amd)?;
    let previous_roots = previous.roots.as_ref().unwrap_or(&amd);
    anyhow::ensure!(
        *previous_roots == attestation.roots,
        "the previous service pinned the attestation roots {previous_roots}, and this node is configured for {} \
         (genesis.attestation, attestation.mock_root): a recovered service keeps its roots",
        attestation.roots
    );
    let identity = identity::generate_service_identity("Cloister")?;
    let (id, cert_sha256) = (consensus.id().to_string(), identity::id_of_pem(node_cert.as_bytes())?);
    let first = gov::FirstNode {
        id: &id,
        name: &config.node.name,
        cert: node_cert,
        cert_sha256: &cert_sha256,
        attestation: &attestation,
    };
    let genesis = crate::recovery::recovery_genesis(&previous, first, service_cert, &identity)?;
    let tx = first_transaction(consensus, genesis, secrets, &config.node.data_dir).await?;
    // The leader's upkeep writes the previous public state next (`attest::restore_recovered`), so
    // a node restarted part-way resumes it.
    tracing::info!(%tx, threshold = previous.shares.threshold, "recovering: started a new service from the previous ledger");
    Ok(())
}

/// The first node attests itself against the roots the genesis configuration pins, and its own
/// measurement and host_data (on Azure, its PCRs 4, 7 and 11 too) become the service's first
/// allowed values, and its reported TCB the lowest a joining node's may be (as in CCF). Evidence
/// that fails the other checks (chain, signature, debug policy, binding) stops the genesis.
async fn genesis_attestation(
    config: &NodeConfig,
    (node_cert, encryption_spki, attester): (&str, &[u8], &Attester),
) -> anyhow::Result<gov::GenesisAttestation> {
    use cloister_attestation::{Nonce, Roots};
    let roots = match config.genesis.attestation {
        crate::config::GenesisAttestation::Amd => Roots::Amd,
        crate::config::GenesisAttestation::Mock => {
            let root = attest::mock_root(&config.attestation)?;
            tracing::warn!(ark = ?root, "this service pins the mock firmware's TEST root: for tests and sandboxes only");
            Roots::Mock { ark: root.ark_der() }
        }
    };
    let spki = attest::spki_of(&identity::cert_der(node_cert.as_bytes())?)?;
    let nonce = Nonce::random();
    let binding = attest::join_binding(&spki, encryption_spki, &nonce);
    let evidence = attester.evidence(binding).await.context("collecting this node's evidence")?;
    let verified = attest::verify_claimed(&evidence, &roots, None, &binding)
        .map_err(|e| anyhow::anyhow!("this node's own evidence is refused, so it cannot start a service: {e}"))?;
    let azure_pcrs = match &evidence {
        cloister_attestation::Evidence::AzureVtpm(e) => {
            Some(cloister_attestation::azure::pcr_subset(e, &cloister_attestation::azure::GENESIS_PCRS))
        }
        _ => None,
    };
    Ok(gov::GenesisAttestation {
        roots: serde_json::to_value(&roots)?,
        measurement: verified.measurement.clone(),
        host_data: verified.host_data.clone(),
        azure_pcrs,
        min_tcb: attest::governed_tcb(&verified.tcb),
        evidence: serde_json::to_value(&evidence)?,
        verified: attest::verified_json(&verified),
        encryption_key: cloister_crypto::envelope::public_key_pem(encryption_spki).map_err(anyhow::Error::msg)?,
    })
}

#[cfg(test)]
mod tests {
    use cloister_attestation::mock::{MockConfig, MockFirmware, MockRoot};
    use cloister_crypto::identity::ServiceCa;

    use super::*;

    #[test]
    fn a_node_whose_encryption_key_is_not_its_records_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let (recorded, other) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        own_encryption_key_recorded(&store, 7, &other.spki_der).expect("no record yet: a joining node");
        let record = gov::NodeRecord {
            name: "node".into(),
            status: gov::NodeStatus::Trusted,
            cert: String::new(),
            evidence: serde_json::Value::Null,
            verified: serde_json::Value::Null,
            encryption_key: Some(cloister_crypto::envelope::public_key_pem(&recorded.spki_der).unwrap()),
        };
        let mut ws = cloister_store::WriteSet::default();
        ws.put(gov::NODES, b"7", &serde_json::to_vec(&record).unwrap());
        store.apply(&ws).unwrap();
        own_encryption_key_recorded(&store, 7, &recorded.spki_der).expect("the recorded key");
        let err = own_encryption_key_recorded(&store, 7, &other.spki_der).unwrap_err();
        assert!(err.to_string().contains("not the key gov.nodes records"), "{err}");
    }

    /// The attack: an operator holds the node key (the CA issues key and certificate together)
    /// and writes the data folder. Had the node opened an `encryption.key` sealed to the node key
    /// alone, as it opens an older version's files, it would bind the operator's key into its
    /// evidence, and every rekey sealed to that key would be the operator's to open.
    #[test]
    fn an_encryption_key_planted_under_the_node_key_alone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = ServiceCa::generate("test").unwrap().issue_node_cert("node", &["127.0.0.1".into()]).unwrap();
        let attester = Attester::Mock(Box::new(MockFirmware::new(&MockRoot::generate(), MockConfig::default())));
        let at_rest = AtRest::new(&node, &attester).unwrap();
        assert!(at_rest.platform, "the mock firmware derives a platform key");

        let generated = encryption_key(dir.path(), &at_rest).unwrap();
        let again = encryption_key(dir.path(), &at_rest).unwrap();
        assert_eq!(again.spki_der, generated.spki_der, "the key is kept, sealed at rest");

        let planted = KeyPair::generate().unwrap();
        let node_only = seal::sealing_key_from_node_key(&node.key_pem).unwrap();
        let sealed = node_only.seal(Purpose::SecretAtRest, ENCRYPTION_KEY_AT_REST_AAD, planted.private_pem.as_bytes());
        std::fs::write(dir.path().join(ENCRYPTION_KEY_FILE), sealed).unwrap();
        let err = encryption_key(dir.path(), &at_rest).err().expect("a planted key is refused");
        assert!(format!("{err:#}").contains("does not open"), "{err:#}");
    }
}
