//! The service layer both frontends share: who is calling, which endpoint, whether they may, and
//! running it (reads on a blocking pool against committed state, writes through the writer).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cloister_abi::abi::{self, Auth, Privilege, RequestHead};
use cloister_abi::{Caller, CallerKind, Mode};

use super::error::ApiError;
use super::writer::{Executed, SubmitError, Work, Writer, Written, app_work};
use crate::attest;
use crate::config::{GovSection, Limits};
use crate::gov;
use crate::metrics::Metrics;
use cloister_consensus::{Consensus, Forwarder, NodeAddr, NodeId, PeerRpc, ProposeError};
use cloister_crypto::cose::GovWrite;
use cloister_crypto::identity;
use cloister_ledger::entry::TxKind;
use cloister_ledger::txid::TxId;
use cloister_runtime::{Invocation, LoadedModule, Runtime};
use cloister_store::{Store, Tx};

/// The namespace of the service's app in the store.
pub(crate) const APP_NAMESPACE: &str = "app";

/// A call to an app endpoint, from either frontend.
pub struct AppCall {
    pub method: String,
    /// Path under `/app`, starting with `/`.
    pub path: String,
    /// Raw query string without `?`.
    pub query: String,
    /// Headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: bytes::Bytes,
    /// The client certificate (DER), if the client presented one.
    pub client_cert: Option<Vec<u8>>,
    /// How many nodes have forwarded this call so far.
    pub hops: u32,
}

/// The `frontend` of forwarded governance writes.
const GOV_FRONTEND: &str = "gov";

/// The request header that asks for a linearizable read.
pub(crate) const CONSISTENCY_HEADER: &str = "x-cloister-consistency";

/// An app's answer, with the transaction id when it committed writes.
#[derive(Debug, Clone)]
pub struct AppReply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub tx_id: Option<TxId>,
}

/// Facts about this node for `/node/*`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub rest_url: String,
    pub grpc_url: String,
}

pub struct Service {
    runtime: Arc<Runtime>,
    store: Store,
    consensus: Consensus,
    app: RwLock<Option<Arc<LoadedModule>>>,
    /// The installed constitution, as last compiled: held, so the runtime's cache keeps it
    /// compiled for the writer (which loads it by its code for each governance write).
    constitution: RwLock<Option<Arc<LoadedModule>>>,
    /// Held while the app is being loaded, so a burst of first requests loads it once (on one
    /// blocking thread) and the rest wait for that load instead of each starting their own.
    app_loading: tokio::sync::Mutex<()>,
    limits: Limits,
    writer: Writer,
    reads: Arc<tokio::sync::Semaphore>,
    inflight: Mutex<HashMap<String, usize>>,
    info: NodeInfo,
    gov: GovSection,
    requests: AtomicU64,
    joins: Arc<attest::Joins>,
    gov_checks: Arc<GovChecks>,
    metrics: Arc<Metrics>,
    peer_standings: Mutex<GovMemo<Vec<u8>, attest::Standing>>,
    /// The member or user behind each client certificate, by its id (`None`: neither).
    callers: Mutex<GovMemo<String, Option<Caller>>>,
    /// The installed app, as loaded.
    installed_app: Mutex<GovMemo<(), Option<Arc<LoadedModule>>>>,
    /// Whether the service is Open.
    open: Mutex<GovMemo<(), bool>>,
}

/// The most peer certificates whose standing is remembered at once. Every certificate of the
/// service CA passes the peer handshake, and an operator can have the CA issue many: past this
/// the remembered standings are dropped and worked out again.
const PEER_STANDINGS_MAX: usize = 64;

/// The most client certificates whose caller (member, user or neither) is remembered at once,
/// each by its id (a digest), so an entry's size does not depend on the certificate's. Anyone
/// may present a certificate of their own making, so the memory is bounded: past this it starts
/// over, and a caller is read from `gov.` again, as every call did before it was kept.
const CALLERS_REMEMBERED_MAX: usize = 1024;

/// Values read from `gov.` maps, remembered for the `gov.` version they were read at. Only a
/// `gov.` write can change them, and every applied batch (or installed snapshot) that writes one
/// bumps the version after the state database holds it, so a value read at the current version
/// is current. Every Raft message and forwarded call is authorized by its sender's standing, and
/// every app call reads the app, its caller and (on the leader) whether the service is open:
/// each a read transaction and a JSON record, which together were about 4% of the leader's CPU.
struct GovMemo<K, V> {
    gov_version: u64,
    entries: HashMap<K, V>,
}

impl<K, V> Default for GovMemo<K, V> {
    fn default() -> Self {
        GovMemo { gov_version: 0, entries: HashMap::new() }
    }
}

impl<K: Eq + std::hash::Hash, V: Clone> GovMemo<K, V> {
    /// The value remembered for `key`, if it was read at `gov_version`.
    fn get<Q>(&self, gov_version: u64, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        (self.gov_version == gov_version).then(|| self.entries.get(key).cloned()).flatten()
    }

    /// Remembers a value read at `gov_version` (taken before the read began), dropping every one
    /// read at another version, or all of them when `max` are held. A reader that raced a
    /// `gov.` change may bring an older one: the next read at the newer version misses and
    /// reads again.
    fn remember(&mut self, gov_version: u64, key: K, value: V, max: usize) {
        if self.gov_version != gov_version || self.entries.len() >= max {
            self.entries.clear();
            self.gov_version = gov_version;
        }
        self.entries.insert(key, value);
    }
}

/// Bounds the signed governance requests being checked before they may queue for the writer:
/// `/gov` writes need no client certificate, so this is all that stands between anyone on the
/// network and the node's CPU.
struct GovChecks {
    overall: Arc<tokio::sync::Semaphore>,
    per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    per_address_max: usize,
}

/// A claimed check slot. It moves into the task that runs the check, so a client that hangs up
/// does not free it while its check still takes the CPU. Both shares are handed back with the
/// check's outcome: the leader gives the address's back at once and keeps the overall one for a
/// proposal's modules until the write is answered; a follower keeps the address's until the
/// request it forwards is answered.
struct GovCheckSlot {
    address: AddressShare,
    overall: tokio::sync::OwnedSemaphorePermit,
}

/// One of `gov_checks_per_address_max` for a source address, given back when dropped.
struct AddressShare {
    checks: Arc<GovChecks>,
    address: Option<std::net::IpAddr>,
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        if let Some(address) = self.address {
            let mut counts = self.checks.per_address.lock().expect("gov checks lock");
            if let Some(n) = counts.get_mut(&address) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&address);
                }
            }
        }
    }
}

impl GovCheckSlot {
    /// Runs a check on the blocking pool, holding this slot until the check returns, whether or
    /// not anyone still awaits it; then hands back the overall share.
    fn run<R: Send + 'static>(
        self,
        check: impl FnOnce() -> R + Send + 'static,
    ) -> tokio::task::JoinHandle<(R, tokio::sync::OwnedSemaphorePermit, AddressShare)> {
        tokio::task::spawn_blocking(move || {
            let GovCheckSlot { address, overall } = self;
            (check(), overall, address)
        })
    }
}

/// What a checked governance write holds until it is answered: a proposal's compiled modules (so
/// the runtime's cache keeps them for the writer, however many others compile meanwhile) and,
/// with them, its share of `gov_checks_inflight_max` (so that bound covers the proposals with
/// modules on their way to the writer, and the memory they hold). Other writes give their share
/// back when checked.
struct Prechecked {
    _overall: Option<tokio::sync::OwnedSemaphorePermit>,
    _modules: Vec<Arc<LoadedModule>>,
}

/// When a refused governance check may be tried again, in seconds.
const GOV_CHECK_RETRY_AFTER_S: u32 = 1;

impl GovChecks {
    fn new(limits: &Limits) -> GovChecks {
        GovChecks {
            overall: Arc::new(tokio::sync::Semaphore::new(limits.gov_checks_inflight_max)),
            per_address: Mutex::default(),
            per_address_max: limits.gov_checks_per_address_max,
        }
    }

    fn claim(self: &Arc<Self>, address: Option<std::net::IpAddr>) -> Result<GovCheckSlot, ApiError> {
        let busy = |what: &str| {
            ApiError::too_many_retry_after(
                format!("too many governance requests are being checked {what}; retry shortly"),
                GOV_CHECK_RETRY_AFTER_S,
            )
        };
        let overall = self.overall.clone().try_acquire_owned().map_err(|_| busy("(gov_checks_inflight_max)"))?;
        let address = self
            .address_share(address)
            .map_err(|address| busy(&format!("from {address} (gov_checks_per_address_max)")))?;
        Ok(GovCheckSlot { address, overall })
    }

