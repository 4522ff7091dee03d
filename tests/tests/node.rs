//! The main end-to-end test: an emulated node ([`proxy_tests::node`]) with
//! every kind of client a node has, an agent that bootstraps from the API
//! server's direct address and then watches through the kubernetes Service
//! it programs itself, and real TCP and UDP traffic from every client to
//! every backend.
//!
//! `demo/web` (10.96.0.10, fd00:96::10, NodePorts 30080/30053) has
//! backends of every kind: a bridge pod, a routed pod, a routed pod created
//! after the agent started, and a pod elsewhere behind the router. It
//! balances round-robin, so a few consecutive flows reach every backend
//! and "reaches every backend" is exact, not a matter of luck.
//!
//! The agent runs with `--kube-apiserver http://10.0.8.2:6443` (the direct
//! address) and `--iface auto --iface 'veth*' --iface 'cali*' --iface cni0`;
//! `default/kubernetes` (10.96.0.1:443) points at the same server's other
//! address, 10.0.8.3:6443, so a test can take the direct address away from
//! the node (a prohibit route) and leave the Service working.

use std::{
    collections::BTreeSet,
    mem::ManuallyDrop,
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use proxy_tests::{
    agent::Agent,
    apiserver::ApiServer,
    cgroup::{Cgroup, lines, probe_binary},
    netns::{Netns, unique_prefix},
    node::{
        APISERVER_DIRECT, APISERVER_ENDPOINT, APISERVER_PORT, EmulatedNode, NODE_ADDR, NODE_ADDR6,
        REMOTE_ADDR, REMOTE_ADDR6, bridge_pod_addr, bridge_pod_addr6, routed_iface,
        routed_pod_addr, routed_pod_addr6,
    },
    privilege::require_root,
    servers::Servers,
};
use serde_json::{Value, json};

const NODE: &str = "node-1";
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// `demo/bridge`: only the bridge backend, for the bridge case.
const BRIDGE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const BRIDGE_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
const KUBERNETES_VIP: &str = "10.96.0.1:443";
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const HTTP_NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const BACKEND_HTTP_PORT: u16 = 8080;
const BACKEND_UDP_PORT: u16 = 5353;
/// The interfaces as the DaemonSet names them: the uplinks, the bridge
/// CNI's bridge and ports, the routed CNI's veths.
const IFACES: [&str; 4] = ["auto", "veth*", "cali*", "cni0"];
/// What the agent logs when its watches have moved to the Service.
const MOVED: &str = "API server: now through the kubernetes Service 10.96.0.1:443";
/// A new interface is served within this (the 1 s, plus room for
/// this test's own `ip` commands on a loaded machine).
const ATTACHED_WITHIN: Duration = Duration::from_millis(1500);

const BRIDGE_BACKEND: &str = "bridge-pod";
const ROUTED_BACKEND: &str = "routed-pod";
const LATE_BACKEND: &str = "late-pod";
const REMOTE_BACKEND: &str = "remote";

fn apiserver_url() -> String {
    format!("http://{APISERVER_DIRECT}:{APISERVER_PORT}")
}

/// A backend of `demo/web`: its server's name and addresses.
#[derive(Clone)]
struct Backend {
    name: &'static str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

fn bridge_backend() -> Backend {
    Backend {
        name: BRIDGE_BACKEND,
        v4: bridge_pod_addr(1),
        v6: bridge_pod_addr6(1),
    }
}

fn routed_backend() -> Backend {
    Backend {
        name: ROUTED_BACKEND,
        v4: routed_pod_addr(0),
        v6: routed_pod_addr6(0),
    }
}

fn late_backend() -> Backend {
    Backend {
        name: LATE_BACKEND,
        v4: routed_pod_addr(1),
        v6: routed_pod_addr6(1),
    }
}

fn remote_backend() -> Backend {
    Backend {
        name: REMOTE_BACKEND,
        v4: REMOTE_ADDR,
        v6: REMOTE_ADDR6,
    }
}

fn node_object() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [
            {"type": "InternalIP", "address": NODE_ADDR.to_string()},
            {"type": "InternalIP", "address": NODE_ADDR6.to_string()},
        ]},
    })
}

