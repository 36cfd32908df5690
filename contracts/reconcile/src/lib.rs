//! Data reconciliation: consortium parties submit records; every key collects one vote per party;
//! each party sees how its own values agree with the others' without seeing their values or
//! identities.
//!
//! Endpoints (under `/app`):
//! - `POST /ingest`: one JSON record or an array of them; one transaction per request.
//! - `POST /csv/ingest`: the same as CSV with a header row.
//! - `GET /report?limit=N&after=KEY`: the caller's keys in key order, one page at a time (at most
//!   `limit` rows, and no more than [`REPORT_PAGE_BYTES_MAX`] bytes unless its one row is); when
//!   more rows remain, the `x-next-cursor` header holds the value to pass as `after`.
//! - `GET /report/{key}`: one key the caller submitted.
//!
//! Semantics follow the public reference scenario (see `tests/conformance/recon-sample`).

use std::collections::{BTreeMap, BTreeSet};

use cloister_sdk::{Error, Map, Request, Response, Router, export};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub mod ingest;
pub mod settings;

use ingest::Record;
use settings::{KEY_BYTES_MAX, Settings};

/// Rows in a report page when the caller names no `limit`.
pub const REPORT_PAGE_ROWS_DEFAULT: usize = 1_000;
/// Largest `limit` a report page accepts.
pub const REPORT_PAGE_ROWS_MAX: usize = 10_000;
/// Most bytes of JSON in a report page: a page ends before the row that would pass it (it holds
/// one row at least), and its cursor goes on from there. Half the node's default
/// `wasm.response_bytes_max`: the largest rows (many fields of the longest values) made a page of
/// `limit` rows the node refused to send. A node configured with a `response_bytes_max` below it
/// refuses pages past its own bound (500); its parties page with a smaller `limit`.
pub const REPORT_PAGE_BYTES_MAX: usize = 4 << 20;

/// What a report compares of the votes on a key: each attribute value's compared form (see
/// [`Compared::form`]), by party id. Private (sealed). Every ingest of the key rewrites it, so
/// it is what the other parties' votes add to a party's write: at most 65 bytes a field and
/// party, whatever their values' lengths.
const COMPARED: Map<String, Compared> = Map::new("compared");
/// The votes on a key as versions of the app before `compared` kept them: each
/// party's values, by party id, rewritten whole by every ingest of the key. Private (sealed).
/// Only read now: for a party whose `party_keys` entry is `null`, its vote; for a key no ingest
/// has touched since, the others' too.
const RECORDS: Map<String, Votes> = Map::new("records");
/// The keys each party submitted, for its report, each with the party's vote: its attribute
/// values; `null` where an older version recorded the key, whose votes are then in `records`.
/// Private (sealed).
const PARTY_KEYS: Map<(String, String), Option<BTreeMap<String, String>>> = Map::new("party_keys");

#[derive(Debug, Default, Serialize, Deserialize)]
struct Votes {
    by_party: BTreeMap<String, BTreeMap<String, String>>,
}

/// The votes on a key as a report compares them: by party id, each field's compared form.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Compared {
    by_party: BTreeMap<String, BTreeMap<String, String>>,
}

/// Values longer than this are compared by their SHA-256: the length of its hex.
const COMPARED_VALUE_BYTES_MAX: usize = 64;

impl Compared {
    /// What a report compares of a value: the value itself (`=` and the value) when it is no
    /// longer than a digest's hex, else its SHA-256 (`#` and the hex). Two values have the same
    /// form exactly when they are equal; short values, the common case, cost no hashing.
    fn form(value: &str) -> String {
        if value.len() <= COMPARED_VALUE_BYTES_MAX {
            format!("={value}")
        } else {
            format!("#{}", hex::encode(Sha256::digest(value)))
        }
    }

    fn of(values: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        values.iter().map(|(field, value)| (field.clone(), Compared::form(value))).collect()
    }

