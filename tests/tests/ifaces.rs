//! Interfaces that come and go: `--iface` patterns and `auto`, followed
//! through rtnetlink while the agent runs.
//!
//! Each agent runs in its own node namespace, so a pattern there sees only
//! the links this test made: `cl0`, `be{i}`, and the pods' `pod{i}` veths
//! created after the agent started.

mod common;

use std::{
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use proxy_tests::{
    agent::Agent,
    clients::{HttpConn, udp_exchange},
    manifests::{self, HTTP_PORT, ManifestFile, UDP_PORT, VIP},
    netns::{Netns, unique_prefix},
    servers::Servers,
    topology::{CLIENT_ADDR, LEAF_IFACE, Topology, backend_addr, backend_addr6},
};

/// What the issue asks: a pod created after the agent is served within 1 s.
const SERVED_WITHIN: Duration = Duration::from_secs(1);
/// Room for this test's own `ip` commands and a loaded machine on top.
const SLACK: Duration = Duration::from_millis(500);
/// How long one attempt may take before the next one (a fresh socket, so
/// no SYN retransmission timer decides how soon it works).
const ATTEMPT: Duration = Duration::from_millis(100);
/// How long the agent has to follow a change the test does not time.
const FOLLOWS: Duration = Duration::from_secs(5);

/// A topology with servers in its backends, the agent not yet started.
struct Lab {
    topology: Topology,
    _servers: Vec<Servers>,
    manifest: ManifestFile,
    /// Pod namespaces added by the test.
    pods: Vec<Netns>,
}

impl Lab {
    fn new(tag: &str, backends: usize) -> anyhow::Result<Lab> {
        let topology = Topology::build(&unique_prefix(tag), backends)?;
        let servers = topology.start_servers()?;
        let all: Vec<usize> = (0..backends).collect();
        let manifest = ManifestFile::new(
            &format!("ifaces-{}", topology.prefix()),
            &manifests::web(&all),
        )?;
        Ok(Lab {
            topology,
            _servers: servers,
            manifest,
            pods: Vec::new(),
        })
    }

    fn agent(&self, ifaces: &[&str]) -> anyhow::Result<Agent> {
        let ifaces: Vec<String> = ifaces.iter().map(|s| s.to_string()).collect();
        Agent::start(&self.topology.node, self.manifest.path(), &ifaces)
    }

    /// A pod as a CNI makes one: a namespace, a veth `pod{i}` in the node
    /// with its peer in the pod, addresses 10.0.{i+2}.1/.2 and a default
    /// route. Returns the pod's index; the veth exists when this returns.
    fn add_pod(&mut self) -> anyhow::Result<usize> {
        let i = self.pods.len();
        let pod = Netns::create(&format!("{}p{i}", self.topology.prefix()))?;
        self.pods.push(pod);
        let pod = &self.pods[i];
        let node = &self.topology.node;
        let iface = pod_iface(i);
        let (node_addr, pod_addr) = pod_addrs(i);
        node.add_veth(&iface, pod, LEAF_IFACE)?;
        node.ip(&["addr", "add", &format!("{node_addr}/24"), "dev", &iface])?;
        node.ip(&["link", "set", &iface, "up"])?;
        pod.ip(&["addr", "add", &format!("{pod_addr}/24"), "dev", LEAF_IFACE])?;
        pod.ip(&["link", "set", LEAF_IFACE, "up"])?;
        pod.ip(&["route", "add", "default", "via", &node_addr.to_string()])?;
        Ok(i)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Pod namespaces go with their veths; the agent (dropped by the test
        // first) has removed its pins. The manifest's directory goes last.
        self.pods.clear();
    }
}

fn pod_iface(i: usize) -> String {
    format!("pod{i}")
}

/// (node side, pod side) of pod `i`'s link: 10.0.{i+2}.1 and .2.
fn pod_addrs(i: usize) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let octet = u8::try_from(i + 2).unwrap_or(u8::MAX);
    (
        std::net::Ipv4Addr::new(10, 0, octet, 1),
        std::net::Ipv4Addr::new(10, 0, octet, 2),
    )
}

/// One HTTP request through the ClusterIP from `ns`.
fn tcp_once(ns: &Netns, timeout: Duration) -> anyhow::Result<String> {
    let vip = SocketAddrV4::new(VIP, HTTP_PORT);
    let mut conn = HttpConn::connect(ns, vip, timeout)?;
    if conn.peer() != vip.into() {
        bail!("connected to {} instead of {vip}", conn.peer());
    }
    conn.get()
}

/// One UDP exchange through the ClusterIP from `ns`; the reply must come
/// from the ClusterIP.
fn udp_once(ns: &Netns, timeout: Duration) -> anyhow::Result<String> {
    let vip = SocketAddrV4::new(VIP, UDP_PORT);
    let (name, from) = udp_exchange(ns, vip, "hello", timeout)?;
    if from != vip.into() {
        bail!("UDP reply from {from}, not {vip}");
    }
    Ok(name)
}

/// Tries `what` until it works; how long that took since `since`.
fn first_success(
    since: Instant,
    deadline: Duration,
    mut what: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<Duration> {
    loop {
        let error = match what() {
            Ok(_) => return Ok(since.elapsed()),
            Err(e) => e,
        };
        if since.elapsed() > deadline {
            return Err(error.context(format!("still failing after {deadline:?}")));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the agent's link pins are `want`.
fn wait_for_pins(agent: &Agent, want: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pins = agent.link_pins();
        if pins == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "link pins {pins:?}, not {want:?}, after {timeout:?}; log:\n{}",
                agent.log()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A pod veth created after the agent (TC path) is served within 1 s, TCP
/// and UDP; when it goes, its links are unpinned and the others still serve.
#[test]
fn pod_veths_that_come_and_go_are_followed() -> anyhow::Result<()> {
    if !common::ready("pod_veths_that_come_and_go_are_followed") {
        return Ok(());
    }
    let mut lab = Lab::new("ifp", 2)?;
    let mut agent = lab.agent(&["pod*", "be*", "cl0"])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be0",
            "link_tc_be1",
            "link_tc_cl0",
            "link_tcout_be0",
            "link_tcout_be1",
            "link_tcout_cl0",
        ],
        FOLLOWS,
    )?;
    assert!(
        agent
            .log()
            .contains("--iface pod* matches no interface yet"),
        "{}",
        agent.log()
    );

    let created = Instant::now();
    let first = lab.add_pod()?;
    let configured = created.elapsed();
    let pod = &lab.pods[first];
    let tcp = first_success(created, FOLLOWS, || tcp_once(pod, ATTEMPT))?;
    let udp = first_success(created, FOLLOWS, || udp_once(pod, ATTEMPT))?;
    println!(
        "pod0: configured {configured:?} after its veth was created, first TCP answer at \
         {tcp:?}, first UDP answer at {udp:?}"
    );
    assert!(
        tcp < SERVED_WITHIN + SLACK && udp < SERVED_WITHIN + SLACK,
        "pod0 served {tcp:?} (TCP) and {udp:?} (UDP) after its veth appeared; log:\n{}",
        agent.log()
    );
    agent.wait_for_log("attached tc to pod0", FOLLOWS)?;

    let second = lab.add_pod()?;
    tcp_once_within(&lab.pods[second], FOLLOWS)?;

    lab.topology.node.ip(&["link", "del", &pod_iface(first)])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be0",
            "link_tc_be1",
            "link_tc_cl0",
            "link_tc_pod1",
            "link_tcout_be0",
            "link_tcout_be1",
            "link_tcout_cl0",
            "link_tcout_pod1",
        ],
        FOLLOWS,
    )?;
    agent.wait_for_log("detached tc from pod0: the interface is gone", FOLLOWS)?;
    tcp_once(&lab.pods[second], FOLLOWS).context("the other pod after pod0 went")?;
    udp_once(&lab.pods[second], FOLLOWS).context("the other pod after pod0 went")?;
    tcp_once(&lab.topology.client, FOLLOWS).context("the client after pod0 went")?;
    udp_once(&lab.topology.client, FOLLOWS).context("the client after pod0 went")?;
    drop(agent);
    Ok(())
}

fn tcp_once_within(ns: &Netns, timeout: Duration) -> anyhow::Result<Duration> {
    first_success(Instant::now(), timeout, || tcp_once(ns, ATTEMPT))
}

/// A renamed interface keeps its links under its new name while it still
/// matches, and loses them when it no longer does.
#[test]
fn renamed_interfaces_are_followed() -> anyhow::Result<()> {
    if !common::ready("renamed_interfaces_are_followed") {
        return Ok(());
    }
    let mut lab = Lab::new("ifr", 1)?;
    let mut agent = lab.agent(&["pod*", "be*"])?;
    let i = lab.add_pod()?;
    tcp_once_within(&lab.pods[i], FOLLOWS)?;
    let node = &lab.topology.node;
    node.ip(&["link", "set", "pod0", "down"])?;
    node.ip(&["link", "set", "pod0", "name", "pod9"])?;
    node.ip(&["link", "set", "pod9", "up"])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be0",
            "link_tc_pod9",
            "link_tcout_be0",
            "link_tcout_pod9",
        ],
        FOLLOWS,
    )?;
    agent.wait_for_log("pod0 was renamed pod9", FOLLOWS)?;
    tcp_once_within(&lab.pods[i], FOLLOWS).context("after the rename")?;
    udp_once(&lab.pods[i], FOLLOWS).context("after the rename")?;

    node.ip(&["link", "set", "pod9", "name", "other9"])?;
    wait_for_pins(&agent, &["link_tc_be0", "link_tcout_be0"], FOLLOWS)?;
    // Pins go before the log line is written.
    agent.wait_for_log(
        "detached tc from pod9: it no longer matches any --iface",
        FOLLOWS,
    )?;
    drop(agent);
    Ok(())
}

