//! The accept loop: the router on hyper (HTTP/1.1) with graceful shutdown, and an idle
//! timeout per connection. A connection is idle when no request is in flight on it (a
//! response body still being streamed counts as in flight) and nothing was read or
//! written for `--idle-timeout`; idle connections are closed, whether the client never
//! sent a byte, trickles its headers, or keeps an unused keep-alive connection open.
//! A request that takes long to answer is never cut by it; a request body that takes
//! long to arrive is (`--body-timeout`, in [`crate::routes::JsonBody`]), and so is a
//! response its client stops reading: once the socket takes none of its bytes for
//! `--send-timeout` (nginx's `send_timeout`), the connection is closed, which drops the
//! response and so stops its generation and frees what was waiting to be sent.
//!
//! At most `--max-connections` connections are served at once: one more is answered 503
//! and closed at once, unless its request is a probe (`GET` or `HEAD` of `/health`,
//! `/metrics`, `/v1/loads`): a router's or an orchestrator's probe is answered even when clients hold
//! every slot, so a busy server is not taken for a dead one. Shutdown waits for open
//! connections for the drain time at most.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// Bounds on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// `--idle-timeout`.
    pub idle: Duration,
    /// `--send-timeout`.
    pub send: Duration,
    /// `--max-connections`.
    pub max_connections: usize,
    /// After shutdown: how long open connections may take to finish.
    pub drain: Duration,
}

/// Open files a server needs besides one per connection: the model, the store, logs.
const OTHER_FILES: u64 = 256;

/// Raises the process's soft limit of open files toward its hard limit so that
/// `max_connections` connections (a file each) can be open, and returns how many can:
/// `max_connections`, or fewer (logged) when the hard limit is lower. Beyond the limit
/// `accept` itself fails, and a connection would get no answer, not the 503 the cap gives.
pub fn fit_open_files(max_connections: usize) -> usize {
    #[cfg(unix)]
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let Ok((mut soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return max_connections;
        };
        let want = (max_connections as u64).saturating_add(OTHER_FILES);
        if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).is_ok() {
            soft = want.min(hard);
        }
        let fits = usize::try_from(soft.saturating_sub(OTHER_FILES)).unwrap_or(usize::MAX);
        if fits < max_connections {
            tracing::warn!(
                open_files = soft,
                max_connections = fits.max(1),
                "the open-files limit (ulimit -n) holds fewer connections than --max-connections"
            );
            return fits.max(1);
        }
    }
    max_connections
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits
/// for the open requests to finish (for `limits.drain` at most).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    refused: Counter,
    shutdown: impl Future<Output = ()>,
) {
    let idle_timeout = limits.idle;
    let send_timeout = limits.send;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // HTTP/1.1 only: the header and idle timeouts are HTTP/1's (an h2 connection
    // trickling a HEADERS frame or pinging escaped both and held a slot for ever).
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tokio::spawn(over_limit(stream, app.clone(), limits.max_connections, refused.clone()));
                    continue;
                };
                let requests = Arc::new(AtomicUsize::new(0));
                let io = TimedIo::new(stream, requests.clone(), idle_timeout, send_timeout);
                let app = app.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let guard = InFlight::new(requests.clone());
                    let app = app.clone();
                    async move {
                        let response = app.oneshot(req.map(Body::new)).await?;
                        Ok::<_, std::convert::Infallible>(
                            response.map(|body| Body::new(Guarded { body, _guard: guard })),
                        )
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(io), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_s = limits.drain.as_secs(),
            "connections still open after the drain time; closing them"
        );
    }
}

/// The paths a connection over `--max-connections` is still served: cheap reads that
/// routers and orchestrators poll to tell a busy server from a dead one.
const PROBES: [&str; 3] = ["/health", "/metrics", "/v1/loads"];

/// How long a connection over the limit may take to send its request's head, and to be
/// answered in all.
const OVER_LIMIT_HEAD: Duration = Duration::from_secs(1);
const OVER_LIMIT_ALL: Duration = Duration::from_secs(3);

/// A connection over `--max-connections`: its request's head is read first (a client
/// that has not sent its request yet would take an early answer for a protocol error).
/// A probe is answered by the app; anything else is refused with a 503 in the error
/// envelope (counted as refused), also made by the app, so that it carries the request
/// id and CORS headers every answer carries (a browser could not read it otherwise).
/// Either way the connection is then closed, after what else the client sent is read off
/// briefly: closing with it unread would reset the connection before the client reads
/// the answer.
async fn over_limit(mut stream: TcpStream, app: Router, max: usize, refused: Counter) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = async {
        let head = read_head(&mut stream).await;
        let answered = match parse_head(&head) {
            Some(mut request) => {
                if !is_probe(&request) {
                    request.extensions_mut().insert(OverLimit {
                        max,
                        refused: refused.clone(),
                    });
                }
                answer_once(app, request).await
            }
            None => None,
        };
        let reply = answered.unwrap_or_else(|| {
            refused.inc();
            tracing::debug!(max, "connection refused: --max-connections reached");
            refusal(max)
        });
        stream.write_all(&reply).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(OVER_LIMIT_ALL, answer).await;
}

