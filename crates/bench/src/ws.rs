//! A minimal WebSocket client for load generation: it does the HTTP upgrade itself and then reads
//! frames straight out of one small, reused buffer, so that receiving a message costs a header parse
//! and a slice — no per-message allocation, no UTF-8 validation, no JSON decoding. Control frames
//! are handled here: pings are answered (the pong waits in the write buffer until the caller
//! flushes), a close ends the stream. Outgoing frames are masked as RFC 6455 requires and can be
//! queued to go out in one write.
//!
//! Reading is split into [`WsConnection::fill`] (async and cancel-safe: one `read` into the buffer)
//! and [`WsConnection::next_frame`] (sync: the next complete frame already buffered), so callers can
//! wait on the socket inside `tokio::select!` without ever losing or tearing a frame.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest frame accepted; bigger ones end the connection with an error.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Largest HTTP upgrade response accepted.
const MAX_HANDSHAKE_RESPONSE_BYTES: usize = 16 * 1024;

const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;

/// What [`WsConnection::next_frame`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A text or binary message (its payload, borrowed from the read buffer).
    Message(&'a [u8]),
    /// The server closed the connection, with its close code if it sent one.
    Closed { code: Option<u16> },
}

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `Host` header value, e.g. `127.0.0.1:8000`.
    pub host: String,
}

/// One client WebSocket over TCP.
pub struct WsConnection {
    stream: TcpStream,
    read_buf: Vec<u8>,
    /// Unparsed bytes are `read_buf[read_start..read_end]`.
    read_start: usize,
    read_end: usize,
    write_buf: Vec<u8>,
    mask_state: u32,
    closed: bool,
}

impl std::fmt::Debug for WsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConnection")
            .field("buffered", &(self.read_end - self.read_start))
            .finish_non_exhaustive()
    }
}

impl WsConnection {
    /// Connects from `source` (bind before connect), upgrades `path` (e.g. `/ws?session=ID`) to a
    /// WebSocket, and keeps a read buffer of `read_buffer` bytes (grown only for a larger frame).
    pub async fn connect(
        endpoint: &Endpoint,
        path: &str,
        source: Option<IpAddr>,
        read_buffer: usize,
        timeout: Duration,
    ) -> anyhow::Result<WsConnection> {
        tokio::time::timeout(
            timeout,
            Self::connect_untimed(endpoint, path, source, read_buffer),
        )
        .await
        .map_err(|_| anyhow!("connect and WebSocket upgrade took longer than {timeout:?}"))?
    }

    async fn connect_untimed(
        endpoint: &Endpoint,
        path: &str,
        source: Option<IpAddr>,
        read_buffer: usize,
    ) -> anyhow::Result<WsConnection> {
        let stream = tcp_connect(endpoint.addr, source).await?;
        let seed = seed_from(&endpoint.addr, source, &stream);
        let mut conn = WsConnection {
            stream,
            read_buf: vec![0; read_buffer.max(512)],
            read_start: 0,
            read_end: 0,
            write_buf: Vec::with_capacity(256),
            mask_state: seed,
            closed: false,
        };
        conn.handshake(&endpoint.host, path).await?;
        Ok(conn)
    }

