//! Two small HTTP servers: health (/healthz, /livez, /readyz, default :10256)
//! and metrics (/metrics, default :10249). GET only, one request per
//! connection: probes and scrapers need nothing more.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::metrics::Shared;

#[derive(Clone, Copy)]
pub enum Endpoints {
    Health { timeout: Duration },
    Metrics,
}

/// Connections one server answers at once; more are closed at once, so a
/// client that opens many cannot exhaust the agent's memory or descriptors.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How long one exchange may take, reading and writing: a client that
/// never finishes cannot hold a connection.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept: errors such as EMFILE last until
/// connections close, and retrying at once would spin.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The most of a request head read; the rest is not looked at.
const MAX_HEAD: usize = 16 * 1024;

pub async fn serve(addr: SocketAddr, endpoints: Endpoints, status: Shared) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    log::info!(
        "serving {} on {addr}",
        match endpoints {
            Endpoints::Health { .. } => "/healthz, /livez and /readyz",
            Endpoints::Metrics => "/metrics",
        }
    );
    serve_on(listener, endpoints, status).await;
    Ok(())
}

/// Answers on `listener` until the task is dropped.
pub async fn serve_on(listener: TcpListener, endpoints: Endpoints, status: Shared) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("http: accept: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            log::debug!("http: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, endpoints, &status)).await {
                Ok(Err(e)) => log::debug!("http: {e:#}"),
                Err(_) => log::debug!("http: client too slow"),
                Ok(Ok(())) => {}
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    endpoints: Endpoints,
    status: &Shared,
) -> anyhow::Result<()> {
    let head = read_head(&mut stream).await?;
    let request = String::from_utf8_lossy(&head);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let (code, content_type, body) = route(path, endpoints, status);
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(())
}

/// Reads up to the end of the request head, so that closing afterwards
/// never leaves unread bytes (which would reset the connection).
pub(crate) async fn read_head(stream: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > MAX_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

fn route(path: &str, endpoints: Endpoints, status: &Shared) -> (u16, &'static str, String) {
    let Ok(status) = status.lock() else {
        return (503, "text/plain", "status unavailable\n".into());
    };
    match (endpoints, path) {
        (Endpoints::Metrics, "/metrics") => (200, "text/plain; version=0.0.4", status.render()),
        (Endpoints::Health { timeout }, path @ ("/healthz" | "/livez")) => {
            // As kube-proxy: a node going away fails /healthz (load
            // balancers drain it) but not /livez (nothing to restart).
            let eligible = status.node_eligible || path == "/livez";
            let healthy = status.healthy(timeout) && eligible;
            let last = status
                .last_sync
                .map(|t| k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()));
            let body = serde_json::json!({
                "lastUpdated": last.and_then(Result::ok).unwrap_or_default(),
                "currentTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                "nodeEligible": status.node_eligible,
            });
            (
                if healthy { 200 } else { 503 },
                "application/json",
                format!("{body}\n"),
            )
        }
        (Endpoints::Health { .. }, "/readyz") => match &status.not_ready {
            None => (200, "text/plain", "ok\n".into()),
            Some(why) => (503, "text/plain", format!("{why}\n")),
        },
        _ => (404, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;
    use crate::metrics::Status;

    /// What `path` answers for a synced agent on a node that is (not)
    /// eligible.
    fn ask(path: &str, node_eligible: bool) -> (u16, String) {
        let status = Status {
            oldest_pending: None,
            node_eligible,
            ..Status::default()
        };
        let shared: Shared = Arc::new(Mutex::new(status));
        let health = Endpoints::Health {
            timeout: Duration::from_secs(60),
        };
        let (code, _, body) = route(path, health, &shared);
        (code, body)
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_the_server_keeps_answering() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status: Shared = Arc::new(Mutex::new(Status::default()));
        let server = tokio::spawn(serve_on(listener, Endpoints::Metrics, status));
        // Clients that connect and never send hold every permit...
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // ...so one more is closed at once, without an answer.
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut buf)).await;
        assert!(read.is_ok() && buf.is_empty(), "{read:?} {buf:?}");
        // Once they go, the server answers again.
        idle.clear();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        server.abort();
    }

    #[test]
    fn a_node_going_away_fails_healthz_but_not_livez() {
        assert_eq!(ask("/healthz", true).0, 200);
        let (code, body) = ask("/healthz", false);
        assert_eq!(code, 503);
        assert!(body.contains(r#""nodeEligible":false"#), "{body}");
        assert_eq!(ask("/livez", false).0, 200);
    }
}
