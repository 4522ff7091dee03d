//! Real kernel sockets in network namespaces, through the running agent.
//!
//! client (10.0.1.2) --cl0--> node --be{i}--> backend i (10.1.{i+1}.2)
//! The client reaches the Service VIP 10.96.0.10 through the node, where the
//! agent's programs pick a backend and rewrite both directions.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use proxy_tests::{
    agent::Agent,
    clients::{HttpConn, UdpFlow, http_get, udp_exchange},
    manifests::{self, HTTP_PORT, ManifestFile, UDP_PORT, VIP},
    netns::unique_prefix,
    servers::Servers,
    topology::Topology,
};

const CONNECTIONS: usize = 1000;
const EXCHANGES: usize = 1000;
/// Generous: SYN retransmits come at 1 s and 3 s, and the suite runs many
/// namespaces in parallel on few cores.
const TIMEOUT: Duration = Duration::from_secs(5);

fn http_vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

fn udp_vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, UDP_PORT)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Offloads {
    /// Every interface as created.
    Default,
    /// The node computes checksums in software on egress (as a NIC would),
    /// so the receiver verifies what the datapath wrote.
    NodeFinishesChecksums,
}

/// A topology with servers in every backend and an agent on the node.
struct Lab {
    topology: Topology,
    _servers: Vec<Servers>,
    manifest: ManifestFile,
    agent: Option<Agent>,
}

impl Lab {
    /// `backends` namespaces, the first `serving` of them in the manifest.
    fn start(tag: &str, backends: usize, serving: usize, client_hook: &str) -> anyhow::Result<Lab> {
        Self::start_with(
            tag,
            backends,
            serving,
            client_hook,
            Offloads::NodeFinishesChecksums,
        )
    }

    fn start_with(
        tag: &str,
        backends: usize,
        serving: usize,
        client_hook: &str,
        offloads: Offloads,
    ) -> anyhow::Result<Lab> {
        let topology = Topology::build(&unique_prefix(tag), backends)?;
        if offloads == Offloads::NodeFinishesChecksums {
            topology.finish_checksums_on_node_egress()?;
        }
        if client_hook == ":xdp" {
            // A wire delivers full checksums; a veth from a local socket does not.
            topology.disable_client_tx_checksum()?;
            topology.enable_client_gro()?;
        }
        let servers = topology.start_servers()?;
        let manifest = ManifestFile::new(
            &format!("manifests-{}", topology.prefix()),
            &manifests::web(&(0..serving).collect::<Vec<_>>()),
        )?;
        let ifaces = topology.agent_ifaces(client_hook);
        let agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
        Ok(Lab {
            topology,
            _servers: servers,
            manifest,
            agent: Some(agent),
        })
    }

    /// The datapath's non-zero counters, for a failure's context.
    fn counters(&self) -> String {
        let Some(agent) = &self.agent else {
            return "no agent".into();
        };
        let Ok(binary) = proxy_tests::agent::binary() else {
            return "no agent binary".into();
        };
        let out = std::process::Command::new(binary)
            .args(["inspect", "counters", "--bpffs"])
            .arg(agent.bpffs())
            .output();
        let Ok(out) = out else {
            return "counters unreadable".into();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let nonzero: Vec<&str> = text
            .lines()
            .skip(1)
            .filter(|line| !line.trim_end().ends_with(" 0"))
            .collect();
        format!("datapath counters: {}", nonzero.join(", "))
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent running")
    }

    /// Rewrites the manifest and waits until the agent has applied it.
    fn update(&mut self, text: &str) -> anyhow::Result<()> {
        let syncs = self.agent().log().matches("synced:").count();
        self.manifest.write(text)?;
        self.agent()
            .wait_for_syncs(syncs + 1, Duration::from_secs(10))
    }

    fn connect(&self) -> anyhow::Result<HttpConn> {
        self.connect_to(http_vip())
    }

    fn connect_to(&self, frontend: impl Into<SocketAddr>) -> anyhow::Result<HttpConn> {
        let frontend = frontend.into();
        let conn = HttpConn::connect(&self.topology.client, frontend, TIMEOUT)
            .with_context(|| self.counters())?;
        if conn.peer() != frontend {
            bail!("connected to {} instead of {frontend}", conn.peer());
        }
        Ok(conn)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Agent first (it cleans its pins), then the namespaces and the
        // manifest's directory.
        self.agent.take();
    }
}

/// Opens `n` connections, two requests each, from a few threads; returns
/// how many each backend served. Fails on any error or backend switch.
fn tcp_round(lab: &Lab, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    tcp_round_to(lab, http_vip(), n)
}

fn tcp_round_to(
    lab: &Lab,
    frontend: impl Into<SocketAddr> + Copy,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let mut conn = lab.connect_to(frontend)?;
        let first = conn.get()?;
        let second = conn.get()?;
        if first != second {
            bail!("connection {} moved from {first} to {second}", conn.local());
        }
        *counts.entry(first).or_insert(0) += 1;
    }
    Ok(counts)
}

