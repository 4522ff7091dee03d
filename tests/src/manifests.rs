//! Service and EndpointSlice YAML for the topologies' addresses, written the
//! way an operator's tooling would (atomically, by rename).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context;

use crate::{
    agent::NODE_NAME,
    topology::{CLIENT_GATEWAY6, backend_addr, backend_addr6},
    twonode::{LB_ADDR, LB_ADDR6, NODE_NAMES, node_addr, node_addr6, pod_addr, pod_addr6},
};

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
    let endpoints = ready(backends.iter().map(|i| backend_addr(*i)));
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

/// Endpoint entries, one a ready address.
fn ready<A: std::fmt::Display>(addrs: impl IntoIterator<Item = A>) -> String {
    addrs
        .into_iter()
        .map(|a| format!("  - addresses: [\"{a}\"]\n    conditions: {{ready: true}}\n"))
        .collect()
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
    let node = node(
        NODE_NAME,
        &[
            ("InternalIP", NODE_ADDR.to_string()),
            ("Hostname", NODE_NAME.to_string()),
        ],
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
    let endpoints6 = ready(backends.iter().map(|i| backend_addr6(*i)));
    let slice6 = slice(&[])
        .replace("name: web-1", "name: web-v6")
        .replace("addressType: IPv4", "addressType: IPv6")
        .replace("endpoints: []\n", &format!("endpoints:\n{endpoints6}"));
    let node = node(
        NODE_NAME,
        &[
            ("InternalIP", NODE_ADDR.to_string()),
            ("InternalIP", CLIENT_GATEWAY6.to_string()),
        ],
    );
    format!("{service}---\n{}---\n{slice6}---\n{node}", slice(backends))
}

/// Service and slice as one multi-document file.
pub fn web(backends: &[usize]) -> String {
    format!("{}---\n{}", service(), slice(backends))
}

/// `web` and `count` more Services (`many/svc{i}`, TCP 80 on `many_vip(i)`),
/// each with one of `backends` (in turn) ready behind it.
pub fn many(count: usize, backends: &[usize]) -> String {
    let mut out = web(backends);
    for i in 0..count {
        let vip = many_vip(i);
        let backend = backend_addr(backends[i % backends.len()]);
        out.push_str(&format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: svc{i}, namespace: many}}
spec:
  clusterIP: {vip}
  clusterIPs: ["{vip}"]
  ports: [{{name: http, protocol: TCP, port: {HTTP_PORT}, targetPort: http}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc{i}-1
  namespace: many
  labels: {{kubernetes.io/service-name: svc{i}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {BACKEND_HTTP_PORT}}}]
endpoints:
{}"#,
            ready([backend])
        ));
    }
    out
}

/// The cluster IP of `many`'s i-th Service (clear of `VIP`).
pub fn many_vip(i: usize) -> Ipv4Addr {
    nth_vip(i + 256)
}

/// A manifest file the agent watches: `web.yaml` in a scratch directory of
/// its own, `{temp}/xdproxy-{name}`, removed with the directory on drop.
pub struct ManifestFile {
    path: PathBuf,
}

impl ManifestFile {
    /// Creates the directory and writes `text` into the file.
    pub fn new(name: &str, text: &str) -> anyhow::Result<ManifestFile> {
        let dir = std::env::temp_dir().join(format!("xdproxy-{name}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = ManifestFile {
            path: dir.join("web.yaml"),
        };
        file.write(text)?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scratch directory, for other files a test needs.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(&self.path)
    }

    /// Replaces the text, atomically.
    pub fn write(&self, text: &str) -> anyhow::Result<()> {
        write(&self.path, text)
    }
}

impl Drop for ManifestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// Replaces `path` atomically so the agent never reads half a file.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------------------
// How each kind of object is written, once. The fixtures below put their
// specs and endpoints into these.

/// A Service: `metadata` (a flow mapping), then `body` (spec and status).
fn service_doc(metadata: &str, body: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {metadata}\n{body}")
}

/// The metadata of object `name` in namespace `demo`, with `more` (such as
/// `, annotations: {…}`) inside the mapping.
fn in_demo(name: &str, more: &str) -> String {
    format!("{{name: {name}, namespace: demo{more}}}")
}

/// EndpointSlice `name` in namespace `demo` of Service `service`, with
/// addressType `family`, then `body` (ports and endpoints).
fn slice_doc(name: &str, service: &str, family: &str, body: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\n{body}"
    )
}

