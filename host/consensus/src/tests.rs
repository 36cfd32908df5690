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
