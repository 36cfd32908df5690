//! The contract runtime: one wasmtime engine, a cache of checked and pre-linked modules, and a
//! fresh sandboxed instance per request with fuel, memory, stack and wall-clock limits.
//!
//! [`Runtime::execute`] blocks: call it from a blocking thread, never from an async task (WASI's
//! synchronous calls drive a tokio `block_on` internally).

mod error;
mod host;
mod limits;
mod wasi;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use cloister_abi::abi::{self, Manifest, Privilege, RequestHead, ResponseHead};
use cloister_abi::{Caller, Mode};
use wasmtime::{
    Config, Engine, ExternType, InstancePre, Module, PoolingAllocationConfig, Store, TypedFunc, ValType, WasmFeatures,
};

pub use error::{ExecError, LoadError};
pub use limits::{Limits, REQUEST_HEAD_BYTES_MAX};
pub use wasi::GuestOutput;

use host::HostState;
use limits::REFUSED_MODULES_REMEMBERED;

use cloister_store::Tx;

/// A module that passed every load check, compiled and linked, with its manifest.
pub struct LoadedModule {
    hash: [u8; 32],
    manifest: Manifest,
    pre: InstancePre<HostState>,
}

impl LoadedModule {
    /// The blake3 hash of the module's bytes.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule").field("hash", &blake3::Hash::from(self.hash).to_hex()).finish_non_exhaustive()
    }
}

/// One request to run.
pub struct Invocation<'a> {
    pub head: &'a RequestHead,
    pub body: &'a [u8],
    pub mode: Mode,
    /// The namespace of the app's maps in the store.
    pub namespace: &'a str,
    /// Whose code runs: an app, or the constitution (which may write `gov.*`).
    pub privilege: Privilege,
}

/// A contract's answer, as the node receives it: the response head and the raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppResponse {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

impl AppResponse {
    /// Whether the contract answered 2xx, and so its writes are to be committed.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.head.status)
    }

    /// The message of a failed answer's error body (or the body itself, when it has none).
    pub fn error_message(&self) -> String {
        AppErrorBody::parse(&self.body).message
    }
}

/// A contract's error answer, `{"error": {"code", "message", "details"?}}`, as far as it parses.
#[derive(Debug, Clone, PartialEq)]
pub struct AppErrorBody {
    pub code: Option<String>,
    /// The error's message, or the whole body as text when it carries none.
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl AppErrorBody {
    pub fn parse(body: &[u8]) -> AppErrorBody {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        let text = |k: &str| error.and_then(|e| e.get(k)).and_then(|v| v.as_str()).map(str::to_owned);
        AppErrorBody {
            code: text("code"),
            message: text("message").unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
            details: error.and_then(|e| e.get("details")).cloned(),
        }
    }
}

/// What a successful run produced.
pub struct Outcome {
    pub response: AppResponse,
    /// Fuel the request burned.
    pub fuel_used: u64,
    /// The instance's linear memory when it finished, in bytes (its peak: memory never shrinks).
    pub memory_bytes: usize,
}

/// Told of every execution's end, for a node's metrics: which contract ran and the error that
/// stopped it if one did; and of every module compiled. Not the fuel it consumed: that depends on
/// the data the contract read, which may be other parties' (a published counter told a key
/// others had submitted from one nobody had, by the fuel a read of it burned).
pub trait ExecObserver: Send + Sync {
    fn executed(&self, privilege: Privilege, error: Option<&ExecError>);

    /// A module passed its checks and was compiled (a cache hit is not a compile).
    fn compiled(&self) {}

