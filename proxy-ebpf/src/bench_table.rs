//! A conntrack table of our own, sketched for the benchmark only: what a
//! new flow's conntrack write would cost without the kernel's hash map.
//!
//! One cache line per flow in an array map (the verifier inlines an array
//! lookup: no helper call, no bucket array, no free list), found at a hash
//! of the key and up to `PROBES` lines after it. A lookup stops at the
//! first empty line, so a new flow's lookup and its insert are one walk:
//! the empty line that ends the lookup is the one the insert claims, by
//! compare-and-exchange on its state word, as a CPU racing for the same
//! line would. Nothing here removes entries: the benchmark only adds.

use aya_ebpf::{
    bindings::xdp_action, btf_maps::Array, macros::btf_map, macros::xdp, programs::XdpContext,
};
use proxy_common::{BENCH_SLOTS_MASK, Ct4Entry, Ct4Key};

use crate::{atomic, bench::forward_key, hash::mix};

/// Lines a key may be found at, from its hash on.
const PROBES: u32 = 8;
const EMPTY: u32 = 0;
const CLAIMED: u32 = 1;
const LIVE: u32 = 2;

/// One flow: 64 bytes, a cache line.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot {
    state: u32,
    _pad: u32,
    key: [u64; 2],
    value: Ct4Entry,
    _rest: [u32; 5],
}

/// Created with one line; the benchmark sizes it as `BENCH_SLOTS_MASK + 1`.
#[btf_map(name = "bench_ct_slots")]
static BENCH_CT_SLOTS: Array<Slot, 1> = Array::new();

/// The key's 16 bytes as two words, compared and copied as such.
#[inline(always)]
fn words(key: &Ct4Key) -> [u64; 2] {
    // SAFETY: `Ct4Key` is 16 bytes of plain data with explicit padding.
    unsafe { core::mem::transmute::<Ct4Key, [u64; 2]>(*key) }
}

#[inline(always)]
fn home(key: &[u64; 2]) -> u32 {
    let folded = key[0] ^ key[1].rotate_left(29);
    mix(mix(folded as u32) ^ (folded >> 32) as u32)
}

/// What a walk from the key's home line found.
enum Found {
    Live,
    /// The first empty line, the one an insert takes.
    Empty(*mut Slot),
    Full,
}

/// The same lines, holding only the hit program's key.
#[btf_map(name = "bench_ct_hit_slots")]
static BENCH_CT_HIT_SLOTS: Array<Slot, 1> = Array::new();

#[inline(always)]
fn walk(lines: &Array<Slot, 1>, key: &[u64; 2]) -> Found {
    let start = home(key);
    for i in 0..PROBES {
        let Some(slot) = lines.get_ptr_mut(start.wrapping_add(i) & BENCH_SLOTS_MASK) else {
            return Found::Full;
        };
        // SAFETY: a live array value.
        let (state, at) = unsafe { ((*slot).state, (*slot).key) };
        if state == EMPTY {
            return Found::Empty(slot);
        }
        if state == LIVE && at == *key {
            return Found::Live;
        }
    }
    Found::Full
}

