//! The node's configuration file (TOML). Every field is documented here, every limit has a named
//! default, and relative paths are resolved against the file's own directory.
//!
//! ```toml
//! [node]
//! name = "node0"
//! data_dir = "data/node0"          # state database (and later the ledger) live here
//! rest_addr = "127.0.0.1:8000"     # HTTPS (REST)
//! grpc_addr = "127.0.0.1:8001"     # gRPC over TLS
//! peer_addr = "127.0.0.1:8002"     # node-to-node: Raft, forwarding, joins (mutual TLS)
//!
//! [network]
//! join = "https://127.0.0.1:8002"  # a member's peer URL; absent: this node starts the service
//!
//! [tls]
//! service_cert = "service.cert.pem"  # the service CA; clients trust it
//! node_cert = "node0.cert.pem"       # this node's certificate, issued by the service CA
//! node_key = "node0.key.pem"
//!
//! [genesis]                          # read only when the data folder is new
//! members = ["member0.cert.pem",     # a member, or a recovery member with its encryption key:
//!   { cert = "member1.cert.pem", encryption_key = "member1.enc.pub.pem" }]
//! recovery_threshold = 1             # optional; default: a majority of the recovery members
//! users = []
//! app = "reconcile.wasm"             # optional
//! attestation = "amd"                # or "mock": pin the test ARK of `attestation.mock_root`
//!
//! [attestation]                      # this node's evidence; see `AttestationSection`
//! kind = "snp"                       # snp | azure-vtpm | mock
//!
//! [limits]                           # see `Limits` for every field and default
//! [raft]                             # see `RaftSection`
//! [wasm]                             # see `wasm::Limits`
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use cloister_runtime as wasm;

pub use cloister_consensus::settings::*;
pub use cloister_ledger::settings::*;

pub(crate) const BODY_BYTES_MAX: usize = 8 << 20;
/// Default of `limits.body_bytes_inflight_max`: 32 bodies of the largest size.
pub(crate) const BODY_BYTES_INFLIGHT_MAX: usize = 256 << 20;
/// Default of `limits.body_bytes_per_address_max`: a quarter of the whole.
pub(crate) const BODY_BYTES_PER_ADDRESS_MAX: usize = 64 << 20;
pub(crate) const BODY_TIMEOUT_MS: u64 = 10_000;
pub(crate) const CONNECTIONS_MAX: usize = 1024;
pub(crate) const REQUEST_TIMEOUT_MS: u64 = 30_000;
pub(crate) const INFLIGHT_PER_IDENTITY_MAX: usize = 256;
pub(crate) const WRITE_QUEUE_MAX: usize = 4096;
pub(crate) const GROUP_COMMIT_MAX: usize = 256;
pub(crate) const PENDING_WRITES_MAX: usize = 1024;
pub(crate) const GOV_CHECKS_INFLIGHT_MAX: usize = 16;
pub(crate) const GOV_CHECKS_PER_ADDRESS_MAX: usize = 2;
/// What one write adds to a log entry beyond its key and value bytes, at most: its stored map
/// name (a guest map name is at most 128 bytes, plus the app's namespace) and the lengths.
pub(crate) const ENTRY_FRAMING_BYTES: usize = 160;
pub(crate) const READS_INFLIGHT_MAX: usize = 32;
pub(crate) const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub(crate) const HELLO_TIMEOUT_MS: u64 = 500;
pub(crate) const IDLE_CONNECTION_TIMEOUT_MS: u64 = 60_000;
pub(crate) const HEADERS_TIMEOUT_MS: u64 = 30_000;
pub(crate) const CONNECTIONS_PER_ADDRESS_MAX: usize = 256;
pub(crate) const CONNECTIONS_PER_NODE_MAX: usize = 16;
/// The least `limits.connections_per_node_max` may be: a node keeps one connection to each peer,
/// and opens another while the first is being closed, or for each attempt to join.
pub const CONNECTIONS_PER_NODE_MIN: usize = 4;
pub(crate) const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// The least `limits.streams_per_connection_max` may be: one connection between two nodes carries
/// a replication stream, a forwarding stream, votes, snapshots and joins at once.
pub const STREAMS_PER_CONNECTION_MIN: u32 = 8;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub tls: TlsSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub genesis: GenesisSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub gov: GovSection,
    #[serde(default)]
    pub wasm: wasm::Limits,
    #[serde(default)]
    pub attestation: AttestationSection,
}

