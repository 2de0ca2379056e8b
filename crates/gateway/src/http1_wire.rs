//! HTTP/1.1 bytes as the original API's clients expect them, where hyper's public API cannot
//! produce them. Used by the client connection's socket wrapper (`limits::ClientIo`), on
//! HTTP/1 connections only; HTTP/2 header names are lower case by definition.
//!
//! - Response header names leave spelled as the original spells them (`X-VCAV-Auth`,
//!   `operationID`) and the rest in the usual title case (`Content-Type`): scripts written from
//!   the original's documentation `grep X-VCAV-Auth`. hyper writes every name in lower case;
//!   its header-case map is crate-private and its title-case option gives `X-Vcav-Auth`.
//! - A bare error hyper writes itself (400, 414, 431 for a request it cannot parse; no body,
//!   no `operationID`) is replaced by the same status with the API's envelope and a fresh
//!   operation ID. hyper closes such a connection, so the longer answer is the last one.
//! - A request header line ending in CR CR LF (what `curl -i | cut` leaves in a shell
//!   variable and a script sends back) is read as if the extra CR were a space, which the
//!   header parser then trims, as nginx accepts it. RFC 9112 (2.2) allows a recipient to
//!   replace a bare CR with a space.
//!
//! Only response heads are rewritten: hyper hands a head to the socket as its own buffer
//! (vectored writes, forced on in `server`), starting with `HTTP/1.`; a body is never one of
//! those buffers' heads, and the rewrite stops at the blank line that ends the heads.

use sitegate_model::error::{ErrorCode, ErrorEnvelope};
use sitegate_model::operation::OperationId;

/// Names with a spelling of their own; every other name is title-cased.
const SPELLED: [&str; 4] = ["X-VCAV-Auth", "operationID", "WWW-Authenticate", "ETag"];

/// Whether `data` begins with a response head (the only buffers [`rewrite_heads`] changes).
pub(crate) fn starts_response_head(data: &[u8]) -> bool {
    data.starts_with(b"HTTP/1.")
}

/// Writes `data` into `out` with every response head at its start rewritten: names spelled
/// for the original's clients, and hyper's bare errors given the envelope. Bytes after the
/// heads (a body hyper put in the same buffer) are copied unchanged.
pub(crate) fn rewrite_heads(data: &[u8], out: &mut Vec<u8>) {
    let mut pos = 0;
    while starts_response_head(&data[pos..]) {
        let end = find(&data[pos..], b"\r\n\r\n").map_or(data.len(), |i| pos + i + 4);
        let head = &data[pos..end];
        match bare_error_status(head) {
            Some(status) => enveloped_error(head, status, out),
            None => {
                let start = out.len();
                out.extend_from_slice(head);
                spell_names(&mut out[start..]);
            }
        }
        pos = end;
    }
    out.extend_from_slice(&data[pos..]);
}