/// The packet's forward key looked up, a miss: the line that ends the walk.
#[xdp]
pub fn xdproxy_bench_ct_slots_lookup(ctx: XdpContext) -> u32 {
    match forward_key(&ctx).map(|k| walk(&BENCH_CT_SLOTS, &words(&k))) {
        Some(Found::Empty(_)) => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// The packet's forward key looked up, a miss, then written into the empty
/// line the lookup ended at.
#[xdp]
pub fn xdproxy_bench_ct_slots_lookup_insert(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx).map(|k| words(&k)) else {
        return xdp_action::XDP_ABORTED;
    };
    let Found::Empty(slot) = walk(&BENCH_CT_SLOTS, &key) else {
        return xdp_action::XDP_ABORTED;
    };
    match claim(slot, &key) {
        true => xdp_action::XDP_PASS,
        false => xdp_action::XDP_ABORTED,
    }
}

/// The packet's forward key looked up and found: an established packet's
/// lookup. The first run writes the key (XDP_TX), later ones find it.
#[xdp]
pub fn xdproxy_bench_ct_slots_hit(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx).map(|k| words(&k)) else {
        return xdp_action::XDP_ABORTED;
    };
    match walk(&BENCH_CT_HIT_SLOTS, &key) {
        Found::Live => xdp_action::XDP_PASS,
        Found::Empty(slot) if claim(slot, &key) => xdp_action::XDP_TX,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// Writes `key` into the empty line `slot` once this CPU's exchange
/// claimed it; false if another CPU got there first.
#[inline(always)]
fn claim(slot: *mut Slot, key: &[u64; 2]) -> bool {
    // SAFETY: a live array value, its state word 4-byte aligned; the line
    // is written only by the CPU whose exchange claimed it.
    unsafe {
        if !atomic::compare_exchange(&raw mut (*slot).state, EMPTY, CLAIMED) {
            return false;
        }
        (*slot).key = *key;
        (*slot).value = Ct4Entry::default();
        (*slot).state = LIVE;
    }
    true
}

/// Tags per group: one 32-byte read answers for eight lines.
const GROUP: u32 = 8;
/// A tag being written: its line is not readable yet.
const BUSY: u32 = 1;

/// The same lines behind a compact index: for each group of `GROUP`
/// lines, a 32-bit tag of each line's key (0: empty), filled from the
/// left. The index is a sixteenth of the lines' memory, small enough to
/// stay in cache, so a new flow's miss need not touch a line at all, and
/// its insert only writes one (a store, which does not wait for memory).
#[btf_map(name = "bench_ct_tags")]
static BENCH_CT_TAGS: Array<[u32; GROUP as usize], 1> = Array::new();

/// The lines the tags stand for (`state` unused).
#[btf_map(name = "bench_ct_tag_lines")]
static BENCH_CT_TAG_LINES: Array<Slot, 1> = Array::new();

/// The key's group and its tag (never 0 or `BUSY`).
#[inline(always)]
fn group_and_tag(key: &[u64; 2]) -> (u32, u32) {
    let h = home(key);
    ((h & BENCH_SLOTS_MASK) / GROUP, mix(h) | 0x8000_0000)
}

/// What the key's group says.
enum Tagged {
    Live,
    /// Not there: the first free tag, whose line an insert takes.
    Free(*mut u32, u32),
    Full,
}

#[inline(always)]
fn find(key: &[u64; 2]) -> Tagged {
    let (group, tag) = group_and_tag(key);
    let Some(tags) = BENCH_CT_TAGS.get_ptr_mut(group) else {
        return Tagged::Full;
    };
    for k in 0..GROUP {
        // SAFETY: a live array value; `k` is within it.
        let at = unsafe { (tags as *mut u32).add(k as usize) };
        // SAFETY: as above.
        let seen = unsafe { *at };
        if seen == 0 {
            return Tagged::Free(at, group * GROUP + k);
        }
        if seen == tag && line_holds(group * GROUP + k, key) {
            return Tagged::Live;
        }
    }
    Tagged::Full
}

#[inline(always)]
fn line_holds(index: u32, key: &[u64; 2]) -> bool {
    BENCH_CT_TAG_LINES
        .get_ptr(index)
        // SAFETY: a live array value.
        .is_some_and(|line| unsafe { (*line).key == *key })
}

/// The packet's forward key looked up in the tags, a miss.
#[xdp]
pub fn xdproxy_bench_ct_tags_lookup(ctx: XdpContext) -> u32 {
    match forward_key(&ctx).map(|k| find(&words(&k))) {
        Some(Tagged::Free(..)) => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_ABORTED,
    }
}

/// The packet's forward key looked up in the tags, a miss, then its line
/// written and its tag set.
#[xdp]
pub fn xdproxy_bench_ct_tags_lookup_insert(ctx: XdpContext) -> u32 {
    let Some(key) = forward_key(&ctx).map(|k| words(&k)) else {
        return xdp_action::XDP_ABORTED;
    };
    let Tagged::Free(at, index) = find(&key) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(line) = BENCH_CT_TAG_LINES.get_ptr_mut(index) else {
        return xdp_action::XDP_ABORTED;
    };
    let (_, tag) = group_and_tag(&key);
    // SAFETY: `at` is a live tag, 4-byte aligned; the line is written
    // only by the CPU whose exchange claimed its tag, and read by others
    // only once the tag is set.
    unsafe {
        if !atomic::compare_exchange(at, 0, BUSY) {
            return xdp_action::XDP_ABORTED;
        }
        (*line).key = key;
        (*line).value = Ct4Entry::default();
        *at = tag;
    }
    xdp_action::XDP_PASS
}
