//! Every limit the contract runtime enforces, with its default. Each is a field of the node's
//! configuration (`[wasm]` section), and hitting one yields an error that names it.

use serde::{Deserialize, Serialize};

pub(crate) const MODULE_BYTES_MAX: usize = 16 << 20;
pub(crate) const MEMORY_BYTES_MAX: usize = 64 << 20;
pub(crate) const FUEL_PER_REQUEST: u64 = 2_000_000_000;
pub(crate) const WALL_TIME_MS: u64 = 5_000;
pub(crate) const STACK_BYTES_MAX: usize = 512 << 10;
pub(crate) const REQUEST_BYTES_MAX: usize = 8 << 20;
/// Largest request head the runtime frames for a contract: the method, path, query, headers and
/// caller as JSON. A head is bounded apart from the body, so that any body within
/// `request_bytes_max` runs whatever the head holds; the listeners' header limits keep a real one
/// far below this, but a gRPC `App.Call` carries its path and query in its message.
pub const REQUEST_HEAD_BYTES_MAX: usize = 1 << 20;
pub(crate) const RESPONSE_BYTES_MAX: usize = 8 << 20;
pub(crate) const INSTANCES_MAX: u32 = 64;
pub const KEY_BYTES_MAX: usize = cloister_abi::abi::KEY_BYTES_DEFAULT_MAX;
pub const VALUE_BYTES_MAX: usize = 1 << 20;
pub(crate) const WRITES_PER_REQUEST_MAX: usize = 100_000;
/// With [`WRITES_PER_REQUEST_MAX`] writes and their framing (map names, lengths), the largest
/// write set stays within the node's largest log entry (32 MiB); the node checks this at startup.
pub(crate) const WRITE_BYTES_PER_REQUEST_MAX: usize = 16 << 20;
pub(crate) const SCANS_PER_REQUEST_MAX: usize = 64;
pub(crate) const MAPS_PER_REQUEST_MAX: usize = 256;
pub(crate) const LOG_BYTES_PER_REQUEST_MAX: usize = 16 << 10;
pub(crate) const MODULES_CACHED_MAX: usize = 8;
/// Refused modules whose refusal the runtime keeps, the oldest forgotten first: the same bytes
/// sent again are refused without being checked and compiled again.
pub(crate) const REFUSED_MODULES_REMEMBERED: usize = 64;
pub(crate) const MEMORY_KEEP_RESIDENT_BYTES: usize = 4 << 20;
/// Bytes of each instance slot's table reset in place between requests: 8,192 function
/// references, more than a contract's indirect-call table holds.
pub(crate) const TABLE_KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// Fuel charged for each host call, on top of one unit per byte it moves: roughly the cost of
/// a store lookup in wasm instructions, so host calls are not a free way around the fuel limit.
/// A scan's `kv_next` is charged it again for each removed key it passes over.
pub(crate) const HOSTCALL_FUEL_BASE: u64 = 1_000;
/// Most random bytes one WASI `random_get` call may ask for (a larger call traps). The host
/// builds them before copying them into guest memory, so this bounds the memory a call takes
/// outside the instance's `memory_bytes_max` (wasmtime's own bound is 64 MiB).
pub(crate) const RANDOM_BYTES_PER_CALL_MAX: u64 = 1 << 20;
/// How often the watchdog advances the engine's epoch while a contract runs.
pub(crate) const EPOCH_TICK_MS: u64 = 5;
/// Ticks with no contract running after which the watchdog sleeps until one starts (1 s): an
/// idle node's watchdog otherwise woke 200 times a second, most of an idle node's thread
/// switches. Under load it never sleeps, so a call pays no wake-up.
pub(crate) const WATCHDOG_IDLE_TICKS: u32 = 200;

