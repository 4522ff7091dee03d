//! Conntrack: keys and entries of `ct4`/`ct6` (and their overflow maps),
//! directions, flags and TCP states, and how long an idle flow keeps its
//! source NAT port.

use super::Addr6;

/// Conntrack direction: a client's packet towards the frontend, at
/// ingress; its destination becomes the backend.
pub const CT_FORWARD: u8 = 0;
/// Conntrack direction: a packet coming back, at ingress; its source
/// becomes the frontend, or (`CT_REWRITE_DST`) its destination the client
/// whose source was translated.
pub const CT_REPLY: u8 = 1;
/// Conntrack direction: a packet leaving through an attached interface, at
/// egress; its source becomes the entry's address and port. Source
/// rewrites that would put one of the node's own addresses into a packet
/// the node still has to forward happen here, after forwarding (the kernel
/// drops forwarded packets with a local source as martians). A source NAT
/// entry (client -> backend) is written with port 0 when its flow starts,
/// and the egress hook picks the node port on the flow's first packet
/// there (or puts 0 back when an idle flow's port goes to a new flow).
pub const CT_EGRESS: u8 = 2;

/// A `CT_REPLY` entry that rewrites the destination, not the source.
pub const CT_REWRITE_DST: u16 = 1;
/// A reply-direction entry that has not yet seen a packet: the flow is
/// unconfirmed (nothing came back). Garbage collection gives such a flow the
/// SYN timeout whatever its state, and removes it first when the table runs
/// full, so that packets nobody answers (bare ACKs from spoofed sources, a
/// backend that drops them) cannot hold entries for a day.
pub const CT_UNREPLIED: u16 = 2;

/// Key of `ct4`: a flow as it appears on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// CT_FORWARD, CT_REPLY or CT_EGRESS.
    pub direction: u8,
    pub _pad: u16,
}

/// Value of `ct4`: where to rewrite a packet of the flow.
///
/// For a forward entry `nat_addr`/`nat_port` are the backend's; for a reply
/// entry they are the frontend's, which become the reply's source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ct4Entry {
    pub nat_addr: u32,
    pub nat_port: u16,
    /// `CT_*` bits.
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// Coarse monotonic seconds of the last packet (refreshed at most once a
    /// second, and on every state change): garbage collection and source NAT
    /// port takeover go by it.
    pub last_seen: u32,
    /// `CT_STATE_*` of the packets seen in this entry's direction.
    pub state: u8,
    pub _pad: [u8; 3],
    /// 1 while the flow counts as an open connection of its backend in
    /// `lb_conns` (forward entries only); whoever swaps it to 0 takes the
    /// count back.
    pub active: u32,
}

/// Conntrack state of one direction of a flow. Not TCP: 0.
pub const CT_STATE_OPEN: u8 = 0;
/// TCP: only SYNs seen so far.
pub const CT_STATE_SYN: u8 = 1;
/// TCP: a packet without SYN seen.
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// TCP: a FIN seen (this side is done sending).
pub const CT_STATE_FIN: u8 = 3;
/// TCP: a RST seen.
pub const CT_STATE_RST: u8 = 4;

/// Key of `ct6`, as `Ct4Key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Key {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: u16,
}

/// Value of `ct6`, as `Ct4Entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ct6Entry {
    pub nat_addr: Addr6,
    pub nat_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub last_seen: u32,
    pub state: u8,
    pub _pad: [u8; 3],
    pub active: u32,
}

/// Seconds without a packet after which a flow's source NAT port may go to
/// a new flow: long for TCP and SCTP (idle connections are common), short
/// for UDP. Without this, ports would stay taken until LRU eviction.
pub const SNAT_IDLE_STREAM: u32 = 3_600;
pub const SNAT_IDLE_DATAGRAM: u32 = 120;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Entry {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Entry {}
}
