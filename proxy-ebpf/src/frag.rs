//! IP fragments of translated flows.
//!
//! Only a datagram's first fragment carries the ports, so only it can be
//! matched to a flow; it is translated as a whole packet is (its L4
//! checksum covers the whole datagram, and an incremental update of it
//! stays right). Its verdict is remembered in `frag4`/`frag6`, keyed by the
//! addresses, IP identification and protocol as this hook saw them, and
//! every later fragment of the datagram gets the same address rewritten
//! (they hold no ports and no L4 checksum; IPv4's header checksum is
//! updated). Storing the rewrite rather than the ports keeps all fragments
//! of a datagram together even if conntrack changes between them, and never
//! makes a later fragment create or touch flow state.
//!
//! A later fragment seen before its first (reordered, or the first was lost
//! or not translated: dropped, refused, not ours) is passed untouched and
//! counted: nothing is invented for it. IPv6 is
//! served with the Fragment header right after the fixed header (how
//! fragments are sent); other extension header chains are not parsed.
//!
//! Keys and values are built in the per-CPU `frag_scratch`, not on the
//! stack: the hooks' stack is nearly full already.

use aya_ebpf::{
    bindings::{BPF_ANY, xdp_action},
    btf_maps::LruHashMap,
    programs::{TcContext, XdpContext},
};
use proxy_common::{
    Addr6, Counter, FRAG_DESTINATION, FRAG_EGRESS, FRAG_INGRESS, FRAG_SOURCE, Frag4Entry, Frag4Key,
    Frag6Entry, Frag6Key, IPPROTO_TCP, IPPROTO_UDP, MAX_FRAGMENTS,
};

use crate::{
    copy,
    family::{Family, V4, V6},
    maps::{self, FRAG_SCRATCH, FRAGMENTS4, FRAGMENTS6, FragScratch},
    nat,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Flow, Frag6Hdr, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr,
        NEXTHDR_FRAGMENT, ptr_at,
    },
    verdict::{Rewrite, Side, Stage},
};

type Map<K, V> = LruHashMap<K, V, { MAX_FRAGMENTS as usize }>;

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// IPv4's more-fragments flag and offset bits of `frag_off`.
const IP_MF_OFFSET: u16 = 0x3fff;
const IP_OFFSET: u16 = 0x1fff;
/// The offset bits of IPv6's `frag_off`.
const IP6_OFFSET: u16 = !7;

/// A family's fragment headers and map.
pub trait Fragments: Family {
    type Key: 'static;
    type Value: 'static;

    fn map() -> &'static Map<Self::Key, Self::Value>;
    /// This family's places in the scratch buffer.
    fn slots(s: &mut FragScratch) -> (&mut Self::Key, &mut Self::Value);
    /// True if the packet whose flow this is is a first fragment (read
    /// before the scratch buffer is looked up: most packets are whole).
    fn fragmented(start: usize, end: usize, flow: &Flow<Self::Addr>) -> bool;
    /// Writes the datagram's key into `key` if the packet whose flow this
    /// is is a first fragment; false for a whole packet.
    fn first(start: usize, end: usize, flow: &Flow<Self::Addr>, key: &mut Self::Key) -> bool;
    /// Writes the datagram's key into `key` if the packet is a later
    /// fragment of a TCP or UDP datagram.
    fn later(start: usize, end: usize, key: &mut Self::Key) -> bool;
    fn set_hook(key: &mut Self::Key, hook: u8);
    /// Fills `value` with `FRAG_*` and the new address and port.
    fn set(value: &mut Self::Value, action: u8, addr: &Self::Addr, port: u16);
    /// The datagram's source and destination address.
    fn addrs(key: &Self::Key) -> (&Self::Addr, &Self::Addr);
    /// The entry's `FRAG_*` and new address.
    fn action(value: &Self::Value) -> (u8, &Self::Addr);
}

/// The per-CPU scratch buffer: used only between writing a key or value and
/// the helper call or packet write that reads it.
#[inline(always)]
fn scratch() -> Option<&'static mut FragScratch> {
    // SAFETY: per-CPU, and no other user while this program runs.
    FRAG_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

#[inline(always)]
fn hook(stage: Stage) -> u8 {
    match stage {
        Stage::Ingress => FRAG_INGRESS,
        Stage::Egress => FRAG_EGRESS,
    }
}

/// Takes a translated first fragment's rewrite for the datagram's later
/// fragments; a whole packet costs one header read. Called after the
/// rewrite (which leaves the identification and offset alone) so that the
/// hooks' crowded stack holds no verdict for it.
#[inline(always)]
pub fn remember<F: Fragments>(
    start: usize,
    end: usize,
    flow: &Flow<F::Addr>,
    stage: Stage,
    rewrite: &Rewrite<F::Addr>,
) {
    if !F::fragmented(start, end, flow) {
        return;
    }
    let Some((key, value)) = scratch().map(F::slots) else {
        return;
    };
    if !F::first(start, end, flow, key) {
        return;
    }
    F::set_hook(key, hook(stage));
    let action = match rewrite.side {
        Side::Source => FRAG_SOURCE,
        Side::Destination => FRAG_DESTINATION,
    };
    F::set(value, action, &rewrite.addr, rewrite.port);
    if F::map().insert(&*key, &*value, BPF_ANY as u64).is_err() {
        maps::count(Counter::FragmentUntracked);
    }
}

