//! A minimal key-value store: Cloister's counterpart of CCF's logging app and of an etcd Put, so
//! a benchmark can compare the same work across the three. Every member and user reads and writes
//! one shared keyspace, as etcd clients do; values are a private map, sealed in the ledger.
//!
//! Endpoints (under `/app`), for any member or user:
//! - `PUT /kv/{key}` with the value as the body (any content type; the bytes are stored as sent):
//!   200 with `{"key": KEY, "bytes": N}`, replacing any earlier value.
//! - `GET /kv/{key}`: 200 with the stored bytes as `application/octet-stream`; 404 when absent.
//! - `DELETE /kv/{key}`: 200 with an empty body; 404 when absent.
//!
//! The key is the path segment, percent-decoded (so `a%2Fb` is the key `a/b`; a segment that does
//! not decode to UTF-8 matches no endpoint), of 1..=[`KEY_BYTES_MAX`] bytes. A value is at most
//! [`VALUE_BYTES_MAX`] bytes. An empty key (`/kv/`), a longer key or a larger value is 400, naming
//! the limit, and writes nothing.

use cloister_sdk::{Error, Request, Response, Router, export, raw};
use serde_json::json;

/// Longest key, in bytes once percent-decoded.
pub const KEY_BYTES_MAX: usize = 256;
/// Largest value, in bytes.
pub const VALUE_BYTES_MAX: usize = 65_536;

/// Values by key. Private (sealed). Written through `raw` because the values are opaque bytes: a
/// typed `Map` would store them as JSON, several times their size.
const VALUES: &str = "kv";

pub fn router() -> Router {
    // An empty `{key}` segment matches no pattern, so `/kv/` has routes of its own: an empty key
    // is then refused like any key out of bounds, instead of answering "no endpoint".
    Router::new()
        .put("/kv/{key}", put)
        .get("/kv/{key}", get)
        .delete("/kv/{key}", delete)
        .put("/kv/", put)
        .get("/kv/", get)
        .delete("/kv/", delete)
}

export!(router);

/// The request's key, or 400 when it is empty or longer than [`KEY_BYTES_MAX`].
fn key(req: &Request) -> Result<&str, Error> {
    let key = req.param("key").unwrap_or_default();
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(Error::bad_request(format!(
            "a key is 1..={KEY_BYTES_MAX} bytes (KEY_BYTES_MAX); this one is {} bytes",
            key.len()
        )));
    }
    Ok(key)
}

fn not_found(key: &str) -> Error {
    Error::not_found(format!("no value has the key {key:?}"))
}

fn put(req: &Request) -> Result<Response, Error> {
    let key = key(req)?;
    let value = req.body();
    if value.len() > VALUE_BYTES_MAX {
        return Err(Error::bad_request(format!(
            "a value is at most {VALUE_BYTES_MAX} bytes (VALUE_BYTES_MAX); this one is {} bytes",
            value.len()
        )));
    }
    raw::put(VALUES, key.as_bytes(), value);
    Ok(Response::json(&json!({ "key": key, "bytes": value.len() })))
}

fn get(req: &Request) -> Result<Response, Error> {
    let key = key(req)?;
    let value = raw::get(VALUES, key.as_bytes()).ok_or_else(|| not_found(key))?;
    let mut response = Response::status(200).with_header("content-type", "application/octet-stream");
    response.body = value;
    Ok(response)
}

