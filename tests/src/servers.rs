//! Tiny HTTP and UDP echo servers that identify themselves by name, so a test
//! can tell which backend answered.
//!
//! Sockets are created inside the backend namespace (on a setns'ed thread);
//! the serving threads then use them from anywhere. All loops wake up at least
//! every [`POLL_INTERVAL`] to check the stop flag, so dropping a [`Servers`]
//! returns promptly even while clients hold connections open.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// How long any server thread blocks before re-checking the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Requests whose head grows beyond this are garbage; the connection is dropped.
const MAX_HEAD: usize = 64 * 1024;

/// State shared between the handle and the server threads.
struct Shared {
    name: String,
    stop: AtomicBool,
    connections: AtomicUsize,
    datagrams: AtomicUsize,
    conn_threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Running HTTP + UDP servers; dropping the handle stops and joins them.
pub struct Servers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts, inside `ns`, an HTTP/1.1 keep-alive server on 0.0.0.0:`tcp_port`
    /// answering `{name}\n` and a UDP server on 0.0.0.0:`udp_port` answering
    /// each datagram with `{name}:{payload}`.
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<Servers> {
        let (listener, udp) = ns
            .run(move || bind(tcp_port, udp_port))?
            .with_context(|| format!("starting servers {name:?} in namespace {}", ns.name()))?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            datagrams: AtomicUsize::new(0),
            conn_threads: Mutex::new(Vec::new()),
        });
        // Built before spawning so Drop stops whatever did start if a spawn fails.
        let mut servers = Servers {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        let tcp_shared = Arc::clone(&shared);
        servers.threads.push(
            thread::Builder::new()
                .name(format!("http-{name}"))
                .spawn(move || accept_loop(&listener, &tcp_shared))
                .context("spawning HTTP accept thread")?,
        );
        servers.threads.push(
            thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || udp_loop(&udp, &shared))
                .context("spawning UDP server thread")?,
        );
        Ok(servers)
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Number of UDP datagrams answered so far.
    pub fn datagrams(&self) -> usize {
        self.shared.datagrams.load(Ordering::SeqCst)
    }

    /// The name the servers answer with.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Join the accept loop first so no new connection thread appears afterwards.
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
        let conns = std::mem::take(
            &mut *self
                .shared
                .conn_threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in conns {
            let _ = handle.join();
        }
    }
}

/// Binds both sockets; runs inside the target namespace.
/// Dual-stack sockets on [::] (IPv4 clients arrive as v4-mapped addresses).
fn bind(tcp_port: u16, udp_port: u16) -> Result<(TcpListener, UdpSocket)> {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, tcp_port))
        .with_context(|| format!("binding TCP [::]:{tcp_port}"))?;
    // Nonblocking so accept never hangs after poll() raced with a stop.
    listener
        .set_nonblocking(true)
        .context("making the TCP listener nonblocking")?;
    let udp = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, udp_port))
        .with_context(|| format!("binding UDP [::]:{udp_port}"))?;
    udp.set_read_timeout(Some(POLL_INTERVAL))
        .context("setting the UDP read timeout")?;
    Ok((listener, udp))
}

/// Waits up to [`POLL_INTERVAL`] for `fd` to become readable (also used by
/// the test API server's accept loop).
pub(crate) fn wait_readable(fd: &impl AsRawFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = libc::c_int::try_from(POLL_INTERVAL.as_millis()).unwrap_or(100);
    // SAFETY: one valid pollfd for the duration of the call. The result does not
    // matter: the caller simply retries accept and re-checks the stop flag.
    unsafe { libc::poll(&mut pfd, 1, timeout) };
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => spawn_connection(stream, peer, shared),
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(listener),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // E.g. ECONNABORTED when a client resets before accept; keep serving.
            Err(e) => {
                eprintln!("server {}: accept failed: {e}", shared.name);
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

fn spawn_connection(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let conn_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("conn-{}", shared.name))
        // Connection errors (resets, timeouts) are normal in tests; just close.
        .spawn(move || drop(serve_connection(stream, &conn_shared)));
    let mut threads = shared
        .conn_threads
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // Reap finished connections so long tests do not accumulate handles.
    threads.retain(|h| !h.is_finished());
    match spawned {
        Ok(handle) => threads.push(handle),
        Err(e) => eprintln!("server {}: no thread for {peer}: {e}", shared.name),
    }
}

/// Answers every complete request on the connection until EOF or stop.
fn serve_connection(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    // Accepted sockets must block (with a timeout) regardless of the listener.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_nodelay(true)?;
    let response = http_response(&shared.name);
    // `GET /peer` answers with the address the request came from, so a test
    // can see what source the backend saw.
    let peer = stream.peer_addr()?;
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let peer_response = http_response(&peer.to_string());
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(len) = complete_request_len(&pending) {
            if pending.starts_with(b"GET /peer ") {
                stream.write_all(&peer_response)?;
            } else {
                stream.write_all(&response)?;
            }
            pending.drain(..len);
        }
        if shared.stop.load(Ordering::SeqCst) || pending.len() > MAX_HEAD {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// True for the errors a socket read timeout produces.
pub(crate) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn http_response(name: &str) -> Vec<u8> {
    let body = format!("{name}\n");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Length of the first request in `buf` (head plus any Content-Length body),
/// or None while it is incomplete.
fn complete_request_len(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let body_len = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let total = head_end + body_len;
    (buf.len() >= total).then_some(total)
}

fn udp_loop(socket: &UdpSocket, shared: &Shared) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::SeqCst) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => continue,
            // E.g. ECONNREFUSED from an earlier ICMP error; the socket stays usable.
            Err(_) => continue,
        };
        let mut reply = Vec::with_capacity(shared.name.len() + 1 + len);
        reply.extend_from_slice(shared.name.as_bytes());
        reply.push(b':');
        reply.extend_from_slice(&buf[..len]);
        // A lost reply shows up as a client timeout; nothing useful to do here.
        if socket.send_to(&reply, from).is_ok() {
            shared.datagrams.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn request_framing() {
        assert_eq!(complete_request_len(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(complete_request_len(req), Some(req.len()));
        let post = b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nab";
        assert_eq!(complete_request_len(post), None);
        let mut full = post.to_vec();
        full.extend_from_slice(b"cGET");
        assert_eq!(complete_request_len(&full), Some(post.len() + 1));
    }

    #[test]
    fn response_has_exact_length() {
        let resp = String::from_utf8(http_response("be0")).unwrap_or_default();
        assert!(resp.contains("Content-Length: 4\r\n"));
        assert!(resp.ends_with("\r\n\r\nbe0\n"));
    }
}
