//! Sandbox limits: every misbehaviour is refused with its named error, leaves the store exactly
//! as it was, and the next request still succeeds.

use std::sync::Arc;

use cloister_abi::abi::{Privilege, RequestHead};
use cloister_abi::{Caller, Mode};

use super::*;
use cloister_store as kv;

struct Fixture {
    _dir: tempfile::TempDir,
    runtime: Runtime,
    store: kv::Store,
    module: Arc<LoadedModule>,
}

fn misbehave() -> Vec<u8> {
    std::fs::read(cloister_test_artifacts::MISBEHAVE_PATH).expect("the build script built misbehave.wasm")
}

fn fixture(limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = kv::Store::open(&dir.path().join("state.redb")).unwrap();
    let runtime = Runtime::new(limits).unwrap();
    let module = runtime.load(&misbehave()).unwrap();
    Fixture { _dir: dir, runtime, store, module }
}

impl Fixture {
    /// Routes like the node does, runs the request, and applies its writes on a 2xx answer.
    fn call(&self, method: &str, target: &str, body: &str) -> Result<AppResponse, ExecError> {
        self.run(method, target, body).map(|outcome| outcome.response)
    }

    /// [`Fixture::call`], answering with the whole outcome (the fuel it burned too).
    fn run(&self, method: &str, target: &str, body: &str) -> Result<Outcome, ExecError> {
        let (head, mode) = self.head(method, target);
        let inv = Invocation { head: &head, body: body.as_bytes(), mode, namespace: "app", privilege: Privilege::App };
        let (tx, result) = self.runtime.execute(&self.module, inv, self.store.begin().unwrap());
        let outcome = result?;
        if outcome.response.is_success() {
            self.store.apply(&tx.into_writes()).unwrap();
        }
        Ok(outcome)
    }

    /// The head the node would build for a request, and its endpoint's mode.
    fn head(&self, method: &str, target: &str) -> (RequestHead, Mode) {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let (endpoint, params) = self.module.manifest().find(method, path).expect("routed");
        let head = RequestHead {
            method: method.into(),
            path: path.into(),
            route: endpoint.path.clone(),
            params,
            query: query.into(),
            caller: Caller::member("tester"),
            request_id: format!("test-{path}"),
            ..Default::default()
        };
        (head, endpoint.mode)
    }

    /// The bytes of a request's head as the runtime frames it.
    fn head_bytes(&self, method: &str, target: &str) -> usize {
        serde_json::to_vec(&self.head(method, target).0).unwrap().len()
    }

    fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let tx = self.store.begin().unwrap();
        let mut out = Vec::new();
        let mut lower = std::ops::Bound::Unbounded;
        while let Some((k, v)) =
            tx.first_in("app/scratch", lower.as_ref().map(Vec::as_slice), std::ops::Bound::Unbounded).unwrap()
        {
            lower = std::ops::Bound::Excluded(k.clone());
            out.push((k, v));
        }
        out
    }

    /// Asserts the request fails with `code`, changed nothing, and the next request succeeds.
    fn refused(&self, method: &str, target: &str, code: &str) -> ExecError {
        assert_eq!(self.call("POST", "/put/seed", "before").unwrap().head.status, 204);
        let before = self.dump();
        let err = self.call(method, target, "").expect_err("misbehaviour is refused");
        assert_eq!(err.code(), code, "{target}: {err}");
        assert_eq!(self.dump(), before, "{target} left writes behind");
        assert_eq!(self.call("POST", "/put/after", "ok").unwrap().head.status, 204);
        assert_eq!(self.call("GET", "/get/after", "").unwrap().body, b"ok");
        err
    }
}

