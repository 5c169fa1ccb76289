//! Configuration: built-in defaults, then a TOML file (`--config`), then `SWITCHYARD_*` environment
//! variables, then command-line flags. Every key is flat and has the same name in all three
//! (`queue_capacity` ↔ `SWITCHYARD_QUEUE_CAPACITY`). Unknown keys and invalid values stop the start
//! with a message that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use switchyard_core::backend::BackendSettings;
use switchyard_core::node::{DrainSettings, NodeSettings};
use switchyard_core::queue::QueueLimits;

/// Which backend carries messages and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Embedded, one node, nothing persisted.
    Memory,
    /// Redis (standalone or Cluster), many nodes.
    Redis,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Redis => "redis",
        }
    }
}

/// A list of strings, given as a TOML array or as one comma-separated string (environment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            List(Vec<String>),
            One(String),
        }
        Ok(StringList(match Either::deserialize(d)? {
            Either::List(list) => list,
            Either::One(text) => text
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when standard error is not a terminal, readable text when it is.
    Auto,
    Json,
    Text,
}

/// Every setting of `switchyard serve`. Durations are in the unit their name ends with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on. Port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
    /// Bearer key required by the HTTP API (`Authorization: Bearer <key>`). Without it the server
    /// only binds to loopback.
    pub api_key: Option<String>,
    /// This node's name (in `welcome` frames and logs). Default: `switchyard-<port>`.
    pub node_id: Option<String>,
    pub backend: BackendKind,
    /// Redis URL (`redis://` or `rediss://`) of a standalone Redis, for `backend = "redis"`.
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster (instead of `redis_url`); in the environment a
    /// comma-separated list: `SWITCHYARD_REDIS_CLUSTER_URLS=redis://a:7000,redis://b:7001`.
    pub redis_cluster_urls: Option<StringList>,
    /// Prefix of every Redis key and channel (sessions too: `<prefix>session:<id>`).
    pub redis_key_prefix: String,
    /// Longest wait for a Redis answer; a request that would wait longer fails with `UNAVAILABLE`.
    pub redis_timeout_ms: u64,
    /// Consecutive Redis failures that open the circuit breaker (requests then fail at once).
    pub redis_breaker_failures: u32,
    /// How long the circuit stays open before one probe request.
    pub redis_breaker_cooldown_ms: u64,
    /// How long a presence entry outlives its node (refreshed every third of it).
    pub redis_presence_ttl_secs: u64,
    /// Replicas that must confirm a publication (Redis `WAIT`) before it is acknowledged; 0
    /// acknowledges on the master's word. See docs/redis.md for what a failover can lose.
    pub redis_ack_replicas: u32,
    /// PEM file of the certificates to trust for a `rediss://` Redis instead of the public web
    /// roots (a private CA or a self-signed server certificate).
    pub redis_tls_ca_file: Option<PathBuf>,
    pub log_format: LogFormat,

    pub session_ttl_secs: u64,
    pub history_size: usize,
    pub history_ttl_secs: u64,
    pub dedup_window_secs: u64,
    pub inbox_ttl_secs: u64,
    pub inbox_max: usize,

    /// Per-connection queue: most messages waiting (the seed's channel-layer `capacity`).
    pub queue_capacity: usize,
    /// Per-connection queue: most bytes waiting.
    pub queue_max_bytes: usize,
    /// Per-connection queue: longest wait of a message (the seed's `expiry`).
    pub queue_expiry_secs: u64,

    /// Largest WebSocket message accepted from a client; larger ones close with 1009.
    pub max_message_bytes: usize,
    pub max_rooms_per_connection: usize,
    pub max_history_limit: usize,
    /// Most publications a rejoin with `since` replays; a larger gap gives `recovered: false`.
    pub recovery_max_publications: usize,
    /// Most payload bytes a rejoin with `since` replays.
    pub recovery_max_bytes: usize,
    /// WebSocket read buffer per connection (tungstenite's default of 128 KiB is far too much).
    pub ws_read_buffer_bytes: usize,
    /// Bytes buffered before a write reaches the socket (writes are flushed once per burst anyway).
    pub ws_write_buffer_bytes: usize,
    /// Wait this long after a frame is queued for an idle connection before writing, so frames that
    /// follow join the same write (0: write at once).
    pub write_delay_ms: u64,
    /// The write delay used instead while the node's workers are busy (90 % of their time over
    /// 100 ms), so that a saturated node spends its CPU on deliveries rather than on sends
    /// (0: never).
    pub busy_write_delay_ms: u64,

    pub ping_interval_secs: u64,
    pub idle_timeout_secs: u64,
    /// Time allowed for the first `auth` frame when no `?session=` was given.
    pub auth_timeout_secs: u64,
    /// Time allowed to receive a request's headers (including the WebSocket handshake).
    pub handshake_timeout_secs: u64,
    /// A single write burst to a client that takes longer than this closes it as a slow consumer.
    pub write_timeout_secs: u64,

    pub drain_timeout_secs: u64,
    pub drain_batch_size: usize,
    pub drain_batch_interval_ms: u64,
    pub reconnect_jitter_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        let backend = BackendSettings::default();
        let node = NodeSettings::default();
        let queue = QueueLimits::default();
        let drain = DrainSettings::default();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            api_key: None,
            node_id: None,
            backend: BackendKind::Memory,
            redis_url: None,
            redis_cluster_urls: None,
            redis_key_prefix: String::new(),
            redis_timeout_ms: 500,
            redis_breaker_failures: 3,
            redis_breaker_cooldown_ms: 2000,
            redis_presence_ttl_secs: 60,
            redis_ack_replicas: 0,
            redis_tls_ca_file: None,
            log_format: LogFormat::Auto,
            session_ttl_secs: backend.session_ttl_secs,
            history_size: backend.history_size,
            history_ttl_secs: backend.history_ttl_secs,
            dedup_window_secs: backend.dedup_window_secs,
            inbox_ttl_secs: backend.inbox_ttl_secs,
            inbox_max: backend.inbox_max,
            queue_capacity: queue.capacity,
            queue_max_bytes: queue.max_bytes,
            queue_expiry_secs: queue.expiry_ms / 1000,
            max_message_bytes: 64 * 1024,
            max_rooms_per_connection: node.max_rooms_per_connection,
            max_history_limit: node.max_history_limit,
            recovery_max_publications: node.recovery_max_publications,
            recovery_max_bytes: node.recovery_max_bytes,
            ws_read_buffer_bytes: 512,
            ws_write_buffer_bytes: 16 * 1024,
            write_delay_ms: 0,
            busy_write_delay_ms: 30,
            ping_interval_secs: node.ping_interval_ms / 1000,
            idle_timeout_secs: node.idle_timeout_ms / 1000,
            auth_timeout_secs: 10,
            handshake_timeout_secs: 10,
            write_timeout_secs: 10,
            drain_timeout_secs: drain.timeout.as_secs(),
            drain_batch_size: drain.batch_size,
            drain_batch_interval_ms: u64::try_from(drain.batch_interval.as_millis()).unwrap_or(100),
            reconnect_jitter_ms: drain.reconnect_jitter_ms,
        }
    }
}

