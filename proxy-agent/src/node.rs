//! The flags that say which node the agent programs for, shared by `run`
//! and `plan` so both read a node the same way.

use clap::Args;

use crate::{balancing, cidr::Cidr, model::ThisNode};

#[derive(Args, Clone, Debug)]
pub struct NodeFlags {
    /// This node's name: node-local policies keep its endpoints only
    /// (`run` without it: NODE_NAME, else the hostname; `plan` without it
    /// plans for no node in particular).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for topology-aware routing (default: its Node's
    /// topology.kubernetes.io/zone label).
    #[arg(long)]
    pub zone: Option<String>,
    /// NodePorts only on node addresses in these CIDRs (default: all of the
    /// Node's InternalIP and ExternalIP addresses, from the API server or
    /// the manifests).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<Cidr>,
    #[command(flatten)]
    pub balancing: balancing::Flags,
}

impl NodeFlags {
    /// The node as these flags give it, named `name`; its Node object
    /// adds the rest (see [`ThisNode::seeing`]).
    pub fn this_node(&self, name: Option<String>) -> ThisNode {
        ThisNode {
            name,
            zone: self.zone.clone(),
            nodeport_ranges: self.nodeport_addresses.clone(),
            balancing: self.balancing.balancing(),
            ..ThisNode::default()
        }
    }
}
