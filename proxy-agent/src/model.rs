//! Kubernetes semantics, and nothing else: Services and EndpointSlices in,
//! the frontends and backends the datapath should serve out. No I/O.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

use crate::{
    balancing::{self, Algorithm, Balancing},
    cidr::Cidr,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Services (and their slices) another proxy serves.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label selector that leaves both out, as kube-proxy's informers do:
/// the API server never even lists them to the agent.
pub const OURS_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// False for objects kube-proxy leaves alone: those of another service
/// proxy, and headless ones.
pub fn ours(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    let labels = meta.labels.as_ref();
    ![SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]
        .iter()
        .any(|l| labels.is_some_and(|m| m.contains_key(*l)))
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the model reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: BTreeMap<ObjectKey, Service>,
    pub slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// This node's name, for policies that keep traffic on the node (None:
    /// unknown, so no endpoint is local).
    pub node_name: Option<String>,
    /// This node's zone, for topology-aware routing (None: not used).
    pub node_zone: Option<String>,
    /// This node's addresses (its Node's InternalIP and ExternalIP ones):
    /// where NodePorts are served.
    pub node_addresses: Vec<IpAddr>,
    /// The host's own addresses, to source-NAT from when `node_addresses`
    /// has none of a family (manifests without this node's Node).
    pub host_addresses: Vec<IpAddr>,
    /// `--nodeport-addresses`: NodePorts only on node addresses in these
    /// ranges (empty: on all of them).
    pub nodeport_ranges: Vec<Cidr>,
    /// `--lb-algorithm` and `--maglev-table-size`: for Services whose
    /// annotations do not choose.
    pub balancing: Balancing,
    /// This node is going away (being deleted, or tainted by the cluster
    /// autoscaler): `/healthz` fails so load balancers drain it (KEP-3836).
    pub node_leaving: bool,
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// True for a Node being deleted or about to be, as kube-proxy judges it.
pub fn node_leaving(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_TAINT));
    tainted || node.metadata.deletion_timestamp.is_some()
}

/// The zone a Node is labelled with.
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// The addresses a Node object lists for reaching it, InternalIPs first
/// (the first one of each family is the node's source NAT address).
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let listed: Vec<_> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .collect();
    let mut out: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        let of_kind = listed.iter().filter(|a| a.type_ == kind);
        for addr in of_kind.filter_map(|a| a.address.parse().ok()) {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

impl Objects {
    /// Where this node serves NodePorts.
    fn nodeport_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.node_addresses.iter().copied().filter(|a| {
            self.nodeport_ranges.is_empty() || self.nodeport_ranges.iter().any(|r| r.contains(*a))
        })
    }
}

/// The Node label topology-aware routing reads.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// The addresses source NAT uses: this node's first address of each
    /// family (None: unknown, so flows that need source NAT get none, and a
    /// counter says so).
    pub snat_addr4: Option<Ipv4Addr>,
    pub snat_addr6: Option<Ipv6Addr>,
    /// Things that are valid Kubernetes but cannot all be served (clashes).
    pub warnings: Vec<String>,
    /// Frontends two Services claimed; each loser counted once.
    pub conflicts: usize,
}

/// A field of an object that is not acceptable, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: {}", self.field, self.message)
    }
}

fn field_error(field: String, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn protocol(
    value: Option<&str>,
    field: impl Fn() -> String,
) -> Result<Option<Protocol>, FieldError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Some(Protocol::Tcp)),
        "UDP" => Ok(Some(Protocol::Udp)),
        "SCTP" => Ok(Some(Protocol::Sctp)),
        other => Err(field_error(field(), format!("unknown protocol {other:?}"))),
    }
}

fn port_number(value: i32, field: impl Fn() -> String) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field_error(field(), format!("port {value} is not in 1..65535")))
}

