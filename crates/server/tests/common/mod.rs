//! Test harness: runs the real `switchyard` binary on 127.0.0.1 with a port chosen at run time, and
//! stops it when dropped (also when the test fails).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use switchyard_client::{Client, Http};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub http: Http,
}

impl Server {
    /// Starts a node on the memory backend with `env` (`SWITCHYARD_*` settings) added.
    pub async fn start(env: &[(&str, &str)]) -> Server {
        Self::start_with_args(env, &[]).await
    }

    pub async fn start_with_args(env: &[(&str, &str)], args: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command.arg("serve").arg("--listen").arg("127.0.0.1:0").args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("SWITCHYARD_") {
                command.env_remove(key);
            }
        }
        command.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        command.envs(env.iter().copied());
        command
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if std::env::var_os("SWITCHYARD_TEST_LOGS").is_none() {
            command.stderr(Stdio::null());
        }
        let mut child = command.spawn().expect("start switchyard");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("switchyard did not report its address in time")
            .expect("read stdout")
            .expect("switchyard exited before listening");
        let addr: SocketAddr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server {
            child,
            addr,
            http: Http::new(addr),
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    /// Creates a session for `user` and connects with `?session=`, reading the welcome.
    pub async fn connect(&self, user: &str) -> (Client, String) {
        let session = self.http.create_session(user).await.unwrap();
        let mut client = Client::connect(&self.ws_url(&format!("?session={session}")))
            .await
            .unwrap();
        client.welcome().await.unwrap();
        (client, session)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("switchyard did not exit in time")
            .unwrap();
        status.code()
    }

    /// Polls `/readyz` until it answers `status` (bounded: there is no event to wait for).
    pub async fn wait_ready(&self, status: u16) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let response = self.http.get("/readyz").await.unwrap();
            if response.status.as_u16() == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz never answered {status}; last: {} {}",
                response.status,
                response.text
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A metric's value from `/metrics` (the sum of all its series with the given label text).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.http.get("/metrics").await.unwrap().text;
        text.lines()
            .filter(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Runs a command-line invocation of the binary to completion and returns (exit code, stdout, stderr).
pub async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("SWITCHYARD_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("cli timed out")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Follows a client's view of one room and checks it never has a silent gap: every `message` is
/// the next offset of the current epoch, unless an unsolicited `joined` (a reset, `recovered:
/// false`) said where the stream now is.
pub struct StreamCheck {
    pub epoch: String,
    pub last: u64,
    pub resets: usize,
}

impl StreamCheck {
    pub fn new(epoch: &str, last: u64) -> Self {
        StreamCheck {
            epoch: epoch.to_string(),
            last,
            resets: 0,
        }
    }

    /// Reads until the client is at `offset` (of `epoch`, if given).
    pub async fn read_until(&mut self, client: &mut Client, epoch: Option<&str>, offset: u64) {
        use switchyard_client::Event;
        use switchyard_proto::ServerFrame;
        while !(self.last >= offset && epoch.is_none_or(|e| e == self.epoch)) {
            match client.recv().await.expect("the stream stalled") {
                Event::Frame(ServerFrame::Message { offset, .. }) => {
                    assert_eq!(
                        offset,
                        self.last + 1,
                        "a silent gap in epoch {} after {}",
                        self.epoch,
                        self.last
                    );
                    self.last = offset;
                }
                Event::Frame(ServerFrame::Joined {
                    reference: None,
                    offset,
                    epoch,
                    recovered,
                    ..
                }) => {
                    assert!(!recovered, "a reset never claims recovery");
                    self.epoch = epoch;
                    self.last = offset;
                    self.resets += 1;
                }
                Event::Closed { code, reason } => panic!("closed: {code:?} {reason}"),
                _ => {}
            }
        }
    }
}

impl Server {
    /// Kills the process (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
