//! Forwarding writes from a follower to the leader over one long-lived gRPC stream per leader.
//!
//! A unary call per forwarded write cost the follower and the leader a new HTTP/2 stream each:
//! request and response headers (HPACK), trailers, a task on the leader and a trip through the
//! client channel's buffer task. On the stream each write is one message out and one back, and
//! writes forwarded at the same moment share TLS records. Each call carries an id the follower
//! chose; the leader runs the calls concurrently, up to [`FORWARDS_IN_FLIGHT_MAX`], and answers
//! each id once, as it finishes. A follower that gives up on a call (its client's
//! `request_timeout_ms`) cancels the id, and the leader drops the call as it would have on a
//! reset stream: a write still queued for the writer is skipped.
//!
//! A call with no answer failed one of two ways ([`ForwardError`]): the leader did not run it
//! (it never left this node, or the leader refused it), or the stream ended after it went out,
//! when the leader may have run it and a write it made may still commit.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cloister_proto::peer::v1 as pb;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::network::Peers;
use super::server::{Forwarder, PeerRpc};
use super::types::NodeId;

/// Most forwarded calls one stream runs at once on the leader (the cap the REST port puts on
/// one connection's HTTP/2 streams). Beyond it the leader reads no more calls from the stream
/// until one finishes, and HTTP/2 flow control holds the sender back.
pub const FORWARDS_IN_FLIGHT_MAX: usize = 256;

type Answer = Result<pb::ForwardReply, ForwardError>;

/// Why a forwarded call has no reply.
#[derive(Debug)]
pub enum ForwardError {
    /// The leader did not run the call: no stream could be opened, it had ended before the call
    /// went out, or the leader refused the call or the stream.
    NotRun(Status),
    /// The stream ended after the call went out and before its answer came: the leader may have
    /// run it, and a write it made may still commit.
    Unanswered(Status),
}

impl ForwardError {
    pub fn status(&self) -> &Status {
        match self {
            ForwardError::NotRun(status) | ForwardError::Unanswered(status) => status,
        }
    }

    /// A stream's end, for the calls it leaves unanswered. The leader refuses a node's stream
    /// (its standing does not allow forwarding) when it opens, or at the next call, once it has
    /// answered every call it ran: so no unanswered call ran. Any other end, the connection's
    /// included, may have come after the leader ran a call whose answer was lost.
    fn ended(status: &Status) -> ForwardError {
        match status.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => ForwardError::NotRun(status.clone()),
            _ => ForwardError::Unanswered(status.clone()),
        }
    }
}

type Client = pb::peer_client::PeerClient<tonic::transport::Channel>;
/// How [`Forwards`] reaches a peer: the client for its URL.
type Connect = Arc<dyn Fn(NodeId, &str) -> Result<Client, Status> + Send + Sync>;

/// The follower's side: one stream per leader, opened on first use and again after it fails.
#[derive(Clone)]
pub struct Forwards {
    connect: Connect,
    /// The stream to the peer last forwarded to. A new leader's stream replaces it; calls in
    /// flight on the old one keep it open until they are answered.
    current: Arc<Mutex<Option<Arc<ForwardStream>>>>,
    /// Calls in [`Forwards::call`]: sent, or about to be, and not yet answered or given up.
    waiting: Arc<AtomicU64>,
}

/// One open stream: where calls go, and who waits for which answer.
struct ForwardStream {
    leader: NodeId,
    peer_url: String,
    calls: mpsc::Sender<pb::ForwardCall>,
    shared: Arc<Waiting>,
}

/// Callers waiting for answers, by call id; `None` once the stream has ended, so no caller
/// waits on a stream nobody reads.
struct Waiting {
    next_id: AtomicU64,
    callers: Mutex<Option<HashMap<u64, oneshot::Sender<Answer>>>>,
}

impl Waiting {
    fn answer(&self, id: u64, answer: Answer) {
        let caller = self.callers.lock().expect("forward callers lock").as_mut().and_then(|c| c.remove(&id));
        if let Some(caller) = caller {
            let _ = caller.send(answer);
        }
    }

    /// Ends the stream for its callers: each still waiting hears why.
    fn close(&self, status: &Status) {
        let callers = self.callers.lock().expect("forward callers lock").take();
        for (_, caller) in callers.into_iter().flatten() {
            let _ = caller.send(Err(ForwardError::ended(status)));
        }
    }
}

