//! Attested joins on a real network (mock SNP firmware, loopback gRPC over TLS): every join is
//! verified both ways and visible, a joining node refuses a leader it was not told to expect, an
//! unapproved measurement is refused until members approve it, a node joining an open service
//! waits for `transition_node_to_trusted`, and a retired node is shut out.

use std::time::Duration;

use cloister_attestation::Nonce;
use cloister_bundled::RECONCILE;
use cloister_client::Client;
use cloister_consensus::{ForwardError, Forwards, Peers};
use cloister_tests::cluster::Cluster;
use serde_json::{Value, json};

const UNAPPROVED: &str =
    "abababababababababababababababababababababababababababababababababababababababababababababababab";

async fn attestations(cluster: &Cluster, via: usize) -> Vec<Value> {
    let client = cluster.client(via, 0).await.expect("connects");
    let reply: Value = client.get("/node/attestations").await.unwrap().json().unwrap();
    reply["nodes"].as_array().cloned().unwrap_or_default()
}

async fn status_of(cluster: &Cluster, name: &str) -> Option<String> {
    attestations(cluster, 0)
        .await
        .into_iter()
        .find(|n| n["name"] == name)
        .map(|n| n["status"].as_str().unwrap().to_owned())
}

/// A node's record in `gov.endorsements`, or null.
async fn endorsement_of(cluster: &Cluster, node_id: &str) -> Value {
    let Ok(client) = cluster.client(0, 0).await else { return Value::Null };
    let Ok(reply) = client.get("/gov/endorsements").await else { return Value::Null };
    reply.json().map(|v| v["endorsements"][node_id].clone()).unwrap_or(Value::Null)
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..240 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn pass(client: &Client, cluster: &Cluster, actions: Value) -> Value {
    let member = &cluster.members[0].keyed;
    let (_, state) = client.pass(member, &[member], actions).await.expect("the proposal is accepted");
    assert_eq!(state["state"], "Accepted", "{state}");
    state
}

#[tokio::test(flavor = "multi_thread")]
async fn joins_are_attested_governed_and_revocable() {
    let mut cluster = Cluster::prepare(4, 1, RECONCILE, |_| {});
    // The fourth node runs a guest image the service has not approved: its configuration is the
    // same as the others', and the operator's flags override the measurement its mock reports.
    cluster.nodes[3].start_args = ["--attestation", "mock", "--mock-measurement", UNAPPROVED].map(String::from).into();
    for i in 0..3 {
        cluster.spawn(i);
    }
    cluster.wait_stable(3, Duration::from_secs(120)).await;
    cluster.open(0).await;

    // Every node of the 3-node network was verified against the mock root on its way in, and each
    // joining node verified the leader's evidence before presenting its own.
    for i in 1..3 {
        assert!(cluster.log(i).contains("verified the leader's evidence"), "{}", cluster.log(i));
    }
    let nodes = attestations(&cluster, 1).await;
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for n in &nodes {
        assert_eq!(n["status"], "Trusted", "{n}");
        assert_eq!(n["kind"], "mock", "{n}");
        assert_eq!(n["verified"]["root"], "mock", "{n}");
        assert_eq!(n["verified"]["binding_checked"], true, "{n}");
    }

    // The CLI verifies the same evidence offline, and names the check a stricter policy fails.
    let client = cluster.client(0, 0).await.unwrap();
    let mut policy: Value = client.get("/node/attestation/policy").await.unwrap().json().unwrap();
    // The first node's reported TCB is the lowest a joining node's may be (as in CCF); before,
    // with none recorded, any VCEK passed, however old the firmware it was issued for.
    for part in ["bootloader", "tee", "snp", "microcode"] {
        let first = &nodes.iter().find(|n| n["name"] == "node0").expect("node0")["verified"]["tcb"][part];
        assert_eq!(&policy["min_tcb"][part], first, "{policy}");
    }
    let dir = cluster.dir.path();
    std::fs::write(dir.join("evidence.json"), nodes[2].to_string()).unwrap();
    std::fs::write(dir.join("policy.json"), policy.to_string()).unwrap();
    let verify = |policy: &str| {
        std::process::Command::new(cloister_tests::cli_exe())
            .args(["attestation", "verify", "evidence.json", "--policy", policy])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let ok = verify("policy.json");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"root\": \"mock\""));
    policy["measurements"] = json!([]);
    std::fs::write(dir.join("strict.json"), policy.to_string()).unwrap();
    let refused = verify("strict.json");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("check `measurement`"));

    // With no attestation.join_measurements, a joining node accepts only a leader of its own
    // measurement, and node3's is not the leader's.
    cluster.spawn(3);
    wait_for("node3 to refuse a leader of another measurement", async || !cluster.nodes[3].is_running()).await;
    let log = cluster.log(3);
    let refusal = format!(
        "this node refused the leader's evidence: attestation refused at check `measurement`: measurement {} is not \
         this node's own ({UNAPPROVED})",
        hex::encode(cloister_attestation::mock::default_measurement())
    );
    assert!(log.contains(&refusal), "{log}");
    assert_eq!(status_of(&cluster, "node3").await, None);

    // A joining node that expects another leader measurement refuses the leader's evidence.
    let set_join_measurements = |cluster: &mut Cluster, pinned: &str| {
        let node = &mut cluster.nodes[3];
        node.config.attestation.join_measurements = vec![pinned.to_owned()];
        std::fs::write(&node.config_path, node.config.to_toml()).unwrap();
    };
    set_join_measurements(&mut cluster, UNAPPROVED);
    cluster.spawn(3);
    wait_for("node3 to refuse the leader", async || !cluster.nodes[3].is_running()).await;
    let log = cluster.log(3);
    let refusal = format!(
        "this node refused the leader's evidence: attestation refused at check `measurement`: measurement {} is not \
         in attestation.join_measurements",
        hex::encode(cloister_attestation::mock::default_measurement())
    );
    assert!(log.contains(&refusal), "{log}");
    assert_eq!(status_of(&cluster, "node3").await, None);

    // Pinned to the leader's real measurement, it goes on to attest, and the leader refuses it at
    // the measurement check; nothing is recorded.
    set_join_measurements(&mut cluster, &hex::encode(cloister_attestation::mock::default_measurement()));
    let seen = cluster.log(3).len();
    cluster.spawn(3);
    wait_for("the unapproved node to give up", async || !cluster.nodes[3].is_running()).await;
    let log = cluster.log(3)[seen..].to_owned();
    assert!(log.contains("verified the leader's evidence"), "{log}");
    assert!(log.contains("refused at check `measurement`") && log.contains(UNAPPROVED), "{log}");
    assert_eq!(status_of(&cluster, "node3").await, None);

    // Members approve the measurement; the same node now attests, but the service is open, so it
    // waits as Pending until members trust it.
    pass(&client, &cluster, json!([{ "name": "add_snp_measurement", "args": { "measurement": UNAPPROVED } }])).await;
    cluster.spawn(3);
    wait_for("node3 to be Pending", async || status_of(&cluster, "node3").await.as_deref() == Some("Pending")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cluster.network(0).await.unwrap()["nodes"].as_array().unwrap().len(),
        3,
        "a Pending node is not in Raft"
    );
    // While Pending, its certificate passes the peer handshake (it must reach `Attest`), but Raft,
    // forwarding and join requests are refused.
    let dir = cluster.nodes[3].config_path.parent().unwrap().to_path_buf();
    let node3 = cloister_crypto::identity::KeyedCert::read(&dir, "node3").unwrap();
    let service_ca = std::fs::read_to_string(dir.join("service.cert.pem")).unwrap();
    let peers = Peers::new(&service_ca, &node3);
    let peer_url = format!("https://{}", cluster.nodes[0].config.node.peer_addr);
    let forward = cloister_proto::peer::v1::ForwardRequest { path: "/app/report".into(), ..Default::default() };
    let node0 = cloister_crypto::identity::KeyedCert::read(&dir, "node0").unwrap();
    let node0 = cloister_crypto::node_id_of(&cloister_crypto::identity::cert_der(node0.cert_pem.as_bytes()).unwrap());
    let refused = Forwards::new(peers.clone()).call(node0, &peer_url, forward).await.unwrap_err();
    assert!(matches!(refused, ForwardError::NotRun(_)), "a refused stream ran nothing: {refused:?}");
    assert_eq!(refused.status().code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.status().message().contains("Pending"), "{}", refused.status().message());

    let id = attestations(&cluster, 0).await.into_iter().find(|n| n["name"] == "node3").unwrap()["node_id"].clone();
    pass(&client, &cluster, json!([{ "name": "transition_node_to_trusted", "args": { "node_id": id } }])).await;
    cluster.wait_stable(4, Duration::from_secs(120)).await;
    // Trusted, it is endorsed by the service (the leader writes gov.endorsements), open-ended.
    let node_id = id.as_str().unwrap().to_owned();
    wait_for("node3's endorsement", async || endorsement_of(&cluster, &node_id).await.is_object()).await;
    assert!(endorsement_of(&cluster, &node_id).await.get("until").is_none());

    // Retiring it removes it from the network, and its connections are refused from then on.
    pass(&client, &cluster, json!([{ "name": "remove_node", "args": { "node_id": id } }])).await;
    wait_for("node3 to leave Raft", async || {
        cluster.network(0).await.is_some_and(|n| n["nodes"].as_array().unwrap().len() == 3)
    })
    .await;
    // Retired, its endorsement ends: no signature of its over a longer ledger is the service's.
    wait_for("node3's endorsement to end", async || endorsement_of(&cluster, &node_id).await["until"].is_u64()).await;
    // Its clients' pinning goes with it: it serves the operator's certificate again, which a
    // client pinning the service identity refuses.
    let identity =
        std::fs::read(cluster.nodes[0].config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE))
            .unwrap();
    let node3_url = cluster.nodes[3].rest_url.clone();
    wait_for("node3 to stop serving the service identity's certificate", async || {
        Client::connect(&node3_url, &identity, None).await.is_err()
    })
    .await;
    let challenge = || cloister_proto::peer::v1::ChallengeRequest { nonce: Nonce::random().0.to_vec() };
    // The connection it opened while Pending is still up, and refuses every request...
    let refused = peers.client(&peer_url, Some(node0)).unwrap().challenge(challenge()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("retired"), "{}", refused.message());
    // ...and a new connection fails in the handshake.
    let fresh = Peers::new(&service_ca, &node3);
    let refused = fresh.client(&peer_url, None).unwrap().challenge(challenge()).await.unwrap_err();
    // TLS 1.3 checks the client's certificate after the client's Finished, so the refusal reaches
    // the first request as a transport error: the `certificate_revoked` alert, or the closed
    // connection when that wins the race. The node's log says which certificate it refused.
    assert!(
        matches!(refused.code(), tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled),
        "{refused:?}"
    );
    let log = cluster.log(0);
    assert!(
        log.contains("refused a peer's TLS handshake")
            && log.contains(&format!("node {} is retired", id.as_str().unwrap())),
        "{log}"
    );
}

