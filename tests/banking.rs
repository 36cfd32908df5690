//! The bank-consortium sample, end to end: banks (members) onboard users by proposal and vote,
//! open accounts and deposit; a user transfers and proves the transfer offline with its receipt
//! and claim; the whole demo over HTTPS and again over gRPC (`App.Call`); and concurrent transfers
//! across a 3-node network, through followers too, conserve money.

use std::time::Duration;

use cloister_bundled::BANKING;
use cloister_client::{Client, grpc_channel};
use cloister_crypto::identity::KeyedCert;
use cloister_proto::app::v1::CallRequest;
use cloister_proto::app::v1::app_client::AppClient;
use cloister_tests::cluster::Cluster;
use cloister_tests::{Identity, TestService, cli_exe, new_identity};
use serde_json::{Value, json};

/// Proposes `set_user` for each of `users` as the first member; the others vote until it passes.
async fn onboard(client: &Client, members: &[Identity], users: &[Identity]) {
    let voters: Vec<&KeyedCert> = members[1..].iter().map(|m| &m.keyed).collect();
    for user in users {
        let actions = json!([{ "name": "set_user", "args": { "cert": user.keyed.cert_pem } }]);
        let (_, state) = client.pass(&members[0].keyed, &voters, actions).await.unwrap();
        assert_eq!(state["state"], "Accepted", "set_user {}: {state}", user.name);
    }
}

async fn send(client: &Client, method: &str, target: &str, body: Value) -> (u16, Value, Option<String>) {
    let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let reply = client.request(method, target, Some("application/json"), body).await.unwrap();
    let tx = reply.tx_id();
    (reply.status, reply.json().unwrap_or(Value::Null), tx)
}

fn transfer(value: u64, to: &Identity) -> Value {
    json!({ "value": value, "user_id_to": to.id, "account_name_to": "current" })
}

