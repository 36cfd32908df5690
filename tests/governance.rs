//! Governance end to end on a real node over TLS: signed proposals and ballots, the
//! constitution's verdicts, every proposal state, refused requests, app upgrades by vote, app
//! settings, a malicious constitution, and the service lifecycle.

use base64::Engine as _;
use cloister_bundled::{CONSTITUTION, RECONCILE};
use cloister_client::{COSE_CONTENT_TYPE, Client, sign_gov, unix_now};
use cloister_crypto::cose::{self, GovWrite};
use cloister_crypto::identity::KeyedCert;
use cloister_store::gov::{self, HistoryRecord};
use cloister_tests::cluster::Cluster;
use cloister_tests::{TestService, misbehave_wasm, new_identity};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn propose_json(actions: Value) -> Value {
    json!({ "actions": actions })
}

fn approve(yes: bool) -> Value {
    json!({ "approve": yes })
}

async fn state(client: &Client, id: &str) -> Value {
    let reply = client.get(&format!("/gov/proposals/{id}")).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json().unwrap()
}

/// Files a proposal and returns its id, asserting the node took it.
async fn propose(client: &Client, who: &KeyedCert, actions: Value) -> String {
    let answer = client.gov_ok(who, &GovWrite::Propose, &propose_json(actions)).await.unwrap();
    assert_eq!(answer["state"], "Open", "{answer}");
    answer["proposal_id"].as_str().unwrap().to_owned()
}

async fn vote(client: &Client, who: &KeyedCert, id: &str, yes: bool) -> Value {
    client.gov_ok(who, &GovWrite::Vote(id.into()), &approve(yes)).await.unwrap()
}

fn threshold(n: u32) -> Value {
    json!([{ "name": "set_recovery_threshold", "args": { "threshold": n } }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_majority_of_active_members_decides() {
    // One member: its own approval is a majority.
    let s = TestService::start(1, 0, RECONCILE, Default::default()).await;
    let c = s.member(0).await;
    let m = &s.members[0].keyed;
    let id = propose(&c, m, threshold(1)).await;
    assert_eq!(vote(&c, m, &id, true).await["state"], "Accepted");

    // Three members: two approvals accept; a member may change its ballot while Open.
    let s = TestService::start(3, 0, RECONCILE, Default::default()).await;
    let c = s.member(0).await;
    let [a, b, d] = [0, 1, 2].map(|i| &s.members[i].keyed);
    let id = propose(&c, a, threshold(2)).await;
    assert_eq!(vote(&c, a, &id, true).await["state"], "Open");
    assert_eq!(vote(&c, b, &id, false).await["state"], "Open");
    assert_eq!(vote(&c, b, &id, true).await["state"], "Accepted", "b changed its ballot to approve");
    assert_eq!(c.get("/gov/service").await.unwrap().json().unwrap()["recovery_threshold"], 2);
    let id = propose(&c, a, threshold(3)).await;
    assert_eq!(vote(&c, b, &id, false).await["state"], "Open");
    assert_eq!(vote(&c, d, &id, false).await["state"], "Rejected");
    let ballots = state(&c, &id).await["ballots"].clone();
    assert_eq!(ballots.as_object().unwrap().len(), 2);

    // Four members: two of four is no strict majority; three is.
    let s = TestService::start(4, 0, RECONCILE, Default::default()).await;
    let c = s.member(0).await;
    let ms: Vec<&KeyedCert> = s.members.iter().map(|m| &m.keyed).collect();
    let id = propose(&c, ms[0], threshold(4)).await;
    vote(&c, ms[0], &id, true).await;
    assert_eq!(vote(&c, ms[1], &id, true).await["state"], "Open");
    assert_eq!(vote(&c, ms[2], &id, true).await["state"], "Accepted");
    // Two rejections of four make a majority impossible.
    let id = propose(&c, ms[0], threshold(1)).await;
    vote(&c, ms[1], &id, false).await;
    assert_eq!(vote(&c, ms[2], &id, false).await["state"], "Rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proposal_state() {
    let s = TestService::start(3, 0, RECONCILE, Default::default()).await;
    let c = s.member(0).await;
    let [a, b, _] = [0, 1, 2].map(|i| &s.members[i].keyed);

    // Withdrawn: by the proposer only, and only while Open.
    let id = propose(&c, a, threshold(2)).await;
    let refused = c.gov(b, &GovWrite::Withdraw(id.clone()), &json!({})).await.unwrap();
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.text().contains("NotProposer"));
    assert_eq!(c.gov_ok(a, &GovWrite::Withdraw(id.clone()), &json!({})).await.unwrap()["state"], "Withdrawn");
    let late = c.gov(a, &GovWrite::Vote(id.clone()), &approve(true)).await.unwrap();
    assert_eq!(late.status, 409, "{}", late.text());
    assert_eq!(state(&c, &id).await["state"], "Withdrawn");

    // Dropped: accepting set_constitution drops the other Open proposals.
    let bystander = propose(&c, a, threshold(2)).await;
    let swap = propose(&c, b, json!([{ "name": "set_constitution", "args": { "wasm": b64(CONSTITUTION) } }])).await;
    vote(&c, a, &swap, true).await;
    assert_eq!(vote(&c, b, &swap, true).await["state"], "Accepted");
    let dropped = state(&c, &bystander).await;
    assert_eq!(dropped["state"], "Dropped", "{dropped}");
    assert!(dropped["reason"].as_str().unwrap().contains("constitution"));

    // Failed: a constitution whose apply traps keeps none of the proposal's writes.
    let evil =
        propose(&c, a, json!([{ "name": "set_constitution", "args": { "wasm": b64(&misbehave_wasm()) } }])).await;
    vote(&c, a, &evil, true).await;
    assert_eq!(vote(&c, b, &evil, true).await["state"], "Accepted");
    // The misbehaving constitution accepts everything at once, then its apply panics.
    let answer = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "panic" }]))).await.unwrap();
    assert_eq!(answer["state"], "Failed", "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("misbehave panicked"), "{answer}");
    let tx = s.node().service().store().begin().unwrap();
    assert_eq!(tx.get(gov::APP_CONFIG, b"misbehave").unwrap(), None, "the failed apply wrote nothing");
    // Failed: an apply that writes a member record the node could not read back is refused by
    // the node's check of its effects, so reading gov.members can never meet it.
    let answer = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "corrupt_members" }]))).await.unwrap();
    assert_eq!(answer["state"], "Failed", "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("gov.members cannot hold this record"), "{answer}");
    let tx = s.node().service().store().begin().unwrap();
    assert_eq!(tx.get(gov::MEMBERS, b"me").unwrap(), None, "the malformed member record was not written");
    assert_eq!(c.get("/gov/members").await.unwrap().status, 200, "members still read");
    // A harmless action through the same constitution applies, and does write.
    let ok = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "noop" }]))).await.unwrap();
    assert_eq!(ok["state"], "Accepted");
    let tx = s.node().service().store().begin().unwrap();
    assert!(tx.get(gov::APP_CONFIG, b"misbehave").unwrap().is_some());
}