/// The roots of trust a new service pins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenesisAttestation {
    /// AMD's Milan, Genoa and Turin ARKs: production.
    #[default]
    Amd,
    /// The test ARK of the mock firmware in `attestation.mock_root`: for tests and sandboxes.
    Mock,
}

/// How this node attests itself, and how long its challenges live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestationSection {
    /// The kind of evidence this node produces.
    pub kind: cloister_attestation::Kind,
    /// `snp`: a VCEK file (DER or PEM) for hosts that do not supply one with the extended report.
    pub vcek_file: Option<PathBuf>,
    /// `azure-vtpm`: where THIM serves the VCEK chain.
    pub thim_url: String,
    /// `mock`: the folder of the mock firmware's test ARK and ASK (generated there if absent).
    pub mock_root: Option<PathBuf>,
    /// `mock`: the launch measurement to report (hex, 48 bytes); the default mock measurement
    /// when absent.
    pub mock_measurement: Option<String>,
    /// `mock`: the host_data to report (hex, 32 bytes); zeros when absent.
    pub mock_host_data: Option<String>,
    /// How long a nonce this node issues to a joining node stays valid, in seconds.
    pub nonce_ttl_s: u64,
    /// The launch measurements (hex, 48 bytes) this node accepts from the leader it joins
    /// through. Empty: any measurement, once the rest of the leader's evidence verifies.
    pub join_measurements: Vec<String>,
}

impl Default for AttestationSection {
    fn default() -> Self {
        AttestationSection {
            kind: cloister_attestation::Kind::Snp,
            vcek_file: None,
            thim_url: cloister_attestation::thim::THIM_URL_DEFAULT.to_owned(),
            mock_root: None,
            mock_measurement: None,
            mock_host_data: None,
            nonce_ttl_s: cloister_attestation::NONCE_TTL_S,
            join_measurements: Vec::new(),
        }
    }
}

/// Who the node is and where it listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// A name for logs and `/node/network`.
    pub name: String,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// Address of the HTTPS (REST) listener.
    pub rest_addr: String,
    /// Address of the gRPC listener.
    pub grpc_addr: String,
    /// Address of the node-to-node listener (Raft, forwarded writes, joins), mutual TLS only.
    pub peer_addr: String,
}

/// How this node finds its network.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// The peer URL (`https://host:port`) of a node of the network to join. Absent: a new data
    /// folder starts a new service from `[genesis]`. Ignored once the node holds state.
    #[serde(default)]
    pub join: Option<String>,
    /// A previous service's ledger folder to recover from (`cloister node recover`): a new data
    /// folder then starts a Recovering service from that ledger's public state. Ignored once
    /// the node holds state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover: Option<PathBuf>,
}

/// Governance settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GovSection {
    /// How far a signed request's `created_at` may be from the node's clock, either way, in
    /// seconds. Older requests are refused, and replays are caught within this window.
    pub request_window_s: u64,
    /// How many Open proposals one member may have at once; one more is refused (409,
    /// `TooManyOpenProposals`) until one of them leaves Open (accepted, rejected, failed,
    /// withdrawn or dropped). The leader's bound is the service's: a follower forwards.
    pub proposals_open_per_member_max: usize,
}

impl GovSection {
    /// What the governance engine checks requests against, at `now` (seconds since the epoch).
    pub fn policy(&self, now: u64) -> crate::gov::RequestPolicy {
        crate::gov::RequestPolicy {
            request_window_s: self.request_window_s,
            now,
            proposals_open_per_member_max: self.proposals_open_per_member_max,
        }
    }
}

impl Default for GovSection {
    fn default() -> Self {
        GovSection {
            request_window_s: crate::gov::REQUEST_WINDOW_S,
            proposals_open_per_member_max: crate::gov::PROPOSALS_OPEN_PER_MEMBER_MAX,
        }
    }
}

/// The node's TLS identity. Client certificates are not checked against any CA: the service
/// knows its members and users by the SHA-256 of their certificates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The service CA certificate (PEM), which clients pin.
    pub service_cert: PathBuf,
    /// This node's certificate (PEM), issued by the service CA.
    pub node_cert: PathBuf,
    /// This node's private key (PEM, PKCS#8).
    pub node_key: PathBuf,
}

