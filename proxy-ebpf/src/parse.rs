//! Bounds-checked header parsing, shared by XDP and TC.

use core::mem::size_of;

use proxy_common::{Addr6, Counter, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::maps;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_HLEN: usize = 14;
pub const IPV6_HLEN: usize = 40;
const NEXTHDR_FRAGMENT: u8 = 44;
/// Ethernet + the longest IP header we parse + the TCP bytes we touch.
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
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: Addr6,
    pub daddr: Addr6,
}

#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// One TCP, UDP or SCTP packet's addressing. Addresses and ports in network
/// order.
#[derive(Clone, Copy)]
pub struct Flow<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the IP header from the start of the packet.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// Offset of the L4 checksum field (SCTP: its CRC32c).
    pub l4_check: usize,
    /// Bytes from the L4 header to the end of the IP payload.
    pub l4_len: usize,
    /// TCP: the flags byte (`TCP_*`); other protocols: 0.
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl<A> Flow<A> {
    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

pub enum Parsed {
    V4(Flow<u32>),
    V6(Flow<Addr6>),
    /// Not TCP or UDP over IP (or not parseable): not ours.
    Other,
}

/// A `T` at `start + offset` if it lies wholly before `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The flow of an unfragmented TCP or UDP packet over IPv4, or over IPv6
/// without extension headers.
#[inline(always)]
pub fn flow(start: usize, end: usize) -> Parsed {
    let Some(ether_type) = ptr_at::<u16>(start, end, 12) else {
        return Parsed::Other;
    };
    // SAFETY: ptr_at checked the bounds.
    match u16::from_be(unsafe { *ether_type }) {
        ETH_P_IP => flow4(start, end).map_or(Parsed::Other, Parsed::V4),
        ETH_P_IPV6 => flow6(start, end).map_or(Parsed::Other, Parsed::V6),
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn flow4(start: usize, end: usize) -> Option<Flow<u32>> {
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
    if !ours(ip.proto) {
        return None;
    }
    // More-fragments or a non-zero offset: later fragments carry no ports.
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        maps::count(Counter::Fragment);
        return None;
    }
    let (l4, l4_min) = l4_at(start, end, l3 + ihl, ip.proto)?;
    let total = u16::from_be(ip.tot_len) as usize;
    if total < ihl + l4_min {
        maps::count(Counter::Truncated);
        return None;
    }
    let mut flow = ports(start, end, l4, ip.proto, ip.saddr, ip.daddr, l3)?;
    flow.l4_len = total - ihl;
    Some(flow)
}

/// IPv6 with TCP or UDP right after the fixed header. Anything else
/// (extension headers, fragments, ICMPv6 such as neighbour discovery) is
/// not ours and passes untouched.
#[inline(always)]
fn flow6(start: usize, end: usize) -> Option<Flow<Addr6>> {
    let l3 = ETH_HLEN;
    let Some(ip) = ptr_at::<Ipv6Hdr>(start, end, l3) else {
        maps::count(Counter::Truncated);
        return None;
    };
    // SAFETY: bounds checked above.
    let ip = unsafe { &*ip };
    if u32::from_be(ip.ver_tc_flow) >> 28 != 6 {
        return None;
    }
    let proto = ip.next_header;
    if proto == NEXTHDR_FRAGMENT {
        // A later fragment carries no ports; counted as IPv4's are.
        maps::count(Counter::Fragment);
        return None;
    }
    if !ours(proto) {
        return None;
    }
    let (l4, l4_min) = l4_at(start, end, l3 + IPV6_HLEN, proto)?;
    let payload = u16::from_be(ip.payload_len) as usize;
    if payload < l4_min {
        maps::count(Counter::Truncated);
        return None;
    }
    let mut flow = ports(start, end, l4, proto, ip.saddr, ip.daddr, l3)?;
    flow.l4_len = payload;
    Some(flow)
}

#[inline(always)]
fn ours(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
}

/// The L4 header's offset and the length we need of it, if present.
#[inline(always)]
fn l4_at(start: usize, end: usize, l4: usize, proto: u8) -> Option<(usize, usize)> {
    let (present, need) = match proto {
        IPPROTO_TCP => (ptr_at::<[u8; 20]>(start, end, l4).is_some(), 20),
        // SCTP's common header: ports, verification tag, CRC32c.
        IPPROTO_SCTP => (ptr_at::<[u8; 12]>(start, end, l4).is_some(), 12),
        _ => (ptr_at::<[u8; 8]>(start, end, l4).is_some(), 8),
    };
    if !present {
        maps::count(Counter::Truncated);
        return None;
    }
    Some((l4, need))
}

#[inline(always)]
fn ports<A>(
    start: usize,
    end: usize,
    l4: usize,
    proto: u8,
    saddr: A,
    daddr: A,
    l3: usize,
) -> Option<Flow<A>> {
    let ports: *mut Ports = ptr_at(start, end, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    let check_at = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_SCTP => 8,
        _ => 6,
    };
    let tcp_flags = match proto {
        // SAFETY: l4_at checked the 20-byte TCP header is there.
        IPPROTO_TCP => ptr_at::<u8>(start, end, l4 + 13).map_or(0, |f| unsafe { *f }),
        _ => 0,
    };
    Some(Flow {
        saddr,
        daddr,
        sport: ports.src,
        dport: ports.dst,
        proto,
        l3,
        l4,
        l4_check: l4 + check_at,
        l4_len: 0,
        tcp_flags,
    })
}
