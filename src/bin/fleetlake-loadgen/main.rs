//! `fleetlake-loadgen`: the load generator, a binary of its own so that the service
//! binary does not carry it. It sends a synthetic fleet's metric streams (and Lambda
//! logs) to a Firehose endpoint, a Kinesis stream or files; see [`loadgen`].

mod fleet;
mod loadgen;

use clap::Parser;

/// The same allocator as `fleetlake`'s: making request bodies allocates and frees
/// many short-lived buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Send a synthetic fleet's metric streams (and Lambda logs) to a Firehose endpoint, a
/// Kinesis stream or files, at a chosen rate; deterministic for a seed; reports
/// datapoints sent, acknowledged, rejected and request latency.
#[derive(Debug, Parser)]
#[command(name = "fleetlake-loadgen", version)]
struct Cli {
    #[command(flatten)]
    args: loadgen::Args,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match loadgen::run(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
