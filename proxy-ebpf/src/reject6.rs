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

use proxy_common::{
    Addr6, IPPROTO_SCTP,
    csum::{finish, sum},
};

use crate::{
    abort,
    family::V6,
    parse::{ETH_HLEN, ETH_P_IPV6, Flow, IPV6_HLEN, ptr_at},
    reject::{REFUSE_FAILED, REFUSED, Refuse},
    reply::{Answer, Towards, fill_eth, tc_answer, tc_outcome, xdp_answer, xdp_outcome, xdp_sent},
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
    let original = unsafe { (*eth, *quote) };
    xdp_answer::<Reply>(ctx, &original, towards)
}

#[inline(always)]
fn try_tc(ctx: &TcContext, flow: &Flow<Addr6>) -> Option<i32> {
    let original = (ctx.load(0).ok()?, ctx.load(flow.l3).ok()?);
    tc_answer::<Reply>(ctx, &original)
}

impl Answer for Reply {
    /// The original's MACs and what the reply quotes of it.
    type Original = ([u8; 12], [u8; QUOTE]);

    #[inline(always)]
    fn fill(&mut self, (eth, quote): &Self::Original, towards: Towards) {
        fill_eth(&mut self.eth, eth, towards, ETH_P_IPV6);
        let payload = (OPTIONS_LEN + 8 + QUOTE) as u16;
        self.ip = [0; IPV6_HLEN];
        self.ip[0] = 0x60;
        self.ip[4..6].copy_from_slice(&payload.to_be_bytes());
        self.ip[6] = NEXTHDR_DEST;
        self.ip[7] = 64;
        // From the address the client tried, to the client.
        self.ip[8..24].copy_from_slice(&quote[24..40]);
        self.ip[24..40].copy_from_slice(&quote[8..24]);
        self.options = [0; OPTIONS_LEN];
        self.options[0] = IPPROTO_ICMPV6;
        self.options[1] = (OPTIONS_LEN / 8 - 1) as u8;
        self.options[2] = OPTION_EXPERIMENTAL;
        self.options[3] = (OPTIONS_LEN - 4) as u8;
        self.icmp = [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
        self.quote = *quote;
        let length = (8 + QUOTE) as u32;
        let pseudo =
            sum(&self.ip[8..40]) + (length >> 16) + (length & 0xffff) + IPPROTO_ICMPV6 as u32;
        let check = finish(pseudo + sum(&self.icmp) + sum(&self.quote));
        self.icmp[2..4].copy_from_slice(&check.to_be_bytes());
    }
}
