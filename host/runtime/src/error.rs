//! Why a module was refused, or why a request failed, in terms a contract author can act on.

use wasmtime::Trap;

use cloister_store::KvError;

/// Why a module cannot be loaded. Nothing is installed when loading fails; the runtime remembers
/// the refusal, for the same bytes sent again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("module is {bytes} bytes; the limit is {max} (module_bytes_max)")]
    TooLarge { bytes: usize, max: usize },
    #[error("not a valid WebAssembly module for this engine: {0}")]
    Invalid(String),
    #[error(
        "module imports {module}::{name}, which is not allowed (allowed: cloister::* host calls of ABI v1 \
         and the virtual WASI preview 1 functions listed in ABI.md)"
    )]
    ImportNotAllowed { module: String, name: String },
    #[error("module imports cloister::{name} as {found}; ABI v1 declares {expected}")]
    ImportSignature { name: String, found: String, expected: String },
    #[error("module does not export the ABI marker `cloister_abi_v1`: build it with cloister-sdk's export! macro")]
    MissingMarker,
    #[error("module does not export `{name}` as {expected}, which ABI v1 requires")]
    MissingExport { name: &'static str, expected: &'static str },
    #[error("module failed to compile: {0}")]
    Compile(String),
    #[error("module's manifest is invalid: {0}")]
    Manifest(String),
    /// The manifest could not be read just now (every instance slot busy, or the wall clock ran
    /// out on a loaded machine): says nothing of the module, so it is not remembered.
    #[error("module's manifest could not be read now: {0}")]
    Unavailable(String),
}

/// Why a request failed. The request's writes are never applied when it fails.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the handler ran out of fuel ({fuel} units, fuel_per_request): it loops forever or needs a higher limit")]
    FuelExhausted { fuel: u64 },
    #[error("the handler exceeded its wall-clock limit of {ms} ms (wall_time_ms)")]
    WallTime { ms: u64 },
    #[error("the handler tried to grow its memory to {desired} bytes; the limit is {max} (memory_bytes_max)")]
    MemoryLimit { desired: usize, max: usize },
    #[error("the handler overflowed its stack of {max} bytes (stack_bytes_max): is the recursion unbounded?")]
    StackOverflow { max: usize },
    #[error("{message}")]
    GuestPanic { message: String },
    #[error("the request body is {bytes} bytes; the limit is {max} (request_bytes_max)")]
    RequestTooLarge { bytes: usize, max: usize },
    #[error(
        "the request's head (method, path, query, headers and caller) is {bytes} bytes as JSON; \
         the limit is {max} (REQUEST_HEAD_BYTES_MAX)"
    )]
    RequestHeadTooLarge { bytes: usize, max: usize },
    #[error("the response is {bytes} bytes; the limit is {max} (response_bytes_max)")]
    ResponseTooLarge { bytes: usize, max: usize },
    #[error("the handler broke the store's limits: {0}")]
    StoreLimit(String),
    #[error("the handler was refused access: {0}")]
    Denied(String),
    #[error("ABI violation: {0}")]
    Abi(String),
    #[error("the handler trapped: {0}")]
    Trap(String),
    #[error("the handler called proc_exit({0})")]
    Exit(i32),
    #[error("all {max} contract instance slots are busy (instances_max); retry shortly")]
    Busy { max: u32 },
    #[error(transparent)]
    Store(#[from] KvError),
}

impl ExecError {
    /// A stable, machine-readable name for the error.
    pub fn code(&self) -> &'static str {
        match self {
            ExecError::FuelExhausted { .. } => "FuelExhausted",
            ExecError::WallTime { .. } => "WallTimeExceeded",
            ExecError::MemoryLimit { .. } => "MemoryLimitExceeded",
            ExecError::StackOverflow { .. } => "StackOverflow",
            ExecError::GuestPanic { .. } => "GuestPanic",
            ExecError::RequestTooLarge { .. } => "RequestTooLarge",
            ExecError::RequestHeadTooLarge { .. } => "RequestHeadTooLarge",
            ExecError::ResponseTooLarge { .. } => "ResponseTooLarge",
            ExecError::StoreLimit(_) => "StoreLimitExceeded",
            ExecError::Denied(_) => "AccessDenied",
            ExecError::Abi(_) => "AbiViolation",
            ExecError::Trap(_) => "GuestTrap",
            ExecError::Exit(_) => "GuestExit",
            ExecError::Busy { .. } => "Busy",
            ExecError::Store(_) => "StorageError",
        }
    }

    /// The HTTP status a client sees.
    pub fn status(&self) -> u16 {
        match self {
            ExecError::RequestTooLarge { .. } => 413,
            ExecError::RequestHeadTooLarge { .. } => 431,
            ExecError::Busy { .. } => 503,
            _ => 500,
        }
    }

    /// Turns a failed wasm call into the error it stands for.
    pub(crate) fn from_wasm(err: wasmtime::Error, fuel: u64, limits: &super::Limits) -> ExecError {
        let err = match err.downcast::<ExecError>() {
            Ok(e) => return e,
            Err(err) => err,
        };
        if let Some(trap) = err.downcast_ref::<Trap>() {
            return match trap {
                Trap::OutOfFuel => ExecError::FuelExhausted { fuel },
                Trap::Interrupt => ExecError::WallTime { ms: limits.wall_time_ms },
                Trap::StackOverflow => ExecError::StackOverflow { max: limits.stack_bytes_max },
                other => ExecError::Trap(other.to_string()),
            };
        }
        if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
            return ExecError::Exit(exit.0);
        }
        if err.is::<wasmtime::PoolConcurrencyLimitError>() {
            return ExecError::Busy { max: limits.instances_max };
        }
        ExecError::Trap(err.root_cause().to_string())
    }
}
