//! Limits on what one client may hold: the size of a request's headers (a layer, so the
//! refusal is an envelope), and on the client API's connections, the time a client may take
//! to bring a request and to sit idle (a watched socket, see [`serve_client_connection`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sitegate_model::operation::OperationId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::error::ApiError;
use crate::layers::OPERATION_ID_HEADER;

/// `limits.max_header_bytes`, the state of [`header_size`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeaderLimit(pub(crate) usize);

/// Refuses a request whose headers together exceed the limit with 431 and the envelope.
///
/// hyper enforces only a hard cap on the whole head, above this one, and answers it with a
/// bare 431 that has no body; this check is the one callers normally meet. Headers are counted
/// as they travel in HTTP/1: name, `": "`, value and CRLF each.
pub(crate) async fn header_size(
    State(limit): State<HeaderLimit>,
    req: Request,
    next: Next,
) -> Response {
    let size: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > limit.0 {
        return ApiError::HeaderTooLarge(limit.0).into_response();
    }
    next.run(req).await
}

/// The first bytes of an HTTP/2 connection (RFC 9113, 3.4): how a connection is told to be
/// HTTP/2 from its first bytes, as hyper does.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client connection speaks, as far as its first bytes tell.
const PROTOCOL_UNKNOWN: u8 = 0;
const PROTOCOL_HTTP1: u8 = 1;
const PROTOCOL_HTTP2: u8 = 2;

/// What one client connection has done, shared by its socket wrapper ([`ClientIo`]), the
/// service that counts its requests and the task that serves it. Lives as long as the
/// connection.
pub(crate) struct ClientConnection {
    /// When the connection was accepted; `last_traffic_ms` counts from here.
    accepted: Instant,
    /// Milliseconds after `accepted` at which a byte was last read or written.
    last_traffic_ms: AtomicU64,
    /// Bytes read since the server last wrote: more than 0 while the client is part-way
    /// through sending a request (or between requests, sending one it has not finished).
    read_since_write: AtomicUsize,
    /// Whether the server has written anything at all (HTTP/2 writes its settings at once).
    wrote_any: AtomicBool,
    /// Bytes of the HTTP/2 preface matched so far, while they all match.
    preface_matched: AtomicUsize,
    /// `PROTOCOL_*`: decided by the first bytes read.
    protocol: std::sync::atomic::AtomicU8,
    /// Requests whose head has been parsed, ever.
    requests_started: AtomicU64,
    /// Requests whose answer has not yet been produced.
    requests_in_flight: AtomicUsize,
    /// Set just before the connection is dropped when the socket is wanted back to say 408.
    keep_socket: AtomicBool,
}

impl ClientConnection {
    fn new() -> Self {
        ClientConnection {
            accepted: Instant::now(),
            last_traffic_ms: AtomicU64::new(0),
            read_since_write: AtomicUsize::new(0),
            wrote_any: AtomicBool::new(false),
            preface_matched: AtomicUsize::new(0),
            protocol: std::sync::atomic::AtomicU8::new(PROTOCOL_UNKNOWN),
            requests_started: AtomicU64::new(0),
            requests_in_flight: AtomicUsize::new(0),
            keep_socket: AtomicBool::new(false),
        }
    }

    /// Called by the service for each request it receives; the request counts as in flight
    /// until the returned guard is dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        self.requests_started.fetch_add(1, Ordering::Relaxed);
        self.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn touch(&self) {
        let ms = self.accepted.elapsed().as_millis() as u64;
        self.last_traffic_ms.store(ms, Ordering::Relaxed);
    }

    fn since_traffic(&self) -> Duration {
        let last = Duration::from_millis(self.last_traffic_ms.load(Ordering::Relaxed));
        self.accepted.elapsed().saturating_sub(last)
    }

    fn protocol(&self) -> u8 {
        self.protocol.load(Ordering::Relaxed)
    }

