//! Which address the agent reaches the API server at.
//!
//! In a cluster without kube-proxy, the `kubernetes` Service's cluster IP
//! only works once an agent has programmed it: an agent that needed it to
//! start would never start. `--kube-apiserver` names an API server the
//! agent reaches directly, so it can always start. Once the agent has
//! programmed the `kubernetes` Service and it answers, the watches move
//! there, which spreads them over every API server and survives the loss
//! of the one the agent started with; if the Service stops answering for
//! a while, they move back to the direct address.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use kube::{Client, Config};

use super::kubernetes;
use crate::model::{ObjectKey, Objects};

/// How long the Service may fail before the watches go back.
const FALL_BACK_AFTER: Duration = Duration::from_secs(10);
/// How long before the Service is tried again after it did not answer.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a probe through the Service may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Route {
    bootstrap: Config,
    /// Move to the Service at all (only with a direct address to go back to).
    moves: bool,
    /// The Service address the watches use now (None: the direct one).
    service: Option<SocketAddr>,
    failing_since: Option<Instant>,
    not_before: Instant,
}

impl Route {
    /// `moves`: `--kube-apiserver` was given, so `bootstrap` is a direct
    /// address worth leaving and coming back to.
    pub fn new(bootstrap: Config, moves: bool) -> Route {
        Route {
            bootstrap,
            moves,
            service: None,
            failing_since: None,
            not_before: Instant::now(),
        }
    }

    pub fn bootstrap_client(&self) -> anyhow::Result<Client> {
        log::info!("API server: {}", self.bootstrap.cluster_url);
        kubernetes::client(self.bootstrap.clone())
    }

    /// A client to move the watches to, when they should move: called
    /// after each pass, with whether the watches are failing now.
    pub async fn next(&mut self, objects: &Objects, failing: bool, node: &str) -> Option<Client> {
        if !self.moves {
            return None;
        }
        let wanted = kubernetes_service(objects);
        match self.service {
            Some(now) if failing => {
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() < FALL_BACK_AFTER {
                    return None;
                }
                log::warn!(
                    "the API server does not answer at the kubernetes Service {now} since {:?}; \
                     back to {}",
                    since.elapsed(),
                    self.bootstrap.cluster_url
                );
                self.back(RETRY_AFTER)
            }
            Some(now) if wanted != Some(now) => self.back(Duration::ZERO),
            Some(_) => {
                self.failing_since = None;
                None
            }
            None if Instant::now() < self.not_before => None,
            None => self.move_to_service(wanted?, node).await,
        }
    }

    fn back(&mut self, pause: Duration) -> Option<Client> {
        self.service = None;
        self.failing_since = None;
        self.not_before = Instant::now() + pause;
        self.bootstrap_client()
            .inspect_err(|e| log::error!("{e:#}"))
            .ok()
    }

    async fn move_to_service(&mut self, addr: SocketAddr, node: &str) -> Option<Client> {
        let client = kubernetes::via(&self.bootstrap, addr)
            .and_then(kubernetes::client)
            .inspect_err(|e| log::error!("{e:#}"))
            .ok()?;
        if !kubernetes::answers(&client, node, PROBE_TIMEOUT).await {
            log::info!(
                "the kubernetes Service {addr} does not answer yet; staying with {}",
                self.bootstrap.cluster_url
            );
            self.not_before = Instant::now() + RETRY_AFTER;
            return None;
        }
        log::info!("API server: now through the kubernetes Service {addr}");
        self.service = Some(addr);
        Some(client)
    }

    /// Where the watches talk to now, for tests and logs.
    pub fn through_service(&self) -> Option<SocketAddr> {
        self.service
    }
}

/// `default/kubernetes`: its cluster IP and its `https` port (or first).
pub fn kubernetes_service(objects: &Objects) -> Option<SocketAddr> {
    let key = ObjectKey {
        namespace: "default".into(),
        name: "kubernetes".into(),
    };
    let spec = objects.services.get(&key)?.spec.as_ref()?;
    let ip: IpAddr = spec.cluster_ip.as_deref()?.parse().ok()?;
    let ports = spec.ports.as_deref()?;
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("https"))
        .or(ports.first())?;
    Some(SocketAddr::new(ip, u16::try_from(port.port).ok()?))
}
