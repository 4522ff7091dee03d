//! Applying a rewrite: by hand in XDP, through the checksum helpers in TC.

use aya_ebpf::programs::{TcContext, XdpContext};
use proxy_common::{IPPROTO_UDP, csum};

use crate::{
    lb::{Rewrite, Side},
    parse::{Flow, Ipv4Hdr, Ports, ptr_at},
};

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const IP_CHECK: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;

/// Offsets (from the IPv4 and L4 headers) and old values of what changes.
#[inline(always)]
fn targets(flow: &Flow, rewrite: &Rewrite) -> (usize, u32, usize, u16) {
    match rewrite.side {
        Side::Destination => (IP_DADDR, flow.daddr, 2, flow.dport),
        Side::Source => (IP_SADDR, flow.saddr, 0, flow.sport),
    }
}

/// Full checksums only (see `proxy_common::csum`): XDP sees no partial ones
/// on interfaces it is meant for.
#[inline(always)]
pub fn xdp(ctx: &XdpContext, flow: &Flow, rewrite: &Rewrite) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip: *mut Ipv4Hdr = ptr_at(start, end, flow.l3).ok_or(())?;
    let ports: *mut Ports = ptr_at(start, end, flow.l4).ok_or(())?;
    let check: *mut u16 = ptr_at(start, end, flow.l4_check).ok_or(())?;
    let (_, old_addr, _, old_port) = targets(flow, rewrite);
    // SAFETY: every pointer was bounds-checked against data_end above.
    unsafe {
        (*ip).check = csum::replace4((*ip).check, old_addr, rewrite.addr);
        match rewrite.side {
            Side::Destination => {
                (*ip).daddr = rewrite.addr;
                (*ports).dst = rewrite.port;
            }
            Side::Source => {
                (*ip).saddr = rewrite.addr;
                (*ports).src = rewrite.port;
            }
        }
        let old = *check;
        if flow.proto == IPPROTO_UDP && old == 0 {
            return Ok(());
        }
        let new = csum::replace4(old, old_addr, rewrite.addr);
        let new = csum::replace2(new, old_port, rewrite.port);
        *check = if flow.proto == IPPROTO_UDP {
            csum::udp_fixup(old, new)
        } else {
            new
        };
    }
    Ok(())
}

/// The helpers update a partial (pseudo-header only) L4 checksum correctly,
/// which locally built packets on a veth carry.
#[inline(always)]
pub fn tc(ctx: &TcContext, flow: &Flow, rewrite: &Rewrite) -> Result<(), ()> {
    let (addr_at, old_addr, port_at, old_port) = targets(flow, rewrite);
    let mangled = if flow.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    ctx.store(flow.l3 + addr_at, &rewrite.addr, 0)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(flow.l3 + IP_CHECK, old_addr as u64, rewrite.addr as u64, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(
        flow.l4_check,
        old_addr as u64,
        rewrite.addr as u64,
        BPF_F_PSEUDO_HDR | mangled | 4,
    )
    .map_err(|_| ())?;
    ctx.store(flow.l4 + port_at, &rewrite.port, 0)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(
        flow.l4_check,
        old_port as u64,
        rewrite.port as u64,
        mangled | 2,
    )
    .map_err(|_| ())?;
    Ok(())
}
