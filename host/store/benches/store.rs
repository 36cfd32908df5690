//! State database benchmarks (`cargo bench -p cloister-store --bench store`): the cost of keeping
//! private maps unreadable at rest. The baseline is the same work on a store without a sealer
//! (keys and values in clear, scans straight over redb); the sealed store keeps each private
//! entry under a keyed digest with key and value sealed together, and scans through its
//! in-memory key index.
//! - writes: 100,000 private entries in durable batches of 1,000, to a map nothing has scanned
//!   (the sealed store keeps no key index for it);
//! - overwrites: every one of them again, in the same batches;
//! - point reads of every key;
//! - a full scan in key order, one `first_in` at a time, as an app's pagination does: the first
//!   (the sealed store reads the map's keys back from the sealed entries for the scan, and again
//!   to index the map), then another through the index;
//! - writes of 100,000 new entries to the map, now indexed;
//! - reopening, and the first scan after it (all 200,000 entries).
//!
//! Then the leader's case: point reads of keys absent from 1,024 pending write sets (the default
//! `pending_writes_max`, a stack a leader under load holds) of 4 writes each, against the same
//! reads with nothing pending. The stack is merged into one map, so the ratio should stay near 1;
//! reading through the write sets one by one cost about 20% of a loaded leader's CPU.
//!
//! Last, the governance reads every request or peer message makes: a node's standing (each
//! message on the peer listener) from a record carrying SNP evidence of the sizes a real one
//! has, and a member's, each through its view against decoding the whole record. The baseline is
//! the read of the record's bytes alone, which both include.

use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloister_crypto::seal::Sealer;
use cloister_store::{PendingWrites, Store, WriteSet};

const ENTRIES: usize = 100_000;
const BATCH: usize = 1_000;
const MAP: &str = "app/records";

fn key(i: usize) -> Vec<u8> {
    format!("PARTY{:03}/LEI{i:015}", i % 7).into_bytes()
}

struct Timings {
    write: Duration,
    overwrite: Duration,
    read: Duration,
    first_scan: Duration,
    scan: Duration,
    write_indexed: Duration,
    reopen: Duration,
    scan_reopened: Duration,
}

/// Scans `MAP` in key order one `first_in` at a time; returns how long it took.
fn scan(store: &Store, expected: usize) -> Duration {
    let tx = store.begin().unwrap();
    let started = Instant::now();
    let mut lower: Bound<Vec<u8>> = Bound::Unbounded;
    let mut seen = 0;
    while let Some((k, _)) = tx.first_in(MAP, lower.as_ref().map(Vec::as_slice), Bound::Unbounded).unwrap() {
        lower = Bound::Excluded(k);
        seen += 1;
    }
    assert_eq!(seen, expected);
    started.elapsed()
}

fn run(sealed: bool) -> Timings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let sealer = Arc::new(Sealer::new(&[7; 32]));
    let open = || if sealed { Store::open_sealed(&path, sealer.clone()) } else { Store::open(&path) }.unwrap();
    let store = open();

    let write_all = |from: usize, value: u8| {
        let started = Instant::now();
        for batch in from / BATCH..(from + ENTRIES) / BATCH {
            let mut tx = store.begin().unwrap();
            for i in batch * BATCH..(batch + 1) * BATCH {
                tx.put(MAP, &key(i), &[value; 100]);
            }
            store.apply(&tx.into_writes()).unwrap();
        }
        started.elapsed()
    };
    let write = write_all(0, b'v');
    let overwrite = write_all(0, b'w');

    let tx = store.begin().unwrap();
    let started = Instant::now();
    for i in 0..ENTRIES {
        assert!(tx.get(MAP, &key(i)).unwrap().is_some());
    }
    let read = started.elapsed();
    drop(tx);
    let first_scan = scan(&store, ENTRIES);
    let scan_again = scan(&store, ENTRIES);
    let write_indexed = write_all(ENTRIES, b'v');
    drop(store);

    let started = Instant::now();
    let store = open();
    let reopen = started.elapsed();
    let scan_reopened = scan(&store, 2 * ENTRIES);
    Timings { write, overwrite, read, first_scan, scan: scan_again, write_indexed, reopen, scan_reopened }
}

fn main() {
    let plain = run(false);
    let sealed = run(true);
    let row = |what: &str, plain: Duration, sealed: Duration| row_of(what, ENTRIES, plain, sealed);
    println!("{ENTRIES} private entries of 100 bytes, keys of 24 bytes:");
    row("writes (batches 1000)", plain.write, sealed.write);
    row("overwrites (same)", plain.overwrite, sealed.overwrite);
    row("point reads", plain.read, sealed.read);
    row("first scan in order", plain.first_scan, sealed.first_scan);
    row("scan in key order", plain.scan, sealed.scan);
    row("writes (map indexed)", plain.write_indexed, sealed.write_indexed);
    row_of("reopen", 2 * ENTRIES, plain.reopen, sealed.reopen);
    row_of("scan after reopen", 2 * ENTRIES, plain.scan_reopened, sealed.scan_reopened);
    pending_reads();
    governance_reads();
}