/// A Node `name` with `addresses` (type, address) in its status.
pub fn node(name: &str, addresses: &[(&str, String)]) -> String {
    let mut out = format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n");
    if !addresses.is_empty() {
        out.push_str("status:\n  addresses:\n");
        for (kind, address) in addresses {
            out.push_str(&format!("    - {{type: {kind}, address: \"{address}\"}}\n"));
        }
    }
    out
}

/// A LoadBalancer's status: its `ingress` list.
fn ingress(ips: &str) -> String {
    format!("status:\n  loadBalancer:\n    ingress: [{ips}]\n")
}

/// `endpoints:` one line `- addresses: [a]` for each address.
fn endpoints<A: std::fmt::Display>(addrs: impl IntoIterator<Item = A>) -> String {
    let lines: String = addrs
        .into_iter()
        .map(|a| format!("  - addresses: [{a}]\n"))
        .collect();
    format!("endpoints:\n{lines}")
}

/// `endpoints:` with each address on its node: `- {addresses: [a], nodeName: n}`.
fn endpoints_on(addrs: &[(&str, &str)]) -> String {
    let lines: String = addrs
        .iter()
        .map(|(a, node)| format!("  - {{addresses: [{a}], nodeName: {node}}}\n"))
        .collect();
    format!("endpoints:\n{lines}")
}

/// Objects as one multi-document file, after a blank first line.
fn documents(docs: &[String]) -> String {
    format!("\n{}", docs.join("---\n"))
}

/// `web`'s ports: TCP 80 and UDP 53 ...
const WEB_PORTS: &str = "  ports:\n    - {name: http, protocol: TCP, port: 80}\n    - {name: dns, protocol: UDP, port: 53}\n";
/// ... served by its endpoints on 8080 and 5353.
const WEB_ENDPOINT_PORTS: &str = "ports:\n  - {name: http, protocol: TCP, port: 8080}\n  - {name: dns, protocol: UDP, port: 5353}\n";
/// An HTTP-only Service's port, TCP 80 ...
const HTTP_PORTS: &str = "  ports: [{name: http, protocol: TCP, port: 80}]\n";
/// ... served on 8080.
const HTTP_ENDPOINT_PORTS: &str = "ports: [{name: http, protocol: TCP, port: 8080}]\n";

// ---------------------------------------------------------------------------
// The BPF_PROG_TEST_RUN tests' Services and EndpointSlices (programmed
// through the model, so the addresses are fixed in the text).

/// `web` (TCP 80 -> 8080, UDP 53 -> 5353, two IPv4 backends) and `empty`
/// (TCP 80, no endpoints): datapath.rs.
pub fn web_and_empty() -> String {
    documents(&[
        service_doc(
            &in_demo("web", ""),
            &format!("spec:\n  clusterIP: 10.96.0.10\n{WEB_PORTS}"),
        ),
        service_doc(
            &in_demo("empty", ""),
            &format!("spec:\n  clusterIP: 10.96.0.20\n{HTTP_PORTS}"),
        ),
        slice_doc(
            "web-1",
            "web",
            "IPv4",
            &format!(
                "{WEB_ENDPOINT_PORTS}{}",
                endpoints(["10.1.1.2", "10.1.2.2"])
            ),
        ),
    ])
}

/// `lb`: a LoadBalancer on 198.51.100.1 (cluster IP 10.96.0.30, TCP 80 ->
/// 8080) with `policy` lines and `ports` in its spec, and its slice of
/// `backends` (address, node).
fn lb(policy: &str, ports: &str, backends: &[(&str, &str)]) -> [String; 2] {
    [
        service_doc(
            &in_demo("lb", ""),
            &format!(
                "spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.30\n{policy}{ports}{}",
                ingress("{ip: 198.51.100.1}")
            ),
        ),
        slice_doc(
            "lb-1",
            "lb",
            "IPv4",
            &format!("{HTTP_ENDPOINT_PORTS}{}", endpoints_on(backends)),
        ),
    ]
}

/// `lb`: a LoadBalancer (198.51.100.1, cluster IP 10.96.0.30) with
/// externalTrafficPolicy Local and source ranges, one backend on node `here`
/// and one on `there`: datapath.rs.
pub fn load_balancer() -> String {
    documents(&lb(
        "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [10.0.1.0/24]\n",
        HTTP_PORTS,
        &[("10.1.1.2", "here"), ("10.1.2.2", "there")],
    ))
}

