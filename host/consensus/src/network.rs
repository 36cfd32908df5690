//! Node-to-node transport: one cached gRPC channel per peer, over mutual TLS with node
//! certificates, carrying postcard-encoded openraft messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloister_proto::peer::v1 as pb;
use futures::StreamExt;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
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
    oversize_reported: std::sync::atomic::AtomicBool,
}

/// The time a peer message of `bytes` may take: openraft's `soft_ttl`, plus the transfer and
/// persistence of its bytes at [`REPLICATION_BYTES_PER_S_MIN`].
fn rpc_time(soft_ttl: Duration, bytes: usize) -> Duration {
    soft_ttl + Duration::from_secs_f64(bytes as f64 / REPLICATION_BYTES_PER_S_MIN as f64)
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
        action: openraft::network::RPCTypes,
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
        let blob = pb::Blob { data: encode(request) };
        if blob.data.len() > PEER_MESSAGE_BYTES_MAX {
            // Sending it again would fail the same way: the batch bounds above make this a bug,
            // so it is said once, loudly, instead of being retried in silence.
            if !self.oversize_reported.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(
                    peer = self.target,
                    bytes = blob.data.len(),
                    max = PEER_MESSAGE_BYTES_MAX,
                    ?action,
                    "a peer message exceeds the peer message cap and cannot be sent; replication to this peer is stuck"
                );
            }
            let e = std::io::Error::other(format!(
                "peer {}: the message of {} bytes exceeds PEER_MESSAGE_BYTES_MAX ({PEER_MESSAGE_BYTES_MAX})",
                self.target,
                blob.data.len()
            ));
            return Err(RPCError::Network(NetworkError::new(&e)));
        }
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
        self.unary(&rpc, &option, openraft::network::RPCTypes::AppendEntries, async |mut c, b| {
            c.append_entries(b).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(&rpc, &option, openraft::network::RPCTypes::Vote, async |mut c, b| c.vote(b).await).await
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
}
