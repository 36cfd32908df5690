//! The write path on the leader: one thread executes read-write requests (app handlers and signed
//! governance requests, each a boxed [`Work`]) in order, each over the
//! applied state plus the writes this leader has proposed and not yet applied, then proposes the
//! request's write set through Raft. Proposals are pipelined: openraft merges concurrent ones into
//! one durable append and one replication round (group commit).
//!
//! The writer executes only on a leader that has applied every entry before its own term, so the
//! state it builds on is complete; when the term changes, the stack of pending writes is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use cloister_sdk::Mode;
use cloister_sdk::abi::RequestHead;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::service::AppReply;
use crate::consensus::{Consensus, ProposeError};
use crate::kv::{Store, Tx, WriteSet};
use crate::ledger::entry::{TxEntry, TxKind};
use crate::wasm::{Invocation, LoadedModule, Runtime};

/// How long a new leader may take to apply the entries before its term before writes give up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the writer did not run a request.
#[derive(Debug)]
pub enum SubmitError {
    /// This node does not lead (or stopped leading before the write reached its log): run it on
    /// the leader instead.
    NotLeader,
    Api(ApiError),
}

impl From<ApiError> for SubmitError {
    fn from(e: ApiError) -> Self {
        SubmitError::Api(e)
    }
}

type Reply = oneshot::Sender<Result<AppReply, SubmitError>>;

/// What a job asks the writer to commit after running.
pub struct Executed {
    pub reply: AppReply,
    /// Commit the transaction's writes (if any); otherwise answer without committing.
    pub commit: bool,
    pub kind: TxKind,
    pub claims_digest: Option<[u8; 32]>,
}

/// The work of one job: run against a transaction over the applied state plus pending writes,
/// and hand the transaction back. On error the transaction's writes are discarded.
pub type Work = Box<dyn FnOnce(&Runtime, Tx) -> (Tx, Result<Executed, ApiError>) + Send>;

/// A read-write request waiting for the writer.
struct Job {
    work: Work,
    reply: Reply,
}

/// The work of an app's read-write request.
pub fn app_work(module: Arc<LoadedModule>, namespace: String, head: RequestHead, body: bytes::Bytes) -> Work {
    Box::new(move |runtime, tx| {
        let inv = Invocation {
            head: &head,
            body: &body,
            mode: Mode::Readwrite,
            namespace: &namespace,
            privilege: cloister_sdk::abi::Privilege::App,
        };
        let (tx, result) = runtime.execute(&module, inv, tx);
        let executed = result.map_err(ApiError::from).and_then(|outcome| {
            let response = outcome.response;
            let claims_digest =
                response.head.claims_digest.as_deref().map(parse_digest).transpose().map_err(ApiError::internal)?;
            Ok(Executed {
                commit: response.is_success(),
                reply: AppReply {
                    status: response.head.status,
                    headers: response.head.headers,
                    body: response.body,
                    tx_id: None,
                },
                kind: TxKind::App,
                claims_digest,
            })
        });
        (tx, executed)
    })
}

/// The handle requests use to reach the writer thread. Dropping it ends the thread once the
/// queued work is done, and waits for that.
pub struct Writer {
    queue: Option<SyncSender<Job>>,
    queue_max: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the writer thread panicked");
        }
    }
}

impl Writer {
    /// Starts the writer thread; it must be called inside the node's tokio runtime.
    pub fn start(
        runtime: Arc<Runtime>,
        store: Store,
        consensus: Consensus,
        queue_max: usize,
        group_max: usize,
    ) -> anyhow::Result<Writer> {
        let (queue, jobs) = std::sync::mpsc::sync_channel(queue_max);
        let tokio = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new().name("app-writer".into()).stack_size(8 << 20).spawn(move || {
            // WASI calls drive tokio's block_on: let them use the node's runtime.
            let _guard = tokio.enter();
            WriterLoop { runtime, store, consensus, tokio, group_max, pending: Vec::new(), pending_term: 0 }.run(jobs)
        })?;
        Ok(Writer { queue: Some(queue), queue_max, thread: Some(thread) })
    }

    /// Queues a request and waits for its committed result.
    pub async fn submit(&self, work: Work) -> Result<AppReply, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { work, reply };
        let queue = self.queue.as_ref().expect("the queue lives as long as the writer");
        match queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::unavailable(format!(
                    "{} writes are already waiting (write_queue_max); retry shortly",
                    self.queue_max
                ))
                .into());
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::unavailable("the node is shutting down").into());
            }
        }
        answer
            .await
            .map_err(|_| SubmitError::Api(ApiError::unavailable("the node stopped before the write finished")))?
    }
}

