//! Refusing SCTP: an ABORT back to the client, as a host with nothing
//! listening answers (RFC 9260 8.4), which fails its connect at once.
//!
//! An ICMP refusal cannot survive a late CRC32c completion (SCTP is
//! CRC-offloaded on veths, so the kernel may still write a CRC into the
//! packet after us). An ABORT can: its own CRC sits exactly at the offset
//! the kernel would write to, over exactly the bytes it would cover, so a
//! completion writes the value we wrote.

use aya_ebpf::{
    helpers::bpf_skb_load_bytes,
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;

use proxy_common::{
    Addr6, crc32c,
    csum::{finish, sum},
};

use crate::{
    maps,
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Flow, IPV6_HLEN, ptr_at},
    reply::{Answer, Towards, fill_eth, swap_macs, tc_send_back, xdp_answer},
};

const IPV4_HLEN: usize = 20;
const CHUNK_INIT: u8 = 1;
const CHUNK_ABORT: u8 = 6;
const CHUNK_SHUTDOWN_COMPLETE: u8 = 14;
/// ABORT flag: the verification tag is the one received (not the peer's).
const FLAG_T: u8 = 1;
const IPPROTO_SCTP: u8 = 132;

/// The SCTP part of the refusal: common header and ABORT chunk.
#[repr(C)]
struct Abort {
    ports: [u8; 4],
    vtag: [u8; 4],
    crc: [u8; 4],
    chunk: [u8; 4],
}

#[repr(C)]
struct Reply<const IP: usize> {
    eth: [u8; ETH_HLEN],
    ip: [u8; IP],
    sctp: Abort,
}

type Reply4 = Reply<IPV4_HLEN>;
type Reply6 = Reply<IPV6_HLEN>;

/// What the refusal needs of the original SCTP header and first chunk.
#[derive(Clone, Copy)]
struct Original {
    ports: [u8; 4],
    vtag: [u8; 4],
    /// The first chunk's type and, for an INIT, its Initiate Tag.
    chunk: u8,
    initiate_tag: [u8; 4],
}

/// `start..start+20` of the SCTP packet: header and first chunk's head.
#[inline(always)]
fn original(head: &[u8; 20]) -> Original {
    Original {
        ports: [head[0], head[1], head[2], head[3]],
        vtag: [head[4], head[5], head[6], head[7]],
        chunk: head[12],
        initiate_tag: [head[16], head[17], head[18], head[19]],
    }
}

/// RFC 9260 8.4: an out-of-the-blue ABORT or SHUTDOWN COMPLETE is
/// discarded, never answered (two refusing ends would ping-pong).
#[inline(always)]
fn answerable(o: &Original) -> bool {
    o.chunk != CHUNK_ABORT && o.chunk != CHUNK_SHUTDOWN_COMPLETE
}

#[inline(always)]
fn abort(o: &Original) -> Abort {
    // An INIT is answered with its Initiate Tag; anything else with its
    // own tag and the T flag.
    let (vtag, flags) = if o.chunk == CHUNK_INIT {
        (o.initiate_tag, 0)
    } else {
        (o.vtag, FLAG_T)
    };
    let mut bytes = [0u8; 16];
    bytes[..2].copy_from_slice(&o.ports[2..4]);
    bytes[2..4].copy_from_slice(&o.ports[..2]);
    bytes[4..8].copy_from_slice(&vtag);
    bytes[12] = CHUNK_ABORT;
    bytes[13] = flags;
    bytes[15] = 4;
    let crc = crc32c::checksum(&bytes).to_le_bytes();
    Abort {
        ports: [bytes[0], bytes[1], bytes[2], bytes[3]],
        vtag,
        crc,
        chunk: [CHUNK_ABORT, flags, 0, 4],
    }
}