/// `n` UDP exchanges, each from a new socket (a new flow); every reply must
/// come from the VIP.
fn udp_round(lab: &Lab, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    udp_round_to(lab, udp_vip(), n)
}

fn udp_round_to(
    lab: &Lab,
    frontend: impl Into<SocketAddr> + Copy,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let frontend: SocketAddr = frontend.into();
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let (name, from) = udp_exchange(&lab.topology.client, frontend, &format!("q{i}"), TIMEOUT)?;
        if from != frontend {
            bail!("UDP reply came from {from}, not {frontend}");
        }
        *counts.entry(name).or_insert(0) += 1;
    }
    Ok(counts)
}

fn names(list: &[usize]) -> BTreeSet<String> {
    list.iter().map(|i| format!("backend{i}")).collect()
}

fn traffic_reaches_every_backend(
    client_hook: &str,
    tag: &str,
    offloads: Offloads,
) -> anyhow::Result<()> {
    let lab = Lab::start_with(tag, 3, 3, client_hook, offloads)?;
    let hook = if client_hook.is_empty() { "tc" } else { "xdp" };
    let attached = format!("attached {hook} to cl0");
    assert!(
        lab.agent
            .as_ref()
            .is_some_and(|a| a.log().contains(&attached)),
        "{attached}"
    );
    let tcp = tcp_round(&lab, CONNECTIONS)?;
    assert_eq!(tcp.values().sum::<usize>(), CONNECTIONS);
    assert_eq!(
        tcp.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[0, 1, 2]),
        "TCP spread: {tcp:?}"
    );
    let udp = udp_round(&lab, EXCHANGES)?;
    assert_eq!(udp.values().sum::<usize>(), EXCHANGES);
    assert_eq!(
        udp.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[0, 1, 2]),
        "UDP spread: {udp:?}"
    );
    let mut flow = UdpFlow::open(&lab.topology.client, udp_vip())?;
    let (first, _) = flow.exchange("hello")?;
    for i in 0..50 {
        let (name, from) = flow.exchange(&format!("again{i}"))?;
        assert_eq!(name, first, "a UDP flow must stay on its backend");
        assert_eq!(from, SocketAddr::V4(udp_vip()));
    }
    println!("{hook} ({offloads:?}): TCP {tcp:?}, UDP {udp:?}");
    Ok(())
}

