//! The console's pages: server-rendered HTML (maud), plain forms, no scripts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Form, Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::{Value, json};

use super::{Console, Failure, refused};
use crate::ingest::Format;
use cloister_crypto::cose::GovWrite;
use cloister_crypto::identity;

type Shared = State<Arc<Console>>;

/// Rows of the member's report on one page of the console.
pub const REPORT_ROWS_PER_PAGE: usize = 50;
/// Report pages (of up to 10,000 rows) the console reads for one page of a filtered table.
pub const REPORT_PAGES_SCANNED_MAX: usize = 20;
/// Records the status chart counts at most; past it the chart says it covers the first ones.
pub const CHART_RECORDS_MAX: usize = 200_000;
/// How long the Nodes page waits for one node to tell its own positions.
const NODE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The report page size the console asks the app for when it counts records for the chart.
const APP_REPORT_PAGE: usize = 10_000;
/// The report page size the console asks for while it fills one page of the table: small, since
/// an unfiltered table stops after its first REPORT_ROWS_PER_PAGE rows.
const TABLE_SCAN_PAGE: usize = 1_000;
/// The statuses the reconcile app gives a record, with their colours in the chart.
const STATUSES: [(&str, &str); 3] =
    [("IN_CONSENSUS", "#2e7d32"), ("LACK_OF_CONSENSUS", "#c62828"), ("NOT_ENOUGH_DATA", "#9e9e9e")];
