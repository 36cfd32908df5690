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
    let service = TestService::start(3, 0, RECONCILE, Default::default()).await;
    let mut rest = Rest(vec![service.member(0).await, service.member(1).await, service.member(2).await]);
    conformance::run(&mut rest).await;
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