/// How long a receipt may take: until a signature covers the transaction. Signatures come every
/// `sign_interval_ms`, but a loaded CI machine (the 3-node test runs beside this one) has taken
/// more than 10 s.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The receipt of `tx`, once a signature covers it.
async fn receipt(client: &Client, tx: &str) -> Value {
    let started = std::time::Instant::now();
    loop {
        let reply = client.get(&format!("/app/receipt?id={tx}")).await.unwrap();
        if reply.status == 200 {
            return reply.json().unwrap();
        }
        assert!(
            started.elapsed() < RECEIPT_TIMEOUT,
            "no receipt for {tx} within {RECEIPT_TIMEOUT:?}: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cloister receipt verify` as a user would run it: exit status and output.
fn verify_with_cli(receipt: &std::path::Path, identity: &std::path::Path, claim: &str) -> (bool, String) {
    let out = std::process::Command::new(cli_exe())
        .args(["receipt", "verify"])
        .arg(receipt)
        .arg("--service-cert")
        .arg(identity)
        .args(["--claim", claim])
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// How the demo reaches the app: HTTPS, or gRPC's `App.Call`.
enum Via {
    Https(Client),
    Grpc(AppClient<tonic::transport::Channel>),
}

impl Via {
    async fn connect(s: &TestService, who: &KeyedCert, grpc: bool) -> Via {
        if grpc {
            Via::Grpc(AppClient::new(grpc_channel(&s.grpc_url(), &s.ca_pem, Some(who)).await.unwrap()))
        } else {
            Via::Https(s.client(Some(who)).await)
        }
    }

    /// `path` under `/app`: the status, the JSON answer and the transaction id, if any.
    async fn call(&mut self, method: &str, path: &str, body: Value) -> (u16, Value, Option<String>) {
        match self {
            Via::Https(client) => send(client, method, &format!("/app{path}"), body).await,
            Via::Grpc(app) => {
                let call = CallRequest {
                    method: method.into(),
                    path: path.into(),
                    body: if body.is_null() { Vec::new() } else { body.to_string().into_bytes() },
                    content_type: "application/json".into(),
                    ..Default::default()
                };
                match app.call(call).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        let json = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                        (reply.status as u16, json, (!reply.tx_id.is_empty()).then_some(reply.tx_id))
                    }
                    Err(status) => {
                        let (code, json) = cloister_tests::grpc::status_to_http(&status);
                        (code, json, None)
                    }
                }
            }
        }
    }
}

/// The README's demo, over one transport, with users of its own: the members vote them in, a bank
/// opens their accounts and deposits, user0 sends 40 to user1, the roles hold, and the receipt
/// proves the transfer's claim offline.
async fn demo(s: &TestService, grpc: bool) {
    let (user0, user1) = (new_identity(&format!("user0 grpc={grpc}")), new_identity(&format!("user1 grpc={grpc}")));
    onboard(&s.member(0).await, &s.members, &[user0.clone(), user1.clone()]).await;

    // A bank opens an account for each user (twice is a no-op) and deposits 100 to user0.
    let mut bank = Via::connect(s, &s.members[1].keyed, grpc).await;
    for user in [&user0, &user1, &user0] {
        assert_eq!(bank.call("PUT", &format!("/account/{}/current", user.id), Value::Null).await.0, 204);
    }
    let stranger = new_identity("not a user");
    assert_eq!(bank.call("PUT", &format!("/account/{}/current", stranger.id), Value::Null).await.0, 404);
    let deposit = json!({ "value": 100 });
    assert_eq!(bank.call("POST", &format!("/deposit/{}/current", user0.id), deposit.clone()).await.0, 204);

    // user0 sends 40 to user1, and keeps the claim.
    let mut as0 = Via::connect(s, &user0.keyed, grpc).await;
    let mut as1 = Via::connect(s, &user1.keyed, grpc).await;
    let (status, answer, tx) = as0.call("POST", "/transfer/current", transfer(40, &user1)).await;
    assert_eq!(status, 200, "{answer}");
    let claim = answer["claim"].as_str().unwrap().to_owned();
    assert!(claim.starts_with(&format!("{} sent 40 to {}; salt ", user0.id, user1.id)), "{claim}");
    let tx = tx.expect("a committed transfer names its transaction");
    assert_eq!(as0.call("GET", "/balance/current", Value::Null).await.1, json!({ "balance": 60 }));
    assert_eq!(as1.call("GET", "/balance/current", Value::Null).await.1, json!({ "balance": 40 }));
    // Too much, or to an account that does not exist: refused, and nothing moves.
    assert_eq!(as1.call("POST", "/transfer/current", transfer(41, &user0)).await.0, 400);
    let nowhere = json!({ "value": 1, "user_id_to": user0.id, "account_name_to": "savings" });
    assert_eq!(as1.call("POST", "/transfer/current", nowhere).await.0, 404);
    assert_eq!(as1.call("GET", "/balance/current", Value::Null).await.1, json!({ "balance": 40 }));

    // Roles: a bank cannot transfer or read a balance; a user cannot deposit or open accounts.
    assert_eq!(bank.call("POST", "/transfer/current", transfer(1, &user1)).await.0, 403);
    assert_eq!(bank.call("GET", "/balance/current", Value::Null).await.0, 403);
    assert_eq!(as0.call("POST", &format!("/deposit/{}/current", user0.id), deposit).await.0, 403);
    assert_eq!(as0.call("PUT", &format!("/account/{}/more", user0.id), Value::Null).await.0, 403);

    // The receipt proves the claim, offline, with the service identity's certificate alone.
    let receipt = receipt(&s.client(Some(&user0.keyed)).await, &tx).await;
    let dir = tempfile::tempdir().unwrap();
    let (receipt_file, identity_file) = (dir.path().join("receipt.json"), dir.path().join("service_identity.pem"));
    std::fs::write(&receipt_file, serde_json::to_vec(&receipt).unwrap()).unwrap();
    std::fs::write(&identity_file, &s.ca_pem).unwrap();
    let (ok, out) = verify_with_cli(&receipt_file, &identity_file, &claim);
    assert!(ok && out.contains("which is the claim's"), "{out}");
    let claim_file = dir.path().join("claim.txt");
    std::fs::write(&claim_file, &claim).unwrap();
    let (ok, out) = verify_with_cli(&receipt_file, &identity_file, &format!("@{}", claim_file.display()));
    assert!(ok, "{out}");
    let changed = claim.replace("sent 40", "sent 400");
    let (ok, out) = verify_with_cli(&receipt_file, &identity_file, &changed);
    assert!(!ok && out.contains("not the claim"), "a changed claim must be refused: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banking_demo_over_https_and_over_grpc_with_a_receipt_that_proves_the_claim() {
    let s = TestService::start_with(3, 0, BANKING, |_| {}).await;
    demo(&s, false).await;
    demo(&s, true).await;
}

/// 200 transfers among 4 accounts, from 20 concurrent clients spread over a 3-node network (two
/// of them followers, which forward): the total is unchanged, and every account ends exactly at
/// its deposit plus what acknowledged transfers brought in, minus what they took out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_across_three_nodes_conserve_money() {
    const USERS: usize = 4;
    const DEPOSIT: u64 = 1_000;
    const CLIENTS: usize = 20;
    const EACH: usize = 10;
    let c = Cluster::start(3, 3, BANKING, |_| {}).await;
    let users: Vec<Identity> = (0..USERS).map(|i| new_identity(&format!("user{i}"))).collect();
    let m0 = c.client(0, 0).await.unwrap();
    onboard(&m0, &c.members, &users).await;
    for user in &users {
        assert_eq!(send(&m0, "PUT", &format!("/app/account/{}/current", user.id), Value::Null).await.0, 204);
        let deposit = json!({ "value": DEPOSIT });
        assert_eq!(send(&m0, "POST", &format!("/app/deposit/{}/current", user.id), deposit).await.0, 204);
    }
    let roots = c.roots();
    let urls: Vec<String> = c.nodes.iter().map(|n| n.rest_url.clone()).collect();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (from, to) = (k % USERS, (k + 1 + k / USERS) % USERS);
            let to = if to == from { (to + 1) % USERS } else { to };
            let (sender, target) = (users[from].clone(), users[to].clone());
            let (url, roots) = (urls[k % urls.len()].clone(), roots.clone());
            tokio::spawn(async move {
                let client = Client::connect(&url, &roots, Some(&sender.keyed)).await.unwrap();
                let mut moved = Vec::new();
                for n in 0..EACH {
                    let value = 1 + ((k * EACH + n) % 50) as u64;
                    let (status, answer, _) =
                        send(&client, "POST", "/app/transfer/current", transfer(value, &target)).await;
                    match status {
                        200 => moved.push((from, to, value)),
                        400 => assert!(answer.to_string().contains("less than"), "{answer}"),
                        other => panic!("transfer answered {other}: {answer}"),
                    }
                }
                moved
            })
        })
        .collect();
    let mut expected = [DEPOSIT as i64; USERS];
    let mut acked = 0;
    for task in tasks {
        for (from, to, value) in task.await.unwrap() {
            expected[from] -= value as i64;
            expected[to] += value as i64;
            acked += 1;
        }
    }
    assert!(acked > CLIENTS * EACH / 2, "only {acked} of {} transfers went through", CLIENTS * EACH);
    assert_eq!(expected.iter().sum::<i64>(), (DEPOSIT as usize * USERS) as i64);
    // Every node ends with the same balances (a follower may lag for a moment).
    for (node, url) in urls.iter().enumerate() {
        for (i, user) in users.iter().enumerate() {
            let client = Client::connect(url, &roots, Some(&user.keyed)).await.unwrap();
            let mut last = Value::Null;
            for _ in 0..50 {
                last = send(&client, "GET", "/app/balance/current", Value::Null).await.1;
                if last["balance"].as_i64() == Some(expected[i]) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(last["balance"].as_i64(), Some(expected[i]), "node{node}, user{i}");
        }
    }
}

/// A write that changes nothing answers from the state it ran over, which holds the writes the
/// leader proposed and has not committed: it is answered only once those commit. The leader is
/// left alone, so its first `open_account` cannot commit; the same call again finds the account
/// in the pending state and writes nothing. Answered at once (204), as it was, a client held a
/// success for an account that a new leader could still drop. Once the followers are back, both
/// calls succeed and the account exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_changes_nothing_waits_for_the_pending_writes_it_read() {
    let mut c = Cluster::start(3, 3, BANKING, |_| {}).await;
    let user = new_identity("user0");
    let m0 = c.client(0, 0).await.unwrap();
    onboard(&m0, &c.members, std::slice::from_ref(&user)).await;
    let leader = c.leader().await.unwrap();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &i in &followers {
        c.stop(i);
    }
    let client = c.client(leader, 0).await.unwrap();
    let open = format!("/app/account/{}/current", user.id);
    let first = {
        let (client, open) = (client.clone(), open.clone());
        tokio::spawn(async move { send(&client, "PUT", &open, Value::Null).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = {
        let (client, open) = (client.clone(), open.clone());
        tokio::spawn(async move { send(&client, "PUT", &open, Value::Null).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!first.is_finished(), "the first call cannot commit without a follower");
    assert!(!again.is_finished(), "answered {:?} while what it read was not committed", again.await.unwrap());

    for &i in &followers {
        c.spawn(i);
    }
    let (first, again) = (first.await.unwrap(), again.await.unwrap());
    assert_eq!(again.0, 204, "{again:?}");
    assert!(first.0 == 204 || first.1.to_string().contains("TransactionOutcomeUnknown"), "the first call: {first:?}");
    let user_client = Client::connect(&c.nodes[leader].rest_url, &c.roots(), Some(&user.keyed)).await.unwrap();
    let balance = send(&user_client, "GET", "/app/balance/current", Value::Null).await;
    assert_eq!(balance.1["balance"].as_i64(), Some(0), "{balance:?}");
}