/// A later fragment's key (in the scratch buffer) and its datagram's
/// entry; the entry is None if no translated first fragment was seen. Such
/// a miss is counted at ingress only: egress hooks see every forwarded
/// datagram and translate few, so a miss there is the rule, and a datagram
/// reordered on its way in was already counted as it came in.
#[inline(always)]
fn lookup<F: Fragments>(
    start: usize,
    end: usize,
    stage: Stage,
) -> Option<(&'static F::Key, Option<&'static F::Value>)> {
    let (key, _) = scratch().map(F::slots)?;
    if !F::later(start, end, key) {
        return None;
    }
    F::set_hook(key, hook(stage));
    // SAFETY: a live map value, read before this program ends.
    let value = F::map().get_ptr(&*key).map(|v| unsafe { &*v });
    match value {
        Some(_) => maps::count(Counter::FragmentTracked),
        None if stage == Stage::Ingress => maps::count(Counter::FragmentUntracked),
        None => {}
    }
    Some((key, value))
}

/// A packet the flow parser left alone, at XDP: a later fragment of a
/// tracked datagram is translated; anything else passes.
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    match ether_type(start, end) {
        Some(ETH_P_IP) => xdp_later::<V4>(start, end),
        Some(ETH_P_IPV6) => xdp_later::<V6>(start, end),
        _ => xdp_action::XDP_PASS,
    }
}

/// A later fragment holds no ports and no L4 checksum: only the address
/// changes, with IPv4's header checksum.
#[inline(always)]
fn xdp_later<F: Fragments>(start: usize, end: usize) -> u32 {
    let Some((key, Some(value))) = lookup::<F>(start, end, Stage::Ingress) else {
        return xdp_action::XDP_PASS;
    };
    if let Some(ip) = ptr_at::<F::Header>(start, end, ETH_HLEN) {
        let (side, from, to) = change::<F>(key, value);
        // SAFETY: bounds checked by ptr_at.
        unsafe { nat::xdp_set_addr::<F>(ip, side, from, to) };
    }
    xdp_action::XDP_PASS
}

