//! The signer task: while this node leads, it appends signature entries over the ledger's Merkle
//! root, so that receipts can be issued for what was committed.

use std::time::{Duration, Instant};

use cloister_consensus::Consensus;
use cloister_ledger::LedgerSection;
use cloister_store as kv;

/// Longest the signer waits for one signature entry's outcome before it signs on.
const SIGNATURE_OUTCOME_WAIT: Duration = Duration::from_secs(2);

/// Signs the ledger while this node leads: a signature entry every `sign_every_entries` entries
/// or `sign_interval_ms`, whichever comes first, when there is anything new to sign.
pub(crate) async fn run_signer(
    consensus: Consensus,
    store: kv::Store,
    signer: cloister_ledger::entry::NodeSigner,
    settings: LedgerSection,
    cancel: tokio_util::sync::CancellationToken,
) {
    let interval = Duration::from_millis(settings.sign_interval_ms);
    let tick = interval.min(Duration::from_millis(20));
    let mut last_signed_at = Instant::now();
    let mut applied = consensus.applied_changes();
    let mut seal_wanted = consensus.seal_wanted();
    // On a leader that has caught up, nothing new to sign and no endorsement end only when an
    // entry applies. So after such a tick the signer waits for the next apply before it ticks
    // on: an idle leader does not read its ledger index 50 times a second for nothing. Any other
    // tick (not leading or not caught up yet, judged by Raft's metrics, which may lag the apply;
    // a signature not due yet; a failed read) polls on as before.
    let mut wait_for_apply = false;
    loop {
        if wait_for_apply {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = applied.changed() => if changed.is_err() { return },
                changed = seal_wanted.changed() => if changed.is_err() { return },
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        // Marked before looking, so that an apply landing while this tick looks ends the next
        // wait at once.
        applied.borrow_and_update();
        let wanted = *seal_wanted.borrow_and_update();
        wait_for_apply = false;
        if !consensus.caught_up() {
            continue;
        }
        let view = store.begin().map_err(anyhow::Error::from).and_then(|tx| {
            let view = cloister_ledger::index::signing_view(tx.snapshot())?;
            let last = cloister_ledger::index::last_signed(tx.snapshot())?;
            Ok((view, last, endorsed(&tx, &signer)?))
        });
        let ((size, root, chain), last, endorsed) = match view {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reading the ledger index to sign it failed");
                continue;
            }
        };
        let for_seal = signs_for_a_seal(last, size, wanted);
        if !endorsed || (nothing_to_sign(last, size) && !for_seal) {
            wait_for_apply = true;
            continue;
        }
        let last_size = last.map_or(0, |(_, s)| s);
        let due = for_seal || size - last_size >= settings.sign_every_entries || last_signed_at.elapsed() >= interval;
        if !due {
            continue;
        }
        let payload = cloister_ledger::entry::SignaturePayload::sign(size, root, chain, &signer);
        match consensus.submit(cloister_ledger::entry::TxEntry::signature(payload), Some(consensus.term())).await {
            Ok(proposal) => {
                last_signed_at = Instant::now();
                // One signature in flight at a time, but never a wait without end: should its
                // answer be lost, or be slow on a loaded machine, the next tick signs what is new
                // then (a receipt needs only one signature covering it).
                match tokio::time::timeout(SIGNATURE_OUTCOME_WAIT, proposal.outcome()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "a signature entry did not commit"),
                    Err(_) => tracing::warn!(
                        wait_ms = SIGNATURE_OUTCOME_WAIT.as_millis() as u64,
                        "a signature entry's outcome did not come in time; signing on"
                    ),
                }
            }
            Err(e) => tracing::debug!(error = %e, "a signature entry was not proposed"),
        }
    }
}