/// One member may have `gov.proposals_open_per_member_max` Open proposals. Each stays in the
/// state, with the modules it carries, until it closes: without a bound, one member filing
/// proposal after proposal grew the state (and every node's copy of it) without end. One more is
/// refused before its modules compile; other members still propose; a slot comes back as one of
/// the member's proposals is withdrawn or accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_may_hold_only_so_many_open_proposals() {
    let s = TestService::start_with(3, 0, RECONCILE, |c| c.gov.proposals_open_per_member_max = 3).await;
    let c = s.member(0).await;
    let [a, b, _] = [0, 1, 2].map(|i| &s.members[i].keyed);
    // Proposals that differ, each valid.
    let setting = |n: u32| json!([{ "name": "set_app_config", "args": { "config": { "threshold": n } } }]);
    let mut open = Vec::new();
    for n in 1..=3 {
        open.push(propose(&c, a, setting(n)).await);
    }
    let refused_as_full = |reply: cloister_client::Reply| {
        assert_eq!(reply.status, 409, "{}", reply.text());
        assert!(reply.text().contains("TooManyOpenProposals"), "{}", reply.text());
        assert!(reply.text().contains("proposals_open_per_member_max"), "{}", reply.text());
    };
    refused_as_full(c.gov(a, &GovWrite::Propose, &propose_json(setting(4))).await.unwrap());
    // Refused before its module compiles: garbage wasm is not what it is refused for.
    let garbage = json!([{ "name": "set_app", "args": { "wasm": b64(b"\0asm garbage") } }]);
    refused_as_full(c.gov(a, &GovWrite::Propose, &propose_json(garbage)).await.unwrap());
    let others = propose(&c, b, setting(4)).await;

    // Withdrawn: the slot is back, and taken again.
    assert_eq!(c.gov_ok(a, &GovWrite::Withdraw(open.remove(2)), &json!({})).await.unwrap()["state"], "Withdrawn");
    open.push(propose(&c, a, setting(5)).await);
    refused_as_full(c.gov(a, &GovWrite::Propose, &propose_json(setting(6))).await.unwrap());
    // Accepted by a majority: so is this one.
    vote(&c, b, &open[0], true).await;
    assert_eq!(vote(&c, a, &open[0], true).await["state"], "Accepted");
    open.remove(0);
    open.push(propose(&c, a, setting(6)).await);

    // What the node counts: exactly the Open proposals, by proposer.
    let tx = s.node().service().store().begin().unwrap();
    let mut counted =
        gov::all::<u64>(&tx, gov::PROPOSALS_OPEN).unwrap().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let mut expected = open.iter().map(|id| format!("{}/{id}", s.members[0].id)).collect::<Vec<_>>();
    expected.push(format!("{}/{others}", s.members[1].id));
    counted.sort();
    expected.sort();
    assert_eq!(counted, expected);
}

