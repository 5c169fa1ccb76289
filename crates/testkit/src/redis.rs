//! Real Redis processes for tests: a standalone server or a 3-master/3-replica cluster on free
//! loopback ports, in a temporary directory, killed (and the directory removed) when dropped. A
//! test fails, never skips, when Redis cannot start.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

fn free_port_pair() -> u16 {
    // Cluster nodes also listen on port + 10000 (the cluster bus).
    for _ in 0..200 {
        let port = 20_000 + (rand::random::<u16>() % 25_000);
        let ok = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if ok {
            return port;
        }
    }
    panic!("no free port pair found");
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_for_ping(port: u16) -> bool {
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..100 {
        if let Ok(client) = redis::Client::open(url.as_str())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One redis-server process.
pub struct RedisProcess {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisProcess {
    /// Starts a standalone server (no persistence).
    pub async fn start() -> RedisProcess {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> RedisProcess {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = free_port_pair();
            let mut process = RedisProcess {
                child: None,
                port,
                dir: temp_dir("redis"),
                extra: extra.clone(),
            };
            if process.spawn().await {
                return process;
            }
        }
        panic!("redis-server could not be started (is it installed? scripts/test installs it)");
    }

    async fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--protected-mode")
            .arg("no")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let Ok(child) = command.spawn() else {
            panic!("cannot run redis-server: is it installed?")
        };
        self.child = Some(child);
        if wait_for_ping(self.port).await {
            true
        } else {
            self.kill().await;
            false
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port (data is gone: no persistence).
    pub async fn restart(&mut self) {
        self.kill().await;
        assert!(
            self.spawn().await,
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Stops it gracefully (SIGTERM) — like `kill`, but lets Redis close its connections.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters with one replica each.
pub struct RedisCluster {
    pub nodes: Vec<RedisProcess>,
    /// With [`RedisCluster::start_tls`]: each node's TLS port (cluster bus and replication on TLS
    /// too) and the certificates.
    pub tls: Option<(Vec<u16>, TestCerts)>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        Self::start_with(None).await
    }

    /// A cluster whose clients, bus and replication all use TLS (each node keeps a plain port too,
    /// which only the test helpers use).
    pub async fn start_tls() -> RedisCluster {
        Self::start_with(Some(TestCerts::new())).await
    }

    async fn start_with(certs: Option<TestCerts>) -> RedisCluster {
        let mut nodes = Vec::new();
        let mut tls_ports = Vec::new();
        for _ in 0..6 {
            let dir_conf = format!("nodes-{:08x}.conf", rand::random::<u32>());
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &dir_conf,
                "--cluster-node-timeout",
                "1500",
                "--cluster-replica-validity-factor",
                "0",
                "--repl-diskless-sync-delay",
                "0",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            if let Some(certs) = &certs {
                let tls_port = free_port_pair();
                tls_ports.push(tls_port);
                args.extend(certs.server_args(tls_port));
                args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(RedisProcess::start_with(&args).await);
        }
        let mut command = Command::new("redis-cli");
        let addresses: Vec<String> = match &certs {
            Some(certs) => {
                command.arg("--tls").arg("--cacert").arg(&certs.ca_file);
                tls_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
            }
            None => nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect(),
        };
        let output = command
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .arg("--cluster-replicas")
            .arg("1")
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = RedisCluster {
            nodes,
            tls: certs.map(|certs| (tls_ports, certs)),
        };
        cluster.wait_ok().await;
        cluster.wait_replication_streaming().await;
        cluster
    }

    /// Waits until every master streams its writes to its replica. A replica that has just
    /// finished a diskless initial sync is `online`, but its master sends it the write stream only
    /// after the replica's first `REPLCONF ACK` (sent once a second): a master killed in that window
    /// takes every write since the sync with it. Measured here before this wait: 20 of 20 room
    /// publications missing on the promoted replica in about one failover test run of four. One
    /// (keyless) `FLUSHALL` per master on the fresh, empty cluster, then `WAIT 1` for a replica to
    /// acknowledge it.
    async fn wait_replication_streaming(&self) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let client = redis::Client::open(node.url()).expect("node url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to a cluster node");
            // `WAIT` blocks for up to a second, past the client's default response timeout.
            conn.set_response_timeout(Duration::from_secs(15));
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .expect("INFO replication");
            if !info.contains("role:master") {
                continue;
            }
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut conn)
                .await
                .expect("FLUSHALL on a fresh master");
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .expect("WAIT for the replica");
            assert_eq!(
                acked, 1,
                "a replica did not acknowledge its master's writes within 10 s"
            );
        }
    }

    /// `rediss://` seed URLs of the live nodes (a cluster from [`RedisCluster::start_tls`]).
    pub fn tls_urls(&self) -> Vec<String> {
        let Some((ports, _)) = &self.tls else {
            return Vec::new();
        };
        self.nodes
            .iter()
            .zip(ports)
            .filter(|(n, _)| n.child.is_some())
            .map(|(_, port)| format!("rediss://127.0.0.1:{port}/"))
            .collect()
    }

    /// Waits until every live node reports `cluster_state:ok` and every master has an online
    /// replica (its initial sync done), so that replication is really in place.
    pub async fn wait_ok(&self) {
        self.wait_state_ok().await;
        for _ in 0..300 {
            let mut masters_without_replica = 0;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = async {
                    let client = redis::Client::open(node.url()).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("INFO")
                        .arg("replication")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                }
                .await
                .unwrap_or_default();
                if info.contains("role:master") && !info.contains("state=online") {
                    masters_without_replica += 1;
                }
            }
            if masters_without_replica == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the cluster's replicas did not finish their initial sync");
    }

    async fn wait_state_ok(&self) {
        for _ in 0..200 {
            let mut all_ok = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = async {
                    let client = redis::Client::open(node.url()).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut conn)
                        .await
                        .ok()
                }
                .await;
                if !info.is_some_and(|i| i.contains("cluster_state:ok")) {
                    all_ok = false;
                }
            }
            if all_ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the cluster did not reach cluster_state:ok");
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.url())
            .collect()
    }
}

/// A standalone Redis that also serves TLS, with a certificate for 127.0.0.1 issued by a test CA
/// made here (no openssl needed). Stopped when dropped, like [`RedisProcess`].
pub struct TlsRedis {
    pub process: RedisProcess,
    pub tls_port: u16,
    /// The server's certificate and the CA (`certs.ca_file`) that issued it.
    pub certs: TestCerts,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA and a server certificate for 127.0.0.1 it issued, as PEM files in a temporary
/// directory (removed when dropped).
pub struct TestCerts {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    _dir: TempDir,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let dir = TempDir(temp_dir("redis-tls"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        let certs = TestCerts {
            ca_file: dir.0.join("ca.pem"),
            cert_file: dir.0.join("server.pem"),
            key_file: dir.0.join("server.key"),
            _dir: dir,
        };
        std::fs::write(&certs.ca_file, ca_cert.pem()).unwrap();
        std::fs::write(&certs.cert_file, server_cert.pem()).unwrap();
        std::fs::write(&certs.key_file, server_key.serialize_pem()).unwrap();
        certs
    }

    /// `redis-server` arguments serving TLS on `tls_port` with these certificates (clients need
    /// no certificate of their own).
    pub fn server_args(&self, tls_port: u16) -> Vec<String> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(&self.cert_file),
            "--tls-key-file".into(),
            path(&self.key_file),
            "--tls-ca-cert-file".into(),
            path(&self.ca_file),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}

impl TlsRedis {
    pub async fn start() -> TlsRedis {
        let certs = TestCerts::new();
        let tls_port = free_port_pair();
        let args = certs.server_args(tls_port);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = RedisProcess::start_with(&args).await;
        TlsRedis {
            process,
            tls_port,
            certs,
        }
    }

    /// `rediss://` URL of the TLS port.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }
}
