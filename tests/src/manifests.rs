//! Service and EndpointSlice YAML for the topologies' addresses, written the
//! way an operator's tooling would (atomically, by rename).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context;

use crate::topology::{CLIENT_GATEWAY6, backend_addr, backend_addr6};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const BACKEND_HTTP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;

/// The i-th of many Service VIPs: 10.(96 + i / 65536).(i / 256 % 256).(i % 256).
pub fn nth_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        96 + (i / 65_536) as u8,
        (i / 256 % 256) as u8,
        (i % 256) as u8,
    )
}

/// Service `demo/web` (TCP 80 -> http, UDP 53 -> 5353).
pub fn service() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
    - {{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: http}}
    - {{name: dns, protocol: UDP, port: {UDP_PORT}, targetPort: {BACKEND_UDP_PORT}}}
"#
    )
}

/// The EndpointSlice of `demo/web` with the given topology backends ready.
pub fn slice(backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|i| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
                backend_addr(*i)
            )
        })
        .collect();
    let endpoints = if endpoints.is_empty() {
        "[]\n".to_string()
    } else {
        format!("\n{endpoints}")
    };
    format!(
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}
  - {{name: dns, protocol: UDP, port: {BACKEND_UDP_PORT}}}
endpoints: {endpoints}"#
    )
}

/// This node's address on the client side, where NodePorts are reached.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const HTTP_NODE_PORT: u16 = 30080;
pub const UDP_NODE_PORT: u16 = 30053;

/// `demo/web` as a NodePort Service (with its cluster IP too), its slice,
/// and the Node object that tells the agent its addresses.
pub fn web_node_port(backends: &[usize]) -> String {
    let service = service()
        .replace("spec:\n", "spec:\n  type: NodePort\n")
        .replace(
            "targetPort: http}",
            &format!("targetPort: http, nodePort: {HTTP_NODE_PORT}}}"),
        )
        .replace(
            &format!("targetPort: {BACKEND_UDP_PORT}}}"),
            &format!("targetPort: {BACKEND_UDP_PORT}, nodePort: {UDP_NODE_PORT}}}"),
        );
    let node = format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: {}}}
status:
  addresses:
    - {{type: InternalIP, address: "{NODE_ADDR}"}}
    - {{type: Hostname, address: {}}}
"#,
        crate::agent::NODE_NAME,
        crate::agent::NODE_NAME
    );
    format!("{service}---\n{}---\n{node}", slice(backends))
}

/// The IPv6 cluster IP of the dual-stack `web`.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

/// `demo/web` dual-stack (IPv4 and IPv6 cluster IPs, NodePorts 30080/30053),
/// its slices of both families, and the Node with an address of each.
pub fn web_dual_stack(backends: &[usize]) -> String {
    let service = web_node_port(&[])
        .split("---\n")
        .next()
        .unwrap_or_default()
        .replace(
            &format!("  clusterIPs: [\"{VIP}\"]\n"),
            &format!("  clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n  ipFamilyPolicy: RequireDualStack\n"),
        );
    let endpoints6: String = backends
        .iter()
        .map(|i| {
            format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
                backend_addr6(*i)
            )
        })
        .collect();
    let slice6 = slice(&[])
        .replace("name: web-1", "name: web-v6")
        .replace("addressType: IPv4", "addressType: IPv6")
        .replace("endpoints: []\n", &format!("endpoints:\n{endpoints6}"));
    let node = format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: {}}}
status:
  addresses:
    - {{type: InternalIP, address: "{NODE_ADDR}"}}
    - {{type: InternalIP, address: "{CLIENT_GATEWAY6}"}}
"#,
        crate::agent::NODE_NAME
    );
    format!("{service}---\n{}---\n{slice6}---\n{node}", slice(backends))
}

/// Service and slice as one multi-document file.
pub fn web(backends: &[usize]) -> String {
    format!("{}---\n{}", service(), slice(backends))
}

/// Replaces `path` atomically so the agent never reads half a file.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------------------
// The BPF_PROG_TEST_RUN tests' Services and EndpointSlices (programmed
// through the model, so the addresses are fixed in the text).

/// `web` (TCP 80 -> 8080, UDP 53 -> 5353, two IPv4 backends) and `empty`
/// (TCP 80, no endpoints): datapath.rs.
pub const WEB_AND_EMPTY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, protocol: TCP, port: 80}
    - {name: dns, protocol: UDP, port: 53}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - addresses: [10.1.1.2]
  - addresses: [10.1.2.2]
"#;

