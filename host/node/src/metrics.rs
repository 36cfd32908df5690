//! The node's Prometheus metrics, served at `GET /node/metrics` in the text exposition format
//! (OpenMetrics 1.0, which Prometheus scrapes natively).
//!
//! Counters and histograms are recorded where things happen (the frontends, the service layer,
//! the writer, attestation); positions and sizes (Raft, ledger files) are read when scraped.
//! Every label value comes from a bounded set: route templates, gRPC methods of this node's own
//! protos, an app manifest's endpoints, status codes and error codes. A path a client makes up
//! never becomes a label, so nobody can grow the registry by sending requests.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use cloister_abi::abi::Privilege;
use cloister_consensus::Consensus;
use cloister_runtime::{ExecError, ExecObserver};

/// The content type of `/node/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label of a request that matched no route, or a gRPC method this node does not serve.
const UNMATCHED: &str = "unmatched";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    frontend: &'static str,
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    frontend: &'static str,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutionLabels {
    /// `app` or `constitution`.
    contract: &'static str,
    /// `ok`, or the error code of why it did not finish.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FollowerLabels {
    follower: String,
}

/// One node's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<EndpointLabels, Histogram>,
    app_requests: Family<AppLabels, Counter>,
    executions: Family<ExecutionLabels, Counter>,
    compiled: Counter,
    refused_modules: Counter,
    attestations: Family<ResultLabels, Counter>,
    /// Writes queued for the writer thread and not yet taken up by it.
    pub(crate) writer_queued: AtomicI64,
    /// Writes proposed by this leader and not yet applied.
    pub(crate) writer_pending: AtomicI64,
    scraped: Scraped,
    grpc_methods: BTreeSet<String>,
    ledger_dir: PathBuf,
}

/// The gauges set from the node's state at each scrape.
#[derive(Default)]
struct Scraped {
    writer_queued: Gauge,
    writer_pending: Gauge,
    term: Gauge,
    leader: Gauge,
    last_log: Gauge,
    committed: Gauge,
    applied: Gauge,
    snapshot: Gauge,
    lag: Family<FollowerLabels, Gauge>,
    signatures: Counter,
    apply_batches: Counter,
    durable_commits: Counter,
    snapshots_built: Counter,
    snapshot_files_built: Counter,
    snapshots_installed: Counter,
    forwards_waiting: Gauge,
    ledger_bytes: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

/// Request latency buckets: 100 µs to about 13 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 18)
}