/// The contract runtime's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest module accepted, in bytes.
    pub module_bytes_max: usize,
    /// Largest linear memory of one instance, in bytes (at most 4 GiB).
    pub memory_bytes_max: usize,
    /// Fuel (about one unit per wasm instruction) one request may burn.
    pub fuel_per_request: u64,
    /// Wall-clock time one request may run, in milliseconds; the epoch watchdog enforces it.
    pub wall_time_ms: u64,
    /// Largest wasm stack, in bytes; deeper recursion traps with a stack overflow.
    pub stack_bytes_max: usize,
    /// Largest request body handed to a contract, in bytes; the envelope's head is bounded apart
    /// by [`REQUEST_HEAD_BYTES_MAX`].
    pub request_bytes_max: usize,
    /// Largest response envelope (head and body), in bytes.
    pub response_bytes_max: usize,
    /// Instances that may run at once; further requests get a "busy" error.
    pub instances_max: u32,
    /// Largest key a contract may write, in bytes.
    pub key_bytes_max: usize,
    /// Largest value a contract may write, in bytes.
    pub value_bytes_max: usize,
    /// Most keys one request may write.
    pub writes_per_request_max: usize,
    /// Most bytes (keys and values) one request may write.
    pub write_bytes_per_request_max: usize,
    /// Most scans one request may open.
    pub scans_per_request_max: usize,
    /// Most distinct maps one request may name (the runtime keeps each one's checked name).
    pub maps_per_request_max: usize,
    /// Most bytes of guest output (stdout, stderr, log) kept per request; the rest is dropped.
    pub log_bytes_per_request_max: usize,
    /// Most compiled modules the cache keeps that nothing else holds (it keeps held ones too).
    pub modules_cached_max: usize,
    /// Bytes of each instance slot's memory kept resident between requests instead of being
    /// returned to the kernel: faster requests for up to `instances_max` times this much RSS.
    pub memory_keep_resident_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            module_bytes_max: MODULE_BYTES_MAX,
            memory_bytes_max: MEMORY_BYTES_MAX,
            fuel_per_request: FUEL_PER_REQUEST,
            wall_time_ms: WALL_TIME_MS,
            stack_bytes_max: STACK_BYTES_MAX,
            request_bytes_max: REQUEST_BYTES_MAX,
            response_bytes_max: RESPONSE_BYTES_MAX,
            instances_max: INSTANCES_MAX,
            key_bytes_max: KEY_BYTES_MAX,
            value_bytes_max: VALUE_BYTES_MAX,
            writes_per_request_max: WRITES_PER_REQUEST_MAX,
            write_bytes_per_request_max: WRITE_BYTES_PER_REQUEST_MAX,
            scans_per_request_max: SCANS_PER_REQUEST_MAX,
            maps_per_request_max: MAPS_PER_REQUEST_MAX,
            log_bytes_per_request_max: LOG_BYTES_PER_REQUEST_MAX,
            modules_cached_max: MODULES_CACHED_MAX,
            memory_keep_resident_bytes: MEMORY_KEEP_RESIDENT_BYTES,
        }
    }
}

impl Limits {
    /// Checks that the limits are usable together.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("module_bytes_max", self.module_bytes_max as u64),
            ("memory_bytes_max", self.memory_bytes_max as u64),
            ("fuel_per_request", self.fuel_per_request),
            ("wall_time_ms", self.wall_time_ms),
            ("stack_bytes_max", self.stack_bytes_max as u64),
            ("request_bytes_max", self.request_bytes_max as u64),
            ("response_bytes_max", self.response_bytes_max as u64),
            ("instances_max", u64::from(self.instances_max)),
            ("key_bytes_max", self.key_bytes_max as u64),
            ("value_bytes_max", self.value_bytes_max as u64),
            ("writes_per_request_max", self.writes_per_request_max as u64),
            ("write_bytes_per_request_max", self.write_bytes_per_request_max as u64),
            ("maps_per_request_max", self.maps_per_request_max as u64),
            ("modules_cached_max", self.modules_cached_max as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("wasm limit {name} must be greater than 0"));
        }
        if self.memory_bytes_max as u64 > 4 << 30 {
            return Err("wasm limit memory_bytes_max is above 4 GiB, the wasm32 address space".into());
        }
        if self.stack_bytes_max > 1 << 20 {
            return Err("wasm limit stack_bytes_max is above 1 MiB; host threads could not hold it".into());
        }
        Ok(())
    }

    /// Epoch ticks after which the watchdog interrupts a request.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        self.wall_time_ms.div_ceil(EPOCH_TICK_MS) + 1
    }
}