fn delete(req: &Request) -> Result<Response, Error> {
    let key = key(req)?;
    if !raw::remove(VALUES, key.as_bytes()) {
        return Err(not_found(key));
    }
    Ok(Response::status(200))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_sdk::Caller;
    use cloister_sdk::testing::MemoryHost;
    use serde_json::Value;

    fn member() -> Caller {
        Caller::member("member0")
    }

    /// The answer's status and the message of its error, if it is one.
    fn refusal(r: &Response) -> (u16, String) {
        let body: Value = r.body_json().unwrap_or(Value::Null);
        (r.head.status, body["error"]["message"].as_str().unwrap_or_default().to_owned())
    }

    #[test]
    fn a_put_value_reads_back_as_the_same_bytes() {
        let mut h = MemoryHost::new(router());
        let value = [0u8, 0xFF, b'{', 0x80, b'\n'];
        let r = h.call(&member(), "PUT", "/kv/greeting", value);
        assert_eq!(r.head.status, 200);
        assert_eq!(r.body_json::<Value>().unwrap(), json!({ "key": "greeting", "bytes": 5 }));
        // Any member or user reads it: one keyspace for all, as in etcd.
        let r = h.call(&Caller::user("user0"), "GET", "/kv/greeting", "");
        assert_eq!(r.head.status, 200);
        assert_eq!(r.body, value);
        assert_eq!(r.head.headers.get("content-type").map(String::as_str), Some("application/octet-stream"));
        // The key is the decoded segment: `a%2Fb` and `a/b` name the same entry.
        assert_eq!(h.call(&member(), "PUT", "/kv/a%2Fb", "x").body_json::<Value>().unwrap()["key"], "a/b");
        assert_eq!(h.call(&member(), "GET", "/kv/a%2Fb", "").body, b"x");
        // An empty value is a value.
        assert_eq!(h.call(&member(), "PUT", "/kv/empty", "").head.status, 200);
        let r = h.call(&member(), "GET", "/kv/empty", "");
        assert_eq!((r.head.status, r.body.len()), (200, 0));
    }

    #[test]
    fn a_second_put_replaces_the_value() {
        let mut h = MemoryHost::new(router());
        assert_eq!(h.call(&member(), "PUT", "/kv/k", "a longer first value").head.status, 200);
        assert_eq!(h.call(&Caller::user("user0"), "PUT", "/kv/k", "short").head.status, 200);
        assert_eq!(h.call(&member(), "GET", "/kv/k", "").body, b"short");
        assert_eq!(h.dump().len(), 1, "one entry per key");
    }

    #[test]
    fn a_deleted_key_is_absent() {
        let mut h = MemoryHost::new(router());
        h.call(&member(), "PUT", "/kv/k", "v");
        let r = h.call(&member(), "DELETE", "/kv/k", "");
        assert_eq!((r.head.status, r.body.len()), (200, 0));
        assert!(h.dump().is_empty());
        let r = h.call(&member(), "GET", "/kv/k", "");
        assert_eq!(r.body_json::<Value>().unwrap()["error"]["code"], "NotFound");
        assert_eq!(refusal(&r).0, 404);
        assert_eq!(h.call(&member(), "DELETE", "/kv/k", "").head.status, 404);
        assert_eq!(h.call(&member(), "DELETE", "/kv/never", "").head.status, 404);
    }

    #[test]
    fn keys_are_limited_at_their_edge() {
        let mut h = MemoryHost::new(router());
        let longest = "k".repeat(KEY_BYTES_MAX);
        assert_eq!(h.call(&member(), "PUT", &format!("/kv/{longest}"), "v").head.status, 200);
        assert_eq!(h.call(&member(), "GET", &format!("/kv/{longest}"), "").body, b"v");
        // The limit counts decoded bytes: 128 two-byte characters fit, one more byte does not.
        let wide = "%C3%A9".repeat(KEY_BYTES_MAX / 2);
        assert_eq!(h.call(&member(), "PUT", &format!("/kv/{wide}"), "v").head.status, 200);
        let before = h.dump();
        for target in [format!("/kv/{longest}k"), format!("/kv/{wide}k"), "/kv/".to_owned()] {
            for method in ["PUT", "GET", "DELETE"] {
                let (status, message) = refusal(&h.call(&member(), method, &target, "v"));
                assert_eq!(status, 400, "{method} {target}");
                assert!(message.contains("KEY_BYTES_MAX"), "{message}");
            }
        }
        assert_eq!(h.dump(), before, "no refused key wrote anything");
    }

    #[test]
    fn values_are_limited_at_their_edge() {
        let mut h = MemoryHost::new(router());
        let largest = vec![7u8; VALUE_BYTES_MAX];
        let r = h.call(&member(), "PUT", "/kv/big", &largest);
        assert_eq!(r.body_json::<Value>().unwrap()["bytes"], VALUE_BYTES_MAX);
        assert_eq!(h.call(&member(), "GET", "/kv/big", "").body, largest);
        let before = h.dump();
        for key in ["big", "new"] {
            let (status, message) =
                refusal(&h.call(&member(), "PUT", &format!("/kv/{key}"), [8u8; VALUE_BYTES_MAX + 1]));
            assert_eq!(status, 400);
            assert!(message.contains("VALUE_BYTES_MAX"), "{message}");
        }
        assert_eq!(h.dump(), before, "the refused values neither replaced nor added an entry");
    }

    #[test]
    fn a_caller_the_service_does_not_know_is_refused() {
        // The node answers 401 before the app runs for a certificate that is no member's or
        // user's; the in-memory host stands for that caller with an anonymous one.
        let mut h = MemoryHost::new(router());
        h.call(&member(), "PUT", "/kv/k", "v");
        let before = h.dump();
        let stranger = Caller::anonymous();
        for method in ["PUT", "GET", "DELETE"] {
            let r = h.call(&stranger, method, "/kv/k", "other");
            assert_eq!(r.head.status, 401, "{method}");
            assert_eq!(r.body_json::<Value>().unwrap()["error"]["code"], "Unauthorized", "{method}: not the value");
        }
        assert_eq!(h.dump(), before);
    }
}
