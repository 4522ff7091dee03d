//! Traffic through each mode: one topology (client, node, backend) per
//! node configuration, all built once and reprogrammed at each scale, and
//! measured in alternation so that the VM's drift hits every mode alike.
//!
//! The backend holds the last Service's endpoints (the node routes the
//! endpoint ranges to it), so a proxy that walks its rules in order walks
//! them all. A short-request server answers on port 8080 there.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use proxy_tests::{
    agent::Agent,
    cgroup,
    connrate::{Requests, Round, ShortServer, connect_round, requests},
    kubeproxy::{Mode, ServicePort},
    manifests::ManifestFile,
    netns::{Netns, unique_prefix},
    topology::{Topology, backend_addr},
};

/// Connections opened one at a time per round.
const PER_ROUND: usize = 1000;
/// Connections open at once for requests per second, as `wrk -c50`.
const CONCURRENCY: usize = 50;
/// How long each round of concurrent requests runs.
const REQUEST_RUN: Duration = Duration::from_secs(2);
pub const ROUNDS: usize = 5;
/// The endpoint ranges 10.(100 + e).x.y, e < 10, that the node routes to
/// the backend.
const ENDPOINT_ROUTES: [&str; 3] = ["10.100.0.0/14", "10.104.0.0/14", "10.108.0.0/15"];
const BACKEND_PORT: u16 = 8080;

/// What is measured, and from where.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Way {
    /// From the client, straight to the endpoints.
    NoProxy,
    /// From the client to the cluster IP, through kube-proxy's rules.
    Kube(Mode),
    /// From the client to the cluster IP, through xdproxy's datapath.
    Xdproxy,
    /// From a process on the node, straight to the endpoints.
    NodeNoProxy,
    /// From a process on the node to the cluster IP, through xdproxy's
    /// socket hooks.
    SocketHooks,
}

impl Way {
    pub const ALL: [Way; 7] = [
        Way::NoProxy,
        Way::Kube(Mode::IptablesLegacy),
        Way::Kube(Mode::IptablesNft),
        Way::Kube(Mode::Nftables),
        Way::Xdproxy,
        Way::NodeNoProxy,
        Way::SocketHooks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Way::NoProxy => "no proxy",
            Way::Kube(mode) => mode.name(),
            Way::Xdproxy => "xdproxy",
            Way::NodeNoProxy => "no proxy, node process",
            Way::SocketHooks => "xdproxy socket hooks, node process",
        }
    }
}

/// One way's samples at one scale.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Connections per second of each round.
    pub conn_rates: Vec<f64>,
    /// Every connect latency of every round, in ascending order once
    /// measured.
    pub latencies: Vec<Duration>,
    /// Requests per second of each round.
    pub request_rates: Vec<f64>,
    pub failed: usize,
    pub first_error: Option<String>,
}

impl Traffic {
    fn add(&mut self, round: Round, reqs: Requests) {
        self.conn_rates.push(round.per_second());
        self.latencies.extend(round.latencies);
        self.request_rates.push(reqs.per_second());
        self.failed += reqs.failed;
        self.first_error = self.first_error.take().or(reqs.first_error);
    }
}

struct Lane {
    topology: Topology,
    _server: ShortServer,
}

impl Lane {
    fn build(tag: &str) -> Result<Lane> {
        let topology = Topology::build(&unique_prefix(tag), 1)?;
        for route in ENDPOINT_ROUTES {
            let via = backend_addr(0).to_string();
            topology.node.ip(&["route", "add", route, "via", &via])?;
        }
        // Every port a client may use: rounds follow each other quickly.
        for ns in [&topology.client, &topology.node] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        }
        let server = ShortServer::start(&topology.backends[0], BACKEND_PORT, 4)?;
        Ok(Lane {
            topology,
            _server: server,
        })
    }

    /// Makes the backend hold exactly `endpoints`.
    fn hold(&self, endpoints: &[SocketAddr]) -> Result<()> {
        let backend = &self.topology.backends[0];
        backend.ip(&["-4", "addr", "flush", "dev", "lo", "scope", "global"])?;
        for e in endpoints {
            backend.ip(&["addr", "add", &format!("{}/32", e.ip()), "dev", "lo"])?;
        }
        Ok(())
    }
}

/// Every topology, and the programs loaded into each.
pub struct Lanes {
    /// First, so that it is dropped while its namespace still exists.
    agent: Option<Agent>,
    plain: Lane,
    kube: Vec<(Mode, Lane)>,
    xdproxy: Lane,
    manifest: ManifestFile,
    /// Rules are in the kube-proxy lanes' nodes.
    programmed: bool,
    /// This process's cgroup, outside the socket hooks.
    home: PathBuf,
}

