//! Connections to Redis: a command connection (multiplexed, reconnecting) and a subscriber
//! connection (RESP3 push messages, resubscribing after reconnects), for standalone Redis or Redis
//! Cluster. Standalone uses classic pub/sub; Cluster uses sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`),
//! because classic pub/sub is broadcast to every cluster node.

use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, ProtocolVersion, RedisResult, ScriptInvocation};

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (`redis://` or `rediss://`).
    Standalone(String),
    /// Cluster seed nodes.
    Cluster(Vec<String>),
}

/// A cheap-to-clone handle for commands.
#[derive(Clone)]
pub enum Commands {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Commands {
    pub async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Commands::Standalone(c) => invocation.invoke_async(&mut c.clone()).await,
            Commands::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
        }
    }

    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Commands::Standalone(c) => cmd.query_async(&mut c.clone()).await,
            Commands::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        match self {
            Commands::Standalone(c) => pipe.query_async(&mut c.clone()).await,
            Commands::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }
}

/// The subscriber side.
pub enum Subscriber {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Subscriber {
    pub async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Standalone(c) => c.clone().subscribe(channel).await,
            Subscriber::Cluster(c) => c.clone().ssubscribe(channel).await,
        }
    }

    pub async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Standalone(c) => c.clone().unsubscribe(channel).await,
            Subscriber::Cluster(c) => c.clone().sunsubscribe(channel).await,
        }
    }

    /// A round trip on the subscriber connection (which reconnects it if it was lost).
    pub async fn ping(&self) -> RedisResult<()> {
        match self {
            Subscriber::Standalone(c) => redis::cmd("PING").query_async(&mut c.clone()).await,
            Subscriber::Cluster(c) => redis::cmd("PING").query_async(&mut c.clone()).await,
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

/// Opens the command and subscriber connections. `push` receives the subscriber's messages.
pub async fn connect(
    topology: &Topology,
    timeouts: Timeouts,
    tls_ca_pem: Option<&[u8]>,
    push: impl AsyncPushSender,
) -> RedisResult<(Commands, Subscriber)> {
    // rustls needs a process-wide crypto provider for `rediss://`; redis-rs does not pick one.
    // An error only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certificates = || redis::TlsCertificates {
        client_tls: None,
        root_cert: tls_ca_pem.map(<[u8]>::to_vec),
    };
    match topology {
        Topology::Standalone(url) => {
            let client = match tls_ca_pem {
                Some(_) => redis::Client::build_with_tls(resp3(url), certificates())?,
                None => redis::Client::open(resp3(url))?,
            };
            let base = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeouts.connect))
                .set_response_timeout(Some(timeouts.response))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let commands = ConnectionManager::new_with_config(client.clone(), base.clone()).await?;
            let subscriber = ConnectionManager::new_with_config(
                client,
                base.set_push_sender(push).set_automatic_resubscription(),
            )
            .await?;
            Ok((Commands::Standalone(commands), Subscriber::Standalone(subscriber)))
        }
        Topology::Cluster(urls) => {
            let urls: Vec<String> = urls.iter().map(|u| resp3(u)).collect();
            let builder = || {
                let builder = ClusterClientBuilder::new(urls.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    .retries(3);
                match tls_ca_pem {
                    Some(_) => builder.certs(certificates()),
                    None => builder,
                }
            };
            let commands = builder().build()?.get_async_connection().await?;
            let subscriber = builder()
                .push_sender(push)
                .build()?
                .get_async_connection()
                .await?;
            Ok((Commands::Cluster(commands), Subscriber::Cluster(subscriber)))
        }
    }
}