/// One unit of a count, from creation to drop.
struct Counted<'c>(&'c AtomicU64);

impl<'c> Counted<'c> {
    fn new(count: &'c AtomicU64) -> Counted<'c> {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A call in flight: dropped before its answer (the caller gave up), it cancels the call.
struct InFlight<'s> {
    stream: &'s ForwardStream,
    id: u64,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let waiting =
            self.stream.shared.callers.lock().expect("forward callers lock").as_mut().map(|c| c.remove(&self.id));
        if waiting.flatten().is_some() {
            // Best effort: a full queue means the leader is busy; the call then runs unawaited.
            let _ = self.stream.calls.try_send(pb::ForwardCall {
                id: self.id,
                kind: Some(pb::forward_call::Kind::Cancel(pb::ForwardCancel {})),
            });
        }
    }
}

impl Forwards {
    pub fn new(peers: Peers) -> Forwards {
        Forwards {
            connect: Arc::new(move |id, url| peers.client(url, Some(id))),
            current: Arc::default(),
            waiting: Arc::default(),
        }
    }

    /// Calls forwarded, on any stream, whose answers their callers still await.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Runs `request` on node `leader`, at `peer_url`, and returns its reply, or why there
    /// is none: whether the leader may have run it or not.
    pub async fn call(&self, leader: NodeId, peer_url: &str, request: pb::ForwardRequest) -> Answer {
        let _counted = Counted::new(&self.waiting);
        let stream = self.stream(leader, peer_url).map_err(ForwardError::NotRun)?;
        let id = stream.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (caller, answer) = oneshot::channel();
        {
            let mut callers = stream.shared.callers.lock().expect("forward callers lock");
            let Some(callers) = callers.as_mut() else { return Err(ForwardError::NotRun(closed())) };
            callers.insert(id, caller);
        }
        let mut in_flight = InFlight { stream: &stream, id, answered: false };
        let call = pb::ForwardCall { id, kind: Some(pb::forward_call::Kind::Request(request)) };
        if stream.calls.send(call).await.is_err() {
            return Err(ForwardError::NotRun(closed()));
        }
        let answer = answer.await.unwrap_or_else(|_| Err(ForwardError::Unanswered(closed())));
        in_flight.answered = true;
        answer
    }