/// Rejects what the API server would have rejected and what the model would
/// otherwise have to guess about.
pub fn validate_service(service: &Service) -> Result<(), FieldError> {
    let Some(spec) = &service.spec else {
        return Ok(());
    };
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        check_cluster_ip(ip, || format!("spec.clusterIPs[{i}]"))?;
    }
    if let Some(ip) = &spec.cluster_ip {
        check_cluster_ip(ip, || "spec.clusterIP".to_string())?;
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            return Err(field_error(
                format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            ));
        }
    }
    for (i, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        range
            .parse::<Cidr>()
            .map_err(|e| field_error(format!("spec.loadBalancerSourceRanges[{i}]"), e))?;
    }
    affinity_timeout(service)?;
    balancing::of_service(service, Balancing::default())
        .map_err(|(field, message)| field_error(field, message))?;
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        port_number(port.port, || format!("spec.ports[{i}].port"))?;
        protocol(port.protocol.as_deref(), || {
            format!("spec.ports[{i}].protocol")
        })?;
    }
    Ok(())
}

/// sessionAffinity: ClientIP's timeout; None without affinity.
fn affinity_timeout(service: &Service) -> Result<Option<u32>, FieldError> {
    let Some(spec) = &service.spec else {
        return Ok(None);
    };
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match seconds {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
        Some(s @ 1..=86_400) => Ok(Some(s as u32)),
        Some(s) => Err(field_error(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
            format!("{s} is not in 1..86400"),
        )),
    }
}

fn check_cluster_ip(ip: &str, field: impl Fn() -> String) -> Result<(), FieldError> {
    if ip.is_empty() || ip == "None" || ip.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    Err(field_error(field(), format!("{ip:?} is not an IP address")))
}

pub fn validate_slice(slice: &EndpointSlice) -> Result<(), FieldError> {
    let family = slice.address_type.as_str();
    if !matches!(family, "IPv4" | "IPv6" | "FQDN") {
        return Err(field_error(
            "addressType".into(),
            format!("{family:?} is not IPv4, IPv6 or FQDN"),
        ));
    }
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        for (j, addr) in endpoint.addresses.iter().enumerate() {
            let ok = match family {
                "IPv4" => addr.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => addr.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => true,
            };
            if !ok {
                return Err(field_error(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{addr:?} is not an {family} address"),
                ));
            }
        }
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            port_number(number, || format!("ports[{i}].port"))?;
        }
        protocol(port.protocol.as_deref(), || format!("ports[{i}].protocol"))?;
    }
    Ok(())
}

/// The desired datapath state for a set of (validated) objects.
pub fn desired(objects: &Objects) -> Desired {
    let index = SliceIndex::new(objects);
    let node_first = || objects.node_addresses.iter().chain(&objects.host_addresses);
    let mut out = Desired {
        snat_addr4: node_first().find_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        }),
        snat_addr6: node_first().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        }),
        ..Desired::default()
    };
    for (key, service) in &objects.services {
        for (frontend, state) in
            service_frontends(key, service, &index.slices_of(objects, key), objects)
        {
            claim(&mut out, frontend, state);
        }
    }
    // A local-client twin goes with the entry it completes.
    let lost: Vec<Frontend> = out
        .frontends
        .iter()
        .filter(|(f, s)| f.clients == Clients::Local && !completes(&out, f, s))
        .map(|(f, _)| *f)
        .collect();
    for frontend in lost {
        out.frontends.remove(&frontend);
    }
    out
}

/// Adds a frontend unless another Service holds it with a better claim (an
/// allocated address over a written one; else the first Service in name
/// order); the loser is reported and counted.
fn claim(out: &mut Desired, frontend: Frontend, state: FrontendState) {
    let Some(taken) = out.frontends.get(&frontend) else {
        out.frontends.insert(frontend, state);
        return;
    };
    let wins = state.scope.is_allocated() && !taken.scope.is_allocated();
    let (winner, loser) = match wins {
        true => (&state, taken),
        false => (taken, &state),
    };
    out.warnings.push(format!(
        "{}:{}/{:?} is claimed by Service {} ({:?}) and by Service {} ({:?}); serving {}",
        frontend.addr,
        frontend.port,
        frontend.protocol,
        winner.service,
        winner.scope,
        loser.service,
        loser.scope,
        winner.service
    ));
    out.conflicts += 1;
    if wins {
        out.frontends.insert(frontend, state);
    }
}