/// `default/kubernetes` and its slice: the API server's Service endpoint.
fn kubernetes_objects() -> [Value; 2] {
    [
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.1",
                "clusterIPs": ["10.96.0.1"],
                "ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": APISERVER_PORT}],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "https", "protocol": "TCP", "port": APISERVER_PORT}],
            "endpoints": [{"addresses": [APISERVER_ENDPOINT.to_string()], "conditions": {"ready": true}}],
        }),
    ]
}

/// A dual-stack round-robin Service `demo/{name}` with TCP 80 -> 8080 and
/// UDP 53 -> 5353 (NodePorts 30080/30053 if `node_ports`).
fn service(name: &str, vip: Ipv4Addr, vip6: Ipv6Addr, node_ports: bool) -> Value {
    let mut http = json!({"name": "http", "protocol": "TCP", "port": HTTP_PORT, "targetPort": BACKEND_HTTP_PORT});
    let mut dns =
        json!({"name": "dns", "protocol": "UDP", "port": UDP_PORT, "targetPort": BACKEND_UDP_PORT});
    if node_ports {
        http["nodePort"] = json!(HTTP_NODE_PORT);
        dns["nodePort"] = json!(UDP_NODE_PORT);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "annotations": {"xdproxy.io/lb-algorithm": "round-robin"},
        },
        "spec": {
            "type": if node_ports { "NodePort" } else { "ClusterIP" },
            "clusterIP": vip.to_string(),
            "clusterIPs": [vip.to_string(), vip6.to_string()],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [http, dns],
        },
    })
}

/// The IPv4 and IPv6 EndpointSlices of `demo/{service}`.
fn slices(service: &str, backends: &[Backend]) -> [Value; 2] {
    let slice = |family: &str, addrs: Vec<String>| {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-{}", family.to_ascii_lowercase()),
                "namespace": "demo",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": family,
            "ports": [
                {"name": "http", "protocol": "TCP", "port": BACKEND_HTTP_PORT},
                {"name": "dns", "protocol": "UDP", "port": BACKEND_UDP_PORT},
            ],
            "endpoints": addrs
                .into_iter()
                .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
                .collect::<Vec<_>>(),
        })
    };
    [
        slice("IPv4", backends.iter().map(|b| b.v4.to_string()).collect()),
        slice("IPv6", backends.iter().map(|b| b.v6.to_string()).collect()),
    ]
}

/// The emulated node with servers in its backends, the test API server in
/// the control plane and the agent on the node. Fields drop in order: the
/// agent is cleaned up while its namespaces exist.
struct Lab {
    agent: Agent,
    servers: Vec<Servers>,
    api: ApiServer,
    scratch: PathBuf,
    net: EmulatedNode,
    /// `demo/web`'s backends now.
    web: Vec<Backend>,
}

