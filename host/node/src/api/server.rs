//! Listeners: a TLS accept loop shared by REST and gRPC, with a connection limit, a handshake
//! timeout, an idle timeout and graceful shutdown.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// The client certificate of a connection, handed to every request on it.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote: Option<std::net::SocketAddr>,
    /// The client certificate (DER), if the client presented one.
    pub client_cert: Option<Vec<u8>>,
}

/// A TLS connection that holds one of the listener's connection slots until it closes.
pub struct Conn {
    inner: TlsStream<Metered>,
    /// Closes a connection that has made no progress for this long: whatever it waits on, a read
    /// or a write, fails, and the server drops it (`idle_connection_timeout_ms`; none on the peer
    /// listener).
    idle: Option<IdleTimer>,
    _slot: OwnedSemaphorePermit,
    _address_slot: CountSlot<std::net::IpAddr>,
    /// On the peer listener, the connection's place in its node certificate's count.
    _node_slot: Option<CountSlot<Vec<u8>>>,
    /// Resolves when the node closes every connection it still has (see [`accept`]): whatever
    /// the connection waits on fails then, and its server drops it. A token of the connection's
    /// own (a child of the node's), asked only by a poll that would wait: its lock is this
    /// connection's alone, and a poll that moves bytes takes none.
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

/// While a client is not taking what the server writes (a write has had to wait for room), the
/// bytes it takes count as progress only once this many have gone since the last progress, or once
/// everything waiting has gone. A client that reads nothing still lets the kernel take a few
/// bytes now and then (a probe of its closed window, a frame's worth when memory is compacted):
/// counted byte by byte, that reset the idle timer just before it was due, and the connection
/// stayed open for good. A reading client's kernel takes far more at a time: it reopens its
/// window as its application reads, in steps of up to half its receive buffer. So a slow reader
/// keeps its connection as long as it drains half its receive buffer within each
/// `idle_connection_timeout_ms`.
pub const IDLE_WRITE_PROGRESS_BYTES: usize = 16 << 10;

/// When a connection last made progress, and a timer that is due `timeout` after that.
///
/// Progress is a byte read from the socket, or bytes the socket takes, while the client keeps up;
/// once it has fallen behind, only [`IDLE_WRITE_PROGRESS_BYTES`] taken, or everything waiting.
struct IdleTimer {
    timeout: Duration,
    last_progress: tokio::time::Instant,
    /// Reset lazily: when it fires, it is moved to `last_progress + timeout` if that is still
    /// ahead.
    due: Pin<Box<tokio::time::Sleep>>,
    /// A write or flush has waited for room since everything written last went out.
    behind: bool,
    /// Bytes written while behind, since the last progress.
    trickled: usize,
}

impl IdleTimer {
    fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            last_progress: tokio::time::Instant::now(),
            due: Box::pin(tokio::time::sleep(timeout)),
            behind: false,
            trickled: 0,
        }
    }

    fn progressed(&mut self) {
        self.last_progress = tokio::time::Instant::now();
        self.trickled = 0;
    }

    /// A client that has fallen behind makes progress by taking what it was sent: what it sends
    /// meanwhile (a frame that asks for no answer, once a minute) is none.
    fn read(&mut self) {
        if !self.behind {
            self.progressed();
        }
    }

    fn wrote(&mut self, bytes: usize) {
        self.trickled += bytes;
        if !self.behind || self.trickled >= IDLE_WRITE_PROGRESS_BYTES {
            self.progressed();
        }
    }

    /// Everything written has gone out.
    fn flushed(&mut self) {
        if std::mem::take(&mut self.behind) {
            self.progressed();
        }
    }

    /// Ready with an error once the connection has made no progress for `timeout`; otherwise
    /// pending, with the timer set to wake `cx` when it could be.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        use std::future::Future;
        while self.due.as_mut().poll(cx).is_ready() {
            let due = self.last_progress + self.timeout;
            if due <= tokio::time::Instant::now() {
                return Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the connection was idle for {} ms (idle_connection_timeout_ms)", self.timeout.as_millis()),
                ));
            }
            self.due.as_mut().reset(due);
        }
        Poll::Pending
    }
}

