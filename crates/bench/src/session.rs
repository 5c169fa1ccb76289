//! Getting connections ready: sessions over the HTTP API (created round-robin on the nodes under
//! test), then connect, `welcome`, `join`, `joined`.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use switchyard_client::Http;

use crate::scan::{self, FrameKind};
use crate::target::{Nodes, Target};
use crate::ws::{Incoming, WsConnection};

/// Creates `count` sessions for users `{prefix}-0`, `{prefix}-1`, ... and returns their ids. Session
/// `i` is created on node `i` (round-robin): with several nodes the sessions must be valid on every
/// node (a shared backend), as connections then use them on other nodes too.
pub async fn create_sessions(
    nodes: &Nodes,
    prefix: &str,
    count: usize,
    api_key: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let clients: Vec<(Http, String)> = nodes
        .iter()
        .map(|target| (http_client(target, api_key), target.endpoint.host.clone()))
        .collect();
    let mut sessions = Vec::with_capacity(count);
    for index in 0..count {
        let user = format!("{prefix}-{index}");
        let (http, host) = &clients[index % clients.len()];
        let session = http
            .create_session(&user)
            .await
            .with_context(|| format!("creating a session for {user} on {host}"))?;
        sessions.push(session);
    }
    Ok(sessions)
}

/// A room's current offset, from `GET /api/rooms/{room}/history?limit=1`.
pub async fn room_offset(target: &Target, room: &str, api_key: Option<&str>) -> anyhow::Result<u64> {
    let http = http_client(target, api_key);
    let path = format!("/api/rooms/{room}/history?limit=1");
    let response = http.get(&path).await?;
    if !response.status.is_success() {
        bail!("GET {path}: {} {}", response.status, response.text);
    }
    response.body["offset"]
        .as_u64()
        .ok_or_else(|| anyhow!("GET {path}: no offset in {}", response.text))
}

/// An HTTP API client of `target`, with the API key when one is given.
pub fn http_client(target: &Target, api_key: Option<&str>) -> Http {
    let http = Http::new(target.endpoint.addr);
    match api_key {
        Some(key) => http.with_api_key(key),
        None => http,
    }
}

/// A connection that has joined its room.
#[derive(Debug)]
pub struct JoinedConnection {
    pub ws: WsConnection,
    /// The room's offset in the `joined` reply: the next publication has this offset + 1.
    pub offset: u64,
    /// From the start of the TCP connect to the `joined` reply.
    pub latency: Duration,
}

/// How to open one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectSpec<'a> {
    pub target: &'a Target,
    /// Picks the source address (round-robin over the target's sources).
    pub index: usize,
    pub session: &'a str,
    pub rooms: &'a [String],
    pub read_buffer: usize,
    pub timeout: Duration,
}

/// Connects with `?session=`, waits for `welcome`, joins every room and waits for each `joined`.
/// Returns the offset of the first room.
pub async fn connect_and_join(spec: ConnectSpec<'_>) -> anyhow::Result<JoinedConnection> {
    let started = Instant::now();
    let timeout = spec.timeout;
    tokio::time::timeout(timeout, async {
        let path = format!("/ws?session={}", spec.session);
        let mut ws = WsConnection::connect(
            &spec.target.endpoint,
            &path,
            spec.target.source(spec.index),
            spec.read_buffer,
            timeout,
        )
        .await?;
        wait_for(&mut ws, FrameKind::Welcome, "welcome").await?;
        let mut first_offset = None;
        for (reference, room) in spec.rooms.iter().enumerate() {
            let join = format!(r#"{{"type":"join","room":"{room}","ref":{}}}"#, reference + 1);
            ws.send_text(join.as_bytes()).await?;
            let offset = wait_for(&mut ws, FrameKind::Joined, "joined").await?;
            first_offset.get_or_insert(offset);
        }
        Ok(JoinedConnection {
            ws,
            offset: first_offset.unwrap_or(0),
            latency: started.elapsed(),
        })
    })
    .await
    .map_err(|_| anyhow!("connect, welcome and join took longer than {timeout:?}"))?
}

/// Reads frames until one of `kind` (returning its `offset`, or 0); fails on an `error` frame or
/// a close.
async fn wait_for(ws: &mut WsConnection, kind: FrameKind, name: &str) -> anyhow::Result<u64> {
    loop {
        while let Some(incoming) = ws.next_frame()? {
            match incoming {
                Incoming::Message(frame) => match scan::frame_kind(frame) {
                    found if found == kind => return Ok(scan::offset(frame).unwrap_or(0)),
                    FrameKind::Error => bail!(
                        "the server answered with an error while we waited for {name}: {}",
                        String::from_utf8_lossy(frame)
                    ),
                    _ => {}
                },
                Incoming::Closed { code } => {
                    bail!("the server closed the connection (code {code:?}) while we waited for {name}")
                }
            }
        }
        ws.flush().await?;
        if ws.fill().await.context("reading from the server failed")? == 0 {
            bail!("the connection ended while we waited for {name}");
        }
    }
}
