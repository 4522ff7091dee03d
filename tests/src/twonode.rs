//! Two nodes behind a router, an external client, and one pod per node:
//! for traffic that enters one node and is served on the other.
//!
//! ```text
//!  client ns         router ns                    node1 ns                 pod1 ns
//!  eth0 10.0.9.2 <-> rx 10.0.9.1
//!                    r1 192.168.1.254 <-------> eth1 192.168.1.1
//!                                                pod0 10.1.1.1 <-------> eth0 10.1.1.2
//!                    r2 192.168.2.254 <-------> eth1 192.168.2.1 (node2)
//!                                                pod0 10.2.1.1 <-------> eth0 10.2.1.2 (pod2)
//! ```
//! The router knows each node's pod range (10.N.0.0/16 via node N) and
//! sends the LoadBalancer address 198.51.100.1 to node1, as a cloud load
//! balancer would deliver it. Nodes route everything else to the router.
//! Every link is dual-stack too: client 2001:db8:9::2, node N
//! fd00:168:N::1 (router ::254), pod on node N fd01:N::2 (node ::1), the
//! IPv6 LoadBalancer address 2001:db8:100::1 routed to node1.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 2);
pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// The node names agents run as and manifests use.
pub const NODE_NAMES: [&str; 2] = ["node1", "node2"];

/// Node `n`'s (0 or 1) address on its uplink.
pub fn node_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, n as u8 + 1, 1)
}

/// The pod on node `n`.
pub fn pod_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, n as u8 + 1, 1, 2)
}

/// Node `n`'s IPv6 address on its uplink.
pub fn node_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x168, n as u16 + 1, 0, 0, 0, 0, 1)
}

/// The pod on node `n`, IPv6.
pub fn pod_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, n as u16 + 1, 0, 0, 0, 0, 0, 2)
}

pub const UPLINK: &str = "eth1";
pub const POD_LINK: &str = "pod0";

pub struct TwoNodes {
    pub client: Netns,
    pub router: Netns,
    pub nodes: [Netns; 2],
    pub pods: [Netns; 2],
}

impl TwoNodes {
    pub fn build(prefix: &str) -> Result<TwoNodes> {
        let ns = |role: &str| Netns::create(&format!("{prefix}{role}"));
        let topology = TwoNodes {
            client: ns("x")?,
            router: ns("r")?,
            nodes: [ns("n1")?, ns("n2")?],
            pods: [ns("p1")?, ns("p2")?],
        };
        topology.wire().context("wiring the two-node topology")?;
        Ok(topology)
    }

