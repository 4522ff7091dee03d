//! Answering a packet with one built in its place, sent back towards its
//! sender: the ICMP refusals (`reject`, `reject6`), SCTP ABORTs (`abort`)
//! and TCP RSTs (`reset`) share how the packet is resized, its Ethernet
//! header turned round, and where it goes and how that is counted.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{
        bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_get_buff_len,
    },
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;

use proxy_common::Counter;

use crate::{
    maps,
    parse::{ETH_HLEN, ptr_at},
};

const TC_ACT_SHOT: i32 = 2;

/// Where an answer built in XDP (refusal, ABORT, RST) goes first.
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

/// The XDP action for an answer built in place of the packet: XDP_TX
/// (see `xdp_sent`) counted as `done`, or XDP_DROP counted as `failed`.
#[inline(always)]
pub fn xdp_outcome(built: Option<()>, done: Counter, failed: Counter) -> u32 {
    let built = built.map(|()| xdp_action::XDP_TX);
    outcome(built, done, failed, xdp_action::XDP_DROP)
}

/// The XDP action for a built answer going `towards`.
#[inline(always)]
pub fn xdp_sent(ctx: &XdpContext, action: u32, towards: Towards) -> u32 {
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

/// The TC action for an answer sent back (see `tc_send_back`), counted as
/// `done`, or TC_ACT_SHOT counted as `failed`.
#[inline(always)]
pub fn tc_outcome(built: Option<i32>, done: Counter, failed: Counter) -> i32 {
    outcome(built, done, failed, TC_ACT_SHOT)
}

/// The verdict for a packet answered with one the program built: the
/// answer's (counted as `done`), or `dropped` if it could not be built
/// (counted as `failed`).
#[inline(always)]
pub fn outcome<T>(built: Option<T>, done: Counter, failed: Counter, dropped: T) -> T {
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
pub fn xdp_resize(ctx: &XdpContext, len: usize) -> Option<(usize, usize)> {
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

/// An answer built whole from what was copied out of the packet it
/// replaces. (A trait, not closures: a closure that is not inlined becomes
/// a BPF function whose BTF the kernel rejects.)
pub trait Answer: Sized + 'static {
    type Original;
    /// Writes every byte of the answer; its MACs go `towards`.
    fn fill(&mut self, original: &Self::Original, towards: Towards);
}

/// Builds the answer `R` in place of the XDP packet.
#[inline(always)]
pub fn xdp_answer<R: Answer>(
    ctx: &XdpContext,
    original: &R::Original,
    towards: Towards,
) -> Option<()> {
    let (start, end) = xdp_resize(ctx, size_of::<R>())?;
    let reply: *mut R = ptr_at(start, end, 0)?;
    // SAFETY: bounds-checked above; the original was copied out before
    // the resize.
    unsafe { (*reply).fill(original, towards) };
    Some(())
}

/// Builds the answer `R` in the per-CPU scratch buffer (TC's stack has
/// little room left) and sends it back in place of the TC packet.
#[inline(always)]
pub fn tc_answer<R: Answer>(ctx: &TcContext, original: &R::Original) -> Option<i32> {
    let reply = maps::scratch::<R>()?;
    reply.fill(original, Towards::Sender);
    tc_send_back(ctx, reply)
}

/// Replaces the whole TC packet with `reply` and sends it back out of the
/// interface it came in on.
#[inline(always)]
pub fn tc_send_back<T>(ctx: &TcContext, reply: &T) -> Option<i32> {
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

/// The Ethernet header of an answer: the MACs swapped to go straight
/// back, or as received to go up the node's stack.
#[inline(always)]
pub fn fill_eth(e: &mut [u8; ETH_HLEN], original: &[u8; 12], towards: Towards, ether_type: u16) {
    if towards == Towards::Sender {
        e[..6].copy_from_slice(&original[6..12]);
        e[6..12].copy_from_slice(&original[..6]);
    } else {
        e[..12].copy_from_slice(original);
    }
    e[12..14].copy_from_slice(&ether_type.to_be_bytes());
}

#[inline(always)]
pub fn swap_macs(eth: &mut [u8; ETH_HLEN]) {
    for i in 0..6 {
        eth.swap(i, i + 6);
    }
}