/// The superseded-ballot attack, as reproduced on a sandbox: member1 approves, then changes its
/// ballot to reject. Anyone, with no client certificate, takes the approve ballot from
/// `gov.history`, re-encodes it (an unprotected header entry) and posts it again. Before
/// requests were identified by what was signed, that was accepted and the proposal passed
/// against member1's final intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_ballot_cannot_come_back() {
    let s = TestService::start(3, 0, RECONCILE, Default::default()).await;
    let service = s.service_id();
    let c = s.member(0).await;
    let (m0, m1, m2) = (&s.members[0].keyed, &s.members[1].keyed, &s.members[2].keyed);
    let id = propose(&c, m0, threshold(2)).await;
    let now = unix_now();
    let ballot = |who: &KeyedCert, yes: bool, at: u64| {
        sign_gov(who, &GovWrite::Vote(id.clone()), &approve(yes), at, &service).unwrap()
    };
    let anyone = s.client(None).await;
    let post = |body: Vec<u8>| {
        let anyone = anyone.clone();
        let path = GovWrite::Vote(id.clone()).path();
        async move { anyone.post(&path, COSE_CONTENT_TYPE, body).await.unwrap() }
    };
    let approve_bytes = ballot(m1, true, now - 2);
    assert_eq!(post(approve_bytes.clone()).await.status, 200, "member1 approves");
    assert_eq!(post(ballot(m1, false, now - 1)).await.status, 200, "member1 changes its ballot to reject");
    assert_eq!(post(ballot(m2, true, now)).await.json().unwrap()["state"], "Open", "1 of 3 approve");

    // The attacker's copy: the approve ballot from gov.history, one unprotected entry added.
    let tx = s.node().service().store().begin().unwrap();
    let history = gov::all::<HistoryRecord>(&tx, gov::HISTORY).unwrap();
    assert!(history.iter().any(|(_, r)| r.cose == b64(&approve_bytes)), "the approve ballot is public in gov.history");
    let mut copy = <coset::CoseSign1 as coset::CborSerializable>::from_slice(&approve_bytes).unwrap();
    copy.unprotected.rest.push((coset::Label::Int(99), coset::cbor::value::Value::Integer(1.into())));
    let reencoded = coset::CborSerializable::to_vec(copy).unwrap();
    let refused = post(reencoded).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("unprotected header must be empty"), "{}", refused.text());
    // The verbatim copy is a replay; a ballot member1 signed before its last one is superseded.
    let replay = post(approve_bytes).await;
    assert_eq!(replay.status, 409, "{}", replay.text());
    assert!(replay.text().contains("Replay"), "{}", replay.text());
    let older = post(ballot(m1, true, now - 3)).await;
    assert_eq!(older.status, 409, "{}", older.text());
    assert!(older.text().contains("Superseded"), "{}", older.text());

    let after = state(&c, &id).await;
    assert_eq!(after["state"], "Open", "member1's final intent stands: {after}");
    assert_eq!(after["ballots"][&s.members[1].id], false, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_change_nothing() {
    let s = TestService::start(2, 1, RECONCILE, Default::default()).await;
    let service = s.service_id();
    let c = s.member(0).await;
    let a = &s.members[0].keyed;
    let id = propose(&c, a, threshold(1)).await;
    let snapshot = || async { (state(&c, &id).await, c.get("/gov/members").await.unwrap().json().unwrap()) };
    let before = snapshot().await;

    let post = |body: Vec<u8>, write: GovWrite| {
        let c = c.clone();
        async move { c.post(&write.path(), COSE_CONTENT_TYPE, body).await.unwrap() }
    };
    let vote_write = GovWrite::Vote(id.clone());
    let expect = |reply: cloister_client::Reply, status: u16, code: &str| {
        assert_eq!(reply.status, status, "{code}: {}", reply.text());
        assert_eq!(reply.json().unwrap()["error"]["code"], code, "{}", reply.text());
    };

    // A replay of an accepted ballot.
    let ballot = sign_gov(&s.members[1].keyed, &vote_write, &approve(false), unix_now(), &service).unwrap();
    assert_eq!(post(ballot.clone(), vote_write.clone()).await.status, 200);
    let before = (state(&c, &id).await, before.1);
    expect(post(ballot, vote_write.clone()).await, 409, "Replay");
    // Created too long ago, or too far ahead.
    let old = sign_gov(a, &vote_write, &approve(true), unix_now() - 3600, &service).unwrap();
    expect(post(old, vote_write.clone()).await, 400, "RequestOutsideWindow");
    let future = sign_gov(a, &vote_write, &approve(true), unix_now() + 3600, &service).unwrap();
    expect(post(future, vote_write.clone()).await, 400, "RequestOutsideWindow");
    // A bad signature: the last byte of the signature flipped.
    let mut forged = sign_gov(a, &vote_write, &approve(true), unix_now(), &service).unwrap();
    *forged.last_mut().unwrap() ^= 1;
    expect(post(forged, vote_write.clone()).await, 401, "BadSignature");
    // An unknown signer, and a user.
    let stranger = new_identity("stranger");
    let unknown = sign_gov(&stranger.keyed, &vote_write, &approve(true), unix_now(), &service).unwrap();
    expect(post(unknown, vote_write.clone()).await, 401, "UnknownSigner");
    let user = sign_gov(&s.users[0].keyed, &vote_write, &approve(true), unix_now(), &service).unwrap();
    expect(post(user, vote_write.clone()).await, 403, "NotAMember");
    // A ballot sent to the proposal endpoint, and a ballot for another proposal's path.
    let misdirected = sign_gov(a, &vote_write, &approve(true), unix_now(), &service).unwrap();
    expect(post(misdirected.clone(), GovWrite::Propose).await, 400, "WrongMessageType");
    expect(post(misdirected, GovWrite::Vote("other".into())).await, 400, "ProposalIdMismatch");
    // Garbage.
    expect(post(b"{\"approve\": true}".to_vec(), vote_write.clone()).await, 400, "MalformedSignedRequest");
    assert_eq!(snapshot().await, before, "refusals changed nothing");

    // A member that was accepted but has not acknowledged may not vote; after its ack it may.
    let newcomer = new_identity("newcomer");
    let add = propose(&c, a, json!([{ "name": "set_member", "args": { "cert": newcomer.keyed.cert_pem } }])).await;
    vote(&c, a, &add, true).await;
    assert_eq!(vote(&c, &s.members[1].keyed, &add, true).await["state"], "Accepted");
    let members = c.get("/gov/members").await.unwrap().json().unwrap();
    assert_eq!(members["members"][&newcomer.id]["status"], "Accepted");
    let id = propose(&c, a, threshold(2)).await;
    let early = c.gov(&newcomer.keyed, &GovWrite::Vote(id.clone()), &approve(true)).await.unwrap();
    expect(early, 403, "MemberNotActive");
    assert_eq!(state(&c, &id).await["ballots"], json!({}));
    c.gov_ok(&newcomer.keyed, &GovWrite::Ack, &json!({})).await.unwrap();
    let again = c.gov(&newcomer.keyed, &GovWrite::Ack, &json!({})).await.unwrap();
    expect(again, 409, "AlreadyActive");
    // Three Active members now: one approval is not enough, two are.
    assert_eq!(vote(&c, &newcomer.keyed, &id, true).await["state"], "Open");
    assert_eq!(vote(&c, a, &id, true).await["state"], "Accepted");

    // Every accepted request is kept verbatim, and its signature re-checks offline.
    let tx = s.node().service().store().begin().unwrap();
    let history = gov::all::<HistoryRecord>(&tx, gov::HISTORY).unwrap();
    assert!(history.len() >= 8, "{}", history.len());
    for (digest, record) in history {
        let bytes = base64::engine::general_purpose::STANDARD.decode(&record.cose).unwrap();
        let request = cose::parse(&bytes).unwrap();
        assert_eq!(request.digest(), digest, "kept under its identity: the digest of what was signed");
        let member = gov::member(&tx, &request.signer).unwrap().unwrap();
        request.verify(&member.cert).unwrap();
    }
}

fn key_record(key: &str, nace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({ "lei": key, "nace": nace })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_and_their_settings_change_by_vote() {
    let s = TestService::start(2, 0, RECONCILE, Default::default()).await;
    let (c0, c1) = (s.member(0).await, s.member(1).await);
    let [a, b] = [0, 1].map(|i| &s.members[i].keyed);
    let ingest = |c: &Client, key: &str| {
        let (c, body) = (c.clone(), key_record(key, "A"));
        async move { assert_eq!(c.post("/app/ingest", "application/json", body).await.unwrap().status, 200) }
    };
    ingest(&c0, "K1").await;
    ingest(&c1, "K1").await;
    let status = |c: &Client| {
        let c = c.clone();
        async move { c.get("/app/report/K1").await.unwrap().json().unwrap()["group_status"].clone() }
    };
    assert_eq!(status(&c0).await, "NOT_ENOUGH_DATA", "two votes, threshold 3");

    // set_app_config lowers the threshold, and the reports follow.
    let pass = |actions: Value| {
        let c0 = c0.clone();
        async move {
            let id = propose(&c0, a, actions).await;
            vote(&c0, a, &id, true).await;
            vote(&c0, b, &id, true).await
        }
    };
    let done = pass(json!([{ "name": "set_app_config", "args": { "config": { "threshold": 2 } } }])).await;
    assert_eq!(done["state"], "Accepted", "{done}");
    assert_eq!(status(&c0).await, "IN_CONSENSUS");

    // An invalid wasm is refused when proposed.
    let garbage = propose_json(json!([{ "name": "set_app", "args": { "wasm": b64(b"\0asm garbage") } }]));
    let bad = c0.gov(a, &GovWrite::Propose, &garbage).await.unwrap();
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("InvalidProposal") && bad.text().contains("wasm"), "{}", bad.text());
    // The same bytes in another proposal are refused from memory: checked and compiled once.
    let resent = json!([{ "name": "set_app", "args": { "wasm": b64(b"\0asm garbage") } }, { "name": "noop" }]);
    let again = c0.gov(a, &GovWrite::Propose, &propose_json(resent)).await.unwrap();
    assert_eq!(again.status, 400, "{}", again.text());
    assert!(again.text().contains("the wasm is refused"), "{}", again.text());
    let (_, exposition) = cloister_tests::metrics::scrape(&c0).await;
    assert_eq!(cloister_tests::metrics::value(&exposition, "cloister_wasm_modules_refused", &[]), 1.0);

    // Upgrade to another app: the new behaviour serves at once.
    let v1_hash = c0.get("/gov/app").await.unwrap().json().unwrap()["code_hash"].clone();
    let done = pass(json!([{ "name": "set_app", "args": { "wasm": b64(&misbehave_wasm()) } }])).await;
    assert_eq!(done["state"], "Accepted", "{done}");
    assert_eq!(c0.get("/app/report/K1").await.unwrap().status, 404, "the old endpoints are gone");
    assert_eq!(c0.get("/app/noop").await.unwrap().status, 204, "the new app answers");
    let app = c0.get("/gov/app").await.unwrap().json().unwrap();
    assert_ne!(app["code_hash"], v1_hash);
    assert!(app["manifest"]["endpoints"].to_string().contains("/noop"), "{app}");
    // …and the old app's state is intact: the first app, voted back, finds it all.
    let done = pass(json!([{ "name": "set_app", "args": { "wasm": b64(RECONCILE) } }])).await;
    assert_eq!(done["state"], "Accepted", "{done}");
    assert_eq!(status(&c0).await, "IN_CONSENSUS");
}

/// A proposal's node checks (each wasm compiles, each certificate parses) are part of the check a
/// signed request passes on the blocking pool before it may queue for the writer
/// (`gov::precheck`, bounded by `gov_checks_inflight_max`). Run only when the writer executed the
/// proposal, every module a member proposed was compiled on the writer thread, and every write
/// waited behind the compile: one member, proposing module after module, could keep the
/// service's writes stalled. The writer still runs the checks, finding the module compiled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposals_modules_are_compiled_before_it_queues_for_the_writer() {
    let s = TestService::start(1, 0, RECONCILE, Default::default()).await;
    let service = s.service_id();
    let m = &s.members[0].keyed;
    let runtime = cloister_runtime::Runtime::new(Default::default()).unwrap();
    let tx = s.node().service().store().begin().unwrap();
    let policy = cloister_node::config::GovSection::default().policy(unix_now());
    let check = |actions: Value| {
        let signed = sign_gov(m, &GovWrite::Propose, &propose_json(actions), unix_now(), &service).unwrap();
        cloister_node::gov::precheck(&runtime, &tx, &GovWrite::Propose, &signed, &policy)
    };
    let garbage = check(json!([{ "name": "set_app", "args": { "wasm": b64(b"\0asm garbage") } }])).unwrap_err();
    assert!(garbage.to_string().contains("the wasm is refused"), "{garbage}");
    let constitution = json!([{ "name": "set_constitution", "args": { "wasm": b64(RECONCILE) } }]);
    let no_constitution = check(constitution).unwrap_err();
    assert!(no_constitution.to_string().contains("no constitution"), "{no_constitution}");
    let bad_cert = check(json!([{ "name": "set_user", "args": { "cert": "not a certificate" } }])).unwrap_err();
    assert!(bad_cert.to_string().contains("args.cert"), "{bad_cert}");
    // Two certificates, the first behind text on its line: the node's parser saw the second
    // (the console showed its id), the constitution's the first (and filed the user under it).
    let (shown, filed) = (new_identity("shown").keyed.cert_pem, new_identity("filed").keyed.cert_pem);
    let two = check(json!([{ "name": "set_user", "args": { "cert": format!("x{filed}{shown}") } }])).unwrap_err();
    assert!(two.to_string().contains("one CERTIFICATE block and nothing else"), "{two}");
    check(json!([{ "name": "set_app", "args": { "wasm": b64(&misbehave_wasm()) } }])).expect("a module that loads");
    // A proposal accepted once is public in gov.history: a copy sent again is refused by the
    // check, before its modules compile (and before the writer).
    let actions = json!([{ "name": "set_app", "args": { "wasm": b64(&misbehave_wasm()) } }]);
    let signed = sign_gov(m, &GovWrite::Propose, &propose_json(actions), unix_now(), &service).unwrap();
    let filed = s.member(0).await.post("/gov/proposals", COSE_CONTENT_TYPE, signed.clone()).await.unwrap();
    assert_eq!(filed.status, 200, "{}", filed.text());
    let tx = s.node().service().store().begin().unwrap();
    let replayed = cloister_node::gov::precheck(&runtime, &tx, &GovWrite::Propose, &signed, &policy).unwrap_err();
    assert!(replayed.to_string().contains("already accepted"), "{replayed}");
    // So is any other accepted request sent again, a vote here: it never queues for the writer.
    let id = filed.json().unwrap()["proposal_id"].as_str().unwrap().to_owned();
    let vote = GovWrite::Vote(id);
    let signed = sign_gov(m, &vote, &json!({ "approve": false }), unix_now(), &service).unwrap();
    let voted = s.member(0).await.post(&vote.path(), COSE_CONTENT_TYPE, signed.clone()).await.unwrap();
    assert_eq!(voted.status, 200, "{}", voted.text());
    let tx = s.node().service().store().begin().unwrap();
    let replayed = cloister_node::gov::precheck(&runtime, &tx, &vote, &signed, &policy).unwrap_err();
    assert!(replayed.to_string().contains("already accepted"), "{replayed}");
}