/// Actions the proposal form offers, with an example of their arguments.
const COMMON_ACTIONS: [(&str, &str); 11] = [
    ("set_user", r#"{"cert": "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n"}"#),
    ("remove_user", r#"{"id": "<user id>"}"#),
    ("set_member", r#"{"cert": "-----BEGIN CERTIFICATE-----\n…", "data": {}}"#),
    ("remove_member", r#"{"id": "<member id>"}"#),
    ("set_app_config", r#"{"config": {"threshold": 2}}"#),
    ("transition_service_to_open", "{}"),
    ("transition_node_to_trusted", r#"{"node_id": "<node id>"}"#),
    ("remove_node", r#"{"node_id": "<node id>"}"#),
    ("set_recovery_threshold", r#"{"threshold": 2}"#),
    ("trigger_ledger_rekey", "{}"),
    ("add_snp_measurement", r#"{"measurement": "<96 hex digits>"}"#),
];

pub const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #f6f7f9; }
header { background: #1f2a44; color: #fff; padding: 0.6rem 1.5rem; display: flex; gap: 1.5rem; align-items: baseline; flex-wrap: wrap; }
header a { color: #cfd8ff; text-decoration: none; }
header a.active { color: #fff; font-weight: 600; border-bottom: 2px solid #fff; }
header .who { margin-left: auto; font-size: 0.85rem; color: #cfd8ff; }
main { padding: 1rem 1.5rem; max-width: 1200px; }
h1 { font-size: 1.4rem; }
h2 { font-size: 1.1rem; margin-top: 1.5rem; }
table { border-collapse: collapse; background: #fff; margin: 0.5rem 0; }
th, td { border: 1px solid #d8dbe2; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; font-size: 0.9rem; }
th { background: #eef0f5; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.85rem; }
pre { background: #fff; border: 1px solid #d8dbe2; padding: 0.6rem; overflow-x: auto; }
.badge { padding: 0.1rem 0.5rem; border-radius: 0.6rem; background: #e0e4ee; font-size: 0.85rem; }
.ok { background: #d7f0da; } .bad { background: #f7d4d4; } .warn { background: #fbeec8; }
.note { background: #e8f0fe; border: 1px solid #b6cbf5; padding: 0.5rem 0.8rem; }
.error { background: #fdecea; border: 1px solid #f5b5ae; padding: 0.5rem 0.8rem; }
form.inline { display: inline; }
button { padding: 0.3rem 0.9rem; margin-right: 0.4rem; }
textarea { width: 100%; max-width: 60rem; font-family: ui-monospace, monospace; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; }
"#;

/// The frame of every page: navigation, who the console acts as, and the page's content.
fn page(console: &Console, title: &str, active: &str, body: Markup) -> Markup {
    let nav = [
        ("/", "Service"),
        ("/nodes", "Nodes"),
        ("/proposals", "Proposals"),
        ("/reconcile", "Reconciliation"),
        ("/ledger", "Ledger"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Cloister console" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    strong { "Cloister" }
                    @for (href, label) in nav {
                        a href=(href) class=[(active == href).then_some("active")] { (label) }
                    }
                    span.who title=(console.my_id) { "acting as member " code { (short(&console.my_id)) } }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The page of a failure.
pub(crate) fn failure(status: StatusCode, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Error · Cloister console" } link rel="stylesheet" href="/style.css"; }
            body { main {
                h1 { "Error " (status.as_u16()) }
                p.error { (message) }
                p { a href="/" { "Back to the service" } }
            } }
        }
    }
}

fn short(id: &str) -> String {
    if id.len() > 16 { format!("{}…", &id[..12]) } else { id.to_owned() }
}

/// Unix seconds as an RFC 3339 UTC time.
fn when(unix: Option<u64>) -> String {
    unix.and_then(|t| time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).ok()?).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "—".into())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

fn state_badge(state: &str) -> Markup {
    let class = match state {
        "Open" | "Accepted" | "Trusted" | "Active" | "IN_CONSENSUS" => "badge ok",
        "Rejected" | "Failed" | "Retired" | "LACK_OF_CONSENSUS" => "badge bad",
        "Opening" | "Pending" | "Accepted-pending" => "badge warn",
        _ => "badge",
    };
    html! { span class=(class) { (state) } }
}

/// A percent-encoded path segment.
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

// --- Service ---------------------------------------------------------------------------------

pub(crate) async fn service(State(c): Shared) -> Result<Markup, Failure> {
    let service = c.get_json("/gov/service").await?;
    let constitution = c.get_json("/gov/constitution").await?;
    let app = match c.get_json("/gov/app").await {
        Ok(app) => Some(app),
        Err(f) if f.status == StatusCode::NOT_FOUND => None,
        Err(f) => return Err(f),
    };
    let members = c.get_json("/gov/members").await?;
    let users = c.get_json("/gov/users").await?;
    let identity = service["identity"].as_str().unwrap_or_default();
    let fingerprint = identity::id_of_pem(identity.as_bytes()).unwrap_or_else(|_| "—".into());
    let endpoints = app.as_ref().and_then(|a| a["manifest"]["endpoints"].as_array().cloned()).unwrap_or_default();
    let body = html! {
        dl {
            dt { "State" } dd { (state_badge(service["state"].as_str().unwrap_or("?"))) }
            dt { "Service certificate (SHA-256)" } dd { code { (fingerprint) } }
            dt { "Recovery threshold" } dd { (text(&service["recovery_threshold"])) }
            dt { "Constitution (blake3)" } dd { code { (text(&constitution["code_hash"])) } " · " (text(&constitution["bytes"])) " bytes" }
            dt { "App (blake3)" } dd {
                @match &app { Some(a) => code { (text(&a["code_hash"])) }, None => "no app is installed" }
            }
        }
        @if !endpoints.is_empty() {
            h2 { "App endpoints" }
            table {
                tr { th { "Method" } th { "Path" } th { "Mode" } th { "Who" } }
                @for e in &endpoints {
                    tr { td { (text(&e["method"])) } td { code { (text(&e["path"])) } } td { (text(&e["mode"])) } td { (text(&e["auth"])) } }
                }
            }
        }
        h2 { "Members" }
        (identities(&members["members"], &c.my_id, true))
        h2 { "Users" }
        (identities(&users["users"], &c.my_id, false))
    };
    Ok(page(&c, "Service", "/", body))
}

fn identities(table: &Value, me: &str, members: bool) -> Markup {
    let entries = table.as_object().cloned().unwrap_or_default();
    html! {
        @if entries.is_empty() { p { "none" } } @else {
            table {
                tr { th { "Id (SHA-256 of the certificate)" } @if members { th { "Status" } th { "Encryption key" } } th { "Data" } }
                @for (id, record) in &entries {
                    tr {
                        td { code title=(id) { (short(id)) } @if id == me { " (you)" } }
                        @if members {
                            td { (state_badge(record["status"].as_str().unwrap_or("?"))) }
                            td { @if record["encryption_key"].is_string() { "yes" } @else { "—" } }
                        }
                        td { code { (record["data"]) } }
                    }
                }
            }
        }
    }
}

// --- Nodes -----------------------------------------------------------------------------------

pub(crate) async fn nodes(State(c): Shared) -> Result<Markup, Failure> {
    let network = c.get_json("/node/network").await?;
    let attestations = c.get_json("/node/attestations").await?;
    let by_id: HashMap<String, Value> =
        attestations["nodes"].as_array().into_iter().flatten().map(|n| (text(&n["node_id"]), n.clone())).collect();
    let listed = network["nodes"].as_array().cloned().unwrap_or_default();
    // Each node's own view of its positions; one that does not answer says so.
    let mut positions = Vec::new();
    for node in &listed {
        let url = node["rest_url"].as_str().unwrap_or_default();
        let asked = async {
            let client = cloister_client::Client::connect(url, &c.pinned, None).await?;
            client.get("/node/network").await?.json()
        };
        positions.push(tokio::time::timeout(NODE_PROBE_TIMEOUT, asked).await.ok().and_then(Result::ok));
    }
    let body = html! {
        p { "Term " (text(&network["term"])) "; leader " code { (text(&network["leader"])) } "." }
        table {
            tr {
                th { "Node" } th { "Role" } th { "Status" } th { "Committed" } th { "Applied" }
                th { "Evidence" } th { "Measurement" } th { "Host data" } th { "TCB" } th { "Verified" }
            }
            @for (node, own) in listed.iter().zip(&positions) {
                @let id = text(&node["id"]);
                @let record = by_id.get(&id).cloned().unwrap_or(Value::Null);
                @let verified = &record["verified"];
                tr {
                    td { (text(&node["name"])) br; code title=(id) { (short(&id)) } }
                    td { (text(&node["role"])) }
                    td { (state_badge(record["status"].as_str().unwrap_or("—"))) }
                    @match own {
                        Some(own) => { td { (text(&own["committed"])) } td { (text(&own["applied"])) } }
                        None => { td colspan="2" { span.badge.bad { "unreachable" } } }
                    }
                    td { (text(&record["kind"])) br; small { "root " (text(&verified["root"])) } }
                    td { code title=(text(&verified["measurement"])) { (short(&text(&verified["measurement"]))) } }
                    td { code title=(text(&verified["host_data"])) { (short(&text(&verified["host_data"]))) } }
                    td { code { (tcb(&verified["tcb"])) } }
                    td { (when(verified["verified_at"].as_u64())) }
                }
            }
        }
    };
    Ok(page(&c, "Nodes", "/nodes", body))
}

fn tcb(v: &Value) -> String {
    match v.as_object() {
        Some(fields) => fields.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        None => "—".into(),
    }
}

// --- Proposals -------------------------------------------------------------------------------

pub(crate) async fn proposals(State(c): Shared) -> Result<Markup, Failure> {
    let answer = c.get_json("/gov/proposals").await?;
    let mut list = answer["proposals"].as_array().cloned().unwrap_or_default();
    list.sort_by_key(|p| std::cmp::Reverse(p["created_at"].as_u64()));
    let body = html! {
        p { a href="/proposals/new" { "Propose an action" } }
        @if list.is_empty() { p { "No proposals yet." } } @else {
            table {
                tr { th { "Proposal" } th { "State" } th { "Actions" } th { "Proposer" } th { "Created" } }
                @for p in &list {
                    @let id = text(&p["proposal_id"]);
                    tr {
                        td { a href={"/proposals/" (segment(&id))} { code { (short(&id)) } } }
                        td { (state_badge(p["state"].as_str().unwrap_or("?"))) }
                        td { @for a in p["actions"].as_array().into_iter().flatten() { code { (text(a)) } " " } }
                        td { code title=(text(&p["proposer"])) { (short(&text(&p["proposer"]))) } }
                        td { (when(p["created_at"].as_u64())) }
                    }
                }
            }
        }
    };
    Ok(page(&c, "Proposals", "/proposals", body))
}

pub(crate) async fn new_proposal(State(c): Shared) -> Markup {
    let body = html! {
        form method="post" action="/proposals" {
            input type="hidden" name="csrf" value=(c.form_token());
            p {
                label { "Action " select name="action" {
                    @for (name, _) in COMMON_ACTIONS { option value=(name) { (name) } }
                } }
            }
            p { label { "Arguments (JSON)" br; textarea name="args" rows="8" { "{}" } } }
            button type="submit" { "Propose" }
        }
        h2 { "Arguments of each action" }
        table {
            tr { th { "Action" } th { "Example" } }
            @for (name, example) in COMMON_ACTIONS { tr { td { code { (name) } } td { code { (example) } } } }
        }
    };
    page(&c, "New proposal", "/proposals", body)
}

pub(crate) async fn propose(State(c): Shared, Form(form): Form<HashMap<String, String>>) -> Result<Response, Failure> {
    c.check_form(&form)?;
    let action = form.get("action").map(String::as_str).unwrap_or_default().trim();
    if action.is_empty() {
        return Err(Failure::bad_request("name the action to propose"));
    }
    let raw = form.get("args").map(String::as_str).unwrap_or_default().trim();
    let args: Value = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(raw).map_err(|e| Failure::bad_request(format!("the arguments are not JSON: {e}")))?
    };
    let answer = c.gov(&GovWrite::Propose, &json!({ "actions": [{ "name": action, "args": args }] })).await?;
    let id = answer["proposal_id"]
        .as_str()
        .ok_or_else(|| Failure::new(StatusCode::BAD_GATEWAY, "the answer names no proposal"))?;
    Ok(Redirect::to(&format!("/proposals/{}", segment(id))).into_response())
}

/// An action's arguments as a member should read them: module bytes as their hash and size,
/// certificates as their id.
fn readable_args(args: &Value) -> Value {
    let mut args = args.clone();
    if let Some(fields) = args.as_object_mut() {
        for (name, value) in fields.iter_mut() {
            let Some(s) = value.as_str() else { continue };
            if name == "wasm" {
                use base64::Engine;
                *value = match base64::engine::general_purpose::STANDARD.decode(s) {
                    Ok(bytes) => json!(format!("{} bytes, blake3 {}", bytes.len(), blake3::hash(&bytes).to_hex())),
                    Err(_) => json!(format!("not base64 ({} characters)", s.len())),
                };
            } else if s.contains("-----BEGIN CERTIFICATE-----") {
                *value = match identity::id_of_pem(s.as_bytes()) {
                    Ok(id) => json!(format!("certificate with id {id}")),
                    Err(_) => json!("a certificate that does not parse"),
                };
            }
        }
    }
    args
}

pub(crate) async fn proposal(State(c): Shared, Path(id): Path<String>) -> Result<Markup, Failure> {
    let p = c.get_json(&format!("/gov/proposals/{}", segment(&id))).await?;
    let state = p["state"].as_str().unwrap_or("?").to_owned();
    let open = state == "Open";
    let mine = p["proposer"].as_str() == Some(c.my_id.as_str());
    let ballots = p["ballots"].as_object().cloned().unwrap_or_default();
    let token = c.form_token();
    let target = segment(&id);
    let body = html! {
        dl {
            dt { "Id" } dd { code { (id) } }
            dt { "State" } dd { (state_badge(&state)) @if let Some(r) = p["reason"].as_str() { " " (r) } }
            dt { "Proposer" } dd { code { (text(&p["proposer"])) } @if mine { " (you)" } }
            dt { "Created" } dd { (when(p["created_at"].as_u64())) }
        }
        h2 { "Actions" }
        @for action in p["proposal"]["actions"].as_array().into_iter().flatten() {
            p { code { (text(&action["name"])) } }
            pre { (serde_json::to_string_pretty(&readable_args(&action["args"])).unwrap_or_default()) }
        }
        h2 { "Ballots" }
        @if ballots.is_empty() { p { "No ballots yet." } } @else {
            table {
                tr { th { "Member" } th { "Ballot" } }
                @for (member, approve) in &ballots {
                    tr {
                        td { code title=(member) { (short(member)) } @if *member == c.my_id { " (you)" } }
                        td { @if approve.as_bool() == Some(true) { span.badge.ok { "Approve" } } @else { span.badge.bad { "Reject" } } }
                    }
                }
            }
        }
        @if open {
            h2 { "Your ballot" }
            form.inline method="post" action={"/proposals/" (target) "/ballot"} {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="approve" value="true";
                button type="submit" id="approve" { "Approve" }
            }
            form.inline method="post" action={"/proposals/" (target) "/ballot"} {
                input type="hidden" name="csrf" value=(token);
                input type="hidden" name="approve" value="false";
                button type="submit" id="reject" { "Reject" }
            }
            @if mine {
                form.inline method="post" action={"/proposals/" (target) "/withdraw"} {
                    input type="hidden" name="csrf" value=(token);
                    button type="submit" id="withdraw" { "Withdraw" }
                }
            }
        }
    };
    Ok(page(&c, "Proposal", "/proposals", body))
}

pub(crate) async fn ballot(
    State(c): Shared,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, Failure> {
    c.check_form(&form)?;
    let approve = match form.get("approve").map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        _ => return Err(Failure::bad_request("a ballot approves (true) or rejects (false)")),
    };
    c.gov(&GovWrite::Vote(id.clone()), &json!({ "approve": approve })).await?;
    Ok(Redirect::to(&format!("/proposals/{}", segment(&id))).into_response())
}

pub(crate) async fn withdraw(
    State(c): Shared,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, Failure> {
    c.check_form(&form)?;
    c.gov(&GovWrite::Withdraw(id.clone()), &json!({})).await?;
    Ok(Redirect::to(&format!("/proposals/{}", segment(&id))).into_response())
}

// --- Reconciliation --------------------------------------------------------------------------

/// An upload being ingested.
pub(crate) struct Job {
    pub file_name: String,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub records: u64,
    pub retries: u64,
    pub started: Instant,
    /// Ok once every record is in; the refusal or failure otherwise.
    pub finished: Option<Result<(), String>>,
}

/// The app's key field and attribute fields, from its configuration (the reconcile app's
/// defaults where unset).
async fn fields(c: &Console) -> Result<(String, Vec<String>), Failure> {
    let app = c.get_json("/gov/app").await?;
    let config = &app["config"];
    let key = config["key_field"].as_str().unwrap_or("lei").to_owned();
    let attributes = config["attribute_fields"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_else(|| vec!["nace".to_owned()]);
    Ok((key, attributes))
}

/// One page of the app's report for this member, after `after`.
async fn report_page(c: &Console, after: Option<&str>, limit: usize) -> Result<(Vec<Value>, Option<String>), Failure> {
    let mut target = format!("/app/report?limit={limit}");
    if let Some(after) = after {
        target.push_str(&format!("&after={}", segment(after)));
    }
    let reply = c.request("GET", &target, None, Vec::new()).await?;
    if reply.status != 200 {
        return Err(refused("the report", &reply));
    }
    let rows = reply.json()?.as_array().cloned().unwrap_or_default();
    let next = reply
        .headers
        .get("x-next-cursor")
        .and_then(|v| v.to_str().ok())
        .map(|c| percent_encoding::percent_decode_str(c).decode_utf8_lossy().into_owned());
    Ok((rows, next))
}

pub(crate) async fn reconcile(State(c): Shared, Query(q): Query<HashMap<String, String>>) -> Result<Markup, Failure> {
    let (key_field, attributes) = fields(&c).await?;
    let status = q.get("status").filter(|s| STATUSES.iter().any(|(name, _)| name == s)).cloned();
    // The chart: every record's status, up to CHART_RECORDS_MAX.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let (mut counted, mut cursor) = (0usize, None::<String>);
    loop {
        let (rows, next) = report_page(&c, cursor.as_deref(), APP_REPORT_PAGE).await?;
        for row in &rows {
            *counts.entry(text(&row["group_status"])).or_default() += 1;
        }
        counted += rows.len();
        match next {
            Some(n) if counted < CHART_RECORDS_MAX => cursor = Some(n),
            Some(_) => break,
            None => {
                cursor = None;
                break;
            }
        }
    }
    let chart_cut = cursor.is_some();
    // The table: REPORT_ROWS_PER_PAGE rows with the chosen status, after `after`.
    let mut shown = Vec::new();
    let mut after = q.get("after").cloned();
    let mut more = false;
    for _ in 0..REPORT_PAGES_SCANNED_MAX {
        let (rows, next) = report_page(&c, after.as_deref(), TABLE_SCAN_PAGE).await?;
        let mut consumed = 0;
        for row in &rows {
            consumed += 1;
            if status.as_ref().is_none_or(|s| row["group_status"] == *s.as_str()) {
                shown.push(row.clone());
                if shown.len() == REPORT_ROWS_PER_PAGE {
                    break;
                }
            }
        }
        let last_consumed = rows.get(consumed.max(1) - 1).map(|r| text(&r[&key_field]));
        if shown.len() == REPORT_ROWS_PER_PAGE {
            more = consumed < rows.len() || next.is_some();
            after = last_consumed;
            break;
        }
        match next {
            Some(n) => after = Some(n),
            None => {
                after = None;
                break;
            }
        }
        more = true;
    }
    let next_link = (more && after.is_some()).then(|| {
        let mut link = format!("/reconcile?after={}", segment(after.as_deref().unwrap_or_default()));
        if let Some(s) = &status {
            link.push_str(&format!("&status={s}"));
        }
        link
    });
    let jobs: Vec<(u64, String, bool)> = {
        let jobs = c.jobs.lock().expect("jobs lock");
        let mut list: Vec<_> = jobs
            .iter()
            .map(|(id, j)| {
                let j = j.lock().expect("job lock");
                (*id, j.file_name.clone(), j.finished.is_some())
            })
            .collect();
        list.sort_by_key(|(id, ..)| std::cmp::Reverse(*id));
        list
    };
    let body = html! {
        h2 { "Upload records" }
        form method="post" action="/reconcile/upload" enctype="multipart/form-data" {
            input type="hidden" name="csrf" value=(c.form_token());
            input type="file" name="file" id="file" required;
            " "
            select name="format" {
                option value="auto" { "format from the file name" }
                option value="csv" { "CSV" }
                option value="json" { "JSON" }
            }
            " "
            button type="submit" id="upload" { "Upload" }
        }
        @if !jobs.is_empty() {
            p { "Uploads: "
                @for (id, name, done) in &jobs {
                    a href={"/reconcile/jobs/" (id)} { (name) } @if !done { " (running)" } " "
                }
            }
        }
        h2 { "How your records stand" }
        (chart(&counts, counted, chart_cut))
        h2 { "Your records" }
        form method="get" action="/reconcile" {
            label { "Status " select name="status" {
                option value="" { "all" }
                @for (name, _) in STATUSES { option value=(name) selected[status.as_deref() == Some(name)] { (name) } }
            } }
            " " button type="submit" { "Filter" }
        }
        @if shown.is_empty() { p { "No records." } } @else {
            table id="report" {
                tr {
                    th { (key_field) } @for a in &attributes { th { (a) } }
                    th { "Status" } th { "Side" } th { "In agreement" } th { "Votes" } th { "Unique values" }
                }
                @for row in &shown {
                    @let key = text(&row[&key_field]);
                    tr {
                        td { a href={"/reconcile/records/" (segment(&key))} { (key) } }
                        @for a in &attributes { td { (text(&row[a])) } }
                        td { (state_badge(row["group_status"].as_str().unwrap_or("?"))) }
                        td { (text(&row["majority_minority"])) }
                        td { (text(&row["members_in_agreement"])) }
                        td { (text(&row["total_votes"])) }
                        td { (text(&row["count_of_unique_values"])) }
                    }
                }
            }
        }
        @if let Some(link) = next_link { p { a href=(link) id="next" { "Next page" } } }
    };
    Ok(page(&c, "Reconciliation", "/reconcile", body))
}

/// A bar per status, drawn as SVG.
fn chart(counts: &HashMap<String, usize>, total: usize, cut: bool) -> Markup {
    let max = STATUSES.iter().map(|(s, _)| counts.get(*s).copied().unwrap_or(0)).max().unwrap_or(0).max(1);
    let (width, bar, gap, label) = (640usize, 26usize, 10usize, 190usize);
    let height = STATUSES.len() * (bar + gap);
    html! {
        svg id="chart" xmlns="http://www.w3.org/2000/svg" width=(width) height=(height) role="img" aria-label="records by status" {
            @for (i, (status, colour)) in STATUSES.iter().enumerate() {
                @let n = counts.get(*status).copied().unwrap_or(0);
                @let y = i * (bar + gap);
                @let w = (width - label - 80) * n / max;
                text x="0" y=(y + bar * 2 / 3) font-size="13" { (status) }
                rect x=(label) y=(y) width=(w.max(1)) height=(bar) fill=(colour) {}
                text x=(label + w + 6) y=(y + bar * 2 / 3) font-size="13" { (n) }
            }
        }
        p { small { (total) " records" @if cut { " (the first " (CHART_RECORDS_MAX) " only)" } } }
    }
}

pub(crate) async fn upload(State(c): Shared, mut form: Multipart) -> Result<Response, Failure> {
    let (mut csrf, mut format, mut file) = (None, "auto".to_owned(), None::<(tempfile::TempPath, String, u64)>);
    let bad =
        |e: axum::extract::multipart::MultipartError| Failure::bad_request(format!("the upload is malformed: {e}"));
    let storing =
        |e: std::io::Error| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("storing the upload: {e}"));
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("csrf") => csrf = Some(field.text().await.map_err(bad)?),
            Some("format") => format = field.text().await.map_err(bad)?,
            Some("file") => {
                // The form token comes first in the form: no file is stored for a forged one.
                c.check_form_token(csrf.as_deref().unwrap_or_default())?;
                if file.is_some() {
                    return Err(Failure::bad_request("an upload takes one file"));
                }
                let name = field.file_name().unwrap_or("upload").to_owned();
                // Removed when dropped: on any failure here, or once the job is done with it.
                let (out, path) = tempfile::Builder::new()
                    .prefix("upload-")
                    .tempfile_in(c.uploads.path())
                    .map_err(storing)?
                    .into_parts();
                let mut out = tokio::fs::File::from_std(out);
                let mut bytes = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    bytes += chunk.len() as u64;
                    tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await.map_err(storing)?;
                }
                tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(storing)?;
                file = Some((path, name, bytes));
            }
            _ => {}
        }
    }
    c.check_form_token(csrf.as_deref().unwrap_or_default())?;
    let (path, name, bytes) = file.ok_or_else(|| Failure::bad_request("choose a file to upload"))?;
    let format = match format.as_str() {
        "csv" => Format::Csv,
        "json" => Format::Json,
        _ if name.to_ascii_lowercase().ends_with(".csv") => Format::Csv,
        _ if name.to_ascii_lowercase().ends_with(".json") || name.to_ascii_lowercase().ends_with(".jsonl") => {
            Format::Json
        }
        _ => return Err(Failure::bad_request(format!("{name}: name the format (CSV or JSON)"))),
    };
    let job = Job {
        file_name: name,
        bytes_total: bytes,
        bytes_done: 0,
        records: 0,
        retries: 0,
        started: Instant::now(),
        finished: None,
    };
    let (id, job) = c.add_job(job);
    super::spawn_upload(c.clone(), path, format, job);
    Ok(Redirect::to(&format!("/reconcile/jobs/{id}")).into_response())
}

pub(crate) async fn job(State(c): Shared, Path(id): Path<u64>) -> Result<Markup, Failure> {
    let job = c
        .jobs
        .lock()
        .expect("jobs lock")
        .get(&id)
        .cloned()
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, "no such upload"))?;
    let (name, total, done, records, retries, elapsed, finished) = {
        let j: std::sync::MutexGuard<'_, Job> = job.lock().expect("job lock");
        (
            j.file_name.clone(),
            j.bytes_total,
            j.bytes_done,
            j.records,
            j.retries,
            j.started.elapsed(),
            j.finished.clone(),
        )
    };
    let rate = records as f64 / elapsed.as_secs_f64().max(1e-3);
    let body = html! {
        @if finished.is_none() { (PreEscaped(r#"<meta http-equiv="refresh" content="1">"#)) }
        p { "File " code { (name) } }
        progress id="progress" max=(total.max(1)) value=(if finished == Some(Ok(())) { total } else { done }) {}
        p { (records) " records in · " (format!("{rate:.0}")) " records/s"
            @if retries > 0 { " · " (retries) " retries" } }
        @match &finished {
            None => p { "Ingesting…" },
            Some(Ok(())) => p.note id="done" { "Done: every record is in. " a href="/reconcile" { "See the report" } },
            Some(Err(e)) => pre.error id="failed" { (e) },
        }
    };
    Ok(page(&c, "Upload", "/reconcile", body))
}

pub(crate) async fn record(State(c): Shared, Path(key): Path<String>) -> Result<Markup, Failure> {
    let row = c.get_json(&format!("/app/report/{}", segment(&key))).await?;
    let body = html! {
        table id="record" {
            @for (field, value) in row.as_object().into_iter().flatten() {
                tr { th { (field) } td { (text(value)) } }
            }
        }
        p { a href="/reconcile" { "Back to your records" } }
    };
    Ok(page(&c, &format!("Record {key}"), "/reconcile", body))
}

// --- Ledger ----------------------------------------------------------------------------------

pub(crate) async fn ledger(State(c): Shared, Query(q): Query<HashMap<String, String>>) -> Result<Markup, Failure> {
    let network = c.get_json("/node/network").await?;
    let tx = q.get("tx").map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    let lookup = match &tx {
        None => None,
        Some(tx) => Some(receipt(&c, tx).await),
    };
    let sig = &network["last_signature"];
    let body = html! {
        dl {
            dt { "Term" } dd { (text(&network["term"])) }
            dt { "Committed" } dd { code { (text(&network["committed"])) } }
            dt { "Applied" } dd { code { (text(&network["applied"])) } }
            dt { "Last signature" } dd {
                @if sig.is_null() { "none yet" } @else { "seqno " (text(&sig["seqno"])) ", covering " (text(&sig["tree_size"])) " transactions" }
            }
        }
        h2 { "Verify a receipt" }
        form method="get" action="/ledger" {
            label { "Transaction id " input type="text" name="tx" placeholder="term.seqno" value=(tx.clone().unwrap_or_default()); }
            " " button type="submit" id="verify" { "Fetch and verify" }
        }
        @if let Some(result) = lookup { (result) }
    };
    Ok(page(&c, "Ledger", "/ledger", body))
}

/// What a node's answer to a receipt request proves of transaction `asked`, verified against the
/// `pinned` service identity (PEM). A receipt of another transaction is refused first: a node
/// could answer one, valid, for 2.14 when asked for 2.15.
pub(crate) fn receipt_verdict(
    body: &[u8],
    pinned: &[u8],
    asked: cloister_ledger::txid::TxId,
) -> Result<cloister_ledger::verify::VerifiedReceipt, String> {
    let receipt: cloister_ledger::verify::Receipt =
        serde_json::from_slice(body).map_err(|e| format!("the receipt does not parse: {e}"))?;
    if receipt.tx_id.parse().ok() != Some(asked) {
        return Err(format!("it is the receipt of transaction {}, not of {asked}", receipt.tx_id));
    }
    let anchor = identity::cert_der(pinned).map_err(|e| format!("the pinned certificate: {e:#}"))?;
    cloister_ledger::verify::verify_receipt(&receipt, &anchor)
}

/// Fetches a transaction's receipt and verifies it here, against the service identity this
/// console pins (not against anything the node sends).
async fn receipt(c: &Console, tx: &str) -> Markup {
    let Ok(asked) = tx.parse::<cloister_ledger::txid::TxId>() else {
        return html! { p.error { "A transaction id is term.seqno, such as 2.15." } };
    };
    let reply = match c.request("GET", &format!("/app/receipt?id={asked}"), None, Vec::new()).await {
        Ok(r) => r,
        Err(e) => return html! { p.error { (e.message) } },
    };
    match reply.status {
        200 => {}
        202 => return html! { p.note { "Transaction " (tx) " has no signature over it yet: try again in a moment." } },
        _ => return html! { p.error { (refused("the receipt", &reply).message) } },
    }
    let verdict = receipt_verdict(&reply.body, &c.pinned, asked);
    let pretty =
        serde_json::from_slice::<Value>(&reply.body).map(|v| serde_json::to_string_pretty(&v).unwrap_or_default());
    html! {
        @match &verdict {
            Ok(v) => p.note id="receipt-ok" {
                "Verified: transaction " code { (v.tx_id) } " committed, signed by node " code { (v.signed_by) }
                ", against the service identity this console pins. Claims digest: "
                code { (v.claims_digest.map(hex::encode).unwrap_or_else(|| "none".into())) }
            },
            Err(e) => p.error id="receipt-bad" { "The receipt does not verify: " (e) },
        }
        details { summary { "The receipt" } pre { (pretty.unwrap_or_default()) } }
    }
}