impl Metrics {
    /// The metrics of a node whose ledger files are in `ledger_dir`.
    pub fn new(ledger_dir: PathBuf) -> Metrics {
        let mut registry = Registry::with_prefix("cloister");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by frontend (rest, grpc), endpoint (route template or gRPC method) and status (HTTP status, or gRPC code)",
            requests.clone(),
        );
        let request_duration =
            Family::<EndpointLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        // Named with its unit rather than given a `# UNIT` line, which some OpenMetrics parsers
        // refuse on histograms.
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response's headers, by frontend and endpoint",
            request_duration.clone(),
        );
        let app_requests = Family::<AppLabels, Counter>::default();
        registry.register(
            "app_requests",
            "App endpoint calls this node routed, by the manifest's method and path template and the status answered (a write a follower forwards counts there and on the leader)",
            app_requests.clone(),
        );
        let executions = Family::<ExecutionLabels, Counter>::default();
        registry.register(
            "wasm_executions",
            "Contract executions, by contract (app, constitution) and outcome (ok, or why it stopped: FuelExhausted, Trap, GuestPanic, ...)",
            executions.clone(),
        );
        let compiled = Counter::default();
        registry.register(
            "wasm_modules_compiled",
            "Wasm modules this node checked and compiled: each app and constitution version once, as soon as its applied state holds it (again only if evicted from the cache)",
            compiled.clone(),
        );
        let refused_modules = Counter::default();
        registry.register(
            "wasm_modules_refused",
            "Wasm modules that failed this node's checks (the same bytes sent again are refused from memory, and not counted again)",
            refused_modules.clone(),
        );
        let attestations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "attestation_verifications",
            "Attestation evidence this node verified, by result (verified, refused)",
            attestations.clone(),
        );
        let scraped = Scraped::default();
        let s = &scraped;
        registry.register("writer_queue_depth", "Writes waiting for the writer thread", s.writer_queued.clone());
        registry.register(
            "writer_pending_writes",
            "Writes this leader proposed that are not applied yet",
            s.writer_pending.clone(),
        );
        registry.register("raft_term", "The Raft term this node is in", s.term.clone());
        registry.register("raft_leader", "1 while this node leads, else 0", s.leader.clone());
        registry.register("raft_last_log_index", "The last index in this node's Raft log", s.last_log.clone());
        registry.register("raft_commit_index", "The last index this node knows to be committed", s.committed.clone());
        registry.register("raft_apply_index", "The last index this node has applied", s.applied.clone());
        registry.register("raft_snapshot_index", "The last index of this node's current snapshot", s.snapshot.clone());
        registry.register(
            "raft_replication_lag_entries",
            "On the leader, how many entries of its log each follower lacks",
            s.lag.clone(),
        );
        registry.register("ledger_signatures", "Signature transactions applied", s.signatures.clone());
        registry.register(
            "raft_apply_batches",
            "Transactions that applied committed entries (one redb commit each)",
            s.apply_batches.clone(),
        );
        registry.register(
            "state_durable_commits",
            "Commits that made the applied state and the ledger files durable",
            s.durable_commits.clone(),
        );
        registry.register(
            "snapshots_built",
            "Snapshots this node took: durable commits the Raft log may be purged behind",
            s.snapshots_built.clone(),
        );
        registry.register(
            "snapshot_files_built",
            "Snapshot files this node built to send to a node that is behind",
            s.snapshot_files_built.clone(),
        );
        registry.register(
            "snapshots_installed",
            "Snapshots this node installed from a leader",
            s.snapshots_installed.clone(),
        );
        registry.register(
            "forwards_waiting",
            "Calls this node forwarded to the leader whose answers it awaits",
            s.forwards_waiting.clone(),
        );
        registry.register_with_unit(
            "ledger_files",
            "Size of this node's ledger files on disk",
            Unit::Bytes,
            s.ledger_bytes.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            app_requests,
            executions,
            compiled,
            refused_modules,
            attestations,
            writer_queued: AtomicI64::new(0),
            writer_pending: AtomicI64::new(0),
            scraped,
            grpc_methods: grpc_methods(),
            ledger_dir,
        }
    }

    fn record_request(&self, frontend: &'static str, endpoint: String, status: String, started: Instant) {
        self.request_duration
            .get_or_create(&EndpointLabels { frontend, endpoint: endpoint.clone() })
            .observe(started.elapsed().as_secs_f64());
        self.requests.get_or_create(&RequestLabels { frontend, endpoint, status }).inc();
    }

    /// An app endpoint this node ran, named as its manifest names it.
    pub fn record_app(&self, method: &str, path_template: &str, status: u16) {
        let endpoint = format!("{method} {path_template}");
        self.app_requests.get_or_create(&AppLabels { endpoint, status }).inc();
    }

    /// An attestation verification's result.
    pub fn record_attestation(&self, verified: bool) {
        let result = if verified { "verified" } else { "refused" };
        self.attestations.get_or_create(&ResultLabels { result }).inc();
    }

    /// The exposition: every metric, with the scraped gauges read now.
    pub fn encode(&self, consensus: &Consensus) -> String {
        let stats = consensus.stats();
        let s = &self.scraped;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        s.writer_queued.set(self.writer_queued.load(Ordering::Relaxed));
        s.writer_pending.set(self.writer_pending.load(Ordering::Relaxed));
        s.term.set(as_i64(stats.term));
        s.leader.set(i64::from(stats.is_leader));
        s.last_log.set(as_i64(stats.last_log));
        s.committed.set(as_i64(stats.committed));
        s.applied.set(as_i64(stats.applied));
        s.snapshot.set(as_i64(stats.snapshot));
        // Followers come and go: a removed one's series goes too.
        s.lag.clear();
        for (follower, lag) in stats.lag {
            s.lag.get_or_create(&FollowerLabels { follower }).set(as_i64(lag));
        }
        raise_to(&s.signatures, stats.signatures_applied);
        raise_to(&s.apply_batches, stats.apply_batches);
        raise_to(&s.durable_commits, stats.durable_commits);
        raise_to(&s.snapshots_built, stats.snapshots_built);
        raise_to(&s.snapshot_files_built, stats.snapshot_files_built);
        raise_to(&s.snapshots_installed, stats.snapshots_installed);
        s.forwards_waiting.set(as_i64(stats.forwards_waiting));
        s.ledger_bytes.set(as_i64(dir_bytes(&self.ledger_dir)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl ExecObserver for Metrics {
    fn executed(&self, privilege: Privilege, error: Option<&ExecError>) {
        let contract = match privilege {
            Privilege::App => "app",
            Privilege::Constitution => "constitution",
        };
        let outcome = error.map_or("ok", ExecError::code);
        self.executions.get_or_create(&ExecutionLabels { contract, outcome }).inc();
    }

    fn compiled(&self) {
        self.compiled.inc();
    }

    fn refused(&self) {
        self.refused_modules.inc();
    }
}

/// Moves a mirrored counter up to the count it mirrors.
fn raise_to(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// The bytes of the files directly in `dir` (a ledger's chunks); 0 if it cannot be read.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// Every gRPC method this node serves, as `/package.Service/Method`, from its protos.
fn grpc_methods() -> BTreeSet<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(cloister_proto::FILE_DESCRIPTOR_SET)
        .expect("the node's own descriptor set decodes");
    let mut methods = BTreeSet::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let service_name = service.name.unwrap_or_default();
            for method in service.method {
                methods.insert(format!("/{package}.{service_name}/{}", method.name.unwrap_or_default()));
            }
        }
    }
    methods
}

/// Axum middleware for the REST frontend: counts and times every request by route template.
pub async fn rest_layer(State(metrics): State<std::sync::Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |p| format!("{} {}", method_label(request.method()), p.as_str()));
    let response = next.run(request).await;
    metrics.record_request("rest", endpoint, response.status().as_u16().to_string(), started);
    response
}

