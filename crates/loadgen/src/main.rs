//! `palisade-loadgen`: sends GET requests at a fixed rate, evenly spaced, whatever the server's
//! speed (open loop: a slow response never delays a later request, so there is no coordinated
//! omission), and reports the latency of each from its send to its last body byte.
//!
//! Written for the benchmarks because `wrk` has no fixed rate and `hey`'s workers fire in step,
//! which measures bursts rather than a steady rate; `wrk2` is not packaged here.

use anyhow::{Context, Result, bail};
use clap::Parser;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

/// Constant-rate GET load.
#[derive(Parser)]
struct Args {
    /// Target URL (http only).
    url: String,
    /// Requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Extra header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Label printed with the results.
    #[arg(long, default_value = "")]
    label: String,
    /// Also write one line per request, `start_ms latency_us status`, to this file, to see
    /// when slow requests happen (for example every second, or after a burst).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.rate == 0 || args.seconds == 0 {
        bail!("--rate and --seconds must be at least 1");
    }
    let uri: http::Uri = args.url.parse().context("the URL does not parse")?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .context("a header must look like `Name: value`")?;
        headers.push((
            header::HeaderName::from_bytes(name.trim().as_bytes())?,
            header::HeaderValue::from_str(value.trim())?,
        ));
    }
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let total = u64::from(args.rate) * u64::from(args.seconds);
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(usize::try_from(total)?);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let mut req = Request::get(uri.clone()).body(Empty::new())?;
        for (n, v) in &headers {
            req.headers_mut().insert(n.clone(), v.clone());
        }
        let client = client.clone();
        // Latency counts from the actual send: the timer wakes up to 1 ms late, and that lateness
        // is the generator's, not the server's. The send never waits for earlier responses.
        let sent = Instant::now();
        tasks.push(tokio::spawn(async move {
            let resp = client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await.ok()?;
            Some((sent.elapsed(), status, sent))
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut trace = String::new();
    let mut errors = 0u64;
    let mut non_2xx = 0u64;
    for t in tasks {
        match t.await {
            Ok(Some((lat, status, sent))) => {
                if args.trace.is_some() {
                    use std::fmt::Write as _;
                    let _ = writeln!(
                        trace,
                        "{:.3} {} {status}",
                        sent.saturating_duration_since(start).as_secs_f64() * 1e3,
                        lat.as_micros()
                    );
                }
                if !(200..300).contains(&status) {
                    non_2xx += 1;
                }
                latencies.push(lat);
            }
            _ => errors += 1,
        }
    }
    if let Some(path) = &args.trace {
        std::fs::write(path, trace)
            .with_context(|| format!("cannot write the trace to {}", path.display()))?;
    }
    latencies.sort();
    let pct = |p: f64| -> String {
        let idx = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies
            .get(idx)
            .map(|d| format!("{:.3}ms", d.as_secs_f64() * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{} rate={}/s requests={} errors={} non_2xx={} p50={} p90={} p99={} p99.9={} max={}",
        args.label,
        args.rate,
        latencies.len(),
        errors,
        non_2xx,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}
