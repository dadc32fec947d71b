//! What SIEM sinks receive: each stored event rendered as JSON with its chain position, OCSF
//! 1.x, a Splunk HEC envelope, an OTLP log record, RFC 5424 syslog, or CEF. Pure functions; the
//! server's sink workers deliver them.
//!
//! Events are rendered from what the log stored, so the redaction that applied when the event
//! was written (no tokens or secrets, keyed fingerprints for sensitive values) holds in every
//! format.

use palisade_core::store::StoredAuditEvent;
use serde_json::{Map, Value, json};

/// OCSF schema version the mapping follows.
pub const OCSF_VERSION: &str = "1.3.0";
/// The private enterprise number of RFC 5424 structured data (32473 is reserved for
/// documentation by RFC 5612; deployments that need their own can filter on `palisade@`).
pub const SYSLOG_SD_ID: &str = "palisade@32473";

/// The stored event as a JSON object with its chain position (`seq`, `hash`, `prev_hash`).
pub fn json_event(row: &StoredAuditEvent) -> Value {
    let mut event = match serde_json::from_str::<Value>(&row.body) {
        Ok(Value::Object(map)) => map,
        // Bodies are written by the log as objects; anything else is passed as is.
        _ => {
            let mut map = Map::new();
            map.insert("body".into(), Value::String(row.body.clone()));
            map
        }
    };
    event.insert("seq".into(), json!(row.seq));
    event.insert("hash".into(), json!(row.hash));
    event.insert("prev_hash".into(), json!(row.prev_hash));
    Value::Object(event)
}

fn str_at<'a>(event: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = event;
    for key in path {
        v = v.get(key)?;
    }
    v.as_str()
}

/// Whether the event records a success: an allowed decision with a non-error outcome, or a
/// kind that is not a refusal.
fn succeeded(event: &Value) -> bool {
    let kind = str_at(event, &["kind"]).unwrap_or("");
    if kind.ends_with(".refused") {
        return false;
    }
    if event.pointer("/decision/allowed") == Some(&Value::Bool(false)) {
        return false;
    }
    event
        .pointer("/outcome/status")
        .and_then(Value::as_u64)
        .is_none_or(|s| s < 400)
}

/// Alert severity names to OCSF `severity_id` (1 informational .. 5 critical).
fn severity_id(event: &Value) -> u8 {
    match str_at(event, &["alert", "severity"]) {
        Some("critical") => 5,
        Some("high") => 4,
        Some("medium") => 3,
        Some("low") => 2,
        _ if !succeeded(event) => 2,
        _ => 1,
    }
}

