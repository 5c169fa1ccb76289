//! A Rust client for Switchyard: [`Client`] speaks the `/ws` JSON protocol (and can send raw frames,
//! for the seed endpoint and for tests of bad input), [`Http`] calls the HTTP API. Every wait has a
//! timeout, so a missing frame is an error rather than a hang.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use switchyard_proto::{
    ClientBody, ClientFrame, Payload, Ref, RoomName, ServerFrame, StreamPosition, UserId,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

pub mod http;
pub use http::Http;
pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Default wait for an expected frame.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server sent: a decoded frame, text that is not a `/ws` frame (e.g. seed protocol), or
/// the close.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(ServerFrame),
    Text(String),
    Closed { code: Option<u16>, reason: String },
}

/// Options for [`Client::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Local address to connect from (e.g. 127.0.0.2 to spread ephemeral ports).
    pub source: Option<IpAddr>,
    /// WebSocket read buffer size; small for load generation.
    pub read_buffer: usize,
    /// Kernel receive buffer (SO_RCVBUF) to ask for; small values make a slow reader fall behind fast.
    pub recv_buffer: Option<u32>,
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            source: None,
            read_buffer: 16 * 1024,
            recv_buffer: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

pub struct Client {
    ws: WebSocketStream<TcpStream>,
    timeout: Duration,
    next_ref: u64,
    /// Events that arrived while waiting for a reply; `recv` returns them first.
    stash: std::collections::VecDeque<Event>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// Opens a TCP connection to `addr`, optionally from `source`.
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    tcp_connect_with(addr, source, None).await
}