/// Without `--iface` the agent serves `auto`: the interfaces of the default
/// routes, IPv4 and IPv6, multipath included, and follows them as they move.
#[test]
fn auto_follows_the_default_routes() -> anyhow::Result<()> {
    if !common::ready("auto_follows_the_default_routes") {
        return Ok(());
    }
    let lab = Lab::new("ifa", 2)?;
    let node = &lab.topology.node;
    // The client's side plays the uplink's gateway.
    let uplink_gateway = CLIENT_ADDR.to_string();
    node.ip(&["route", "add", "default", "via", &uplink_gateway])?;
    let mut agent = lab.agent(&[])?;
    wait_for_pins(&agent, &["link_tc_cl0", "link_tcout_cl0"], FOLLOWS)?;

    // An IPv6 default route through be1 adds be1.
    let be1_gateway6 = backend_addr6(1).to_string();
    node.ip(&["-6", "route", "add", "default", "via", &be1_gateway6])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be1",
            "link_tc_cl0",
            "link_tcout_be1",
            "link_tcout_cl0",
        ],
        FOLLOWS,
    )?;

    // The IPv4 default moves from cl0 to be0.
    let be0_gateway = backend_addr(0).to_string();
    node.ip(&["route", "replace", "default", "via", &be0_gateway])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be0",
            "link_tc_be1",
            "link_tcout_be0",
            "link_tcout_be1",
        ],
        FOLLOWS,
    )?;
    agent.wait_for_log(
        "detached tc from cl0: it no longer matches any --iface",
        FOLLOWS,
    )?;

    // Multipath: both nexthops' interfaces.
    node.ip(&[
        "route",
        "replace",
        "default",
        "nexthop",
        "via",
        &uplink_gateway,
        "nexthop",
        "via",
        &be0_gateway,
    ])?;
    node.ip(&["-6", "route", "del", "default"])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be0",
            "link_tc_cl0",
            "link_tcout_be0",
            "link_tcout_cl0",
        ],
        FOLLOWS,
    )?;
    drop(agent);
    Ok(())
}

/// Names and patterns that match nothing at start are not errors (and the
/// loopback is never attached, even when named); a link that appears later
/// under such a name is attached.
#[test]
fn names_that_do_not_exist_yet_are_not_errors() -> anyhow::Result<()> {
    if !common::ready("names_that_do_not_exist_yet_are_not_errors") {
        return Ok(());
    }
    let lab = Lab::new("ifn", 1)?;
    let agent = lab.agent(&["nothere0", "lo", "be0"])?;
    wait_for_pins(&agent, &["link_tc_be0", "link_tcout_be0"], FOLLOWS)?;
    let log = agent.log();
    assert!(
        log.contains("--iface nothere0 matches no interface yet"),
        "{log}"
    );
    assert!(log.contains("--iface lo matches no interface yet"), "{log}");
    // A veth, as the kernel here may have no dummy driver; its peer's name
    // matches nothing.
    lab.topology.node.ip(&[
        "link", "add", "nothere0", "type", "veth", "peer", "name", "peer0",
    ])?;
    wait_for_pins(
        &agent,
        &[
            "link_tc_be0",
            "link_tc_nothere0",
            "link_tcout_be0",
            "link_tcout_nothere0",
        ],
        FOLLOWS,
    )?;
    drop(agent);
    Ok(())
}
