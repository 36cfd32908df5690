//! The write path: one thread executes read-write requests in order, each against the committed
//! state plus the writes of the requests before it, and commits them together (group commit):
//! many transactions, one durable write.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use cloister_sdk::Mode;
use cloister_sdk::abi::RequestHead;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::service::AppReply;
use crate::kv::{Store, WriteSet};
use crate::txid::TxId;
use crate::wasm::{Invocation, LoadedModule, Runtime};

/// The meta key holding the last committed sequence number.
const LAST_SEQNO: &str = "last_seqno";
/// The term of transactions committed by a single node (replication assigns real terms).
const SINGLE_NODE_TERM: u64 = 1;

/// A read-write request waiting for the writer.
pub struct Job {
    pub module: Arc<LoadedModule>,
    pub namespace: String,
    pub head: RequestHead,
    pub body: bytes::Bytes,
    reply: oneshot::Sender<Result<AppReply, ApiError>>,
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
    /// Starts the writer thread. It ends when the last `Writer` is dropped.
    pub fn start(
        runtime: Arc<Runtime>,
        store: Store,
        queue_max: usize,
        group_max: usize,
    ) -> anyhow::Result<Writer> {
        let (queue, jobs) = std::sync::mpsc::sync_channel(queue_max);
        let last = store.meta(LAST_SEQNO)?.map_or(0, |b| {
            u64::from_le_bytes(b.try_into().expect("8-byte seqno"))
        });
        let tokio = tokio::runtime::Handle::try_current().ok();
        let thread = std::thread::Builder::new()
            .name("app-writer".into())
            .stack_size(8 << 20)
            .spawn(move || {
                // WASI calls drive tokio's block_on: let them use the node's runtime.
                let _guard = tokio.as_ref().map(|h| h.enter());
                WriterLoop {
                    runtime,
                    store,
                    group_max,
                    next_seqno: last + 1,
                }
                .run(jobs)
            })?;
        Ok(Writer {
            queue: Some(queue),
            queue_max,
            thread: Some(thread),
        })
    }

    /// Queues a request and waits for its committed result.
    pub async fn submit(
        &self,
        module: Arc<LoadedModule>,
        namespace: String,
        head: RequestHead,
        body: bytes::Bytes,
    ) -> Result<AppReply, ApiError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            module,
            namespace,
            head,
            body,
            reply,
        };
        let queue = self
            .queue
            .as_ref()
            .expect("the queue lives as long as the writer");
        match queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::unavailable(format!(
                    "{} writes are already waiting (write_queue_max); retry shortly",
                    self.queue_max
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::unavailable("the node is shutting down"));
            }
        }
        answer
            .await
            .map_err(|_| ApiError::unavailable("the node stopped before the write finished"))?
    }
}

struct WriterLoop {
    runtime: Arc<Runtime>,
    store: Store,
    group_max: usize,
    next_seqno: u64,
}

/// A request that ran: its answer, and its writes when they are to be committed.
struct Ran {
    reply: oneshot::Sender<Result<AppReply, ApiError>>,
    result: Result<AppReply, ApiError>,
    writes: Option<WriteSet>,
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

    fn run_batch(&mut self, batch: Vec<Job>) {
        let mut pending: Vec<Arc<WriteSet>> = Vec::new();
        let mut ran = Vec::with_capacity(batch.len());
        for job in batch {
            let done = self.execute(job, &pending);
            if let Some(ws) = &done.writes {
                pending.push(Arc::new(ws.clone()));
            }
            ran.push(done);
        }
        self.commit(ran);
    }

    /// Runs one job over the committed state plus this batch's earlier writes.
    fn execute(&self, job: Job, pending: &[Arc<WriteSet>]) -> Ran {
        let tx = match self.store.begin_over(pending.to_vec()) {
            Ok(tx) => tx,
            Err(e) => {
                return Ran {
                    reply: job.reply,
                    result: Err(e.into()),
                    writes: None,
                };
            }
        };
        let inv = Invocation {
            head: &job.head,
            body: &job.body,
            mode: Mode::Readwrite,
            namespace: &job.namespace,
        };
        let (tx, result) = self.runtime.execute(&job.module, inv, tx);
        match result {
            Ok(outcome) => {
                let response = outcome.response;
                let writes = tx.into_writes();
                let commit = response.is_success() && !writes.is_empty();
                let reply = AppReply {
                    status: response.head.status,
                    headers: response.head.headers,
                    body: response.body,
                    tx_id: None,
                };
                Ran {
                    reply: job.reply,
                    result: Ok(reply),
                    writes: commit.then_some(writes),
                }
            }
            Err(e) => Ran {
                reply: job.reply,
                result: Err(e.into()),
                writes: None,
            },
        }
    }

    /// Commits every write set of the batch in one durable transaction, then answers.
    fn commit(&mut self, ran: Vec<Ran>) {
        let writes: Vec<&WriteSet> = ran.iter().filter_map(|r| r.writes.as_ref()).collect();
        let last = self.next_seqno + writes.len() as u64 - 1;
        let committed = if writes.is_empty() {
            Ok(())
        } else {
            self.store
                .apply_all(&writes, &[(LAST_SEQNO, &last.to_le_bytes())])
        };
        if let Err(e) = &committed {
            tracing::error!(error = %e, "committing a batch of writes failed");
        }
        let mut seqno = self.next_seqno;
        for r in ran {
            let result = match (&committed, r.result, r.writes.is_some()) {
                (Err(e), _, true) => Err(ApiError::internal(format!(
                    "committing the transaction failed: {e}"
                ))),
                (_, Ok(mut reply), true) => {
                    reply.tx_id = Some(TxId {
                        term: SINGLE_NODE_TERM,
                        seqno,
                    });
                    seqno += 1;
                    Ok(reply)
                }
                (_, result, _) => result,
            };
            // The client may have given up (timeout); its transaction stands regardless.
            let _ = r.reply.send(result);
        }
        if committed.is_ok() {
            self.next_seqno = seqno;
        }
    }
}