    /// A module failed its checks (a refusal remembered from before is not told again).
    fn refused(&self) {}
}

/// The engine, its module cache and its limits.
pub struct Runtime {
    engine: Engine,
    linker: wasmtime::Linker<HostState>,
    limits: Arc<Limits>,
    /// The limits of constitution runs: as `limits`, but a value may be as large as a module,
    /// since `apply` stores the wasm of `set_app` and `set_constitution`.
    gov_limits: Arc<Limits>,
    modules: Mutex<ModuleCache>,
    /// Held while a module compiles: loads that miss the cache at once compile one at a time, so
    /// a burst of requests on a node that has not compiled its app yet compiles it once (before,
    /// each compiled it, and 85 concurrent compilations on two cores kept every request waiting
    /// for up to `request_timeout_ms`).
    compiling: Mutex<()>,
    /// Modules that failed their checks, by hash, with why, newest last (at most
    /// `REFUSED_MODULES_REMEMBERED`). The checks depend only on a module's bytes and this
    /// runtime's limits, so the same bytes are refused again without compiling them: a refused
    /// proposal's module resent in fresh proposals would otherwise keep the node compiling.
    refused: Mutex<VecDeque<([u8; 32], LoadError)>>,
    observer: Option<Arc<dyn ExecObserver>>,
    watchdog: Arc<Watchdog>,
}

/// Compiled modules by the blake3 hash of their bytes. It keeps up to `modules_cached_max`
/// modules that nobody else holds, evicting the least recently used of those, and every module
/// someone does hold (that memory is in use either way): the app and constitution a node keeps,
/// and the modules of a proposal on its way to the writer, are never evicted, so however many
/// other modules compile meanwhile, the next load of one of them is not a compile.
#[derive(Default)]
struct ModuleCache {
    modules: HashMap<[u8; 32], (Arc<LoadedModule>, u64)>,
    /// Counts loads; each entry notes its last.
    clock: u64,
}

impl ModuleCache {
    fn get(&mut self, hash: &[u8; 32]) -> Option<Arc<LoadedModule>> {
        self.clock += 1;
        let (module, used) = self.modules.get_mut(hash)?;
        *used = self.clock;
        Some(module.clone())
    }

    /// Adds a module, first evicting the least recently used of those nobody else holds until
    /// fewer than `max` of them remain.
    fn insert(&mut self, module: Arc<LoadedModule>, max: usize) {
        let unheld = |(module, _): &(Arc<LoadedModule>, u64)| Arc::strong_count(module) == 1;
        while self.modules.values().filter(|e| unheld(e)).count() >= max.max(1) {
            let victim = self
                .modules
                .iter()
                .filter(|(_, e)| unheld(e))
                .min_by_key(|(_, (_, used))| *used)
                .map(|(hash, _)| *hash)
                .expect("an unheld module is there to evict");
            self.modules.remove(&victim);
        }
        self.clock += 1;
        self.modules.insert(module.hash, (module, self.clock));
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.watchdog.stop();
    }
}

impl Runtime {
    pub fn new(limits: Limits) -> anyhow::Result<Runtime> {
        limits.check().map_err(anyhow::Error::msg)?;
        let engine = Engine::new(&engine_config(&limits))?;
        let watchdog = Watchdog::start(&engine);
        let linker = host::linker(&engine)?;
        let gov_limits =
            Arc::new(Limits { value_bytes_max: limits.value_bytes_max.max(limits.module_bytes_max), ..limits.clone() });
        Ok(Runtime {
            engine,
            linker,
            limits: Arc::new(limits),
            gov_limits,
            modules: Mutex::default(),
            compiling: Mutex::default(),
            refused: Mutex::default(),
            observer: None,
            watchdog,
        })
    }