/// The writer finds a proposal's modules and the constitution compiled however small the module
/// cache: a proposal's modules are held from its check until the writer has run it, the node
/// holds its installed constitution and app, and the cache evicts only modules nobody holds.
/// (Evicting any module, a one-module cache compiled each proposal's module a second time on
/// the writer thread, with every write waiting, and the constitution again for the next one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_finds_a_proposals_modules_compiled_however_small_the_cache() {
    let s = TestService::start_with(2, 0, RECONCILE, |c| c.wasm.modules_cached_max = 1).await;
    let service = s.service_id();
    let anonymous = s.client(None).await;
    let compiled = async || {
        let (_, exposition) = cloister_tests::metrics::scrape(&anonymous).await;
        cloister_tests::metrics::value(&exposition, "cloister_wasm_modules_compiled", &[])
    };
    // The installed modules compile after each governance change, off the request path: the
    // count is taken once it has not moved for 2 s (a compile on a loaded machine takes less).
    let mut before = compiled().await;
    let mut still = 0;
    for _ in 0..150 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let now = compiled().await;
        still = if now == before { still + 1 } else { 0 };
        before = now;
        if still == 10 {
            break;
        }
    }
    let propose = async |n: u8| {
        // misbehave.wasm with a custom section carrying n: a module of its own.
        let mut wasm = misbehave_wasm();
        wasm.extend_from_slice(&[0, 3, 1, b'n', n]);
        let actions = json!([{ "name": "set_app", "args": { "wasm": b64(&wasm) } }]);
        let signed =
            sign_gov(&s.members[0].keyed, &GovWrite::Propose, &propose_json(actions), unix_now(), &service).unwrap();
        let filed = s.member(0).await.post("/gov/proposals", COSE_CONTENT_TYPE, signed).await.unwrap();
        assert_eq!(filed.status, 200, "{}", filed.text());
        assert_eq!(filed.json().unwrap()["state"], "Open");
    };
    // Two at a time (gov_checks_per_address_max): the second's module compiles while the first
    // waits for the writer, or the other way round.
    for n in [0, 2, 4] {
        tokio::join!(propose(n), propose(n + 1));
    }
    assert_eq!(compiled().await, before + 6.0, "each proposal's module compiled once, and nothing else");
}

