//! Conntrack's own table (`ctlines`) timed alone, for the benchmark: a
//! lookup that misses, a lookup and an insert (one walk of the key's
//! group, then the line claimed), and a lookup that finds its key, on
//! tables of conntrack's default size that hold only the benchmark's keys
//! (`bench.rs` times the same on the kernel's hash map, which conntrack
//! used before). Inlined here: the datapath calls the same code as a
//! global function, one call and return more.

use aya_ebpf::{
    bindings::xdp_action, btf_maps::Array, macros::btf_map, macros::xdp, programs::XdpContext,
};
use proxy_common::{Ct4Entry, Ct4Group};

use crate::{
    bench::forward_key,
    ctlines::{self, ARRAY, MMAPABLE},
};

#[btf_map(name = "bench_ct_groups")]
static BENCH_CT_GROUPS: Array<Ct4Group, ARRAY, MMAPABLE> = Array::new();

/// The same, holding only the hit program's key.
#[btf_map(name = "bench_ct_hit_groups")]
static BENCH_CT_HIT_GROUPS: Array<Ct4Group, ARRAY, MMAPABLE> = Array::new();

/// The packet's forward key looked up, a miss.
#[xdp]
pub fn xdproxy_bench_lines_lookup(ctx: XdpContext) -> u32 {
    match forward_key(&ctx).map(|key| ctlines::find(&BENCH_CT_GROUPS, &key)) {
        Some(line) if line < 0 => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// The packet's forward key looked up, a miss, then written into a free
/// line of its group: one walk.
#[xdp]
pub fn xdproxy_bench_lines_lookup_insert(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    match ctlines::insert::<_, _, false>(&BENCH_CT_GROUPS, &key, &Ct4Entry::default()) {
        0 => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// The packet's forward key looked up and found: an established packet's
/// lookup. The first run writes the key (XDP_TX), later ones find it.
#[xdp]
pub fn xdproxy_bench_lines_hit(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if ctlines::find(&BENCH_CT_HIT_GROUPS, &key) >= 0 {
        return xdp_action::XDP_PASS;
    }
    match ctlines::insert::<_, _, false>(&BENCH_CT_HIT_GROUPS, &key, &Ct4Entry::default()) {
        0 => xdp_action::XDP_TX,
        _ => xdp_action::XDP_ABORTED,
    }
}