/// One row: entries per second on each store, and the sealed one's cost over the plain one's.
fn row_of(what: &str, entries: usize, plain: Duration, sealed: Duration) {
    let per_s = |d: Duration| entries as f64 / d.as_secs_f64();
    println!(
        "{what:<22} plain {:>10.0}/s   sealed {:>10.0}/s   sealed costs {:.2}x the plain store",
        per_s(plain),
        per_s(sealed),
        sealed.as_secs_f64() / plain.as_secs_f64()
    );
}

const GOV_READS: usize = 20_000;

fn governance_reads() {
    use cloister_store::gov;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let cert = format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", "M".repeat(640));
    // A report is 1184 bytes; a VCEK, ASK and ARK are DER certificates of about 1.3-1.6 KB.
    let hex = |n: usize| "ab".repeat(n);
    let evidence =
        serde_json::json!({"Mock": {"report": hex(1184), "vcek": hex(1350), "ask": hex(1600), "ark": hex(1600)}});
    let node = gov::NodeRecord {
        name: "node1".into(),
        status: gov::NodeStatus::Trusted,
        cert: cert.clone(),
        evidence,
        verified: serde_json::json!({"measurement": hex(48), "chip_id": hex(64), "tcb": {"snp": 23, "microcode": 213}}),
        encryption_key: Some(format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", "M".repeat(160))),
    };
    let member = gov::MemberRecord {
        cert,
        status: gov::MemberStatus::Active,
        encryption_key: Some(hex(400)),
        data: serde_json::json!({"name": "party one"}),
    };
    let mut tx = store.begin().unwrap();
    tx.put(gov::NODES, b"n1", &serde_json::to_vec(&node).unwrap());
    tx.put(gov::MEMBERS, b"m1", &serde_json::to_vec(&member).unwrap());
    store.apply(&tx.into_writes()).unwrap();
    let tx = store.begin().unwrap();
    let time = |read: &dyn Fn() -> bool| {
        let started = Instant::now();
        for _ in 0..GOV_READS {
            assert!(read());
        }
        started.elapsed() / GOV_READS as u32
    };
    let row = |what: &str, bytes: Duration, whole: Duration, view: Duration| {
        println!(
            "{what:<16} bytes only {:>6.2} us   whole record {:>6.2} us   view {:>6.2} us: the view takes {:.2}x the whole record's time",
            bytes.as_secs_f64() * 1e6,
            whole.as_secs_f64() * 1e6,
            view.as_secs_f64() * 1e6,
            view.as_secs_f64() / whole.as_secs_f64()
        );
    };
    println!(
        "governance reads per request or peer message ({} and {} bytes of JSON):",
        tx.get(gov::NODES, b"n1").unwrap().unwrap().len(),
        tx.get(gov::MEMBERS, b"m1").unwrap().unwrap().len()
    );
    row(
        "node standing",
        time(&|| tx.get(gov::NODES, b"n1").unwrap().is_some()),
        time(&|| gov::node(&tx, "n1").unwrap().is_some_and(|n| n.status == gov::NodeStatus::Trusted)),
        time(&|| gov::node_status(&tx, "n1").unwrap() == Some(gov::NodeStatus::Trusted)),
    );
    row(
        "member status",
        time(&|| tx.get(gov::MEMBERS, b"m1").unwrap().is_some()),
        time(&|| gov::member(&tx, "m1").unwrap().is_some_and(|m| m.status == gov::MemberStatus::Active)),
        time(&|| gov::member_status(&tx, "m1").unwrap() == Some(gov::MemberStatus::Active)),
    );
}

const PENDING_SETS: usize = 1_024;
const READS: usize = 100_000;

fn pending_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sealed(&dir.path().join("state.redb"), Arc::new(Sealer::new(&[7; 32]))).unwrap();
    let mut tx = store.begin().unwrap();
    for i in 0..READS {
        tx.put(MAP, &key(i), &[b'v'; 100]);
    }
    store.apply(&tx.into_writes()).unwrap();
    let mut stack = PendingWrites::default();
    let time_reads = |stack: &PendingWrites| {
        let tx = store.begin_over(stack).unwrap();
        let started = Instant::now();
        for i in 0..READS {
            assert!(tx.get(MAP, &key(i)).unwrap().is_some());
        }
        started.elapsed()
    };
    let bare = time_reads(&stack);
    for set in 0..PENDING_SETS {
        let mut writes = WriteSet::default();
        for j in 0..4 {
            writes.put(MAP, &key(READS + set * 4 + j), &[b'p'; 100]);
        }
        stack.push(Arc::new(writes));
    }
    let stacked = time_reads(&stack);
    println!(
        "point reads over {PENDING_SETS} pending write sets: {:>10.0}/s, against {:.0}/s with none pending: {:.2}x the time",
        READS as f64 / stacked.as_secs_f64(),
        READS as f64 / bare.as_secs_f64(),
        stacked.as_secs_f64() / bare.as_secs_f64()
    );
}