/// Opens a TCP connection, optionally from `source` and with a receive buffer size.
pub async fn tcp_connect_with(
    addr: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("cannot bind source address {ip}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Client {
    /// Connects to a `ws://` URL.
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        Self::connect_with(url, &ConnectOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: &ConnectOptions) -> anyhow::Result<Client> {
        let parsed = url::Url::parse(url).with_context(|| format!("invalid URL {url}"))?;
        if parsed.scheme() != "ws" {
            bail!("only ws:// URLs are supported, got {url}");
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| anyhow!("URL {url} has no host"))?;
        let port = parsed.port().unwrap_or(80);
        let addr: SocketAddr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
        let connect = async {
            let stream = tcp_connect_with(addr, options.source, options.recv_buffer).await?;
            let config = WebSocketConfig::default()
                .read_buffer_size(options.read_buffer)
                .write_buffer_size(0);
            let (ws, _response) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .with_context(|| format!("WebSocket handshake with {url} failed"))?;
            anyhow::Ok(ws)
        };
        let ws = tokio::time::timeout(options.timeout, connect)
            .await
            .map_err(|_| anyhow!("connecting to {url} timed out"))??;
        Ok(Client {
            ws,
            timeout: options.timeout,
            next_ref: 1,
            stash: Default::default(),
        })
    }

    /// Sends one request frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> anyhow::Result<()> {
        self.send_text(&frame.encode()).await
    }

    /// Sends a request body with a fresh numeric `ref`, returned for matching the reply.
    pub async fn request(&mut self, body: ClientBody) -> anyhow::Result<Ref> {
        let reference = Ref::Num(self.next_ref);
        self.next_ref += 1;
        self.send(&ClientFrame::with_ref(reference.clone(), body)).await?;
        Ok(reference)
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::text(text)).await.context("send failed")
    }

    pub async fn send_message(&mut self, message: Message) -> anyhow::Result<()> {
        self.ws.send(message).await.context("send failed")
    }

    /// The next raw WebSocket message, pings and pongs included.
    pub async fn raw(&mut self) -> anyhow::Result<Option<Message>> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.ws.next()).await {
            Err(_) => bail!("no message within {timeout:?}"),
            Ok(None) => Ok(None),
            Ok(Some(message)) => Ok(Some(message?)),
        }
    }

    /// The next event (pings are answered and skipped).
    pub async fn recv(&mut self) -> anyhow::Result<Event> {
        if let Some(event) = self.stash.pop_front() {
            return Ok(event);
        }
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.recv_untimed())
            .await
            .map_err(|_| anyhow!("no frame within {timeout:?}"))?
    }

    async fn recv_untimed(&mut self) -> anyhow::Result<Event> {
        loop {
            match self.ws.next().await {
                None => {
                    return Ok(Event::Closed {
                        code: None,
                        reason: "connection ended".into(),
                    });
                }
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => {
                    return Ok(Event::Closed {
                        code: None,
                        reason: "connection closed".into(),
                    });
                }
                Some(Err(tungstenite::Error::Io(e))) => {
                    return Ok(Event::Closed {
                        code: None,
                        reason: format!("connection reset: {e}"),
                    });
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(text))) => {
                    return Ok(match ServerFrame::decode(&text) {
                        Ok(frame) => Event::Frame(frame),
                        Err(_) => Event::Text(text.to_string()),
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(match frame {
                        Some(f) => Event::Closed {
                            code: Some(u16::from(f.code)),
                            reason: f.reason.to_string(),
                        },
                        None => Event::Closed {
                            code: None,
                            reason: String::new(),
                        },
                    });
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next `/ws` frame; fails on anything else.
    pub async fn frame(&mut self) -> anyhow::Result<ServerFrame> {
        match self.recv().await? {
            Event::Frame(frame) => Ok(frame),
            other => bail!("expected a frame, got {other:?}"),
        }
    }

    /// The next raw text frame (e.g. seed protocol), parsed as JSON.
    pub async fn json(&mut self) -> anyhow::Result<serde_json::Value> {
        let text = match self.recv().await? {
            Event::Text(text) => text,
            Event::Frame(frame) => frame.encode(),
            other => bail!("expected a text frame, got {other:?}"),
        };
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    }

    /// Waits for the server's close and returns its code and reason.
    pub async fn closed(&mut self) -> anyhow::Result<(Option<u16>, String)> {
        loop {
            if let Event::Closed { code, reason } = self.recv().await? {
                return Ok((code, reason));
            }
        }
    }

    /// Skips frames until one matches.
    pub async fn until(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&ServerFrame) -> bool,
    ) -> anyhow::Result<ServerFrame> {
        loop {
            match self.recv().await.with_context(|| format!("waiting for {what}"))? {
                Event::Frame(frame) if matches(&frame) => return Ok(frame),
                Event::Closed { code, reason } => {
                    bail!("closed ({code:?} {reason}) while waiting for {what}")
                }
                _ => continue,
            }
        }
    }

    /// Reads the `welcome` frame.
    pub async fn welcome(&mut self) -> anyhow::Result<ServerFrame> {
        match self.frame().await? {
            frame @ ServerFrame::Welcome { .. } => Ok(frame),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    /// Authenticates with an `auth` frame and reads `welcome`.
    pub async fn auth(&mut self, session: &str) -> anyhow::Result<ServerFrame> {
        self.request(ClientBody::Auth {
            session: session.to_string(),
        })
        .await?;
        self.welcome().await
    }

    /// Joins a room and returns `(offset, epoch, recovered)` from the `joined` reply.
    pub async fn join(
        &mut self,
        room: &str,
        since: Option<StreamPosition>,
    ) -> anyhow::Result<(u64, String, bool)> {
        self.join_with(room, since, false).await
    }

    /// Joins a room, optionally asking for its `presence_diff` events.
    pub async fn join_with(
        &mut self,
        room: &str,
        since: Option<StreamPosition>,
        presence: bool,
    ) -> anyhow::Result<(u64, String, bool)> {
        let room = RoomName::parse(room)?;
        let reference = self
            .request(ClientBody::Join {
                room,
                since,
                presence,
            })
            .await?;
        match self.reply(&reference).await? {
            ServerFrame::Joined {
                offset,
                epoch,
                recovered,
                ..
            } => Ok((offset, epoch, recovered)),
            other => bail!("expected joined, got {other:?}"),
        }
    }

    /// Publishes and returns the acknowledged offset.
    pub async fn publish(
        &mut self,
        room: &str,
        data: serde_json::Value,
        id: Option<&str>,
    ) -> anyhow::Result<u64> {
        let body = ClientBody::Publish {
            room: RoomName::parse(room)?,
            data: Payload::from_value(&data)?,
            id: id.map(str::to_string),
        };
        let reference = self.request(body).await?;
        match self.reply(&reference).await? {
            ServerFrame::Ack {
                offset: Some(offset), ..
            } => Ok(offset),
            other => bail!("expected ack, got {other:?}"),
        }
    }

    /// Sends a direct message and returns its inbox sequence number.
    pub async fn direct(&mut self, to: &str, data: serde_json::Value) -> anyhow::Result<u64> {
        let body = ClientBody::Direct {
            to: UserId::parse(to)?,
            data: Payload::from_value(&data)?,
            id: None,
        };
        let reference = self.request(body).await?;
        match self.reply(&reference).await? {
            ServerFrame::Ack { seq: Some(seq), .. } => Ok(seq),
            other => bail!("expected ack with seq, got {other:?}"),
        }
    }

    /// Waits for the reply carrying `reference` (an ack, result or error). Frames that arrive
    /// first are kept and returned by later `recv` calls, in order.
    pub async fn reply(&mut self, reference: &Ref) -> anyhow::Result<ServerFrame> {
        let wanted = Some(reference.clone());
        let is_reply = |frame: &ServerFrame| match frame {
            ServerFrame::Joined { reference, .. }
            | ServerFrame::Left { reference, .. }
            | ServerFrame::Presence { reference, .. }
            | ServerFrame::History { reference, .. }
            | ServerFrame::Ack { reference, .. }
            | ServerFrame::Error { reference, .. }
            | ServerFrame::Pong { reference } => *reference == wanted,
            _ => false,
        };
        let mut skipped = std::collections::VecDeque::new();
        let result = loop {
            let event = match self.recv().await {
                Ok(event) => event,
                Err(e) => break Err(e.context("waiting for a reply")),
            };
            match event {
                Event::Frame(frame) if is_reply(&frame) => break Ok(frame),
                closed @ Event::Closed { .. } => {
                    let message = format!("{closed:?} while waiting for a reply");
                    skipped.push_back(closed);
                    break Err(anyhow!(message));
                }
                other => skipped.push_back(other),
            }
        };
        skipped.append(&mut self.stash);
        self.stash = skipped;
        result
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        Ok(())
    }
}
