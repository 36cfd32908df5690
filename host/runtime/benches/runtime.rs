//! Contract runtime benchmarks (`cargo bench -p cloister-runtime --bench runtime`).
//!
//! Criterion measures each case; a summary then prints every figure against its goal:
//! - per-request overhead (fresh instance + empty handler): goal median ≤ 10 µs;
//! - the reconcile contract in wasm vs compiled natively, 1,000-record ingest: goal ≤ 1.5×;
//! - end-to-end batch ingest into redb vs raw redb inserts of the same rows: the ratio;
//! - one write as the leader's writer executes it, on a sealed store: a kv put of 64 bytes against
//!   a 1-record reconcile ingest (the two Cloister workloads of `just bench-peers`), per second of
//!   one core.

use std::cell::RefCell;
use std::hint::black_box;
use std::ops::Bound;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloister_abi::abi::{Privilege, RequestHead};
use cloister_crypto::seal::Sealer;
use cloister_runtime::{Invocation, Limits, LoadedModule, Runtime};
use cloister_sdk::{Backend, Caller, Mode};
use cloister_store::{self as kv, Store, Tx, WriteSet};
use criterion::{Criterion, Throughput};

const BATCH_RECORDS: usize = 1_000;
/// Keys in the sealed store before the single-write cases run, as on a node that has served
/// earlier points of the harness.
const PREFILLED_WRITES: usize = 20_000;

/// A module whose handler does nothing: it returns a fixed `204` envelope from a data segment.
fn empty_handler_module() -> Vec<u8> {
    let head = br#"{"status":204}"#;
    let mut response = (head.len() as u32).to_le_bytes().to_vec();
    response.extend_from_slice(head);
    let manifest = br#"{"abi":1,"endpoints":[{"method":"GET","path":"/noop","mode":"readonly","auth":"public"}]}"#;
    let escape = |bytes: &[u8]| bytes.iter().map(|b| format!("\\{b:02x}")).collect::<String>();
    let packed = |at: u64, len: usize| (at << 32) | len as u64;
    wat::parse_str(format!(
        r#"(module
            (memory (export "memory") 1)
            (data (i32.const 16) "{}")
            (data (i32.const 256) "{}")
            (func (export "cloister_abi_v1"))
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64) i64.const {})
            (func (export "manifest") (result i64) i64.const {}))"#,
        escape(&response),
        escape(manifest),
        packed(16, response.len()),
        packed(256, manifest.len()),
    ))
    .unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    runtime: Runtime,
    store: Store,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    Setup { _dir: dir, runtime: Runtime::new(Limits::default()).unwrap(), store }
}

/// A store whose private values are sealed at rest, as a node's is.
fn sealed_setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sealer = Arc::new(Sealer::new(&Sealer::generate_secret()));
    let store = Store::open_sealed(&dir.path().join("state.redb"), sealer).unwrap();
    Setup { _dir: dir, runtime: Runtime::new(Limits::default()).unwrap(), store }
}

fn head(method: &str, path: &str) -> RequestHead {
    RequestHead {
        method: method.into(),
        path: path.into(),
        route: path.into(),
        caller: Caller::member("bench-party"),
        ..Default::default()
    }
}

