//! `GET /v1/models` and `GET /v1/models/{id}`.

use axum::extract::State;
use axum::Json;

use crate::engine::ModelInfo;
use crate::error::ApiError;
use crate::openai::{ModelCard, ModelList};
use crate::routes::PathId;
use crate::validate::check_model;
use crate::AppState;

fn card(info: &ModelInfo) -> ModelCard {
    ModelCard {
        id: info.id.clone(),
        object: "model",
        created: info.created,
        owned_by: "chorus",
        max_model_len: info.max_seq_tokens,
    }
}

pub async fn list(State(app): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let engine = app.engine()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![card(&engine.info)],
    }))
}

pub async fn get(
    State(app): State<AppState>,
    PathId(id): PathId,
) -> Result<Json<ModelCard>, ApiError> {
    let engine = app.engine()?;
    if id.is_empty() {
        return Err(ApiError::ModelNotFound("no model id given".into()));
    }
    check_model(&engine.info, Some(&id))?;
    Ok(Json(card(&engine.info)))
}
