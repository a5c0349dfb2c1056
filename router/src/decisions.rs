//! `/debug/decisions` and `/debug/prefix` handlers. `/debug/prefix` lists each cache-aware pool's index and the
//! blocks it believes every pod holds. `/debug/decisions`: the newest routing decisions (`?limit=N`, default 20) and one by request id (the
//! `x-weir-decision-id` response header); an unknown id is a 404 in the OpenAI error shape. Records are explained
//! here, on read (see [`crate::route::LazyDecision`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use hyper::header::HeaderValue;
use policies::errors::ApiError;
use serde::Deserialize;

use crate::error::respond;
use crate::shared::AppState;

/// Query of `GET /debug/decisions`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Newest records to return (default 20, at most the ring size).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `GET /debug/decisions?limit=N`: newest first.
pub async fn list(State(app): State<Arc<AppState>>, Query(q): Query<ListQuery>) -> Response {
    let routing = app.snapshot.load().routing.clone();
    let lazy: Vec<_> = routing
        .ring
        .lock()
        .newest(q.limit.unwrap_or(20))
        .cloned()
        .collect();
    let records: Vec<_> = lazy.iter().map(|d| d.explain()).collect();
    axum::Json(serde_json::json!({"object": "list", "data": records})).into_response()
}

/// `GET /debug/decisions/{request_id}`.
pub async fn one(State(app): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let routing = app.snapshot.load().routing.clone();
    let lazy = routing.ring.lock().get(&id).cloned();
    match lazy {
        Some(d) => axum::Json(d.explain()).into_response(),
        None => {
            let e = ApiError::new(
                404,
                "invalid_request_error",
                format!("No routing decision is recorded for request `{id}` (unknown, or evicted from the ring)."),
            )
            .with_code("decision_not_found");
            let rid = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("unknown"));
            respond(&e, &rid)
        }
    }
}

/// `GET /debug/prefix`: per cache-aware pool, the index kind and blocks held per endpoint.
pub async fn prefix(State(app): State<Arc<AppState>>) -> Response {
    let snap = app.snapshot.load();
    let pools: Vec<_> = snap
        .pools
        .iter()
        .filter_map(|p| {
            let c = p.cache.as_ref()?;
            let eps: Vec<_> = p
                .endpoints
                .iter()
                .zip(&c.slots)
                .map(|(e, s)| {
                    serde_json::json!({
                        "id": e.id.as_str(), "role": e.role.as_str(), "kv_events": e.kv_events,
                        "blocks": s.map_or(0, |s| c.pool.held_blocks(s)),
                    })
                })
                .collect();
            Some(serde_json::json!({
                "name": &*p.name, "policy": crate::route::describe(&c.pool.cfg), "pd": c.pd, "endpoints": eps,
            }))
        })
        .collect();
    axum::Json(serde_json::json!({"pools": pools})).into_response()
}