/// Values given on the command line; they override everything else.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// Environment variables read by clap rather than by the configuration (they name the file, not a key).
const NOT_CONFIG_KEYS: &[&str] = &["config"];

impl Config {
    /// Loads the configuration from the file (if any), the environment and the overrides.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                anyhow::bail!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                );
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment
            .merge(Env::prefixed("SWITCHYARD_").filter(|key| !NOT_CONFIG_KEYS.contains(&key.as_str())))
            .merge(Serialized::defaults(overrides));
        let config: Config = figment.extract().map_err(|e| {
            let errors: Vec<String> = e.into_iter().map(describe).collect();
            anyhow::anyhow!("invalid configuration:\n  {}", errors.join("\n  "))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.redis_tls_ca_file {
            read_ca_file(path)?;
        }
        let positive: [(&str, u64); 16] = [
            ("session_ttl_secs", self.session_ttl_secs),
            ("history_size", self.history_size as u64),
            ("history_ttl_secs", self.history_ttl_secs),
            ("dedup_window_secs", self.dedup_window_secs),
            ("inbox_ttl_secs", self.inbox_ttl_secs),
            ("inbox_max", self.inbox_max as u64),
            ("queue_capacity", self.queue_capacity as u64),
            ("queue_expiry_secs", self.queue_expiry_secs),
            ("max_rooms_per_connection", self.max_rooms_per_connection as u64),
            ("max_history_limit", self.max_history_limit as u64),
            ("ping_interval_secs", self.ping_interval_secs),
            ("auth_timeout_secs", self.auth_timeout_secs),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            ("write_timeout_secs", self.write_timeout_secs),
            ("drain_batch_size", self.drain_batch_size as u64),
            ("ws_read_buffer_bytes", self.ws_read_buffer_bytes as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                anyhow::bail!("invalid configuration: `{name}` must be greater than 0");
            }
        }
        if self.max_message_bytes < 128 {
            anyhow::bail!(
                "invalid configuration: `max_message_bytes` must be at least 128 (got {})",
                self.max_message_bytes
            );
        }
        for (key, delay_ms) in [
            ("write_delay_ms", self.write_delay_ms),
            ("busy_write_delay_ms", self.busy_write_delay_ms),
        ] {
            if delay_ms > 1000 {
                anyhow::bail!(
                    "invalid configuration: `{key}` must be at most 1000 (got {delay_ms}); it adds to the latency of the deliveries it holds"
                );
            }
        }
        if self.queue_max_bytes < self.max_message_bytes {
            anyhow::bail!(
                "invalid configuration: `queue_max_bytes` ({}) must be at least `max_message_bytes` ({})",
                self.queue_max_bytes,
                self.max_message_bytes
            );
        }
        if self.idle_timeout_secs < 2 * self.ping_interval_secs {
            anyhow::bail!(
                "invalid configuration: `idle_timeout_secs` ({}) must be at least twice `ping_interval_secs` ({})",
                self.idle_timeout_secs,
                self.ping_interval_secs
            );
        }
        if let Some(key) = &self.api_key
            && key.len() < 16
        {
            anyhow::bail!("invalid configuration: `api_key` must be at least 16 characters long");
        }
        match self.backend {
            BackendKind::Memory => {}
            BackendKind::Redis => {
                let urls: Vec<&String> = match (&self.redis_url, &self.redis_cluster_urls) {
                    (Some(_), Some(_)) => anyhow::bail!(
                        "invalid configuration: set either `redis_url` (standalone) or `redis_cluster_urls` (Cluster), not both"
                    ),
                    (None, None) => anyhow::bail!(
                        "invalid configuration: `backend = \"redis\"` needs `redis_url` (SWITCHYARD_REDIS_URL) or `redis_cluster_urls`"
                    ),
                    (Some(url), None) => vec![url],
                    (None, Some(list)) if list.0.is_empty() => {
                        anyhow::bail!("invalid configuration: `redis_cluster_urls` is empty")
                    }
                    (None, Some(list)) => list.0.iter().collect(),
                };
                for url in urls {
                    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                        anyhow::bail!(
                            "invalid configuration: Redis URL `{url}` must start with redis:// or rediss://"
                        );
                    }
                }
                if self.redis_key_prefix.contains(['{', '}']) {
                    anyhow::bail!(
                        "invalid configuration: `redis_key_prefix` must not contain braces (they select Cluster hash slots)"
                    );
                }
                for (name, value) in [
                    ("redis_timeout_ms", self.redis_timeout_ms),
                    ("redis_breaker_failures", u64::from(self.redis_breaker_failures)),
                    ("redis_presence_ttl_secs", self.redis_presence_ttl_secs),
                ] {
                    if value == 0 {
                        anyhow::bail!("invalid configuration: `{name}` must be greater than 0");
                    }
                }
            }
        }
        if self.api_key.is_none() && !self.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to listen on {} without an API key: set `api_key` (SWITCHYARD_API_KEY or --api-key) \
                 or listen on a loopback address such as 127.0.0.1",
                self.listen
            );
        }
        Ok(())
    }

    /// Redis settings, for `backend = "redis"` (validated by `load`); reads `redis_tls_ca_file`.
    pub fn redis_settings(&self) -> anyhow::Result<Option<switchyard_redis::RedisSettings>> {
        let topology = match (&self.redis_url, &self.redis_cluster_urls) {
            (Some(url), _) => switchyard_redis::Topology::Standalone(url.clone()),
            (None, Some(list)) => switchyard_redis::Topology::Cluster(list.0.clone()),
            (None, None) => return Ok(None),
        };
        let tls_ca_pem = match &self.redis_tls_ca_file {
            Some(path) => Some(read_ca_file(path)?),
            None => None,
        };
        let mut settings = switchyard_redis::RedisSettings::new(topology);
        settings.key_prefix = self.redis_key_prefix.clone();
        settings.timeouts.response = Duration::from_millis(self.redis_timeout_ms);
        settings.breaker_failures = self.redis_breaker_failures;
        settings.breaker_cooldown = Duration::from_millis(self.redis_breaker_cooldown_ms);
        settings.presence_ttl = Duration::from_secs(self.redis_presence_ttl_secs);
        settings.ack_replicas = self.redis_ack_replicas;
        settings.tls_ca_pem = tls_ca_pem;
        Ok(Some(settings))
    }

    pub fn backend_settings(&self) -> BackendSettings {
        BackendSettings {
            session_ttl_secs: self.session_ttl_secs,
            history_size: self.history_size,
            history_ttl_secs: self.history_ttl_secs,
            dedup_window_secs: self.dedup_window_secs,
            inbox_ttl_secs: self.inbox_ttl_secs,
            inbox_max: self.inbox_max,
        }
    }

    pub fn node_settings(&self, node_id: String) -> NodeSettings {
        NodeSettings {
            node_id,
            queue: QueueLimits {
                capacity: self.queue_capacity,
                max_bytes: self.queue_max_bytes,
                expiry_ms: self.queue_expiry_secs * 1000,
            },
            max_rooms_per_connection: self.max_rooms_per_connection,
            max_history_limit: self.max_history_limit,
            recovery_max_publications: self.recovery_max_publications,
            recovery_max_bytes: self.recovery_max_bytes,
            ping_interval_ms: self.ping_interval_secs * 1000,
            idle_timeout_ms: self.idle_timeout_secs * 1000,
            write_timeout_ms: self.write_timeout_secs * 1000,
            write_delay: Duration::from_millis(self.write_delay_ms),
            busy_write_delay: Duration::from_millis(self.busy_write_delay_ms),
            drain: DrainSettings {
                timeout: Duration::from_secs(self.drain_timeout_secs),
                batch_size: self.drain_batch_size,
                batch_interval: Duration::from_millis(self.drain_batch_interval_ms),
                reconnect_jitter_ms: self.reconnect_jitter_ms,
            },
        }
    }
}

