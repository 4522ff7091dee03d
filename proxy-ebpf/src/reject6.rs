//! Refusals for IPv6: ICMPv6 destination unreachable, port unreachable.
//!
//! The reply carries a 24-byte destination options header holding one
//! skippable experimental option (RFC 4727, type 0x1E), whose data spans
//! the original TCP and UDP checksum offsets: if the kernel finishes a
//! partial checksum there after we are done, it writes into option data
//! that nothing checks, and the ICMPv6 checksum (which covers a
//! pseudo-header the kernel would not add) stays valid.
//!
//! From XDP the refusal goes where `Towards` says, as for IPv4.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::size_of;

use proxy_common::{
    Addr6, IPPROTO_SCTP,
    csum::{finish, sum},
};

use crate::{
    abort,
    family::V6,
    maps,
    parse::{ETH_HLEN, Flow, IPV6_HLEN, ptr_at},
    reject::{REFUSE_FAILED, REFUSED, Refuse},
    reply::{Towards, tc_outcome, tc_send_back, xdp_outcome, xdp_resize, xdp_sent},
};

/// What ICMPv6 quotes of the original: its IPv6 header and 8 bytes of L4.
const QUOTE: usize = IPV6_HLEN + 8;
const NEXTHDR_DEST: u8 = 60;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// Experimental destination option (RFC 4727); its top bits say "skip if
/// unknown", and that its data may change en route.
const OPTION_EXPERIMENTAL: u8 = 0x3e;
const OPTIONS_LEN: usize = 24;

#[repr(C)]
struct Reply {
    eth: [u8; ETH_HLEN],
    ip: [u8; IPV6_HLEN],
    options: [u8; OPTIONS_LEN],
    icmp: [u8; 8],
    quote: [u8; QUOTE],
}

impl Refuse for V6 {
    #[inline(always)]
    fn xdp(
        ctx: &XdpContext,
        flow: &Flow<Addr6>,
        start: usize,
        end: usize,
        towards: Towards,
    ) -> u32 {
        let built = if flow.proto == IPPROTO_SCTP {
            abort::xdp6(ctx, flow, start, end)
        } else {
            try_xdp(ctx, flow, start, end, towards)
        };
        xdp_sent(ctx, xdp_outcome(built, REFUSED, REFUSE_FAILED), towards)
    }

    #[inline(always)]
    fn tc(ctx: &TcContext, flow: &Flow<Addr6>) -> i32 {
        if flow.proto == IPPROTO_SCTP {
            return tc_outcome(abort::tc6(ctx, flow), REFUSED, REFUSE_FAILED);
        }
        tc_outcome(try_tc(ctx, flow), REFUSED, REFUSE_FAILED)
    }
}

#[inline(always)]
fn try_xdp(
    ctx: &XdpContext,
    flow: &Flow<Addr6>,
    start: usize,
    end: usize,
    towards: Towards,
) -> Option<()> {
    let eth: *const [u8; 12] = ptr_at(start, end, 0)?;
    let quote: *const [u8; QUOTE] = ptr_at(start, end, flow.l3)?;
    // SAFETY: both were bounds-checked by ptr_at; copied before resizing.
    let (eth, quote) = unsafe { (*eth, *quote) };
    let (start, end) = xdp_resize(ctx, size_of::<Reply>())?;
    let reply: *mut Reply = ptr_at(start, end, 0)?;
    // SAFETY: bounds-checked above.
    unsafe { fill(&mut *reply, &eth, &quote, towards) };
    Some(())
}

#[inline(always)]
fn try_tc(ctx: &TcContext, flow: &Flow<Addr6>) -> Option<i32> {
    let eth: [u8; 12] = ctx.load(0).ok()?;
    let quote: [u8; QUOTE] = ctx.load(flow.l3).ok()?;
    let reply = maps::scratch::<Reply>()?;
    fill(reply, &eth, &quote, Towards::Sender);
    tc_send_back(ctx, reply)
}

#[inline(always)]
fn fill(r: &mut Reply, eth: &[u8; 12], quote: &[u8; QUOTE], towards: Towards) {
    if towards == Towards::Sender {
        r.eth[..6].copy_from_slice(&eth[6..12]);
        r.eth[6..12].copy_from_slice(&eth[..6]);
    } else {
        r.eth[..12].copy_from_slice(eth);
    }
    r.eth[12] = 0x86;
    r.eth[13] = 0xdd;
    let payload = (OPTIONS_LEN + 8 + QUOTE) as u16;
    r.ip = [0; IPV6_HLEN];
    r.ip[0] = 0x60;
    r.ip[4..6].copy_from_slice(&payload.to_be_bytes());
    r.ip[6] = NEXTHDR_DEST;
    r.ip[7] = 64;
    // From the address the client tried, to the client.
    r.ip[8..24].copy_from_slice(&quote[24..40]);
    r.ip[24..40].copy_from_slice(&quote[8..24]);
    r.options = [0; OPTIONS_LEN];
    r.options[0] = IPPROTO_ICMPV6;
    r.options[1] = (OPTIONS_LEN / 8 - 1) as u8;
    r.options[2] = OPTION_EXPERIMENTAL;
    r.options[3] = (OPTIONS_LEN - 4) as u8;
    r.icmp = [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    r.quote = *quote;
    let length = (8 + QUOTE) as u32;
    let pseudo = sum(&r.ip[8..40]) + (length >> 16) + (length & 0xffff) + IPPROTO_ICMPV6 as u32;
    let check = finish(pseudo + sum(&r.icmp) + sum(&r.quote));
    r.icmp[2..4].copy_from_slice(&check.to_be_bytes());
}
