//! The OpenID AuthZEN interop sets (`../shared/conformance/authzen/`), run in full against the
//! real server loaded with each scenario's rules as Cedar policies and its users/records as
//! entities (fixtures in `tests/fixtures/authzen/`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use palisade_config::Config;
use palisade_server::{RunningServer, StartOptions};
use serde_json::{Value, json};

fn shared(path: &str) -> Value {
    let file = format!(
        "{}/../../../shared/conformance/authzen/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("the AuthZEN interop data is missing at {file} ({e}); it ships in shared/conformance/authzen"));
    serde_json::from_str(&text).unwrap()
}

struct Pdp {
    server: RunningServer,
    http: reqwest::Client,
    admin: String,
}

impl Pdp {
    async fn start(scenario: &str, namespace: &str) -> Self {
        let data_dir = support::temp_dir(&format!("authzen-{scenario}"));
        let policy_dir = format!(
            "{}/tests/fixtures/authzen/{scenario}",
            env!("CARGO_MANIFEST_DIR")
        );
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[policy]\ndir = \"{policy_dir}\"\n[authzen]\nnamespace = \"{namespace}\"\n",
            data_dir.display()
        );
        let config = Config::from_toml(&toml, "authzen.toml").unwrap();
        let server = palisade_server::start(config, StartOptions::default())
            .await
            .unwrap();
        let admin = std::fs::read_to_string(&server.admin_token_path)
            .unwrap()
            .trim()
            .to_string();
        Self {
            server,
            http: reqwest::Client::new(),
            admin,
        }
    }

    async fn post(&self, endpoint: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{endpoint}", self.server.url()))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// Runs every `evaluation` and `evaluations` case of a decisions file; returns the failures.
async fn run_decisions(pdp: &Pdp, file: &str) -> (usize, Vec<String>) {
    let data = shared(file);
    let mut failures = Vec::new();
    let mut count = 0;
    for case in data["evaluation"].as_array().unwrap() {
        count += 1;
        let (status, body) = pdp.post("/access/v1/evaluation", &case["request"]).await;
        if status != 200 || body["decision"] != case["expected"] {
            failures.push(format!(
                "{file} evaluation {}: got {status} {body}, expected {}",
                case["request"], case["expected"]
            ));
        }
    }
    for case in data["evaluations"].as_array().into_iter().flatten() {
        count += 1;
        let (status, body) = pdp.post("/access/v1/evaluations", &case["request"]).await;
        if status != 200 || body["evaluations"] != case["expected"] {
            failures.push(format!(
                "{file} evaluations {}: got {status} {body}, expected {}",
                case["request"], case["expected"]
            ));
        }
    }
    (count, failures)
}

fn sorted(results: &Value) -> Vec<String> {
    let mut v: Vec<String> = results
        .as_array()
        .into_iter()
        .flatten()
        .map(Value::to_string)
        .collect();
    v.sort();
    v
}

/// Runs search cases; the sorted result set must equal the expected set exactly.
async fn run_search(pdp: &Pdp, file: &str, key: &str, endpoint: &str) -> (usize, Vec<String>) {
    let data = shared(file);
    let mut failures = Vec::new();
    let cases = data[key].as_array().unwrap();
    for case in cases {
        let (status, body) = pdp.post(endpoint, &case["request"]).await;
        if status != 200 || sorted(&body["results"]) != sorted(&case["expected"]["results"]) {
            failures.push(format!(
                "{file} {}: got {status} {body}, expected {}",
                case["request"], case["expected"]
            ));
        }
    }
    (cases.len(), failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todo_scenario_1_0_01_and_1_0_02_with_batch() {
    let pdp = Pdp::start("todo", "Todo").await;
    let mut all = Vec::new();
    let (n1, f1) = run_decisions(&pdp, "decisions-authorization-api-1_0-01.json").await;
    let (n2, f2) = run_decisions(&pdp, "decisions-authorization-api-1_0-02.json").await;
    all.extend(f1);
    all.extend(f2);
    assert_eq!((n1, n2), (40, 43), "the interop sets changed size");
    assert!(
        all.is_empty(),
        "{} of {} cases failed:\n{}",
        all.len(),
        n1 + n2,
        all.join("\n")
    );
    pdp.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_gateway_scenario() {
    let pdp = Pdp::start("gateway", "Gateway").await;
    let (n, failures) = run_decisions(&pdp, "api-gateway/decisions.json").await;
    assert_eq!(n, 25);
    assert!(
        failures.is_empty(),
        "{} of {n} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    pdp.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_subject_resource_action_and_idp_scenarios() {
    let pdp = Pdp::start("search", "Search").await;
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (file, key, endpoint) in [
        (
            "search/subject/results.json",
            "evaluation",
            "/access/v1/search/subject",
        ),
        (
            "search/resource/results.json",
            "evaluation",
            "/access/v1/search/resource",
        ),
        (
            "search/action/results.json",
            "evaluation",
            "/access/v1/search/action",
        ),
        ("idp/results.json", "search", "/access/v1/search/resource"),
    ] {
        let (n, f) = run_search(&pdp, file, key, endpoint).await;
        counts.push(n);
        failures.extend(f);
    }
    assert_eq!(counts, [60, 18, 120, 6], "the interop sets changed size");
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    pdp.server.stop().await;
}

/// Whether `got` contains every item of `expected` (the certification's "at least" match).
fn includes_all(got: &Value, expected: &Value) -> bool {
    let got = sorted(got);
    sorted(expected).iter().all(|e| got.contains(e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certification_cases_statuses_and_bodies() {
    let pdp = Pdp::start("cert", "Cert").await;
    let data = shared("certification/cert-cases.json");
    let mut failures = Vec::new();
    let cases = data["cases"].as_array().unwrap();
    let mut last_next_token = Value::Null;
    for case in cases {
        let endpoint = case["endpoint"].as_str().unwrap();
        // The paging case continues from the previous response, as the harness does.
        let mut request = case["request"].clone();
        if request["page"]["token"] == "<next_token from previous response>" {
            request["page"]["token"] = last_next_token.clone();
        }
        let (status, body) = pdp.post(endpoint, &request).await;
        last_next_token = body["page"]["next_token"].clone();
        let label = format!(
            "{} {} ({})",
            case["id"].as_str().unwrap(),
            case["title"].as_str().unwrap(),
            case["label"]
        );
        let expected_status = case["expected_status"].as_u64().unwrap_or(200) as u16;
        if status != expected_status {
            failures.push(format!(
                "{label}: status {status}, expected {expected_status}: {body}"
            ));
            continue;
        }
        if let Some(expected) = case.get("expected_body") {
            let ok = if case.get("match").is_some() {
                includes_all(&body["results"], &expected["results"])
            } else if expected.get("results").is_some() {
                sorted(&body["results"]) == sorted(&expected["results"])
            } else if expected.get("evaluations").is_some() {
                body["evaluations"] == expected["evaluations"]
            } else {
                body["decision"] == expected["decision"]
            };
            if !ok {
                failures.push(format!("{label}: body {body}, expected {expected}"));
            }
        }
        // Structural checks the cases describe in words.
        if case["id"] == "c-3-2-1" && body["evaluations"].as_array().map(Vec::len) != Some(2) {
            failures.push(format!("{label}: expected two evaluations, got {body}"));
        }
        if case["id"] == "c-3-4-1" {
            let evals = body["evaluations"].as_array().cloned().unwrap_or_default();
            if evals.len() != 2 || evals[1]["decision"] != false {
                failures.push(format!(
                    "{label}: expected two evaluations, the second a deny; got {body}"
                ));
            }
        }
    }
    assert_eq!(cases.len(), 50, "the certification set changed size");
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // The non-JSON checks: content type, malformed and empty bodies, X-Request-ID, discovery.
    let url = format!("{}/access/v1/evaluation", pdp.server.url());
    let good = json!({ "subject": { "type": "user", "id": "alice" }, "action": { "name": "read" }, "resource": { "type": "record", "id": "record-1" } });
    for (content_type, body) in [
        ("text/plain", good.to_string()),
        ("application/json", "{\"subject\": ".to_string()),
        ("application/json", String::new()),
        ("application/json", "[1, 2]".to_string()),
    ] {
        let resp = pdp
            .http
            .post(&url)
            .bearer_auth(&pdp.admin)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{content_type} {body:?}");
    }
    let resp = pdp
        .http
        .post(&url)
        .bearer_auth(&pdp.admin)
        .header("x-request-id", "req-42")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    let first: Value = resp.json().await.unwrap();
    let again: Value = pdp
        .http
        .post(&url)
        .bearer_auth(&pdp.admin)
        .json(&good)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first, again, "the same request must give the same answer");
    let config: Value = pdp
        .http
        .get(format!(
            "{}/.well-known/authzen-configuration",
            pdp.server.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["policy_decision_point"], pdp.server.url());
    assert_eq!(config["access_evaluation_endpoint"], url);

    // Callers must authenticate: the admin token or a Palisade access token; a deny is still 200.
    let resp = pdp.http.post(&url).json(&good).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let base = pdp.server.url();
    let api = |path: &str| format!("{base}/api/v1{path}");
    let r = pdp
        .http
        .post(api("/humans"))
        .bearer_auth(&pdp.admin)
        .json(&json!({ "id": "owner" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut agent = support::agent_body("app-checker");
    agent["owner"] = json!("human:owner");
    let created: Value = pdp
        .http
        .post(api("/agents"))
        .bearer_auth(&pdp.admin)
        .json(&agent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["credentials"]["client_secret"].as_str().unwrap();
    let token: Value = pdp
        .http
        .post(format!("{base}/oauth2/token"))
        .basic_auth("agent:app-checker", Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap();
    let deny = json!({ "subject": { "type": "user", "id": "bob" }, "action": { "name": "write" }, "resource": { "type": "record", "id": "record-1" } });
    let resp = pdp
        .http
        .post(&url)
        .bearer_auth(token)
        .json(&deny)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "decision": false })
    );
    let resp = pdp
        .http
        .post(&url)
        .bearer_auth("not-a-token")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    pdp.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_semantics_paging_and_audit() {
    let pdp = Pdp::start("cert", "Cert").await;
    let alice = json!({ "type": "user", "id": "alice" });
    let batch = |semantic: &str| {
        json!({
            "subject": alice,
            "resource": { "type": "record", "id": "record-1" },
            "options": { "evaluations_semantic": semantic },
            "evaluations": [
                { "action": { "name": "read" } },
                { "action": { "name": "delete" } },
                { "action": { "name": "write" } },
            ]
        })
    };
    let (_, all) = pdp
        .post("/access/v1/evaluations", &batch("execute_all"))
        .await;
    assert_eq!(
        all["evaluations"],
        json!([{ "decision": true }, { "decision": false }, { "decision": true }])
    );
    let (_, deny_first) = pdp
        .post("/access/v1/evaluations", &batch("deny_on_first_deny"))
        .await;
    assert_eq!(
        deny_first["evaluations"],
        json!([{ "decision": true }, { "decision": false }])
    );
    let (_, permit_first) = pdp
        .post("/access/v1/evaluations", &batch("permit_on_first_permit"))
        .await;
    assert_eq!(permit_first["evaluations"], json!([{ "decision": true }]));
    let (status, _) = pdp.post("/access/v1/evaluations", &batch("whatever")).await;
    assert_eq!(status, 400);

    // Paging: one result per page, then the next token, until no token is returned.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..5 {
        let mut req = json!({ "subject": { "type": "user" }, "action": { "name": "read" }, "resource": { "type": "record", "id": "record-1" }, "page": { "limit": 1 } });
        if let Some(t) = &token {
            req["page"]["token"] = json!(t);
        }
        let (status, body) = pdp.post("/access/v1/search/subject", &req).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"].as_array().unwrap().len(), 1);
        seen.push(body["results"][0]["id"].as_str().unwrap().to_string());
        token = body["page"]["next_token"].as_str().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["alice", "bob"]);
    let (status, _) = pdp
        .post("/access/v1/search/subject", &json!({ "subject": { "type": "user" }, "action": { "name": "read" }, "resource": { "type": "record", "id": "record-1" }, "page": { "token": "garbage!" } }))
        .await;
    assert_eq!(status, 400);

    // Every call is in the audit log with its decision.
    let events: Value = pdp
        .http
        .get(format!(
            "{}/api/v1/audit/events?limit=1000",
            pdp.server.url()
        ))
        .bearer_auth(&pdp.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["event"]["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds
            .iter()
            .filter(|k| **k == "authzen.evaluations")
            .count()
            >= 3,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"authzen.search"), "{kinds:?}");
    // Refused calls (the unknown semantic and the bad page token above) are audited too.
    assert_eq!(
        kinds.iter().filter(|k| **k == "authzen.refused").count(),
        2,
        "{kinds:?}"
    );
    pdp.server.stop().await;
}
