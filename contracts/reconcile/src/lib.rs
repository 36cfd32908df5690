//! Data reconciliation: consortium parties submit records; every key collects one vote per party;
//! each party sees how its own values agree with the others' without seeing their values or
//! identities.
//!
//! Endpoints (under `/app`):
//! - `POST /ingest`: one JSON record or an array of them; one transaction per request.
//! - `POST /csv/ingest`: the same as CSV with a header row.
//! - `GET /report?limit=N&after=KEY`: the caller's keys in key order, one page at a time; when
//!   more rows remain, the `x-next-cursor` header holds the value to pass as `after`.
//! - `GET /report/{key}`: one key the caller submitted.
//!
//! Semantics follow the public reference scenario (see `tests/conformance/recon-sample`).

use std::collections::{BTreeMap, BTreeSet};

use cloister_sdk::{Error, Map, Request, Response, Router, export};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub mod ingest;
pub mod settings;

use ingest::Record;
use settings::{KEY_BYTES_MAX, Settings};

/// Rows in a report page when the caller names no `limit`.
pub const REPORT_PAGE_ROWS_DEFAULT: usize = 1_000;
/// Largest `limit` a report page accepts.
pub const REPORT_PAGE_ROWS_MAX: usize = 10_000;

/// The votes on one key: each party's attribute values, by party id. Private (sealed).
const RECORDS: Map<String, Votes> = Map::new("records");
/// Which keys each party submitted, for its report. Private (sealed).
const PARTY_KEYS: Map<(String, String), ()> = Map::new("party_keys");

#[derive(Debug, Default, Serialize, Deserialize)]
struct Votes {
    by_party: BTreeMap<String, BTreeMap<String, String>>,
}

pub fn router() -> Router {
    Router::new()
        .post("/ingest", ingest_json)
        .post("/csv/ingest", ingest_csv)
        .get("/report", report_all)
        .get("/report/{key}", report_one)
}

export!(router);

fn ingest_json(req: &Request) -> Result<Response, Error> {
    let settings = Settings::load()?;
    store(req, ingest::from_json(&settings, req.body())?)
}

fn ingest_csv(req: &Request) -> Result<Response, Error> {
    let settings = Settings::load()?;
    store(req, ingest::from_csv(&settings, req.body())?)
}

/// Records each row as the caller's vote; within a batch the later row for a key wins.
fn store(req: &Request, records: Vec<Record>) -> Result<Response, Error> {
    let party = &req.caller().id;
    let rows = records.len();
    let latest: BTreeMap<String, BTreeMap<String, String>> = records.into_iter().map(|r| (r.key, r.values)).collect();
    for (key, values) in &latest {
        let mut votes = RECORDS.get(key).unwrap_or_default();
        votes.by_party.insert(party.clone(), values.clone());
        RECORDS.insert(key, &votes);
        PARTY_KEYS.insert(&(party.clone(), key.clone()), &());
    }
    Ok(Response::json(&json!({ "rows": rows, "keys": latest.len() })))
}

fn report_one(req: &Request) -> Result<Response, Error> {
    let settings = Settings::load()?;
    let key = req.param("key").unwrap_or_default().to_owned();
    // Unknown keys and keys the caller never submitted answer identically: no existence leak.
    let not_found = || Error::not_found("no record submitted by you has this key");
    // Longer than any key ingest takes: no record's (and looked up, past the node's key bound,
    // it trapped the contract).
    if key.len() > KEY_BYTES_MAX {
        return Err(not_found());
    }
    let votes = RECORDS.get(&key).ok_or_else(not_found)?;
    let row = report_row(&settings, &key, &votes, &req.caller().id).ok_or_else(not_found)?;
    Ok(Response::json(&row))
}