    /// The open stream to node `leader` at `peer_url`, opening one if there is none or the last
    /// one ended.
    fn stream(&self, leader: NodeId, peer_url: &str) -> Result<Arc<ForwardStream>, Status> {
        let mut current = self.current.lock().expect("forward stream lock");
        if let Some(stream) = current.as_ref()
            && stream.leader == leader
            && stream.peer_url == peer_url
            && !stream.calls.is_closed()
            && stream.shared.callers.lock().expect("forward callers lock").is_some()
        {
            return Ok(stream.clone());
        }
        let mut client = (self.connect)(leader, peer_url)?;
        let (calls, outgoing) = mpsc::channel(FORWARDS_IN_FLIGHT_MAX);
        let shared = Arc::new(Waiting { next_id: AtomicU64::new(0), callers: Mutex::new(Some(HashMap::new())) });
        let stream = Arc::new(ForwardStream { leader, peer_url: peer_url.to_owned(), calls, shared: shared.clone() });
        *current = Some(stream.clone());
        tokio::spawn(async move {
            let ended = match client.forward(ReceiverStream::new(outgoing)).await {
                Err(status) => status,
                Ok(answers) => read_answers(answers.into_inner(), &shared).await,
            };
            shared.close(&ended);
        });
        Ok(stream)
    }
}

/// Hands each answer to its caller until the stream ends; returns why it ended.
async fn read_answers(mut answers: tonic::Streaming<pb::ForwardAnswer>, waiting: &Waiting) -> Status {
    loop {
        match answers.message().await {
            Ok(Some(pb::ForwardAnswer { id, outcome })) => {
                let answer = match outcome {
                    Some(pb::forward_answer::Outcome::Reply(reply)) => Ok(reply),
                    // A call that panicked on the leader may have got as far as a write.
                    Some(pb::forward_answer::Outcome::Refused(r)) if r.code == tonic::Code::Internal as i32 => {
                        Err(ForwardError::Unanswered(Status::new(r.code.into(), r.message)))
                    }
                    Some(pb::forward_answer::Outcome::Refused(r)) => {
                        Err(ForwardError::NotRun(Status::new(r.code.into(), r.message)))
                    }
                    None => Err(ForwardError::Unanswered(Status::internal("the leader's answer had no outcome"))),
                };
                waiting.answer(id, answer);
            }
            Ok(None) => return closed(),
            Err(status) => return status,
        }
    }
}

fn closed() -> Status {
    Status::unavailable("the forwarding stream to the leader closed")
}

/// The leader's side of one stream: runs each call through `forwarder`, at most
/// [`FORWARDS_IN_FLIGHT_MAX`] at once, and yields the answers as the calls finish.
///
/// Every call is authorized as a unary call would be, so a node retired while its stream is open
/// is refused at its next call: the calls already running finish and are answered, and the
/// stream then ends with the refusal. A stream that ends cleanly (the follower closed it) ends
/// once its calls are answered; one that breaks drops the calls still running.
pub(crate) fn serve<M>(
    mut calls: M,
    cert: Vec<u8>,
    forwarder: Arc<dyn Forwarder>,
) -> impl Stream<Item = Result<pb::ForwardAnswer, Status>> + Send + 'static
where
    M: Stream<Item = Result<pb::ForwardCall, Status>> + Send + Unpin + 'static,
{
    let (answers, out) = mpsc::channel(FORWARDS_IN_FLIGHT_MAX);
    tokio::spawn(async move {
        let serving = async {
            let mut running = Running::default();
            let refusal = loop {
                tokio::select! {
                    Some(done) = running.tasks.join_next(), if !running.tasks.is_empty() => {
                        running.finished(done, &answers).await;
                    }
                    call = calls.next(), if running.tasks.len() < FORWARDS_IN_FLIGHT_MAX => match call {
                        None => break None,
                        // The stream broke (the follower is gone, or sent what does not decode):
                        // nobody waits for the calls still running. The error goes back, if it can.
                        Some(Err(status)) => {
                            running.tasks.abort_all();
                            let _ = answers.send(Err(status)).await;
                            return;
                        }
                        Some(Ok(call)) => {
                            if let Err(status) = forwarder.authorize(&cert, PeerRpc::Forward) {
                                break Some(status);
                            }
                            if let Err(status) = running.start(call, &forwarder) {
                                break Some(status);
                            }
                        }
                    },
                }
            };
            while let Some(done) = running.tasks.join_next().await {
                running.finished(done, &answers).await;
            }
            if let Some(status) = refusal {
                let _ = answers.send(Err(status)).await;
            }
        };
        // Nobody reads the answers any more (the stream was ended as this node stops): the calls
        // go unanswered (the running ones are aborted as their `JoinSet` drops), and the
        // follower's stream is let go.
        tokio::select! {
            () = serving => {}
            () = answers.closed() => {}
        }
    });
    ReceiverStream::new(out)
}

/// The calls of one stream that run on the leader.
#[derive(Default)]
struct Running {
    tasks: JoinSet<pb::ForwardAnswer>,
    /// Call id → its task, to cancel it.
    by_call: HashMap<u64, AbortHandle>,
}

impl Running {
    /// Starts a request, or cancels one; a call that breaks the protocol ends the stream.
    fn start(&mut self, call: pb::ForwardCall, forwarder: &Arc<dyn Forwarder>) -> Result<(), Status> {
        let id = call.id;
        match call.kind {
            Some(pb::forward_call::Kind::Request(request)) => {
                if self.by_call.contains_key(&id) {
                    return Err(Status::invalid_argument(format!("forwarded call {id} is already running")));
                }
                let forwarder = forwarder.clone();
                let task = self.tasks.spawn(async move {
                    // A call that panics is still answered, under its id.
                    let outcome = match AssertUnwindSafe(forwarder.forward(request)).catch_unwind().await {
                        Ok(Ok(reply)) => pb::forward_answer::Outcome::Reply(reply),
                        Ok(Err(status)) => refused(&status),
                        Err(_) => {
                            tracing::error!(call = id, "a forwarded call panicked");
                            refused(&Status::internal("the forwarded call failed on the leader"))
                        }
                    };
                    pb::ForwardAnswer { id, outcome: Some(outcome) }
                });
                self.by_call.insert(id, task);
            }
            Some(pb::forward_call::Kind::Cancel(_)) => {
                // Its task ends as cancelled, and nobody is answered.
                if let Some(task) = self.by_call.remove(&id) {
                    task.abort();
                }
            }
            None => return Err(Status::invalid_argument(format!("forwarded call {id} carries nothing"))),
        }
        Ok(())
    }

