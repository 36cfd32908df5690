//! The `cloister` host functions of ABI v1 and the per-request state they work on.
//!
//! Every guest pointer is bounds-checked, every size is limited, and every call is charged fuel.
//! A violation traps the request with an [`ExecError`] that names it.

use std::ops::Bound;
use std::sync::{Arc, Mutex};

use cloister_abi::Mode;
use cloister_abi::abi::{self, Privilege};
use wasmtime::{Caller, Extern, Linker, Memory, ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::error::ExecError;
use super::limits::{HOSTCALL_FUEL_BASE, Limits};
use super::wasi::GuestOutput;
use cloister_store::{self as kv, Tx};

/// Longest message `abort` keeps.
const ABORT_MESSAGE_BYTES_MAX: usize = 4 << 10;

/// The state of one request's instance.
pub(crate) struct HostState {
    pub wasi: WasiP1Ctx,
    pub limiter: Limiter,
    pub limits: Arc<Limits>,
    /// The request's transaction; `None` while only the manifest is read.
    pub tx: Option<Tx>,
    pub access: Access,
    /// The caller as JSON, for the `caller` import.
    pub caller_json: Vec<u8>,
    pub output: Arc<Mutex<GuestOutput>>,
    /// The value the guest collects next with `take`.
    register: Option<Vec<u8>>,
    scans: Vec<Scan>,
    write_bytes: usize,
    /// The instance's memory, looked up once.
    memory: Option<Memory>,
    /// Guest map names already checked, with their stored names.
    maps: Vec<(Vec<u8>, String)>,
}

/// What a request may touch.
pub(crate) struct Access {
    pub mode: Mode,
    pub privilege: Privilege,
    /// The namespace of the code's own maps.
    pub namespace: String,
}

struct Scan {
    map: String,
    lower: Bound<Vec<u8>>,
    upper: Bound<Vec<u8>>,
    /// Whether a `kv_next` found nothing more: later ones answer at once, instead of walking
    /// again over whatever removed keys lie within the bounds.
    done: bool,
}

impl HostState {
    pub fn new(
        wasi: WasiP1Ctx,
        limits: Arc<Limits>,
        tx: Option<Tx>,
        access: Access,
        caller_json: Vec<u8>,
        output: Arc<Mutex<GuestOutput>>,
    ) -> Self {
        HostState {
            wasi,
            limiter: Limiter::new(&limits),
            limits,
            tx,
            access,
            caller_json,
            output,
            register: None,
            scans: Vec::new(),
            write_bytes: 0,
            memory: None,
            maps: Vec::new(),
        }
    }

    /// Hands the state the instance's memory, so host calls need not look it up.
    pub(crate) fn set_memory(&mut self, memory: Memory) {
        self.memory = Some(memory);
    }

    /// The size of the instance's memory, once known.
    pub(crate) fn memory_bytes(&self, store: &wasmtime::Store<HostState>) -> usize {
        self.memory.map_or(0, |m| m.data_size(store))
    }

    fn tx(&mut self) -> wasmtime::Result<&mut Tx> {
        tx(&mut self.tx)
    }

    /// A write to map `m` may put a key ahead of a finished scan of it: scans see writes made
    /// after they were opened, so those scans look again.
    fn reopen_scans(&mut self, m: usize) {
        let map = &self.maps[m].1;
        for scan in self.scans.iter_mut().filter(|s| s.done && s.map == *map) {
            scan.done = false;
        }
    }

    fn set_register(&mut self, value: Vec<u8>) -> i64 {
        let len = value.len() as i64;
        self.register = Some(value);
        len
    }
}

/// Caps linear memory per instance, reporting the cap by name when a guest hits it.
pub(crate) struct Limiter {
    memory_bytes_max: usize,
    inner: StoreLimits,
}

impl Limiter {
    fn new(limits: &Limits) -> Self {
        let inner =
            StoreLimitsBuilder::new().memory_size(limits.memory_bytes_max).instances(1).memories(1).tables(1).build();
        Limiter { memory_bytes_max: limits.memory_bytes_max, inner }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes_max {
            return Err(ExecError::MemoryLimit { desired, max: self.memory_bytes_max }.into());
        }
        self.inner.memory_growing(current, desired, maximum)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

fn abi_violation(msg: impl Into<String>) -> wasmtime::Error {
    ExecError::Abi(msg.into()).into()
}

fn tx(tx: &mut Option<Tx>) -> wasmtime::Result<&mut Tx> {
    tx.as_mut().ok_or_else(|| abi_violation("the store is not available outside a request"))
}

/// Guest memory and the host state together; the memory handle is looked up once per instance.
fn parts<'a>(caller: &'a mut Caller<'_, HostState>) -> wasmtime::Result<(&'a mut [u8], &'a mut HostState)> {
    let memory = match caller.data().memory {
        Some(m) => m,
        None => {
            let m = caller
                .get_export(abi::EXPORT_MEMORY)
                .and_then(Extern::into_memory)
                .ok_or_else(|| abi_violation("the module exports no memory"))?;
            caller.data_mut().memory = Some(m);
            m
        }
    };
    Ok(memory.data_and_store_mut(caller))
}

/// Charges fuel for host work: a base cost plus one unit per byte moved.
fn charge(caller: &mut Caller<'_, HostState>, bytes: usize) -> wasmtime::Result<()> {
    let cost = HOSTCALL_FUEL_BASE + bytes as u64;
    let left = caller.get_fuel()?;
    if left < cost {
        caller.set_fuel(0)?;
        return Err(wasmtime::Trap::OutOfFuel.into());
    }
    caller.set_fuel(left - cost)
}

/// The `len` bytes at `ptr` in guest memory, refusing more than `max`.
fn slice<'a>(data: &'a [u8], ptr: u32, len: u32, what: &str, max: usize) -> wasmtime::Result<&'a [u8]> {
    let len = len as usize;
    if len > max {
        return Err(ExecError::StoreLimit(format!("{what} is {len} bytes; the limit is {max}")).into());
    }
    data.get(ptr as usize..)
        .and_then(|d| d.get(..len))
        .ok_or_else(|| abi_violation(format!("{what} at {ptr}+{len} lies outside guest memory")))
}

