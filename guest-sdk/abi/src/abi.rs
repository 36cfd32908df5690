//! Guest ABI v1: the names, codes and wire formats shared by contracts and the host.
//!
//! This module is the single definition of the ABI; `ABI.md` explains it in prose. The host
//! depends on these items instead of repeating them, so the two sides cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The ABI version this SDK speaks.
pub const ABI_VERSION: u32 = 1;

/// Export whose presence marks a module as speaking ABI v1. It takes and returns nothing.
pub const EXPORT_MARKER: &str = "cloister_abi_v1";
/// `alloc(len: i32) -> i32`: the guest hands the host a buffer of exactly `len` bytes.
pub const EXPORT_ALLOC: &str = "alloc";
/// `handle(ptr: i32, len: i32) -> i64`: runs one request, returns `ptr << 32 | len` of the response.
pub const EXPORT_HANDLE: &str = "handle";
/// `manifest() -> i64`: returns `ptr << 32 | len` of the manifest JSON.
pub const EXPORT_MANIFEST: &str = "manifest";
/// The guest's linear memory.
pub const EXPORT_MEMORY: &str = "memory";

/// The node's default bound on a key's bytes (`wasm.key_bytes_max`): a longer key traps the
/// contract. The SDK's in-memory host holds contracts' tests to it.
pub const KEY_BYTES_DEFAULT_MAX: usize = 4 << 10;

/// Import module of the Cloister host functions.
pub const IMPORT_MODULE: &str = "cloister";

/// Every host function in [`IMPORT_MODULE`], with its core-wasm signature.
///
/// Types are written `i32`/`i64`; the host checks imports against this list when it loads a module.
pub const IMPORTS: &[(&str, &[ValType], &[ValType])] = &[
    ("kv_get", &[I32, I32, I32, I32], &[I64]),
    ("kv_put", &[I32, I32, I32, I32, I32, I32], &[]),
    ("kv_remove", &[I32, I32, I32, I32], &[I32]),
    ("kv_scan", &[I32, I32, I32, I32, I32, I32, I32], &[I32]),
    ("kv_next", &[I32], &[I64]),
    ("take", &[I32, I32], &[]),
    ("caller", &[], &[I64]),
    ("log", &[I32, I32, I32], &[]),
    ("abort", &[I32, I32], &[]),
];

/// A core-wasm value type, as far as the ABI needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValType {
    I32,
    I64,
}
use ValType::{I32, I64};

/// Import module of WASI preview 1, which the host serves virtually.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// The WASI preview 1 functions a contract may import.
///
/// All are served by a virtual context: no files, no environment, no sockets, the clock and
/// randomness from the host. `poll_oneoff` is left out on purpose: it can put the thread to sleep
/// on a clock, where neither fuel nor the wall-clock watchdog reaches. A module importing any
/// function outside this list fails to load.
pub const WASI_IMPORTS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "environ_get",
    "environ_sizes_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_dir_name",
    "fd_prestat_get",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "proc_exit",
    "proc_raise",
    "random_get",
    "sched_yield",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// `kv_scan` flag: the lower bound is present.
pub const SCAN_LOWER: i32 = 1;
/// `kv_scan` flag: the lower bound is exclusive (otherwise inclusive).
pub const SCAN_LOWER_EXCLUSIVE: i32 = 2;
/// `kv_scan` flag: the upper bound is present.
pub const SCAN_UPPER: i32 = 4;
/// `kv_scan` flag: the upper bound is inclusive (otherwise exclusive).
pub const SCAN_UPPER_INCLUSIVE: i32 = 8;

/// `kv_get` / `kv_next` result meaning "absent" or "exhausted".
pub const NONE: i64 = -1;

/// Log levels for the `log` import.
pub const LOG_ERROR: i32 = 1;
pub const LOG_WARN: i32 = 2;
pub const LOG_INFO: i32 = 3;
pub const LOG_DEBUG: i32 = 4;

