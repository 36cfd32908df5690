//! The redb log store and the state machine pass openraft's own storage test suite.

use std::sync::Arc;

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

use super::log_store::{AppendWatch, LogStore};
use super::state_machine::StateMachine;
use super::types::TypeConfig;
use cloister_store as kv;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft.redb"), Arc::new(AppendWatch::default())).expect("log store");
        let store = kv::Store::open(&dir.path().join("state.redb")).expect("state store");
        // The suite applies entries with gaps (a fresh state machine at index 2), which a ledger
        // refuses; the ledger has its own tests.
        let sm = StateMachine::without_ledger(store, None, dir.path().join("snapshots")).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_store_passes_openraft_storage_suite() {
    Suite::test_all(RedbBuilder).await.expect("openraft's storage suite passes");
}

/// Opens a copy of a log file, as a crash would leave it (whatever the database had made durable
/// by the time of the copy), and counts its entries.
fn durable_entries(path: &std::path::Path) -> usize {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let copy = path.with_extension("copy");
    std::fs::copy(path, &copy).expect("copying the log file");
    let db = redb::Database::create(&copy).expect("the copy opens");
    let read = db.begin_read().expect("a read");
    let table = read.open_table(redb::TableDefinition::<u64, &[u8]>::new("log")).expect("the log table");
    table.len().expect("a count") as usize
}

/// The log reports an append flushed only once it is durable: a copy of the file taken when the
/// flush callback fires holds every entry. (A faster log that answers before its sync, or syncs
/// behind the caller's back, must keep this.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_reported_flushed_only_once_it_is_durable() {
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("raft.redb");
    let mut log = LogStore::open(&path, Arc::new(AppendWatch::default())).expect("log store");
    for round in 0..20u64 {
        let entries: Vec<_> =
            (1..=50).map(|i| openraft::testing::blank_ent::<TypeConfig>(1, 0, round * 50 + i)).collect();
        let (flushed, done) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(flushed)).await.expect("append");
        // Readable when `append` returns.
        let read = log.try_get_log_entries(round * 50 + 1..=round * 50 + 50).await.expect("read");
        assert_eq!(read.len(), 50, "round {round}: appended entries are readable at once");
        done.await.expect("the callback is called").expect("the flush succeeds");
        assert_eq!(durable_entries(&path), (round as usize + 1) * 50, "round {round}: flushed means durable");
    }
}

/// The durable index the state machine waits on follows the flushes, and a truncation lowers it:
/// the entries that replace the truncated ones are not durable until their own flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_index_follows_flushes_and_a_truncation_lowers_it() {
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("raft.redb");
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
    assert_eq!(*durable.borrow(), 50, "published by the time the flush is reported");
    log.truncate_after(Some(openraft::testing::log_id::<TypeConfig>(1, 0, 40))).await.expect("truncate");
    assert_eq!(*durable.borrow(), 40, "what replaces 41..=50 is not durable yet");
    append(&mut log, 2, 41..=45).await;
    assert_eq!(*durable.borrow(), 45);
    drop(log);
    let reopened = LogStore::open(&path, Arc::new(AppendWatch::default())).expect("log store");
    assert_eq!(*reopened.durable().borrow(), 45, "everything in the file at open is durable");
}