/// What a new service starts with. Ignored once the data folder holds state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisSection {
    /// The initial members: a certificate (PEM file), or a certificate and an encryption key
    /// (public key, SPKI PEM file), which makes the member a recovery member.
    #[serde(default)]
    pub members: Vec<GenesisMember>,
    /// How many recovery members' shares recover the service; at most their number. Absent: a
    /// strict majority of the recovery members (1 when there are none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_threshold: Option<u32>,
    /// Certificates (PEM files) of the initial users.
    #[serde(default)]
    pub users: Vec<PathBuf>,
    /// The app to install (a wasm file), if any.
    #[serde(default)]
    pub app: Option<PathBuf>,
    /// The constitution (a wasm file); the default constitution when absent.
    #[serde(default)]
    pub constitution: Option<PathBuf>,
    /// The roots of trust the service pins. Only `mock` admits the mock firmware's reports.
    #[serde(default)]
    pub attestation: GenesisAttestation,
}

/// A member named in the genesis configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GenesisMember {
    Cert(PathBuf),
    Recovery { cert: PathBuf, encryption_key: PathBuf },
}

impl GenesisMember {
    pub fn cert(&self) -> &Path {
        match self {
            GenesisMember::Cert(cert) | GenesisMember::Recovery { cert, .. } => cert,
        }
    }

    pub fn encryption_key(&self) -> Option<&Path> {
        match self {
            GenesisMember::Cert(_) => None,
            GenesisMember::Recovery { encryption_key, .. } => Some(encryption_key),
        }
    }

    fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            GenesisMember::Cert(cert) => vec![cert],
            GenesisMember::Recovery { cert, encryption_key } => vec![cert, encryption_key],
        }
    }
}