#[inline(always)]
fn ip4(original: &[u8; IPV4_HLEN]) -> [u8; IPV4_HLEN] {
    let mut ip = [0u8; IPV4_HLEN];
    let total = (IPV4_HLEN + size_of::<Abort>()) as u16;
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_SCTP;
    ip[12..16].copy_from_slice(&original[16..20]);
    ip[16..20].copy_from_slice(&original[12..16]);
    let check = finish(sum(&ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

#[inline(always)]
fn ip6(original: &[u8; IPV6_HLEN]) -> [u8; IPV6_HLEN] {
    let mut ip = [0u8; IPV6_HLEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(size_of::<Abort>() as u16).to_be_bytes());
    ip[6] = IPPROTO_SCTP;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&original[24..40]);
    ip[24..40].copy_from_slice(&original[8..24]);
    ip
}

/// What XDP copies out of the original: its MACs, IP header and SCTP head.
struct Copied<const IP: usize> {
    eth: [u8; 12],
    ip: [u8; IP],
    sctp: Original,
}

impl Answer for Reply4 {
    type Original = Copied<IPV4_HLEN>;

    #[inline(always)]
    fn fill(&mut self, o: &Copied<IPV4_HLEN>, towards: Towards) {
        fill_eth(&mut self.eth, &o.eth, towards, ETH_P_IP);
        self.ip = ip4(&o.ip);
        self.sctp = abort(&o.sctp);
    }
}

impl Answer for Reply6 {
    type Original = Copied<IPV6_HLEN>;

    #[inline(always)]
    fn fill(&mut self, o: &Copied<IPV6_HLEN>, towards: Towards) {
        fill_eth(&mut self.eth, &o.eth, towards, ETH_P_IPV6);
        self.ip = ip6(&o.ip);
        self.sctp = abort(&o.sctp);
    }
}

/// IPv4 from XDP: straight back (XDP_TX).
#[inline(always)]
pub fn xdp4(ctx: &XdpContext, flow: &Flow<u32>, start: usize, end: usize) -> Option<()> {
    if flow.l4 != flow.l3 + IPV4_HLEN {
        return None;
    }
    xdp::<IPV4_HLEN>(ctx, flow, start, end, Towards::Sender)
}

/// IPv6 from XDP: up the node's stack, like the ICMPv6 refusals.
#[inline(always)]
pub fn xdp6(ctx: &XdpContext, flow: &Flow<Addr6>, start: usize, end: usize) -> Option<()> {
    xdp::<IPV6_HLEN>(ctx, flow, start, end, Towards::Stack)
}

#[inline(always)]
fn xdp<const IP: usize>(
    ctx: &XdpContext,
    flow: &Flow<impl Copy>,
    start: usize,
    end: usize,
    towards: Towards,
) -> Option<()>
where
    Reply<IP>: Answer<Original = Copied<IP>>,
{
    let eth: *const [u8; 12] = ptr_at(start, end, 0)?;
    let ip: *const [u8; IP] = ptr_at(start, end, flow.l3)?;
    let head: *const [u8; 20] = ptr_at(start, end, flow.l4)?;
    // SAFETY: bounds-checked by ptr_at; copied before resizing.
    let (eth, ip, sctp) = unsafe { (*eth, *ip, original(&*head)) };
    if !answerable(&sctp) {
        return None;
    }
    xdp_answer::<Reply<IP>>(ctx, &Copied { eth, ip, sctp }, towards)
}

// TC builds the refusal in the per-CPU scratch map, reading the original
// headers straight into it: the TC program has little stack left.

#[inline(always)]
pub fn tc4(ctx: &TcContext, flow: &Flow<u32>) -> Option<i32> {
    if flow.l4 != flow.l3 + IPV4_HLEN {
        return None;
    }
    let head: [u8; 20] = ctx.load(flow.l4).ok()?;
    if !answerable(&original(&head)) {
        return None;
    }
    let reply = maps::scratch::<Reply4>()?;
    load_into(ctx, 0, &mut reply.eth)?;
    swap_macs(&mut reply.eth);
    load_into(ctx, flow.l3, &mut reply.ip)?;
    let (src, dst) = (
        [reply.ip[12], reply.ip[13], reply.ip[14], reply.ip[15]],
        [reply.ip[16], reply.ip[17], reply.ip[18], reply.ip[19]],
    );
    let mut original_ip = [0u8; IPV4_HLEN];
    original_ip[12..16].copy_from_slice(&src);
    original_ip[16..20].copy_from_slice(&dst);
    reply.ip = ip4(&original_ip);
    reply.sctp = abort(&original(&head));
    tc_send_back(ctx, reply)
}

#[inline(always)]
pub fn tc6(ctx: &TcContext, flow: &Flow<Addr6>) -> Option<i32> {
    let head: [u8; 20] = ctx.load(flow.l4).ok()?;
    if !answerable(&original(&head)) {
        return None;
    }
    let reply = maps::scratch::<Reply6>()?;
    load_into(ctx, 0, &mut reply.eth)?;
    swap_macs(&mut reply.eth);
    load_into(ctx, flow.l3, &mut reply.ip)?;
    for i in 8..24 {
        reply.ip.swap(i, i + 16);
    }
    reply.ip[0] = 0x60;
    reply.ip[1..4].copy_from_slice(&[0, 0, 0]);
    reply.ip[4..6].copy_from_slice(&(size_of::<Abort>() as u16).to_be_bytes());
    reply.ip[6] = IPPROTO_SCTP;
    reply.ip[7] = 64;
    reply.sctp = abort(&original(&head));
    tc_send_back(ctx, reply)
}

/// Copies `N` packet bytes at `offset` into `dst` (a constant length, which
/// the verifier needs to see).
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, offset: usize, dst: &mut [u8; N]) -> Option<()> {
    // SAFETY: `dst` is N writable bytes; the helper checks the packet side.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            dst.as_mut_ptr().cast(),
            N as u32,
        )
    };
    (rc == 0).then_some(())
}
