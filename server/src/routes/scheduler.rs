//! `GET /scheduler/stream`: the live scheduler view as server-sent events, one JSON
//! snapshot per event, at most one per `live::PUBLISH_EVERY` per client. A slow client is
//! never queued up: the worker keeps only the latest snapshot, and the next is taken only
//! once the previous one was written.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::State;
use axum::response::Response;

use crate::error::ApiError;
use crate::live::PUBLISH_EVERY;
use crate::{sse, AppState};

pub async fn stream(State(app): State<AppState>) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    // As `/health` says while draining or with the inference thread gone: a watcher is
    // told, not handed a stream that never sends.
    if engine.stats.draining.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable(
            "the server is shutting down".to_string(),
        ));
    }
    if !engine.is_alive() {
        return Err(ApiError::Unavailable(
            "the inference thread has stopped".to_string(),
        ));
    }
    let watcher = engine.live.subscribe();
    let stats = engine.stats.clone();
    let events =
        futures_util::stream::unfold((watcher, None::<Instant>), move |(mut watcher, last)| {
            let stats = stats.clone();
            async move {
                if let Some(last) = last {
                    tokio::time::sleep_until((last + PUBLISH_EVERY).into()).await;
                }
                // Ends on shutdown, so that it does not hold the drain up.
                if stats.draining.load(Ordering::Acquire) {
                    return None;
                }
                let snapshot = watcher.next().await?;
                Some((sse::frame(&*snapshot), (watcher, Some(Instant::now()))))
            }
        });
    Ok(sse::response(events))
}