/// A full pass over 1,000 frontends or more writes behind the reconciler,
/// on a thread of its own, gathering each kind of entry across Services
/// (`reconcile::behind`): what it programs serves, and a pass that removes
/// and changes Services after it leaves exactly what it should.
#[test]
fn a_pass_over_many_services_is_written_behind_and_serves() -> anyhow::Result<()> {
    if !common::ready("a_pass_over_many_services_is_written_behind_and_serves") {
        return Ok(());
    }
    let mut lab = Lab::start("many", 2, 2, "")?;
    lab.update(&manifests::many(1200, &[0, 1]))?;
    assert_eq!(service_entries(&lab)?, 1200 + 2, "web's two, and 1,200");
    for i in [0, 1, 777, 1199] {
        let served = tcp_round_to(&lab, SocketAddrV4::new(manifests::many_vip(i), 80), 2)?;
        let want = format!("backend{}", i % 2);
        assert_eq!(served.keys().collect::<Vec<_>>(), [&want], "svc{i}");
    }
    // A hundred Services go, the rest move to backend 1.
    lab.update(&manifests::many(1100, &[1]))?;
    assert_eq!(service_entries(&lab)?, 1100 + 2);
    for i in [0, 1, 1099] {
        let served = tcp_round_to(&lab, SocketAddrV4::new(manifests::many_vip(i), 80), 2)?;
        assert_eq!(served.keys().collect::<Vec<_>>(), ["backend1"], "svc{i}");
    }
    Ok(())
}

/// IPv4 service entries in the pinned map.
fn service_entries(lab: &Lab) -> anyhow::Result<usize> {
    let agent = lab.agent.as_ref().context("agent running")?;
    let map: aya::maps::HashMap<
        aya::maps::MapData,
        proxy_common::Frontend4,
        proxy_common::Service,
    > = proxy_agent::datapath::pinned::Pins::at(agent.bpffs())
        .map(proxy_common::names::SERVICES4)?;
    Ok(map.keys().filter(|k| k.is_ok()).count())
}

/// TC on the client-facing veth: the client's packets carry partial
/// checksums (default offloads), which only TC's helpers handle.
#[test]
fn tc_serves_tcp_and_udp_through_the_vip() -> anyhow::Result<()> {
    if !common::ready("tc_serves_tcp_and_udp_through_the_vip") {
        return Ok(());
    }
    traffic_reaches_every_backend("", "tc", Offloads::NodeFinishesChecksums)
}

/// The same with every interface's offloads as the kernel sets them.
#[test]
fn tc_serves_tcp_and_udp_with_default_offloads_everywhere() -> anyhow::Result<()> {
    if !common::ready("tc_serves_tcp_and_udp_with_default_offloads_everywhere") {
        return Ok(());
    }
    traffic_reaches_every_backend("", "def", Offloads::Default)
}

/// XDP on the client-facing interface, as on a node's uplink. The client's
/// TX checksum offload is off, as a wire would deliver full checksums; the
/// backends' replies (partial checksums) go through TC.
#[test]
fn xdp_serves_tcp_and_udp_through_the_vip() -> anyhow::Result<()> {
    if !common::ready("xdp_serves_tcp_and_udp_through_the_vip") {
        return Ok(());
    }
    traffic_reaches_every_backend(":xdp", "xdp", Offloads::NodeFinishesChecksums)
}

/// The agent verifies only the programs its interfaces at start need before
/// it serves them (TC here), and the others (XDP's) right after: an
/// interface that comes later under an XDP spec is attached with them, and
/// its new flows get conntrack entries (the XDP new-flow program is where
/// the XDP program tail-calls it, or replies would not be translated back).
#[test]
fn programs_no_interface_needs_at_start_are_verified_after_it() -> anyhow::Result<()> {
    if !common::ready("programs_no_interface_needs_at_start_are_verified_after_it") {
        return Ok(());
    }
    let topology = Topology::build(&unique_prefix("late"), 2)?;
    topology.finish_checksums_on_node_egress()?;
    topology.disable_client_tx_checksum()?;
    topology.enable_client_gro()?;
    let servers = topology.start_servers()?;
    let manifest = ManifestFile::new(
        &format!("manifests-{}", topology.prefix()),
        &manifests::web(&[0, 1]),
    )?;
    // The client's interface is selected only once it is renamed.
    let mut ifaces = topology.agent_ifaces("");
    ifaces[0] = "late0:xdp".to_string();
    let agent = Agent::start(&topology.node, manifest.path(), &ifaces)?;
    let mut lab = Lab {
        topology,
        _servers: servers,
        manifest,
        agent: Some(agent),
    };
    let log = lab.agent().log();
    assert!(
        log.contains("programs verified in") && log.contains("(those of tc;"),
        "{log}"
    );
    assert!(!log.contains("attached xdp"), "{log}");
    lab.agent()
        .wait_for_log("the other programs verified in", Duration::from_secs(20))?;
    let node = &lab.topology.node;
    let client = Topology::client_iface();
    node.ip(&["link", "set", client, "down"])?;
    node.ip(&["link", "set", client, "name", "late0"])?;
    node.ip(&["link", "set", "late0", "up"])?;
    lab.agent()
        .wait_for_log("attached xdp to late0", Duration::from_secs(10))?;
    let tcp = tcp_round(&lab, 50)?;
    assert_eq!(tcp.values().sum::<usize>(), 50);
    assert_eq!(
        tcp.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[0, 1]),
        "TCP spread: {tcp:?}; {}",
        lab.counters()
    );
    let counters = lab.counters();
    assert!(!counters.contains("ct_insert_failed"), "{counters}");
    Ok(())
}

