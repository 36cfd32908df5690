//! The peer service: Raft messages from other nodes, forwarded writes, and join requests. It is
//! served only on the peer port, whose TLS admits only node certificates.

use std::pin::Pin;
use std::sync::Arc;

use cloister_proto::peer::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use openraft::raft::AppendEntriesRequest;

use super::types::{NodeAddr, NodeId, SnapshotMeta, TypeConfig, Vote, decode, encode};
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
    /// A fresh nonce for the joining node with `peer_cert`, and the leader's evidence bound to
    /// the node's nonce (leader only).
    async fn challenge(&self, peer_cert: Vec<u8>, request: pb::ChallengeRequest) -> Result<pb::ChallengeReply, Status>;
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

/// The requests of one replication stream, each authorized and decoded; the first that is not
/// ends it, and leaves its error in `refusal`.
struct Incoming<M> {
    messages: M,
    cert: Vec<u8>,
    forwarder: Arc<dyn Forwarder>,
    refusal: Arc<std::sync::Mutex<Option<Status>>>,
}

impl<M: Stream<Item = Result<pb::Blob, Status>> + Unpin> Incoming<M> {
    async fn next(mut self) -> Option<(AppendEntriesRequest<TypeConfig>, Incoming<M>)> {
        let refusal = match self.messages.next().await {
            None => return None,
            Some(Ok(blob)) => match self.forwarder.authorize(&self.cert, PeerRpc::Raft) {
                Ok(()) => match decode(&blob.data, "an append-entries request") {
                    Ok(rpc) => match well_formed(&rpc) {
                        Ok(()) => return Some((rpc, self)),
                        Err(status) => status,
                    },
                    Err(e) => bad_request(e),
                },
                Err(status) => status,
            },
            Some(Err(status)) => status,
        };
        *self.refusal.lock().expect("refusal lock") = Some(refusal);
        None
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
        well_formed(&rpc)?;
        let reply = self.consensus.raft.append_entries(rpc).await.map_err(consensus_stopped)?;
        Ok(Response::new(pb::Blob { data: encode(&reply) }))
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<pb::Blob, Status>> + Send>>;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::Blob>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let cert = self.authorize(&req, PeerRpc::Raft)?;
        // Each message is authorized as a unary call would be (a node retired while its stream is
        // open is cut off at its next message), and one that is refused or does not decode ends
        // the stream with that error after the replies to those before it: the replies are
        // matched to the requests in order, so none may be skipped.
        let refusal = Arc::new(std::sync::Mutex::new(None::<Status>));
        let incoming =
            Incoming { messages: req.into_inner(), cert, forwarder: self.forwarder.clone(), refusal: refusal.clone() };
        let input = futures::stream::unfold(incoming, Incoming::next).take_until(self.consensus.stopping());
        let replies = self.consensus.raft.stream_append(input).map(|r| match r {
            Ok(result) => Ok(pb::Blob { data: encode(&result) }),
            Err(e) => Err(consensus_stopped(e)),
        });
        let refused = futures::stream::once(async move { refusal.lock().expect("refusal lock").take() })
            .filter_map(|status| std::future::ready(status.map(Err)));
        Ok(Response::new(Box::pin(replies.chain(refused).take_until(self.consensus.stopping()))))
    }

