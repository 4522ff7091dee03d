//! `cargo xtask run` with no arguments: the whole product on this kernel, in
//! network namespaces that are removed again at the end.
//!
//! client --cl0--> node (agent: TC on cl0, be0, be1) --> backend0, backend1
//! The manifests in examples/ define Service demo/web on 10.96.0.10.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Context, bail};
use proxy_tests::{
    agent::Agent,
    clients::{HttpConn, udp_exchange},
    netns::unique_prefix,
    servers::Servers,
    topology::{Topology, backend_iface, client_iface},
};

use crate::build::root;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: usize = 2;
const REQUESTS: usize = 200;

pub fn run(agent: &Path, probe: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let examples = root().join("examples");
    println!("demo: building namespaces: client, node, {BACKENDS} backends");
    let topology = Topology::build(&unique_prefix("demo"), BACKENDS)?;
    let _servers = (0..BACKENDS)
        .map(|i| Servers::start(&topology.backends[i], &format!("backend{i}"), 8080, 5353))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut ifaces = vec![client_iface().to_string()];
    ifaces.extend((0..BACKENDS).map(backend_iface));
    println!(
        "demo: starting proxy-agent in the node with --manifests {}",
        examples.display()
    );
    let agent = Agent::start_binary(agent.to_path_buf(), &topology.node, &examples, &ifaces)?;
    print!("{}", indent(&agent.log()));
    let http = spread("HTTP GET http://10.96.0.10/", REQUESTS, || {
        let mut conn = HttpConn::connect(
            &topology.client,
            SocketAddrV4::new(VIP, 80),
            Duration::from_secs(2),
        )?;
        conn.get()
    })?;
    let udp = spread("UDP 10.96.0.10:53", REQUESTS, || {
        udp_exchange(
            &topology.client,
            SocketAddrV4::new(VIP, 53),
            "ping",
            Duration::from_secs(1),
        )
        .map(|(n, _)| n)
    })?;
    let local = host_network_clients(&agent, &topology, probe)?;
    let services = agent.pins().join("lb4_services");
    println!("demo: bpftool map dump pinned {}", services.display());
    match std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&services)
        .output()
    {
        Ok(out) => print!("{}", indent(&String::from_utf8_lossy(&out.stdout))),
        Err(e) => println!("      (bpftool: {e})"),
    }
    drop(agent);
    drop(topology);
    println!("demo: removed the agent's pins and links, its bpffs and the namespaces");
    if http.len() < BACKENDS || udp.len() < BACKENDS || local.len() < BACKENDS {
        bail!("not every backend was reached");
    }
    Ok(())
}

/// A process on the node itself connects to the ClusterIP: the socket hooks
/// give each connect() a backend, and getpeername() shows the Service. The
/// process runs in the agent's cgroup (the demo's hooks serve only that
/// cgroup, not the rest of this machine).
fn host_network_clients(
    agent: &Agent,
    topology: &Topology,
    probe: &Path,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let lines =
        agent
            .cgroup()
            .probe_with(probe, &topology.node, &["tcp", "10.96.0.10:80", "40"])?;
    let mut counts = BTreeMap::new();
    let mut peers = BTreeMap::new();
    for line in &lines {
        if line["ok"] != true {
            bail!("a host-network connect() failed: {line}");
        }
        let name = line["backend"].as_str().unwrap_or_default().to_string();
        *counts.entry(name).or_insert(0) += 1;
        *peers
            .entry(line["peer"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    println!(
        "demo: {} x connect() to 10.96.0.10:80 from a process on the node (socket hooks):",
        lines.len()
    );
    for (name, count) in &counts {
        println!(
            "      {name:<10} {count:>4}  {}",
            "#".repeat(count * 40 / lines.len().max(1))
        );
    }
    for (peer, count) in &peers {
        println!("      getpeername() = {peer} ({count} times)");
    }
    Ok(counts)
}

/// Sends `n` requests and prints how they spread over the backends.
fn spread(
    what: &str,
    n: usize,
    mut request: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let name = request().with_context(|| format!("{what}: request {i}"))?;
        *counts.entry(name).or_insert(0) += 1;
    }
    println!("demo: {n} x {what} (a new connection or socket each):");
    for (name, count) in &counts {
        let bar = "#".repeat(count * 40 / n);
        println!("      {name:<10} {count:>4}  {bar}");
    }
    Ok(counts)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("      {l}\n")).collect()
}
