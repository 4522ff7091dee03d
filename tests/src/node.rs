//! An emulated Kubernetes node with every kind of client a node has: its
//! own processes (host network), pods of a bridge CNI, pods of a routed-veth
//! CNI (Calico style, some created while the agent runs) and clients
//! outside the node behind a router, plus a control plane and a backend
//! elsewhere in the cluster.
//!
//! ```text
//!                                   router ns
//!  external ns                  +----------------------+        control-plane ns
//!  eth0 10.0.9.2        <------> rx 10.0.9.1           |        eth0 10.0.8.2 (direct)
//!       2001:db8:9::2           |    2001:db8:9::1     |             10.0.8.3 (Service endpoint)
//!                               | rc 10.0.8.1   <------+------> API server :6443
//!  remote ns (a pod elsewhere)  |                      |
//!  eth0 10.0.7.2, fd00:7::2 <-->| rr 10.0.7.1, fd00:7::1
//!                               | rn 192.168.50.254, fd00:50::fe
//!                               +----------|-----------+
//!                                          | 10.244.0.0/16, fd00:244::/32 via the node
//!  node ns                                 |
//!  eth0 192.168.50.1, fd00:50::1  <--------+   (default route via the router)
//!  cni0 (bridge) 10.244.0.1/24, fd00:244::1/64
//!    veth0b -- bridge pod 0: eth0 10.244.0.2, fd00:244::2 (default via cni0)
//!    veth1b -- bridge pod 1: eth0 10.244.0.3, fd00:244::3
//!  caliN (no address; proxy ARP; 10.244.1.(N+2)/32 and fd00:244:1::(N+2)/128 routes)
//!    -- routed pod N: eth0 10.244.1.(N+2)/32, fd00:244:1::(N+2)/128,
//!       default via 169.254.1.1 / fe80::ecee:eeff:feee:eeee (the node's veth)
//! ```
//!
//! Every namespace is the test's own and is deleted on drop; interface names
//! are fixed because namespaces are isolated, namespace names carry the
//! test's unique prefix. Routed pods are added with
//! [`EmulatedNode::add_routed_pod`], before or after the agent starts.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{netns::Netns, twonode::wait_up};

/// The node's uplink and the leaves' interface name.
pub const UPLINK: &str = "eth0";
/// The bridge CNI's bridge.
pub const BRIDGE: &str = "cni0";
/// The node's address on its uplink (its InternalIP).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
const ROUTER_NODE_SIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 254);
const ROUTER_NODE_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0xfe);
/// The client outside the cluster.
pub const EXTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
pub const EXTERNAL_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 2);
/// The API server's address the agent is told (`--kube-apiserver`).
pub const APISERVER_DIRECT: Ipv4Addr = Ipv4Addr::new(10, 0, 8, 2);
/// The API server's address in the kubernetes Service's EndpointSlice: the
/// same server, so the node can lose its route to the direct address and
/// still reach the server through the Service.
pub const APISERVER_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 0, 8, 3);
pub const APISERVER_PORT: u16 = 6443;
/// A backend on another node, behind the router.
pub const REMOTE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 7, 2);
pub const REMOTE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 7, 0, 0, 0, 0, 0, 2);
/// The bridge's address, the bridge pods' gateway.
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const BRIDGE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
/// The routed pods' gateway: nobody has it, the node answers ARP for it.
pub const ROUTED_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The MAC of every node-side routed veth, and the link-local address it
/// makes, the routed pods' IPv6 gateway.
const ROUTED_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const ROUTED_GATEWAY6: Ipv6Addr =
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// How many bridge pods there are.
pub const BRIDGE_PODS: usize = 2;

/// Bridge pod `i`'s address: 10.244.0.(i+2).
pub fn bridge_pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, host_octet(i))
}

pub fn bridge_pod_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, u16::from(host_octet(i)))
}

/// Routed pod `i`'s address: 10.244.1.(i+2).
pub fn routed_pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, host_octet(i))
}

pub fn routed_pod_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, u16::from(host_octet(i)))
}

/// The node-side interface of bridge pod `i` (a port of `cni0`).
pub fn bridge_port(i: usize) -> String {
    format!("veth{i}b")
}

/// The node-side interface of routed pod `i`.
pub fn routed_iface(i: usize) -> String {
    format!("cali{i}")
}

fn host_octet(i: usize) -> u8 {
    u8::try_from(i + 2).unwrap_or(u8::MAX)
}

/// At most this many routed pods fit the plan.
const MAX_ROUTED: usize = 200;

