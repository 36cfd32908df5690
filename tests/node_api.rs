//! The node's API against a node on 127.0.0.1 with real TLS: authorisation, bad input, limits,
//! built-in endpoints, gRPC reflection, and restarts.

use std::time::{Duration, Instant};

use cloister_bundled::RECONCILE;
use cloister_client::{Client, grpc_channel};
use cloister_node::config::Limits;
use cloister_proto::app::v1::CallRequest;
use cloister_proto::app::v1::app_client::AppClient;
use cloister_tests::metrics::{scrape, value};
use cloister_tests::{TestService, misbehave_wasm, new_identity};
use serde_json::Value;

/// Asserts a JSON error answer: status, code, and a message containing `needle`.
fn assert_error(reply: &cloister_client::Reply, status: u16, code: &str, needle: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json().expect("errors are JSON");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

/// Wasm limits under which `/loop` runs until the 2 s wall-clock watchdog stops it.
fn endless_loops() -> cloister_runtime::Limits {
    cloister_runtime::Limits { fuel_per_request: u64::MAX / 2, wall_time_ms: 2_000, ..Default::default() }
}

async fn report(client: &Client) -> Value {
    let r = client.get("/app/report").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorisation_matrix() {
    let service = TestService::start(1, 1, &misbehave_wasm(), Limits::default()).await;
    let member = service.member(0).await;
    let user = service.client(Some(&service.users[0].keyed)).await;
    let anonymous = service.client(None).await;
    let stranger = new_identity("stranger");
    let unknown = service.client(Some(&stranger.keyed)).await;

    // No certificate: public endpoints only.
    assert_eq!(anonymous.get("/app/noop").await.unwrap().status, 204);
    assert_eq!(anonymous.get("/node/health").await.unwrap().status, 200);
    assert_error(&anonymous.get("/app/get/x").await.unwrap(), 401, "Unauthorized", "client certificate");
    // An unknown certificate: 401 naming it; public endpoints still answer.
    assert_error(&unknown.get("/app/get/x").await.unwrap(), 401, "Unauthorized", &stranger.id);
    assert_eq!(unknown.get("/app/noop").await.unwrap().status, 204);
    // A known identity without the role: 403.
    assert_error(&user.get("/app/members-only").await.unwrap(), 403, "Forbidden", "members only");
    assert_error(&member.get("/app/users-only").await.unwrap(), 403, "Forbidden", "users only");
    assert_eq!(member.get("/app/members-only").await.unwrap().status, 204);
    assert_eq!(user.get("/app/users-only").await.unwrap().status, 204);

    // The same over gRPC.
    let call = |path: &str| CallRequest { method: "GET".into(), path: path.into(), ..Default::default() };
    let mut as_user = AppClient::new(
        grpc_channel(&service.grpc_url(), &service.ca_pem, Some(&service.users[0].keyed)).await.unwrap(),
    );
    let mut as_stranger =
        AppClient::new(grpc_channel(&service.grpc_url(), &service.ca_pem, Some(&stranger.keyed)).await.unwrap());
    let denied = as_user.call(call("/members-only")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(denied.message().contains("\"Forbidden\""), "{}", denied.message());
    assert_eq!(as_stranger.call(call("/get/x")).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(as_user.call(call("/users-only")).await.unwrap().into_inner().status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_party_reading_a_key_it_never_submitted_learns_nothing() {
    let service = TestService::start(2, 0, RECONCILE, Limits::default()).await;
    let (m0, m1) = (service.member(0).await, service.member(1).await);
    let ingest =
        m0.post("/app/ingest", "application/json", r#"{"lei":"SECRET-KEY","nace":"SECRET-VALUE"}"#).await.unwrap();
    assert_eq!(ingest.status, 200);
    let foreign = m1.get("/app/report/SECRET-KEY").await.unwrap();
    let missing = m1.get("/app/report/NO-SUCH-KEY").await.unwrap();
    assert_error(&foreign, 404, "NotFound", "no record submitted by you");
    assert_eq!((foreign.status, foreign.body.clone()), (missing.status, missing.body.clone()));
    assert!(!foreign.text().contains("SECRET"));
    assert_eq!(report(&m1).await, serde_json::json!([]));

    // Nor from what the node publishes of the app's work: `/node/metrics` (open to anyone) once
    // counted every execution's fuel, and the read of a key others submitted burned fuel for
    // their votes' bytes, so the counter told that key from one nobody submitted.
    let anonymous = service.client(None).await;
    let work = |path: &'static str| {
        let (m1, anonymous) = (&m1, &anonymous);
        async move {
            let (_, before) = scrape(anonymous).await;
            assert_eq!(m1.get(path).await.unwrap().status, 404);
            let (_, after) = scrape(anonymous).await;
            let moved = |e: &cloister_tests::metrics::Exposition| {
                e.families
                    .keys()
                    .filter(|name| name.starts_with("cloister_wasm"))
                    .map(|name| (name.clone(), value(e, name, &[])))
                    .collect::<std::collections::BTreeMap<_, _>>()
            };
            let (before, after) = (moved(&before), moved(&after));
            after.into_iter().map(|(name, v)| (name.clone(), v - before.get(&name).unwrap_or(&0.0))).collect::<Vec<_>>()
        }
    };
    let foreign = work("/app/report/SECRET-KEY").await;
    assert!(foreign.iter().any(|(name, moved)| name == "cloister_wasm_executions" && *moved == 1.0), "{foreign:?}");
    assert_eq!(foreign, work("/app/report/NO-SUCH-KEY").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let body_max = 64 << 10;
    let service = TestService::start(1, 0, RECONCILE, Limits { body_bytes_max: body_max, ..Limits::default() }).await;
    let m = service.member(0).await;
    assert_eq!(m.post("/app/ingest", "application/json", r#"[{"lei":"K1","nace":"A"}]"#).await.unwrap().status, 200);
    let before = report(&m).await;

    let json = "application/json";
    assert_error(
        &m.post("/app/ingest", json, r#"[{"lei":"K2","nace":"A"},"#).await.unwrap(),
        400,
        "BadRequest",
        "not valid JSON",
    );
    assert_error(
        &m.post("/app/csv/ingest", "text/csv", "key,value\nK2,A\n").await.unwrap(),
        400,
        "BadRequest",
        "lacks lei, nace",
    );
    assert_error(
        &m.post("/app/csv/ingest", "text/csv", b"lei,nace\nK2,\xff\xfe\n".to_vec()).await.unwrap(),
        400,
        "BadRequest",
        "UTF-8",
    );
    assert_error(&m.post("/app/ingest", json, b"\xff\xfe".to_vec()).await.unwrap(), 400, "BadRequest", "JSON");
    assert_error(&m.get("/app/no/such/path").await.unwrap(), 404, "NotFound", "/app/no/such/path");
    assert_error(&m.get("/no/such/path").await.unwrap(), 404, "NotFound", "/no/such/path");
    assert_error(&m.get("/app/ingest").await.unwrap(), 405, "MethodNotAllowed", "GET");
    assert_error(&m.request("PUT", "/node/health", None, "").await.unwrap(), 405, "MethodNotAllowed", "PUT");

    // body_bytes_max, at its edge: a body of exactly the limit runs (and is refused by the app as
    // JSON); one byte more is refused before anything runs.
    let at_limit = vec![b' '; body_max];
    assert_error(&m.post("/app/ingest", json, at_limit).await.unwrap(), 400, "BadRequest", "JSON");
    let over = vec![b' '; body_max + 1];
    assert_error(&m.post("/app/ingest", json, over).await.unwrap(), 413, "PayloadTooLarge", "body_bytes_max");

    // Malformed protobuf on the gRPC port: refused (INTERNAL, as the gRPC spec prescribes for an
    // unparsable request message) without reaching the app.
    let raw = Client::connect(&service.grpc_url(), &service.ca_pem, Some(&service.members[0].keyed)).await.unwrap();
    let mut frame = vec![0u8, 0, 0, 0, 4];
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let reply = raw.post("/cloister.reconcile.v1.Reconcile/Ingest", "application/grpc", frame).await.unwrap();
    let grpc_status = reply
        .trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| reply.headers.get("grpc-status"))
        .expect("a gRPC status");
    assert_eq!(grpc_status, "13", "INTERNAL");
    // An oversized gRPC message is refused by the decoder.
    let mut channel = cloister_proto::reconcile::v1::reconcile_client::ReconcileClient::new(
        grpc_channel(&service.grpc_url(), &service.ca_pem, Some(&service.members[0].keyed)).await.unwrap(),
    );
    let huge = cloister_proto::reconcile::v1::IngestCsvRequest { csv: "x".repeat(body_max + 1) };
    let refused = channel.ingest_csv(huge).await.unwrap_err();
    assert!(matches!(refused.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{refused:?}");
    // A typed ingest is held to body_bytes_max as the JSON it stands for, and is never built as
    // a map per record: a message just under the limit of empty records (two bytes each on the
    // wire, three as JSON) is refused by the node, not handed to the app as 1.5 times the limit.
    let empty = cloister_proto::reconcile::v1::Record::default();
    let records = vec![empty; (body_max - 8) / 2];
    let refused = channel.ingest(cloister_proto::reconcile::v1::IngestRequest { records }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("body_bytes_max"), "{refused:?}");
    // A record that is not one (a field name that is not UTF-8) is the caller's error.
    let frame = |message: &[u8]| [&[0u8][..], &(message.len() as u32).to_be_bytes(), message].concat();
    let not_utf8 = frame(&[0x0a, 6, 0x0a, 4, 0x0a, 2, 0xff, 0xfe]);
    let reply = raw.post("/cloister.reconcile.v1.Reconcile/Ingest", "application/grpc", not_utf8).await.unwrap();
    let trailers = reply.trailers.as_ref().unwrap_or(&reply.headers);
    assert_eq!(trailers.get("grpc-status").expect("a gRPC status"), "3", "INVALID_ARGUMENT: {trailers:?}");

    assert_eq!(report(&m).await, before, "no bad input changed the state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_millions_of_values_is_refused_by_its_row_count() {
    // Default limits: a body_bytes_max body of zeros is four million JSON values. The app built
    // them as one document before counting rows, and ran out of its memory (a 500); it reads the
    // rows one by one now, and the batch limit answers.
    let service = TestService::start(1, 0, RECONCILE, Limits::default()).await;
    let m = service.member(0).await;
    let mut zeros = b"[0".to_vec();
    zeros.extend(b",0".repeat((Limits::default().body_bytes_max - 3) / 2));
    zeros.push(b']');
    assert!(zeros.len() <= Limits::default().body_bytes_max);
    let reply = m.post("/app/ingest", "application/json", zeros).await.unwrap();
    assert_error(&reply, 413, "PayloadTooLarge", "more than 10000 records (setting batch_records_max)");
    assert_eq!(report(&m).await, serde_json::json!([]), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_are_500_with_a_named_error_and_the_node_keeps_serving() {
    let service = TestService::start(1, 0, &misbehave_wasm(), Limits::default()).await;
    let m = service.member(0).await;
    assert_error(
        &m.post("/app/panic?what=now", "text/plain", "").await.unwrap(),
        500,
        "GuestPanic",
        "misbehave panicked now",
    );
    assert_error(&m.post("/app/recurse", "text/plain", "").await.unwrap(), 500, "StackOverflow", "stack_bytes_max");
    let put = m.post("/app/put/k", "text/plain", "v").await.unwrap();
    assert_eq!(put.status, 204);
    assert!(put.tx_id().is_some(), "writes carry x-cloister-tx-id");
    assert_eq!(m.get("/app/get/k").await.unwrap().text(), "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_and_inflight_limits() {
    let service = TestService::start_with(2, 0, &misbehave_wasm(), |c| {
        c.limits = Limits { request_timeout_ms: 300, inflight_per_identity_max: 1, ..Limits::default() };
        c.wasm = endless_loops();
    })
    .await;
    let m = service.member(0).await;
    // A request that outlives request_timeout_ms answers 503 in time.
    let started = Instant::now();
    let spinning = tokio::spawn({
        let m = m.clone();
        async move { m.post("/app/loop", "text/plain", "").await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The same identity, while its first request is in flight: 429.
    assert_error(&m.get("/app/get/k").await.unwrap(), 429, "TooManyRequests", "inflight_per_identity_max");
    // Another identity is not affected by that limit.
    assert_eq!(service.member(1).await.get("/app/get/k").await.unwrap().status, 404);
    let timed_out = spinning.await.unwrap();
    assert_error(&timed_out, 503, "ServiceUnavailable", "request_timeout_ms");
    assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());

    // A write queued behind a busy writer whose caller gives up is dropped before it runs:
    // it neither spends the writer nor commits after its caller was told it timed out.
    let busy = tokio::spawn({
        let m = service.member(1).await;
        async move { m.post("/app/loop", "text/plain", "").await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let given_up = m.post("/app/put/late", "text/plain", "late").await.unwrap();
    assert_error(&given_up, 503, "ServiceUnavailable", "request_timeout_ms");
    busy.await.unwrap();
    // The loop ends at wall_time_ms (2 s); anything still queued would have run by then.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(m.get("/app/get/late").await.unwrap().status, 404, "the abandoned write never ran");
    assert_eq!(m.post("/app/put/next", "text/plain", "x").await.unwrap().status, 204, "the writer is free");
}

/// A read's permit (`reads_inflight_max`) is held by the contract it runs, not by the request.
/// A request that times out, or whose client resets it, ends, but its contract runs on until
/// `wall_time_ms` stops it. Freed with the request, the permit let such reads run more at once
/// than the limit, and past `instances_max` every write was refused for want of an instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_holds_its_permit_until_its_contract_stops() {
    let service = TestService::start_with(2, 0, &misbehave_wasm(), |c| {
        c.limits = Limits { request_timeout_ms: 300, reads_inflight_max: 1, ..Limits::default() };
        c.wasm = endless_loops();
    })
    .await;
    let (a, b) = (service.member(0).await, service.member(1).await);
    let started = Instant::now();
    assert_error(&a.get("/app/spin").await.unwrap(), 503, "ServiceUnavailable", "request_timeout_ms");
    // The spinning contract holds the one permit until it is stopped, 2 s after it started:
    // the next read waits for it, and times out too.
    let waited = b.get("/app/get/k").await.unwrap();
    assert_error(&waited, 503, "ServiceUnavailable", "request_timeout_ms");
    assert!(started.elapsed() < Duration::from_millis(1_800), "{:?}", started.elapsed());
    // So does a read of the governance tables, though it runs no contract: it decodes every
    // proposal ever filed, and on the async workers an anonymous client asking in a loop held
    // up every other request. It waits for the one slot too, and times out like any request.
    let asked = Instant::now();
    let listed = service.client(None).await.get("/gov/proposals").await.unwrap();
    assert_error(&listed, 503, "ServiceUnavailable", "request_timeout_ms");
    assert!(asked.elapsed() >= Duration::from_millis(300), "answered after {:?}", asked.elapsed());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(b.get("/app/get/k").await.unwrap().status, 404, "once it is stopped, reads run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_queue_is_bounded() {
    let service = TestService::start_with(3, 0, &misbehave_wasm(), |c| {
        c.limits = Limits { write_queue_max: 1, ..Limits::default() };
        c.wasm = endless_loops();
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(service.member(i).await);
    }
    // The writer runs one loop (until the 2 s wall-clock limit); one more write waits in the
    // queue; a third finds the queue full.
    let busy = tokio::spawn({
        let c = clients[0].clone();
        async move { c.post("/app/loop", "text/plain", "").await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = tokio::spawn({
        let c = clients[1].clone();
        async move { c.post("/app/put/q", "text/plain", "queued").await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_error(
        &clients[2].post("/app/put/x", "text/plain", "x").await.unwrap(),
        503,
        "ServiceUnavailable",
        "write_queue_max",
    );
    assert_error(&busy.await.unwrap(), 500, "WallTimeExceeded", "wall_time_ms");
    let queued = queued.await.unwrap();
    assert_eq!(queued.status, 204, "the queued write ran after the loop: {}", queued.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait() {
    let limits = Limits { connections_max: 1, ..Limits::default() };
    let service = TestService::start(1, 0, &misbehave_wasm(), limits).await;
    let first = service.member(0).await;
    assert_eq!(first.get("/app/noop").await.unwrap().status, 204);
    let second = tokio::time::timeout(Duration::from_millis(500), service.member(0)).await;
    assert!(second.is_err(), "a second connection is not accepted while the first is open");
    drop(first);
    let second =
        tokio::time::timeout(Duration::from_secs(5), service.member(0)).await.expect("accepted once the slot frees");
    assert_eq!(second.get("/app/noop").await.unwrap().status, 204);
}

/// One address held 1,100 idle TCP connections (no TLS bytes) and a health check from another
/// client waited 7.4 s for a slot. Connections per address are bounded, and one that sends
/// nothing is closed after `hello_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_lock_others_out() {
    let service = TestService::start(1, 0, RECONCILE, Limits::default()).await;
    let authority = service.rest_url().trim_start_matches("https://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..3_000 {
        if let Ok(Ok(tcp)) =
            tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(&authority)).await
        {
            idle.push(tcp);
        }
    }
    assert!(idle.len() >= 1_100, "the idle connections were made: {}", idle.len());
    let started = Instant::now();
    let other: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
    let client = cloister_client::Client::connect_from(&service.rest_url(), &service.ca_pem, None, Some(other))
        .await
        .expect("another address connects");
    assert_eq!(client.get("/node/health").await.unwrap().status, 200);
    assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    drop(idle);
}

/// The attack: clients from two addresses open every connection a listener allows
/// (`connections_per_address_max` from each, `connections_max` in all), finish their TLS
/// handshakes, and then send nothing. Nothing closed a connection once it was open, so every
/// other client waited for a slot as long as they held them. Now a connection that moves no
/// byte for `idle_connection_timeout_ms` is closed and its slot given back; one in use is kept,
/// and a `Client` whose connection was closed opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_give_their_slots_back_after_idle_connection_timeout_ms() {
    const IDLE: Duration = Duration::from_millis(1500);
    let service = four_slot_service(IDLE).await;
    let node = service.node();
    for addr in [node.rest_addr, node.grpc_addr] {
        let mut idle = Vec::new();
        for attacker in SLOT_HOLDERS {
            let opened = tokio::time::timeout(IDLE * 2, tls_connect(Some(attacker), addr, &service.ca_pem, None)).await;
            idle.push(opened.expect("a slot: the service's own clients have gone, or idled out"));
        }
        let served = served_once_a_slot_frees(&service, addr, IDLE).await;
        for tls in idle {
            closed_by_the_node(tls, IDLE).await.unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
        // A client whose connection the node closed opens another for its next request.
        if let Some(client) = served {
            tokio::time::sleep(IDLE + Duration::from_millis(500)).await;
            assert_eq!(client.get("/node/health").await.unwrap().status, 200, "the client connected again");
        }
    }
    // A connection in use is kept: one request every third of the timeout, for twice the
    // timeout, on one HTTP/2 connection that cannot open another.
    let mut send = h2_sender(node.rest_addr, &service.ca_pem).await;
    let started = Instant::now();
    while started.elapsed() < IDLE * 2 {
        send = send.ready().await.expect("the connection in use is open");
        let health = hyper::Request::get("https://localhost/node/health").body(()).unwrap();
        let (answer, _) = send.send_request(health, true).unwrap();
        assert_eq!(answer.await.expect("an answer").status(), 200);
        tokio::time::sleep(IDLE / 3).await;
    }
}

/// The attack: a client asks for more than its socket takes and never reads. The node's writes
/// wait for room that never comes, so it reads nothing either, and a connection waiting to write
/// was never checked for idleness: four such connections from two addresses held every slot of a
/// listener for good. Now a write that waits is checked too, and a client that has fallen behind
/// makes progress only by taking `IDLE_WRITE_PROGRESS_BYTES` from the node's socket, or all it
/// was sent: the few bytes the kernel lets through now and then for a client that reads nothing
/// kept such a connection open (the gRPC half failed that way with writes counted byte by byte),
/// and so did a frame sent every third of the timeout, since the HTTP/2 server reads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_gives_its_slot_back_after_idle_connection_timeout_ms() {
    const IDLE: Duration = Duration::from_millis(1500);
    let service = four_slot_service(IDLE).await;
    let node = service.node();
    for addr in [node.rest_addr, node.grpc_addr] {
        let mut deaf = Vec::new();
        for attacker in SLOT_HOLDERS {
            deaf.push(never_reading(attacker, addr, &service.ca_pem, addr == node.rest_addr).await);
        }
        if addr == node.rest_addr {
            served_once_a_slot_frees(&service, addr, IDLE).await;
            // Each has made no progress since before the slot came free.
            for tls in deaf {
                closed_by_the_node(tls, IDLE * 2).await.unwrap_or_else(|e| panic!("{addr}: {e}"));
            }
            continue;
        }
        // The HTTP/2 server goes on reading while its writes wait. Each client sends a frame that
        // asks for no answer every third of the timeout, until the node has closed its
        // connection: what a client sends is no progress while it takes nothing.
        let keeper = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let ping = h2_frames::frame(h2_frames::WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes());
            let started = Instant::now();
            while !deaf.is_empty() && started.elapsed() < IDLE * 4 {
                tokio::time::sleep(IDLE / 3).await;
                let mut open = Vec::new();
                for mut tls in deaf {
                    // A write that waits for room has not found the connection closed yet.
                    if !matches!(tokio::time::timeout(IDLE / 3, tls.write_all(&ping)).await, Ok(Err(_))) {
                        open.push(tls);
                    }
                }
                deaf = open;
            }
            deaf.len()
        });
        served_once_a_slot_frees(&service, addr, IDLE).await;
        let open = keeper.await.unwrap();
        assert_eq!(open, 0, "{addr}: connections kept open by frames that ask for nothing");
    }
}

/// The addresses that take every slot of [`four_slot_service`]'s listeners: two from each.
const SLOT_HOLDERS: [&str; 4] = ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"];

/// One node whose listeners each take four connections, two per address, and close one that
/// makes no progress for `idle`.
async fn four_slot_service(idle: Duration) -> TestService {
    let limits = Limits {
        connections_max: SLOT_HOLDERS.len(),
        connections_per_address_max: 2,
        request_timeout_ms: 1000,
        body_timeout_ms: 1000,
        idle_connection_timeout_ms: idle.as_millis() as u64,
        ..Limits::default()
    };
    TestService::start(1, 0, RECONCILE, limits).await
}

/// Waits for a client from 127.0.0.4 to be served at `addr` (the REST or gRPC listener) while
/// other clients hold every slot, and asserts that it was within twice `idle`, the idle timeout.
/// On the REST listener the client is returned, to use again.
async fn served_once_a_slot_frees(service: &TestService, addr: std::net::SocketAddr, idle: Duration) -> Option<Client> {
    let started = Instant::now();
    let served = tokio::time::timeout(idle * 4, async {
        if addr == service.node().rest_addr {
            let local = "127.0.0.4:0".parse().unwrap();
            let client = Client::connect_from(&service.rest_url(), &service.ca_pem, None, Some(local)).await.unwrap();
            assert_eq!(client.get("/node/health").await.unwrap().status, 200);
            Some(client)
        } else {
            advertised_streams(addr, &service.ca_pem, None).await;
            None
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{addr}: no slot came free in {:?}", idle * 4));
    assert!(started.elapsed() < idle * 2, "{addr}: a slot came free after {:?}", started.elapsed());
    served
}

/// Reads what the node sent until it closes the connection, which it must within `within`.
async fn closed_by_the_node(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut sent = Vec::new();
    // Its end, or a reset (the node did not read all this client sent), closes it.
    match tokio::time::timeout(within, tls.read_to_end(&mut sent)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("a connection is still open {within:?} after its slot came free")),
    }
}

/// A connection from `from` to the REST (`rest`) or gRPC listener at `addr` that asks for far
/// more than the sockets between them hold and reads none of it: the node's writes stall (and,
/// over HTTP/1.1, its reads). REST: pipelined HTTP/1.1 requests for the metrics until this client's
/// own writes have waited a second (the node reads no more). gRPC: one reflection call of as many
/// requests as the node's flow-control windows allow (it answers each with a file descriptor,
/// tens of megabytes in all), after reading only the node's SETTINGS and window.
async fn never_reading(
    from: &str,
    addr: std::net::SocketAddr,
    roots_pem: &[u8],
    rest: bool,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use h2_frames::*;
    use tokio::io::AsyncWriteExt;
    const STALLED: Duration = Duration::from_secs(1);
    const SENT_MAX: usize = 512 << 20;
    let mut tls = tls_connect(Some(from), addr, roots_pem, None).await;
    if rest {
        let pad = "x".repeat(4096);
        let request = format!("GET /node/metrics HTTP/1.1\r\nhost: localhost\r\nx-pad: {pad}\r\n\r\n");
        let batch = request.repeat(16);
        let mut sent = 0;
        loop {
            match tokio::time::timeout(STALLED, tls.write_all(batch.as_bytes())).await {
                Err(_) => return tls,
                Ok(written) => {
                    written.unwrap_or_else(|e| panic!("{addr}: the node closed a connection that was sending: {e}"))
                }
            }
            sent += batch.len();
            assert!(sent < SENT_MAX, "{addr}: the node read {sent} bytes from a client that reads nothing");
        }
    }
    // Room for everything the node may send, on the connection and on every stream.
    let window = 0x7fff_ffffu32;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[&0x4u16.to_be_bytes()[..], &window.to_be_bytes()].concat()));
    hello.extend(frame(WINDOW_UPDATE, 0, 0, &(window - 65_535).to_be_bytes()));
    tls.write_all(&hello).await.unwrap();
    // The node's windows for what this client sends: its SETTINGS, then its connection window.
    let (mut stream_window, mut connection_window) = (65_535usize, 65_535usize);
    let mut settings_seen = false;
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !settings_seen || connection_window == 65_535 {
            let (kind, flags, stream, payload) = next_frame(&mut tls).await.expect("the node's first frames");
            if kind == SETTINGS && flags & 0x1 == 0 {
                settings_seen = true;
                for &[id0, id1, v0, v1, v2, v3] in payload.as_chunks::<6>().0 {
                    if u16::from_be_bytes([id0, id1]) == 0x4 {
                        stream_window = u32::from_be_bytes([v0, v1, v2, v3]) as usize;
                    }
                }
            } else if kind == WINDOW_UPDATE && stream == 0 {
                connection_window += u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize & 0x7fff_ffff;
            }
        }
    });
    read.await.expect("the node's SETTINGS and connection window");
    let path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    let headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let mut out = frame(SETTINGS, 0x1, 0, &[]);
    out.extend(frame(HEADERS, END_HEADERS, 1, &header_block(&headers)));
    // ServerReflectionRequest { file_containing_symbol (field 4): the App service }, framed.
    let symbol = b"cloister.app.v1.App";
    let message = [&[0x22, symbol.len() as u8][..], symbol].concat();
    let call = [&[0u8][..], &(message.len() as u32).to_be_bytes(), &message].concat();
    let calls = (stream_window.min(connection_window) - 1024) / call.len();
    let body = call.repeat(calls);
    let chunks: Vec<_> = body.chunks(16_000).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() { END_STREAM } else { 0 };
        out.extend(frame(DATA, flags, 1, chunk));
    }
    tls.write_all(&out).await.unwrap();
    assert!(calls > 10_000, "{addr}: the node's windows allow {calls} calls, too few to fill the sockets");
    tls
}

/// HTTP/1.1 on the REST listener: a request's headers must arrive within
/// `limits.headers_timeout_ms` of the connection being ready for them (it was a fixed 30 s, named
/// nowhere). Headers in time are served; headers that never end close the connection after the
/// timeout, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_headers_must_arrive_within_headers_timeout_ms() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let limits = Limits { headers_timeout_ms: TIMEOUT.as_millis() as u64, ..Limits::default() };
    let service = TestService::start(1, 0, RECONCILE, limits).await;
    let addr = service.node().rest_addr;
    let head = b"GET /node/health HTTP/1.1\r\nhost: localhost\r\n";

    let mut tls = tls_connect(None, addr, &service.ca_pem, None).await;
    tls.write_all(head).await.unwrap();
    tokio::time::sleep(TIMEOUT / 2).await;
    tls.write_all(b"connection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT * 5, tls.read_to_end(&mut answer)).await.expect("an answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "headers in time are served: {answer}");

    let mut tls = tls_connect(None, addr, &service.ca_pem, None).await;
    let started = Instant::now();
    tls.write_all(head).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(TIMEOUT * 5, tls.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "a connection whose headers never end is still open after {:?}", TIMEOUT * 5);
    assert!(started.elapsed() >= TIMEOUT, "closed after {:?}, before headers_timeout_ms", started.elapsed());
    assert!(!String::from_utf8_lossy(&answer).contains(" 200 "), "and not served");
}

/// The attack: whoever holds one node's certificate (its operator, from the node's data folder)
/// opens connections to a node's peer listener from a few addresses and keeps them. That
/// listener closes no idle connection (nodes' own may be quiet), and each address may hold
/// `connections_per_address_max`, so a few addresses took every slot of `connections_max`, and
/// no other node could connect: a follower that lost its connection, or a node joining, waited
/// for good. Now one certificate holds at most `limits.connections_per_node_max` connections;
/// more are closed once the handshake shows it, and another node's certificate connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_certificate_cannot_take_the_peer_listeners_slots() {
    use tokio::io::AsyncReadExt;
    const PER_NODE: usize = cloister_node::config::CONNECTIONS_PER_NODE_MIN;
    let limits = Limits {
        connections_max: 2 * PER_NODE,
        connections_per_address_max: PER_NODE,
        connections_per_node_max: PER_NODE,
        ..Limits::default()
    };
    let service = TestService::start(1, 0, RECONCILE, limits).await;
    let (node, tls) = (service.node(), &service.config.tls);
    let operator_ca = std::fs::read(&tls.service_cert).unwrap();
    let stolen = cloister_crypto::identity::read_pair(&tls.node_cert, &tls.node_key).unwrap();
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..PER_NODE {
            let opened = tls_connect(Some(from), node.peer_addr, &operator_ca, Some(&stolen));
            held.push(tokio::time::timeout(Duration::from_secs(5), opened).await.expect("a slot"));
        }
    }
    // The node closes the connections past the certificate's count, and keeps the others.
    let mut kept = Vec::new();
    for mut tls in held {
        let mut sent = Vec::new();
        match tokio::time::timeout(Duration::from_secs(1), tls.read_to_end(&mut sent)).await {
            Ok(_) => {}
            Err(_) => kept.push(tls),
        }
    }
    assert_eq!(kept.len(), PER_NODE, "one certificate keeps connections_per_node_max connections");
    // Another node's certificate, issued by the operator's CA, is served meanwhile.
    let ca = cloister_crypto::identity::ServiceCa::load(
        cloister_crypto::identity::KeyedCert::read(service.dir.path(), "service").unwrap(),
    )
    .unwrap();
    let other = ca.issue_node_cert("node9", &["127.0.0.1".to_owned()]).unwrap();
    let advertised =
        tokio::time::timeout(Duration::from_secs(5), advertised_streams(node.peer_addr, &operator_ca, Some(&other)))
            .await
            .expect("another node connects while one certificate holds its connections");
    assert!(advertised > 0);
    drop(kept);
}

/// A TLS connection to `addr` (from the local address `from`, if given), presenting `identity`.
async fn tls_connect(
    from: Option<&str>,
    addr: std::net::SocketAddr,
    roots_pem: &[u8],
    identity: Option<&cloister_crypto::identity::KeyedCert>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(from) = from {
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let config = cloister_crypto::tls::client_config(roots_pem, identity, true).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("TLS handshake")
}

/// How many streams the HTTP/2 server at `addr` (over TLS) lets one connection open at once, as
/// its SETTINGS say.
async fn advertised_streams(
    addr: std::net::SocketAddr,
    roots_pem: &[u8],
    identity: Option<&cloister_crypto::identity::KeyedCert>,
) -> usize {
    let tls = tls_connect(None, addr, roots_pem, identity).await;
    // The sender is held: with none left, the connection closes.
    let (_send, mut conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    // The server's SETTINGS come before its answer to a ping.
    let mut ping = conn.ping_pong().expect("the ping handle");
    tokio::select! {
        ended = &mut conn => panic!("the connection ended: {ended:?}"),
        pong = ping.ping(h2::Ping::opaque()) => drop(pong.expect("pong")),
    }
    conn.max_concurrent_send_streams()
}

/// HTTP/2 written by hand, for clients that misbehave in ways the h2 crate would not.
mod h2_frames {
    use tokio::io::AsyncReadExt;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const SETTINGS: u8 = 0x4;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// The next frame: its kind, flags, stream and payload.
    pub async fn next_frame(tls: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        tls.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        tls.read_exact(&mut payload).await?;
        Ok((head[3], head[4], u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff, payload))
    }

    /// A header block of HPACK literals, without indexing or Huffman coding.
    pub fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
        // An HPACK string length: a 7-bit prefix, continued in 7-bit groups.
        fn length(out: &mut Vec<u8>, mut n: usize) {
            if n < 0x7f {
                return out.push(n as u8);
            }
            out.push(0x7f);
            n -= 0x7f;
            while n >= 0x80 {
                out.push((n as u8 & 0x7f) | 0x80);
                n >>= 7;
            }
            out.push(n as u8);
        }
        let mut block = Vec::new();
        for (name, value) in headers {
            block.push(0x00);
            length(&mut block, name.len());
            block.extend(name.as_bytes());
            length(&mut block, value.len());
            block.extend(value.as_bytes());
        }
        block
    }
}

/// The attack: one client opens HTTP/2 streams without end on one connection. The gRPC and peer
/// listeners (tonic servers) advertised no limit and took them all, each a task and a request
/// held open, whatever `connections_max` and `connections_per_address_max` allowed. Every
/// listener now advertises `limits.streams_per_connection_max` (here at its least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_advertises_streams_per_connection_max() {
    const STREAMS: u32 = cloister_node::config::STREAMS_PER_CONNECTION_MIN;
    let limits = Limits { streams_per_connection_max: STREAMS, ..Limits::default() };
    let service = TestService::start(1, 1, RECONCILE, limits).await;
    let (node, tls) = (service.node(), &service.config.tls);
    let operator_ca = std::fs::read(&tls.service_cert).unwrap();
    let node_cert = cloister_crypto::identity::read_pair(&tls.node_cert, &tls.node_key).unwrap();
    let rest = advertised_streams(node.rest_addr, &service.ca_pem, None).await;
    let grpc = advertised_streams(node.grpc_addr, &service.ca_pem, None).await;
    // The peer listener admits node certificates only: an operator holding one is the attacker.
    let peer = advertised_streams(node.peer_addr, &operator_ca, Some(&node_cert)).await;
    // A conforming client holds its calls at this.
    assert_eq!([rest, grpc, peer], [STREAMS as usize; 3], "advertised by the REST, gRPC and peer listeners");

    // A client that ignores it: every stream past the limit is refused, and the ones within it
    // stay open (each a request whose body never comes).
    let beyond = 4;
    let rest = streams_refused(node.rest_addr, &service.ca_pem, None, "/gov/proposals", STREAMS + beyond).await;
    let grpc =
        streams_refused(node.grpc_addr, &service.ca_pem, None, "/cloister.app.v1.App/Call", STREAMS + beyond).await;
    let past_the_limit: Vec<u32> = (STREAMS..STREAMS + beyond).map(|k| 2 * k + 1).collect();
    assert_eq!(rest, past_the_limit, "the REST listener refuses exactly the streams past the limit");
    assert_eq!(grpc, past_the_limit, "the gRPC listener refuses exactly the streams past the limit");
    let client = service.client(None).await;
    assert_eq!(client.get("/node/health").await.unwrap().status, 200, "and serves other connections");
}

/// Opens `streams` request streams at once on one HTTP/2 connection to `addr`, whatever the
/// server's SETTINGS allow, each a POST to `path` whose body never comes, and returns the
/// streams the server refused (RST_STREAM with REFUSED_STREAM) within 3 s. Written frame by
/// frame: a conforming client (h2's) holds streams back at the limit.
async fn streams_refused(
    addr: std::net::SocketAddr,
    roots_pem: &[u8],
    identity: Option<&cloister_crypto::identity::KeyedCert>,
    path: &str,
    streams: u32,
) -> Vec<u32> {
    use h2_frames::*;
    use tokio::io::AsyncWriteExt;
    const RST_STREAM: u8 = 0x3;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    const REFUSED_STREAM: u32 = 0x7;
    let mut tls = tls_connect(None, addr, roots_pem, identity).await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&hello).await.unwrap();
    // The server's limit holds once this client has acknowledged its SETTINGS.
    loop {
        let (kind, flags, _, _) = next_frame(&mut tls).await.expect("the server's SETTINGS");
        if kind == SETTINGS && flags & ACK == 0 {
            break;
        }
    }
    let mut out = frame(SETTINGS, ACK, 0, &[]);
    let content_type = if path.starts_with("/gov") { "application/cose" } else { "application/grpc" };
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
        ("content-type", content_type),
        ("te", "trailers"),
    ]);
    for k in 0..streams {
        out.extend(frame(HEADERS, END_HEADERS, 2 * k + 1, &block));
    }
    tls.write_all(&out).await.unwrap();
    let mut refused = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            got = next_frame(&mut tls) => match got {
                Ok((RST_STREAM, _, stream, payload)) => {
                    let reason = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    assert_eq!(reason, REFUSED_STREAM, "stream {stream} was reset, not refused");
                    refused.push(stream);
                }
                Ok((GOAWAY, ..)) => panic!("the server closed the connection instead of refusing streams"),
                Ok(_) => {}
                Err(e) => panic!("the connection failed: {e}"),
            },
        }
    }
    refused
}

/// The attack: a client fills every stream a connection may have with a POST whose body never
/// comes. Nothing bounded how long a request's body could take, so each stream held a handler
/// (REST) or a call being decoded (gRPC), and its slot of `streams_per_connection_max`, for as
/// long as the connection lived. Now each is answered once `limits.body_timeout_ms` has passed
/// since its headers (REST 408, gRPC DEADLINE_EXCEEDED), and its slot is free again; a body that
/// comes in pieces but in time is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_comes_is_answered_once_body_timeout_ms_passes() {
    const STREAMS: u32 = cloister_node::config::STREAMS_PER_CONNECTION_MIN;
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let limits = Limits {
        streams_per_connection_max: STREAMS,
        body_timeout_ms: TIMEOUT.as_millis() as u64,
        ..Limits::default()
    };
    let service = TestService::start(1, 0, RECONCILE, limits).await;
    let node = service.node();
    // A whole request for each listener, answered without a client certificate.
    let call = prost::Message::encode_to_vec(&CallRequest {
        method: "GET".into(),
        path: "/report".into(),
        ..CallRequest::default()
    });
    let grpc_frame = [&[0u8][..], &(call.len() as u32).to_be_bytes(), &call].concat();
    let listeners = [
        (node.rest_addr, "/gov/proposals", "application/cose", b"not COSE".to_vec()),
        (node.grpc_addr, "/cloister.app.v1.App/Call", "application/grpc", grpc_frame),
    ];
    for (addr, path, content_type, whole) in listeners {
        let mut send = h2_sender(addr, &service.ca_pem).await;
        let request = || {
            hyper::Request::post(format!("https://localhost{path}"))
                .header("content-type", content_type)
                .header("te", "trailers")
                .body(())
                .unwrap()
        };
        let started = Instant::now();
        // The bodies are held, not ended, until the end of the test.
        let mut bodies = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..STREAMS {
            send = send.ready().await.unwrap();
            let (answer, body) = send.send_request(request(), false).unwrap();
            answers.push(answer);
            bodies.push(body);
        }
        for answer in answers {
            let answer = tokio::time::timeout(TIMEOUT * 5, answer)
                .await
                .unwrap_or_else(|_| {
                    panic!("{path}: a stream whose body never came is still open after {:?}", TIMEOUT * 5)
                })
                .expect("an answer");
            assert!(
                started.elapsed() >= TIMEOUT,
                "{path}: answered after {:?}, before body_timeout_ms",
                started.elapsed()
            );
            let (status, text) = h2_answer(answer).await;
            assert!(
                (status == "408" || status == "grpc 4") && text.contains("body_timeout_ms"),
                "{path}: answered {status}: {text}"
            );
        }
        // Every slot is free again: one more stream opens on this connection, and its body comes
        // in two pieces half of body_timeout_ms apart, in time.
        let mut send = tokio::time::timeout(TIMEOUT, send.ready())
            .await
            .unwrap_or_else(|_| panic!("{path}: the streams' slots were not freed"))
            .unwrap();
        let (answer, mut body) = send.send_request(request(), false).unwrap();
        let (first, second) = whole.split_at(whole.len() / 2);
        body.send_data(bytes::Bytes::copy_from_slice(first), false).unwrap();
        tokio::time::sleep(TIMEOUT / 2).await;
        body.send_data(bytes::Bytes::copy_from_slice(second), true).unwrap();
        let (status, text) = h2_answer(answer.await.expect("an answer")).await;
        let expected = if path.starts_with("/gov") { "400" } else { "grpc 16" };
        assert_eq!(status, expected, "{path}: a body in time is read whole and handled: {text}");
        drop(bodies);
    }
}

/// `body_bytes_max` bounds one body, but a client that sent most of one and stalled held it for
/// `body_timeout_ms`, on every stream of every connection it could open: with no certificate, one
/// address could make the node hold gigabytes. The client listeners now share one budget of body
/// bytes being received (`body_bytes_inflight_max`): a body whose next piece does not fit is
/// refused at once, and the budget is back as the stalled bodies go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_being_received_share_one_budget() {
    const MAX: usize = 32 << 10;
    const BUDGET: usize = 2 * MAX;
    let limits = Limits {
        body_bytes_max: MAX,
        body_bytes_inflight_max: BUDGET,
        body_bytes_per_address_max: BUDGET,
        ..Limits::default()
    };
    let service = TestService::start(1, 0, RECONCILE, limits).await;
    let node = service.node();
    let post = |path: &str, content_type: &str| {
        hyper::Request::post(format!("https://localhost{path}"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    // Seven eighths of the budget, in two bodies sent and held.
    let mut stalled = h2_sender(node.rest_addr, &service.ca_pem).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        stalled = stalled.ready().await.unwrap();
        let (answer, mut body) = stalled.send_request(post("/gov/proposals", "application/cose"), false).unwrap();
        body.send_data(bytes::Bytes::from(vec![0u8; BUDGET * 7 / 16]), false).unwrap();
        held.push((answer, body));
    }
    // A quarter-budget body on each listener, sent whole: refused once the held ones are charged.
    let grpc_call = {
        let call = prost::Message::encode_to_vec(&CallRequest {
            method: "POST".into(),
            path: "/ingest".into(),
            body: vec![b' '; BUDGET / 4],
            ..CallRequest::default()
        });
        [&[0u8][..], &(call.len() as u32).to_be_bytes(), &call].concat()
    };
    let whole = |addr, path: &'static str, content_type: &'static str, body: Vec<u8>| {
        let roots = service.ca_pem.clone();
        async move {
            let mut send = h2_sender(addr, &roots).await.ready().await.unwrap();
            let (answer, mut stream) = send.send_request(post(path, content_type), false).unwrap();
            stream.send_data(bytes::Bytes::from(body), true).unwrap();
            h2_answer(answer.await.expect("an answer")).await
        }
    };
    let rest = || whole(node.rest_addr, "/gov/proposals", "application/cose", vec![0u8; BUDGET / 4]);
    let grpc = || whole(node.grpc_addr, "/cloister.app.v1.App/Call", "application/grpc", grpc_call.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, text) = loop {
        let (status, text) = rest().await;
        if status != "400" || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, "503", "{text}");
    assert!(text.contains("body_bytes_inflight_max"), "{text}");
    let (status, text) = grpc().await;
    assert!(status == "grpc 14" && text.contains("body_bytes_inflight_max"), "{status}: {text}");
    // The stalled bodies go (their streams reset): the budget is back.
    drop(held);
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, text) = loop {
        let (status, text) = rest().await;
        if status != "503" || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, "400", "read whole, and refused for not being COSE: {text}");
}

/// A stop lets requests in flight finish, but not for good: a client that sent part of a body
/// and stalled (within `body_timeout_ms`) held its connection past the stop, and the connection
/// held the node's service and state database. Connections still open
/// `SERVERS_DRAIN_TIMEOUT` after a stop began are closed, and the database is free once
/// `shutdown` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_the_connection_of_a_client_that_stalled_mid_request() {
    let limits = Limits { body_timeout_ms: 300_000, ..Limits::default() };
    let mut service = TestService::start(1, 0, RECONCILE, limits).await;
    let node = service.node();
    let mut stalled = h2_sender(node.rest_addr, &service.ca_pem).await.ready().await.unwrap();
    let post = hyper::Request::post("https://localhost/gov/proposals")
        .header("content-type", "application/cose")
        .body(())
        .unwrap();
    let (answer, mut body) = stalled.send_request(post, false).unwrap();
    body.send_data(bytes::Bytes::from(vec![0u8; 100]), false).unwrap();
    // The node has the head and part of the body before it is asked to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = cloister_node::state_file(&service.config.node.data_dir);
    let began = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), service.stop()).await.expect("the node stops");
    let took = began.elapsed();
    if let Err(e) = cloister_store::meta_of(&state, "raft_applied") {
        panic!("the node's state database is held after it stopped ({took:?}): {e}");
    }
    let drain = cloister_node::node::SERVERS_DRAIN_TIMEOUT;
    assert!(took >= drain && took < drain + Duration::from_secs(5), "the stop took {took:?}");
    // The stalled request was cut off, not answered.
    assert!(answer.await.is_err(), "the stalled request got an answer");
}

/// An HTTP/2 connection over TLS to `addr`, without a client certificate, driven in the
/// background.
async fn h2_sender(addr: std::net::SocketAddr, roots_pem: &[u8]) -> h2::client::SendRequest<bytes::Bytes> {
    let tls = tls_connect(None, addr, roots_pem, None).await;
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// An answer's status ("408", or "grpc 4" for a gRPC status wherever it comes) and its text:
/// the body, or the gRPC message.
async fn h2_answer(answer: hyper::Response<h2::RecvStream>) -> (String, String) {
    let (head, mut body) = answer.into_parts();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the answer's body");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("the answer's trailers").unwrap_or_default();
    let grpc =
        |name: &str| head.headers.get(name).or_else(|| trailers.get(name)).map(|v| v.to_str().unwrap().to_owned());
    match grpc("grpc-status") {
        Some(code) => (format!("grpc {code}"), grpc("grpc-message").unwrap_or_default()),
        None => (head.status.as_str().to_owned(), String::from_utf8_lossy(&text).into_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_endpoints_and_reflection() {
    let service = TestService::start(1, 0, RECONCILE, Limits::default()).await;
    let c = service.client(None).await;
    let version = c.get("/node/version").await.unwrap().json().unwrap();
    assert_eq!(version["abi"], 1);
    let network = c.get("/node/network").await.unwrap().json().unwrap();
    assert_eq!(network["nodes"][0]["name"], "node0");
    assert_eq!(network["nodes"][0]["role"], "leader");
    assert_eq!(network["leader"], network["nodes"][0]["id"]);
    let api = c.get("/app/api").await.unwrap().json().unwrap();
    assert_eq!(api["openapi"], "3.1.0");
    for path in ["/node/health", "/app/ingest", "/app/csv/ingest", "/app/report", "/app/report/{key}"] {
        assert!(api["paths"].get(path).is_some(), "{path} missing from the OpenAPI document");
    }
    assert!(api["paths"]["/app/ingest"].get("post").is_some());

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response::MessageResponse};
    let channel = grpc_channel(&service.grpc_url(), &service.ca_pem, None).await.unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"cloister.app.v1.App") && names.contains(&"cloister.reconcile.v1.Reconcile"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let mut service = TestService::start(2, 0, RECONCILE, Limits::default()).await;
    let data = cloister_tests::conformance::file("member1_data.json");
    let first = service.member(0).await.post("/app/ingest", "application/json", data.clone()).await.unwrap();
    assert_eq!(first.status, 200);
    let first_tx = first.tx_id().expect("a tx id");
    let csv = cloister_tests::conformance::file("member0_data.csv");
    assert_eq!(service.member(1).await.post("/app/csv/ingest", "text/csv", csv).await.unwrap().status, 200);
    let before = (report(&service.member(0).await).await, report(&service.member(1).await).await);
    service.restart().await;
    let after = (report(&service.member(0).await).await, report(&service.member(1).await).await);
    assert_eq!(before, after);
    // Writes continue after the restart, with later transaction ids.
    let client = service.member(0).await;
    let again = client.post("/app/ingest", "application/json", data).await.unwrap();
    let id: cloister_ledger::txid::TxId = again.tx_id().expect("a tx id").parse().unwrap();
    let first: cloister_ledger::txid::TxId = first_tx.parse().unwrap();
    assert!(id.seqno > first.seqno, "{id} follows {first}");
    let status = client.get(&format!("/node/tx?id={id}")).await.unwrap().json().unwrap();
    assert_eq!(status["status"], "Committed");
}

/// Writes member `who` commits one after another for `window`: the rate of acknowledged writes.
async fn write_rate(who: &Client, window: Duration, tag: &str) -> f64 {
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < window {
        let body = serde_json::to_vec(&serde_json::json!({ "lei": format!("{tag}-{n:06}"), "nace": "X" })).unwrap();
        let reply = who.post("/app/ingest", "application/json", body).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        n += 1;
    }
    f64::from(n) / started.elapsed().as_secs_f64()
}

/// Forged signed requests — a real member's `kid`, the current time, a signature that does not
/// verify — need no client certificate. They used to be parsed and verified on the one writer
/// thread, in the queue with every app write; now they are checked on the blocking pool, bounded
/// per source address and overall (429 with Retry-After), and never reach the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_governance_requests_does_not_starve_app_writes() {
    let service = TestService::start(2, 0, RECONCILE, Limits::default()).await;
    let writer = service.member(1).await;
    let window = Duration::from_secs(3);
    let proposals = async || service.member(0).await.get("/gov/proposals").await.unwrap().json().unwrap();
    let filed_before = proposals().await;
    let unloaded = write_rate(&writer, window, "calm").await;

    // A genuine ballot of member0's with one bit of its signature's r flipped: canonical, low-S,
    // and refused only by the signature check.
    let proposal = serde_json::json!({ "actions": [{ "name": "set_recovery_threshold", "args": { "threshold": 1 } }] });
    let write = cloister_crypto::cose::GovWrite::Propose;
    let mut forged = cloister_client::sign_gov(
        &service.members[0].keyed,
        &write,
        &proposal,
        cloister_client::unix_now(),
        &service.service_id(),
    )
    .unwrap();
    let r_last = forged.len() - 96 + 47;
    forged[r_last] ^= 1;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..16)
        .map(|_| {
            let (service_url, ca, forged, stop) =
                (service.rest_url(), service.ca_pem.clone(), forged.clone(), stop.clone());
            tokio::spawn(async move {
                let anyone = Client::connect(&service_url, &ca, None).await.unwrap();
                let (mut refused, mut busy) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let reply = anyone
                        .post("/gov/proposals", cloister_client::COSE_CONTENT_TYPE, forged.clone())
                        .await
                        .unwrap();
                    match reply.status {
                        401 => refused += 1,
                        429 => {
                            assert_eq!(reply.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
                            busy += 1;
                        }
                        other => panic!("a forged request answered {other}: {}", reply.text()),
                    }
                }
                (refused, busy)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = write_rate(&writer, window, "flood").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut refused, mut busy) = (0, 0);
    for f in flooders {
        let (r, b) = f.await.unwrap();
        refused += r;
        busy += b;
    }
    println!(
        "app writes: {unloaded:.0}/s unloaded, {loaded:.0}/s under a flood of {} forged governance requests \
         ({refused} refused 401 after the signature check, {busy} refused 429 before it): {:.2}x",
        refused + busy,
        loaded / unloaded
    );
    assert!(refused > 0 && busy > 0, "the flood was checked ({refused}) and bounded ({busy})");
    // The flood's clients share this machine's two cores with the node, so some slowdown is the
    // machine's; starvation (the writer busy with forged requests) would take writes near zero.
    assert!(loaded >= 0.1 * unloaded, "app writes starved: {loaded:.0}/s against {unloaded:.0}/s");
    assert_eq!(proposals().await, filed_before, "nothing forged was filed");
}

/// The attack: a node the operator's CA certified but the service never trusted, serving HTTPS,
/// passed a client's TLS pinning, because clients pinned the CA. Clients now pin the service
/// identity, which certifies only Trusted nodes: the stranger's handshake fails, the service's
/// node passes, and the CA alone no longer opens a connection to the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_pin_the_service_identity_not_the_operators_ca() {
    let service = TestService::start(1, 0, RECONCILE, Limits::default()).await;
    let dir = service.dir.path();
    let keyed = cloister_crypto::identity::KeyedCert::read(dir, "service").unwrap();
    let ca_pem = keyed.cert_pem.clone();
    let ca = cloister_crypto::identity::ServiceCa::load(keyed).unwrap();
    let stranger = ca.issue_node_cert("never trusted", &["127.0.0.1".into()]).unwrap();
    let config = cloister_crypto::tls::server_config(&stranger, &ca_pem).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    // Answers any request, as an impostor would.
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{\"state\":\"Open\"}"),
                        )))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                }
            });
        }
    });
    let stranger_url = format!("https://{addr}");
    let identity_pem = &service.ca_pem;
    assert!(String::from_utf8_lossy(identity_pem).contains("BEGIN CERTIFICATE"));

    // Pinning the operator's CA, a client talks to the impostor: the hole this closes.
    let fooled = Client::connect(&stranger_url, ca_pem.as_bytes(), None).await.unwrap();
    assert_eq!(fooled.get("/gov/service").await.expect("the CA vouches for the stranger").status, 200);
    // Pinning the service identity, it does not, and it does talk to the service's own node.
    let refused = Client::connect(&stranger_url, identity_pem, None).await.err().expect("the stranger is refused");
    assert!(format!("{refused:#}").to_lowercase().contains("certificate"), "{refused:#}");
    let node = Client::connect(&service.rest_url(), identity_pem, None).await.unwrap();
    assert_eq!(node.get("/gov/service").await.unwrap().status, 200);
    // And the CA no longer opens a connection to the service.
    let ca_only = Client::connect(&service.rest_url(), ca_pem.as_bytes(), None).await;
    assert!(ca_only.is_err(), "the node serves the service identity's certificate, not the CA's");
    // The same holds over gRPC.
    assert!(grpc_channel(&service.grpc_url(), identity_pem, None).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_requests() {
    let service = TestService::start(1, 1, &misbehave_wasm(), Limits::default()).await;
    let user = service.client(Some(&service.users[0].keyed)).await;
    let anonymous = service.client(None).await;
    let (_, before) = scrape(&anonymous).await;
    let put = [("frontend", "rest"), ("endpoint", "POST /app/{*path}"), ("status", "204")];
    let app_put = [("endpoint", "POST /put/{key}"), ("status", "204")];
    let panics = [("contract", "app"), ("outcome", "GuestPanic")];
    let grpc_ok = [("frontend", "grpc"), ("endpoint", "/cloister.app.v1.App/Call"), ("status", "0")];
    assert!(value(&before, "cloister_raft_term", &[]) >= 1.0);
    assert_eq!(value(&before, "cloister_raft_leader", &[]), 1.0);
    assert!(value(&before, "cloister_ledger_files_bytes", &[]) > 0.0, "genesis is in the ledger files");
    assert!(value(&before, "cloister_wasm_executions", &[("contract", "constitution"), ("outcome", "ok")]) >= 1.0);
    assert_eq!(value(&before, "cloister_writer_queue_depth", &[]), 0.0);

    for key in ["a", "b", "c"] {
        assert_eq!(user.post(&format!("/app/put/{key}"), "text/plain", "v").await.unwrap().status, 204);
    }
    assert_eq!(user.post("/app/panic?what=now", "text/plain", "").await.unwrap().status, 500);
    assert_eq!(anonymous.get("/no/such/endpoint-xyzzy").await.unwrap().status, 404);
    let made_up = anonymous.request("PLUGH", "/app/put/a", None, "").await.unwrap();
    assert!(made_up.status >= 400, "{}", made_up.text());
    let mut grpc = AppClient::new(
        grpc_channel(&service.grpc_url(), &service.ca_pem, Some(&service.users[0].keyed)).await.unwrap(),
    );
    let call = CallRequest { method: "GET".into(), path: "/users-only".into(), ..Default::default() };
    assert_eq!(grpc.call(call).await.unwrap().into_inner().status, 204);

    let (text, after) = scrape(&anonymous).await;
    let moved = |family: &str, labels: &[(&str, &str)]| value(&after, family, labels) - value(&before, family, labels);
    assert_eq!(moved("cloister_requests", &put), 3.0, "{text}");
    // Three puts and the panic.
    assert_eq!(moved("cloister_request_duration_seconds", &put[..2]), 4.0, "{text}");
    assert_eq!(moved("cloister_app_requests", &app_put), 3.0, "{text}");
    assert_eq!(moved("cloister_wasm_executions", &panics), 1.0, "{text}");
    assert_eq!(moved("cloister_requests", &grpc_ok), 1.0, "{text}");
    assert_eq!(moved("cloister_requests", &[("endpoint", "unmatched"), ("status", "404")]), 1.0, "{text}");
    assert!(!text.contains("xyzzy"), "a path a client makes up never becomes a label:\n{text}");
    assert!(!text.contains("PLUGH"), "nor a method:\n{text}");
    assert_eq!(moved("cloister_requests", &[("endpoint", "OTHER /app/{*path}")]), 1.0, "{text}");
    assert!(moved("cloister_raft_commit_index", &[]) >= 3.0, "{text}");
    assert!(moved("cloister_raft_apply_index", &[]) >= 3.0, "{text}");
    let batches = moved("cloister_raft_apply_batches", &[]);
    assert!(batches >= 1.0 && batches <= moved("cloister_raft_apply_index", &[]), "{text}");
    // Every durable commit is an apply batch's, a snapshot point's or a snapshot file build's.
    assert!(after.families.contains_key("cloister_state_durable_commits"), "{text}");
    assert!(after.families.contains_key("cloister_snapshot_files_built"), "{text}");
    let durable = value(&after, "cloister_state_durable_commits", &[]);
    let checkpoints = value(&after, "cloister_raft_apply_batches", &[])
        + value(&after, "cloister_snapshots_built", &[])
        + value(&after, "cloister_snapshot_files_built", &[]);
    assert!(durable <= checkpoints, "{text}");
    assert!(moved("cloister_ledger_files_bytes", &[]) > 0.0, "{text}");
}
