//! xdproxy kernel programs: thin entry points over shared parse, lb and nat code.
//!
//! A new flow's first packet takes two programs: the XDP or TC ingress
//! program chooses its backend, then tail-calls `xdproxy_xdp_new` or
//! `xdproxy_tc_new`, which writes its conntrack entries and translates it
//! (see `lb::hand_over`): the verifier walks those writes once, apart.
//!
//! XDP is for interfaces whose packets carry full checksums (traffic from the
//! wire). TC is for interfaces fed by local sockets (pod veths), whose packets
//! may carry only a partial checksum that XDP cannot see; its helpers fix the
//! pseudo-header sum correctly either way.
//!
//! Modules are layered: each imports only modules listed before it below
//! (lines above, or earlier on its own line), so none imports one that
//! imports it back.
//!
//! ```text
//! maps verdict random atomic   the maps; Verdict/Rewrite/Stage; helpers (leaves)
//! parse                        headers -> Flow
//! ctmap hash reply             conntrack entries and maps; flow hashing;
//!                              sending a built answer back
//! family                       IPv4/IPv6 behind one trait (their maps)
//! affinity snat socknat        client affinity; source NAT ports; socket state
//! ct                           a flow's conntrack entries
//! lb                           service lookup and backend choice -> Verdict
//! sock                         socket hooks (lb's choice at connect time)
//! nat frag icmp icmp6          applying a Rewrite to packets, fragments, errors
//! abort reject reject6 reset   building refusals and resets
//! bench main                   the benchmark wrapper; the programs' entry points
//! ```
#![no_std]
#![no_main]
// Atomic read-modify-write (see `atomic`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod abort;
mod affinity;
mod atomic;
mod bench;
mod bench_table;
mod closed;
mod copy;
mod ct;
mod ctlines;
mod ctmap;
mod family;
mod filter;
mod frag;
mod hash;
mod icmp;
mod icmp6;
mod lb;
mod maps;
mod nat;
mod parse;
mod random;
mod reject;
mod reject6;
mod reply;
mod reset;
mod snat;
mod sock;
mod socknat;
mod verdict;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use family::{V4, V6};
use frag::Fragments;
use nat::Nat;
use parse::{Flow, Parsed};
use proxy_common::Counter;
use reject::Refuse;
use reply::Towards;
use reset::Reset;
use sock::{Mapped4, User4, User6};
use verdict::{Stage, Verdict};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// Everything a hook needs of an address family.
trait Datapath: Nat + Refuse + Reset + Fragments {}
impl<F: Nat + Refuse + Reset + Fragments> Datapath for F {}

// The entries below are `#[inline(always)]`: the attribute macro wraps
// the body in the program's entry, which would otherwise call it as a
// subprogram, and on CPUs with return thunks (SRSO, retbleed) a return
// costs about 6 ns of every packet.
#[xdp]
#[inline(always)]
pub fn xdproxy_xdp(ctx: XdpContext) -> u32 {
    let action = try_xdp(&ctx).unwrap_or(xdp_action::XDP_PASS);
    ct::make_room();
    action
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    match parse::flow(start, end) {
        Parsed::V4(flow) => xdp_flow::<V4>(ctx, &flow, start, end),
        Parsed::V6(flow) => xdp_flow::<V6>(ctx, &flow, start, end),
        // ICMP errors about our flows, later fragments of our datagrams.
        Parsed::Other => Ok(match icmp::xdp(ctx) {
            Some(verdict) => verdict,
            None => frag::xdp(ctx),
        }),
    }
}

#[inline(always)]
fn xdp_flow<F: Datapath>(
    ctx: &XdpContext,
    flow: &Flow<F::Addr>,
    start: usize,
    end: usize,
) -> Result<u32, ()> {
    let verdict = match lb::decide::<F>(flow, (end - start) as u64, Stage::Ingress) {
        Verdict::NewFlow(rewrite) => {
            // SAFETY: jumps to the new-flow program, or returns here if
            // its slot is empty.
            let _ = unsafe { maps::XDP_NEW_FLOW.tail_call(ctx, 0) };
            maps::count(Counter::CtInsertFailed);
            Verdict::Rewrite(rewrite)
        }
        verdict => verdict,
    };
    xdp_verdict::<F>(ctx, flow, start, end, verdict)
}

