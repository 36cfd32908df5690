//! Node-to-node transport: one cached gRPC channel per peer, over mutual TLS with node
//! certificates, carrying postcard-encoded openraft messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloister_proto::peer::v1 as pb;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest, VoteResponse,
};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::state_machine::SnapshotFile;
use super::types::{LogId, NodeAddr, NodeId, TypeConfig, Vote, decode, encode};
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
/// Largest AppendEntries message sent on a replication stream. A larger one (a batch of large
/// entries) goes as a call of its own once every message before it is answered, and the stream
/// takes the next after its reply. Pipelining is for the latency of small messages; a large one
/// is bound by its transfer and the follower's decode and sync, so sending more behind it only
/// piles work onto a follower still busy with it, and a timed-out call is dropped as a whole.
pub const STREAMED_APPEND_BYTES_MAX: usize = 1 << 20;
/// The slowest rate, in bytes per second, at which a peer is given time to receive and persist
/// a message: openraft allots an AppendEntries a fraction of the heartbeat interval (112.5 ms
/// by default), which no large batch can meet, so a message gets that plus its size at this rate.
/// Without it a batch of large entries timed out on every attempt and replication never moved.
/// A follower on a loaded debug build took 0.5–1.3 s to decode one 9.3 MB entry (7–18 MB/s),
/// so at 8 MiB/s such messages still timed out and were sent again, each copy more work for
/// the follower; at this rate ten of them replicated with a handful of retries instead of 15–20.
pub const REPLICATION_BYTES_PER_S_MIN: usize = 2 << 20;
/// Largest encoded log entry: half of [`PEER_MESSAGE_BYTES_MAX`]. The writer refuses (413) a
/// transaction whose entry would be larger, and a node refuses to start with contract limits
/// that could produce one, so no entry is ever too large to replicate.
pub const ENTRY_BYTES_MAX: usize = PEER_MESSAGE_BYTES_MAX / 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A peer URL, and the node expected there (none for a join's first contact).
type PeerKey = (String, Option<NodeId>);

/// Cached channels to peers, keyed by peer URL and the node expected there.
#[derive(Clone)]
pub struct Peers {
    tls: ClientTlsConfig,
    service_ca_pem: Arc<str>,
    node: Arc<KeyedCert>,
    channels: Arc<Mutex<HashMap<PeerKey, Channel>>>,
}

impl Peers {
    pub fn new(service_ca_pem: &str, node: &KeyedCert) -> Peers {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(service_ca_pem))
            .identity(Identity::from_pem(&node.cert_pem, &node.key_pem));
        Peers { tls, service_ca_pem: service_ca_pem.into(), node: Arc::new(node.clone()), channels: Arc::default() }
    }

    /// The channel to a peer, created lazily (it connects on first use and reconnects by itself).
    /// With `expected`, the peer's certificate must be that node's (`node_id_of`), not only one
    /// the service CA issued for its address: any holder of such a certificate (a retired node,
    /// a machine that took the address) could otherwise answer in the node's place, grant votes,
    /// acknowledge appends, and read what is forwarded to it. Without it (a join, before the
    /// joiner knows the network), the CA and host name alone; the leader's attestation is the
    /// join's check.
    pub fn channel(&self, peer_url: &str, expected: Option<NodeId>) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().expect("peer channel lock");
        let key = (peer_url.to_owned(), expected);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let bad = |e: &dyn std::fmt::Display| tonic::Status::invalid_argument(format!("peer {peer_url}: {e}"));
        let uri: http::Uri = peer_url.parse().map_err(|e| bad(&e))?;
        let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']).to_owned();
        let channel = match expected {
            None => Endpoint::from_shared(peer_url.to_owned())
                .and_then(|e| e.tls_config(self.tls.clone().domain_name(host)))
                .map_err(|e| bad(&e))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .connect_lazy(),
            Some(id) => {
                let config = cloister_crypto::tls::peer_client_config(self.service_ca_pem.as_bytes(), &self.node, id)
                    .map_err(|e| bad(&e))?;
                let authority = uri.authority().ok_or_else(|| bad(&"no host:port"))?.to_string();
                // The connector makes the TLS connection itself, so tonic sees plain HTTP/2.
                Endpoint::from_shared(format!("http://{authority}"))
                    .map_err(|e| bad(&e))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .connect_with_connector_lazy(PeerConnector { config, host })
            }
        };
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    /// A client of the peer at `peer_url`, which must be node `expected` when given (see
    /// [`Peers::channel`]).
    pub fn client(
        &self,
        peer_url: &str,
        expected: Option<NodeId>,
    ) -> Result<pb::peer_client::PeerClient<Channel>, tonic::Status> {
        Ok(pb::peer_client::PeerClient::new(self.channel(peer_url, expected)?)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
    }
}

/// Opens the TLS connection to one peer, verifying it as [`cloister_crypto::tls::peer_client_config`]
/// does.
#[derive(Clone)]
struct PeerConnector {
    config: Arc<rustls::ClientConfig>,
    /// The peer URL's host, the name its certificate must carry.
    host: String,
}

impl tower::Service<http::Uri> for PeerConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, std::io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let PeerConnector { config, host } = self.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| std::io::Error::other("no host:port"))?.to_string();
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Creates connections for openraft.
pub(crate) struct NetworkFactory {
    pub peers: Peers,
    /// `raft.appends_in_flight_max`.
    pub in_flight_max: usize,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerConnection {
        PeerConnection {
            target,
            peer_url: node.peer_url.clone(),
            peers: self.peers.clone(),
            in_flight_max: self.in_flight_max,
            oversize_reported: Default::default(),
        }
    }
}

