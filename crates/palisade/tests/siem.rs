//! SIEM export: several sinks at once (Splunk HEC, OTLP logs, a rotated JSON-lines file, syslog
//! with CEF over TCP, a webhook for token events) receive every event in order; a required
//! sink that goes down makes the enforcement points refuse requests until it is back, and then
//! it catches up; no token or secret appears in any stored or delivered byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use axum::extract::State;
use reqwest::Method;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::Harness;
use tokio::io::AsyncReadExt;

/// A real HTTP collector on a fixed port that can be taken down (connections refused) and
/// brought back; it keeps each request's path, `Authorization` header and body.
/// Each request's path, `Authorization` header and body.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

struct Collector {
    addr: SocketAddr,
    seen: Seen,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = Self {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            task: None,
        };
        c.serve(listener);
        c
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .fallback(
                |State(seen): State<Seen>, req: axum::extract::Request| async move {
                    let path = req.uri().path().to_string();
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body = axum::body::to_bytes(req.into_body(), 64 << 20)
                        .await
                        .unwrap();
                    seen.lock().unwrap().push((
                        path,
                        auth,
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                    "{}"
                },
            )
            .with_state(self.seen.clone());
        self.task = Some(tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        }));
    }

    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn bodies(&self, path: &str) -> Vec<(String, String)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, a, b)| (a.clone(), b.clone()))
            .collect()
    }
}

/// A syslog receiver over TCP that keeps every byte.
async fn syslog_receiver() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
    let kept = bytes.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    kept.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, bytes)
}

/// Octet-counted frames (`LEN SP MSG`).
fn frames(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(sp) = rest.iter().position(|b| *b == b' ') {
        let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
        out.push(String::from_utf8(rest[sp + 1..sp + 1 + len].to_vec()).unwrap());
        rest = &rest[sp + 1 + len..];
    }
    assert!(rest.is_empty(), "a partial frame");
    out
}

/// The sequence numbers in the order first received, checking that repeats (retries) never
/// reorder what was already delivered.
fn first_seen(seqs: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for s in seqs {
        if seen.insert(s) {
            order.push(s);
        }
    }
    order
}

async fn sinks(h: &Harness) -> Value {
    let (s, v) = h.api(Method::GET, "/audit/sinks", None).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Waits until `done` holds for the sinks' state (at most 20 s).
async fn wait_for(h: &Harness, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let v = sinks(h).await;
        if done(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}: {}", sinks(h).await);
}

fn caught_up(v: &Value) -> bool {
    v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["lag"] == 0 && s["failing"] == false)
}

