//! Socket-level load balancing: real sockets of processes in the agent's
//! cgroup, on the node itself (host network) and in a pod's namespace,
//! served at connect()/sendmsg() time by the cgroup hooks.
//!
//! The node has no interface hooks here (no `--iface`, and no default
//! route for `auto` to find), so whatever reaches a backend through a
//! Service address was translated by the socket hooks.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use proxy_tests::{
    agent::{Agent, NODE_NAME},
    cgroup::lines,
    manifests::{self, HTTP_NODE_PORT, HTTP_PORT, NODE_ADDR, UDP_PORT, VIP, VIP6},
    netns::{Netns, unique_prefix},
    privilege::require_root,
    servers::Servers,
    topology::Topology,
};
use serde_json::Value;

const ECONNREFUSED: i64 = 111;

struct Lab {
    topology: Topology,
    servers: Vec<Servers>,
    manifest: PathBuf,
    agent: Agent,
}

impl Lab {
    fn start(tag: &str, backends: usize, manifest: &str) -> anyhow::Result<Lab> {
        let topology = Topology::build(&unique_prefix(tag), backends)?;
        let servers = (0..backends)
            .map(|i| Servers::start(&topology.backends[i], &format!("backend{i}"), 8080, 5353))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let dir = std::env::temp_dir().join(format!("xdproxy-{}", topology.prefix()));
        std::fs::create_dir_all(&dir).context("manifest dir")?;
        let path = dir.join("web.yaml");
        manifests::write(&path, manifest)?;
        let agent = Agent::start(&topology.node, &path, &[])?;
        Ok(Lab {
            topology,
            servers,
            manifest: path,
            agent,
        })
    }

    fn probe(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        self.agent.cgroup().probe(ns, args)
    }
}

/// Every line succeeded; the backends that answered.
fn backends_of(lines: &[Value]) -> anyhow::Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for line in lines {
        ensure!(line["ok"] == true, "probe failed: {line}");
        seen.insert(line["backend"].as_str().unwrap_or_default().to_string());
    }
    Ok(seen)
}

fn peers_of(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|l| l["peer"].as_str().map(str::to_string))
        .collect()
}

fn all_backends(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("backend{i}")).collect()
}

#[test]
fn host_and_pod_sockets_reach_every_backend_and_see_the_service() -> anyhow::Result<()> {
    if !require_root("socket_lb::host_and_pod_sockets_reach_every_backend_and_see_the_service") {
        return Ok(());
    }
    let lab = Lab::start("skh", 2, &manifests::web_dual_stack(&[0, 1]))?;
    let (node, pod) = (&lab.topology.node, &lab.topology.client);
    let tcp = format!("{VIP}:{HTTP_PORT}");
    let udp = format!("{VIP}:{UDP_PORT}");
    let tcp6 = format!("[{VIP6}]:{HTTP_PORT}");
    let udp6 = format!("[{VIP6}]:{UDP_PORT}");
    for (who, ns) in [("host network", node), ("pod", pod)] {
        let runs = [
            ("tcp", tcp.as_str(), 20),
            ("udp", udp.as_str(), 20),
            ("tcp", tcp6.as_str(), 12),
            ("udp", udp6.as_str(), 12),
        ];
        for (mode, target, count) in runs {
            let out = lab.probe(ns, &[mode, target, &count.to_string()])?;
            ensure!(out.len() == count, "{who} {mode} {target}: {out:?}");
            let seen = backends_of(&out).with_context(|| format!("{who} {mode} {target}"))?;
            ensure!(
                seen == all_backends(2),
                "{who} {mode} {target} reached {seen:?}"
            );
            // The application sees the Service, not the pod it talks to.
            let peers = peers_of(&out);
            ensure!(
                peers == BTreeSet::from([target.to_string()]),
                "{who} {mode} {target}: getpeername/recvfrom showed {peers:?}"
            );
        }
    }
    // An unconnected UDP socket: every reply comes from the Service, and its
    // datagrams stay with one backend, as a conntrack'ed flow would.
    let out = lab.probe(pod, &["udp-unconnected", &udp, "10"])?;
    let seen = backends_of(&out)?;
    ensure!(seen.len() == 1, "one unconnected socket reached {seen:?}");
    ensure!(peers_of(&out) == BTreeSet::from([udp.clone()]), "{out:?}");
    let counters = lab.agent.counters()?;
    ensure!(
        counters.get("sock_connect").copied().unwrap_or(0) >= 2 * (20 + 20 + 12 + 12) + 1,
        "{counters:?}"
    );
    Ok(())
}

#[test]
fn a_service_without_endpoints_refuses_at_once() -> anyhow::Result<()> {
    if !require_root("socket_lb::a_service_without_endpoints_refuses_at_once") {
        return Ok(());
    }
    let lab = Lab::start("skr", 1, &manifests::web(&[]))?;
    for mode in ["tcp", "udp"] {
        let target = match mode {
            "tcp" => format!("{VIP}:{HTTP_PORT}"),
            _ => format!("{VIP}:{UDP_PORT}"),
        };
        let started = Instant::now();
        let out = lab.probe(&lab.topology.client, &[mode, &target, "3"])?;
        for line in &out {
            ensure!(
                line["errno"].as_i64() == Some(ECONNREFUSED),
                "{mode}: {line}"
            );
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1),
            "{mode}: refusals took {:?}",
            started.elapsed()
        );
    }
    let counters = lab.agent.counters()?;
    ensure!(counters.get("sock_refused") == Some(&6), "{counters:?}");
    Ok(())
}