    /// One of the source address's `gov_checks_per_address_max` shares; Err names the address
    /// when it has none left.
    fn address_share(self: &Arc<Self>, address: Option<std::net::IpAddr>) -> Result<AddressShare, std::net::IpAddr> {
        if let Some(address) = address {
            let mut counts = self.per_address.lock().expect("gov checks lock");
            let n = counts.entry(address).or_default();
            if *n >= self.per_address_max {
                return Err(address);
            }
            *n += 1;
        }
        Ok(AddressShare { checks: self.clone(), address })
    }
}

/// Whether a governance check's refusal on a follower is the leader's to decide, so the follower
/// forwards the request all the same. Its state may lag the leader's (a member it has not applied
/// yet, a proposal withdrawn since), so only the leader refuses on who signed or on how many
/// proposals the signer has Open (by the leader's bound, the service's); anyone refuses what does
/// not parse, a replay (the history only grows), and a signature that fails against its signer's
/// own certificate. (Forwarded, each forged copy took a signature check on the leader outside
/// the per-address bound the follower had applied: one address could fill the leader's checks.)
fn leaders_to_decide(refusal: &ApiError) -> bool {
    matches!(refusal.status, 401 | 403) && refusal.code != gov::BAD_SIGNATURE
        || refusal.code == gov::TOO_MANY_OPEN_PROPOSALS
}

/// The MAC a forwarding node puts on an app call it forwards in a client's name: BLAKE3 keyed
/// by a key derived from the ledger secret (`Sealer::forward_mac`), over every field the leader
/// acts on, each framed by its length so that no two requests share an input.
fn caller_mac(sealer: &cloister_crypto::seal::Sealer, r: &cloister_proto::peer::v1::ForwardRequest) -> [u8; 32] {
    let mut mac = sealer.forward_mac();
    let mut field = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u64).to_le_bytes());
        mac.update(bytes);
    };
    for text in [&r.method, &r.path, &r.query, &r.frontend] {
        field(text.as_bytes());
    }
    let mut headers: Vec<_> = r.headers.iter().collect();
    headers.sort();
    field(&(headers.len() as u64).to_le_bytes());
    for (name, value) in headers {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    field(&r.body);
    field(&r.client_cert);
    field(&r.hops.to_le_bytes());
    field(&r.secret_version.to_le_bytes());
    *mac.finalize().as_bytes()
}

/// What a forwarded call carries besides the request itself.
struct ForwardParts {
    client_cert: Option<Vec<u8>>,
    hops: u32,
}

/// Releases an identity's in-flight slot when the request ends.
struct Slot<'a> {
    service: &'a Service,
    id: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut inflight = self.service.inflight.lock().expect("inflight lock");
        if let Some(n) = inflight.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                inflight.remove(&self.id);
            }
        }
    }
}