fn read_all_files(dir: &Path, out: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_all_files(&path, out);
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_gets_every_event_in_order_through_an_outage_and_fail_closed_refuses_meanwhile()
{
    let mut collector = Collector::start().await;
    let (syslog_addr, syslog_bytes) = syslog_receiver().await;
    let files = support::temp_dir("siem-files");
    std::fs::create_dir_all(&files).unwrap();
    let c = collector.addr;
    let extra = format!(
        r#"
[[audit.sinks]]
name = "splunk"
kind = "http"
format = "hec"
url = "http://{c}/hec"
headers = {{ Authorization = "Splunk test-only-hec-token" }}
required = true
batch = 4

[[audit.sinks]]
name = "otel"
kind = "otlp"
url = "http://{c}/otlp"

[[audit.sinks]]
name = "archive"
kind = "file"
path = "{files}/audit.jsonl"
rotate_bytes = 4096
keep = 100

[[audit.sinks]]
name = "soc"
kind = "syslog"
transport = "tcp"
format = "cef"
address = "{syslog_addr}"

[[audit.sinks]]
name = "token-webhook"
kind = "http"
url = "http://{c}/tokens"
kinds = ["token.*"]
"#,
        files = files.display()
    );
    let h = Harness::start_with("siem", &extra).await;
    let secret = h.agent_secret("siem-agent", &["tickets"]).await;
    let token = h.token_for("agent:siem-agent", &secret).await;
    let aws_key = "AKIA37UABTXUJDCSOX6I";
    for i in 0..5 {
        let resp = h
            .http
            .get(h.url(&format!("/tickets/{i}")))
            .bearer_auth(&token)
            .header("palisade-reasoning", format!("the key is {aws_key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (s, _) = h
        .token_request("agent:siem-agent", "wrong-secret", &[])
        .await;
    assert_eq!(s, 401);
    wait_for(&h, "every sink to catch up", caught_up).await;

    // The required sink goes down: once a delivery fails, requests are refused (and the
    // refusals recorded locally).
    collector.down().await;
    let (s, _) = h
        .api(
            Method::POST,
            "/humans",
            Some(serde_json::json!({ "id": "bob" })),
        )
        .await;
    assert_eq!(s, 201, "admin changes still work");
    let state = wait_for(&h, "the gate to close", |v| v["refusing"].is_string()).await;
    assert!(
        state["refusing"].as_str().unwrap().contains("splunk"),
        "{state}"
    );
    let refused = h.get_tickets(&token).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "audit_unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("fail-closed")
            && !body["message"].as_str().unwrap().contains("127.0.0.1"),
        "the caller is not told where the collector is: {body}"
    );
    let (s, _) = h.token_request("agent:siem-agent", &secret, &[]).await;
    assert_eq!(s, 503, "token requests are refused too");
    let out = h.cli(&["audit", "sinks"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REFUSING REQUESTS") && text.contains("splunk"),
        "{text}"
    );

    // Back up: it catches up and requests flow again.
    collector.up().await;
    wait_for(&h, "the gate to open", |v| v["refusing"].is_null()).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let state = wait_for(&h, "every sink to catch up", caught_up).await;
    let head = state["head_seq"].as_u64().unwrap();
    let all: Vec<u64> = (1..=head).collect();

    // Splunk HEC: the credential arrived; every event, first deliveries in order.
    let hec = collector.bodies("/hec");
    assert!(
        hec.iter()
            .all(|(auth, _)| auth == "Splunk test-only-hec-token")
    );
    let seqs = hec.iter().flat_map(|(_, body)| {
        body.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["event"]["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    });
    // Events after the snapshot (a background alert or session end) may follow; the log up to
    // it must all be there, in order.
    let upto = |v: Vec<u64>| v.into_iter().filter(|s| *s <= head).collect::<Vec<_>>();
    assert_eq!(upto(first_seen(seqs)), all, "HEC");
    let refusals = hec
        .iter()
        .flat_map(|(_, b)| b.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.contains("\"status\":503"))
        .count();
    assert!(refusals >= 2, "the refusals reached the SIEM afterwards");

    // OTLP logs (not required, also through the outage).
    let seqs = collector.bodies("/otlp").into_iter().flat_map(|(_, body)| {
        let v: Value = serde_json::from_str(&body).unwrap();
        v["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r["attributes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["key"] == "palisade.seq")
                    .unwrap()["value"]["intValue"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(upto(first_seen(seqs)), all, "OTLP");

    // The file: rotated into several files, each event exactly once, in order.
    let mut parts: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let n = p
                .extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse().ok())
                .unwrap_or(0);
            (n, p)
        })
        .collect();
    assert!(parts.len() > 2, "rotated: {parts:?}");
    parts.sort_by_key(|p| std::cmp::Reverse(p.0));
    let seqs: Vec<u64> = parts
        .iter()
        .flat_map(|(_, p)| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["seq"]
                        .as_u64()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(upto(seqs), all, "file");

    // Syslog over TCP, CEF in RFC 5424.
    let messages = frames(&syslog_bytes.lock().unwrap());
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| {
            assert!(m.starts_with('<') && m.contains(">1 "), "{m}");
            assert!(
                m.contains("palisade ") && m.contains("CEF:0|Palisade|Palisade|"),
                "{m}"
            );
            let at = m.find("seq=\"").unwrap() + 5;
            m[at..at + m[at..].find('"').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(upto(seqs), all, "syslog");

    // The webhook takes only token events, and every one of them.
    let (_, events) = h.api(Method::GET, "/audit/events?limit=1000", None).await;
    let token_seqs: BTreeSet<u64> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["event"]["kind"].as_str().unwrap().starts_with("token."))
        .map(|i| i["seq"].as_u64().unwrap())
        .collect();
    let hooked: BTreeSet<u64> = collector
        .bodies("/tokens")
        .iter()
        .flat_map(|(_, b)| {
            serde_json::from_str::<Value>(b)
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    assert!(e["kind"].as_str().unwrap().starts_with("token."), "{e}");
                    e["seq"].as_u64().unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(hooked, token_seqs);
    assert_eq!(
        token_seqs.len(),
        3,
        "issued, refused (secret), refused (fail-closed)"
    );

    // No token or secret in any stored or delivered byte.
    let data_dir = h.data_dir.clone();
    h.server.stop().await;
    let mut every_byte = Vec::new();
    read_all_files(&data_dir, &mut every_byte);
    read_all_files(&files, &mut every_byte);
    every_byte.extend(syslog_bytes.lock().unwrap().iter());
    for (path, auth, body) in collector.seen.lock().unwrap().iter() {
        every_byte.extend(path.bytes().chain(auth.bytes()).chain(body.bytes()));
    }
    let haystack = String::from_utf8_lossy(&every_byte);
    for (what, needle) in [
        ("access token", token.as_str()),
        ("client secret", secret.as_str()),
        ("AWS key", aws_key),
    ] {
        assert!(!haystack.contains(needle), "the {what} leaked");
    }
    assert!(
        haystack.contains("agent:siem-agent"),
        "the search looked at real data"
    );
}

/// A syslog receiver over TLS with the test-only certificate (127.0.0.1), keeping every byte.
async fn tls_syslog_receiver() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fixture = |name: &str| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    };
    let certs = CertificateDer::pem_file_iter(fixture("test-only-upstream-cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("test-only-upstream-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
    let kept = bytes.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (kept, acceptor) = (kept.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0u8; 8192];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    kept.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_over_tls_and_udp_and_an_ocsf_file_and_an_untrusted_collector_is_reported() {
    let (tls_addr, tls_bytes) = tls_syslog_receiver().await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let datagrams: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = datagrams.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = udp.recv(&mut buf).await {
            kept.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let files = support::temp_dir("siem-ocsf");
    std::fs::create_dir_all(&files).unwrap();
    let ca = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test-only-upstream-ca.pem"
    );
    let extra = format!(
        r#"
[[audit.sinks]]
name = "tls"
kind = "syslog"
address = "{tls_addr}"
ca_file = "{ca}"

[[audit.sinks]]
name = "udp"
kind = "syslog"
transport = "udp"
address = "{udp_addr}"

[[audit.sinks]]
name = "ocsf"
kind = "file"
format = "ocsf"
path = "{files}/ocsf.jsonl"

[[audit.sinks]]
name = "untrusted"
kind = "syslog"
address = "{tls_addr}"
"#,
        files = files.display()
    );
    let h = Harness::start_with("siem-tls", &extra).await;
    let token = h.agent_token("siem-tls-agent", &["tickets"]).await;
    assert_eq!(h.get_tickets(&token).await.status(), 200);
    let state = wait_for(&h, "the trusted sinks to catch up", |v| {
        v["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] != "untrusted")
            .all(|s| s["lag"] == 0)
    })
    .await;
    let head = state["head_seq"].as_u64().unwrap();
    let all: Vec<u64> = (1..=head).collect();
    // Without the private CA, the collector's certificate is refused and the sink says why.
    let untrusted = state["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "untrusted")
        .unwrap()
        .clone();
    let untrusted = if untrusted["failing"] == true {
        untrusted
    } else {
        let v = wait_for(&h, "the untrusted sink to fail", |v| {
            v["sinks"][3]["failing"] == true
        })
        .await;
        v["sinks"][3].clone()
    };
    assert_eq!(untrusted["delivered_seq"], 0, "{untrusted}");
    assert!(
        untrusted["last_error"].as_str().unwrap().contains("TLS"),
        "{untrusted}"
    );

    let seq_of = |m: &str| -> u64 {
        let at = m.find("seq=\"").unwrap() + 5;
        m[at..at + m[at..].find('"').unwrap()].parse().unwrap()
    };
    let messages = frames(&tls_bytes.lock().unwrap());
    // Up to the snapshot (background events may follow it).
    let upto = |v: Vec<u64>| v.into_iter().filter(|s| *s <= head).collect::<Vec<_>>();
    assert_eq!(upto(messages.iter().map(|m| seq_of(m)).collect()), all);
    // RFC 5424 with the event as JSON after the structured data.
    let first = &messages[0];
    let json = &first[first.find("] ").unwrap() + 2..];
    let event: Value = serde_json::from_str(json).unwrap();
    assert_eq!(event["seq"], 1);
    assert_eq!(event["kind"], "server.start");
    let got = datagrams.lock().unwrap().clone();
    assert_eq!(upto(got.iter().map(|m| seq_of(m)).collect()), all);

    // The file holds the decision once its sink caught up (polled: the snapshot above may
    // predate the sink's last sync under load).
    let mut events: Vec<Value> = Vec::new();
    for _ in 0..200 {
        let lines = std::fs::read_to_string(files.join("ocsf.jsonl")).unwrap_or_default();
        events = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if events.iter().any(|e| e["message"] == "gateway.decision") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(events.len() as u64 >= head);
    let decision = events
        .iter()
        .find(|e| e["message"] == "gateway.decision")
        .unwrap_or_else(|| panic!("no decision in the OCSF file: {events:?}"));
    assert_eq!(decision["class_uid"], 6003);
    assert_eq!(decision["activity_id"], 2, "a read: {decision}");
    assert_eq!(decision["status_id"], 1);
    assert_eq!(decision["actor"]["user"]["uid"], "agent:siem-tls-agent");
    let issued = events
        .iter()
        .find(|e| e["message"] == "token.issued")
        .unwrap();
    assert_eq!(issued["class_uid"], 3002);
    h.server.stop().await;
}
