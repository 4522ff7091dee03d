//! Map names, limits, keys and values.

/// Map names as the kernel and bpffs see them (at most 15 characters).
pub mod names {
    pub const SERVICES4: &str = "lb4_services";
    pub const BACKENDS4: &str = "lb4_backends";
    pub const SLOTS: &str = "lb_slots";
    pub const CONNTRACK4: &str = "ct4";
    pub const SERVICE_STATS: &str = "lb_stats";
    pub const COUNTERS: &str = "counters";
    pub const MEMBERS: &str = "lb_members";
    pub const CONFIG: &str = "lb_config";
    pub const SERVICES6: &str = "lb6_services";
    pub const BACKENDS6: &str = "lb6_backends";
    pub const MEMBERS6: &str = "lb6_members";
    pub const CONNTRACK6: &str = "ct6";
    pub const AFFINITY6: &str = "lb6_affinity";
    pub const SOURCE_RANGES6: &str = "lb6_src_ranges";
    pub const AFFINITY4: &str = "lb4_affinity";
    pub const SOURCE_RANGES4: &str = "lb4_src_ranges";
    /// Benchmark-only maps: never pinned.
    pub const BENCH_PACKET: &str = "bench_packet";
    pub const BENCH_TARGET: &str = "bench_target";
    pub const BACKEND_STATS: &str = "lb_be_stats";
    pub const CONNECTIONS: &str = "lb_conns";
    pub const ROUND_ROBIN: &str = "lb_rr";
    pub const REAPED: &str = "lb_reaped";
    /// Conntrack for new flows that found `ct4`/`ct6` full: LRU maps.
    pub const OVERFLOW4: &str = "ct4_overflow";
    pub const OVERFLOW6: &str = "ct6_overflow";
    /// Non-zero while the overflow maps may hold entries: the datapath
    /// looks there only then.
    pub const OVERFLOWED: &str = "ct_overflowed";
    /// Socket-level load balancing: per socket, its backend for a
    /// frontend and the frontend behind a backend (LRU maps).
    pub const SOCK_NAT4: &str = "sock4_nat";
    pub const SOCK_NAT6: &str = "sock6_nat";
    /// Fragmented datagrams: the verdict of each one's first fragment, for
    /// its later fragments (LRU maps).
    pub const FRAGMENTS4: &str = "frag4";
    pub const FRAGMENTS6: &str = "frag6";
    /// Every map the programs define, for pinning and cleanup.
    pub const ALL: [&str; 27] = [
        FRAGMENTS4,
        FRAGMENTS6,
        SOCK_NAT4,
        SOCK_NAT6,
        OVERFLOW4,
        OVERFLOW6,
        OVERFLOWED,
        REAPED,
        BACKEND_STATS,
        CONNECTIONS,
        ROUND_ROBIN,
        CONFIG,
        SERVICES6,
        BACKENDS6,
        MEMBERS6,
        CONNTRACK6,
        AFFINITY6,
        SOURCE_RANGES6,
        SERVICES4,
        BACKENDS4,
        SLOTS,
        CONNTRACK4,
        SERVICE_STATS,
        COUNTERS,
        MEMBERS,
        AFFINITY4,
        SOURCE_RANGES4,
    ];
}

/// Program names in the object file.
pub mod programs {
    pub const XDP: &str = "xdproxy_xdp";
    pub const TC_INGRESS: &str = "xdproxy_tc";
    /// TC egress: translates replies left for the egress hook.
    pub const TC_EGRESS: &str = "xdproxy_tc_out";
    /// An XDP program that only returns XDP_PASS: the benchmark's baseline.
    pub const XDP_EMPTY: &str = "xdproxy_empty";
    /// Restores a saved packet head, then tail-calls `bench_target[0]`.
    pub const XDP_BENCH: &str = "xdproxy_bench";
    /// cgroup sock_addr hooks: socket-level load balancing.
    pub const SOCK_CONNECT4: &str = "xdproxy_connect4";
    pub const SOCK_CONNECT6: &str = "xdproxy_connect6";
    pub const SOCK_SENDMSG4: &str = "xdproxy_sendmsg4";
    pub const SOCK_SENDMSG6: &str = "xdproxy_sendmsg6";
    pub const SOCK_RECVMSG4: &str = "xdproxy_recvmsg4";
    pub const SOCK_RECVMSG6: &str = "xdproxy_recvmsg6";
    pub const SOCK_GETPEERNAME4: &str = "xdproxy_getpeername4";
    pub const SOCK_GETPEERNAME6: &str = "xdproxy_getpeername6";
}

/// Bytes of packet head the benchmark wrapper restores: Ethernet, IPv4
/// without options, TCP without options, and 10 bytes to spare.
pub const BENCH_HEAD: usize = 64;

/// The benchmark wrapper's saved packet (see proxy-ebpf's bench.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchPacket {
    pub head: [u8; BENCH_HEAD],
    /// Non-zero: every run gets a source address and port not seen before.
    pub vary_source: u32,
    pub seq: u32,
}

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
    /// This frontend's own id: `lb_stats`, `lb_members`, affinity, source
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

/// An IPv4 backend (keyed by backend id in `lb4_backends`).
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

/// A member that is terminating: its flows stay, new ones go elsewhere
/// (it has no slot, but conntrack still honours it).
pub const BACKEND_TERMINATING: u8 = 1;

/// Key of `lb_members`: a backend of a service. The value is the backend's
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

