//! Clients that talk to the servers in [`crate::servers`] and report which
//! backend answered.
//!
//! Sockets are created inside the given namespace (on a setns'ed thread) and
//! are then used from the calling thread; a socket keeps its namespace.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;
use crate::servers::is_timeout;

/// Read/write timeout on HTTP connections.
const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Response heads larger than this mean we are not talking to our server.
const MAX_HEAD: usize = 64 * 1024;

/// Sends per UDP exchange before giving up (UDP may drop the first packet,
/// e.g. while ARP resolves).
const UDP_ATTEMPTS: usize = 3;

/// Per-attempt reply timeout for [`UdpFlow`] unless changed.
const UDP_FLOW_TIMEOUT: Duration = Duration::from_secs(1);

/// A keep-alive HTTP/1.1 connection opened from inside a namespace.
#[derive(Debug)]
pub struct HttpConn {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    /// Bytes read past the end of the previous response.
    pending: Vec<u8>,
}

impl HttpConn {
    /// Connects from inside `ns` to `addr`, waiting at most `timeout`.
    pub fn connect(ns: &Netns, addr: impl Into<SocketAddr>, timeout: Duration) -> Result<HttpConn> {
        let addr = addr.into();
        ns.run(move || HttpConn::connect_here(addr, timeout))?
            .with_context(|| format!("TCP connect to {addr} from namespace {}", ns.name()))
    }

    /// Connects from the calling thread's namespace (e.g. inside
    /// [`Netns::spawn`]).
    pub fn connect_here(addr: impl Into<SocketAddr>, timeout: Duration) -> Result<HttpConn> {
        let addr = addr.into();
        let what = || format!("TCP connect to {addr}");
        let stream = TcpStream::connect_timeout(&addr, timeout).with_context(what)?;
        stream
            .set_read_timeout(Some(HTTP_IO_TIMEOUT))
            .with_context(what)?;
        stream
            .set_write_timeout(Some(HTTP_IO_TIMEOUT))
            .with_context(what)?;
        stream.set_nodelay(true).with_context(what)?;
        let peer = stream.peer_addr().with_context(what)?;
        let local = stream.local_addr().with_context(what)?;
        Ok(HttpConn {
            stream,
            peer,
            local,
            pending: Vec::new(),
        })
    }

    /// Sends `GET /` on this connection and returns the trimmed response body
    /// (the answering backend's name).
    pub fn get(&mut self) -> Result<String> {
        let peer = self.peer;
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .with_context(|| format!("sending HTTP request to {peer}"))?;
        let content_length = self
            .read_head()
            .with_context(|| format!("reading HTTP response head from {peer}"))?;
        let body = self
            .read_exact_pending(content_length)
            .with_context(|| format!("reading {content_length}-byte HTTP body from {peer}"))?;
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }

    /// The address connected to (as seen by the client, e.g. a service VIP).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's own address and port of this connection.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The underlying stream, e.g. to shut it down or set options.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads until a full response head is buffered, checks for `200` and
    /// returns its Content-Length; leaves any body bytes in `pending`.
    fn read_head(&mut self) -> Result<usize> {
        let head_end = loop {
            if let Some(pos) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            ensure!(
                self.pending.len() <= MAX_HEAD,
                "response head over {MAX_HEAD} bytes"
            );
            self.fill()?;
        };
        let head: Vec<u8> = self.pending.drain(..head_end).collect();
        parse_head(&String::from_utf8_lossy(&head))
    }

    /// Takes exactly `len` bytes, reading more from the socket as needed.
    fn read_exact_pending(&mut self, len: usize) -> Result<Vec<u8>> {
        while self.pending.len() < len {
            self.fill()?;
        }
        Ok(self.pending.drain(..len).collect())
    }

    /// Appends whatever the socket has (blocking up to the read timeout).
    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).map_err(|e| {
            if is_timeout(&e) {
                anyhow::anyhow!("timed out after {HTTP_IO_TIMEOUT:?}")
            } else {
                anyhow::Error::new(e)
            }
        })?;
        ensure!(n > 0, "connection closed by peer");
        self.pending.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Checks the status line is a 200 and returns the Content-Length.
fn parse_head(head: &str) -> Result<usize> {
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1);
    ensure!(
        status.starts_with("HTTP/1.") && code == Some("200"),
        "unexpected status line {status:?}"
    );
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case("content-length"))
        .context("response has no Content-Length")?
        .1;
    length
        .trim()
        .parse()
        .with_context(|| format!("bad Content-Length {length:?}"))
}

/// Sends `payload` from a fresh UDP socket in `ns` to `target` and returns
/// the answering backend's name and the reply's source address. `timeout`
/// applies per attempt; the datagram is sent up to 3 times.
pub fn udp_exchange(
    ns: &Netns,
    target: impl Into<SocketAddr>,
    payload: &str,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    let target = target.into();
    let socket = bind_udp(ns, target.is_ipv6())?;
    exchange_on(&socket, target, payload, timeout)
        .with_context(|| format!("UDP exchange with {target} from namespace {}", ns.name()))
}

