//! Resetting a TCP connection whose backend left the service: the client's
//! packet becomes a RST back to the client, from the frontend it addressed,
//! as the removed backend's host would have answered had it still been
//! reachable. Without it the client would retransmit into a new backend
//! that knows nothing of the connection, or into nothing, until it times
//! out.
//!
//! It is sent back the way refusals are (see `reply::Towards`): from TC
//! out of the interface it came in on, from XDP up the node's stack, which
//! routes it, or for a frontend that may be the node's own address
//! straight back out. Its checksum is complete; a packet still carrying a
//! partial checksum only ever reaches a local socket over a veth, which
//! trusts it.

use aya_ebpf::programs::{TcContext, XdpContext};
use core::mem::size_of;

use proxy_common::{
    Addr6, Counter, IPPROTO_TCP,
    csum::{finish, sum},
};

use crate::{
    family::{Family, V4, V6},
    maps,
    parse::{self, ETH_HLEN, Flow, IPV6_HLEN, Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    reply::{Towards, tc_outcome, tc_send_back, xdp_outcome, xdp_resize, xdp_sent},
};

const TCP_HLEN: usize = 20;
const IPV4_HLEN: usize = 20;

/// Resetting a connection of one address family. The implementations
/// start from the packet alone (parsing it again): a flow whose address is
/// taken is kept in memory in pieces, and its header offsets may come back
/// as values the verifier cannot bound.
pub trait Reset: Family {
    /// The RST sent `towards`, or XDP_DROP if it cannot be built
    /// (counted).
    fn xdp(ctx: &XdpContext, towards: Towards) -> u32;
    /// The RST redirected out of the interface the packet came in on, or
    /// TC_ACT_SHOT if it cannot be built (counted).
    fn tc(ctx: &TcContext) -> i32;
}

#[repr(C)]
struct Rst<const IP: usize> {
    eth: [u8; ETH_HLEN],
    ip: [u8; IP],
    tcp: [u8; TCP_HLEN],
}

type Rst4 = Rst<IPV4_HLEN>;
type Rst6 = Rst<IPV6_HLEN>;

/// Builds a family's RST. (A trait, not closures: a closure that is not
/// inlined becomes a BPF function whose BTF the kernel rejects.)
trait Fill<A> {
    fn fill(&mut self, o: &Original<A>);
    fn eth(&mut self) -> &mut [u8; ETH_HLEN];
}

impl Fill<u32> for Rst4 {
    #[inline(always)]
    fn fill(&mut self, o: &Original<u32>) {
        fill4(self, o);
    }

    #[inline(always)]
    fn eth(&mut self) -> &mut [u8; ETH_HLEN] {
        &mut self.eth
    }
}

impl Fill<Addr6> for Rst6 {
    #[inline(always)]
    fn fill(&mut self, o: &Original<Addr6>) {
        fill6(self, o);
    }

    #[inline(always)]
    fn eth(&mut self) -> &mut [u8; ETH_HLEN] {
        &mut self.eth
    }
}

/// What the RST needs of the client's packet.
struct Original<A> {
    eth: [u8; 12],
    tcp: [u8; TCP_HLEN],
    client: A,
    frontend: A,
    /// Bytes of TCP payload (what a SYN or FIN counts for included).
    len: u32,
}

impl Reset for V4 {
    #[inline(always)]
    fn xdp(ctx: &XdpContext, towards: Towards) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let built = match parse::flow(start, end) {
            Parsed::V4(flow) => try_xdp::<V4, Rst4>(ctx, &flow, start, end, towards),
            _ => None,
        };
        xdp_sent(
            ctx,
            xdp_outcome(built, Counter::Reset, Counter::ResetFailed),
            towards,
        )
    }

    #[inline(always)]
    fn tc(ctx: &TcContext) -> i32 {
        let built = match parse::flow(ctx.data(), ctx.data_end()) {
            Parsed::V4(flow) => try_tc::<V4, Rst4>(ctx, &flow),
            _ => None,
        };
        tc_outcome(built, Counter::Reset, Counter::ResetFailed)
    }
}

impl Reset for V6 {
    #[inline(always)]
    fn xdp(ctx: &XdpContext, towards: Towards) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let built = match parse::flow(start, end) {
            Parsed::V6(flow) => try_xdp::<V6, Rst6>(ctx, &flow, start, end, towards),
            _ => None,
        };
        xdp_sent(
            ctx,
            xdp_outcome(built, Counter::Reset, Counter::ResetFailed),
            towards,
        )
    }

    #[inline(always)]
    fn tc(ctx: &TcContext) -> i32 {
        let built = match parse::flow(ctx.data(), ctx.data_end()) {
            Parsed::V6(flow) => try_tc::<V6, Rst6>(ctx, &flow),
            _ => None,
        };
        tc_outcome(built, Counter::Reset, Counter::ResetFailed)
    }
}

