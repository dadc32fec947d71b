//! The `palisade` binary: `palisade serve` runs the server; every other command is a client of
//! the admin API (`PALISADE_ADDR`, `PALISADE_TOKEN`), except `audit verify`, which reads the
//! database file directly so it works with the server stopped.

mod cli;
mod client;
mod scan;

use clap::Parser;
use std::process::ExitCode;

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