/// Marks a request that came over `--max-connections` and is not a probe: the app
/// answers it with [`refusal_error`] rather than routing it, and counts it in `refused`
/// there (a CORS preflight is answered before, and is not refused).
#[derive(Clone)]
pub(crate) struct OverLimit {
    pub(crate) max: usize,
    pub(crate) refused: Counter,
}

/// What the client sends within [`OVER_LIMIT_HEAD`], up to the end of the request's
/// head (64 KiB at most).
async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut piece = [0u8; 4096];
    let until_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match stream.read(&mut piece).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&piece[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(OVER_LIMIT_HEAD, until_head).await;
    head
}

/// The request in `head`, without its body, when its head is whole (its headers kept, so
/// that `--api-key` still guards what it guards and CORS sees its origin), else `None`.
fn parse_head(head: &[u8]) -> Option<hyper::Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !parsed.parse(head).ok()?.is_complete() {
        return None;
    }
    let mut request = hyper::Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?);
    for h in parsed.headers.iter() {
        request = request.header(h.name, h.value);
    }
    request.body(Body::empty()).ok()
}

/// A `GET` or `HEAD` of one of [`PROBES`].
fn is_probe(request: &hyper::Request<Body>) -> bool {
    matches!(*request.method(), hyper::Method::GET | hyper::Method::HEAD)
        && PROBES.contains(&request.uri().path())
}

/// The app's answer to `request`, as bytes to write on a connection that then closes
/// (`None` if its body could not be read whole).
async fn answer_once(app: Router, request: hyper::Request<Body>) -> Option<Vec<u8>> {
    let head_only = request.method() == hyper::Method::HEAD;
    let Ok(response) = app.oneshot(request).await;
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20).await.ok()?;
    let mut reply = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if name != hyper::header::CONTENT_LENGTH && name != hyper::header::CONNECTION {
            reply.extend_from_slice(name.as_str().as_bytes());
            reply.extend_from_slice(b": ");
            reply.extend_from_slice(value.as_bytes());
            reply.extend_from_slice(b"\r\n");
        }
    }
    reply.extend_from_slice(b"connection: close\r\n");
    // A `HEAD` answer has no body, and the app's had its body already removed: no length
    // is said rather than a wrong one.
    if !head_only {
        reply.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    reply.extend_from_slice(b"\r\n");
    if !head_only {
        reply.extend_from_slice(&body);
    }
    Some(reply)
}

/// The 503 that a connection over `--max-connections` gets.
pub(crate) fn refusal_error(max: usize) -> crate::error::ApiError {
    crate::error::ApiError::Unavailable(format!(
        "too many open connections (--max-connections {max}); retry later"
    ))
}

/// [`refusal_error`] as bytes, for a connection whose request's head could not be read.
fn refusal(max: usize) -> Vec<u8> {
    let body = serde_json::to_string(&refusal_error(max).body()).unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Counts a request as in flight on its connection until its response body is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight while it streams.
struct Guarded {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, failing reads once the connection has been idle too long,
/// and writes once the client has taken none of the response for the send timeout.
struct TimedIo {
    inner: TcpStream,
    requests: Arc<AtomicUsize>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    send: Duration,
    /// Armed when a write finds the socket full (the client is not reading), disarmed by
    /// the next write that goes through.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl TimedIo {
    fn new(inner: TcpStream, requests: Arc<AtomicUsize>, idle: Duration, send: Duration) -> Self {
        Self {
            inner,
            requests,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            send,
            stalled: None,
        }
    }

    fn touch(&mut self) {
        let at = Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    /// A write's outcome under the send timeout: bytes taken reset both clocks; a write
    /// the socket cannot take starts the send clock (its timer wakes the connection), and
    /// fails the write once it has run out.
    fn watch_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.touch();
                self.stalled = None;
            }
            Poll::Pending => {
                let send = self.send;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(send)));
                if stalled.as_mut().poll(cx).is_ready() {
                    tracing::info!(
                        send_timeout_s = send.as_secs(),
                        "client took none of its response for --send-timeout; closing"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client took none of the response for --send-timeout",
                    )));
                }
            }
            Poll::Ready(_) => {}
        }
        result
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if this.requests.load(Ordering::Acquire) > 0 {
                    // Busy answering: the countdown starts when the answer is done.
                    this.touch();
                } else if this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle longer than --idle-timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        this.watch_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use nix::sys::resource::{getrlimit, Resource};

    use super::*;

    /// However many connections are asked for, the cap returned fits in the open-files
    /// limit the process has afterwards; a small ask is granted whole.
    #[test]
    fn the_connection_cap_fits_the_open_files_limit() {
        let asked = 1 << 20;
        let cap = fit_open_files(asked);
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(cap >= 1 && cap <= asked);
        assert!(
            cap as u64 + OTHER_FILES <= soft.max(OTHER_FILES + 1),
            "{cap} in {soft}"
        );
        assert_eq!(fit_open_files(16), 16);
    }
}
