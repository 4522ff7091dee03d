//! Two nodes, each with its own agent, a router and an external client:
//! traffic that enters one node and is served on the other, both traffic
//! policies, health check node ports and hairpin.

mod common;

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::bail;
use proxy_tests::{
    agent::Agent,
    clients::{HttpConn, http_get, udp_exchange},
    manifests::{self, ManifestFile},
    netns::{Netns, unique_prefix},
    servers::Servers,
    twonode::{
        CLIENT, CLIENT6, LB_ADDR, LB_ADDR6, NODE_NAMES, POD_LINK, TwoNodes, UPLINK, node_addr,
        node_addr6, pod_addr, pod_addr6,
    },
};

/// Generous: SYN retransmits come at 1 s and 3 s, and the suite runs many
/// namespaces in parallel on few cores.
const TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const HEALTH_PORT: u16 = 32000;

struct Cluster {
    topology: TwoNodes,
    _servers: Vec<Servers>,
    manifest: ManifestFile,
    agents: Vec<Agent>,
}

impl Cluster {
    fn start(tag: &str, extra_spec: &str) -> anyhow::Result<Cluster> {
        Self::start_with(tag, extra_spec, "")
    }

    /// `uplink_hook`: "" (TC, the default for veths) or ":xdp".
    fn start_with(tag: &str, extra_spec: &str, uplink_hook: &str) -> anyhow::Result<Cluster> {
        let topology = TwoNodes::build(&unique_prefix(tag))?;
        if uplink_hook == ":xdp" {
            topology.finish_checksums_at_the_sources()?;
        }
        let servers = (0..2)
            .map(|n| Servers::start(&topology.pods[n], &format!("pod{}", n + 1), 8080, 5353))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let manifest = ManifestFile::new(
            &format!("2n-{}", topology.client.name()),
            &manifests::two_nodes(extra_spec),
        )?;
        let ifaces = [format!("{UPLINK}{uplink_hook}"), POD_LINK.to_string()];
        let agents = (0..2)
            .map(|n| {
                Agent::start_named(&topology.nodes[n], manifest.path(), NODE_NAMES[n], &ifaces)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Cluster {
            topology,
            _servers: servers,
            manifest,
            agents,
        })
    }

    /// Rewrites the manifests and waits until both agents applied them.
    fn update(&mut self, text: &str) -> anyhow::Result<()> {
        let before: Vec<usize> = self
            .agents
            .iter()
            .map(|a| a.log().matches("synced:").count())
            .collect();
        self.manifest.write(text)?;
        for (agent, syncs) in self.agents.iter_mut().zip(before) {
            agent.wait_for_syncs(syncs + 1, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Who answers `n` new connections from `ns` to `target`; every
    /// connection must see `target` as its peer.
    fn spread(
        &self,
        ns: &Netns,
        target: impl Into<SocketAddr>,
        n: usize,
    ) -> anyhow::Result<BTreeSet<String>> {
        let target = target.into();
        let mut names = BTreeSet::new();
        for _ in 0..n {
            let mut conn = HttpConn::connect(ns, target, TIMEOUT)?;
            if conn.peer() != target {
                bail!("connected to {} instead of {target}", conn.peer());
            }
            names.insert(conn.get()?);
        }
        Ok(names)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The agents first, then the namespaces and the manifest's directory.
        self.agents.clear();
    }
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn at(addr: std::net::Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// externalTrafficPolicy: Cluster: a NodePort or the LoadBalancer address
/// on either node reaches the pods of both, the replies come back through
/// the entry node, and the backends see the entry node as the source.
#[test]
fn external_traffic_reaches_pods_on_both_nodes_through_either_node() -> anyhow::Result<()> {
    if !common::ready("external_traffic_reaches_pods_on_both_nodes_through_either_node") {
        return Ok(());
    }
    external_traffic_through_either_node("2nc", "")
}

/// The same with XDP on the nodes' uplinks, as a node would run it on its
/// NIC (every packet on the uplinks carries a full checksum).
#[test]
fn external_traffic_through_xdp_uplinks() -> anyhow::Result<()> {
    if !common::ready("external_traffic_through_xdp_uplinks") {
        return Ok(());
    }
    external_traffic_through_either_node("2nx", ":xdp")
}

fn external_traffic_through_either_node(tag: &str, uplink_hook: &str) -> anyhow::Result<()> {
    let cluster = Cluster::start_with(tag, "", uplink_hook)?;
    let attached = format!(
        "attached {} to {UPLINK}",
        if uplink_hook.is_empty() { "tc" } else { "xdp" }
    );
    assert!(
        cluster.agents.iter().all(|a| a.log().contains(&attached)),
        "{attached}"
    );
    let client = &cluster.topology.client;
    let both = names(&["pod1", "pod2"]);
    for n in 0..2 {
        let target = at(node_addr(n), HTTP_NODE_PORT);
        assert_eq!(
            cluster.spread(client, target, 60)?,
            both,
            "NodePort on node{}",
            n + 1
        );
        let udp = at(node_addr(n), UDP_NODE_PORT);
        let mut seen = BTreeSet::new();
        for i in 0..60 {
            let (name, from) = udp_exchange(client, udp, &format!("q{i}"), TIMEOUT)?;
            assert_eq!(from, SocketAddr::V4(udp), "UDP reply source");
            seen.insert(name);
        }
        assert_eq!(seen, both, "UDP NodePort on node{}", n + 1);
        // Every backend saw the entry node, never the client.
        for _ in 0..20 {
            let (code, peer) = http_get(client, target, "/peer", TIMEOUT)?;
            assert_eq!(code, 200);
            assert!(
                peer.starts_with(&format!("{}:", node_addr(n))),
                "backend saw {peer}"
            );
        }
    }
    let lb = at(LB_ADDR, manifests::HTTP_PORT);
    assert_eq!(
        cluster.spread(client, lb, 60)?,
        both,
        "LoadBalancer address"
    );
    // No health check node port for externalTrafficPolicy: Cluster.
    let refused = HttpConn::connect(client, at(node_addr(0), HEALTH_PORT), TIMEOUT);
    assert!(refused.is_err());
    Ok(())
}

/// externalTrafficPolicy: Local: each node serves its own pod only, the pod
/// sees the real client, and the health check node port tells a load
/// balancer which nodes have a pod.
#[test]
fn external_traffic_policy_local_across_two_nodes() -> anyhow::Result<()> {
    if !common::ready("external_traffic_policy_local_across_two_nodes") {
        return Ok(());
    }
    let local = "  externalTrafficPolicy: Local\n";
    let mut cluster = Cluster::start("2nl", local)?;
    for n in 0..2 {
        let client = &cluster.topology.client;
        let target = at(node_addr(n), HTTP_NODE_PORT);
        let own = names(&[&format!("pod{}", n + 1)]);
        assert_eq!(cluster.spread(client, target, 30)?, own, "node{}", n + 1);
        let (_, peer) = http_get(client, target, "/peer", TIMEOUT)?;
        assert!(
            peer.starts_with(&format!("{CLIENT}:")),
            "the pod sees the client: {peer}"
        );
        let (code, body) = http_get(client, at(node_addr(n), HEALTH_PORT), "/", TIMEOUT)?;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    }
    // Node2's pod goes away: its health check fails, its NodePort drops
    // (not refuses) new connections, node1 keeps serving.
    let mut text = manifests::two_nodes(local);
    for pod in [pod_addr(1).to_string(), pod_addr6(1).to_string()] {
        text = text.replace(
            &format!("  - {{addresses: [\"{pod}\"], nodeName: node2}}\n"),
            "",
        );
    }
    assert_ne!(text, manifests::two_nodes(local));
    cluster.update(&text)?;
    let client = &cluster.topology.client;
    let (code, body) = http_get(client, at(node_addr(1), HEALTH_PORT), "/", TIMEOUT)?;
    assert_eq!(code, 503, "{body}");
    let dropped = client.run(move || {
        TcpStream::connect_timeout(&SocketAddr::V4(at(node_addr(1), HTTP_NODE_PORT)), TIMEOUT)
    })?;
    let kind = dropped.err().map(|e| e.kind());
    assert!(
        matches!(
            kind,
            Some(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
        ),
        "dropped, not refused: {kind:?}"
    );
    let node1 = at(node_addr(0), HTTP_NODE_PORT);
    assert_eq!(cluster.spread(client, node1, 10)?, names(&["pod1"]));
    Ok(())
}

/// A pod reaching its own Service lands on itself now and then: that works
/// (the node source-NATs it), and so do its connections to the other pod.
#[test]
fn a_pod_reaches_itself_through_its_service() -> anyhow::Result<()> {
    if !common::ready("a_pod_reaches_itself_through_its_service") {
        return Ok(());
    }
    let cluster = Cluster::start("2nh", "")?;
    let pod1 = &cluster.topology.pods[0];
    let vip = at(manifests::VIP, manifests::HTTP_PORT);
    let seen = cluster.spread(pod1, vip, 60)?;
    assert_eq!(seen, names(&["pod1", "pod2"]), "itself and the other pod");
    let mut hairpin_peer = None;
    for _ in 0..60 {
        let (_, peer) = http_get(pod1, vip, "/peer", TIMEOUT)?;
        if peer.starts_with("192.168.1.1:") {
            hairpin_peer = Some(peer);
            break;
        }
    }
    assert!(
        hairpin_peer.is_some(),
        "pod1 reached itself, seeing its node as the source"
    );
    Ok(())
}

/// The same over IPv6: NodePort and LoadBalancer traffic entering a node
/// reaches both pods (source-NATed to the entry node's IPv6 address) under
/// externalTrafficPolicy: Cluster, only the local pod, which sees the
/// client, under Local; and a pod reaching its own Service over IPv6.
#[test]
fn external_ipv6_traffic_across_two_nodes() -> anyhow::Result<()> {
    if !common::ready("external_ipv6_traffic_across_two_nodes") {
        return Ok(());
    }
    ipv6_across_two_nodes("2n6", "")
}

#[test]
fn external_ipv6_traffic_through_xdp_uplinks() -> anyhow::Result<()> {
    if !common::ready("external_ipv6_traffic_through_xdp_uplinks") {
        return Ok(());
    }
    ipv6_across_two_nodes("2n6x", ":xdp")
}

fn ipv6_across_two_nodes(tag: &str, uplink_hook: &str) -> anyhow::Result<()> {
    let cluster = Cluster::start_with(tag, "", uplink_hook)?;
    let client = &cluster.topology.client;
    let both = names(&["pod1", "pod2"]);
    let node1 = SocketAddr::from((node_addr6(0), HTTP_NODE_PORT));
    assert_eq!(cluster.spread(client, node1, 60)?, both, "IPv6 NodePort");
    let lb = SocketAddr::from((LB_ADDR6, manifests::HTTP_PORT));
    assert_eq!(
        cluster.spread(client, lb, 60)?,
        both,
        "IPv6 LoadBalancer address"
    );
    let udp = SocketAddr::from((node_addr6(1), UDP_NODE_PORT));
    let mut seen = BTreeSet::new();
    for i in 0..60 {
        let (name, from) = udp_exchange(client, udp, &format!("q{i}"), TIMEOUT)?;
        assert_eq!(from, udp, "UDP reply source");
        seen.insert(name);
    }
    assert_eq!(seen, both, "IPv6 UDP NodePort on node2");
    for _ in 0..10 {
        let (_, peer) = http_get(client, node1, "/peer", TIMEOUT)?;
        assert!(
            peer.starts_with(&format!("[{}]:", node_addr6(0))),
            "backend saw {peer}"
        );
    }
    let vip6 = SocketAddr::from((manifests::VIP6, manifests::HTTP_PORT));
    let from_pod = cluster.spread(&cluster.topology.pods[1], vip6, 40)?;
    assert_eq!(
        from_pod, both,
        "a pod reaching its Service over IPv6, itself included"
    );
    drop(cluster);
    let local = "  externalTrafficPolicy: Local\n";
    let cluster = Cluster::start_with(&format!("{tag}l"), local, uplink_hook)?;
    let client = &cluster.topology.client;
    let node2 = SocketAddr::from((node_addr6(1), HTTP_NODE_PORT));
    assert_eq!(cluster.spread(client, node2, 30)?, names(&["pod2"]));
    let (code, body) = http_get(
        client,
        SocketAddr::from((node_addr6(1), HEALTH_PORT)),
        "/",
        TIMEOUT,
    )?;
    assert_eq!(code, 200, "health check over IPv6: {body}");
    let (_, peer) = http_get(client, node2, "/peer", TIMEOUT)?;
    assert!(
        peer.starts_with(&format!("[{CLIENT6}]:")),
        "the pod sees the client: {peer}"
    );
    Ok(())
}
