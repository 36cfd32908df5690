//! Disaster recovery (#15): recovery shares of the ledger secret, issued to the recovery members
//! and kept in step with them.

use std::time::{Duration, Instant};

use cloister_bundled::KV;
use cloister_cli::recovery::{fetch, open_own_share};
use cloister_client::Client;
use cloister_crypto::cose::GovWrite;
use cloister_crypto::envelope;
use cloister_crypto::recovery::recover_secret;
use cloister_crypto::seal::Sealer;
use cloister_ledger::entry::Payload;
use cloister_store::gov::RecoveryRecord;
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

    // A higher threshold is a new issue: the old shares do not unwrap its secret.
    let (_, state) = c
        .pass(voters[0], &voters, json!([{ "name": "set_recovery_threshold", "args": { "threshold": 3 } }]))
        .await
        .unwrap();
    assert_eq!(state["state"], "Accepted", "{state}");
    let second = shares_when(&c, |r| r.threshold == 3).await;
    assert_eq!(second.version, first.version + 1);
    assert!(recover_secret(&shares, 3, &second.service, second.version, &wrapped(&second)).is_err());
    let renewed: Vec<Vec<u8>> =
        s.members.iter().map(|m| open_own_share(&second, &m.id, &key_of(&s, m)).unwrap()).collect();
    assert_eq!(recover_secret(&renewed, 3, &second.service, second.version, &wrapped(&second)).unwrap(), secret);

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
    open_own_share(&third, &newcomer.id, &private).expect("the new member's share opens with its key");

    // A member who leaves takes its share with it; one whose leaving would leave fewer recovery
    // members than the threshold is refused before any vote.
    let leave = |id: &str| json!([{ "name": "remove_member", "args": { "id": id } }]);
    let (_, state) = c.pass(voters[0], &voters, leave(&s.members[2].id)).await.unwrap();
    assert_eq!(state["state"], "Accepted", "{state}");
    let fourth = shares_when(&c, |r| r.shares.len() == 3).await;
    assert!(!fourth.shares.contains_key(&s.members[2].id));
    let refused = c.gov(voters[0], &GovWrite::Propose, &json!({ "actions": leave(&s.members[1].id) })).await.unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("lower the threshold first"), "{}", refused.text());
}
