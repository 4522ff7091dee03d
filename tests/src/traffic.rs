//! Continuous traffic through the VIP while something happens to the agent
//! or the API server: long-lived TCP connections and UDP flows that must
//! keep their backends, and new connections that must succeed.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{
    clients::{HttpConn, UdpFlow},
    manifests::{HTTP_PORT, UDP_PORT, VIP},
    netns::Netns,
};

const OPEN_TCP: usize = 20;
const OPEN_UDP: usize = 10;

/// What the traffic thread saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub requests: usize,
    pub new_connections: usize,
    pub failures: Vec<String>,
}

/// Long-lived TCP connections and UDP flows, each with the backend it
/// started on.
pub struct Open {
    tcp: Vec<(HttpConn, String)>,
    udp: Vec<(UdpFlow, String)>,
}

pub fn open(client: &Netns) -> anyhow::Result<Open> {
    let vip = SocketAddrV4::new(VIP, HTTP_PORT);
    let mut tcp = Vec::new();
    for _ in 0..OPEN_TCP {
        let mut conn = HttpConn::connect(client, vip, Duration::from_secs(2))?;
        let backend = conn.get()?;
        tcp.push((conn, backend));
    }
    let mut udp = Vec::new();
    for i in 0..OPEN_UDP {
        let mut flow = UdpFlow::open(client, SocketAddrV4::new(VIP, UDP_PORT))?;
        let (backend, _) = flow.exchange(&format!("hello{i}"))?;
        udp.push((flow, backend));
    }
    Ok(Open { tcp, udp })
}

/// Keeps every open connection and flow busy and opens a new connection per
/// round, from inside the client namespace, until `stop`.
pub fn traffic(
    client: &Netns,
    mut open: Open,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<Seen>> {
    client.spawn(move || {
        let mut seen = Seen::default();
        let mut round = 0;
        while !stop.load(Ordering::SeqCst) {
            round += 1;
            for (conn, backend) in &mut open.tcp {
                check(&mut seen, "open TCP connection", conn.get(), backend);
            }
            for (flow, backend) in &mut open.udp {
                let answer = flow.exchange(&format!("r{round}")).map(|(name, _)| name);
                check(&mut seen, "UDP flow", answer, backend);
            }
            seen.new_connections += 1;
            let fresh =
                HttpConn::connect_here(SocketAddrV4::new(VIP, HTTP_PORT), Duration::from_secs(2))
                    .and_then(|mut conn| conn.get());
            if let Err(e) = fresh {
                seen.failures.push(format!("new connection: {e:#}"));
            }
        }
        seen
    })
}

fn check(seen: &mut Seen, what: &str, answer: anyhow::Result<String>, backend: &str) {
    seen.requests += 1;
    match answer {
        Ok(name) if name == backend => {}
        Ok(name) => seen
            .failures
            .push(format!("{what} moved from {backend} to {name}")),
        Err(e) => seen.failures.push(format!("{what} to {backend}: {e:#}")),
    }
}

impl Seen {
    /// Fails unless nothing failed and at least `min_requests` were made.
    pub fn assert_clean(&self, min_requests: usize) {
        assert!(
            self.failures.is_empty(),
            "{} failures, first: {:?}",
            self.failures.len(),
            self.failures.first()
        );
        assert!(
            self.requests >= min_requests,
            "too little traffic to prove anything: {self:?}"
        );
    }
}

/// Runs traffic until `stop()`; the seen counts come back from `stop`.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    runner: Option<thread::JoinHandle<Seen>>,
}

impl Traffic {
    pub fn start(client: &Netns) -> anyhow::Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let runner = traffic(client, open(client)?, stop.clone())?;
        Ok(Traffic {
            stop,
            runner: Some(runner),
        })
    }

    pub fn stop(mut self) -> anyhow::Result<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        let runner = self
            .runner
            .take()
            .ok_or_else(|| anyhow::anyhow!("already stopped"))?;
        runner
            .join()
            .map_err(|_| anyhow::anyhow!("traffic thread panicked"))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(runner) = self.runner.take() {
            let _ = runner.join();
        }
    }
}
