//! A fresh node joins a network whose ledger holds a million entries: how long until it serves
//! reads from its own state. The goal (#16) is under 30 s, by snapshot transfer, not log replay.
//!
//! One node (the kv app, release build, the default snapshot and log-purge settings) takes
//! `CLOISTER_JOIN_ENTRIES` (default 1,000,000) puts of distinct keys, so the ledger has that many
//! entries and the state that many private values. Then a second node starts with an empty data
//! folder, attests and waits as Pending; the member trusts it by proposal; and the bench polls the
//! new node until its own `/node/network` shows it has applied the last put and a `GET` of that
//! key answers the value. It prints each step's time and the total against the goal, what node
//! 0's data folder holds after the puts, and, once the nodes have stopped, how node 0's state
//! database uses its file (redb's page accounting, and the file's size once compacted).
//!
//! Run with `just bench-join [ENTRIES]`.

use std::time::{Duration, Instant};

use cloister_bundled::KV;
use cloister_client::Client;
use cloister_tests::cluster::Cluster;
use serde_json::{Value, json};

/// The goal: from the new node's start to serving reads.
const JOIN_GOAL: Duration = Duration::from_secs(30);
/// Connections writing the ledger, and requests in flight on each (HTTP/2 streams).
const CONNECTIONS: usize = 16;
const STREAMS_PER_CONNECTION: usize = 16;
/// How long any one step may take before the bench gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

fn key(n: u64) -> String {
    format!("k{n:08}")
}

fn value(n: u64) -> String {
    format!("value of entry {n:08}, 32 bytes")
}

/// The last applied index, as node `i` reports it in `/node/network` (`"term.index"`).
async fn applied(c: &Cluster, i: usize) -> Option<u64> {
    let net = c.network(i).await?;
    net["applied"].as_str()?.rsplit('.').next()?.parse().ok()
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut check: F) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < STEP_TIMEOUT, "{what}: not within {STEP_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Writes `entries` puts of distinct keys through node 0, `CONNECTIONS × STREAMS_PER_CONNECTION`
/// at a time.
async fn fill(c: &Cluster, entries: u64) {
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = c.client(0, 0).await.expect("member 0 connects to node 0");
        for _ in 0..STREAMS_PER_CONNECTION {
            let (client, next) = (client.clone(), next.clone());
            writers.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= entries {
                        return;
                    }
                    let reply = client
                        .request("PUT", &format!("/app/kv/{}", key(n)), None, value(n))
                        .await
                        .expect("a put is answered");
                    assert_eq!(reply.status, 200, "put {n}: {}", reply.text());
                    if (n + 1) % 100_000 == 0 {
                        eprintln!("  {} puts in {:.0?}", n + 1, start.elapsed());
                    }
                }
            }));
        }
    }
    for w in writers {
        w.await.expect("a writer finishes");
    }
    let took = start.elapsed();
    eprintln!("wrote {entries} puts in {took:.1?} ({:.0}/s)", entries as f64 / took.as_secs_f64());
}

