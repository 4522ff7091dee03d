//! Two small HTTP servers: health (/healthz, /livez, /readyz, default :10256)
//! and metrics (/metrics, default :10249). GET only, one request per
//! connection: probes and scrapers need nothing more.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::metrics::Shared;

#[derive(Clone, Copy)]
pub enum Endpoints {
    Health { timeout: Duration },
    Metrics,
}

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
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, endpoints, &status).await {
                log::debug!("http: {e:#}");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    endpoints: Endpoints,
    status: &Shared,
) -> anyhow::Result<()> {
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await??;
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
        if n == 0 || head.len() > 16 * 1024 {
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

    #[test]
    fn a_node_going_away_fails_healthz_but_not_livez() {
        assert_eq!(ask("/healthz", true).0, 200);
        let (code, body) = ask("/healthz", false);
        assert_eq!(code, 503);
        assert!(body.contains(r#""nodeEligible":false"#), "{body}");
        assert_eq!(ask("/livez", false).0, 200);
    }
}