impl Lab {
    /// Builds the node with routed pod 0, starts the servers, the API
    /// server and the agent, and waits until the agent's watches have moved
    /// to the kubernetes Service.
    fn start(tag: &str) -> anyhow::Result<Lab> {
        let mut net = EmulatedNode::build(&unique_prefix(tag))?;
        net.add_routed_pod()?;
        let servers = vec![
            Servers::start(
                &net.bridge_pods[1],
                BRIDGE_BACKEND,
                BACKEND_HTTP_PORT,
                BACKEND_UDP_PORT,
            )?,
            Servers::start(
                &net.routed_pods[0],
                ROUTED_BACKEND,
                BACKEND_HTTP_PORT,
                BACKEND_UDP_PORT,
            )?,
            Servers::start(
                &net.remote,
                REMOTE_BACKEND,
                BACKEND_HTTP_PORT,
                BACKEND_UDP_PORT,
            )?,
        ];
        let listener = net
            .control_plane
            .run(|| TcpListener::bind(("0.0.0.0", APISERVER_PORT)))?
            .context("binding the API server")?;
        let api = ApiServer::start_on(listener)?;
        let web = vec![bridge_backend(), routed_backend(), remote_backend()];
        let mut objects = vec![node_object(), service("web", WEB_VIP, WEB_VIP6, true)];
        objects.extend(kubernetes_objects());
        objects.extend(slices("web", &web));
        objects.push(service("bridge", BRIDGE_VIP, BRIDGE_VIP6, false));
        objects.extend(slices("bridge", &[bridge_backend()]));
        for object in objects {
            api.apply(object)?;
        }
        let scratch = std::env::temp_dir().join(format!("xdproxy-node-{}", net.prefix()));
        std::fs::create_dir_all(&scratch).context("scratch dir")?;
        let kubeconfig = scratch.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text()).context("kubeconfig")?;
        let ifaces: Vec<String> = IFACES.iter().map(|s| s.to_string()).collect();
        let apiserver = format!("--kube-apiserver={}", apiserver_url());
        let mut agent =
            Agent::start_kube_flags(&net.node, &kubeconfig, NODE, &ifaces, &[&apiserver])?;
        agent.wait_for_log(MOVED, Duration::from_secs(15))?;
        Ok(Lab {
            agent,
            servers,
            api,
            scratch,
            net,
            web,
        })
    }

    /// Creates routed pod 1 while the agent runs, starts its server, and
    /// returns how long the agent took to attach to its veth; then makes it
    /// a backend of `demo/web`.
    fn add_late_pod(&mut self) -> anyhow::Result<Duration> {
        let i = self.net.add_routed_pod()?;
        let created = Instant::now();
        let pin = format!("link_tc_{}", routed_iface(i));
        while !self.agent.link_pins().contains(&pin) {
            if created.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the agent never attached to {} (pins {:?}); log:\n{}",
                    routed_iface(i),
                    self.agent.link_pins(),
                    self.agent.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        let attached = created.elapsed();
        self.servers.push(Servers::start(
            &self.net.routed_pods[i],
            LATE_BACKEND,
            BACKEND_HTTP_PORT,
            BACKEND_UDP_PORT,
        )?);
        let mut web = self.web.clone();
        web.push(late_backend());
        self.set_web(web)?;
        Ok(attached)
    }

    /// Replaces `demo/web`'s endpoints and waits for the agent's sync.
    fn set_web(&mut self, web: Vec<Backend>) -> anyhow::Result<()> {
        let syncs = self.agent.log().matches("synced:").count();
        for slice in slices("web", &web) {
            self.api.apply(slice)?;
        }
        self.web = web;
        self.agent
            .wait_for_syncs(syncs + 1, Duration::from_secs(10))
    }

    fn web_names(&self) -> BTreeSet<String> {
        self.web.iter().map(|b| b.name.to_string()).collect()
    }

    /// Runs the probe in the agent's cgroup (served by the socket hooks).
    fn local(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        self.agent.cgroup().probe(ns, args)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Makes the direct API server address unreachable from the node (a
/// prohibit route), or reachable again.
fn direct_route(node: &Netns, reachable: bool) -> anyhow::Result<()> {
    let verb = if reachable { "del" } else { "add" };
    let target = format!("{APISERVER_DIRECT}/32");
    node.ip(&["route", verb, "prohibit", &target])?;
    Ok(())
}

fn kubeconfig_text() -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
         current-context: test\nusers:\n- name: test\n  user: {{}}\n",
        apiserver_url()
    )
}

/// Runs the probe outside every agent cgroup (no socket hooks).
fn outside(ns: &Netns, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let output = ns
        .command(&probe_binary()?.display().to_string())
        .args(args)
        .output()
        .context("running xdproxy-probe")?;
    lines(&output)
}

/// Collects what went wrong, so one run reports every broken path.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, what: &str, outcome: anyhow::Result<()>) {
        if let Err(e) = outcome {
            self.0.push(format!("{what}: {e:#}"));
        }
    }

    fn finish(self, log: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        bail!(
            "{} paths failed:\n  {}\nagent log:\n{}",
            self.0.len(),
            self.0.join("\n  "),
            log()
        )
    }
}