/// The event in OCSF 1.x: gateway and MCP decisions and admin changes as API Activity (6003),
/// token events as Authentication (3002), AuthZEN decisions as Authorize Session (3003), alerts
/// as Detection Finding (2004). Palisade's own fields that OCSF has no attribute for go to
/// `unmapped`.
pub fn ocsf_event(row: &StoredAuditEvent) -> Value {
    let event = json_event(row);
    let kind = str_at(&event, &["kind"]).unwrap_or("");
    let action = str_at(&event, &["action"]).unwrap_or("");
    let (class_uid, category_uid, activity_id, class_name, activity_name) =
        match kind.split('.').next().unwrap_or("") {
            "token" => {
                let (id, name) = match kind {
                    "token.revoked" => (2, "Logoff"),
                    _ => (1, "Logon"),
                };
                (3002, 3, id, "Authentication", name)
            }
            "authzen" => (3003, 3, 1, "Authorize Session", "Assign Privileges"),
            "alert" => (2004, 2, 1, "Detection Finding", "Create"),
            _ => {
                let (id, name) = match action {
                    "read" => (2, "Read"),
                    "write" => (3, "Update"),
                    "destructive" => (4, "Delete"),
                    a if a.contains("create") || a.ends_with(".add") => (1, "Create"),
                    a if a.contains("delete") || a.contains("remove") => (4, "Delete"),
                    a if a.contains("update") || a.contains("suspend") => (3, "Update"),
                    _ => (99, "Other"),
                };
                (6003, 6, id, "API Activity", name)
            }
        };
    let ok = succeeded(&event);
    let time_ms = event
        .get("time_ns")
        .and_then(Value::as_i64)
        .map_or(0, |ns| ns / 1_000_000);
    let mut out = json!({
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "time": time_ms,
        "severity_id": severity_id(&event),
        "status_id": if ok { 1 } else { 2 },
        "status": if ok { "Success" } else { "Failure" },
        "message": kind,
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event.get("event_id"),
            "correlation_uid": event.get("trace_id"),
            "log_name": "palisade-audit",
            "sequence": row.seq,
            "product": {
                "name": "Palisade",
                "vendor_name": "Palisade",
                "version": env!("CARGO_PKG_VERSION"),
            },
        },
    });
    if let Some(principal) = str_at(&event, &["principal", "id"]) {
        let (kind_name, type_id) = match principal.split(':').next() {
            Some("human") => ("User", 1),
            Some("agent") | Some("service") => ("Other", 99),
            _ => ("Unknown", 0),
        };
        let user = json!({
            "uid": principal,
            "type": kind_name,
            "type_id": type_id,
        });
        if class_uid == 3002 {
            out["user"] = user.clone();
        }
        out["actor"] = json!({ "user": user });
        if let Some(d) = event.get("delegation") {
            out["actor"]["invoked_by"] = d["initiating_human"].clone();
        }
    }
    if let Some(resource) = str_at(&event, &["resource"]) {
        out["resources"] = json!([{
            "uid": resource,
            "type": event.pointer("/detail/resource_type").cloned().unwrap_or(Value::Null),
        }]);
    }
    match class_uid {
        6003 => {
            out["api"] = json!({
                "operation": if action.is_empty() { kind } else { action },
                "request": { "uid": event.get("request_id") },
                "response": { "code": event.pointer("/outcome/status") },
            });
        }
        3002 => {
            out["auth_protocol"] = json!("OAuth 2.0");
            out["auth_protocol_id"] = json!(99);
        }
        2004 => {
            out["finding_info"] = json!({
                "uid": event.get("event_id"),
                "title": event.pointer("/alert/rule"),
                "desc": event.pointer("/alert/message"),
            });
        }
        _ => {}
    }
    if let Some(decision) = event.get("decision") {
        out["policy"] = json!({
            "uid": decision.get("policy_version"),
            "name": decision.get("policies").and_then(Value::as_array).map(|p| {
                p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(",")
            }),
        });
    }
    let mut unmapped = Map::new();
    for key in [
        "decision",
        "outcome",
        "latency_us",
        "reasoning",
        "delegation",
        "detail",
        "principal",
    ] {
        if let Some(v) = event.get(key) {
            unmapped.insert(key.into(), v.clone());
        }
    }
    unmapped.insert("hash".into(), json!(row.hash));
    out["unmapped"] = Value::Object(unmapped);
    strip_nulls(&mut out);
    out
}

/// Removes null members (OCSF consumers treat absent and null alike; absent is smaller).
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, item| !item.is_null());
            for item in map.values_mut() {
                strip_nulls(item);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// One Splunk HTTP Event Collector envelope (a batch is these, concatenated).
pub fn hec_event(row: &StoredAuditEvent, host: &str) -> Value {
    json!({
        "time": format!("{}.{:06}", row.time_ns.div_euclid(1_000_000_000), row.time_ns.rem_euclid(1_000_000_000) / 1000)
            .parse::<f64>()
            .unwrap_or(0.0),
        "host": host,
        "source": "palisade",
        "sourcetype": "palisade:audit",
        "event": json_event(row),
    })
}

/// An OTLP/HTTP JSON `ExportLogsServiceRequest` carrying the batch as log records.
pub fn otlp_request(rows: &[StoredAuditEvent], host: &str) -> Value {
    let records: Vec<Value> = rows
        .iter()
        .map(|row| {
            let event = json_event(row);
            let (number, text) = match severity_id(&event) {
                5 => (21, "FATAL"),
                4 => (17, "ERROR"),
                2 | 3 => (13, "WARN"),
                _ => (9, "INFO"),
            };
            let attr = |key: &str, value: Option<&str>| {
                value.map(|v| json!({ "key": key, "value": { "stringValue": v } }))
            };
            let attributes: Vec<Value> = [
                attr("event.name", str_at(&event, &["kind"])),
                attr("palisade.event_id", str_at(&event, &["event_id"])),
                attr("palisade.principal", str_at(&event, &["principal", "id"])),
                attr("palisade.action", str_at(&event, &["action"])),
                attr("palisade.resource", str_at(&event, &["resource"])),
                Some(
                    json!({ "key": "palisade.seq", "value": { "intValue": row.seq.to_string() } }),
                ),
            ]
            .into_iter()
            .flatten()
            .collect();
            let mut record = json!({
                "timeUnixNano": row.time_ns.max(0).to_string(),
                "severityNumber": number,
                "severityText": text,
                "body": { "stringValue": event.to_string() },
                "attributes": attributes,
            });
            if let Some(trace) = str_at(&event, &["trace_id"]) {
                record["traceId"] = json!(trace);
            }
            record
        })
        .collect();
    json!({
        "resourceLogs": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": "palisade" } },
                { "key": "host.name", "value": { "stringValue": host } },
            ]},
            "scopeLogs": [{
                "scope": { "name": "palisade.audit", "version": env!("CARGO_PKG_VERSION") },
                "logRecords": records,
            }],
        }],
    })
}

