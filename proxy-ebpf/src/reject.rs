//! Refusing a flow to a service without endpoints: the packet becomes an
//! ICMP port unreachable back to the client (as kube-proxy's REJECT), which
//! fails a TCP connect or a connected UDP socket at once.
//!
//! The reply is built in place; TC sends it back out of the interface it
//! came in on. XDP hands a refusal from a cluster IP to the node's stack to
//! route, and sends one from a frontend that may be the node's own address
//! straight back (see `reply::Towards`), since the stack drops packets from its
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

use aya_ebpf::programs::{TcContext, XdpContext};

use proxy_common::{
    Counter, IPPROTO_SCTP, IPPROTO_TCP,
    csum::{finish, sum},
};

use crate::{
    abort,
    family::{Family, V4},
    parse::{ETH_P_IP, Flow, ptr_at},
    reply::{Answer, Towards, fill_eth, tc_answer, tc_outcome, xdp_answer, xdp_outcome, xdp_sent},
};

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
/// What refusals count as, sent or not (SCTP ABORTs included).
pub const REFUSED: Counter = Counter::Rejected;
pub const REFUSE_FAILED: Counter = Counter::RejectFailed;

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
            return xdp_outcome(abort::xdp4(ctx, flow, start, end), REFUSED, REFUSE_FAILED);
        }
        let built = if flow.proto == IPPROTO_TCP {
            try_xdp::<4>(ctx, flow, start, end, towards)
        } else {
            try_xdp::<0>(ctx, flow, start, end, towards)
        };
        xdp_sent(ctx, xdp_outcome(built, REFUSED, REFUSE_FAILED), towards)
    }

    #[inline(always)]
    fn tc(ctx: &TcContext, flow: &Flow<u32>) -> i32 {
        if flow.proto == IPPROTO_SCTP {
            return tc_outcome(abort::tc4(ctx, flow), REFUSED, REFUSE_FAILED);
        }
        let built = if flow.proto == IPPROTO_TCP {
            try_tc::<4>(ctx, flow)
        } else {
            try_tc::<0>(ctx, flow)
        };
        tc_outcome(built, REFUSED, REFUSE_FAILED)
    }
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
    // SAFETY: both were bounds-checked by ptr_at; copied before resizing.
    let original = unsafe { original(flow, *eth, *quote)? };
    xdp_answer::<Reply<OPT>>(ctx, &original, towards)
}

#[inline(always)]
fn try_tc<const OPT: usize>(ctx: &TcContext, flow: &Flow<u32>) -> Option<i32> {
    let original = original(flow, ctx.load(0).ok()?, ctx.load(flow.l3).ok()?)?;
    tc_answer::<Reply<OPT>>(ctx, &original)
}

/// None for a packet with IP options: its quote would need them too.
#[inline(always)]
fn original(flow: &Flow<u32>, eth: [u8; 12], quote: [u8; QUOTE]) -> Option<Original> {
    if flow.l4 != flow.l3 + IPV4_HLEN {
        return None;
    }
    Some(Original { eth, quote })
}

impl<const OPT: usize> Answer for Reply<OPT> {
    type Original = Original;

    #[inline(always)]
    fn fill(&mut self, original: &Original, towards: Towards) {
        fill_eth(&mut self.eth, &original.eth, towards, ETH_P_IP);
        let total = (IPV4_HLEN + OPT + 8 + QUOTE) as u16;
        self.ip = [0; IPV4_HLEN];
        self.ip[0] = 0x40 | ((IPV4_HLEN + OPT) / 4) as u8;
        self.ip[1] = 0xc0; // precedence: internetwork control, as the kernel's ICMP errors
        self.ip[2..4].copy_from_slice(&total.to_be_bytes());
        self.ip[8] = 64;
        self.ip[9] = IPPROTO_ICMP;
        // From the address the client tried, to the client.
        self.ip[12..16].copy_from_slice(&original.quote[16..20]);
        self.ip[16..20].copy_from_slice(&original.quote[12..16]);
        // All zeros: End of Options List.
        self.options = [0; OPT];
        self.icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
        self.quote = original.quote;
        if OPT != 0 {
            // The quoted IP ID: where a late TCP checksum lands (module comment).
            self.quote[4] = 0;
            self.quote[5] = 0;
        }
        let ip_check = finish(sum(&self.ip) + sum(&self.options));
        self.ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
        let icmp_check = finish(sum(&self.icmp) + sum(&self.quote));
        self.icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
    }
}