/// `lines` reached exactly `want`, each through `peer` as the socket's
/// view of its peer.
fn reached(lines: &[Value], want: &BTreeSet<String>, peer: &str) -> anyhow::Result<()> {
    let seen = proxy_tests::cgroup::backends(lines)?;
    ensure!(&seen == want, "reached {seen:?}, not {want:?}");
    let peers = proxy_tests::cgroup::peers(lines);
    ensure!(
        peers == BTreeSet::from([peer.to_string()]),
        "the socket saw its peer as {peers:?}, not {peer}"
    );
    Ok(())
}

/// "ADDR:PORT" with IPv6 addresses bracketed.
fn target(ip: impl Into<std::net::IpAddr>, port: u16) -> String {
    std::net::SocketAddr::new(ip.into(), port).to_string()
}

#[test]
fn every_client_reaches_every_backend() -> anyhow::Result<()> {
    if !require_root("node::every_client_reaches_every_backend") {
        return Ok(());
    }
    let mut lab = Lab::start("nde")?;

    // Bootstrapped at the direct address, then moved to the Service.
    let log = lab.agent.log();
    let direct = log
        .find(&format!("API server: {}", apiserver_url()))
        .with_context(|| format!("the agent never used the direct address; log:\n{log}"))?;
    let moved = log.find(MOVED).context("moved")?;
    ensure!(direct < moved, "moved before bootstrapping? log:\n{log}");
    // From now on the node cannot reach the direct address: whatever the
    // agent learns next comes through the kubernetes Service.
    direct_route(&lab.net.node, false)?;

    // A routed pod created now is attached to, and its endpoint (applied
    // after the direct route was cut) is programmed.
    let attached = lab.add_late_pod()?;
    ensure!(
        attached < ATTACHED_WITHIN,
        "the late pod's veth was attached {attached:?} after it was created"
    );

    let all = lab.web_names();
    ensure!(all.len() == 4, "{all:?}");
    let mut failures = Failures::default();
    let clients = [
        ("host network", &lab.net.node),
        ("bridge pod", &lab.net.bridge_pods[0]),
        ("routed pod", &lab.net.routed_pods[0]),
        (
            "routed pod created after the agent",
            &lab.net.routed_pods[1],
        ),
    ];
    let families: [(&str, std::net::IpAddr); 2] =
        [("IPv4", WEB_VIP.into()), ("IPv6", WEB_VIP6.into())];
    for (who, ns) in clients {
        for (family, vip) in families {
            let tcp = target(vip, HTTP_PORT);
            let udp = target(vip, UDP_PORT);
            for (mode, to) in [("tcp", &tcp), ("udp", &udp)] {
                let what = format!("{who} {mode} {family} {to}");
                let outcome = lab
                    .local(ns, &[mode, to, "12"])
                    .and_then(|out| reached(&out, &all, to));
                failures.check(&what, outcome);
            }
            // One unconnected socket per run; every reply from the VIP.
            let what = format!("{who} udp-unconnected {family} {udp}");
            let outcome = (|| {
                let mut out = Vec::new();
                for _ in 0..8 {
                    out.extend(lab.local(ns, &["udp-unconnected", &udp, "2"])?);
                }
                reached(&out, &all, &udp)
            })();
            failures.check(&what, outcome);
        }
    }

    // The late pod's own process outside the agent's cgroup: no socket
    // hooks, so only the TC program the agent attached to its new veth
    // can translate (the fallback for pods the hooks do not see).
    for (family, vip) in families {
        for (mode, port) in [("tcp", HTTP_PORT), ("udp", UDP_PORT)] {
            let to = target(vip, port);
            let what = format!(
                "routed pod created after the agent, no socket hooks, {mode} {family} {to}"
            );
            let outcome = outside(&lab.net.routed_pods[1], &[mode, &to, "12"])
                .and_then(|out| reached(&out, &all, &to));
            failures.check(&what, outcome);
        }
    }

    // Outside the node: the NodePort on the node's uplink address, served
    // by the uplink's hook, replies translated back on the way out.
    for (family, ip) in [
        ("IPv4", std::net::IpAddr::from(NODE_ADDR)),
        ("IPv6", NODE_ADDR6.into()),
    ] {
        for (mode, port) in [("tcp", HTTP_NODE_PORT), ("udp", UDP_NODE_PORT)] {
            let to = target(ip, port);
            let what = format!("external client {mode} {family} NodePort {to}");
            let outcome = outside(&lab.net.external, &[mode, &to, "12"])
                .and_then(|out| reached(&out, &all, &to));
            failures.check(&what, outcome);
        }
    }

    // The host reaches the API server through the kubernetes Service.
    let outcome = lab
        .local(&lab.net.node, &["http-get", KUBERNETES_VIP, "/version"])
        .and_then(|out| version_answered(&out));
    failures.check("host network GET /version via 10.96.0.1:443", outcome);

    failures.finish(|| lab.agent.log())
}