fn batch(party: usize) -> Vec<u8> {
    let rows: Vec<_> = (0..BATCH_RECORDS)
        .map(|i| serde_json::json!({"lei": format!("LEI{i:017}"), "nace": format!("C.{}.{}", i % 97, party)}))
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

/// Runs a module's handler; with `apply` the write set is committed to redb.
fn run(s: &Setup, module: &LoadedModule, head: &RequestHead, body: &[u8], mode: Mode, apply: bool) {
    let inv = Invocation { head, body, mode, namespace: "app", privilege: Privilege::App };
    let (tx, result) = s.runtime.execute(module, inv, s.store.begin().unwrap());
    let outcome = result.expect("benchmark request succeeds");
    assert!(outcome.response.is_success(), "{:?}", String::from_utf8_lossy(&outcome.response.body));
    if apply {
        s.store.apply(&tx.into_writes()).unwrap();
    }
}

/// The SDK's native backend over a host transaction: the contract compiled natively runs
/// against exactly the store the wasm build uses.
struct TxBackend {
    tx: RefCell<Tx>,
    caller: Vec<u8>,
}

impl Backend for TxBackend {
    fn get(&self, map: &str, key: &[u8]) -> Option<Vec<u8>> {
        self.tx.borrow().get(&kv::app_map("app", map), key).unwrap()
    }
    fn put(&self, map: &str, key: &[u8], value: &[u8]) {
        self.tx.borrow_mut().put(&kv::app_map("app", map), key, value)
    }
    fn remove(&self, map: &str, key: &[u8]) -> bool {
        self.tx.borrow_mut().remove(&kv::app_map("app", map), key).unwrap()
    }
    fn first_in(&self, map: &str, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> Option<(Vec<u8>, Vec<u8>)> {
        self.tx.borrow().first_in(&kv::app_map("app", map), lower, upper).unwrap()
    }
    fn caller_json(&self) -> Vec<u8> {
        self.caller.clone()
    }
    fn log(&self, _: i32, _: &str) {}
}

fn run_native(s: &Setup, head: &RequestHead, body: &[u8]) {
    let router = reconcile::router();
    let backend = Rc::new(TxBackend { tx: RefCell::new(s.store.begin().unwrap()), caller: b"{}".to_vec() });
    let response = cloister_sdk::call_native(&router, backend, head, body);
    assert!(response.is_success());
}

fn raw_redb_inserts(s: &Setup, body: &[u8]) {
    // The same rows as the contract writes them: one value per key, one durable commit.
    let rows: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
    let mut tx = s.store.begin().unwrap();
    for row in &rows {
        let key = row["lei"].as_str().unwrap().as_bytes();
        tx.put("raw/records", key, serde_json::to_vec(row).unwrap().as_slice());
    }
    s.store.apply(&tx.into_writes()).unwrap();
}

/// `just bench-peers`' two Cloister writes.
#[derive(Clone, Copy)]
enum Workload {
    /// The kv contract's put of a 64-byte value.
    KvPut,
    /// A 1-record reconcile ingest.
    ReconcileIngest,
}

/// One of the two writes, with the contract that runs it.
struct SingleWrite {
    workload: Workload,
    module: Arc<LoadedModule>,
}

impl SingleWrite {
    fn load(s: &Setup, workload: Workload) -> SingleWrite {
        let wasm = match workload {
            Workload::KvPut => cloister_bundled::KV,
            Workload::ReconcileIngest => cloister_bundled::RECONCILE,
        };
        SingleWrite { workload, module: s.runtime.load(wasm).unwrap() }
    }

    /// The `n`th write's head, routed as the node routes it, and its body: fresh keys every
    /// time, as the harness sends them.
    fn request(&self, n: usize) -> (RequestHead, Vec<u8>) {
        match self.workload {
            Workload::KvPut => {
                let key = format!("bench-{n:09}");
                let mut head = head("PUT", &format!("/kv/{key}"));
                head.route = "/kv/{key}".into();
                head.params = [("key".to_owned(), key)].into();
                (head, vec![b'v'; 64])
            }
            Workload::ReconcileIngest => {
                (head("POST", "/ingest"), format!(r#"{{"lei":"B{n:012}","nace":"C.{}"}}"#, n % 97).into_bytes())
            }
        }
    }

    /// Executes the `n`th write over the store as the writer does, returning its write set.
    fn execute(&self, s: &Setup, n: usize) -> WriteSet {
        let (head, body) = self.request(n);
        let inv =
            Invocation { head: &head, body: &body, mode: Mode::Readwrite, namespace: "app", privilege: Privilege::App };
        let (tx, result) = s.runtime.execute(&self.module, inv, s.store.begin().unwrap());
        assert!(result.expect("the write runs").response.is_success());
        tx.into_writes()
    }
}

fn median(mut f: impl FnMut(), iterations: usize) -> Duration {
    let mut times: Vec<Duration> = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let s = setup();
    let empty = s.runtime.load(&empty_handler_module()).unwrap();
    let noop = s.runtime.load(&std::fs::read(cloister_test_artifacts::MISBEHAVE_PATH).unwrap()).unwrap();
    let recon = s.runtime.load(cloister_bundled::RECONCILE).unwrap();
    let ingest = head("POST", "/ingest");
    let noop_head = head("GET", "/noop");
    let body = batch(0);

    c.bench_function("per-request overhead: fresh instance + empty handler", |b| {
        b.iter(|| run(&s, &empty, &noop_head, b"", Mode::Readonly, false))
    });
    c.bench_function("per-request overhead: SDK no-op endpoint", |b| {
        b.iter(|| run(&s, &noop, &noop_head, b"", Mode::Readonly, false))
    });
    let mut g = c.benchmark_group("reconcile 1,000-record ingest");
    g.throughput(Throughput::Elements(BATCH_RECORDS as u64)).sample_size(20);
    g.bench_function("wasm", |b| b.iter(|| run(&s, &recon, &ingest, &body, Mode::Readwrite, false)));
    g.bench_function("native", |b| b.iter(|| run_native(&s, &ingest, &body)));
    g.bench_function("wasm + durable redb commit", |b| {
        b.iter(|| run(&s, &recon, &ingest, &body, Mode::Readwrite, true))
    });
    g.bench_function("raw redb inserts, durable commit", |b| b.iter(|| raw_redb_inserts(&s, black_box(&body))));
    g.finish();

    println!("\n== summary (medians of direct runs) ==");
    let overhead = median(|| run(&s, &empty, &noop_head, b"", Mode::Readonly, false), 2_000);
    let sdk_noop = median(|| run(&s, &noop, &noop_head, b"", Mode::Readonly, false), 2_000);
    println!(
        "per-request overhead, empty handler: {:.1} µs (goal ≤ 10 µs: {}); SDK no-op endpoint: {:.1} µs",
        overhead.as_secs_f64() * 1e6,
        if overhead <= Duration::from_micros(10) { "met" } else { "NOT met" },
        sdk_noop.as_secs_f64() * 1e6
    );
    let wasm = median(|| run(&s, &recon, &ingest, &body, Mode::Readwrite, false), 30);
    let native = median(|| run_native(&s, &ingest, &body), 30);
    let ratio = wasm.as_secs_f64() / native.as_secs_f64();
    println!(
        "reconcile 1,000-record ingest: wasm {:.2} ms, native {:.2} ms: {ratio:.2}x (goal ≤ 1.5x: {})",
        wasm.as_secs_f64() * 1e3,
        native.as_secs_f64() * 1e3,
        if ratio <= 1.5 { "met" } else { "NOT met" }
    );
    let e2e = median(|| run(&s, &recon, &ingest, &body, Mode::Readwrite, true), 30);
    let raw = median(|| raw_redb_inserts(&s, &body), 30);
    let rate = |d: Duration| BATCH_RECORDS as f64 / d.as_secs_f64();
    println!(
        "batch ingest end to end: {:.0} records/s; raw redb inserts of the same rows: {:.0} records/s; ratio {:.2}",
        rate(e2e),
        rate(raw),
        rate(e2e) / rate(raw)
    );
    single_writes();
}

/// The harness's two Cloister writes, one at a time on one core: executing one as the leader's
/// writer does (a transaction over the state, the contract, its write set), and applying that
/// write set with a non-durable commit as every node applies an entry that arrives alone (the
/// Raft log, synced elsewhere, is what makes it durable; under load one commit covers a batch).
/// Each on a sealed store prefilled with [`PREFILLED_WRITES`] writes of its own kind.
fn single_writes() {
    const RUNS: usize = 5_000;
    println!("\n== one write at a time (sealed store, {PREFILLED_WRITES} earlier writes; medians) ==");
    let mut timings = Vec::new();
    for (name, workload) in [("kv put", Workload::KvPut), ("reconcile ingest", Workload::ReconcileIngest)] {
        let s = sealed_setup();
        let write = SingleWrite::load(&s, workload);
        for first in (0..PREFILLED_WRITES).step_by(1_000) {
            let mut batch = s.store.write_batch().unwrap();
            for n in first..first + 1_000 {
                batch.apply(&write.execute(&s, n)).unwrap();
            }
            batch.commit().unwrap();
        }
        let mut n = PREFILLED_WRITES;
        let execute = median(
            || {
                black_box(write.execute(&s, n));
                n += 1;
            },
            RUNS,
        );
        let mut writes = (n..n + RUNS).map(|n| write.execute(&s, n)).collect::<Vec<_>>().into_iter();
        let apply = median(
            || {
                let mut batch = s.store.write_batch().unwrap();
                batch.apply(&writes.next().unwrap()).unwrap();
                batch.commit_nondurable().unwrap();
            },
            RUNS,
        );
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{name}: execute {:.1} µs, apply {:.1} µs ({:.0} and {:.0} writes/s of one core)",
            us(execute),
            us(apply),
            1e6 / us(execute),
            1e6 / us(apply)
        );
        timings.push((execute, apply));
    }
    let ((kv_execute, kv_apply), (execute, apply)) = (timings[0], timings[1]);
    println!(
        "reconcile ingest over kv put: execute {:.2}x, apply {:.2}x the time",
        execute.as_secs_f64() / kv_execute.as_secs_f64(),
        apply.as_secs_f64() / kv_apply.as_secs_f64()
    );
}