/// Who may call, and what is installed, follow every vote at once, although a node remembers
/// callers, the app and the service's state until a `gov.` map next changes: a user added by
/// vote is served at its first call after the vote (having been refused as nobody before), a
/// user removed is refused at its next, and an app removed answers 404 at the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_and_the_app_follow_each_vote_at_once() {
    let s = TestService::start(1, 1, RECONCILE, Default::default()).await;
    let member = s.member(0).await;
    let m = &s.members[0].keyed;
    let pass = |actions: Value| {
        let member = member.clone();
        async move {
            let (_, done) = member.pass(m, &[m], actions).await.unwrap();
            assert_eq!(done["state"], "Accepted", "{done}");
        }
    };
    let ingest = |c: Client| async move {
        let reply = c.post("/app/ingest", "application/json", key_record("K1", "A")).await.unwrap();
        (reply.status, reply.text())
    };
    let user = s.client(Some(&s.users[0].keyed)).await;
    let newcomer = new_identity("newcomer");
    let newcomer_client = s.client(Some(&newcomer.keyed)).await;
    assert_eq!(ingest(user.clone()).await.0, 200);
    for _ in 0..2 {
        let (status, text) = ingest(newcomer_client.clone()).await;
        assert_eq!(status, 401, "{text}");
        assert!(text.contains(&newcomer.id), "{text}");
    }

    pass(json!([{ "name": "set_user", "args": { "cert": newcomer.keyed.cert_pem } }])).await;
    assert_eq!(ingest(newcomer_client.clone()).await.0, 200, "served at its first call after the vote");
    pass(json!([{ "name": "remove_user", "args": { "id": s.users[0].id } }])).await;
    let (status, text) = ingest(user.clone()).await;
    assert_eq!(status, 401, "refused at its next call after the vote: {text}");
    assert_eq!(ingest(newcomer_client.clone()).await.0, 200);

    pass(json!([{ "name": "remove_app" }])).await;
    let (status, text) = ingest(newcomer_client).await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("no app is installed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_constitution_cannot_hang_or_crash_the_node() {
    let s = TestService::start_with(1, 0, RECONCILE, |c| c.wasm.wall_time_ms = 1_000).await;
    let c = s.member(0).await;
    let a = &s.members[0].keyed;
    let id = propose(&c, a, json!([{ "name": "set_constitution", "args": { "wasm": b64(&misbehave_wasm()) } }])).await;
    assert_eq!(vote(&c, a, &id, true).await["state"], "Accepted");

    // Whichever of fuel and wall time runs out first stops a loop.
    let stopped = |text: &str| text.contains("fuel_per_request") || text.contains("wall_time_ms");
    for (action, why) in [("loop", "loops forever"), ("grow", "memory")] {
        let answer = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": action }]))).await.unwrap();
        assert_eq!(answer["state"], "Failed", "{answer}");
        assert!(answer["reason"].as_str().unwrap().contains(why), "{action}: {answer}");
    }
    // A resolve that loops fails the request itself, and nothing of it is kept.
    let before = c.get("/gov/proposals").await.unwrap().json().unwrap();
    let reply = c.gov(a, &GovWrite::Propose, &propose_json(json!([{ "name": "loop_in_resolve" }]))).await.unwrap();
    assert!(reply.status >= 500, "{} {}", reply.status, reply.text());
    assert!(stopped(&reply.text()), "{}", reply.text());
    assert_eq!(c.get("/gov/proposals").await.unwrap().json().unwrap(), before);
    // Records only the node writes stay as they were: the service identity's certificate, which
    // clients fetch from gov.service, and the endorsements receipts and TLS rest on.
    let service_before = c.get("/gov/service").await.unwrap().json().unwrap();
    let endorsements_before = c.get("/gov/endorsements").await.unwrap().json().unwrap();
    let recovery_before = c.get("/gov/recovery").await.unwrap().json().unwrap();
    for (action, why) in [
        ("rewrite_service_identity", "the node alone writes"),
        ("endorse_a_stranger", "written by the node alone"),
        ("back_to_recovering", "may go from Opening to Open"),
        ("forge_previous_identity", "previous_identities are the node's"),
        ("replace_recovery_shares", "written by the node alone"),
        ("drop_recovery_shares", "cannot remove"),
        ("forge_ledger_secret", "written by the node alone, when it rekeys"),
        ("swap_attestation_root", "fixed at genesis"),
        ("drop_attestation_root", "no proposal removes it"),
        ("swap_node_key", "a node's status in gov.nodes, nothing else"),
        ("invent_node", "written by the node alone, when a node attests"),
        ("drop_node", "gov.nodes is written by the node alone; a constitution cannot remove from it"),
        ("forget_history", "gov.history is written by the node alone, as it handles governance requests"),
        ("accept_another", "gov.proposals is written by the node alone, as it handles governance requests"),
        ("pad_open_proposals", "gov.proposals_open is written by the node alone"),
        ("misfile_user", "gov.users files a record under its certificate's id"),
    ] {
        let cert = new_identity("shown").keyed.cert_pem;
        let actions = json!([{ "name": action, "args": { "cert": cert } }]);
        let answer = c.gov_ok(a, &GovWrite::Propose, &propose_json(actions)).await.unwrap();
        assert_eq!(answer["state"], "Failed", "{action}: {answer}");
        assert!(answer["reason"].as_str().unwrap().contains(why), "{action}: {answer}");
    }
    assert_eq!(c.get("/gov/service").await.unwrap().json().unwrap(), service_before);
    assert_eq!(c.get("/gov/endorsements").await.unwrap().json().unwrap(), endorsements_before);
    assert_eq!(c.get("/gov/recovery").await.unwrap().json().unwrap(), recovery_before);
    assert_eq!(c.get("/gov/ledger_secrets").await.unwrap().json().unwrap()["version"], 1);
    // A constitution built before node records held an encryption key writes one back without
    // it: the proposal passes, and the node keeps the key in the record.
    let keys = async || -> Vec<Value> {
        let nodes = c.get("/node/attestations").await.unwrap().json().unwrap();
        nodes["nodes"].as_array().unwrap().iter().map(|n| n["encryption_key"].clone()).collect()
    };
    let keys_before = keys().await;
    assert!(keys_before.iter().all(Value::is_string), "{keys_before:?}");
    let forget = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "forget_node_key" }]))).await.unwrap();
    assert_eq!(forget["state"], "Accepted", "{forget}");
    assert_eq!(keys().await, keys_before);
    // A constitution may ask for a rekey, which the leader answers, but not take one back.
    let ask = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "ask_rekey" }]))).await.unwrap();
    assert_eq!(ask["state"], "Accepted", "{ask}");
    let answer = c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "take_back_rekey" }]))).await.unwrap();
    assert_eq!(answer["state"], "Failed", "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("rekeys_requested only grows"), "{answer}");
    let start = std::time::Instant::now();
    while c.get("/gov/ledger_secrets").await.unwrap().json().unwrap()["version"] != 2 {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "the leader did not rekey");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The node still serves apps and governance.
    assert_eq!(c.get("/app/report").await.unwrap().status, 200);
    assert_eq!(
        c.gov_ok(a, &GovWrite::Propose, &propose_json(json!([{ "name": "noop" }]))).await.unwrap()["state"],
        "Accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_serves_apps_only_once_open() {
    let s = TestService::start_opening(2, 1, RECONCILE, |_| {}).await;
    let user = s.client(Some(&s.users[0].keyed)).await;
    let refused = user.get("/app/report").await.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.text().contains("service not open"));
    assert_eq!(s.member(0).await.get("/app/report").await.unwrap().status, 503);
    let service = user.get("/gov/service").await.unwrap().json().unwrap();
    assert_eq!(service["state"], "Opening");

    cloister_tests::open_service(&s.member(0).await, &s.members).await;
    assert_eq!(user.get("/gov/service").await.unwrap().json().unwrap()["state"], "Open");
    assert_eq!(user.get("/app/report").await.unwrap().status, 200);
    // Opening twice is refused by the constitution's validation.
    let again = s.member(0).await;
    let reply = again
        .gov(&s.members[0].keyed, &GovWrite::Propose, &propose_json(json!([{ "name": "transition_service_to_open" }])))
        .await
        .unwrap();
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("already open"), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_over_grpc() {
    use cloister_proto::gov::v1::{ReadRequest, WriteRequest, gov_client::GovClient};
    let s = TestService::start(1, 0, RECONCILE, Default::default()).await;
    let service = s.service_id();
    let channel = cloister_client::grpc_channel(&s.grpc_url(), &s.ca_pem, None).await.unwrap();
    let mut gov = GovClient::new(channel);
    let a = &s.members[0].keyed;
    let body = sign_gov(a, &GovWrite::Propose, &propose_json(threshold(1)), unix_now(), &service).unwrap();
    let reply = gov.write(WriteRequest { path: "/gov/proposals".into(), cose_sign1: body.clone() }).await.unwrap();
    let answer: Value = serde_json::from_str(&reply.get_ref().json).unwrap();
    assert!(!reply.get_ref().tx_id.is_empty());
    let id = answer["proposal_id"].as_str().unwrap();
    let replay = gov.write(WriteRequest { path: "/gov/proposals".into(), cose_sign1: body }).await.unwrap_err();
    assert_eq!(replay.code(), tonic::Code::AlreadyExists, "{replay:?}");
    let read = gov.read(ReadRequest { path: format!("/gov/proposals/{id}") }).await.unwrap();
    assert!(read.get_ref().json.contains("set_recovery_threshold"));
}

/// A signed request names the service it is for. A member of two services (one certificate
/// on both, as a consortium may keep for a staging and a production service) signed requests
/// that either would accept, so anyone who saw one sent to one service (the operator of the
/// node it reached, say) could replay it to the other within `request_window_s`: a proposal,
/// a ballot, an ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_signed_for_one_service_is_refused_by_another() {
    let a = TestService::start_opening(1, 0, RECONCILE, |_| {}).await;
    let members = a.config.genesis.members.clone();
    let b = TestService::start_opening(1, 0, RECONCILE, move |c| c.genesis.members = members).await;
    let member = &a.members[0].keyed;
    assert_ne!(a.service_id(), b.service_id());
    let proposal = propose_json(threshold(1));
    let (to_a, to_b) = (a.client(Some(member)).await, b.client(Some(member)).await);
    let signed = to_a.sign_gov(member, &GovWrite::Propose, &proposal).await.unwrap();
    let filed = to_a.post("/gov/proposals", COSE_CONTENT_TYPE, signed.clone()).await.unwrap();
    assert_eq!(filed.status, 200, "{}", filed.text());
    let filed_on_b = async || to_b.get("/gov/proposals").await.unwrap().text();
    let before = filed_on_b().await;
    let replayed = to_b.post("/gov/proposals", COSE_CONTENT_TYPE, signed).await.unwrap();
    assert_eq!(replayed.status, 400, "{}", replayed.text());
    assert_eq!(replayed.json().unwrap()["error"]["code"], "WrongService", "{}", replayed.text());
    assert_eq!(filed_on_b().await, before, "nothing was filed");
    // The member's own request to the second service, signed for it, is filed there.
    let own = to_b.gov(member, &GovWrite::Propose, &proposal).await.unwrap();
    assert_eq!(own.status, 200, "{}", own.text());
}

