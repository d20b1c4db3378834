//! HTTP handlers, one file per endpoint family, and the pieces they share.

pub mod chat;
pub mod health;
pub mod models;
pub mod responses;
pub mod scheduler;
pub mod tokenize;
pub mod web;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header;
use axum::http::request::Parts;
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;

use crate::error::ApiError;
use crate::openai::WireSampling;
use crate::AppState;

/// The `{id}` of a route's path, percent-decoded; one that does not decode to UTF-8 is
/// a 400 in the API's error envelope, like every other bad field.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            Err(rejection) => Err(ApiError::bad("id", rejection.body_text())),
        }
    }
}

/// A JSON request body, read whole within `--body-timeout` and `--max-request-bytes`
/// but not parsed: parsing a large body is CPU work, done with the rest of the
/// request's preprocessing off the async runtime ([`crate::prep`]).
pub struct JsonBody(Bytes);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &AppState) -> Result<Self, Self::Rejection> {
        // A compressed body would be read as malformed JSON (or, for an unknown coding,
        // taken as plain): say what is wrong instead (RFC 9110: 415), whatever the type.
        let encoding = req
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        if let Some(encoding) = encoding {
            return Err(ApiError::UnsupportedEncoding(encoding));
        }
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json);
        if !json {
            return Err(ApiError::BadRequest {
                message: "expected a JSON body with `Content-Type: application/json`".into(),
                param: None,
            });
        }
        let limits = app.http_limits();
        let read = axum::body::to_bytes(req.into_body(), limits.max_request_bytes);
        match tokio::time::timeout(limits.body_timeout, read).await {
            Err(_) => Err(ApiError::BodyTimeout(limits.body_timeout.as_secs())),
            Ok(Err(e)) if is_length_limit(&e) => Err(ApiError::PayloadTooLarge),
            Ok(Err(e)) if client_left(&e) => Err(ApiError::ClientLeft),
            Ok(Err(e)) => Err(ApiError::BadRequest {
                message: format!("could not read the request body: {e}"),
                param: None,
            }),
            Ok(Ok(bytes)) => Ok(JsonBody(bytes)),
        }
    }
}

impl JsonBody {
    /// Parses the body (call it off the runtime); errors name what is wrong as axum's
    /// JSON extractor does, and `param` names the field at fault.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        // Every request body is an object: serde would read a struct from an array by
        // position (`[null, "hi"]` as `model` and `input`).
        let first = self.0.iter().find(|b| !b.is_ascii_whitespace());
        if matches!(first, Some(b'[')) {
            return Err(ApiError::BadRequest {
                message: "the request body must be a JSON object, not an array".into(),
                param: None,
            });
        }
        match Json::<T>::from_bytes(&self.0) {
            Ok(Json(value)) => Ok(value),
            Err(JsonRejection::JsonDataError(e)) => {
                // A key given twice, which serde's derive refuses, is taken at its last
                // value, as Python's and JavaScript's JSON readers (and so vLLM) take it:
                // a `Value` keeps the last one.
                let Ok(body) = serde_json::from_slice::<Value>(&self.0) else {
                    return Err(JsonRejection::from(e).into());
                };
                T::deserialize(&body).map_err(|_| {
                    field_at_fault::<T, WireSampling>(&body)
                        .unwrap_or_else(|| JsonRejection::from(e).into())
                })
            }
            Err(rejection) => Err(rejection.into()),
        }
    }
}

/// For a body that is a JSON object but not a `T`, an error naming the top-level field at
/// fault: the first key of serde's path to the error; else a missing top-level field;
/// else (the fields of `Flat`, read flattened into `T`, lose their path in serde's
/// message) the first key of the path when the body is read as a `Flat` alone. At most
/// two more reads of the body, whatever it holds.
fn field_at_fault<T: DeserializeOwned, Flat: DeserializeOwned>(body: &Value) -> Option<ApiError> {
    body.as_object()?;
    let error = serde_path_to_error::deserialize::<_, T>(body).err()?;
    let original = error.inner().to_string();
    let named = |param: String| ApiError::BadField {
        message: format!("invalid request: `{param}`: {original}"),
        param,
    };
    let first_key = |path: &serde_path_to_error::Path| match path.iter().next() {
        Some(Segment::Map { key }) => Some(key.clone()),
        _ => None,
    };
    if let Some(key) = first_key(error.path()) {
        return Some(named(key));
    }
    if let Some(missing) = original
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        return Some(named(missing.to_string()));
    }
    let flat = serde_path_to_error::deserialize::<_, Flat>(body).err()?;
    first_key(flat.path()).map(named)
}

/// `e` and every error beneath it.
fn causes(e: &axum::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |s| {
        s.source()
    })
}

fn is_length_limit(e: &axum::Error) -> bool {
    causes(e).any(|s| s.is::<http_body_util::LengthLimitError>())
}

/// The body ended because the connection did (closed or reset before the length it
/// promised), not because of what was in it.
fn client_left(e: &axum::Error) -> bool {
    use std::io::ErrorKind;
    causes(e).any(|s| {
        match (
            s.downcast_ref::<hyper::Error>(),
            s.downcast_ref::<std::io::Error>(),
        ) {
            (Some(h), _) => h.is_incomplete_message(),
            (_, Some(io)) => matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    })
}

/// `application/json` or any `application/*+json` type, parameters aside.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

/// The id a request carries through logs, response headers and completion ids.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

#[cfg(test)]
mod tests {
    #![allow(dead_code)] // the fields exist to be deserialized
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Deserialize)]
    struct Sampling {
        temperature: Option<f64>,
        max_tokens: Option<u32>,
    }

    #[derive(Deserialize)]
    struct Request {
        messages: Vec<String>,
        stream: Option<bool>,
        #[serde(flatten)]
        sampling: Sampling,
    }

    fn param(body: Value) -> Option<String> {
        match field_at_fault::<Request, Sampling>(&body) {
            Some(ApiError::BadField { param, .. }) => Some(param),
            _ => None,
        }
    }

    #[test]
    fn the_field_at_fault_is_named() {
        let named = |body: Value, field: &str| assert_eq!(param(body).as_deref(), Some(field));
        // Flattened: serde's own message does not say which.
        named(
            json!({"messages": ["a"], "temperature": "hot"}),
            "temperature",
        );
        // On serde's path, and missing.
        named(json!({"messages": "a"}), "messages");
        named(json!({"messages": ["a"], "stream": "yes"}), "stream");
        named(json!({"temperature": 1.0}), "messages");
        // Inside a field: that field, not the nested one's name.
        named(json!({"messages": [1]}), "messages");
        // Two bad fields: one of them, never a valid one.
        let both = param(
            json!({"messages": ["a"], "stream": false, "temperature": "hot", "max_tokens": "4"}),
        );
        assert_eq!(both.as_deref(), Some("temperature"));
        // Not an object: no name.
        assert_eq!(param(json!(["a"])), None);
    }
}