/// Opens long-lived connections and returns them with their backends.
fn open_connections(lab: &Lab, n: usize) -> anyhow::Result<Vec<(HttpConn, String)>> {
    (0..n)
        .map(|_| {
            let mut conn = lab.connect()?;
            let name = conn.get()?;
            Ok((conn, name))
        })
        .collect()
}

/// Every open connection whose backend is in `alive` still answers from it.
fn check_open(conns: &mut [(HttpConn, String)], alive: &BTreeSet<String>) -> anyhow::Result<usize> {
    let mut checked = 0;
    for (conn, name) in conns.iter_mut().filter(|(_, n)| alive.contains(n)) {
        let now = conn
            .get()
            .with_context(|| format!("open connection to {name}"))?;
        assert_eq!(&now, name, "an open connection changed backend");
        checked += 1;
    }
    Ok(checked)
}

/// New connections until `want` answers, or fail after `tries`.
fn reach(lab: &Lab, want: &str, tries: usize) -> anyhow::Result<()> {
    for _ in 0..tries {
        if lab.connect()?.get()? == want {
            return Ok(());
        }
    }
    bail!("{want} never answered in {tries} connections")
}

#[test]
fn backends_come_and_go_without_a_restart_and_open_connections_survive() -> anyhow::Result<()> {
    if !common::ready("backends_come_and_go_without_a_restart_and_open_connections_survive") {
        return Ok(());
    }
    let mut lab = Lab::start("chg", 3, 2, "")?;
    let mut open = open_connections(&lab, 40)?;
    let before: BTreeSet<String> = open.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(before, names(&[0, 1]));
    let mut udp = UdpFlow::open(&lab.topology.client, udp_vip())?;
    let (udp_backend, _) = udp.exchange("start")?;

    lab.update(&manifests::web(&[0, 1, 2]))?;
    reach(&lab, "backend2", 200)?;
    assert_eq!(
        check_open(&mut open, &names(&[0, 1]))?,
        40,
        "adding a backend moved nobody"
    );

    lab.update(&manifests::web(&[1, 2]))?;
    let after = tcp_round(&lab, 300)?;
    assert!(
        !after.contains_key("backend0"),
        "a removed backend got new connections: {after:?}"
    );
    assert!(
        check_open(&mut open, &names(&[1]))? > 0,
        "connections to backend1 still work"
    );
    // A UDP flow whose backend was removed moves to a live one.
    let (now, _) = udp.exchange("after-removal")?;
    if udp_backend == "backend0" {
        assert_ne!(now, "backend0");
    } else {
        assert_eq!(now, udp_backend, "a UDP flow to a remaining backend stays");
    }

    lab.update(&manifests::slice(&[1, 2]))?;
    let started = Instant::now();
    let refused = HttpConn::connect(&lab.topology.client, http_vip(), Duration::from_secs(1));
    assert!(refused.is_err(), "the deleted Service still answers");
    println!("after deletion, connect failed in {:?}", started.elapsed());
    Ok(())
}

