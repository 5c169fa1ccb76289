//! The `switchyard-bench` command line: `idle`, `fanout`, `rtt` and `churn` scenarios against a
//! running server, or against several nodes that share a backend (`--url` repeated).
//! Prints a readable report (with a progress line while it runs, on a terminal), or one JSON line
//! with `--json`; `--plot FILE.svg` also draws the latency distribution. The hidden `worker`
//! subcommand is how the load generator runs its own worker processes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use clap::{Parser, Subcommand};
use switchyard_bench::{
    ChurnConfig, FanoutConfig, IdleConfig, LatencyPlot, RttConfig, plot, progress, run_churn, run_fanout,
    run_idle, run_rtt, worker,
};

/// Load generator for Switchyard. Targets loopback addresses only, unless --allow-remote.
#[derive(Parser, Debug)]
#[command(name = "switchyard-bench", version)]
struct Cli {
    /// Print the report as one JSON line (for scripts), and no progress line
    #[arg(long, global = true)]
    json: bool,
    /// Also write an SVG plot of the latency distribution (percentiles) to this file
    #[arg(long, global = true, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Ramp up idle connections that each join one room, hold them, and measure memory per connection
    Idle(IdleConfig),
    /// Publish to rooms with many subscribers and measure throughput, latency, loss and order
    Fanout(FanoutConfig),
    /// Ping → pong round trips on many connections: latency percentiles and round trips per second
    Rtt(RttConfig),
    /// Open and close connections at a steady rate around a steady population; watch server memory
    Churn(ChurnConfig),
    /// A worker process of the load generator (started by the load generator itself)
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_worker = matches!(cli.scenario, Scenario::Worker);
    if !cli.json && !is_worker {
        progress::enable_on_terminal();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("switchyard-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let plot_file = cli.plot.clone();
    let json = cli.json;
    let outcome = runtime.block_on(async {
        match cli.scenario {
            Scenario::Idle(cfg) => finish(run_idle(cfg).await, json, plot_file.as_deref()),
            Scenario::Fanout(cfg) => finish(run_fanout(cfg).await, json, plot_file.as_deref()),
            Scenario::Rtt(cfg) => finish(run_rtt(cfg).await, json, plot_file.as_deref()),
            Scenario::Churn(cfg) => finish(run_churn(cfg).await, json, plot_file.as_deref()),
            Scenario::Worker => worker::serve_stdio().await,
        }
    });
    // Connection tasks that are still winding down must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let who = if is_worker {
                "switchyard-bench worker"
            } else {
                "switchyard-bench"
            };
            eprintln!("{who}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the report's plot, then prints the report (an error, not a panic, if stdout is closed).
fn finish<R>(report: anyhow::Result<R>, json: bool, plot_file: Option<&Path>) -> anyhow::Result<()>
where
    R: serde::Serialize + std::fmt::Display + LatencyPlot,
{
    let report = report?;
    if let Some(path) = plot_file {
        plot::write_svg(path, &report)?;
    }
    let mut stdout = std::io::stdout().lock();
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&report)?)
    } else {
        write!(stdout, "{report}")
    }
    .context("cannot print the report")?;
    if let (Some(path), false) = (plot_file, json) {
        writeln!(stdout, "  latency plot written to {}", path.display())
            .context("cannot print the report")?;
    }
    Ok(())
}
