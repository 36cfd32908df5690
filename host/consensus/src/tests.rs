//! The log store and the state machine pass openraft's own storage test suite.

use std::sync::Arc;

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

use super::log_store::{AppendWatch, LogStore};
use super::state_machine::StateMachine;
use super::types::TypeConfig;
use cloister_store as kv;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft-log"), Arc::new(AppendWatch::default())).expect("log store");
        let store = kv::Store::open(&dir.path().join("state.redb")).expect("state store");
        // The suite applies entries with gaps (a fresh state machine at index 2), which a ledger
        // refuses; the ledger has its own tests.
        let sm = StateMachine::without_ledger(store, None, dir.path().join("snapshots")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_passes_openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("openraft's storage suite passes");
}

/// The log reports an append flushed only once it is durable: when the flush callback fires, the
/// log has synced past every entry of the append. (A faster log that answers before its sync, or
/// syncs behind the caller's back, must keep this.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_reported_flushed_only_once_it_is_durable() {
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = LogStore::open(&dir.path().join("raft-log"), Arc::new(AppendWatch::default())).expect("log store");
    for round in 0..20u64 {
        let entries: Vec<_> =
            (1..=50).map(|i| openraft::testing::blank_ent::<TypeConfig>(1, 0, round * 50 + i)).collect();
        let (flushed, done) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(flushed)).await.expect("append");
        // Readable when `append` returns.
        let read = log.try_get_log_entries(round * 50 + 1..=round * 50 + 50).await.expect("read");
        assert_eq!(read.len(), 50, "round {round}: appended entries are readable at once");
        done.await.expect("the callback is called").expect("the flush succeeds");
        assert!((1..=round * 50 + 50).all(|i| log.is_synced(i)), "round {round}: flushed means durable");
    }
}

/// The durable index the state machine waits on follows the flushes, and a truncation lowers it:
/// the entries that replace the truncated ones are not durable until their own flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_index_follows_flushes_and_a_truncation_lowers_it() {
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("raft-log");
    let mut log = LogStore::open(&path, Arc::new(AppendWatch::default())).expect("log store");
    let durable = log.durable();
    assert_eq!(*durable.borrow(), 0);
    async fn append(log: &mut LogStore, term: u64, indexes: std::ops::RangeInclusive<u64>) {
        let entries: Vec<_> = indexes.map(|i| openraft::testing::blank_ent::<TypeConfig>(term, 0, i)).collect();
        let (flushed, done) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(flushed)).await.expect("append");
        done.await.expect("the callback fires").expect("the flush succeeds");
    }
    append(&mut log, 1, 1..=50).await;
    assert_eq!(*durable.borrow(), 51, "published by the time the flush is reported");
    log.truncate_after(Some(openraft::testing::log_id::<TypeConfig>(1, 0, 40))).await.expect("truncate");
    assert_eq!(*durable.borrow(), 41, "what replaces 41..=50 is not durable yet");
    append(&mut log, 2, 41..=45).await;
    assert_eq!(*durable.borrow(), 46);
    drop(log);
    let reopened = LogStore::open(&path, Arc::new(AppendWatch::default())).expect("log store");
    assert_eq!(*reopened.durable().borrow(), 46, "everything in the file at open is durable");
}

/// A data folder from before the write-ahead log: its `raft.redb` moves into `raft-log/` with
/// every entry, the vote, the committed and the purged log ids, and the old file goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redb_log_moves_into_the_write_ahead_log() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    use redb::TableDefinition;
    let dir = tempfile::tempdir().expect("temp dir");
    let old = dir.path().join("raft.redb");
    let vote = super::types::Vote::new_committed(3, 1);
    let committed = Some(openraft::testing::log_id::<TypeConfig>(2, 0, 7));
    let purged = openraft::testing::log_id::<TypeConfig>(1, 0, 4);
    {
        let db = redb::Database::create(&old).expect("old log");
        let txn = db.begin_write().expect("write");
        {
            let mut log = txn.open_table(TableDefinition::<u64, &[u8]>::new("log")).expect("log table");
            for i in 5..=9 {
                let entry = openraft::testing::blank_ent::<TypeConfig>(2, 0, i);
                log.insert(i, super::types::encode(&entry).as_slice()).expect("insert");
            }
            let mut meta = txn.open_table(TableDefinition::<&str, &[u8]>::new("meta")).expect("meta table");
            meta.insert("vote", super::types::encode(&vote).as_slice()).expect("vote");
            meta.insert("committed", super::types::encode(&committed).as_slice()).expect("committed");
            meta.insert("purged", super::types::encode(&purged).as_slice()).expect("purged");
        }
        txn.commit().expect("commit");
    }
    assert!(crate::log_begun(dir.path()).unwrap(), "the old file counts as a log");
    let mut log =
        LogStore::open(&dir.path().join(crate::LOG_DIR), Arc::new(AppendWatch::default())).expect("log store");
    assert!(!old.exists(), "the old file is gone once its contents are in the new log");
    let indexes: Vec<u64> =
        log.try_get_log_entries(0..100).await.expect("read").iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (5..=9).collect::<Vec<_>>());
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    assert_eq!(log.read_committed().await.expect("committed"), committed);
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(purged));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(9));
}

/// A node catches up through a snapshot when its matched entry is before the last purged one,
/// or it has matched nothing yet (a node that just joined); with nothing purged, none does, and
/// a follower (no replication view) sees none.
#[test]
fn a_node_behind_the_purged_log_is_catching_up_through_a_snapshot() {
    use std::collections::BTreeMap;
    let log_id = |index| openraft::testing::log_id::<TypeConfig>(1, 0, index);
    let nodes = |matched: &[Option<u64>]| -> BTreeMap<u64, Option<super::types::LogId>> {
        matched.iter().enumerate().map(|(i, m)| (i as u64, m.map(log_id))).collect()
    };
    let purged = log_id(100);
    assert!(!super::catching_up(Some(&purged), Some(&nodes(&[Some(500), Some(100), Some(120)]))));
    assert!(super::catching_up(Some(&purged), Some(&nodes(&[Some(500), Some(99)]))), "one entry short");
    assert!(super::catching_up(Some(&purged), Some(&nodes(&[Some(500), None]))), "a node that just joined");
    assert!(!super::catching_up(None, Some(&nodes(&[Some(500), None]))), "nothing purged: the log has it all");
    assert!(!super::catching_up(Some(&purged), None), "not the leader");
}
