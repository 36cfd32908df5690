//! The reconciliation conformance scenario (`conformance/recon-sample/README.md`), written once
//! and driven through any client: the in-process runtime, HTTPS, or gRPC.

use std::path::PathBuf;

use serde_json::Value;

/// Where the scenario's files are: `CLOISTER_CONFORMANCE_DIR`, else the steering repository's
/// `shared/conformance/recon-sample` beside this checkout, else the copy vendored here.
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLOISTER_CONFORMANCE_DIR") {
        return dir.into();
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = repo.join("../shared/conformance/recon-sample");
    if shared.join("expected.json").exists() { shared } else { repo.join("tests/conformance/recon-sample") }
}

pub fn file(name: &str) -> Vec<u8> {
    let path = data_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One call to the reconcile app, as one of the three parties.
pub struct Call<'a> {
    /// 0, 1 or 2: `member0`, `member1`, `member2`.
    pub party: usize,
    pub method: &'a str,
    /// Path under the app root, e.g. `/report/K` or `/csv/ingest`.
    pub path: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// A way of reaching the reconcile app.
pub trait ScenarioClient {
    /// Performs the call; returns the status and the body parsed as JSON.
    fn call(&mut self, call: Call<'_>) -> impl Future<Output = (u16, Value)>;
}

async fn ingest(c: &mut impl ScenarioClient, party: usize, csv: bool, body: &[u8]) -> (u16, Value) {
    let (path, content_type) = if csv { ("/csv/ingest", "text/csv") } else { ("/ingest", "application/json") };
    c.call(Call { party, method: "POST", path, content_type, body }).await
}

async fn report(c: &mut impl ScenarioClient, party: usize) -> Vec<Value> {
    let (status, body) = c.call(Call { party, method: "GET", path: "/report", content_type: "", body: b"" }).await;
    assert_eq!(status, 200, "member{party}'s report: {body}");
    let mut rows = body.as_array().unwrap_or_else(|| panic!("a report is an array: {body}")).clone();
    rows.sort_by(|a, b| a["lei"].as_str().cmp(&b["lei"].as_str()));
    rows
}

async fn assert_reports(c: &mut impl ScenarioClient, expected: &Value, phase: &str) {
    for party in 0..3 {
        let mut want = expected[phase][format!("member{party}")].as_array().expect("expected rows").clone();
        want.sort_by(|a, b| a["lei"].as_str().cmp(&b["lei"].as_str()));
        assert_eq!(report(c, party).await, want, "{phase}: member{party}'s report");
    }
}

fn assert_error(status: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "{what}: JSON error body, got {body}"
    );
}

/// Runs every step of the scenario, asserting each answer.
pub async fn run(c: &mut impl ScenarioClient) {
    let expected: Value = serde_json::from_slice(&file("expected.json")).expect("expected.json parses");

    // 1. Bad input: 400 with a JSON error body, and nothing stored.
    let (s, b) = ingest(c, 0, true, &file("member0_wrong_schema.csv")).await;
    assert_error(s, &b, 400, "wrong CSV schema");
    let (s, b) = ingest(c, 0, true, &file("member0_data_pt2.json")).await;
    assert_error(s, &b, 400, "JSON posted as CSV");
    for body in [&b"[]"[..], b"null"] {
        let (s, b) = ingest(c, 0, false, body).await;
        assert_error(s, &b, 400, "empty or null JSON");
    }
    assert!(report(c, 0).await.is_empty(), "refused batches stored nothing");

    // 2-3. Phase 1.
    for (party, csv, name) in
        [(0, true, "member0_data.csv"), (1, false, "member1_data.json"), (2, false, "member2_data.json")]
    {
        let (s, b) = ingest(c, party, csv, &file(name)).await;
        assert_eq!(s, 200, "ingesting {name}: {b}");
    }
    assert_reports(c, &expected, "phase1").await;

    // 4. A missing key and a key the caller never submitted answer identically.
    let missing = c.call(Call { party: 1, method: "GET", path: "/report/10", content_type: "", body: b"" }).await;
    let foreign = c
        .call(Call { party: 1, method: "GET", path: "/report/9845002B6B074505A715", content_type: "", body: b"" })
        .await;
    assert!(missing.0 >= 400, "a missing key fails: {missing:?}");
    assert_eq!(missing, foreign, "no existence leak");
    let own = c
        .call(Call { party: 0, method: "GET", path: "/report/9845002B6B074505A715", content_type: "", body: b"" })
        .await;
    assert_eq!(own.0, 200);
    assert_eq!(own.1["total_votes"], 2);

    // 5. Phase 2.
    let (s, b) = ingest(c, 0, false, &file("member0_data_pt2.json")).await;
    assert_eq!(s, 200, "phase 2 ingest: {b}");
    assert_reports(c, &expected, "phase2").await;
}

/// The scenario over HTTPS: one connection per party.
pub struct Rest(pub Vec<cloister_client::Client>);

impl ScenarioClient for Rest {
    async fn call(&mut self, call: Call<'_>) -> (u16, Value) {
        let ct = (!call.content_type.is_empty()).then_some(call.content_type);
        let target = format!("/app{}", call.path);
        let reply =
            self.0[call.party].request(call.method, &target, ct, call.body.to_vec()).await.expect("HTTPS request");
        (reply.status, serde_json::from_slice(&reply.body).unwrap_or(Value::Null))
    }
}