/// `web` as a NodePort Service with externalTrafficPolicy: Local, backend 0
/// on this node and backend 1 on another.
fn external_local_manifest() -> String {
    manifests::web_node_port(&[0, 1])
        .replace(
            "spec:\n  type: NodePort\n",
            "spec:\n  type: NodePort\n  externalTrafficPolicy: Local\n",
        )
        .replace(
            &format!(
                "[\"{}\"]\n    conditions: {{ready: true}}\n",
                proxy_tests::topology::backend_addr(0)
            ),
            &format!(
                "[\"{}\"]\n    conditions: {{ready: true}}\n    nodeName: {NODE_NAME}\n",
                proxy_tests::topology::backend_addr(0)
            ),
        )
        .replace(
            &format!(
                "[\"{}\"]\n    conditions: {{ready: true}}\n",
                proxy_tests::topology::backend_addr(1)
            ),
            &format!(
                "[\"{}\"]\n    conditions: {{ready: true}}\n    nodeName: elsewhere\n",
                proxy_tests::topology::backend_addr(1)
            ),
        )
}

#[test]
fn local_clients_of_external_local_node_ports_reach_every_endpoint() -> anyhow::Result<()> {
    if !require_root("socket_lb::local_clients_of_external_local_node_ports_reach_every_endpoint") {
        return Ok(());
    }
    let manifest = external_local_manifest();
    let lab = Lab::start("ske", 2, &manifest)?;
    let node_port = format!("{NODE_ADDR}:{HTTP_NODE_PORT}");
    let out = lab.probe(&lab.topology.node, &["tcp", &node_port, "24"])?;
    let seen = backends_of(&out)?;
    ensure!(
        seen == all_backends(2),
        "a host-network client reached {seen:?}"
    );
    ensure!(
        peers_of(&out) == BTreeSet::from([node_port.clone()]),
        "{out:?}"
    );
    // plan shows both: outside clients get backend 0 only.
    let plan = std::process::Command::new(proxy_tests::agent::binary()?)
        .args([
            "plan",
            "-o",
            "json",
            "--node-name",
            NODE_NAME,
            "--manifests",
        ])
        .arg(&lab.manifest)
        .output()
        .context("proxy-agent plan")?;
    let plan: Value = serde_json::from_slice(&plan.stdout).context("plan json")?;
    let rows: Vec<&Value> = plan["frontends"]
        .as_array()
        .context("frontends")?
        .iter()
        .filter(|f| f["scope"] == "NodePort" && f["protocol"] == "TCP")
        .collect();
    let backends = |clients: &str| -> Vec<String> {
        rows.iter()
            .filter(|f| f["clients"] == clients)
            .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect()
    };
    ensure!(backends("all") == vec!["10.1.1.2:8080"], "{rows:?}");
    ensure!(
        backends("local") == vec!["10.1.1.2:8080", "10.1.2.2:8080"],
        "{rows:?}"
    );
    drop(lab.servers);
    Ok(())
}

#[test]
fn sockets_outside_the_cgroup_are_not_touched() -> anyhow::Result<()> {
    if !require_root("socket_lb::sockets_outside_the_cgroup_are_not_touched") {
        return Ok(());
    }
    let lab = Lab::start("sko", 1, &manifests::web(&[0]))?;
    // The test's own process is not in the agent's cgroup: without
    // interface hooks nothing translates its connect(), and the node has
    // no route to the Service address.
    let target = format!("{VIP}:{HTTP_PORT}");
    let out = lines(
        &lab.topology
            .node
            .command(&proxy_tests::cgroup::probe_binary()?.display().to_string())
            .args(["tcp", &target, "1"])
            .output()
            .context("probe outside the cgroup")?,
    )?;
    ensure!(out.len() == 1 && out[0]["ok"] == false, "{out:?}");
    let out = lab.probe(&lab.topology.node, &["tcp", &target, "1"])?;
    ensure!(backends_of(&out)? == all_backends(1), "{out:?}");
    Ok(())
}

#[test]
fn socket_lb_off_attaches_no_socket_hooks_and_retires_old_ones() -> anyhow::Result<()> {
    if !require_root("socket_lb::socket_lb_off_attaches_no_socket_hooks_and_retires_old_ones") {
        return Ok(());
    }
    let mut lab = Lab::start("skf", 1, &manifests::web(&[0]))?;
    let hooks = |agent: &Agent| -> Vec<String> {
        agent
            .link_pins()
            .into_iter()
            .filter(|n| n.starts_with("link_sock_"))
            .collect()
    };
    ensure!(hooks(&lab.agent).len() == 8, "{:?}", lab.agent.link_pins());
    lab.agent.stop()?;
    let restarted = Agent::start_flags(
        &lab.topology.node,
        &lab.manifest,
        &[],
        &["--socket-lb=false"],
    )?;
    ensure!(hooks(&restarted).is_empty(), "{:?}", restarted.link_pins());
    let target = format!("{VIP}:{HTTP_PORT}");
    let out = restarted
        .cgroup()
        .probe(&lab.topology.node, &["tcp", &target, "1"])?;
    ensure!(out.len() == 1 && out[0]["ok"] == false, "{out:?}");
    drop(restarted);
    Ok(())
}
