//! The agent killed, restarted and replaced under continuous traffic: no
//! request fails and every open connection and UDP flow keeps its backend.

mod common;

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context;
use proxy_tests::{
    agent::Agent,
    clients::{HttpConn, UdpFlow},
    manifests::{self, HTTP_PORT, UDP_PORT, VIP},
    netns::{Netns, unique_prefix},
    servers::Servers,
    topology::{Topology, backend_iface, client_iface},
};

const OPEN_TCP: usize = 20;
const OPEN_UDP: usize = 10;
const BACKENDS: usize = 3;
/// How long traffic runs between steps (the agent is down for one of them).
const STEP: Duration = Duration::from_millis(400);

/// What the traffic thread saw.
#[derive(Debug, Default)]
struct Seen {
    requests: usize,
    new_connections: usize,
    failures: Vec<String>,
}

/// Long-lived TCP connections and UDP flows, each with the backend it
/// started on.
struct Open {
    tcp: Vec<(HttpConn, String)>,
    udp: Vec<(UdpFlow, String)>,
}

fn open(client: &Netns) -> anyhow::Result<Open> {
    let vip = SocketAddrV4::new(VIP, HTTP_PORT);
    let mut tcp = Vec::new();
    for _ in 0..OPEN_TCP {
        let mut conn = HttpConn::connect(client, vip, Duration::from_secs(2))?;
        let backend = conn.get()?;
        tcp.push((conn, backend));
    }
    let mut udp = Vec::new();
    for i in 0..OPEN_UDP {
        let mut flow = UdpFlow::open(client, SocketAddrV4::new(VIP, UDP_PORT))?;
        let (backend, _) = flow.exchange(&format!("hello{i}"))?;
        udp.push((flow, backend));
    }
    Ok(Open { tcp, udp })
}

/// Keeps every open connection and flow busy and opens a new connection per
/// round, from inside the client namespace, until `stop`.
fn traffic(
    client: &Netns,
    mut open: Open,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<Seen>> {
    client.spawn(move || {
        let mut seen = Seen::default();
        let mut round = 0;
        while !stop.load(Ordering::SeqCst) {
            round += 1;
            for (conn, backend) in &mut open.tcp {
                check(&mut seen, "open TCP connection", conn.get(), backend);
            }
            for (flow, backend) in &mut open.udp {
                let answer = flow.exchange(&format!("r{round}")).map(|(name, _)| name);
                check(&mut seen, "UDP flow", answer, backend);
            }
            seen.new_connections += 1;
            let fresh =
                HttpConn::connect_here(SocketAddrV4::new(VIP, HTTP_PORT), Duration::from_secs(2))
                    .and_then(|mut conn| conn.get());
            if let Err(e) = fresh {
                seen.failures.push(format!("new connection: {e:#}"));
            }
        }
        seen
    })
}

fn check(seen: &mut Seen, what: &str, answer: anyhow::Result<String>, backend: &str) {
    seen.requests += 1;
    match answer {
        Ok(name) if name == backend => {}
        Ok(name) => seen
            .failures
            .push(format!("{what} moved from {backend} to {name}")),
        Err(e) => seen.failures.push(format!("{what} to {backend}: {e:#}")),
    }
}

/// A copy of the agent binary under another name: what an upgrade puts in place.
fn rebuilt_binary(scratch: &std::path::Path) -> anyhow::Result<PathBuf> {
    let copy = scratch.join("proxy-agent-upgrade");
    std::fs::copy(proxy_tests::agent::binary()?, &copy).context("copying the agent binary")?;
    Ok(copy)
}

#[test]
fn killing_restarting_and_replacing_the_agent_drops_nothing() -> anyhow::Result<()> {
    if !common::ready("killing_restarting_and_replacing_the_agent_drops_nothing") {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("rst"), BACKENDS)?;
    topology.finish_checksums_on_node_egress()?;
    let _servers = (0..BACKENDS)
        .map(|i| Servers::start(&topology.backends[i], &format!("backend{i}"), 8080, 5353))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let scratch = std::env::temp_dir().join(format!("xdproxy-restart-{}", topology.prefix()));
    std::fs::create_dir_all(&scratch)?;
    let manifest = scratch.join("web.yaml");
    manifests::write(&manifest, &manifests::web(&[0, 1, 2]))?;
    let mut ifaces = vec![client_iface().to_string()];
    ifaces.extend((0..BACKENDS).map(backend_iface));
    let mut agent = Agent::start(&topology.node, &manifest, &ifaces)?;

    let stop = Arc::new(AtomicBool::new(false));
    let runner = traffic(&topology.client, open(&topology.client)?, stop.clone())?;
    thread::sleep(STEP);
    agent.kill()?;
    thread::sleep(STEP);
    agent.restart(None)?;
    thread::sleep(STEP);
    let upgrade = rebuilt_binary(&scratch)?;
    let status = agent.stop()?;
    assert!(status.success(), "SIGTERM exit: {status}");
    agent.restart(Some(upgrade))?;
    thread::sleep(STEP);
    stop.store(true, Ordering::SeqCst);
    let seen = runner
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?;

    let log = agent.log();
    // The agent's own clean-up runs its binary, which lives in scratch.
    drop(agent);
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        seen.failures.is_empty(),
        "{} failures, first: {:?}",
        seen.failures.len(),
        seen.failures.first()
    );
    assert!(
        seen.requests > 100 && seen.new_connections > 10,
        "too little traffic to prove anything: {seen:?}"
    );
    assert_eq!(
        log.matches("replaced the tc program on cl0 atomically")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("adopting").count(),
        4,
        "maps and entries adopted twice: {log}"
    );
    let syncs: Vec<&str> = log.lines().filter(|l| l.contains("synced:")).collect();
    assert_eq!(syncs.len(), 3, "{log}");
    for line in &syncs[1..] {
        assert!(
            line.contains("(0 map writes)"),
            "a restart with nothing changed writes nothing: {line}"
        );
    }
    println!("restart: {seen:?}");
    Ok(())
}