/// True if the `All` entry of a local twin's frontend is its Service's.
fn completes(out: &Desired, twin: &Frontend, state: &FrontendState) -> bool {
    let main = Frontend {
        clients: Clients::All,
        ..*twin
    };
    out.frontends
        .get(&main)
        .is_some_and(|m| m.service == state.service && m.local_twin)
}

/// What the named Services want now (an empty list for one that is gone),
/// for a pass that touches only them.
pub fn changes(
    objects: &Objects,
    index: &SliceIndex,
    services: &BTreeSet<ObjectKey>,
) -> BTreeMap<ObjectKey, Vec<(Frontend, FrontendState)>> {
    services
        .iter()
        .map(|key| {
            let wanted = match objects.services.get(key) {
                Some(service) => {
                    service_frontends(key, service, &index.slices_of(objects, key), objects)
                }
                None => Vec::new(),
            };
            (key.clone(), wanted)
        })
        .collect()
}

/// The health check node port a Service asks this node to answer, with its
/// local ready endpoints counted as kube-proxy counts them (distinct
/// addresses over all the Service's ports; terminating ones do not count, so
/// a node left with only those fails the check): LoadBalancer Services with
/// externalTrafficPolicy: Local only.
pub fn health_check(
    objects: &Objects,
    index: &SliceIndex,
    key: &ObjectKey,
) -> Option<(u16, usize)> {
    let service = objects.services.get(key)?;
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let port = port_number(spec.health_check_node_port?, String::new).ok()?;
    let slices = index.slices_of(objects, key);
    let only = Only::Node(objects.node_name.as_deref());
    // Dual-stack kube-proxy reports one family's count (its proxiers share
    // one health server): a dual-stack pod counts once.
    let mut most = 0;
    for family in ["IPv4", "IPv6"] {
        let of_family: Vec<&EndpointSlice> = slices
            .iter()
            .copied()
            .filter(|s| s.address_type == family)
            .collect();
        let mut local = BTreeSet::new();
        for service_port in spec.ports.iter().flatten() {
            let Ok(Some(protocol)) = protocol(service_port.protocol.as_deref(), String::new) else {
                continue;
            };
            let name = service_port.name.as_deref().unwrap_or("");
            let ready = endpoints(&of_family, name, protocol, Condition::Ready, only, None);
            local.extend(ready.iter().map(|e| e.ip()));
        }
        most = most.max(local.len());
    }
    Some((port, most))
}

/// The Service an EndpointSlice belongs to, by its label.
pub fn owning_service(namespace: &str, slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey {
        namespace: namespace.to_string(),
        name: name.clone(),
    })
}

/// Slices by owning Service: built once for a full pass, or kept up to date
/// by a source as slices come and go.
#[derive(Debug, Default)]
pub struct SliceIndex {
    by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
}

impl SliceIndex {
    pub fn new(objects: &Objects) -> Self {
        let mut index = SliceIndex::default();
        for (key, slice) in &objects.slices {
            index.insert(key, slice);
        }
        index
    }

    /// Notes a slice (IP ones only: FQDN slices serve no frontend).
    pub fn insert(&mut self, key: &ObjectKey, slice: &EndpointSlice) {
        let ip = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        if let Some(owner) = owning_service(&key.namespace, slice).filter(|_| ip) {
            self.by_service
                .entry(owner)
                .or_default()
                .insert(key.clone());
        }
    }

    /// Forgets a slice that belonged to `owner`.
    pub fn remove(&mut self, key: &ObjectKey, owner: &ObjectKey) {
        if let Some(set) = self.by_service.get_mut(owner) {
            set.remove(key);
            if set.is_empty() {
                self.by_service.remove(owner);
            }
        }
    }