/// Applies `verdict` to the packet.
#[inline(always)]
fn xdp_verdict<F: Datapath>(
    ctx: &XdpContext,
    flow: &Flow<F::Addr>,
    start: usize,
    end: usize,
    verdict: Verdict<F::Addr>,
) -> Result<u32, ()> {
    match verdict {
        Verdict::Pass => {}
        Verdict::Rewrite(rewrite) | Verdict::NewFlow(rewrite) => {
            nat::xdp::<F>(ctx, flow, &rewrite)?;
            frag::remember::<F>(start, end, flow, Stage::Ingress, &rewrite);
        }
        Verdict::Drop => return Ok(xdp_action::XDP_DROP),
        // One call site: each would inline its own copy of the refusal.
        verdict @ (Verdict::Reject | Verdict::RejectToSender) => {
            let towards = match verdict {
                Verdict::RejectToSender => Towards::Sender,
                _ => Towards::Stack,
            };
            return Ok(<F as Refuse>::xdp(ctx, flow, start, end, towards));
        }
        verdict @ (Verdict::Reset | Verdict::ResetToSender) => {
            let towards = match verdict {
                Verdict::ResetToSender => Towards::Sender,
                _ => Towards::Stack,
            };
            return Ok(reset::xdp::<F>(ctx, towards));
        }
    }
    Ok(xdp_action::XDP_PASS)
}

/// A new flow's first packet, tail-called by `xdproxy_xdp` (see
/// `lb::hand_over`): its conntrack entries are written here.
#[xdp]
#[inline(always)]
pub fn xdproxy_xdp_new(ctx: XdpContext) -> u32 {
    let action = try_xdp_new(&ctx).unwrap_or(xdp_action::XDP_PASS);
    ct::make_room();
    action
}

#[inline(always)]
fn try_xdp_new(ctx: &XdpContext) -> Result<u32, ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    match parse::flow(start, end) {
        Parsed::V4(flow) => xdp_verdict::<V4>(ctx, &flow, start, end, lb::start::<V4>(&flow)),
        Parsed::V6(flow) => xdp_verdict::<V6>(ctx, &flow, start, end, lb::start::<V6>(&flow)),
        Parsed::Other => Ok(xdp_action::XDP_PASS),
    }
}

#[classifier]
#[inline(always)]
pub fn xdproxy_tc(ctx: TcContext) -> i32 {
    let action = try_tc(&ctx, Stage::Ingress).unwrap_or(TC_ACT_OK);
    ct::make_room();
    action
}

/// Source rewrites that must wait until the node has forwarded the packet
/// (see `proxy_common::CT_AT_EGRESS`).
#[classifier]
#[inline(always)]
pub fn xdproxy_tc_out(ctx: TcContext) -> i32 {
    try_tc(&ctx, Stage::Egress).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn try_tc(ctx: &TcContext, stage: Stage) -> Result<i32, ()> {
    match tc_parse(ctx) {
        Parsed::V4(flow) => tc_flow::<V4>(ctx, &flow, stage),
        Parsed::V6(flow) => tc_flow::<V6>(ctx, &flow, stage),
        // Not a closure: LLVM outlines those, adding a frame to the stack.
        Parsed::Other => Ok(match icmp::tc(ctx, stage) {
            Some(verdict) => verdict,
            None => frag::tc(ctx, stage),
        }),
    }
}

#[inline(always)]
fn tc_parse(ctx: &TcContext) -> Parsed {
    // Headers of locally built packets are linear already; pull in case not.
    if ctx.data_end() - ctx.data() < parse::MAX_HEADERS {
        let _ = ctx.pull_data(ctx.len().min(parse::MAX_HEADERS as u32));
    }
    parse::flow(ctx.data(), ctx.data_end())
}

#[inline(always)]
fn tc_flow<F: Datapath>(ctx: &TcContext, flow: &Flow<F::Addr>, stage: Stage) -> Result<i32, ()> {
    let verdict = match lb::decide::<F>(flow, ctx.len() as u64, stage) {
        Verdict::NewFlow(rewrite) => {
            // SAFETY: jumps to the new-flow program, or returns here if
            // its slot is empty.
            let _ = unsafe { maps::TC_NEW_FLOW.tail_call(ctx, 0) };
            maps::count(Counter::CtInsertFailed);
            Verdict::Rewrite(rewrite)
        }
        verdict => verdict,
    };
    tc_verdict::<F>(ctx, flow, stage, verdict)
}

/// Applies `verdict` to the packet.
#[inline(always)]
fn tc_verdict<F: Datapath>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    stage: Stage,
    verdict: Verdict<F::Addr>,
) -> Result<i32, ()> {
    let rewrite = match verdict {
        Verdict::Pass => return Ok(TC_ACT_OK),
        Verdict::Rewrite(rewrite) | Verdict::NewFlow(rewrite) => rewrite,
        Verdict::Drop => return Ok(TC_ACT_SHOT),
        Verdict::Reject | Verdict::RejectToSender => return Ok(<F as Refuse>::tc(ctx, flow)),
        Verdict::Reset | Verdict::ResetToSender => return Ok(reset::tc::<F>(ctx)),
    };
    if nat::tc::<F>(ctx, flow, &rewrite).is_err() {
        // A half-rewritten packet would reach the wrong place or fail its
        // checksum: drop it and say so.
        maps::count(Counter::RewriteFailed);
        return Ok(TC_ACT_SHOT);
    }
    frag::remember::<F>(ctx.data(), ctx.data_end(), flow, stage, &rewrite);
    Ok(TC_ACT_OK)
}