fn report_all(req: &Request) -> Result<Response, Error> {
    let settings = Settings::load()?;
    let limit = match req.query("limit") {
        None => REPORT_PAGE_ROWS_DEFAULT,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=REPORT_PAGE_ROWS_MAX).contains(n))
            .ok_or_else(|| Error::bad_request(format!("limit must be 1..={REPORT_PAGE_ROWS_MAX}, got {s:?}")))?,
    };
    let party = req.caller().id.clone();
    let keys: Vec<String> = match req.query("after") {
        Some(after) if after.len() > KEY_BYTES_MAX => {
            return Err(Error::bad_request(format!(
                "after is a key the report gave as its cursor: at most {KEY_BYTES_MAX} bytes"
            )));
        }
        Some(after) => PARTY_KEYS.prefix_after(&party, &after.to_owned()),
        None => PARTY_KEYS.prefix(&party),
    }
    .map(|((_, key), ())| key)
    .take(limit + 1)
    .collect();
    let mut rows = Vec::with_capacity(keys.len().min(limit));
    for key in keys.iter().take(limit) {
        let votes = RECORDS.get(key).unwrap_or_default();
        rows.extend(report_row(&settings, key, &votes, &party));
    }
    let mut response = Response::json(&rows);
    if keys.len() > limit {
        let cursor = percent_encoding::utf8_percent_encode(&keys[limit - 1], percent_encoding::NON_ALPHANUMERIC);
        response = response.with_header("x-next-cursor", cursor.to_string());
    }
    Ok(response)
}