    /// Tells `observer` of every execution and compile from now on.
    pub fn with_observer(mut self, observer: Arc<dyn ExecObserver>) -> Runtime {
        self.observer = Some(observer);
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks, compiles and caches a module, keyed by the blake3 hash of its bytes.
    ///
    /// Checks, in order: the size cap; validation with the engine's own feature set; imports
    /// against the allow-list and their signatures; the ABI marker and required exports; the
    /// manifest the module reports.
    pub fn load(&self, wasm: &[u8]) -> Result<Arc<LoadedModule>, LoadError> {
        let max = self.limits.module_bytes_max;
        if wasm.len() > max {
            return Err(LoadError::TooLarge { bytes: wasm.len(), max });
        }
        let hash = *blake3::hash(wasm).as_bytes();
        let known = || -> Option<Result<Arc<LoadedModule>, LoadError>> {
            if let Some(m) = self.modules.lock().expect("module cache lock").get(&hash) {
                return Some(Ok(m));
            }
            let refused = self.refused.lock().expect("refused modules lock");
            refused.iter().find(|(h, _)| *h == hash).map(|(_, e)| Err(e.clone()))
        };
        if let Some(known) = known() {
            return known;
        }
        let _compiling = self.compiling.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Whoever held the lock before may have compiled or refused this very module.
        if let Some(known) = known() {
            return known;
        }
        let loaded = self.check_and_compile(wasm, hash).inspect_err(|e| {
            if matches!(e, LoadError::Unavailable(_)) {
                return;
            }
            let mut refused = self.refused.lock().expect("refused modules lock");
            if refused.len() >= REFUSED_MODULES_REMEMBERED {
                refused.pop_front();
            }
            refused.push_back((hash, e.clone()));
            drop(refused);
            if let Some(observer) = &self.observer {
                observer.refused();
            }
        })?;
        self.modules.lock().expect("module cache lock").insert(loaded.clone(), self.limits.modules_cached_max);
        if let Some(observer) = &self.observer {
            observer.compiled();
        }
        Ok(loaded)
    }

    /// The checks of [`Runtime::load`] after the size cap, and the compile.
    fn check_and_compile(&self, wasm: &[u8], hash: [u8; 32]) -> Result<Arc<LoadedModule>, LoadError> {
        Module::validate(&self.engine, wasm).map_err(|e| LoadError::Invalid(e.root_cause().to_string()))?;
        let module =
            Module::from_binary(&self.engine, wasm).map_err(|e| LoadError::Compile(e.root_cause().to_string()))?;
        check_imports(&module)?;
        check_exports(&module)?;
        let pre = self.linker.instantiate_pre(&module).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let manifest = self.read_manifest(&pre)?;
        Ok(Arc::new(LoadedModule { hash, manifest, pre }))
    }

    fn store(
        &self,
        tx: Option<Tx>,
        mode: Mode,
        namespace: &str,
        caller: &Caller,
        privilege: Privilege,
    ) -> (Store<HostState>, Arc<Mutex<GuestOutput>>) {
        let output = Arc::new(Mutex::new(GuestOutput::new(self.limits.log_bytes_per_request_max)));
        let wasi = wasi::context(&output, SystemTime::now());
        let caller_json = serde_json::to_vec(caller).expect("callers serialize");
        let limits = match privilege {
            Privilege::App => self.limits.clone(),
            Privilege::Constitution => self.gov_limits.clone(),
        };
        let access = host::Access { mode, privilege, namespace: namespace.to_owned() };
        let state = HostState::new(wasi, limits, tx, access, caller_json, output.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_fuel(self.limits.fuel_per_request).expect("fuel is enabled");
        store.set_epoch_deadline(self.limits.deadline_ticks());
        (store, output)
    }

    fn read_manifest(&self, pre: &InstancePre<HostState>) -> Result<Manifest, LoadError> {
        let _watched = self.watchdog.watch();
        let (mut store, _) = self.store(None, Mode::Readonly, "", &Caller::anonymous(), Privilege::App);
        let fuel = self.limits.fuel_per_request;
        let bytes = (|| -> Result<Vec<u8>, ExecError> {
            let instance = pre.instantiate(&mut store).map_err(|e| ExecError::from_wasm(e, fuel, &self.limits))?;
            let f: TypedFunc<(), u64> =
                instance.get_typed_func(&mut store, abi::EXPORT_MANIFEST).map_err(|e| ExecError::Abi(e.to_string()))?;
            let packed = f.call(&mut store, ()).map_err(|e| ExecError::from_wasm(e, fuel, &self.limits))?;
            read_packed(&mut store, &instance, packed, self.limits.response_bytes_max)
        })()
        .map_err(|e| match e {
            ExecError::Busy { .. } | ExecError::WallTime { .. } => LoadError::Unavailable(e.to_string()),
            e => LoadError::Manifest(e.to_string()),
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| LoadError::Manifest(e.to_string()))?;
        manifest.check().map_err(LoadError::Manifest)?;
        Ok(manifest)
    }

    /// Runs one request in a fresh instance against `tx`, and hands the transaction back.
    ///
    /// On error the transaction may hold partial writes: the caller must discard it.
    pub fn execute(&self, module: &LoadedModule, inv: Invocation<'_>, tx: Tx) -> (Tx, Result<Outcome, ExecError>) {
        let _watched = self.watchdog.watch();
        let (mut store, output) = self.store(Some(tx), inv.mode, inv.namespace, &inv.head.caller, inv.privilege);
        let result = self.run(&mut store, module, &inv);
        output.lock().expect("guest output lock").emit(&inv.head.request_id);
        let fuel_used = self.limits.fuel_per_request - store.get_fuel().unwrap_or(0);
        let memory_bytes = store.data().memory_bytes(&store);
        let tx = store.into_data().tx.expect("execute keeps the transaction");
        if let Some(observer) = &self.observer {
            observer.executed(inv.privilege, result.as_ref().err());
        }
        (tx, result.map(|response| Outcome { response, fuel_used, memory_bytes }))
    }

    fn run(
        &self,
        store: &mut Store<HostState>,
        module: &LoadedModule,
        inv: &Invocation<'_>,
    ) -> Result<AppResponse, ExecError> {
        let fuel = self.limits.fuel_per_request;
        let wasm_err = |e| ExecError::from_wasm(e, fuel, &self.limits);
        let max = self.limits.request_bytes_max;
        if inv.body.len() > max {
            return Err(ExecError::RequestTooLarge { bytes: inv.body.len(), max });
        }
        let envelope = abi::frame(inv.head, inv.body);
        let head_bytes = envelope.len() - 4 - inv.body.len();
        if head_bytes > limits::REQUEST_HEAD_BYTES_MAX {
            return Err(ExecError::RequestHeadTooLarge { bytes: head_bytes, max: limits::REQUEST_HEAD_BYTES_MAX });
        }
        let instance = module.pre.instantiate(&mut *store).map_err(wasm_err)?;
        let alloc: TypedFunc<u32, u32> =
            instance.get_typed_func(&mut *store, abi::EXPORT_ALLOC).map_err(|e| ExecError::Abi(e.to_string()))?;
        let handle: TypedFunc<(u32, u32), u64> =
            instance.get_typed_func(&mut *store, abi::EXPORT_HANDLE).map_err(|e| ExecError::Abi(e.to_string()))?;
        let len = envelope.len() as u32;
        let ptr = alloc.call(&mut *store, len).map_err(wasm_err)?;
        let memory = instance
            .get_memory(&mut *store, abi::EXPORT_MEMORY)
            .ok_or_else(|| ExecError::Abi("the module exports no memory".into()))?;
        store.data_mut().set_memory(memory);
        memory
            .write(&mut *store, ptr as usize, &envelope)
            .map_err(|_| ExecError::Abi(format!("alloc({len}) returned {ptr}, outside guest memory")))?;
        let packed = handle.call(&mut *store, (ptr, len)).map_err(wasm_err)?;
        let framed = read_packed(store, &instance, packed, self.limits.response_bytes_max)?;
        let (head, body): (ResponseHead, &[u8]) =
            abi::unframe(&framed).map_err(|e| ExecError::Abi(format!("malformed response envelope: {e}")))?;
        Ok(AppResponse { head, body: body.to_vec() })
    }
}

/// Reads the `ptr << 32 | len` buffer a guest export returned.
fn read_packed(
    store: &mut Store<HostState>,
    instance: &wasmtime::Instance,
    packed: u64,
    max: usize,
) -> Result<Vec<u8>, ExecError> {
    let (ptr, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
    if len > max {
        return Err(ExecError::ResponseTooLarge { bytes: len, max });
    }
    let memory = instance
        .get_memory(&mut *store, abi::EXPORT_MEMORY)
        .ok_or_else(|| ExecError::Abi("the module exports no memory".into()))?;
    memory
        .data(&*store)
        .get(ptr..)
        .and_then(|d| d.get(..len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| ExecError::Abi(format!("returned buffer {ptr}+{len} lies outside guest memory")))
}

fn engine_config(limits: &Limits) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(limits.instances_max)
        .total_memories(limits.instances_max)
        .total_tables(limits.instances_max)
        .total_stacks(1)
        .max_memories_per_module(1)
        .max_tables_per_module(1)
        .max_memory_size(limits.memory_bytes_max)
        // Keep an instance slot's dirty pages resident and reset just those between requests
        // (PAGEMAP_SCAN, Linux 6.7+; elsewhere the low bytes are memset): page faults on fresh
        // memory otherwise cost a third of a large request's time.
        .linear_memory_keep_resident(limits.memory_keep_resident_bytes)
        // Likewise for the table: zeroed in place rather than given back with `madvise`, whose
        // TLB shootdown interrupts every other core running the node.
        .table_keep_resident(limits::TABLE_KEEP_RESIDENT_BYTES)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .allocation_strategy(pool)
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(limits.stack_bytes_max)
        // Deterministic execution, so a ledger can be replayed for audit: canonical NaNs, no
        // threads, no relaxed SIMD, one 32-bit memory.
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .wasm_features(WasmFeatures::THREADS, false)
        .wasm_multi_memory(false)
        .wasm_memory64(false);
    config
}

/// The thread that advances the engine's epoch every [`limits::EPOCH_TICK_MS`], so that a store
/// whose deadline passes traps ([`Limits::wall_time_ms`]). It ticks while any contract runs and
/// for [`limits::WATCHDOG_IDLE_TICKS`] after the last one ends, then sleeps until the next starts.
/// The epoch stands still only while no store exists to read it, so every deadline counts from
/// ticks that run.
struct Watchdog {
    state: Mutex<WatchState>,
    wake: Condvar,
}

#[derive(Default)]
struct WatchState {
    /// Contracts running now.
    running: usize,
    /// The thread waits on `wake` and ticks no more.
    asleep: bool,
    /// The runtime is gone: the thread ends.
    stopped: bool,
}

/// One contract's run: the watchdog ticks at least until it is dropped.
struct Watched<'a>(&'a Watchdog);

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
    }
}

impl Watchdog {
    fn start(engine: &Engine) -> Arc<Watchdog> {
        let watchdog = Arc::new(Watchdog { state: Mutex::default(), wake: Condvar::new() });
        let (weak, dog) = (engine.weak(), watchdog.clone());
        std::thread::Builder::new()
            .name("wasm-watchdog".into())
            .spawn(move || dog.run(&weak))
            .expect("spawning the watchdog thread");
        watchdog
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // The state is three plain fields, each written whole: a panic elsewhere leaves it sound.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks a contract as running until the guard drops, waking the thread if it sleeps. Taken
    /// before the store is made: while the thread sleeps the epoch stands still, so the store's
    /// deadline counts from the ticks that follow.
    fn watch(&self) -> Watched<'_> {
        let mut state = self.lock();
        state.running += 1;
        if state.asleep {
            self.wake.notify_one();
        }
        Watched(self)
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_one();
    }