/// The capture attack, over the wire: a node that holds the ledger secret but no state yet took
/// AppendEntries and InstallSnapshot from any certificate of the service CA (a Pending, refused or
/// Retired node's, or one the operator issued to nobody), so a forged snapshot could make it the
/// leader of an attacker's fork. Now it takes Raft messages from the leader it attested alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_joining_node_takes_raft_messages_only_from_the_leader_it_attested() {
    let mut cluster = Cluster::prepare(2, 1, RECONCILE, |_| {});
    cluster.spawn(0);
    cluster.wait_stable(1, Duration::from_secs(120)).await;
    cluster.spawn(1);
    cluster.wait_stable(2, Duration::from_secs(120)).await;
    // Keep what its join left (the secret and the attested leader), not the state it was sent:
    // with the leader down, node1 restarts as a node still joining, with no gov.nodes.
    cluster.stop(1);
    cluster.stop(0);
    let data = cluster.nodes[1].config.node.data_dir.clone();
    assert!(data.join("join-leader.sealed").exists(), "the join pinned its leader");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !["ledger.secret", "join-leader.sealed"].contains(&name.as_str()) {
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }.unwrap();
        }
    }
    cluster.spawn(1);
    wait_for("node1 to listen again", async || cluster.log(1).matches("node started").count() >= 2).await;

    let dir = cluster.dir.path().to_owned();
    let ca = cloister_crypto::identity::ServiceCa::load(
        cloister_crypto::identity::KeyedCert::read(&dir, "service").unwrap(),
    )
    .unwrap();
    let service_ca = ca.keyed.cert_pem.clone();
    let stranger = ca.issue_node_cert("never trusted", &["127.0.0.1".into()]).unwrap();
    let leader = cloister_crypto::identity::KeyedCert::read(&dir, "node0").unwrap();
    let peer_url = format!("https://{}", cluster.nodes[1].config.node.peer_addr);
    let blob = || cloister_proto::peer::v1::Blob { data: b"not a message".to_vec() };
    let snapshot = || {
        let head = cloister_proto::peer::v1::SnapshotChunk {
            chunk: Some(cloister_proto::peer::v1::snapshot_chunk::Chunk::Data(b"forged state".to_vec())),
        };
        tokio_stream::iter(vec![head])
    };

    let from_stranger = Peers::new(&service_ca, &stranger);
    let mut client = from_stranger.client(&peer_url, None).unwrap();
    for refused in [
        client.append_entries(blob()).await.unwrap_err(),
        client.install_snapshot(snapshot()).await.unwrap_err(),
        client.vote(blob()).await.unwrap_err(),
    ] {
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("only from the leader it attested"), "{}", refused.message());
    }
    // The leader it attested gets through the door (and its garbage is then refused as such).
    let from_leader = Peers::new(&service_ca, &leader);
    let mut client = from_leader.client(&peer_url, None).unwrap();
    let admitted = client.append_entries(blob()).await.unwrap_err();
    assert_eq!(admitted.code(), tonic::Code::InvalidArgument, "{admitted:?}");
    let admitted = client.install_snapshot(snapshot()).await.unwrap_err();
    assert_eq!(admitted.code(), tonic::Code::InvalidArgument, "{admitted:?}");
    // Admitted and well formed, a snapshot still needs the seal that binds its ledger position
    // to a signature by an endorsed node: without one it is refused to its sender, node1 runs on.
    use cloister_consensus::types::{SnapshotMeta, Vote, encode};
    use cloister_proto::peer::v1::{SnapshotChunk, snapshot_chunk::Chunk};
    let unsealed = tokio_stream::iter(vec![
        SnapshotChunk { chunk: Some(Chunk::Head(encode(&(Vote::new(1, 0), SnapshotMeta::default())))) },
        SnapshotChunk { chunk: Some(Chunk::Data(b"forged state".to_vec())) },
    ]);
    let refused = client.install_snapshot(unsealed).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("no seal binding it to a signed ledger position"), "{}", refused.message());
    assert!(cluster.nodes[1].is_running(), "a refused snapshot does not stop the node:\n{}", cluster.log(1));
    // Nothing was installed.
    let snapshots = data.join("snapshots");
    let installed = std::fs::read_dir(&snapshots)
        .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "snap")).count());
    assert_eq!(installed.unwrap_or(0), 0, "no snapshot file in {}", snapshots.display());
}

