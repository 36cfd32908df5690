use cloister_sdk::gov::{self, *};
use cloister_sdk::testing::MemoryHost;
use cloister_sdk::{Caller, Response};
use serde_json::json;

use super::*;

/// A PEM certificate block; the constitution hashes its DER and does not parse it further.
const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBbTCB9KADAgECAhQbQ0EeJRSAzmxvXwXeNNJ3JkEOhzAKBggqhkjOPQQDAzAQ
MQ4wDAYDVQQDDAV0ZXN0MTAeFw0yNjAxMDEwMDAwMDBaFw0zNjAxMDEwMDAwMDBa
MBAxDjAMBgNVBAMMBXRlc3QxMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE
-----END CERTIFICATE-----";

fn resolved(members: &[&str], ballots: &[(&str, bool)]) -> ProposalState {
    resolve_votes(&ResolveInput {
        proposal_id: "p".into(),
        proposer: members[0].into(),
        proposal: Proposal { actions: vec![] },
        ballots: ballots.iter().map(|(m, b)| (m.to_string(), *b)).collect(),
        members: members.iter().map(|m| m.to_string()).collect(),
    })
}

#[test]
fn strict_majority_of_active_members() {
    use ProposalState::*;
    assert_eq!(resolved(&["a"], &[]), Open);
    assert_eq!(resolved(&["a"], &[("a", true)]), Accepted);
    assert_eq!(resolved(&["a"], &[("a", false)]), Rejected);
    assert_eq!(resolved(&["a", "b", "c"], &[("a", true)]), Open);
    assert_eq!(resolved(&["a", "b", "c"], &[("a", true), ("b", true)]), Accepted);
    assert_eq!(resolved(&["a", "b", "c"], &[("a", false), ("b", false)]), Rejected);
    // Four members: two approvals are not a strict majority, two rejections make one impossible.
    assert_eq!(resolved(&["a", "b", "c", "d"], &[("a", true), ("b", true)]), Open);
    assert_eq!(resolved(&["a", "b", "c", "d"], &[("a", true), ("b", true), ("c", true)]), Accepted);
    assert_eq!(resolved(&["a", "b", "c", "d"], &[("a", false), ("b", false)]), Rejected);
    // Ballots of non-members do not count.
    assert_eq!(resolved(&["a", "b", "c"], &[("a", true), ("x", true), ("y", true)]), Open);
}

fn host() -> MemoryHost {
    let mut host = MemoryHost::constitution(router());
    let service = ServiceRecord {
        state: ServiceState::Opening,
        cert: String::new(),
        recovery_threshold: 1,
        identity: None,
        previous_identities: Vec::new(),
        rekeys_requested: 0,
    };
    host.seed(gov::SERVICE, &"service".to_owned(), &service);
    host
}

fn call(host: &mut MemoryHost, path: &str, body: serde_json::Value) -> Response {
    host.call(&Caller::member("m0"), "POST", path, body.to_string())
}

fn proposal(name: &str, args: serde_json::Value) -> serde_json::Value {
    json!({ "actions": [{ "name": name, "args": args }] })
}

#[test]
fn validation_names_the_bad_action() {
    let mut host = host();
    let r = call(&mut host, "/validate", proposal("make_me_king", json!({})));
    assert_eq!(r.head.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("unknown action \\\"make_me_king\\\""), "{:?}", r);
    let r = call(&mut host, "/validate", proposal("add_snp_measurement", json!({ "measurement": "abcd" })));
    assert_eq!(r.head.status, 400);
    assert_eq!(call(&mut host, "/validate", json!({ "actions": [] })).head.status, 400);
    let r = call(&mut host, "/validate", proposal("set_recovery_threshold", json!({ "threshold": 1, "extra": 2 })));
    assert_eq!(r.head.status, 400, "unknown arguments are refused");
    assert_eq!(call(&mut host, "/validate", proposal("transition_service_to_open", json!(null))).head.status, 204);
}