#[test]
fn a_malformed_object_keeps_what_was_programmed_and_valid_changes_apply() -> anyhow::Result<()> {
    if !common::ready("a_malformed_object_keeps_what_was_programmed_and_valid_changes_apply") {
        return Ok(());
    }
    let mut lab = Lab::start("bad", 3, 2, "")?;
    let broken = manifests::service().replace("port: 80,", "port: eighty,");
    assert_ne!(broken, manifests::service());
    // The Service breaks while its slice gains backend2: the slice applies,
    // the Service keeps its last valid version.
    lab.update(&format!("{broken}---\n{}", manifests::slice(&[0, 1, 2])))?;
    let log = lab.agent().log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("web.yaml"))
        .with_context(|| format!("no error about web.yaml in:\n{log}"))?;
    assert!(line.contains("Service demo/web"), "{line}");
    assert!(line.contains("spec.ports[0].port"), "{line}");
    assert!(line.contains("kept its last valid version"), "{line}");
    reach(&lab, "backend2", 200)?;
    let syntax = "apiVersion: v1\nkind: Service\nmetadata: {name: web\n";
    lab.update(syntax)?;
    assert!(lab.agent().log().contains("not valid YAML"));
    let counts = tcp_round(&lab, 100)?;
    assert_eq!(
        counts.values().sum::<usize>(),
        100,
        "a broken file removed nothing"
    );
    Ok(())
}

#[test]
fn sigterm_leaves_the_datapath_and_cleanup_removes_it() -> anyhow::Result<()> {
    if !common::ready("sigterm_leaves_the_datapath_and_cleanup_removes_it") {
        return Ok(());
    }
    let mut lab = Lab::start("term", 2, 2, "")?;
    let pins = lab.agent().pins();
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pins.join("lb4_services"))
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("\"backend_count\": 2"),
        "bpftool shows named fields: {dump}"
    );
    let status = lab.agent().stop()?;
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(
        tcp_round(&lab, 50)?.values().sum::<usize>(),
        50,
        "the datapath outlives the agent"
    );
    lab.agent().cleanup()?;
    assert!(!pins.exists(), "cleanup removed {}", pins.display());
    let links = lab.topology.node.ip(&["link", "show", "dev", "cl0"])?;
    assert!(!links.contains("xdp"), "no XDP left: {links}");
    let tcx = lab
        .topology
        .node
        .command("bpftool")
        .args(["net", "show", "dev", "cl0"])
        .output()?;
    let tcx = String::from_utf8_lossy(&tcx.stdout);
    assert!(!tcx.contains("xdproxy"), "no TC program left: {tcx}");
    assert!(
        HttpConn::connect(&lab.topology.client, http_vip(), Duration::from_secs(1)).is_err(),
        "the VIP answers after cleanup"
    );
    Ok(())
}