/// Prefix of maps that the ledger keeps in clear. Every other app map is private and sealed.
pub const PUBLIC_PREFIX: &str = "public:";
/// Prefix of governance maps. Apps may read the ones in [`GOV_READABLE`] and never write any.
pub const GOV_PREFIX: &str = "gov.";
/// The governance maps an app may read: its settings, and who the users are (public records, which
/// an app needs to refuse work for a user the service does not know).
pub const GOV_READABLE: &[&str] = &["gov.app_config", "gov.users"];

/// Whether a map name is well formed: 1..=[`MAP_NAME_BYTES_MAX`] bytes of printable ASCII.
pub fn valid_map_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAP_NAME_BYTES_MAX && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether an app may read `map`: its own maps, and the governance maps in [`GOV_READABLE`].
pub fn check_read(map: &str) -> Result<(), String> {
    if !valid_map_name(map) {
        return Err(format!("map name {map:?} is not 1..={MAP_NAME_BYTES_MAX} printable ASCII bytes"));
    }
    if map.starts_with(GOV_PREFIX) && !GOV_READABLE.contains(&map) {
        return Err(format!("map {map} is not readable by apps (readable: {})", GOV_READABLE.join(", ")));
    }
    Ok(())
}

/// Whether an app may write `map` from an endpoint of the given mode.
pub fn check_write(map: &str, mode: Mode) -> Result<(), String> {
    check_write_as(map, mode, Privilege::App)
}

/// Whose code a request runs, which decides what it may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Privilege {
    /// An app: its own maps, and the governance maps in [`GOV_READABLE`], read-only.
    #[default]
    App,
    /// The constitution: its own maps, and every governance map; `apply` may write them.
    Constitution,
}

/// Whether code with `privilege` may read `map`.
pub fn check_read_as(map: &str, privilege: Privilege) -> Result<(), String> {
    match privilege {
        Privilege::App => check_read(map),
        Privilege::Constitution if valid_map_name(map) => Ok(()),
        Privilege::Constitution => {
            Err(format!("map name {map:?} is not 1..={MAP_NAME_BYTES_MAX} printable ASCII bytes"))
        }
    }
}

/// Whether code with `privilege` may write `map` from an endpoint of the given mode.
pub fn check_write_as(map: &str, mode: Mode, privilege: Privilege) -> Result<(), String> {
    check_read_as(map, privilege)?;
    if map.starts_with(GOV_PREFIX) && privilege == Privilege::App {
        return Err(format!("map {map} is a governance map: apps may never write it"));
    }
    if mode == Mode::Readonly {
        return Err(format!("write to map {map} from a read-only endpoint"));
    }
    Ok(())
}

/// Longest map name, in bytes.
pub const MAP_NAME_BYTES_MAX: usize = 128;

/// Whether the endpoint may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Runs on any node against committed state; writes trap.
    Readonly,
    /// Runs on the leader; its writes become one transaction.
    Readwrite,
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    /// Anyone, even without a client certificate.
    Public,
    /// Any member or user.
    Authenticated,
    /// Members only.
    Members,
    /// Users only.
    Users,
}

/// The role check the node applies before running a handler: `Err((status, code, message))`.
///
/// Anonymous callers get 401 everywhere but `Public` endpoints; a known identity of the wrong
/// kind gets 403.
pub fn authorize(auth: Auth, kind: CallerKind) -> Result<(), (u16, &'static str, &'static str)> {
    if auth != Auth::Public && kind == CallerKind::Anonymous {
        return Err((401, "Unauthorized", "this endpoint needs a client certificate"));
    }
    match (auth, kind) {
        (Auth::Members, CallerKind::User) => Err((403, "Forbidden", "this endpoint is for members only")),
        (Auth::Users, CallerKind::Member) => Err((403, "Forbidden", "this endpoint is for users only")),
        _ => Ok(()),
    }
}

/// One endpoint of an app, as listed in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Upper-case HTTP method.
    pub method: String,
    /// Path pattern relative to `/app`, with `{name}` segments capturing one path segment.
    pub path: String,
    pub mode: Mode,
    pub auth: Auth,
}

/// What `manifest()` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub abi: u32,
    pub endpoints: Vec<Endpoint>,
}

