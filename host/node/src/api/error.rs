//! The one error shape every client sees: `{"error": {"code", "message", "details"?}}` with an
//! HTTP status, or the matching gRPC status whose message is that same JSON.

use axum::response::{IntoResponse, Response};
use serde_json::json;

use cloister_runtime::ExecError;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub details: Option<serde_json::Value>,
    /// The transaction this error is about, when it has one (an outcome not yet known).
    pub tx_id: Option<cloister_ledger::txid::TxId>,
    /// Seconds after which a refused request may be tried again (`Retry-After`).
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { status, code: code.into(), message: message.into(), details: None, tx_id: None, retry_after_s: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(401, "Unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(403, "Forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(404, "NotFound", message)
    }

    pub(crate) fn method_not_allowed(message: impl Into<String>) -> Self {
        ApiError::new(405, "MethodNotAllowed", message)
    }

    /// 408: the request's body did not arrive in full within `body_timeout_ms`.
    pub(crate) fn body_timed_out(timeout_ms: u64) -> Self {
        ApiError::new(
            408,
            "RequestTimeout",
            format!("the request body did not arrive in full within {timeout_ms} ms (body_timeout_ms)"),
        )
    }

    pub(crate) fn too_large(message: impl Into<String>) -> Self {
        ApiError::new(413, "PayloadTooLarge", message)
    }

    pub(crate) fn too_many(message: impl Into<String>) -> Self {
        ApiError::new(429, "TooManyRequests", message)
    }

    /// 429 with `Retry-After`.
    pub(crate) fn too_many_retry_after(message: impl Into<String>, retry_after_s: u32) -> Self {
        ApiError { retry_after_s: Some(retry_after_s), ..ApiError::too_many(message) }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "InternalError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// 503 for a write that may or may not have committed: a client must find out before it
    /// sends the write again.
    fn unknown_outcome(message: impl Into<String>) -> Self {
        ApiError::new(503, "TransactionOutcomeUnknown", message)
    }

    /// An error about a transaction whose outcome this node does not know yet.
    pub(crate) fn outcome_unknown(tx_id: Option<cloister_ledger::txid::TxId>, reason: &str) -> Self {
        let message = match tx_id {
            Some(id) => format!(
                "leadership changed before transaction {id} was known to commit ({reason}); GET /node/tx?id={id} tells whether it committed"
            ),
            None => format!(
                "leadership changed before the write was known to commit ({reason}); it may or may not have committed"
            ),
        };
        let mut e = ApiError::unknown_outcome(message);
        e.tx_id = tx_id;
        if let Some(id) = tx_id {
            e.details = Some(json!({ "tx_id": id.to_string() }));
        }
        e
    }

    /// A call forwarded to the leader `leader` that has no answer. One the leader may have run
    /// is a transaction of unknown outcome: a client that took it for a refusal and sent it
    /// again could apply a write twice.
    pub(crate) fn forward_failed(leader: &str, error: cloister_consensus::ForwardError) -> Self {
        match error {
            cloister_consensus::ForwardError::NotRun(s) => {
                ApiError::unavailable(format!("forwarding to the leader {leader} failed: {}", s.message()))
            }
            cloister_consensus::ForwardError::Unanswered(s) => ApiError::unknown_outcome(format!(
                "the stream to the leader {leader} ended before it answered ({}); a write may or may not have \
                 committed",
                s.message()
            )),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let mut inner = json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.details {
            inner["details"] = d.clone();
        }
        json!({ "error": inner })
    }

    /// The gRPC status for this error; its message is the JSON body.
    pub(crate) fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self.status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            405 => Code::Unimplemented,
            408 => Code::DeadlineExceeded,
            409 => Code::AlreadyExists,
            412 => Code::FailedPrecondition,
            413 | 429 | 431 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            s if (400..500).contains(&s) => Code::FailedPrecondition,
            _ => Code::Internal,
        };
        tonic::Status::new(code, self.body().to_string())
    }

    /// An app's own error answer (non-2xx with a JSON error body), as an `ApiError`.
    pub(crate) fn from_app(status: u16, body: &[u8]) -> ApiError {
        let error = cloister_runtime::AppErrorBody::parse(body);
        ApiError {
            status,
            code: error.code.unwrap_or_else(|| format!("Http{status}")),
            message: error.message,
            details: error.details,
            tx_id: None,
            retry_after_s: None,
        }
    }
}

impl From<ExecError> for ApiError {
    fn from(e: ExecError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

impl From<cloister_store::KvError> for ApiError {
    fn from(e: cloister_store::KvError) -> Self {
        tracing::error!(error = %e, "state database error");
        ApiError::internal(format!("the node's state database failed: {e}"))
    }
}

impl From<crate::gov::GovError> for ApiError {
    fn from(e: crate::gov::GovError) -> Self {
        use crate::gov::{GovError, Refusal};
        match e {
            GovError::Refused { kind, code, message } => {
                let status = match kind {
                    Refusal::Malformed => 400,
                    Refusal::Unauthenticated => 401,
                    Refusal::Forbidden => 403,
                    Refusal::NotFound => 404,
                    Refusal::Conflict => 409,
                    Refusal::Unavailable => 503,
                };
                ApiError::new(status, code, message)
            }
            GovError::Constitution(e) => ApiError::from(e),
            GovError::Store(e) => ApiError::from(e),
            GovError::Internal(message) => ApiError::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            axum::http::StatusCode::from_u16(self.status).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(s));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use cloister_consensus::ForwardError;
    use tonic::Status;

    use super::ApiError;

    /// A forwarded call the leader did not run may simply be sent again; one it may have run is
    /// a transaction of unknown outcome, whatever broke the stream.
    #[test]
    fn a_forwarded_call_without_an_answer_says_whether_it_may_have_run() {
        let refused = ApiError::forward_failed("node0", ForwardError::NotRun(Status::permission_denied("Pending")));
        assert_eq!((refused.status, refused.code.as_str()), (503, "ServiceUnavailable"));
        let lost = ApiError::forward_failed("node0", ForwardError::Unanswered(Status::unknown("connection reset")));
        assert_eq!((lost.status, lost.code.as_str()), (503, "TransactionOutcomeUnknown"));
        assert!(lost.message.contains("may or may not have committed"), "{}", lost.message);
    }

    /// The runtime's size refusals are the caller's to shrink, over gRPC as over REST: a body
    /// past `request_bytes_max` (413) and a head past `REQUEST_HEAD_BYTES_MAX` (431).
    #[test]
    fn a_request_too_large_for_a_contract_is_resource_exhausted() {
        use cloister_runtime::ExecError;
        for (e, status) in [
            (ExecError::RequestTooLarge { bytes: 2, max: 1 }, 413),
            (ExecError::RequestHeadTooLarge { bytes: 2, max: 1 }, 431),
        ] {
            let api = ApiError::from(e);
            assert_eq!(api.status, status);
            assert_eq!(api.to_status().code(), tonic::Code::ResourceExhausted, "{}", api.message);
        }
    }
}
