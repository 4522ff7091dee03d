//! A client process for socket-level load balancing tests.
//!
//! The socket hooks serve sockets by the cgroup of the process that made
//! them, and a cgroup v2 holds whole processes, not threads: a test's
//! client threads cannot be put in an agent's cgroup, so they run this
//! binary there (see `proxy_tests::cgroup`). It prints one JSON object per
//! line: what answered, what the socket saw as its peer, or the error.
//!
//! ```text
//! xdproxy-probe tcp ADDR COUNT            COUNT connections, one request each
//! xdproxy-probe udp ADDR COUNT            COUNT connected UDP sockets, one exchange each
//! xdproxy-probe udp-unconnected ADDR COUNT  one socket, COUNT sendto/recvfrom
//! xdproxy-probe udp-stream ADDR MILLIS    one connected socket sending every 20 ms
//!                                         for MILLIS, reconnecting after an error
//! xdproxy-probe tcp-hold ADDR MILLIS      one connection, a request every 20 ms
//! xdproxy-probe tcp-each ADDR MILLIS      a new connection (one request) every 20 ms
//! xdproxy-probe udp-each ADDR MILLIS      a new connected UDP socket (one exchange)
//!                                         every 20 ms
//! xdproxy-probe http-get ADDR PATH        one `GET PATH`: status, body and peer
//! ```

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(2);
const INTERVAL: Duration = Duration::from_millis(20);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("xdproxy-probe: {e}");
        std::process::exit(2);
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let [mode, addr, n] = args else {
        return Err("usage: xdproxy-probe MODE ADDR N".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    if mode == "http-get" {
        report_http(addr, http_get_path(addr, n));
        return Ok(());
    }
    let n: u64 = n.parse().map_err(|e| format!("{n}: {e}"))?;
    match mode.as_str() {
        "tcp" => (0..n).for_each(|_| report(tcp_once(addr))),
        "udp" => (0..n).for_each(|_| report(udp_once(addr))),
        "udp-unconnected" => udp_unconnected(addr, n),
        "udp-stream" => udp_stream(addr, Duration::from_millis(n)),
        "tcp-hold" => tcp_hold(addr, Duration::from_millis(n)),
        "tcp-each" => each(Duration::from_millis(n), || tcp_once(addr)),
        "udp-each" => each(Duration::from_millis(n), || udp_once(addr)),
        other => return Err(format!("unknown mode {other}")),
    }
    Ok(())
}

/// What one exchange showed: the backend's name and the peer address the
/// socket reported.
type Outcome = io::Result<(String, SocketAddr)>;

fn report(outcome: Outcome) {
    let line = match outcome {
        Ok((backend, peer)) => json!({"ok": true, "backend": backend, "peer": peer.to_string()}),
        Err(e) => json!({"ok": false, "error": e.to_string(), "errno": e.raw_os_error()}),
    };
    println!("{line}");
}

fn tcp_once(addr: SocketAddr) -> Outcome {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let backend = http_get(&mut stream)?;
    Ok((backend, stream.peer_addr()?))
}

/// One request on a keep-alive connection: the body is the backend's name.
fn http_get(stream: &mut TcpStream) -> io::Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(body) = complete_body(&buf) {
            return Ok(body);
        }
    }
}

/// The body once the response with its Content-Length is complete.
fn complete_body(buf: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })?
        .parse()
        .ok()?;
    (body.len() >= length).then(|| body[..length].trim().to_string())
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().map_err(io::Error::other)?,
        SocketAddr::V6(_) => "[::]:0".parse().map_err(io::Error::other)?,
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

/// The servers answer `{name}:{payload}`.
fn udp_exchange(socket: &UdpSocket, to: Option<SocketAddr>, payload: &str) -> Outcome {
    match to {
        Some(to) => socket.send_to(payload.as_bytes(), to)?,
        None => socket.send(payload.as_bytes())?,
    };
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let name = text.split(':').next().unwrap_or_default().to_string();
    Ok((name, from))
}