    fn slices_of<'a>(&self, objects: &'a Objects, service: &ObjectKey) -> Vec<&'a EndpointSlice> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| objects.slices.get(key))
            .collect()
    }
}

fn service_frontends(
    key: &ObjectKey,
    service: &Service,
    slices: &[&EndpointSlice],
    node: &Objects,
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
            let wanted = Wanted {
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
        wanted: &Wanted,
        node: &Objects,
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
        let ranges = source_ranges(self.service, wanted.v6, &node.node_addresses, lb_ips);
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

/// One Service port's endpoints, looked up in the Service's slices.
struct Wanted<'a> {
    slices: &'a [&'a EndpointSlice],
    port_name: &'a str,
    protocol: Protocol,
    /// The family: IPv6 endpoints (from IPv6 slices), or IPv4 ones.
    v6: bool,
}

impl Wanted<'_> {
    /// The backends of the port for internal (cluster IP) or external
    /// traffic: each traffic policy `Local` keeps its kind of traffic on this
    /// node; otherwise topology-aware routing may narrow them to the zone.
    fn backends(&self, service: &Service, external: bool, node: &Objects) -> Vec<SocketAddr> {
        let spec = service.spec.as_ref();
        let policy = if external {
            spec.and_then(|s| s.external_traffic_policy.as_deref())
        } else {
            spec.and_then(|s| s.internal_traffic_policy.as_deref())
        };
        let (only, here) = match policy {
            Some("Local") => (Only::Node(node.node_name.as_deref()), None),
            _ => (Only::Any, Some(Here::of(node))),
        };
        backends(&self.of_family(), self.port_name, self.protocol, only, here)
    }

    /// The backends under the Cluster policy, whatever the Service's
    /// traffic policies say: what pods and processes on this node reach
    /// through an external address (kube-proxy sends them to the cluster
    /// endpoints).
    fn cluster_backends(&self, node: &Objects) -> Vec<SocketAddr> {
        backends(
            &self.of_family(),
            self.port_name,
            self.protocol,
            Only::Any,
            Some(Here::of(node)),
        )
    }

    /// Every terminating endpoint (serving or not): flows that began while
    /// it was ready keep it until it is gone from the slice.
    fn terminating(&self) -> Vec<SocketAddr> {
        endpoints(
            &self.of_family(),
            self.port_name,
            self.protocol,
            Condition::Terminating,
            Only::Any,
            None,
        )
    }

    /// Every endpoint that would serve without node or zone limits.
    fn backends_anywhere(&self) -> Vec<SocketAddr> {
        backends(
            &self.of_family(),
            self.port_name,
            self.protocol,
            Only::Any,
            None,
        )
    }

    /// The slices of this family.
    fn of_family(&self) -> Vec<&EndpointSlice> {
        let family = if self.v6 { "IPv6" } else { "IPv4" };
        self.slices
            .iter()
            .copied()
            .filter(|s| s.address_type == family)
            .collect()
    }
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

/// The endpoints of the slices' port with this name and protocol that get
/// new connections, as kube-proxy chooses them: the ready ones; if none is
/// ready, those still serving while terminating (so a rollout's last
/// connections find a backend). Only an endpoint's first address is used,
/// and unknown readiness counts as ready.
fn backends(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    only: Only,
    here: Option<Here>,
) -> Vec<SocketAddr> {
    let ready = endpoints(slices, port_name, protocol, Condition::Ready, only, None);
    if ready.is_empty() {
        return endpoints(
            slices,
            port_name,
            protocol,
            Condition::ServingTerminating,
            only,
            None,
        );
    }
    match here.and_then(|h| hint(slices, h)) {
        Some(hint) => endpoints(
            slices,
            port_name,
            protocol,
            Condition::Ready,
            only,
            Some(hint),
        ),
        None => ready,
    }
}

