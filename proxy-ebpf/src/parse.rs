//! Bounds-checked header parsing, shared by XDP and TC.

use core::mem::size_of;

use proxy_common::{Addr6, Counter, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::maps;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_HLEN: usize = 14;
pub const IPV6_HLEN: usize = 40;
pub const NEXTHDR_FRAGMENT: u8 = 44;
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

/// What names a flow: addresses, ports and protocol as its client sent
/// them. A parsed packet has them, and so does a flow remembered elsewhere.
pub trait Tuple<A> {
    fn saddr(&self) -> A;
    fn daddr(&self) -> A;
    fn sport(&self) -> u16;
    fn dport(&self) -> u16;
    fn proto(&self) -> u8;
}

impl<A: Copy> Tuple<A> for Flow<A> {
    #[inline(always)]
    fn saddr(&self) -> A {
        self.saddr
    }
    #[inline(always)]
    fn daddr(&self) -> A {
        self.daddr
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.sport
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.dport
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
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

/// The flow of a TCP or UDP packet (or a datagram's first fragment) over
/// IPv4, or over IPv6 without extension headers other than a Fragment
/// header.
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

/// The header at `offset`; a packet that ends before it is counted as
/// truncated.
#[inline(always)]
fn header<'a, T>(start: usize, end: usize, offset: usize) -> Option<&'a T> {
    let Some(at) = ptr_at::<T>(start, end, offset) else {
        maps::count(Counter::Truncated);
        return None;
    };
    // SAFETY: ptr_at checked the bounds.
    Some(unsafe { &*at })
}

#[inline(always)]
fn flow4(start: usize, end: usize) -> Option<Flow<u32>> {
    let l3 = ETH_HLEN;
    let ip = header::<Ipv4Hdr>(start, end, l3)?;
    let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return None;
    }
    if !ours(ip.proto) {
        return None;
    }
    // More-fragments or a non-zero offset: a fragment. Only the first
    // carries the ports (later ones are `frag`'s); `l4_len` is then this
    // fragment's share of the datagram.
    let frag_off = u16::from_be(ip.frag_off);
    if frag_off & 0x3fff != 0 {
        maps::count(Counter::Fragment);
        if frag_off & 0x1fff != 0 || ip.proto == IPPROTO_SCTP {
            return None;
        }
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

/// IPv6 with TCP or UDP right after the fixed header, or after a first
/// fragment's Fragment header. Anything else (other extension headers,
/// ICMPv6 such as neighbour discovery) is not ours and passes untouched.
#[inline(always)]
fn flow6(start: usize, end: usize) -> Option<Flow<Addr6>> {
    let l3 = ETH_HLEN;
    let ip = header::<Ipv6Hdr>(start, end, l3)?;
    if u32::from_be(ip.ver_tc_flow) >> 28 != 6 {
        return None;
    }
    let mut proto = ip.next_header;
    let mut l4 = l3 + IPV6_HLEN;
    let mut payload = u16::from_be(ip.payload_len) as usize;
    if proto == NEXTHDR_FRAGMENT {
        // Only a first fragment carries the ports (later ones are `frag`'s).
        proto = first_fragment6(start, end, l4)?;
        l4 += size_of::<Frag6Hdr>();
        payload = payload.checked_sub(size_of::<Frag6Hdr>())?;
    }
    if !ours(proto) {
        return None;
    }
    let (l4, l4_min) = l4_at(start, end, l4, proto)?;
    if payload < l4_min {
        maps::count(Counter::Truncated);
        return None;
    }
    let mut flow = ports(start, end, l4, proto, ip.saddr, ip.daddr, l3)?;
    flow.l4_len = payload;
    Some(flow)
}

/// IPv6's Fragment extension header.
#[repr(C)]
pub struct Frag6Hdr {
    pub next_header: u8,
    pub reserved: u8,
    /// Offset (in 8-byte units) << 3 | more-fragments.
    pub frag_off: u16,
    pub id: u32,
}

/// The upper-layer protocol of a first fragment (offset 0) of a TCP or UDP
/// datagram whose Fragment header is at `at`; None for a later fragment or
/// another protocol (SCTP's CRC covers the whole datagram).
#[inline(always)]
fn first_fragment6(start: usize, end: usize, at: usize) -> Option<u8> {
    let frag = header::<Frag6Hdr>(start, end, at)?;
    if !ours(frag.next_header) {
        return None;
    }
    maps::count(Counter::Fragment);
    let first = u16::from_be(frag.frag_off) & !7 == 0;
    (first && frag.next_header != IPPROTO_SCTP).then_some(frag.next_header)
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
