//! HTTP/1.1 over a plain socket, byte for byte: for tests that must send exactly what a
//! particular client sends (header names in its case and order, its query encoding, its
//! `Expect: 100-continue`) and see exactly what comes back (header names as spelled on the
//! wire, interim answers), and bytes that are not HTTP at all (a TLS ClientHello, a request
//! in clear text to a TLS listener) with whatever comes back.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one answer may take to arrive.
const ANSWER_DEADLINE: Duration = Duration::from_secs(20);

/// One answer as it arrived: the status, the header lines as spelled, the body.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: u16,
    /// `(name, value)` in wire order, names exactly as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The head as text, for `grep`-like checks.
    pub head: String,
}

impl RawReply {
    /// The value of the first header named `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many header lines are named `name` exactly, as a case-sensitive `grep` sees them.
    pub fn count_spelled(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A connection a client keeps open across its requests, as HTTP/1.1 clients do.
pub struct RawConnection {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl RawConnection {
    pub async fn open(port: u16) -> RawConnection {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        RawConnection {
            stream,
            buffered: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends one whole request and reads its answer.
    pub async fn exchange(&mut self, request: &[u8]) -> RawReply {
        self.send(request).await;
        self.answer().await
    }

    /// Reads one answer (an interim `100 Continue` is an answer of its own).
    pub async fn answer(&mut self) -> RawReply {
        tokio::time::timeout(ANSWER_DEADLINE, self.read_answer())
            .await
            .expect("an answer within the deadline")
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn read_answer(&mut self) -> RawReply {
        let head_end = loop {
            if let Some(i) = find(&self.buffered, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await,
                "connection closed before a whole head: {:?}",
                String::from_utf8_lossy(&self.buffered)
            );
        };
        let head = String::from_utf8_lossy(&self.buffered[..head_end]).into_owned();
        self.buffered.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or((l, ""));
                (n.to_owned(), v.trim().to_owned())
            })
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body = if status == 100 || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while self.buffered.len() < len {
                assert!(self.fill().await, "connection closed inside a body");
            }
            self.buffered.drain(..len).collect()
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            self.read_chunked().await
        } else {
            // Delimited by the end of the connection.
            while self.fill().await {}
            std::mem::take(&mut self.buffered)
        };
        RawReply {
            status,
            headers,
            body,
            head,
        }
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buffered, b"\r\n") {
                    break i;
                }
                assert!(self.fill().await, "connection closed inside a chunk size");
            };
            let size_text = String::from_utf8_lossy(&self.buffered[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size {size_text:?}"));
            self.buffered.drain(..line_end + 2);
            while self.buffered.len() < size + 2 {
                assert!(self.fill().await, "connection closed inside a chunk");
            }
            body.extend(self.buffered.drain(..size));
            self.buffered.drain(..2);
            if size == 0 {
                return body;
            }
        }
    }
}

/// One request on a fresh connection.
pub async fn exchange(port: u16, request: &[u8]) -> RawReply {
    RawConnection::open(port).await.exchange(request).await
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A request's bytes: the request line, the header lines exactly as given (name case and
/// order are the caller's), and the body with its `Content-Length` when there is one.
pub fn request(
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if let Some(body) = body {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A plain HTTP/1.1 request for `/healthz` that asks the server to close the connection.
pub const PLAIN_HTTP_REQUEST: &[u8] =
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

/// Sends `bytes` to 127.0.0.1:`port` and returns what came back before the connection closed
/// (or 5 s passed without a byte). Blocking: call it from `spawn_blocking`.
pub fn exchange_until_close(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    stream.write_all(bytes).expect("send the bytes");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    answer
}
