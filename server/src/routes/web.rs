//! `GET /`: the chat page, compiled into the binary.

use axum::response::Html;

const INDEX: &str = include_str!("../../../web/index.html");

pub async fn index() -> Html<&'static str> {
    Html(INDEX)
}
