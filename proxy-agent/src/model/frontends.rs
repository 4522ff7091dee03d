//! Frontends: every address, port and protocol a Service is reached at on
//! this node, and the state each gets (backends from `endpoints`, policies,
//! source ranges, balancing).

use std::net::{IpAddr, SocketAddr};

use crate::kinds::{EndpointSlice, Service};
use serde::Serialize;

use super::{
    endpoints::PortEndpoints,
    node::ThisNode,
    objects::{ObjectKey, affinity_timeout, port_number, protocol},
};
use crate::{
    balancing::{self, Algorithm},
    cidr::Cidr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::IPPROTO_TCP,
            Protocol::Udp => proxy_common::IPPROTO_UDP,
            Protocol::Sctp => proxy_common::IPPROTO_SCTP,
        }
    }
}

/// What a client addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Which clients the entry serves.
    pub clients: Clients,
}

/// Which clients a frontend entry is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Clients {
    /// Everyone: the packet path, and local sockets unless a `Local` twin
    /// exists.
    #[default]
    All,
    /// Sockets on this node only, where they get other backends than
    /// clients elsewhere: externalTrafficPolicy: Local keeps outside
    /// traffic on this node's endpoints, while pods and processes on the
    /// node reach every endpoint (kube-proxy short-circuits them).
    Local,
}

/// How a client reaches a frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Scope {
    /// A cluster IP (`spec.clusterIPs`).
    #[default]
    ClusterIp,
    /// An address in `spec.externalIPs`.
    ExternalIp,
    /// A `status.loadBalancer.ingress` IP of a LoadBalancer Service.
    LoadBalancer,
    /// One of this node's addresses, at a `nodePort`.
    NodePort,
}

impl Scope {
    /// Traffic that comes from outside the cluster, which
    /// `externalTrafficPolicy` governs.
    pub fn is_external(self) -> bool {
        self != Scope::ClusterIp
    }

    /// An address the API server allocates (a cluster IP, a node port), as
    /// opposed to one a Service's author writes (`externalIPs`) or a load
    /// balancer reports: where both claim a frontend, the allocated one
    /// wins, so nobody can take over another Service's address
    /// (CVE-2020-8554).
    pub fn is_allocated(self) -> bool {
        matches!(self, Scope::ClusterIp | Scope::NodePort)
    }
}

/// Where a frontend's traffic goes, and which Service port asked for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FrontendState {
    pub service: ObjectKey,
    pub port_name: String,
    pub scope: Scope,
    /// Sorted, without duplicates; of the frontend's address family.
    pub backends: Vec<SocketAddr>,
    /// sessionAffinity: ClientIP, with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges of the frontend's family, for LoadBalancer
    /// frontends (empty: all sources).
    pub source_ranges: Vec<Cidr>,
    /// No backend for this frontend although the Service has endpoints on
    /// other nodes (externalTrafficPolicy: Local): drop new flows rather
    /// than refuse them, as kube-proxy does, so a load balancer's health
    /// check takes the node out instead of clients seeing refusals.
    pub drop_when_empty: bool,
    /// Source NAT new flows from outside (external frontends under
    /// externalTrafficPolicy: Cluster), so replies from a backend on another
    /// node come back through this one.
    pub snat: bool,
    /// Terminating endpoints that are not in `backends`: their flows keep
    /// going, new ones go elsewhere. Sorted, without duplicates.
    pub terminating: Vec<SocketAddr>,
    pub algorithm: Algorithm,
    /// With a table algorithm: the Maglev table size; otherwise 0.
    pub table_size: u32,
    /// Clients on this node have a frontend of their own
    /// (`Clients::Local`, same address, port and protocol).
    pub local_twin: bool,
}

/// kube-proxy's default for sessionAffinity: ClientIP without a timeout.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