#[test]
fn an_infinite_loop_runs_out_of_fuel() {
    let f = fixture(Limits { fuel_per_request: 50_000_000, ..Limits::default() });
    let err = f.refused("POST", "/loop", "FuelExhausted");
    assert!(err.to_string().contains("fuel_per_request"), "{err}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_wall_clock_watchdog() {
    let f = fixture(Limits { fuel_per_request: u64::MAX / 2, wall_time_ms: 100, ..Limits::default() });
    let started = std::time::Instant::now();
    let err = f.refused("POST", "/loop", "WallTimeExceeded");
    assert!(err.to_string().contains("100 ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "the watchdog took {:?}", started.elapsed());
}

#[test]
fn the_watchdog_sleeps_when_idle_and_a_loop_that_starts_then_is_still_stopped() {
    let f = fixture(Limits { fuel_per_request: u64::MAX / 2, wall_time_ms: 100, ..Limits::default() });
    let idle = Duration::from_millis(limits::EPOCH_TICK_MS * u64::from(limits::WATCHDOG_IDLE_TICKS));
    let waited = std::time::Instant::now();
    while !f.runtime.watchdog.is_asleep() {
        assert!(waited.elapsed() < idle * 10, "the watchdog still ticks {:?} after the last run", waited.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The loop must wake it. It runs on a thread of its own, so that a watchdog that stayed
    // asleep fails the test instead of hanging it.
    let f = Arc::new(f);
    let (done, finished) = std::sync::mpsc::channel();
    let runner = f.clone();
    std::thread::spawn(move || done.send(runner.call("POST", "/loop", "").map(drop)));
    let outcome = finished.recv_timeout(Duration::from_secs(10)).expect("the loop was never stopped");
    assert_eq!(outcome.unwrap_err().code(), "WallTimeExceeded");
}

#[test]
fn unbounded_memory_growth_hits_the_memory_cap() {
    let f = fixture(Limits { memory_bytes_max: 16 << 20, ..Limits::default() });
    let err = f.refused("POST", "/grow", "MemoryLimitExceeded");
    assert!(err.to_string().contains("16777216"), "{err}");
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let f = fixture(Limits::default());
    let err = f.refused("POST", "/recurse", "StackOverflow");
    assert!(err.to_string().contains("stack_bytes_max"), "{err}");
}

#[test]
fn a_guest_panic_reports_its_message() {
    let f = fixture(Limits::default());
    let err = f.refused("POST", "/panic?what=loudly", "GuestPanic");
    assert!(err.to_string().contains("misbehave panicked loudly"), "{err}");
}

#[test]
fn an_oversized_response_is_refused_at_its_limit() {
    let f = fixture(Limits { response_bytes_max: 64 << 10, ..Limits::default() });
    let err = f.refused("POST", "/big?bytes=70000", "ResponseTooLarge");
    assert!(err.to_string().contains("response_bytes_max"), "{err}");
    // Just under the limit passes: the envelope head takes a few dozen bytes.
    assert_eq!(f.call("POST", "/big?bytes=65000", "").unwrap().body.len(), 65000);
}

#[test]
fn an_oversized_request_is_refused_before_running() {
    let f = fixture(Limits { request_bytes_max: 1 << 10, ..Limits::default() });
    let err = f.call("POST", "/put/k", &"x".repeat((1 << 10) + 1)).unwrap_err();
    assert_eq!(err.code(), "RequestTooLarge");
    assert_eq!(err.status(), 413);
    assert!(err.to_string().contains("request_bytes_max"), "{err}");
    // The limit is the body's: one of exactly the limit runs, whatever the head adds to it.
    assert_eq!(f.call("POST", "/put/k", &"x".repeat(1 << 10)).unwrap().head.status, 204);
}

#[test]
fn a_request_head_is_bounded_apart_from_its_body() {
    let f = fixture(Limits::default());
    // A query of `len` bytes adds exactly `len` to the head.
    let target = |len: usize| format!("/put/k?{}", "q".repeat(len));
    let at_bound = REQUEST_HEAD_BYTES_MAX - f.head_bytes("POST", &target(0));
    assert_eq!(f.head_bytes("POST", &target(at_bound)), REQUEST_HEAD_BYTES_MAX);
    assert_eq!(f.call("POST", &target(at_bound), "v").unwrap().head.status, 204);
    let err = f.call("POST", &target(at_bound + 1), "v").unwrap_err();
    assert_eq!((err.code(), err.status()), ("RequestHeadTooLarge", 431));
    assert!(err.to_string().contains("REQUEST_HEAD_BYTES_MAX"), "{err}");
}

#[test]
fn apps_cannot_write_governance_or_write_from_read_only_endpoints() {
    let f = fixture(Limits::default());
    let err = f.refused("POST", "/write-gov", "AccessDenied");
    assert!(err.to_string().contains("gov.members"), "{err}");
    let err = f.call("GET", "/read-gov", "").unwrap_err();
    assert_eq!(err.code(), "AccessDenied");
}

#[test]
fn values_over_the_limit_are_refused() {
    let f = fixture(Limits { value_bytes_max: 100, ..Limits::default() });
    // Values are stored as JSON: a string of 98 characters takes exactly 100 bytes.
    assert_eq!(f.call("POST", "/put/k", &"v".repeat(98)).unwrap().head.status, 204);
    let err = f.call("POST", "/put/k", &"v".repeat(99)).unwrap_err();
    assert_eq!(err.code(), "StoreLimitExceeded");
    assert!(err.to_string().contains("value_bytes_max"), "{err}");
}

#[test]
fn guest_output_and_clock_come_from_the_host() {
    let f = fixture(Limits::default());
    assert_eq!(f.call("GET", "/print", "").unwrap().head.status, 204);
    let (secs, noise): (u64, Vec<u8>) = serde_json::from_slice(&f.call("GET", "/clock", "").unwrap().body).unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert!(secs.abs_diff(now) < 60, "guest clock {secs} vs host {now}");
    let (_, noise2): (u64, Vec<u8>) = serde_json::from_slice(&f.call("GET", "/clock", "").unwrap().body).unwrap();
    assert_ne!(noise, noise2, "randomness differs per request");
}

#[test]
fn a_scan_is_charged_for_the_removed_keys_it_passes_and_passes_them_once() {
    let f = fixture(Limits::default());
    let fuel = |target: &str| f.run("POST", target, "").unwrap().fuel_used;
    let unscanned = fuel("/sweep?keys=500&nexts=0");
    let scanned = fuel("/sweep?keys=500&nexts=1");
    assert!(
        scanned - unscanned >= 500 * limits::HOSTCALL_FUEL_BASE,
        "passing 500 removed keys cost {} fuel",
        scanned - unscanned
    );
    // Asking a finished scan again does not walk the removed keys again: each answer costs a
    // host call, not another 500 lookups.
    let asked_again = fuel("/sweep?keys=500&nexts=1001");
    assert!(
        asked_again - scanned < 1000 * 2 * limits::HOSTCALL_FUEL_BASE,
        "1,000 more answers from a finished scan cost {} fuel",
        asked_again - scanned
    );
    // Scans see writes made after they were opened, a finished one too.
    assert_eq!(f.call("POST", "/sweep?keys=3&nexts=2&refill=1", "").unwrap().head.status, 204);
}

#[test]
fn maps_per_request_are_limited() {
    let f = fixture(Limits { maps_per_request_max: 8, ..Limits::default() });
    // `scratch`, which every misbehave endpoint writes, and 7 more reach the limit exactly.
    assert_eq!(f.call("POST", "/many-maps?n=7", "").unwrap().head.status, 204);
    let err = f.refused("POST", "/many-maps?n=8", "StoreLimitExceeded");
    assert!(err.to_string().contains("more than 8 maps named (maps_per_request_max)"), "{err}");
}

#[test]
fn a_random_get_call_is_limited() {
    let f = fixture(Limits::default());
    let max = limits::RANDOM_BYTES_PER_CALL_MAX;
    let answer = f.call("POST", &format!("/random?bytes={max}"), "").unwrap();
    assert_eq!(answer.body, max.to_string().as_bytes());
    let err = f.refused("POST", &format!("/random?bytes={}", max + 1), "GuestTrap");
    assert!(err.to_string().contains(&format!("exceeds limit {max}")), "{err}");
}

#[test]
fn guest_output_is_capped() {
    let mut out = GuestOutput::new(10);
    out.push("stdout", b"0123456789abcdef");
    assert_eq!(out.text(), "0123456789");
}

#[test]
fn manifests_are_read_at_load() {
    let rt = Runtime::new(Limits::default()).unwrap();
    let m = rt.load(cloister_bundled::RECONCILE).unwrap();
    let paths: Vec<_> = m.manifest().endpoints.iter().map(|e| (e.method.as_str(), e.path.as_str(), e.mode)).collect();
    assert_eq!(
        paths,
        [
            ("POST", "/ingest", Mode::Readwrite),
            ("POST", "/csv/ingest", Mode::Readwrite),
            ("GET", "/report", Mode::Readonly),
            ("GET", "/report/{key}", Mode::Readonly),
        ]
    );
    let again = rt.load(cloister_bundled::RECONCILE).unwrap();
    assert!(Arc::ptr_eq(&m, &again), "the cache returns the same module");
}

mod load {
    use super::*;

    fn load(wasm: &[u8]) -> LoadError {
        Runtime::new(Limits::default()).unwrap().load(wasm).expect_err("refused")
    }

    /// The exports of ABI v1 on a trivial memory, for hand-written modules.
    const EXPORTS: &str = r#"
        (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64) i64.const 0)
        (func (export "manifest") (result i64) i64.const 0)"#;

    #[test]
    fn a_module_without_the_marker() {
        let wasm = wat::parse_str(format!("(module {EXPORTS})")).unwrap();
        assert!(matches!(load(&wasm), LoadError::MissingMarker));
    }

    #[test]
    fn a_module_importing_off_the_allow_list() {
        for (module, name) in
            [("env", "socket"), ("wasi_snapshot_preview1", "poll_oneoff"), ("cloister", "kv_delete_all")]
        {
            let wasm = wat::parse_str(format!(
                r#"(module (import "{module}" "{name}" (func)) (func (export "cloister_abi_v1")) {EXPORTS})"#
            ))
            .unwrap();
            let err = load(&wasm);
            assert!(matches!(&err, LoadError::ImportNotAllowed { name: n, .. } if n == name), "{err}");
        }
    }

    #[test]
    fn a_host_call_with_the_wrong_signature() {
        let wasm = wat::parse_str(format!(
            r#"(module (import "cloister" "kv_get" (func (param i32) (result i32))) (func (export "cloister_abi_v1")) {EXPORTS})"#
        ))
        .unwrap();
        let err = load(&wasm);
        assert!(err.to_string().contains("(i32, i32, i32, i32) -> (i64)"), "{err}");
    }

    #[test]
    fn a_missing_required_export() {
        let wasm =
            wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "cloister_abi_v1")))"#).unwrap();
        assert!(matches!(load(&wasm), LoadError::MissingExport { name: "alloc", .. }));
    }

    #[test]
    fn an_oversized_module() {
        let rt = Runtime::new(Limits { module_bytes_max: 1000, ..Limits::default() }).unwrap();
        let err = rt.load(&misbehave()).err().unwrap();
        assert!(matches!(err, LoadError::TooLarge { max: 1000, .. }), "{err}");
        let exact = wat::parse_str(format!("(module (func (export \"cloister_abi_v1\")) {EXPORTS})")).unwrap();
        let rt = Runtime::new(Limits { module_bytes_max: exact.len(), ..Limits::default() }).unwrap();
        assert!(
            !matches!(rt.load(&exact), Err(LoadError::TooLarge { .. })),
            "a module at the limit passes the size check"
        );
    }

    #[test]
    fn random_bytes() {
        let mut seed = 7u32;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        assert!(matches!(load(&garbage), LoadError::Invalid(_)));
        let mut truncated = cloister_bundled::RECONCILE.to_vec();
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(load(&truncated), LoadError::Invalid(_)));
    }

    #[test]
    fn a_manifest_that_is_not_json() {
        let wasm = wat::parse_str(format!("(module (func (export \"cloister_abi_v1\")) {EXPORTS})")).unwrap();
        assert!(matches!(load(&wasm), LoadError::Manifest(_)));
    }
}

