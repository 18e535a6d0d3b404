//! Extractors whose rejections answer in the API's error body, so a handler takes its
//! query and body already checked: a malformed query string is `400 invalid_query`, an
//! unreadable body `400 bad_body`, one past the body limit `413 too_large`.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;

use super::ApiError;

/// A query string parsed into `T`.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Self(q))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// The request body's bytes, read within the body limit.
pub(crate) struct Body(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Self)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(format!("request body is too large: {}", e.body_text()))
                } else {
                    ApiError::bad_request("bad_body", e.body_text())
                }
            })
    }
}
