//! Decision latency with 10, 1,000 and 10,000 agents, each with its own three policies, sliced
//! by principal versus the full set. Prints p50/p99 and decisions per second.
//!
//! `cargo bench -p palisade-policy --bench decide` (results in BENCHMARKS.md)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The allocator the `palisade` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use palisade_core::principal::AgentDetail;
use palisade_core::{Principal, PrincipalDetail, PrincipalId, PrincipalKind, Status, Timestamp};
use palisade_policy::{Action, PolicyEngine, RequestContext, Target};
use std::time::{Duration, Instant};

fn agent(i: usize) -> Principal {
    let now = Timestamp::now();
    Principal {
        id: PrincipalId::new(PrincipalKind::Agent, &format!("a{i}")).unwrap(),
        display_name: format!("a{i}"),
        status: Status::Active,
        status_change: None,
        created_at: now,
        updated_at: now,
        detail: PrincipalDetail::Agent(AgentDetail {
            owner: "human:owner".parse().unwrap(),
            purpose: "bench".into(),
            purpose_tag: "bench".into(),
            model_provider: "p".into(),
            model: "m".into(),
            model_version: "1".into(),
            review_cadence_days: 90,
            next_review_at: now,
            max_session_minutes: 30,
            max_concurrent_sessions: 5,
            allowed_resources: vec![format!("r{}", i % 50)],
            scopes: vec![],
            max_files_per_session: None,
            data_egress_allowed: false,
            rate_limit: None,
            max_concurrent_requests: None,
            blast_radius: palisade_core::principal::BlastRadius {
                max_action: palisade_core::principal::ActionCeiling::Destructive,
                ..Default::default()
            },
        }),
    }
}

fn policies(agents: usize) -> String {
    let mut out = String::new();
    for i in 0..agents {
        let p = format!("Palisade::Agent::\"agent:a{i}\"");
        let r = i % 50;
        out.push_str(&format!(
            "@id(\"a{i}.read\") permit (principal == {p}, action == Palisade::Action::\"read\", resource == Palisade::Route::\"r{r}\");\n\
             @id(\"a{i}.comment\") permit (principal == {p}, action == Palisade::Action::\"write\", resource == Palisade::Resource::\"r{r}/comment\") when {{ context.method == \"POST\" }};\n\
             @id(\"a{i}.no-delete\") forbid (principal == {p}, action == Palisade::Action::\"destructive\", resource);\n"
        ));
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn measure(
    engine: &PolicyEngine,
    agents: &[Principal],
    iterations: usize,
) -> (Duration, Duration, f64) {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut lat = Vec::with_capacity(iterations);
    let started = Instant::now();
    for n in 0..iterations {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = (seed % agents.len() as u64) as usize;
        let (action, resource, method) = match n % 3 {
            0 => (Action::Read, None, "GET"),
            1 => (Action::Write, Some("comment"), "POST"),
            _ => (Action::Destructive, None, "DELETE"),
        };
        let route = format!("r{}", i % 50);
        let target = Target {
            route: &route,
            resource,
            tool: false,
            route_kind: &route,
            kind: resource.unwrap_or(&route),
            system: "",
            route_classification: Default::default(),
            classification: Default::default(),
        };
        let ctx = RequestContext::at(
            method,
            "/x",
            palisade_core::Timestamp::from_unix_seconds(1_764_158_400),
        );
        let t = Instant::now();
        let d = engine.decide(&agents[i], action, &target, &ctx);
        lat.push(t.elapsed());
        std::hint::black_box(d);
    }
    let total = started.elapsed();
    lat.sort();
    (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        iterations as f64 / total.as_secs_f64(),
    )
}

fn request(n: usize, i: usize) -> (Action, Option<&'static str>, &'static str, String) {
    let (action, resource, method) = match n % 3 {
        0 => (Action::Read, None, "GET"),
        1 => (Action::Write, Some("comment"), "POST"),
        _ => (Action::Destructive, None, "DELETE"),
    };
    (action, resource, method, format!("r{}", i % 50))
}

fn measure_each(engine: &PolicyEngine, agents: &[Principal]) {
    for (i, agent) in agents.iter().enumerate() {
        for n in 0..3 {
            let (action, resource, method, route) = request(n, i);
            let target = Target {
                route: &route,
                resource,
                tool: false,
                route_kind: &route,
                kind: resource.unwrap_or(&route),
                system: "",
                route_classification: Default::default(),
                classification: Default::default(),
            };
            let ctx = RequestContext::at(
                method,
                "/x",
                palisade_core::Timestamp::from_unix_seconds(1_764_158_400),
            );
            std::hint::black_box(engine.decide(agent, action, &target, &ctx));
        }
    }
}

fn main() {
    println!("| agents | policies | evaluation | p50 | p99 | decisions/s (one core) |");
    println!("|---:|---:|---|---:|---:|---:|");
    for count in [10usize, 1_000, 10_000] {
        let agents: Vec<Principal> = (0..count).map(agent).collect();
        let text = policies(count);
        let load = Instant::now();
        let sliced = PolicyEngine::from_texts(&[("bench.cedar", &text)]).unwrap();
        let load_time = load.elapsed();
        // Warm every agent's slices for the three request shapes measured, so the numbers are
        // steady-state decisions (a slice is built once per principal, action and resource type).
        measure_each(&sliced, &agents);
        let (p50, p99, rate) = measure(&sliced, &agents, 200_000);
        println!(
            "| {count} | {} | sliced | {p50:.1?} | {p99:.1?} | {rate:.0} |",
            sliced.policy_count()
        );
        let full = PolicyEngine::from_texts(&[("bench.cedar", &text)])
            .unwrap()
            .with_slicing(false);
        let iterations = if count >= 10_000 {
            300
        } else if count >= 1_000 {
            3_000
        } else {
            200_000
        };
        let (p50, p99, rate) = measure(&full, &agents, iterations);
        println!(
            "| {count} | {} | full set | {p50:.1?} | {p99:.1?} | {rate:.0} |",
            full.policy_count()
        );
        eprintln!("(loading and validating {count} agents' policies took {load_time:.1?})");
    }
}