/// The caller's view of one key: its own values and the vote counts, never others' values.
fn report_row(settings: &Settings, key: &str, votes: &Votes, party: &str) -> Option<Value> {
    let compared = |values: &BTreeMap<String, String>| -> Vec<Option<String>> {
        settings.attribute_fields.iter().map(|f| values.get(f).cloned()).collect()
    };
    let mine = votes.by_party.get(party)?;
    let my_values = compared(mine);
    let all: Vec<_> = votes.by_party.values().map(compared).collect();
    let total_votes = all.len();
    let in_agreement = all.iter().filter(|v| **v == my_values).count();
    let unique_values = all.iter().collect::<BTreeSet<_>>().len();
    let status = if total_votes < settings.threshold as usize {
        "NOT_ENOUGH_DATA"
    } else if unique_values > 1 {
        "LACK_OF_CONSENSUS"
    } else {
        "IN_CONSENSUS"
    };
    let side = if in_agreement > total_votes - in_agreement { "Majority" } else { "Minority" };
    let mut row = serde_json::Map::new();
    row.insert(settings.key_field.clone(), json!(key));
    for (field, value) in settings.attribute_fields.iter().zip(my_values) {
        row.insert(field.clone(), json!(value));
    }
    row.insert("group_status".into(), json!(status));
    row.insert("majority_minority".into(), json!(side));
    row.insert("count_of_unique_values".into(), json!(unique_values));
    row.insert("members_in_agreement".into(), json!(in_agreement));
    row.insert("total_votes".into(), json!(total_votes));
    Some(Value::Object(row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_sdk::Caller;
    use cloister_sdk::testing::MemoryHost;

    fn host() -> MemoryHost {
        MemoryHost::new(router())
    }

    fn ingest(h: &mut MemoryHost, who: &Caller, body: &str) -> u16 {
        h.call(who, "POST", "/ingest", body).head.status
    }

    fn report(h: &mut MemoryHost, who: &Caller, target: &str) -> (u16, Value) {
        let r = h.call(who, "GET", target, "");
        (r.head.status, r.body_json().unwrap())
    }

    /// A key longer than any ingest takes, in the path or as the cursor, trapped the contract
    /// (500: past the node's key bound) where it names no record (404) or no cursor (400).
    #[test]
    fn a_key_longer_than_any_record_s_is_answered_not_trapped() {
        let mut h = host();
        let a = Caller::member("a");
        assert_eq!(ingest(&mut h, &a, r#"{"lei":"K","nace":"X"}"#), 200);
        let long = "k".repeat(5000);
        let (status, unknown) = report(&mut h, &a, "/report/NO-SUCH-KEY");
        assert_eq!(status, 404);
        assert_eq!(report(&mut h, &a, &format!("/report/{long}")), (404, unknown));
        let (status, body) = report(&mut h, &a, &format!("/report?after={long}"));
        assert_eq!(status, 400, "{body}");
        let longest = "k".repeat(KEY_BYTES_MAX);
        assert_eq!(report(&mut h, &a, &format!("/report?after={longest}")), (200, json!([])));
    }

    #[test]
    fn votes_agree_disagree_and_replace() {
        let mut h = host();
        let (a, b, c) = (Caller::member("a"), Caller::member("b"), Caller::user("c"));
        assert_eq!(ingest(&mut h, &a, r#"{"lei":"K","nace":"X"}"#), 200);
        assert_eq!(ingest(&mut h, &b, r#"{"lei":"K","nace":"X"}"#), 200);
        let (_, row) = report(&mut h, &a, "/report/K");
        assert_eq!(row["group_status"], "NOT_ENOUGH_DATA");
        assert_eq!(row["members_in_agreement"], 2);
        assert_eq!(ingest(&mut h, &c, r#"{"lei":"K","nace":"Y"}"#), 200);
        let (_, row) = report(&mut h, &c, "/report/K");
        assert_eq!(
            row,
            json!({"lei":"K","nace":"Y","group_status":"LACK_OF_CONSENSUS","majority_minority":"Minority",
                   "count_of_unique_values":2,"members_in_agreement":1,"total_votes":3})
        );
        // c changes its mind: its new value replaces the old one, not a fourth vote.
        assert_eq!(ingest(&mut h, &c, r#"[{"lei":"K","nace":"Z"},{"lei":"K","nace":"X"}]"#), 200);
        let (_, row) = report(&mut h, &c, "/report/K");
        assert_eq!(row["group_status"], "IN_CONSENSUS");
        assert_eq!(row["total_votes"], 3);
        assert_eq!(row["nace"], "X");
    }

    #[test]
    fn a_party_never_sees_others_values_or_ids() {
        let mut h = host();
        let (a, b) = (Caller::member("party-a-id"), Caller::member("party-b-id"));
        ingest(&mut h, &a, r#"{"lei":"K","nace":"SECRET-A"}"#);
        ingest(&mut h, &b, r#"[{"lei":"K","nace":"SECRET-B"},{"lei":"ONLY-B","nace":"Q"}]"#);
        let page = h.call(&a, "GET", "/report", "");
        let text = String::from_utf8(page.body.clone()).unwrap();
        assert!(text.contains("SECRET-A"));
        for leak in ["SECRET-B", "party-b-id", "ONLY-B"] {
            assert!(!text.contains(leak), "{leak} leaked: {text}");
        }
        // Unknown key and someone else's key are indistinguishable.
        let unknown = h.call(&a, "GET", "/report/NOPE", "");
        let others = h.call(&a, "GET", "/report/ONLY-B", "");
        assert_eq!(unknown.head.status, 404);
        assert_eq!((unknown.head, unknown.body), (others.head, others.body));
    }

    #[test]
    fn invalid_batches_store_nothing() {
        let mut h = host();
        let a = Caller::member("a");
        ingest(&mut h, &a, r#"{"lei":"K","nace":"X"}"#);
        let before = h.dump();
        for bad in [r#"[{"lei":"L","nace":"X"},{"lei":"M"}]"#, "[]", "null", "{", r#"{"lei":"K","nace":1}"#] {
            assert_eq!(ingest(&mut h, &a, bad), 400, "{bad}");
        }
        let r = h.call(&a, "POST", "/csv/ingest", "lei,value\nK,Y\n");
        assert_eq!(r.head.status, 400);
        assert_eq!(h.dump(), before);
    }

    #[test]
    fn reports_paginate_in_key_order() {
        let mut h = host();
        let a = Caller::user("a");
        let rows: Vec<Value> = (0..25).map(|i| json!({"lei": format!("K{i:02}"), "nace": "X"})).collect();
        assert_eq!(ingest(&mut h, &a, &serde_json::to_string(&rows).unwrap()), 200);
        let mut seen = Vec::new();
        let mut target = "/report?limit=10".to_owned();
        loop {
            let r = h.call(&a, "GET", &target, "");
            let page: Vec<Value> = r.body_json().unwrap();
            seen.extend(page.iter().map(|row| row["lei"].as_str().unwrap().to_owned()));
            match r.head.headers.get("x-next-cursor") {
                Some(c) => target = format!("/report?limit=10&after={c}"),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("K{i:02}")).collect();
        assert_eq!(seen, expected);
        assert_eq!(h.call(&a, "GET", "/report?limit=0", "").head.status, 400);
        assert_eq!(h.call(&a, "GET", &format!("/report?limit={}", REPORT_PAGE_ROWS_MAX + 1), "").head.status, 400);
        assert_eq!(h.call(&a, "GET", &format!("/report?limit={REPORT_PAGE_ROWS_MAX}"), "").head.status, 200);
    }

    #[test]
    fn settings_come_from_governance() {
        let mut h = host();
        h.seed("gov.app_config", &"threshold".to_owned(), &json!(2));
        h.seed("gov.app_config", &"key_field".to_owned(), &json!("id"));
        h.seed("gov.app_config", &"attribute_fields".to_owned(), &json!(["colour", "size"]));
        let (a, b) = (Caller::member("a"), Caller::member("b"));
        assert_eq!(ingest(&mut h, &a, r#"{"id":"1","colour":"red","size":"L"}"#), 200);
        assert_eq!(ingest(&mut h, &b, r#"{"id":"1","colour":"red","size":"M"}"#), 200);
        assert_eq!(ingest(&mut h, &b, r#"{"lei":"1","nace":"x"}"#), 400);
        let (_, row) = report(&mut h, &a, "/report/1");
        assert_eq!(row["group_status"], "LACK_OF_CONSENSUS");
        assert_eq!(row["size"], "L");
        h.seed("gov.app_config", &"threshold".to_owned(), &json!(0));
        let (status, body) = report(&mut h, &a, "/report/1");
        assert_eq!(status, 500);
        assert!(body["error"]["message"].as_str().unwrap().contains("threshold"));
    }

    #[test]
    fn apps_cannot_write_governance() {
        // The SDK refuses writes to gov.* inside the app, so the contract cannot even try; this
        // pins the behaviour a handler would meet.
        assert!(cloister_sdk::abi::check_write("gov.app_config", cloister_sdk::Mode::Readwrite).is_err());
    }
}

/// Property tests: any body to either ingest endpoint — arbitrary bytes, or CSV and JSON shaped
/// almost right — is answered 200 or 4xx with the rows it refused, never a panic, and a refused
/// batch changes nothing.
#[cfg(test)]
mod fuzz {
    use cloister_sdk::Caller;
    use cloister_sdk::testing::MemoryHost;
    use cloister_test_support::config;
    use cloister_test_support::proptest::prelude::*;

    use super::router;

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048),
            "[a-z,\"\\n ]{0,300}".prop_map(|s| format!("lei,nace\n{s}").into_bytes()),
            "[\\[\\]{}:,\"a-z0-9 ]{0,300}".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_ingest_body_is_answered_and_a_refusal_changes_nothing(bytes in body(), csv in any::<bool>()) {
            let mut host = MemoryHost::new(router());
            let party = Caller::member("party");
            let path = if csv { "/csv/ingest" } else { "/ingest" };
            let before = host.call(&party, "GET", "/report", "").body;
            let reply = host.call(&party, "POST", path, &bytes);
            let status = reply.head.status;
            prop_assert!(status == 200 || (400..500).contains(&status), "answered {status}");
            if status != 200 {
                prop_assert_eq!(host.call(&party, "GET", "/report", "").body, before, "a refused batch wrote");
            }
        }
    }
}