impl Lanes {
    pub fn build() -> Result<Lanes> {
        let plain = Lane::build("sbp")?;
        let kube = Mode::ALL
            .iter()
            .map(|m| Ok((*m, Lane::build("sbk")?)))
            .collect::<Result<_>>()?;
        let xdproxy = Lane::build("sbx")?;
        let manifest = ManifestFile::new(&format!("sbs-{}", xdproxy.topology.prefix()), "")?;
        Ok(Lanes {
            agent: None,
            plain,
            kube,
            xdproxy,
            manifest,
            programmed: false,
            home: cgroup::current()?,
        })
    }

    /// Programs every mode with `ports` (kube-proxy's rules, xdproxy's
    /// agent from manifest files) and points the backends at the last
    /// Service's endpoints.
    pub fn program(&mut self, ports: &[ServicePort], manifest: &str) -> Result<()> {
        let last = last_endpoints(ports)?;
        for lane in self.lanes() {
            lane.hold(&last)?;
        }
        for (mode, lane) in &self.kube {
            if *mode == Mode::Nftables && self.programmed {
                mode.flush(&lane.topology.node)?;
            }
            let took = mode.install(&lane.topology.node, &mode.rules(ports))?;
            eprintln!(
                "{} Services: {} installed in {took:.2?}",
                ports.len(),
                mode.name()
            );
        }
        self.programmed = true;
        // A fresh agent per scale: as a node's first start.
        self.agent = None;
        self.manifest.write(manifest)?;
        let ifaces = self.xdproxy.topology.agent_ifaces("");
        let node = &self.xdproxy.topology.node;
        self.agent = Some(Agent::start(node, self.manifest.path(), &ifaces)?);
        Ok(())
    }

    fn lanes(&self) -> impl Iterator<Item = &Lane> {
        [&self.plain, &self.xdproxy]
            .into_iter()
            .chain(self.kube.iter().map(|(_, l)| l))
    }

    /// `ROUNDS` alternating rounds of every way against the last Service.
    pub fn measure(&self, ports: &[ServicePort]) -> Result<Vec<(Way, Traffic)>> {
        let mut out: Vec<(Way, Traffic)> =
            Way::ALL.iter().map(|w| (*w, Traffic::default())).collect();
        for round in 0..ROUNDS {
            for (way, traffic) in &mut out {
                let (ns, targets) = self.route(*way, ports)?;
                let (connects, reqs) = self
                    .hooked(*way == Way::SocketHooks, || one_round(ns, &targets))
                    .with_context(|| format!("{} at {} Services", way.name(), ports.len()))?;
                eprintln!(
                    "{} Services, round {round}: {}: {:.0} conn/s, {:.0} req/s, {} failed",
                    ports.len(),
                    way.name(),
                    connects.per_second(),
                    reqs.per_second(),
                    reqs.failed
                );
                traffic.add(connects, reqs);
            }
        }
        for (_, traffic) in &mut out {
            traffic.latencies.sort();
        }
        Ok(out)
    }

    /// Where `way`'s traffic starts and what it connects to.
    fn route(&self, way: Way, ports: &[ServicePort]) -> Result<(&Netns, Vec<SocketAddr>)> {
        let last = ports.last().context("no Services")?;
        let vip = vec![SocketAddr::new(IpAddr::V4(last.vip), last.port)];
        let endpoints = last_endpoints(ports)?;
        Ok(match way {
            Way::NoProxy => (&self.plain.topology.client, endpoints),
            Way::NodeNoProxy => (&self.plain.topology.node, endpoints),
            Way::Xdproxy => (&self.xdproxy.topology.client, vip),
            Way::SocketHooks => (&self.xdproxy.topology.node, vip),
            Way::Kube(mode) => {
                let lane = self.kube.iter().find(|(m, _)| *m == mode);
                let (_, lane) = lane.context("no lane for the mode")?;
                (&lane.topology.client, vip)
            }
        })
    }

    /// Runs `f` with this process in the agent's cgroup (its socket hooks
    /// serve the sockets made meanwhile) if `hooked`, and back home after.
    fn hooked<T>(&self, hooked: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !hooked {
            return f();
        }
        let agent = self.agent.as_ref().context("no agent running")?;
        cgroup::enter(agent.cgroup().path())?;
        let result = f();
        cgroup::enter(&self.home)?;
        result
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // Out of the agent's cgroup before it is removed.
        let _ = cgroup::enter(&self.home);
    }
}

fn one_round(ns: &Netns, targets: &[SocketAddr]) -> Result<(Round, Requests)> {
    let list = targets.to_vec();
    let connects = ns.run(move || connect_round(&list, PER_ROUND))??;
    let reqs = requests(ns, targets, CONCURRENCY, REQUEST_RUN)?;
    if reqs.answered == 0 {
        bail!(
            "no request answered: {}",
            reqs.first_error.as_deref().unwrap_or("no error either")
        );
    }
    Ok((connects, reqs))
}

fn last_endpoints(ports: &[ServicePort]) -> Result<Vec<SocketAddr>> {
    let last = ports.last().context("no Services")?;
    Ok(last.endpoints.iter().map(|e| SocketAddr::V4(*e)).collect())
}
