//! HTTP handlers, one file per endpoint family, and the pieces they share.

pub mod chat;
pub mod health;
pub mod models;
pub mod tokenize;
pub mod web;

use axum::extract::{FromRequest, Request};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `Json<T>` whose rejection is our [`ApiError`], so malformed bodies get the OpenAI
/// envelope instead of axum's plain-text default.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

/// The id a request carries through logs, response headers and completion ids.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);