/// Binds an unconnected UDP socket on the unspecified address of the
/// family, port 0, inside `ns`. Unconnected so replies from any source are
/// received and their source can be checked.
fn bind_udp(ns: &Netns, v6: bool) -> Result<UdpSocket> {
    let any: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    ns.run(move || UdpSocket::bind(any))?
        .with_context(|| format!("binding UDP {any} in namespace {}", ns.name()))
}

/// One request/reply round on `socket`, retrying the send on timeout.
/// Replies for other payloads (late answers to earlier rounds) are skipped.
fn exchange_on(
    socket: &UdpSocket,
    target: SocketAddr,
    payload: &str,
    timeout: Duration,
) -> Result<(String, SocketAddr)> {
    socket
        .set_read_timeout(Some(timeout))
        .context("setting UDP read timeout")?;
    let suffix = format!(":{payload}");
    let mut buf = vec![0u8; 65536];
    let mut skipped: Option<String> = None;
    for _ in 0..UDP_ATTEMPTS {
        socket
            .send_to(payload.as_bytes(), target)
            .context("sending datagram")?;
        // Keep reading until a matching reply or a timeout.
        loop {
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if is_timeout(&e) => break,
                Err(e) => return Err(e).context("receiving reply"),
            };
            let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
            match reply.strip_suffix(&suffix) {
                Some(name) if !name.is_empty() => return Ok((name.to_string(), from)),
                _ => skipped = Some(format!("{reply:?} from {from}")),
            }
        }
    }
    match skipped {
        Some(other) => bail!(
            "no reply ending in {suffix:?} after {UDP_ATTEMPTS} sends (last unmatched: {other})"
        ),
        None => bail!("no reply after {UDP_ATTEMPTS} sends, {timeout:?} each"),
    }
}

/// `n` new TCP connections from `ns` to `target`, one request each: how
/// many each backend answered.
pub fn new_connections(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let mut conn = HttpConn::connect(ns, target, timeout)
            .with_context(|| format!("new connection {i}"))?;
        let backend = conn.get().with_context(|| format!("new connection {i}"))?;
        *counts.entry(backend).or_insert(0) += 1;
    }
    Ok(counts)
}

/// `n` new UDP flows (a fresh socket each) from `ns` to `target`, one
/// exchange each, every reply from `target`: how many each backend answered.
/// The sockets stay open until the last exchange, so no two flows share a
/// source port (a port freed and handed out again would make a later
/// "new" flow an old one to the proxy).
pub fn new_udp_flows(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let mut flow = UdpFlow::open(ns, target)?;
        flow.set_timeout(timeout);
        let (backend, from) = flow.exchange(&format!("new{i}"))?;
        ensure!(from == target, "new UDP flow {i} answered from {from}");
        *counts.entry(backend).or_insert(0) += 1;
        open.push(flow);
    }
    Ok(counts)
}

/// A long-lived UDP "connection": every exchange uses the same local port, so
/// the proxy sees one flow.
#[derive(Debug)]
pub struct UdpFlow {
    socket: UdpSocket,
    target: SocketAddr,
    ns_name: String,
    timeout: Duration,
}

impl UdpFlow {
    /// Binds the flow's socket inside `ns`; nothing is sent yet.
    pub fn open(ns: &Netns, target: impl Into<SocketAddr>) -> Result<UdpFlow> {
        let target = target.into();
        Ok(UdpFlow {
            socket: bind_udp(ns, target.is_ipv6())?,
            target,
            ns_name: ns.name().to_string(),
            timeout: UDP_FLOW_TIMEOUT,
        })
    }

    /// Changes the per-attempt reply timeout (default 1 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `payload` and returns the backend name and reply source.
    pub fn exchange(&mut self, payload: &str) -> Result<(String, SocketAddr)> {
        exchange_on(&self.socket, self.target, payload, self.timeout).with_context(|| {
            format!(
                "UDP exchange with {} from {} in namespace {}",
                self.target,
                self.local_addr()
                    .map_or_else(|_| "?".to_string(), |a| a.to_string()),
                self.ns_name
            )
        })
    }

    /// The flow's local address (its fixed source port).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.socket
            .local_addr()
            .context("reading UDP flow local address")
    }
}

/// `GET path` from `ns` to `target`: status code and body. Reads one
/// response (by its Content-Length), so it works with keep-alive servers.
pub fn http_get(
    ns: &Netns,
    target: impl Into<SocketAddr>,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let target = target.into();
    let request = format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    let response = ns.run(move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut text = String::new();
        // The test servers keep connections alive: read the one response.
        let mut buf = [0u8; 4096];
        while !complete_response(&text) {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(text)
    })??;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {response:?}"))?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((code, body.trim().to_string()))
}

/// A response whose body is as long as its Content-Length says.
fn complete_response(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|n| body.len() >= n)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn head_parsing() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(parse_head(head).ok(), Some(4));
        assert!(parse_head("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n").is_err());
        assert!(parse_head("HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
