//! Flow and metrics endpoints: a flow's events in order with its latencies, per-tool and
//! end-to-end latency figures, and the loaded tools.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::flows::{self, FlowError};
use crate::plugin::PluginStore;

fn index(st: &AppState) -> Result<&PluginStore, ApiError> {
    st.flows.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "flows_disabled",
            "this host runs without the flow index",
        )
    })
}

fn flow_error(e: FlowError) -> ApiError {
    match e {
        FlowError::NotFound(_) => ApiError::not_found(e.to_string()),
        FlowError::Storage(_) => ApiError::unavailable(e.to_string()),
    }
}

/// `GET /v1/flows/{correlation_id}`.
pub(super) async fn get_flow(
    State(st): State<AppState>,
    Path(correlation): Path<String>,
) -> Result<Json<flows::Flow>, ApiError> {
    let store = index(&st)?;
    flows::flow(store, &*st.log, &correlation, st.config.max_read_bytes)
        .await
        .map(Json)
        .map_err(flow_error)
}

/// `GET /v1/metrics`.
pub(super) async fn get_metrics(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = index(&st)?;
    let mut m = flows::metrics(store).map_err(flow_error)?;
    m["head"] = json!(st.log.head());
    Ok(Json(m))
}

/// `GET /v1/tools`.
pub(super) async fn list_tools(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let tools: Vec<Value> = match &st.registry {
        Some(reg) => reg
            .list()
            .await
            .into_iter()
            .filter_map(|p| {
                p.tool.map(|t| {
                    json!({
                        "name": t.name,
                        "description": t.description,
                        "input_schema": t.input_schema,
                        "plugin": crate::plugin::PluginId::new(&p.name, &p.version).as_str(),
                        "state": p.status.state,
                    })
                })
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(Json(json!({ "tools": tools })))
}
