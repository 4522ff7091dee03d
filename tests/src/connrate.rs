//! Connection rates for the benchmarks: new TCP connections one at a time
//! (connect latency and connections per second), and short HTTP requests,
//! one per connection, from many connections at once (requests per second),
//! against a server that answers each connection's one request and closes.
//!
//! The server closes first, so the TIME_WAIT state stays on its side and a
//! client's ports come free as soon as each exchange ends; a one-at-a-time
//! connection is closed with a RST, so neither side keeps one.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{netns::Netns, servers::wait_readable};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
/// Per connection; a slower exchange counts as a failure.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A server that accepts on several threads and answers one request per
/// connection; stopped and joined on drop.
pub struct ShortServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ShortServer {
    /// Listens on [::]:`port` inside `ns` with `threads` accepting threads.
    pub fn start(ns: &Netns, port: u16, threads: usize) -> Result<ShortServer> {
        let listener = ns
            .run(move || TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("binding [::]:{port} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = ShortServer {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for _ in 0..threads {
            let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
            server
                .threads
                .push(thread::spawn(move || accept_loop(&listener, &stop)));
        }
        Ok(server)
    }
}

impl Drop for ShortServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            // A client that resets before its request is normal here.
            Ok((stream, _)) => drop(answer(stream)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(listener),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Out of descriptors, say: do not spin while it lasts.
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Reads one request head (or EOF) and answers it; the drop closes.
fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    stream.write_all(RESPONSE)
}

/// One round of connections opened one after another.
#[derive(Debug, Default)]
pub struct Round {
    /// Time for connect() to return, of each connection.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl Round {
    pub fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens `count` connections one after another from the calling thread's
/// namespace, to `targets` in turn, each closed with a RST at once.
pub fn connect_round(targets: &[SocketAddr], count: usize) -> Result<Round> {
    if targets.is_empty() {
        bail!("no target to connect to");
    }
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for target in targets.iter().cycle().take(count) {
        let t = Instant::now();
        let stream = TcpStream::connect_timeout(target, TIMEOUT)
            .with_context(|| format!("connect to {target}"))?;
        latencies.push(t.elapsed());
        reset_on_close(&stream)?;
    }
    Ok(Round {
        latencies,
        elapsed: started.elapsed(),
    })
}

/// The `q` quantile (0..=1) of latencies sorted in ascending order; zero
/// for none.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Makes the close of `stream` send a RST and keep no TIME_WAIT.
pub fn reset_on_close(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_LINGER");
    }
    Ok(())
}

/// What a run of concurrent requests did.
#[derive(Debug, Default)]
pub struct Requests {
    pub answered: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Requests {
    pub fn per_second(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// For `run`, `concurrency` threads in `ns` each make one request per new
/// connection, to `targets` in turn, as fast as the answers come.
pub fn requests(
    ns: &Netns,
    targets: &[SocketAddr],
    concurrency: usize,
    run: Duration,
) -> Result<Requests> {
    if targets.is_empty() {
        bail!("no target to send requests to");
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + run;
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (answered, failed) = (Arc::clone(&answered), Arc::clone(&failed));
        let targets = targets.to_vec();
        workers.push(ns.spawn(move || {
            let mut first_error = None;
            for target in targets.iter().cycle().skip(w) {
                if Instant::now() >= deadline {
                    break;
                }
                match exchange(*target) {
                    Ok(()) => answered.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.get_or_insert_with(|| format!("{target}: {e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            first_error
        })?);
    }
    let mut first_error = None;
    for worker in workers {
        let error = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a request thread panicked"))?;
        first_error = first_error.or(error);
    }
    Ok(Requests {
        answered: answered.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        first_error,
        elapsed: started.elapsed(),
    })
}

/// One connection, one request, the answer read to the server's close.
fn exchange(target: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(REQUEST).context("request")?;
    let mut answer = Vec::with_capacity(RESPONSE.len());
    stream.read_to_end(&mut answer).context("answer")?;
    if !answer.starts_with(b"HTTP/1.1 200 ") {
        bail!("unexpected answer of {} bytes", answer.len());
    }
    Ok(())
}