/// Resolves a guest map name to its index in the request's maps, checking once that the app
/// may read it; at most `maps_per_request_max` distinct names.
fn resolve_map(state: &mut HostState, data: &[u8], ptr: u32, len: u32) -> wasmtime::Result<usize> {
    let raw = slice(data, ptr, len, "map name", abi::MAP_NAME_BYTES_MAX)?;
    if let Some(i) = state.maps.iter().position(|(name, _)| name == raw) {
        return Ok(i);
    }
    let name = std::str::from_utf8(raw).map_err(|_| abi_violation("map name is not UTF-8"))?;
    abi::check_read_as(name, state.access.privilege).map_err(ExecError::Denied)?;
    if state.maps.len() >= state.limits.maps_per_request_max {
        return Err(ExecError::StoreLimit(format!(
            "more than {} maps named (maps_per_request_max)",
            state.limits.maps_per_request_max
        ))
        .into());
    }
    state.maps.push((raw.to_vec(), kv::app_map(&state.access.namespace, name)));
    Ok(state.maps.len() - 1)
}

/// The guest's name of a resolved map (the stored name is `maps[i].1`).
fn guest_name(maps: &[(Vec<u8>, String)], i: usize) -> &str {
    std::str::from_utf8(&maps[i].0).expect("resolved map names are UTF-8")
}

fn key<'a>(state: &HostState, data: &'a [u8], ptr: u32, len: u32) -> wasmtime::Result<&'a [u8]> {
    slice(data, ptr, len, "key (key_bytes_max)", state.limits.key_bytes_max)
}

fn kv_get(mut caller: Caller<'_, HostState>, mp: u32, ml: u32, kp: u32, kl: u32) -> wasmtime::Result<i64> {
    let (data, state) = parts(&mut caller)?;
    let m = resolve_map(state, data, mp, ml)?;
    let key = key(state, data, kp, kl)?;
    let value = tx(&mut state.tx)?.get(&state.maps[m].1, key).map_err(ExecError::from)?;
    let moved = (ml + kl) as usize + value.as_ref().map_or(0, Vec::len);
    let out = match value {
        Some(v) => state.set_register(v),
        None => abi::NONE,
    };
    charge(&mut caller, moved)?;
    Ok(out)
}