/// The node's parts a service runs on.
pub struct ServiceParts {
    pub runtime: Arc<Runtime>,
    pub store: Store,
    pub consensus: Consensus,
    pub joins: Arc<attest::Joins>,
    pub metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(parts: ServiceParts, limits: Limits, gov: GovSection, info: NodeInfo) -> anyhow::Result<Service> {
        let ServiceParts { runtime, store, consensus, joins, metrics } = parts;
        let secrets = joins.ledger_secrets().clone();
        let writer =
            Writer::start(runtime.clone(), store.clone(), consensus.clone(), secrets, &limits, metrics.clone())?;
        let service = Service {
            reads: Arc::new(tokio::sync::Semaphore::new(limits.reads_inflight_max)),
            gov_checks: Arc::new(GovChecks::new(&limits)),
            peer_standings: Mutex::default(),
            callers: Mutex::default(),
            installed_app: Mutex::default(),
            open: Mutex::default(),
            runtime,
            store,
            consensus,
            app: RwLock::new(None),
            constitution: RwLock::new(None),
            app_loading: tokio::sync::Mutex::new(()),
            limits,
            writer,
            inflight: Mutex::default(),
            info,
            gov,
            requests: AtomicU64::new(0),
            joins,
            metrics,
        };
        Ok(service)
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn consensus(&self) -> &Consensus {
        &self.consensus
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Holds a read of this node's state, for up to half of `request_timeout_ms` in all, then
    /// answers 503, until the state is one the read may see:
    /// - the node has caught up after a restart: a node restarted after a crash applies again
    ///   what it had applied only once the service's commit reaches it, and a read before that
    ///   would see a state older than one it served ([`Consensus::wait_recovered`]);
    /// - the node has applied every app write it answered: those are answered once committed,
    ///   which is before they are applied here ([`Consensus::wait_acknowledged`]).
    ///
    /// In between, the node applies the entries it holds back ([`Consensus::apply_held`]),
    /// within the same patience (it waits only while entries are held, behind the apply that
    /// holds the group's lock, such as one making the state durable).
    pub(crate) async fn wait_readable(&self) -> Result<(), ApiError> {
        let patience = Duration::from_millis(self.limits.request_timeout_ms / 2);
        let deadline = tokio::time::Instant::now() + patience;
        if !self.consensus.wait_recovered(patience).await {
            return Err(ApiError::unavailable(format!(
                "this node has not caught up with the service's commit since it started, within {} ms (half \
                 of request_timeout_ms); until then it serves no reads rather than a state older than it \
                 served before it stopped (is a majority of nodes up?); retry shortly or ask another node",
                patience.as_millis()
            )));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, self.consensus.apply_held()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ApiError::internal(format!("applying committed entries failed: {e}"))),
            Err(_) => {
                return Err(ApiError::unavailable(format!(
                    "this node is still applying the committed entries it held back after {} ms (half of \
                     request_timeout_ms): its disk may be slow; retry shortly",
                    patience.as_millis()
                )));
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !self.consensus.wait_acknowledged(left).await {
            return Err(ApiError::unavailable(format!(
                "this node has not applied the writes it has acknowledged, within {} ms (half of \
                 request_timeout_ms); it serves no reads that would miss them; retry shortly",
                patience.as_millis()
            )));
        }
        Ok(())
    }

    /// The app installed in the applied state, loaded: remembered until a `gov.` map next
    /// changes, and then read again (compiles are cached by code hash, so that costs one small
    /// read unless the app changed).
    pub async fn app(self: &Arc<Self>) -> Result<Option<Arc<LoadedModule>>, ApiError> {
        let gov_version = self.consensus.gov_version();
        if let Some(app) = self.installed_app.lock().expect("installed app lock").get(gov_version, &()) {
            return Ok(app);
        }
        let app = self.load_app().await?;
        self.installed_app.lock().expect("installed app lock").remember(gov_version, (), app.clone(), 1);
        Ok(app)
    }

    /// The app the applied state installs, loaded unless this node has it loaded already.
    async fn load_app(self: &Arc<Self>) -> Result<Option<Arc<LoadedModule>>, ApiError> {
        let tx = self.store.begin()?;
        let Some(record) = gov::app(&tx)? else {
            return Ok(None);
        };
        let current =
            || self.app.read().expect("app lock").clone().filter(|m| hex::encode(m.hash()) == record.code_hash);
        if let Some(m) = current() {
            return Ok(Some(m));
        }
        let _loading = self.app_loading.lock().await;
        if let Some(m) = current() {
            return Ok(Some(m));
        }
        let code = gov::app_code(&tx, &record.code_hash)?.ok_or_else(|| {
            ApiError::internal(format!("gov.app names code {} that gov.app_code lacks", record.code_hash))
        })?;
        let service = self.clone();
        let module = tokio::task::spawn_blocking(move || service.runtime.load(&code))
            .await
            .map_err(|e| ApiError::internal(format!("loading the app failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("the installed app does not load: {e}")))?;
        *self.app.write().expect("app lock") = Some(module.clone());
        Ok(Some(module))
    }

    /// Compiles the app and the constitution the applied state holds, unless this node has
    /// (see [`keep_modules_compiled`]).
    async fn compile_installed(self: &Arc<Self>) -> Result<(), ApiError> {
        self.app().await?;
        let Some(code) = gov::constitution(&self.store.begin()?)? else { return Ok(()) };
        let service = self.clone();
        let constitution = tokio::task::spawn_blocking(move || service.runtime.load(&code))
            .await
            .map_err(|e| ApiError::internal(format!("loading the constitution failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("the installed constitution does not load: {e}")))?;
        *self.constitution.write().expect("constitution lock") = Some(constitution);
        Ok(())
    }

    /// The member or user behind a client certificate; anyone else is refused (401).
    pub(crate) fn identify_known(&self, cert: Option<&[u8]>) -> Result<Caller, ApiError> {
        let caller = self.identify(cert, Auth::Authenticated)?;
        if caller.kind == CallerKind::Anonymous {
            return Err(ApiError::unauthorized("this endpoint needs a member's or user's client certificate"));
        }
        Ok(caller)
    }

    /// On the leader: endorses the Trusted nodes the service has not endorsed yet, closes the
    /// endorsement of Retired ones, and gives a service from before identities one. A
    /// retirement is closed only once applied here, at this node's applied ledger size (at or
    /// after the retirement): the retired node signs nothing past its own retirement, so none of
    /// its signatures reach past that bound. Returns how many records it wrote.
    pub(crate) async fn maintain_endorsements(&self) -> Result<usize, SubmitError> {
        if !endorsements_lag(&self.store.begin().map_err(ApiError::from)?)? {
            return Ok(0);
        }
        let store = self.store.clone();
        let work: Work<usize> = Box::new(move |_, mut tx| {
            let result = (|| {
                let applied = store.begin()?;
                let size = cloister_ledger::index::state(applied.snapshot())
                    .map_err(|e| ApiError::internal(format!("reading the ledger index failed: {e}")))?
                    .size;
                // Records are signed by the service identity; a service from before identities gets
                // one below, and its records are signed on the next tick.
                let identity_key = gov::service_identity_key(&tx)?;
                let mut writes = Vec::new();
                for (id, node) in gov::all::<gov::NodeRecord>(&tx, gov::NODES)? {
                    let current: Option<gov::EndorsementRecord> = gov::get(&tx, gov::ENDORSEMENTS, id.as_bytes())?;
                    let retired_here = gov::node(&applied, &id)?.is_some_and(|n| n.status == gov::NodeStatus::Retired);
                    let next = match (node.status, current) {
                        (gov::NodeStatus::Trusted, None) => {
                            let cert_sha256 = identity::id_of_pem(node.cert.as_bytes())
                                .map_err(|e| ApiError::internal(format!("node {id}'s certificate: {e:#}")))?;
                            Some(gov::EndorsementRecord { cert_sha256, until: None, signature: None })
                        }
                        (_, Some(e)) if retired_here && e.until.is_none() => {
                            Some(gov::EndorsementRecord { until: Some(size), ..e })
                        }
                        // Written before records were signed, or before the service had an identity.
                        (_, Some(e)) if e.signature.is_none() && identity_key.is_some() => Some(e),
                        _ => None,
                    };
                    if let Some(record) = next {
                        let record = match &identity_key {
                            Some(key) => gov::signed_endorsement(key, &id, record)
                                .map_err(|e| ApiError::internal(format!("signing node {id}'s endorsement: {e:#}")))?,
                            None => record,
                        };
                        writes.push((id, record));
                    }
                }
                for (id, record) in &writes {
                    let value = serde_json::to_vec(record).expect("an endorsement serializes");
                    tx.put(gov::ENDORSEMENTS, id.as_bytes(), &value);
                }
                let mut count = writes.len();
                if let Some(mut service) = gov::service(&tx)?.filter(|s| s.identity.is_none()) {
                    let made = identity::generate_service_identity("Cloister")
                        .map_err(|e| ApiError::internal(format!("generating a service identity: {e:#}")))?;
                    tx.put(gov::SERVICE_IDENTITY_MAP, gov::SERVICE_IDENTITY_KEY, made.key_pem.as_bytes());
                    service.identity = Some(made.cert_pem);
                    tx.put(gov::SERVICE, gov::SERVICE_KEY, &serde_json::to_vec(&service).expect("serializes"));
                    count += 1;
                }
                Ok(Executed { value: count, commit: count > 0, kind: TxKind::Gov, claims_digest: None })
            })();
            (tx, result)
        });
        Ok(self.writer.submit(work).await?.value)
    }

    /// On the leader: issues recovery shares when the recovery members, their keys, the
    /// threshold or the service identity changed since the last issue (`crate::recovery`).
    /// Returns the new issue's version, if it wrote one.
    pub(crate) async fn maintain_recovery_shares(&self) -> Result<Option<u64>, SubmitError> {
        let (version, secret) = self.joins.ledger_secrets().current_secret();
        if !crate::recovery::lags(&self.store.begin().map_err(ApiError::from)?, version)? {
            return Ok(None);
        }
        let work: Work<Option<u64>> = Box::new(move |_, mut tx| {
            let result = crate::recovery::maintain(&mut tx, (version, &secret)).map(|version| Executed {
                commit: version.is_some() || tx.writes().iter().next().is_some(),
                value: version,
                kind: TxKind::Gov,
                claims_digest: None,
            });
            (tx, result)
        });
        Ok(self.writer.submit(work).await?.value)
    }

    /// On the leader: rotates the ledger secret while the constitution's rekey requests
    /// (`gov.service.rekeys_requested`) lag the last rekey. The new version is sealed to each
    /// Trusted node's key and the previous one under it, in `gov.ledger_secrets`, with shares of
    /// the new secret in the same entry; every node learns it as it applies that entry, and
    /// entries proposed after the leader applied it are sealed under it. Returns the new version,
    /// if it wrote one.
    pub(crate) async fn rotate_ledger_secret(&self) -> Result<Option<u64>, SubmitError> {
        let lags = |tx: &Tx| -> Result<Option<(u64, u64)>, ApiError> {
            let requested = gov::service(tx)?.map_or(0, |s| s.rekeys_requested);
            let last = gov::all::<gov::LedgerSecretRecord>(tx, gov::LEDGER_SECRETS)?.pop().map(|(_, r)| r);
            let (version, answered) = last.map_or((1, 0), |r| (r.version, r.answers));
            Ok((requested > answered).then_some((version, requested)))
        };
        if lags(&self.store.begin().map_err(ApiError::from)?)?.is_none() {
            return Ok(None);
        }
        let secrets = self.joins.ledger_secrets().clone();
        let work: Work<Option<u64>> = Box::new(move |_, mut tx| {
            let result = (|| {
                let nothing = Executed { value: None, commit: false, kind: TxKind::Gov, claims_digest: None };
                let Some((recorded, requested)) = lags(&tx)? else { return Ok(nothing) };
                let (version, previous) = secrets.current_secret();
                if version != recorded {
                    // The last rekey is proposed but not yet applied here: the next tick sees it.
                    return Ok(nothing);
                }
                let next = version + 1;
                let secret = cloister_crypto::seal::Sealer::generate_secret();
                let b64 = |bytes: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
                let mut nodes = std::collections::BTreeMap::new();
                for (id, node) in gov::all::<gov::NodeRecord>(&tx, gov::NODES)? {
                    if node.status != gov::NodeStatus::Trusted {
                        continue;
                    }
                    // To the key the node generated in its guest; a node recorded by an older
                    // version has none, and gets it sealed to its certificate's key.
                    let recipient = match &node.encryption_key {
                        Some(pem) => cloister_crypto::envelope::public_key_der(pem).map_err(anyhow::Error::msg),
                        None => identity::cert_der(node.cert.as_bytes()).and_then(|der| attest::spki_of(&der)),
                    };
                    let sealed = recipient
                        .and_then(|spki| {
                            cloister_crypto::envelope::seal_to(
                                &spki,
                                &cloister_crypto::secrets::node_aad(next),
                                &secret,
                            )
                            .map_err(anyhow::Error::msg)
                        })
                        .map_err(|e| {
                            ApiError::internal(format!("sealing the new ledger secret to node {id}: {e:#}"))
                        })?;
                    nodes.insert(id, b64(&sealed));
                }
                let record = gov::LedgerSecretRecord {
                    version: next,
                    answers: requested,
                    previous_sealed: b64(&cloister_crypto::secrets::seal_previous(next, &secret, &previous)),
                    nodes,
                };
                let key = cloister_crypto::secrets::version_key(next);
                tx.put(gov::LEDGER_SECRETS, &key, &serde_json::to_vec(&record).expect("a record serializes"));
                crate::recovery::maintain(&mut tx, (next, &secret))?;
                Ok(Executed { value: Some(next), commit: true, kind: TxKind::Gov, claims_digest: None })
            })();
            (tx, result)
        });
        Ok(self.writer.submit(work).await?.value)
    }

    /// On the leader of a Recovering service: writes the previous ledger's public state (from the
    /// verified copy in `data_dir`) and marks it done; once a threshold of shares brought the
    /// previous ledger secret back, writes its private state and makes the service Opening, for
    /// the members to vote it open. Returns whether it restored anything. The
    /// recovering node is the only node until then (joins are refused while Recovering); if it
    /// fails part-way, the service stays Recovering and its next tick starts over: each write set
    /// holds final values, so writing one twice changes nothing.
    pub(crate) async fn restore_previous_state(&self, data_dir: &std::path::Path) -> Result<bool, SubmitError> {
        use crate::recovery::Restore;
        let tx = self.store.begin().map_err(ApiError::from)?;
        let dir = data_dir.to_owned();
        let next = tokio::task::spawn_blocking(move || crate::recovery::next_restore(&tx, &dir))
            .await
            .map_err(|e| ApiError::internal(format!("the restore's thread failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("reading the previous ledger: {e:#}")))?;
        let (chunks, public) = match next {
            Restore::Nothing => return Ok(false),
            Restore::Public(chunks) => (chunks, true),
            Restore::Private(chunks) => (chunks, false),
        };
        let count = chunks.len();
        for ws in chunks {
            let work: Work<()> = Box::new(move |_, mut tx| {
                let result = (|| {
                    for (map, key, value) in ws.iter() {
                        match value {
                            Some(v) => tx.put(map, key, v),
                            None => drop(tx.remove(map, key)?),
                        }
                    }
                    Ok(Executed { value: (), commit: true, kind: TxKind::Gov, claims_digest: None })
                })();
                (tx, result)
            });
            self.writer.submit(work).await?;
        }
        let work: Work<()> = Box::new(move |_, mut tx| {
            let result = (|| {
                let mut service = gov::service(&tx)?.ok_or_else(|| ApiError::internal("gov.service is missing"))?;
                let commit = service.state == gov::ServiceState::Recovering;
                if commit && public {
                    tx.put(gov::RECOVERY, gov::RECOVERY_PUBLIC_DONE_KEY, b"true");
                } else if commit {
                    service.state = gov::ServiceState::Opening;
                    tx.put(gov::SERVICE, gov::SERVICE_KEY, &serde_json::to_vec(&service).expect("serializes"));
                }
                Ok(Executed { value: (), commit, kind: TxKind::Gov, claims_digest: None })
            })();
            (tx, result)
        });
        self.writer.submit(work).await?;
        if public {
            tracing::info!(
                entries = count,
                "recovering: the previous public state is back; waiting for recovery shares"
            );
        } else {
            tracing::info!(entries = count, "restored the previous service's private state; the service is Opening");
        }
        Ok(true)
    }

    /// A receipt for a committed transaction, if this node can give one yet.
    pub fn receipt(
        &self,
        id: TxId,
    ) -> Result<Result<cloister_ledger::verify::Receipt, cloister_ledger::index::ReceiptUnavailable>, ApiError> {
        let tx = self.store.begin()?;
        let index_failed = |e: cloister_ledger::merkle::MerkleError| {
            ApiError::internal(format!("reading the ledger index failed: {e}"))
        };
        let parts = cloister_ledger::index::receipt_parts(tx.snapshot(), id.seqno).map_err(index_failed)?;
        let parts = match parts {
            Ok(p) if p.leaf.term == id.term => p,
            Ok(_) => return Ok(Err(cloister_ledger::index::ReceiptUnavailable::NotFound)),
            Err(unavailable) => return Ok(Err(unavailable)),
        };
        let service = gov::service(&tx)?
            .ok_or_else(|| ApiError::internal("gov.service is missing: the service never ran genesis"))?;
        let size = cloister_ledger::index::state(tx.snapshot()).map_err(index_failed)?.size;
        let endorsement = endorse(&tx, &parts.signature.payload, size)?;
        let pem = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
        Ok(Ok(cloister_ledger::verify::Receipt {
            tx_id: id.to_string(),
            leaf: parts.leaf,
            proof: parts.proof.iter().map(hex::encode).collect(),
            node_cert: pem(&parts.signature.payload.node_cert),
            signature: parts.signature,
            endorsement: Some(endorsement),
            service_cert: service.cert,
            service_identity: service.identity.unwrap_or_default(),
        }))
    }

    /// The caller behind a client certificate, for an endpoint with the given audience.
    fn identify(&self, cert: Option<&[u8]>, auth: Auth) -> Result<Caller, ApiError> {
        let Some(der) = cert else {
            return Ok(Caller::anonymous());
        };
        match self.known_caller(der)? {
            Some(caller) => Ok(caller),
            None if auth == Auth::Public => Ok(Caller::anonymous()),
            None => Err(ApiError::unauthorized(format!(
                "client certificate {} belongs to no active member or user of this service",
                identity::id_of_der(der)
            ))),
        }
    }

    /// The active member or the user whose client certificate is `der`, if any, remembered
    /// until a `gov.` map next changes.
    fn known_caller(&self, der: &[u8]) -> Result<Option<Caller>, ApiError> {
        let gov_version = self.consensus.gov_version();
        let id = identity::id_of_der(der);
        if let Some(known) = self.callers.lock().expect("callers lock").get(gov_version, id.as_str()) {
            return Ok(known);
        }
        let tx = self.store.begin()?;
        let known = if gov::member_status(&tx, &id)? == Some(gov::MemberStatus::Active) {
            Some(Caller::member(id.clone()))
        } else if gov::is_user(&tx, &id)? {
            Some(Caller::user(id.clone()))
        } else {
            None
        };
        self.callers.lock().expect("callers lock").remember(gov_version, id, known.clone(), CALLERS_REMEMBERED_MAX);
        Ok(known)
    }

    /// Claims an in-flight slot for the caller, or refuses with 429.
    fn claim_inflight_slot(&self, caller: &Caller) -> Result<Option<Slot<'_>>, ApiError> {
        if caller.kind == CallerKind::Anonymous {
            return Ok(None);
        }
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let n = inflight.entry(caller.id.clone()).or_default();
        if *n >= self.limits.inflight_per_identity_max {
            return Err(ApiError::too_many(format!(
                "this identity already has {} requests in flight (inflight_per_identity_max)",
                self.limits.inflight_per_identity_max
            )));
        }
        *n += 1;
        Ok(Some(Slot { service: self, id: caller.id.clone() }))
    }

    /// Runs an app call end to end, within `request_timeout_ms`.
    pub(crate) async fn call_app(self: &Arc<Self>, call: AppCall) -> Result<AppReply, ApiError> {
        let timeout = Duration::from_millis(self.limits.request_timeout_ms);
        tokio::time::timeout(timeout, self.route_and_run(call)).await.unwrap_or_else(|_| {
            Err(ApiError::unavailable(format!(
                "the request took longer than {} ms (request_timeout_ms); a write may still commit",
                self.limits.request_timeout_ms
            )))
        })
    }

    async fn route_and_run(self: &Arc<Self>, call: AppCall) -> Result<AppReply, ApiError> {
        let mut resolved = self.resolve(&call).await;
        // A read sees every write this node answered before it (`wait_readable`), and so must
        // its route: a governance write this node relayed may have changed the app or the
        // caller's membership, and this node may not have applied it yet.
        if let Ok((_, endpoint, ..)) = &resolved
            && endpoint.mode == Mode::Readonly
            && self.consensus.acknowledged_pending()
        {
            self.wait_readable().await?;
            resolved = self.resolve(&call).await;
        }
        match resolved {
            Ok((module, endpoint, params, caller)) => {
                let (method, template) = (endpoint.method.clone(), endpoint.path.clone());
                let reply = self.run_routed(call, module, endpoint, params, caller).await;
                self.metrics.record_app(&method, &template, reply.as_ref().map_or_else(|e| e.status, |r| r.status));
                reply
            }
            // A follower may not have applied the app, its new endpoints or the caller's
            // membership yet: the leader's state is authoritative, so it answers instead.
            Err(e) if matches!(e.status, 401 | 404 | 405) && !self.consensus.is_leader() => {
                let head = RequestHead {
                    method: call.method,
                    path: call.path,
                    query: call.query,
                    headers: call.headers,
                    ..Default::default()
                };
                self.forward(head, call.body, ForwardParts { client_cert: call.client_cert, hops: call.hops }).await
            }
            Err(e) => Err(e),
        }
    }

    /// The call's endpoint and caller, from this node's applied state.
    async fn resolve(
        self: &Arc<Self>,
        call: &AppCall,
    ) -> Result<(Arc<LoadedModule>, abi::Endpoint, BTreeMap<String, String>, Caller), ApiError> {
        let module = self.app().await?.ok_or_else(|| ApiError::not_found("no app is installed on this service"))?;
        let Some((endpoint, params)) = module.manifest().find(&call.method, &call.path) else {
            return Err(if module.manifest().path_exists(&call.path) {
                ApiError::method_not_allowed(format!("{} is not allowed on /app{}", call.method, call.path))
            } else {
                ApiError::not_found(format!("no endpoint {} /app{}", call.method, call.path))
            });
        };
        let endpoint = endpoint.clone();
        let caller = self.identify(call.client_cert.as_deref(), endpoint.auth)?;
        Ok((module, endpoint, params, caller))
    }

    async fn run_routed(
        self: &Arc<Self>,
        call: AppCall,
        module: Arc<LoadedModule>,
        endpoint: abi::Endpoint,
        params: BTreeMap<String, String>,
        caller: Caller,
    ) -> Result<AppReply, ApiError> {
        abi::authorize(endpoint.auth, caller.kind).map_err(|(s, c, m)| ApiError::new(s, c, m))?;
        let _slot = self.claim_inflight_slot(&caller)?;
        let head = RequestHead {
            method: endpoint.method.clone(),
            path: call.path,
            route: endpoint.path.clone(),
            params,
            query: call.query,
            headers: call.headers,
            caller,
            request_id: format!("{}-{}", self.info.name, self.requests.fetch_add(1, Ordering::Relaxed)),
        };
        let linearizable = head.headers.get(CONSISTENCY_HEADER).is_some_and(|v| v == "linearizable");
        // A write a follower forwards is checked by the leader, whose state may be newer; a read
        // is checked once its node's state is one it may read (`read`).
        if endpoint.mode == Mode::Readwrite && self.consensus.is_leader() {
            self.ensure_open()?;
        }
        let forward = ForwardParts { client_cert: call.client_cert, hops: call.hops };
        match endpoint.mode {
            Mode::Readonly if !linearizable => self.read(module, head, call.body).await,
            Mode::Readonly => match self.consensus.read_barrier().await {
                Ok(()) => self.read(module, head, call.body).await,
                Err(ProposeError::NotLeader { .. }) => self.forward(head, call.body, forward).await,
                Err(e) => Err(ApiError::unavailable(format!("the linearizable read could not be confirmed: {e}"))),
            },
            Mode::Readwrite if !self.consensus.is_leader() => self.forward(head, call.body, forward).await,
            Mode::Readwrite => {
                let work = app_work(module, APP_NAMESPACE.into(), head.clone(), call.body.clone());
                match self.writer.submit(work).await {
                    Err(SubmitError::NotLeader) => self.forward(head, call.body, forward).await,
                    Err(SubmitError::Api(e)) => Err(e),
                    Ok(Written { value: reply, tx_id }) => Ok(AppReply { tx_id, ..reply }),
                }
            }
        }
    }

    /// Refuses app calls until members have opened the service.
    fn ensure_open(&self) -> Result<(), ApiError> {
        let gov_version = self.consensus.gov_version();
        let remembered = self.open.lock().expect("open lock").get(gov_version, &());
        let open = match remembered {
            Some(open) => open,
            None => {
                let open = gov::service_state(&self.store.begin()?)? == Some(gov::ServiceState::Open);
                self.open.lock().expect("open lock").remember(gov_version, (), open, 1);
                open
            }
        };
        if !open {
            return Err(ApiError::new(
                503,
                "ServiceNotOpen",
                "service not open: members must pass a transition_service_to_open proposal first",
            ));
        }
        Ok(())
    }

    /// Sends a call to the leader over the peer channel, at most `forward_hops_max` times.
    async fn forward(&self, head: RequestHead, body: bytes::Bytes, parts: ForwardParts) -> Result<AppReply, ApiError> {
        let leader = self.leader_for_forwarding(parts.hops).await?;
        let mut request = cloister_proto::peer::v1::ForwardRequest {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers.into_iter().collect(),
            body: body.to_vec(),
            client_cert: parts.client_cert.unwrap_or_default(),
            hops: parts.hops + 1,
            frontend: String::new(),
            ..Default::default()
        };
        if !request.client_cert.is_empty() {
            let (version, sealer) = self.joins.ledger_secrets().current();
            request.secret_version = version;
            request.caller_mac = caller_mac(&sealer, &request).to_vec();
        }
        self.send_forward(&leader, request).await
    }

    /// Checks that a forwarded app call naming a caller was forwarded by a holder of the ledger
    /// secret ([`caller_mac`]). The peer listener admits any certificate of the service CA, which
    /// an operator may hold; without this, its holder could forward calls as any member or user.
    fn check_caller_mac(&self, r: &cloister_proto::peer::v1::ForwardRequest) -> Result<(), tonic::Status> {
        let Some(sealer) = self.joins.ledger_secrets().get(r.secret_version) else {
            return Err(if r.caller_mac.is_empty() {
                tonic::Status::permission_denied(
                    "a forwarded call names a caller without a caller MAC (its node may run an older version); \
                     call this node directly",
                )
            } else {
                // A rekey the forwarding node applied before this one.
                tonic::Status::unavailable(format!(
                    "a forwarded call's caller MAC is under ledger secret version {}, which this node does not \
                     hold yet; retry",
                    r.secret_version
                ))
            });
        };
        let sent = <[u8; 32]>::try_from(r.caller_mac.as_slice()).ok().map(blake3::Hash::from);
        // blake3::Hash compares in constant time.
        if sent != Some(blake3::Hash::from(caller_mac(&sealer, r))) {
            return Err(tonic::Status::permission_denied(
                "a forwarded call's caller MAC does not verify: only a node holding the ledger secret names a caller",
            ));
        }
        Ok(())
    }

    /// The leader to forward to, waiting briefly for an election.
    async fn leader_for_forwarding(
        &self,
        hops: u32,
    ) -> Result<(cloister_consensus::NodeId, cloister_consensus::NodeAddr), ApiError> {
        let hops_max = self.consensus.forward_hops_max();
        if hops >= hops_max {
            return Err(ApiError::unavailable(format!(
                "the request was forwarded {hops_max} times without reaching the leader \
                 (forward_hops_max); retry"
            )));
        }
        if let Some(leader) = self.consensus.leader() {
            return Ok(leader);
        }
        let patience = Duration::from_millis(self.limits.request_timeout_ms / 2);
        if self.consensus.wait_for_leader(patience).await.is_err() {
            return Err(ApiError::unavailable("no leader is elected (is a majority of nodes up?); retry shortly"));
        }
        self.consensus.leader().ok_or_else(|| ApiError::unavailable("no leader is elected; retry shortly"))
    }

    async fn send_forward(
        &self,
        (id, leader): &(cloister_consensus::NodeId, cloister_consensus::NodeAddr),
        request: cloister_proto::peer::v1::ForwardRequest,
    ) -> Result<AppReply, ApiError> {
        let reply = (self.consensus.forward(*id, &leader.peer_url, request).await)
            .map_err(|e| ApiError::forward_failed(&leader.name, e))?;
        let reply = AppReply {
            status: u16::try_from(reply.status).unwrap_or(500),
            headers: reply.headers.into_iter().collect(),
            body: reply.body,
            tx_id: reply.tx_id.parse().ok(),
        };
        // The leader answers a write once committed; this node relays that answer, so its
        // next read must see the write too, although the commit may not have reached it yet.
        if let Some(tx) = reply.tx_id.filter(|_| (200..300).contains(&reply.status)) {
            self.consensus.acknowledge(tx.seqno);
        }
        Ok(reply)
    }

    /// Runs a signed governance write on the leader (forwarding it there if need be), within
    /// `request_timeout_ms`.
    pub(crate) async fn gov_write(
        self: &Arc<Self>,
        write: GovWrite,
        body: bytes::Bytes,
        hops: u32,
        source: Option<std::net::IpAddr>,
    ) -> Result<AppReply, ApiError> {
        let timeout = Duration::from_millis(self.limits.request_timeout_ms);
        let run = async {
            let (checked, address) = self.gov_precheck(&write, &body, source).await?;
            let mut address = Some(address);
            let _prechecked = match checked {
                Ok(prechecked) => Some(prechecked),
                Err(e) if leaders_to_decide(&e) && !self.consensus.is_leader() => None,
                Err(e) => return Err(e),
            };
            if self.consensus.is_leader() {
                // The writer's queue bounds what waits there; the address's share was the check's.
                address.take();
                let settings = self.gov.clone();
                let w = write.clone();
                let b = body.clone();
                let work: Work<serde_json::Value> = Box::new(move |runtime, tx| {
                    let now = cloister_crypto::cose::unix_now();
                    let policy = settings.policy(now);
                    let (tx, result) = gov::execute(runtime, tx, &w, &b, &policy);
                    let executed = result.map_err(ApiError::from).map(|answer| Executed {
                        value: answer,
                        commit: true,
                        kind: TxKind::Gov,
                        claims_digest: None,
                    });
                    (tx, executed)
                });
                match self.writer.submit(work).await {
                    // Leadership moved while it waited: forwarded now, it holds a share again.
                    Err(SubmitError::NotLeader) => {
                        address = Some(self.gov_checks.address_share(source).map_err(|address| {
                            ApiError::too_many_retry_after(
                                format!(
                                    "too many governance requests from {address} are on their way to the \
                                     leader (gov_checks_per_address_max); retry shortly"
                                ),
                                GOV_CHECK_RETRY_AFTER_S,
                            )
                        })?);
                    }
                    Err(SubmitError::Api(e)) => return Err(e),
                    Ok(Written { value: answer, tx_id }) => {
                        return Ok(AppReply {
                            status: 200,
                            headers: [("content-type".to_owned(), "application/json".to_owned())].into(),
                            body: answer.to_string().into_bytes(),
                            tx_id,
                        });
                    }
                }
            }
            let leader = self.leader_for_forwarding(hops).await?;
            let request = cloister_proto::peer::v1::ForwardRequest {
                method: "POST".into(),
                path: write.path(),
                body: body.to_vec(),
                hops: hops + 1,
                frontend: GOV_FRONTEND.into(),
                ..Default::default()
            };
            // The leader counts forwarded requests against its overall bound only (they come
            // from a node, not from their client's address), so this node holds the address's
            // share until the leader answers: else one address, checked here in turn, could
            // keep any number of requests at the leader and fill its checks.
            let answer = self.send_forward(&leader, request).await;
            drop(address);
            answer
        };
        tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
            Err(ApiError::unavailable(format!(
                "the request took longer than {} ms (request_timeout_ms); it may still commit",
                self.limits.request_timeout_ms
            )))
        })
    }

    /// Checks a signed request on the blocking pool against committed state (see
    /// [`gov::precheck`]), within the bounds of [`GovChecks`], before it may queue for the writer.
    /// Err when no check slot was free; else the check's outcome, and the source address's
    /// share, which the caller holds for as long as the request is its to answer.
    async fn gov_precheck(
        &self,
        write: &GovWrite,
        body: &bytes::Bytes,
        source: Option<std::net::IpAddr>,
    ) -> Result<(Result<Prechecked, ApiError>, AddressShare), ApiError> {
        let slot = self.gov_checks.claim(source)?;
        let tx = self.store.begin()?;
        let policy = self.gov.policy(cloister_crypto::cose::unix_now());
        let (write, body, runtime) = (write.clone(), body.clone(), self.runtime.clone());
        let (checked, overall, address) = slot
            .run(move || gov::precheck(&runtime, &tx, &write, &body, &policy))
            .await
            .map_err(|e| ApiError::internal(format!("the governance check stopped: {e}")))?;
        // Only a request carrying modules holds its overall share on: the memory it holds is theirs.
        let checked = checked
            .map_err(ApiError::from)
            .map(|modules| Prechecked { _overall: (!modules.is_empty()).then_some(overall), _modules: modules });
        Ok((checked, address))
    }

    /// A joining node's evidence: verified against the governed policy with the nonce this leader
    /// issued, then recorded in `gov.nodes` (Trusted while the service is Opening, else Pending)
    /// unless the node has a record already. A Trusted node gets the ledger secret, sealed to its key.
    pub async fn attest(
        self: &Arc<Self>,
        cert: Vec<u8>,
        request: cloister_proto::peer::v1::AttestRequest,
    ) -> Result<cloister_proto::peer::v1::AttestReply, tonic::Status> {
        use cloister_attestation::{Evidence, Nonce};
        if !self.consensus.is_leader() {
            return Err(self.consensus.not_leader_status());
        }
        let (id, addr): (NodeId, NodeAddr) = cloister_consensus::types::decode(&request.node, "an attest request")
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if cloister_crypto::node_id_of(&cert) != id {
            return Err(tonic::Status::permission_denied(format!("node {id} is not the node of this TLS certificate")));
        }
        let refused = |e: cloister_attestation::Refusal| {
            tracing::warn!(node = %addr.name, id, check = e.check.as_str(), detail = %e.detail, "attestation refused");
            self.metrics.record_attestation(false);
            tonic::Status::permission_denied(e.to_string())
        };
        // Unavailable, which the joining node retries: a leader whose genesis has not committed
        // yet has no policy to judge by.
        let policy = attest::policy(&self.store.begin().map_err(|e| ApiError::from(e).to_status())?)
            .map_err(|e| ApiError::from(e).to_status())?
            .ok_or_else(|| tonic::Status::unavailable("the service's genesis has not committed yet"))?;
        let nonce = Nonce::from_slice(&request.nonce).map_err(refused)?;
        // The joining node's nonce goes into the transcript this node signs: 32 bytes, nothing else.
        Nonce::from_slice(&request.joiner_nonce)
            .map_err(|e| tonic::Status::invalid_argument(format!("joiner_nonce: {e}; this node signs only a nonce")))?;
        self.joins.nonces.redeem(&nonce, id).map_err(refused)?;
        // A node that attests again after its log was replicated lost its data folder: its log and
        // its vote are gone, and as a voter under the same id it could vote twice in a term (and
        // openraft asserts against a follower's log going back).
        if self.consensus.holds_replicated_log(id) {
            return Err(tonic::Status::permission_denied(format!(
                "node {id} has acknowledged entries of this leader's log, so it lost its data folder to be \
                 attesting again: it joins again with a new certificate (and a remove_node proposal for this one)"
            )));
        }
        let evidence = Evidence::from_json(&request.evidence).map_err(refused)?;
        let spki = attest::spki_of(&cert).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let encryption_key = cloister_crypto::envelope::public_key_pem(&request.encryption_key)
            .map_err(|e| tonic::Status::invalid_argument(format!("encryption_key: {e}")))?;
        let expected = attest::join_binding(&spki, &request.encryption_key, &nonce);
        let verified = cloister_attestation::verify(&evidence, &policy, Some(&expected)).map_err(refused)?;
        tracing::info!(node = %addr.name, id, measurement = %verified.measurement, "attestation verified");
        self.metrics.record_attestation(true);

        let key = id.to_string();
        let update = attest::KeyUpdate {
            node: key.clone(),
            encryption_key: encryption_key.clone(),
            evidence: serde_json::to_value(&evidence).expect("evidence serializes"),
            verified: attest::verified_json(&verified),
        };
        let work: Work<(gov::NodeStatus, bool)> = Box::new(move |_, mut tx| {
            let result = (|| {
                let existing = gov::node(&tx, &key)?;
                let (status, commit) = match existing {
                    Some(n) if n.status == gov::NodeStatus::Retired => {
                        return Err(ApiError::forbidden(format!("node {key} is retired")));
                    }
                    // Its record has another key, or none: taken in after the answer.
                    Some(n) => ((n.status, n.encryption_key.as_ref() != Some(&encryption_key)), false),
                    None => {
                        let state = gov::service(&tx)?.map(|s| s.state);
                        // The previous ledger the private state comes from is on the recovering
                        // node alone: no other node may lead before that state is back.
                        if state == Some(gov::ServiceState::Recovering) {
                            return Err(ApiError::unavailable(
                                "the service is recovering: nodes join once its private state is back (Opening)",
                            ));
                        }
                        let opening = state == Some(gov::ServiceState::Opening);
                        let record =
                            attest::record(&addr.name, &cert, encryption_key.clone(), opening, &evidence, &verified);
                        tx.put(
                            gov::NODES,
                            key.as_bytes(),
                            &serde_json::to_vec(&record).expect("a node record serializes"),
                        );
                        ((record.status, false), true)
                    }
                };
                Ok(Executed { value: status, commit, kind: TxKind::Gov, claims_digest: None })
            })();
            (tx, result)
        });
        let status = match self.writer.submit(work).await {
            Ok(written) if written.value.1 => {
                if self.joins.key_updates.lock().expect("key updates lock").insert(update.node.clone()) {
                    tokio::spawn(record_new_key(Arc::downgrade(self), update));
                }
                written.value.0
            }
            Ok(written) => written.value.0,
            Err(SubmitError::NotLeader) => return Err(self.consensus.not_leader_status()),
            Err(SubmitError::Api(e)) if e.status == 403 => return Err(tonic::Status::permission_denied(e.message)),
            Err(SubmitError::Api(e)) => return Err(e.to_status()),
        };
        let (sealed_secret, transcript_signature) = if status == gov::NodeStatus::Trusted {
            self.joins
                .grant_secret(&request.joiner_nonce, &request.nonce, &spki, &request.encryption_key)
                .map_err(|e| tonic::Status::internal(e.to_string()))?
        } else {
            Default::default()
        };
        Ok(cloister_proto::peer::v1::AttestReply { status: format!("{status:?}"), sealed_secret, transcript_signature })
    }

    /// Whether the node with `cert` may make a peer request of kind `rpc`.
    pub(crate) fn authorize_peer(&self, cert: &[u8], rpc: PeerRpc) -> Result<(), tonic::Status> {
        let standing = self.peer_standing(cert).map_err(|e| e.to_status())?;
        attest::admit_peer(standing, rpc, cert, self.joins.join_leader.as_deref())
            .map_err(tonic::Status::permission_denied)
    }

    /// `cert`'s standing in the applied state, remembered until a `gov.` map next changes. The
    /// version is taken before the transaction begins, so a standing is never remembered under
    /// a version newer than the state it was read from.
    fn peer_standing(&self, cert: &[u8]) -> Result<attest::Standing, ApiError> {
        let gov_version = self.consensus.gov_version();
        if let Some(standing) = self.peer_standings.lock().expect("peer standings lock").get(gov_version, cert) {
            return Ok(standing);
        }
        let standing = attest::standing(&self.store.begin()?, cert)?;
        self.peer_standings.lock().expect("peer standings lock").remember(
            gov_version,
            cert.to_vec(),
            standing,
            PEER_STANDINGS_MAX,
        );
        Ok(standing)
    }

    /// A committed read of the governance tables.
    pub(crate) fn gov_read<T>(&self, read: impl FnOnce(&Tx) -> Result<T, ApiError>) -> Result<T, ApiError> {
        read(&self.store.begin()?)
    }

    /// A committed read of public state for a client (the governance tables, the nodes'
    /// records), on the blocking pool and in a slot of `reads_inflight_max`. Some decode every
    /// record of a table (every proposal ever filed, with the modules it carried): run on the
    /// async workers, an anonymous client asking in a loop held up every other request.
    pub(crate) async fn public_read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Tx) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        self.in_read_slot(move || read(&store.begin()?)).await
    }

    /// Runs `work` on the blocking pool, in a slot of `reads_inflight_max`, once one is free
    /// within `request_timeout_ms` (503 otherwise).
    pub(crate) async fn in_read_slot<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let timeout = Duration::from_millis(self.limits.request_timeout_ms);
        let permit = tokio::time::timeout(timeout, self.reads.clone().acquire_owned())
            .await
            .map_err(|_| {
                ApiError::unavailable(format!(
                    "no read slot came free within {} ms (request_timeout_ms; reads_inflight_max are busy)",
                    self.limits.request_timeout_ms
                ))
            })?
            .map_err(|_| ApiError::unavailable("the node is shutting down"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ApiError::internal(format!("a read of the node's state stopped: {e}")))?
    }

    /// Runs a read-only request on the blocking pool against committed state.
    async fn read(
        self: &Arc<Self>,
        module: Arc<LoadedModule>,
        head: RequestHead,
        body: bytes::Bytes,
    ) -> Result<AppReply, ApiError> {
        self.wait_readable().await?;
        self.ensure_open()?;
        let permit =
            self.reads.clone().acquire_owned().await.map_err(|_| ApiError::unavailable("the node is shutting down"))?;
        let service = self.clone();
        tokio::task::spawn_blocking(move || {
            // Held by the read itself, not by the request: a client that resets its stream drops
            // the request, but the contract runs on to its end, and a permit freed with the
            // request let resets run more reads at once than `reads_inflight_max` (and, past
            // `instances_max`, refuse every write).
            let _permit = permit;
            let tx = service.store.begin()?;
            let inv = Invocation {
                head: &head,
                body: &body,
                mode: Mode::Readonly,
                namespace: APP_NAMESPACE,
                privilege: Privilege::App,
            };
            let (_, result) = service.runtime.execute(&module, inv, tx);
            let response = result?.response;
            Ok(AppReply {
                status: response.head.status,
                headers: response.head.headers,
                body: response.body,
                tx_id: None,
            })
        })
        .await
        .map_err(|e| ApiError::internal(format!("the request's thread failed: {e}")))?
    }
}

/// Takes a node's new encryption key into its `gov.nodes` record, with the evidence that bound
/// it. A node started again on a new data folder (or recorded by an older version, with no key)
/// has a key its record lacks; its evidence, just verified, binds that key inside an approved
/// guest, and rekeys are sealed to it once recorded. This runs after the node's answer: when the
/// node is one of two, the write commits only once the node is back, so it is tried again, every
/// `KEY_UPDATE_RETRY_MS`, for `KEY_UPDATE_ATTEMPTS` tries, while this node leads.
async fn record_new_key(service: std::sync::Weak<Service>, update: attest::KeyUpdate) {
    /// Gives the node's claim in `Joins::key_updates` back, however the task ends.
    struct Claim(std::sync::Weak<Service>, String);
    impl Drop for Claim {
        fn drop(&mut self) {
            if let Some(service) = self.0.upgrade() {
                service.joins.key_updates.lock().expect("key updates lock").remove(&self.1);
            }
        }
    }
    let node = update.node.clone();
    let _claim = Claim(service.clone(), node.clone());
    for _ in 0..attest::KEY_UPDATE_ATTEMPTS {
        let Some(service) = service.upgrade() else { return };
        let update = update.clone();
        let work: Work<()> = Box::new(move |_, mut tx| {
            let result = (|| {
                let commit = match gov::node(&tx, &update.node)? {
                    Some(n)
                        if n.status != gov::NodeStatus::Retired
                            && n.encryption_key != Some(update.encryption_key.clone()) =>
                    {
                        let record = gov::NodeRecord {
                            encryption_key: Some(update.encryption_key),
                            evidence: update.evidence,
                            verified: update.verified,
                            ..n
                        };
                        tx.put(
                            gov::NODES,
                            update.node.as_bytes(),
                            &serde_json::to_vec(&record).expect("a node record serializes"),
                        );
                        true
                    }
                    _ => false,
                };
                Ok(Executed { value: (), commit, kind: TxKind::Gov, claims_digest: None })
            })();
            (tx, result)
        });
        match service.writer.submit(work).await {
            Ok(_) => {
                tracing::info!(%node, "recorded the node's new encryption key");
                return;
            }
            Err(SubmitError::NotLeader) => return,
            Err(SubmitError::Api(e)) => {
                tracing::warn!(%node, error = %e.message, "recording the node's new encryption key failed; retrying")
            }
        }
        drop(service);
        tokio::time::sleep(std::time::Duration::from_millis(attest::KEY_UPDATE_RETRY_MS)).await;
    }
    tracing::error!(%node, "the node's new encryption key was not recorded: it will not open the next rekey until it attests again");
}

/// Writes forwarded by other nodes run here as if their client had called this node.
pub struct ServiceForwarder(pub std::sync::Weak<Service>);

impl ServiceForwarder {
    fn service(&self) -> Result<Arc<Service>, tonic::Status> {
        self.0.upgrade().ok_or_else(|| tonic::Status::unavailable("the node is shutting down"))
    }
}

#[tonic::async_trait]
impl Forwarder for ServiceForwarder {
    async fn challenge(
        &self,
        peer_cert: Vec<u8>,
        request: cloister_proto::peer::v1::ChallengeRequest,
    ) -> Result<cloister_proto::peer::v1::ChallengeReply, tonic::Status> {
        let service = self.service()?;
        if !service.consensus.is_leader() {
            return Err(service.consensus.not_leader_status());
        }
        service.joins.challenge(cloister_crypto::node_id_of(&peer_cert), &request.nonce).await
    }

    async fn attest(
        &self,
        peer_cert: Vec<u8>,
        request: cloister_proto::peer::v1::AttestRequest,
    ) -> Result<cloister_proto::peer::v1::AttestReply, tonic::Status> {
        self.service()?.attest(peer_cert, request).await
    }

    fn authorize(&self, peer_cert: &[u8], rpc: PeerRpc) -> Result<(), tonic::Status> {
        self.service()?.authorize_peer(peer_cert, rpc)
    }

    async fn forward(
        &self,
        r: cloister_proto::peer::v1::ForwardRequest,
    ) -> Result<cloister_proto::peer::v1::ForwardReply, tonic::Status> {
        let service = self.0.upgrade().ok_or_else(|| tonic::Status::unavailable("the node is shutting down"))?;
        let result = if r.frontend == GOV_FRONTEND {
            match GovWrite::from_path(&r.path) {
                // Forwarded by a node that checked it already; the node is no flood source.
                Some(write) => service.gov_write(write, r.body.into(), r.hops, None).await,
                None => Err(ApiError::not_found(format!("no governance endpoint {}", r.path))),
            }
        } else {
            if !r.client_cert.is_empty() {
                service.check_caller_mac(&r)?;
            }
            service
                .call_app(AppCall {
                    method: r.method,
                    path: r.path,
                    query: r.query,
                    headers: r.headers.into_iter().collect(),
                    body: r.body.into(),
                    client_cert: (!r.client_cert.is_empty()).then_some(r.client_cert),
                    hops: r.hops,
                })
                .await
        };
        let reply = match result {
            Ok(reply) => reply,
            Err(e) => AppReply {
                status: e.status,
                headers: [("content-type".to_owned(), "application/json".to_owned())].into(),
                body: e.body().to_string().into_bytes(),
                tx_id: e.tx_id,
            },
        };
        Ok(cloister_proto::peer::v1::ForwardReply {
            status: u32::from(reply.status),
            headers: reply.headers.into_iter().collect(),
            body: reply.body,
            tx_id: reply.tx_id.map(|t| t.to_string()).unwrap_or_default(),
        })
    }
}

/// Whether committed state has a Trusted node without an endorsement, a Retired one whose
/// endorsement is open, or no service identity: whether the leader has endorsements to write.
fn endorsements_lag(tx: &Tx) -> Result<bool, ApiError> {
    if gov::service(tx)?.is_some_and(|s| s.identity.is_none()) {
        return Ok(true);
    }
    for (id, node) in gov::all::<gov::NodeRecord>(tx, gov::NODES)? {
        let current: Option<gov::EndorsementRecord> = gov::get(tx, gov::ENDORSEMENTS, id.as_bytes())?;
        match (node.status, current) {
            (gov::NodeStatus::Trusted, None) => return Ok(true),
            (gov::NodeStatus::Retired, Some(e)) if e.until.is_none() => return Ok(true),
            (_, Some(e)) if e.signature.is_none() => return Ok(true),
            _ => {}
        }
    }
    Ok(false)
}

/// The service identity's endorsement of the node that made `sig`, as of a ledger of `size`
/// entries: bounded by its retirement if it was retired, else by `size`.
fn endorse(
    tx: &Tx,
    sig: &cloister_ledger::entry::SignaturePayload,
    size: u64,
) -> Result<cloister_ledger::entry::Endorsement, ApiError> {
    let id = sig.node_id.to_string();
    let record: gov::EndorsementRecord = gov::get(tx, gov::ENDORSEMENTS, id.as_bytes())?.ok_or_else(|| {
        ApiError::unavailable(format!(
            "node {id}, which signed the ledger over this transaction, has no endorsement by the service identity \
             (it signed before this service had endorsements)"
        ))
    })?;
    if record.cert_sha256 != hex::encode(cloister_ledger::entry::cert_sha256(&sig.node_cert)) {
        return Err(ApiError::internal(format!("node {id} signed with a certificate its endorsement does not name")));
    }
    let key = gov::service_identity_key(tx)?
        .ok_or_else(|| ApiError::unavailable("this service has no identity yet: its leader creates one shortly"))?;
    let (bound, retired) = match record.until {
        Some(until) => (until, true),
        None => (size, false),
    };
    cloister_ledger::entry::Endorsement::issue(&sig.node_cert, bound, retired, &key)
        .map_err(|e| ApiError::internal(format!("endorsing node {id}: {e:#}")))
}

/// Compiles the installed app and constitution as soon as this node's applied state holds
/// them, and again whenever governance changes (`gov_changes`: an app or constitution set by
/// proposal), until cancelled. Otherwise a node compiles each on the first call that needs it (a
/// follower its app on its first client call, a new leader its constitution on its first
/// proposal), and every call that arrives meanwhile waits: the peers bench saw the first
/// writes through each follower of a fresh reconcile network wait 0.8–1.1 s. A module already
/// compiled is a cache hit. Holds the service weakly, so a node shutting down closes its
/// databases.
pub(crate) async fn keep_modules_compiled(
    service: std::sync::Weak<Service>,
    mut gov_changes: tokio::sync::watch::Receiver<u64>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        gov_changes.borrow_and_update();
        let Some(s) = service.upgrade() else { return };
        if let Err(e) = s.compile_installed().await {
            tracing::warn!(error = %e.message, "compiling the installed modules failed; a call that needs one tries again");
        }
        drop(s);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = gov_changes.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a follower forwards though its own check refused it: what its lagging state may
    /// refuse wrongly. Not what no state makes valid, nor a replay.
    #[test]
    fn a_follower_leaves_to_the_leader_only_what_its_state_may_get_wrong() {
        use gov::Refusal::{Conflict, Forbidden, Malformed, Unauthenticated};
        let refused = |kind, code| ApiError::from(gov::refuse(kind, code, "…"));
        assert!(leaders_to_decide(&refused(Unauthenticated, "NotAMember")));
        assert!(leaders_to_decide(&refused(Forbidden, "MemberNotActive")));
        assert!(leaders_to_decide(&refused(Conflict, gov::TOO_MANY_OPEN_PROPOSALS)));
        assert!(!leaders_to_decide(&refused(Unauthenticated, gov::BAD_SIGNATURE)));
        assert!(!leaders_to_decide(&refused(Conflict, "Replay")));
        assert!(!leaders_to_decide(&refused(Malformed, "MalformedSignedRequest")));
    }
    use attest::Standing;

    /// A value is used only at the `gov.` version it was read at: a retirement (any `gov.`
    /// change) is seen at the next message, and one read before a change never answers after it.
    #[test]
    fn a_remembered_value_answers_only_at_its_gov_version() {
        let mut standings = GovMemo::<Vec<u8>, Standing>::default();
        standings.remember(3, b"node-a".to_vec(), Standing::Trusted, PEER_STANDINGS_MAX);
        assert_eq!(standings.get(3, b"node-a".as_slice()), Some(Standing::Trusted));
        assert_eq!(standings.get(3, b"node-b".as_slice()), None, "another certificate");
        assert_eq!(standings.get(4, b"node-a".as_slice()), None, "a gov change since");

        standings.remember(4, b"node-a".to_vec(), Standing::Retired, PEER_STANDINGS_MAX);
        assert_eq!(standings.get(4, b"node-a".as_slice()), Some(Standing::Retired));
        // A reader that took version 3 before the change finishes after it: what it brings
        // replaces the newer standings, and answers nobody at version 4.
        standings.remember(3, b"node-b".to_vec(), Standing::Trusted, PEER_STANDINGS_MAX);
        assert_eq!(standings.get(4, b"node-a".as_slice()), None);
        assert_eq!(standings.get(4, b"node-b".as_slice()), None);
    }

    /// A governance check's slot is held until the check itself returns: a client that hangs up
    /// mid-check does not free it. (Freed with the request, each hang-up left a check running
    /// outside the bound: one address could keep any number of them busy.)
    #[tokio::test]
    async fn a_check_holds_its_slot_after_its_client_has_gone() {
        let limits = Limits { gov_checks_per_address_max: 1, gov_checks_inflight_max: 4, ..Limits::default() };
        let checks = Arc::new(GovChecks::new(&limits));
        let address = Some(std::net::IpAddr::from([192, 0, 2, 7]));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let check = checks.claim(address).unwrap().run(move || held.recv().is_ok());
        // The client hangs up: nobody awaits the check any more.
        drop(check);
        let refused = checks.claim(address).err().expect("the running check still holds the address's slot");
        assert_eq!(refused.status, 429, "{}", refused.message);
        assert!(refused.message.contains("gov_checks_per_address_max"), "{}", refused.message);
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while checks.claim(address).is_err() {
            assert!(std::time::Instant::now() < deadline, "the slot was never released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A check hands back both shares: the overall one, which a proposal with modules holds until
    /// it is answered (`gov_checks_inflight_max` bounds those on their way to the writer, and the
    /// modules they hold), and the address's, which a follower holds while it forwards.
    #[tokio::test]
    async fn a_checked_write_holds_its_shares_until_answered() {
        let limits = Limits { gov_checks_per_address_max: 1, gov_checks_inflight_max: 1, ..Limits::default() };
        let checks = Arc::new(GovChecks::new(&limits));
        let address = std::net::IpAddr::from([192, 0, 2, 7]);
        let ((), overall, share) = checks.claim(Some(address)).unwrap().run(|| ()).await.unwrap();
        assert_eq!(checks.per_address.lock().unwrap().get(&address), Some(&1), "the share is held");
        drop(share);
        assert_eq!(checks.per_address.lock().unwrap().get(&address), None, "the address's share is back");
        let refused = checks.claim(None).err().expect("the checked write still holds the overall share");
        assert!(refused.message.contains("gov_checks_inflight_max"), "{}", refused.message);
        drop(overall);
        checks.claim(Some(address)).expect("answered, the write gave its share back");
    }

    /// Keys past the bound (PEER_STANDINGS_MAX, CALLERS_REMEMBERED_MAX) start the memory over
    /// instead of growing it.
    #[test]
    fn remembered_values_are_bounded() {
        for max in [PEER_STANDINGS_MAX, CALLERS_REMEMBERED_MAX] {
            let mut memo = GovMemo::<Vec<u8>, Standing>::default();
            for n in 0..max {
                memo.remember(1, n.to_le_bytes().to_vec(), Standing::Pending, max);
            }
            assert_eq!(memo.entries.len(), max);
            assert_eq!(memo.get(1, 0usize.to_le_bytes().as_slice()), Some(Standing::Pending));
            memo.remember(1, b"one more".to_vec(), Standing::Trusted, max);
            assert_eq!(memo.entries.len(), 1);
            assert_eq!(memo.get(1, b"one more".as_slice()), Some(Standing::Trusted));
            assert_eq!(memo.get(1, 0usize.to_le_bytes().as_slice()), None);
        }
    }
}
