//! The node the model programs for: what its flags say and what its Node
//! object adds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Node;

use crate::{balancing::Balancing, cidr::Cidr};

/// Everything the model knows of this node. Sources build it from the
/// flags (`--node-name`, `--zone`, `--nodeport-addresses`, balancing) and
/// update it from the node's Node object with [`ThisNode::seeing`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThisNode {
    /// For policies that keep traffic on the node (None: unknown, so no
    /// endpoint is local).
    pub name: Option<String>,
    /// For topology-aware routing (None: not used): `--zone`, else the
    /// Node's label.
    pub zone: Option<String>,
    /// Its Node's InternalIP and ExternalIP addresses: where NodePorts are
    /// served, and the first of each family is the source NAT address.
    pub addresses: Vec<IpAddr>,
    /// The host's own addresses, to source-NAT from when `addresses` has
    /// none of a family (manifests without this node's Node).
    pub host_addresses: Vec<IpAddr>,
    /// `--nodeport-addresses`: NodePorts only on addresses in these ranges
    /// (empty: on all of them).
    pub nodeport_ranges: Vec<Cidr>,
    /// `--lb-algorithm` and `--maglev-table-size`: for Services whose
    /// annotations do not choose.
    pub balancing: Balancing,
    /// Being deleted, or tainted by the cluster autoscaler: `/healthz`
    /// fails so load balancers drain it (KEP-3836).
    pub leaving: bool,
}

impl ThisNode {
    /// This node as the flags give it (`self`) and its Node object shows it
    /// (None: not seen, so no addresses).
    pub fn seeing(&self, node: Option<&Node>) -> ThisNode {
        ThisNode {
            zone: self.zone.clone().or_else(|| node.and_then(zone_label)),
            addresses: node.map(addresses).unwrap_or_default(),
            leaving: node.is_some_and(leaving),
            ..self.clone()
        }
    }

    /// Where this node serves NodePorts.
    pub(super) fn nodeport_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.iter().copied().filter(|a| {
            self.nodeport_ranges.is_empty() || self.nodeport_ranges.iter().any(|r| r.contains(*a))
        })
    }

    /// The address source NAT uses for IPv4: the Node's first, else the
    /// host's.
    pub(super) fn snat_addr4(&self) -> Option<Ipv4Addr> {
        self.all_addresses().find_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    /// As `snat_addr4`, for IPv6.
    pub(super) fn snat_addr6(&self) -> Option<Ipv6Addr> {
        self.all_addresses().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }

    fn all_addresses(&self) -> impl Iterator<Item = &IpAddr> {
        self.addresses.iter().chain(&self.host_addresses)
    }
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The Node label topology-aware routing reads.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// True for a Node being deleted or about to be, as kube-proxy judges it.
fn leaving(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_TAINT));
    tainted || node.metadata.deletion_timestamp.is_some()
}

/// The zone a Node is labelled with.
fn zone_label(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// The addresses a Node object lists for reaching it, InternalIPs first.
fn addresses(node: &Node) -> Vec<IpAddr> {
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
