//! `cargo xtask bench` (side by side): kube-proxy's rule sets next to
//! xdproxy and next to no proxy at all, at 10, 1,000 and 10,000 Services of
//! 10 endpoints each.
//!
//! Time to program every Service from nothing, as a first full sync does:
//! `iptables-restore --noflush` (legacy and nft) and `nft -f` of the rules
//! kube-proxy's iptables and nftables modes write (see
//! `proxy_tests::kubeproxy`), each into a fresh namespace, and xdproxy's
//! reconciler writing the same Services into freshly created maps (the
//! programs verified beforehand, as the restore tools' kernels need no
//! verifying), in alternation. The control bench gives xdproxy's start to
//! synced, which adds loading the programs and listing from the API server.
//!
//! Traffic through each (see `lanes`): new connections per second and
//! connect latency from one client, and requests per second from 50
//! concurrent short connections, to the last Service; the same from a
//! process on the node through xdproxy's socket hooks, next to that process
//! going straight to the endpoints. Writes a Markdown table and an SVG plot
//! to `target/bench/side-by-side.{md,svg}`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "sidebyside/lanes.rs"]
mod lanes;
#[path = "sidebyside/report.rs"]
mod report;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use common::Loaded;
use lanes::Lanes;
use proxy_agent::model::{Desired, Frontend, FrontendState, ObjectKey, Protocol, Scope};
use proxy_tests::{
    kubeproxy::{Mode, ServicePort},
    manifests::nth_vip,
    netns::{Netns, unique_prefix},
};

const SCALES: [usize; 3] = [10, 1_000, 10_000];

/// `SCALES`, or the comma-separated counts in `SIDE_BY_SIDE_SCALES` (for a
/// quick look at one scale).
fn scales() -> anyhow::Result<Vec<usize>> {
    match std::env::var("SIDE_BY_SIDE_SCALES") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse().with_context(|| format!("scale {n:?}")))
            .collect(),
        Err(_) => Ok(SCALES.to_vec()),
    }
}
const ENDPOINTS: u8 = 10;
/// Rounds per scale; fewer at the largest, where one nftables load takes
/// minutes.
fn rounds(services: usize) -> usize {
    if services >= 10_000 { 3 } else { 5 }
}

fn main() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("cargo xtask bench (side by side)") {
        bail!("the benchmark needs root");
    }
    let mut lanes = Lanes::build()?;
    let mut figures = Vec::new();
    for services in scales()? {
        let ports = service_ports(services);
        let program = time_to_program(&ports)?;
        lanes
            .program(&ports, &manifest(&ports))
            .with_context(|| format!("programming {services} Services"))?;
        let traffic = lanes.measure(&ports)?;
        figures.push(report::Scale {
            services,
            program,
            traffic,
        });
    }
    drop(lanes);
    let table = report::markdown(&figures);
    println!("\n{table}");
    let dir = out_dir()?;
    for (name, text) in [
        ("side-by-side.md", table),
        ("side-by-side.svg", report::svg(&figures)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// Time to program `ports` from nothing, each mode in a fresh namespace (or
/// fresh maps), in alternation.
fn time_to_program(ports: &[ServicePort]) -> anyhow::Result<Vec<(&'static str, Samples)>> {
    let services = ports.len();
    let rules: Vec<(Mode, String)> = Mode::ALL.iter().map(|m| (*m, m.rules(ports))).collect();
    let desired = desired(ports);
    let mut times: Vec<Samples> = vec![Samples::default(); rules.len()];
    let mut ours = Samples::default();
    for round in 0..rounds(services) {
        let took = xdproxy(&desired).with_context(|| format!("xdproxy at {services} Services"))?;
        eprintln!("{services} Services, round {round}: xdproxy programmed in {took:.2?}");
        ours.times.push(took);
        for (i, (mode, text)) in rules.iter().enumerate() {
            // One that did not finish is not tried again at this scale.
            if times[i].unfinished {
                continue;
            }
            let ns = Netns::create(&unique_prefix("sbs"))?;
            let name = mode.name();
            match mode
                .load(&ns, text, LIMIT)
                .with_context(|| format!("{name} at {services} Services"))?
            {
                Some(took) => {
                    eprintln!(
                        "{services} Services, round {round}: {name} programmed in {took:.2?}"
                    );
                    times[i].times.push(took);
                }
                None => {
                    eprintln!(
                        "{services} Services, round {round}: {name} had not finished after {LIMIT:?}"
                    );
                    times[i].unfinished = true;
                }
            }
        }
    }
    let mut out = vec![("xdproxy", ours)];
    out.extend(rules.iter().map(|(m, _)| m.name()).zip(times));
    Ok(out)
}

/// Service i: its cluster IP, port 80, and endpoints
/// 10.(100 + e).(i / 256).(i % 256):8080, as the control bench's.
fn service_ports(services: usize) -> Vec<ServicePort> {
    (0..services)
        .map(|i| ServicePort {
            namespace: "bench".into(),
            name: format!("svc{i}"),
            vip: nth_vip(i),
            port: 80,
            endpoints: (0..ENDPOINTS)
                .map(|e| {
                    let addr = Ipv4Addr::new(10, 100 + e, (i / 256 % 256) as u8, (i % 256) as u8);
                    SocketAddrV4::new(addr, 8080)
                })
                .collect(),
        })
        .collect()
}

/// xdproxy's reconciler writing `desired` into a datapath loaded afresh.
fn xdproxy(desired: &Desired) -> anyhow::Result<Duration> {
    let mut dp = Loaded::new()?;
    let started = Instant::now();
    dp.program(desired)?;
    Ok(started.elapsed())
}

/// The same Services as the model would give them to the reconciler.
fn desired(ports: &[ServicePort]) -> Desired {
    let mut out = Desired::default();
    for svc in ports {
        let frontend = Frontend {
            addr: IpAddr::V4(svc.vip),
            port: svc.port,
            protocol: Protocol::Tcp,
            clients: Default::default(),
        };
        let state = FrontendState {
            service: ObjectKey {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            },
            port_name: "http".into(),
            scope: Scope::ClusterIp,
            backends: svc.endpoints.iter().map(|e| SocketAddr::V4(*e)).collect(),
            ..FrontendState::default()
        };
        out.frontends.insert(frontend, state);
    }
    out
}

/// The same Services as manifest files for the agent.
fn manifest(ports: &[ServicePort]) -> String {
    let mut out = String::new();
    for svc in ports {
        let (ns, name) = (&svc.namespace, &svc.name);
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{clusterIP: \"{}\", ports: [{{name: http, protocol: TCP, port: {}, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n",
            svc.vip, svc.port
        );
        for e in &svc.endpoints {
            let _ = writeln!(
                out,
                "  - {{addresses: [\"{}\"], conditions: {{ready: true}}}}",
                e.ip()
            );
        }
        out.push_str("---\n");
    }
    out
}

/// How long one load may take before it is given up.
const LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default)]
pub struct Samples {
    times: Vec<Duration>,
    /// A load did not finish within `LIMIT`.
    unfinished: bool,
}

impl Samples {
    /// Median (range), or how long it had run when given up.
    pub fn cell(&self) -> String {
        if self.unfinished {
            return format!("> {LIMIT:.0?} (not finished)");
        }
        let mut times = self.times.clone();
        times.sort();
        match (times.first(), times.last()) {
            (Some(low), Some(high)) => {
                let median = times[times.len() / 2];
                format!("{median:.2?} ({low:.2?}..{high:.2?})")
            }
            _ => "-".into(),
        }
    }
}

fn out_dir() -> anyhow::Result<PathBuf> {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tests.parent().unwrap_or(&tests).join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
