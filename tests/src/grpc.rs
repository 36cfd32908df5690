//! gRPC clients for the tests: the conformance scenario over the typed `Reconcile` service, and
//! the mapping of gRPC statuses back to the HTTP status and JSON error they stand for.

use cloister_proto::app::v1 as app_pb;
use cloister_proto::reconcile::v1 as rec_pb;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::conformance::{Call, ScenarioClient};

/// The HTTP status and JSON error body a gRPC error stands for.
pub fn status_to_http(s: &tonic::Status) -> (u16, Value) {
    use tonic::Code;
    let status = match s.code() {
        Code::InvalidArgument => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::Unimplemented => 405,
        Code::ResourceExhausted => 413,
        Code::Unavailable => 503,
        _ => 500,
    };
    (status, serde_json::from_str(s.message()).unwrap_or_else(|_| json!({ "grpc_message": s.message() })))
}

/// A report row back as the JSON the REST endpoint gives.
pub fn row_json(r: &rec_pb::ReportRow) -> Value {
    let mut v = json!({
        "group_status": r.group_status,
        "majority_minority": r.majority_minority,
        "count_of_unique_values": r.count_of_unique_values,
        "members_in_agreement": r.members_in_agreement,
        "total_votes": r.total_votes,
    });
    for (k, f) in &r.fields {
        v[k] = json!(f);
    }
    v
}

/// The scenario over gRPC: the typed `Reconcile` service wherever the request can be typed, and
/// `App.Call` for raw bodies that cannot (a JSON `null`, or CSV text that is not valid UTF-8).
pub struct Grpc {
    pub reconcile: Vec<rec_pb::reconcile_client::ReconcileClient<Channel>>,
    pub app: Vec<app_pb::app_client::AppClient<Channel>>,
}

fn answer<T>(r: Result<tonic::Response<T>, tonic::Status>, ok: impl FnOnce(T) -> Value) -> (u16, Value) {
    match r {
        Ok(reply) => (200, ok(reply.into_inner())),
        Err(s) => status_to_http(&s),
    }
}

impl ScenarioClient for Grpc {
    async fn call(&mut self, call: Call<'_>) -> (u16, Value) {
        let typed = &mut self.reconcile[call.party];
        let records: Option<Vec<rec_pb::Record>> =
            serde_json::from_slice::<Vec<std::collections::HashMap<String, String>>>(call.body)
                .ok()
                .map(|rows| rows.into_iter().map(|fields| rec_pb::Record { fields }).collect());
        let ingested = |r: rec_pb::IngestReply| json!({ "rows": r.rows, "keys": r.keys });
        match (call.method, call.path, records) {
            ("POST", "/ingest", Some(records)) => {
                answer(typed.ingest(rec_pb::IngestRequest { records }).await, ingested)
            }
            ("POST", "/csv/ingest", _) if std::str::from_utf8(call.body).is_ok() => {
                let csv = String::from_utf8(call.body.to_vec()).unwrap();
                answer(typed.ingest_csv(rec_pb::IngestCsvRequest { csv }).await, ingested)
            }
            ("GET", "/report", _) => answer(typed.report(rec_pb::ReportRequest::default()).await, |r| {
                Value::Array(r.rows.iter().map(row_json).collect())
            }),
            ("GET", path, _) if path.starts_with("/report/") => {
                let key = path["/report/".len()..].to_owned();
                answer(typed.report_by_key(rec_pb::ReportByKeyRequest { key }).await, |r| row_json(&r))
            }
            (method, path, _) => {
                let request = app_pb::CallRequest {
                    method: method.into(),
                    path: path.into(),
                    query: String::new(),
                    body: call.body.to_vec(),
                    content_type: call.content_type.into(),
                };
                answer(self.app[call.party].call(request).await, |r| {
                    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
                })
            }
        }
    }
}
