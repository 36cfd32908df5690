//! An in-memory host, so contracts are unit-tested natively with plain `cargo test`.
//!
//! It follows the node's rules: routing and roles from the manifest, writes buffered per request
//! and kept only for a 2xx answer, governance maps read-only, read-only endpoints unable to
//! write, and a key longer than the node's default `wasm.key_bytes_max` trapping (here, a panic:
//! a contract must refuse such input itself). It does not enforce the node's other size, fuel or
//! time limits.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::Caller;
use crate::abi::{self, Mode, Privilege, RequestHead};
use crate::http::{Error, Response};
use crate::kv::Key;
use crate::router::Router;
use crate::sys::Backend;

/// An entry's address: map name and key.
type Slot = (String, Vec<u8>);
type Store = BTreeMap<Slot, Vec<u8>>;

/// A contract plus its whole store, in memory.
pub struct MemoryHost {
    router: Router,
    store: Rc<RefCell<Store>>,
    privilege: Privilege,
}

impl MemoryHost {
    pub fn new(router: Router) -> Self {
        MemoryHost { router, store: Rc::default(), privilege: Privilege::App }
    }

    /// A host for a constitution: it may write the governance maps, as the node lets it.
    pub fn constitution(router: Router) -> Self {
        MemoryHost { router, store: Rc::default(), privilege: Privilege::Constitution }
    }

    /// Writes a value directly, bypassing the contract: e.g. settings in `gov.app_config`.
    pub fn seed<K: Key, V: Serialize>(&mut self, map: &str, key: &K, value: &V) {
        let value = serde_json::to_vec(value).expect("seed values serialize");
        self.store.borrow_mut().insert((map.to_owned(), key.to_bytes()), value);
    }

    /// Removes a value directly, bypassing the contract: e.g. a user governance removed.
    pub fn remove<K: Key>(&mut self, map: &str, key: &K) {
        self.store.borrow_mut().remove(&(map.to_owned(), key.to_bytes()));
    }

    /// Reads a value directly, bypassing the contract.
    pub fn peek<K: Key, V: DeserializeOwned>(&self, map: &str, key: &K) -> Option<V> {
        let store = self.store.borrow();
        let bytes = store.get(&(map.to_owned(), key.to_bytes()))?;
        Some(serde_json::from_slice(bytes).expect("peeked value decodes"))
    }

    /// A copy of every entry, for asserting that a request changed nothing.
    pub fn dump(&self) -> Vec<(Slot, Vec<u8>)> {
        self.store.borrow().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Calls an endpoint. `target` is a path relative to the app root, optionally with `?query`.
    pub fn call(&mut self, caller: &Caller, method: &str, target: &str, body: impl AsRef<[u8]>) -> Response {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let manifest = self.router.manifest();
        let Some((endpoint, params)) = manifest.find(method, path) else {
            return if manifest.path_exists(path) {
                Error::new(405, "MethodNotAllowed", format!("{method} is not allowed on {path}")).into()
            } else {
                Error::not_found(format!("no endpoint {method} {path}")).into()
            };
        };
        if let Err((status, code, message)) = abi::authorize(endpoint.auth, caller.kind) {
            return Error::new(status, code, message).into();
        }
        let head = RequestHead {
            method: endpoint.method.clone(),
            path: path.to_owned(),
            route: endpoint.path.clone(),
            params,
            query: query.to_owned(),
            headers: BTreeMap::new(),
            caller: caller.clone(),
            request_id: String::new(),
        };
        let tx = Rc::new(Tx {
            store: self.store.clone(),
            writes: RefCell::default(),
            mode: endpoint.mode,
            privilege: self.privilege,
            caller: caller.clone(),
        });
        let response = crate::entry::call_native(&self.router, tx.clone(), &head, body.as_ref());
        if response.is_success() {
            let mut store = self.store.borrow_mut();
            for (k, v) in tx.writes.take() {
                match v {
                    Some(v) => store.insert(k, v),
                    None => store.remove(&k),
                };
            }
        }
        response
    }
}

/// One request's view: the store plus its own buffered writes (`None` is a removal).
struct Tx {
    store: Rc<RefCell<Store>>,
    writes: RefCell<BTreeMap<Slot, Option<Vec<u8>>>>,
    mode: Mode,
    privilege: Privilege,
    caller: Caller,
}

/// What the node does with a key past its default bound: it traps the contract.
fn key_within_bound(key: &[u8]) {
    assert!(
        key.len() <= abi::KEY_BYTES_DEFAULT_MAX,
        "a {}-byte key: the node traps a contract past wasm.key_bytes_max ({} by default)",
        key.len(),
        abi::KEY_BYTES_DEFAULT_MAX
    );
}

impl Backend for Tx {
    fn get(&self, map: &str, key: &[u8]) -> Option<Vec<u8>> {
        key_within_bound(key);
        abi::check_read_as(map, self.privilege).unwrap_or_else(|e| panic!("{e}"));
        let k = (map.to_owned(), key.to_vec());
        match self.writes.borrow().get(&k) {
            Some(w) => w.clone(),
            None => self.store.borrow().get(&k).cloned(),
        }
    }