/// The API server answered `GET /version` through the kubernetes Service.
fn version_answered(out: &[Value]) -> anyhow::Result<()> {
    let line = out.first().context("no output")?;
    ensure!(
        line["ok"] == true && line["status"] == 200,
        "GET /version: {line}"
    );
    ensure!(
        line["body"]
            .as_str()
            .unwrap_or_default()
            .contains("gitVersion"),
        "GET /version: {line}"
    );
    ensure!(line["peer"] == KUBERNETES_VIP, "GET /version: {line}");
    Ok(())
}

#[test]
fn a_bridge_pod_reaches_the_other_bridge_pod_through_the_cluster_ip() -> anyhow::Result<()> {
    if !require_root("node::a_bridge_pod_reaches_the_other_bridge_pod_through_the_cluster_ip") {
        return Ok(());
    }
    let lab = Lab::start("ndb")?;
    let want = BTreeSet::from([BRIDGE_BACKEND.to_string()]);
    let mut failures = Failures::default();
    // Pod 0 to pod 1 on one bridge: the reply is bridged straight back to
    // pod 0, never routed through the node, which is what breaks
    // kube-proxy without br_netfilter. Pod 1 to itself is the hairpin.
    // Through the socket hooks (the probe in the agent's cgroup) and
    // through the packet path (outside it).
    let clients = [
        ("the other bridge pod", &lab.net.bridge_pods[0]),
        ("the backend pod itself", &lab.net.bridge_pods[1]),
    ];
    for (who, ns) in clients {
        for (family, vip) in [
            ("IPv4", std::net::IpAddr::from(BRIDGE_VIP)),
            ("IPv6", BRIDGE_VIP6.into()),
        ] {
            let tcp = target(vip, HTTP_PORT);
            let udp = target(vip, UDP_PORT);
            for (mode, to, count) in [
                ("tcp", &tcp, "10"),
                ("udp", &udp, "10"),
                ("udp-unconnected", &udp, "10"),
            ] {
                let what = format!("{who} {mode} {family} {to}");
                let outcome = lab.local(ns, &[mode, to, count]).and_then(|out| {
                    ensure!(out.len() == 10, "{out:?}");
                    reached(&out, &want, to)
                });
                failures.check(&what, outcome);
                // The same from outside the agent's cgroup: the packet path,
                // TC on the bridge ports (`veth*`), with the reply bridged
                // from port to port.
                let what = format!("{who} without socket hooks {mode} {family} {to}");
                let outcome = outside(ns, &[mode, to, count]).and_then(|out| {
                    ensure!(out.len() == 10, "{out:?}");
                    reached(&out, &want, to)
                });
                failures.check(&what, outcome);
            }
        }
    }
    failures.finish(|| lab.agent.log())
}

/// A probe process and when it started.
struct Running {
    what: String,
    child: Child,
    started: Instant,
}

