//! `cargo xtask bench` (socket hooks): what connect() to a ClusterIP costs
//! through the cgroup socket hooks, next to connect() straight to the
//! backend, with real TCP sockets between two network namespaces.
//!
//! Three ways, measured in alternating rounds in one run (this VM is
//! noisy): straight to the backend from a process the hooks do not serve
//! (no hooks at all), straight to the backend from a process they serve
//! (the hooks run and find no Service: what every other connect() on a
//! node pays), and to the ClusterIP through the hooks. Each connection is
//! opened, then closed with a RST (SO_LINGER 0) so no TIME_WAIT builds up.

use std::{fs, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use proxy_tests::{
    agent::Agent,
    cgroup,
    connrate::{ShortServer, connect_round, quantile},
    manifests::{self, BACKEND_HTTP_PORT, HTTP_PORT, VIP},
    netns::{Netns, unique_prefix},
    topology::{Topology, backend_addr},
};

const ROUNDS: usize = 7;
const PER_ROUND: usize = 2000;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Direct,
    DirectHooked,
    ClusterIp,
}

impl Way {
    const ALL: [Way; 3] = [Way::Direct, Way::DirectHooked, Way::ClusterIp];

    fn name(self) -> &'static str {
        match self {
            Way::Direct => "backend, no hooks",
            Way::DirectHooked => "backend, hooks attached",
            Way::ClusterIp => "ClusterIP via hooks",
        }
    }
}

fn main() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("cargo xtask bench (socket hooks)") {
        bail!("the benchmark needs root");
    }
    let topology = Topology::build(&unique_prefix("bsk"), 1)?;
    let _server = ShortServer::start(&topology.backends[0], BACKEND_HTTP_PORT, 2)?;
    let dir = std::env::temp_dir().join(format!("xdproxy-{}", topology.prefix()));
    fs::create_dir_all(&dir).context("manifest dir")?;
    let manifest = dir.join("web.yaml");
    manifests::write(&manifest, &manifests::web(&[0]))?;
    let agent = Agent::start(&topology.node, &manifest, &[])?;
    let home = cgroup::current()?;
    let result = measure(&topology.node, &agent, &home);
    // Out of the agent's cgroup before it is removed.
    let back = cgroup::enter(&home);
    drop(agent);
    back?;
    print(&result?);
    Ok(())
}

/// Connect latencies (sorted) and connections per second of each round.
struct Samples {
    latencies: Vec<Duration>,
    rates: Vec<f64>,
}

fn measure(node: &Netns, agent: &Agent, home: &Path) -> anyhow::Result<Vec<Samples>> {
    let hooked = agent.cgroup().path().to_path_buf();
    let mut samples: Vec<Samples> = Way::ALL
        .iter()
        .map(|_| Samples {
            latencies: Vec::new(),
            rates: Vec::new(),
        })
        .collect();
    for _ in 0..ROUNDS {
        for (i, way) in Way::ALL.iter().enumerate() {
            // A socket is served by the cgroup of the process that made it.
            cgroup::enter(if *way == Way::Direct { home } else { &hooked })?;
            let target = match way {
                Way::ClusterIp => SocketAddr::from((VIP, HTTP_PORT)),
                _ => SocketAddr::from((backend_addr(0), BACKEND_HTTP_PORT)),
            };
            let round = node.run(move || connect_round(&[target], PER_ROUND))??;
            samples[i].rates.push(round.per_second());
            samples[i].latencies.extend(round.latencies);
        }
    }
    cgroup::enter(home)?;
    for s in &mut samples {
        s.latencies.sort();
        s.rates.sort_by(f64::total_cmp);
    }
    Ok(samples)
}

fn print(samples: &[Samples]) {
    println!(
        "\nconnect() through the socket hooks: {ROUNDS} alternating rounds of {PER_ROUND} \
         TCP connections, node namespace -> backend namespace over a veth"
    );
    println!(
        "{:<26} {:>14} {:>20} {:>10} {:>10}",
        "target", "conn/s median", "conn/s range", "p50", "p99"
    );
    for (way, s) in Way::ALL.iter().zip(samples) {
        let (lo, hi) = (
            s.rates.first().copied().unwrap_or(0.0),
            s.rates.last().copied().unwrap_or(0.0),
        );
        println!(
            "{:<26} {:>14.0} {:>20} {:>10.1?} {:>10.1?}",
            way.name(),
            s.rates.get(s.rates.len() / 2).copied().unwrap_or(0.0),
            format!("{lo:.0}..{hi:.0}"),
            quantile(&s.latencies, 0.5),
            quantile(&s.latencies, 0.99),
        );
    }
    let p50 = |i: usize| quantile(&samples[i].latencies, 0.5).as_secs_f64();
    if p50(0) > 0.0 {
        println!(
            "ClusterIP connect p50 / direct p50: {:.2}x (target: within 1.2x); hooks on a \
             non-Service connect: {:.2}x",
            p50(2) / p50(0),
            p50(1) / p50(0)
        );
    }
}
