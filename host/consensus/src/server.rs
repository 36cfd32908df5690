//! The peer service: Raft messages from other nodes, forwarded writes, and join requests. It is
//! served only on the peer port, whose TLS admits only node certificates.

use std::pin::Pin;
use std::sync::Arc;

use cloister_proto::peer::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::types::{NodeAddr, NodeId, SnapshotMeta, Vote, decode, encode};
use super::{Consensus, state_machine::SnapshotFile};

/// What a peer request asks for, for [`Forwarder::authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRpc {
    /// Raft's own messages: only Trusted nodes (or, on a node that is itself joining, the leader it
    /// attested).
    Raft,
    /// Forwarded writes: only Trusted nodes.
    Forward,
    /// Joining Raft: only Trusted nodes.
    Join,
    /// Challenge and attestation: any node certificate that is not Retired.
    Attest,
}

/// The node's service layer, as the peer port sees it: forwarded writes, attested joins, and who
/// may ask what.
#[tonic::async_trait]
pub trait Forwarder: Send + Sync + 'static {
    async fn forward(&self, request: pb::ForwardRequest) -> Result<pb::ForwardReply, Status>;
    /// A fresh nonce for a joining node, and the leader's evidence bound to the node's nonce
    /// (leader only).
    async fn challenge(&self, request: pb::ChallengeRequest) -> Result<pb::ChallengeReply, Status>;
    /// Verifies and records a joining node's evidence (leader only).
    async fn attest(&self, peer_cert: Vec<u8>, request: pb::AttestRequest) -> Result<pb::AttestReply, Status>;
    /// Refuses `rpc` from the node with `peer_cert` unless its standing in `gov.nodes` allows it.
    fn authorize(&self, peer_cert: &[u8], rpc: PeerRpc) -> Result<(), Status>;
}

pub struct PeerService {
    pub consensus: Consensus,
    pub forwarder: Arc<dyn Forwarder>,
}

impl PeerService {
    /// The caller's certificate (the peer port's TLS requires one), if `rpc` is allowed for it.
    fn authorize<T>(&self, req: &Request<T>, rpc: PeerRpc) -> Result<Vec<u8>, Status> {
        let cert = req
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .ok_or_else(|| Status::unauthenticated("the peer port needs a node certificate"))?;
        self.forwarder.authorize(&cert, rpc)?;
        Ok(cert)
    }
}

fn bad_request(e: std::io::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

fn consensus_stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("this node's consensus has stopped: {e}"))
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn vote(&self, req: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.authorize(&req, PeerRpc::Raft)?;
        let rpc = decode(&req.into_inner().data, "a vote request").map_err(bad_request)?;
        let reply = self.consensus.raft.vote(rpc).await.map_err(consensus_stopped)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    async fn append_entries(&self, req: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        self.authorize(&req, PeerRpc::Raft)?;
        let rpc = decode(&req.into_inner().data, "an append-entries request").map_err(bad_request)?;
        let reply = self.consensus.raft.append_entries(rpc).await.map_err(consensus_stopped)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<pb::Blob, Status>> + Send>>;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::Blob>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.authorize(&req, PeerRpc::Raft)?;
        // Requests that fail to decode end the stream: the leader then falls back and retries.
        let input = req
            .into_inner()
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| async move { r.ok().and_then(|b| decode(&b.data, "an append-entries request").ok()) });
        let output = self.consensus.raft.stream_append(input).map(|r| match r {
            Ok(result) => Ok(pb::Blob { data: encode(&result) }),
            Err(e) => Err(consensus_stopped(e)),
        });
        Ok(Response::new(Box::pin(output)))
    }

    async fn install_snapshot(&self, req: Request<Streaming<pb::SnapshotChunk>>) -> Result<Response<pb::Blob>, Status> {
        self.authorize(&req, PeerRpc::Raft)?;
        let mut chunks = req.into_inner();
        let head = match chunks.message().await?.and_then(|c| c.chunk) {
            Some(pb::snapshot_chunk::Chunk::Head(h)) => h,
            _ => {
                return Err(Status::invalid_argument("a snapshot must start with its head"));
            }
        };
        let (vote, meta): (Vote, SnapshotMeta) = decode(&head, "a snapshot head").map_err(bad_request)?;
        let path = self.consensus.sm.incoming_path();
        let mut seal = None;
        let received = async {
            let mut file = tokio::fs::File::create(&path).await?;
            while let Some(chunk) = chunks.message().await.map_err(std::io::Error::other)? {
                match chunk.chunk {
                    Some(pb::snapshot_chunk::Chunk::Data(bytes)) => file.write_all(&bytes).await?,
                    Some(pb::snapshot_chunk::Chunk::Seal(bytes)) => seal = Some(decode(&bytes, "a snapshot seal")?),
                    _ => {}
                }
            }
            file.sync_all().await
        }
        .await;
        if let Err(e) = received {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(Status::aborted(format!("receiving the snapshot failed: {e}")));
        }
        let file = SnapshotFile { path, seal };
        // A snapshot that does not verify is refused to its sender, and this node runs on.
        if let Err(e) = self.consensus.sm.check_incoming(&meta, &file) {
            let _ = tokio::fs::remove_file(&file.path).await;
            tracing::warn!(error = %e, "refused a snapshot");
            return Err(Status::failed_precondition(format!("the snapshot was refused: {e}")));
        }
        let snapshot = openraft::storage::Snapshot { meta, snapshot: file };
        let reply = self.consensus.raft.install_full_snapshot(vote, snapshot).await.map_err(consensus_stopped)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    async fn forward(&self, req: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardReply>, Status> {
        self.authorize(&req, PeerRpc::Forward)?;
        Ok(Response::new(self.forwarder.forward(req.into_inner()).await?))
    }

    async fn challenge(&self, req: Request<pb::ChallengeRequest>) -> Result<Response<pb::ChallengeReply>, Status> {
        self.authorize(&req, PeerRpc::Attest)?;
        Ok(Response::new(self.forwarder.challenge(req.into_inner()).await?))
    }

    async fn attest(&self, req: Request<pb::AttestRequest>) -> Result<Response<pb::AttestReply>, Status> {
        let cert = self.authorize(&req, PeerRpc::Attest)?;
        Ok(Response::new(self.forwarder.attest(cert, req.into_inner()).await?))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let cert = self.authorize(&req, PeerRpc::Join)?;
        let (id, addr): (NodeId, NodeAddr) = decode(&req.into_inner().node, "a join request").map_err(bad_request)?;
        if cloister_crypto::node_id_of(&cert) != id {
            return Err(Status::permission_denied(format!("node {id} is not the node of this TLS certificate")));
        }
        let voters = self.consensus.add_voter(id, addr).await?;
        Ok(Response::new(pb::JoinReply { voters }))
    }
}
