//! Program names in the object file.

pub const XDP: &str = "xdproxy_xdp";
pub const TC_INGRESS: &str = "xdproxy_tc";
/// TC egress: translates replies left for the egress hook.
pub const TC_EGRESS: &str = "xdproxy_tc_out";
/// Where a new flow's first packet continues (tail-called from `XDP` and
/// `TC_INGRESS` through `xdp_new_flow`/`tc_new_flow`): writes the flow's
/// conntrack entries, then translates the packet.
pub const XDP_NEW: &str = "xdproxy_xdp_new";
pub const TC_NEW: &str = "xdproxy_tc_new";
/// An XDP program that only returns XDP_PASS: the benchmark's baseline.
pub const XDP_EMPTY: &str = "xdproxy_empty";
/// Restores a saved packet head, then tail-calls `bench_target[0]`.
pub const XDP_BENCH: &str = "xdproxy_bench";
/// A conntrack-like lookup that misses, the same then an insert, and an
/// insert alone: the parts a new flow's cost is made of, for the benchmark.
pub const XDP_BENCH_CT_LOOKUP: &str = "xdproxy_bench_ct_lookup";
pub const XDP_BENCH_CT_LOOKUP_INSERT: &str = "xdproxy_bench_ct_lookup_insert";
pub const XDP_BENCH_CT_INSERT: &str = "xdproxy_bench_ct_insert";
/// A conntrack-like lookup that finds its key: an established packet's.
pub const XDP_BENCH_CT_HIT: &str = "xdproxy_bench_ct_hit";
/// The same on conntrack's own table (`ct4_table`'s code, on a table of
/// its own): a lookup that misses, lookup and insert, a lookup that hits.
pub const XDP_BENCH_LINES_LOOKUP: &str = "xdproxy_bench_lines_lookup";
pub const XDP_BENCH_LINES_LOOKUP_INSERT: &str = "xdproxy_bench_lines_lookup_insert";
pub const XDP_BENCH_LINES_HIT: &str = "xdproxy_bench_lines_hit";
/// cgroup sock_addr hooks: socket-level load balancing.
pub const SOCK_CONNECT4: &str = "xdproxy_connect4";
pub const SOCK_CONNECT6: &str = "xdproxy_connect6";
pub const SOCK_SENDMSG4: &str = "xdproxy_sendmsg4";
pub const SOCK_SENDMSG6: &str = "xdproxy_sendmsg6";
pub const SOCK_RECVMSG4: &str = "xdproxy_recvmsg4";
pub const SOCK_RECVMSG6: &str = "xdproxy_recvmsg6";
pub const SOCK_GETPEERNAME4: &str = "xdproxy_getpeername4";
pub const SOCK_GETPEERNAME6: &str = "xdproxy_getpeername6";
