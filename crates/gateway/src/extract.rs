//! Extractors that fail with the API's envelope instead of axum's plain-text rejections.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;
use crate::layers::Deadline;

/// The body limit the router enforces, for the 413 message.
#[derive(Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) usize);

/// A JSON body. Malformed JSON, a wrong shape, unknown fields and oversized bodies are all
/// `BadUserInput` (413 for the last) with a message that says what was wrong.
///
/// Every body of the API is a JSON object, except those read as a sequence (the poll's ID
/// list), which are arrays: serde would otherwise also read a struct from an array of its
/// fields in order, so `[]` would pass as an empty patch and `["localUser", name, password]`
/// as a login.
pub(crate) struct JsonBody<T>(pub(crate) T);

/// Whether `T` is read from a JSON array, found by asking its `Deserialize` impl which kind
/// of value it wants first.
fn reads_a_sequence<T: DeserializeOwned>() -> bool {
    use serde::de::{Deserializer, Error as _, Visitor};

    struct Probe<'a>(&'a std::cell::Cell<bool>);
    type ProbeError = serde::de::value::Error;

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = ProbeError;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeError> {
            Err(ProbeError::custom("probe"))
        }

        fn deserialize_seq<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeError> {
            self.0.set(true);
            Err(ProbeError::custom("probe"))
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            _: usize,
            _: V,
        ) -> Result<V::Value, ProbeError> {
            self.0.set(true);
            Err(ProbeError::custom("probe"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct tuple_struct map struct enum
            identifier ignored_any
        }
    }

    let wants_sequence = std::cell::Cell::new(false);
    let _ = T::deserialize(Probe(&wants_sequence));
    wants_sequence.get()
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        // A declared length over the limit is refused before a byte is read (and before hyper
        // sends `100 Continue`), rather than after a megabyte has been received.
        if let Some(limit) = limit {
            let declared = req
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit as u64) {
                return Err(ApiError::BodyTooLarge(limit));
            }
        }
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let read = Bytes::from_request(req, state);
        // A body still arriving at the request's deadline is the client's fault (408), not a
        // stuck handler (500). This timer ends at the very instant the deadline layer's own
        // timer was computed from, never later, and that layer polls the request before its
        // timer, so this answer is the one the caller gets.
        let read = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), read)
                .await
                .map_err(|_| ApiError::RequestTimeout("body"))?,
            None => read.await,
        };
        let bytes = read.map_err(|e: BytesRejection| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge(limit.unwrap_or_default())
            } else {
                ApiError::BadInput("The request body could not be read.".into())
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::BadInput(
                "A JSON request body is required.".into(),
            ));
        }
        let first = bytes
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        let (opening, kind) = if reads_a_sequence::<T>() {
            (b'[', "array")
        } else {
            (b'{', "object")
        };
        if first != Some(&opening) {
            return Err(ApiError::BadInput(format!(
                "The request body must be a JSON {kind} for this call."
            )));
        }
        // serde_json's default recursion limit (128) bounds deeply nested input.
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::BadInput(format!(
                "The request body is not valid JSON for this call: {e}"
            ))
        })
    }
}

/// The `{taskId}` path segment, parsed as a canonical UUID.
pub(crate) struct TaskIdPath(pub(crate) Uuid);

impl<S: Send + Sync> FromRequestParts<S> for TaskIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::BadInput("The task ID in the path is not valid.".into()))?;
        Ok(TaskIdPath(sitegate_model::task::parse_task_id(&raw)?))
    }
}

/// The site a request came from over the peer link; `None` for the client API. Never fails.
pub(crate) struct Origin(pub(crate) Option<sitegate_model::site::SiteName>);

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Origin(
            parts
                .extensions
                .get::<crate::layers::PeerOrigin>()
                .map(|p| p.0.clone()),
        ))
    }
}

/// What a forwarded request carries along: the operation ID, the caller's `Accept`, and the
/// deadline. Never fails.
#[derive(Clone)]
pub(crate) struct RequestMeta {
    pub(crate) operation_id: Option<sitegate_model::operation::OperationId>,
    pub(crate) accept: Option<axum::http::HeaderValue>,
    pub(crate) deadline: Option<std::time::Instant>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestMeta {
            operation_id: parts.extensions.get().cloned(),
            accept: parts.headers.get(axum::http::header::ACCEPT).cloned(),
            deadline: parts
                .extensions
                .get::<crate::layers::Deadline>()
                .map(|d| d.0),
        })
    }
}

/// A single `{site}` path segment, undecoded-safe.
pub(crate) struct SitePath(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for SitePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::BadInput("The site in the path is not valid.".into()))?;
        Ok(SitePath(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Object {
        a: Option<u8>,
    }

    #[derive(serde::Deserialize)]
    #[serde(tag = "type")]
    #[allow(dead_code)]
    enum Tagged {
        One { a: u8 },
    }

    #[test]
    fn sequences_are_told_from_objects() {
        assert!(reads_a_sequence::<Vec<String>>());
        assert!(reads_a_sequence::<(u8, u8)>());
        assert!(!reads_a_sequence::<Object>());
        assert!(!reads_a_sequence::<Tagged>());
        assert!(!reads_a_sequence::<std::collections::HashMap<String, u8>>());
    }
}