impl Conn {
    pub fn peer(&self) -> PeerInfo {
        let (metered, tls) = self.inner.get_ref();
        let tcp = &metered.tcp;
        PeerInfo {
            remote: tcp.peer_addr().ok(),
            client_cert: tls.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
        }
    }

    /// Hands what the socket moved since the last call to the idle timer.
    fn account(&mut self) {
        let (read, written, blocked) = self.inner.get_mut().0.take();
        if let Some(idle) = self.idle.as_mut() {
            if read > 0 {
                idle.read();
            }
            if written > 0 {
                idle.wrote(written);
            }
            // After the bytes above: they went while the client kept up.
            idle.behind |= blocked;
        }
    }

    /// Accounts for a poll of a read (`writing` false) or a write, and fails it instead of
    /// waiting once the connection has made no progress for the idle timeout.
    ///
    /// Writes that wait are checked as well as reads: a client that never reads leaves the
    /// server's writes waiting for room, and an HTTP/1.1 server reads nothing more until a write
    /// goes through, so a check on reads alone never ran. While the client is behind, only a
    /// write judges, since it tries the socket first: the servers poll their writes whenever
    /// they are woken with something to send, but may poll a read first, before the bytes a slow
    /// reader made room for have been written.
    fn unless_idle<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
        writing: bool,
    ) -> Poll<std::io::Result<T>> {
        self.account();
        if polled.is_pending() && self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the node has stopped",
            )));
        }
        match (polled, self.idle.as_mut()) {
            (Poll::Pending, Some(idle)) if writing || !idle.behind => idle.poll_expired(cx).map(Err),
            (polled, _) => polled,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.unless_idle(read, cx, false)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.unless_idle(written, cx, true)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        let flushed = self.unless_idle(flushed, cx, true);
        if let (Poll::Ready(Ok(())), Some(idle)) = (&flushed, self.idle.as_mut()) {
            idle.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let shut = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.unless_idle(shut, cx, true)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.unless_idle(written, cx, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The TCP stream under a connection's TLS, counting the bytes that leave and reach the socket.
/// TLS buffers records on their way out, so only here does the idle timer see what the client
/// took: a TLS write that empties its buffer into the socket and then waits for room takes none
/// of the caller's bytes, and reports waiting.
pub struct Metered {
    tcp: TcpStream,
    read: usize,
    written: usize,
    /// A write found the socket full since the counts were last taken.
    blocked: bool,
}

impl Metered {
    fn new(tcp: TcpStream) -> Metered {
        Metered { tcp, read: 0, written: 0, blocked: false }
    }

    /// The bytes read and written, and whether a write found the socket full, since last taken.
    fn take(&mut self) -> (usize, usize, bool) {
        (std::mem::take(&mut self.read), std::mem::take(&mut self.written), std::mem::take(&mut self.blocked))
    }

    fn wrote(&mut self, written: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        match &written {
            Poll::Ready(Ok(bytes)) => self.written += bytes,
            Poll::Pending => self.blocked = true,
            Poll::Ready(Err(_)) => {}
        }
        written
    }
}

impl AsyncRead for Metered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.read += buf.filled().len() - filled;
        read
    }
}

impl AsyncWrite for Metered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.wrote(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.wrote(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Metered {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

/// tonic reads the client certificate (`Request::peer_certs`) from this connect info.
impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = <TlsStream<Metered> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// How a listener admits connections.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// `connections_max`: connections open at once.
    pub connections_max: usize,
    /// `connections_per_address_max`: connections open at once from one source address.
    pub per_address_max: usize,
    /// `hello_timeout_ms`: time until the client's first TLS bytes arrive.
    pub hello_timeout: Duration,
    /// `handshake_timeout_ms`: time the whole TLS handshake may take.
    pub handshake_timeout: Duration,
    /// `idle_connection_timeout_ms`: time a connection may go without reading or writing a
    /// byte before it is closed; `None` keeps idle connections open.
    pub idle_timeout: Option<Duration>,
    /// `connections_per_node_max` (the peer listener): connections open at once with one client
    /// certificate; more are closed once the handshake shows it. `None`: no such count.
    pub per_node_max: Option<usize>,
}

impl AcceptLimits {
    pub fn of(limits: &crate::config::Limits) -> AcceptLimits {
        AcceptLimits {
            connections_max: limits.connections_max,
            per_address_max: limits.connections_per_address_max,
            hello_timeout: Duration::from_millis(limits.hello_timeout_ms),
            handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            idle_timeout: Some(Duration::from_millis(limits.idle_connection_timeout_ms)),
            per_node_max: None,
        }
    }
}

/// Open connections per source address (`connections_per_address_max`) or per node certificate
/// (`connections_per_node_max`).
struct Counts<K>(std::sync::Mutex<std::collections::HashMap<K, usize>>);

/// A connection's place in its key's count, given back when the connection closes.
struct CountSlot<K: std::hash::Hash + Eq> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Counts<K> {
    fn new() -> Arc<Counts<K>> {
        Arc::new(Counts(Default::default()))
    }

    fn claim(self: &Arc<Self>, key: &K, max: usize) -> Option<CountSlot<K>> {
        let mut counts = self.0.lock().expect("connection count lock");
        let n = counts.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(CountSlot { counts: self.clone(), key: key.clone() })
    }
}

impl<K: std::hash::Hash + Eq> Drop for CountSlot<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().expect("connection count lock");
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Accepts TLS connections until `cancel`, at most `connections_max` open at once and
/// `per_address_max` from one address. A connection must start its handshake within
/// `hello_timeout` and finish it within `handshake_timeout`; handshakes run concurrently. Once
/// `close` is cancelled, every connection accepted here fails whatever it waits on.
pub fn accept(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: AcceptLimits,
    cancel: CancellationToken,
    close: CancellationToken,
) -> mpsc::Receiver<std::io::Result<Conn>> {
    let (out, conns) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let per_address = Counts::new();
    let per_node = Counts::new();
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s.expect("the slot semaphore is never closed"),
                _ = cancel.cancelled() => break,
            };
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = cancel.cancelled() => break,
            };
            let Some(address_slot) = per_address.claim(&remote.ip(), limits.per_address_max) else {
                tracing::debug!(%remote, "refusing a connection: its address holds connections_per_address_max");
                continue; // Dropping the stream closes it, and the slot returns.
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, out, per_node, close) = (acceptor.clone(), out.clone(), per_node.clone(), close.clone());
            tokio::spawn(async move {
                // An idle connection (no ClientHello) gives its slot back quickly.
                if !matches!(tokio::time::timeout(limits.hello_timeout, tcp.readable()).await, Ok(Ok(()))) {
                    tracing::debug!(%remote, "no TLS ClientHello within hello_timeout_ms");
                    return;
                }
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(Metered::new(tcp))).await {
                    Ok(Ok(inner)) => {
                        let node_slot = match limits.per_node_max {
                            None => None,
                            // The peer listener's TLS verifier requires a client certificate.
                            Some(max) => {
                                let cert = inner.get_ref().1.peer_certificates().and_then(|c| c.first());
                                let claimed = cert.and_then(|cert| per_node.claim(&cert.to_vec(), max));
                                if claimed.is_none() {
                                    tracing::debug!(%remote, "closing a connection: its node certificate holds connections_per_node_max");
                                    return;
                                }
                                claimed
                            }
                        };
                        let idle = limits.idle_timeout.map(IdleTimer::new);
                        let conn = Conn {
                            inner,
                            idle,
                            _slot: slot,
                            _address_slot: address_slot,
                            _node_slot: node_slot,
                            closed: Box::pin(close.child_token().cancelled_owned()),
                        };
                        let _ = out.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    conns
}

/// The bytes of request bodies the client listeners (REST and gRPC together) hold at once as they
/// arrive: `limits.body_bytes_inflight_max` in all, `limits.body_bytes_per_address_max` from one
/// source address. `body_bytes_max` bounds one body, but a client that sent most of one and then
/// stalled kept it for `body_timeout_ms`, on every stream of every connection it could open; a
/// frame past either bound fails its body instead (503), and one address cannot take it all.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    overall: Arc<Semaphore>,
    per_address: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    per_address_max: usize,
}

impl BodyBudget {
    pub(crate) fn new(limits: &crate::config::Limits) -> BodyBudget {
        BodyBudget {
            overall: Arc::new(Semaphore::new(limits.body_bytes_inflight_max)),
            per_address: Arc::default(),
            per_address_max: limits.body_bytes_per_address_max,
        }
    }

    /// `body`, from `address`, charged to the budget frame by frame until it is dropped.
    pub(crate) fn charge<B>(&self, body: B, address: Option<std::net::IpAddr>) -> Budgeted<B> {
        Budgeted { inner: body, budget: self.clone(), address, held: None, from_address: 0 }
    }
}

/// When a body refused for want of budget may be sent again, in seconds.
pub(crate) const OVER_BUDGET_RETRY_AFTER_S: u32 = 1;

/// The error of a body whose next frame did not fit [`BodyBudget`].
#[derive(Debug, thiserror::Error)]
#[error(
    "the node is receiving too many request bodies at once (body_bytes_inflight_max, body_bytes_per_address_max); \
     retry shortly"
)]
pub(crate) struct OverBudget;

impl OverBudget {
    /// Whether `error` is, or was caused by, an [`OverBudget`] (a frontend wraps a body's error).
    pub(crate) fn caused(error: &(dyn std::error::Error + 'static)) -> bool {
        std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<OverBudget>())
    }
}

/// A request body whose bytes count against a [`BodyBudget`] from the frame that brings them
/// until the body is dropped: by then its reader has them whole, or has given up.
pub(crate) struct Budgeted<B> {
    inner: B,
    budget: BodyBudget,
    address: Option<std::net::IpAddr>,
    held: Option<OwnedSemaphorePermit>,
    /// What this body counts in its address's share.
    from_address: usize,
}

impl<B> Budgeted<B> {
    /// Charges `n` bytes to the address's share and the whole budget, or neither.
    fn charge(&mut self, n: usize) -> Result<(), OverBudget> {
        if let Some(address) = self.address {
            let mut shares = self.budget.per_address.lock().expect("body budget lock");
            let share = shares.entry(address).or_default();
            if *share + n > self.budget.per_address_max {
                return Err(OverBudget);
            }
            *share += n;
        }
        self.from_address += n;
        let charged = u32::try_from(n).ok().and_then(|n| self.budget.overall.clone().try_acquire_many_owned(n).ok());
        let Some(charged) = charged else { return Err(OverBudget) };
        match &mut self.held {
            Some(held) => held.merge(charged),
            None => self.held = Some(charged),
        }
        Ok(())
    }
}

impl<B> Drop for Budgeted<B> {
    fn drop(&mut self) {
        let Some(address) = self.address.filter(|_| self.from_address > 0) else { return };
        let mut shares = self.budget.per_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let std::collections::hash_map::Entry::Occupied(mut share) = shares.entry(address) {
            *share.get_mut() = share.get().saturating_sub(self.from_address);
            if *share.get() == 0 {
                share.remove();
            }
        }
    }
}

impl<B> hyper::body::Body for Budgeted<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, tower::BoxError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(n) = frame.data_ref().map(bytes::Bytes::len).filter(|n| *n > 0)
            && let Err(over) = this.charge(n)
        {
            return Poll::Ready(Some(Err(over.into())));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves an axum router over accepted connections, HTTP/1.1 (whose headers must arrive within
/// `limits.headers_timeout_ms`) and HTTP/2 (at most `limits.streams_per_connection_max` streams
/// open on one connection), until cancelled; then lets open requests finish, and returns once
/// every connection has closed (the node closes those left, see `Node::shutdown`).
pub(crate) async fn serve_http(
    mut conns: mpsc::Receiver<std::io::Result<Conn>>,
    app: axum::Router,
    limits: crate::config::Limits,
    budget: BodyBudget,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let headers_timeout = Duration::from_millis(limits.headers_timeout_ms);
    builder.http1().timer(TokioTimer::new()).header_read_timeout(headers_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(limits.streams_per_connection_max);
    loop {
        let conn = tokio::select! {
            c = conns.recv() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => break,
            },
            _ = cancel.cancelled() => break,
        };
        let peer = conn.peer();
        let budget = budget.clone();
        let service = app.clone().map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            let address = peer.remote.map(|a| a.ip());
            req.map(|body| axum::body::Body::new(budget.charge(body, address)))
        });
        let serving = builder
            .serve_connection_with_upgrades(TokioIo::new(conn), hyper_util::service::TowerToHyperService::new(service))
            .into_owned();
        let watched = graceful.watch(serving);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address may hold its share of the budget and no more: a client that filled the whole
    /// budget with stalled bodies had every other client's body refused. Another address's
    /// bodies still fit, and a body's bytes come back, to its address and the whole, when it goes.
    #[tokio::test]
    async fn one_address_holds_its_share_of_the_body_budget_and_no_more() {
        use http_body_util::{BodyExt, Full};
        let limits = crate::config::Limits {
            body_bytes_max: 100,
            body_bytes_inflight_max: 400,
            body_bytes_per_address_max: 200,
            ..crate::config::Limits::default()
        };
        let budget = BodyBudget::new(&limits);
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let body = |n: usize, from| budget.charge(Full::new(bytes::Bytes::from(vec![0u8; n])), Some(from));
        let read = |mut body: Budgeted<Full<bytes::Bytes>>| async move {
            let outcome = body.frame().await.expect("one frame").map(drop);
            (body, outcome)
        };
        let (held_a, read_a) = read(body(150, a)).await;
        read_a.expect("within the address's share");
        let (_, over) = read(body(100, a)).await;
        assert!(OverBudget::caused(&*over.unwrap_err()), "past the address's share");
        let (held_b, read_b) = read(body(200, b)).await;
        read_b.expect("another address has its own share");
        let (_, over) = read(body(100, "10.0.0.3".parse().unwrap())).await;
        assert!(OverBudget::caused(&*over.unwrap_err()), "past the whole budget (350 held of 400)");
        drop((held_a, held_b));
        assert_eq!(budget.overall.available_permits(), 400);
        assert!(budget.per_address.lock().unwrap().is_empty(), "every share given back");
        let (_, again) = read(body(200, a)).await;
        again.expect("the address's whole share again");
    }

    /// Whether `act` counted as progress: it moved the time of the last progress on.
    fn progress(idle: &mut IdleTimer, act: impl FnOnce(&mut IdleTimer)) -> bool {
        let before = idle.last_progress;
        std::thread::sleep(Duration::from_millis(2));
        act(idle);
        idle.last_progress > before
    }

    /// Bytes read, and bytes the socket takes, are progress at once while the client keeps up;
    /// once a write has waited for room, only IDLE_WRITE_PROGRESS_BYTES taken are, or everything
    /// going out.
    #[tokio::test]
    async fn a_client_behind_makes_progress_only_in_whole_steps() {
        let mut idle = IdleTimer::new(Duration::from_secs(60));
        assert!(progress(&mut idle, |i| i.wrote(1)), "any write while keeping up");
        assert!(progress(&mut idle, IdleTimer::read), "any read while keeping up");
        idle.behind = true;
        assert!(!progress(&mut idle, IdleTimer::read), "a read while behind");
        assert!(!progress(&mut idle, |i| i.wrote(IDLE_WRITE_PROGRESS_BYTES - 1)), "a trickle");
        assert!(progress(&mut idle, |i| i.wrote(1)), "the step's last byte");
        assert!(!progress(&mut idle, |i| i.wrote(IDLE_WRITE_PROGRESS_BYTES - 1)), "a step begins again");
        assert!(progress(&mut idle, IdleTimer::flushed), "everything waiting went out");
        assert!(!idle.behind);
        assert!(progress(&mut idle, |i| i.wrote(1)), "keeping up again");
        assert!(!progress(&mut idle, IdleTimer::flushed), "a flush with nothing behind");
    }
}
