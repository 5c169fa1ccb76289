//! The `switchyard` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// jemalloc instead of glibc's allocator: frames and queue buffers are allocated on one core and
/// freed on the other, where glibc's arena lock showed in profiles; measured in docs/decisions.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use switchyard::config::{BackendKind, Config, LogFormat, Overrides};

/// Switchyard: real-time messaging over WebSocket (rooms, direct messages, broadcasts), with an
/// embedded in-memory backend by default.
///
/// Configuration comes from built-in defaults, then the TOML file given with --config, then
/// SWITCHYARD_* environment variables (one per key, e.g. SWITCHYARD_QUEUE_CAPACITY), then the flags
/// below. Without a subcommand, `serve` runs.
#[derive(Parser, Debug)]
#[command(name = "switchyard", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (the default).
    Serve(ServeArgs),
    /// Print the effective configuration as TOML and exit (checks it, too).
    Config(ServeArgs),
}

#[derive(Args, Debug, Clone, Default)]
struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:8000; port 0 picks a free port [env: SWITCHYARD_LISTEN]
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// TOML configuration file [env: SWITCHYARD_CONFIG]
    #[arg(long, value_name = "FILE", env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Bearer key for the HTTP API; required to listen on a non-loopback address [env: SWITCHYARD_API_KEY]
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Name of this node in welcome frames and logs [env: SWITCHYARD_NODE_ID]
    #[arg(long, value_name = "NAME")]
    node_id: Option<String>,
    /// Backend: memory (embedded, one node) or redis (many nodes; needs --redis-url or
    /// redis_cluster_urls) [env: SWITCHYARD_BACKEND]
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Redis URL for --backend redis [env: SWITCHYARD_REDIS_URL]
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Log format (auto: JSON unless standard error is a terminal) [env: SWITCHYARD_LOG_FORMAT]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum BackendArg {
    Memory,
    Redis,
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            listen: self.listen,
            api_key: self.api_key.clone(),
            node_id: self.node_id.clone(),
            backend: self.backend.map(|b| match b {
                BackendArg::Memory => BackendKind::Memory,
                BackendArg::Redis => BackendKind::Redis,
            }),
            redis_url: self.redis_url.clone(),
            log_format: self.log_format,
        };
        Config::load(self.config.as_deref(), &overrides)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (command_is_config, args) = match cli.command {
        Some(Command::Config(args)) => (true, args),
        Some(Command::Serve(args)) => (false, args),
        None => (false, cli.serve),
    };
    let config = match args.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            return ExitCode::from(2);
        }
    };
    if command_is_config {
        match toml_string(&config) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("switchyard: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    switchyard::logging::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(switchyard::serve::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            tracing::error!(error = format!("{e:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

fn toml_string(config: &Config) -> anyhow::Result<String> {
    let value = serde_json::to_value(config)?;
    let mut out = String::new();
    if let serde_json::Value::Object(map) = value {
        for (key, value) in map {
            match value {
                serde_json::Value::Null => out.push_str(&format!("# {key} is not set\n")),
                other => out.push_str(&format!("{key} = {other}\n")),
            }
        }
    }
    Ok(out)
}