/// RFC 5424 severity of an event: alerts by their severity, refusals warning, else notice.
fn syslog_severity(event: &Value) -> u8 {
    match str_at(event, &["alert", "severity"]) {
        Some("critical") => 2,
        Some("high") => 3,
        Some("medium") => 4,
        Some("low") => 5,
        _ if !succeeded(event) => 4,
        _ => 5,
    }
}

/// An RFC 5424 message (facility 13, log audit): the event as JSON, or CEF when `cef`; its
/// sequence number, id and trace id as structured data.
pub fn syslog_message(row: &StoredAuditEvent, host: &str, pid: u32, cef: bool) -> String {
    let event = json_event(row);
    let pri = 13 * 8 + u32::from(syslog_severity(&event));
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(row.time_ns))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into());
    let msgid: String = row
        .kind
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    let host = header_field(host, 255);
    let mut sd = format!("[{SYSLOG_SD_ID} seq=\"{}\"", row.seq);
    for (key, value) in [
        ("event_id", str_at(&event, &["event_id"])),
        ("trace_id", str_at(&event, &["trace_id"])),
        ("principal", str_at(&event, &["principal", "id"])),
    ] {
        if let Some(v) = value {
            sd.push_str(&format!(" {key}=\"{}\"", sd_escape(v)));
        }
    }
    sd.push(']');
    let msg = if cef {
        cef_message(row, &event)
    } else {
        event.to_string()
    };
    let msgid = if msgid.is_empty() {
        "-".to_string()
    } else {
        msgid
    };
    format!("<{pri}>1 {time} {host} palisade {pid} {msgid} {sd} {msg}")
}

/// A printable-ASCII header field of at most `max` characters (`-` when empty).
fn header_field(text: &str, max: usize) -> String {
    let field: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if field.is_empty() { "-".into() } else { field }
}

