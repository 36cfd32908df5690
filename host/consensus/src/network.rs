//! Node-to-node transport: one cached gRPC channel per peer, over mutual TLS with node
//! certificates, carrying postcard-encoded openraft messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloister_proto::peer::v1 as pb;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest, VoteResponse,
};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::state_machine::SnapshotFile;
use super::types::{NodeAddr, NodeId, TypeConfig, Vote, decode, encode};
use cloister_crypto::identity::KeyedCert;

/// Bytes per snapshot chunk on the wire.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest message a peer accepts: a batch of log entries or a snapshot chunk.
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Most bytes of log entries the leader puts in one AppendEntries message, by their stored size:
/// a sixteenth of [`PEER_MESSAGE_BYTES_MAX`]. A batch stops before the entry that would cross it,
/// but always holds one entry, so a message carries at most
/// `max(REPLICATION_BATCH_BYTES_MAX, ENTRY_BYTES_MAX)` of entries: half the cap, the other half
/// left for framing.
pub const REPLICATION_BATCH_BYTES_MAX: usize = PEER_MESSAGE_BYTES_MAX / 16;
/// The slowest rate, in bytes per second, at which a peer is given time to receive and persist
/// a message: openraft allots an AppendEntries a fraction of the heartbeat interval (112.5 ms
/// by default), which no large batch can meet, so a message gets that plus its size at this rate.
/// Without it a batch of large entries timed out on every attempt and replication never moved.
pub const REPLICATION_BYTES_PER_S_MIN: usize = 8 << 20;
/// Largest encoded log entry: half of [`PEER_MESSAGE_BYTES_MAX`]. The writer refuses (413) a
/// transaction whose entry would be larger, and a node refuses to start with contract limits
/// that could produce one, so no entry is ever too large to replicate.
pub const ENTRY_BYTES_MAX: usize = PEER_MESSAGE_BYTES_MAX / 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Cached channels to peers, keyed by peer URL.
#[derive(Clone)]
pub struct Peers {
    tls: ClientTlsConfig,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    pub fn new(service_ca_pem: &str, node: &KeyedCert) -> Peers {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(service_ca_pem))
            .identity(Identity::from_pem(&node.cert_pem, &node.key_pem));
        Peers { tls, channels: Arc::default() }
    }

    /// The channel to a peer, created lazily (it connects on first use and reconnects by itself).
    pub fn channel(&self, peer_url: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().expect("peer channel lock");
        if let Some(c) = channels.get(peer_url) {
            return Ok(c.clone());
        }
        let uri: http::Uri =
            peer_url.parse().map_err(|_| tonic::Status::invalid_argument(format!("bad peer URL {peer_url}")))?;
        let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']).to_owned();
        let endpoint = Endpoint::from_shared(peer_url.to_owned())
            .and_then(|e| e.tls_config(self.tls.clone().domain_name(host)))
            .map_err(|e| tonic::Status::invalid_argument(format!("peer {peer_url}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = endpoint.connect_lazy();
        channels.insert(peer_url.to_owned(), channel.clone());
        Ok(channel)
    }

    pub fn client(&self, peer_url: &str) -> Result<pb::peer_client::PeerClient<Channel>, tonic::Status> {
        Ok(pb::peer_client::PeerClient::new(self.channel(peer_url)?)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
    }
}

/// Creates connections for openraft.
pub(crate) struct NetworkFactory {
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerConnection {
        PeerConnection {
            target,
            peer_url: node.peer_url.clone(),
            peers: self.peers.clone(),
            oversize_reported: Default::default(),
        }
    }
}

/// One peer, as openraft sees it.
pub(crate) struct PeerConnection {
    target: NodeId,
    peer_url: String,
    peers: Peers,
    /// Whether an over-cap message to this peer has been logged (once per connection).
    oversize_reported: Arc<AtomicBool>,
}

/// The time a peer message of `bytes` may take: openraft's `soft_ttl`, plus the transfer and
/// persistence of its bytes at [`REPLICATION_BYTES_PER_S_MIN`].
fn rpc_time(soft_ttl: Duration, bytes: usize) -> Duration {
    soft_ttl + Duration::from_secs_f64(bytes as f64 / REPLICATION_BYTES_PER_S_MIN as f64)
}

/// `request` encoded for the wire, unless it exceeds the peer message cap.
fn message(
    target: NodeId,
    oversize_reported: &AtomicBool,
    request: &impl serde::Serialize,
    action: RPCTypes,
) -> Result<pb::Blob, RPCError<TypeConfig>> {
    let blob = pb::Blob { data: encode(request) };
    if blob.data.len() <= PEER_MESSAGE_BYTES_MAX {
        return Ok(blob);
    }
    // Sending it again would fail the same way: the batch bounds above make this a bug, so it is
    // said once, loudly, instead of being retried in silence.
    if !oversize_reported.swap(true, Ordering::Relaxed) {
        tracing::error!(
            peer = target,
            bytes = blob.data.len(),
            max = PEER_MESSAGE_BYTES_MAX,
            ?action,
            "a peer message exceeds the peer message cap and cannot be sent; replication to this peer is stuck"
        );
    }
    let e = std::io::Error::other(format!(
        "peer {target}: the message of {} bytes exceeds PEER_MESSAGE_BYTES_MAX ({PEER_MESSAGE_BYTES_MAX})",
        blob.data.len()
    ));
    Err(RPCError::Network(NetworkError::new(&e)))
}

fn status_error(target: NodeId, status: &tonic::Status) -> RPCError<TypeConfig> {
    let e = std::io::Error::other(format!("peer {target}: {}", status.message()));
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl PeerConnection {
    async fn unary<Req, Resp>(
        &self,
        request: &Req,
        option: &RPCOption,
        action: RPCTypes,
        call: impl AsyncFnOnce(
            pb::peer_client::PeerClient<Channel>,
            pb::Blob,
        ) -> Result<tonic::Response<pb::Blob>, tonic::Status>,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let client = self.peers.client(&self.peer_url).map_err(|s| status_error(self.target, &s))?;
        let blob = message(self.target, &self.oversize_reported, request, action)?;
        let ttl = rpc_time(option.soft_ttl(), blob.data.len());
        let reply = match tokio::time::timeout(ttl, call(client, blob)).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout { action, id: 0, target: self.target, timeout: ttl }));
            }
            Ok(r) => r.map_err(|s| status_error(self.target, &s))?,
        };
        decode(&reply.into_inner().data, "a peer's reply").map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, RPCTypes::AppendEntries, async |mut c, b| c.append_entries(b).await).await
    }

    /// Replication as one long-lived gRPC stream per session: openraft sends each AppendEntries as
    /// soon as its entries are in the leader's log, without waiting for the reply to the one
    /// before (the follower answers them in order), so a commit group costs one message each
    /// way on an open HTTP/2 stream instead of a call of its own, and replication pipelines
    /// under load. Heartbeats stay unary calls (`append_entries`).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let mut client = self.peers.client(&self.peer_url).map_err(|s| status_error(self.target, &s))?;
            let target = self.target;
            let ttl = option.soft_ttl();
            let unanswered = Arc::new(Unanswered::default());
            let sending = unanswered.clone();
            let oversize_reported = self.oversize_reported.clone();
            let requests = input
                .map(move |rpc| message(target, &oversize_reported, &rpc, RPCTypes::AppendEntries))
                .take_while(move |blob| {
                    match blob {
                        Ok(blob) => sending.sent(blob.data.len()),
                        Err(e) => sending.refuse(e.clone()),
                    }
                    std::future::ready(blob.is_ok())
                })
                .filter_map(|blob| std::future::ready(blob.ok()));
            let replies = match tokio::time::timeout(ttl, client.stream_append(requests)).await {
                Err(_) => {
                    let timeout = Timeout { action: RPCTypes::AppendEntries, id: 0, target, timeout: ttl };
                    return Err(RPCError::Timeout(timeout));
                }
                Ok(r) => r.map_err(|s| status_error(target, &s))?.into_inner(),
            };
            let reading = ReplyReader { replies, unanswered, target, ttl, progress_at: Instant::now(), ended: false };
            Ok(futures::stream::unfold(reading, ReplyReader::next).boxed())
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, RPCTypes::Vote, async |mut c, b| c.vote(b).await).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client =
            self.peers.client(&self.peer_url).map_err(|s| StreamingError::from(status_error(self.target, &s)))?;
        // A snapshot goes only with the seal of its position: until a signature reaches it, the
        // send fails and openraft tries again.
        let seal = snapshot.snapshot.seal.as_ref().ok_or_else(|| {
            let e = std::io::Error::other("the snapshot's last entry is not signed yet");
            StreamingError::from(RPCError::Network(NetworkError::new(&e)))
        })?;
        let file = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|e| StreamingError::from(RPCError::Network(NetworkError::new(&e))))?;
        let head = pb::SnapshotChunk { chunk: Some(pb::snapshot_chunk::Chunk::Head(encode(&(vote, snapshot.meta)))) };
        let seal = pb::SnapshotChunk { chunk: Some(pb::snapshot_chunk::Chunk::Seal(encode(seal))) };
        let body = tokio_util::io::ReaderStream::with_capacity(file, SNAPSHOT_CHUNK_BYTES).map(|chunk| {
            pb::SnapshotChunk {
                // A read error ends the stream short; the receiver then refuses the incomplete snapshot.
                chunk: chunk.ok().map(|bytes| pb::snapshot_chunk::Chunk::Data(bytes.to_vec())),
            }
        });
        let chunks =
            futures::stream::iter([head, seal]).chain(body.take_while(|c| std::future::ready(c.chunk.is_some())));
        let send = client.install_snapshot(chunks);
        tokio::select! {
            reply = send => {
                let reply = reply.map_err(|s| StreamingError::from(status_error(self.target, &s)))?;
                decode(&reply.into_inner().data, "a snapshot reply").map_err(|e| StreamingError::from(RPCError::Network(NetworkError::new(&e))))
            }
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// The AppendEntries messages of one replication stream that await their reply.
#[derive(Default)]
struct Unanswered {
    /// When each was handed to the transport, and its size; oldest first. Replies come in order.
    sent: Mutex<VecDeque<(Instant, usize)>>,
    /// Why the sending side stopped early (a message over the cap), for the reading side to report.
    refused: Mutex<Option<RPCError<TypeConfig>>>,
    /// Wakes a reader that waits with nothing unanswered.
    changed: tokio::sync::Notify,
}

impl Unanswered {
    fn sent(&self, bytes: usize) {
        self.sent.lock().expect("unanswered lock").push_back((Instant::now(), bytes));
        self.changed.notify_one();
    }

    fn refuse(&self, e: RPCError<TypeConfig>) {
        *self.refused.lock().expect("unanswered lock") = Some(e);
        self.changed.notify_one();
    }
}

/// The reading side of a replication stream: decodes the follower's replies in order, and fails
/// the stream when the follower makes no progress: when the oldest unanswered message has gone
/// unanswered for the RPC's time (openraft's `soft_ttl` plus its size at
/// [`REPLICATION_BYTES_PER_S_MIN`]) counted from its sending or the last reply, whichever is
/// later. An idle stream, with nothing unanswered, has no deadline.
struct ReplyReader<R> {
    replies: R,
    unanswered: Arc<Unanswered>,
    target: NodeId,
    ttl: Duration,
    progress_at: Instant,
    /// Set once an error is reported: the stream ends after it.
    ended: bool,
}

impl<R: Stream<Item = Result<pb::Blob, tonic::Status>> + Unpin> ReplyReader<R> {
    async fn next(mut self) -> Option<(Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>, ReplyReader<R>)> {
        if self.ended {
            return None;
        }
        loop {
            let refused = self.unanswered.refused.lock().expect("unanswered lock").take();
            if let Some(e) = refused {
                self.ended = true;
                return Some((Err(e), self));
            }
            let deadline = self
                .unanswered
                .sent
                .lock()
                .expect("unanswered lock")
                .front()
                .map(|&(at, bytes)| at.max(self.progress_at) + rpc_time(self.ttl, bytes));
            let result = tokio::select! {
                reply = self.replies.next() => match reply {
                    Some(Ok(blob)) => {
                        self.unanswered.sent.lock().expect("unanswered lock").pop_front();
                        self.progress_at = Instant::now();
                        decode(&blob.data, "a peer's stream reply").map_err(|e| RPCError::Network(NetworkError::new(&e)))
                    }
                    // The stream ended: because the sending side stopped (the check above reports
                    // why), or the follower ended it; openraft opens another to send more.
                    None if self.unanswered.refused.lock().expect("unanswered lock").is_some() => continue,
                    None => return None,
                    Some(Err(status)) => Err(status_error(self.target, &status)),
                },
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let waited = deadline.map_or(self.ttl, |d| d.saturating_duration_since(self.progress_at));
                    Err(RPCError::Timeout(Timeout { action: RPCTypes::AppendEntries, id: 0, target: self.target, timeout: waited }))
                }
                () = self.unanswered.changed.notified(), if deadline.is_none() => continue,
            };
            self.ended = result.is_err();
            return Some((result, self));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_gets_time_for_its_size() {
        let ttl = Duration::from_micros(112_500);
        assert_eq!(rpc_time(ttl, 0), ttl, "a heartbeat keeps openraft's budget");
        let batch = rpc_time(ttl, REPLICATION_BATCH_BYTES_MAX);
        assert_eq!(batch, ttl + Duration::from_millis(500), "a full batch: 4 MiB at 8 MiB/s");
        let entry = rpc_time(ttl, ENTRY_BYTES_MAX);
        assert_eq!(entry, ttl + Duration::from_secs(4), "the largest entry: 32 MiB at 8 MiB/s");
    }

    type Replies = futures::channel::mpsc::UnboundedReceiver<Result<pb::Blob, tonic::Status>>;

    fn reader(
        ttl: Duration,
    ) -> (ReplyReader<Replies>, Arc<Unanswered>, futures::channel::mpsc::UnboundedSender<Result<pb::Blob, tonic::Status>>)
    {
        let (replies_in, replies) = futures::channel::mpsc::unbounded();
        let unanswered = Arc::new(Unanswered::default());
        let reader = ReplyReader {
            replies,
            unanswered: unanswered.clone(),
            target: 2,
            ttl,
            progress_at: Instant::now(),
            ended: false,
        };
        (reader, unanswered, replies_in)
    }

    fn reply(result: &StreamAppendResult<TypeConfig>) -> Result<pb::Blob, tonic::Status> {
        Ok(pb::Blob { data: encode(result) })
    }

    /// A stream with nothing unanswered waits as long as it takes; once a message is sent, a
    /// follower that does not answer it within the RPC's time fails the stream, which then ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unanswered_message_times_out_and_an_idle_stream_does_not() {
        let ttl = Duration::from_millis(50);
        let (reader, unanswered, _replies_in) = reader(ttl);
        let next = tokio::spawn(reader.next());
        tokio::time::sleep(ttl * 4).await;
        assert!(!next.is_finished(), "an idle stream has no deadline");
        let sent_at = Instant::now();
        unanswered.sent(100);
        let (result, reader) = next.await.expect("the reader").expect("an item");
        assert!(matches!(result, Err(RPCError::Timeout(_))), "{result:?}");
        assert!(sent_at.elapsed() >= ttl, "not before the RPC's time");
        assert!(reader.next().await.is_none(), "the stream ends after its error");
    }

    /// Replies come back decoded and in order, each one resets the clock for the next, and a
    /// message the sending side refused is reported once the follower has answered the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_come_in_order_and_a_refused_message_ends_the_stream() {
        let ttl = Duration::from_millis(50);
        let (reader, unanswered, replies_in) = reader(ttl);
        let log_id = openraft::testing::log_id::<TypeConfig>(1, 0, 7);
        unanswered.sent(10);
        unanswered.sent(10);
        replies_in.unbounded_send(reply(&Ok(Some(log_id)))).expect("send");
        let (first, reader) = reader.next().await.expect("a reply");
        assert_eq!(first.expect("no error"), Ok(Some(log_id)));
        assert_eq!(unanswered.sent.lock().unwrap().len(), 1);
        // The second reply comes later than the first message's deadline, but within its own
        // time counted from the first reply.
        tokio::time::sleep(ttl / 2).await;
        replies_in.unbounded_send(reply(&Ok(None))).expect("send");
        let (second, reader) = reader.next().await.expect("a reply");
        assert_eq!(second.expect("no error"), Ok(None));
        let e = std::io::Error::other("too large");
        unanswered.refuse(RPCError::Network(NetworkError::new(&e)));
        drop(replies_in);
        let (refused, reader) = reader.next().await.expect("the refusal");
        assert!(matches!(refused, Err(RPCError::Network(_))), "{refused:?}");
        assert!(reader.next().await.is_none());
    }

    /// A reply that is not a reply fails the stream instead of being skipped: replies are matched
    /// to messages in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_that_does_not_decode_fails_the_stream() {
        let (reader, unanswered, replies_in) = reader(Duration::from_millis(50));
        unanswered.sent(10);
        replies_in.unbounded_send(Ok(pb::Blob { data: vec![0xff; 9] })).expect("send");
        let (result, reader) = reader.next().await.expect("an item");
        assert!(matches!(result, Err(RPCError::Network(_))), "{result:?}");
        assert!(reader.next().await.is_none());
    }
}
