//! The health check node port server over real loopback sockets: what a
//! cloud load balancer's probe sees, and how sync opens and closes ports.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use proxy_agent::{
    healthcheck::{HealthChecks, ServiceHealth},
    model::ObjectKey,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind((LOOPBACK, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn health(name: &str, local_endpoints: usize) -> ServiceHealth {
    ServiceHealth {
        service: ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        },
        local_endpoints,
    }
}

/// Health checks on loopback, and the switch that says whether the proxy
/// is healthy (it is, to begin with).
fn checks() -> (HealthChecks, Arc<AtomicBool>) {
    let healthy = Arc::new(AtomicBool::new(true));
    let read = healthy.clone();
    let checks = HealthChecks::new(LOOPBACK, Arc::new(move || read.load(Ordering::SeqCst)));
    (checks, healthy)
}

/// Syncs to one check on `port`: Service `name` with `local` endpoints.
fn sync_one(checks: &mut HealthChecks, port: u16, name: &str, local: usize) {
    let errors = checks.sync(&BTreeMap::from([(port, health(name, local))]));
    assert!(errors.is_empty(), "{errors:?}");
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client: one GET, read until the server closes.
async fn get(port: u16) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(SocketAddr::new(LOOPBACK, port)).await?;
    stream
        .write_all(b"GET /anything HTTP/1.1\r\nHost: lb\r\nUser-Agent: probe\r\n\r\n")
        .await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut raw))
        .await
        .expect("server answers within 5s")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a numeric status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

fn json(response: &Response) -> serde_json::Value {
    serde_json::from_str(&response.body).expect("a JSON body")
}

#[tokio::test]
async fn local_endpoints_answer_200_with_kube_proxy_body_and_headers() {
    let (mut checks, _) = checks();
    let port = free_port();
    sync_one(&mut checks, port, "web", 2);
    assert_eq!(checks.ports(), vec![port]);

    let response = get(port).await.expect("probe");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Content-Type"), Some("application/json"));
    assert_eq!(response.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(
        response.header("X-Load-Balancing-Endpoint-Weight"),
        Some("2")
    );
    assert_eq!(response.header("Connection"), Some("close"));
    assert_eq!(
        response.header("Content-Length"),
        Some(response.body.len().to_string().as_str())
    );
    // kube-proxy's exact layout, which some tooling compares verbatim.
    assert_eq!(
        response.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
}

#[tokio::test]
async fn no_local_endpoints_answer_503() {
    let (mut checks, _) = checks();
    let port = free_port();
    sync_one(&mut checks, port, "web", 0);

    let response = get(port).await.expect("probe");
    assert_eq!(response.status, 503);
    assert_eq!(
        response.header("X-Load-Balancing-Endpoint-Weight"),
        Some("0")
    );
    let body = json(&response);
    assert_eq!(body["localEndpoints"], 0);
    assert_eq!(body["serviceProxyHealthy"], true);
    assert_eq!(body["service"]["name"], "web");
}

#[tokio::test]
async fn second_sync_updates_the_count_in_place() {
    let (mut checks, _) = checks();
    let port = free_port();
    sync_one(&mut checks, port, "web", 0);
    assert_eq!(get(port).await.expect("probe").status, 503);

    // Keep a connection open across the sync: a restarted listener would
    // not be the one it is queued on, and it would never be answered.
    let mut queued = TcpStream::connect(SocketAddr::new(LOOPBACK, port))
        .await
        .expect("connect before the update");
    sync_one(&mut checks, port, "web", 3);
    assert_eq!(checks.ports(), vec![port]);

    queued
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("send");
    let mut raw = String::new();
    queued.read_to_string(&mut raw).await.expect("read");
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");

    let response = get(port).await.expect("probe");
    assert_eq!(response.status, 200);
    assert_eq!(json(&response)["localEndpoints"], 3);
    assert_eq!(
        response.header("X-Load-Balancing-Endpoint-Weight"),
        Some("3")
    );
}

#[tokio::test]
async fn removed_port_refuses_connections_and_is_free() {
    let (mut checks, _) = checks();
    let (kept, removed) = (free_port(), free_port());
    let both = BTreeMap::from([(kept, health("kept", 1)), (removed, health("removed", 1))]);
    assert!(checks.sync(&both).is_empty());
    assert_eq!(get(removed).await.expect("probe").status, 200);

    sync_one(&mut checks, kept, "kept", 1);
    assert_eq!(checks.ports(), vec![kept]);
    let refused = get(removed).await.err().map(|e| e.kind());
    assert_eq!(refused, Some(ErrorKind::ConnectionRefused));
    // Free again right away: something else may take the port.
    drop(std::net::TcpListener::bind((LOOPBACK, removed)).expect("rebind the removed port"));
    assert_eq!(get(kept).await.expect("probe").status, 200);
}

#[tokio::test]
async fn unhealthy_proxy_answers_503_despite_endpoints() {
    let (mut checks, healthy) = checks();
    let port = free_port();
    sync_one(&mut checks, port, "web", 4);
    assert_eq!(get(port).await.expect("probe").status, 200);

    // Asked on every request: no sync needed.
    healthy.store(false, Ordering::SeqCst);
    let response = get(port).await.expect("probe");
    assert_eq!(response.status, 503);
    let body = json(&response);
    assert_eq!(body["localEndpoints"], 4);
    assert_eq!(body["serviceProxyHealthy"], false);
    assert_eq!(
        response.header("X-Load-Balancing-Endpoint-Weight"),
        Some("4")
    );

    healthy.store(true, Ordering::SeqCst);
    assert_eq!(get(port).await.expect("probe").status, 200);
}

#[tokio::test]
async fn port_in_use_is_reported_and_retried_on_the_next_sync() {
    let (mut checks, _) = checks();
    let blocker = std::net::TcpListener::bind((LOOPBACK, 0)).expect("bind");
    let busy = blocker.local_addr().expect("local address").port();
    let free = free_port();
    let wanted = BTreeMap::from([(busy, health("busy", 1)), (free, health("free", 1))]);

    let errors = checks.sync(&wanted);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains(&busy.to_string()), "{}", errors[0]);
    assert!(errors[0].contains("default/busy"), "{}", errors[0]);
    assert_eq!(checks.ports(), vec![free]);
    assert_eq!(get(free).await.expect("probe").status, 200);

    drop(blocker);
    let errors = checks.sync(&wanted);
    assert!(errors.is_empty(), "{errors:?}");
    let mut ports = vec![busy, free];
    ports.sort_unstable();
    assert_eq!(checks.ports(), ports);
    let response = get(busy).await.expect("probe");
    assert_eq!(response.status, 200);
    assert_eq!(json(&response)["service"]["name"], "busy");
}

#[tokio::test]
async fn dropping_frees_every_port() {
    let (mut checks, _) = checks();
    let port = free_port();
    sync_one(&mut checks, port, "web", 1);
    drop(checks);
    drop(std::net::TcpListener::bind((LOOPBACK, port)).expect("rebind after drop"));
}