/// A new flow's first packet, tail-called by `xdproxy_tc` (see
/// `lb::hand_over`).
#[classifier]
#[inline(always)]
pub fn xdproxy_tc_new(ctx: TcContext) -> i32 {
    let action = try_tc_new(&ctx).unwrap_or(TC_ACT_OK);
    ct::make_room();
    action
}

#[inline(always)]
fn try_tc_new(ctx: &TcContext) -> Result<i32, ()> {
    let stage = Stage::Ingress;
    match tc_parse(ctx) {
        Parsed::V4(flow) => tc_verdict::<V4>(ctx, &flow, stage, lb::start::<V4>(&flow)),
        Parsed::V6(flow) => tc_verdict::<V6>(ctx, &flow, stage, lb::start::<V6>(&flow)),
        Parsed::Other => Ok(TC_ACT_OK),
    }
}

// Socket hooks, at the cgroup v2 root: every local socket, host network and
// pods alike. IPv6 sockets may carry IPv4-mapped addresses (dual-stack
// sockets), which are IPv4 frontends. Inlined as the packet entries are:
// `sendmsg` runs for every datagram of an unconnected UDP socket.

#[cgroup_sock_addr(connect4)]
#[inline(always)]
pub fn xdproxy_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<V4, User4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
#[inline(always)]
pub fn xdproxy_connect6(ctx: SockAddrContext) -> i32 {
    match sock::is_mapped4(&ctx) {
        true => sock::connect::<V4, Mapped4>(&ctx),
        false => sock::connect::<V6, User6>(&ctx),
    }
}

#[cgroup_sock_addr(sendmsg4)]
#[inline(always)]
pub fn xdproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<V4, User4>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
#[inline(always)]
pub fn xdproxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    match sock::is_mapped4(&ctx) {
        true => sock::sendmsg::<V4, Mapped4>(&ctx),
        false => sock::sendmsg::<V6, User6>(&ctx),
    }
}

#[cgroup_sock_addr(recvmsg4)]
#[inline(always)]
pub fn xdproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::peer::<V4, User4>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
#[inline(always)]
pub fn xdproxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    peer6(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
#[inline(always)]
pub fn xdproxy_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::peer::<V4, User4>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
#[inline(always)]
pub fn xdproxy_getpeername6(ctx: SockAddrContext) -> i32 {
    peer6(&ctx)
}

/// The peer an IPv6 socket sees, for both hooks that show it.
#[inline(always)]
fn peer6(ctx: &SockAddrContext) -> i32 {
    match sock::is_mapped4(ctx) {
        true => sock::peer::<V4, Mapped4>(ctx),
        false => sock::peer::<V6, User6>(ctx),
    }
}

/// Does nothing: the benchmark's baseline, loaded from the same object.
#[xdp]
pub fn xdproxy_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
