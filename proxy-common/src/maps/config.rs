//! Node configuration: the single entry of `lb_config` with the source NAT
//! defaults it starts from, and the maps' default capacities (the agent
//! may override them at load time).

use super::Addr6;

/// Default capacities; the agent may override them at load time.
pub const MAX_SERVICES: u32 = 131_072;
pub const MAX_BACKENDS: u32 = 131_072;
/// Slots are allocated as they are written (BPF_F_NO_PREALLOC): room for
/// 256 services with a Maglev table of 16381, or many more listed ones.
pub const MAX_SLOTS: u32 = 4_194_304;
pub const MAX_CONNTRACK: u32 = 262_144;
/// Entries per family of the overflow conntrack (`ct4_overflow`).
pub const MAX_CT_OVERFLOW: u32 = 65_536;
/// One entry per (service, backend) pair.
pub const MAX_MEMBERS: u32 = 524_288;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// Entries per family of `sock4_nat`: two per socket connected to a
/// service (an LRU: a socket idle long enough to be evicted shows its
/// backend's address to getpeername).
pub const MAX_SOCK_NAT: u32 = 262_144;
/// Entries per family of `frag4`/`frag6`: datagrams whose fragments may
/// still be on their way. A datagram needs its entry for as long as its
/// fragments take to pass (well under a second), so an LRU of this size
/// serves thousands of fragmented datagrams a second.
pub const MAX_FRAGMENTS: u32 = 8_192;

/// The single entry of `lb_config`: what the datapath needs of the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// The address source NAT uses (network byte order; 0: none known, no
    /// source NAT).
    pub snat_addr4: u32,
    /// Source NAT ports, host byte order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The IPv6 address source NAT uses (all zero: none).
    pub snat_addr6: Addr6,
    /// Keys the flow hash of choices only this node makes (flows met
    /// mid-way or without conntrack under the random algorithms): random,
    /// this node's secret.
    pub node_key: [u32; 2],
    /// Keys Maglev and source hashing: the same on every node, so that
    /// every node picks the same backend for a flow, and secret, so that
    /// clients cannot pick it.
    pub cluster_key: [u32; 2],
}

/// Default source NAT ports: above Linux's default ephemeral range
/// (32768-60999), so they do not meet the node's own connections, and
/// above the NodePort range.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for NodeConfig {}
}
