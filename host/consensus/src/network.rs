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
        PeerConnection { target, peer_url: node.peer_url.clone(), peers: self.peers.clone() }
    }
}

/// One peer, as openraft sees it.
pub(crate) struct PeerConnection {
    target: NodeId,
    peer_url: String,
    peers: Peers,
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
        let ttl = option.soft_ttl();
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
        let file = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|e| StreamingError::from(RPCError::Network(NetworkError::new(&e))))?;
        let head = pb::SnapshotChunk { chunk: Some(pb::snapshot_chunk::Chunk::Head(encode(&(vote, snapshot.meta)))) };
        let body = tokio_util::io::ReaderStream::with_capacity(file, SNAPSHOT_CHUNK_BYTES).map(|chunk| {
            pb::SnapshotChunk {
                // A read error ends the stream short; the receiver then refuses the incomplete snapshot.
                chunk: chunk.ok().map(|bytes| pb::snapshot_chunk::Chunk::Data(bytes.to_vec())),
            }
        });
        let chunks =
            futures::stream::once(async { head }).chain(body.take_while(|c| std::future::ready(c.chunk.is_some())));
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