/// The node's service limits. Each is enforced with a clear error naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond; gRPC: RESOURCE_EXHAUSTED).
    pub body_bytes_max: usize,
    /// Bytes of request bodies the client listeners (REST and gRPC together) hold at once as
    /// they arrive; a body whose next piece does not fit is refused (503, `Retry-After`; gRPC:
    /// UNAVAILABLE). At least twice `body_bytes_max`.
    pub body_bytes_inflight_max: usize,
    /// Of those, the bytes of bodies from one source address; past it, refused alike. At least
    /// twice `body_bytes_max`, at most `body_bytes_inflight_max`.
    pub body_bytes_per_address_max: usize,
    /// Time a request's body may take to arrive in full once its headers have, in milliseconds
    /// (408; gRPC: DEADLINE_EXCEEDED). A stream whose body never comes is answered and closed
    /// after it, so it does not hold its slot of `streams_per_connection_max`.
    pub body_timeout_ms: u64,
    /// Connections open at once per listener; further ones wait to be accepted.
    pub connections_max: usize,
    /// Connections open at once per listener from one source address; further ones from that
    /// address are closed at once, so one address cannot take every slot.
    pub connections_per_address_max: usize,
    /// Connections open at once on the peer listener with one node certificate; more are closed
    /// once the TLS handshake shows the certificate, so whoever holds one node's certificate
    /// cannot take the slots other nodes need to reach this one.
    pub connections_per_node_max: usize,
    /// HTTP/2 streams (requests, gRPC calls) one connection may have open at once, on every
    /// listener: the node advertises it, a client past it waits for a stream to close, and a
    /// stream opened beyond it anyway is refused.
    pub streams_per_connection_max: u32,
    /// Time from accepting a connection until its TLS ClientHello starts, in milliseconds: an idle
    /// connection is closed after this, so it holds a slot only briefly.
    pub hello_timeout_ms: u64,
    /// Time a client connection (REST, gRPC) may go without reading or writing a byte, in
    /// milliseconds, before the node closes it, so a connection left open and unused does not
    /// hold its slot of `connections_max` for good. More than `request_timeout_ms` and
    /// `body_timeout_ms`, so a request in flight is answered first. Not on the peer listener.
    pub idle_connection_timeout_ms: u64,
    /// HTTP/1.1 on the REST listener: time from when a connection is ready for a request until
    /// that request's headers have arrived, in milliseconds; the connection is closed after it
    /// (hyper's header read timeout). An HTTP/2 request's headers come in one frame.
    pub headers_timeout_ms: u64,
    /// Time a request may take end to end, in milliseconds (503 beyond). A node restarted after a
    /// crash holds reads of its state for up to half of it until it has caught up.
    pub request_timeout_ms: u64,
    /// Requests one identity may have in flight at once (429 beyond).
    pub inflight_per_identity_max: usize,
    /// Write requests waiting for the executor (503 beyond).
    pub write_queue_max: usize,
    /// Most write transactions committed together in one durable write.
    pub group_commit_max: usize,
    /// Write sets the leader has proposed and not yet applied, which later writes execute over.
    /// At the limit the writer waits for one to finish (up to half of `request_timeout_ms`,
    /// then 503 naming this limit); meanwhile the queue fills up to `write_queue_max`.
    pub pending_writes_max: usize,
    /// Signed governance requests being checked (parse, window, signature, replay, a proposal's
    /// modules), and proposals with modules, once checked, on their way to the writer and its
    /// answer; more are refused with 429 and `Retry-After`.
    pub gov_checks_inflight_max: usize,
    /// Signed governance requests being checked at once from one source address.
    pub gov_checks_per_address_max: usize,
    /// Read-only requests running at once; further ones wait.
    pub reads_inflight_max: usize,
    /// Time a TLS handshake may take, in milliseconds.
    pub handshake_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes_max: BODY_BYTES_MAX,
            body_bytes_inflight_max: BODY_BYTES_INFLIGHT_MAX,
            body_bytes_per_address_max: BODY_BYTES_PER_ADDRESS_MAX,
            body_timeout_ms: BODY_TIMEOUT_MS,
            connections_max: CONNECTIONS_MAX,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_MAX,
            connections_per_node_max: CONNECTIONS_PER_NODE_MAX,
            streams_per_connection_max: STREAMS_PER_CONNECTION_MAX,
            hello_timeout_ms: HELLO_TIMEOUT_MS,
            idle_connection_timeout_ms: IDLE_CONNECTION_TIMEOUT_MS,
            headers_timeout_ms: HEADERS_TIMEOUT_MS,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            inflight_per_identity_max: INFLIGHT_PER_IDENTITY_MAX,
            write_queue_max: WRITE_QUEUE_MAX,
            group_commit_max: GROUP_COMMIT_MAX,
            pending_writes_max: PENDING_WRITES_MAX,
            gov_checks_inflight_max: GOV_CHECKS_INFLIGHT_MAX,
            gov_checks_per_address_max: GOV_CHECKS_PER_ADDRESS_MAX,
            reads_inflight_max: READS_INFLIGHT_MAX,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
        }
    }
}

