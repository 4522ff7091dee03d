//! Statistics: per-service and per-backend traffic (`lb_svc_stats`,
//! `lb_be_flows`, 64 ids an entry), open connections (`lb_conns`), and the global event
//! counters (`counters`).

/// Per-service traffic, per CPU (client-to-service direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-backend activity, per CPU (indexed by backend id in `lb_be_flows`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// New flows sent to the backend.
    pub flows: u64,
}

/// Ids per entry of the per-CPU stats arrays (`lb_svc_stats`,
/// `lb_be_flows`): the kernel allocates a per-CPU array's entries one by
/// one, and 131,072 of them took a fifth of a second each map at start;
/// 2,048 entries of 64 take milliseconds. Id `i` is `by_id[i % 64]` of
/// entry `i / 64`.
pub const STATS_PER_ENTRY: u32 = 64;

/// An entry of `lb_svc_stats`: 64 service ids' traffic, per CPU. The
/// counts of an id run on from the service that had it before (the
/// datapath alone writes these); `lb_stats_base` holds where the current
/// service's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceStatsEntry {
    pub by_id: [ServiceStats; STATS_PER_ENTRY as usize],
}

/// An entry of `lb_be_flows`: 64 backend ids' new flows, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendStatsEntry {
    pub by_id: [BackendStats; STATS_PER_ENTRY as usize],
}

/// The stats entry that holds id `id`, and its place in it.
pub const fn stats_slot(id: u32) -> (u32, usize) {
    (id / STATS_PER_ENTRY, (id % STATS_PER_ENTRY) as usize)
}

impl ServiceStats {
    /// The traffic since `base` (counts wrap as the datapath's do).
    pub fn since(self, base: ServiceStats) -> ServiceStats {
        ServiceStats {
            packets: self.packets.wrapping_sub(base.packets),
            bytes: self.bytes.wrapping_sub(base.bytes),
        }
    }