    fn wire(&self) -> Result<()> {
        for ns in [&self.router, &self.nodes[0], &self.nodes[1]] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            // A node sending a packet back out of the interface it came in
            // on (hairpin, external traffic to another node) must not teach
            // the sender a shortcut around it.
            ns.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
            ns.sysctl("net.ipv4.conf.default.send_redirects", "0")?;
        }
        veth(
            (&self.router, "rx", "10.0.9.1"),
            (&self.client, "eth0", "10.0.9.2"),
            24,
        )?;
        self.client
            .ip(&["route", "add", "default", "via", "10.0.9.1"])?;
        addr6(&self.router, "rx", "2001:db8:9::1")?;
        addr6(&self.client, "eth0", &CLIENT6.to_string())?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "2001:db8:9::1"])?;
        for n in 0..2 {
            let router_side = format!("r{}", n + 1);
            let router_addr = format!("192.168.{}.254", n + 1);
            let node = &self.nodes[n];
            veth(
                (&self.router, &router_side, &router_addr),
                (node, UPLINK, &node_addr(n).to_string()),
                24,
            )?;
            node.ip(&["route", "add", "default", "via", &router_addr])?;
            let router6 = format!("fd00:168:{}::254", n + 1);
            addr6(&self.router, &router_side, &router6)?;
            addr6(node, UPLINK, &node_addr6(n).to_string())?;
            node.ip(&["-6", "route", "add", "default", "via", &router6])?;
            let pods6 = format!("fd01:{}::/64", n + 1);
            let via6 = node_addr6(n).to_string();
            self.router
                .ip(&["-6", "route", "add", &pods6, "via", &via6])?;
            let pods = format!("10.{}.0.0/16", n + 1);
            self.router
                .ip(&["route", "add", &pods, "via", &node_addr(n).to_string()])?;
            let gateway = format!("10.{}.1.1", n + 1);
            veth(
                (node, POD_LINK, &gateway),
                (&self.pods[n], "eth0", &pod_addr(n).to_string()),
                24,
            )?;
            self.pods[n].ip(&["route", "add", "default", "via", &gateway])?;
            let gateway6 = format!("fd01:{}::1", n + 1);
            addr6(node, POD_LINK, &gateway6)?;
            addr6(&self.pods[n], "eth0", &pod_addr6(n).to_string())?;
            self.pods[n].ip(&["-6", "route", "add", "default", "via", &gateway6])?;
        }
        self.router.ip(&[
            "route",
            "add",
            &format!("{LB_ADDR}/32"),
            "via",
            &node_addr(0).to_string(),
        ])?;
        self.router.ip(&[
            "-6",
            "route",
            "add",
            &format!("{LB_ADDR6}/128"),
            "via",
            &node_addr6(0).to_string(),
        ])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, iface) in [
            (&self.client, "eth0"),
            (&self.router, "rx"),
            (&self.router, "r1"),
            (&self.router, "r2"),
            (&self.nodes[0], UPLINK),
            (&self.nodes[1], UPLINK),
            (&self.nodes[0], POD_LINK),
            (&self.nodes[1], POD_LINK),
            (&self.pods[0], "eth0"),
            (&self.pods[1], "eth0"),
        ] {
            wait_up(ns, iface, deadline)?;
        }
        Ok(())
    }
}

impl TwoNodes {
    /// Makes every packet that reaches a node's uplink carry a complete
    /// checksum, as from a wire, so the uplinks can run XDP: the client and
    /// the pods (the only local senders whose packets cross uplinks) finish
    /// their checksums in software.
    pub fn finish_checksums_at_the_sources(&self) -> Result<()> {
        for ns in [&self.client, &self.pods[0], &self.pods[1]] {
            let name = ns.name().to_string();
            ns.run(|| crate::topology::set_tx_csum("eth0", false))?
                .with_context(|| format!("TX checksum offload off in {name}"))?;
        }
        Ok(())
    }
}

/// A veth pair from `a` to `b`, both ends addressed and up.
fn veth(a: (&Netns, &str, &str), b: (&Netns, &str, &str), prefix: u8) -> Result<()> {
    let (a_ns, a_if, a_addr) = a;
    let (b_ns, b_if, b_addr) = b;
    a_ns.add_veth(a_if, b_ns, b_if)?;
    a_ns.ip(&["addr", "add", &format!("{a_addr}/{prefix}"), "dev", a_if])?;
    b_ns.ip(&["addr", "add", &format!("{b_addr}/{prefix}"), "dev", b_if])?;
    a_ns.ip(&["link", "set", "dev", a_if, "up"])?;
    b_ns.ip(&["link", "set", "dev", b_if, "up"])?;
    Ok(())
}

/// An IPv6 /64 address, usable at once (no duplicate address detection).
fn addr6(ns: &Netns, iface: &str, addr: &str) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{addr}/64"), "dev", iface, "nodad"])?;
    Ok(())
}

/// Waits until `iface` in `ns` is up, at most until `deadline`.
pub(crate) fn wait_up(ns: &Netns, iface: &str, deadline: Instant) -> Result<()> {
    loop {
        let line = ns.ip(&["-o", "link", "show", "dev", iface])?;
        if line.contains(" state UP ") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{iface} in {} is not up: {}", ns.name(), line.trim());
        }
        thread::sleep(Duration::from_millis(20));
    }
}
