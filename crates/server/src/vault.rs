//! The vault's admin API (`/api/v1/secrets`, `/api/v1/vault/rotate-master`) and the gateway's
//! credential source. Values go in and never come out: every answer is metadata.

use crate::admin::audited;
use crate::{App, error_response};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use palisade_vault::{Vault, VaultError};
use serde_json::{Value, json};
use std::sync::Arc;

/// The vault as the gateway sees it.
pub struct VaultCredentials(pub Arc<Vault>);

impl palisade_gateway::CredentialSource for VaultCredentials {
    fn reveal(&self, secret: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        self.0.reveal(secret).map_err(|e| e.to_string())
    }
}

fn vault_error(e: &VaultError) -> Response {
    let (status, code) = match e {
        VaultError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        VaultError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_secret"),
        VaultError::Integrity { .. } => (StatusCode::CONFLICT, "integrity"),
        VaultError::MasterKey(_) => (StatusCode::CONFLICT, "master_key"),
        VaultError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    error_response(status, code, &e.to_string(), None)
}

/// `GET /api/v1/secrets`: every secret's metadata.
pub async fn list(State(app): State<Arc<App>>) -> Response {
    axum::Json(json!({ "items": app.vault.list(), "master_key_id": app.vault.master_key_id() }))
        .into_response()
}

/// `GET /api/v1/secrets/{name}`: one secret's metadata (never its value).
pub async fn metadata(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.vault.metadata(&name) {
        Ok(m) => axum::Json(m).into_response(),
        Err(e) => vault_error(&e),
    }
}

/// `PUT /api/v1/secrets/{name}` with `{"value": "...", "description": "..."}`: stores a new
/// version. The answer is its metadata; the value is write-only.
pub async fn put(State(app): State<Arc<App>>, Path(name): Path<String>, body: Bytes) -> Response {
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let Ok(Value::Object(mut map)) = parsed else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be {\"value\": \"...\", \"description\": \"...\"}",
            None,
        );
    };
    let Some(Value::String(value)) = map.remove("value") else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "`value` (a string) is required",
            Some("value"),
        );
    };
    let value = zeroize::Zeroizing::new(value);
    let description = match map.remove("description") {
        None => None,
        Some(Value::String(d)) if d.len() <= 512 => Some(d),
        Some(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "`description` must be a string of at most 512 characters",
                Some("description"),
            );
        }
    };
    if let Some(k) = map.keys().next() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("unknown field `{k}`; a secret takes `value` and `description`"),
            Some(k),
        );
    }
    let now = i64::try_from(app.tokens.now().unix_nanos()).unwrap_or(i64::MAX);
    let vault = app.vault.clone();
    let n = name.clone();
    let stored = tokio::task::spawn_blocking(move || {
        vault.put(&n, value.as_bytes(), description.as_deref(), now)
    })
    .await;
    match stored {
        Ok(Ok(meta)) => {
            let detail = json!({ "version": meta.version, "master_key_id": meta.master_key_id });
            let ok = (StatusCode::OK, axum::Json(meta)).into_response();
            audited(&app, "secret.put", &format!("secret:{name}"), detail, ok).await
        }
        Ok(Err(e)) => vault_error(&e),
        Err(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the vault failed",
            None,
        ),
    }
}

/// `DELETE /api/v1/secrets/{name}`.
pub async fn delete(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let vault = app.vault.clone();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || vault.delete(&n)).await {
        Ok(Ok(true)) => {
            let ok = StatusCode::NO_CONTENT.into_response();
            audited(
                &app,
                "secret.delete",
                &format!("secret:{name}"),
                Value::Null,
                ok,
            )
            .await
        }
        Ok(Ok(false)) => vault_error(&VaultError::NotFound(name)),
        Ok(Err(e)) => vault_error(&e),
        Err(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the vault failed",
            None,
        ),
    }
}

/// `POST /api/v1/vault/rotate-master`: a new master key rewraps every data key.
pub async fn rotate_master(State(app): State<Arc<App>>) -> Response {
    let vault = app.vault.clone();
    let old = vault.master_key_id();
    match tokio::task::spawn_blocking(move || vault.rotate_master()).await {
        Ok(Ok((n, id))) => {
            let body =
                json!({ "rewrapped": n, "master_key_id": id, "previous_master_key_id": old });
            let ok = axum::Json(body.clone()).into_response();
            audited(&app, "vault.rotate_master", "vault", body, ok).await
        }
        Ok(Err(e)) => vault_error(&e),
        Err(_) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the vault failed",
            None,
        ),
    }
}
