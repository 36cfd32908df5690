//! Ledger benchmarks (`cargo bench -p cloister-ledger --bench ledger`):
//! - append throughput (entries/s, MB/s) through the index, the Merkle tree and the files, in
//!   batches of 256 with one durable commit each, against the limit: blake3 over the same bytes
//!   plus an append-only, fsynced file write of them;
//! - one entry per non-durable commit, as a follower applies at one client: µs per entry through
//!   the index and the files, against the floor of one row per non-durable redb commit;
//! - receipt verifications per second on one core: each with its own signature check, and receipts
//!   that share a signature entry through one `ReceiptVerifier`, against the goal of 10,000/s;
//! - a signature entry's check, as every node applies one: its first from a node (the node's
//!   certificate checked against the service's, then the signature) against the next ones from
//!   the same node (the certificate check remembered).

use std::io::Write;
use std::time::{Duration, Instant};

use cloister_crypto::identity::{self, ServiceCa};
use cloister_crypto::seal::Sealer;
use cloister_ledger::LedgerSection;
use cloister_ledger::entry::{Endorsement, NodeSigner, Payload, SignaturePayload, TxEntry, TxKind};
use cloister_ledger::verify::{Receipt, ReceiptVerifier, SignatureRecord, verify_receipt};
use cloister_ledger::{Ledger, index, merkle};
use cloister_store::{Store, WriteSet};

const ENTRIES: u64 = 20_000;
const BATCH: u64 = 256;
/// Entries appended one per commit.
const SINGLES: usize = 5_000;

fn entries(sealer: &Sealer) -> Vec<Payload> {
    (0..ENTRIES)
        .map(|i| {
            let mut ws = WriteSet::default();
            ws.put("app/records", format!("LEI{i:017}").as_bytes(), &[b'x'; 160]);
            Payload::Tx(TxEntry::new(TxKind::App, ws, None, sealer))
        })
        .collect()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ServiceCa::generate("bench service").unwrap();
    let ca_der = identity::cert_der(ca.keyed.cert_pem.as_bytes()).unwrap().to_vec();
    let sealer = Sealer::new(&Sealer::generate_secret());
    let payloads = entries(&sealer);
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger"), ca_der.clone(), &LedgerSection::default(), &store).unwrap();

    // The ledger path: index (leaf, chain, tree nodes) and files, one durable commit per batch.
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut encoded_entries = Vec::with_capacity(ENTRIES as usize);
    for batch in payloads.chunks(BATCH as usize) {
        let txn = store.write_batch().unwrap();
        let mut appended = Vec::with_capacity(batch.len());
        {
            let mut appender = index::Appender::new(txn.txn(), ca_der.clone()).unwrap();
            for p in batch {
                let seqno = appender.state().size;
                appended.push(appender.append(seqno, 1, p.clone()).unwrap());
            }
            appender.finish().unwrap();
        }
        ledger.append(&appended).unwrap();
        ledger.sync().unwrap();
        txn.commit().unwrap();
        for e in appended {
            let encoded = postcard::to_stdvec(&e).unwrap();
            bytes += encoded.len() as u64 + 4;
            encoded_entries.push(encoded);
        }
    }
    let ledger_time = started.elapsed();

    // The limit: blake3 over the same bytes, and an append-only file write of them, fsynced per
    // batch.
    let started = Instant::now();
    let mut file = std::fs::File::create(dir.path().join("raw.bin")).unwrap();
    for batch in encoded_entries.chunks(BATCH as usize) {
        for e in batch {
            std::hint::black_box(blake3::hash(e));
            file.write_all(&(e.len() as u32).to_le_bytes()).unwrap();
            file.write_all(e).unwrap();
        }
        file.sync_data().unwrap();
    }
    let raw_time = started.elapsed();
    let rate = |d: Duration| ENTRIES as f64 / d.as_secs_f64();
    let mb = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!(
        "ledger append: {:.0} entries/s, {:.1} MB/s; raw blake3 + append-only write: {:.0} entries/s, {:.1} MB/s; \
         ratio {:.2}",
        rate(ledger_time),
        mb(ledger_time),
        rate(raw_time),
        mb(raw_time),
        raw_time.as_secs_f64() / ledger_time.as_secs_f64()
    );

    singles(&payloads[..SINGLES], &ca_der);
    signature_checks(&ca, &ca_der);

    // A receipt for an entry in the middle, signed over the whole ledger.
    let node = ca.issue_node_cert("node", &["localhost".into()]).unwrap();
    let signer = NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap();
    let read = store.read_txn().unwrap();
    let (size, root, chain) = index::signing_view(&read).unwrap();
    let payload = SignaturePayload::sign(size, root, chain, &signer);
    let mut replica = merkle::MemoryNodes::default();
    let leaves: Vec<_> = (0..size)
        .map(|seqno| {
            let e: cloister_ledger::entry::LedgerEntry =
                postcard::from_bytes(&encoded_entries[seqno as usize]).unwrap();
            e.components()
        })
        .collect();
    for (i, c) in leaves.iter().enumerate() {
        merkle::append(&mut replica, i as u64, &c.leaf()).unwrap();
    }
    let seqno = size / 2;
    let service_identity = identity::generate_service_identity("bench").unwrap();
    let identity_der = identity::cert_der(service_identity.cert_pem.as_bytes()).unwrap().to_vec();
    let endorsement = Endorsement::issue(&signer.cert_der, size, false, &service_identity.key_pem).unwrap();
    let receipt = Receipt {
        tx_id: format!("1.{seqno}"),
        leaf: leaves[seqno as usize].clone(),
        proof: merkle::path(&replica, seqno, size).unwrap().iter().map(hex::encode).collect(),
        signature: SignatureRecord { seqno: size, term: 1, payload },
        node_cert: node.cert_pem.clone(),
        endorsement: Some(endorsement),
        service_cert: ca.keyed.cert_pem.clone(),
        service_identity: service_identity.cert_pem.clone(),
    };
    verify_receipt(&receipt, &identity_der).expect("the receipt verifies");
    let n = 2_000;
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box(verify_receipt(std::hint::black_box(&receipt), &identity_der).unwrap());
    }
    let per = started.elapsed() / n;
    println!(
        "receipt verification: {:.0} receipts/s on one core ({:.0} µs each; proof of {} steps in a tree of {size})",
        1.0 / per.as_secs_f64(),
        per.as_secs_f64() * 1e6,
        receipt.proof.len()
    );

    // Receipts for every entry, all under that one signature entry, through one verifier.
    let shared: Vec<Receipt> = (0..size)
        .map(|seqno| Receipt {
            tx_id: format!("1.{seqno}"),
            leaf: leaves[seqno as usize].clone(),
            proof: merkle::path(&replica, seqno, size).unwrap().iter().map(hex::encode).collect(),
            ..receipt.clone()
        })
        .collect();
    let verifier = ReceiptVerifier::new(&identity_der);
    let started = Instant::now();
    for r in &shared {
        std::hint::black_box(verifier.verify(std::hint::black_box(r)).unwrap());
    }
    let rate = shared.len() as f64 / started.elapsed().as_secs_f64();
    const GOAL: f64 = 10_000.0;
    println!(
        "receipt verification sharing one signature entry: {rate:.0} receipts/s on one core ({} receipts); \
         goal {GOAL:.0}/s, ratio {:.1}; {:.0}x the receipts/s with a signature check each",
        shared.len(),
        rate / GOAL,
        rate * per.as_secs_f64()
    );
}

