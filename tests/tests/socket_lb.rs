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
    manifests::{self, HTTP_NODE_PORT, HTTP_PORT, ManifestFile, NODE_ADDR, UDP_PORT, VIP, VIP6},
    netns::{Netns, unique_prefix},
    privilege::require_root,
    servers::Servers,
    topology::Topology,
};
use serde_json::Value;

const ECONNREFUSED: i64 = 111;

/// Fields drop in order: the agent is cleaned up while its node exists.
struct Lab {
    agent: Agent,
    servers: Vec<Servers>,
    manifest: ManifestFile,
    topology: Topology,
}

impl Lab {
    fn start(tag: &str, backends: usize, manifest: &str) -> anyhow::Result<Lab> {
        let topology = Topology::build(&unique_prefix(tag), backends)?;
        let servers = topology.start_servers()?;
        let manifest = ManifestFile::new(topology.prefix(), manifest)?;
        let agent = Agent::start(&topology.node, manifest.path(), &[])?;
        Ok(Lab {
            topology,
            servers,
            manifest,
            agent,
        })
    }

    fn probe(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        self.agent.cgroup().probe(ns, args)
    }
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
            let seen = proxy_tests::cgroup::backends(&out)
                .with_context(|| format!("{who} {mode} {target}"))?;
            ensure!(
                seen == all_backends(2),
                "{who} {mode} {target} reached {seen:?}"
            );
            // The application sees the Service, not the pod it talks to.
            let peers = proxy_tests::cgroup::peers(&out);
            ensure!(
                peers == BTreeSet::from([target.to_string()]),
                "{who} {mode} {target}: getpeername/recvfrom showed {peers:?}"
            );
        }
    }
    // An unconnected UDP socket: every reply comes from the Service, and its
    // datagrams stay with one backend, as a conntrack'ed flow would.
    let out = lab.probe(pod, &["udp-unconnected", &udp, "10"])?;
    let seen = proxy_tests::cgroup::backends(&out)?;
    ensure!(seen.len() == 1, "one unconnected socket reached {seen:?}");
    ensure!(
        proxy_tests::cgroup::peers(&out) == BTreeSet::from([udp.clone()]),
        "{out:?}"
    );
    let counters = lab.agent.counters()?;
    ensure!(
        counters.get("sock_connect").copied().unwrap_or(0) > 2 * (20 + 20 + 12 + 12),
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
    let seen = proxy_tests::cgroup::backends(&out)?;
    ensure!(
        seen == all_backends(2),
        "a host-network client reached {seen:?}"
    );
    ensure!(
        proxy_tests::cgroup::peers(&out) == BTreeSet::from([node_port.clone()]),
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
        .arg(lab.manifest.path())
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
    ensure!(
        proxy_tests::cgroup::backends(&out)? == all_backends(1),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn socket_lb_off_attaches_no_socket_hooks_and_retires_old_ones() -> anyhow::Result<()> {
    if !require_root("socket_lb::socket_lb_off_attaches_no_socket_hooks_and_retires_old_ones") {
        return Ok(());
    }
    let mut lab = Lab::start("skf", 1, &manifests::web(&[0]))?;
    let hooks = |agent: &Agent| -> Vec<String> {
        let names = std::fs::read_dir(agent.pins()).into_iter().flatten();
        names
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("link_sock_"))
            .collect()
    };
    ensure!(hooks(&lab.agent).len() == 8, "{:?}", hooks(&lab.agent));
    lab.agent.stop()?;
    let restarted = Agent::start_flags(
        &lab.topology.node,
        lab.manifest.path(),
        &[],
        &["--socket-lb=false"],
    )?;
    ensure!(hooks(&restarted).is_empty(), "{:?}", hooks(&restarted));
    let target = format!("{VIP}:{HTTP_PORT}");
    let out = restarted
        .cgroup()
        .probe(&lab.topology.node, &["tcp", &target, "1"])?;
    ensure!(out.len() == 1 && out[0]["ok"] == false, "{out:?}");
    drop(restarted);
    Ok(())
}

const ECONNABORTED: i64 = 103;
const ECONNRESET: i64 = 104;
/// How long the stale-socket probes run.
const RUN_MS: u64 = 4000;

/// A probe process started at `started`.
struct Running {
    child: std::process::Child,
    started: Instant,
}

impl Running {
    /// Its lines, and the removal's time on its clock. The probe's clock
    /// starts a little after `started` (nsenter and the probe still have to
    /// start): lines a moment before `at` may be after the removal.
    fn finish(self, removed_at: Instant) -> anyhow::Result<(Vec<Value>, u64)> {
        let at = removed_at.duration_since(self.started).as_millis() as u64;
        let output = self.child.wait_with_output().context("probe output")?;
        Ok((lines(&output)?, at))
    }
}

/// How much later than its spawn a probe's clock may start.
const PROBE_START_SLACK_MS: u64 = 200;

/// The backend each probe talked to before `at` (None: it was not yet
/// answering), checking it never changed before then.
fn backend_before(lines: &[Value], at: u64) -> anyhow::Result<Option<String>> {
    let surely_before = at.saturating_sub(PROBE_START_SLACK_MS);
    let before: BTreeSet<&str> = lines
        .iter()
        .filter(|l| l["t_ms"].as_u64().is_some_and(|t| t < surely_before) && l["ok"] == true)
        .filter_map(|l| l["backend"].as_str())
        .collect();
    ensure!(before.len() <= 1, "moved before the removal: {before:?}");
    Ok(before.into_iter().next().map(str::to_string))
}

#[test]
fn a_backend_that_leaves_takes_its_sockets_with_it() -> anyhow::Result<()> {
    if !require_root("socket_lb::a_backend_that_leaves_takes_its_sockets_with_it") {
        return Ok(());
    }
    let lab = Lab::start("sks", 3, &manifests::web(&[0, 1, 2]))?;
    let spawn = |mode: &str, target: String| -> anyhow::Result<Running> {
        let ms = RUN_MS.to_string();
        let child = lab
            .agent
            .cgroup()
            .spawn_probe(&lab.topology.client, &[mode, &target, &ms])?;
        Ok(Running {
            child,
            started: Instant::now(),
        })
    };
    let mut streams = Vec::new();
    for _ in 0..6 {
        streams.push(spawn("udp-stream", format!("{VIP}:{UDP_PORT}"))?);
    }
    let mut holds = Vec::new();
    for _ in 0..12 {
        holds.push(spawn("tcp-hold", format!("{VIP}:{HTTP_PORT}"))?);
    }
    std::thread::sleep(Duration::from_millis(800));
    let datagrams: Vec<usize> = lab.servers.iter().map(Servers::datagrams).collect();
    std::thread::sleep(Duration::from_millis(200));
    // A backend that has both a UDP stream and a TCP connection now.
    let victim = (0..3)
        .find(|i| lab.servers[*i].datagrams() > datagrams[*i] && lab.servers[*i].connections() > 0)
        .context("no backend has both a stream and a connection")?;
    let others: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    lab.manifest.write(&manifests::web(&others))?;
    let removed_at = Instant::now();
    let victim_name = format!("backend{victim}");

    let (mut moved, mut reset) = (0, 0);
    for stream in streams {
        let (out, at) = stream.finish(removed_at)?;
        let before = backend_before(&out, at)?;
        let after: Vec<&Value> = out
            .iter()
            .filter(|l| {
                l["t_ms"]
                    .as_u64()
                    .is_some_and(|t| t >= at.saturating_sub(PROBE_START_SLACK_MS))
            })
            .collect();
        let last = after
            .last()
            .with_context(|| format!("stream ended early: {out:?}"))?;
        ensure!(
            last["ok"] == true && last["backend"] != victim_name.as_str(),
            "a stream ended on {last}"
        );
        if before.as_deref() != Some(victim_name.as_str()) {
            ensure!(
                after
                    .iter()
                    .all(|l| l["ok"] == true && l["backend"] == before.as_deref().unwrap_or("")),
                "a stream on a staying backend was disturbed: {after:?}"
            );
            continue;
        }
        // Within 1 s of the manifest change the stream answers from a live
        // backend, after its socket was destroyed and it reconnected.
        let first_live = after
            .iter()
            .find(|l| l["ok"] == true && l["backend"] != victim_name.as_str())
            .and_then(|l| l["t_ms"].as_u64())
            .context("never moved")?;
        ensure!(
            first_live.saturating_sub(at) < 1000,
            "the stream moved {} ms after the removal: {after:?}",
            first_live.saturating_sub(at)
        );
        // A destroyed UDP socket is disconnected: its next send fails
        // (EDESTADDRREQ, or ECONNABORTED on a receive).
        ensure!(
            after.iter().any(|l| l["ok"] == false),
            "the old socket was not destroyed: {after:?}"
        );
        moved += 1;
    }
    for hold in holds {
        let (out, at) = hold.finish(removed_at)?;
        let before = backend_before(&out, at)?;
        let last = out.last().context("no output")?;
        if before.as_deref() != Some(victim_name.as_str()) {
            ensure!(
                last["ok"] == true,
                "a connection to a staying backend ended: {last}"
            );
            continue;
        }
        let errno = last["errno"].as_i64();
        ensure!(
            errno == Some(ECONNABORTED) || errno == Some(ECONNRESET),
            "a connection to the removed backend ended with {last}"
        );
        let when = last["t_ms"].as_u64().unwrap_or(u64::MAX);
        ensure!(
            when.saturating_sub(at) < 1000,
            "reset {} ms after the removal",
            when - at
        );
        reset += 1;
    }
    ensure!(moved > 0 && reset > 0, "moved {moved}, reset {reset}");
    ensure!(
        lab.agent.log().contains("destroyed "),
        "{}",
        lab.agent.log()
    );
    Ok(())
}

/// A Service address and backend port no other test uses: hooks at the
/// machine's root see every test's sockets.
const MACHINE_WIDE_VIP: &str = "10.96.251.7";

#[test]
fn by_default_the_hooks_serve_every_cgroup_of_the_machine() -> anyhow::Result<()> {
    if !require_root("socket_lb::by_default_the_hooks_serve_every_cgroup_of_the_machine") {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("skm"), 1)?;
    let _servers = topology.start_servers()?;
    let manifest = ManifestFile::new(
        topology.prefix(),
        &manifests::web(&[0]).replace(&VIP.to_string(), MACHINE_WIDE_VIP),
    )?;
    let agent = Agent::start_machine_wide(&topology.node, manifest.path())?;
    let root = agent_cgroup_root(&agent)?;
    // Attached where /proc/self/mountinfo shows the hierarchy's root...
    let tree = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&root)
        .output()
        .context("bpftool cgroup show")?;
    let tree = String::from_utf8_lossy(&tree.stdout);
    for hook in [
        "connect4",
        "connect6",
        "sendmsg4",
        "recvmsg6",
        "getpeername4",
    ] {
        ensure!(
            tree.contains(hook),
            "no {hook} at {}:\n{tree}",
            root.display()
        );
    }
    // ...so a process in a cgroup the agent was never told about is served.
    let elsewhere = proxy_tests::cgroup::Cgroup::create(&format!("{}-other", topology.prefix()))?;
    let target = format!("{MACHINE_WIDE_VIP}:{HTTP_PORT}");
    let out = elsewhere.probe(&topology.client, &["tcp", &target, "3"])?;
    ensure!(
        proxy_tests::cgroup::backends(&out)? == all_backends(1),
        "{out:?}"
    );
    ensure!(
        proxy_tests::cgroup::peers(&out) == BTreeSet::from([target]),
        "{out:?}"
    );
    drop(agent);
    // cleanup detached them.
    let after = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&root)
        .output()
        .context("bpftool cgroup show")?;
    ensure!(
        !String::from_utf8_lossy(&after.stdout).contains("xdproxy"),
        "left behind: {}",
        String::from_utf8_lossy(&after.stdout)
    );
    Ok(())
}

/// The cgroup the agent logged attaching at.
fn agent_cgroup_root(agent: &Agent) -> anyhow::Result<PathBuf> {
    let log = agent.log();
    let line = log
        .lines()
        .find_map(|l| l.split("socket hooks attached at cgroup ").nth(1))
        .with_context(|| format!("no attach line in:\n{log}"))?;
    let root = PathBuf::from(line.trim());
    ensure!(
        root == proxy_tests::cgroup::mount()?,
        "attached at {}, not the hierarchy's root",
        root.display()
    );
    Ok(root)
}
