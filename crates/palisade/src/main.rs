//! The `palisade` binary: `palisade serve` runs the server; every other command is a client of
//! the admin API (`PALISADE_ADDR`, `PALISADE_TOKEN`), except `audit verify`, which reads the
//! database file directly so it works with the server stopped.

mod cli;
mod client;
mod scan;

use clap::Parser;
use std::process::ExitCode;

/// mimalloc rather than the system allocator: the server and the audit queries allocate many
/// small, short-lived objects (JSON rows, Cedar requests, HTTP headers), where glibc's malloc
/// spent a third of a whole-log query's time (BENCHMARKS.md, audit pipeline).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