    /// The compared forms of the votes an older version kept whole.
    fn of_votes(votes: &Votes) -> Compared {
        Compared {
            by_party: votes.by_party.iter().map(|(party, values)| (party.clone(), Compared::of(values))).collect(),
        }
    }
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
    let keys = latest.len();
    for (key, values) in latest {
        let mut compared = COMPARED.get(&key).unwrap_or_else(|| moved_over(&key));
        compared.by_party.insert(party.clone(), Compared::of(&values));
        COMPARED.insert(&key, &compared);
        PARTY_KEYS.insert(&(party.clone(), key), &Some(values));
    }
    Ok(Response::json(&json!({ "rows": rows, "keys": keys })))
}

/// What a report compares of a key an older version wrote (`records`) and no ingest has touched
/// since: built once, by the key's first ingest since the upgrade, from every party's vote there.
/// None: a new key. Only `compared` is written: the other parties' votes stay in `records`, their
/// `party_keys` entries `null`, until they vote on the key again (rewriting each of them would
/// make this ingest write a key per party for every such key).
fn moved_over(key: &String) -> Compared {
    RECORDS.get(key).map(|votes| Compared::of_votes(&votes)).unwrap_or_default()
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
    let party = req.caller().id.clone();
    let mine = PARTY_KEYS.get(&(party.clone(), key.clone())).ok_or_else(not_found)?;
    let row = report_row(&settings, &key, &party, mine).ok_or_else(not_found)?;
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
    let party_keys = PARTY_KEYS;
    let entries = match req.query("after") {
        Some(after) if after.len() > KEY_BYTES_MAX => {
            return Err(Error::bad_request(format!(
                "after is a key the report gave as its cursor: at most {KEY_BYTES_MAX} bytes"
            )));
        }
        Some(after) => party_keys.prefix_after(&party, &after.to_owned()),
        None => party_keys.prefix(&party),
    };
    // The page's JSON array, written row by row as the caller's keys are read (each with its
    // vote, so not gathered first), so that it can end at REPORT_PAGE_BYTES_MAX.
    let mut page = b"[".to_vec();
    let mut rows = 0;
    let mut next_after = None;
    let mut last = None;
    for (i, ((_, key), mine)) in entries.take(limit + 1).enumerate() {
        if i == limit {
            next_after = last;
            break;
        }
        if let Some(row) = report_row(&settings, &key, &party, mine) {
            let row = serde_json::to_vec(&row).expect("report rows serialize");
            if rows > 0 && page.len() + 1 + row.len() + 1 > REPORT_PAGE_BYTES_MAX {
                next_after = last;
                break;
            }
            if rows > 0 {
                page.push(b',');
            }
            page.extend_from_slice(&row);
            rows += 1;
        }
        last = Some(key);
    }
    page.push(b']');
    let mut response = Response::status(200).with_header("content-type", "application/json");
    response.body = page;
    if let Some(after) = next_after {
        let cursor = percent_encoding::utf8_percent_encode(&after, percent_encoding::NON_ALPHANUMERIC);
        response = response.with_header("x-next-cursor", cursor.to_string());
    }
    Ok(response)
}

