//! `cargo xtask bench` (side by side): kube-proxy's rule sets next to
//! xdproxy, at 10, 1,000 and 10,000 Services of 10 endpoints each.
//!
//! Measured so far: the time to program every Service from nothing, as a
//! first full sync does: `iptables-restore` (legacy and nft) and `nft -f`
//! of the rules kube-proxy's iptables and nftables modes write (see
//! `proxy_tests::kubeproxy`), each into a fresh namespace, and xdproxy's
//! reconciler writing the same Services into freshly created maps (the
//! programs verified beforehand, as the restore tools' kernels need no
//! verifying), in alternation, the median and range of several rounds.
//! The control bench gives xdproxy's start to synced, which adds loading
//! the programs and listing from the API server. Writes a Markdown table
//! to `target/bench/side-by-side.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use common::Loaded;
use proxy_agent::model::{Desired, Frontend, FrontendState, ObjectKey, Protocol, Scope};
use proxy_tests::{
    kubeproxy::{Mode, ServicePort},
    manifests::nth_vip,
    netns::{Netns, unique_prefix},
};

const SCALES: [usize; 3] = [10, 1_000, 10_000];
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
    let mut table = Vec::new();
    for services in SCALES {
        let ports = service_ports(services);
        let rules: Vec<(Mode, String)> = Mode::ALL.iter().map(|m| (*m, m.rules(&ports))).collect();
        let desired = desired(&ports);
        let mut times: Vec<Samples> = vec![Samples::default(); rules.len()];
        let mut ours = Samples::default();
        for round in 0..rounds(services) {
            let took =
                xdproxy(&desired).with_context(|| format!("xdproxy at {services} Services"))?;
            eprintln!("{services} Services, round {round}: xdproxy programmed in {took:.2?}");
            ours.times.push(took);
            for (i, (mode, text)) in rules.iter().enumerate() {
                // One that did not finish is not tried again at this scale.
                if times[i].unfinished {
                    continue;
                }
                let ns = Netns::create(&unique_prefix("sbs"))?;
                match mode
                    .load(&ns, text, LIMIT)
                    .with_context(|| format!("{} at {services} Services", mode.name()))?
                {
                    Some(took) => {
                        eprintln!(
                            "{services} Services, round {round}: {} programmed in {took:.2?}",
                            mode.name()
                        );
                        times[i].times.push(took);
                    }
                    None => {
                        eprintln!(
                            "{services} Services, round {round}: {} had not finished after {LIMIT:?}",
                            mode.name()
                        );
                        times[i].unfinished = true;
                    }
                }
            }
        }
        table.push((services, "xdproxy", ours));
        for ((mode, _), samples) in rules.iter().zip(times) {
            table.push((services, mode.name(), samples));
        }
    }
    let report = markdown(&table);
    println!("\n{report}");
    let path = out_dir()?.join("side-by-side.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("written to {}", path.display());
    Ok(())
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

/// How long one load may take before it is given up.
const LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Default)]
struct Samples {
    times: Vec<Duration>,
    /// A load did not finish within `LIMIT`.
    unfinished: bool,
}

impl Samples {
    /// Median (range), or how long it had run when given up.
    fn cell(&self) -> String {
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

fn markdown(rows: &[(usize, &str, Samples)]) -> String {
    let mut out = String::from(
        "Time to program every Service from nothing (10 endpoints each), median (range)\n\n\
         | Services | mode | time to program |\n|---|---|---|\n",
    );
    for (services, mode, samples) in rows {
        let _ = writeln!(out, "| {services} | {mode} | {} |", samples.cell());
    }
    out
}

fn out_dir() -> anyhow::Result<PathBuf> {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tests.parent().unwrap_or(&tests).join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