/// One peer, as openraft sees it.
pub(crate) struct PeerConnection {
    target: NodeId,
    peer_url: String,
    peers: Peers,
    /// Most AppendEntries messages on a replication stream without their reply.
    in_flight_max: usize,
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

/// `call`'s reply within `ttl`, or the timeout or the peer's error as openraft takes them.
async fn timed<R>(
    target: NodeId,
    action: RPCTypes,
    ttl: Duration,
    call: impl Future<Output = Result<R, tonic::Status>>,
) -> Result<R, RPCError<TypeConfig>> {
    match tokio::time::timeout(ttl, call).await {
        Err(_) => Err(RPCError::Timeout(Timeout { action, id: 0, target, timeout: ttl })),
        Ok(reply) => reply.map_err(|s| status_error(target, &s)),
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
        let client = self.peers.client(&self.peer_url, Some(self.target)).map_err(|s| status_error(self.target, &s))?;
        let blob = message(self.target, &self.oversize_reported, request, action)?;
        let ttl = rpc_time(option.soft_ttl(), blob.data.len());
        let reply = timed(self.target, action, ttl, call(client, blob)).await?;
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
    /// soon as its entries are in the leader's log, up to `raft.appends_in_flight_max` ahead of
    /// their replies (the follower answers them in order), so a new commit index or the next
    /// commit group goes out while the follower still syncs the last one. A message larger than
    /// [`STREAMED_APPEND_BYTES_MAX`] goes as a call of its own once everything before it is
    /// answered. openraft sends each heartbeat as a stream of one message.
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
            let client =
                self.peers.client(&self.peer_url, Some(self.target)).map_err(|s| status_error(self.target, &s))?;
            let replication = Replication::new(
                input,
                client,
                self.target,
                option.soft_ttl(),
                self.in_flight_max,
                self.oversize_reported.clone(),
            );
            Ok(futures::stream::unfold(replication, Replication::next).boxed())
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
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self
            .peers
            .client(&self.peer_url, Some(self.target))
            .map_err(|s| StreamingError::from(status_error(self.target, &s)))?;
        // A snapshot goes only with the seal of its position: until its file is built and a
        // signature reaches its last entry, the send fails and openraft tries again.
        let seal = snapshot.snapshot.seal.as_ref().ok_or_else(|| {
            let e = std::io::Error::other(
                "the snapshot is not ready: its file is being built or its last entry is not signed yet",
            );
            StreamingError::from(RPCError::Network(NetworkError::new(&e)))
        })?;
        let file = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|e| StreamingError::from(RPCError::Network(NetworkError::new(&e))))?;
        // `raft.install_snapshot_timeout_ms`, plus the file's size at the slowest rate a peer is
        // given: a follower that takes the stream and stops reading holds it no longer.
        let len = file.metadata().await.map_or(0, |m| m.len());
        let ttl = rpc_time(option.soft_ttl(), usize::try_from(len).unwrap_or(usize::MAX));
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
        let send = timed(self.target, RPCTypes::InstallSnapshot, ttl, client.install_snapshot(chunks));
        tokio::select! {
            reply = send => {
                let reply = reply.map_err(StreamingError::from)?;
                decode(&reply.into_inner().data, "a snapshot reply").map_err(|e| StreamingError::from(RPCError::Network(NetworkError::new(&e))))
            }
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

type Replies = BoxStream<'static, Result<pb::Blob, tonic::Status>>;
type AppendItem = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// The two ways an AppendEntries message reaches a follower: on the session's stream, whose
/// replies come in order, or as a call of its own.
trait AppendTransport: Send {
    /// Opens a stream that carries the messages `requests` yields.
    fn open(&mut self, requests: mpsc::UnboundedReceiver<pb::Blob>) -> Replies;
    /// Sends one message as a call of its own.
    fn call(&mut self, message: pb::Blob) -> BoxFuture<'static, Result<pb::Blob, tonic::Status>>;
}

impl AppendTransport for pb::peer_client::PeerClient<Channel> {
    fn open(&mut self, requests: mpsc::UnboundedReceiver<pb::Blob>) -> Replies {
        let mut client = self.clone();
        // The call's answer (the follower's response headers) comes with the replies, under
        // their deadline: the first message goes out while the call opens.
        let opened = async move { client.stream_append(requests).await.map(tonic::Response::into_inner) };
        futures::stream::once(opened)
            .map(|opened| match opened {
                Ok(replies) => replies.boxed(),
                Err(status) => futures::stream::once(std::future::ready(Err(status))).boxed(),
            })
            .flatten()
            .boxed()
    }

    fn call(&mut self, message: pb::Blob) -> BoxFuture<'static, Result<pb::Blob, tonic::Status>> {
        let mut client = self.clone();
        Box::pin(async move { client.append_entries(message).await.map(tonic::Response::into_inner) })
    }
}

/// A message too large for the stream, held until every message before it is answered.
struct Held {
    message: pb::Blob,
    /// The log ids its reply maps to: the one before its entries, and its last.
    prev: Option<LogId>,
    last: Option<LogId>,
}

/// What one replication session waits for next.
enum Event {
    Reply(Option<Result<pb::Blob, tonic::Status>>),
    Overdue,
    Request(Option<AppendEntriesRequest<TypeConfig>>),
}

/// One replication session to one follower: takes openraft's AppendEntries messages while the
/// window has room, and yields the follower's answers in order.
///
/// A message on the stream fails the session when it goes unanswered for the RPC's time
/// (openraft's `soft_ttl` plus its size at [`REPLICATION_BYTES_PER_S_MIN`]) counted from its
/// sending, the last reply, or the end of the session's own work on the next message, whichever
/// is latest; a session with nothing unanswered has no deadline. A held message's call gets the same time, as [`PeerConnection::append_entries`]'s.
struct Replication<S, T> {
    /// openraft's messages; `None` once it has ended the session.
    input: Option<S>,
    transport: T,
    target: NodeId,
    ttl: Duration,
    /// `raft.appends_in_flight_max`.
    in_flight_max: usize,
    oversize_reported: Arc<AtomicBool>,
    /// The open stream: where its messages go, and its replies.
    stream: Option<(mpsc::UnboundedSender<pb::Blob>, Replies)>,
    /// The stream's messages that await their reply: when each was sent, and its size; oldest first.
    unanswered: VecDeque<(Instant, usize)>,
    /// The last reply, the end of the session's own work on a message, or the session's start.
    progress_at: Instant,
    held: Option<Held>,
    /// Set once an error or a refusal is yielded: the session ends after it.
    ended: bool,
}

impl<S, T> Replication<S, T>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    T: AppendTransport,
{
    fn new(
        input: S,
        transport: T,
        target: NodeId,
        ttl: Duration,
        in_flight_max: usize,
        oversize_reported: Arc<AtomicBool>,
    ) -> Self {
        Replication {
            input: Some(input),
            transport,
            target,
            ttl,
            // The configuration refuses 0, with which no message would ever go.
            in_flight_max: in_flight_max.max(1),
            oversize_reported,
            stream: None,
            unanswered: VecDeque::new(),
            progress_at: Instant::now(),
            held: None,
            ended: false,
        }
    }

    async fn next(mut self) -> Option<(AppendItem, Self)> {
        if self.ended {
            return None;
        }
        loop {
            if self.unanswered.is_empty() {
                if let Some(held) = self.held.take() {
                    let result = self.call(held).await;
                    return Some(self.yielded(result));
                }
                // openraft ended the session, and everything is answered.
                self.input.as_ref()?;
            }
            // openraft builds each message when it is asked for the next, from every entry in
            // the log by then: not asking while the window is full lets those entries gather.
            let room = self.held.is_none() && self.unanswered.len() < self.in_flight_max;
            let oldest =
                self.unanswered.front().map(|&(at, bytes)| (at.max(self.progress_at), rpc_time(self.ttl, bytes)));
            let deadline = oldest.map(|(from, time)| from + time);
            let (streaming, asking) = (self.stream.is_some(), room && self.input.is_some());
            let replies = self.stream.as_mut().map(|(_, replies)| replies);
            let input = self.input.as_mut();
            // A reply that is in wins over a deadline that has passed meanwhile.
            let event = tokio::select! {
                biased;
                reply = async { replies?.next().await }, if streaming => Event::Reply(reply),
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => Event::Overdue,
                request = async { input?.next().await }, if asking => Event::Request(request),
                // Not reached: with nothing unanswered there is room, or a held message went
                // above, or openraft ended the session and that returned above too.
                else => return None,
            };
            match event {
                Event::Reply(Some(Ok(reply))) => {
                    self.progress_at = Instant::now();
                    let result = if self.unanswered.pop_front().is_some() {
                        decode(&reply.data, "a peer's stream reply")
                    } else {
                        // A reply to no message: the follower is not answering this stream's
                        // messages one for one, so no later reply can be matched either.
                        Err(std::io::Error::other(format!("peer {}: a stream reply to no message", self.target)))
                    };
                    return Some(self.yielded(result.map_err(|e| RPCError::Network(NetworkError::new(&e)))));
                }
                Event::Reply(Some(Err(status))) => {
                    let e = status_error(self.target, &status);
                    return Some(self.yielded(Err(e)));
                }
                // The follower ended the stream: with nothing unanswered the next message opens
                // another; with messages unanswered, their replies will not come.
                Event::Reply(None) if self.unanswered.is_empty() => self.stream = None,
                Event::Reply(None) => {
                    let e = self.stream_lost();
                    return Some(self.yielded(Err(e)));
                }
                Event::Overdue => {
                    let waited = oldest.map_or(self.ttl, |(_, time)| time);
                    let timeout =
                        Timeout { action: RPCTypes::AppendEntries, id: 0, target: self.target, timeout: waited };
                    return Some(self.yielded(Err(RPCError::Timeout(timeout))));
                }
                Event::Request(None) => {
                    // openraft ended the session: the stream ends once its messages are answered.
                    self.input = None;
                    if let Some((requests, _)) = &self.stream {
                        requests.close_channel();
                    }
                }
                Event::Request(Some(rpc)) => {
                    if let Err(e) = self.send(rpc) {
                        return Some(self.yielded(Err(e)));
                    }
                    // Building and encoding a message is this task's work, not the follower's,
                    // and it is not reading replies meanwhile: openraft reads a large message's
                    // entries from the log and it is encoded here, which took a second on a busy
                    // debug build. The clock of the messages already out starts again, lest the
                    // follower's answer to them be timed out for this task's own delay.
                    self.progress_at = Instant::now();
                }
            }
        }
    }

    /// Sends `rpc` on the stream, opening one if none is open, or holds it for a call of its own.
    fn send(&mut self, rpc: AppendEntriesRequest<TypeConfig>) -> Result<(), RPCError<TypeConfig>> {
        let mut message = message(self.target, &self.oversize_reported, &rpc, RPCTypes::AppendEntries)?;
        if message.data.len() > STREAMED_APPEND_BYTES_MAX {
            let prev = rpc.prev_log_id;
            let last = rpc.entries.last().map(RaftEntry::log_id).or(prev);
            self.held = Some(Held { message, prev, last });
            return Ok(());
        }
        let bytes = message.data.len();
        if let Some((requests, _)) = &self.stream {
            match requests.unbounded_send(message) {
                Ok(()) => {
                    self.unanswered.push_back((Instant::now(), bytes));
                    return Ok(());
                }
                // The call is over (the follower ended it, or the connection went): the replies
                // to the messages sent on it will not come, and a new stream's would be matched
                // to them.
                Err(_) if !self.unanswered.is_empty() => return Err(self.stream_lost()),
                // With nothing unanswered, the message opens another.
                Err(e) => message = e.into_inner(),
            }
        }
        let (requests, receiver) = mpsc::unbounded();
        requests.unbounded_send(message).expect("the receiver is here");
        self.stream = Some((requests, self.transport.open(receiver)));
        self.unanswered.push_back((Instant::now(), bytes));
        Ok(())
    }

    /// The error of a stream that ended with messages unanswered: their replies will not come.
    fn stream_lost(&self) -> RPCError<TypeConfig> {
        let e = std::io::Error::other(format!(
            "peer {}: the stream ended with {} messages unanswered",
            self.target,
            self.unanswered.len()
        ));
        RPCError::Network(NetworkError::new(&e))
    }

    /// Sends a held message as a call of its own, and maps its reply to a stream's.
    async fn call(&mut self, held: Held) -> AppendItem {
        let ttl = rpc_time(self.ttl, held.message.data.len());
        let reply = timed(self.target, RPCTypes::AppendEntries, ttl, self.transport.call(held.message)).await?;
        let response: AppendEntriesResponse<TypeConfig> =
            decode(&reply.data, "a peer's reply").map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match response {
            // A conflict names the entry before the message's, and there is none before the first.
            AppendEntriesResponse::Conflict if held.prev.is_none() => {
                let e = std::io::Error::other(format!("peer {}: a conflict before the log's first entry", self.target));
                Err(RPCError::Network(NetworkError::new(&e)))
            }
            // A follower that took only part of the message: openraft goes on from there in a
            // new session, as its own sequential transport does.
            AppendEntriesResponse::PartialSuccess(ref matched) if *matched != held.last => {
                self.ended = true;
                Ok(response.into_stream_result(held.prev, held.last))
            }
            response => Ok(response.into_stream_result(held.prev, held.last)),
        }
    }

    /// Yields `item`, and ends the session after anything but a full success: openraft opens
    /// another from where the follower stands.
    fn yielded(mut self, item: AppendItem) -> (AppendItem, Self) {
        self.ended = self.ended || !matches!(item, Ok(Ok(_)));
        (item, self)
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
        assert_eq!(batch, ttl + Duration::from_secs(2), "a full batch: 4 MiB at 2 MiB/s");
        let entry = rpc_time(ttl, ENTRY_BYTES_MAX);
        assert_eq!(entry, ttl + Duration::from_secs(16), "the largest entry: 32 MiB at 2 MiB/s");
    }

    /// A node's calls to a peer go only to the node it expects there. A listener serving another
    /// node's certificate from the service CA (a retired node, a machine that took the address)
    /// completes no handshake with it, so it can grant no vote and acknowledge no append; the
    /// node whose certificate it is does.
    #[tokio::test]
    async fn a_peer_call_reaches_only_the_node_expected_at_its_address() {
        use cloister_crypto::identity::ServiceCa;
        let ca = ServiceCa::generate("svc").unwrap();
        let issue = |name: &str| ca.issue_node_cert(name, &["localhost".into()]).unwrap();
        let (me, peer, impostor) = (issue("me"), issue("peer"), issue("impostor"));
        let id = |k: &KeyedCert| {
            cloister_crypto::node_id_of(&cloister_crypto::identity::cert_der(k.cert_pem.as_bytes()).unwrap())
        };
        let peers = Peers::new(&ca.keyed.cert_pem, &me);
        // The impostor listens at the address; each handshake it completes is counted.
        let gate: cloister_crypto::tls::PeerGate = Arc::new(|_: &[u8]| Ok(()));
        let config = cloister_crypto::tls::peer_server_config(&impostor, &ca.keyed.cert_pem, gate).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}", listener.local_addr().unwrap().port());
        let (done, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let accepted = tokio_rustls::TlsAcceptor::from(config.clone()).accept(tcp).await;
                done.send(accepted.is_ok()).unwrap();
                // Held open, so the client's call waits on it rather than failing at once.
                held.extend(accepted.ok());
            }
        });
        let vote = |expected: u64| {
            let peers = peers.clone();
            let url = url.clone();
            async move {
                let mut client = peers.client(&url, Some(expected)).unwrap();
                let call = client.vote(pb::Blob { data: Vec::new() });
                let _ = tokio::time::timeout(Duration::from_millis(500), call).await;
            }
        };
        vote(id(&peer)).await;
        assert_eq!(handshakes.recv().await, Some(false), "the impostor completed a handshake for the peer");
        vote(id(&impostor)).await;
        assert_eq!(handshakes.recv().await, Some(true), "the handshake as its own node");
    }
}