    async fn install_snapshot(&self, req: Request<Streaming<pb::SnapshotChunk>>) -> Result<Response<pb::Blob>, Status> {
        let cert = self.authorize(&req, PeerRpc::Raft)?;
        let mut chunks = req.into_inner();
        let patience = self.consensus.install_snapshot_timeout();
        let head = tokio::select! {
            head = tokio::time::timeout(patience, chunks.message()) => head
                .map_err(|_| Status::deadline_exceeded("no snapshot head within raft.install_snapshot_timeout_ms"))??,
            _ = self.consensus.stopping() => return Err(Status::unavailable("this node is stopping")),
        };
        let head = match head.and_then(|c| c.chunk) {
            Some(pb::snapshot_chunk::Chunk::Head(h)) => h,
            _ => {
                return Err(Status::invalid_argument("a snapshot must start with its head"));
            }
        };
        let (vote, meta): (Vote, SnapshotMeta) = decode(&head, "a snapshot head").map_err(bad_request)?;
        snapshot_within_vote(&vote, &meta)?;
        let path = self.consensus.sm.incoming_path();
        let received = tokio::select! {
            received = receive_snapshot(&mut chunks, &path, patience) => received,
            _ = self.consensus.stopping() => Err(std::io::Error::other("this node is stopping")),
        };
        let seal = match received {
            Ok(seal) => seal,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(Status::aborted(format!("receiving the snapshot failed: {e}")));
            }
        };
        let file = SnapshotFile { path, seal };
        // A snapshot that does not verify is refused to its sender, and this node runs on. The
        // check reads the whole file: on the blocking pool, not on a runtime thread.
        let (sm, checked_meta, checked_file) = (self.consensus.sm.clone(), meta.clone(), file.clone());
        let checked = tokio::task::spawn_blocking(move || sm.check_incoming(&checked_meta, &checked_file))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("the check stopped: {e}"))));
        // The sender may have been retired while it sent: it is held to its standing again.
        let checked = checked.and_then(|()| {
            self.forwarder.authorize(&cert, PeerRpc::Raft).map_err(|s| std::io::Error::other(s.message().to_owned()))
        });
        if let Err(e) = checked {
            let _ = tokio::fs::remove_file(&file.path).await;
            tracing::warn!(error = %e, "refused a snapshot");
            return Err(Status::failed_precondition(format!("the snapshot was refused: {e}")));
        }
        let received = file.path.clone();
        let snapshot = openraft::storage::Snapshot { meta, snapshot: file };
        // openraft answers once the snapshot is installed (the file then has its final name)
        // or passed over (not newer than what this node has committed, or sent with a vote it
        // refuses): a file passed over is still here, as large as the state, and goes.
        let reply = self.consensus.raft.install_full_snapshot(vote, snapshot).await;
        let _ = tokio::fs::remove_file(&received).await;
        Ok(Response::new(pb::Blob { data: encode(&reply.map_err(consensus_stopped)?) }))
    }

    type ForwardStream = Pin<Box<dyn Stream<Item = Result<pb::ForwardAnswer, Status>> + Send>>;

    async fn forward(&self, req: Request<Streaming<pb::ForwardCall>>) -> Result<Response<Self::ForwardStream>, Status> {
        let cert = self.authorize(&req, PeerRpc::Forward)?;
        let answers = super::forward::serve(req.into_inner(), cert, self.forwarder.clone());
        Ok(Response::new(Box::pin(answers.take_until(self.consensus.stopping()))))
    }

    async fn challenge(&self, req: Request<pb::ChallengeRequest>) -> Result<Response<pb::ChallengeReply>, Status> {
        let cert = self.authorize(&req, PeerRpc::Attest)?;
        Ok(Response::new(self.forwarder.challenge(cert, req.into_inner()).await?))
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

/// Refuses a snapshot whose last entry is later than its sender's vote. openraft asserts that
/// no snapshot is, and a peer that sent one (a later snapshot with an earlier vote, which this
/// node accepts when it is further behind still) stopped this node's Raft with a panic.
/// Writes a snapshot's data chunks to `path` and returns its seal. A sender that stops sending is
/// given up on once `patience` (`raft.install_snapshot_timeout_ms`) passes without a chunk.
async fn receive_snapshot(
    chunks: &mut (impl Stream<Item = Result<pb::SnapshotChunk, Status>> + Unpin),
    path: &std::path::Path,
    patience: std::time::Duration,
) -> std::io::Result<Option<cloister_ledger::verify::SnapshotSeal>> {
    let mut seal = None;
    let mut file = tokio::fs::File::create(path).await?;
    loop {
        let next = tokio::time::timeout(patience, chunks.next()).await.map_err(|_| {
            std::io::Error::other(format!(
                "no chunk for {} ms (raft.install_snapshot_timeout_ms)",
                patience.as_millis()
            ))
        })?;
        let Some(chunk) = next.transpose().map_err(std::io::Error::other)? else { break };
        match chunk.chunk {
            Some(pb::snapshot_chunk::Chunk::Data(bytes)) => file.write_all(&bytes).await?,
            Some(pb::snapshot_chunk::Chunk::Seal(bytes)) => seal = Some(decode(&bytes, "a snapshot seal")?),
            _ => {}
        }
    }
    file.sync_all().await?;
    Ok(seal)
}

/// Refuses an append-entries request whose entries do not follow its previous entry one index
/// at a time, or come from a later leader than its vote. openraft checks this only with debug
/// assertions; in a release build the log took a gap (entry 20 after 14), read back entry 20
/// for index 15, and refused to open at the next start.
fn well_formed(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), Status> {
    let first = rpc.prev_log_id.as_ref().map_or(0, |prev| prev.index + 1);
    for (i, entry) in rpc.entries.iter().enumerate() {
        let log_id = &entry.log_id;
        if log_id.index != first + i as u64 {
            return Err(Status::invalid_argument(format!(
                "entry {i} of the request is index {}, not {}: entries follow the previous one ({:?}) one \
                 index at a time",
                log_id.index,
                first + i as u64,
                rpc.prev_log_id
            )));
        }
        if log_id.leader_id > rpc.vote.leader_id {
            return Err(Status::invalid_argument(format!(
                "entry {} is from a later leader than the vote {} it was sent with",
                log_id, rpc.vote
            )));
        }
    }
    Ok(())
}

fn snapshot_within_vote(vote: &Vote, meta: &SnapshotMeta) -> Result<(), Status> {
    match &meta.last_log_id {
        Some(last) if last.leader_id > vote.leader_id => Err(Status::invalid_argument(format!(
            "the snapshot's last entry {last} is later than the vote {vote} it was sent with"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Admits the first `allowed` Raft messages, then refuses.
    struct Admits {
        allowed: usize,
        seen: AtomicUsize,
    }

    #[tonic::async_trait]
    impl Forwarder for Admits {
        async fn forward(&self, _: pb::ForwardRequest) -> Result<pb::ForwardReply, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn challenge(&self, _: Vec<u8>, _: pb::ChallengeRequest) -> Result<pb::ChallengeReply, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn attest(&self, _: Vec<u8>, _: pb::AttestRequest) -> Result<pb::AttestReply, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        fn authorize(&self, _: &[u8], rpc: PeerRpc) -> Result<(), Status> {
            assert_eq!(rpc, PeerRpc::Raft);
            if self.seen.fetch_add(1, Ordering::SeqCst) < self.allowed {
                Ok(())
            } else {
                Err(Status::permission_denied("this node is Retired"))
            }
        }
    }

    fn request(leader_commit: u64) -> Result<pb::Blob, Status> {
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: Some(openraft::testing::log_id::<TypeConfig>(1, 1, leader_commit)),
            entries: vec![],
        };
        Ok(pb::Blob { data: encode(&rpc) })
    }

    /// What a stream of `messages` hands to Raft, and why it stopped early, if it did.
    async fn read(messages: Vec<Result<pb::Blob, Status>>, allowed: usize) -> (Vec<u64>, Option<Status>) {
        let refusal = Arc::new(std::sync::Mutex::new(None));
        let incoming = Incoming {
            messages: futures::stream::iter(messages),
            cert: b"node".to_vec(),
            forwarder: Arc::new(Admits { allowed, seen: AtomicUsize::new(0) }),
            refusal: refusal.clone(),
        };
        let handed: Vec<u64> = futures::stream::unfold(incoming, Incoming::next)
            .map(|rpc| rpc.leader_commit.map_or(0, |l| l.index))
            .collect()
            .await;
        let refusal = refusal.lock().unwrap().take();
        (handed, refusal)
    }

    #[tokio::test]
    async fn every_message_of_a_stream_is_authorized_and_a_refusal_ends_it() {
        let (handed, refusal) = read(vec![request(1), request(2), request(3)], 3).await;
        assert_eq!(handed, [1, 2, 3]);
        assert!(refusal.is_none());
        // The node is retired after its first message: the stream stops there, whatever follows.
        let (handed, refusal) = read(vec![request(1), request(2), request(3)], 1).await;
        assert_eq!(handed, [1]);
        assert_eq!(refusal.expect("a refusal").code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn a_message_that_does_not_decode_ends_the_stream_instead_of_being_skipped() {
        let garbage = Ok(pb::Blob { data: vec![0xff; 5] });
        let (handed, refusal) = read(vec![request(1), garbage, request(3)], 10).await;
        assert_eq!(handed, [1], "replies are matched to requests in order: none may be skipped");
        assert_eq!(refusal.expect("a refusal").code(), tonic::Code::InvalidArgument);
        let (handed, refusal) = read(vec![request(1), Err(Status::cancelled("reset"))], 10).await;
        assert_eq!(handed, [1]);
        assert_eq!(refusal.expect("a refusal").code(), tonic::Code::Cancelled);
    }

    /// Entries that skip an index, or come from a later leader than their vote, are refused
    /// before Raft sees them, on the unary call and on a stream alike.
    #[tokio::test]
    async fn entries_that_do_not_follow_or_outrun_their_vote_are_refused() {
        let append = |prev: Option<u64>, entries: Vec<(u64, u64)>| AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            prev_log_id: prev.map(|i| openraft::testing::log_id::<TypeConfig>(1, 1, i)),
            leader_commit: None,
            entries: entries
                .into_iter()
                .map(|(term, i)| openraft::testing::blank_ent::<TypeConfig>(term, 1, i))
                .collect(),
        };
        assert!(well_formed(&append(Some(14), vec![(1, 15), (2, 16)])).is_ok());
        assert!(well_formed(&append(None, vec![(1, 0), (1, 1)])).is_ok());
        assert!(well_formed(&append(Some(14), vec![])).is_ok(), "a heartbeat");
        for (bad, says) in [
            (append(Some(14), vec![(1, 20)]), "is index 20, not 15"),
            (append(Some(14), vec![(1, 15), (1, 17)]), "is index 17, not 16"),
            (append(None, vec![(1, 3)]), "is index 3, not 0"),
            (append(Some(14), vec![(3, 15)]), "later leader"),
        ] {
            let refused = well_formed(&bad).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
            assert!(refused.message().contains(says), "{}", refused.message());
        }
        // On a stream, the refusal ends it after the messages before.
        let gap = Ok(pb::Blob { data: encode(&append(Some(14), vec![(1, 20)])) });
        let (handed, refusal) = read(vec![request(1), gap, request(3)], 10).await;
        assert_eq!(handed, [1]);
        assert_eq!(refusal.expect("a refusal").code(), tonic::Code::InvalidArgument);
    }

    /// A snapshot's sender that stops sending is given up on once `raft.install_snapshot_timeout_ms`
    /// passes without a chunk (before, the receive waited for as long as the stream stayed open).
    #[tokio::test]
    async fn a_snapshot_whose_sender_stops_sending_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incoming");
        let data =
            |bytes: &[u8]| Ok(pb::SnapshotChunk { chunk: Some(pb::snapshot_chunk::Chunk::Data(bytes.to_vec())) });
        let patience = std::time::Duration::from_millis(200);
        let mut whole = futures::stream::iter([data(b"ab"), data(b"cd")]);
        assert!(receive_snapshot(&mut whole, &path, patience).await.unwrap().is_none(), "no seal was sent");
        assert_eq!(std::fs::read(&path).unwrap(), b"abcd");
        let mut stalled = futures::stream::iter([data(b"ab")]).chain(futures::stream::pending());
        let given_up = tokio::time::timeout(patience * 10, receive_snapshot(&mut stalled, &path, patience));
        let e = given_up.await.expect("the stalled sender is given up on").unwrap_err();
        assert!(e.to_string().contains("install_snapshot_timeout_ms"), "{e}");
    }

    #[test]
    fn a_snapshot_later_than_its_senders_vote_is_refused_before_raft_sees_it() {
        let meta = |term| SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(term, 1, 40)),
            ..Default::default()
        };
        let vote = Vote::new_committed(4, 1);
        assert!(snapshot_within_vote(&vote, &meta(4)).is_ok());
        assert!(snapshot_within_vote(&vote, &meta(3)).is_ok());
        assert!(snapshot_within_vote(&vote, &SnapshotMeta::default()).is_ok(), "an empty snapshot");
        let refused = snapshot_within_vote(&vote, &meta(5)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }
}