impl Running {
    fn local(lab: &Lab, what: &str, ns: &Netns, args: &[&str]) -> anyhow::Result<Running> {
        Ok(Running {
            what: what.to_string(),
            child: lab.agent.cgroup().spawn_probe(ns, args)?,
            started: Instant::now(),
        })
    }

    fn outside(what: &str, ns: &Netns, args: &[&str]) -> anyhow::Result<Running> {
        let child = ns
            .command(&probe_binary()?.display().to_string())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting xdproxy-probe")?;
        Ok(Running {
            what: what.to_string(),
            child,
            started: Instant::now(),
        })
    }

    /// Its lines, and `at` on its clock (ms since it started).
    fn finish(self, at: Instant) -> anyhow::Result<(String, Vec<Value>, u64)> {
        let at = at.saturating_duration_since(self.started).as_millis() as u64;
        let output = self.child.wait_with_output().context("probe output")?;
        Ok((self.what, lines(&output)?, at))
    }
}

#[test]
fn a_backend_removed_under_load_moves_connected_udp_sockets_within_a_second() -> anyhow::Result<()>
{
    if !require_root(
        "node::a_backend_removed_under_load_moves_connected_udp_sockets_within_a_second",
    ) {
        return Ok(());
    }
    const RUN_MS: u64 = 4000;
    const CLOCK_SLACK_MS: u64 = 200;
    let mut lab = Lab::start("ndr")?;
    let run = RUN_MS.to_string();
    let mut streams = Vec::new();
    let clients = [
        ("host network", &lab.net.node),
        ("bridge pod", &lab.net.bridge_pods[0]),
        ("routed pod", &lab.net.routed_pods[0]),
    ];
    for (who, ns) in clients {
        for vip in [std::net::IpAddr::from(WEB_VIP), WEB_VIP6.into()] {
            for _ in 0..2 {
                let to = target(vip, UDP_PORT);
                let what = format!("{who} udp-stream {to}");
                streams.push(Running::local(&lab, &what, ns, &["udp-stream", &to, &run])?);
            }
        }
    }
    // The streams connect first, so round-robin spreads them evenly
    // whether or not it counts their flows with these connections'.
    thread::sleep(Duration::from_millis(300));
    let tcp = target(WEB_VIP, HTTP_PORT);
    let news = Running::local(
        &lab,
        "host network tcp-each",
        &lab.net.node,
        &["tcp-each", &tcp, &run],
    )?;
    thread::sleep(Duration::from_millis(1000));

    // The bridge pod leaves demo/web.
    let victim = BRIDGE_BACKEND;
    let staying: Vec<Backend> = lab
        .web
        .iter()
        .filter(|b| b.name != victim)
        .cloned()
        .collect();
    let removed_at = Instant::now();
    lab.set_web(staying)?;
    let synced_in = removed_at.elapsed();

    let mut failures = Failures::default();
    let mut moved = BTreeSet::new();
    for stream in streams {
        let (what, out, removal) = stream.finish(removed_at)?;
        // The probe's clock starts a little after this process spawned
        // it, so its times run a little behind: lines just before the
        // removal on its clock may already be after it.
        let at = removal.saturating_sub(CLOCK_SLACK_MS);
        let outcome = (|| -> anyhow::Result<()> {
            let ok_before: Vec<&Value> = out
                .iter()
                .filter(|l| l["t_ms"].as_u64().is_some_and(|t| t < at))
                .collect();
            let failed: Vec<&&Value> = ok_before.iter().filter(|l| l["ok"] != true).collect();
            ensure!(
                !ok_before.is_empty() && failed.is_empty(),
                "failed before the removal (at {at} ms): {failed:?}"
            );
            let before: BTreeSet<&str> = ok_before
                .iter()
                .filter_map(|l| l["backend"].as_str())
                .collect();
            ensure!(before.len() == 1, "moved before the removal: {before:?}");
            let before = before.into_iter().next().unwrap_or_default();
            let after: Vec<&Value> = out
                .iter()
                .filter(|l| l["t_ms"].as_u64().is_some_and(|t| t >= at))
                .collect();
            let last = after.last().context("nothing after the removal")?;
            ensure!(
                last["ok"] == true && last["backend"] != victim,
                "ended on {last}"
            );
            if before != victim {
                ensure!(
                    after
                        .iter()
                        .all(|l| l["ok"] == true && l["backend"] == before),
                    "a stream on a staying backend was disturbed: {after:?}"
                );
                return Ok(());
            }
            let first_live = after
                .iter()
                .find(|l| l["ok"] == true && l["backend"] != victim)
                .and_then(|l| l["t_ms"].as_u64())
                .context("never moved")?;
            ensure!(
                first_live.saturating_sub(removal) < 1000,
                "moved {} ms after the removal: {after:?}",
                first_live.saturating_sub(removal)
            );
            ensure!(
                after.iter().any(|l| l["ok"] == false),
                "moved without its socket being destroyed? {after:?}"
            );
            moved.insert(what.clone());
            Ok(())
        })();
        failures.check(&what, outcome);
    }
    // At least one stream of each family was on the victim (round-robin
    // spreads 6 streams a family over 3 backends) and moved.
    for family in ["udp-stream 10.", "udp-stream ["] {
        if !moved.iter().any(|w| w.contains(family)) {
            failures
                .0
                .push(format!("no {family}... stream moved: {moved:?}"));
        }
    }
    let (what, out, at) = news.finish(removed_at)?;
    let outcome = (|| -> anyhow::Result<()> {
        proxy_tests::cgroup::backends(&out)?;
        let late: Vec<&Value> = out
            .iter()
            .filter(|l| {
                l["t_ms"].as_u64().is_some_and(|t| t >= at + 1000) && l["backend"] == victim
            })
            .collect();
        ensure!(
            late.is_empty(),
            "new connections to the removed backend: {late:?}"
        );
        Ok(())
    })();
    failures.check(&what, outcome);
    eprintln!("the removal was synced {synced_in:?} after the API server had it");
    failures.finish(|| lab.agent.log())
}

