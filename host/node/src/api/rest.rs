//! The REST frontend (axum): built-in `/node/*` endpoints, `/app/api`, and every app endpoint
//! under `/app`, routed through the app's manifest by the service layer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt;
use serde_json::json;

use super::error::ApiError;
use super::gov::GovRead;
use super::server::PeerInfo;
use super::service::{AppCall, AppReply, Service};
use crate::config::Limits;
use cloister_crypto::cose::GovWrite;

pub use cloister_proto::TX_ID_HEADER;

/// Request headers never passed to the app.
const WITHHELD_HEADERS: &[&str] = &["authorization", "cookie", "proxy-authorization"];

pub fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/node/health", get(|| async { axum::Json(json!({ "status": "ok" })) }))
        .route("/node/version", get(version))
        .route("/node/metrics", get(metrics))
        .route("/node/network", get(network))
        .route("/node/tx", get(tx_status))
        .route("/node/attestations", get(attestations))
        .route("/node/attestation/policy", get(attestation_policy))
        .route("/app/receipt", get(receipt))
        .route("/app/api", get(api))
        .route("/app/{*path}", axum::routing::any(app))
        .route("/gov/proposals", get(gov_read).post(gov_write))
        .route("/gov/proposals/{id}", get(gov_read))
        .route("/gov/proposals/{id}/ballots", axum::routing::post(gov_write))
        .route("/gov/proposals/{id}/withdraw", axum::routing::post(gov_write))
        .route("/gov/members/ack", axum::routing::post(gov_write))
        .route("/gov/members", get(gov_read))
        .route("/gov/users", get(gov_read))
        .route("/gov/endorsements", get(gov_read))
        .route("/gov/service", get(gov_read))
        .route("/gov/constitution", get(gov_read))
        .route("/gov/app", get(gov_read))
        .route("/gov/recovery", get(gov_read))
        .route("/gov/ledger_secrets", get(gov_read))
        .route("/gov/recovery/previous", get(gov_read))
        .route("/gov/recovery/share", axum::routing::post(gov_write))
        .fallback(|uri: Uri| async move { ApiError::not_found(format!("no endpoint {}", uri.path())) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(format!("{method} is not allowed on {}", uri.path()))
        })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(service.metrics().clone(), crate::metrics::rest_layer))
        .with_state(service)
}

async fn version() -> impl IntoResponse {
    axum::Json(json!({ "version": env!("CARGO_PKG_VERSION"), "abi": cloister_abi::abi::ABI_VERSION }))
}

/// `GET /node/metrics`: Prometheus metrics. Open to anyone, like `/node/health`: they count and
/// time requests and report positions and sizes, never a key, a value or a caller.
async fn metrics(State(service): State<Arc<Service>>) -> Response {
    let body = service.metrics().encode(service.consensus());
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// The network as this node sees it, and the last signature transaction it has applied.
async fn network(State(service): State<Arc<Service>>) -> Result<impl IntoResponse, ApiError> {
    let mut body = serde_json::to_value(service.consensus().network()).expect("the network status serializes");
    let tx = service.store().begin()?;
    let last = cloister_ledger::index::last_signed(tx.snapshot())
        .map_err(|e| ApiError::internal(format!("reading the last signature failed: {e}")))?;
    body["last_signature"] =
        last.map_or(serde_json::Value::Null, |(seqno, tree_size)| json!({ "seqno": seqno, "tree_size": tree_size }));
    Ok(axum::Json(body))
}

/// The `id` query parameter as a transaction id.
fn tx_id_param(uri: &Uri) -> Result<cloister_ledger::txid::TxId, ApiError> {
    let id = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| ApiError::bad_request("name the transaction: ?id=term.seqno"))?;
    id.parse().map_err(ApiError::bad_request)
}