/// `web` as a NodePort (30080, 30053) with two IPv6 backends, and `empty`
/// (TCP 80, UDP 53, no endpoints), both dual-stack: datapath6.rs.
pub fn web_and_empty6() -> String {
    documents(&[
        service_doc(
            &in_demo("web", ""),
            r#"spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
    - {name: http, protocol: TCP, port: 80, nodePort: 30080}
    - {name: dns, protocol: UDP, port: 53, nodePort: 30053}
"#,
        ),
        service_doc(
            &in_demo("empty", ""),
            r#"spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ports: [{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]
"#,
        ),
        slice_doc(
            "web-v6",
            "web",
            "IPv6",
            &format!(
                "{WEB_ENDPOINT_PORTS}{}",
                endpoints(["\"fd00:1:1::2\"", "\"fd00:1:2::2\""])
            ),
        ),
    ])
}

/// `lb` over IPv6 (2001:db8:100::1) with ClientIP affinity and source
/// ranges, one backend on node `here` and one on `there`: datapath6.rs.
pub fn load_balancer6() -> String {
    documents(&[
        service_doc(
            &in_demo("lb", ""),
            &format!(
                r#"spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:96::30"]
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: ["2001:db8:9::/48"]
{HTTP_PORTS}{}"#,
                ingress(r#"{ip: "2001:db8:100::1"}"#)
            ),
        ),
        slice_doc(
            "lb-v6",
            "lb",
            "IPv6",
            &format!(
                "{HTTP_ENDPOINT_PORTS}{}",
                endpoints_on(&[("\"fd00:1:1::2\"", "here"), ("\"fd00:1:2::2\"", "there")])
            ),
        ),
    ])
}

/// `web` (a cluster IP of each family) and `lb` (a LoadBalancer whose
/// external clients are source-NATed to the node), one backend each.
pub fn web_dual_and_lb() -> String {
    let [lb, lb_slice] = lb("", HTTP_PORTS, &[("10.1.1.2", "here")]);
    documents(&[
        service_doc(
            &in_demo("web", ""),
            &format!(
                "spec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n{WEB_PORTS}"
            ),
        ),
        slice_doc(
            "web-1",
            "web",
            "IPv4",
            &format!("{WEB_ENDPOINT_PORTS}{}", endpoints(["10.1.1.2"])),
        ),
        slice_doc(
            "web-v6",
            "web",
            "IPv6",
            &format!("{WEB_ENDPOINT_PORTS}{}", endpoints(["\"fd00:1:1::2\""])),
        ),
        lb,
        lb_slice,
    ])
}

/// One backend per family: every new flow goes to it.
pub fn dns_dual() -> String {
    let ports = "ports: [{name: dns, protocol: UDP, port: 5353}]\n";
    documents(&[
        service_doc(
            &in_demo("dns", ""),
            r#"spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports: [{name: dns, protocol: UDP, port: 53}]
"#,
        ),
        slice_doc(
            "dns-v4",
            "dns",
            "IPv4",
            &format!("{ports}endpoints: [{{addresses: [10.1.1.2]}}]\n"),
        ),
        slice_doc(
            "dns-v6",
            "dns",
            "IPv6",
            &format!("{ports}endpoints: [{{addresses: [\"fd00:1:1::2\"]}}]\n"),
        ),
    ])
}

/// Five IPv4 backends, for the Services below.
pub const FIVE_BACKENDS: [[u8; 4]; 5] = [
    [10, 1, 0, 1],
    [10, 1, 0, 2],
    [10, 1, 0, 3],
    [10, 1, 0, 4],
    [10, 1, 0, 5],
];

/// The conditions of an endpoint whose Pod is being deleted.
const TERMINATING: &str = "    conditions: {ready: false, serving: true, terminating: true}\n";

/// How an endpoint appears in the slice.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Ready,
    /// ready: false, serving: true, terminating: true.
    Terminating,
}

