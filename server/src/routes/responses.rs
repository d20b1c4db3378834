//! `POST /v1/responses`, and `GET` / `DELETE /v1/responses/{id}`,
//! `GET /v1/responses/{id}/input_items` for stored responses;
//! `POST /v1/responses/input_tokens` to count a request's input.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::error::ApiError;
use crate::reasoning::Splitter;
use crate::responses::events::{self, Streamed};
use crate::responses::pages::Page;
use crate::responses::wire::{new_id, Deleted, InputTokens, Item, ItemList, ResponseObject};
use crate::responses::{self, finish, output};
use crate::routes::{JsonBody, PathId, RequestId};
use crate::store::Store;
use crate::{sse, stream, AppState};

pub async fn create(
    State(app): State<AppState>,
    Extension(RequestId(rid)): Extension<RequestId>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    let info = engine.info.clone();
    let (limits, store) = (app.limits(), app.store());
    let prepared = app
        .prep()
        .run(move || responses::prepare(&info, limits, store, rid, body.parse()?))
        .await?;
    let mut response = prepared.response;
    let mut rx = engine.submit(prepared.gen)?;
    if prepared.stream {
        let first = stream::first_event(&mut rx).await?;
        let streamed = Streamed {
            response,
            reader: prepared.reader,
            thinking: prepared.thinking,
            keep: prepared.keep,
            metrics: app.metrics_handle(),
        };
        return Ok(sse::response(events::stream(streamed, first, rx)));
    }
    let mut done = stream::collect(rx, 1, 1).await?;
    let answer = done.choices.pop().unwrap_or_default();
    let finish_reason = answer.finish.unwrap_or(crate::engine::FinishReason::Stop);
    // A thinking model's block is its reasoning item; the rest is the answer.
    let (reasoning, text) = match prepared.thinking {
        Some(start) => {
            let (parts, tokens) =
                Splitter::split_counted(start, &answer.text, &answer.pieces, answer.tokens);
            done.usage = done.usage.with_reasoning(tokens);
            let item = (!parts.reasoning.is_empty())
                .then(|| Item::reasoning(new_id("rs"), parts.reasoning));
            (item, parts.content)
        }
        None => (None, answer.text),
    };
    let answer = output(
        prepared.reader.as_ref(),
        reasoning,
        text,
        finish_reason,
        None,
    );
    finish(&mut response, answer, done.usage, app.metrics());
    if let Some(keep) = &prepared.keep {
        responses::keep(keep, &mut response).await;
    }
    Ok(Json(response).into_response())
}

/// `POST /v1/responses/input_tokens`: the tokens a request's input would take, counted
/// as `POST /v1/responses` renders it (the chain of `previous_response_id`, the
/// instructions, the tools offered), so the count is exactly what a response would use.
pub async fn input_tokens(
    State(app): State<AppState>,
    Extension(RequestId(rid)): Extension<RequestId>,
    body: JsonBody,
) -> Result<Json<InputTokens>, ApiError> {
    let info = app.engine()?.info.clone();
    let (limits, store) = (app.limits(), app.store());
    let input_tokens = app
        .prep()
        .run(move || {
            responses::prepare(&info, limits, store, rid, body.parse()?).map(|p| p.gen.prompt.len())
        })
        .await?;
    Ok(Json(InputTokens {
        object: "response.input_tokens",
        input_tokens,
    }))
}

pub async fn get(
    State(app): State<AppState>,
    PathId(id): PathId,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ResponseObject>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad("query", e.body_text()))?;
    // OpenAI streams a retrieval only for background responses, which this server does
    // not run: said, rather than answered with plain JSON an SDK reads as no events.
    if query.get("stream").is_some_and(|v| v == "true") {
        return Err(ApiError::bad(
            "stream",
            "a stored response cannot be streamed again (only background responses can, which this server does not run)",
        ));
    }
    let row = blocking(app.store_or_404()?, move |s| s.get(&id)).await?;
    let response = serde_json::from_str(&row.response)
        .map_err(|e| ApiError::Internal(format!("stored response is unreadable: {e}")))?;
    Ok(Json(response))
}

/// A page of the items, as `limit`, `order`, `after` and `before` ask ([`Page`]).
pub async fn input_items(
    State(app): State<AppState>,
    PathId(id): PathId,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ItemList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad("query", e.body_text()))?;
    let page = Page::from_query(&query)?;
    let row = blocking(app.store_or_404()?, move |s| s.get(&id)).await?;
    let items: Vec<Item> = serde_json::from_str(&row.input)
        .map_err(|e| ApiError::Internal(format!("stored input is unreadable: {e}")))?;
    Ok(Json(page.of(items)?))
}

/// `POST /v1/responses/{id}/cancel`: only background responses can be cancelled, and
/// this server runs none; a stored response is a 400 saying so, an unknown one a 404.
pub async fn cancel(
    State(app): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<ResponseObject>, ApiError> {
    blocking(app.store_or_404()?, move |s| s.get(&id)).await?;
    Err(ApiError::bad(
        "response_id",
        "only background responses can be cancelled, and this server runs none (a response is finished when it is stored)",
    ))
}

pub async fn delete(
    State(app): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<Deleted>, ApiError> {
    let key = id.clone();
    let deleted = blocking(app.store_or_404()?, move |s| s.delete(&key)).await?;
    if !deleted {
        return Err(crate::store::StoreError::NotFound(id).into());
    }
    Ok(Json(Deleted {
        id,
        object: "response.deleted",
        deleted: true,
    }))
}

/// Runs a store call off the async runtime.
async fn blocking<T: Send + 'static>(
    store: Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ApiError::Internal(format!("store call panicked: {e}")))?
        .map_err(ApiError::from)
}