/// Checks and counts a write against the per-request limits.
fn admit_write(state: &mut HostState, m: usize, bytes: usize) -> wasmtime::Result<()> {
    let access = &state.access;
    abi::check_write_as(guest_name(&state.maps, m), access.mode, access.privilege).map_err(ExecError::Denied)?;
    state.write_bytes += bytes;
    let writes = state.tx()?.writes().len();
    let limits = &state.limits;
    if writes >= limits.writes_per_request_max {
        return Err(ExecError::StoreLimit(format!(
            "more than {} keys written (writes_per_request_max)",
            limits.writes_per_request_max
        ))
        .into());
    }
    if state.write_bytes > limits.write_bytes_per_request_max {
        return Err(ExecError::StoreLimit(format!(
            "more than {} bytes written (write_bytes_per_request_max)",
            limits.write_bytes_per_request_max
        ))
        .into());
    }
    Ok(())
}

fn kv_put(
    mut caller: Caller<'_, HostState>,
    mp: u32,
    ml: u32,
    kp: u32,
    kl: u32,
    vp: u32,
    vl: u32,
) -> wasmtime::Result<()> {
    let (data, state) = parts(&mut caller)?;
    let m = resolve_map(state, data, mp, ml)?;
    admit_write(state, m, kl as usize + vl as usize)?;
    let key = key(state, data, kp, kl)?;
    let value = slice(data, vp, vl, "value (value_bytes_max)", state.limits.value_bytes_max)?;
    tx(&mut state.tx)?.put(&state.maps[m].1, key, value);
    state.reopen_scans(m);
    charge(&mut caller, (ml + kl) as usize + vl as usize)
}

fn kv_remove(mut caller: Caller<'_, HostState>, mp: u32, ml: u32, kp: u32, kl: u32) -> wasmtime::Result<i32> {
    let (data, state) = parts(&mut caller)?;
    let m = resolve_map(state, data, mp, ml)?;
    admit_write(state, m, kl as usize)?;
    let key = key(state, data, kp, kl)?;
    let existed = tx(&mut state.tx)?.remove(&state.maps[m].1, key).map_err(ExecError::from)?;
    state.reopen_scans(m);
    charge(&mut caller, (ml + kl) as usize)?;
    Ok(i32::from(existed))
}

#[allow(clippy::too_many_arguments)]
fn kv_scan(
    mut caller: Caller<'_, HostState>,
    mp: u32,
    ml: u32,
    lp: u32,
    ll: u32,
    up: u32,
    ul: u32,
    flags: i32,
) -> wasmtime::Result<i32> {
    let (data, state) = parts(&mut caller)?;
    let m = resolve_map(state, data, mp, ml)?;
    let lower = key(state, data, lp, ll)?.to_vec();
    let upper = key(state, data, up, ul)?.to_vec();
    let lower = match (flags & abi::SCAN_LOWER != 0, flags & abi::SCAN_LOWER_EXCLUSIVE != 0) {
        (false, _) => Bound::Unbounded,
        (true, false) => Bound::Included(lower),
        (true, true) => Bound::Excluded(lower),
    };
    let upper = match (flags & abi::SCAN_UPPER != 0, flags & abi::SCAN_UPPER_INCLUSIVE != 0) {
        (false, _) => Bound::Unbounded,
        (true, true) => Bound::Included(upper),
        (true, false) => Bound::Excluded(upper),
    };
    if state.scans.len() >= state.limits.scans_per_request_max {
        return Err(ExecError::StoreLimit(format!(
            "more than {} scans opened (scans_per_request_max)",
            state.limits.scans_per_request_max
        ))
        .into());
    }
    state.scans.push(Scan { map: state.maps[m].1.clone(), lower, upper, done: false });
    let handle = state.scans.len() as i32 - 1;
    charge(&mut caller, (ml + ll + ul) as usize)?;
    Ok(handle)
}