impl Limits {
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("body_bytes_max", self.body_bytes_max as u64),
            ("body_bytes_inflight_max", self.body_bytes_inflight_max as u64),
            ("body_bytes_per_address_max", self.body_bytes_per_address_max as u64),
            ("body_timeout_ms", self.body_timeout_ms),
            ("connections_max", self.connections_max as u64),
            ("connections_per_address_max", self.connections_per_address_max as u64),
            ("connections_per_node_max", self.connections_per_node_max as u64),
            ("streams_per_connection_max", u64::from(self.streams_per_connection_max)),
            ("hello_timeout_ms", self.hello_timeout_ms),
            ("idle_connection_timeout_ms", self.idle_connection_timeout_ms),
            ("headers_timeout_ms", self.headers_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("inflight_per_identity_max", self.inflight_per_identity_max as u64),
            ("write_queue_max", self.write_queue_max as u64),
            ("group_commit_max", self.group_commit_max as u64),
            ("pending_writes_max", self.pending_writes_max as u64),
            ("gov_checks_inflight_max", self.gov_checks_inflight_max as u64),
            ("gov_checks_per_address_max", self.gov_checks_per_address_max as u64),
            ("reads_inflight_max", self.reads_inflight_max as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(format!("limit {name} must be greater than 0"));
        }
        // Twice: a largest body must fit beside the framing around it (a gRPC message's header),
        // and an oversized one must reach `body_bytes_max` (413) before it runs out of budget.
        for (name, value) in [
            ("body_bytes_inflight_max", self.body_bytes_inflight_max),
            ("body_bytes_per_address_max", self.body_bytes_per_address_max),
        ] {
            if value < self.body_bytes_max.saturating_mul(2) {
                return Err(format!(
                    "limit {name} ({value}) must be at least twice body_bytes_max ({}): the largest \
                     body, framed, must fit in it alone",
                    self.body_bytes_max
                ));
            }
        }
        if self.body_bytes_per_address_max > self.body_bytes_inflight_max {
            return Err(format!(
                "limit body_bytes_per_address_max ({}) must be at most body_bytes_inflight_max ({})",
                self.body_bytes_per_address_max, self.body_bytes_inflight_max
            ));
        }
        if self.body_bytes_inflight_max > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(format!(
                "limit body_bytes_inflight_max ({}) must be at most {}",
                self.body_bytes_inflight_max,
                tokio::sync::Semaphore::MAX_PERMITS
            ));
        }
        if self.connections_per_node_max < CONNECTIONS_PER_NODE_MIN {
            return Err(format!(
                "limit connections_per_node_max must be at least {CONNECTIONS_PER_NODE_MIN} \
                 (CONNECTIONS_PER_NODE_MIN): a node opens a new connection to a peer while its old one closes"
            ));
        }
        if self.idle_connection_timeout_ms <= self.request_timeout_ms.max(self.body_timeout_ms) {
            return Err(format!(
                "limit idle_connection_timeout_ms ({}) must be more than request_timeout_ms ({}) and \
                 body_timeout_ms ({}): a connection waiting for a request's answer moves no bytes",
                self.idle_connection_timeout_ms, self.request_timeout_ms, self.body_timeout_ms
            ));
        }
        if self.streams_per_connection_max < STREAMS_PER_CONNECTION_MIN {
            return Err(format!(
                "limit streams_per_connection_max must be at least {STREAMS_PER_CONNECTION_MIN} \
                 (STREAMS_PER_CONNECTION_MIN): a connection between nodes carries that many streams at once"
            ));
        }
        Ok(())
    }
}

impl NodeConfig {
    /// Reads a configuration file and resolves its relative paths against its directory.
    pub fn load(path: &Path) -> anyhow::Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read node configuration {}: {e}", path.display()))?;
        let mut config: NodeConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("node configuration {} is invalid: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        config.check().map_err(|e| anyhow::anyhow!("node configuration {}: {e}", path.display()))?;
        Ok(config)
    }

