//! Applying a rewrite: by hand in XDP, through the checksum helpers in TC.

use aya_ebpf::programs::{TcContext, XdpContext};
use proxy_common::{IPPROTO_SCTP, IPPROTO_UDP, crc32c, csum, csum::Words};

use crate::{
    copy,
    family::{Family, V4, V6},
    parse::{Flow, Ports, ptr_at},
    verdict::{Rewrite, Side},
};

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// Rewriting a packet of one address family: the rewrite itself is written
/// once (`xdp`, `tc`) over the family's header offsets.
pub trait Nat: Family {
    /// A zero UDP checksum means "none" and stays zero, a computed zero is
    /// sent as 0xffff (IPv4). Over IPv6 a UDP checksum is mandatory, so a
    /// zero field is a partial seed that must be updated.
    const UDP_CHECK_OPTIONAL: bool;
}

impl Nat for V4 {
    const UDP_CHECK_OPTIONAL: bool = true;
}

impl Nat for V6 {
    const UDP_CHECK_OPTIONAL: bool = false;
}

/// The old address and port of the side that changes.
#[inline(always)]
fn old<A: Copy>(flow: &Flow<A>, rewrite: &Rewrite<A>) -> (A, u16) {
    match rewrite.side {
        Side::Destination => (flow.daddr, flow.dport),
        Side::Source => (flow.saddr, flow.sport),
    }
}

/// A TCP or UDP checksum after its address (in the pseudo-header) and port
/// changed; a UDP checksum of 0 ("none") stays 0. Full checksums only.
#[inline(always)]
pub fn l4_check<A: Words>(
    proto: u8,
    check: u16,
    (from, to): (&A, &A),
    (from_port, to_port): (u16, u16),
) -> u16 {
    if proto == IPPROTO_UDP && check == 0 {
        return 0;
    }
    let new = csum::replace2(csum::replace_addr(check, from, to), from_port, to_port);
    if proto == IPPROTO_UDP {
        csum::udp_fixup(check, new)
    } else {
        new
    }
}

/// The SCTP packet's ports as they sit in it: before, and after the rewrite.
#[inline(always)]
fn sctp_ports<A>(flow: &Flow<A>, side: Side, port: u16) -> ([u8; 4], [u8; 4]) {
    let (s, d) = (flow.sport.to_ne_bytes(), flow.dport.to_ne_bytes());
    let old = [s[0], s[1], d[0], d[1]];
    let mut new = old;
    let at = match side {
        Side::Source => 0,
        Side::Destination => 2,
    };
    let p = port.to_ne_bytes();
    new[at] = p[0];
    new[at + 1] = p[1];
    (old, new)
}

/// SCTP's CRC32c after a port change (stored little-endian); None for a
/// packet too long to update. It does not cover the IP header, so an
/// address change needs nothing.
#[inline(always)]
fn sctp_check<A>(flow: &Flow<A>, side: Side, port: u16, stored: [u8; 4]) -> Option<[u8; 4]> {
    let (old, new) = sctp_ports(flow, side, port);
    let crc = u32::from_le_bytes(stored);
    let updated = crc32c::update_head4_with(crc, old, new, flow.l4_len, |diff, zeros| {
        xdproxy_crc32c_change(diff, zeros)
    })?;
    Some(updated.to_le_bytes())
}

/// `crc32c::change` as a global function, which the verifier checks once
/// per program for any arguments instead of at every path that reaches it:
/// inlined, its unrolled bit steps were a tenth of the instructions it
/// walked.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdproxy_crc32c_change(diff: u32, zeros: u32) -> u32 {
    crc32c::change(diff, zeros)
}

/// Fixes an SCTP packet's CRC in TC for a port change.
#[inline(always)]
fn tc_sctp<A>(ctx: &TcContext, flow: &Flow<A>, side: Side, from: u16, to: u16) -> Result<(), ()> {
    if from == to {
        return Ok(());
    }
    let at = match side {
        Side::Destination => 2,
        Side::Source => 0,
    };
    // SAFETY: reading the context's own field.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        // A GSO bundle (pods send those on veths) gets its CRC per segment
        // when it is split; its IP length is the bundle's, too long to
        // update anyway.
        return ctx.store(flow.l4 + at, &to, 0).map_err(|_| ());
    }
    let stored: [u8; 4] = ctx.load(flow.l4_check).map_err(|_| ())?;
    let check = sctp_check(flow, side, to, stored).ok_or(())?;
    ctx.store(flow.l4 + at, &to, 0).map_err(|_| ())?;
    // A CRC the kernel still has to compute (offloaded) is overwritten then.
    ctx.store(flow.l4_check, &check, 0).map_err(|_| ())
}

/// Sets the port of the side that changes.
///
/// # Safety
/// `ports` must point into the packet, bounds-checked.
#[inline(always)]
unsafe fn set_port(ports: *mut Ports, side: Side, port: u16) {
    // SAFETY: per the caller.
    unsafe {
        match side {
            Side::Destination => (*ports).dst = port,
            Side::Source => (*ports).src = port,
        }
    }
}

