//! Refusing a flow to a service without endpoints: the packet becomes an
//! ICMP port unreachable back to the client (as kube-proxy's REJECT), which
//! fails a TCP connect or a connected UDP socket at once.
//!
//! The reply is built in place; TC sends it back out of the interface it
//! came in on. XDP hands a refusal from a cluster IP to the node's stack to
//! route, and sends one from a frontend that may be the node's own address
//! straight back (see `Towards`), since the stack drops packets from its
//! own addresses as martians (SCTP ABORTs from XDP are the exception: IPv4
//! ones always leave with XDP_TX, IPv6 ones go up the stack; see `abort`).
//!
//! A packet from a local socket may still carry CHECKSUM_PARTIAL, which
//! XDP cannot see and TC cannot clear: the kernel may then "finish" a
//! checksum at the original L4 checksum offset after we are done. The
//! layout puts a zeroed field the receiver ignores at exactly that offset
//! (IPv4: the ICMP header's unused bytes for UDP; behind a 4-byte IP option,
//! the quoted header's IP ID for TCP), and a zero there leaves the ICMP
//! checksum valid whether or not the kernel writes into it. IPv6's checksum
//! covers a pseudo-header the kernel would not add, so there the offset
//! lands in the data of a skippable destination option that no checksum
//! covers (see `reject6`).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{
        bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_get_buff_len,
    },
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;

use proxy_common::{
    Counter, IPPROTO_SCTP, IPPROTO_TCP,
    csum::{finish, sum},
};

use crate::{
    abort,
    family::{Family, V4},
    maps,
    parse::{Flow, ptr_at},
};

/// Where an XDP refusal goes first.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Towards {
    /// Straight back out of the interface it came in on, redirected
    /// (XDP_REDIRECT): the MACs are swapped. Not XDP_TX: a veth flushes
    /// XDP_TX frames to its peer only if the peer runs XDP itself, while a
    /// redirect is flushed to any peer that runs NAPI (GRO on), and a NIC
    /// takes either.
    Sender,
    /// Up the node's stack, which routes it (XDP_PASS): addressed to the
    /// node as the original was.
    Stack,
}

/// Refusing a flow of one address family.
pub trait Refuse: Family {
    /// The refusal sent `towards` (SCTP's ABORT always to the sender), or
    /// XDP_DROP if it cannot be built (counted).
    fn xdp(
        ctx: &XdpContext,
        flow: &Flow<Self::Addr>,
        start: usize,
        end: usize,
        towards: Towards,
    ) -> u32;
    /// The refusal redirected out of the interface the packet came in on,
    /// or TC_ACT_SHOT if it cannot be built (counted).
    fn tc(ctx: &TcContext, flow: &Flow<Self::Addr>) -> i32;
}

const IPV4_HLEN: usize = 20;
/// What ICMP quotes of the original: its IP header and 8 bytes of L4.
const QUOTE: usize = IPV4_HLEN + 8;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TC_ACT_SHOT: i32 = 2;

/// The reply: Ethernet, IPv4 with `OPT` bytes of options, ICMP, the quote.
#[repr(C)]
struct Reply<const OPT: usize> {
    eth: [u8; 14],
    ip: [u8; IPV4_HLEN],
    options: [u8; OPT],
    icmp: [u8; 8],
    quote: [u8; QUOTE],
}

/// What the reply needs of the original packet.
struct Original {
    eth: [u8; 12],
    quote: [u8; QUOTE],
}

impl Refuse for V4 {
    #[inline(always)]
    fn xdp(ctx: &XdpContext, flow: &Flow<u32>, start: usize, end: usize, towards: Towards) -> u32 {
        if flow.proto == IPPROTO_SCTP {
            return xdp_outcome(abort::xdp4(ctx, flow, start, end));
        }
        let built = if flow.proto == IPPROTO_TCP {
            try_xdp::<4>(ctx, flow, start, end, towards)
        } else {
            try_xdp::<0>(ctx, flow, start, end, towards)
        };
        xdp_sent(ctx, xdp_outcome(built), towards)
    }

    #[inline(always)]
    fn tc(ctx: &TcContext, flow: &Flow<u32>) -> i32 {
        if flow.proto == IPPROTO_SCTP {
            return tc_outcome(abort::tc4(ctx, flow));
        }
        tc_outcome(if flow.proto == IPPROTO_TCP {
            try_tc::<4>(ctx, flow)
        } else {
            try_tc::<0>(ctx, flow)
        })
    }
}

#[inline(always)]
pub(crate) fn xdp_outcome(built: Option<()>) -> u32 {
    let built = built.map(|()| xdp_action::XDP_TX);
    outcome(
        built,
        Counter::Rejected,
        Counter::RejectFailed,
        xdp_action::XDP_DROP,
    )
}

/// The XDP action for a built refusal going `towards`.
#[inline(always)]
pub(crate) fn xdp_sent(ctx: &XdpContext, action: u32, towards: Towards) -> u32 {
    match (action, towards) {
        (xdp_action::XDP_TX, Towards::Stack) => xdp_action::XDP_PASS,
        (xdp_action::XDP_TX, Towards::Sender) => {
            // SAFETY: reading the context's own field; the helper has no
            // preconditions beyond an ifindex.
            unsafe { bpf_redirect((*ctx.ctx).ingress_ifindex, 0) as u32 }
        }
        (action, _) => action,
    }
}

