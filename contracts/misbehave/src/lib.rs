//! A contract that misbehaves on request, for the node's sandbox-limit tests and benchmarks.
//! Every endpoint first writes to the store, so a test can check that a failed request left the
//! store exactly as it was.

use std::hint::black_box;

use cloister_sdk::{Auth, Error, Map, Mode, Request, Response, Router, export};

const SCRATCH: Map<String, String> = Map::new("scratch");

fn mark(req: &Request) {
    SCRATCH.insert(&req.path().to_owned(), &"touched".to_owned());
}

fn noop(_: &Request) -> Result<Response, Error> {
    Ok(Response::status(204))
}

fn put(req: &Request) -> Result<Response, Error> {
    let key = req.param("key").unwrap_or_default().to_owned();
    SCRATCH.insert(&key, &req.text()?.to_owned());
    Ok(Response::status(204))
}

fn get(req: &Request) -> Result<Response, Error> {
    let key = req.param("key").unwrap_or_default().to_owned();
    SCRATCH.get(&key).map(Response::text).ok_or_else(|| Error::not_found("no such key"))
}

fn spin(req: &Request) -> Result<Response, Error> {
    mark(req);
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Spins in a read, writing nothing, until the node stops it (`wall_time_ms`).
fn spin_reading(_: &Request) -> Result<Response, Error> {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn grow(req: &Request) -> Result<Response, Error> {
    mark(req);
    let mut hoard = Vec::new();
    loop {
        hoard.push(black_box(vec![1u8; 1 << 20]));
    }
}

fn depth(n: u64) -> u64 {
    if n == 0 { 0 } else { black_box(depth(black_box(n - 1)) + 1) }
}

fn recurse(req: &Request) -> Result<Response, Error> {
    mark(req);
    Ok(Response::json(&depth(u64::MAX)))
}

fn panic(req: &Request) -> Result<Response, Error> {
    mark(req);
    let what = req.query("what").unwrap_or("on purpose");
    panic!("misbehave panicked {what}");
}

fn big(req: &Request) -> Result<Response, Error> {
    mark(req);
    let bytes: usize = req.query("bytes").and_then(|b| b.parse().ok()).unwrap_or(1 << 20);
    Ok(Response::text("x".repeat(bytes)))
}

fn write_gov(req: &Request) -> Result<Response, Error> {
    mark(req);
    Map::<String, String>::new("gov.members").insert(&"me".to_owned(), &"evil".to_owned());
    Ok(Response::status(204))
}

fn read_gov(_: &Request) -> Result<Response, Error> {
    let members = Map::<String, String>::new("gov.members");
    Ok(Response::json(&members.iter().count()))
}

fn print(req: &Request) -> Result<Response, Error> {
    println!("hello from the guest: {}", req.path());
    eprintln!("and from its stderr");
    Ok(Response::status(204))
}

fn clock(_: &Request) -> Result<Response, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::internal(e.to_string()))?;
    let mut noise = [0u8; 16];
    // The std HashMap seed comes from random_get; a RandomState's hasher output differs per call.
    use std::hash::{BuildHasher, RandomState};
    noise[..8].copy_from_slice(&RandomState::new().hash_one(1u8).to_le_bytes());
    Ok(Response::json(&(now.as_secs(), noise[..8].to_vec())))
}

