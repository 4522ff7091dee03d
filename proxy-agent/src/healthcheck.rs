//! Health check node ports for Services with `externalTrafficPolicy: Local`.
//!
//! Cloud load balancers probe `healthCheckNodePort` on every node and send
//! traffic only to nodes that answer 200, i.e. nodes with local endpoints.
//! The answer mirrors kube-proxy's service health server
//! (pkg/proxy/healthcheck/service_health.go) byte for byte in its body and in
//! the headers load balancers read, so switching proxies changes nothing for
//! them: 200 when the node has local endpoints and the proxy is healthy, 503
//! otherwise, with the count in `X-Load-Balancing-Endpoint-Weight` (used by
//! weighted load balancing) and a small JSON body.

use std::{
    collections::BTreeMap,
    future::poll_fn,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    task::{Context, Poll},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    runtime::Handle,
    task::{JoinHandle, JoinSet},
};

use crate::model::ObjectKey;

/// What one health check node port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: ObjectKey,
    pub local_endpoints: usize,
}

type ProxyHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The listener of a served port, shared with its accept task so that
/// stopping can close the socket itself: aborting a task only drops its
/// future later, on a worker, and the port must be free when `sync` returns.
type Slot = Arc<Mutex<Option<TcpListener>>>;

/// Listen backlog: probes from many load balancer frontends can arrive at once.
const BACKLOG: u32 = 1024;

/// The health check node ports this node serves.
pub struct HealthChecks {
    bind: IpAddr,
    proxy_healthy: ProxyHealthy,
    served: BTreeMap<u16, Served>,
}

/// One port being served.
struct Served {
    /// Read on every request, so counts change without a listener restart.
    health: Arc<RwLock<ServiceHealth>>,
    listener: Slot,
    accept: JoinHandle<()>,
}

impl Served {
    fn stop(self) {
        // Dropping the listener here closes the socket before sync returns.
        drop(lock(&self.listener).take());
        // Aborting also drops the accept task's JoinSet, ending its connections.
        self.accept.abort();
    }
}

impl HealthChecks {
    /// Listeners bind to `bind` (an IP; 0.0.0.0 by default in the agent).
    /// `proxy_healthy` is asked on every request (kube-proxy answers 503 when
    /// the proxy itself is unhealthy even if endpoints exist).
    pub fn new(bind: IpAddr, proxy_healthy: ProxyHealthy) -> Self {
        Self {
            bind,
            proxy_healthy,
            served: BTreeMap::new(),
        }
    }

    /// Makes the served ports exactly the keys of `wanted`: starts a listener
    /// for each new port, stops the listeners of ports no longer wanted (the
    /// port is free again when this returns), and updates the reported counts
    /// of the others in place. Must be called within a tokio runtime. Returns
    /// one error per port it could not listen on; those are retried next time.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, ServiceHealth>) -> Vec<String> {
        let unwanted: Vec<u16> = self
            .served
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in unwanted {
            if let Some(served) = self.served.remove(&port) {
                served.stop();
            }
        }
        let mut errors = Vec::new();
        for (&port, health) in wanted {
            if let Err(e) = self.serve(port, health) {
                errors.push(format!(
                    "health check node port {port} of {}: {e}",
                    health.service
                ));
            }
        }
        errors
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.served.keys().copied().collect()
    }

    /// Updates the port's report, or starts serving it if it is new.
    fn serve(&mut self, port: u16, health: &ServiceHealth) -> io::Result<()> {
        if let Some(served) = self.served.get(&port) {
            *served
                .health
                .write()
                .unwrap_or_else(PoisonError::into_inner) = health.clone();
            return Ok(());
        }
        let served = self.start(port, health.clone())?;
        self.served.insert(port, served);
        Ok(())
    }

    fn start(&self, port: u16, health: ServiceHealth) -> io::Result<Served> {
        // Registering a socket without a runtime panics; report it instead.
        let runtime = Handle::try_current().map_err(io::Error::other)?;
        let listener: Slot = Arc::new(Mutex::new(Some(listen(SocketAddr::new(self.bind, port))?)));
        let health = Arc::new(RwLock::new(health));
        let accept = runtime.spawn(accept_loop(
            listener.clone(),
            health.clone(),
            self.proxy_healthy.clone(),
        ));
        Ok(Served {
            health,
            listener,
            accept,
        })
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, served) in std::mem::take(&mut self.served) {
            served.stop();
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Lets a port be reused while connections it answered sit in TIME_WAIT
    // (the server closes first); a live listener on the port still conflicts.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn lock(slot: &Slot) -> MutexGuard<'_, Option<TcpListener>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(slot: Slot, health: Arc<RwLock<ServiceHealth>>, proxy_healthy: ProxyHealthy) {
    // Owned here so that aborting this task also aborts the connections.
    let mut connections = JoinSet::new();
    while let Some(accepted) = poll_fn(|cx| poll_accept(&slot, cx)).await {
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("health check node port: accept: {e}");
                tokio::time::sleep(crate::http::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if connections.len() >= crate::http::MAX_CONNECTIONS {
            log::debug!("health check node port: connections at their limit; closing a new one");
            continue;
        }
        let (health, proxy_healthy) = (health.clone(), proxy_healthy.clone());
        connections.spawn(async move {
            let exchange = answer(stream, &health, &*proxy_healthy);
            match tokio::time::timeout(crate::http::EXCHANGE_TIMEOUT, exchange).await {
                Ok(Err(e)) => log::debug!("health check node port: {e:#}"),
                Err(_) => log::debug!("health check node port: client too slow"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// Accepts from the shared listener; None once it has been taken (stopped).
fn poll_accept(slot: &Slot, cx: &mut Context<'_>) -> Poll<Option<io::Result<TcpStream>>> {
    match lock(slot).as_ref() {
        None => Poll::Ready(None),
        Some(listener) => listener
            .poll_accept(cx)
            .map(|accepted| Some(accepted.map(|(stream, _)| stream))),
    }
}

async fn answer(
    mut stream: TcpStream,
    health: &RwLock<ServiceHealth>,
    proxy_healthy: &(dyn Fn() -> bool + Send + Sync),
) -> anyhow::Result<()> {
    // Reading the whole head first avoids a reset from unread bytes on close.
    let request = crate::http::read_head(&mut stream).await?;
    let head_only = request.starts_with(b"HEAD ");
    let health = health
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let response = response(&health, proxy_healthy(), head_only);
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// kube-proxy's answer: the status says whether to send traffic here, the
/// weight header how much.
fn response(health: &ServiceHealth, proxy_healthy: bool, head_only: bool) -> String {
    let count = health.local_endpoints;
    let status = if count > 0 && proxy_healthy {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = body(health, proxy_healthy);
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {count}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { &body }
    )
}

/// The body exactly as kube-proxy lays it out (tab-indented, keys in this
/// order, no trailing newline), for anything that compares it verbatim.
fn body(health: &ServiceHealth, proxy_healthy: bool) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quote(&health.service.namespace),
        quote(&health.service.name),
        health.local_endpoints,
        proxy_healthy
    )
}