/// The guest's arena never reuses freed memory, so the largest batch the reconcile contract
/// accepts by default (batch_records_max rows of the largest fields) must fit the default
/// memory cap, inside the default request size.
#[test]
fn the_largest_default_reconcile_batch_fits_the_default_memory_cap() {
    let dir = tempfile::tempdir().unwrap();
    let store = kv::Store::open(&dir.path().join("state.redb")).unwrap();
    let runtime = Runtime::new(Limits::default()).unwrap();
    let module = runtime.load(cloister_bundled::RECONCILE).unwrap();
    // 10,000 rows whose fields are as long as fits in request_bytes_max.
    let rows = 10_000;
    let field = (Limits::default().request_bytes_max - 64 * 1024) / rows / 2 - 16;
    let body: Vec<_> = (0..rows)
        .map(|i| serde_json::json!({"lei": format!("{i:0width$}", width = field.min(256)), "nace": "n".repeat(field.min(1024))}))
        .collect();
    let body = serde_json::to_vec(&body).unwrap();
    assert!(body.len() <= Limits::default().request_bytes_max);
    let head = RequestHead {
        method: "POST".into(),
        path: "/ingest".into(),
        route: "/ingest".into(),
        caller: Caller::member("party"),
        ..Default::default()
    };
    let inv =
        Invocation { head: &head, body: &body, mode: Mode::Readwrite, namespace: "app", privilege: Privilege::App };
    let (_, result) = runtime.execute(&module, inv, store.begin().unwrap());
    let outcome = result.expect("the largest default batch runs");
    assert_eq!(outcome.response.head.status, 200, "{}", String::from_utf8_lossy(&outcome.response.body));
    let cap = Limits::default().memory_bytes_max;
    println!("peak memory {} of {cap} bytes, fuel {}", outcome.memory_bytes, outcome.fuel_used);
    assert!(outcome.memory_bytes <= cap);
}

