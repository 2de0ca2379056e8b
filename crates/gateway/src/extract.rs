//! Extractors that fail with the API's envelope instead of axum's plain-text rejections.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;

/// The body limit the router enforces, for the 413 message.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON body. Malformed JSON, a wrong shape, unknown fields and oversized bodies are all
/// `BadUserInput` (413 for the last) with a message that says what was wrong.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::BodyTooLarge(limit)
                } else {
                    ApiError::BadInput("The request body could not be read.".into())
                }
            })?;
        if bytes.is_empty() {
            return Err(ApiError::BadInput(
                "A JSON request body is required.".into(),
            ));
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
pub struct TaskIdPath(pub Uuid);

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
pub struct Origin(pub Option<sitegate_model::site::SiteName>);

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
pub struct RequestMeta {
    pub operation_id: Option<sitegate_model::operation::OperationId>,
    pub accept: Option<axum::http::HeaderValue>,
    pub deadline: Option<std::time::Instant>,
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
pub struct SitePath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SitePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::BadInput("The site in the path is not valid.".into()))?;
        Ok(SitePath(raw))
    }
}
