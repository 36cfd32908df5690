//! State database benchmarks (`cargo bench -p cloister-store --bench store`): the cost of keeping
//! private maps unreadable at rest. The baseline is the same work on a store without a sealer
//! (keys and values in clear, scans straight over redb); the sealed store keeps each private
//! entry under a keyed digest with key and value sealed together, and scans through its
//! in-memory key index.
//! - writes: 100,000 private entries in durable batches of 1,000;
//! - point reads of every key;
//! - a full scan in key order, one `first_in` at a time, as an app's pagination does;
//! - reopening (the sealed store rebuilds its key index from the sealed entries).
//!
//! Then the leader's case: point reads of keys absent from 1,024 pending write sets (the default
//! `pending_writes_max`, a stack a leader under load holds) of 4 writes each, against the same
//! reads with nothing pending. The stack is merged into one map, so the ratio should stay near 1;
//! reading through the write sets one by one cost about 20% of a loaded leader's CPU.

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
    read: Duration,
    scan: Duration,
    reopen: Duration,
}

fn run(sealed: bool) -> Timings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let sealer = Arc::new(Sealer::new(&[7; 32]));
    let open = || if sealed { Store::open_sealed(&path, sealer.clone()) } else { Store::open(&path) }.unwrap();
    let store = open();

    let started = Instant::now();
    for batch in 0..ENTRIES / BATCH {
        let mut tx = store.begin().unwrap();
        for i in batch * BATCH..(batch + 1) * BATCH {
            tx.put(MAP, &key(i), &[b'v'; 100]);
        }
        store.apply(&tx.into_writes()).unwrap();
    }
    let write = started.elapsed();

    let tx = store.begin().unwrap();
    let started = Instant::now();
    for i in 0..ENTRIES {
        assert!(tx.get(MAP, &key(i)).unwrap().is_some());
    }
    let read = started.elapsed();

    let started = Instant::now();
    let mut lower: Bound<Vec<u8>> = Bound::Unbounded;
    let mut seen = 0;
    while let Some((k, _)) = tx.first_in(MAP, lower.as_ref().map(Vec::as_slice), Bound::Unbounded).unwrap() {
        lower = Bound::Excluded(k);
        seen += 1;
    }
    assert_eq!(seen, ENTRIES);
    let scan = started.elapsed();
    drop((tx, store));

    let started = Instant::now();
    let store = open();
    let reopen = started.elapsed();
    assert!(store.begin().unwrap().first_in(MAP, Bound::Unbounded, Bound::Unbounded).unwrap().is_some());
    Timings { write, read, scan, reopen }
}

fn main() {
    let plain = run(false);
    let sealed = run(true);
    let per_s = |d: Duration| ENTRIES as f64 / d.as_secs_f64();
    let row = |what: &str, plain: Duration, sealed: Duration| {
        println!(
            "{what:<22} plain {:>10.0}/s   sealed {:>10.0}/s   sealed costs {:.2}x the plain store",
            per_s(plain),
            per_s(sealed),
            sealed.as_secs_f64() / plain.as_secs_f64()
        );
    };
    println!("{ENTRIES} private entries of 100 bytes, keys of 24 bytes:");
    row("writes (batches 1000)", plain.write, sealed.write);
    row("point reads", plain.read, sealed.read);
    row("scan in key order", plain.scan, sealed.scan);
    row("reopen", plain.reopen, sealed.reopen);
    pending_reads();
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
