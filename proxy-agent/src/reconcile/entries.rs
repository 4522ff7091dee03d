//! What the reconciler writes through its `Maps` port, in its own terms;
//! `datapath::keys` turns these into the maps' keys and values and back.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{
    balancing::Algorithm,
    model::{FrontendState, Scope},
    nodeconfig::Settings,
};

/// One slot of a slot table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub table: u32,
    pub index: u32,
}

/// A backend's membership of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub service_id: u32,
    pub backend_id: u32,
}

/// A frontend's service entry: its backends and how the datapath treats
/// its traffic beyond picking one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub id: u32,
    /// The slot table (0: none).
    pub slots_id: u32,
    /// Backends that take new flows: the slots below this count.
    pub backend_count: u32,
    pub algorithm: Algorithm,
    /// The Maglev table's size (0: no table).
    pub table_size: u32,
    /// sessionAffinity: ClientIP, with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The frontend may be one of the node's own addresses: replies are
    /// translated at egress, refusals sent straight back.
    pub reply_at_egress: bool,
    /// Only sources in the service's ranges are admitted.
    pub source_ranges: bool,
    /// Without backends, drop new flows instead of refusing them.
    pub drop_when_empty: bool,
    /// Source NAT new flows from outside.
    pub snat: bool,
    /// Clients on this node have an entry of their own.
    pub local_twin: bool,
}

impl ServiceEntry {
    /// The entry of a frontend in `state` with service id `id`, `count`
    /// backends taking new flows in slot table `slots_id`.
    pub fn new(id: u32, slots_id: u32, count: u32, state: &FrontendState) -> Self {
        ServiceEntry {
            id,
            slots_id,
            backend_count: count,
            algorithm: state.algorithm,
            // A table only exists with backends to fill it.
            table_size: if count == 0 { 0 } else { state.table_size },
            affinity_timeout: state.affinity_timeout,
            // Frontends outside the cluster range may be the node's own
            // addresses.
            reply_at_egress: state.scope != Scope::ClusterIp,
            source_ranges: !state.source_ranges.is_empty(),
            drop_when_empty: state.drop_when_empty,
            snat: state.snat,
            local_twin: state.local_twin,
        }
    }
}

/// What the datapath is told about the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// Source NAT addresses (None: flows that need one are dropped).
    pub snat_addr4: Option<Ipv4Addr>,
    pub snat_addr6: Option<Ipv6Addr>,
    /// Source NAT ports and hash keys.
    pub settings: Settings,
}
