//! `ApiError`: every failure a client can see, mapped once to an HTTP status and the
//! OpenAI error envelope `{"error": {"message", "type", "param", "code"}}`.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use thiserror::Error;

/// The status counted for a request whose client went away before its response
/// (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

#[derive(Debug, Error)]
pub enum ApiError {
    /// A field is missing, malformed or out of range.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// A field of the body is not what its type says; the field is the client's.
    #[error("{message}")]
    BadField { message: String, param: String },
    /// The prompt does not fit in what one sequence may hold (OpenAI's
    /// `context_length_exceeded`, which clients read to trim a conversation).
    #[error("{message}")]
    ContextLength { message: String, param: String },
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    RouteNotFound(String),
    /// Something the request names (a stored response) does not exist.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<&'static str>,
        code: &'static str,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("request body is larger than this server accepts (--max-request-bytes)")]
    PayloadTooLarge,
    #[error("the request body did not arrive within {0} s (--body-timeout)")]
    BodyTimeout(u64),
    /// A `Content-Encoding` the server does not decode.
    #[error("`Content-Encoding: {0}` is not supported: send the body uncompressed")]
    UnsupportedEncoding(String),
    /// The client closed its connection before its body arrived: no one reads the
    /// answer, which is only counted (as nginx's 499).
    #[error("the client closed the connection before its request body arrived")]
    ClientLeft,
    /// `asked`: the places the refused request needed (a completions batch, one per
    /// prompt).
    #[error("the server is at capacity ({queued} requests waiting{}); retry later", batch(*asked))]
    Overloaded {
        queued: usize,
        asked: usize,
        retry_after_s: u64,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::BadField { .. }
            | ApiError::ContextLength { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) | ApiError::NotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::ClientLeft => {
                StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's body, also used for an error event inside a stream.
    pub fn body(&self) -> ErrorBody {
        let (kind, code) = match self {
            ApiError::BadRequest { .. } | ApiError::BadField { .. } => {
                ("invalid_request_error", None)
            }
            ApiError::ContextLength { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::RouteNotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::NotFound { code, .. } => ("invalid_request_error", Some(*code)),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::MethodNotAllowed(_) => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::PayloadTooLarge => ("invalid_request_error", Some("request_too_large")),
            ApiError::BodyTimeout(_) => ("invalid_request_error", Some("request_timeout")),
            ApiError::UnsupportedEncoding(_) => {
                ("invalid_request_error", Some("unsupported_encoding"))
            }
            ApiError::ClientLeft => ("invalid_request_error", Some("client_closed_request")),
            ApiError::Overloaded { .. } => ("server_overloaded", Some("overloaded")),
            ApiError::Unavailable(_) => ("service_unavailable", Some("unavailable")),
            // OpenAI's type for its 500s.
            ApiError::Internal(_) => ("server_error", Some("internal_error")),
        };
        let param = match self {
            ApiError::BadRequest { param, .. } | ApiError::NotFound { param, .. } => {
                param.map(str::to_string)
            }
            ApiError::BadField { param, .. } => Some(param.clone()),
            ApiError::ContextLength { param, .. } => Some(param.clone()),
            ApiError::ModelNotFound(_) => Some("model".to_string()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            // Loading, draining, a queue wait past --request-timeout: the server refusing
            // work by design, which under overload comes once per request.
            ApiError::Unavailable(_) => tracing::warn!(%status, error = %self, "request refused"),
            _ if status.is_server_error() => {
                tracing::error!(%status, error = %self, "request failed")
            }
            _ => tracing::debug!(%status, error = %self, "request rejected"),
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        match self {
            ApiError::Overloaded { retry_after_s, .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            // Loading, draining, a queue wait past --request-timeout: a client or a
            // router may try again (elsewhere) in a second.
            ApiError::Unavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may still be on its way: the connection cannot carry
            // another request, and says so (RFC 9110's 408).
            ApiError::BodyTimeout(_) => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::NotFound(id) => ApiError::NotFound {
                message: format!("Response with id {} not found.", quoted_id(&id)),
                param: None,
                code: "not_found",
            },
            e => ApiError::Internal(e.to_string()),
        }
    }
}

/// An id a client sent, quoted for a message: a long one is cut (an id of 100 KB would
/// otherwise come back whole in every error about it).
/// What an over-capacity message adds for a batch, which may be refused with no request
/// waiting: it needs a place for each of its prompts at once.
fn batch(asked: usize) -> String {
    match asked {
        0 | 1 => String::new(),
        n => format!(", and this batch of {n} prompts needs {n} places at once"),
    }
}

pub fn quoted_id(id: &str) -> String {
    const SHOWN: usize = 64;
    match id.char_indices().nth(SHOWN) {
        None => format!("{id:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &id[..cut], id.len()),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::PayloadTooLarge;
        }
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "expected a JSON body with `Content-Type: application/json`".to_string()
            }
            JsonRejection::JsonSyntaxError(_) => {
                format!("malformed JSON: {}", rejection.body_text())
            }
            JsonRejection::JsonDataError(_) => {
                format!("invalid request: {}", rejection.body_text())
            }
            _ => rejection.body_text(),
        };
        ApiError::BadRequest {
            message,
            param: None,
        }
    }
}