    /// Answers a call that finished; a cancelled one is answered by nobody.
    async fn finished(
        &mut self,
        done: Result<pb::ForwardAnswer, tokio::task::JoinError>,
        answers: &mpsc::Sender<Result<pb::ForwardAnswer, Status>>,
    ) {
        let Ok(answer) = done else { return };
        self.by_call.remove(&answer.id);
        // The follower may be gone; its calls' fate is unaffected.
        let _ = answers.send(Ok(answer)).await;
    }
}

fn refused(status: &Status) -> pb::forward_answer::Outcome {
    pb::forward_answer::Outcome::Refused(pb::ForwardRefusal {
        code: status.code() as i32,
        message: status.message().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// Answers each request with its path; a request for "wait" first waits for a permit.
    struct Fake {
        permits: Semaphore,
        running: AtomicUsize,
        most_running: AtomicUsize,
        /// Calls dropped before they finished.
        dropped: AtomicUsize,
        /// Calls authorized before every later one is refused.
        authorized_max: Option<usize>,
        authorized: AtomicUsize,
    }

    impl Default for Fake {
        fn default() -> Self {
            Fake {
                permits: Semaphore::new(0),
                running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
                dropped: AtomicUsize::new(0),
                authorized_max: None,
                authorized: AtomicUsize::new(0),
            }
        }
    }

    struct Run<'f>(&'f Fake, bool);

    impl Drop for Run<'_> {
        fn drop(&mut self) {
            self.0.running.fetch_sub(1, Ordering::SeqCst);
            if !self.1 {
                self.0.dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[tonic::async_trait]
    impl Forwarder for Fake {
        async fn forward(&self, request: pb::ForwardRequest) -> Result<pb::ForwardReply, Status> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            let mut run = Run(self, false);
            if request.path == "wait" {
                self.permits.acquire().await.expect("open").forget();
            }
            assert_ne!(request.path, "panic", "the call panics");
            run.1 = true;
            Ok(pb::ForwardReply { status: 200, body: request.path.into_bytes(), ..Default::default() })
        }
        async fn challenge(&self, _: Vec<u8>, _: pb::ChallengeRequest) -> Result<pb::ChallengeReply, Status> {
            not_here()
        }
        async fn attest(&self, _: Vec<u8>, _: pb::AttestRequest) -> Result<pb::AttestReply, Status> {
            not_here()
        }
        fn authorize(&self, _: &[u8], rpc: PeerRpc) -> Result<(), Status> {
            assert_eq!(rpc, PeerRpc::Forward);
            let seen = self.authorized.fetch_add(1, Ordering::SeqCst);
            match self.authorized_max {
                Some(max) if seen >= max => Err(Status::permission_denied("this node is Retired")),
                _ => Ok(()),
            }
        }
    }

    type Calls = mpsc::UnboundedSender<Result<pb::ForwardCall, Status>>;

    fn start(fake: &Arc<Fake>) -> (Calls, impl Stream<Item = Result<pb::ForwardAnswer, Status>> + Unpin) {
        let (calls, incoming) = mpsc::unbounded_channel();
        let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(incoming);
        let forwarder: Arc<dyn Forwarder> = fake.clone();
        (calls, Box::pin(serve(incoming, b"node".to_vec(), forwarder)))
    }

    fn request(id: u64, path: &str) -> Result<pb::ForwardCall, Status> {
        let request = pb::ForwardRequest { path: path.into(), ..Default::default() };
        Ok(pb::ForwardCall { id, kind: Some(pb::forward_call::Kind::Request(request)) })
    }

    fn cancel(id: u64) -> Result<pb::ForwardCall, Status> {
        Ok(pb::ForwardCall { id, kind: Some(pb::forward_call::Kind::Cancel(pb::ForwardCancel {})) })
    }

    /// The next answer's id and body.
    async fn next(answers: &mut (impl Stream<Item = Result<pb::ForwardAnswer, Status>> + Unpin)) -> (u64, String) {
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
            .await
            .expect("an answer in time")
            .expect("an answer")
            .expect("not a refusal");
        match answer.outcome {
            Some(pb::forward_answer::Outcome::Reply(reply)) => (answer.id, String::from_utf8(reply.body).unwrap()),
            other => panic!("call {} was refused: {other:?}", answer.id),
        }
    }

    async fn until(what: &str, test: impl Fn() -> bool) {
        for _ in 0..1000 {
            if test() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn calls_run_concurrently_and_each_is_answered_once_as_it_finishes() {
        let fake = Arc::new(Fake::default());
        let (calls, mut answers) = start(&fake);
        calls.send(request(7, "wait")).unwrap();
        calls.send(request(8, "fast")).unwrap();
        assert_eq!(next(&mut answers).await, (8, "fast".into()), "a slow call holds up no other");
        fake.permits.add_permits(1);
        assert_eq!(next(&mut answers).await, (7, "wait".into()));
        // The follower closes its side: the stream ends, with nothing more to answer.
        drop(calls);
        assert!(answers.next().await.is_none());
    }

    #[tokio::test]
    async fn a_cancelled_call_is_dropped_unanswered_and_the_stream_goes_on() {
        let fake = Arc::new(Fake::default());
        let (calls, mut answers) = start(&fake);
        calls.send(request(1, "wait")).unwrap();
        until("the call to run", || fake.running.load(Ordering::SeqCst) == 1).await;
        calls.send(cancel(1)).unwrap();
        until("the call to be dropped", || fake.dropped.load(Ordering::SeqCst) == 1).await;
        // Cancelling an id that is not running (finished, or never sent) is harmless.
        calls.send(cancel(99)).unwrap();
        calls.send(request(2, "fast")).unwrap();
        assert_eq!(next(&mut answers).await, (2, "fast".into()));
        drop(calls);
        assert!(answers.next().await.is_none(), "the cancelled call is never answered");
    }

    #[tokio::test]
    async fn no_more_than_the_cap_run_at_once_and_the_rest_wait_unread() {
        let fake = Arc::new(Fake::default());
        let (calls, mut answers) = start(&fake);
        let total = FORWARDS_IN_FLIGHT_MAX + 8;
        for id in 0..total as u64 {
            calls.send(request(id, "wait")).unwrap();
        }
        until("the cap to fill", || fake.running.load(Ordering::SeqCst) == FORWARDS_IN_FLIGHT_MAX).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.running.load(Ordering::SeqCst), FORWARDS_IN_FLIGHT_MAX, "the rest are not read yet");
        // One finishing lets exactly one more in.
        fake.permits.add_permits(1);
        next(&mut answers).await;
        until("the next call to start", || fake.authorized.load(Ordering::SeqCst) == FORWARDS_IN_FLIGHT_MAX + 1).await;
        fake.permits.add_permits(total);
        let mut ids = vec![];
        for _ in 1..total {
            ids.push(next(&mut answers).await.0);
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), total - 1, "every other call is answered once");
        assert_eq!(fake.most_running.load(Ordering::SeqCst), FORWARDS_IN_FLIGHT_MAX);
    }

    #[tokio::test]
    async fn a_refused_call_ends_the_stream_once_the_running_calls_are_answered() {
        let fake = Arc::new(Fake { authorized_max: Some(1), ..Default::default() });
        let (calls, mut answers) = start(&fake);
        calls.send(request(1, "wait")).unwrap();
        calls.send(request(2, "fast")).unwrap();
        until("the refusal", || fake.authorized.load(Ordering::SeqCst) == 2).await;
        fake.permits.add_permits(1);
        assert_eq!(next(&mut answers).await, (1, "wait".into()));
        let refusal = answers.next().await.expect("the refusal").expect_err("a refusal");
        assert_eq!(refusal.code(), tonic::Code::PermissionDenied);
        assert!(answers.next().await.is_none());
        assert_eq!(fake.running.load(Ordering::SeqCst), 0, "the refused call never ran");
    }

    #[tokio::test]
    async fn a_reused_id_or_an_empty_call_ends_the_stream() {
        for bad in [request(1, "fast"), Ok(pb::ForwardCall { id: 2, kind: None })] {
            let fake = Arc::new(Fake::default());
            let (calls, mut answers) = start(&fake);
            calls.send(request(1, "wait")).unwrap();
            calls.send(bad).unwrap();
            until("both calls to be read", || fake.authorized.load(Ordering::SeqCst) == 2).await;
            fake.permits.add_permits(1);
            assert_eq!(next(&mut answers).await, (1, "wait".into()));
            let refusal = answers.next().await.expect("the refusal").expect_err("a refusal");
            assert_eq!(refusal.code(), tonic::Code::InvalidArgument, "{refusal:?}");
            assert!(answers.next().await.is_none());
        }
    }

    #[tokio::test]
    async fn a_call_that_panics_is_answered_with_an_error_and_the_stream_goes_on() {
        let fake = Arc::new(Fake::default());
        let (calls, mut answers) = start(&fake);
        calls.send(request(3, "panic")).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.next())
            .await
            .expect("an answer in time")
            .expect("an answer")
            .expect("not the stream's end");
        match answer.outcome {
            Some(pb::forward_answer::Outcome::Refused(r)) => {
                assert_eq!((answer.id, r.code), (3, tonic::Code::Internal as i32), "{}", r.message)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        calls.send(request(4, "fast")).unwrap();
        assert_eq!(next(&mut answers).await, (4, "fast".into()));
    }

    #[tokio::test]
    async fn a_broken_stream_drops_the_calls_it_was_running() {
        let fake = Arc::new(Fake::default());
        let (calls, mut answers) = start(&fake);
        calls.send(request(1, "wait")).unwrap();
        until("the call to run", || fake.running.load(Ordering::SeqCst) == 1).await;
        calls.send(Err(Status::invalid_argument("a message does not decode"))).unwrap();
        until("the call to be dropped", || fake.dropped.load(Ordering::SeqCst) == 1).await;
        let ended = answers.next().await.expect("the error").expect_err("an error");
        assert_eq!(ended.code(), tonic::Code::InvalidArgument);
        assert!(answers.next().await.is_none(), "the dropped call is never answered");
    }

    /// A leader's peer port that serves only forwarding, on plain HTTP/2 over loopback.
    struct Leader {
        forwarder: Arc<Fake>,
        opened: AtomicUsize,
        /// Streams to refuse before serving one.
        refusals: Mutex<usize>,
        /// Break each stream once its first call has arrived, with no answer.
        breaks: std::sync::atomic::AtomicBool,
    }

    fn not_here<T>() -> Result<T, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl pb::peer_server::Peer for Leader {
        async fn vote(&self, _: tonic::Request<pb::Blob>) -> Result<tonic::Response<pb::Blob>, Status> {
            not_here()
        }
        async fn append_entries(&self, _: tonic::Request<pb::Blob>) -> Result<tonic::Response<pb::Blob>, Status> {
            not_here()
        }
        type StreamAppendStream = futures::stream::Empty<Result<pb::Blob, Status>>;
        async fn stream_append(
            &self,
            _: tonic::Request<tonic::Streaming<pb::Blob>>,
        ) -> Result<tonic::Response<Self::StreamAppendStream>, Status> {
            not_here()
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
        ) -> Result<tonic::Response<pb::Blob>, Status> {
            not_here()
        }
        type ForwardStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::ForwardAnswer, Status>> + Send>>;
        async fn forward(
            &self,
            req: tonic::Request<tonic::Streaming<pb::ForwardCall>>,
        ) -> Result<tonic::Response<Self::ForwardStream>, Status> {
            self.opened.fetch_add(1, Ordering::SeqCst);
            {
                let mut refusals = self.refusals.lock().unwrap();
                if *refusals > 0 {
                    *refusals -= 1;
                    return Err(Status::permission_denied("this node is Pending"));
                }
            }
            if self.breaks.load(Ordering::SeqCst) {
                let mut calls = req.into_inner();
                let broken = futures::stream::once(async move {
                    let _ = calls.message().await;
                    Err(Status::unknown("h2 protocol error: connection reset"))
                });
                return Ok(tonic::Response::new(Box::pin(broken)));
            }
            let forwarder: Arc<dyn Forwarder> = self.forwarder.clone();
            Ok(tonic::Response::new(Box::pin(serve(req.into_inner(), b"node".to_vec(), forwarder))))
        }
        async fn join(&self, _: tonic::Request<pb::JoinRequest>) -> Result<tonic::Response<pb::JoinReply>, Status> {
            not_here()
        }
        async fn challenge(
            &self,
            _: tonic::Request<pb::ChallengeRequest>,
        ) -> Result<tonic::Response<pb::ChallengeReply>, Status> {
            not_here()
        }
        async fn attest(
            &self,
            _: tonic::Request<pb::AttestRequest>,
        ) -> Result<tonic::Response<pb::AttestReply>, Status> {
            not_here()
        }
    }

    /// A follower's `Forwards` wired to a leader serving on loopback.
    async fn follower(refusals: usize) -> (Forwards, Arc<Leader>) {
        let leader = Arc::new(Leader {
            forwarder: Arc::new(Fake::default()),
            opened: AtomicUsize::new(0),
            refusals: Mutex::new(refusals),
            breaks: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(stream, _)| stream);
            Some((conn, l))
        });
        let service = pb::peer_server::PeerServer::from_arc(leader.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let client = pb::peer_client::PeerClient::new(channel);
        let forwards = Forwards {
            connect: Arc::new(move |_, _| Ok(client.clone())),
            current: Arc::default(),
            waiting: Arc::default(),
        };
        (forwards, leader)
    }

    fn forwarded(path: &str) -> pb::ForwardRequest {
        pb::ForwardRequest { path: path.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn concurrent_forwards_share_one_stream_and_each_gets_its_own_answer() {
        let (forwards, leader) = follower(0).await;
        let calls = (0..64).map(|i| {
            let forwards = forwards.clone();
            async move { forwards.call(1, "https://leader", forwarded(&format!("/p{i}"))).await }
        });
        let replies = futures::future::join_all(calls).await;
        for (i, reply) in replies.into_iter().enumerate() {
            assert_eq!(reply.expect("a reply").body, format!("/p{i}").into_bytes());
        }
        assert_eq!(leader.opened.load(Ordering::SeqCst), 1);
        assert_eq!(forwards.waiting(), 0, "every answered call is uncounted");
    }

    #[tokio::test]
    async fn a_follower_that_gives_up_on_a_call_cancels_it_on_the_leader() {
        let (forwards, leader) = follower(0).await;
        let fake = &leader.forwarder;
        let waits = forwards.call(1, "https://leader", forwarded("wait"));
        let watch = async {
            until("the leader to run the call", || fake.running.load(Ordering::SeqCst) == 1).await;
            assert_eq!(forwards.waiting(), 1, "the call is counted while it waits");
        };
        tokio::select! {
            _ = waits => panic!("the call waits for a permit that never comes"),
            () = watch => {}
        }
        assert_eq!(forwards.waiting(), 0, "a call given up is no longer counted");
        until("the leader to drop the call", || fake.dropped.load(Ordering::SeqCst) == 1).await;
        // The stream stays up for the next call.
        assert_eq!(forwards.call(1, "https://leader", forwarded("/next")).await.unwrap().body, b"/next");
        assert_eq!(leader.opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_stream_fails_its_calls_and_the_next_call_opens_another() {
        let (forwards, leader) = follower(1).await;
        let refused = forwards.call(1, "https://leader", forwarded("/first")).await.unwrap_err();
        assert!(matches!(refused, ForwardError::NotRun(_)), "{refused:?}");
        assert_eq!(refused.status().code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert_eq!(forwards.call(1, "https://leader", forwarded("/second")).await.unwrap().body, b"/second");
        assert_eq!(leader.opened.load(Ordering::SeqCst), 2);
        assert_eq!(leader.forwarder.authorized.load(Ordering::SeqCst), 1, "the refused call never ran");
    }

    /// A stream that breaks after a call went out leaves it unanswered, not refused: the leader
    /// may have run it (a write may commit), so the follower must not tell its client that
    /// nothing happened. (Before, both were one error, which the follower answered with a plain
    /// 503 that a client takes for "send it again".)
    #[tokio::test]
    async fn a_call_on_a_stream_that_breaks_may_have_run() {
        let (forwards, leader) = follower(0).await;
        leader.breaks.store(true, Ordering::SeqCst);
        let lost = forwards.call(1, "https://leader", forwarded("/lost")).await.unwrap_err();
        assert!(matches!(lost, ForwardError::Unanswered(_)), "{lost:?}");
        // A leader's answer that it could not run a call (it panicked part-way) is no refusal.
        leader.breaks.store(false, Ordering::SeqCst);
        let failed = forwards.call(1, "https://leader", forwarded("panic")).await.unwrap_err();
        assert!(matches!(failed, ForwardError::Unanswered(_)), "{failed:?}");
    }
}
