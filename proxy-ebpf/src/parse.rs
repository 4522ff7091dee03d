//! Bounds-checked header parsing, shared by XDP and TC.

use core::mem::size_of;

use proxy_common::{Counter, IPPROTO_TCP, IPPROTO_UDP};

use crate::maps;

const ETH_P_IP: u16 = 0x0800;
pub const ETH_HLEN: usize = 14;
/// Ethernet + the longest IPv4 header + the TCP bytes we touch.
pub const MAX_HEADERS: usize = ETH_HLEN + 60 + 20;

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// One IPv4 TCP/UDP packet's addressing. Addresses and ports in network order.
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the IPv4 header from the start of the packet.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// Offset of the L4 checksum field.
    pub l4_check: usize,
}

/// A `T` at `start + offset` if it lies wholly before `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The flow of an unfragmented IPv4 TCP or UDP packet; None for anything else.
#[inline(always)]
pub fn flow(start: usize, end: usize) -> Option<Flow> {
    let ether_type: *mut u16 = ptr_at(start, end, 12)?;
    // SAFETY: ptr_at checked the bounds.
    if u16::from_be(unsafe { *ether_type }) != ETH_P_IP {
        return None;
    }
    let l3 = ETH_HLEN;
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, l3) else {
        maps::count(Counter::Truncated);
        return None;
    };
    // SAFETY: bounds checked above.
    let ip = unsafe { &*ip };
    let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return None;
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return None;
    }
    // More-fragments or a non-zero offset: later fragments carry no ports.
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        maps::count(Counter::Fragment);
        return None;
    }
    let l4 = l3 + ihl;
    let (check_at, l4_len, present) = if ip.proto == IPPROTO_TCP {
        (16, 20, ptr_at::<[u8; 20]>(start, end, l4).is_some())
    } else {
        (6, 8, ptr_at::<[u8; 8]>(start, end, l4).is_some())
    };
    if !present || (u16::from_be(ip.tot_len) as usize) < ihl + l4_len {
        maps::count(Counter::Truncated);
        return None;
    }
    let ports: *mut Ports = ptr_at(start, end, l4)?;
    // SAFETY: bounds checked above.
    let ports = unsafe { &*ports };
    Some(Flow {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports.src,
        dport: ports.dst,
        proto: ip.proto,
        l3,
        l4,
        l4_check: l4 + check_at,
    })
}
