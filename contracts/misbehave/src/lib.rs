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
    SCRATCH
        .get(&key)
        .map(Response::text)
        .ok_or_else(|| Error::not_found("no such key"))
}

fn spin(req: &Request) -> Result<Response, Error> {
    mark(req);
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
    if n == 0 {
        0
    } else {
        black_box(depth(black_box(n - 1)) + 1)
    }
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
    let bytes: usize = req
        .query("bytes")
        .and_then(|b| b.parse().ok())
        .unwrap_or(1 << 20);
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

pub fn router() -> Router {
    Router::new()
        .route("GET", "/noop", Mode::Readonly, Auth::Public, noop)
        .post("/put/{key}", put)
        .get("/get/{key}", get)
        .post("/loop", spin)
        .post("/grow", grow)
        .post("/recurse", recurse)
        .post("/panic", panic)
        .post("/big", big)
        .post("/write-gov", write_gov)
        .get("/read-gov", read_gov)
        .get("/print", print)
        .get("/clock", clock)
        .route("GET", "/members-only", Mode::Readonly, Auth::Members, noop)
        .route("GET", "/users-only", Mode::Readonly, Auth::Users, noop)
}

export!(router);