fn kv_next(mut caller: Caller<'_, HostState>, handle: i32) -> wasmtime::Result<i64> {
    let state = caller.data_mut();
    let scan = usize::try_from(handle)
        .ok()
        .and_then(|h| state.scans.get(h))
        .ok_or_else(|| abi_violation(format!("kv_next on unknown scan {handle}")))?;
    if scan.done {
        charge(&mut caller, 0)?;
        return Ok(abi::NONE);
    }
    let mut passed = 0;
    let found = tx(&mut state.tx)?
        .first_in_counting(
            &scan.map,
            scan.lower.as_ref().map(Vec::as_slice),
            scan.upper.as_ref().map(Vec::as_slice),
            &mut passed,
        )
        .map_err(ExecError::from)?;
    // Each removed key passed over cost a lookup through every layer, like a `kv_get`.
    let passing = passed.saturating_mul(HOSTCALL_FUEL_BASE as usize);
    let Some((key, value)) = found else {
        caller.data_mut().scans[handle as usize].done = true;
        charge(&mut caller, passing)?;
        return Ok(abi::NONE);
    };
    let mut packed = Vec::with_capacity(4 + key.len() + value.len());
    packed.extend_from_slice(&(key.len() as u32).to_le_bytes());
    packed.extend_from_slice(&key);
    packed.extend_from_slice(&value);
    let state = caller.data_mut();
    state.scans[handle as usize].lower = Bound::Excluded(key);
    let len = packed.len();
    let out = state.set_register(packed);
    charge(&mut caller, len.saturating_add(passing))?;
    Ok(out)
}

fn take(mut caller: Caller<'_, HostState>, ptr: u32, len: u32) -> wasmtime::Result<()> {
    let (data, state) = parts(&mut caller)?;
    let value = state.register.take().ok_or_else(|| abi_violation("take() with nothing to take"))?;
    if value.len() != len as usize {
        return Err(abi_violation(format!("take({len}) but the pending value is {} bytes", value.len())));
    }
    data.get_mut(ptr as usize..)
        .and_then(|d| d.get_mut(..value.len()))
        .ok_or_else(|| abi_violation(format!("take() target {ptr}+{len} lies outside guest memory")))?
        .copy_from_slice(&value);
    Ok(())
}

fn caller_identity(mut caller: Caller<'_, HostState>) -> wasmtime::Result<i64> {
    charge(&mut caller, 0)?;
    let state = caller.data_mut();
    let json = state.caller_json.clone();
    Ok(state.set_register(json))
}

fn log(mut caller: Caller<'_, HostState>, level: i32, ptr: u32, len: u32) -> wasmtime::Result<()> {
    let (data, state) = parts(&mut caller)?;
    // Messages beyond the log budget are cut rather than refused: logging never fails a request.
    let max = state.limits.log_bytes_per_request_max;
    let msg = slice(data, ptr, len.min(max as u32), "log message", max)?;
    let stream = match level {
        abi::LOG_ERROR => "log:error",
        abi::LOG_WARN => "log:warn",
        abi::LOG_INFO => "log:info",
        _ => "log:debug",
    };
    let mut line = msg.to_vec();
    line.push(b'\n');
    state.output.lock().expect("guest output lock").push(stream, &line);
    charge(&mut caller, line.len() - 1)
}

fn abort(mut caller: Caller<'_, HostState>, ptr: u32, len: u32) -> wasmtime::Result<()> {
    let (data, _) = parts(&mut caller)?;
    let msg = slice(data, ptr, len.min(ABORT_MESSAGE_BYTES_MAX as u32), "abort message", ABORT_MESSAGE_BYTES_MAX)?;
    let message = String::from_utf8_lossy(msg).into_owned();
    Err(ExecError::GuestPanic { message }.into())
}

/// A linker with the `cloister` host functions and the virtual WASI preview 1.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut HostState| &mut s.wasi)?;
    let m = abi::IMPORT_MODULE;
    linker.func_wrap(m, "kv_get", kv_get)?;
    linker.func_wrap(m, "kv_put", kv_put)?;
    linker.func_wrap(m, "kv_remove", kv_remove)?;
    linker.func_wrap(m, "kv_scan", kv_scan)?;
    linker.func_wrap(m, "kv_next", kv_next)?;
    linker.func_wrap(m, "take", take)?;
    linker.func_wrap(m, "caller", caller_identity)?;
    linker.func_wrap(m, "log", log)?;
    linker.func_wrap(m, "abort", abort)?;
    Ok(linker)
}