/// Sends a signal to every node of `c` but `spared`: SIGSTOP freezes them, SIGCONT resumes them.
fn signal_all_but(c: &Cluster, spared: usize) -> impl Fn(i32) {
    let others: Vec<i32> = (0..c.nodes.len())
        .filter(|i| *i != spared)
        .map(|i| i32::try_from(c.nodes[i].pid().unwrap()).unwrap())
        .collect();
    move |signal| {
        for pid in &others {
            // SAFETY: kill(2) on a child process this test started.
            assert_eq!(unsafe { libc::kill(*pid, signal) }, 0);
        }
    }
}

/// A follower refuses a forged governance request itself: a signature that fails against the
/// certificate its signer's id names fails on every node. Forwarded, as it was, each forged copy
/// cost the leader a P-384 check in its shared `gov_checks_inflight_max` slots, past the
/// per-address bound the follower had applied, so one address could keep members' requests out
/// through a follower. The other two nodes are frozen (SIGSTOP): a request the follower forwards
/// gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_a_forged_governance_request_without_the_leader() {
    let mut c = Cluster::start(3, 1, RECONCILE, |_| {}).await;
    let leader = c.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    let client = c.client(follower, 0).await.unwrap();
    let service = client.service_id().await.unwrap();
    let mut forged =
        sign_gov(&c.members[0].keyed, &GovWrite::Propose, &propose_json(threshold(1)), unix_now(), &service).unwrap();
    *forged.last_mut().unwrap() ^= 1;
    let signal = signal_all_but(&c, follower);
    signal(libc::SIGSTOP);
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.post(&GovWrite::Propose.path(), COSE_CONTENT_TYPE, forged),
    )
    .await;
    signal(libc::SIGCONT);
    let reply = answered.expect("the follower answers without the leader").unwrap();
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.json().unwrap()["error"]["code"], "BadSignature", "{}", reply.text());
}

