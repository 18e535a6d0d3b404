//! Failure handling and validation endpoints: quarantine resume, the dead-letter store, and
//! the schema registry.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiQuery, Body};
use super::plugins::registry;
use super::{ApiError, AppState, parse_json};
use crate::dead_letter::{DeadLetterId, InvalidDeadLetterId};
use crate::schemas::{SchemaError, Schemas, Violation};

/// `POST /v1/plugins/{name}/resume`: clears a quarantine.
pub(super) async fn resume(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let reg = registry(&st)?;
    let was = reg.resume(&name).await.map_err(ApiError::from)?;
    Ok(Json(json!({"plugin": name, "was_quarantined": was})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DlqQuery {
    plugin: Option<String>,
}

/// `GET /v1/dlq?plugin=`: dead letters, of one plugin or of all.
pub(super) async fn list_dead_letters(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<DlqQuery>,
) -> Result<Json<Value>, ApiError> {
    let reg = registry(&st)?;
    let list = reg
        .dead_letters(q.plugin.as_deref())
        .await
        .map_err(ApiError::from)?;
    Ok(Json(json!({"dead_letters": list})))
}

/// 400 unless `id` has the form of a dead-letter id, `<plugin>.<position>`; a well-formed
/// id that names nothing is the registry's 404.
fn dead_letter_id(id: &str) -> Result<DeadLetterId, ApiError> {
    id.parse().map_err(|e: InvalidDeadLetterId| {
        ApiError::bad_request("invalid_dead_letter_id", format!("{e} (see GET /v1/dlq)"))
    })
}

/// `POST /v1/dlq/{id}/retry`: runs the event through its plugin again.
pub(super) async fn retry_dead_letter(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = dead_letter_id(&id)?;
    let reg = registry(&st)?;
    let outcome = reg.retry_dead_letter(&id).await?;
    Ok(Json(json!(outcome)))
}

/// `DELETE /v1/dlq/{id}`: drops a dead letter.
pub(super) async fn delete_dead_letter(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = dead_letter_id(&id)?;
    let reg = registry(&st)?;
    reg.delete_dead_letter(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn schemas(st: &AppState) -> Result<&Schemas, ApiError> {
    st.schemas.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "schemas_disabled",
            "this host runs without a schema registry",
        )
    })
}

impl From<SchemaError> for ApiError {
    fn from(e: SchemaError) -> Self {
        match e {
            SchemaError::Invalid(m) => ApiError::bad_request("invalid_schema", m),
            e @ SchemaError::NotFound(_) => {
                ApiError::not_found(format!("{e}; see GET /v1/schemas"))
            }
            SchemaError::Storage(m) => ApiError::unavailable(m),
        }
    }
}

/// `PUT /v1/schemas/{pattern}`: registers the body (a JSON Schema) for matching types.
pub(super) async fn put_schema(
    State(st): State<AppState>,
    Path(pattern): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let schemas = schemas(&st)?;
    let schema: Value = parse_json(&body)?;
    let info = schemas.put(&pattern, &schema).map_err(ApiError::from)?;
    Ok(Json(json!(info)))
}

/// `GET /v1/schemas`: every registered schema.
pub(super) async fn list_schemas(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"schemas": schemas(&st)?.list()})))
}

/// `DELETE /v1/schemas/{pattern}`.
pub(super) async fn delete_schema(
    State(st): State<AppState>,
    Path(pattern): Path<String>,
) -> Result<StatusCode, ApiError> {
    schemas(&st)?.delete(&pattern).map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// 422 for an append whose event at `index` violates a schema.
pub(super) fn violation(index: usize, v: Violation) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "schema_violation",
        format!("event {index}: {v}; nothing was appended"),
    )
    .with("index", json!(index))
    .with("event_type", json!(v.event_type))
    .with("pattern", json!(v.pattern))
    .with("path", json!(v.path))
}
