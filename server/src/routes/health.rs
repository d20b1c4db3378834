//! `GET /health`: 200 once the model is loaded and the inference thread is alive, 503
//! before, after, and while draining on shutdown (so a router or a readiness probe that
//! still reaches the server stops sending it work). `GET /metrics`: Prometheus exposition.
//! `GET /v1/loads`: the load report in the schema SGLang defined and routers poll (smg's
//! load-aware policies and overload protection read it from workers of unknown type).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use chorus_model::kv::BLOCK_SIZE;

use crate::error::ApiError;
use crate::AppState;

pub async fn health(State(app): State<AppState>) -> Response {
    match app.engine() {
        // Draining or loading: passing states, said with a `Retry-After` as every other
        // 503 of this server says it.
        Ok(engine) if engine.stats.draining.load(Ordering::Acquire) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({"status": "draining", "message": "the server is shutting down"})),
        )
            .into_response(),
        Ok(engine) if engine.is_alive() => {
            let s = &engine.stats;
            let body = json!({
                "status": "ok",
                "model": engine.info.id,
                "device": engine.info.device,
                "running": s.running.load(Ordering::Acquire),
                "queued": s.waiting() + app.prep().waiting(),
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
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({"status": "loading", "message": e.to_string()})),
        )
            .into_response(),
    }
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), else Prometheus' classic
/// text format 0.0.4, as vLLM serves by default: in it a counter is typed by its
/// sample's name (`x_total`), so a 0.0.4 parser (older agents, sidecars) reads it as
/// the counter it is rather than as untyped.
pub async fn metrics(State(app): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let stats = app.engine().ok().map(|e| e.stats.as_ref());
    let page = app.metrics().render(stats, app.prep().waiting());
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, page) = match openmetrics {
        true => (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            page,
        ),
        false => (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::classic_text(&page),
        ),
    };
    ([(axum::http::header::CONTENT_TYPE, content_type)], page).into_response()
}

/// `GET /v1/loads`: this server's load, one entry (chorus has no data-parallel ranks), in
/// the fields routers read: requests running and waiting, KV tokens used of the pool,
/// and the prefix cache's hit rate since start. Fields chorus does not measure are left
/// out rather than reported as zero. 503 until the model is loaded.
pub async fn loads(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let engine = app.engine()?;
    let s = &engine.stats;
    let running = s.running.load(Ordering::Acquire);
    // Those waiting for a preprocessing thread (a big prompt or schema ahead) too.
    let waiting = s.waiting() + app.prep().waiting();
    let used = s.kv_blocks_used.load(Ordering::Acquire) * BLOCK_SIZE;
    let total = s.kv_blocks_total.load(Ordering::Acquire) * BLOCK_SIZE;
    let usage = used as f64 / total.max(1) as f64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(Json(json!({
        "timestamp": rfc3339(now.as_secs()),
        "dp_rank_count": 1,
        "loads": [{
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_total_reqs": running + waiting,
            "num_used_tokens": used,
            "max_total_num_tokens": total,
            "token_usage": usage,
            "utilization": usage,
            "cache_hit_rate": app.metrics().prefix_cache_hit_rate(),
            "max_running_requests": engine.max_running,
        }],
    })))
}

/// `secs` since the Unix epoch as an RFC 3339 UTC time (`2026-11-30T13:21:49Z`).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = chorus_model::template::civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_044_909), "2026-11-30T13:21:49Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