fn udp_once(addr: SocketAddr) -> Outcome {
    let socket = udp_socket(addr)?;
    socket.connect(addr)?;
    let (backend, _) = udp_exchange(&socket, None, "probe")?;
    Ok((backend, socket.peer_addr()?))
}

fn udp_unconnected(addr: SocketAddr, n: u64) {
    let socket = match udp_socket(addr) {
        Ok(s) => s,
        Err(e) => return report(Err(e)),
    };
    for _ in 0..n {
        report(udp_exchange(&socket, Some(addr), "probe"));
    }
}

/// A connected UDP socket that keeps sending; after an error (the socket
/// destroyed under it) it connects a new one, as an application would.
fn udp_stream(addr: SocketAddr, duration: Duration) {
    let start = Instant::now();
    let mut socket: Option<UdpSocket> = None;
    while start.elapsed() < duration {
        let at = start.elapsed().as_millis() as u64;
        let outcome = match socket.take() {
            Some(s) => udp_exchange(&s, None, "stream").map(|r| (r, s)),
            None => udp_socket(addr)
                .and_then(|s| s.connect(addr).map(|()| s))
                .and_then(|s| udp_exchange(&s, None, "stream").map(|r| (r, s))),
        };
        let line = match outcome {
            Ok(((backend, from), s)) => {
                socket = Some(s);
                json!({"ok": true, "t_ms": at, "backend": backend, "peer": from.to_string()})
            }
            Err(e) => {
                json!({"ok": false, "t_ms": at, "error": e.to_string(), "errno": e.raw_os_error()})
            }
        };
        println!("{line}");
        std::thread::sleep(INTERVAL);
    }
}

/// One TCP connection, a request every interval, until it fails or time is
/// up: the last line says how it ended.
fn tcp_hold(addr: SocketAddr, duration: Duration) {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return report(Err(e)),
    };
    if let Err(e) = stream.set_read_timeout(Some(TIMEOUT)) {
        return report(Err(e));
    }
    while start.elapsed() < duration {
        let at = start.elapsed().as_millis() as u64;
        let line = match http_get(&mut stream) {
            Ok(backend) => json!({"ok": true, "t_ms": at, "backend": backend}),
            Err(e) => {
                println!(
                    "{}",
                    json!({"ok": false, "t_ms": at, "error": e.to_string(), "errno": e.raw_os_error()})
                );
                return;
            }
        };
        println!("{line}");
        std::thread::sleep(INTERVAL);
    }
}

/// `exchange` every interval for `duration`, each line with its time.
fn each(duration: Duration, exchange: impl Fn() -> Outcome) {
    let start = Instant::now();
    while start.elapsed() < duration {
        let at = start.elapsed().as_millis() as u64;
        let line = match exchange() {
            Ok((backend, peer)) => {
                json!({"ok": true, "t_ms": at, "backend": backend, "peer": peer.to_string()})
            }
            Err(e) => {
                json!({"ok": false, "t_ms": at, "error": e.to_string(), "errno": e.raw_os_error()})
            }
        };
        println!("{line}");
        std::thread::sleep(INTERVAL);
    }
}

/// One `GET path` on a new connection: the status code, the body and the
/// peer the socket saw.
fn http_get_path(addr: SocketAddr, path: &str) -> io::Result<(u16, String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("no status: {text:?}"))
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body, peer))
}

fn report_http(addr: SocketAddr, outcome: io::Result<(u16, String, SocketAddr)>) {
    let line = match outcome {
        Ok((status, body, peer)) => {
            json!({"ok": true, "addr": addr.to_string(), "status": status, "body": body, "peer": peer.to_string()})
        }
        Err(e) => {
            json!({"ok": false, "addr": addr.to_string(), "error": e.to_string(), "errno": e.raw_os_error()})
        }
    };
    println!("{line}");
}
