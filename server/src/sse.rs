//! Server-sent events exactly as OpenAI clients parse them. Chat and completions: every
//! event is `data: <one-line JSON>\n\n`, the stream ends with `data: [DONE]\n\n`, and
//! there are no `event:`, `id:` or comment lines (several clients strip a fixed `data: `
//! prefix). Responses: each event is also named (`event: <type>\n`), with no `[DONE]`.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::Stream;
use serde::Serialize;

pub const DONE: &str = "data: [DONE]\n\n";

/// One event carrying `value` as single-line JSON.
pub fn frame<T: Serialize>(value: &T) -> String {
    // serde_json never emits raw newlines: strings escape them.
    let json = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"message":"serialization failed: {e}","type":"server_error","param":null,"code":null}}}}"#)
    });
    format!("data: {json}\n\n")
}

/// One named event (`event: <name>` then its data line), as the Responses API sends them.
pub fn named_frame<T: Serialize>(name: &str, value: &T) -> String {
    format!("event: {name}\n{}", frame(value))
}

/// A streaming response over already framed events.
pub fn response<S>(events: S) -> Response
where
    S: Stream<Item = String> + Send + 'static,
{
    use futures_util::StreamExt;
    let body = Body::from_stream(events.map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e))));
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    // The charset, as OpenAI's: clients that decode by the header (Python's
    // `requests`) read text as ISO-8859-1 without it.
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells reverse proxies (nginx) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_data_line_and_blank_line() {
        let f = frame(&serde_json::json!({"a": "line\nbreak", "b": 1}));
        assert_eq!(f, "data: {\"a\":\"line\\nbreak\",\"b\":1}\n\n");
        assert!(f.starts_with("data: "));
        assert_eq!(f.matches('\n').count(), 2);
    }

    #[test]
    fn named_frames_carry_their_name_first() {
        let f = named_frame("response.created", &serde_json::json!({"a": 1}));
        assert_eq!(f, "event: response.created\ndata: {\"a\":1}\n\n");
    }

    #[test]
    fn done_marker() {
        assert_eq!(DONE, "data: [DONE]\n\n");
    }
}