pub(super) fn service_frontends(
    key: &ObjectKey,
    service: &Service,
    slices: &[&EndpointSlice],
    node: &ThisNode,
) -> Vec<(Frontend, FrontendState)> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        log::debug!("Service {key}: ExternalName, nothing to program");
        return Vec::new();
    }
    let cluster = cluster_ips(spec.cluster_ips.as_deref(), spec.cluster_ip.as_deref());
    if cluster.is_empty() {
        log::debug!("Service {key}: headless or without a cluster IP, nothing to program");
        return Vec::new();
    }
    let addrs = addresses(service, cluster.clone());
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Ok(Some(protocol)) = protocol(port.protocol.as_deref(), String::new) else {
            continue;
        };
        let Ok(number) = port_number(port.port, String::new) else {
            continue;
        };
        let node_port = node_port(service, port.node_port);
        let port_name = port.name.clone().unwrap_or_default();
        for v6 in [false, true] {
            let wanted = PortEndpoints {
                slices,
                port_name: &port_name,
                protocol,
                v6,
            };
            let mut targets: Vec<(IpAddr, u16, Scope)> = addrs
                .iter()
                .filter(|(a, _)| a.is_ipv6() == v6)
                .map(|(a, scope)| (*a, number, *scope))
                .collect();
            // kube-proxy's proxier of a family ignores Services without a
            // cluster IP of that family, NodePorts included.
            let has_family = cluster.iter().any(|a| a.is_ipv6() == v6);
            if let Some(node_port) = node_port.filter(|_| has_family) {
                let on_node = node.nodeport_addresses().filter(|a| a.is_ipv6() == v6);
                targets.extend(on_node.map(|a| (a, node_port, Scope::NodePort)));
            }
            let frontend = FrontendOf {
                key,
                service,
                port_name: &port_name,
                protocol,
            };
            out.extend(frontend.states(&wanted, node, &targets));
        }
    }
    out
}

/// One Service port, turned into frontend states.
struct FrontendOf<'a> {
    key: &'a ObjectKey,
    service: &'a Service,
    port_name: &'a str,
    protocol: Protocol,
}

impl FrontendOf<'_> {
    /// The states of the port's frontends of one family (`targets`).
    fn states(
        &self,
        wanted: &PortEndpoints,
        node: &ThisNode,
        targets: &[(IpAddr, u16, Scope)],
    ) -> Vec<(Frontend, FrontendState)> {
        if targets.is_empty() {
            return Vec::new();
        }
        let spec = self.service.spec.as_ref();
        let external_local =
            spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
        let internal_local =
            spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local");
        let internal = wanted.backends(self.service, false, node);
        let external = wanted.backends(self.service, true, node);
        // Endpoints elsewhere, none here: kube-proxy drops instead of
        // refusing, for either traffic policy.
        let elsewhere = !wanted.backends_anywhere().is_empty();
        let drop_external = external.is_empty() && external_local && elsewhere;
        let drop_internal = internal.is_empty() && internal_local && elsewhere;
        let affinity = affinity_timeout(self.service).ok().flatten();
        let balancing =
            balancing::of_service(self.service, node.balancing).unwrap_or(node.balancing);
        let terminating = |backends: &[SocketAddr]| {
            let mut out = wanted.terminating();
            out.retain(|a| !backends.contains(a));
            out
        };
        let (internal_terminating, external_terminating) =
            (terminating(&internal), terminating(&external));
        let lb_ips = targets
            .iter()
            .filter(|(_, _, scope)| *scope == Scope::LoadBalancer)
            .map(|(addr, _, _)| *addr);
        let ranges = source_ranges(self.service, wanted.v6, &node.addresses, lb_ips);
        let state = |scope: Scope| {
            let external_scope = scope.is_external();
            FrontendState {
                service: self.key.clone(),
                port_name: self.port_name.to_string(),
                scope,
                backends: if external_scope {
                    external.clone()
                } else {
                    internal.clone()
                },
                affinity_timeout: affinity,
                source_ranges: if scope == Scope::LoadBalancer {
                    ranges.clone()
                } else {
                    Vec::new()
                },
                drop_when_empty: if external_scope {
                    drop_external
                } else {
                    drop_internal
                },
                snat: external_scope && !external_local,
                terminating: if external_scope {
                    external_terminating.clone()
                } else {
                    internal_terminating.clone()
                },
                algorithm: balancing.algorithm,
                table_size: if balancing.algorithm.uses_table() {
                    balancing.table_size
                } else {
                    0
                },
                local_twin: false,
            }
        };
        // Local clients of externalTrafficPolicy: Local frontends reach every
        // endpoint, where outside clients reach this node's only.
        // Only externalTrafficPolicy: Local can give them other backends.
        let cluster = match external_local {
            true => wanted.cluster_backends(node),
            false => Vec::new(),
        };
        let twin = external_local && cluster != external;
        let local_state = |scope: Scope| FrontendState {
            backends: cluster.clone(),
            drop_when_empty: false,
            snat: false,
            terminating: terminating(&cluster),
            ..state(scope)
        };
        let mut out = Vec::new();
        for (addr, port, scope) in targets {
            let frontend = Frontend {
                addr: *addr,
                port: *port,
                protocol: self.protocol,
                clients: Clients::All,
            };
            let twin = twin && scope.is_external();
            out.push((
                frontend,
                FrontendState {
                    local_twin: twin,
                    ..state(*scope)
                },
            ));
            if twin {
                let local = Frontend {
                    clients: Clients::Local,
                    ..frontend
                };
                out.push((local, local_state(*scope)));
            }
        }
        out
    }
}