/// A node that lost its data folder while it waited as Pending attests again with its
/// certificate: the new folder has a new encryption key, which its evidence binds, and the node's
/// record takes it, so once trusted the node gets the ledger secret and the rekeys after. (The
/// record kept the lost key at first, and the second attestation was refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_node_that_lost_its_data_folder_attests_again_and_gets_the_next_rekey() {
    let mut cluster = Cluster::prepare(3, 1, RECONCILE, |_| {});
    cluster.spawn(0);
    cluster.spawn(1);
    cluster.wait_stable(2, Duration::from_secs(120)).await;
    cluster.open(0).await;
    let record_of = async |cluster: &Cluster| -> Option<Value> {
        attestations(cluster, 0).await.into_iter().find(|n| n["name"] == "node2")
    };
    cluster.spawn(2);
    wait_for("node2 to be recorded as Pending", async || record_of(&cluster).await.is_some()).await;
    let lost = record_of(&cluster).await.unwrap();
    assert_eq!(lost["status"], "Pending", "{lost}");
    assert!(lost["encryption_key"].is_string(), "{lost}");

    cluster.stop(2);
    std::fs::remove_dir_all(&cluster.nodes[2].config.node.data_dir).unwrap();
    cluster.spawn(2);
    wait_for("node2's record to take its new key", async || {
        record_of(&cluster).await.is_some_and(|n| n["encryption_key"] != lost["encryption_key"])
    })
    .await;
    let client = cluster.client(0, 0).await.unwrap();
    pass(&client, &cluster, json!([{ "name": "transition_node_to_trusted", "args": { "node_id": lost["node_id"] } }]))
        .await;
    cluster.wait_stable(3, Duration::from_secs(120)).await;
    pass(&client, &cluster, json!([{ "name": "trigger_ledger_rekey" }])).await;
    wait_for("node2 to learn ledger secret version 2", async || {
        let versions = cloister_node::node::read_ledger_secrets(&cluster.nodes[2].config).unwrap_or_default();
        versions.iter().any(|(v, _)| *v == 2)
    })
    .await;
}