    /// Makes every relative path absolute against `base`.
    pub fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.node.data_dir);
        fix(&mut self.tls.service_cert);
        fix(&mut self.tls.node_cert);
        fix(&mut self.tls.node_key);
        self.genesis.members.iter_mut().flat_map(GenesisMember::paths_mut).for_each(fix);
        self.genesis.users.iter_mut().for_each(fix);
        if let Some(app) = &mut self.genesis.app {
            fix(app);
        }
        if let Some(previous) = &mut self.network.recover {
            fix(previous);
        }
        for path in [&mut self.attestation.vcek_file, &mut self.attestation.mock_root].into_iter().flatten() {
            fix(path);
        }
    }

    pub fn check(&self) -> Result<(), String> {
        self.limits.check()?;
        let a = &self.attestation;
        if self.gov.proposals_open_per_member_max == 0 {
            return Err("gov.proposals_open_per_member_max must be greater than 0".into());
        }
        if a.nonce_ttl_s == 0 {
            return Err("attestation.nonce_ttl_s must be greater than 0".into());
        }
        for (name, value, len) in
            [("mock_measurement", &a.mock_measurement, 48), ("mock_host_data", &a.mock_host_data, 32)]
        {
            if let Some(v) = value
                && hex::decode(v).map(|b| b.len()) != Ok(len)
            {
                return Err(format!("attestation.{name} must be {len} bytes of hex, not {v:?}"));
            }
        }
        if let Some(m) = a.join_measurements.iter().find(|m| hex::decode(m).map(|b| b.len()) != Ok(48)) {
            return Err(format!("attestation.join_measurements holds {m:?}, not 48 bytes of hex"));
        }
        if self.genesis.attestation == GenesisAttestation::Mock && a.mock_root.is_none() {
            return Err("genesis.attestation = \"mock\" needs attestation.mock_root (the test ARK's folder)".into());
        }
        self.wasm.check()?;
        // A write set becomes one log entry: the largest the contract limits allow must fit the
        // largest entry replication carries (framing: at most ENTRY_FRAMING_BYTES per write).
        let w = &self.wasm;
        let largest =
            w.write_bytes_per_request_max.saturating_add(w.writes_per_request_max.saturating_mul(ENTRY_FRAMING_BYTES));
        if largest > cloister_consensus::ENTRY_BYTES_MAX {
            return Err(format!(
                "wasm.write_bytes_per_request_max ({}) plus {ENTRY_FRAMING_BYTES} bytes for each of \
                 wasm.writes_per_request_max ({}) is {largest} bytes, more than the largest log entry \
                 replication carries ({} bytes, half the peer message cap): lower one of them",
                w.write_bytes_per_request_max,
                w.writes_per_request_max,
                cloister_consensus::ENTRY_BYTES_MAX
            ));
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err("raft.election_timeout_min_ms must exceed raft.heartbeat_interval_ms (> 0)".into());
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err("raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into());
        }
        let l = &self.ledger;
        if l.sign_every_entries == 0 || l.sign_interval_ms == 0 || l.chunk_bytes == 0 {
            return Err(
                "ledger.sign_every_entries, ledger.sign_interval_ms and ledger.chunk_bytes must be greater than 0"
                    .into(),
            );
        }
        if r.entries_per_append_max == 0 || r.snapshot_after_logs == 0 || r.appends_in_flight_max == 0 {
            return Err(
                "raft.entries_per_append_max, raft.snapshot_after_logs and raft.appends_in_flight_max must be greater than 0"
                    .into(),
            );
        }
        // Every running request holds one instance slot: the reads, plus the writer's one.
        if self.limits.reads_inflight_max + 1 > self.wasm.instances_max as usize {
            return Err(format!(
                "limits.reads_inflight_max ({}) plus the writer exceeds wasm.instances_max ({})",
                self.limits.reads_inflight_max, self.wasm.instances_max
            ));
        }
        if self.limits.body_bytes_max > self.wasm.request_bytes_max {
            return Err(format!(
                "limits.body_bytes_max ({}) exceeds wasm.request_bytes_max ({}): bodies that large could never run",
                self.limits.body_bytes_max, self.wasm.request_bytes_max
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configurations serialize")
    }

    /// This configuration with one field set by its dotted name in the file
    /// (`raft.apply_durable_ms`) to `value`, read as a TOML value (`5000`, `true`, `"text"`, `[]`);
    /// a value that does not read as one is taken as a string. The result passes the checks a file
    /// does, so an unknown name, a value of the wrong type or one out of bounds is refused.
    pub fn with_setting(&self, name: &str, value: &str) -> anyhow::Result<NodeConfig> {
        let mut path: Vec<&str> = name.split('.').collect();
        let field = path.pop().filter(|f| !f.is_empty() && path.iter().all(|p| !p.is_empty()));
        let field = field.ok_or_else(|| anyhow::anyhow!("{name:?} is not a setting's dotted name"))?;
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}")).ok().and_then(|mut t| t.remove("v"));
        let parsed = parsed.unwrap_or_else(|| toml::Value::String(value.to_owned()));
        let mut root = toml::Table::try_from(self)?;
        let mut table = &mut root;
        for section in path {
            table = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| anyhow::anyhow!("{name}: {section} is not a section"))?;
        }
        table.insert(field.to_owned(), parsed);
        let config: NodeConfig = root.try_into().map_err(|e| anyhow::anyhow!("{name} = {value}: {e}"))?;
        config.check().map_err(|e| anyhow::anyhow!("{name} = {value}: {e}"))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [node]
        name = "n"
        data_dir = "data"
        rest_addr = "127.0.0.1:0"
        grpc_addr = "127.0.0.1:0"
        peer_addr = "127.0.0.1:0"
        [tls]
        service_cert = "s.pem"
        node_cert = "n.pem"
        node_key = "/abs/k.pem"
    "#;

    #[test]
    fn defaults_fill_everything_but_identity() {
        let mut c: NodeConfig = toml::from_str(MINIMAL).unwrap();
        c.resolve(Path::new("/etc/cloister"));
        assert_eq!(c.node.data_dir, Path::new("/etc/cloister/data"));
        assert_eq!(c.tls.node_key, Path::new("/abs/k.pem"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.wasm, wasm::Limits::default());
        assert!(c.check().is_ok());
        let back: NodeConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    /// A setting by its dotted name reaches its field, typed as the file would type it; an
    /// unknown name, a wrong type, a value the checks refuse and a malformed name are errors.
    #[test]
    fn a_setting_by_its_dotted_name_is_checked_like_the_file() {
        let c: NodeConfig = toml::from_str(MINIMAL).unwrap();
        let set = c.with_setting("raft.apply_durable_ms", "5000").unwrap();
        assert_eq!(set.raft.apply_durable_ms, 5000);
        assert_eq!(set.raft.apply_hold_ms, c.raft.apply_hold_ms, "nothing else moved");
        assert_eq!(set.with_setting("node.name", "other").unwrap().node.name, "other", "a bare word is a string");
        let list = c.with_setting("attestation.join_measurements", &format!("[\"{}\"]", "ab".repeat(48))).unwrap();
        assert_eq!(list.attestation.join_measurements.len(), 1);
        let refused = |name: &str, value: &str| c.with_setting(name, value).unwrap_err().to_string();
        assert!(refused("raft.apply_durable_mss", "1").contains("apply_durable_mss"));
        assert!(refused("raft.apply_durable_ms", "soon").contains("raft.apply_durable_ms"));
        assert!(refused("raft.appends_in_flight_max", "0").contains("raft.appends_in_flight_max"));
        assert!(refused("node.name.first", "x").contains("not a section"));
        for malformed in ["", "raft.", ".raft", "raft..apply_durable_ms"] {
            assert!(refused(malformed, "1").contains("dotted name"), "{malformed:?}");
        }
    }

    #[test]
    fn unknown_fields_and_zero_limits_are_refused() {
        let typo = format!("{MINIMAL}\n[limits]\nbody_byte_max = 1\n");
        let err = toml::from_str::<NodeConfig>(&typo).unwrap_err().to_string();
        assert!(err.contains("body_byte_max"), "{err}");
        let zero = format!("{MINIMAL}\n[limits]\nrequest_timeout_ms = 0\n");
        let c: NodeConfig = toml::from_str(&zero).unwrap();
        assert!(c.check().unwrap_err().contains("request_timeout_ms"));
        // No AppendEntries in flight would never replicate; one is send-and-wait.
        let window = |n: u32| format!("{MINIMAL}\n[raft]\nappends_in_flight_max = {n}\n");
        let c: NodeConfig = toml::from_str(&window(0)).unwrap();
        assert!(c.check().unwrap_err().contains("raft.appends_in_flight_max"));
        let c: NodeConfig = toml::from_str(&window(1)).unwrap();
        assert!(c.check().is_ok(), "{:?}", c.check());
        let slots = format!("{MINIMAL}\n[limits]\nreads_inflight_max = 64\n[wasm]\ninstances_max = 64\n");
        let c: NodeConfig = toml::from_str(&slots).unwrap();
        assert!(c.check().unwrap_err().contains("wasm.instances_max"));
        let streams = |n: u32| format!("{MINIMAL}\n[limits]\nstreams_per_connection_max = {n}\n");
        let c: NodeConfig = toml::from_str(&streams(STREAMS_PER_CONNECTION_MIN - 1)).unwrap();
        assert!(c.check().unwrap_err().contains("STREAMS_PER_CONNECTION_MIN"));
        // The budget of bodies being received holds one body of the largest size at least.
        let budget = |n: usize| {
            format!(
                "{MINIMAL}\n[limits]\nbody_bytes_max = 1000\nbody_bytes_inflight_max = {n}\n\
                 body_bytes_per_address_max = 2000\n"
            )
        };
        let c: NodeConfig = toml::from_str(&budget(1999)).unwrap();
        assert!(c.check().unwrap_err().contains("body_bytes_inflight_max (1999) must be at least twice"));
        let c: NodeConfig = toml::from_str(&budget(2000)).unwrap();
        assert!(c.check().is_ok(), "{:?}", c.check());
        let c: NodeConfig = toml::from_str(&budget(usize::MAX)).unwrap();
        assert!(c.check().unwrap_err().contains("must be at most"));
        let share = |n: usize| {
            format!(
                "{MINIMAL}\n[limits]\nbody_bytes_max = 1000\nbody_bytes_inflight_max = 4000\n\
                 body_bytes_per_address_max = {n}\n"
            )
        };
        let c: NodeConfig = toml::from_str(&share(1999)).unwrap();
        assert!(c.check().unwrap_err().contains("body_bytes_per_address_max (1999) must be at least twice"));
        let c: NodeConfig = toml::from_str(&share(4001)).unwrap();
        assert!(c.check().unwrap_err().contains("at most body_bytes_inflight_max"));
        let proposals = |n: u32| format!("{MINIMAL}\n[gov]\nproposals_open_per_member_max = {n}\n");
        let c: NodeConfig = toml::from_str(&proposals(0)).unwrap();
        assert!(c.check().unwrap_err().contains("gov.proposals_open_per_member_max"));
        let c: NodeConfig = toml::from_str(&proposals(1)).unwrap();
        assert!(c.check().is_ok(), "{:?}", c.check());
        let c: NodeConfig = toml::from_str(&streams(STREAMS_PER_CONNECTION_MIN)).unwrap();
        assert!(c.check().is_ok(), "{:?}", c.check());
        let per_node = |n: usize| format!("{MINIMAL}\n[limits]\nconnections_per_node_max = {n}\n");
        let c: NodeConfig = toml::from_str(&per_node(CONNECTIONS_PER_NODE_MIN - 1)).unwrap();
        assert!(c.check().unwrap_err().contains("CONNECTIONS_PER_NODE_MIN"));
        let c: NodeConfig = toml::from_str(&per_node(CONNECTIONS_PER_NODE_MIN)).unwrap();
        assert!(c.check().is_ok(), "{:?}", c.check());
        // An idle connection is closed only after any request on it has been answered.
        let idle = |ms: u64, body_ms: u64| {
            format!("{MINIMAL}\n[limits]\nidle_connection_timeout_ms = {ms}\nbody_timeout_ms = {body_ms}\n")
        };
        for (ms, body_ms) in [(REQUEST_TIMEOUT_MS, 1), (REQUEST_TIMEOUT_MS + 1, REQUEST_TIMEOUT_MS + 1)] {
            let c: NodeConfig = toml::from_str(&idle(ms, body_ms)).unwrap();
            assert!(c.check().unwrap_err().contains("idle_connection_timeout_ms"), "{ms}, {body_ms}");
        }
        let c: NodeConfig = toml::from_str(&idle(REQUEST_TIMEOUT_MS + 1, REQUEST_TIMEOUT_MS)).unwrap();
        assert!(c.check().is_ok(), "{:?}", c.check());
        let big = format!(
            "{MINIMAL}\n[limits]\nbody_bytes_max = 9000000000\nbody_bytes_inflight_max = 18000000000\n\
             body_bytes_per_address_max = 18000000000\n"
        );
        let c: NodeConfig = toml::from_str(&big).unwrap();
        assert!(c.check().unwrap_err().contains("wasm.request_bytes_max"));
    }

    #[test]
    fn attestation_hex_fields_are_checked_at_their_length() {
        let with = |field: &str, value: String| -> Result<(), String> {
            toml::from_str::<NodeConfig>(&format!("{MINIMAL}\n[attestation]\n{field} = {value}\n")).unwrap().check()
        };
        let hex48 = "ab".repeat(48);
        assert_eq!(with("mock_measurement", format!("{hex48:?}")), Ok(()));
        assert!(with("mock_measurement", format!("{:?}", "ab".repeat(47))).unwrap_err().contains("48 bytes"));
        assert_eq!(with("join_measurements", format!("[{hex48:?}, {:?}]", hex48.to_uppercase())), Ok(()));
        let err = with("join_measurements", format!("[{hex48:?}, {:?}]", "ab".repeat(49))).unwrap_err();
        assert!(err.contains("join_measurements"), "{err}");
        assert!(with("join_measurements", "[\"not hex\"]".into()).is_err());
        assert!(with("nonce_ttl_s", "0".into()).unwrap_err().contains("nonce_ttl_s"));
    }
}