async fn node_status(c: &Cluster, name: &str) -> Option<String> {
    let client = c.client(0, 0).await.ok()?;
    let reply: Value = client.get("/node/attestations").await.ok()?.json().ok()?;
    let node = reply["nodes"].as_array()?.iter().find(|n| n["name"] == name)?.clone();
    Some(format!("{}|{}", node["status"].as_str()?, node["node_id"].as_str()?))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let entries: u64 = std::env::var("CLOISTER_JOIN_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mut c = Cluster::prepare(2, 1, KV, |_| {});
    c.spawn(0);
    c.wait_stable(1, Duration::from_secs(120)).await;
    c.open(0).await;
    fill(&c, entries).await;
    let target = applied(&c, 0).await.expect("node 0 reports its applied index");
    let data = c.nodes[0].config.node.data_dir.clone();
    let parts = folder_parts(&data);
    let total: u64 = parts.iter().map(|(_, bytes)| bytes).sum();
    eprintln!("node 0 has applied {target} entries; data folder {:.0} MB:", total as f64 / 1e6);
    for (name, bytes) in parts {
        eprintln!("  {name}: {:.0} MB", bytes as f64 / 1e6);
    }

    let start = Instant::now();
    c.spawn(1);
    let mut node_id = String::new();
    let pending = wait_for("node1 to be Pending", async || match node_status(&c, "node1").await {
        Some(s) if s.starts_with("Pending|") => {
            node_id = s["Pending|".len()..].to_owned();
            true
        }
        _ => false,
    })
    .await;
    let client = c.client(0, 0).await.expect("member 0 connects");
    let member = &c.members[0].keyed;
    let trust = json!([{ "name": "transition_node_to_trusted", "args": { "node_id": node_id } }]);
    let (_, state) = client.pass(member, &[member], trust).await.expect("the trust proposal is accepted");
    assert_eq!(state["state"], "Accepted", "{state}");
    let trusted = start.elapsed();
    let last = key(entries - 1);
    let reader = async || Client::connect(&c.nodes[1].rest_url, &c.roots(), Some(member)).await.ok();
    wait_for("node1 to serve the last put from its own state", async || {
        if applied(&c, 1).await.is_none_or(|a| a < target) {
            return false;
        }
        let Some(r) = reader().await else { return false };
        r.get(&format!("/app/kv/{last}"))
            .await
            .is_ok_and(|reply| reply.status == 200 && reply.body.as_ref() == value(entries - 1).as_bytes())
    })
    .await;
    let serving = start.elapsed();
    let log = c.log(1);
    let snapshot = log.contains("installed a snapshot");
    eprintln!("node1's log, snapshot lines:");
    for line in log.lines().filter(|l| l.contains("snapshot")) {
        eprintln!("  {line}");
    }
    println!(
        "a fresh node joining a {target}-entry ledger ({entries} distinct keys): Pending after {pending:.1?}, \
         trusted after {trusted:.1?}, serving reads after {serving:.1?} (goal {JOIN_GOAL:?}: {:.2}× the goal); \
         through a snapshot: {}",
        serving.as_secs_f64() / JOIN_GOAL.as_secs_f64(),
        if snapshot { "yes" } else { "no, log replay" },
    );
    for i in [1, 0] {
        c.stop(i);
    }
    state_database_stats(&cloister_node::state_file(&data));
}

/// How node 0's state database uses its file: redb's own accounting, then its size once
/// compacted (what the file would be with no free pages).
fn state_database_stats(path: &std::path::Path) {
    let mb = |b: u64| b as f64 / 1e6;
    let before = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let db = redb::Database::open(path).expect("node 0's state database opens once the node has stopped");
    let txn = db.begin_write().expect("a write transaction on the state database");
    let stats = txn.stats().expect("redb reports its stats");
    txn.abort().expect("the stats transaction ends");
    let page = stats.page_size() as u64;
    eprintln!(
        "state.redb: file {:.0} MB; {} pages of {page} B allocated ({:.0} MB: {} leaf, {} branch); \
         keys and values {:.0} MB, metadata {:.0} MB, fragmentation {:.0} MB; tree height {}",
        mb(before),
        stats.allocated_pages(),
        mb(stats.allocated_pages() * page),
        stats.leaf_pages(),
        stats.branch_pages(),
        mb(stats.stored_bytes()),
        mb(stats.metadata_bytes()),
        mb(stats.fragmented_bytes()),
        stats.tree_height(),
    );
    drop(db);
    let start = Instant::now();
    let done = cloister_store::compact(path).expect("`cloister node compact` compacts the stopped node's file");
    eprintln!(
        "state.redb compacted (`cloister node compact`, checksums verified first): {:.0} MB in {:.1?}",
        mb(done.bytes_after),
        start.elapsed()
    );
}

/// Each file and folder at the top of `dir`, with its size, largest first.
fn folder_parts(dir: &std::path::Path) -> Vec<(String, u64)> {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    let mut parts: Vec<(String, u64)> =
        entries.map(|e| (e.file_name().to_string_lossy().into_owned(), entry_bytes(&e))).collect();
    parts.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    parts
}

/// A file's length, or the bytes of every file under a folder.
fn entry_bytes(entry: &std::fs::DirEntry) -> u64 {
    match entry.file_type() {
        Ok(t) if t.is_dir() => {
            std::fs::read_dir(entry.path()).into_iter().flatten().flatten().map(|e| entry_bytes(&e)).sum()
        }
        _ => entry.metadata().map(|m| m.len()).unwrap_or(0),
    }
}