/// A NodePort on the node's own address: requests are translated at the
/// client-facing ingress, replies at its egress (translated at the backend's
/// ingress, they would carry the node's own address as source into
/// forwarding, and the kernel drops those as martians).
fn node_port_serves(client_hook: &str, tag: &str) -> anyhow::Result<()> {
    let mut lab = Lab::start(tag, 2, 2, client_hook)?;
    lab.update(&manifests::web_node_port(&[0, 1]))?;
    let http = SocketAddrV4::new(manifests::NODE_ADDR, manifests::HTTP_NODE_PORT);
    let udp = SocketAddrV4::new(manifests::NODE_ADDR, manifests::UDP_NODE_PORT);
    let tcp = tcp_round_to(&lab, http, 300)?;
    assert_eq!(
        tcp.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[0, 1]),
        "TCP spread: {tcp:?}"
    );
    let udp_counts = udp_round_to(&lab, udp, 300)?;
    assert_eq!(
        udp_counts.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[0, 1]),
        "UDP spread: {udp_counts:?}"
    );
    assert_eq!(
        tcp_round(&lab, 100)?.values().sum::<usize>(),
        100,
        "the cluster IP still answers"
    );
    // Another port of the node's address is not ours: the node's own stack
    // answers it (nothing listens: refused at once).
    let other = SocketAddrV4::new(manifests::NODE_ADDR, manifests::HTTP_NODE_PORT + 1);
    let refused = HttpConn::connect(&lab.topology.client, other, TIMEOUT);
    let error = refused.err().context("nothing listens there")?;
    assert!(
        format!("{error:#}").contains("refused"),
        "not refused: {error:#}"
    );
    // Without endpoints the NodePort refuses, from the node's own address:
    // handed up the node's stack, such a refusal would be dropped as a
    // martian and the client would time out.
    lab.update(&manifests::web_node_port(&[]))?;
    use std::io::ErrorKind::ConnectionRefused;
    let udp_kind = udp_error(&lab, udp)?;
    let tcp_kind = connect_error(&lab, http)?;
    let counters = lab.counters();
    assert_eq!(udp_kind, ConnectionRefused, "UDP NodePort: {counters}");
    assert_eq!(tcp_kind, ConnectionRefused, "TCP NodePort: {counters}");
    // Once the Service is a ClusterIP again, the NodePort is gone.
    lab.update(&manifests::web(&[0, 1]))?;
    assert!(HttpConn::connect(&lab.topology.client, http, TIMEOUT).is_err());
    println!("NodePort {client_hook:?}: TCP {tcp:?}, UDP {udp_counts:?}");
    Ok(())
}

#[test]
fn tc_serves_a_node_port_on_the_nodes_address() -> anyhow::Result<()> {
    if !common::ready("tc_serves_a_node_port_on_the_nodes_address") {
        return Ok(());
    }
    node_port_serves("", "nptc")
}

#[test]
fn xdp_serves_a_node_port_on_the_nodes_address() -> anyhow::Result<()> {
    if !common::ready("xdp_serves_a_node_port_on_the_nodes_address") {
        return Ok(());
    }
    node_port_serves(":xdp", "npxdp")
}

/// The error kind of a TCP connect to `target` from the client.
fn connect_error(lab: &Lab, target: impl Into<SocketAddr>) -> anyhow::Result<std::io::ErrorKind> {
    let target = target.into();
    let result = lab
        .topology
        .client
        .run(move || std::net::TcpStream::connect_timeout(&target, TIMEOUT))?;
    match result {
        Ok(stream) => bail!("connected to {target} (from {:?})", stream.local_addr()),
        Err(e) => Ok(e.kind()),
    }
}

/// The error kind of a datagram round trip on a connected UDP socket.
fn udp_error(lab: &Lab, target: impl Into<SocketAddr>) -> anyhow::Result<std::io::ErrorKind> {
    let target = target.into();
    let result = lab.topology.client.run(move || -> std::io::Result<()> {
        let any = if target.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let socket = std::net::UdpSocket::bind(any)?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.send(b"anyone?")?;
        let mut buf = [0u8; 512];
        socket.recv(&mut buf).map(|_| ())
    })?;
    match result {
        Ok(()) => bail!("{target} answered"),
        Err(e) => Ok(e.kind()),
    }
}

/// kube-proxy's REJECT: a Service without endpoints refuses at once
/// (ICMP port unreachable), instead of leaving clients to time out.
fn refuses_without_endpoints(client_hook: &str, tag: &str) -> anyhow::Result<()> {
    let mut lab = Lab::start(tag, 1, 1, client_hook)?;
    lab.update(&manifests::web(&[]))?;
    use std::io::ErrorKind::ConnectionRefused;
    assert_eq!(connect_error(&lab, http_vip())?, ConnectionRefused, "TCP");
    assert_eq!(udp_error(&lab, udp_vip())?, ConnectionRefused, "UDP");
    // Endpoints come back: served again.
    lab.update(&manifests::web(&[0]))?;
    assert_eq!(tcp_round(&lab, 20)?.values().sum::<usize>(), 20);
    Ok(())
}

#[test]
fn tc_refuses_connections_to_a_service_without_endpoints() -> anyhow::Result<()> {
    if !common::ready("tc_refuses_connections_to_a_service_without_endpoints") {
        return Ok(());
    }
    refuses_without_endpoints("", "rjtc")
}