/// A follower holds a forwarded governance request's share of `gov_checks_per_address_max`
/// until the leader answers it. (Given back after the follower's own check, one address could
/// keep any number of requests at the leader, which counts forwarded ones against its overall
/// bound only, and so fill its checks.) The other two nodes are frozen (SIGSTOP), so the first
/// request, from a signer the follower cannot refuse on its own, waits there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_holds_the_addresss_share_while_it_forwards() {
    let mut c = Cluster::start(3, 1, RECONCILE, |config| {
        config.limits.gov_checks_per_address_max = 1;
        // The follower must still know the frozen leader when it forwards: a candidate would
        // hold the request waiting for a leader, with no forward to wait on.
        config.raft.election_timeout_min_ms = 20_000;
        config.raft.election_timeout_max_ms = 30_000;
    })
    .await;
    let leader = c.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    let client = c.client(follower, 0).await.unwrap();
    let service = client.service_id().await.unwrap();
    let stranger = new_identity("stranger");
    let signed =
        || sign_gov(&stranger.keyed, &GovWrite::Propose, &propose_json(threshold(1)), unix_now(), &service).unwrap();
    let signal = signal_all_but(&c, follower);
    signal(libc::SIGSTOP);
    let first = tokio::spawn({
        let (client, body) = (client.clone(), signed());
        async move { client.post(&GovWrite::Propose.path(), COSE_CONTENT_TYPE, body).await }
    });
    // The follower checks the first request and forwards it; the second is sent only once the
    // follower's metrics show the first waiting on the leader, past the follower's own check.
    let mut forwarded = false;
    for _ in 0..300 {
        let (_, metrics) = c.metrics(follower).await;
        if cloister_tests::metrics::value(&metrics, "cloister_forwards_waiting", &[]) == 1.0 {
            forwarded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(forwarded, "the follower forwarded the first request within 15 s");
    let second = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.post(&GovWrite::Propose.path(), COSE_CONTENT_TYPE, signed()),
    )
    .await;
    signal(libc::SIGCONT);
    let reply = second.expect("refused at once, not forwarded to wait").unwrap();
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert!(reply.text().contains("gov_checks_per_address_max"), "{}", reply.text());
    let first = first.await.unwrap().unwrap();
    assert!(matches!(first.status, 401 | 403), "the leader refuses the stranger: {}", first.text());
}
