//! Policy hot reload over the real server, and the offline policy tooling of the real CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::Harness;

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_files_reload_without_restart_and_a_broken_file_keeps_the_old_set() {
    let h = Harness::start("reload").await;
    let policy_dir = h.data_dir.with_extension("policies");
    let secret = h.owner_and_agent("reloader").await;
    let token = h.token_for("agent:reloader", &secret).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let (_, before) = h.api(Method::GET, "/policy", None).await;
    let v1 = before["version"].as_str().unwrap().to_string();

    // A new forbid applies to the next requests, without a restart.
    std::fs::write(
        policy_dir.join("freeze.cedar"),
        "@id(\"freeze.reads\")\nforbid (principal, action == Palisade::Action::\"read\", resource == Palisade::Route::\"tickets\");\n",
    )
    .unwrap();
    wait_until("the forbid to apply", || async {
        h.get_tickets(&token).await.status() == 403
    })
    .await;
    let resp = h.get_tickets(&token).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["deciding_policies"], json!(["freeze.reads"]));
    let v2 = body["policy_version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);

    // A broken file: the previous set stays in force, the error is reported with file and line.
    std::fs::write(
        policy_dir.join("broken.cedar"),
        "@id(\"b\")\npermit (principal, action, resource)\nwhen { principal.nope == 1 };\n",
    )
    .unwrap();
    wait_until("the reload failure to be reported", || async {
        let (_, status) = h.api(Method::GET, "/policy", None).await;
        !status["last_reload_error"].is_null()
    })
    .await;
    let (_, status) = h.api(Method::GET, "/policy", None).await;
    assert_eq!(status["version"], v2.as_str());
    let errors = status["last_reload_error"]["errors"].to_string();
    assert!(errors.contains("broken.cedar:3:"), "{errors}");
    assert_eq!(
        h.get_tickets(&token).await.status(),
        403,
        "the last good set must stay in force"
    );

    // An explicit reload says the same, with 400, and changes nothing.
    let (s, body) = h.api(Method::POST, "/policy/reload", None).await;
    assert_eq!(s, 400);
    assert_eq!(body["error"]["version_in_force"], v2.as_str());

    // Removing both files returns to the original set.
    std::fs::remove_file(policy_dir.join("broken.cedar")).unwrap();
    std::fs::remove_file(policy_dir.join("freeze.cedar")).unwrap();
    let (s, body) = h.api(Method::POST, "/policy/reload", None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["version"], v1.as_str());
    assert!(body["last_reload_error"].is_null());
    assert_eq!(h.get_tickets(&token).await.status(), 200);

    // Each reload is audited, the failure included.
    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    let kinds: Vec<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["event"]["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "policy.reloaded"), "{kinds:?}");
    assert!(
        kinds.iter().any(|k| k == "policy.reload_failed"),
        "{kinds:?}"
    );
    h.server.stop().await;
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn policy_validate_and_test_work_offline_for_ci() {
    let dir = support::temp_dir("policy-cli");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("tickets.cedar"), support::NO_DELETES).unwrap();
    let p = policies.to_str().unwrap();

    let out = cli(&["policy", "validate", "--dir", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("valid: "));

    let cases = dir.join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[principals."agent:bot"]
allowed_resources = ["tickets"]
blast_radius = { max_action = "destructive" }

[[case]]
name = "reads tickets"
principal = "agent:bot"
action = "read"
route = "tickets"
expect = "allow"

[[case]]
name = "never deletes tickets"
principal = "agent:bot"
action = "destructive"
route = "tickets"
expect = "deny"
policies = ["tickets.no-deletes"]
"#,
    )
    .unwrap();
    let out = cli(&["policy", "test", cases.to_str().unwrap(), "--dir", p]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");

    // A failing case makes the command fail, naming the case.
    let text = std::fs::read_to_string(&cases)
        .unwrap()
        .replace("expect = \"deny\"", "expect = \"allow\"");
    std::fs::write(&cases, text).unwrap();
    let out = cli(&["policy", "test", cases.to_str().unwrap(), "--dir", p]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL never deletes tickets: expected allow, got deny"),
        "{stdout}"
    );

    // An invalid policy fails validation with file and line.
    std::fs::write(
        policies.join("bad.cedar"),
        "permit (principal, action, resource)\nwhen { principal.nope };\n",
    )
    .unwrap();
    let out = cli(&["policy", "validate", "--dir", p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.cedar:2:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The repository's example policies validate, through the example config.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../palisade.example.toml");
    let out = cli(&["policy", "validate", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