/// The caller's view of one key: its own values and the vote counts, never others' values. The
/// votes are compared on the `attribute_fields` in force, by their values' compared forms.
/// `mine` is the caller's `party_keys` entry for the key.
fn report_row(settings: &Settings, key: &str, party: &str, mine: Option<BTreeMap<String, String>>) -> Option<Value> {
    let key = key.to_owned();
    let (mine, compared) = match mine {
        Some(mine) => (mine, COMPARED.get(&key)?),
        // A vote an older version recorded, still in `records`; compared by `compared` once an
        // ingest of the key has built it, else among the votes there, by their values.
        None => {
            let votes = RECORDS.get(&key)?;
            let mine = votes.by_party.get(party)?.clone();
            (mine, COMPARED.get(&key).unwrap_or(Compared { by_party: votes.by_party }))
        }
    };
    let on_fields = |forms: &BTreeMap<String, String>| -> Vec<Option<String>> {
        settings.attribute_fields.iter().map(|f| forms.get(f).cloned()).collect()
    };
    let my_forms = on_fields(compared.by_party.get(party)?);
    let my_values: Vec<Option<String>> = settings.attribute_fields.iter().map(|f| mine.get(f).cloned()).collect();
    let all: Vec<_> = compared.by_party.values().map(on_fields).collect();
    let total_votes = all.len();
    let in_agreement = all.iter().filter(|v| **v == my_forms).count();
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
    use crate::settings::VALUE_BYTES_MAX;
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

    /// The bytes an ingest writes, less those it leaves as they were.
    fn written(h: &mut MemoryHost, who: &Caller, body: &str) -> usize {
        let before: BTreeMap<_, _> = h.dump().into_iter().collect();
        assert_eq!(ingest(h, who, body), 200);
        h.dump().into_iter().filter(|(slot, value)| before.get(slot) != Some(value)).map(|(_, v)| v.len()).sum()
    }

    /// Values are compared as themselves up to COMPARED_VALUE_BYTES_MAX, past it by digest: equal
    /// exactly when the values are, and never one form for a short and a long value.
    #[test]
    fn compared_forms_are_equal_exactly_when_values_are() {
        let at = "v".repeat(COMPARED_VALUE_BYTES_MAX);
        let past = "v".repeat(COMPARED_VALUE_BYTES_MAX + 1);
        assert_eq!(Compared::form(&at), format!("={at}"));
        assert_eq!(Compared::form(&past).len(), 65);
        assert!(Compared::form(&past).starts_with('#'));
        // The digest is of the value alone (no salt): equal values written apart compare equal.
        assert_eq!(Compared::form(&past), Compared::form(&"v".repeat(COMPARED_VALUE_BYTES_MAX + 1)));
        assert_ne!(Compared::form(&past), Compared::form(&format!("{at}w")));
        // A short value that looks like a digest's hex is still itself.
        let hex_looking = &Compared::form(&past)[1..];
        assert_ne!(Compared::form(hex_looking), Compared::form(&past));
    }

    /// What a party's ingest writes does not grow with the others' values past
    /// COMPARED_VALUE_BYTES_MAX bytes (below it, by at most their lengths). (With a
    /// key's votes kept whole, every ingest rewrote the others' values: a party with a second
    /// certificate could pad public keys with long values until others' batches passed
    /// write_bytes_per_request_max.)
    #[test]
    fn a_party_s_write_does_not_grow_with_the_others_values() {
        let b = Caller::member("b");
        let mut costs = Vec::new();
        for padding in [COMPARED_VALUE_BYTES_MAX, VALUE_BYTES_MAX] {
            let mut h = host();
            let a = Caller::member("a");
            let long = json!({"lei": "K", "nace": "x".repeat(padding)}).to_string();
            assert_eq!(ingest(&mut h, &a, &long), 200);
            costs.push(written(&mut h, &b, r#"{"lei":"K","nace":"X"}"#));
        }
        assert_eq!(
            costs[0], costs[1],
            "b's write, beside values of {COMPARED_VALUE_BYTES_MAX} and {VALUE_BYTES_MAX} bytes"
        );
    }

    /// Votes an older version kept whole under `records` (with `null` in `party_keys`) are
    /// reported as they were; the key's next ingest writes its `compared` and the ingesting
    /// party's own entry only, and the others' votes are read from `records` until they vote
    /// again.
    #[test]
    fn votes_kept_whole_by_an_older_version_are_read_and_compared() {
        let mut h = host();
        let (a, b, c) = (Caller::member("a"), Caller::member("b"), Caller::member("c"));
        let old = Votes {
            by_party: [
                ("a".to_owned(), [("nace".to_owned(), "X".to_owned())].into()),
                ("b".to_owned(), [("nace".to_owned(), "Y".to_owned())].into()),
            ]
            .into(),
        };
        h.seed(RECORDS.name(), &"K".to_owned(), &old);
        // What an older version wrote: `()`, which is JSON null.
        h.seed(PARTY_KEYS.name(), &("a".to_owned(), "K".to_owned()), &());
        h.seed(PARTY_KEYS.name(), &("b".to_owned(), "K".to_owned()), &());
        let (status, row) = report(&mut h, &a, "/report/K");
        assert_eq!(status, 200, "{row}");
        assert_eq!((row["nace"].clone(), row["total_votes"].clone()), (json!("X"), json!(2)));
        assert_eq!(row["members_in_agreement"], 1);
        let (_, page) = report(&mut h, &a, "/report");
        assert_eq!(page, json!([row]), "the page reads the old layout as the single row does");

        let before: BTreeMap<_, _> = h.dump().into_iter().collect();
        assert_eq!(ingest(&mut h, &c, r#"{"lei":"K","nace":"Y"}"#), 200);
        let changed: Vec<String> = h
            .dump()
            .into_iter()
            .filter(|(slot, value)| before.get(slot) != Some(value))
            .map(|((map, _), _)| map)
            .collect();
        assert_eq!(changed, [COMPARED.name(), PARTY_KEYS.name()], "the key's compared forms and c's own entry");
        for (who, nace, agree) in [(&a, "X", 1), (&b, "Y", 2), (&c, "Y", 2)] {
            let (_, row) = report(&mut h, who, "/report/K");
            assert_eq!(row["nace"], nace, "{row}");
            assert_eq!((row["total_votes"].clone(), row["members_in_agreement"].clone()), (json!(3), json!(agree)));
            assert_eq!(row["group_status"], "LACK_OF_CONSENSUS");
        }
        // b votes again: its own entry now, and compared as the others are.
        assert_eq!(ingest(&mut h, &b, r#"{"lei":"K","nace":"X"}"#), 200);
        let (_, row) = report(&mut h, &a, "/report/K");
        assert_eq!((row["total_votes"].clone(), row["members_in_agreement"].clone()), (json!(3), json!(2)));
        let (_, page) = report(&mut h, &b, "/report");
        assert_eq!(page[0]["nace"], "X");
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

    /// A page ends before the row that would take it past REPORT_PAGE_BYTES_MAX, and its cursor
    /// goes on from there: rows of many long fields made a page of `limit` rows larger than the
    /// node sends (500, ResponseTooLarge), so that party could not read its report at all.
    #[test]
    fn a_report_page_is_bounded_in_bytes_and_goes_on_from_where_it_ended() {
        let mut h = host();
        let fields: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
        h.seed("gov.app_config", &"attribute_fields".to_owned(), &json!(fields));
        let a = Caller::member("a");
        let value = "v".repeat(VALUE_BYTES_MAX);
        let keys = 600;
        for batch in 0..2 {
            let rows: Vec<Value> = (batch * keys / 2..(batch + 1) * keys / 2)
                .map(|i| {
                    let mut row = json!({"lei": format!("K{i:04}")});
                    for f in &fields {
                        row[f] = json!(value);
                    }
                    row
                })
                .collect();
            assert_eq!(ingest(&mut h, &a, &serde_json::to_string(&rows).unwrap()), 200);
        }
        let mut seen = Vec::new();
        let mut target = format!("/report?limit={REPORT_PAGE_ROWS_MAX}");
        let mut pages = 0;
        loop {
            let r = h.call(&a, "GET", &target, "");
            assert_eq!(r.head.status, 200);
            assert!(r.body.len() <= REPORT_PAGE_BYTES_MAX, "a page of {} bytes", r.body.len());
            let page: Vec<Value> = r.body_json().unwrap();
            seen.extend(page.iter().map(|row| row["lei"].as_str().unwrap().to_owned()));
            pages += 1;
            match r.head.headers.get("x-next-cursor") {
                Some(c) => target = format!("/report?limit={REPORT_PAGE_ROWS_MAX}&after={c}"),
                None => break,
            }
        }
        assert!(pages > 1, "{keys} rows of {} fields make more than one page", fields.len());
        assert_eq!(seen, (0..keys).map(|i| format!("K{i:04}")).collect::<Vec<_>>());
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