    /// Sorts the connection into HTTP/1 or HTTP/2 by the bytes read so far.
    fn sniff(&self, bytes: &[u8]) {
        if self.protocol() != PROTOCOL_UNKNOWN {
            return;
        }
        let matched = self.preface_matched.load(Ordering::Relaxed);
        let want = &H2_PREFACE[matched..];
        let n = want.len().min(bytes.len());
        if bytes[..n] != want[..n] {
            self.protocol.store(PROTOCOL_HTTP1, Ordering::Relaxed);
        } else if matched + n == H2_PREFACE.len() {
            self.protocol.store(PROTOCOL_HTTP2, Ordering::Relaxed);
        } else {
            self.preface_matched.store(matched + n, Ordering::Relaxed);
        }
    }

    /// Whether an HTTP/1 client has sent part of a request head and nothing is being answered,
    /// so that a `408` written now is read as the answer to that request.
    fn mid_http1_head(&self) -> bool {
        self.protocol() == PROTOCOL_HTTP1
            && self.read_since_write.load(Ordering::Relaxed) > 0
            && self.requests_in_flight.load(Ordering::Relaxed) == 0
    }

    /// Resolves if no request has arrived within `limit` of the accept.
    async fn no_first_request_within(&self, limit: Duration) {
        tokio::time::sleep(limit).await;
        if self.requests_started.load(Ordering::Relaxed) == 0 {
            return;
        }
        std::future::pending::<()>().await;
    }