    async fn handshake(&mut self, host: &str, path: &str) -> anyhow::Result<()> {
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.stream
            .write_all(request.as_bytes())
            .await
            .context("sending the upgrade request failed")?;
        let header_end = loop {
            if let Some(end) = memchr::memmem::find(&self.read_buf[..self.read_end], b"\r\n\r\n") {
                break end + 4;
            }
            if self.read_end >= MAX_HANDSHAKE_RESPONSE_BYTES {
                bail!("the upgrade response headers exceed {MAX_HANDSHAKE_RESPONSE_BYTES} bytes");
            }
            if self.read_end == self.read_buf.len() {
                self.read_buf.resize(self.read_buf.len() * 2, 0);
            }
            let read = self
                .stream
                .read(&mut self.read_buf[self.read_end..])
                .await
                .context("reading the upgrade response failed")?;
            if read == 0 {
                bail!("the server closed the connection during the upgrade");
            }
            self.read_end += read;
        };
        let head = String::from_utf8_lossy(&self.read_buf[..header_end]).into_owned();
        let status_line = head.lines().next().unwrap_or_default();
        if !status_line.starts_with("HTTP/1.1 101") {
            // Show the start of the body, which explains the refusal.
            let body_end = self.read_end.min(header_end + 200);
            let body = String::from_utf8_lossy(&self.read_buf[header_end..body_end]);
            bail!("WebSocket upgrade refused: {status_line} {body}");
        }
        let expected = derive_accept_key(key.as_bytes());
        let accepted = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == expected
            })
        });
        if !accepted {
            bail!("the upgrade response has no valid Sec-WebSocket-Accept header");
        }
        self.read_start = header_end;
        Ok(())
    }

    /// Reads once from the socket into the buffer. Returns the bytes read (0 once the peer closed).
    /// Cancel-safe: bytes are either in the buffer or still in the socket.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.read_start == self.read_end {
            self.read_start = 0;
            self.read_end = 0;
        } else if self.read_end == self.read_buf.len() {
            if self.read_start == 0 {
                // One frame larger than the buffer: grow it (rare; bounded by MAX_FRAME_BYTES).
                let grown = (self.read_buf.len() * 2).min(MAX_FRAME_BYTES + 14);
                if grown <= self.read_buf.len() {
                    return Err(std::io::Error::other(format!(
                        "a frame exceeds {MAX_FRAME_BYTES} bytes"
                    )));
                }
                self.read_buf.resize(grown, 0);
            } else {
                self.read_buf.copy_within(self.read_start..self.read_end, 0);
                self.read_end -= self.read_start;
                self.read_start = 0;
            }
        }
        let read = self.stream.read(&mut self.read_buf[self.read_end..]).await?;
        self.read_end += read;
        if read == 0 {
            self.closed = true;
        }
        Ok(read)
    }

    /// Whether the peer ended the TCP stream (or sent a close frame).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next complete frame in the buffer, if any. Pings are answered (the pong is queued; send it
    /// with [`WsConnection::flush`]) and pongs skipped.
    pub fn next_frame(&mut self) -> anyhow::Result<Option<Incoming<'_>>> {
        loop {
            let buffered = &self.read_buf[self.read_start..self.read_end];
            let Some(header) = parse_header(buffered)? else {
                if self.closed && !buffered.is_empty() {
                    bail!("the connection ended in the middle of a frame");
                }
                return Ok(None);
            };
            let payload_start = self.read_start + header.header_len;
            let payload_end = payload_start + header.payload_len;
            if payload_end > self.read_end {
                if header.header_len + header.payload_len > MAX_FRAME_BYTES {
                    bail!("a frame of {} bytes exceeds the limit", header.payload_len);
                }
                if self.closed {
                    bail!("the connection ended in the middle of a frame");
                }
                return Ok(None);
            }
            self.read_start = payload_end;
            if !header.fin || header.opcode == OPCODE_CONTINUATION {
                bail!("fragmented messages are not supported by the load generator");
            }
            match header.opcode {
                OPCODE_TEXT | OPCODE_BINARY => {
                    return Ok(Some(Incoming::Message(
                        &self.read_buf[payload_start..payload_end],
                    )));
                }
                OPCODE_PING => {
                    let mut payload = [0u8; 125];
                    let len = header.payload_len.min(125);
                    payload[..len].copy_from_slice(&self.read_buf[payload_start..payload_start + len]);
                    self.queue_frame(OPCODE_PONG, &payload[..len]);
                }
                OPCODE_PONG => {}
                OPCODE_CLOSE => {
                    let payload = &self.read_buf[payload_start..payload_end];
                    let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    self.closed = true;
                    return Ok(Some(Incoming::Closed { code }));
                }
                other => bail!("unknown WebSocket opcode {other:#x}"),
            }
        }
    }

    /// Queues a text frame; it goes out with the next [`WsConnection::flush`].
    pub fn queue_text(&mut self, payload: &[u8]) {
        self.queue_frame(OPCODE_TEXT, payload);
    }

    /// Sends one text frame now (with anything queued before it).
    pub async fn send_text(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        self.queue_text(payload);
        self.flush().await
    }

    /// Writes every queued frame.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.write_buf)
            .await
            .context("writing to the server failed")?;
        self.write_buf.clear();
        Ok(())
    }

    /// Sends a normal close (1000) and shuts the write side, without waiting for the reply.
    pub async fn close(mut self, within: Duration) {
        self.write_buf.clear();
        self.queue_frame(OPCODE_CLOSE, &1000u16.to_be_bytes());
        let _ = tokio::time::timeout(within, async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift32: masks only need to differ between frames, not to be secret from the server.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_le_bytes()
    }

    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.next_mask();
        let len = payload.len();
        self.write_buf.push(0x80 | opcode);
        if len < 126 {
            self.write_buf.push(0x80 | len as u8);
        } else if let Ok(short) = u16::try_from(len) {
            self.write_buf.push(0x80 | 126);
            self.write_buf.extend_from_slice(&short.to_be_bytes());
        } else {
            self.write_buf.push(0x80 | 127);
            self.write_buf.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.write_buf.extend_from_slice(&mask);
        self.write_buf
            .extend(payload.iter().enumerate().map(|(i, byte)| byte ^ mask[i & 3]));
    }
}

