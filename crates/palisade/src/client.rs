//! A small client of the admin API.

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Talks to `PALISADE_ADDR` with `PALISADE_TOKEN`.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// From the environment, falling back to the token file in the data directory.
    pub fn from_env(addr: &str, token: Option<String>, data_dir: &std::path::Path) -> Result<Self> {
        let token = match token {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => {
                let file = data_dir.join(palisade_server::ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&file)
                    .map(|t| t.trim().to_string())
                    .with_context(|| format!("PALISADE_TOKEN is not set and {} cannot be read; export PALISADE_TOKEN=$(cat <data-dir>/admin.token)", file.display()))?
            }
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            base: addr.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// With another bearer token (an approver's human token).
    pub fn with_token(addr: &str, token: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            base: addr.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    /// Sends a request and returns the JSON body, or an error carrying the server's message.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach the server at {} (is `palisade serve` running? is PALISADE_ADDR right?)", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = json
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| text.clone());
            let details: Vec<&str> = json
                .pointer("/error/errors")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let message = if details.is_empty() {
                message
            } else {
                format!("{message}\n  {}", details.join("\n  "))
            };
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(json)
    }
}