#[inline(always)]
fn original<A: Copy>(flow: &Flow<A>, eth: [u8; 12], tcp: [u8; TCP_HLEN]) -> Option<Original<A>> {
    if flow.proto != IPPROTO_TCP {
        return None;
    }
    let header = ((tcp[13 - 1] >> 4) as usize) * 4;
    let payload = flow.l4_len.checked_sub(header)? as u32;
    let flags = tcp[13];
    let len = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
    Some(Original {
        eth,
        tcp,
        client: flow.saddr,
        frontend: flow.daddr,
        len,
    })
}

#[inline(always)]
fn try_xdp<F: Family, R: Fill<F::Addr>>(
    ctx: &XdpContext,
    flow: &Flow<F::Addr>,
    start: usize,
    end: usize,
    towards: Towards,
) -> Option<()> {
    let eth: *const [u8; 12] = ptr_at(start, end, 0)?;
    let tcp: *const [u8; TCP_HLEN] = ptr_at(start, end, flow.l4)?;
    // SAFETY: both were bounds-checked by ptr_at; copied before resizing.
    let original = unsafe { original(flow, *eth, *tcp)? };
    let (start, end) = xdp_resize(ctx, size_of::<R>())?;
    let rst: *mut R = ptr_at(start, end, 0)?;
    // SAFETY: bounds-checked above.
    let rst = unsafe { &mut *rst };
    rst.fill(&original);
    if towards == Towards::Stack {
        // Addressed to the node as the original was, for the stack to route.
        rst.eth()[..12].copy_from_slice(&original.eth);
    }
    Some(())
}

#[inline(always)]
fn try_tc<F: Family, R: Fill<F::Addr> + 'static>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
) -> Option<i32> {
    let original = original(flow, ctx.load(0).ok()?, ctx.load(flow.l4).ok()?)?;
    let rst = maps::scratch::<R>()?;
    rst.fill(&original);
    tc_send_back(ctx, rst)
}

/// Ethernet back to the sender, and the TCP header of the RST (RFC 9293
/// 3.10.7.1: a packet with ACK is answered from its acknowledgment number;
/// one without, with an ACK of everything it carried). The caller adds the
/// checksum.
#[inline(always)]
fn fill_common<const IP: usize>(r: &mut Rst<IP>, o: &Original<impl Copy>, ether_type: [u8; 2]) {
    r.eth[..6].copy_from_slice(&o.eth[6..12]);
    r.eth[6..12].copy_from_slice(&o.eth[..6]);
    r.eth[12..14].copy_from_slice(&ether_type);
    let t = &mut r.tcp;
    *t = [0; TCP_HLEN];
    // Ports swapped: from the frontend's port to the client's.
    t[0..2].copy_from_slice(&o.tcp[2..4]);
    t[2..4].copy_from_slice(&o.tcp[0..2]);
    if o.tcp[13] & TCP_ACK != 0 {
        t[4..8].copy_from_slice(&o.tcp[8..12]);
        t[13] = TCP_RST;
    } else {
        let seq = u32::from_be_bytes([o.tcp[4], o.tcp[5], o.tcp[6], o.tcp[7]]);
        t[8..12].copy_from_slice(&seq.wrapping_add(o.len).to_be_bytes());
        t[13] = TCP_RST | TCP_ACK;
    }
    t[12] = ((TCP_HLEN / 4) as u8) << 4;
}

#[inline(always)]
fn fill4(r: &mut Rst4, o: &Original<u32>) {
    fill_common(r, o, [0x08, 0x00]);
    let total = (IPV4_HLEN + TCP_HLEN) as u16;
    r.ip = [0; IPV4_HLEN];
    r.ip[0] = 0x45;
    r.ip[2..4].copy_from_slice(&total.to_be_bytes());
    r.ip[6] = 0x40; // don't fragment, as the kernel's own RSTs
    r.ip[8] = 64;
    r.ip[9] = IPPROTO_TCP;
    r.ip[12..16].copy_from_slice(&o.frontend.to_ne_bytes());
    r.ip[16..20].copy_from_slice(&o.client.to_ne_bytes());
    let ip_check = finish(sum(&r.ip));
    r.ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    let pseudo = sum(&r.ip[12..20]) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
    let check = finish(pseudo + sum(&r.tcp));
    r.tcp[16..18].copy_from_slice(&check.to_be_bytes());
}

#[inline(always)]
fn fill6(r: &mut Rst6, o: &Original<Addr6>) {
    fill_common(r, o, [0x86, 0xdd]);
    r.ip = [0; IPV6_HLEN];
    r.ip[0] = 0x60;
    r.ip[4..6].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
    r.ip[6] = IPPROTO_TCP;
    r.ip[7] = 64;
    for i in 0..4 {
        r.ip[8 + 4 * i..12 + 4 * i].copy_from_slice(&o.frontend[i].to_ne_bytes());
        r.ip[24 + 4 * i..28 + 4 * i].copy_from_slice(&o.client[i].to_ne_bytes());
    }
    let pseudo = sum(&r.ip[8..40]) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
    let check = finish(pseudo + sum(&r.tcp));
    r.tcp[16..18].copy_from_slice(&check.to_be_bytes());
}
