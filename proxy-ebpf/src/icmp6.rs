//! ICMPv6 errors about translated flows (see `icmp`): destination
//! unreachable, packet too big and time exceeded. The outer and the quoted
//! IPv6 header must each be followed by their protocol's header at once:
//! an error or a quote behind extension headers passes untouched.

use proxy_common::Addr6;

use crate::{
    family::{Family, V6},
    icmp::{Checks, Error, ICMP_HLEN, L3, Packet, Quoting, Scratch, byte, quoted},
    parse::IPV6_HLEN,
};

const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
/// IPv6 header fields.
const IP6_PAYLOAD_LEN: usize = 4;
const IP6_NEXT_HEADER: usize = 6;

/// True if an IPv6 header is at `at`.
#[inline(always)]
fn is_v6<P: Packet>(p: &P, at: usize) -> Option<bool> {
    Some(byte(p, at)? >> 4 == 6)
}

impl Quoting for V6 {
    const ICMP: usize = L3 + IPV6_HLEN;
    const INNER: usize = Self::ICMP + ICMP_HLEN;
    const INNER_L4: usize = Self::INNER + IPV6_HLEN;
    const PSEUDO_HEADER: bool = true;

    #[inline(always)]
    fn slot(s: &mut Scratch) -> (&mut Error<Addr6>, &mut Checks) {
        s.v6()
    }

    #[inline(always)]
    fn parse<P: Packet>(p: &P, e: &mut Error<Addr6>) -> Option<()> {
        // Everything up to the quoted ports at once: one bounds check.
        if !p.holds(Self::INNER_L4 + 4) {
            return None;
        }
        if !is_v6(p, L3)? || byte(p, L3 + IP6_NEXT_HEADER)? != IPPROTO_ICMPV6 {
            return None;
        }
        let kind = byte(p, Self::ICMP)?;
        if kind != ICMPV6_DEST_UNREACH && kind != ICMPV6_PKT_TOOBIG && kind != ICMPV6_TIME_EXCEED {
            return None;
        }
        if !is_v6(p, Self::INNER)? {
            return None;
        }
        let payload: u16 = p.read(L3 + IP6_PAYLOAD_LEN)?;
        e.end = Self::ICMP + u16::from_be(payload) as usize;
        e.proto = byte(p, Self::INNER + IP6_NEXT_HEADER)?;
        p.read_into(L3 + Self::SADDR, &mut e.outer_src)?;
        p.read_into(L3 + Self::DADDR, &mut e.outer_dst)?;
        p.read_into(Self::INNER + Self::SADDR, &mut e.src)?;
        p.read_into(Self::INNER + Self::DADDR, &mut e.dst)?;
        quoted(p, e, Self::INNER_L4)
    }
}