/// The attack: an operator deletes a voter's data folder and starts it again. The node attests
/// again under its certificate, with no log and no vote, and rejoined as the voter it was: the
/// leader's openraft core panicked on its log going back (a debug assertion; release builds went
/// on with a voter that could vote twice in a term). The leader now refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_lost_its_data_folder_is_refused_and_the_service_goes_on() {
    let mut cluster = Cluster::start(3, 1, RECONCILE, |_| {}).await;
    cluster.stop(2);
    std::fs::remove_dir_all(&cluster.nodes[2].config.node.data_dir).unwrap();
    let seen = cluster.log(2).len();
    cluster.spawn(2);
    wait_for("node2 to be refused", async || !cluster.nodes[2].is_running()).await;
    let log = cluster.log(2)[seen..].to_owned();
    assert!(log.contains("joins again with a new certificate"), "{log}");
    // The service goes on: two of three voters commit a write.
    let tx = cluster.ingest(0, &json!([{ "lei": "LEI0001", "nace": "A" }])).await;
    assert!(!tx.is_empty());
}

/// A node certificate alone cannot name a caller. The peer listener admits any certificate of the
/// service CA, which the operator may hold with its key: its holder, connecting as a Trusted node,
/// forwarded an ingest to the leader in member 0's name and the leader ran it as member 0. A
/// forward that names a caller now carries a MAC under a key derived from the ledger secret, which
/// only attested nodes hold; a write through a real follower still runs as its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_alone_cannot_forward_in_a_callers_name() {
    let mut cluster = Cluster::start(3, 1, RECONCILE, |_| {}).await;
    let leader = cluster.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    let dir = cluster.nodes[follower].config_path.parent().unwrap().to_path_buf();
    let follower_identity = cloister_crypto::identity::KeyedCert::read(&dir, &cluster.nodes[follower].name).unwrap();
    let leader_identity = cloister_crypto::identity::KeyedCert::read(&dir, &cluster.nodes[leader].name).unwrap();
    let leader_id =
        cloister_crypto::node_id_of(&cloister_crypto::identity::cert_der(leader_identity.cert_pem.as_bytes()).unwrap());
    let service_ca = std::fs::read_to_string(dir.join("service.cert.pem")).unwrap();
    let peer_url = format!("https://{}", cluster.nodes[leader].config.node.peer_addr);
    let member = cloister_crypto::identity::cert_der(cluster.members[0].keyed.cert_pem.as_bytes()).unwrap();
    let forged = cloister_proto::peer::v1::ForwardRequest {
        method: "POST".into(),
        path: "/ingest".into(),
        headers: [("content-type".to_owned(), "application/json".to_owned())].into(),
        body: br#"{"lei":"FORGED","nace":"X"}"#.to_vec(),
        client_cert: member.to_vec(),
        hops: 1,
        ..Default::default()
    };
    let forwards = Forwards::new(Peers::new(&service_ca, &follower_identity));
    let outcome = forwards.call(leader_id, &peer_url, forged).await;
    let refused = match outcome {
        Ok(reply) => {
            panic!("the leader ran a call named by a node certificate alone: {} {:?}", reply.status, reply.body)
        }
        Err(e) => e,
    };
    assert!(matches!(refused, ForwardError::NotRun(_)), "{refused:?}");
    assert_eq!(refused.status().code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.status().message().contains("caller MAC"), "{}", refused.status().message());
    let keys = cluster.report_keys(leader, 0).await.unwrap();
    assert!(!keys.contains("FORGED"), "{keys:?}");

    // Through the follower itself, as its client: forwarded with the MAC, and run.
    cluster.ingest(follower, &json!([{ "lei": "THROUGH-FOLLOWER", "nace": "X" }])).await;
    assert!(cluster.report_keys(leader, 0).await.unwrap().contains("THROUGH-FOLLOWER"));
}