/// Counts `needle` in the agent's log file, read directly: the test needs
/// it while `Agent::restart` (which holds the agent) waits for a sync.
fn log_count(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[test]
fn no_request_fails_across_an_agent_restart_and_the_api_server_stays_reachable()
-> anyhow::Result<()> {
    if !require_root(
        "node::no_request_fails_across_an_agent_restart_and_the_api_server_stays_reachable",
    ) {
        return Ok(());
    }
    const RUN_MS: u64 = 12_000;
    let mut lab = Lab::start("nds")?;
    lab.add_late_pod()?;
    let log_path = lab.agent.log_path().to_path_buf();

    let run = RUN_MS.to_string();
    let web = target(WEB_VIP, HTTP_PORT);
    let web_udp = target(WEB_VIP, UDP_PORT);
    let web6 = target(WEB_VIP6, HTTP_PORT);
    let web6_udp = target(WEB_VIP6, UDP_PORT);
    let mut probes = Vec::new();
    let clients = [
        ("host network", &lab.net.node),
        ("bridge pod", &lab.net.bridge_pods[0]),
        ("routed pod", &lab.net.routed_pods[0]),
        ("late routed pod", &lab.net.routed_pods[1]),
    ];
    for (who, ns) in clients {
        for (mode, to) in [
            ("tcp-hold", &web),
            ("tcp-each", &web),
            ("udp-stream", &web_udp),
            ("udp-each", &web6_udp),
            ("tcp-each", &web6),
        ] {
            let what = format!("{who} {mode} {to}");
            probes.push(Running::local(&lab, &what, ns, &[mode, to, &run])?);
        }
    }
    let node_port = target(NODE_ADDR, HTTP_NODE_PORT);
    let node_port_udp = target(NODE_ADDR, UDP_NODE_PORT);
    for (mode, to) in [
        ("tcp-hold", &node_port),
        ("tcp-each", &node_port),
        ("udp-each", &node_port_udp),
    ] {
        let what = format!("external client {mode} {to}");
        probes.push(Running::outside(
            &what,
            &lab.net.external,
            &[mode, to, &run],
        )?);
    }
    thread::sleep(Duration::from_millis(1500));

    // The restarted agent can reach the API server only at its direct
    // address, which the node has lost: it cannot sync until it is back.
    direct_route(&lab.net.node, false)?;
    let syncs = log_count(&log_path, "synced:");
    let starts = log_count(&log_path, &format!("API server: {}", apiserver_url()));
    let moves = log_count(&log_path, MOVED);
    // The same cgroup directory as the agent's, for probes while the agent
    // is borrowed by its restart; not removed by this handle.
    let cgroup = ManuallyDrop::new(Cgroup::create(lab.net.node.name())?);
    ensure!(cgroup.path() == lab.agent.cgroup().path());
    lab.agent.kill()?;
    let killed_at = Instant::now();

    let mut failures = Failures::default();
    let (restarted, restored_at) = thread::scope(|s| -> anyhow::Result<_> {
        let agent = &mut lab.agent;
        let restart = s.spawn(move || agent.restart(None));
        let deadline = Instant::now() + Duration::from_secs(10);
        while log_count(&log_path, &format!("API server: {}", apiserver_url())) <= starts {
            if Instant::now() > deadline || restart.is_finished() {
                bail!("the new agent did not start");
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Running, not synced: the pinned datapath serves the kubernetes
        // Service to the host (kubelet, the agent itself) all the same.
        for i in 0..5 {
            let outcome = cgroup
                .probe(&lab.net.node, &["http-get", KUBERNETES_VIP, "/version"])
                .and_then(|out| version_answered(&out));
            failures.check(&format!("GET /version #{i} before the sync"), outcome);
            thread::sleep(Duration::from_millis(200));
        }
        let unsynced = log_count(&log_path, "synced:") == syncs;
        if !unsynced {
            failures
                .0
                .push("the restarted agent synced while it could not reach the API server".into());
        }
        direct_route(&lab.net.node, true)?;
        let restored_at = Instant::now();
        let restarted = restart
            .join()
            .map_err(|_| anyhow::anyhow!("the restart panicked"))?;
        Ok((restarted, restored_at))
    })?;
    restarted.context("restarting the agent")?;
    let synced_in = restored_at.elapsed();
    wait_until_moved(&lab.agent, moves + 1, Duration::from_secs(15))?;

    let mut seen = BTreeSet::new();
    for probe in probes {
        let (what, out, at) = probe.finish(killed_at)?;
        let outcome = (|| -> anyhow::Result<()> {
            let failed: Vec<&Value> = out.iter().filter(|l| l["ok"] != true).collect();
            ensure!(failed.is_empty(), "failed across the restart: {failed:?}");
            let last = out.last().and_then(|l| l["t_ms"].as_u64()).unwrap_or(0);
            ensure!(
                last + 1000 >= RUN_MS && at + 500 < last,
                "did not run through the restart (killed at {at} ms, last line at {last} ms)"
            );
            // Open connections and connected sockets keep their backend.
            if what.contains("tcp-hold") || what.contains("udp-stream") {
                let backends: BTreeSet<&str> =
                    out.iter().filter_map(|l| l["backend"].as_str()).collect();
                ensure!(backends.len() == 1, "moved: {backends:?}");
            }
            seen.extend(proxy_tests::cgroup::backends(&out)?);
            Ok(())
        })();
        failures.check(&what, outcome);
    }
    let all = lab.web_names();
    if seen != all {
        failures.0.push(format!(
            "the probes reached {seen:?}, not every backend {all:?}"
        ));
    }
    eprintln!("the restarted agent synced {synced_in:?} after the direct route came back");
    failures.finish(|| lab.agent.log())
}

/// Waits until the log shows the move to the Service `count` times.
fn wait_until_moved(agent: &Agent, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while agent.log().matches(MOVED).count() < count {
        if Instant::now() > deadline {
            bail!(
                "the agent did not move to the kubernetes Service again in {timeout:?}; log:\n{}",
                agent.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