/// Loads of one module that miss the cache at once compile it once: every caller gets the same
/// compiled module. (Each compiled its own before, and a burst of first requests on a node that
/// had not compiled its app kept two cores busy with dozens of identical compilations.)
#[test]
fn concurrent_loads_of_one_module_compile_it_once() {
    let runtime = Arc::new(Runtime::new(Limits::default()).unwrap());
    let wasm = Arc::new(misbehave());
    let loaded: Vec<_> = (0..8)
        .map(|_| {
            let (runtime, wasm) = (runtime.clone(), wasm.clone());
            std::thread::spawn(move || runtime.load(&wasm).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(loaded.iter().all(|m| Arc::ptr_eq(m, &loaded[0])), "one compilation, shared by every caller");
}

/// `misbehave.wasm` with a custom section carrying `n`: another module to the cache.
fn variant(n: u8) -> Vec<u8> {
    let mut wasm = misbehave();
    // Section id 0 (custom), 3 bytes: the name "n" (length 1) and one byte of content.
    wasm.extend_from_slice(&[0, 3, 1, b'n', n]);
    wasm
}

/// Counts compiles, and refusals.
#[derive(Default)]
struct Compiles(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64);

impl ExecObserver for Compiles {
    fn executed(&self, _: Privilege, _: Option<&ExecError>) {}

    fn compiled(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn refused(&self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A refused module sent again is refused without being checked and compiled again. The runtime
/// remembers `REFUSED_MODULES_REMEMBERED` refusals and forgets the oldest first.
#[test]
fn a_refused_module_is_refused_again_without_its_checks() {
    let counts = Arc::new(Compiles::default());
    let runtime = Runtime::new(Limits::default()).unwrap().with_observer(counts.clone());
    // A valid module without the ABI marker, told apart by a custom section carrying `n`.
    let bad = |n: u16| {
        let mut wasm = wat::parse_str("(module)").unwrap();
        wasm.extend_from_slice(&[0, 4, 1, b'n']);
        wasm.extend_from_slice(&n.to_be_bytes());
        wasm
    };
    let refused = || counts.1.load(std::sync::atomic::Ordering::SeqCst);
    let first = runtime.load(&bad(0)).unwrap_err();
    assert_eq!(first, LoadError::MissingMarker);
    assert_eq!(runtime.load(&bad(0)).unwrap_err(), first, "the same refusal");
    assert_eq!(refused(), 1, "the second load of the same bytes ran no checks");
    for n in 1..=limits::REFUSED_MODULES_REMEMBERED as u16 {
        runtime.load(&bad(n)).unwrap_err();
    }
    assert_eq!(refused(), 1 + limits::REFUSED_MODULES_REMEMBERED as u64);
    runtime.load(&bad(0)).unwrap_err();
    assert_eq!(refused(), 2 + limits::REFUSED_MODULES_REMEMBERED as u64, "the oldest refusal was forgotten");
    // A manifest that could not be read just now, every instance slot being busy, says nothing
    // of the module: it is not remembered, and loads once a slot is free.
    let limits = Limits { instances_max: 1, fuel_per_request: u64::MAX / 2, wall_time_ms: 3_000, ..Limits::default() };
    let f = Arc::new(fixture(limits));
    let runner = f.clone();
    let looping = std::thread::spawn(move || runner.call("POST", "/loop", "").map(drop));
    // Once the loop is counted as running, its instance is taken a moment later.
    let waited = std::time::Instant::now();
    while f.runtime.watchdog.running() == 0 {
        assert!(waited.elapsed() < Duration::from_secs(10), "the loop did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // On a loaded machine the loop may not hold its slot yet: another module is tried then.
    let busy = (9..20)
        .find_map(|n| {
            std::thread::sleep(Duration::from_millis(100));
            f.runtime.load(&variant(n)).err().map(|e| (n, e))
        })
        .expect("a load while the one slot is busy is refused");
    assert!(matches!(busy.1, LoadError::Unavailable(_)), "{}", busy.1);
    assert_eq!(looping.join().unwrap().unwrap_err().code(), "WallTimeExceeded");
    f.runtime.load(&variant(busy.0)).expect("the module loads once a slot is free");
    // A module over the size cap is refused before its bytes are even hashed; nothing to keep.
    let small = Runtime::new(Limits { module_bytes_max: 8, ..Limits::default() }).unwrap();
    assert!(matches!(small.load(&bad(0)).unwrap_err(), LoadError::TooLarge { .. }));
    assert!(small.refused.lock().unwrap().is_empty());
}

/// The cache keeps `modules_cached_max` modules nobody else holds, dropping the least recently
/// used, and never one someone holds: a node's app or constitution, or a proposal's module on
/// its way to the writer, stays compiled however many others compile meanwhile.
#[test]
fn the_cache_evicts_the_least_recently_used_module_nobody_holds() {
    let compiles = Arc::new(Compiles::default());
    let runtime =
        Runtime::new(Limits { modules_cached_max: 2, ..Limits::default() }).unwrap().with_observer(compiles.clone());
    let load = |n: u8| runtime.load(&variant(n)).unwrap();
    let compiled = || compiles.0.load(std::sync::atomic::Ordering::SeqCst);
    let held = load(0);
    load(1);
    load(2);
    load(1);
    assert_eq!(compiled(), 3, "the second load of 1 is a cache hit");
    // Two modules nobody holds are cached (1, 2): 2, the less recently used, makes way for 3.
    load(3);
    load(1);
    assert_eq!(compiled(), 4);
    load(2);
    assert_eq!(compiled(), 5, "2 was evicted");
    for n in 4..20 {
        load(n);
    }
    assert_eq!(compiled(), 21);
    assert!(Arc::ptr_eq(&held, &load(0)), "the held module is still cached");
    assert_eq!(compiled(), 21);
}