    /// The sum of two CPUs' counts.
    pub fn plus(self, other: &ServiceStats) -> ServiceStats {
        ServiceStats {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// A backend's connections in `lb_conns` (indexed by backend id), counted
/// by the kernel with atomic adds: open connections are `opened - closed`
/// minus what garbage collection reaped (`lb_reaped`, which only the agent
/// writes, so neither side overwrites the other's counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Connections {
    /// New flows whose conntrack entry was written.
    pub opened: u32,
    /// Flows the kernel saw end (a TCP FIN or RST from the client, or a
    /// flow moved away from a backend that left).
    pub closed: u32,
}

/// Indexes of the per-CPU `counters` array: events that are not per service.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A packet for a service that has no backend: passed on untouched.
    NoBackend = 0,
    /// A new flow whose conntrack entries could not be written: forwarded anyway.
    CtInsertFailed = 1,
    /// A fragment of a TCP, UDP or SCTP datagram (IPv4, or IPv6 with the
    /// Fragment header right after the fixed header), whoever's it is. A
    /// first fragment carries the ports and is translated as a whole packet
    /// is; later ones are counted again as `FragmentTracked` or
    /// `FragmentUntracked`. SCTP fragments pass untouched (their CRC covers
    /// the whole datagram).
    Fragment = 2,
    /// A slot pointed at a backend id that is not in the backends map.
    BackendMissing = 3,
    /// An IPv4 packet shorter than its headers claim: passed on untouched.
    Truncated = 4,
    /// A flow whose conntrack backend was gone and was sent to a new one.
    Reselected = 5,
    /// TC could not finish rewriting a packet (helper error): dropped.
    RewriteFailed = 6,
    /// A packet from outside a LoadBalancer's loadBalancerSourceRanges: dropped.
    SourceRangeDenied = 7,
    /// A new flow to a service without endpoints, refused with ICMP port unreachable.
    Rejected = 8,
    /// A new flow to a service without endpoints that could not be refused
    /// (IP options, or the reply could not be built): dropped.
    RejectFailed = 9,
    /// A new flow to an externalTrafficPolicy: Local service without local
    /// endpoints: dropped.
    NoLocalBackend = 10,
    /// A client's affinity pointed at a backend that is no longer a member:
    /// a new one was chosen.
    AffinityStale = 11,
    /// A flow that needed source NAT got none (no node address known, or no
    /// free port): forwarded untranslated.
    SnatFailed = 12,
    /// A new flow that found conntrack full: forwarded by a hash of its
    /// 5-tuple (the same backend for each of its packets) without an entry.
    CtFull = 13,
    /// A TCP packet of a connection whose backend left the service: the
    /// client was sent a RST.
    Reset = 14,
    /// As `Reset`, but the RST could not be built: dropped.
    ResetFailed = 15,
    /// A local socket's connect() (or unconnected UDP flow) to a service
    /// given a backend by the socket hooks.
    SockConnect = 16,
    /// A local socket's connect() or sendmsg() to a service without
    /// endpoints: refused with ECONNREFUSED.
    SockRefused = 17,
    /// A socket-level translation whose reverse entry could not be
    /// written: getpeername() and recvmsg() show the backend's address.
    SockNatFailed = 18,
    /// A new flow to a service from outside claiming one of the node's own
    /// source NAT addresses: dropped, so it cannot touch the node's
    /// source-NATed flows.
    SpoofedNodeSource = 19,
    /// A TCP RST that belongs to no known flow: forwarded by the flow's hash
    /// without creating conntrack state.
    UntrackedRst = 20,
    /// An ICMP error about a translated flow (fragmentation needed, packet
    /// too big, unreachable, time exceeded): its outer and inner headers
    /// translated back.
    IcmpErrorTranslated = 21,
    /// An ICMP error about a translated flow that could not be translated
    /// (truncated quote, helper error): dropped.
    IcmpErrorFailed = 22,
    /// A non-first fragment of a tracked datagram: translated (or dropped)
    /// as its first fragment was.
    FragmentTracked = 23,
    /// A TCP or UDP fragment that could not be tracked, passed untouched: a
    /// later fragment arriving at an ingress hook that translated no first
    /// fragment of its datagram (reordered before it, or the first was lost,
    /// dropped or refused; a datagram that is no service's, or whose reply
    /// is translated at egress, counts here too, as a later fragment cannot
    /// tell), or a translated first fragment whose entry could not be
    /// written.
    FragmentUntracked = 24,
    /// A closed flow whose entries the datapath took back for a new flow
    /// that found conntrack full (see `ClosedFlow`).
    CtReclaimed = 25,
}

impl Counter {
    pub const COUNT: u32 = 26;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::NoBackend,
        Counter::CtInsertFailed,
        Counter::Fragment,
        Counter::BackendMissing,
        Counter::Truncated,
        Counter::Reselected,
        Counter::RewriteFailed,
        Counter::SourceRangeDenied,
        Counter::Rejected,
        Counter::RejectFailed,
        Counter::NoLocalBackend,
        Counter::AffinityStale,
        Counter::SnatFailed,
        Counter::CtFull,
        Counter::Reset,
        Counter::ResetFailed,
        Counter::SockConnect,
        Counter::SockRefused,
        Counter::SockNatFailed,
        Counter::SpoofedNodeSource,
        Counter::UntrackedRst,
        Counter::IcmpErrorTranslated,
        Counter::IcmpErrorFailed,
        Counter::FragmentTracked,
        Counter::FragmentUntracked,
        Counter::CtReclaimed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::NoBackend => "no_backend",
            Counter::CtInsertFailed => "ct_insert_failed",
            Counter::Fragment => "fragment",
            Counter::BackendMissing => "backend_missing",
            Counter::Truncated => "truncated",
            Counter::Reselected => "reselected",
            Counter::RewriteFailed => "rewrite_failed",
            Counter::SourceRangeDenied => "source_range_denied",
            Counter::Rejected => "rejected",
            Counter::RejectFailed => "reject_failed",
            Counter::NoLocalBackend => "no_local_backend",
            Counter::AffinityStale => "affinity_stale",
            Counter::SnatFailed => "snat_failed",
            Counter::CtFull => "ct_full",
            Counter::Reset => "reset",
            Counter::ResetFailed => "reset_failed",
            Counter::SockConnect => "sock_connect",
            Counter::SockRefused => "sock_refused",
            Counter::SockNatFailed => "sock_nat_failed",
            Counter::SpoofedNodeSource => "spoofed_node_source",
            Counter::UntrackedRst => "untracked_rst",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::IcmpErrorFailed => "icmp_error_failed",
            Counter::FragmentTracked => "fragment_tracked",
            Counter::FragmentUntracked => "fragment_untracked",
            Counter::CtReclaimed => "ct_reclaimed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ServiceStatsEntry {}
    unsafe impl aya::Pod for BackendStatsEntry {}
    unsafe impl aya::Pod for Connections {}
}