/// As `xdp`, at a TC hook of `stage`.
#[inline(always)]
pub fn tc(ctx: &TcContext, stage: Stage) -> i32 {
    match ether_type(ctx.data(), ctx.data_end()) {
        Some(ETH_P_IP) => tc_later::<V4>(ctx, stage),
        Some(ETH_P_IPV6) => tc_later::<V6>(ctx, stage),
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn tc_later<F: Fragments>(ctx: &TcContext, stage: Stage) -> i32 {
    let Some((key, Some(value))) = lookup::<F>(ctx.data(), ctx.data_end(), stage) else {
        return TC_ACT_OK;
    };
    let (side, from, to) = change::<F>(key, value);
    if nat::tc_set_addr::<F>(ctx, ETH_HLEN, side, from, to).is_err() {
        // Half rewritten, it would fail its header checksum or reach the
        // wrong place: dropped, as a whole packet would be.
        maps::count(Counter::RewriteFailed);
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

#[inline(always)]
fn ether_type(start: usize, end: usize) -> Option<u16> {
    // SAFETY: ptr_at checked the bounds.
    ptr_at::<u16>(start, end, 12).map(|t| u16::from_be(unsafe { *t }))
}

/// Fragments of the protocols whose flows are translated. SCTP's are not:
/// its CRC covers the whole datagram and cannot be updated from the first
/// fragment alone.
#[inline(always)]
fn tracked(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

/// The side of the packet an entry changes, its old address and its new.
#[inline(always)]
fn change<'a, F: Fragments>(
    key: &'a F::Key,
    value: &'a F::Value,
) -> (Side, &'a F::Addr, &'a F::Addr) {
    let (action, to) = F::action(value);
    let (src, dst) = F::addrs(key);
    match action {
        FRAG_SOURCE => (Side::Source, src, to),
        _ => (Side::Destination, dst, to),
    }
}

/// The families' impls differ in how a fragment is recognized (`first`,
/// `later`, given with the invocation); keys and values have the same
/// fields under other types, so the rest is one body.
macro_rules! fragments {
    ($name:ident, $key:ident, $value:ident, $map:ident, $k:ident, $v:ident { $($per_family:tt)* }) => {
        impl Fragments for $name {
            type Key = $key;
            type Value = $value;

            #[inline(always)]
            fn map() -> &'static Map<$key, $value> {
                &$map
            }

            #[inline(always)]
            fn slots(s: &mut FragScratch) -> (&mut $key, &mut $value) {
                (&mut s.$k, &mut s.$v)
            }

            #[inline(always)]
            fn set_hook(key: &mut $key, hook: u8) {
                key.hook = hook;
            }

            #[inline(always)]
            fn set(value: &mut $value, action: u8, addr: &Self::Addr, port: u16) {
                value.addr = *addr;
                value.port = port;
                value.action = action;
                value._pad = 0;
            }

            #[inline(always)]
            fn addrs(key: &$key) -> (&Self::Addr, &Self::Addr) {
                (&key.src_addr, &key.dst_addr)
            }

            #[inline(always)]
            fn action(value: &$value) -> (u8, &Self::Addr) {
                (value.action, &value.addr)
            }

            $($per_family)*
        }
    };
}

fragments!(V4, Frag4Key, Frag4Entry, FRAGMENTS4, key4, value4 {
    #[inline(always)]
    fn fragmented(start: usize, end: usize, flow: &Flow<u32>) -> bool {
        // SAFETY: bounds checked by ptr_at. The flow parser took only
        // first fragments: any bit here means one.
        ptr_at::<Ipv4Hdr>(start, end, flow.l3)
            .is_some_and(|ip| u16::from_be(unsafe { (*ip).frag_off }) & IP_MF_OFFSET != 0)
    }

    #[inline(always)]
    fn first(start: usize, end: usize, flow: &Flow<u32>, key: &mut Frag4Key) -> bool {
        let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, flow.l3) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        // The flow parser took only first fragments: any bit here means one.
        if u16::from_be(ip.frag_off) & IP_MF_OFFSET == 0 {
            return false;
        }
        key.src_addr = flow.saddr;
        key.dst_addr = flow.daddr;
        key.id = ip.id;
        key.proto = flow.proto;
        true
    }

    #[inline(always)]
    fn later(start: usize, end: usize, key: &mut Frag4Key) -> bool {
        let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let later = u16::from_be(ip.frag_off) & IP_OFFSET != 0;
        if ip.ver_ihl >> 4 != 4 || !later || !tracked(ip.proto) {
            return false;
        }
        // SAFETY: fields of the key.
        unsafe {
            copy::store_addr((&raw mut key.src_addr).cast(), &ip.saddr);
            copy::store_addr((&raw mut key.dst_addr).cast(), &ip.daddr);
        }
        key.id = ip.id;
        key.proto = ip.proto;
        true
    }
});

fragments!(V6, Frag6Key, Frag6Entry, FRAGMENTS6, key6, value6 {
    #[inline(always)]
    fn fragmented(start: usize, end: usize, flow: &Flow<Addr6>) -> bool {
        // SAFETY: bounds checked by ptr_at.
        ptr_at::<Ipv6Hdr>(start, end, flow.l3)
            .is_some_and(|ip| unsafe { (*ip).next_header } == NEXTHDR_FRAGMENT)
    }

    #[inline(always)]
    fn first(start: usize, end: usize, flow: &Flow<Addr6>, key: &mut Frag6Key) -> bool {
        let Some(ip) = ptr_at::<Ipv6Hdr>(start, end, flow.l3) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        if unsafe { (*ip).next_header } != NEXTHDR_FRAGMENT {
            return false;
        }
        let Some(frag) = ptr_at::<Frag6Hdr>(start, end, flow.l3 + IPV6_HLEN) else {
            return false;
        };
        key.src_addr = flow.saddr;
        key.dst_addr = flow.daddr;
        // SAFETY: bounds checked by ptr_at.
        key.id = unsafe { (*frag).id };
        key.proto = flow.proto;
        key._pad = [0; 2];
        true
    }

    #[inline(always)]
    fn later(start: usize, end: usize, key: &mut Frag6Key) -> bool {
        let Some(ip) = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN) else {
            return false;
        };
        let Some(frag) = ptr_at::<Frag6Hdr>(start, end, ETH_HLEN + IPV6_HLEN) else {
            return false;
        };
        // SAFETY: both bounds checked by ptr_at.
        let (ip, frag) = unsafe { (&*ip, &*frag) };
        let later = u16::from_be(frag.frag_off) & IP6_OFFSET != 0;
        let ours = ip.next_header == NEXTHDR_FRAGMENT && tracked(frag.next_header);
        if u32::from_be(ip.ver_tc_flow) >> 28 != 6 || !ours || !later {
            return false;
        }
        // SAFETY: fields of the key.
        unsafe {
            copy::store_addr((&raw mut key.src_addr).cast(), &ip.saddr);
            copy::store_addr((&raw mut key.dst_addr).cast(), &ip.daddr);
        }
        key.id = frag.id;
        key.proto = frag.next_header;
        key._pad = [0; 2];
        true
    }
});
