//! The gRPC frontend (tonic): `App.Call` for any app endpoint, the typed `Reconcile` service, and
//! `Gov` for governance, all mapped onto the same service layer as REST, identified by the same client certificates.

use std::collections::BTreeMap;
use std::sync::Arc;

use cloister_proto::app::v1 as app_pb;
use cloister_proto::gov::v1 as gov_pb;
use cloister_proto::reconcile as rec_pb_bounded;
use cloister_proto::reconcile::v1 as rec_pb;
use prost::Message;
use serde_json::Value;
use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::gov::GovRead;
use super::service::{AppCall, AppReply, Service};
use cloister_crypto::cose::GovWrite;

/// The first client certificate of a request's connection.
fn client_cert<T>(req: &Request<T>) -> Option<Vec<u8>> {
    req.peer_certs().and_then(|certs| certs.first().map(|c| c.to_vec()))
}

/// Calls an app endpoint; a non-2xx answer becomes the matching gRPC error.
async fn call(
    service: &Arc<Service>,
    cert: Option<Vec<u8>>,
    method: &str,
    target: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<AppReply, Status> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = match content_type {
        "" => BTreeMap::new(),
        ct => [("content-type".to_owned(), ct.to_owned())].into(),
    };
    let call = AppCall {
        method: method.to_ascii_uppercase(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        body: body.into(),
        client_cert: cert,
        hops: 0,
    };
    let reply = service.call_app(call).await.map_err(|e| e.to_status())?;
    if !(200..300).contains(&reply.status) {
        return Err(ApiError::from_app(reply.status, &reply.body).to_status());
    }
    Ok(reply)
}

pub(crate) struct AppService(pub Arc<Service>);

#[tonic::async_trait]
impl app_pb::app_server::App for AppService {
    async fn call(&self, req: Request<app_pb::CallRequest>) -> Result<Response<app_pb::CallReply>, Status> {
        let cert = client_cert(&req);
        let r = req.into_inner();
        let target = if r.query.is_empty() { r.path } else { format!("{}?{}", r.path, r.query) };
        let reply = call(&self.0, cert, &r.method, &target, &r.content_type, r.body).await?;
        Ok(Response::new(app_pb::CallReply {
            status: u32::from(reply.status),
            headers: reply.headers.into_iter().collect(),
            body: reply.body,
            tx_id: reply.tx_id.map(|t| t.to_string()).unwrap_or_default(),
        }))
    }
}

pub(crate) struct ReconcileService(pub Arc<Service>);

fn json_body(reply: &AppReply) -> Result<Value, Status> {
    serde_json::from_slice(&reply.body)
        .map_err(|e| Status::internal(format!("the app answered with invalid JSON: {e}")))
}

/// A report row's JSON, split into the caller's fields and the vote counts.
fn row(v: &Value) -> Result<rec_pb::ReportRow, Status> {
    let obj = v.as_object().ok_or_else(|| Status::internal("a report row is not a JSON object"))?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let count = |k: &str| obj.get(k).and_then(Value::as_u64).unwrap_or_default() as u32;
    const STATS: [&str; 5] =
        ["group_status", "majority_minority", "count_of_unique_values", "members_in_agreement", "total_votes"];
    let fields = obj
        .iter()
        .filter(|(k, _)| !STATS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    Ok(rec_pb::ReportRow {
        fields,
        group_status: text("group_status"),
        majority_minority: text("majority_minority"),
        count_of_unique_values: count("count_of_unique_values"),
        members_in_agreement: count("members_in_agreement"),
        total_votes: count("total_votes"),
    })
}

fn ingest_reply(reply: &AppReply) -> Result<rec_pb::IngestReply, Status> {
    let v = json_body(reply)?;
    Ok(rec_pb::IngestReply {
        rows: v["rows"].as_u64().unwrap_or_default() as u32,
        keys: v["keys"].as_u64().unwrap_or_default() as u32,
        tx_id: reply.tx_id.map(|t| t.to_string()).unwrap_or_default(),
    })
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A buffer that takes no more than `max` bytes: a write that would pass it fails and leaves it.
struct Bounded {
    buf: Vec<u8>,
    max: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "over the bound"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An ingest's records as the JSON body of `POST /app/ingest`, an array of objects of string
/// fields, held to `body_bytes_max` as that body is over REST (the typed call is the same
/// request in another encoding). Built from the encoded records one field at a time, so the
/// memory it takes is the bound's, whatever the records hold.
fn records_json(records: &rec_pb_bounded::EncodedRecords, max: usize) -> Result<Vec<u8>, ApiError> {
    use std::io::Write;
    let mut json = Bounded { buf: Vec::with_capacity(records.encoded_len().min(max)), max };
    let too_large = |_| ApiError::too_large(format!("the records as JSON exceed {max} bytes (body_bytes_max)"));
    json.write_all(b"[").map_err(too_large)?;
    for (i, record) in records.records().enumerate() {
        json.write_all(if i == 0 { &b"{"[..] } else { b",{" }).map_err(too_large)?;
        for (j, field) in rec_pb_bounded::fields(record).enumerate() {
            let (name, value) = field.map_err(|e| ApiError::bad_request(format!("record {}: {e}", i + 1)))?;
            let written = (|| {
                if j > 0 {
                    json.write_all(b",")?;
                }
                serde_json::to_writer(&mut json, name)?;
                json.write_all(b":")?;
                serde_json::to_writer(&mut json, value)?;
                std::io::Result::Ok(())
            })();
            written.map_err(too_large)?;
        }
        json.write_all(b"}").map_err(too_large)?;
    }
    json.write_all(b"]").map_err(too_large)?;
    Ok(json.buf)
}

#[tonic::async_trait]
impl rec_pb_bounded::bounded::reconcile_server::Reconcile for ReconcileService {
    async fn ingest(
        &self,
        req: Request<rec_pb_bounded::EncodedRecords>,
    ) -> Result<Response<rec_pb::IngestReply>, Status> {
        let cert = client_cert(&req);
        let body = records_json(req.get_ref(), self.0.limits().body_bytes_max).map_err(|e| e.to_status())?;
        drop(req);
        let reply = call(&self.0, cert, "POST", "/ingest", "application/json", body).await?;
        Ok(Response::new(ingest_reply(&reply)?))
    }

    async fn ingest_csv(
        &self,
        req: Request<rec_pb::IngestCsvRequest>,
    ) -> Result<Response<rec_pb::IngestReply>, Status> {
        let cert = client_cert(&req);
        let body = req.into_inner().csv.into_bytes();
        let reply = call(&self.0, cert, "POST", "/csv/ingest", "text/csv", body).await?;
        Ok(Response::new(ingest_reply(&reply)?))
    }

    async fn report(&self, req: Request<rec_pb::ReportRequest>) -> Result<Response<rec_pb::ReportReply>, Status> {
        let cert = client_cert(&req);
        let r = req.into_inner();
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if r.limit > 0 {
                query.append_pair("limit", &r.limit.to_string());
            }
            if !r.after.is_empty() {
                query.append_pair("after", &r.after);
            }
            query.finish()
        };
        let reply = call(&self.0, cert, "GET", &format!("/report?{query}"), "", Vec::new()).await?;
        let rows = json_body(&reply)?
            .as_array()
            .ok_or_else(|| Status::internal("a report is not a JSON array"))?
            .iter()
            .map(row)
            .collect::<Result<_, _>>()?;
        let next_cursor = reply
            .headers
            .get("x-next-cursor")
            .map(|c| percent_encoding::percent_decode_str(c).decode_utf8_lossy().into_owned())
            .unwrap_or_default();
        Ok(Response::new(rec_pb::ReportReply { rows, next_cursor }))
    }

    async fn report_by_key(
        &self,
        req: Request<rec_pb::ReportByKeyRequest>,
    ) -> Result<Response<rec_pb::ReportRow>, Status> {
        let cert = client_cert(&req);
        let key = req.into_inner().key;
        let reply = call(&self.0, cert, "GET", &format!("/report/{}", encode(&key)), "", Vec::new()).await?;
        Ok(Response::new(row(&json_body(&reply)?)?))
    }
}

/// The gRPC router: both services, with the body limit, plus server reflection.
pub(crate) struct GovService(pub Arc<Service>);

#[tonic::async_trait]
impl gov_pb::gov_server::Gov for GovService {
    async fn write(&self, req: Request<gov_pb::WriteRequest>) -> Result<Response<gov_pb::GovReply>, Status> {
        let source = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let write = GovWrite::from_path(&r.path)
            .ok_or_else(|| ApiError::not_found(format!("no governance write {}", r.path)).to_status())?;
        let reply = self.0.gov_write(write, r.cose_sign1.into(), 0, source).await.map_err(|e| e.to_status())?;
        if !(200..300).contains(&reply.status) {
            return Err(ApiError::from_app(reply.status, &reply.body).to_status());
        }
        Ok(Response::new(gov_pb::GovReply {
            json: String::from_utf8_lossy(&reply.body).into_owned(),
            tx_id: reply.tx_id.map(|t| t.to_string()).unwrap_or_default(),
        }))
    }

    async fn read(&self, req: Request<gov_pb::ReadRequest>) -> Result<Response<gov_pb::GovReply>, Status> {
        let path = req.into_inner().path;
        let what = GovRead::from_path(&path)
            .ok_or_else(|| ApiError::not_found(format!("no governance read {path}")).to_status())?;
        let answer = super::gov::read(&self.0, what).await.map_err(|e| e.to_status())?;
        Ok(Response::new(gov_pb::GovReply { json: answer.to_string(), tx_id: String::new() }))
    }
}

pub fn routes(service: Arc<Service>) -> anyhow::Result<tonic::service::Routes> {
    let (max, body_timeout_ms) = (service.limits().body_bytes_max, service.limits().body_timeout_ms);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cloister_proto::FILE_DESCRIPTOR_SET)
        // The peer service lives on the peer port; only client services are listed here.
        .with_service_name("cloister.app.v1.App")
        .with_service_name("cloister.reconcile.v1.Reconcile")
        .with_service_name("cloister.gov.v1.Gov")
        .build_v1()?;
    let app = app_pb::app_server::AppServer::new(AppService(service.clone())).max_decoding_message_size(max);
    let reconcile = rec_pb_bounded::bounded::reconcile_server::ReconcileServer::new(ReconcileService(service.clone()))
        .max_decoding_message_size(max);
    let metrics = service.metrics().clone();
    let gov = gov_pb::gov_server::GovServer::new(GovService(service)).max_decoding_message_size(max);
    let routes = tonic::service::Routes::new(app).add_service(reconcile).add_service(gov).add_service(reflection);
    let counted = routes
        .into_axum_router()
        .layer(axum::middleware::map_request(move |request: axum::extract::Request| async move {
            request.map(|body| axum::body::Body::new(DeadlineBody::new(body, body_timeout_ms)))
        }))
        .layer(axum::middleware::from_fn_with_state(metrics, crate::metrics::grpc_layer));
    Ok(tonic::service::Routes::from(counted))
}

/// A call's request body that fails with DEADLINE_EXCEEDED once `limits.body_timeout_ms` has
/// passed before its end. tonic decodes a unary request before its handler runs, so this is
/// where a body that never comes is cut off, and its stream answered and closed.
struct DeadlineBody {
    inner: axum::body::Body,
    timeout_ms: u64,
    /// Armed when the body is wrapped, registered with the timer only if the body has to wait.
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: axum::body::Body, timeout_ms: u64) -> DeadlineBody {
        let deadline = Box::pin(tokio::time::sleep(std::time::Duration::from_millis(timeout_ms)));
        DeadlineBody { inner, timeout_ms, deadline }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(ApiError::body_timed_out(this.timeout_ms).to_status().into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(records: &[&[(&str, &str)]]) -> rec_pb_bounded::EncodedRecords {
        let mut out = rec_pb_bounded::EncodedRecords::default();
        for fields in records {
            let record =
                rec_pb::Record { fields: fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
            out.push(&record.encode_to_vec());
        }
        out
    }

    #[test]
    fn records_become_the_json_body_of_an_ingest() {
        let records = encoded(&[&[("lei", "A\"\n")], &[], &[("nace", "é")]]);
        let json = records_json(&records, 1 << 20).unwrap();
        let back: Vec<BTreeMap<String, String>> = serde_json::from_slice(&json).unwrap();
        let expected: Vec<BTreeMap<String, String>> =
            vec![[("lei".into(), "A\"\n".into())].into(), BTreeMap::new(), [("nace".into(), "é".into())].into()];
        assert_eq!(back, expected);
        assert_eq!(records_json(&encoded(&[]), 2).unwrap(), b"[]");
    }

    #[test]
    fn the_json_is_held_to_body_bytes_max_at_its_edge() {
        // `[{"k":"\u0001"}]`: one control character is six bytes of JSON.
        let records = encoded(&[&[("k", "\u{1}")]]);
        let exact = records_json(&records, usize::MAX).unwrap().len();
        assert_eq!(exact, br#"[{"k":"\u0001"}]"#.len());
        assert!(records_json(&records, exact).is_ok());
        let refused = records_json(&records, exact - 1).unwrap_err();
        assert_eq!(refused.status, 413);
        assert!(refused.message.contains("body_bytes_max"), "{}", refused.message);
    }

    #[test]
    fn a_record_that_is_not_one_is_a_bad_request() {
        let mut records = encoded(&[&[("lei", "A")]]);
        // A map entry whose name is not UTF-8.
        records.push(&[0x0a, 4, 0x0a, 2, 0xff, 0xfe]);
        let refused = records_json(&records, 1 << 20).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(refused.message.starts_with("record 2: "), "{}", refused.message);
    }
}
