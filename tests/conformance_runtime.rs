//! The conformance scenario in-process: the compiled reconcile wasm on the real runtime over redb,
//! with three party identities, both phases and the negative cases.

use std::sync::Arc;

use cloister_runtime::{Invocation, Limits, LoadedModule, Runtime};
use cloister_sdk::abi::{self, Privilege, RequestHead};
use cloister_sdk::{Caller, Error};
use cloister_store::Store;
use cloister_tests::conformance::{self, Call, ScenarioClient};
use serde_json::Value;

struct InProcess {
    _dir: tempfile::TempDir,
    runtime: Runtime,
    store: Store,
    module: Arc<LoadedModule>,
}

impl InProcess {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let runtime = Runtime::new(Limits::default()).unwrap();
        let module = runtime.load(cloister_bundled::RECONCILE).unwrap();
        InProcess { _dir: dir, runtime, store, module }
    }

    fn call_sync(&self, call: Call<'_>) -> (u16, Value) {
        let caller = Caller::member(format!("party-{}-certificate-hash", call.party));
        let Some((endpoint, params)) = self.module.manifest().find(call.method, call.path) else {
            return error(Error::not_found("no such endpoint"));
        };
        if let Err((status, code, message)) = abi::authorize(endpoint.auth, caller.kind) {
            return error(Error::new(status, code, message));
        }
        let head = RequestHead {
            method: call.method.into(),
            path: call.path.into(),
            route: endpoint.path.clone(),
            params,
            headers: [("content-type".to_owned(), call.content_type.to_owned())].into(),
            caller,
            ..Default::default()
        };
        let inv = Invocation {
            head: &head,
            body: call.body,
            mode: endpoint.mode,
            namespace: "app",
            privilege: Privilege::App,
        };
        let (tx, result) = self.runtime.execute(&self.module, inv, self.store.begin().unwrap());
        let response = result.expect("the reconcile contract never traps on the scenario").response;
        if response.is_success() {
            self.store.apply(&tx.into_writes()).unwrap();
        }
        (response.head.status, serde_json::from_slice(&response.body).unwrap_or(Value::Null))
    }
}

fn error(e: Error) -> (u16, Value) {
    (e.status, e.body())
}

impl ScenarioClient for InProcess {
    async fn call(&mut self, call: Call<'_>) -> (u16, Value) {
        self.call_sync(call)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn conformance_scenario_on_the_real_runtime() {
    let mut client = InProcess::new();
    // The runtime blocks; run the whole scenario on a blocking thread.
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(conformance::run(&mut client)));
}