impl Manifest {
    /// The endpoint whose method and pattern match, with the captured parameters.
    pub fn find(&self, method: &str, path: &str) -> Option<(&Endpoint, BTreeMap<String, String>)> {
        self.endpoints
            .iter()
            .find_map(|e| (e.method == method).then(|| match_path(&e.path, path)).flatten().map(|params| (e, params)))
    }

    /// Whether some endpoint has this path with another method (the caller then gets 405).
    pub fn path_exists(&self, path: &str) -> bool {
        self.endpoints.iter().any(|e| match_path(&e.path, path).is_some())
    }

    /// Checks the manifest's shape: supported ABI, well-formed unique patterns.
    pub fn check(&self) -> Result<(), String> {
        if self.abi != ABI_VERSION {
            return Err(format!("manifest declares ABI {}; this host speaks ABI {ABI_VERSION}", self.abi));
        }
        let mut seen = std::collections::BTreeSet::new();
        for e in &self.endpoints {
            check_pattern(&e.path)?;
            if !matches!(e.method.as_str(), "GET" | "POST" | "PUT" | "DELETE" | "PATCH") {
                return Err(format!("endpoint {}: unsupported method {}", e.path, e.method));
            }
            if !seen.insert((e.method.as_str(), e.path.as_str())) {
                return Err(format!("endpoint {} {} is declared twice", e.method, e.path));
            }
        }
        Ok(())
    }
}

fn check_pattern(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with('/') {
        return Err(format!("endpoint path {pattern:?} must start with '/'"));
    }
    for seg in pattern.split('/').skip(1) {
        let capture =
            seg.len() > 2 && seg.starts_with('{') && seg.ends_with('}') && !seg[1..seg.len() - 1].contains(['{', '}']);
        if seg.contains(['{', '}']) && !capture {
            return Err(format!("endpoint path {pattern:?} has a malformed segment {seg:?}"));
        }
    }
    Ok(())
}

/// Matches a path against a pattern such as `/report/{key}`, returning the captured segments.
///
/// Captured segments are percent-decoded. A capture never matches an empty segment.
pub fn match_path(pattern: &str, path: &str) -> Option<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    let mut pat = pattern.split('/');
    let mut segs = path.split('/');
    loop {
        match (pat.next(), segs.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(s)) => {
                if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    if s.is_empty() {
                        return None;
                    }
                    params.insert(name.to_owned(), percent_decode(s)?);
                } else if p != s {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|s| s.into_owned())
}

/// What kind of identity made a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerKind {
    Member,
    User,
    /// No client certificate: only `Auth::Public` endpoints see this.
    #[default]
    Anonymous,
}

/// The authenticated identity behind a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Caller {
    pub kind: CallerKind,
    /// Hex SHA-256 of the caller's client certificate (DER); empty when anonymous.
    pub id: String,
}

impl Caller {
    pub fn member(id: impl Into<String>) -> Self {
        Caller { kind: CallerKind::Member, id: id.into() }
    }

    pub fn user(id: impl Into<String>) -> Self {
        Caller { kind: CallerKind::User, id: id.into() }
    }

    pub fn anonymous() -> Self {
        Caller::default()
    }
}

/// The request envelope's head. The body travels after it, unencoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Upper-case HTTP method.
    pub method: String,
    /// Path relative to `/app`, e.g. `/report/K1`.
    pub path: String,
    /// The manifest pattern the host matched, e.g. `/report/{key}`.
    #[serde(default)]
    pub route: String,
    /// Captured path parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// The raw query string, without `?`.
    #[serde(default)]
    pub query: String,
    /// Request headers, names in lower case.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub caller: Caller,
    /// The host's id for this request, for correlating logs.
    #[serde(default)]
    pub request_id: String,
}

/// The response envelope's head. The body travels after it, unencoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A 32-byte digest, hex, that the transaction's receipt will prove (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims_digest: Option<String>,
}

