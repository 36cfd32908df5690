//! The ledger on real networks of node processes: offline verification and tamper detection,
//! receipts, sealing at rest, restarts (clean and torn), and leader changes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloister_bundled::{KV, RECONCILE};
use cloister_crypto::identity;
use cloister_ledger::verify::{Receipt, verify_receipt};
use cloister_tests::cluster::Cluster;
use cloister_tests::{cli_exe, ledger_verify, misbehave_wasm};
use serde_json::{Value, json};

/// Runs `cloister ledger verify`; returns success and what it printed.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn chunks(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ledger"))
        .collect();
    paths.sort();
    paths
}

/// Waits until every running node has applied the same position and a signature covers it.
async fn settle(c: &mut Cluster) {
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Stopped nodes stay members: the membership, not the running count, is what must agree.
    let members = c.nodes.len();
    c.wait_stable(members, Duration::from_secs(60)).await;
}

fn ledger_dir(c: &Cluster, node: usize) -> PathBuf {
    c.nodes[node].config.node.data_dir.join("ledger")
}

fn service_cert(c: &Cluster) -> PathBuf {
    c.dir.path().join("service.cert.pem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ledger_verifies_and_any_tampering_is_caught_naming_the_seqno() {
    // Small chunks, so the ledger spans many files.
    let mut c = Cluster::start(3, 1, RECONCILE, |cfg| cfg.ledger.chunk_bytes = 8 << 10).await;
    for n in 0..300 {
        c.ingest(n % 3, &json!({"lei": format!("TAMPER{n:04}"), "nace": "X"})).await;
    }
    settle(&mut c).await;
    for node in 0..3 {
        let (ok, out) = ledger_verify(&ledger_dir(&c, node), &service_cert(&c));
        assert!(ok, "node{node}'s ledger verifies: {out}");
        assert!(out.contains("signatures by"), "{out}");
        assert!(out.contains("trust anchor: the service certificate given (sha256 "), "{out}");
    }
    // Without --service-cert the walk can only trust the genesis it finds, and its last line says so.
    let out = Command::new(cli_exe()).args(["ledger", "verify"]).arg(ledger_dir(&c, 0)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("trust anchor: NONE GIVEN") && last.contains("--service-cert"), "{text}");

    let original = ledger_dir(&c, 0);
    let files = chunks(&original);
    assert!(files.len() >= 4, "the ledger spans several files: {files:?}");
    let scratch = tempfile::tempdir().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..24 {
        let copy = scratch.path().join(format!("flip{round}"));
        copy_dir(&original, &copy);
        let target = &chunks(&copy)[(next() as usize) % files.len()];
        let mut bytes = std::fs::read(target).unwrap();
        let at = (next() as usize) % bytes.len();
        bytes[at] ^= 1 << (next() % 8);
        std::fs::write(target, bytes).unwrap();
        let (ok, out) = ledger_verify(&copy, &service_cert(&c));
        assert!(!ok, "a flipped bit at byte {at} of {} went unnoticed", target.display());
        assert!(out.contains("seqno"), "the failure names a seqno: {out}");
    }

    // A truncated file in the middle of the ledger.
    let copy = scratch.path().join("truncated");
    copy_dir(&original, &copy);
    let middle = &chunks(&copy)[1];
    let len = std::fs::metadata(middle).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(middle).unwrap().set_len(len / 2).unwrap();
    let (ok, out) = ledger_verify(&copy, &service_cert(&c));
    assert!(!ok && out.contains("seqno"), "{out}");

    // A deleted middle chunk.
    let copy = scratch.path().join("deleted");
    copy_dir(&original, &copy);
    std::fs::remove_file(&chunks(&copy)[2]).unwrap();
    let (ok, out) = ledger_verify(&copy, &service_cert(&c));
    assert!(!ok && out.contains("missing"), "{out}");

    // Another service's certificate.
    let other = identity::ServiceCa::generate("another service").unwrap();
    other.keyed.write(scratch.path(), "other").unwrap();
    let (ok, out) = ledger_verify(&original, &scratch.path().join("other.cert.pem"));
    assert!(!ok && out.contains("not issued by the service certificate"), "{out}");

    // Given the service identity, every signer's endorsement must carry its signature: another
    // identity's certificate does not pass, although the operator's CA issued every signer's.
    let verify_with_identity = |identity: &Path| {
        let out = Command::new(cli_exe())
            .args(["ledger", "verify"])
            .arg(&original)
            .arg("--service-cert")
            .arg(service_cert(&c))
            .arg("--service-identity")
            .arg(identity)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let identity_file = c.nodes[0].config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE);
    let (ok, out) = verify_with_identity(&identity_file);
    assert!(ok && out.contains("service identity: every signer's endorsement carries its signature"), "{out}");
    let stranger = identity::generate_service_identity("stranger").unwrap();
    stranger.write(scratch.path(), "stranger").unwrap();
    let (ok, out) = verify_with_identity(&scratch.path().join("stranger.cert.pem"));
    assert!(!ok && out.contains("seqno") && out.contains("not the service identity's"), "{out}");
}

/// The last write before a service goes quiet gets a receipt, also when it landed while the
/// leader was signing the write before it: that signature then covers less than every entry
/// before it, and a signer that took it for "nothing new" never signed the last write (the
/// recovery drill's stall in CI). Each round writes twice, back to back, and waits for the
/// second write's receipt; signing every millisecond makes the race likely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_write_before_a_quiet_spell_gets_a_receipt() {
    let c = Cluster::start(3, 1, KV, |cfg| cfg.ledger.sign_interval_ms = 1).await;
    let client = c.client(0, 0).await.unwrap();
    for round in 0..RECEIPT_ROUNDS {
        let mut tx = String::new();
        for i in 0..2 {
            let path = format!("/app/kv/r{round}-{i}");
            let put = client.request("PUT", &path, Some("application/octet-stream"), "v").await.unwrap();
            assert_eq!(put.status, 200, "{}", put.text());
            tx = put.tx_id().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client.get(&format!("/app/receipt?id={tx}")).await.unwrap();
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "round {round}: no signature covered {tx} within 10 s:\n{}", c.logs(40));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Rounds of `the_last_write_before_a_quiet_spell_gets_a_receipt`.
const RECEIPT_ROUNDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_verify_offline_and_any_change_breaks_them() {
    let c = Cluster::start(3, 1, &misbehave_wasm(), |_| {}).await;
    let claims = hex::encode(blake3::hash(b"the claim").as_bytes());
    let client = c.client(0, 0).await.unwrap();
    let reply = client.post("/app/claim", "text/plain", claims.clone()).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let tx = reply.tx_id().unwrap();
    // A signature follows within `sign_interval_ms` on an idle machine; a loaded CI machine (15
    // debug-build nodes of this file's tests on 2 cores) once took more than 20 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let receipt: Receipt = loop {
        let r = client.get(&format!("/app/receipt?id={tx}")).await.unwrap();
        if r.status == 200 {
            break serde_json::from_slice(&r.body).expect("a receipt");
        }
        assert_eq!(r.status, 202, "pending receipts answer 202: {}", r.text());
        assert!(r.headers.get("retry-after").is_some());
        assert!(Instant::now() < deadline, "no signature covered {tx} within 60 s:\n{}", c.logs(80));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The service identity, as anybody reads it from the service; the receipt carries a copy.
    let service = client.get("/gov/service").await.unwrap().json().unwrap();
    let identity_pem = service["identity"].as_str().expect("a service identity").to_owned();
    assert_eq!(receipt.service_identity, identity_pem);
    let service_identity = identity::cert_der(identity_pem.as_bytes()).unwrap().to_vec();
    let verified = verify_receipt(&receipt, &service_identity).expect("the receipt verifies");
    assert_eq!(verified.claims_digest.map(hex::encode), Some(claims));
    let endorsement = receipt.endorsement.as_ref().expect("an endorsement of the signer");
    assert!(!endorsement.retired && endorsement.tree_size_max >= receipt.signature.payload.tree_size);
    // The operator's CA is no anchor for receipts: it can issue a certificate to anybody.
    let ca = identity::cert_der(&std::fs::read(service_cert(&c)).unwrap()).unwrap().to_vec();
    assert!(verify_receipt(&receipt, &ca).unwrap_err().contains("not signed by the service identity"));

    // The command line, with nothing but the receipt and the service identity's certificate.
    let path = c.dir.path().join("receipt.json");
    std::fs::write(&path, serde_json::to_vec(&receipt).unwrap()).unwrap();
    let identity_path = c.dir.path().join("service_identity.pem");
    std::fs::write(&identity_path, &identity_pem).unwrap();
    let out = Command::new(cli_exe())
        .args(["receipt", "verify"])
        .arg(&path)
        .arg("--service-identity")
        .arg(&identity_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Any change breaks it.
    let mut broken: Vec<(&str, Receipt)> = Vec::new();
    let mut r = receipt.clone();
    r.leaf.content_digest[0] ^= 1;
    broken.push(("content digest", r));
    let mut r = receipt.clone();
    r.leaf.claims_digest = Some([7; 32]);
    broken.push(("claims digest", r));
    let mut r = receipt.clone();
    r.leaf.seqno += 1;
    r.tx_id = format!("{}.{}", r.leaf.term, r.leaf.seqno);
    broken.push(("seqno", r));
    let mut r = receipt.clone();
    r.leaf.term += 1;
    r.tx_id = format!("{}.{}", r.leaf.term, r.leaf.seqno);
    broken.push(("term", r));
    for i in 0..receipt.proof.len() {
        let mut r = receipt.clone();
        let mut step = hex::decode(&r.proof[i]).unwrap();
        step[0] ^= 1;
        r.proof[i] = hex::encode(step);
        broken.push(("proof step", r));
    }
    let mut r = receipt.clone();
    r.signature.payload.signature[10] ^= 1;
    broken.push(("signature", r));
    let mut r = receipt.clone();
    r.signature.payload.root[0] ^= 1;
    broken.push(("signed root", r));
    let mut r = receipt.clone();
    r.signature.payload.tree_size += 1;
    broken.push(("tree size", r));
    let mut r = receipt.clone();
    let stranger = identity::ServiceCa::generate("x").unwrap().issue_node_cert("x", &["localhost".into()]).unwrap();
    r.node_cert = stranger.cert_pem;
    broken.push(("node certificate", r));
    assert!(!receipt.proof.is_empty(), "a ledger of several entries has a proof path");
    let mut r = receipt.clone();
    r.endorsement.as_mut().unwrap().tree_size_max += 1;
    broken.push(("endorsement", r));
    let mut r = receipt.clone();
    r.endorsement = None;
    broken.push(("endorsement (removed)", r));
    for (what, r) in &broken {
        assert!(verify_receipt(r, &service_identity).is_err(), "a changed {what} still verifies");
    }
    let other = identity::generate_service_identity("another service").unwrap();
    let other_der = identity::cert_der(other.cert_pem.as_bytes()).unwrap();
    assert!(verify_receipt(&receipt, &other_der).unwrap_err().contains("not signed by the service identity"));

    // Invalid and unknown ids.
    assert_eq!(client.get("/app/receipt?id=99.2").await.unwrap().status, 404);
    assert_eq!(client.get("/app/receipt?id=junk").await.unwrap().status, 400);
    let anonymous = cloister_client::Client::connect(&c.nodes[0].rest_url, &c.roots(), None).await.unwrap();
    assert_eq!(anonymous.get(&format!("/app/receipt?id={tx}")).await.unwrap().status, 401);
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_and_values_never_reach_any_disk_in_clear() {
    // Snapshot points every 20 entries and a short log behind them, so the log is purged past a
    // node that is down while the rows go in: it then catches up through a snapshot, whose file
    // the leader builds to send and the node keeps, so there are snapshot files to search. The
    // network is quiet by then: the file's last entry is the leader's last signature, which no
    // later entry covers until the leader signs again for the file.
    let mut c = Cluster::start(3, 1, RECONCILE, |cfg| {
        cfg.raft.snapshot_after_logs = 20;
        cfg.raft.snapshot_after_logs_max = 20;
        cfg.raft.logs_kept_after_snapshot = 5;
    })
    .await;
    let leader = c.leader().await.expect("a leader");
    let behind = (leader + 1) % 3;
    c.stop(behind);
    let rows: Vec<Value> =
        (0..40).map(|n| json!({"lei": format!("SEALEDKEY{n:04}"), "nace": format!("SEALEDVALUE{n:04}")})).collect();
    // The sealed rows and 400 others, one transaction each, 8 at a time: the log grows well
    // past the points while the node is down.
    let filler: Vec<Value> = (0..400).map(|n| json!({"lei": format!("FILLER{n:04}"), "nace": "X"})).collect();
    for batch in rows.iter().chain(&filler).collect::<Vec<_>>().chunks(8) {
        let bodies: Vec<Value> = batch.iter().map(|row| json!([row])).collect();
        futures::future::join_all(bodies.iter().map(|body| c.ingest(leader, body))).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.spawn(behind);
    let start = std::time::Instant::now();
    while !c.log(behind).contains("installed a snapshot") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node {behind} caught up through no snapshot:\n{}",
            c.log(behind)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle(&mut c).await;
    // Stop the nodes so every file is final on disk.
    for i in 0..3 {
        c.stop(i);
    }
    let mut snapshots = 0;
    for node in 0..3 {
        let data_dir = c.nodes[node].config.node.data_dir.clone();
        for (path, bytes) in files_under(&data_dir) {
            let name = path.display().to_string();
            snapshots += usize::from(name.ends_with(".snap"));
            for n in [0, 17, 39] {
                let value = format!("SEALEDVALUE{n:04}");
                assert!(!contains(&bytes, value.as_bytes()), "{value} is in clear in {name}");
                // Keys too, in every file: the state database holds private entries under keyed
                // digests, so not even who submitted which record shows.
                let key = format!("SEALEDKEY{n:04}");
                assert!(!contains(&bytes, key.as_bytes()), "{key} is in clear in {name}");
            }
        }
    }
    assert!(snapshots >= 2, "the snapshot files sent and installed were searched ({snapshots})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_continues_its_chain_after_a_restart_and_after_a_torn_tail() {
    let mut c = Cluster::start(3, 1, RECONCILE, |_| {}).await;
    for n in 0..30 {
        c.ingest(0, &json!({"lei": format!("BEFORE{n:03}"), "nace": "X"})).await;
    }
    settle(&mut c).await;
    let follower = (c.leader().await.unwrap() + 1) % 3;

    // A clean restart.
    c.stop(follower);
    c.spawn(follower);
    settle(&mut c).await;

    // A crash that leaves half an entry at the end of the last file.
    c.kill(follower);
    let last = chunks(&ledger_dir(&c, follower)).pop().unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(&last).unwrap();
    std::io::Write::write_all(&mut file, &[200, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(file);
    let (ok, out) = ledger_verify(&ledger_dir(&c, follower), &service_cert(&c));
    assert!(!ok && out.contains("incomplete"), "the torn tail is visible offline: {out}");
    // What else a crash can leave past the last committed entry: a file created but never
    // written (0 bytes) and one whose blocks were allocated but never filled (zeros). Neither
    // may keep the node from starting.
    let dir = ledger_dir(&c, follower);
    std::fs::write(dir.join(format!("{:016}.ledger", 1_000_000)), b"").unwrap();
    std::fs::write(dir.join(format!("{:016}.ledger", 2_000_000)), vec![0u8; 64 << 10]).unwrap();
    for n in 0..30 {
        c.ingest((follower + 1) % 3, &json!({"lei": format!("WHILE{n:03}"), "nace": "X"})).await;
    }
    c.spawn(follower);
    for n in 0..30 {
        c.ingest(0, &json!({"lei": format!("AFTER{n:03}"), "nace": "X"})).await;
    }
    settle(&mut c).await;
    let log = c.log(follower);
    assert!(log.contains("cutting what follows the last committed ledger entry"), "the node cut the tail");
    assert!(log.contains("removing a ledger file the index never committed"), "and the empty files");
    for first in [1_000_000, 2_000_000] {
        assert!(!ledger_dir(&c, follower).join(format!("{first:016}.ledger")).exists(), "{first} was removed");
    }
    for node in 0..3 {
        let (ok, out) = ledger_verify(&ledger_dir(&c, node), &service_cert(&c));
        assert!(ok, "node{node}: {out}");
    }
    let keys = c.report_keys(follower, 0).await.unwrap();
    assert!(keys.contains("BEFORE000") && keys.contains("WHILE029") && keys.contains("AFTER029"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_leader_change_the_chain_continues_and_both_leaders_signatures_verify() {
    let mut c = Cluster::start(3, 1, RECONCILE, |_| {}).await;
    for n in 0..20 {
        c.ingest(0, &json!({"lei": format!("FIRST{n:03}"), "nace": "X"})).await;
    }
    settle(&mut c).await;
    let first_leader = c.leader().await.unwrap();
    c.kill(first_leader);
    let survivor = (first_leader + 1) % 3;
    c.wait_stable(3, Duration::from_secs(60)).await;
    for n in 0..20 {
        c.ingest(survivor, &json!({"lei": format!("SECOND{n:03}"), "nace": "X"})).await;
    }
    settle(&mut c).await;
    c.spawn(first_leader);
    settle(&mut c).await;
    let mut signers = BTreeSet::new();
    for node in 0..3 {
        let ca = identity::cert_der(&std::fs::read(service_cert(&c)).unwrap()).unwrap().to_vec();
        let report = cloister_ledger::verify::verify_dir(&ledger_dir(&c, node), Some(&ca), None, None)
            .unwrap_or_else(|e| panic!("node{node}: {e}"));
        signers.extend(report.signers);
    }
    assert!(signers.len() >= 2, "signatures from both leaders verified: {signers:?}");
}