/// This node, as topology hints name it.
#[derive(Clone, Copy)]
struct Here<'a> {
    node: Option<&'a str>,
    zone: Option<&'a str>,
}

impl<'a> Here<'a> {
    fn of(objects: &'a Objects) -> Here<'a> {
        Here {
            node: objects.node_name.as_deref(),
            zone: objects.node_zone.as_deref(),
        }
    }
}

/// Which endpoints topology hints keep for this node.
#[derive(Clone, Copy)]
enum Hint<'a> {
    Node(&'a str),
    Zone(&'a str),
}

/// kube-proxy's rule, from the hints alone (the EndpointSlice controller
/// writes them for `trafficDistribution` and the topology annotation): if
/// every ready endpoint has node hints and one names this node, those; else
/// if every one has zone hints and one names this node's zone, those; else
/// no filtering.
fn hint<'a>(slices: &[&EndpointSlice], here: Here<'a>) -> Option<Hint<'a>> {
    if here.node.is_none() && here.zone.is_none() {
        return None;
    }
    let ready = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true));
    let (mut all_nodes, mut for_node, mut all_zones, mut for_zone) = (true, false, true, false);
    for endpoint in ready {
        let hints = endpoint.hints.as_ref();
        match hints
            .and_then(|h| h.for_nodes.as_ref())
            .filter(|n| !n.is_empty())
        {
            Some(nodes) => for_node |= nodes.iter().any(|n| Some(n.name.as_str()) == here.node),
            None => all_nodes = false,
        }
        match hints
            .and_then(|h| h.for_zones.as_ref())
            .filter(|z| !z.is_empty())
        {
            Some(zones) => for_zone |= zones.iter().any(|z| Some(z.name.as_str()) == here.zone),
            None => all_zones = false,
        }
    }
    if all_nodes && for_node {
        return here.node.map(Hint::Node);
    }
    if all_zones && for_zone {
        return here.zone.map(Hint::Zone);
    }
    None
}

fn hinted_for(endpoint: &k8s_openapi::api::discovery::v1::Endpoint, hint: Option<Hint>) -> bool {
    let hints = endpoint.hints.as_ref();
    match hint {
        None => true,
        Some(Hint::Node(node)) => hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .any(|n| n.name == node),
        Some(Hint::Zone(zone)) => hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .any(|z| z.name == zone),
    }
}

/// Which endpoints a frontend may use: all, or those on one node (none when
/// the node is unknown).
#[derive(Clone, Copy)]
enum Only<'a> {
    Any,
    Node(Option<&'a str>),
}

impl Only<'_> {
    fn admits(self, endpoint_node: Option<&str>) -> bool {
        match self {
            Only::Any => true,
            Only::Node(node) => node.is_some() && endpoint_node == node,
        }
    }
}

#[derive(Clone, Copy)]
enum Condition {
    Ready,
    ServingTerminating,
    Terminating,
}

fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    wanted: Condition,
    only: Only,
    hint: Option<Hint>,
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && matches!(crate::model::protocol(p.protocol.as_deref(), String::new), Ok(Some(x)) if x == protocol)
        }) else {
            continue;
        };
        let Some(Ok(number)) = port.port.map(|p| port_number(p, String::new)) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let c = endpoint.conditions.as_ref();
            let ok = match wanted {
                Condition::Ready => c.and_then(|c| c.ready).unwrap_or(true),
                // As kube-proxy reads them: an omitted `serving` is true,
                // an omitted `terminating` false.
                Condition::ServingTerminating => {
                    c.and_then(|c| c.serving).unwrap_or(true)
                        && c.and_then(|c| c.terminating).unwrap_or(false)
                }
                Condition::Terminating => c.and_then(|c| c.terminating).unwrap_or(false),
            };
            let addr = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok());
            let here = only.admits(endpoint.node_name.as_deref()) && hinted_for(endpoint, hint);
            if let (true, true, Some(addr)) = (ok, here, addr) {
                out.push(SocketAddr::new(addr, number));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
