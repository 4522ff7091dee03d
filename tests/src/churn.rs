//! Connection churn: many short TCP connections, one request each, from
//! several threads at once, as fast as they go. A client's ports come round
//! again quickly when its namespace's port range is narrow, which is how
//! hours of real traffic look to conntrack.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use std::{io, thread};

use anyhow::Context;

use crate::{clients::HttpConn, netns::Netns};

/// What a churn run did.
#[derive(Debug, Default)]
pub struct Churned {
    pub connections: usize,
    pub failures: usize,
    /// The first few failures, for the test's message.
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl Churned {
    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

const KEPT_ERRORS: usize = 5;

/// How hard to churn.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub threads: usize,
    pub run: Duration,
    /// Per connection and request.
    pub timeout: Duration,
    /// New connections a second in all; None: as fast as they go.
    pub rate: Option<u32>,
}

/// Opens connections from `ns` to `target` on `load.threads` threads for
/// `load.run`: each connects, sends one request, reads the answer and
/// closes.
pub fn churn(ns: &Netns, target: SocketAddr, load: Load) -> anyhow::Result<Churned> {
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let deadline = start + load.run;
    let interval = load
        .rate
        .map(|r| Duration::from_secs_f64(load.threads as f64 / f64::from(r.max(1))));
    let mut workers = Vec::new();
    for _ in 0..load.threads {
        let (done, failed, errors) = (done.clone(), failed.clone(), errors.clone());
        workers.push(ns.spawn(move || {
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if let Some(interval) = interval {
                    next += interval;
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                match one_request(target, load.timeout) {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    // The client's own ports are all in TIME_WAIT: its
                    // limit, not the path's; wait for one to come free.
                    Err(e) if out_of_ports(&e) => {
                        thread::sleep(Duration::from_millis(1));
                        0
                    }
                    Err(e) => {
                        let mut kept = errors.lock().unwrap_or_else(|p| p.into_inner());
                        if kept.len() < KEPT_ERRORS {
                            kept.push(format!("{e:#}"));
                        }
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })?);
    }
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a churn thread panicked"))?;
    }
    let errors = std::mem::take(&mut *errors.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Churned {
        connections: done.load(Ordering::Relaxed),
        failures: failed.load(Ordering::Relaxed),
        errors,
        elapsed: start.elapsed(),
    })
}

fn one_request(target: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let mut conn = HttpConn::connect_here(target, timeout)?;
    conn.get()
        .with_context(|| format!("request from {}", conn.local()))?;
    Ok(())
}

fn out_of_ports(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::AddrNotAvailable)
}