/// Opens a TCP connection to `addr`, bound to `source` first if given. The bind does not reserve
/// a port (`IP_BIND_ADDRESS_NO_PORT`): the port is chosen at connect, where it only has to make the
/// 4-tuple unique. Without it every bind searches the source address's ephemeral range for a port no
/// other socket holds, which grows with the connections already open: at 100,000 connections over 8
/// source addresses the load generator spent most of its time in that search in the kernel
/// (`inet_bhash2_conflict`), and a ramp of 54,000 connections took 9 s of system CPU. Closed
/// connections' ports in TIME_WAIT are then recycled at connect, as `net.ipv4.tcp_tw_reuse` allows on
/// loopback, so churn does not run out of ports either; `SO_REUSEADDR` stays for kernels without
/// the option.
async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a socket (out of file descriptors?)")?;
    if let Some(ip) = source {
        socket.set_reuseaddr(true).context("cannot set SO_REUSEADDR")?;
        #[cfg(target_os = "linux")]
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .context("cannot set IP_BIND_ADDRESS_NO_PORT")?;
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("cannot bind source address {ip} (no free port?)"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    Ok(stream)
}

/// A non-zero xorshift seed that differs between connections.
fn seed_from(addr: &SocketAddr, source: Option<IpAddr>, stream: &TcpStream) -> u32 {
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let source_bits = match source {
        Some(IpAddr::V4(ip)) => u32::from(ip),
        _ => 0,
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (u32::from(local_port) << 16 ^ u32::from(addr.port()) ^ source_bits ^ nanos) | 1
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
}

/// Parses a server frame header from the start of `bytes`; `None` if it is not complete yet.
fn parse_header(bytes: &[u8]) -> anyhow::Result<Option<FrameHeader>> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let fin = bytes[0] & 0x80 != 0;
    if bytes[0] & 0x70 != 0 {
        bail!("the server set reserved frame bits (an extension was not negotiated)");
    }
    let opcode = bytes[0] & 0x0F;
    if bytes[1] & 0x80 != 0 {
        bail!("the server sent a masked frame");
    }
    let (header_len, payload_len) = match bytes[1] & 0x7F {
        126 => {
            if bytes.len() < 4 {
                return Ok(None);
            }
            (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]])))
        }
        127 => {
            if bytes.len() < 10 {
                return Ok(None);
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&bytes[2..10]);
            let len = usize::try_from(u64::from_be_bytes(len)).unwrap_or(usize::MAX);
            if len > MAX_FRAME_BYTES {
                bail!("a frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}");
            }
            (10, len)
        }
        short => (2, usize::from(short)),
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        header_len,
        payload_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_medium_and_incomplete_headers() {
        assert_eq!(parse_header(&[0x81]).unwrap(), None);
        let short = parse_header(&[0x81, 5]).unwrap().unwrap();
        assert_eq!((short.opcode, short.header_len, short.payload_len), (1, 2, 5));
        assert_eq!(parse_header(&[0x81, 126, 1]).unwrap(), None);
        let medium = parse_header(&[0x81, 126, 1, 0]).unwrap().unwrap();
        assert_eq!((medium.header_len, medium.payload_len), (4, 256));
        assert!(
            parse_header(&[0x81, 0x85]).is_err(),
            "server frames are never masked"
        );
    }
}