/// RFC 5424 PARAM-VALUE escaping: `"`, `\` and `]`.
fn sd_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An ArcSight CEF record of the event.
pub fn cef_message(row: &StoredAuditEvent, event: &Value) -> String {
    let header = |text: &str| {
        text.replace('\\', "\\\\")
            .replace('|', "\\|")
            .replace(['\n', '\r'], " ")
    };
    let ext = |text: &str| {
        text.replace('\\', "\\\\")
            .replace('=', "\\=")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
    };
    let severity = match severity_id(event) {
        5 => 10,
        4 => 8,
        3 => 6,
        2 => 4,
        _ => 2,
    };
    let name = str_at(event, &["alert", "message"])
        .or_else(|| str_at(event, &["action"]))
        .unwrap_or(&row.kind);
    let mut fields = vec![
        format!("rt={}", row.time_ns / 1_000_000),
        format!(
            "externalId={}",
            ext(str_at(event, &["event_id"]).unwrap_or(""))
        ),
        format!("cn1Label=seq cn1={}", row.seq),
        format!(
            "outcome={}",
            if succeeded(event) {
                "success"
            } else {
                "failure"
            }
        ),
    ];
    let mut push = |key: &str, value: Option<&str>| {
        if let Some(v) = value {
            fields.push(format!("{key}={}", ext(v)));
        }
    };
    push("suser", str_at(event, &["principal", "id"]));
    push("act", str_at(event, &["action"]));
    push("request", str_at(event, &["resource"]));
    push("cs1Label", str_at(event, &["trace_id"]).map(|_| "trace_id"));
    push("cs1", str_at(event, &["trace_id"]));
    push(
        "cs2Label",
        str_at(event, &["delegation", "initiating_human"]).map(|_| "initiating_human"),
    );
    push("cs2", str_at(event, &["delegation", "initiating_human"]));
    if let Some(status) = event.pointer("/outcome/status").and_then(Value::as_u64) {
        fields.push(format!("cn2Label=status cn2={status}"));
    }
    format!(
        "CEF:0|Palisade|Palisade|{}|{}|{}|{severity}|{}",
        header(env!("CARGO_PKG_VERSION")),
        header(&row.kind),
        header(name),
        fields.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(body: Value) -> StoredAuditEvent {
        StoredAuditEvent {
            seq: 7,
            event_id: "e7".into(),
            time_ns: 1_767_225_600_123_456_789,
            kind: body["kind"].as_str().unwrap_or("x").into(),
            principal: None,
            body: body.to_string(),
            prev_hash: "a".repeat(64),
            hash: "b".repeat(64),
            facts: None,
        }
    }

    fn decision(allowed: bool) -> StoredAuditEvent {
        row(json!({
            "schema": 2, "event_id": "e7", "time_ns": 1_767_225_600_123_456_789_i64,
            "kind": "gateway.decision", "action": "destructive",
            "principal": { "id": "agent:bot", "owner": "human:alice" },
            "resource": "Palisade::Route::\"tickets\"",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "decision": { "allowed": allowed, "policies": ["p1", "p2"], "policy_version": "v9" },
            "outcome": { "status": if allowed { 200 } else { 403 }, "bytes_in": 0, "bytes_out": 0 },
            "delegation": { "initiating_human": "human:alice", "actor_chain": ["agent:bot"] },
        }))
    }

    #[test]
    fn json_keeps_the_event_and_adds_its_chain_position() {
        let v = json_event(&decision(true));
        assert_eq!(v["seq"], 7);
        assert_eq!(v["hash"], "b".repeat(64));
        assert_eq!(v["principal"]["id"], "agent:bot");
    }

    #[test]
    fn ocsf_maps_classes_activities_and_status() {
        let v = ocsf_event(&decision(false));
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["activity_id"], 4);
        assert_eq!(v["type_uid"], 600304);
        assert_eq!(v["status_id"], 2);
        assert_eq!(v["time"], 1_767_225_600_123_i64);
        assert_eq!(v["actor"]["user"]["uid"], "agent:bot");
        assert_eq!(v["actor"]["invoked_by"], "human:alice");
        assert_eq!(
            v["metadata"]["correlation_uid"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(v["api"]["response"]["code"], 403);
        assert_eq!(v["policy"]["name"], "p1,p2");
        let token = ocsf_event(&row(json!({ "kind": "token.refused", "event_id": "t" })));
        assert_eq!(
            (token["class_uid"].as_u64(), token["status_id"].as_u64()),
            (Some(3002), Some(2))
        );
        let alert = ocsf_event(&row(json!({
            "kind": "alert.raised",
            "alert": { "severity": "high", "rule": "burst", "message": "m" },
        })));
        assert_eq!(alert["class_uid"], 2004);
        assert_eq!(alert["severity_id"], 4);
        assert_eq!(alert["finding_info"]["title"], "burst");
    }

    #[test]
    fn syslog_is_rfc5424_with_escaped_structured_data() {
        let mut r = decision(false);
        r.body = r.body.replace("agent:bot\"", "agent:b]o\\\\t\"");
        let line = syslog_message(&r, "host one", 42, false);
        // facility 13 × 8 + warning (a refusal) = 108
        assert!(
            line.starts_with("<108>1 2026-01-01T00:00:00.123456789Z hostone palisade 42 gateway.decision [palisade@32473 seq=\"7\""),
            "{line}"
        );
        assert!(line.contains(r#"principal="agent:b\]o\\t""#), "{line}");
        let cef = syslog_message(&decision(true), "h", 1, true);
        let msg = cef.split_once("] ").map(|(_, m)| m).unwrap_or("");
        assert!(
            msg.starts_with("CEF:0|Palisade|Palisade|")
                && msg.contains("|gateway.decision|destructive|2|"),
            "{msg}"
        );
        assert!(
            msg.contains("suser=agent:bot") && msg.contains("cn1Label=seq cn1=7"),
            "{msg}"
        );
    }

    #[test]
    fn cef_escapes_separators() {
        let r = row(json!({ "kind": "admin.change", "action": "a|b=c\nd" }));
        let msg = cef_message(&r, &json_event(&r));
        assert!(msg.contains("|admin.change|a\\|b=c d|"), "{msg}");
        assert!(msg.contains("act=a|b\\=c\\nd"), "{msg}");
    }

    #[test]
    fn otlp_and_hec_carry_time_trace_and_body() {
        let r = decision(true);
        let body = otlp_request(std::slice::from_ref(&r), "h");
        let record = &body["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(record["timeUnixNano"], "1767225600123456789");
        assert_eq!(record["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let inner: Value =
            serde_json::from_str(record["body"]["stringValue"].as_str().unwrap_or(""))
                .unwrap_or_default();
        assert_eq!(inner["seq"], 7);
        let hec = hec_event(&r, "h");
        assert_eq!(hec["sourcetype"], "palisade:audit");
        assert!((hec["time"].as_f64().unwrap_or(0.0) - 1_767_225_600.123_456).abs() < 1e-3);
    }
}