#[cfg(test)]
mod replication_tests {
    use std::sync::Arc;

    use cloister_ledger::entry::{TxEntry, TxKind};
    use openraft::raft::StreamAppendError;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::types::Entry;

    /// How the fake follower answers one message: the replies it sends back for it.
    type Answer = Arc<dyn Fn(&AppendEntriesRequest<TypeConfig>, Route) -> Vec<pb::Blob> + Send + Sync>;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Route {
        Stream,
        Call,
    }

    /// A follower that records how each message came, by the index of its last entry, and
    /// answers it once the test hands out a permit.
    #[derive(Clone)]
    struct FakeFollower {
        received: Arc<Mutex<Vec<(Route, u64)>>>,
        permits: Arc<Semaphore>,
        streams_opened: Arc<std::sync::atomic::AtomicUsize>,
        answer: Answer,
        /// Ends each stream's call after its first message, without answering it.
        hang_up: bool,
    }

    fn success(rpc: &AppendEntriesRequest<TypeConfig>, route: Route) -> Vec<pb::Blob> {
        let last = rpc.entries.last().map(RaftEntry::log_id).or(rpc.prev_log_id);
        vec![match route {
            Route::Stream => pb::Blob { data: encode(&StreamAppendResult::<TypeConfig>::Ok(last)) },
            Route::Call => pb::Blob { data: encode(&AppendEntriesResponse::<TypeConfig>::Success) },
        }]
    }

