//! The `switchyard-bench` command line: `idle` and `fanout` scenarios against a running server, or
//! against several nodes that share a backend (`--url` repeated).
//! Prints a readable report, or one JSON line with `--json`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard_bench::{FanoutConfig, IdleConfig, run_fanout, run_idle};

/// Load generator for Switchyard. Targets loopback addresses only, unless --allow-remote.
#[derive(Parser, Debug)]
#[command(name = "switchyard-bench", version)]
struct Cli {
    /// Print the report as one JSON line (for scripts)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Ramp up idle connections that each join one room, hold them, and measure memory per connection
    Idle(IdleConfig),
    /// Publish to rooms with many subscribers and measure throughput, latency, loss and order
    Fanout(FanoutConfig),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("switchyard-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let printed = runtime.block_on(async {
        match cli.scenario {
            Scenario::Idle(cfg) => run_idle(cfg).await.and_then(|report| print(&report, cli.json)),
            Scenario::Fanout(cfg) => run_fanout(cfg).await.and_then(|report| print(&report, cli.json)),
        }
    });
    // Connection tasks that are still winding down must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match printed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
