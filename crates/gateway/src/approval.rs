//! The approval phase's helpers, shared by the HTTP and MCP gateways: what an approval request
//! shows its approvers, and what the agent is told while it waits.

use palisade_approval::Approval;
use palisade_inspect::{Detectors, Inspector};
use serde_json::{Value, json};

/// How much of a body approvers see.
const PREVIEW_CHARS: usize = 1024;

/// The start of a textual body with secrets and personal data masked, and whether it was cut
/// short (`None` for an empty or binary body).
pub fn preview(inspector: &Inspector, body: &[u8]) -> Option<(String, bool)> {
    if body.is_empty() {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let cut = text
        .char_indices()
        .nth(PREVIEW_CHARS)
        .map_or(text.len(), |(i, _)| i);
    let head = &text[..cut];
    let report = inspector.inspect(
        head,
        Detectors {
            injection: false,
            dlp: true,
        },
    );
    let mut shown = inspector.sanitize(head, &report);
    if cut < text.len() {
        shown.push('…');
    }
    Some((shown, cut < text.len()))
}

/// What else an HTTP call is bound to besides method, path and body: the query and every
/// header that goes upstream (by name, sorted), except those that never change what the call
/// does (credentials, tracing, content negotiation, hop-by-hop, Palisade's own).
pub fn http_context(query: Option<&str>, headers: &http::HeaderMap) -> String {
    const UNBOUND: &[&str] = &[
        "authorization",
        "host",
        "content-length",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "traceparent",
        "tracestate",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        crate::REASONING_HEADER,
        palisade_approval::APPROVAL_HEADER,
    ];
    let mut lines: Vec<String> = headers
        .iter()
        .filter(|(name, _)| !UNBOUND.contains(&name.as_str()))
        .map(|(name, value)| {
            format!(
                "{}: {}",
                name.as_str(),
                String::from_utf8_lossy(value.as_bytes())
            )
        })
        .collect();
    lines.sort();
    format!("?{}\n{}", query.unwrap_or(""), lines.join("\n"))
}

/// A query string as approvers see it: secrets and personal data masked.
pub fn masked_query(inspector: &Inspector, query: Option<&str>) -> Option<String> {
    preview(inspector, query?.as_bytes()).map(|(q, _)| q)
}

/// The `approval` member of answers and audit details.
pub fn summary(a: &Approval, link: &str) -> Value {
    json!({
        "id": a.id,
        "status": a.status.as_str(),
        "approvers": a.rule.approvers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "required": a.rule.count,
        "approved": a.approvals(),
        "uses": a.rule.uses,
        "used": a.used,
        "expires_at": a.expires_at_text(),
        "link": link,
    })
}

/// The `approval` member of the event of a call that used `a`: the summary and who approved.
pub fn used(a: &Approval, link: &str) -> Value {
    let mut v = summary(a, link);
    v["approved_by"] = json!(
        a.votes
            .iter()
            .filter(|v| v.approve)
            .map(|v| v.approver.clone())
            .collect::<Vec<_>>()
    );
    v
}

/// What the agent is told while `a` waits.
pub fn waiting_message(a: &Approval, what: &str) -> String {
    let approvers: Vec<String> = a.rule.approvers.iter().map(ToString::to_string).collect();
    format!(
        "{what} needs human approval ({} of {} from: {}); approval `{}` waits until {}. Retry the same call after it is approved; it then runs once",
        a.approvals(),
        a.rule.count,
        approvers.join(", "),
        a.id,
        a.expires_at_text()
    )
}
