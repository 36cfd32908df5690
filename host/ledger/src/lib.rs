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

/// Unit and property tests measure their allocations (see `cloister-test-support`).
#[cfg(test)]
#[global_allocator]
static ALLOC: cloister_test_support::TrackingAllocator = cloister_test_support::TrackingAllocator;

pub mod entry;
pub mod files;
pub mod index;
pub mod merkle;
mod remembered;
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
        files::set_aside_before_newest_start(dir)?;
        cut_uncommitted(dir, state.size)?;
        let report = match verify::verify_dir(dir, Some(&service_cert), None, None) {
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
            anyhow::bail!(
                "the ledger files in {} hold entries up to seqno {} that the index never committed, past damage \
                 the node will not cut",
                dir.display(),
                files_next - 1
            );
        } else if files_next < state.size {
            if state.first > 0 && state.size == state.first {
                // A snapshot was installed and nothing applied since: restore its start record
                // (setting aside whatever older files a crash left in place).
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

    /// Appends entries to the files (before the index commits them), without waiting for the
    /// disk: [`Ledger::sync`] must precede any durable commit of the index that covers them, so
    /// the durable index never runs ahead of the durable files.
    pub fn append(&self, entries: &[LedgerEntry]) -> std::io::Result<()> {
        self.files.lock().expect("ledger files lock").append(entries)
    }

    /// Makes every appended entry durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.files.lock().expect("ledger files lock").sync()
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

/// Cuts everything the files hold from seqno `size` on — write-ahead entries the index never
/// committed, and a torn, garbled, zero-length or zero-filled tail or file after them — whatever
/// its content, logging each cut with its size. Only what lies past the last committed entry is
/// cut: damage before it is left for the verification walk, which refuses to start.
fn cut_uncommitted(dir: &Path, size: u64) -> anyhow::Result<()> {
    let mut changed = false;
    for path in files::chunk_paths(dir)?.into_iter().rev() {
        let Some(first) = files::first_seqno_of(&path) else { continue };
        let bytes = std::fs::metadata(&path)?.len();
        if first >= size {
            tracing::warn!(file = %path.display(), bytes, "removing a ledger file the index never committed");
            std::fs::remove_file(&path)?;
            changed = true;
            continue;
        }
        // The newest file with committed entries: keep up to the last of them.
        let chunk = files::read_chunk(&path)?;
        let mut keep = files::CHUNK_HEADER_BYTES;
        let mut last_committed = None;
        for (record, end) in chunk.records.iter().zip(&chunk.ends) {
            if let Record::Entry(e) = record {
                if e.seqno >= size {
                    break;
                }
                last_committed = Some(e.seqno);
            }
            keep = *end;
        }
        if last_committed.is_some() && last_committed == size.checked_sub(1) && bytes > keep {
            tracing::warn!(file = %path.display(), cut_bytes = bytes - keep, "cutting what follows the last committed ledger entry");
            truncate_file(&path, keep)?;
        }
        break;
    }
    if changed {
        cloister_crypto::identity::sync_dir(dir)?;
    }
    Ok(())
}

/// The folder a node keeps its ledger in.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger")
}