/// The certificates of `redis_tls_ca_file`, checked to hold at least one PEM certificate.
fn read_ca_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: `redis_tls_ca_file` {}: {e}",
            path.display()
        )
    })?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        anyhow::bail!(
            "invalid configuration: `redis_tls_ca_file` {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(pem)
}

/// One configuration error as a line naming the key and where its value came from.
fn describe(e: figment::Error) -> String {
    let key = if e.path.is_empty() {
        None
    } else {
        Some(e.path.join("."))
    };
    let source = e.metadata.as_ref().map(|m| match &m.source {
        Some(figment::Source::File(path)) => format!(" in {}", path.display()),
        _ => format!(" from {}", m.name),
    });
    let kind = e.kind.to_string();
    match key {
        Some(key) => format!("`{key}`{}: {kind}", source.unwrap_or_default()),
        None => format!("{kind}{}", source.unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_seed_compatible() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.session_ttl_secs, 3600);
        assert_eq!(c.queue_capacity, 1500);
        assert_eq!(c.queue_expiry_secs, 10);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = std::env::temp_dir().join(format!("sy-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "queue_capacity = \"lots\"\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue_capacity"), "{err}");
        std::fs::write(&path, "queue_capacty = 5\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue_capacty"), "{err}");
        std::fs::write(&path, "queue_capacity = 0\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue_capacity"), "{err}");
        std::fs::write(&path, "write_delay_ms = 5000\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("write_delay_ms"), "{err}");
        std::fs::write(&path, "busy_write_delay_ms = 1001\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("busy_write_delay_ms"), "{err}");
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("API key"), "{err}");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:9000\"\napi_key = \"0123456789abcdef0123\"\n",
        )
        .unwrap();
        assert!(Config::load(Some(&path), &Overrides::default()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
