//! The virtual WASI preview 1 a contract sees: no files, no environment, no arguments, no
//! sockets. The wall clock reads the request's start time, randomness comes from the host, and
//! stdout/stderr are captured (up to a cap) and logged through `tracing`, tagged with the request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostWallClock, WasiCtxBuilder};

use super::limits::RANDOM_BYTES_PER_CALL_MAX;

/// Guest output of one request, capped at a byte budget.
#[derive(Debug, Default)]
pub struct GuestOutput {
    lines: Vec<(&'static str, String)>,
    bytes_left: usize,
    dropped_bytes: usize,
}

impl GuestOutput {
    pub fn new(bytes_max: usize) -> Self {
        GuestOutput { bytes_left: bytes_max, ..Default::default() }
    }

    /// Keeps what fits in the budget and counts the rest.
    pub fn push(&mut self, stream: &'static str, bytes: &[u8]) {
        let kept = bytes.len().min(self.bytes_left);
        self.bytes_left -= kept;
        self.dropped_bytes += bytes.len() - kept;
        if kept > 0 {
            self.lines.push((stream, String::from_utf8_lossy(&bytes[..kept]).into_owned()));
        }
    }

    /// Emits the captured output as `tracing` events for the request.
    pub(crate) fn emit(&self, request_id: &str) {
        for (stream, text) in &self.lines {
            for line in text.lines().filter(|l| !l.is_empty()) {
                tracing::info!(target: "cloister::guest", request_id, stream, "{line}");
            }
        }
        if self.dropped_bytes > 0 {
            tracing::warn!(
                target: "cloister::guest",
                request_id,
                dropped_bytes = self.dropped_bytes,
                "guest output beyond log_bytes_per_request_max was dropped"
            );
        }
    }

    #[cfg(test)]
    pub fn text(&self) -> String {
        self.lines.iter().map(|(_, t)| t.as_str()).collect()
    }
}

/// One of the guest's output streams, writing into the shared [`GuestOutput`].
#[derive(Clone)]
struct Capture {
    stream: &'static str,
    out: Arc<Mutex<GuestOutput>>,
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    // The synchronous stream p1 uses; the default would spawn a tokio task per stream.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.out.lock().expect("guest output lock").push(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.out.lock().expect("guest output lock").push(self.stream, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The wall clock frozen at the request's start, so every read within a request agrees.
struct FrozenClock(Duration);

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        self.0
    }
}

/// A fresh virtual WASI context for one request.
pub fn context(out: &Arc<Mutex<GuestOutput>>, started: SystemTime) -> WasiP1Ctx {
    let since_epoch = started.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    WasiCtxBuilder::new()
        .stdout(Capture { stream: "stdout", out: out.clone() })
        .stderr(Capture { stream: "stderr", out: out.clone() })
        .wall_clock(FrozenClock(since_epoch))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(RANDOM_BYTES_PER_CALL_MAX)
        .build_p1()
}
