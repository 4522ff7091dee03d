//! Map names as the kernel and bpffs see them (at most 15 characters),
//! grouped as the `maps` files are. The kernel side's per-CPU scratch maps
//! (`ct_scratch`, `frag_scratch`, `scratch`, `icmp_scratch`) are not
//! listed: nothing outside the programs uses them.

// Node configuration (`config`).
pub const CONFIG: &str = "lb_config";

// Load balancing (`lb`).
pub const SERVICES4: &str = "lb4_services";
pub const SERVICES6: &str = "lb6_services";
pub const SLOTS: &str = "lb_slots";
/// Backend id -> backend, arrays: an id no backend holds is all zeroes
/// (`Backend4::present`). A new flow finds its backend in a load the
/// verifier inlines, not a hash lookup.
pub const BACKENDS4: &str = "lb4_backends_v2";
pub const BACKENDS6: &str = "lb6_backends_v2";
/// The hash maps versions before 2026-12-08 kept backends in: a datapath
/// adopted from one has them copied into the arrays, then unpinned.
pub const LEGACY_BACKENDS4: &str = "lb4_backends";
pub const LEGACY_BACKENDS6: &str = "lb6_backends";
pub const MEMBERS4: &str = "lb4_members";
pub const MEMBERS6: &str = "lb6_members";
pub const AFFINITY4: &str = "lb4_affinity";
pub const AFFINITY6: &str = "lb6_affinity";
pub const SOURCE_RANGES4: &str = "lb4_src_ranges";
pub const SOURCE_RANGES6: &str = "lb6_src_ranges";
pub const ROUND_ROBIN: &str = "lb_rr";
/// Service id -> the coarse second (as conntrack counts them) from which
/// its members may have lost one: written by the agent before it removes
/// a member, and for every id when it starts. An established flow whose
/// last packet came before that checks that its backend is still a
/// member; the others spare that lookup.
pub const MEMBER_GONE: &str = "lb_member_gone";
/// One bit per frontend and per backend (`FILTER_WORDS` words): packets
/// that name neither skip the service and reply lookups.
pub const FILTER: &str = "lb_filter";
/// Service id -> its service entry (`Service`, with `SVC_LISTED`) while
/// the id's frontend has one: an established flow's packet finds its
/// service from its conntrack entry, without the frontend's lookup.
pub const SERVICES_BY_ID: &str = "lb_svc_by_id";
/// Service id -> its frontend (`Frontend4`/`Frontend6`): where a reply of a
/// `CT_SOCKET` flow comes from.
pub const REV_NAT4: &str = "lb4_rev_nat";
pub const REV_NAT6: &str = "lb6_rev_nat";
/// A new flow's chosen backend on its way to the new-flow program (per
/// CPU, `NewFlows`), and the new-flow programs the XDP and TC ingress
/// programs tail-call (slot 0 of each).
pub const NEW_FLOW: &str = "new_flow";
pub const XDP_NEW_FLOW: &str = "xdp_new_flow";
pub const TC_NEW_FLOW: &str = "tc_new_flow";

// Conntrack (`conntrack`, `ctlines`): entries in groups of eight lines,
// and past them one group holding the seed of the table's hash.
pub const CT4_GROUPS: &str = "ct4_table";
pub const CT6_GROUPS: &str = "ct6_table";
/// The tables of the version before, hashed without a seed: an
/// agent adopting such a datapath copies their entries into the seeded
/// tables.
pub const LEGACY_GROUPS4: &str = "ct4_groups";
pub const LEGACY_GROUPS6: &str = "ct6_groups";
/// The kernel hash maps conntrack was kept in before its own table: an
/// agent adopting such a datapath copies their entries into the lines.
pub const LEGACY_CONNTRACK4: &str = "ct4";
pub const LEGACY_CONNTRACK6: &str = "ct6";
/// Conntrack for new flows that found their group of `ct4_table`/
/// `ct6_table` full: LRU maps.
pub const OVERFLOW4: &str = "ct4_overflow";
pub const OVERFLOW6: &str = "ct6_overflow";
/// Non-zero while the overflow maps may hold entries: the datapath
/// looks there only then.
pub const OVERFLOWED: &str = "ct_overflowed";
/// Non-zero while `ct4`/`ct6` or their overflow maps may hold
/// `CT_FORWARD`/`CT_REPLY` entries: only then does a packet that no
/// `CT_SOCKET` entry claims look for them.
pub const PAIRED: &str = "ct_paired";
/// Rings of closed flows, and their ends (see `ClosedFlow`).
pub const CLOSED4: &str = "ct4_closed";
pub const CLOSED6: &str = "ct6_closed";
pub const CLOSED_ENDS: &str = "ct_closed_ends";

