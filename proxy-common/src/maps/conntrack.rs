//! Conntrack: keys and entries of `ct4_table`/`ct6_table` (and their
//! overflow maps), directions, flags and TCP states, and how long an idle
//! flow keeps its source NAT port.

use super::Addr6;

/// Conntrack direction: a client's packet towards the frontend, at
/// ingress; its destination becomes the backend.
pub const CT_FORWARD: u8 = 0;
/// Conntrack direction: every entry but the forward one, looked up with
/// the packet's tuple as it is. Which hook acts on it, and how, the flags
/// say: without `CT_AT_EGRESS`/`CT_OUTWARD`, a packet coming back at
/// ingress, whose source becomes the frontend (or, `CT_REWRITE_DST`, whose
/// destination becomes the client whose source was translated). One
/// direction for all of them means a client reusing its port towards the
/// same backend overwrites the earlier flow's entry, whatever the earlier
/// flow's kind: no stale entry of another kind needs looking for.
pub const CT_REPLY: u8 = 1;
/// Conntrack direction: a flow's only entry, found from both directions.
/// Keyed by the client's address and port alone (`dst_addr` and
/// `dst_port` 0): a client's packet finds it by its source, a packet
/// coming back by its destination. `nat_addr`/`nat_port` name the backend
/// and `service_id` the frontend, whose address and port
/// `lb4_rev_nat`/`lb6_rev_nat` hold (a reverse-NAT index, as Cilium's);
/// `state` is the client side's, `reply_state` the backend side's, and
/// `last_seen` either side's last packet. One insert per new flow instead
/// of two. A source-NATed flow's entry carries `CT_SOURCE_NAT` and
/// `CT_AT_EGRESS` and the node port its packets leave with (`node_port`,
/// picked by the egress hook); its `CT_REWRITE_DST` entry (direction
/// `CT_REPLY`) takes the backend's answers to that port back to the
/// client. Such flows raise `ct_paired[CT_MARK_SOURCE_NAT]`.
/// A flow whose client port another frontend's or backend's live flow
/// already holds gets `CT_FORWARD` and `CT_REPLY` entries instead, and
/// raises `ct_paired[CT_MARK_PAIRS]`. (Direction 2 is an earlier
/// version's, see the agent's `conntrack::upgrade`.)
pub const CT_SOCKET: u8 = 3;

/// `ct_paired` index: non-zero while `CT_FORWARD` entries, or `CT_REPLY`
/// entries that are neither `CT_OUTWARD` nor `CT_REWRITE_DST`, may exist.
pub const CT_MARK_PAIRS: u32 = 0;
/// `ct_paired` index: non-zero while source-NATed flows' entries may
/// exist: `CT_SOCKET` ones with `CT_SOURCE_NAT`, `CT_OUTWARD`,
/// `CT_REWRITE_DST`.
pub const CT_MARK_SOURCE_NAT: u32 = 1;
/// Entries of `ct_paired`.
pub const CT_MARKS: u32 = 2;

/// A `CT_REPLY` entry that rewrites the destination, not the source.
pub const CT_REWRITE_DST: u16 = 1;
/// A reply-direction entry that has not yet seen a packet: the flow is
/// unconfirmed (nothing came back). Garbage collection gives such a flow the
/// SYN timeout whatever its state, and removes it first when the table runs
/// full, so that packets nobody answers (bare ACKs from spoofed sources, a
/// backend that drops them) cannot hold entries for a day.
pub const CT_UNREPLIED: u16 = 2;

/// A `CT_REPLY` entry the egress hook applies: the reply's source becomes
/// the frontend after the node forwarded it. Source rewrites that would
/// put one of the node's own addresses into a packet the node still has
/// to forward happen there (the kernel drops forwarded packets with a
/// local source as martians).
pub const CT_AT_EGRESS: u16 = 4;
/// A `CT_REPLY` entry for a source-NATed pair's own packets (client ->
/// backend, after forwarding), applied at egress: the source becomes the
/// node's address and port. (A source-NATed `CT_SOCKET` flow keeps its
/// node port in its own entry instead.) Written with port 0 when the flow
/// starts; the egress hook picks the node port on the flow's first packet
/// there (or puts 0 back when an idle flow's port goes to a new flow).
pub const CT_OUTWARD: u16 = 8;
/// A source-NATed flow's reply or socket entry: the flow also has a
/// `CT_OUTWARD` entry (and, once its port is picked, a `CT_REWRITE_DST`
/// one).
pub const CT_SOURCE_NAT: u16 = 16;
/// The flags of entries only the egress hook acts on.
pub const CT_EGRESS_ONLY: u16 = CT_AT_EGRESS | CT_OUTWARD;

/// Key of `ct4`: a flow as it appears on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// CT_FORWARD, CT_REPLY or CT_SOCKET.
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
    /// `CT_STATE_*` of the packets seen in this entry's direction (of a
    /// `CT_SOCKET` entry: the client's packets).
    pub state: u8,
    /// `CT_SOCKET` entries: `CT_STATE_*` of the backend's packets. 0
    /// otherwise.
    pub reply_state: u8,
    /// Source-NATed `CT_SOCKET` entries: the node port (network order) the
    /// client's packets leave with, 0 until the egress hook picks one. 0
    /// otherwise.
    pub node_port: u16,
    /// 1 while the flow counts as an open connection of its backend in
    /// `lb_conns` (forward and socket entries only); whoever swaps it to 0
    /// takes the count back.
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
    pub reply_state: u8,
    pub node_port: u16,
    pub active: u32,
}

/// A closed flow waiting in `ct4_closed`/`ct6_closed` (rings the datapath
/// fills as flows close): its tuple as the client sent it to the
/// frontend. When a new flow finds the conntrack table full, the datapath
/// removes the oldest of these whose both directions have been closed and
/// idle for `CT_REAP_WAIT`, so that closed flows never crowd out new ones,
/// even with no agent collecting garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClosedFlow<A> {
    pub client_addr: A,
    pub frontend_addr: A,
    pub client_port: u16,
    pub frontend_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    /// Coarse seconds when the flow was put in the ring.
    pub closed_at: u32,
    /// The ring position this slot was last written for: a slot whose
    /// position is not the one read is being written, or was written over.
    pub seq: u32,
}

pub type ClosedFlow4 = ClosedFlow<u32>;
pub type ClosedFlow6 = ClosedFlow<Addr6>;

/// The ends of a closed-flow ring, one entry per family in `ct_closed_ends`
/// (0: IPv4, 1: IPv6): positions only grow (wrapping), a slot is
/// `position % MAX_CT_CLOSED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RingEnds {
    /// The next position to reap.
    pub head: u32,
    /// The next position to fill.
    pub tail: u32,
}

/// Slots of each closed-flow ring: a power of two. Flows closing faster
/// than this many per `CT_REAP_WAIT` overwrite older slots, whose flows
/// are then left to garbage collection.
pub const MAX_CT_CLOSED: u32 = 65_536;

/// Seconds a closed flow keeps its entries, in both directions, before the
/// datapath may take them for a new flow: time enough for the last ACK and
/// a retransmitted FIN.
pub const CT_REAP_WAIT: u32 = 2;

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
    unsafe impl aya::Pod for ClosedFlow4 {}
    unsafe impl aya::Pod for ClosedFlow6 {}
    unsafe impl aya::Pod for RingEnds {}
}