/// `web` on cluster IP `vip` (TCP 80 -> 8080, UDP 53 -> 5353) with the
/// given `xdproxy.io/lb-algorithm` and endpoints: balancing.rs.
pub fn balanced_web(vip: [u8; 4], algorithm: &str, listed: &[([u8; 4], Listed)]) -> String {
    let mut out = documents(&[
        service_doc(
            &in_demo(
                "web",
                &format!(", annotations: {{\"xdproxy.io/lb-algorithm\": \"{algorithm}\"}}"),
            ),
            &format!("spec:\n  clusterIP: {}\n{WEB_PORTS}", Ipv4Addr::from(vip)),
        ),
        slice_doc(
            "web-1",
            "web",
            "IPv4",
            &format!("{WEB_ENDPOINT_PORTS}endpoints:\n"),
        ),
    ]);
    for (addr, kind) in listed {
        out.push_str(&format!("  - addresses: [{}]\n", Ipv4Addr::from(*addr)));
        if *kind == Listed::Terminating {
            out.push_str(TERMINATING);
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
    documents(&[
        String::new(),
        service_doc(
            &in_demo(name, &format!(", annotations: {annotations}")),
            &format!(
                "spec:\n  clusterIP: {}\n  externalIPs: [{}]\n{HTTP_PORTS}",
                Ipv4Addr::from(vip),
                ips.join(", ")
            ),
        ),
        slice_doc(
            &format!("{name}-1"),
            name,
            "IPv4",
            &format!(
                "{HTTP_ENDPOINT_PORTS}{}",
                endpoints(backends.iter().map(|a| Ipv4Addr::from(*a)))
            ),
        ),
    ])
}

/// A Service `dead` on `vip` (TCP 80 -> 8080) whose only endpoint,
/// `endpoint`, nobody holds, as a document after others: overflow.rs.
pub fn dead_service(vip: Ipv4Addr, endpoint: Ipv4Addr) -> String {
    documents(&[
        String::new(),
        service_doc(
            &in_demo("dead", ""),
            &format!("spec:\n  clusterIP: {vip}\n{HTTP_PORTS}"),
        ),
        slice_doc(
            "dead-1",
            "dead",
            "IPv4",
            &format!("{HTTP_ENDPOINT_PORTS}endpoints: [{{addresses: [{endpoint}]}}]\n"),
        ),
    ])
}

// ---------------------------------------------------------------------------
// The two-node topology's objects (twonode.rs).

/// Services, slices and both Node objects for the two-node topology: `web`
/// (TCP 80 -> 8080, UDP 53 -> 5353), dual-stack, with one endpoint per pod
/// in each family's slice, as a LoadBalancer (an ingress address of each
/// family) with node ports 30080/30053, health check node port 32000, and
/// `extra` lines added to its spec.
pub fn two_nodes(extra_spec: &str) -> String {
    let mut docs: Vec<String> = (0..NODE_NAMES.len())
        .map(|n| {
            node(
                NODE_NAMES[n],
                &[
                    ("InternalIP", node_addr(n).to_string()),
                    ("InternalIP", node_addr6(n).to_string()),
                ],
            )
        })
        .collect();
    docs.push(service_doc(
        &in_demo("web", ""),
        &format!(
            r#"spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilyPolicy: RequireDualStack
  healthCheckNodePort: 32000
{extra_spec}  ports:
    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}}
    - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}
{}"#,
            ingress(&format!("{{ip: \"{LB_ADDR}\"}}, {{ip: \"{LB_ADDR6}\"}}"))
        ),
    ));
    for (name, family, pods) in [
        ("web-1", "IPv4", [0, 1].map(|n| pod_addr(n).to_string())),
        ("web-v6", "IPv6", [0, 1].map(|n| pod_addr6(n).to_string())),
    ] {
        let quoted = pods.map(|a| format!("\"{a}\""));
        let on_nodes = [0, 1].map(|n| (quoted[n].as_str(), NODE_NAMES[n]));
        docs.push(slice_doc(
            name,
            "web",
            family,
            &format!("{WEB_ENDPOINT_PORTS}{}", endpoints_on(&on_nodes)),
        ));
    }
    docs.join("---\n")
}

// ---------------------------------------------------------------------------
// `proxy-agent plan`'s inputs (proxy-agent/tests/plan.rs).

/// Service `default/bad` with port 0, which validation rejects.
pub fn plan_bad_port() -> String {
    service_doc(
        "{name: bad}",
        "spec: {clusterIP: 10.96.0.1, ports: [{port: 0}]}\n",
    )
}

