//! Load balancing: frontends and their service entries (`lb4_services`,
//! `lb6_services`), slot tables (`lb_slots`), backends and members
//! (`lb4_backends_v2`, `lb6_backends_v2`, `lb4_members`, `lb6_members`), session
//! affinity and source ranges, and the service flags and algorithms.

use super::Addr6;

/// What a client addresses: an IPv4 frontend (service VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Frontend4 {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// `SCOPE_*`: which clients the entry is for.
    pub scope: u8,
}

/// A frontend entry for every client: the packet path reads only these.
pub const SCOPE_ALL: u8 = 0;
/// A frontend entry for clients on this node only (the socket hooks), where
/// they get other backends than clients elsewhere (externalTrafficPolicy:
/// Local frontends, which local clients reach through all endpoints, as
/// kube-proxy short-circuits them). Its `SCOPE_ALL` twin has
/// `SVC_LOCAL_TWIN`.
pub const SCOPE_LOCAL: u8 = 1;

/// A frontend's service entry (family-independent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// This frontend's own id: `lb_svc_stats`, `lb4_members`, affinity, source
    /// ranges, round robin and conntrack go by it.
    pub id: u32,
    /// Slots 0..backend_count of its slot table hold this service's backends.
    pub backend_count: u32,
    /// `SVC_*` bits.
    pub flags: u32,
    /// With `SVC_AFFINITY`: seconds without traffic after which a client's
    /// backend is forgotten.
    pub affinity_timeout: u32,
    /// `ALG_*`: how a new flow's backend is chosen.
    pub algorithm: u32,
    /// With `ALG_MAGLEV` or `ALG_SOURCE_HASH`: slots 0..table_size hold the
    /// lookup table (a prime size); otherwise 0, and slots 0..backend_count
    /// list the backends.
    pub table_size: u32,
    /// The slot table it reads: the first half of its `lb_slots` keys.
    /// Frontends whose slots would be equal (same backends in the same
    /// order, same table size) share one table, so a Service's cluster IP,
    /// node ports and external IPs cost one copy.
    pub slots_id: u32,
}

/// Backend choice for a new flow: uniformly at random (kube-proxy's default).
pub const ALG_RANDOM: u32 = 0;
/// The service's backends in turn (one counter per service in `lb_rr`).
pub const ALG_ROUND_ROBIN: u32 = 1;
/// The backend with the fewest open connections (`lb_conns`).
pub const ALG_LEAST_CONN: u32 = 2;
/// Maglev consistent hashing of the flow's 5-tuple over the service's table.
pub const ALG_MAGLEV: u32 = 3;
/// Maglev consistent hashing of the client address only.
pub const ALG_SOURCE_HASH: u32 = 4;
/// Least connections looks at this many consecutive slots from a random
/// one: exact for services with up to this many backends.
pub const LEAST_CONN_SCAN: u32 = 64;

/// sessionAffinity: ClientIP: a client's new flows go to the backend its
/// earlier ones went to (`lb4_affinity`), while it is still a member.
pub const SVC_AFFINITY: u32 = 2;
/// loadBalancerSourceRanges: only sources in `lb4_src_ranges` for this
/// service id are served; others are dropped and counted.
pub const SVC_SOURCE_RANGES: u32 = 4;
/// With no backend, drop (a node without local endpoints under
/// externalTrafficPolicy: Local) rather than refuse the connection.
pub const SVC_DROP_WHEN_EMPTY: u32 = 8;
/// Clients on this node have an entry of their own (`SCOPE_LOCAL`).
pub const SVC_LOCAL_TWIN: u32 = 32;
/// Only in `lb_svc_by_id`: the id's frontend has this service entry (an
/// array reads zero where nothing is).
pub const SVC_LISTED: u32 = 64;

/// Replies are translated back at the egress of the interface that takes
/// them to the client, not at ingress: a frontend on one of the node's own
/// addresses (NodePort, a node's external IP) would otherwise become the
/// source of a packet the kernel forwards, and the kernel drops such packets
/// as martians.
pub const SVC_REPLY_AT_EGRESS: u32 = 1;

/// Key of `lb_slots`: one backend position of one slot table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SlotKey {
    /// The table: a `Service::slots_id`, not a service id.
    pub service_id: u32,
    pub slot: u32,
}

/// A new flow's backend, chosen by the program its first packet met and
/// taken up by the new-flow program that one tail-calls, which writes the
/// flow's conntrack entries (`new_flow`, one per family, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Chosen<A> {
    pub service: Service,
    pub backend_id: u32,
    /// The backend's port, network byte order.
    pub port: u16,
    /// `BACKEND_*` bits (as a member of the service).
    pub flags: u8,
    pub _pad: u8,
    /// The backend's address, network byte order.
    pub addr: A,
}

/// The value of `new_flow`: kept as it is by later versions (or renamed),
/// as a program and the new-flow program of another version may share it
/// while an agent replaces them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewFlows {
    pub v4: Chosen<u32>,
    pub v6: Chosen<Addr6>,
}

/// An IPv4 backend (at its backend id in `lb4_backends_v2`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend4 {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_*` bits (as a member: how the service uses it).
    pub flags: u8,
}

impl Backend4 {
    /// False for an id of `lb4_backends_v2` no backend holds (zeroes:
    /// every backend has a protocol).
    #[inline(always)]
    pub fn present(&self) -> bool {
        self.proto != 0
    }
}

/// A member that is terminating: its flows stay, new ones go elsewhere
/// (it has no slot, but conntrack still honours it).
pub const BACKEND_TERMINATING: u8 = 1;

/// Key of `lb4_members`: a backend of a service. The value is the backend's
/// `Backend4` as the service uses it, so that a conntrack or affinity entry
/// naming a backend id that was since reused for another address is not
/// mistaken for a live one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Key of `lb4_affinity`: one client of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Affinity4Key {
    pub service_id: u32,
    /// Client IPv4 address, network byte order.
    pub client_addr: u32,
}

/// Value of `lb4_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    /// bpf_ktime_get_ns() of the client's last packet (at most a second stale).
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Data of an `lb4_src_ranges` LPM key: the prefix length covers all of
/// `service_id` (32 bits) plus the range's own prefix of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceRange4 {
    /// Big-endian, so the trie compares it first and whole.
    pub service_id_be: u32,
    /// IPv4 network address, network byte order.
    pub addr: u32,
}

/// Source NAT for flows a backend would otherwise answer around this node:
/// traffic from outside to external frontends under externalTrafficPolicy:
/// Cluster (as kube-proxy masquerades it), and a backend reaching itself
/// through its own Service (hairpin; always).
pub const SVC_SNAT_EXTERNAL: u32 = 16;

/// What a client addresses: an IPv6 frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Frontend6 {
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
}

/// An IPv6 backend (at its backend id in `lb6_backends_v2`, and the value
/// of `lb6_members`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend6 {
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

impl Backend6 {
    /// As `Backend4::present`.
    #[inline(always)]
    pub fn present(&self) -> bool {
        self.proto != 0
    }
}

/// Key of `lb6_affinity`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Affinity6Key {
    pub service_id: u32,
    pub client_addr: Addr6,
}

/// Data of an `lb6_src_ranges` LPM key, as `SourceRange4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceRange6 {
    pub service_id_be: u32,
    pub addr: Addr6,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for Frontend4 {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SourceRange4 {}
    unsafe impl aya::Pod for Frontend6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Affinity6Key {}
    unsafe impl aya::Pod for SourceRange6 {}
}
