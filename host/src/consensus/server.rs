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

/// Where forwarded writes go: the node's service layer.
#[tonic::async_trait]
pub trait Forwarder: Send + Sync + 'static {
    async fn forward(&self, request: pb::ForwardRequest) -> Result<pb::ForwardReply, Status>;
}

pub struct PeerService {
    pub consensus: Consensus,
    pub forwarder: Arc<dyn Forwarder>,
    /// Handed to joining nodes: the peer port's TLS admits only node certificates of this
    /// service.
    pub ledger_secret: [u8; 32],
}

fn bad_request(e: std::io::Error) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("this node's consensus has stopped: {e}"))
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn vote(&self, req: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        let rpc = decode(&req.into_inner().data, "a vote request").map_err(bad_request)?;
        let reply = self.consensus.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    async fn append_entries(&self, req: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        let rpc = decode(&req.into_inner().data, "an append-entries request").map_err(bad_request)?;
        let reply = self.consensus.raft.append_entries(rpc).await.map_err(fatal)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<pb::Blob, Status>> + Send>>;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::Blob>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        // Requests that fail to decode end the stream: the leader then falls back and retries.
        let input = req
            .into_inner()
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| async move { r.ok().and_then(|b| decode(&b.data, "an append-entries request").ok()) });
        let output = self.consensus.raft.stream_append(input).map(|r| match r {
            Ok(result) => Ok(pb::Blob { data: encode(&result) }),
            Err(e) => Err(fatal(e)),
        });
        Ok(Response::new(Box::pin(output)))
    }

    async fn install_snapshot(&self, req: Request<Streaming<pb::SnapshotChunk>>) -> Result<Response<pb::Blob>, Status> {
        let mut chunks = req.into_inner();
        let head = match chunks.message().await?.and_then(|c| c.chunk) {
            Some(pb::snapshot_chunk::Chunk::Head(h)) => h,
            _ => {
                return Err(Status::invalid_argument("a snapshot must start with its head"));
            }
        };
        let (vote, meta): (Vote, SnapshotMeta) = decode(&head, "a snapshot head").map_err(bad_request)?;
        let path = self.consensus.sm.incoming_path();
        let received = async {
            let mut file = tokio::fs::File::create(&path).await?;
            while let Some(chunk) = chunks.message().await.map_err(std::io::Error::other)? {
                if let Some(pb::snapshot_chunk::Chunk::Data(bytes)) = chunk.chunk {
                    file.write_all(&bytes).await?;
                }
            }
            file.sync_all().await
        }
        .await;
        if let Err(e) = received {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(Status::aborted(format!("receiving the snapshot failed: {e}")));
        }
        let snapshot = openraft::storage::Snapshot { meta, snapshot: SnapshotFile { path } };
        let reply = self.consensus.raft.install_full_snapshot(vote, snapshot).await.map_err(fatal)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    async fn forward(&self, req: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardReply>, Status> {
        Ok(Response::new(self.forwarder.forward(req.into_inner()).await?))
    }

    async fn ledger_secret(&self, _: Request<pb::Blob>) -> Result<Response<pb::Blob>, Status> {
        Ok(Response::new(pb::Blob { data: self.ledger_secret.to_vec() }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let (id, addr): (NodeId, NodeAddr) = decode(&req.into_inner().node, "a join request").map_err(bad_request)?;
        let voters = self.consensus.admit(id, addr).await?;
        Ok(Response::new(pb::JoinReply { voters }))
    }
}
