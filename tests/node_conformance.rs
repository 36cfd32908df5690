//! The conformance scenario against a node on 127.0.0.1 with real TLS: over HTTPS with three
//! real client certificates, then over gRPC with the typed `Reconcile` service.

use cloister_bundled::RECONCILE;
use cloister_client::grpc_channel;
use cloister_proto::app::v1::app_client::AppClient;
use cloister_proto::reconcile::v1::reconcile_client::ReconcileClient;
use cloister_tests::TestService;
use cloister_tests::conformance::{self, Rest};
use cloister_tests::grpc::Grpc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_https() {
    let mut service = TestService::start(3, 0, RECONCILE, Default::default()).await;
    let mut rest = Rest(vec![service.member(0).await, service.member(1).await, service.member(2).await]);
    conformance::run(&mut rest).await;

    // Nothing the parties submitted is readable at rest: no LEI and no attribute value, in any
    // file under the node's data folder (its state database keeps private keys as digests).
    service.stop().await;
    let submitted = submitted_values();
    assert!(submitted.len() > 20, "the scenario's files hold its records: {submitted:?}");
    let mut stack = vec![service.config.node.data_dir.clone()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            for value in &submitted {
                let found = bytes.windows(value.len()).any(|w| w == value.as_bytes());
                assert!(!found, "{value:?} is in clear in {}", path.display());
            }
        }
    }
    assert!(files >= 4, "the state database, the Raft log, the ledger and the secret were searched");
}

/// Every LEI and attribute value in the scenario's input files, of 6 characters or more (shorter
/// ones could turn up in any ciphertext by chance).
fn submitted_values() -> std::collections::BTreeSet<String> {
    let mut values = std::collections::BTreeSet::new();
    for name in ["member0_data.csv", "member0_data_pt2.json", "member1_data.json", "member2_data.json"] {
        let text = String::from_utf8(conformance::file(name)).unwrap();
        if name.ends_with(".csv") {
            values.extend(text.lines().skip(1).flat_map(|l| l.split(',').map(str::to_owned).collect::<Vec<_>>()));
        } else {
            let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            for row in rows {
                values.extend(row.as_object().unwrap().values().filter_map(|v| v.as_str().map(str::to_owned)));
            }
        }
    }
    values.retain(|v| v.len() >= 6);
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_grpc() {
    let service = TestService::start(3, 0, RECONCILE, Default::default()).await;
    let mut grpc = Grpc { reconcile: Vec::new(), app: Vec::new() };
    for m in &service.members {
        let channel = grpc_channel(&service.grpc_url(), &service.ca_pem, Some(&m.keyed)).await.expect("gRPC connects");
        grpc.reconcile.push(ReconcileClient::new(channel.clone()));
        grpc.app.push(AppClient::new(channel));
    }
    conformance::run(&mut grpc).await;
}