/// The built node and its surroundings; dropping it deletes every namespace.
pub struct EmulatedNode {
    pub node: Netns,
    pub router: Netns,
    pub external: Netns,
    pub control_plane: Netns,
    pub remote: Netns,
    pub bridge_pods: Vec<Netns>,
    pub routed_pods: Vec<Netns>,
    prefix: String,
}

impl EmulatedNode {
    /// Builds everything but the routed pods; namespaces are named
    /// `{prefix}` plus a role letter.
    pub fn build(prefix: &str) -> Result<EmulatedNode> {
        let ns = |role: &str| Netns::create(&format!("{prefix}{role}"));
        let built = EmulatedNode {
            node: ns("n")?,
            router: ns("r")?,
            external: ns("x")?,
            control_plane: ns("c")?,
            remote: ns("e")?,
            bridge_pods: (0..BRIDGE_PODS)
                .map(|i| ns(&format!("b{i}")))
                .collect::<Result<_>>()?,
            routed_pods: Vec::new(),
            prefix: prefix.to_string(),
        };
        built.wire().context("wiring the emulated node")?;
        Ok(built)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn wire(&self) -> Result<()> {
        for ns in [&self.router, &self.node] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            // NodePort traffic to a backend behind the router leaves through
            // the interface it came in on: no redirects for that.
            ns.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
            ns.sysctl("net.ipv4.conf.default.send_redirects", "0")?;
        }
        // Addresses (link-local ones included) usable at once.
        for ns in self.all() {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        }

        // Router and its leaves.
        self.leaf(
            "rx",
            &self.external,
            &["10.0.9.1/24", "2001:db8:9::1/64"],
            &[
                format!("{EXTERNAL_ADDR}/24"),
                format!("{EXTERNAL_ADDR6}/64"),
            ],
        )?;
        self.leaf(
            "rc",
            &self.control_plane,
            &["10.0.8.1/24"],
            &[
                format!("{APISERVER_DIRECT}/24"),
                format!("{APISERVER_ENDPOINT}/24"),
            ],
        )?;
        self.leaf(
            "rr",
            &self.remote,
            &["10.0.7.1/24", "fd00:7::1/64"],
            &[format!("{REMOTE_ADDR}/24"), format!("{REMOTE_ADDR6}/64")],
        )?;

        // The node's uplink; its default routes make it `auto`.
        self.leaf(
            "rn",
            &self.node,
            &[
                &format!("{ROUTER_NODE_SIDE}/24"),
                &format!("{ROUTER_NODE_SIDE6}/64"),
            ],
            &[format!("{NODE_ADDR}/24"), format!("{NODE_ADDR6}/64")],
        )?;
        self.router.ip(&[
            "route",
            "add",
            "10.244.0.0/16",
            "via",
            &NODE_ADDR.to_string(),
        ])?;
        self.router.ip(&[
            "-6",
            "route",
            "add",
            "fd00:244::/32",
            "via",
            &NODE_ADDR6.to_string(),
        ])?;

        // The bridge CNI.
        self.node.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        addr(&self.node, BRIDGE, &format!("{BRIDGE_ADDR}/24"))?;
        addr(&self.node, BRIDGE, &format!("{BRIDGE_ADDR6}/64"))?;
        self.node.ip(&["link", "set", BRIDGE, "up"])?;
        for (i, pod) in self.bridge_pods.iter().enumerate() {
            let port = bridge_port(i);
            self.node.add_veth(&port, pod, UPLINK)?;
            self.node
                .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
            addr(pod, UPLINK, &format!("{}/24", bridge_pod_addr(i)))?;
            addr(pod, UPLINK, &format!("{}/64", bridge_pod_addr6(i)))?;
            pod.ip(&["link", "set", UPLINK, "up"])?;
            default_route(pod, &BRIDGE_ADDR.to_string())?;
            default_route(pod, &BRIDGE_ADDR6.to_string())?;
        }

        let deadline = Instant::now() + Duration::from_secs(5);
        let mut links = vec![
            (&self.router, "rx"),
            (&self.router, "rc"),
            (&self.router, "rr"),
            (&self.router, "rn"),
            (&self.external, UPLINK),
            (&self.control_plane, UPLINK),
            (&self.remote, UPLINK),
            (&self.node, UPLINK),
            (&self.node, BRIDGE),
        ];
        links.extend(self.bridge_pods.iter().map(|p| (p, UPLINK)));
        for (ns, iface) in links {
            wait_up(ns, iface, deadline)?;
        }
        for i in 0..BRIDGE_PODS {
            wait_up(&self.node, &bridge_port(i), deadline)?;
        }
        Ok(())
    }

