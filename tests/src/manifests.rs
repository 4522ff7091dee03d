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
