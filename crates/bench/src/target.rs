//! The servers under test: their URLs (one node, or several nodes that share a backend), the
//! loopback-only policy, the source addresses connections are spread over, and the open-file budget
//! of this process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, anyhow, bail};

use crate::procfs;
use crate::ws::Endpoint;

/// Open files kept free for everything that is not a test connection (runtime, HTTP calls, /proc).
const SPARE_OPEN_FILES: u64 = 1000;

/// A resolved target.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
    /// Addresses connections are bound to before connecting, used round-robin; empty means "let the
    /// kernel choose".
    pub sources: Vec<IpAddr>,
}

impl Target {
    /// Parses `http://HOST:PORT`, refuses a non-loopback host unless `allow_remote`, and prepares
    /// `sources` source addresses 127.0.0.1 ..= 127.0.0.K for a loopback target.
    pub async fn resolve(url: &str, allow_remote: bool, sources: u8) -> anyhow::Result<Target> {
        let parsed = url::Url::parse(url).with_context(|| format!("invalid URL {url}"))?;
        if parsed.scheme() != "http" {
            bail!("the URL must start with http:// (the server's base URL), got {url}");
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow!("URL {url} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .ok_or_else(|| anyhow!("{host} resolves to no address"))?;
        let loopback = addr.ip().is_loopback();
        if !loopback && !allow_remote {
            bail!(
                "refusing to load {addr}: it is not a loopback address. Load tests target this machine \
                 only, unless you pass --allow-remote for a server you own"
            );
        }
        if sources == 0 {
            bail!("--sources must be at least 1");
        }
        let sources = if loopback && addr.is_ipv4() {
            (1..=sources)
                .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
                .collect()
        } else if sources > 1 {
            bail!("--sources > 1 needs an IPv4 loopback target (127.0.0.x source addresses)");
        } else {
            Vec::new()
        };
        Ok(Target {
            endpoint: Endpoint {
                addr,
                host: format!("{}:{}", parsed.host_str().unwrap_or("localhost"), port),
            },
            sources,
        })
    }

    /// The source address of the `index`-th connection.
    pub fn source(&self, index: usize) -> Option<IpAddr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[index % self.sources.len()])
        }
    }
}

/// One or more nodes that share a backend (e.g. one Redis), so that a session, a room's offsets
/// and its history are the same on each of them. Connections, session creation and history reads
/// are spread over the nodes round-robin.
#[derive(Debug, Clone)]
pub struct Nodes {
    targets: Vec<Target>,
}

impl Nodes {
    /// Resolves every URL as [`Target::resolve`] does. At least one URL is needed; the same URL
    /// twice is refused (it would count one node twice).
    pub async fn resolve(urls: &[String], allow_remote: bool, sources: u8) -> anyhow::Result<Nodes> {
        if urls.is_empty() {
            bail!("at least one --url is needed");
        }
        let mut targets: Vec<Target> = Vec::with_capacity(urls.len());
        for url in urls {
            let target = Target::resolve(url, allow_remote, sources).await?;
            if targets.iter().any(|t| t.endpoint.addr == target.endpoint.addr) {
                bail!("--url {url} is given twice (as {})", target.endpoint.addr);
            }
            targets.push(target);
        }
        Ok(Nodes { targets })
    }

    /// How many nodes there are (at least 1).
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Always false: there is at least one node.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Node `n`, counted round-robin (`n` modulo the number of nodes).
    pub fn node(&self, n: usize) -> &Target {
        &self.targets[n % self.targets.len()]
    }

    /// The nodes in the order their URLs were given.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// The source addresses connections are spread over (the same for every node); empty when the
    /// kernel chooses.
    pub fn sources(&self) -> &[IpAddr] {
        &self.targets[0].sources
    }

    /// The same nodes with connections bound to `sources` only: a worker process's share of the
    /// source addresses. Empty `sources` keep the current ones.
    pub fn with_sources(mut self, sources: &[IpAddr]) -> Nodes {
        if !sources.is_empty() {
            for target in &mut self.targets {
                target.sources = sources.to_vec();
            }
        }
        self
    }
}

/// How many connections one load-generator process may open: its open-file limit less the spare.
pub fn connections_per_process() -> anyhow::Result<usize> {
    let limit = procfs::open_files_limit()?;
    Ok(usize::try_from(limit.saturating_sub(SPARE_OPEN_FILES)).unwrap_or(usize::MAX))
}

/// Fails clearly when `connections` sockets would not fit under this process's open-file limit.
pub fn check_open_files(connections: usize) -> anyhow::Result<()> {
    let limit = procfs::open_files_limit()?;
    let usable = limit.saturating_sub(SPARE_OPEN_FILES);
    if connections as u64 > usable {
        bail!(
            "{connections} connections do not fit in one load-generator process: it may hold at most \
             {limit} open files (its RLIMIT_NOFILE; on this machine 20,000 is also the hard limit), of \
             which {SPARE_OPEN_FILES} are kept spare, so at most {usable} connections. The idle, rtt \
             and churn connections and the fan-out subscribers are spread over worker processes by \
             themselves; the fan-out publishers stay in the main process"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_remote_targets_and_spreads_sources() {
        let err = Target::resolve("http://192.0.2.1:80", false, 1)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback"), "{err}");
        let target = Target::resolve("http://127.0.0.1:9", false, 3).await.unwrap();
        assert_eq!(target.sources.len(), 3);
        assert_eq!(target.source(4), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        assert_eq!(target.endpoint.host, "127.0.0.1:9");
        assert!(check_open_files(10_000_000).is_err());
        assert!(check_open_files(10).is_ok());
        assert!(connections_per_process().unwrap() > 10);
    }

    #[tokio::test]
    async fn nodes_are_used_round_robin() {
        let urls = [
            "http://127.0.0.1:9".to_string(),
            "http://127.0.0.1:10".to_string(),
        ];
        let nodes = Nodes::resolve(&urls, false, 1).await.unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes.node(0).endpoint.host, "127.0.0.1:9");
        assert_eq!(nodes.node(3).endpoint.host, "127.0.0.1:10");
        assert!(Nodes::resolve(&[], false, 1).await.is_err());
        let twice = [urls[0].clone(), urls[0].clone()];
        assert!(Nodes::resolve(&twice, false, 1).await.is_err());
        let narrowed = nodes
            .clone()
            .with_sources(&[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))]);
        assert_eq!(
            narrowed.node(1).source(7),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
        );
        assert_eq!(nodes.clone().with_sources(&[]).sources(), nodes.sources());
        let remote = [urls[0].clone(), "http://192.0.2.1:80".to_string()];
        assert!(Nodes::resolve(&remote, false, 1).await.is_err());
    }
}
