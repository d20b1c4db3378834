//! `GET /health`: 200 once the model is loaded and the inference thread is alive, 503
//! before, after, and while draining on shutdown (so a router or a readiness probe that
//! still reaches the server stops sending it work). `GET /metrics`: Prometheus exposition.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

pub async fn health(State(app): State<AppState>) -> Response {
    match app.engine() {
        Ok(engine) if engine.stats.draining.load(Ordering::Acquire) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "message": "the server is shutting down"})),
        )
            .into_response(),
        Ok(engine) if engine.is_alive() => {
            let s = &engine.stats;
            let body = json!({
                "status": "ok",
                "model": engine.info.id,
                "running": s.running.load(Ordering::Acquire),
                "queued": s.queued.load(Ordering::Acquire),
                "kv_blocks_used": s.kv_blocks_used.load(Ordering::Acquire),
                "kv_blocks_total": s.kv_blocks_total.load(Ordering::Acquire),
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message": "the inference thread has stopped"})),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "message": e.to_string()})),
        )
            .into_response(),
    }
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    let stats = app.engine().ok().map(|e| e.stats.as_ref());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics().render(stats),
    )
        .into_response()
}