#[test]
fn apply_writes_the_tables() {
    let mut host = host();
    let measurement = "ab".repeat(48);
    let p = json!({ "actions": [
        { "name": "transition_service_to_open" },
        { "name": "add_snp_measurement", "args": { "measurement": measurement.to_uppercase() } },
        { "name": "set_app_config", "args": { "config": { "threshold": 2 } } },
    ]});
    let r = call(&mut host, "/apply", json!({ "proposal_id": "p", "proposal": p }));
    assert_eq!(r.head.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    let s: ServiceRecord = host.peek(gov::SERVICE, &"service".to_owned()).unwrap();
    assert_eq!(s.state, ServiceState::Open);
    assert_eq!(host.peek::<String, bool>(gov::MEASUREMENTS, &measurement), Some(true));
    assert_eq!(host.peek::<String, serde_json::Value>(gov::APP_CONFIG, &"threshold".to_owned()), Some(json!(2)));
    // Opening twice is refused, and a failing action keeps none of the proposal's writes.
    let before = host.dump();
    let p = json!({ "actions": [
        { "name": "set_app_config", "args": { "config": { "threshold": 5 } } },
        { "name": "transition_service_to_open" },
    ]});
    assert_eq!(call(&mut host, "/apply", json!({ "proposal_id": "q", "proposal": p })).head.status, 400);
    assert_eq!(host.dump(), before);
}

/// PCR sets for Azure evidence come and go by vote; a malformed one is refused by name.
#[test]
fn azure_pcr_sets_are_added_and_removed() {
    let mut host = host();
    let value = "AB".repeat(32);
    let set = json!({ "4": value, "11": "cd".repeat(32) });
    let apply = |host: &mut _, name: &str, pcrs: &serde_json::Value| {
        let p = json!({ "actions": [{ "name": name, "args": { "pcrs": pcrs } }] });
        call(host, "/apply", json!({ "proposal_id": name, "proposal": p }))
    };
    assert_eq!(apply(&mut host, "add_azure_pcr_set", &set).head.status, 204);
    let key = format!("4={},11={}", "ab".repeat(32), "cd".repeat(32));
    let stored = host.peek::<String, gov::PcrSet>(gov::AZURE_PCRS, &key).expect("the set, keyed by its PCRs");
    assert_eq!(stored.get(&4), Some(&"ab".repeat(32)), "values are stored lower-case");
    assert_eq!(apply(&mut host, "remove_azure_pcr_set", &set).head.status, 204);
    assert_eq!(host.peek::<String, gov::PcrSet>(gov::AZURE_PCRS, &key), None);

    for (bad, why) in [
        (json!({}), "at least one PCR"),
        (json!({ "24": value }), "PCR 24 does not exist"),
        (json!({ "7": "abcd" }), "PCR 7 must be 32 bytes of hex"),
    ] {
        let r = call(&mut host, "/validate", proposal("add_azure_pcr_set", json!({ "pcrs": bad })));
        assert_eq!(r.head.status, 400);
        assert!(String::from_utf8_lossy(&r.body).contains(why), "{:?}", String::from_utf8_lossy(&r.body));
    }
    let r = call(&mut host, "/validate", proposal("remove_azure_pcr_set", json!({ "pcrs": set })));
    assert!(String::from_utf8_lossy(&r.body).contains("no such PCR set"), "{:?}", String::from_utf8_lossy(&r.body));
}

#[test]
fn new_members_start_accepted() {
    let mut host = host();
    let id = actions::cert_id(CERT).unwrap();
    assert_eq!(id.len(), 64);
    let r = call(
        &mut host,
        "/apply",
        json!({ "proposal_id": "p", "proposal": proposal("set_member", json!({ "cert": CERT })) }),
    );
    assert_eq!(r.head.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    let m: MemberRecord = host.peek(gov::MEMBERS, &id).unwrap();
    assert_eq!(m.status, MemberStatus::Accepted);
    let r = call(&mut host, "/validate", proposal("set_member", json!({ "cert": "not pem" })));
    assert_eq!(r.head.status, 400);
}

/// The recovery threshold counts recovery members (Active members with an encryption key), and no
/// change may leave fewer of them than the threshold.
#[test]
fn the_recovery_threshold_is_bounded_by_the_recovery_members() {
    let mut host = host();
    let member = |key: Option<&str>| gov::MemberRecord {
        cert: String::new(),
        status: gov::MemberStatus::Active,
        encryption_key: key.map(str::to_owned),
        data: Default::default(),
    };
    host.seed(gov::MEMBERS, &"a".to_owned(), &member(Some("-----BEGIN PUBLIC KEY-----")));
    host.seed(gov::MEMBERS, &"b".to_owned(), &member(Some("-----BEGIN PUBLIC KEY-----")));
    host.seed(gov::MEMBERS, &"c".to_owned(), &member(None));
    let status = |host: &mut MemoryHost, name: &str, args: serde_json::Value| {
        let p = json!({ "actions": [{ "name": name, "args": args }] });
        let r = call(host, "/apply", json!({ "proposal_id": name, "proposal": p }));
        (r.head.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    // Two recovery members: a threshold of 3 is refused though there are three Active members.
    let (code, body) = status(&mut host, "set_recovery_threshold", json!({ "threshold": 3 }));
    assert_eq!(code, 400);
    assert!(body.contains("the 2 recovery members"), "{body}");
    assert_eq!(status(&mut host, "set_recovery_threshold", json!({ "threshold": 2 })).0, 204);
    // At threshold 2, neither recovery member may go; the member without a key may.
    let (code, body) = status(&mut host, "remove_member", json!({ "id": "a" }));
    assert_eq!(code, 400);
    assert!(body.contains("lower the threshold first"), "{body}");
    assert_eq!(status(&mut host, "remove_member", json!({ "id": "c" })).0, 204);
    assert_eq!(status(&mut host, "set_recovery_threshold", json!({ "threshold": 1 })).0, 204);
    assert_eq!(status(&mut host, "remove_member", json!({ "id": "a" })).0, 204);
    let s: ServiceRecord = host.peek(gov::SERVICE, &"service".to_owned()).unwrap();
    assert_eq!(s.recovery_threshold, 1);
}

/// `trigger_ledger_rekey` asks for a rekey, and so does retiring a node: a retired node must not
/// hold the secret of what is written after it left.
#[test]
fn rekeys_are_asked_for_by_action_and_by_retiring_a_node() {
    let mut host = host();
    let node = gov::NodeRecord {
        name: "n1".into(),
        status: gov::NodeStatus::Trusted,
        cert: String::new(),
        evidence: serde_json::Value::Null,
        verified: serde_json::Value::Null,
        encryption_key: None,
    };
    host.seed(gov::NODES, &"7".to_owned(), &node);
    let apply = |host: &mut MemoryHost, name: &str, args: serde_json::Value| {
        let p = json!({ "actions": [{ "name": name, "args": args }] });
        call(host, "/apply", json!({ "proposal_id": name, "proposal": p })).head.status
    };
    let requested = |host: &MemoryHost| {
        host.peek::<_, ServiceRecord>(gov::SERVICE, &"service".to_owned()).unwrap().rekeys_requested
    };
    assert_eq!(requested(&host), 0);
    assert_eq!(apply(&mut host, "trigger_ledger_rekey", json!({ "extra": 1 })), 400, "takes no arguments");
    assert_eq!(apply(&mut host, "trigger_ledger_rekey", json!(null)), 204);
    assert_eq!(requested(&host), 1);
    assert_eq!(apply(&mut host, "remove_node", json!({ "node_id": "7" })), 204);
    assert_eq!(requested(&host), 2);
}