/// Frames a head and a body as `u32 LE head length ‖ head JSON ‖ body`.
pub fn frame<H: Serialize>(head: &H, body: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(head).expect("envelope heads always serialize");
    let mut out = Vec::with_capacity(4 + head.len() + body.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out
}

/// Splits a framed envelope into its head and body.
pub fn unframe<H: serde::de::DeserializeOwned>(buf: &[u8]) -> Result<(H, &[u8]), String> {
    let len_bytes: [u8; 4] =
        buf.get(..4).and_then(|b| b.try_into().ok()).ok_or("envelope shorter than its 4-byte head length")?;
    let head_len = u32::from_le_bytes(len_bytes) as usize;
    let head = buf.get(4..4 + head_len).ok_or("envelope head length exceeds the envelope")?;
    let head = serde_json::from_slice(head).map_err(|e| format!("envelope head is not valid: {e}"))?;
    Ok((head, &buf[4 + head_len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_capture_and_decode() {
        let p = match_path("/report/{key}", "/report/AB%20C").unwrap();
        assert_eq!(p["key"], "AB C");
        assert!(match_path("/report/{key}", "/report/").is_none());
        assert!(match_path("/report/{key}", "/report/a/b").is_none());
        assert!(match_path("/report", "/report/x").is_none());
        assert_eq!(match_path("/report", "/report").unwrap().len(), 0);
        assert_eq!(match_path("/a/{x}", "/a/1+2").unwrap()["x"], "1+2");
    }

    #[test]
    fn frames_round_trip() {
        let head = ResponseHead { status: 201, ..Default::default() };
        let buf = frame(&head, b"body\xff");
        let (back, body): (ResponseHead, _) = unframe(&buf).unwrap();
        assert_eq!(back, head);
        assert_eq!(body, b"body\xff");
        assert!(unframe::<ResponseHead>(&buf[..3]).is_err());
        assert!(unframe::<ResponseHead>(&[255, 0, 0, 0, b'{']).is_err());
    }

    #[test]
    fn manifest_check_refuses_bad_patterns_and_duplicates() {
        let ep =
            |m: &str, p: &str| Endpoint { method: m.into(), path: p.into(), mode: Mode::Readonly, auth: Auth::Public };
        let ok = Manifest { abi: 1, endpoints: vec![ep("GET", "/a/{b}"), ep("POST", "/a/{b}")] };
        assert!(ok.check().is_ok());
        for bad in ["a", "/a/{", "/a/{}", "/a/x}y"] {
            let m = Manifest { abi: 1, endpoints: vec![ep("GET", bad)] };
            assert!(m.check().is_err(), "{bad} accepted");
        }
        let dup = Manifest { abi: 1, endpoints: vec![ep("GET", "/a"), ep("GET", "/a")] };
        assert!(dup.check().unwrap_err().contains("twice"));
        let old = Manifest { abi: 2, endpoints: vec![] };
        assert!(old.check().unwrap_err().contains("ABI 2"));
    }
}

/// Property tests: any bytes as an envelope are refused by name, never a panic, never an
/// allocation out of proportion to the input.
#[cfg(test)]
mod fuzz {
    use cloister_test_support::proptest::prelude::*;
    use cloister_test_support::{config, largest_allocation};

    use super::*;

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_envelope_is_refused_or_read(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let (result, largest) = largest_allocation(|| unframe::<RequestHead>(&bytes).map(|(h, b)| (h, b.len())));
            prop_assert!(largest <= 16 * bytes.len() + 65_536, "allocated {largest} bytes for {}", bytes.len());
            if let Ok((_, body)) = result {
                prop_assert!(body <= bytes.len());
            }
        }

        #[test]
        fn a_framed_head_with_any_body_round_trips(method in "[A-Z]{1,8}", path in "/[a-z/]{0,40}", body in prop::collection::vec(any::<u8>(), 0..512)) {
            let head = RequestHead { method, path, ..Default::default() };
            let framed = frame(&head, &body);
            let (back, rest): (RequestHead, _) = unframe(&framed).unwrap();
            prop_assert_eq!(back, head);
            prop_assert_eq!(rest, &body[..]);
        }
    }
}
