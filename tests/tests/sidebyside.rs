//! The side-by-side bench's baselines carry traffic: kube-proxy's rule sets
//! as `proxy_tests::kubeproxy` writes them, loaded with the system's tools
//! into a node, send a client's connections to a cluster IP on to the
//! Service's endpoints, and the bench's traffic generators count them.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use proxy_tests::{
    connrate::{ShortServer, connect_round, requests},
    kubeproxy::{Mode, ServicePort},
    netns::unique_prefix,
    topology::{Topology, backend_addr},
};

/// Three Services of two endpoints each, all held by backend 0 (on its
/// loopback, routed to by the node).
fn services() -> Vec<ServicePort> {
    (0..3u8)
        .map(|i| ServicePort {
            namespace: "bench".into(),
            name: format!("svc{i}"),
            vip: Ipv4Addr::new(10, 96, 0, 10 + i),
            port: 80,
            endpoints: (0..2u8)
                .map(|e| SocketAddrV4::new(Ipv4Addr::new(10, 100 + e, 0, i), 8080))
                .collect(),
        })
        .collect()
}

fn serves_the_last_service(mode: Mode) -> anyhow::Result<()> {
    let topology = Topology::build(&unique_prefix("sbs"), 1)?;
    let backend = &topology.backends[0];
    let ports = services();
    for svc in &ports {
        for e in &svc.endpoints {
            let host = format!("{}/32", e.ip());
            backend.ip(&["addr", "add", &host, "dev", "lo"])?;
            let via = backend_addr(0).to_string();
            topology.node.ip(&["route", "add", &host, "via", &via])?;
        }
    }
    let _server = ShortServer::start(backend, 8080, 2)?;
    mode.install(&topology.node, &mode.rules(&ports))?;
    let last = ports.last().map(|s| SocketAddr::from((s.vip, s.port)));
    let targets: Vec<SocketAddr> = last.into_iter().collect();
    let list = targets.clone();
    let round = topology.client.run(move || connect_round(&list, 50))??;
    assert_eq!(round.latencies.len(), 50);
    let reqs = requests(&topology.client, &targets, 4, Duration::from_millis(300))?;
    assert_eq!(reqs.failed, 0, "{:?}", reqs.first_error);
    assert!(
        reqs.answered > 0,
        "no request was answered through {mode:?}"
    );
    // Replacing the rules (nftables: after removing them) works again.
    mode.flush(&topology.node)?;
    mode.install(&topology.node, &mode.rules(&ports))?;
    let again = topology.client.run(move || connect_round(&targets, 5))??;
    assert_eq!(again.latencies.len(), 5);
    Ok(())
}

#[test]
fn iptables_legacy_rules_serve_a_cluster_ip() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("iptables_legacy_rules_serve_a_cluster_ip") {
        return Ok(());
    }
    serves_the_last_service(Mode::IptablesLegacy)
}

#[test]
fn iptables_nft_rules_serve_a_cluster_ip() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("iptables_nft_rules_serve_a_cluster_ip") {
        return Ok(());
    }
    serves_the_last_service(Mode::IptablesNft)
}

#[test]
fn nftables_rules_serve_a_cluster_ip() -> anyhow::Result<()> {
    if !proxy_tests::privilege::require_root("nftables_rules_serve_a_cluster_ip") {
        return Ok(());
    }
    serves_the_last_service(Mode::Nftables)
}