    impl FakeFollower {
        fn new(answer: Answer) -> Self {
            FakeFollower {
                received: Arc::default(),
                permits: Arc::new(Semaphore::new(0)),
                streams_opened: Arc::default(),
                answer,
                hang_up: false,
            }
        }

        fn received(&self) -> Vec<(Route, u64)> {
            self.received.lock().unwrap().clone()
        }

        /// Takes a message in and records it.
        fn receive(&self, message: &pb::Blob, route: Route) -> AppendEntriesRequest<TypeConfig> {
            let rpc: AppendEntriesRequest<TypeConfig> = decode(&message.data, "a test message").unwrap();
            let last = rpc.entries.last().map_or(0, |e| e.log_id().index);
            self.received.lock().unwrap().push((route, last));
            rpc
        }

        /// Waits for a permit, and returns the replies to `rpc`.
        async fn answer(&self, rpc: &AppendEntriesRequest<TypeConfig>, route: Route) -> Vec<pb::Blob> {
            self.permits.acquire().await.unwrap().forget();
            (self.answer)(rpc, route)
        }
    }

    impl AppendTransport for FakeFollower {
        fn open(&mut self, mut requests: mpsc::UnboundedReceiver<pb::Blob>) -> Replies {
            self.streams_opened.fetch_add(1, Ordering::Relaxed);
            if self.hang_up {
                let follower = self.clone();
                tokio::spawn(async move {
                    if let Some(message) = requests.next().await {
                        follower.receive(&message, Route::Stream);
                    }
                });
                return futures::stream::pending().boxed();
            }
            // Messages are received as they come, and answered in order as permits allow.
            let (received, to_answer) = mpsc::unbounded();
            let follower = self.clone();
            tokio::spawn(async move {
                while let Some(message) = requests.next().await {
                    let _ = received.unbounded_send(follower.receive(&message, Route::Stream));
                }
            });
            let follower = self.clone();
            to_answer
                .then(move |rpc| {
                    let follower = follower.clone();
                    async move { follower.answer(&rpc, Route::Stream).await }
                })
                .flat_map(|replies| futures::stream::iter(replies.into_iter().map(Ok)))
                .boxed()
        }