    #[cfg(test)]
    fn is_asleep(&self) -> bool {
        self.lock().asleep
    }

    #[cfg(test)]
    fn running(&self) -> usize {
        self.lock().running
    }

    fn run(&self, engine: &wasmtime::EngineWeak) {
        let mut idle = 0u32;
        loop {
            std::thread::sleep(Duration::from_millis(limits::EPOCH_TICK_MS));
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
            let mut state = self.lock();
            if state.stopped {
                return;
            }
            idle = if state.running == 0 { idle + 1 } else { 0 };
            if idle < limits::WATCHDOG_IDLE_TICKS {
                continue;
            }
            state.asleep = true;
            while state.running == 0 && !state.stopped {
                state = self.wake.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.asleep = false;
            idle = 0;
        }
    }
}

fn val_type(t: abi::ValType) -> &'static str {
    match t {
        abi::ValType::I32 => "i32",
        abi::ValType::I64 => "i64",
    }
}

fn signature(params: impl Iterator<Item = String>, results: impl Iterator<Item = String>) -> String {
    format!("({}) -> ({})", params.collect::<Vec<_>>().join(", "), results.collect::<Vec<_>>().join(", "))
}

fn wasm_type(t: ValType) -> String {
    match t {
        ValType::I32 => "i32".into(),
        ValType::I64 => "i64".into(),
        other => format!("{other}"),
    }
}

fn check_imports(module: &Module) -> Result<(), LoadError> {
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        let refused = || LoadError::ImportNotAllowed { module: m.to_owned(), name: name.to_owned() };
        match (m, import.ty()) {
            (abi::WASI_MODULE, ExternType::Func(_)) if abi::WASI_IMPORTS.contains(&name) => {}
            (abi::IMPORT_MODULE, ExternType::Func(f)) => {
                let (_, params, results) = abi::IMPORTS.iter().find(|(n, ..)| *n == name).ok_or_else(refused)?;
                let expected =
                    signature(params.iter().map(|t| val_type(*t).into()), results.iter().map(|t| val_type(*t).into()));
                let found = signature(f.params().map(wasm_type), f.results().map(wasm_type));
                if found != expected {
                    return Err(LoadError::ImportSignature { name: name.to_owned(), found, expected });
                }
            }
            _ => return Err(refused()),
        }
    }
    Ok(())
}

fn check_exports(module: &Module) -> Result<(), LoadError> {
    let func = |name| module.get_export(name).and_then(|e| e.func().cloned());
    let marker = func(abi::EXPORT_MARKER).ok_or(LoadError::MissingMarker)?;
    if marker.params().len() != 0 || marker.results().len() != 0 {
        return Err(LoadError::MissingMarker);
    }
    let required: [(&'static str, &'static str); 3] = [
        (abi::EXPORT_ALLOC, "(i32) -> (i32)"),
        (abi::EXPORT_HANDLE, "(i32, i32) -> (i64)"),
        (abi::EXPORT_MANIFEST, "() -> (i64)"),
    ];
    for (name, expected) in required {
        let ok =
            func(name).is_some_and(|f| signature(f.params().map(wasm_type), f.results().map(wasm_type)) == expected);
        if !ok {
            return Err(LoadError::MissingExport { name, expected });
        }
    }
    if !matches!(module.get_export(abi::EXPORT_MEMORY), Some(ExternType::Memory(_))) {
        return Err(LoadError::MissingExport { name: abi::EXPORT_MEMORY, expected: "a memory" });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