    fn put(&self, map: &str, key: &[u8], value: &[u8]) {
        key_within_bound(key);
        abi::check_write_as(map, self.mode, self.privilege).unwrap_or_else(|e| panic!("{e}"));
        self.writes.borrow_mut().insert((map.to_owned(), key.to_vec()), Some(value.to_vec()));
    }

    fn remove(&self, map: &str, key: &[u8]) -> bool {
        let existed = self.get(map, key).is_some();
        abi::check_write_as(map, self.mode, self.privilege).unwrap_or_else(|e| panic!("{e}"));
        self.writes.borrow_mut().insert((map.to_owned(), key.to_vec()), None);
        existed
    }

    fn first_in(&self, map: &str, lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> Option<(Vec<u8>, Vec<u8>)> {
        for bound in [lower, upper] {
            if let Bound::Included(key) | Bound::Excluded(key) = bound {
                key_within_bound(key);
            }
        }
        abi::check_read_as(map, self.privilege).unwrap_or_else(|e| panic!("{e}"));
        let bound = |b: Bound<&[u8]>| b.map(|k| (map.to_owned(), k.to_vec()));
        let range = (
            match lower {
                Bound::Unbounded => Bound::Included((map.to_owned(), Vec::new())),
                b => bound(b),
            },
            match upper {
                Bound::Unbounded => Bound::Excluded((format!("{map}\0"), Vec::new())),
                b => bound(b),
            },
        );
        let writes = self.writes.borrow();
        let store = self.store.borrow();
        // Merge the committed entries with this request's writes; a write shadows the store.
        let mut committed = store.range(range.clone()).filter(|(k, _)| !writes.contains_key(*k));
        let mut pending = writes.range(range).filter_map(|(k, v)| v.as_ref().map(|v| (k, v)));
        let first = match (committed.next(), pending.next()) {
            (Some(c), Some(p)) => Some(if c.0 < p.0 { c } else { p }),
            (c, p) => c.or(p),
        };
        first.map(|((_, k), v)| (k.clone(), v.clone()))
    }

    fn caller_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.caller).expect("callers serialize")
    }

    fn log(&self, _level: i32, _msg: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::Auth;
    use crate::http::Request;
    use crate::kv::Map;

    const COUNTS: Map<String, u64> = Map::new("counts");

    fn bump(req: &Request) -> Result<Response, Error> {
        let key = req.param("key").unwrap().to_owned();
        let n = COUNTS.get(&key).unwrap_or(0) + 1;
        COUNTS.insert(&key, &n);
        if req.query("fail").is_some() {
            return Err(Error::bad_request("asked to fail"));
        }
        Ok(Response::json(&n))
    }

    fn list(_: &Request) -> Result<Response, Error> {
        Ok(Response::json(&COUNTS.iter().collect::<Vec<_>>()))
    }

    fn sneaky(_: &Request) -> Result<Response, Error> {
        COUNTS.insert(&"x".to_owned(), &1);
        Ok(Response::json(&()))
    }

    fn host() -> MemoryHost {
        MemoryHost::new(Router::new().post("/bump/{key}", bump).get("/list", list).get("/sneaky", sneaky).route(
            "GET",
            "/admin",
            Mode::Readonly,
            Auth::Members,
            list,
        ))
    }

    #[test]
    fn writes_commit_only_on_success() {
        let mut h = host();
        let m = Caller::member("m");
        assert_eq!(h.call(&m, "POST", "/bump/a", "").body_json::<u64>().unwrap(), 1);
        assert_eq!(h.call(&m, "POST", "/bump/a", "").body_json::<u64>().unwrap(), 2);
        let before = h.dump();
        assert_eq!(h.call(&m, "POST", "/bump/a?fail=1", "").head.status, 400);
        assert_eq!(h.dump(), before);
        h.call(&m, "POST", "/bump/0", "");
        let rows: Vec<(String, u64)> = h.call(&m, "GET", "/list", "").body_json().unwrap();
        assert_eq!(rows, vec![("0".into(), 1), ("a".into(), 2)]);
    }

    #[test]
    fn routing_and_roles() {
        let mut h = host();
        assert_eq!(h.call(&Caller::user("u"), "GET", "/nope", "").head.status, 404);
        assert_eq!(h.call(&Caller::user("u"), "DELETE", "/list", "").head.status, 405);
        assert_eq!(h.call(&Caller::anonymous(), "GET", "/list", "").head.status, 401);
        assert_eq!(h.call(&Caller::user("u"), "GET", "/admin", "").head.status, 403);
        assert_eq!(h.call(&Caller::member("m"), "GET", "/admin", "").head.status, 200);
    }

    #[test]
    fn read_only_endpoints_cannot_write() {
        let mut h = host();
        let r = h.call(&Caller::user("u"), "GET", "/sneaky", "");
        assert_eq!(r.head.status, 500);
        let msg = String::from_utf8(r.body).unwrap();
        assert!(msg.contains("read-only endpoint"), "{msg}");
        assert!(h.dump().is_empty());
    }
}