// Socket-level load balancing (`socket`).
/// Per socket, its backend for a frontend and the frontend behind a
/// backend (LRU maps).
pub const SOCK_NAT4: &str = "sock4_nat";
pub const SOCK_NAT6: &str = "sock6_nat";

// Fragments (`frag`).
/// Fragmented datagrams: the verdict of each one's first fragment, for
/// its later fragments (LRU maps).
pub const FRAGMENTS4: &str = "frag4";
pub const FRAGMENTS6: &str = "frag6";

// Statistics (`stats`).
/// Per service id, per CPU, 64 ids an entry (`ServiceStatsEntry`).
pub const SERVICE_STATS: &str = "lb_svc_stats";
/// Where the current service's counts of each id start (the agent writes
/// it when it gives an id out).
pub const SERVICE_STATS_BASE: &str = "lb_stats_base";
/// Per backend id, per CPU, 64 ids an entry (`BackendStatsEntry`).
pub const BACKEND_STATS: &str = "lb_be_flows";
pub const CONNECTIONS: &str = "lb_conns";
pub const REAPED: &str = "lb_reaped";
pub const COUNTERS: &str = "counters";

// Benchmark (`bench`).
/// Benchmark-only maps: never pinned.
pub const BENCH_PACKET: &str = "bench_packet";
pub const BENCH_TARGET: &str = "bench_target";
/// The benchmark's conntrack-shaped map (see `programs::XDP_BENCH_CT_INSERT`).
pub const BENCH_CT: &str = "bench_ct";
/// One key, looked up by the hit program (`programs::XDP_BENCH_CT_HIT`):
/// shaped and sized as `bench_ct`, but nothing else shares the key's
/// bucket.
pub const BENCH_CT_HIT: &str = "bench_ct_hit";

/// Every map the programs define, for pinning and cleanup.
pub const ALL: [&str; 40] = [
    FILTER,
    SERVICES_BY_ID,
    MEMBER_GONE,
    SERVICE_STATS_BASE,
    NEW_FLOW,
    XDP_NEW_FLOW,
    TC_NEW_FLOW,
    REV_NAT4,
    REV_NAT6,
    PAIRED,
    CLOSED4,
    CLOSED6,
    CLOSED_ENDS,
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
    CT6_GROUPS,
    AFFINITY6,
    SOURCE_RANGES6,
    SERVICES4,
    BACKENDS4,
    SLOTS,
    CT4_GROUPS,
    SERVICE_STATS,
    COUNTERS,
    MEMBERS4,
    AFFINITY4,
    SOURCE_RANGES4,
];

/// Names earlier versions pinned maps under, removed when a datapath is
/// loaded: the programs that used them are replaced by then, and the kernel
/// keeps a map alive while anything still holds it.
pub const RETIRED: &[&str] = &[
    "lb_members",
    "lb_stats",
    "lb_be_stats",
    LEGACY_BACKENDS4,
    LEGACY_BACKENDS6,
    LEGACY_CONNTRACK4,
    LEGACY_CONNTRACK6,
    LEGACY_GROUPS4,
    LEGACY_GROUPS6,
];