/// Source NAT for flows a backend would otherwise answer around this node:
/// traffic from outside to external frontends under externalTrafficPolicy:
/// Cluster (as kube-proxy masquerades it), and a backend reaching itself
/// through its own Service (hairpin; always).
pub const SVC_SNAT_EXTERNAL: u32 = 16;

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
/// Seconds without a packet after which a flow's source NAT port may go to
/// a new flow: long for TCP and SCTP (idle connections are common), short
/// for UDP. Without this, ports would stay taken until LRU eviction.
pub const SNAT_IDLE_STREAM: u32 = 3_600;
pub const SNAT_IDLE_DATAGRAM: u32 = 120;
pub const SNAT_PORT_MAX: u16 = 65_535;

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

/// An IPv6 address as four 32-bit words in network byte order, exactly as
/// in the packet.
pub type Addr6 = [u32; 4];

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

/// An IPv6 backend (keyed by backend id in `lb6_backends`, and the value of
/// `lb6_members`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend6 {
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

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

/// Key of `sock4_nat`: one socket (its cookie) and an address it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockNat4Key {
    /// bpf_get_socket_cookie(): unique per socket for the kernel's uptime.
    pub cookie: u64,
    /// The frontend (`SOCK_FORWARD`) or the backend (`SOCK_REVERSE`).
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

/// A socket's unconnected UDP datagrams to a frontend: which backend.
pub const SOCK_FORWARD: u8 = 0;
/// What a socket connected to a backend through the hooks sees as its
/// peer: the frontend.
pub const SOCK_REVERSE: u8 = 1;

/// Value of `sock4_nat`: the other side of the translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockNat4 {
    /// bpf_get_netns_cookie() of the socket's network namespace: where to
    /// look for it when its backend leaves.
    pub netns_cookie: u64,
    /// The backend (`SOCK_FORWARD`) or the frontend (`SOCK_REVERSE`).
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub service_id: u32,
}

/// Key of `sock6_nat`, as `SockNat4Key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockNat6Key {
    pub cookie: u64,
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: u32,
}

/// Value of `sock6_nat`, as `SockNat4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockNat6 {
    pub netns_cookie: u64,
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub _pad2: u32,
}

/// `FragKey*::hook`: the hook that saw the datagram. Its translation at
/// ingress and at egress are different verdicts on different headers.
pub const FRAG_INGRESS: u8 = 0;
pub const FRAG_EGRESS: u8 = 1;

/// `Frag*Entry::action`: which address of the datagram's first fragment
/// was rewritten, and so of every later one: the source (or destination)
/// becomes the entry's address. The port is the first fragment's new port,
/// kept for inspection only (later fragments carry no ports).
pub const FRAG_SOURCE: u8 = 1;
pub const FRAG_DESTINATION: u8 = 2;

/// Key of `frag4`: one IPv4 datagram as a hook sees it (before its rewrite).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// The IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    /// `FRAG_INGRESS` or `FRAG_EGRESS`.
    pub hook: u8,
}

/// Value of `frag4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag4Entry {
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// `FRAG_*`.
    pub action: u8,
    pub _pad: u8,
}

/// Key of `frag6`: one IPv6 datagram, by its Fragment header's 32-bit
/// identification (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag6Key {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    pub id: u32,
    pub proto: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
}

/// Value of `frag6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag6Entry {
    pub addr: Addr6,
    pub port: u16,
    pub action: u8,
    pub _pad: u8,
}

/// Per-service traffic, per CPU (client-to-service direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-backend activity, per CPU (indexed by backend id in `lb_be_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// New flows sent to the backend.
    pub flows: u64,
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
}

impl Counter {
    pub const COUNT: u32 = 25;
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
        }
    }
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
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Entry {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BenchPacket {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for Affinity4Key {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for SourceRange4 {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for Frontend6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Entry {}
    unsafe impl aya::Pod for Affinity6Key {}
    unsafe impl aya::Pod for SourceRange6 {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for Connections {}
    unsafe impl aya::Pod for SockNat4Key {}
    unsafe impl aya::Pod for SockNat4 {}
    unsafe impl aya::Pod for SockNat6Key {}
    unsafe impl aya::Pod for SockNat6 {}
    unsafe impl aya::Pod for Frag4Key {}
    unsafe impl aya::Pod for Frag4Entry {}
    unsafe impl aya::Pod for Frag6Key {}
    unsafe impl aya::Pod for Frag6Entry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Frontend4>(), 8);
        assert_eq!(size_of::<Service>(), 28);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend4>(), 8);
        assert_eq!(size_of::<Ct4Key>(), 16);
        assert_eq!(size_of::<Ct4Entry>(), 28);
        assert_eq!(size_of::<ServiceStats>(), 16);
        assert_eq!(size_of::<MemberKey>(), 8);
        assert_eq!(size_of::<Affinity4Key>(), 8);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<SourceRange4>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 40);
        assert_eq!(size_of::<Frontend6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<Ct6Key>(), 40);
        assert_eq!(size_of::<Ct6Entry>(), 40);
        assert_eq!(size_of::<BackendStats>(), 8);
        assert_eq!(size_of::<Affinity6Key>(), 20);
        assert_eq!(size_of::<SourceRange6>(), 20);
        assert_eq!(size_of::<SockNat4Key>(), 16);
        assert_eq!(size_of::<SockNat4>(), 24);
        assert_eq!(size_of::<SockNat6Key>(), 32);
        assert_eq!(size_of::<SockNat6>(), 40);
        assert_eq!(size_of::<Frag4Key>(), 12);
        assert_eq!(size_of::<Frag4Entry>(), 8);
        assert_eq!(size_of::<Frag6Key>(), 40);
        assert_eq!(size_of::<Frag6Entry>(), 20);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in names::ALL {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
