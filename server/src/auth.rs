//! Access control: `--api-key` (a bearer token on the API routes, compared in constant
//! time) and `--cors-origin`.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::AppState;

/// The key `--api-key` sets, without surrounding whitespace (a key read from a file
/// often ends with a newline; presented keys are trimmed too); none when it is empty.
pub fn configured_key(key: Option<&str>) -> Option<&str> {
    key.map(str::trim).filter(|k| !k.is_empty())
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal digests, compared without an early exit, so timing says nothing about how much
/// of a guessed key was right (and hashing first hides its length).
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lets a request through when no key is configured or it carries the right bearer token.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.api_key_digest() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .map(|k| digest(k.trim()));
    match given {
        Some(d) if same(&d, expected) => next.run(req).await,
        Some(_) => ApiError::Unauthorized("the API key is not valid".into()).into_response(),
        None => ApiError::Unauthorized(
            "this server needs an API key: send `Authorization: Bearer <key>`".into(),
        )
        .into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme's name is
/// case-insensitive (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// The CORS layer for `--cors-origin`, if one was given.
pub fn cors(origin: Option<&str>) -> Option<CorsLayer> {
    let origin = origin.filter(|o| !o.is_empty())?;
    let allow = if origin == "*" {
        AllowOrigin::any()
    } else {
        AllowOrigin::exact(HeaderValue::from_str(origin).ok()?)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            // Browser OpenAI clients send their own headers (the official SDK's
            // `x-stainless-*`, `openai-organization`…): whatever an allowed origin asks
            // to send is allowed; the key check still applies to the request itself.
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(std::time::Duration::from_secs(600))
            // The request id, and when to try again after a 429 or a 503.
            .expose_headers([
                header::HeaderName::from_static("x-request-id"),
                header::RETRY_AFTER,
            ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_equal_only_for_the_same_key() {
        assert!(same(&digest("secret"), &digest("secret")));
        assert!(!same(&digest("secret"), &digest("secreT")));
        assert!(!same(&digest("secret"), &digest("")));
    }

    #[test]
    fn a_key_with_surrounding_whitespace_is_the_key_without_it() {
        assert_eq!(configured_key(Some("secret\n")), Some("secret"));
        assert_eq!(configured_key(Some("  secret \r\n")), Some("secret"));
        assert_eq!(configured_key(Some(" \n")), None);
        assert_eq!(configured_key(None), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer k"), Some("k"));
        assert_eq!(bearer_token("bearer k"), Some("k"));
        assert_eq!(bearer_token("BEARER k"), Some("k"));
        assert_eq!(bearer_token("Basic k"), None);
        assert_eq!(bearer_token("Bearerk"), None);
        assert_eq!(bearer_token("k"), None);
    }

    #[test]
    fn cors_is_off_unless_asked() {
        assert!(cors(None).is_none());
        assert!(cors(Some("")).is_none());
        assert!(cors(Some("*")).is_some());
        assert!(cors(Some("http://localhost:3000")).is_some());
    }
}