const IN_FLIGHT: u8 = 0;
const APPLIED: u8 = 1;
const FAILED: u8 = 2;

/// A write set proposed by this leader and not yet known to be applied.
struct Pending {
    writes: Arc<WriteSet>,
    state: Arc<AtomicU8>,
}

struct WriterLoop {
    runtime: Arc<Runtime>,
    store: Store,
    consensus: Consensus,
    tokio: tokio::runtime::Handle,
    group_max: usize,
    pending: Vec<Pending>,
    /// The term the pending writes were proposed in.
    pending_term: u64,
}

impl WriterLoop {
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < self.group_max {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    /// Whether this node may execute writes now, waiting briefly for a new leader to catch up.
    fn ready(&self) -> bool {
        if !self.consensus.is_leader() {
            return false;
        }
        self.consensus.caught_up() || self.tokio.block_on(self.consensus.wait_caught_up(CATCH_UP_TIMEOUT))
    }

    fn run_batch(&mut self, batch: Vec<Job>) {
        if !self.ready() {
            for job in batch {
                let _ = job.reply.send(Err(SubmitError::NotLeader));
            }
            return;
        }
        let term = self.consensus.term();
        let failed = self.pending.iter().any(|p| p.state.load(Ordering::Acquire) == FAILED);
        if term != self.pending_term || failed {
            // A proposal failed or the term moved: every later pending proposal fails too, and
            // what did commit is in the applied state.
            self.pending.clear();
            self.pending_term = term;
        }
        self.pending.retain(|p| p.state.load(Ordering::Acquire) == IN_FLIGHT);
        for job in batch {
            self.execute(job);
        }
    }

    /// Runs one job over the applied state plus the pending writes, and proposes its writes.
    fn execute(&mut self, job: Job) {
        let overlay: Vec<Arc<WriteSet>> = self.pending.iter().map(|p| p.writes.clone()).collect();
        let tx = match self.store.begin_over(overlay) {
            Ok(tx) => tx,
            Err(e) => {
                let _ = job.reply.send(Err(ApiError::from(e).into()));
                return;
            }
        };
        let (tx, result) = (job.work)(&self.runtime, tx);
        let Executed { mut reply, commit, kind, claims_digest } = match result {
            Ok(executed) => executed,
            Err(e) => {
                let _ = job.reply.send(Err(e.into()));
                return;
            }
        };
        let writes = tx.into_writes();
        if !commit || writes.is_empty() {
            let _ = job.reply.send(Ok(reply));
            return;
        }
        let writes = Arc::new(writes);
        let state = Arc::new(AtomicU8::new(IN_FLIGHT));
        self.pending.push(Pending { writes: writes.clone(), state: state.clone() });
        let sealer = self.store.sealer().expect("nodes seal private writes");
        let entry = TxEntry::new(kind, WriteSet::clone(&writes), claims_digest, sealer);
        // Submitted here, in execution order, and refused if this node no longer leads in the
        // term it executed in; only the wait for the outcome runs concurrently.
        let proposal = self.tokio.block_on(self.consensus.submit(entry, Some(self.pending_term)));
        self.tokio.spawn(async move {
            let outcome = match proposal {
                Ok(p) => p.outcome().await,
                Err(e) => Err(e),
            };
            let result = match outcome {
                Ok(tx_id) => {
                    state.store(APPLIED, Ordering::Release);
                    reply.tx_id = Some(tx_id);
                    Ok(reply)
                }
                Err(e) => {
                    state.store(FAILED, Ordering::Release);
                    Err(match e {
                        ProposeError::NotLeader { .. } => SubmitError::NotLeader,
                        ProposeError::Unknown { tx_id, reason } => ApiError::outcome_unknown(tx_id, &reason).into(),
                        ProposeError::Stopped(reason) => {
                            ApiError::unavailable(format!("this node's consensus has stopped: {reason}")).into()
                        }
                    })
                }
            };
            // The client may have given up (timeout); the transaction's fate is unaffected.
            let _ = job.reply.send(result);
        });
    }
}

/// A claims digest: 32 bytes, hex.
fn parse_digest(hex_digest: &str) -> Result<[u8; 32], String> {
    hex::decode(hex_digest)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("the app's claims digest {hex_digest:?} is not 32 bytes of hex"))
}
