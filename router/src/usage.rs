//! `GET /v1/usage`: the usage ledger's rows (per tenant x model x tier: requests by outcome, tokens, GPU-seconds).
//! A tenant's key sees its own rows; an admin key sees every tenant's (`?tenant=NAME` narrows to one).

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use policies::errors::ApiError;
use serde::Deserialize;

use crate::error::respond;
use crate::shared::AppState;

/// Query parameters.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    /// Only this tenant (admin keys).
    tenant: Option<String>,
}

/// The handler.
pub async fn usage(
    State(app): State<Arc<AppState>>,
    Query(q): Query<UsageQuery>,
    req: Request,
) -> Response {
    let request_id = crate::ids::request_id(req.headers());
    let Some(adm) = &app.admission else {
        let e = ApiError::new(
            404,
            "invalid_request_error",
            "Usage accounting is off on this router (admission.enabled: false).",
        )
        .with_code("usage_disabled");
        return respond(&e, &request_id);
    };
    let key = crate::gate::api_key(req.headers());
    let rows = if adm.is_admin(key) {
        match &q.tenant {
            Some(t) => adm.usage(t),
            None => adm.usage_all(),
        }
    } else {
        match adm.identify(key) {
            Ok(who) => {
                if q.tenant.as_deref().is_some_and(|t| t != &*who.tenant) {
                    let e = ApiError::new(
                        403,
                        "permission_error",
                        "Only an admin key may read another tenant's usage.",
                    )
                    .with_code("permission_denied");
                    return respond(&e, &request_id);
                }
                adm.usage(&who.tenant)
            }
            Err(r) => return respond(&r.to_api_error(), &request_id),
        }
    };
    axum::Json(serde_json::json!({"object": "list", "data": rows})).into_response()
}
