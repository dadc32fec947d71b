//! What sessions and limits add to each gateway request, measured in-process: the session
//! lookup and check, the call count, three GCRA rate limits (agent, agent x route, route), the
//! in-flight slot, an object read taken and kept, and the counters read into the policy
//! context. Two threads (the machine's two cores) over 1,000 agents with live sessions.
//! Prints p50/p99/p99.9 per request and requests per second per thread.
//!
//! `cargo bench -p palisade-gateway --bench limits` (results in BENCHMARKS.md)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use palisade_config::Config;
use palisade_core::rate::RateLimit;
use palisade_core::session::Sessions;
use palisade_core::store::Store;
use palisade_core::{PrincipalId, PrincipalKind, SystemClock};
use palisade_gateway::limits::{Limits, ObjectRead};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AGENTS: usize = 1_000;
const PER_THREAD: usize = 400_000;

fn main() {
    let dir = std::env::temp_dir().join(format!("palisade-bench-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store: Arc<dyn Store> = Arc::new(palisade_store::SqliteStore::open(&dir).unwrap());
    let config = Config::from_toml(
        r#"
[gateway]
agent_rate_limit = "1000000/s"
[[routes]]
name = "tickets"
path_prefix = "/tickets"
upstream = "http://127.0.0.1:9"
rate_limit = "10000000/s"
agent_rate_limit = "1000000/s"
"#,
        "bench.toml",
    )
    .unwrap();
    let sessions = Arc::new(Sessions::load(store, Arc::new(SystemClock), 1, 60).unwrap());
    let limits = Arc::new(Limits::new(&config));
    let agent_limit = config.gateway.agent_rate_limit;
    let agents: Vec<(PrincipalId, String)> = (0..AGENTS)
        .map(|i| {
            let id = PrincipalId::new(PrincipalKind::Agent, &format!("a{i}")).unwrap();
            let s = sessions.start(&id, 240, 5, None).unwrap();
            (id, s.sid.clone())
        })
        .collect();
    let agents = Arc::new(agents);
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (sessions, limits, agents) = (sessions.clone(), limits.clone(), agents.clone());
            std::thread::spawn(move || run(t, &sessions, &limits, &agents, agent_limit))
        })
        .collect();
    let mut all: Vec<Duration> = Vec::new();
    let mut rates = Vec::new();
    for t in threads {
        let (lat, rate) = t.join().unwrap();
        all.extend(lat);
        rates.push(rate);
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "sessions+limits per request, 2 threads x {PER_THREAD}, {AGENTS} agents: p50 {:?}  p99 {:?}  p99.9 {:?}  max {:?}  ({:.0} and {:.0} requests/s per thread)",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        all[all.len() - 1],
        rates[0],
        rates[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn run(
    t: usize,
    sessions: &Sessions,
    limits: &Limits,
    agents: &[(PrincipalId, String)],
    agent_limit: Option<RateLimit>,
) -> (Vec<Duration>, f64) {
    let mut lat = Vec::with_capacity(PER_THREAD);
    let started = Instant::now();
    for i in 0..PER_THREAD {
        let (id, sid) = &agents[(i * 7 + t * 13) % agents.len()];
        let t0 = Instant::now();
        let session = sessions.check(sid, id).unwrap();
        session.count_call();
        limits.check(id, agent_limit, 0).unwrap();
        let slot = limits.enter(id, 64).unwrap();
        session.take_object_read(0, Some(u64::MAX), None).unwrap();
        let read = ObjectRead::new(session.clone(), 0);
        read.keep();
        let c = session.counters();
        std::hint::black_box(c);
        drop(slot);
        lat.push(t0.elapsed());
    }
    let rate = PER_THREAD as f64 / started.elapsed().as_secs_f64();
    (lat, rate)
}
