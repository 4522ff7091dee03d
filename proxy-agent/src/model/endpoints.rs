//! Endpoint choice, as kube-proxy makes it: endpoint conditions, traffic
//! policies that keep traffic on the node, and topology hints.

use std::net::{IpAddr, SocketAddr};

use crate::kinds::{EndpointSlice, Service};

use super::{frontends::Protocol, node::ThisNode, objects::port_number};

/// One Service port's endpoints, looked up in the Service's slices.
pub(super) struct PortEndpoints<'a> {
    pub slices: &'a [&'a EndpointSlice],
    pub port_name: &'a str,
    pub protocol: Protocol,
    /// The family: IPv6 endpoints (from IPv6 slices), or IPv4 ones.
    pub v6: bool,
}

impl PortEndpoints<'_> {
    /// The backends of the port for internal (cluster IP) or external
    /// traffic: each traffic policy `Local` keeps its kind of traffic on this
    /// node; otherwise topology-aware routing may narrow them to the zone.
    pub(super) fn backends(
        &self,
        service: &Service,
        external: bool,
        node: &ThisNode,
    ) -> Vec<SocketAddr> {
        let spec = service.spec.as_ref();
        let policy = if external {
            spec.and_then(|s| s.external_traffic_policy.as_deref())
        } else {
            spec.and_then(|s| s.internal_traffic_policy.as_deref())
        };
        let (only, here) = match policy {
            Some("Local") => (Only::Node(node.name.as_deref()), None),
            _ => (Only::Any, Some(Here::of(node))),
        };
        backends(&self.of_family(), self.port_name, self.protocol, only, here)
    }

    /// The backends under the Cluster policy, whatever the Service's
    /// traffic policies say: what pods and processes on this node reach
    /// through an external address (kube-proxy sends them to the cluster
    /// endpoints).
    pub(super) fn cluster_backends(&self, node: &ThisNode) -> Vec<SocketAddr> {
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
    pub(super) fn terminating(&self) -> Vec<SocketAddr> {
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
    pub(super) fn backends_anywhere(&self) -> Vec<SocketAddr> {
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
    fn of(node: &'a ThisNode) -> Here<'a> {
        Here {
            node: node.name.as_deref(),
            zone: node.zone.as_deref(),
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

fn hinted_for(endpoint: &crate::kinds::Endpoint, hint: Option<Hint>) -> bool {
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
                && matches!(super::objects::protocol(p.protocol.as_deref(), String::new), Ok(Some(x)) if x == protocol)
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

/// The ready endpoints on node `node` (none when it is unknown), whatever
/// the hints: what a health check node port counts.
pub(super) fn ready_on_node(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    node: Option<&str>,
) -> Vec<SocketAddr> {
    endpoints(
        slices,
        port_name,
        protocol,
        Condition::Ready,
        Only::Node(node),
        None,
    )
}