/// `lb`: a LoadBalancer (198.51.100.1, cluster IP 10.96.0.30) with
/// externalTrafficPolicy Local and source ranges, one backend on node `here`
/// and one on `there`: datapath.rs.
pub const LOAD_BALANCER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: [10.0.1.0/24]
  ports: [{name: http, protocol: TCP, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [10.1.1.2], nodeName: here}
  - {addresses: [10.1.2.2], nodeName: there}
"#;

/// `web` as a NodePort (30080, 30053) with two IPv6 backends, and `empty`
/// (TCP 80, UDP 53, no endpoints), both dual-stack: datapath6.rs.
pub const WEB_AND_EMPTY6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
    - {name: http, protocol: TCP, port: 80, nodePort: 30080}
    - {name: dns, protocol: UDP, port: 53, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ports: [{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - addresses: ["fd00:1:1::2"]
  - addresses: ["fd00:1:2::2"]
"#;

/// `lb` over IPv6 (2001:db8:100::1) with ClientIP affinity and source
/// ranges, one backend on node `here` and one on `there`: datapath6.rs.
pub const LOAD_BALANCER6: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:96::30"]
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: ["2001:db8:9::/48"]
  ports: [{name: http, protocol: TCP, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: "2001:db8:100::1"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-v6, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv6
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: ["fd00:1:1::2"], nodeName: here}
  - {addresses: ["fd00:1:2::2"], nodeName: there}
"#;

/// `web` (a cluster IP of each family) and `lb` (a LoadBalancer whose
/// external clients are source-NATed to the node), one backend each.
pub const WEB_DUAL_AND_LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
    - {name: http, protocol: TCP, port: 80}
    - {name: dns, protocol: UDP, port: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - addresses: [10.1.1.2]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - addresses: ["fd00:1:1::2"]
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  ports: [{name: http, protocol: TCP, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: demo, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [10.1.1.2], nodeName: here}
"#;

/// One backend per family: every new flow goes to it.
pub const DNS_DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports: [{name: dns, protocol: UDP, port: 53}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-v4, namespace: demo, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, protocol: UDP, port: 5353}]
endpoints: [{addresses: [10.1.1.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-v6, namespace: demo, labels: {kubernetes.io/service-name: dns}}
addressType: IPv6
ports: [{name: dns, protocol: UDP, port: 5353}]
endpoints: [{addresses: ["fd00:1:1::2"]}]
"#;

/// Five IPv4 backends, for the Services below.
pub const FIVE_BACKENDS: [[u8; 4]; 5] = [
    [10, 1, 0, 1],
    [10, 1, 0, 2],
    [10, 1, 0, 3],
    [10, 1, 0, 4],
    [10, 1, 0, 5],
];

/// How an endpoint appears in the slice.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Ready,
    /// ready: false, serving: true, terminating: true.
    Terminating,
}

/// `web` on cluster IP `vip` (TCP 80 -> 8080, UDP 53 -> 5353) with the
/// given `xdproxy.io/lb-algorithm` and endpoints: balancing.rs.
pub fn balanced_web(vip: [u8; 4], algorithm: &str, endpoints: &[([u8; 4], Listed)]) -> String {
    let mut out = format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  annotations: {{"xdproxy.io/lb-algorithm": "{algorithm}"}}
spec:
  clusterIP: {vip}
  ports:
    - {{name: http, protocol: TCP, port: 80}}
    - {{name: dns, protocol: UDP, port: 53}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports:
  - {{name: http, protocol: TCP, port: 8080}}
  - {{name: dns, protocol: UDP, port: 5353}}
endpoints:
"#,
        vip = Ipv4Addr::from(vip)
    );
    for (addr, kind) in endpoints {
        out.push_str(&format!("  - addresses: [{}]\n", Ipv4Addr::from(*addr)));
        if *kind == Listed::Terminating {
            out.push_str("    conditions: {ready: false, serving: true, terminating: true}\n");
        }
    }
    out
}

/// Service `name` on cluster IP `vip` and `externals` external IPs (TCP
/// 80 -> 8080), with `annotations` (YAML flow mapping) and `backends`,
/// as a document after others: slots.rs.
pub fn web_on_externals(
    name: &str,
    vip: [u8; 4],
    externals: &[[u8; 4]],
    annotations: &str,
    backends: &[[u8; 4]],
) -> String {
    let ips: Vec<String> = externals
        .iter()
        .map(|a| Ipv4Addr::from(*a).to_string())
        .collect();
    let mut out = format!(
        r#"
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: demo
  annotations: {annotations}
spec:
  clusterIP: {vip}
  externalIPs: [{ips}]
  ports:
    - {{name: http, protocol: TCP, port: 80}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
  - {{name: http, protocol: TCP, port: 8080}}
endpoints:
"#,
        vip = Ipv4Addr::from(vip),
        ips = ips.join(", ")
    );
    for addr in backends {
        out.push_str(&format!("  - addresses: [{}]\n", Ipv4Addr::from(*addr)));
    }
    out
}