#[inline(always)]
pub(crate) fn tc_outcome(built: Option<i32>) -> i32 {
    outcome(built, Counter::Rejected, Counter::RejectFailed, TC_ACT_SHOT)
}

/// The verdict for a packet answered with one the program built: the
/// answer's (counted as `done`), or `dropped` if it could not be built
/// (counted as `failed`).
#[inline(always)]
pub(crate) fn outcome<T>(built: Option<T>, done: Counter, failed: Counter, dropped: T) -> T {
    match built {
        Some(verdict) => {
            maps::count(done);
            verdict
        }
        None => {
            maps::count(failed);
            dropped
        }
    }
}

/// Makes the XDP packet `len` bytes long; returns its new bounds. Grows at
/// the front, where XDP always has headroom (drivers need not leave any
/// tailroom); shrinks at the back. The caller has copied out what it needs.
#[inline(always)]
pub(crate) fn xdp_resize(ctx: &XdpContext, len: usize) -> Option<(usize, usize)> {
    // The verifier allows no arithmetic on data_end: ask for the length.
    // SAFETY: the context is the program's own.
    let now = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i32;
    let delta = len as i32 - now;
    // SAFETY: as above.
    let rc = unsafe {
        if delta > 0 {
            bpf_xdp_adjust_head(ctx.ctx, -delta)
        } else {
            bpf_xdp_adjust_tail(ctx.ctx, delta)
        }
    };
    if rc != 0 {
        return None;
    }
    // Fresh pointers: adjusting invalidated the old ones.
    // SAFETY: reading the context's own fields.
    Some(unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    })
}

/// Replaces the whole TC packet with `reply` and sends it back out of the
/// interface it came in on.
#[inline(always)]
pub(crate) fn tc_send_back<T>(ctx: &TcContext, reply: &T) -> Option<i32> {
    // SAFETY: the context is the program's own.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, size_of::<T>() as u32, 0) } != 0 {
        return None;
    }
    ctx.store(0, reply, 0).ok()?;
    // SAFETY: reading the context's own field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the helper has no preconditions beyond a valid ifindex.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
fn try_xdp<const OPT: usize>(
    ctx: &XdpContext,
    flow: &Flow<u32>,
    start: usize,
    end: usize,
    towards: Towards,
) -> Option<()> {
    let eth: *const [u8; 12] = ptr_at(start, end, 0)?;
    let quote: *const [u8; QUOTE] = ptr_at(start, end, flow.l3)?;
    // SAFETY: both were bounds-checked by ptr_at.
    let original = unsafe { original(flow, *eth, *quote)? };
    let (start, end) = xdp_resize(ctx, size_of::<Reply<OPT>>())?;
    let reply: *mut Reply<OPT> = ptr_at(start, end, 0)?;
    // SAFETY: bounds-checked above; the original's bytes were copied out.
    unsafe { fill(&mut *reply, &original, towards) };
    Some(())
}

#[inline(always)]
fn try_tc<const OPT: usize>(ctx: &TcContext, flow: &Flow<u32>) -> Option<i32> {
    let original = original(flow, ctx.load(0).ok()?, ctx.load(flow.l3).ok()?)?;
    let reply = maps::scratch::<Reply<OPT>>()?;
    fill(reply, &original, Towards::Sender);
    tc_send_back(ctx, reply)
}

/// None for a packet with IP options: its quote would need them too.
#[inline(always)]
fn original(flow: &Flow<u32>, eth: [u8; 12], quote: [u8; QUOTE]) -> Option<Original> {
    if flow.l4 != flow.l3 + IPV4_HLEN {
        return None;
    }
    Some(Original { eth, quote })
}

#[inline(always)]
fn fill<const OPT: usize>(r: &mut Reply<OPT>, original: &Original, towards: Towards) {
    if towards == Towards::Sender {
        r.eth[..6].copy_from_slice(&original.eth[6..12]);
        r.eth[6..12].copy_from_slice(&original.eth[..6]);
    } else {
        r.eth[..12].copy_from_slice(&original.eth);
    }
    r.eth[12] = 0x08;
    r.eth[13] = 0;
    let total = (IPV4_HLEN + OPT + 8 + QUOTE) as u16;
    r.ip = [0; IPV4_HLEN];
    r.ip[0] = 0x40 | ((IPV4_HLEN + OPT) / 4) as u8;
    r.ip[1] = 0xc0; // precedence: internetwork control, as the kernel's ICMP errors
    r.ip[2..4].copy_from_slice(&total.to_be_bytes());
    r.ip[8] = 64;
    r.ip[9] = IPPROTO_ICMP;
    // From the address the client tried, to the client.
    r.ip[12..16].copy_from_slice(&original.quote[16..20]);
    r.ip[16..20].copy_from_slice(&original.quote[12..16]);
    // All zeros: End of Options List.
    r.options = [0; OPT];
    r.icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    r.quote = original.quote;
    if OPT != 0 {
        // The quoted IP ID: where a late TCP checksum lands (module comment).
        r.quote[4] = 0;
        r.quote[5] = 0;
    }
    let ip_check = finish(sum(&r.ip) + sum(&r.options));
    r.ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let icmp_check = finish(sum(&r.icmp) + sum(&r.quote));
    r.icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
}