/// The Service's valid loadBalancerSourceRanges of one family: the others
/// do not limit this family's frontends (as kube-proxy's per-family
/// proxiers ignore them). When a range holds one of this node's addresses,
/// the node may use the load balancer, whose address its traffic may then
/// come back with: the LoadBalancer IPs are sources too (kube-proxy's
/// allow-from-node).
fn source_ranges(
    service: &Service,
    v6: bool,
    node_addresses: &[IpAddr],
    lb_ips: impl Iterator<Item = IpAddr>,
) -> Vec<Cidr> {
    let ranges = service
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref());
    let mut out: Vec<Cidr> = ranges
        .into_iter()
        .flatten()
        .filter_map(|r| r.parse::<Cidr>().ok())
        .filter(|c| c.addr.is_ipv6() == v6)
        .collect();
    let from_node = node_addresses
        .iter()
        .any(|a| out.iter().any(|c| c.contains(*a)));
    if from_node {
        out.extend(lb_ips.map(|addr| Cidr {
            addr,
            prefix: if addr.is_ipv6() { 128 } else { 32 },
        }));
    }
    out.sort();
    out.dedup();
    out
}

/// The port's `nodePort`, for the Service types that open one.
fn node_port(service: &Service, value: Option<i32>) -> Option<u16> {
    let kind = service.spec.as_ref()?.type_.as_deref();
    if !matches!(kind, Some("NodePort" | "LoadBalancer")) {
        return None;
    }
    port_number(value?, String::new).ok()
}

/// Every address the Service is reached at, with how: its cluster IPs, its
/// external IPs, and for a LoadBalancer its ingress IPs.
fn addresses(service: &Service, cluster: Vec<IpAddr>) -> Vec<(IpAddr, Scope)> {
    let mut out: Vec<(IpAddr, Scope)> =
        cluster.into_iter().map(|a| (a, Scope::ClusterIp)).collect();
    let spec = service.spec.as_ref();
    let external = spec
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten();
    out.extend(
        external
            .filter_map(|ip| ip.parse().ok())
            .map(|a| (a, Scope::ExternalIp)),
    );
    if spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
        let status = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref());
        let ingress = status
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten();
        // ipMode: Proxy (KEP-1860): the load balancer proxies to the nodes
        // and its address must not be captured on them.
        out.extend(
            ingress
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .map(|a| (a, Scope::LoadBalancer)),
        );
    }
    out
}

fn cluster_ips(ips: Option<&[String]>, ip: Option<&str>) -> Vec<IpAddr> {
    let mut all: Vec<&str> = ips.unwrap_or_default().iter().map(String::as_str).collect();
    if all.is_empty() {
        all.extend(ip);
    }
    all.iter().filter_map(|s| s.parse().ok()).collect()
}
