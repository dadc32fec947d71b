//! What credential injection costs a request: unwrapping the data key and opening the value
//! (`Vault::reveal`), then forming the upstream header. Prints p50/p99/p99.9 over 200,000
//! injections on one thread.
//!
//! `cargo bench -p palisade-vault --bench inject` (results in BENCHMARKS.md)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use palisade_vault::{KeySource, Vault};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let dir = std::env::temp_dir().join(format!("palisade-inject-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(palisade_store::SqliteStore::open(&dir).unwrap());
    let vault = Vault::open(store, KeySource::File(dir.join("vault-master.key"))).unwrap();
    // A realistic token and a hundred other secrets in the vault.
    for i in 0..100 {
        vault
            .put(
                &format!("other/{i}"),
                format!("value-{i}").as_bytes(),
                None,
                1,
            )
            .unwrap();
    }
    vault
        .put(
            "tickets/api-token",
            b"ghp_0123456789abcdefghijklmnopqrstuvwxyzAB",
            None,
            1,
        )
        .unwrap();
    let n = 200_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let value = vault.reveal("tickets/api-token").unwrap();
        let mut header = zeroize::Zeroizing::new(b"Bearer ".to_vec());
        header.extend_from_slice(&value);
        let mut v = http::HeaderValue::from_bytes(&header).unwrap();
        v.set_sensitive(true);
        std::hint::black_box(v);
        samples.push(start.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    println!(
        "inject  {n} injections: p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
        at(0.50),
        at(0.99),
        at(0.999),
        at(1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