/// Replaces each CR that comes right before a CR LF with a space, in place. See the module
/// comment; on a JSON body it can only turn whitespace into whitespace (a raw CR inside a
/// JSON string is refused either way).
pub(crate) fn soften_doubled_cr(read: &mut [u8]) {
    let mut i = 0;
    while i + 2 < read.len() {
        if read[i] == b'\r' && read[i + 1] == b'\r' && read[i + 2] == b'\n' {
            read[i] = b' ';
        }
        i += 1;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Title-cases or spells every header name of one head (not the status line), in place.
fn spell_names(head: &mut [u8]) {
    let mut line_start = match find(head, b"\r\n") {
        Some(i) => i + 2,
        None => return,
    };
    while line_start < head.len() {
        let line_end = find(&head[line_start..], b"\r\n").map_or(head.len(), |i| line_start + i);
        if let Some(colon) = head[line_start..line_end].iter().position(|b| *b == b':') {
            spell(&mut head[line_start..line_start + colon]);
        }
        line_start = line_end + 2;
    }
}

fn spell(name: &mut [u8]) {
    if let Some(spelled) = SPELLED
        .iter()
        .find(|s| s.len() == name.len() && name.eq_ignore_ascii_case(s.as_bytes()))
    {
        name.copy_from_slice(spelled.as_bytes());
        return;
    }
    let mut upper = true;
    for b in name.iter_mut() {
        if upper {
            b.make_ascii_uppercase();
        }
        upper = *b == b'-';
    }
}

/// The status of a head hyper made itself: an error (>= 400) without the `operationID` that
/// every answer of ours carries.
fn bare_error_status(head: &[u8]) -> Option<u16> {
    let status: u16 = std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?;
    if status < 400 {
        return None;
    }
    let lower = head.to_ascii_lowercase();
    (find(&lower, b"\r\noperationid:").is_none()).then_some(status)
}

/// The answer for a request hyper could not parse: its status line, the envelope and a fresh
/// operation ID, and `Connection: close` (hyper closes the connection after it).
fn enveloped_error(head: &[u8], status: u16, out: &mut Vec<u8>) {
    let msg = match status {
        414 => "The request URI is too long.",
        431 => "The request's header section is too large.",
        _ => "The request is not valid HTTP/1.1: a malformed request line or header.",
    };
    let envelope = ErrorEnvelope::new(ErrorCode::BadUserInput, msg, vec![]);
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let op = OperationId::generate();
    tracing::info!(
        target: "sitegate::access",
        operation_id = op.as_str(),
        status,
        "malformed request answered before routing"
    );
    let status_line_end = find(head, b"\r\n").unwrap_or(head.len());
    out.extend_from_slice(&head[..status_line_end]);
    out.extend_from_slice(b"\r\nContent-Type: application/json\r\noperationID: ");
    out.extend_from_slice(op.as_str().as_bytes());
    out.extend_from_slice(b"\r\nConnection: close\r\nContent-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    // hyper's `date` line, if any, is kept; its framing lines are replaced above.
    if let Some(date) = find(&head.to_ascii_lowercase(), b"\r\ndate:") {
        let end = find(&head[date + 2..], b"\r\n").map_or(head.len(), |i| date + 2 + i);
        out.extend_from_slice(b"\r\nDate:");
        out.extend_from_slice(&head[date + 7..end]);
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        rewrite_heads(data, &mut out);
        out
    }

    #[test]
    fn names_are_spelled_as_the_original_and_values_untouched() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-vcav-auth: x-vcav-auth:abc\r\noperationid: op-1\r\nwww-authenticate: Authentication Token Required\r\ncontent-length: 2\r\n\r\n";
        let out = rewritten(head);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-VCAV-Auth: x-vcav-auth:abc\r\noperationID: op-1\r\nWWW-Authenticate: Authentication Token Required\r\nContent-Length: 2\r\n\r\n"
        );
    }

    #[test]
    fn bytes_after_the_heads_are_copied_unchanged() {
        let data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\noperationid: a\r\ncontent-length: 27\r\n\r\n{\"x\":\"\\r\\nx-vcav-auth: y\"}";
        let out = rewritten(data);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\noperationID: a\r\nContent-Length: 27\r\n\r\n"));
        assert!(text.ends_with("{\"x\":\"\\r\\nx-vcav-auth: y\"}"));
        assert_eq!(text.len(), data.len());
        // A buffer that is not a head passes as it is.
        let body = b"{\"a\":1}\r\nx-vcav-auth: b";
        assert_eq!(rewritten(body), body.to_vec());
    }

    #[test]
    fn hypers_bare_errors_get_the_envelope_and_an_operation_id() {
        for (status, reason) in [
            (400, "Bad Request"),
            (414, "URI Too Long"),
            (431, "Request Header Fields Too Large"),
        ] {
            let head = format!("HTTP/1.1 {status} {reason}\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 10:00:00 GMT\r\n\r\n");
            let text = String::from_utf8(rewritten(head.as_bytes())).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")),
                "{head}"
            );
            assert!(head.contains("\r\noperationID: "), "{head}");
            assert!(
                head.contains("\r\nContent-Type: application/json"),
                "{head}"
            );
            assert!(
                head.contains(&format!("\r\nContent-Length: {}", body.len())),
                "{head}"
            );
            assert!(
                head.contains("\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT"),
                "{head}"
            );
            let envelope: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(envelope["code"], "BadUserInput");
            assert_eq!(envelope["stacktrace"], "");
            assert!(envelope["msg"].as_str().unwrap().len() > 10);
        }
        // Our own errors carry an operation ID and are only respelled.
        let ours = b"HTTP/1.1 404 Not Found\r\noperationid: x\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(rewritten(ours).len(), ours.len());
    }

    #[test]
    fn a_doubled_cr_before_crlf_becomes_a_space() {
        let mut read = b"GET /tasks HTTP/1.1\r\nX-VCAV-Auth: abc\r\r\nHost: h\r\n\r\n".to_vec();
        soften_doubled_cr(&mut read);
        assert_eq!(
            read,
            b"GET /tasks HTTP/1.1\r\nX-VCAV-Auth: abc \r\nHost: h\r\n\r\n".to_vec()
        );
        let mut plain = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        soften_doubled_cr(&mut plain);
        assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n".to_vec());
    }
}