/// Service `name` on `vip` (port 80 -> 8080) with `policy` (a spec field)
/// and its slice of `endpoints` (flow mappings).
fn plan_service(name: &str, vip: &str, policy: &str, endpoints: &[&str]) -> String {
    [
        service_doc(
            &in_demo(name, ""),
            &format!("spec: {{clusterIP: {vip}, {policy}, ports: [{{port: 80}}]}}\n"),
        ),
        slice_doc(
            &format!("{name}-1"),
            name,
            "IPv4",
            &format!(
                "ports: [{{port: 8080}}]\nendpoints: [{}]\n",
                endpoints.join(", ")
            ),
        ),
    ]
    .join("---\n")
}

/// `loc` (10.96.0.40) with internalTrafficPolicy Local, an endpoint on node
/// `n1` (10.1.1.2) and one on `n2` (10.1.2.2).
pub fn plan_node_local() -> String {
    plan_service(
        "loc",
        "10.96.0.40",
        "internalTrafficPolicy: Local",
        &[
            "{addresses: [10.1.1.2], nodeName: n1}",
            "{addresses: [10.1.2.2], nodeName: n2}",
        ],
    )
}

/// `z` (10.96.0.50) with trafficDistribution PreferClose, an endpoint
/// hinted for zone `a` (10.1.1.2) and one for `b` (10.1.2.2).
pub fn plan_zones() -> String {
    plan_service(
        "z",
        "10.96.0.50",
        "trafficDistribution: PreferClose",
        &[
            "{addresses: [10.1.1.2], hints: {forZones: [{name: a}]}}",
            "{addresses: [10.1.2.2], hints: {forZones: [{name: b}]}}",
        ],
    )
}

/// Node `n1` (10.0.0.1, external 203.0.113.7) and `lb`: externalTrafficPolicy
/// Local, health check node port 32000, ClientIP affinity, source range
/// 192.0.2.0/24, node port 30080, one endpoint on `n1` and one on `n2`.
pub fn plan_load_balancer() -> String {
    let [lb, lb_slice] = lb(
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  sessionAffinity: ClientIP\n  loadBalancerSourceRanges: [192.0.2.0/24]\n",
        "  ports: [{name: http, protocol: TCP, port: 80, nodePort: 30080}]\n",
        &[("10.1.1.2", "n1"), ("10.1.2.2", "n2")],
    );
    let n1 = node(
        "n1",
        &[
            ("InternalIP", "10.0.0.1".into()),
            ("ExternalIP", "203.0.113.7".into()),
        ],
    );
    documents(&[n1, lb, lb_slice])
}

/// `web` (10.96.0.20) annotated for Maglev with a table of 251, with a ready
/// endpoint (10.1.1.2) and a terminating one (10.1.2.2), and `api`
/// (10.96.0.21) without annotations and endpoints.
pub fn plan_annotated() -> String {
    let spec = |vip: &str| {
        format!("spec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n")
    };
    documents(&[
        service_doc(
            &in_demo(
                "web",
                ", annotations: {xdproxy.io/lb-algorithm: maglev, xdproxy.io/maglev-table-size: \"251\"}",
            ),
            &spec("10.96.0.20"),
        ),
        service_doc(&in_demo("api", ""), &spec("10.96.0.21")),
        slice_doc(
            "web-1",
            "web",
            "IPv4",
            &format!(
                "{HTTP_ENDPOINT_PORTS}endpoints:\n  - addresses: [10.1.1.2]\n    conditions: {{ready: true}}\n  - addresses: [10.1.2.2]\n{TERMINATING}"
            ),
        ),
    ])
}

/// `big` (10.96.0.20): Maglev with tables of 131071 for each of three ports
/// with their own target ports, 40 external IPs, one endpoint.
pub fn plan_over_budget() -> String {
    let ips: Vec<String> = (1..=40).map(|i| format!("203.0.113.{i}")).collect();
    documents(&[
        service_doc(
            &in_demo(
                "big",
                ", annotations: {\"xdproxy.io/lb-algorithm\": \"maglev\", \"xdproxy.io/maglev-table-size\": \"131071\"}",
            ),
            &format!(
                "spec:\n  clusterIP: 10.96.0.20\n  externalIPs: [{}]\n  ports: [{{name: a, port: 80}}, {{name: b, port: 81}}, {{name: c, port: 82}}]\n",
                ips.join(", ")
            ),
        ),
        slice_doc(
            "big-1",
            "big",
            "IPv4",
            "ports: [{name: a, port: 8080}, {name: b, port: 8081}, {name: c, port: 8082}]\nendpoints: [{addresses: [10.1.1.2]}]\n",
        ),
    ])
}