    /// Joins `leaf` to the router: a veth from the router's `router_if` to
    /// the leaf's uplink, the router's `gateways` and the leaf's `addresses`
    /// (CIDRs) on it, and the leaf's default route via each gateway.
    fn leaf(
        &self,
        router_if: &str,
        leaf: &Netns,
        gateways: &[&str],
        addresses: &[String],
    ) -> Result<()> {
        veth(&self.router, router_if, leaf, UPLINK)?;
        for cidr in gateways {
            addr(&self.router, router_if, cidr)?;
        }
        for cidr in addresses {
            addr(leaf, UPLINK, cidr)?;
        }
        for cidr in gateways {
            default_route(leaf, cidr.split('/').next().unwrap_or(cidr))?;
        }
        Ok(())
    }

    fn all(&self) -> Vec<&Netns> {
        let mut all = vec![
            &self.node,
            &self.router,
            &self.external,
            &self.control_plane,
            &self.remote,
        ];
        all.extend(&self.bridge_pods);
        all.extend(&self.routed_pods);
        all
    }

    /// A pod as a routed-veth CNI (Calico) makes one: namespace `{prefix}vN`,
    /// veth `caliN` in the node with no address, proxy ARP and host routes
    /// to the pod's /32 and /128; the pod's default routes via a link-local
    /// gateway the node answers for. Returns N once the pod's link is up.
    pub fn add_routed_pod(&mut self) -> Result<usize> {
        let i = self.routed_pods.len();
        if i >= MAX_ROUTED {
            bail!("at most {MAX_ROUTED} routed pods fit the plan");
        }
        let pod = Netns::create(&format!("{}v{i}", self.prefix))?;
        pod.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        pod.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        self.routed_pods.push(pod);
        self.wire_routed_pod(i)
            .with_context(|| format!("wiring routed pod {i}"))
            .inspect_err(|_| drop(self.routed_pods.pop()))?;
        Ok(i)
    }

    fn wire_routed_pod(&self, i: usize) -> Result<()> {
        let pod = &self.routed_pods[i];
        let iface = routed_iface(i);
        let node = &self.node;
        node.ip(&[
            "link",
            "add",
            &iface,
            "address",
            ROUTED_MAC,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK,
            "netns",
            pod.name(),
        ])?;
        node.sysctl(&format!("net/ipv4/conf/{iface}/proxy_arp"), "1")?;
        // Answer at once, not after up to 0.8 s.
        node.sysctl(&format!("net/ipv4/neigh/{iface}/proxy_delay"), "0")?;
        node.ip(&["link", "set", &iface, "up"])?;
        let (v4, v6) = (routed_pod_addr(i), routed_pod_addr6(i));
        node.ip(&["route", "add", &format!("{v4}/32"), "dev", &iface])?;
        node.ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", &iface])?;
        addr(pod, UPLINK, &format!("{v4}/32"))?;
        addr(pod, UPLINK, &format!("{v6}/128"))?;
        pod.ip(&["link", "set", UPLINK, "up"])?;
        let gateway = ROUTED_GATEWAY.to_string();
        pod.ip(&["route", "add", &gateway, "dev", UPLINK, "scope", "link"])?;
        pod.ip(&["route", "add", "default", "via", &gateway, "dev", UPLINK])?;
        pod.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ROUTED_GATEWAY6.to_string(),
            "dev",
            UPLINK,
        ])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        wait_up(node, &iface, deadline)?;
        wait_up(pod, UPLINK, deadline)
    }
}

/// A veth pair from `a_if` in `a` to `b_if` in `b`, both ends up.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.add_veth(a_if, b, b_if)?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// The default route of `gateway`'s family in `ns`.
fn default_route(ns: &Netns, gateway: &str) -> Result<()> {
    let family = if gateway.contains(':') { "-6" } else { "-4" };
    ns.ip(&[family, "route", "add", "default", "via", gateway])?;
    Ok(())
}

/// An address (IPv6 ones without duplicate address detection).
fn addr(ns: &Netns, iface: &str, cidr: &str) -> Result<()> {
    if cidr.contains(':') {
        ns.ip(&["addr", "add", cidr, "dev", iface, "nodad"])?;
    } else {
        ns.ip(&["addr", "add", cidr, "dev", iface])?;
    }
    Ok(())
}
