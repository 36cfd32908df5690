//! Disaster recovery (#15): recovery shares of the ledger secret, issued to the recovery members
//! and kept in step with them; and the drill: every node and key lost, the service recovered from
//! one node's ledger files by a threshold of shares.

use std::time::{Duration, Instant};

use cloister_bundled::{KV, RECONCILE};
use cloister_cli::recovery::{fetch, open_own_share, submit_share};
use cloister_client::Client;
use cloister_crypto::cose::GovWrite;
use cloister_crypto::envelope;
use cloister_crypto::recovery::recover_secret;
use cloister_crypto::seal::Sealer;
use cloister_crypto::secrets::LedgerSecrets;
use cloister_ledger::entry::{Payload, TxEntry};
use cloister_ledger::verify::{Receipt, verify_receipt, verify_receipt_with_previous};
use cloister_store::gov::{LEDGER_SECRETS, RecoveryRecord, ServiceRecord};
use cloister_tests::cluster::Cluster;
use cloister_tests::{Identity, TestService, new_identity};
use serde_json::json;

/// How long the leader may take to issue shares after a change (its upkeep runs every tick).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

/// The service's shares once `done` holds of them.
async fn shares_when(client: &Client, done: impl Fn(&RecoveryRecord) -> bool) -> RecoveryRecord {
    let start = Instant::now();
    loop {
        if let Ok(record) = fetch(client).await
            && done(&record)
        {
            return record;
        }
        assert!(start.elapsed() < ISSUE_TIMEOUT, "no such issue of recovery shares within {ISSUE_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key_of(s: &TestService, member: &Identity) -> String {
    let path = envelope::key_files(s.dir.path(), &member.name).0;
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn wrapped(record: &RecoveryRecord) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(&record.wrapped_secret).unwrap()
}

/// The private writes of the node's ledger files open with `secret`: the entry count that did.
fn private_entries_opened(s: &TestService, secret: &[u8; 32]) -> Result<usize, String> {
    let entries = cloister_ledger::files::read_entries(&cloister_ledger::dir(&s.config.node.data_dir)).unwrap();
    let sealer = Sealer::new(secret);
    let mut opened = 0;
    for entry in entries {
        if let Payload::Tx(tx) = entry.payload
            && tx.private.is_some()
        {
            tx.writes(&sealer).map_err(|e| format!("entry {}: {e}", entry.seqno))?;
            opened += 1;
        }
    }
    Ok(opened)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_shares_follow_the_recovery_members_and_a_threshold_of_them_opens_the_ledger() {
    let s = TestService::start(3, 0, KV, Default::default()).await;
    let c = s.member(0).await;
    let voters: Vec<_> = s.members.iter().map(|m| &m.keyed).collect();

    // Genesis made the three members recovery members, with a majority threshold.
    let first = shares_when(&c, |r| r.shares.len() == 3).await;
    assert_eq!(first.threshold, 2, "the default threshold is a majority of the recovery members");
    let service = c.get("/gov/service").await.unwrap().json().unwrap();
    let identity_id = cloister_crypto::identity::id_of_pem(service["identity"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(first.service, identity_id, "the shares are bound to the service identity");

    // Each member opens its own share; no member opens another's, or passes it off as its own.
    let shares: Vec<Vec<u8>> =
        s.members.iter().map(|m| open_own_share(&first, &m.id, &key_of(&s, m)).unwrap()).collect();
    let err = open_own_share(&first, &s.members[0].id, &key_of(&s, &s.members[1])).unwrap_err();
    assert!(format!("{err:#}").contains("does not open"), "{err:#}");

    // A private write lands in the ledger files, sealed.
    let put = c.request("PUT", "/app/kv/k", Some("application/octet-stream"), "a private value").await.unwrap();
    assert_eq!(put.status, 200, "{}", put.text());
    let secret = recover_secret(&shares[1..], first.threshold, &first.service, first.version, &wrapped(&first))
        .expect("two shares of three recover the ledger secret");
    let opened = private_entries_opened(&s, &secret).expect("the recovered secret opens the ledger's private writes");
    assert!(opened >= 1, "the kv write is a private entry");
    let one = recover_secret(&shares[..1], first.threshold, &first.service, first.version, &wrapped(&first));
    assert!(one.unwrap_err().contains("1 shares of the 2 needed"));
    assert!(private_entries_opened(&s, &[0; 32]).is_err(), "another secret opens nothing");

    // A higher threshold is a new issue, and of a new secret: the old issue's shares and wrapped
    // secret stay in the ledger's history, and two of its shares would go on opening the secret
    // in use. So the node rekeys first; the old shares open neither the new issue nor its secret.
    let (_, state) = c
        .pass(voters[0], &voters, json!([{ "name": "set_recovery_threshold", "args": { "threshold": 3 } }]))
        .await
        .unwrap();
    assert_eq!(state["state"], "Accepted", "{state}");
    let second = shares_when(&c, |r| r.threshold == 3).await;
    assert_eq!(second.version, first.version + 1);
    assert_eq!(second.ledger_secret_version, first.ledger_secret_version + 1, "a rekey");
    assert!(recover_secret(&shares, 3, &second.service, second.version, &wrapped(&second)).is_err());
    let renewed: Vec<Vec<u8>> =
        s.members.iter().map(|m| open_own_share(&second, &m.id, &key_of(&s, m)).unwrap()).collect();
    let rekeyed = recover_secret(&renewed, 3, &second.service, second.version, &wrapped(&second)).unwrap();
    assert_ne!(rekeyed, secret, "the new issue wraps the new secret");

    // A new member with a malformed encryption key is refused before any vote.
    let newcomer = new_identity("member3");
    let bad = json!([{ "name": "set_member", "args": {
        "cert": newcomer.keyed.cert_pem,
        "encryption_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n" } }]);
    let refused = c.gov(voters[0], &GovWrite::Propose, &json!({ "actions": bad })).await.unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("encryption_key"), "{}", refused.text());

    // A member with a key gets a share once it is Active (after its acknowledgement), not before.
    let (private, public) = envelope::generate_key().unwrap();
    let add = json!([{ "name": "set_member", "args": { "cert": newcomer.keyed.cert_pem, "encryption_key": public } }]);
    let (_, state) = c.pass(voters[0], &voters, add).await.unwrap();
    assert_eq!(state["state"], "Accepted", "{state}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fetch(&c).await.unwrap().version, second.version, "an Accepted member holds no share yet");
    c.gov_ok(&newcomer.keyed, &GovWrite::Ack, &json!({})).await.unwrap();
    let third = shares_when(&c, |r| r.shares.len() == 4).await;
    assert_eq!(third.version, second.version + 1);
    assert_eq!(third.ledger_secret_version, second.ledger_secret_version, "a share more takes none away");
    open_own_share(&third, &newcomer.id, &private).expect("the new member's share opens with its key");

    // A member who leaves takes its share with it; one whose leaving would leave fewer recovery
    // members than the threshold is refused before any vote.
    let leave = |id: &str| json!([{ "name": "remove_member", "args": { "id": id } }]);
    let (_, state) = c.pass(voters[0], &voters, leave(&s.members[2].id)).await.unwrap();
    assert_eq!(state["state"], "Accepted", "{state}");
    let fourth = shares_when(&c, |r| r.shares.len() == 3).await;
    assert!(!fourth.shares.contains_key(&s.members[2].id));
    assert_eq!(
        fourth.ledger_secret_version,
        third.ledger_secret_version + 1,
        "the member who left holds a share of an old secret only"
    );
    let refused = c.gov(voters[0], &GovWrite::Propose, &json!({ "actions": leave(&s.members[1].id) })).await.unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("lower the threshold first"), "{}", refused.text());
}

/// A vote cannot give a member another member's encryption key: whoever holds its private half
/// would open both shares and count twice towards the threshold. The node fails the proposal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_cannot_share_an_encryption_key() {
    let s = TestService::start(2, 0, KV, Default::default()).await;
    let c = s.member(0).await;
    let voters: Vec<_> = s.members.iter().map(|m| &m.keyed).collect();
    let public = std::fs::read_to_string(envelope::key_files(s.dir.path(), &s.members[0].name).1).unwrap();
    let newcomer = new_identity("member2");
    let add = json!([{ "name": "set_member", "args": { "cert": newcomer.keyed.cert_pem, "encryption_key": public } }]);
    let (_, state) = c.pass(voters[0], &voters, add).await.unwrap();
    assert_eq!(state["state"], "Failed", "{state}");
    assert!(state["reason"].as_str().unwrap().contains("the same encryption key"), "{state}");
}

/// How long a recovering service may take to reach a state (its restore runs on the leader's
/// upkeep tick).
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

async fn wait_state(c: &Cluster, node: usize, state: &str) {
    let start = Instant::now();
    loop {
        if let Ok(client) = c.client(node, 0).await
            && let Ok(reply) = client.get("/gov/service").await
            && reply.status == 200
            && reply.json().unwrap()["state"] == state
        {
            return;
        }
        assert!(
            start.elapsed() < STATE_TIMEOUT,
            "the service is not {state} within {STATE_TIMEOUT:?}:\n{}",
            c.log(node)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Member `member`'s votes: 60 keys, where member `m` disagrees on every third key from `m`.
fn votes(member: usize) -> Vec<u8> {
    let rows: Vec<_> = (0..60)
        .map(|i| json!({ "lei": format!("LEI{i:04}"), "nace": if i % 3 == member { "B" } else { "A" } }))
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

/// Every row of a member's report, as a node answers it.
async fn report(c: &Cluster, node: usize, member: usize) -> Vec<serde_json::Value> {
    let reply = c.client(node, member).await.unwrap().get("/app/report?limit=10000").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.headers.get("x-next-cursor").is_none(), "one page holds the scenario");
    reply.json().unwrap().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consortium_recovers_its_data_when_every_node_and_key_is_gone() {
    let mut c = Cluster::start(3, 3, RECONCILE, |_| {}).await;
    let member0 = c.client(0, 0).await.unwrap();
    let mut tx = String::new();
    for m in 0..3 {
        if m == 2 {
            // Half-way, the members rekey the ledger: what follows is sealed under version 2, and
            // the shares are issued again, of the new secret.
            let voters: Vec<_> = c.members.iter().map(|m| &m.keyed).collect();
            let rekey = json!([{ "name": "trigger_ledger_rekey" }]);
            let (_, state) = member0.pass(voters[0], &voters, rekey).await.unwrap();
            assert_eq!(state["state"], "Accepted", "{state}");
            shares_when(&member0, |r| r.ledger_secret_version == 2).await;
        }
        let reply = c.client(0, m).await.unwrap().post("/app/ingest", "application/json", votes(m)).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        tx = reply.tx_id().unwrap();
    }
    let start = Instant::now();
    let receipt: Receipt = loop {
        let r = member0.get(&format!("/app/receipt?id={tx}")).await.unwrap();
        if r.status == 200 {
            break serde_json::from_slice(&r.body).unwrap();
        }
        assert!(start.elapsed() < STATE_TIMEOUT, "no receipt for {tx}: {}\n{}", r.text(), c.logs(80));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let old_service = shares_when(&member0, |r| r.shares.len() == 3).await.service;
    let before: Vec<_> = futures::future::join_all((0..3).map(|m| report(&c, 0, m))).await;
    assert!(before.iter().all(|rows| rows.len() == 60));
    drop(member0);

    // The disaster: every node dies, and with it every node key, ledger secret and state
    // database. One node's ledger files survive.
    for i in 0..3 {
        c.kill(i);
    }
    let saved = c.dir.path().join("saved-ledger");
    std::fs::create_dir_all(&saved).unwrap();
    let ledger = cloister_ledger::dir(&c.nodes[0].config.node.data_dir);
    for file in std::fs::read_dir(&ledger).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "ledger") {
            std::fs::copy(&path, saved.join(path.file_name().unwrap())).unwrap();
        }
    }
    for i in 0..3 {
        std::fs::remove_dir_all(&c.nodes[i].config.node.data_dir).unwrap();
        c.renew_node_identity(i);
    }

    // One node recovers the service from the saved files: public state only, no private value.
    let recovering = Instant::now();
    c.spawn_recover(0, &saved);
    wait_state(&c, 0, "Recovering").await;
    let m = |i: usize| c.client(0, i);
    let (m0, m1, m2) = (m(0).await.unwrap(), m(1).await.unwrap(), m(2).await.unwrap());
    assert_ne!(m0.get("/app/report").await.unwrap().status, 200, "no private value before the shares");
    let keys: Vec<String> = (0..3)
        .map(|i| std::fs::read_to_string(envelope::key_files(c.dir.path(), &c.members[i].name).0).unwrap())
        .collect();
    let ids: Vec<&str> = c.members.iter().map(|m| m.id.as_str()).collect();

    // A member submits only to a recovery of the service it knew.
    let elsewhere = submit_share(&m0, &c.members[0].keyed, &keys[0], Some(&"ab".repeat(32))).await.unwrap_err();
    assert!(format!("{elsewhere:#}").contains("not the service you knew"), "{elsewhere:#}");
    let first = submit_share(&m0, &c.members[0].keyed, &keys[0], Some(&old_service)).await.unwrap();
    assert_eq!(first, json!({ "submitted": 1, "threshold": 2, "restoring": false }));
    assert_ne!(m0.get("/app/report").await.unwrap().status, 200, "one share of two opens nothing");
    let again = submit_share(&m0, &c.members[0].keyed, &keys[0], None).await.unwrap_err();
    assert!(format!("{again:#}").contains("ShareAlreadySubmitted"), "{again:#}");

    // A forged share, one for another service, one replayed by another member: refused, named.
    let previous: RecoveryRecord =
        m1.get("/gov/recovery/previous").await.unwrap().json().map(|v| serde_json::from_value(v).unwrap()).unwrap();
    let share0 = open_own_share(&previous, ids[0], &keys[0]).unwrap();
    let body = |service: &str, member: &str, share: &[u8]| {
        use base64::Engine as _;
        json!({ "service": service, "version": previous.version, "member": member,
                "share": base64::engine::general_purpose::STANDARD.encode(share) })
    };
    let refused = |reply: cloister_client::Reply, code: &str| {
        assert_ne!(reply.status, 200, "{}", reply.text());
        assert!(reply.text().contains(code), "{code}: {}", reply.text());
    };
    let submit = |who: usize, body: serde_json::Value| {
        let (client, keyed) = (if who == 1 { &m1 } else { &m2 }, c.members[who].keyed.clone());
        async move { client.gov(&keyed, &GovWrite::RecoveryShare, &body).await.unwrap() }
    };
    refused(submit(1, body(&previous.service, ids[0], &share0)).await, "ShareOfAnotherMember");
    refused(submit(1, body(&previous.service, ids[1], &share0)).await, "ForgedShare");
    let mut forged = open_own_share(&previous, ids[1], &keys[1]).unwrap();
    forged[5] ^= 1;
    refused(submit(1, body(&previous.service, ids[1], &forged)).await, "ForgedShare");
    refused(submit(2, body(&"00".repeat(32), ids[2], &share0)).await, "ShareOfAnotherService");

    // The second genuine share opens the ledger: the private state comes back, and the members
    // open the service; two new nodes join it.
    let second = submit_share(&m1, &c.members[1].keyed, &keys[1], Some(&old_service)).await.unwrap();
    assert_eq!(second["restoring"], true, "{second}");
    let third = submit_share(&m2, &c.members[2].keyed, &keys[2], Some(&old_service)).await.unwrap_err();
    let third = format!("{third:#}");
    assert!(third.contains("AlreadyRestoring") || third.contains("NotRecovering"), "{third}");
    wait_state(&c, 0, "Opening").await;
    let opened_after = recovering.elapsed();
    c.spawn(1);
    c.spawn(2);
    c.wait_stable(3, Duration::from_secs(120)).await;
    c.open(0).await;
    // Node0 answered the opening; the others may not have applied it yet.
    for node in [1, 2] {
        wait_state(&c, node, "Open").await;
    }
    eprintln!(
        "recovery: from `node recover` to Opening in {opened_after:?}, to Open with 3 nodes in {:?}",
        recovering.elapsed()
    );
    for node in [1, 2] {
        for (member, rows) in before.iter().enumerate() {
            assert_eq!(&report(&c, node, member).await, rows, "member {member}'s report on node {node}");
        }
    }

    // A receipt from before the disaster verifies against the new identity, which endorses the
    // old one; not against the new identity alone.
    let service: ServiceRecord = serde_json::from_value(m0.get("/gov/service").await.unwrap().json().unwrap()).unwrap();
    let identity =
        cloister_crypto::identity::cert_der(service.identity.as_deref().unwrap().as_bytes()).unwrap().to_vec();
    assert!(verify_receipt(&receipt, &identity).is_err());
    let (verified, via) = verify_receipt_with_previous(&receipt, &identity, &service.previous_identities).unwrap();
    assert_eq!((verified.tx_id.as_str(), via), (tx.as_str(), Some(0)));

    // The recovered service takes writes through any node, and issues shares of its own secret.
    let reply = c.client(2, 0).await.unwrap().post("/app/ingest", "application/json", votes(1)).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let renewed = shares_when(&m0, |r| r.service != previous.service).await;
    assert_eq!(renewed.shares.len(), 3);

    // An auditor's checks: the receipt through the command line, with the service record that
    // names the endorsed previous identity; the new ledger and the saved one, offline.
    let [receipt_file, service_file, identity_file] =
        ["receipt.json", "service.json", "identity.pem"].map(|f| c.dir.path().join(f));
    std::fs::write(&receipt_file, serde_json::to_vec(&receipt).unwrap()).unwrap();
    std::fs::write(&service_file, serde_json::to_vec(&service).unwrap()).unwrap();
    std::fs::write(&identity_file, service.identity.as_deref().unwrap()).unwrap();
    let verify = |extra: &[&std::path::Path]| {
        let mut command = std::process::Command::new(cloister_tests::cli_exe());
        command.args(["receipt", "verify"]).arg(&receipt_file).arg("--service-identity").arg(&identity_file);
        if let Some(record) = extra.first() {
            command.arg("--service-record").arg(record);
        }
        let out = command.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(!verify(&[]).0, "the new identity alone does not vouch for the old receipt");
    let (ok, printed) = verify(&[&service_file]);
    assert!(ok && printed.contains("a previous service issued this receipt"), "{printed}");
    for i in 0..3 {
        c.stop(i);
    }
    let service_cert = c.dir.path().join("service.cert.pem");
    for dir in [cloister_ledger::dir(&c.nodes[0].config.node.data_dir), saved] {
        let (ok, printed) = cloister_tests::ledger_verify(&dir, &service_cert);
        assert!(ok, "{}: {printed}", dir.display());
    }
}

/// The ledger secret at rest is sealed to the node key and the platform's derived key (mock
/// firmware: bound to the launch measurement): a data folder moved to a guest launched with
/// another measurement does not open, and says what to do instead.
/// The attack: a ledger of the attacker's own making, passed off as the service's. It keeps the
/// genuine identity certificate, issue of shares and sealed private entries, names a CA of the
/// attacker's in its genesis, records no endorsement, and ends in one signature by a node of
/// that CA. A recovery held only the entries that signature covers to the identity, and the
/// signature itself sits after them: nothing was checked, and the forged ledger was recovered
/// (members pinning the genuine identity would have submitted their shares to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_ledger_signed_by_a_node_the_identity_never_endorsed_is_not_recovered() {
    use cloister_ledger::entry::{LedgerEntry, NodeSigner, SignaturePayload, TxKind, chain};
    use cloister_ledger::merkle;
    use cloister_store::gov::{ENDORSEMENTS, SERVICE, SERVICE_KEY};
    let mut s = TestService::start(2, 0, KV, Default::default()).await;
    shares_when(&s.member(0).await, |r| r.shares.len() == 2).await;
    s.stop().await;
    let genuine = cloister_ledger::files::read_entries(&cloister_ledger::dir(&s.config.node.data_dir)).unwrap();

    let ca = cloister_crypto::identity::ServiceCa::generate("attacker").unwrap();
    let node = ca.issue_node_cert("attacker", &["localhost".into()]).unwrap();
    let signer = NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap();
    let (mut forged, mut nodes, mut head) = (Vec::<LedgerEntry>::new(), merkle::MemoryNodes::default(), [0u8; 32]);
    let mut push = |payload: Payload, term: u64, forged: &mut Vec<LedgerEntry>| {
        let mut entry = LedgerEntry { seqno: forged.len() as u64, term, payload, chain: [0; 32] };
        let leaf = entry.components().leaf();
        merkle::append(&mut nodes, entry.seqno, &leaf).unwrap();
        entry.chain = chain(&head, &leaf);
        head = entry.chain;
        forged.push(entry);
        (merkle::root(&nodes, forged.len() as u64).unwrap(), head)
    };
    let mut covered = ([0u8; 32], [0u8; 32]);
    for entry in genuine {
        let Payload::Tx(mut tx) = entry.payload else { continue };
        if tx.signature.is_some() {
            continue;
        }
        let mut public = cloister_store::WriteSet::default();
        for (map, key, value) in tx.public.iter().filter(|(map, _, _)| *map != ENDORSEMENTS) {
            match value {
                Some(v) if map == SERVICE && key == SERVICE_KEY && tx.kind == TxKind::Genesis => {
                    let mut record: ServiceRecord = serde_json::from_slice(v).unwrap();
                    record.cert = ca.keyed.cert_pem.clone();
                    public.put(map, key, &serde_json::to_vec(&record).unwrap());
                }
                Some(v) => public.put(map, key, v),
                None => public.remove(map, key),
            }
        }
        tx.public = public;
        covered = push(Payload::Tx(tx), entry.term, &mut forged);
    }
    let size = forged.len() as u64;
    let signature = SignaturePayload::sign(size, covered.0, covered.1, &signer);
    push(Payload::Tx(TxEntry::signature(signature)), 1, &mut forged);
    let folder = s.dir.path().join("forged-ledger");
    cloister_ledger::files::write_entries(&folder, &forged).unwrap();
    let walked = cloister_ledger::verify::verify_dir(&folder, None, None, None).expect("it verifies on its own");
    assert_eq!(walked.last_signed, Some(size));

    let mut config = s.config.clone();
    config.node.data_dir = s.dir.path().join("recovering");
    config.network.recover = Some(folder);
    let refused = cloister_node::Node::start(config).await.err().expect("the forged ledger is refused");
    assert!(format!("{refused:#}").contains("is not its service's"), "{refused:#}");
}

/// The attack: a recovery configured for other attestation roots than the previous service's
/// (`genesis.attestation = "mock"` for an AMD service, or here another test root) would take the
/// previous ledger secret, rebuilt from the members' shares, to a node no firmware the previous
/// service trusted vouches for, and let any holder of those roots join. `gov.attestation.root`
/// is not restored (the new genesis writes its own), and nothing compared the two: the recovery
/// started. It is refused now, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_keeps_the_previous_services_attestation_roots() {
    let mut s = TestService::start(2, 0, KV, Default::default()).await;
    shares_when(&s.member(0).await, |r| r.shares.len() == 2).await;
    s.stop().await;
    let saved = s.dir.path().join("saved-ledger");
    let entries = cloister_ledger::files::read_entries(&cloister_ledger::dir(&s.config.node.data_dir)).unwrap();
    cloister_ledger::files::write_entries(&saved, &entries).unwrap();

    let other_root = s.dir.path().join("other-mock-root");
    cloister_attestation::mock::MockRoot::generate().write(&other_root).unwrap();
    let mut config = s.config.clone();
    config.node.data_dir = s.dir.path().join("recovering");
    config.network.recover = Some(saved);
    config.attestation.mock_root = Some(other_root);
    let refused = cloister_node::Node::start(config.clone()).await.err().expect("other roots are refused");
    assert!(format!("{refused:#}").contains("keeps its roots"), "{refused:#}");
    // With the previous service's roots, the same recovery starts.
    config.node.data_dir = s.dir.path().join("recovering-again");
    config.attestation.mock_root = s.config.attestation.mock_root.clone();
    cloister_node::Node::start(config).await.expect("the same roots recover").shutdown().await;
}

/// The attack: the recovering node restores the previous private state, once the shares are in,
/// from the copy of the previous ledger in its data folder: a later read than the public
/// state's. Whoever writes that folder could cut the copy back to an earlier signature between
/// the two (still a genuine ledger of the service), and the private state restored would then be
/// older than the public. The recovery's genesis records how far the copy reached; a copy that
/// reaches elsewhere restores nothing, and the service stays Recovering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_ledger_copy_cut_back_after_the_recovery_started_restores_no_private_state() {
    use cloister_store::gov::{self, ServiceState};
    let mut s = TestService::start(2, 0, KV, Default::default()).await;
    let c = s.member(0).await;
    let old = shares_when(&c, |r| r.shares.len() == 2).await;
    // Each write signed before the next (its receipt is served once a signature covers it), so
    // the ledger holds signatures over trees of different sizes.
    for n in 0..3 {
        let put = c.request("PUT", &format!("/app/kv/k{n}"), Some("application/octet-stream"), "v").await.unwrap();
        assert_eq!(put.status, 200, "{}", put.text());
        let tx = put.tx_id().unwrap();
        let start = Instant::now();
        while c.get(&format!("/app/receipt?id={tx}")).await.unwrap().status != 200 {
            assert!(start.elapsed() < ISSUE_TIMEOUT, "no signature over {tx}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    s.stop().await;
    let saved = s.dir.path().join("saved-ledger");
    let entries = cloister_ledger::files::read_entries(&cloister_ledger::dir(&s.config.node.data_dir)).unwrap();
    cloister_ledger::files::write_entries(&saved, &entries).unwrap();

    let mut config = s.config.clone();
    config.node.data_dir = s.dir.path().join("recovering");
    config.network.recover = Some(saved);
    let state = |node: &cloister_node::Node| {
        let tx = node.service().store().begin().unwrap();
        let restored = tx.get(gov::RECOVERY, gov::RECOVERY_PUBLIC_DONE_KEY).unwrap().is_some();
        (gov::service(&tx).unwrap().unwrap().state, restored)
    };
    let node = cloister_node::Node::start(config.clone()).await.unwrap();
    let start = Instant::now();
    while state(&node) != (ServiceState::Recovering, true) {
        assert!(start.elapsed() < ISSUE_TIMEOUT, "the public state was not restored: {:?}", state(&node));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;

    // Cut the copy back to its first signature over fewer entries than its last.
    let copy = config.node.data_dir.join("previous-ledger");
    let entries = cloister_ledger::files::read_entries(&copy).unwrap();
    let signed = |e: &cloister_ledger::entry::LedgerEntry| e.payload.signature().map(|sig| sig.tree_size);
    let last = entries.iter().filter_map(signed).max().unwrap();
    let cut = entries.iter().position(|e| signed(e).is_some_and(|n| n < last)).expect("an earlier signature");
    std::fs::remove_dir_all(&copy).unwrap();
    cloister_ledger::files::write_entries(&copy, &entries[..=cut]).unwrap();

    let node = cloister_node::Node::start(config.clone()).await.unwrap();
    let pinned = std::fs::read(config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE)).unwrap();
    for member in &s.members {
        let client = Client::connect(&node.rest_url(), &pinned, Some(&member.keyed)).await.unwrap();
        submit_share(&client, &member.keyed, &key_of(&s, member), Some(&old.service)).await.unwrap();
    }
    // The secret is back: a copy as recorded would be restored within a tick or two (the leader's
    // upkeep runs every second), so 15 s leave room for a loaded machine.
    for _ in 0..150 {
        assert_eq!(state(&node).0, ServiceState::Recovering, "the cut-back copy's private state was restored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_folder_moved_to_a_guest_with_another_measurement_does_not_open() {
    let mut s = TestService::start(1, 0, KV, Default::default()).await;
    s.stop().await;
    let mut moved = s.config.clone();
    moved.attestation.mock_measurement = Some("ab".repeat(48));
    let err = match cloister_node::Node::start(moved).await {
        Ok(_) => panic!("a folder sealed under another measurement opened"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("another launch measurement") && err.contains("cloister node recover"), "{err}");
    s.restart().await;
    let status = s.member(0).await.get("/gov/service").await.unwrap().status;
    assert_eq!(status, 200, "the guest that sealed it opens it");
}

/// The private entries of a node's ledger files, split at the first rekey (the entry that writes
/// `gov.ledger_secrets`): those before it and those after.
fn private_entries_around_rekey(c: &Cluster, node: usize) -> (Vec<TxEntry>, Vec<TxEntry>) {
    let dir = cloister_ledger::dir(&c.nodes[node].config.node.data_dir);
    let (mut before, mut after, mut rekeyed) = (Vec::new(), Vec::new(), false);
    for entry in cloister_ledger::files::read_entries(&dir).unwrap() {
        let Payload::Tx(tx) = entry.payload else { continue };
        if tx.public.iter().any(|(map, ..)| map == LEDGER_SECRETS) {
            rekeyed = true;
        } else if tx.private.is_some() {
            if rekeyed { &mut after } else { &mut before }.push(tx);
        }
    }
    assert!(rekeyed, "node{node}'s ledger holds the rekey");
    (before, after)
}

/// A retired node keeps its copy of the ledger secret; retiring it rekeys the ledger, so that copy
/// opens what was written while it served and nothing written after it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_nodes_secret_opens_nothing_written_after_it_left() {
    let mut c = Cluster::start(3, 1, RECONCILE, |_| {}).await;
    let member0 = c.client(0, 0).await.unwrap();
    let ingest = async |c: &Cluster, node: usize, from: usize| {
        let rows: Vec<_> = (from..from + 10).map(|i| json!({ "lei": format!("LEI{i:04}"), "nace": "A" })).collect();
        c.ingest(node, &json!(rows)).await
    };
    ingest(&c, 0, 0).await;
    let nodes: serde_json::Value = member0.get("/node/attestations").await.unwrap().json().unwrap();
    let node2 = nodes["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "node2").unwrap()["node_id"].clone();
    let voters = [&c.members[0].keyed];
    let retire = json!([{ "name": "remove_node", "args": { "node_id": node2 } }]);
    let (_, state) = member0.pass(voters[0], &voters, retire).await.unwrap();
    assert_eq!(state["state"], "Accepted", "{state}");
    // The constitution asked for a rekey with the retirement; the leader seals version 2 to the
    // two nodes left.
    let start = Instant::now();
    let rekey = loop {
        let secrets: serde_json::Value = member0.get("/gov/ledger_secrets").await.unwrap().json().unwrap();
        if secrets["version"] == 2 {
            break secrets["rekeys"][0].clone();
        }
        assert!(start.elapsed() < ISSUE_TIMEOUT, "no rekey within {ISSUE_TIMEOUT:?}: {secrets}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rekey["answers"], 1);
    let sealed_to = rekey["nodes"].as_array().unwrap();
    assert_eq!(sealed_to.len(), 2, "{rekey}");
    assert!(!sealed_to.contains(&node2), "{rekey}");
    ingest(&c, 0, 10).await;
    // Through node1, whose next read then sees every write before it, as well as this one.
    ingest(&c, 1, 20).await;
    let report = c.report_keys(1, 0).await.unwrap();
    assert_eq!(report.len(), 30, "a node left in the service reads it all");
    for i in 0..3 {
        c.stop(i);
    }

    // Node1's ledger: it has applied the last write, which node0 may not have when it stopped.
    let (before, after) = private_entries_around_rekey(&c, 1);
    assert!(
        !before.is_empty() && after.len() >= 2,
        "{} private entries before the rekey, {} after",
        before.len(),
        after.len()
    );
    // The retired node's own copy, opened with its key as an operator holding it would.
    let retired = LedgerSecrets::new(cloister_node::node::read_ledger_secrets(&c.nodes[2].config).unwrap()).unwrap();
    assert_eq!(retired.all().iter().map(|(v, _)| *v).collect::<Vec<_>>(), [1], "it never learned version 2");
    for tx in &before {
        tx.writes(&retired).expect("the retired node's secret opens what was written while it served");
    }
    for tx in &after {
        assert!(tx.writes(&retired).is_err(), "the retired node's secret opens an entry written after it left");
    }
    // A node left in the service holds both versions, and opens everything.
    let kept = LedgerSecrets::new(cloister_node::node::read_ledger_secrets(&c.nodes[1].config).unwrap()).unwrap();
    assert_eq!(kept.all().iter().map(|(v, _)| *v).collect::<Vec<_>>(), [1, 2]);
    for tx in before.iter().chain(&after) {
        tx.writes(&kept).expect("a Trusted node opens every entry");
    }
    // Nor does its secret open another node's state database: each node seals its own under a key
    // of its own (`state.key`), which never leaves it.
    let copy = c.dir.path().join("node1-state-copy.redb");
    std::fs::copy(c.nodes[1].config.node.data_dir.join("state.redb"), &copy).unwrap();
    let v1 = std::sync::Arc::new(Sealer::new(&retired.all()[0].1));
    let refused =
        cloister_store::Store::open_sealed(&copy, v1).err().expect("the retired node's secret opens node1's state");
    assert!(refused.to_string().contains("does not open"), "{refused}");
    // And the entries after the rekey are under version 2 alone.
    let v2 = kept.get(2).unwrap();
    for tx in &after {
        tx.writes(v2.as_ref()).expect("sealed under version 2");
    }
    // The rekey is sealed to the key node1 generated in its guest and bound into its evidence,
    // not to its TLS key: an operator who holds node1's key file and reads its ledger opens
    // nothing of it. (Sealed to the TLS key before, it opened version 2 there.)
    let node1 = nodes["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "node1").unwrap()["node_id"].clone();
    let node1 = node1.as_str().map(str::to_owned).unwrap_or_else(|| node1.to_string());
    let dir = cloister_ledger::dir(&c.nodes[1].config.node.data_dir);
    let record = cloister_ledger::files::read_entries(&dir)
        .unwrap()
        .into_iter()
        .find_map(|entry| match entry.payload {
            Payload::Tx(tx) => {
                tx.public.iter().find(|(map, ..)| *map == LEDGER_SECRETS).and_then(|(.., v)| v.map(<[u8]>::to_vec))
            }
            _ => None,
        })
        .expect("node1's ledger holds the rekey");
    let record: cloister_store::gov::LedgerSecretRecord = serde_json::from_slice(&record).unwrap();
    let sealed = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &record.nodes[&node1]).unwrap();
    let tls_key = std::fs::read_to_string(&c.nodes[1].config.tls.node_key).unwrap();
    let aad = cloister_crypto::secrets::node_aad(2);
    assert!(envelope::open_with(&tls_key, &aad, &sealed).is_err(), "node1's TLS key opens the rekey");
}

/// A node's data folder cut back to its secrets (its Raft log, state, ledger files and snapshots
/// removed by whoever can write it) starts no new service on them. It did: with no log, the node
/// ran the genesis its configuration named, and wrapped the old service's ledger secret into the
/// new service's recovery shares, so an operator who named itself the one recovery member, with
/// a threshold of 1, opened its share and had the secret. Once a folder without a log was
/// refused, an empty `raft-log` folder in its place did the same: the log existed, and held
/// nothing, so the node still ran the genesis; and so, once a log was read for what it holds, did
/// an empty `raft.redb` beside it, a log of the older format the start then discards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_cut_back_to_its_secrets_starts_no_new_service() {
    use cloister_node::config::GenesisMember;
    let mut s = TestService::start(1, 0, KV, Default::default()).await;
    s.stop().await;
    let data = s.config.node.data_dir.clone();
    let secret = cloister_node::node::read_ledger_secrets(&s.config).unwrap().last().unwrap().1;
    for state in ["raft-log", "ledger", "snapshots"] {
        let _ = std::fs::remove_dir_all(data.join(state));
    }
    std::fs::remove_file(data.join("state.redb")).unwrap();
    let operator = new_identity("operator");
    operator.keyed.write(s.dir.path(), "operator").unwrap();
    let (private, public) = envelope::generate_key().unwrap();
    let public_file = s.dir.path().join("operator.enc.pub.pem");
    std::fs::write(&public_file, public).unwrap();
    let mut forged = s.config.clone();
    forged.genesis.members =
        vec![GenesisMember::Recovery { cert: s.dir.path().join("operator.cert.pem"), encryption_key: public_file }];
    forged.genesis.recovery_threshold = Some(1);
    for log in ["no log", "an empty log", "an empty log and a stray log file of the older format"] {
        if log != "no log" {
            std::fs::create_dir_all(data.join("raft-log")).unwrap();
        }
        if log.contains("older format") {
            std::fs::write(data.join("raft.redb"), b"").unwrap();
        }
        match cloister_node::Node::start(forged.clone()).await {
            Ok(node) => {
                // The attack, as it ran: the operator's one share opens the old service's secret.
                let mut roots = std::fs::read(&s.config.tls.service_cert).unwrap();
                roots.extend(std::fs::read(data.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE)).unwrap());
                let client = Client::connect(&node.rest_url(), &roots, None).await.unwrap();
                let issue = shares_when(&client, |r| r.shares.len() == 1).await;
                let share = open_own_share(&issue, &operator.id, &private).unwrap();
                let opened = recover_secret(&[share], 1, &issue.service, issue.version, &wrapped(&issue)).unwrap();
                panic!(
                    "with {log}, a new service started on the old secrets; the operator's share opens the old \
                     secret: {}",
                    opened == secret
                );
            }
            Err(e) => {
                let e = format!("{e:#}");
                assert!(e.contains("Raft log holds nothing") && e.contains("empty data folder"), "with {log}: {e}");
            }
        }
    }
}

/// A genesis that stopped after its network began (Raft's `initialize`) and before its first
/// transaction committed left a folder that started as a network with no service, for good:
/// every governance read failed, and no later start ran the genesis. Such a folder is refused
/// now, naming what is left, and the start that failed stops what it started (it left Raft
/// running, and the state database locked, in a process that went on).
///
/// A first node elects itself at once, so the folder is made as such a crash leaves it: a node's
/// data folder with its secrets and no state, a Raft log holding only what `initialize` and the
/// election wrote (by this node's id), and the genesis's marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genesis_that_stopped_before_it_committed_is_no_service() {
    use cloister_consensus::{Consensus, NodeAddr, Peers};
    let mut s = TestService::start(1, 0, KV, Default::default()).await;
    s.stop().await;
    let config = s.config.clone();
    let data = config.node.data_dir.clone();
    for state in ["raft-log", "ledger", "snapshots"] {
        std::fs::remove_dir_all(data.join(state)).unwrap();
    }
    std::fs::remove_file(data.join("state.redb")).unwrap();
    let node = cloister_crypto::identity::read_pair(&config.tls.node_cert, &config.tls.node_key).unwrap();
    let service_cert = std::fs::read_to_string(&config.tls.service_cert).unwrap();
    let cert_der = |pem: &str| cloister_crypto::identity::cert_der(pem.as_bytes()).unwrap().to_vec();
    let scratch = tempfile::tempdir().unwrap();
    let store = cloister_store::Store::open(&scratch.path().join("state.redb")).unwrap();
    let ledger =
        cloister_ledger::Ledger::open(&scratch.path().join("ledger"), cert_der(&service_cert), &config.ledger, &store)
            .unwrap();
    let secrets = LedgerSecrets::new([(1, Sealer::generate_secret())]).unwrap();
    let url = "https://127.0.0.1:1".to_owned();
    let me = NodeAddr { name: "node0".into(), peer_url: url.clone(), rest_url: url.clone(), grpc_url: url };
    let id = cloister_consensus::node_id_of(&cert_der(&node.cert_pem));
    let storage = (store, std::sync::Arc::new(ledger), std::sync::Arc::new(secrets));
    let peers = Peers::new(&service_cert, &node);
    let begun = Consensus::start(&config.raft, &data, id, me, storage, peers).await.unwrap();
    begun.initialize().await.unwrap();
    begun.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    begun.shutdown().await;
    drop(begun);
    let pending = data.join(cloister_node::node::GENESIS_PENDING_FILE);
    std::fs::write(&pending, "").unwrap();
    match cloister_node::Node::start(config).await {
        Ok(node) => panic!("a network with no service started, at {}", node.rest_url()),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(
                e.contains("stopped before its first transaction committed") && e.contains("empty data folder"),
                "{e}"
            );
        }
    }
    // The start that failed stopped what it had started: its state database is free again.
    cloister_store::Store::open(&data.join("state.redb")).expect("the failed start let go of the state database");
}

/// A genesis whose start ended after its first transaction committed, and before it cleared its
/// marker, is a service: the restart finds the transaction applied, and clears the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genesis_that_committed_before_its_start_ended_is_a_service() {
    let mut s = TestService::start(1, 0, KV, Default::default()).await;
    s.stop().await;
    let pending = s.config.node.data_dir.join(cloister_node::node::GENESIS_PENDING_FILE);
    assert!(!pending.exists(), "a genesis that committed left its marker");
    std::fs::write(&pending, "").unwrap();
    s.restart().await;
    assert!(!pending.exists(), "the marker of a committed genesis is kept");
    let record = s.client(None).await.service_record().await.unwrap();
    assert_eq!(record["state"], "Open", "{record}");
}

/// Node0's configuration for a new one-node service in `dir` (mock attestation, the kv app).
fn genesis_config(dir: &std::path::Path) -> cloister_node::config::NodeConfig {
    use cloister_cli::local::{LocalNetwork, NodeAddrs};
    let network = LocalNetwork::create(dir, "test service", 1, 0, Some(("app.wasm", KV)), false).unwrap();
    network.node_config("node0", &NodeAddrs::ephemeral(), None, cloister_tests::mock_attestation()).unwrap()
}

/// Starts the node of `config`, whose genesis runs now: it serves a new service, and stops.
async fn runs_its_genesis(config: &cloister_node::config::NodeConfig) {
    let node = cloister_node::Node::start(config.clone()).await.expect("the mended genesis runs");
    let identity = std::fs::read(config.node.data_dir.join(cloister_node::endorsed::SERVICE_IDENTITY_FILE)).unwrap();
    let client = Client::connect(&node.rest_url(), &identity, None).await.unwrap();
    assert_eq!(client.service_record().await.unwrap()["state"], "Opening");
    node.shutdown().await;
}

/// A genesis that failed before its network began (here a member's certificate missing) runs
/// again once its configuration is mended: it keeps the new service's ledger secret only as the
/// log begins, so it leaves none behind for the next start to take for another service's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genesis_that_failed_before_it_began_runs_again() {
    use cloister_node::config::GenesisMember;
    let dir = tempfile::tempdir().unwrap();
    let config = genesis_config(dir.path());
    let mut mistyped = config.clone();
    mistyped.genesis.members = vec![GenesisMember::Cert(dir.path().join("nobody.cert.pem"))];
    let Err(e) = cloister_node::Node::start(mistyped).await else { panic!("a genesis ran with no member") };
    assert!(format!("{e:#}").contains("nobody.cert.pem"), "{e:#}");
    let data = &config.node.data_dir;
    assert!(data.join("raft-log").exists() && !data.join("ledger.secret").exists(), "the failed start kept a secret");
    runs_its_genesis(&config).await;
}

/// A genesis that failed as its log was to begin, after it kept the new service's secret (here
/// the `genesis.pending` marker cannot be written: a folder stands in its place, as a full disk
/// or a read-only folder would fail it), takes the secret back: the folder then started no more,
/// refused as holding another service's secrets beside an empty log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genesis_that_failed_as_its_log_began_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = genesis_config(dir.path());
    let data = &config.node.data_dir;
    let in_the_way = data.join(cloister_node::node::GENESIS_PENDING_FILE);
    std::fs::create_dir_all(in_the_way.join("held")).unwrap();
    let Err(e) = cloister_node::Node::start(config.clone()).await else { panic!("the marker was written") };
    assert!(format!("{e:#}").contains("genesis.pending"), "{e:#}");
    assert!(!data.join("ledger.secret").exists(), "the failed start kept a secret");
    std::fs::remove_dir_all(&in_the_way).unwrap();
    runs_its_genesis(&config).await;
}