/// Whether a tree of `size` entries holds nothing that `last`, the last signature entry (its
/// seqno and the tree size it covers), leaves unsigned, besides that signature itself.
///
/// A signature covers the tree its leader had applied when it signed, and lands after the entries
/// in flight then: one at seqno 29 may cover only the first 28 entries, leaving entry 28 unsigned.
/// So only a signature that covers every entry before its own seqno leaves nothing new when it is
/// the last entry.
fn nothing_to_sign(last: Option<(u64, u64)>, size: u64) -> bool {
    match last {
        Some((seqno, tree_size)) => size <= tree_size || (tree_size == seqno && size == seqno + 1),
        None => size == 0,
    }
}

/// Whether a snapshot file waiting to be sent needs a signature now: it covers `wanted` entries
/// (`Consensus::seal_wanted`), the last signature covers fewer, and the tree of `size` reaches
/// them. On a quiet service the file's last entry is the last signature itself, which
/// [`nothing_to_sign`] rightly leaves alone otherwise.
fn signs_for_a_seal(last: Option<(u64, u64)>, size: u64, wanted: u64) -> bool {
    wanted > last.map_or(0, |(_, covered)| covered) && size >= wanted
}

/// Whether this node may sign the tree its state holds: the service endorsed it, and it is not
/// Retired, as of that same state. So every signature in the ledger follows its signer's
/// endorsement and covers only entries before its retirement, which is what offline verification
/// checks (`cloister_ledger::verify`).
fn endorsed(tx: &kv::Tx, signer: &cloister_ledger::entry::NodeSigner) -> anyhow::Result<bool> {
    let id = signer.node_id.to_string();
    let endorsement: Option<kv::gov::EndorsementRecord> = kv::gov::get(tx, kv::gov::ENDORSEMENTS, id.as_bytes())?;
    let retired = kv::gov::node_status(tx, &id)?.is_none_or(|s| s == kv::gov::NodeStatus::Retired);
    let ours = hex::encode(cloister_ledger::entry::cert_sha256(&signer.cert_der));
    Ok(!retired && endorsement.is_some_and(|e| e.until.is_none() && e.cert_sha256 == ours))
}

#[cfg(test)]
mod tests {
    use super::nothing_to_sign;

    #[test]
    fn a_signature_that_covers_everything_before_it_leaves_nothing_to_sign() {
        assert!(nothing_to_sign(None, 0), "an empty ledger");
        assert!(!nothing_to_sign(None, 1), "a ledger never signed");
        // The signature at 29 covers entries 0..29: only itself is new.
        assert!(nothing_to_sign(Some((29, 29)), 30));
        assert!(!nothing_to_sign(Some((29, 29)), 31), "an entry after the signature");
        assert!(nothing_to_sign(Some((29, 29)), 29), "the signature is not applied yet");
    }

    /// A quiet ledger ends with a signature at 29 over entries 0..29; a snapshot file of all 30
    /// entries needs a signature past 29, so the signer signs once more, and then not again.
    #[test]
    fn a_snapshot_file_past_the_last_signature_gets_one_more_signature() {
        use super::signs_for_a_seal;
        assert!(nothing_to_sign(Some((29, 29)), 30));
        assert!(signs_for_a_seal(Some((29, 29)), 30, 30), "the file covers the signature at 29");
        assert!(!signs_for_a_seal(Some((30, 30)), 31, 30), "signed again: the next signature reaches the file");
        assert!(!signs_for_a_seal(Some((29, 29)), 30, 0), "no file waiting");
        assert!(!signs_for_a_seal(Some((29, 29)), 30, 25), "a file the last signature already covers");
        assert!(!signs_for_a_seal(Some((29, 29)), 30, 31), "a file this tree does not reach (another node's)");
    }

    #[test]
    fn entries_in_flight_when_the_last_signature_was_signed_are_signed_again() {
        // The signature at 29 covers entries 0..28 only: entry 28 landed before it, after the
        // leader read its tree. Until another signature covers 28, no receipt for 28 exists, and
        // on a quiet service no later entry would ever make the signer sign it.
        assert!(!nothing_to_sign(Some((29, 28)), 30));
        assert!(!nothing_to_sign(Some((29, 20)), 30));
        assert!(nothing_to_sign(Some((29, 28)), 28), "the tree it covers is all there is yet");
    }
}