/// One entry per non-durable commit, the way a follower applies when one client writes (a
/// durable commit closes the run), against one row per non-durable commit into one table: what
/// any per-entry index must at least pay.
fn singles(payloads: &[Payload], ca_der: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.redb")).unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger"), ca_der.to_vec(), &LedgerSection::default(), &store).unwrap();
    let started = Instant::now();
    let mut appended = Vec::with_capacity(payloads.len());
    for p in payloads {
        let txn = store.write_batch().unwrap();
        let entry = {
            let mut appender = index::Appender::new(txn.txn(), ca_der.to_vec()).unwrap();
            let seqno = appender.state().size;
            let entry = appender.append(seqno, 1, p.clone()).unwrap();
            appender.finish().unwrap();
            entry
        };
        ledger.append(std::slice::from_ref(&entry)).unwrap();
        txn.commit_nondurable().unwrap();
        appended.push(entry);
    }
    ledger.sync().unwrap();
    store.write_batch().unwrap().commit().unwrap();
    let index_time = started.elapsed();

    let encoded: Vec<Vec<u8>> = appended.iter().map(|e| postcard::to_stdvec(e).unwrap()).collect();
    const RAW: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("bench_raw");
    let started = Instant::now();
    for (seqno, e) in encoded.iter().enumerate() {
        let txn = store.write_batch().unwrap();
        txn.txn().open_table(RAW).unwrap().insert(seqno as u64, e.as_slice()).unwrap();
        txn.commit_nondurable().unwrap();
    }
    store.write_batch().unwrap().commit().unwrap();
    let raw_time = started.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / payloads.len() as f64;
    println!(
        "ledger append, one entry per non-durable commit: {:.0} µs per entry; one row per non-durable commit: {:.0} µs; \
         ratio {:.2}",
        per(index_time),
        per(raw_time),
        raw_time.as_secs_f64() / index_time.as_secs_f64()
    );
}

/// A signature entry's check the first time a node's certificate is seen (each entry from a
/// node of its own), against one from a node seen before.
fn signature_checks(ca: &ServiceCa, ca_der: &[u8]) {
    const N: usize = 100;
    let signed: Vec<SignaturePayload> = (0..N)
        .map(|i| {
            let node = ca.issue_node_cert(&format!("node {i}"), &["localhost".into()]).unwrap();
            let signer = NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap();
            SignaturePayload::sign(7, [1; 32], [2; 32], &signer)
        })
        .collect();
    let started = Instant::now();
    for s in &signed {
        s.verify(ca_der).unwrap();
    }
    let first = started.elapsed() / N as u32;
    let started = Instant::now();
    for _ in 0..N {
        std::hint::black_box(&signed[0]).verify(ca_der).unwrap();
    }
    let again = started.elapsed() / N as u32;
    println!(
        "signature entry check: {:.0} µs from a node first seen, {:.0} µs from a node seen before; ratio {:.2}",
        first.as_secs_f64() * 1e6,
        again.as_secs_f64() * 1e6,
        first.as_secs_f64() / again.as_secs_f64()
    );
}
