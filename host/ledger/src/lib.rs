//! The ledger: every committed entry, hash-chained and in a Merkle tree, periodically signed by
//! the leader, appended to chunk files that are never rewritten, and sealed where private.
//!
//! - `entry.rs`: what an entry holds and how it hashes (leaf, chain), signature payloads;
//! - `merkle.rs`: the persistent RFC 6962 tree, with `ct-merkle`'s hashing and verification;
//! - `index.rs`: the tree, leaves, chain hashes and signatures in the state database, committed
//!   with the state they describe;
//! - `files.rs`: the chunk files;
//! - `txid.rs`: transaction ids, `term.seqno`;
//! - `verify.rs`: offline verification of a ledger folder and of receipts.
//!
//! Entries reach the files before the index and state commit (write-ahead): after a crash, the
//! files may hold entries the index never recorded, which are cut, and Raft applies them again.

pub mod entry;
pub mod files;
pub mod index;
pub mod merkle;
pub mod settings;
pub mod txid;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

use cloister_store as kv;
use entry::LedgerEntry;
use files::{LedgerFiles, Record, StartState};
pub use settings::LedgerSection;
use verify::VerifyError;

/// A node's ledger files.
pub struct Ledger {
    files: Mutex<LedgerFiles>,
    service_cert: Vec<u8>,
}

impl Ledger {
    /// Opens the ledger folder: verifies every file (refusing to start on any fault), cuts a torn
    /// tail, and cuts entries the index never committed.
    pub fn open(
        dir: &Path,
        service_cert: Vec<u8>,
        settings: &LedgerSection,
        store: &kv::Store,
    ) -> anyhow::Result<Ledger> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating the ledger folder {}", dir.display()))?;
        let batch = store.write_batch()?;
        index::create(batch.txn())?;
        batch.commit()?;
        let state = index::state(&store.read_txn()?)?;
        remove_stale_temporary_files(dir)?;
        let report = match verify::verify_dir(dir, Some(&service_cert), None) {
            Ok(report) => report,
            Err(VerifyError::TornTail { file, valid_bytes, report }) => {
                tracing::warn!(file = %file.display(), after = ?report.last_seqno, "cutting a torn ledger tail");
                truncate_file(&file, valid_bytes)?;
                *report
            }
            Err(fault) => {
                anyhow::bail!("the ledger in {} is damaged, so the node will not start: {fault}", dir.display())
            }
        };
        // The next seqno the files would hold, against the index's.
        let files_next = report.last_seqno.map(|l| l + 1).or(report.first_seqno).unwrap_or(0);
        if files_next > state.size {
            tracing::warn!(files_next, index = state.size, "cutting ledger entries the index never committed");
            cut_from(dir, state.size)?;
        } else if files_next < state.size {
            if state.first > 0 && state.size == state.first && report.entries == 0 {
                // A snapshot was installed and nothing applied since: restore its start record.
                let start = index::start_state(&store.read_txn()?)?;
                LedgerFiles::open(dir, settings.chunk_bytes)?.restart_at(start)?;
            } else {
                anyhow::bail!(
                    "the ledger files in {} stop before seqno {files_next} but this node has applied up to {}: \
                     entries are missing",
                    dir.display(),
                    state.size.saturating_sub(1)
                );
            }
        } else if state.size > 0 && report.chain != state.chain && report.entries > 0 {
            anyhow::bail!("the ledger files in {} disagree with the index at seqno {}", dir.display(), state.size);
        }
        let files = LedgerFiles::open(dir, settings.chunk_bytes)?;
        Ok(Ledger { files: Mutex::new(files), service_cert })
    }

    pub fn service_cert(&self) -> &[u8] {
        &self.service_cert
    }

    /// Appends entries to the files durably (before the index commits them).
    pub fn append(&self, entries: &[LedgerEntry]) -> std::io::Result<()> {
        self.files.lock().expect("ledger files lock").append(entries)
    }

    /// Continues the files after an installed snapshot.
    pub fn restart_at(&self, start: StartState) -> std::io::Result<()> {
        self.files.lock().expect("ledger files lock").restart_at(start)
    }
}

fn remove_stale_temporary_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn truncate_file(path: &Path, len: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_all()
}

/// Cuts every entry from `seqno` on out of the files (write-ahead entries the index never saw).
fn cut_from(dir: &Path, seqno: u64) -> anyhow::Result<()> {
    for path in files::chunk_paths(dir)?.into_iter().rev() {
        let chunk = files::read_chunk(&path)?;
        if chunk.first_seqno > seqno && !matches!(chunk.records.first(), Some(Record::Start(_))) {
            std::fs::remove_file(&path)?;
            continue;
        }
        let offsets = files::record_offsets(&path)?;
        let keep = chunk.records.iter().take_while(|r| !matches!(r, Record::Entry(e) if e.seqno >= seqno)).count();
        truncate_file(&path, offsets[keep])?;
        return Ok(());
    }
    Ok(())
}

/// The folder a node keeps its ledger in.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger")
}
