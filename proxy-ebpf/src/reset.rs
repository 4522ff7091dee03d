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

use proxy_common::{
    Addr6, Counter, IPPROTO_TCP,
    csum::{finish, sum},
};

use crate::{
    family::{Family, V4, V6},
    parse::{
        self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Flow, IPV6_HLEN, Parsed, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN, ptr_at,
    },
    reply::{Answer, Towards, fill_eth, tc_answer, tc_outcome, xdp_answer, xdp_outcome, xdp_sent},
};

const TCP_HLEN: usize = 20;
const IPV4_HLEN: usize = 20;

/// Resetting a connection of one address family. `xdp` and `tc` start
/// from the packet alone (parsing it again): a flow whose address is taken
/// is kept in memory in pieces, and its header offsets may come back as
/// values the verifier cannot bound.
pub trait Reset: Family {
    /// The family's RST.
    type Rst: Answer<Original = Original<Self::Addr>>;
    /// The flow of a packet of this family.
    fn flow(parsed: Parsed) -> Option<Flow<Self::Addr>>;
}

impl Reset for V4 {
    type Rst = Rst<IPV4_HLEN>;

    #[inline(always)]
    fn flow(parsed: Parsed) -> Option<Flow<u32>> {
        match parsed {
            Parsed::V4(flow) => Some(flow),
            _ => None,
        }
    }
}

impl Reset for V6 {
    type Rst = Rst<IPV6_HLEN>;

    #[inline(always)]
    fn flow(parsed: Parsed) -> Option<Flow<Addr6>> {
        match parsed {
            Parsed::V6(flow) => Some(flow),
            _ => None,
        }
    }
}

#[repr(C)]
pub struct Rst<const IP: usize> {
    eth: [u8; ETH_HLEN],
    ip: [u8; IP],
    tcp: [u8; TCP_HLEN],
}

/// What the RST needs of the client's packet.
pub struct Original<A> {
    eth: [u8; 12],
    tcp: [u8; TCP_HLEN],
    client: A,
    frontend: A,
    /// Bytes of TCP payload (what a SYN or FIN counts for included).
    len: u32,
}

/// The RST sent `towards`, or XDP_DROP if it cannot be built (counted).
#[inline(always)]
pub fn xdp<F: Reset>(ctx: &XdpContext, towards: Towards) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let built = match F::flow(parse::flow(start, end)) {
        Some(flow) => try_xdp::<F>(ctx, &flow, start, end, towards),
        None => None,
    };
    xdp_sent(
        ctx,
        xdp_outcome(built, Counter::Reset, Counter::ResetFailed),
        towards,
    )
}

/// The RST redirected out of the interface the packet came in on, or
/// TC_ACT_SHOT if it cannot be built (counted).
#[inline(always)]
pub fn tc<F: Reset>(ctx: &TcContext) -> i32 {
    let built = match F::flow(parse::flow(ctx.data(), ctx.data_end())) {
        Some(flow) => try_tc::<F>(ctx, &flow),
        None => None,
    };
    tc_outcome(built, Counter::Reset, Counter::ResetFailed)
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
fn try_xdp<F: Reset>(
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
    xdp_answer::<F::Rst>(ctx, &original, towards)
}

#[inline(always)]
fn try_tc<F: Reset>(ctx: &TcContext, flow: &Flow<F::Addr>) -> Option<i32> {
    let original = original(flow, ctx.load(0).ok()?, ctx.load(flow.l4).ok()?)?;
    tc_answer::<F::Rst>(ctx, &original)
}

/// Ethernet going `towards`, and the TCP header of the RST (RFC 9293
/// 3.10.7.1: a packet with ACK is answered from its acknowledgment number;
/// one without, with an ACK of everything it carried). The caller adds the
/// checksum.
#[inline(always)]
fn fill_common<const IP: usize>(
    r: &mut Rst<IP>,
    o: &Original<impl Copy>,
    towards: Towards,
    ether_type: u16,
) {
    fill_eth(&mut r.eth, &o.eth, towards, ether_type);
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

impl Answer for Rst<IPV4_HLEN> {
    type Original = Original<u32>;

    #[inline(always)]
    fn fill(&mut self, o: &Original<u32>, towards: Towards) {
        fill_common(self, o, towards, ETH_P_IP);
        let total = (IPV4_HLEN + TCP_HLEN) as u16;
        self.ip = [0; IPV4_HLEN];
        self.ip[0] = 0x45;
        self.ip[2..4].copy_from_slice(&total.to_be_bytes());
        self.ip[6] = 0x40; // don't fragment, as the kernel's own RSTs
        self.ip[8] = 64;
        self.ip[9] = IPPROTO_TCP;
        self.ip[12..16].copy_from_slice(&o.frontend.to_ne_bytes());
        self.ip[16..20].copy_from_slice(&o.client.to_ne_bytes());
        let ip_check = finish(sum(&self.ip));
        self.ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
        let pseudo = sum(&self.ip[12..20]) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
        let check = finish(pseudo + sum(&self.tcp));
        self.tcp[16..18].copy_from_slice(&check.to_be_bytes());
    }
}

impl Answer for Rst<IPV6_HLEN> {
    type Original = Original<Addr6>;

    #[inline(always)]
    fn fill(&mut self, o: &Original<Addr6>, towards: Towards) {
        fill_common(self, o, towards, ETH_P_IPV6);
        self.ip = [0; IPV6_HLEN];
        self.ip[0] = 0x60;
        self.ip[4..6].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
        self.ip[6] = IPPROTO_TCP;
        self.ip[7] = 64;
        for i in 0..4 {
            self.ip[8 + 4 * i..12 + 4 * i].copy_from_slice(&o.frontend[i].to_ne_bytes());
            self.ip[24 + 4 * i..28 + 4 * i].copy_from_slice(&o.client[i].to_ne_bytes());
        }
        let pseudo = sum(&self.ip[8..40]) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
        let check = finish(pseudo + sum(&self.tcp));
        self.tcp[16..18].copy_from_slice(&check.to_be_bytes());
    }
}