#[test]
fn xdp_refuses_connections_to_a_service_without_endpoints() -> anyhow::Result<()> {
    if !common::ready("xdp_refuses_connections_to_a_service_without_endpoints") {
        return Ok(());
    }
    refuses_without_endpoints(":xdp", "rjxdp")
}

/// sessionAffinity: ClientIP: every connection of the client reaches one
/// backend; without it they spread.
#[test]
fn client_ip_affinity_holds_across_connections() -> anyhow::Result<()> {
    if !common::ready("client_ip_affinity_holds_across_connections") {
        return Ok(());
    }
    let mut lab = Lab::start("aff", 3, 3, "")?;
    let sticky = manifests::web(&[0, 1, 2]).replace(
        "spec:\n  clusterIP",
        "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  clusterIP",
    );
    assert_ne!(sticky, manifests::web(&[0, 1, 2]));
    lab.update(&sticky)?;
    let tcp = tcp_round(&lab, 100)?;
    assert_eq!(tcp.len(), 1, "one backend for one client: {tcp:?}");
    let udp = udp_round(&lab, 100)?;
    assert_eq!(udp.len(), 1, "UDP too: {udp:?}");
    lab.update(&manifests::web(&[0, 1, 2]))?;
    let spread = tcp_round(&lab, 100)?;
    assert!(
        spread.len() > 1,
        "without affinity flows spread: {spread:?}"
    );
    Ok(())
}

/// loadBalancerSourceRanges: the client is served only while its address is
/// in the ranges; others' packets are dropped (the connect times out).
#[test]
fn load_balancer_source_ranges_shut_out_other_clients() -> anyhow::Result<()> {
    if !common::ready("load_balancer_source_ranges_shut_out_other_clients") {
        return Ok(());
    }
    let mut lab = Lab::start("lbsr", 2, 2, "")?;
    let lb = |ranges: &str| {
        let service = manifests::service().replace(
            "spec:\n  clusterIP",
            &format!(
                "spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]\n  clusterIP"
            ),
        );
        format!(
            "{service}status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.1}}]}}}}\n---\n{}",
            manifests::slice(&[0, 1])
        )
    };
    let frontend = SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 51, 100, 1),
        manifests::HTTP_PORT,
    );
    lab.update(&lb("10.0.1.0/24"))?;
    assert_eq!(
        tcp_round_to(&lab, frontend, 20)?.values().sum::<usize>(),
        20
    );
    lab.update(&lb("192.0.2.0/24"))?;
    let kind = connect_error(&lab, frontend)?;
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        "dropped, not refused: {kind:?}"
    );
    assert_eq!(
        tcp_round(&lab, 20)?.values().sum::<usize>(),
        20,
        "the cluster IP is open to all"
    );
    Ok(())
}