    /// Resolves once an HTTP/2 connection has had no request in flight and no traffic for
    /// `limit`. HTTP/1 connections never resolve it: hyper's header read timeout closes them,
    /// as it runs whenever hyper waits for a request head.
    async fn http2_idle_for(&self, limit: Duration) {
        loop {
            let quiet = self.since_traffic();
            let idle = self.requests_in_flight.load(Ordering::Relaxed) == 0;
            match self.protocol() {
                PROTOCOL_HTTP2 if idle && quiet >= limit => return,
                PROTOCOL_HTTP1 => std::future::pending::<()>().await,
                _ => {}
            }
            // Checks again when the quiet time could first reach the limit.
            let wait = limit.saturating_sub(quiet).max(Duration::from_millis(50));
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request of a [`ClientConnection`] whose answer is being produced.
pub(crate) struct InFlight(Arc<ClientConnection>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client API stream (TCP, or TLS over it: the bytes counted are the HTTP ones) that records
/// its traffic in its [`ClientConnection`] and, when asked, hands the stream back on drop
/// instead of closing it.
pub(crate) struct ClientIo<I> {
    /// The stream; `None` only once dropped.
    stream: Option<I>,
    connection: Arc<ClientConnection>,
    /// Where the stream goes when dropped with `keep_socket` set.
    parked: Arc<Mutex<Option<I>>>,
    /// A rewritten HTTP/1 response head (see `http1_wire`) that hyper counts as written but
    /// the socket has not taken yet, from `pending_at` on; written before anything else.
    pending: Vec<u8>,
    pending_at: usize,
}

/// The serving task's side of a [`ClientIo`]: the connection's record, and the stream back
/// when it is wanted to say 408.
pub(crate) struct Watched<I> {
    connection: Arc<ClientConnection>,
    parked: Arc<Mutex<Option<I>>>,
}

impl<I> Watched<I> {
    /// The record the connection's service reports its requests to.
    pub(crate) fn connection(&self) -> Arc<ClientConnection> {
        self.connection.clone()
    }
}

impl<I> ClientIo<I> {
    pub(crate) fn new(stream: I) -> (Self, Watched<I>) {
        let connection = Arc::new(ClientConnection::new());
        let parked = Arc::new(Mutex::new(None));
        let io = ClientIo {
            stream: Some(stream),
            connection: connection.clone(),
            parked: parked.clone(),
            pending: Vec::new(),
            pending_at: 0,
        };
        (io, Watched { connection, parked })
    }
}

impl<I: Unpin> ClientIo<I> {
    fn stream(&mut self) -> io::Result<Pin<&mut I>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.connection.touch();
            self.connection.read_since_write.store(0, Ordering::Relaxed);
            self.connection.wrote_any.store(true, Ordering::Relaxed);
        }
    }

    fn http1(&self) -> bool {
        self.connection.protocol() == PROTOCOL_HTTP1
    }
}

impl<I: AsyncWrite + Unpin> ClientIo<I> {
    /// Writes what is left of a rewritten head; ready once nothing is pending.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_at < self.pending.len() {
            let at = self.pending_at;
            let stream = self
                .stream
                .as_mut()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
            match Pin::new(stream).poll_write(cx, &self.pending[at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pending_at += n;
                    self.wrote(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.pending.clear();
        self.pending_at = 0;
        Poll::Ready(Ok(()))
    }

    /// A write whose first buffer is an HTTP/1 response head: the head is rewritten into
    /// `pending` and sent with the buffers after it in one vectored write, as hyper would have.
    /// hyper is told the head was written whole; what the socket did not take stays pending.
    fn poll_write_head(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
        rest: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        crate::http1_wire::rewrite_heads(head, &mut self.pending);
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        let mut slices = Vec::with_capacity(rest.len() + 1);
        slices.push(io::IoSlice::new(&self.pending));
        slices.extend(rest.iter().map(|s| io::IoSlice::new(s)));
        let written = match Pin::new(stream).poll_write_vectored(cx, &slices) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => {
                self.pending.clear();
                return Poll::Ready(Err(e));
            }
            // The head is taken; the waker is registered for writing the rest of it.
            Poll::Pending => 0,
        };
        self.wrote(written);
        if written >= self.pending.len() {
            let of_rest = written - self.pending.len();
            self.pending.clear();
            Poll::Ready(Ok(head.len() + of_rest))
        } else {
            self.pending_at = written;
            Poll::Ready(Ok(head.len()))
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ClientIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = self.stream()?.poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let c = &self.connection;
            c.touch();
            c.read_since_write.fetch_add(read.len(), Ordering::Relaxed);
            c.sniff(read);
            if self.http1() {
                crate::http1_wire::soften_doubled_cr(&mut buf.filled_mut()[before..]);
            }
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ClientIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if self.http1() && crate::http1_wire::starts_response_head(buf) {
            return self.poll_write_head(cx, buf, &[]);
        }
        let result = self.stream()?.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if let Some(first) = bufs.first() {
            if self.http1() && crate::http1_wire::starts_response_head(first) {
                return self.poll_write_head(cx, first, &bufs[1..]);
            }
        }
        let result = self.stream()?.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        self.stream()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        self.stream()?.poll_shutdown(cx)
    }
}

impl<I> Drop for ClientIo<I> {
    fn drop(&mut self) {
        if self.connection.keep_socket.load(Ordering::Relaxed) {
            let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            *parked = self.stream.take();
        }
    }
}

/// What hyper-util's connection futures fail with.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the 408 and the lingering read after it may take: a client that does not read
/// its answer does not hold the connection slot.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one client API connection (`connection` is hyper's future for it, over a
/// [`ClientIo`]) under the time limits hyper does not apply itself:
///
/// - The first request must arrive within `head_timeout` of the accept. hyper's header read
///   timer starts only once the protocol is known, and telling HTTP/1 from HTTP/2 waits for
///   bytes without any limit, so a client that sends nothing, or a few bytes of the HTTP/2
///   preface, would otherwise hold its connection slot for ever.
/// - An HTTP/2 connection with no request in flight and no traffic for `head_timeout` is
///   closed; hyper has no idle timeout for HTTP/2, and HTTP/1 idles under its header timer.
///
/// A client part-way through an HTTP/1 request head when either limit (or hyper's header
/// read timeout) ends the connection is answered `408` with the envelope before the close;
/// anyone else is just disconnected, as an idle keep-alive connection is, since a 408 there
/// could be taken as the answer to a request sent at that moment.
pub(crate) async fn serve_client_connection<I: AsyncRead + AsyncWrite + Unpin>(
    connection: impl std::future::Future<Output = Result<(), BoxError>>,
    watched: Watched<I>,
    head_timeout: Duration,
    client: SocketAddr,
) {
    let c = &watched.connection;
    let say_408 = {
        let connection = std::pin::pin!(connection);
        let say_408 = tokio::select! {
            ended = connection => match ended {
                Ok(()) => false,
                Err(e) => {
                    let head_timed_out = e
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_timeout);
                    if !head_timed_out {
                        tracing::debug!(error = %e, %client, "connection ended with an error");
                    }
                    head_timed_out && c.mid_http1_head()
                }
            },
            () = c.no_first_request_within(head_timeout) => {
                tracing::debug!(%client, "no request within the header read timeout");
                c.mid_http1_head() && !c.wrote_any.load(Ordering::Relaxed)
            }
            () = c.http2_idle_for(head_timeout) => {
                tracing::debug!(%client, "idle HTTP/2 connection closed");
                false
            }
        };
        // hyper's connection is dropped at the end of this block; its socket is kept only to
        // say why it closes.
        c.keep_socket.store(say_408, Ordering::Relaxed);
        say_408
    };
    if !say_408 {
        return;
    }
    let parked = watched
        .parked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(stream) = parked {
        let answer = http1_answer(ApiError::RequestTimeout("head"), client).await;
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, say_and_close(stream, &answer)).await;
    }
}

/// Writes `answer`, ends the sending side, and reads until the client closes (or the caller's
/// timeout ends it): closing with unread input would reset the connection, and a reset can
/// destroy the answer at the client before it is read.
async fn say_and_close<I: AsyncRead + AsyncWrite + Unpin>(mut stream: I, answer: &[u8]) {
    if stream.write_all(answer).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// `err` as HTTP/1.1 bytes for a connection hyper no longer serves: the same status, envelope
/// and logging as any other answer ([`ApiError`]'s `IntoResponse`), a fresh operation ID, and
/// `Connection: close`.
async fn http1_answer(err: ApiError, client: SocketAddr) -> Vec<u8> {
    let op = OperationId::generate();
    let span = tracing::info_span!("request", operation_id = op.as_str(), %client);
    let (parts, body) = span.in_scope(|| err.into_response()).into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_str(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    let mut headers = parts.headers;
    headers.insert(
        axum::http::header::CONNECTION,
        HeaderValue::from_static("close"),
    );
    headers.insert(axum::http::header::CONTENT_LENGTH, body.len().into());
    if let Ok(value) = HeaderValue::from_str(op.as_str()) {
        headers.insert(OPERATION_ID_HEADER, value);
    }
    for (name, value) in &headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(&body);
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_told_apart_by_their_first_bytes() {
        let cases: [(&[&[u8]], u8); 6] = [
            (&[b"GET / HTTP/1.1\r\n"], PROTOCOL_HTTP1),
            (&[b"P", b"OST /tasks"], PROTOCOL_HTTP1),
            (&[b"PRI * HTTP/2.0\r\n"], PROTOCOL_UNKNOWN),
            (&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"], PROTOCOL_HTTP2),
            (&[H2_PREFACE, b"\0\0\0\x04"], PROTOCOL_HTTP2),
            (&[b"PRI * HTTP/1.1"], PROTOCOL_HTTP1),
        ];
        for (reads, want) in cases {
            let c = ClientConnection::new();
            for r in reads {
                c.sniff(r);
            }
            assert_eq!(c.protocol(), want, "{reads:?}");
        }
    }

    #[test]
    fn only_a_part_sent_http1_head_gets_a_408() {
        let c = Arc::new(ClientConnection::new());
        assert!(!c.mid_http1_head(), "nothing read yet");
        c.sniff(b"GET / HT");
        c.read_since_write.store(8, Ordering::Relaxed);
        assert!(c.mid_http1_head());
        let request = c.request_started();
        assert!(!c.mid_http1_head(), "a request is being answered");
        drop(request);
        assert!(c.mid_http1_head());
        c.read_since_write.store(0, Ordering::Relaxed);
        assert!(!c.mid_http1_head(), "idle between requests");
    }

    #[tokio::test]
    async fn the_408_is_a_complete_http1_answer_with_the_envelope() {
        let client = SocketAddr::from(([127, 0, 0, 1], 1));
        let bytes = http1_answer(ApiError::RequestTimeout("head"), client).await;
        let text = String::from_utf8(bytes).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{head}"
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("\r\nconnection: close"), "{head}");
        assert!(lower.contains("\r\noperationid: "), "{head}");
        assert!(
            lower.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        let envelope: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(envelope["code"], "BadUserInput");
        assert_eq!(envelope["stacktrace"], "");
    }
}
