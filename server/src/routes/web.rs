//! `GET /`: the chat page, and `GET /scheduler`: the live scheduler view, both compiled
//! into the binary.

use axum::response::Html;

const INDEX: &str = include_str!("../../../web/index.html");
const SCHEDULER: &str = include_str!("../../../web/scheduler.html");

pub async fn index() -> Html<&'static str> {
    Html(INDEX)
}

pub async fn scheduler() -> Html<&'static str> {
    Html(SCHEDULER)
}
