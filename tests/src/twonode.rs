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

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 2);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
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
        }
        self.router.ip(&[
            "route",
            "add",
            &format!("{LB_ADDR}/32"),
            "via",
            &node_addr(0).to_string(),
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

/// A veth pair from `a` to `b`, both ends addressed and up.
fn veth(a: (&Netns, &str, &str), b: (&Netns, &str, &str), prefix: u8) -> Result<()> {
    let (a_ns, a_if, a_addr) = a;
    let (b_ns, b_if, b_addr) = b;
    a_ns.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b_ns.name(),
    ])?;
    a_ns.ip(&["addr", "add", &format!("{a_addr}/{prefix}"), "dev", a_if])?;
    b_ns.ip(&["addr", "add", &format!("{b_addr}/{prefix}"), "dev", b_if])?;
    a_ns.ip(&["link", "set", "dev", a_if, "up"])?;
    b_ns.ip(&["link", "set", "dev", b_if, "up"])?;
    Ok(())
}

fn wait_up(ns: &Netns, iface: &str, deadline: Instant) -> Result<()> {
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

/// Services, slices and both Node objects for the two-node topology: `web`
/// (TCP 80 -> 8080, UDP 53 -> 5353) with one endpoint per pod, as a
/// LoadBalancer with node ports 30080/30053, health check node port 32000,
/// and `extra` lines added to its spec.
pub fn manifests(extra_spec: &str) -> String {
    let mut out = String::new();
    for (n, name) in NODE_NAMES.iter().enumerate() {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{}\"}}]\n---\n",
            node_addr(n)
        ));
    }
    out.push_str(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  healthCheckNodePort: 32000
{extra_spec}  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}
status:
  loadBalancer:
    ingress: [{{ip: "{LB_ADDR}"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, protocol: TCP, port: 8080}}
  - {{name: dns, protocol: UDP, port: 5353}}
endpoints:
  - {{addresses: ["{}"], nodeName: {}}}
  - {{addresses: ["{}"], nodeName: {}}}
"#,
        pod_addr(0),
        NODE_NAMES[0],
        pod_addr(1),
        NODE_NAMES[1]
    ));
    out
}