/// externalTrafficPolicy: Local: the LoadBalancer IP reaches only this
/// node's endpoint, and the health check node port tells a load balancer
/// whether this node has one.
#[test]
fn external_traffic_policy_local_serves_local_endpoints_and_its_health_check() -> anyhow::Result<()>
{
    if !common::ready("external_traffic_policy_local_serves_local_endpoints_and_its_health_check") {
        return Ok(());
    }
    let mut lab = Lab::start("etp", 2, 2, "")?;
    let local_on = |node0: &str| {
        let service = manifests::service().replace(
            "spec:\n  clusterIP",
            "spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  clusterIP",
        );
        let slice = manifests::slice(&[0, 1])
            .replacen(
                "    conditions:",
                &format!("    nodeName: {node0}\n    conditions:"),
                1,
            )
            .replacen(
                "    conditions: {ready: true}\n  - ",
                "    conditions: {ready: true}\n  - nodeName: other\n    ",
                1,
            );
        format!(
            "{service}status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.1}}]}}}}\n---\n{slice}"
        )
    };
    let text = local_on(proxy_tests::agent::NODE_NAME);
    assert!(
        text.contains("nodeName: other") && text.contains("nodeName: test-node"),
        "{text}"
    );
    lab.update(&text)?;
    let frontend = SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 51, 100, 1),
        manifests::HTTP_PORT,
    );
    let served = tcp_round_to(&lab, frontend, 50)?;
    assert_eq!(
        served.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[0]),
        "{served:?}"
    );
    assert_eq!(
        tcp_round(&lab, 100)?.len(),
        2,
        "the cluster IP uses every endpoint"
    );
    let health = SocketAddrV4::new(manifests::NODE_ADDR, 32000);
    let (code, body) = http_get(&lab.topology.client, health, "/", TIMEOUT)?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    assert!(body.contains("\"name\": \"web\""), "{body}");
    lab.update(&local_on("elsewhere"))?;
    let (code, body) = http_get(&lab.topology.client, health, "/", TIMEOUT)?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    lab.update(&manifests::web(&[0, 1]))?;
    let gone = connect_error(&lab, health)?;
    assert_eq!(
        gone,
        std::io::ErrorKind::ConnectionRefused,
        "the port closed with the Service"
    );
    Ok(())
}

/// IPv6 through the same datapath: the dual-stack Service's IPv6 cluster IP
/// and NodePort, with the IPv4 ones still served, and refusals.
fn serves_ipv6(client_hook: &str, tag: &str) -> anyhow::Result<()> {
    let mut lab = Lab::start(tag, 3, 3, client_hook)?;
    lab.update(&manifests::web_dual_stack(&[0, 1, 2]))?;
    let vip6 = |port| SocketAddr::from((manifests::VIP6, port));
    let all = names(&[0, 1, 2]);
    let tcp = tcp_round_to(&lab, vip6(manifests::HTTP_PORT), 300)?;
    assert_eq!(tcp.keys().cloned().collect::<BTreeSet<_>>(), all, "{tcp:?}");
    let udp = udp_round_to(&lab, vip6(manifests::UDP_PORT), 300)?;
    assert_eq!(udp.keys().cloned().collect::<BTreeSet<_>>(), all, "{udp:?}");
    let node6 = SocketAddr::from((
        proxy_tests::topology::CLIENT_GATEWAY6,
        manifests::HTTP_NODE_PORT,
    ));
    let node_port = tcp_round_to(&lab, node6, 100)?;
    assert_eq!(node_port.values().sum::<usize>(), 100, "IPv6 NodePort");
    assert_eq!(
        tcp_round(&lab, 100)?.values().sum::<usize>(),
        100,
        "IPv4 still served"
    );
    lab.update(&manifests::web_dual_stack(&[]))?;
    use std::io::ErrorKind::ConnectionRefused;
    assert_eq!(
        connect_error(&lab, vip6(manifests::HTTP_PORT))?,
        ConnectionRefused
    );
    assert_eq!(
        udp_error(&lab, vip6(manifests::UDP_PORT))?,
        ConnectionRefused
    );
    // The NodePort on the node's own IPv6 address refuses too.
    assert_eq!(connect_error(&lab, node6)?, ConnectionRefused, "NodePort");
    let udp_node6 = SocketAddr::from((
        proxy_tests::topology::CLIENT_GATEWAY6,
        manifests::UDP_NODE_PORT,
    ));
    assert_eq!(
        udp_error(&lab, udp_node6)?,
        ConnectionRefused,
        "UDP NodePort"
    );
    println!("IPv6 {client_hook:?}: TCP {tcp:?}, UDP {udp:?}, NodePort {node_port:?}");
    Ok(())
}

#[test]
fn tc_serves_ipv6() -> anyhow::Result<()> {
    if !common::ready("tc_serves_ipv6") {
        return Ok(());
    }
    serves_ipv6("", "v6tc")
}

#[test]
fn xdp_serves_ipv6() -> anyhow::Result<()> {
    if !common::ready("xdp_serves_ipv6") {
        return Ok(());
    }
    serves_ipv6(":xdp", "v6xdp")
}