/// A request's method as a label: one of HTTP's own, or `OTHER`. `/app/…` takes any method, and
/// a method is whatever token a client sends, so each made-up one was a new label, kept for good:
/// anyone could grow the metrics without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN.iter().find(|known| *known == method).map_or("OTHER", Method::as_str)
}

/// Axum middleware for the gRPC frontend: counts and times every call by method and gRPC code.
/// A unary call that fails answers trailers-only, with `grpc-status` in its headers; one that
/// succeeds sends the code in trailers, so a response without the header counts as code 0.
pub async fn grpc_layer(State(metrics): State<std::sync::Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path();
    let endpoint = if metrics.grpc_methods.contains(path) { path.to_owned() } else { UNMATCHED.to_owned() };
    let response = next.run(request).await;
    let status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(0);
    metrics.record_request("grpc", endpoint, status.to_string(), started);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_serves_the_grpc_methods_its_protos_name() {
        let methods = grpc_methods();
        assert!(methods.contains("/cloister.app.v1.App/Call"), "{methods:?}");
        assert!(methods.contains("/cloister.gov.v1.Gov/Write"), "{methods:?}");
    }

    #[test]
    fn a_mirrored_counter_never_goes_down() {
        let c = Counter::default();
        raise_to(&c, 5);
        raise_to(&c, 3);
        assert_eq!(c.get(), 5);
    }

    #[test]
    fn an_execution_counts_how_it_ended() {
        let m = Metrics::new(PathBuf::from("/nonexistent"));
        m.executed(Privilege::App, Some(&ExecError::FuelExhausted { fuel: 1000 }));
        m.executed(Privilege::App, Some(&ExecError::Trap("unreachable".into())));
        m.executed(Privilege::Constitution, None);
        let count = |contract, outcome| m.executions.get_or_create(&ExecutionLabels { contract, outcome }).get();
        assert_eq!(count("app", "FuelExhausted"), 1);
        assert_eq!(count("app", "GuestTrap"), 1);
        assert_eq!(count("constitution", "ok"), 1);
        assert_eq!(count("app", "ok"), 0);
    }
}