/// A 202 that says to come back: the transaction or its signature is not there yet.
fn come_back(id: cloister_ledger::txid::TxId, what: &str) -> Response {
    let body = json!({ "tx_id": id.to_string(), "status": "Pending", "message": what });
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// `GET /app/receipt?id=term.seqno`: proof that a transaction committed, checkable offline
/// with the service certificate alone. Members and users only; built on the blocking pool.
async fn receipt(
    State(service): State<Arc<Service>>,
    Extension(peer): Extension<PeerInfo>,
    uri: Uri,
) -> Result<Response, ApiError> {
    service.identify_known(peer.client_cert.as_deref())?;
    let id = tx_id_param(&uri)?;
    service.wait_readable().await?;
    let status = service
        .consensus()
        .tx_status(id)
        .map_err(|e| ApiError::internal(format!("reading the term history failed: {e}")))?;
    match status {
        cloister_consensus::TxStatus::Pending => return Ok(come_back(id, "the transaction is not committed yet")),
        cloister_consensus::TxStatus::Invalid => {
            return Err(ApiError::not_found(format!("transaction {id} is Invalid: it was never committed")));
        }
        cloister_consensus::TxStatus::Committed => {}
    }
    // The receipt's endorsement is a signature: on the blocking pool, in a read slot, like
    // other reads, not on the async workers every request shares.
    let receipting = service.clone();
    match service.in_read_slot(move || receipting.receipt(id)).await? {
        Ok(receipt) => Ok(axum::Json(receipt).into_response()),
        Err(cloister_ledger::index::ReceiptUnavailable::NotYetSigned) => {
            Ok(come_back(id, "committed; no signature covers it yet"))
        }
        Err(cloister_ledger::index::ReceiptUnavailable::NotHeld { first }) => Err(ApiError::not_found(format!(
            "this node's ledger starts at seqno {first} (it joined from a snapshot): ask another node for {id}"
        ))),
        Err(cloister_ledger::index::ReceiptUnavailable::NotFound) => {
            Err(ApiError::not_found(format!("transaction {id} is not in this node's ledger")))
        }
    }
}

/// Every node's evidence and what verifying it established, from `gov.nodes`.
async fn attestations(State(service): State<Arc<Service>>) -> Result<impl IntoResponse, ApiError> {
    service.wait_readable().await?;
    let nodes = service.public_read(|tx| Ok(crate::gov::all::<crate::gov::NodeRecord>(tx, crate::gov::NODES)?)).await?;
    let list: Vec<_> = nodes
        .into_iter()
        .map(|(id, n)| {
            json!({
                "node_id": id,
                "name": n.name,
                "status": n.status,
                "kind": n.evidence.get("kind"),
                "verified": n.verified,
                "evidence": n.evidence,
                "encryption_key": n.encryption_key,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "nodes": list })))
}

/// The attestation policy this service enforces: its pinned roots and the governed allow-lists.
async fn attestation_policy(State(service): State<Arc<Service>>) -> Result<impl IntoResponse, ApiError> {
    service.wait_readable().await?;
    let policy = service
        .gov_read(|tx| Ok(crate::attest::policy(tx)?))?
        .ok_or_else(|| ApiError::unavailable("this node holds no service state yet"))?;
    Ok(axum::Json(policy))
}

/// `GET /node/tx?id=term.seqno`: Pending, Committed or Invalid, as this node knows it.
async fn tx_status(State(service): State<Arc<Service>>, uri: Uri) -> Result<impl IntoResponse, ApiError> {
    let id = tx_id_param(&uri)?;
    service.wait_readable().await?;
    let status = service
        .consensus()
        .tx_status(id)
        .map_err(|e| ApiError::internal(format!("reading the term history failed: {e}")))?;
    Ok(axum::Json(json!({ "tx_id": id.to_string(), "status": status })))
}

async fn api(State(service): State<Arc<Service>>) -> Result<impl IntoResponse, ApiError> {
    let app = service.app().await?;
    Ok(axum::Json(super::openapi::document(app.as_ref().map(|m| m.manifest()))))
}

/// Reads a body, refusing more than `limits.body_bytes_max` bytes with 413, and one not in full
/// within `limits.body_timeout_ms` with 408.
async fn read_body(body: Body, headers: &HeaderMap, limits: &Limits) -> Result<bytes::Bytes, ApiError> {
    let max = limits.body_bytes_max;
    let too_large = || ApiError::too_large(format!("the request body exceeds {max} bytes (body_bytes_max)"));
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let timeout = std::time::Duration::from_millis(limits.body_timeout_ms);
    let read = tokio::time::timeout(timeout, http_body_util::Limited::new(body, max).collect());
    match read.await.map_err(|_| ApiError::body_timed_out(limits.body_timeout_ms))? {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) if super::server::OverBudget::caused(&*e) => Err(ApiError {
            retry_after_s: Some(super::server::OVER_BUDGET_RETRY_AFTER_S),
            ..ApiError::unavailable(e.to_string())
        }),
        Err(e) => Err(ApiError::bad_request(format!("the request body could not be read: {e}"))),
    }
}

async fn app(
    State(service): State<Arc<Service>>,
    Extension(peer): Extension<PeerInfo>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, &headers, service.limits()).await?;
    let path = uri.path().strip_prefix("/app").unwrap_or("/").to_owned();
    let headers: BTreeMap<String, String> = headers
        .iter()
        .filter(|(name, _)| !WITHHELD_HEADERS.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect();
    let call = AppCall {
        method: method.as_str().to_owned(),
        path,
        query: uri.query().unwrap_or_default().to_owned(),
        headers,
        body,
        client_cert: peer.client_cert,
        hops: 0,
    };
    Ok(reply(service.call_app(call).await?))
}

/// `GET /gov/...`: the governance tables, public like the ledger that holds them.
async fn gov_read(State(service): State<Arc<Service>>, uri: Uri) -> Result<impl IntoResponse, ApiError> {
    let what =
        GovRead::from_path(uri.path()).ok_or_else(|| ApiError::not_found(format!("no endpoint {}", uri.path())))?;
    Ok(axum::Json(super::gov::read(&service, what).await?))
}

/// `POST /gov/...`: a COSE_Sign1 request signed by a member; the signature, not the TLS client
/// certificate, says who sends it.
async fn gov_write(
    State(service): State<Arc<Service>>,
    Extension(peer): Extension<PeerInfo>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let write =
        GovWrite::from_path(uri.path()).ok_or_else(|| ApiError::not_found(format!("no endpoint {}", uri.path())))?;
    let body = read_body(body, &headers, service.limits()).await?;
    Ok(reply(service.gov_write(write, body, 0, peer.remote.map(|a| a.ip())).await?))
}

fn reply(r: AppReply) -> Response {
    let mut response = Response::new(Body::from(r.body));
    *response.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in &r.headers {
        // An app cannot set a header that HTTP cannot carry; such headers are dropped.
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) {
            headers.insert(n, v);
        }
    }
    if let Some(id) = r.tx_id {
        headers.insert(TX_ID_HEADER, HeaderValue::try_from(id.to_string()).expect("tx ids are ASCII"));
    }
    response
}