        fn call(&mut self, message: pb::Blob) -> BoxFuture<'static, Result<pb::Blob, tonic::Status>> {
            let follower = self.clone();
            Box::pin(async move {
                let rpc = follower.receive(&message, Route::Call);
                let mut replies = follower.answer(&rpc, Route::Call).await;
                replies.pop().ok_or_else(|| tonic::Status::unavailable("no reply"))
            })
        }
    }

    /// A message with one entry at `index`, of about `bytes` bytes.
    fn request(index: u64, bytes: usize) -> AppendEntriesRequest<TypeConfig> {
        let tx = TxEntry {
            uid: [0; 16],
            kind: TxKind::App,
            public: Default::default(),
            private: Some(vec![7; bytes]),
            claims_digest: None,
            signature: None,
        };
        let log_id = |i| openraft::testing::log_id::<TypeConfig>(1, 0, i);
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 0),
            prev_log_id: (index > 1).then(|| log_id(index - 1)),
            entries: vec![Entry::new_normal(log_id(index), tx)],
            leader_commit: None,
        }
    }

    /// A running session: openraft's side of it, as the test drives it.
    struct Session {
        requests: mpsc::UnboundedSender<AppendEntriesRequest<TypeConfig>>,
        answers: tokio::sync::mpsc::UnboundedReceiver<AppendItem>,
        ended: tokio::task::JoinHandle<()>,
    }

    fn start(follower: &FakeFollower, ttl: Duration, in_flight_max: usize) -> Session {
        let (requests, input) = mpsc::unbounded();
        let (answered, answers) = tokio::sync::mpsc::unbounded_channel();
        let replication = Replication::new(input, follower.clone(), 2, ttl, in_flight_max, Arc::default());
        let ended = tokio::spawn(async move {
            let mut items = futures::stream::unfold(replication, Replication::next).boxed();
            while let Some(item) = items.next().await {
                let _ = answered.send(item);
            }
        });
        Session { requests, answers, ended }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    impl Session {
        /// The session's next answer; none if it ended. A session that hangs fails the test.
        async fn answer(&mut self) -> Option<AppendItem> {
            tokio::time::timeout(LONG, self.answers.recv()).await.expect("the session answers")
        }
    }

    fn matched(item: Option<AppendItem>) -> u64 {
        match item {
            Some(Ok(Ok(Some(log_id)))) => log_id.index,
            other => panic!("expected a success, got {other:?}"),
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    /// `raft.appends_in_flight_max` at its edge: with that many messages unanswered the session
    /// does not take the next from openraft, and a reply makes room for it; all go on one stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_window_holds_the_next_message_until_a_reply() {
        let follower = FakeFollower::new(Arc::new(success));
        let mut session = start(&follower, LONG, 2);
        for i in 1..=3 {
            session.requests.unbounded_send(request(i, 10)).unwrap();
        }
        settle().await;
        assert_eq!(follower.received(), [(Route::Stream, 1), (Route::Stream, 2)], "two of two in flight");
        follower.permits.add_permits(1);
        assert_eq!(matched(session.answer().await), 1);
        settle().await;
        assert_eq!(follower.received().len(), 3, "a reply makes room for the third");
        follower.permits.add_permits(2);
        assert_eq!(matched(session.answer().await), 2);
        assert_eq!(matched(session.answer().await), 3);
        assert_eq!(follower.streams_opened.load(Ordering::Relaxed), 1);
        // openraft ends the session: the session ends once everything is answered.
        drop(session.requests);
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends").unwrap();
    }

    /// [`STREAMED_APPEND_BYTES_MAX`] at its edge: a message one byte over it waits until every
    /// message before it is answered and goes as a call of its own, and the stream carries the
    /// next after its reply; a message at the limit goes on the stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_message_goes_alone_as_a_call() {
        let follower = FakeFollower::new(Arc::new(success));
        let mut session = start(&follower, LONG, 2);
        // The payload whose message is exactly at the limit (its length prefixes grow with it).
        let fill = (0..STREAMED_APPEND_BYTES_MAX)
            .rev()
            .find(|&n| encode(&request(2, n)).len() <= STREAMED_APPEND_BYTES_MAX)
            .unwrap();
        let at_limit = request(2, fill);
        assert_eq!(encode(&at_limit).len(), STREAMED_APPEND_BYTES_MAX, "the fixture is at the limit");
        assert_eq!(encode(&request(3, fill + 1)).len(), STREAMED_APPEND_BYTES_MAX + 1, "and one byte over it");
        session.requests.unbounded_send(request(1, 10)).unwrap();
        session.requests.unbounded_send(at_limit).unwrap();
        session.requests.unbounded_send(request(3, fill + 1)).unwrap();
        session.requests.unbounded_send(request(4, 10)).unwrap();
        settle().await;
        assert_eq!(follower.received(), [(Route::Stream, 1), (Route::Stream, 2)]);
        follower.permits.add_permits(1);
        assert_eq!(matched(session.answer().await), 1);
        settle().await;
        assert_eq!(follower.received().len(), 2, "the large message waits for the reply to the one before it");
        follower.permits.add_permits(1);
        assert_eq!(matched(session.answer().await), 2);
        settle().await;
        assert_eq!(follower.received()[2], (Route::Call, 3), "then goes as a call");
        assert_eq!(follower.received().len(), 3, "nothing goes behind it");
        follower.permits.add_permits(2);
        assert_eq!(matched(session.answer().await), 3);
        assert_eq!(matched(session.answer().await), 4);
        assert_eq!(follower.received()[3], (Route::Stream, 4), "the stream takes the next");
        assert_eq!(follower.streams_opened.load(Ordering::Relaxed), 1, "on the same stream");
    }

    /// A session with nothing unanswered waits as long as it takes; a message the follower does
    /// not answer within the RPC's time fails the session, which then ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unanswered_message_times_out_and_an_idle_session_does_not() {
        let ttl = Duration::from_millis(50);
        let follower = FakeFollower::new(Arc::new(success));
        let mut session = start(&follower, ttl, 2);
        tokio::time::sleep(ttl * 4).await;
        assert!(session.answers.try_recv().is_err(), "an idle session has no deadline");
        let sent_at = Instant::now();
        session.requests.unbounded_send(request(1, 10)).unwrap();
        let answer = session.answer().await;
        assert!(matches!(answer, Some(Err(RPCError::Timeout(_)))), "{answer:?}");
        assert!(sent_at.elapsed() >= ttl, "not before the RPC's time");
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends after its error").unwrap();
    }

    /// The session's own work does not count against the follower: while it builds and encodes
    /// the next message (here, an input that holds the thread three deadlines long), it reads
    /// no replies, so the deadline of the messages already out starts again once it is done. The
    /// follower answers a little after that work, well within the deadline counted from then
    /// but long after the one counted from the message's sending. On a busy debug build, every
    /// large message encoded behind a small one failed its session this way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_next_message_does_not_time_out_the_answered_one() {
        let ttl = Duration::from_millis(200);
        for _ in 0..3 {
            let follower = FakeFollower::new(Arc::new(success));
            let permits = follower.permits.clone();
            let mut sent = 0;
            let input = futures::stream::poll_fn(move |_| {
                sent += 1;
                if sent == 2 {
                    let permits = permits.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(ttl * 3 + ttl / 5);
                        permits.add_permits(2);
                    });
                    std::thread::sleep(ttl * 3);
                }
                std::task::Poll::Ready((sent <= 2).then(|| request(sent, 10)))
            });
            let replication = Replication::new(input, follower.clone(), 2, ttl, 2, Arc::default());
            let items = futures::stream::unfold(replication, Replication::next).collect::<Vec<_>>();
            let items = tokio::time::timeout(LONG, items).await.expect("the session ends");
            let matched: Vec<_> = items.into_iter().map(|item| matched(Some(item))).collect();
            assert_eq!(matched, [1, 2]);
        }
    }

    /// A reply that is in wins over a deadline that has passed meanwhile: here the session's
    /// task is held (an input that blocks the thread and then has nothing) past the message's
    /// deadline while the follower answers, and then finds both ready. Unbiased, the select took
    /// either, so about half of these sessions failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_in_by_the_deadline_wins_over_it() {
        let ttl = Duration::from_millis(50);
        for _ in 0..8 {
            let follower = FakeFollower::new(Arc::new(success));
            let permits = follower.permits.clone();
            let mut polled = 0;
            let input = futures::stream::poll_fn(move |_| {
                polled += 1;
                match polled {
                    1 => std::task::Poll::Ready(Some(request(1, 10))),
                    2 => {
                        permits.add_permits(1);
                        std::thread::sleep(ttl * 3);
                        std::task::Poll::Pending
                    }
                    _ => std::task::Poll::Pending,
                }
            });
            let replication = Replication::new(input, follower.clone(), 2, ttl, 2, Arc::default());
            let first = tokio::time::timeout(LONG, Replication::next(replication)).await.expect("an answer");
            assert_eq!(matched(first.map(|(item, _)| item)), 1);
        }
    }

    /// A stream whose call is over with a message unanswered fails the session when the next
    /// message finds it closed, instead of opening another whose replies would be matched to
    /// the messages of the first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_ended_with_a_message_unanswered_fails_the_session() {
        let mut follower = FakeFollower::new(Arc::new(success));
        follower.hang_up = true;
        let mut session = start(&follower, LONG, 2);
        session.requests.unbounded_send(request(1, 10)).unwrap();
        settle().await;
        session.requests.unbounded_send(request(2, 10)).unwrap();
        let answer = session.answer().await;
        assert!(matches!(answer, Some(Err(RPCError::Network(_)))), "{answer:?}");
        assert_eq!(follower.streams_opened.load(Ordering::Relaxed), 1, "no second stream");
    }

    /// A held message's call gets the RPC's time for its size too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unanswered_call_times_out() {
        let ttl = Duration::from_millis(50);
        let follower = FakeFollower::new(Arc::new(success));
        let mut session = start(&follower, ttl, 2);
        let large = request(1, STREAMED_APPEND_BYTES_MAX);
        let time = rpc_time(ttl, encode(&large).len());
        let sent_at = Instant::now();
        session.requests.unbounded_send(large).unwrap();
        let answer = session.answer().await;
        assert!(sent_at.elapsed() >= time, "not before the RPC's time for its size");
        match answer {
            Some(Err(RPCError::Timeout(timeout))) => assert_eq!(timeout.timeout, time),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(follower.received(), [(Route::Call, 1)]);
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends after its error").unwrap();
    }

    /// A follower that answers more than it was sent is not believed: a reply with no message
    /// awaiting it, even one that decodes, fails the session instead of reaching openraft.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_to_no_message_fails_the_session() {
        let twice: Answer = Arc::new(|rpc, route| [success(rpc, route), success(rpc, route)].concat());
        let follower = FakeFollower::new(twice);
        let mut session = start(&follower, LONG, 2);
        session.requests.unbounded_send(request(1, 10)).unwrap();
        follower.permits.add_permits(1);
        assert_eq!(matched(session.answer().await), 1);
        let extra = session.answer().await;
        assert!(matches!(extra, Some(Err(RPCError::Network(_)))), "{extra:?}");
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends after its error").unwrap();
    }

    /// A reply that is not a reply fails the session instead of being skipped: replies are
    /// matched to messages in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_that_does_not_decode_fails_the_session() {
        let follower = FakeFollower::new(Arc::new(|_, _| vec![pb::Blob { data: vec![0xff; 9] }]));
        let mut session = start(&follower, LONG, 2);
        session.requests.unbounded_send(request(1, 10)).unwrap();
        follower.permits.add_permits(1);
        let answer = session.answer().await;
        assert!(matches!(answer, Some(Err(RPCError::Network(_)))), "{answer:?}");
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends after its error").unwrap();
    }

    /// A conflict ends the session after it is reported; a conflict to a call whose message
    /// starts the log (there is no entry before it to conflict) is an error, not a panic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conflicts_end_the_session() {
        let conflict: Answer = Arc::new(|rpc, route| match route {
            Route::Stream => {
                let prev = rpc.prev_log_id.unwrap();
                vec![pb::Blob {
                    data: encode(&StreamAppendResult::<TypeConfig>::Err(StreamAppendError::Conflict(prev))),
                }]
            }
            Route::Call => vec![pb::Blob { data: encode(&AppendEntriesResponse::<TypeConfig>::Conflict) }],
        });
        let follower = FakeFollower::new(conflict);
        let mut session = start(&follower, LONG, 2);
        session.requests.unbounded_send(request(5, 10)).unwrap();
        follower.permits.add_permits(1);
        let answer = session.answer().await;
        assert!(matches!(answer, Some(Ok(Err(StreamAppendError::Conflict(_))))), "{answer:?}");
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends after a conflict").unwrap();

        let mut session = start(&follower, LONG, 2);
        session.requests.unbounded_send(request(1, STREAMED_APPEND_BYTES_MAX)).unwrap();
        follower.permits.add_permits(1);
        let answer = session.answer().await;
        assert!(matches!(answer, Some(Err(RPCError::Network(_)))), "{answer:?}");
        tokio::time::timeout(LONG, session.ended).await.expect("the session ends after its error").unwrap();
    }
}
