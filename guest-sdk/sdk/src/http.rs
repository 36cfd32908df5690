//! Requests, responses and errors as a contract sees them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::Caller;
use crate::abi::{RequestHead, ResponseHead};

/// One request to a contract endpoint.
#[derive(Debug, Clone)]
pub struct Request {
    head: RequestHead,
    body: Vec<u8>,
    query: BTreeMap<String, String>,
}

impl Request {
    pub fn new(head: RequestHead, body: Vec<u8>) -> Self {
        let query = form_urlencoded::parse(head.query.as_bytes()).into_owned().collect();
        Request { head, body, query }
    }

    pub fn method(&self) -> &str {
        &self.head.method
    }

    /// The path relative to the app root, e.g. `/report/K1`.
    pub fn path(&self) -> &str {
        &self.head.path
    }

    /// A `{name}` segment captured from the endpoint's path pattern.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.head.params.get(name).map(String::as_str)
    }

    /// A query-string parameter, decoded; the last occurrence wins.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// A request header; names are lower case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.headers.get(name).map(String::as_str)
    }

    pub fn caller(&self) -> &Caller {
        &self.head.caller
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.body)
            .map_err(|e| Error::bad_request(format!("request body is not valid UTF-8 (at byte {})", e.valid_up_to())))
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::bad_request(format!("request body is not valid JSON: {e}")))
    }

    pub(crate) fn head(&self) -> &RequestHead {
        &self.head
    }
}

/// A contract's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

impl Response {
    /// An empty response with this status.
    pub fn status(status: u16) -> Self {
        Response { head: ResponseHead { status, ..Default::default() }, body: Vec::new() }
    }

    /// `200 OK` with a JSON body.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        Response::status(200).with_json(value)
    }

    /// `200 OK` with a plain-text body.
    pub fn text(text: impl Into<String>) -> Self {
        let mut r = Response::status(200).with_header("content-type", "text/plain; charset=utf-8");
        r.body = text.into().into_bytes();
        r
    }

    /// Replaces the body with JSON.
    pub fn with_json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.body = serde_json::to_vec(value).expect("response values always serialize");
        self.with_header("content-type", "application/json")
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.head.status = status;
        self
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.head.headers.insert(name.to_ascii_lowercase(), value.into());
        self
    }

    /// Attaches a 32-byte claims digest that the transaction's receipt will prove.
    pub fn with_claims_digest(mut self, digest: [u8; 32]) -> Self {
        self.head.claims_digest = Some(digest.iter().map(|b| format!("{b:02x}")).collect());
        self
    }

    /// The body parsed as JSON.
    pub fn body_json<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.body)
    }

    /// Whether the host commits the handler's writes: only 2xx responses do.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.head.status)
    }
}

/// An error response: a status, a stable machine-readable code and a message for people.
///
/// It serializes as `{"error": {"code", "message", "details"?}}`, the same shape the host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl Error {
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        Error { status, code: code.into(), message: message.into(), details: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::new(400, "BadRequest", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::new(403, "Forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(404, "NotFound", message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Error::new(413, "PayloadTooLarge", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(500, "InternalError", message)
    }

    /// Adds structured details, e.g. the list of invalid rows.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The JSON body: `{"error": {"code", "message", "details"?}}`.
    pub fn body(&self) -> serde_json::Value {
        let mut inner = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.details {
            inner["details"] = d.clone();
        }
        serde_json::json!({ "error": inner })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for Response {
    fn from(e: Error) -> Self {
        Response::status(e.status).with_json(&e.body())
    }
}