/// The helpers' UDP flag (see `Nat::UDP_CHECK_OPTIONAL`).
#[inline(always)]
fn mangled<F: Nat>(flow_proto: u8) -> u64 {
    if F::UDP_CHECK_OPTIONAL && flow_proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// Stores the new port and fixes the L4 checksum for it.
#[inline(always)]
fn tc_port<A>(
    ctx: &TcContext,
    flow: &Flow<A>,
    (side, from, to): (Side, u16, u16),
    mangle: u64,
) -> Result<(), ()> {
    let at = match side {
        Side::Destination => 2,
        Side::Source => 0,
    };
    ctx.store(flow.l4 + at, &to, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(flow.l4_check, from as u64, to as u64, mangle | 2)
        .map_err(|_| ())
}

/// Writes `to` over the side's address in the IP header at `ip`, and
/// updates the header checksum (IPv4's) for it.
///
/// # Safety
/// `ip` must point to a whole `F::Header` in the packet, bounds-checked.
#[inline(always)]
pub unsafe fn xdp_set_addr<F: Family>(
    ip: *mut F::Header,
    side: Side,
    from: &F::Addr,
    to: &F::Addr,
) {
    let ip = ip.cast::<u8>();
    let at = match side {
        Side::Destination => F::DADDR,
        Side::Source => F::SADDR,
    };
    // SAFETY: per the caller; the offsets lie within the header.
    unsafe {
        if let Some(check_at) = F::HEADER_CHECK {
            let check = ip.add(check_at).cast::<u16>();
            *check = csum::replace_addr(*check, from, to);
        }
        copy::store_addr(ip.add(at), to);
    }
}

/// As `xdp_set_addr`, through TC's helpers, for the IP header at `l3`.
#[inline(always)]
pub fn tc_set_addr<F: Family>(
    ctx: &TcContext,
    l3: usize,
    side: Side,
    from: &F::Addr,
    to: &F::Addr,
) -> Result<(), ()> {
    let at = match side {
        Side::Destination => F::DADDR,
        Side::Source => F::SADDR,
    };
    ctx.store(l3 + at, to, 0).map_err(|_| ())?;
    if let Some(check_at) = F::HEADER_CHECK {
        for (from, to) in from.words().iter().zip(to.words()) {
            ctx.l3_csum_replace(l3 + check_at, *from as u64, *to as u64, 4)
                .map_err(|_| ())?;
        }
    }
    Ok(())
}

/// Applies the rewrite in XDP. Full checksums only (see
/// `proxy_common::csum`): XDP sees no partial ones on interfaces it is
/// meant for.
#[inline(always)]
pub fn xdp<F: Nat>(
    ctx: &XdpContext,
    flow: &Flow<F::Addr>,
    rewrite: &Rewrite<F::Addr>,
) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip: *mut F::Header = ptr_at(start, end, flow.l3).ok_or(())?;
    let ports: *mut Ports = ptr_at(start, end, flow.l4).ok_or(())?;
    let (old_addr, old_port) = old(flow, rewrite);
    // SAFETY: every pointer was bounds-checked against data_end.
    let set_ip = || unsafe {
        xdp_set_addr::<F>(ip, rewrite.side, &old_addr, &rewrite.addr);
        set_port(ports, rewrite.side, rewrite.port);
    };
    if flow.proto == IPPROTO_SCTP {
        let (check, new) = xdp_sctp(start, end, flow, rewrite.side, rewrite.port)?;
        set_ip();
        // SAFETY: bounds-checked by xdp_sctp.
        unsafe { *check = new };
        return Ok(());
    }
    let check: *mut u16 = ptr_at(start, end, flow.l4_check).ok_or(())?;
    set_ip();
    // SAFETY: bounds-checked above.
    unsafe {
        *check = l4_check(
            flow.proto,
            *check,
            (&old_addr, &rewrite.addr),
            (old_port, rewrite.port),
        );
    }
    Ok(())
}

/// Applies the rewrite in TC. The helpers update a partial (pseudo-header
/// only) L4 checksum correctly, which locally built packets on a veth
/// carry.
#[inline(always)]
pub fn tc<F: Nat>(
    ctx: &TcContext,
    flow: &Flow<F::Addr>,
    rewrite: &Rewrite<F::Addr>,
) -> Result<(), ()> {
    let (old_addr, old_port) = old(flow, rewrite);
    tc_set_addr::<F>(ctx, flow.l3, rewrite.side, &old_addr, &rewrite.addr)?;
    if flow.proto == IPPROTO_SCTP {
        return tc_sctp(ctx, flow, rewrite.side, old_port, rewrite.port);
    }
    let mangle = mangled::<F>(flow.proto);
    // The pseudo-header covers the address.
    for (from, to) in old_addr.words().iter().zip(rewrite.addr.words()) {
        ctx.l4_csum_replace(
            flow.l4_check,
            *from as u64,
            *to as u64,
            BPF_F_PSEUDO_HDR | mangle | 4,
        )
        .map_err(|_| ())?;
    }
    let change = (rewrite.side, old_port, rewrite.port);
    tc_port(ctx, flow, change, mangle)
}

/// An SCTP packet's CRC and its new value for XDP, computed before anything
/// is written (XDP passes a packet whose rewrite failed, so it must not be
/// half done). Callers test the protocol once and keep the paths apart: a
/// second test that LLVM merged them under is one the verifier cannot
/// follow.
#[inline(always)]
fn xdp_sctp<A>(
    start: usize,
    end: usize,
    flow: &Flow<A>,
    side: Side,
    port: u16,
) -> Result<(*mut [u8; 4], [u8; 4]), ()> {
    let check: *mut [u8; 4] = ptr_at(start, end, flow.l4_check).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at.
    let new = sctp_check(flow, side, port, unsafe { *check }).ok_or(())?;
    Ok((check, new))
}
