//! Benchmark support, never attached by the agent.
//!
//! BPF_PROG_TEST_RUN with repeat > 1 does not restore the packet between
//! runs, so a program that rewrites it would time a different path from the
//! second run on. This wrapper puts the saved packet head back first (and,
//! for new-flow runs, gives it a source never seen before), then tail-calls
//! the program under test. The baseline is the same wrapper calling the empty
//! program, so the copy cancels out.
//!
//! Four more targets time conntrack lookups and writes alone on the flow
//! the wrapper made (IPv4, TCP): what a new flow's and an established
//! packet's nanoseconds are made of (`bench_table` times the same on a
//! table of our own).

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, ProgramArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use proxy_common::{BENCH_HEAD, BenchPacket, CT_FORWARD, Ct4Entry, Ct4Key};

use crate::parse::ptr_at;

#[btf_map(name = "bench_packet")]
static BENCH_PACKET: Array<BenchPacket, 1> = Array::new();

#[btf_map(name = "bench_target")]
static BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

/// Where `xdproxy_bench_ct_insert` writes: the kernel hash map conntrack
/// was kept in before its own table, of its size. Created with one entry;
/// the benchmark sizes it when it loads the object.
#[btf_map(name = "bench_ct")]
static BENCH_CT: HashMap<Ct4Key, Ct4Entry, 1> = HashMap::new();

#[xdp]
pub fn xdproxy_bench(ctx: XdpContext) -> u32 {
    restore(&ctx);
    // SAFETY: a tail call either jumps or returns here when the slot is empty.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[inline(always)]
fn restore(ctx: &XdpContext) {
    let (Some(saved), Some(head)) = (
        BENCH_PACKET.get_ptr_mut(0),
        ptr_at::<[u8; BENCH_HEAD]>(ctx.data(), ctx.data_end(), 0),
    ) else {
        return;
    };
    // SAFETY: both pointers were checked (map value, packet bounds).
    unsafe {
        restore_head(head.cast(), (&raw const (*saved).head).cast());
        if (*saved).vary_source != 0 {
            let seq = (*saved).seq;
            (*saved).seq = seq.wrapping_add(1);
            // Source address bytes 2-3 and source port: 2^32 distinct flows.
            let bytes = seq.to_be_bytes();
            (*head)[28] = bytes[0];
            (*head)[29] = bytes[1];
            (*head)[34] = bytes[2];
            (*head)[35] = bytes[3];
        }
    }
}

/// Copies the saved head over the packet's, a 64-bit word at a time: copied
/// whole, it became a call to a byte-by-byte `memmove`, which took about
/// half of the wrapper's time (perf) and added its noise to every case.
///
/// # Safety
/// Both point to `BENCH_HEAD` bytes: the packet's (stores need no
/// alignment in BPF) and a map value's (8-byte aligned by the kernel).
#[inline(always)]
unsafe fn restore_head(dst: *mut u64, src: *const u64) {
    for i in 0..BENCH_HEAD / 8 {
        // SAFETY: within both, per the caller.
        unsafe { core::ptr::write_volatile(dst.add(i), *src.add(i)) };
    }
}

/// A lookup of the packet's forward key in `bench_ct` that misses (the flow
/// is new): the cold bucket a new flow's first lookup pays for.
#[xdp]
pub fn xdproxy_bench_ct_lookup(ctx: XdpContext) -> u32 {
    match forward_key(&ctx) {
        Some(key) if BENCH_CT.get_ptr(&key).is_none() => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// A lookup of the packet's forward key in `bench_ct` (a miss: the flow
/// is new), then its insert: a new flow's forward entry, as it is written.
#[xdp]
pub fn xdproxy_bench_ct_lookup_insert(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if BENCH_CT.get_ptr(&key).is_some() {
        return xdp_action::XDP_ABORTED;
    }
    insert(&BENCH_CT, &key)
}

/// One insert of the packet's forward key into `bench_ct`, as a new flow
/// inserts each of its entries.
#[xdp]
pub fn xdproxy_bench_ct_insert(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    insert(&BENCH_CT, &key)
}

/// `bench_ct`'s shape and size, holding only the hit program's key.
#[btf_map(name = "bench_ct_hit")]
static BENCH_CT_HIT: HashMap<Ct4Key, Ct4Entry, 1> = HashMap::new();

/// A lookup of the packet's forward key that finds it: an established
/// packet's conntrack lookup. The first run inserts the key (and returns
/// XDP_TX); every later one finds it (XDP_PASS).
#[xdp]
pub fn xdproxy_bench_ct_hit(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if BENCH_CT_HIT.get_ptr(&key).is_some() {
        return xdp_action::XDP_PASS;
    }
    match insert(&BENCH_CT_HIT, &key) {
        xdp_action::XDP_PASS => xdp_action::XDP_TX,
        other => other,
    }
}

#[inline(always)]
fn insert(map: &HashMap<Ct4Key, Ct4Entry, 1>, key: &Ct4Key) -> u32 {
    match map.insert(key, &Ct4Entry::default(), 0) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

/// The forward conntrack key of an Ethernet + IPv4 (no options) + TCP/UDP
/// packet, read at fixed offsets: the bench builds no other kind.
#[inline(always)]
pub fn forward_key(ctx: &XdpContext) -> Option<Ct4Key> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let proto = ptr_at::<u8>(start, end, 23)?;
    let addrs = ptr_at::<[u32; 2]>(start, end, 26)?;
    let ports = ptr_at::<[u16; 2]>(start, end, 34)?;
    // SAFETY: all three were bounds-checked against the packet.
    let (proto, [src_addr, dst_addr], [src_port, dst_port]) = unsafe { (*proto, *addrs, *ports) };
    Some(Ct4Key {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        proto,
        direction: CT_FORWARD,
        _pad: 0,
    })
}