/// The number in query parameter `name`, or 0.
fn count(req: &Request, name: &str) -> usize {
    req.query(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Writes `keys` keys and removes them again, then asks one scan of them for its next entry
/// `nexts` times: each answer is "none", past every removed key. With `refill`, then writes a
/// key and asks once more: the scan finds it.
fn sweep(req: &Request) -> Result<Response, Error> {
    const SWEEP: Map<String, String> = Map::new("sweep");
    mark(req);
    for i in 0..count(req, "keys") {
        let key = format!("{i:08}");
        SWEEP.insert(&key, &String::new());
        SWEEP.remove(&key);
    }
    let mut scan = SWEEP.iter();
    for _ in 0..count(req, "nexts") {
        if scan.next().is_some() {
            return Err(Error::internal("a scan found a removed key"));
        }
    }
    // A finished scan still sees a key written after it finished.
    if count(req, "refill") > 0 {
        SWEEP.insert(&"refill".to_owned(), &String::new());
        if scan.next().map(|(k, _)| k).as_deref() != Some("refill") {
            return Err(Error::internal("a finished scan missed a key written after it finished"));
        }
    }
    Ok(Response::status(204))
}

/// Reads one key from each of `n` maps of its own (besides `scratch`, which `mark` writes).
fn many_maps(req: &Request) -> Result<Response, Error> {
    mark(req);
    for i in 0..count(req, "n") {
        black_box(cloister_sdk::raw::get(&format!("map{i}"), b"key"));
    }
    Ok(Response::status(204))
}

/// Asks WASI's `random_get` for `bytes` bytes in one call.
fn random(req: &Request) -> Result<Response, Error> {
    mark(req);
    let mut buf = vec![0u8; count(req, "bytes")];
    random_get(&mut buf)?;
    Ok(Response::json(&buf.len()))
}

#[cfg(target_arch = "wasm32")]
fn random_get(buf: &mut [u8]) -> Result<(), Error> {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        fn random_get(buf: *mut u8, len: usize) -> u16;
    }
    // SAFETY: `buf` is valid for writes of its length for the call's duration.
    match unsafe { random_get(buf.as_mut_ptr(), buf.len()) } {
        0 => Ok(()),
        errno => Err(Error::internal(format!("random_get failed with errno {errno}"))),
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn random_get(_: &mut [u8]) -> Result<(), Error> {
    Err(Error::internal("random_get is a wasm import"))
}

/// Writes the body and attaches the 32-byte claims digest the body names in hex.
fn claim(req: &Request) -> Result<Response, Error> {
    let text = req.text()?.trim().to_owned();
    let digest: Vec<u8> = (0..text.len())
        .step_by(2)
        .filter_map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    let digest: [u8; 32] = digest.try_into().map_err(|_| Error::bad_request("send 32 bytes of hex"))?;
    SCRATCH.insert(&"claim".to_owned(), &text);
    Ok(Response::status(200).with_claims_digest(digest))
}

/// As a constitution: every proposal validates and is accepted at once; `apply` writes to
/// `gov.app_config` and then misbehaves as the first action's name says (`loop`, `grow`, `panic`,
/// `corrupt_members`, `rewrite_service_identity`, `endorse_a_stranger`, `back_to_recovering`,
/// `forge_previous_identity`, `replace_recovery_shares`, `drop_recovery_shares`,
/// `forge_ledger_secret`, `swap_attestation_root`, `drop_attestation_root`, `swap_node_key`,
/// `invent_node`, `misfile_user`, `forget_node_key`, `drop_node`, `forget_history`,
/// `pad_open_proposals`, `accept_another`, `ask_rekey`, `take_back_rekey`), or succeeds for any
/// other name. `/resolve` loops when the first action is `loop_in_resolve`.
fn first_action(req: &Request) -> Result<String, Error> {
    let body: serde_json::Value = req.json()?;
    let proposal = body.get("proposal").unwrap_or(&body);
    Ok(proposal["actions"][0]["name"].as_str().unwrap_or_default().to_owned())
}

fn constitution_resolve(req: &Request) -> Result<Response, Error> {
    if first_action(req)? == "loop_in_resolve" {
        // No mark: resolve runs read-only.
        let mut n = 0u64;
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }
    Ok(Response::json(&serde_json::json!({ "state": "Accepted" })))
}

fn constitution_apply(req: &Request) -> Result<Response, Error> {
    Map::<String, String>::new("gov.app_config").insert(&"misbehave".to_owned(), &"applied".to_owned());
    match first_action(req)?.as_str() {
        "loop" => spin(req),
        "grow" => grow(req),
        "panic" => panic(req),
        // A member record the node cannot read back: the node must refuse the effects.
        "corrupt_members" => write_gov(req),
        // Records only the node writes: the service's own certificate, and node endorsements.
        "rewrite_service_identity" => {
            let service = Map::<String, serde_json::Value>::new("gov.service");
            let mut record = service.get(&"service".to_owned()).ok_or_else(|| Error::bad_request("no gov.service"))?;
            record["identity"] = serde_json::Value::String(
                "-----BEGIN CERTIFICATE-----\nnot the service's\n-----END CERTIFICATE-----\n".into(),
            );
            service.insert(&"service".to_owned(), &record);
            Ok(Response::status(204))
        }
        // The service back to Recovering (which would restore the previous private state over
        // the current one), or the shares and previous identities only the node writes.
        "back_to_recovering" => {
            let service = Map::<String, serde_json::Value>::new("gov.service");
            let mut record = service.get(&"service".to_owned()).ok_or_else(|| Error::bad_request("no gov.service"))?;
            record["state"] = serde_json::Value::String("Recovering".into());
            service.insert(&"service".to_owned(), &record);
            Ok(Response::status(204))
        }
        "forge_previous_identity" => {
            let service = Map::<String, serde_json::Value>::new("gov.service");
            let mut record = service.get(&"service".to_owned()).ok_or_else(|| Error::bad_request("no gov.service"))?;
            record["previous_identities"] = serde_json::json!([{ "cert": "x", "endorsement": "x" }]);
            service.insert(&"service".to_owned(), &record);
            Ok(Response::status(204))
        }
        "replace_recovery_shares" => {
            let record = serde_json::json!({ "version": 9, "threshold": 1, "service": "00",
                "wrapped_secret": "", "shares": {} });
            Map::<String, serde_json::Value>::new("gov.recovery").insert(&"shares".to_owned(), &record);
            Ok(Response::status(204))
        }
        "drop_recovery_shares" => {
            let _ = Map::<String, serde_json::Value>::new("gov.recovery").remove(&"shares".to_owned());
            Ok(Response::status(204))
        }
        "forge_ledger_secret" => {
            // A version 2 whose secret the constitution chose, "sealed" to nobody.
            let record = serde_json::json!({ "version": 2, "answers": 0, "previous_sealed": "", "nodes": {} });
            Map::<String, serde_json::Value>::new("gov.ledger_secrets")
                .insert(&"00000000000000000002".to_owned(), &record);
            Ok(Response::status(204))
        }
        "ask_rekey" | "take_back_rekey" => {
            let service = Map::<String, serde_json::Value>::new("gov.service");
            let mut record = service.get(&"service".to_owned()).ok_or_else(|| Error::bad_request("no gov.service"))?;
            let asked = record["rekeys_requested"].as_u64().unwrap_or(0);
            let name = first_action(req)?;
            record["rekeys_requested"] = (if name == "ask_rekey" { asked + 1 } else { 0 }).into();
            service.insert(&"service".to_owned(), &record);
            Ok(Response::status(204))
        }
        // The roots of trust fixed at genesis, swapped for a mock root of the constitution's.
        "swap_attestation_root" => {
            let root = serde_json::json!({ "kind": "mock", "ark": "00" });
            Map::<String, serde_json::Value>::new("gov.attestation.root").insert(&"root".to_owned(), &root);
            Ok(Response::status(204))
        }
        // The key a node's rekeys are sealed to, swapped for one of the constitution's choosing.
        "swap_node_key" => {
            let nodes = Map::<String, serde_json::Value>::new("gov.nodes");
            let (id, mut node) = nodes.iter().next().ok_or_else(|| Error::internal("no node"))?;
            node["encryption_key"] = "a key of the constitution's".into();
            nodes.insert(&id, &node);
            Ok(Response::status(204))
        }
        // The record of accepted requests that refuses a replay, cleared.
        "forget_history" => {
            let history = Map::<String, serde_json::Value>::new("gov.history");
            for (id, _) in history.iter().collect::<Vec<_>>() {
                history.remove(&id);
            }
            Ok(Response::status(204))
        }
        // A member's Open proposals, padded with one that does not exist: enough of them
        // and that member could propose nothing.
        "pad_open_proposals" => {
            let open = Map::<String, u64>::new("gov.proposals_open");
            open.insert(&"member/ghost".to_owned(), &0);
            Ok(Response::status(204))
        }
        // Another proposal's outcome, forged.
        "accept_another" => {
            let proposals = Map::<String, serde_json::Value>::new("gov.proposals");
            let (id, mut proposal) = proposals.iter().next().ok_or_else(|| Error::internal("no proposal"))?;
            proposal["state"] = "Accepted".into();
            proposals.insert(&id, &proposal);
            Ok(Response::status(204))
        }
        // A node's record written back as a constitution built before records held an
        // encryption key writes it: without the key.
        "forget_node_key" => {
            let nodes = Map::<String, serde_json::Value>::new("gov.nodes");
            let (id, mut node) = nodes.iter().next().ok_or_else(|| Error::internal("no node"))?;
            node.as_object_mut().ok_or_else(|| Error::internal("a node record"))?.remove("encryption_key");
            nodes.insert(&id, &node);
            Ok(Response::status(204))
        }
        "drop_node" => {
            let nodes = Map::<String, serde_json::Value>::new("gov.nodes");
            let (id, _) = nodes.iter().next().ok_or_else(|| Error::internal("no node"))?;
            nodes.remove(&id);
            Ok(Response::status(204))
        }
        // A user filed under another id than its certificate's: whoever holds that id's
        // certificate would be let in, not the one the members were shown.
        "misfile_user" => {
            let body: serde_json::Value = req.json()?;
            let cert = body["proposal"]["actions"][0]["args"]["cert"].clone();
            let user = serde_json::json!({ "cert": cert, "data": null });
            Map::<String, serde_json::Value>::new("gov.users").insert(&"ab".repeat(32), &user);
            Ok(Response::status(204))
        }
        "invent_node" => {
            let node = serde_json::json!({ "name": "ghost", "status": "Trusted", "cert": "" });
            Map::<String, serde_json::Value>::new("gov.nodes").insert(&"42".to_owned(), &node);
            Ok(Response::status(204))
        }
        "drop_attestation_root" => {
            Map::<String, serde_json::Value>::new("gov.attestation.root").remove(&"root".to_owned());
            Ok(Response::status(204))
        }
        "endorse_a_stranger" => {
            let record = serde_json::json!({ "cert_sha256": "00".repeat(32) });
            Map::<String, serde_json::Value>::new("gov.endorsements").insert(&"42".to_owned(), &record);
            Ok(Response::status(204))
        }
        _ => Ok(Response::status(204)),
    }
}

pub fn router() -> Router {
    Router::new()
        .route("GET", "/noop", Mode::Readonly, Auth::Public, noop)
        .post("/put/{key}", put)
        .get("/get/{key}", get)
        .post("/loop", spin)
        .get("/spin", spin_reading)
        .post("/grow", grow)
        .post("/recurse", recurse)
        .post("/panic", panic)
        .post("/big", big)
        .post("/write-gov", write_gov)
        .get("/read-gov", read_gov)
        .get("/print", print)
        .get("/clock", clock)
        .post("/claim", claim)
        .post("/sweep", sweep)
        .post("/many-maps", many_maps)
        .post("/random", random)
        .route("GET", "/members-only", Mode::Readonly, Auth::Members, noop)
        .route("GET", "/users-only", Mode::Readonly, Auth::Users, noop)
        .route("POST", "/validate", Mode::Readonly, Auth::Members, noop)
        .route("POST", "/resolve", Mode::Readonly, Auth::Members, constitution_resolve)
        .route("POST", "/apply", Mode::Readwrite, Auth::Members, constitution_apply)
}

export!(router);
