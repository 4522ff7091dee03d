//! ICMP errors about translated flows, translated back, so that path MTU
//! discovery and refusals work through a Service: "fragmentation needed" /
//! "packet too big", unreachables and time exceeded reach the endpoint that
//! sent the packet they quote, about the addresses that endpoint used.
//!
//! An error quotes the start of the packet that failed (Q). A packet of
//! Q's reverse direction, a reply of Q, would find conntrack entries at
//! this hook; what they would change in it is changed here, mirrored:
//! - the reply's source becoming X: Q's destination becomes X, and so does
//!   the error's source if Q's destination sent the error itself (a
//!   backend's port unreachable comes from the frontend);
//! - the reply's destination becoming X (source NAT's way back): Q's source
//!   becomes X, and so does the error's destination (it goes to the client).
//!
//! Ingress hooks look the reply up as packets coming in do (FORWARD, then
//! REPLY); the egress hook as packets leaving do (EGRESS), then also REPLY:
//! errors the node builds itself (forwarding to a backend over a link with
//! a smaller MTU) pass no ingress hook, and quote the packet as forwarded,
//! already translated. An error is only taken for one that goes back to
//! the quoted packet's source; anything else passes untouched.
//!
//! Checksums are updated incrementally: the outer IPv4 header's, the quoted
//! IPv4 header's, the quoted L4 checksum where the quote holds it (SCTP's
//! CRC32c covers the whole datagram, which the quote does not hold, and
//! nothing checks it: it stays), and the ICMP checksum over all of that
//! (ICMPv6's also over the outer addresses, its pseudo-header). TC writes
//! the bytes with `bpf_skb_store_bytes` without touching `skb->csum`: every
//! change is balanced by a checksum field inside the packet, so the sum of
//! the whole packet, which a CHECKSUM_COMPLETE `skb->csum` holds, stays the
//! same; and ICMP is never sent with a partial checksum, which is what
//! nat.rs needs the L4 helpers for.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    cty::c_void,
    helpers::bpf_skb_load_bytes,
    macros::btf_map,
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use proxy_common::{
    Addr6, CT_AT_EGRESS, CT_EGRESS_ONLY, CT_FORWARD, CT_REPLY, CT_REWRITE_DST, Counter,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, csum,
};

use crate::{
    copy, ct,
    ctmap::{self, CtMaps, Entry, Seen},
    family::{Family, V4, V6},
    maps,
    nat::l4_check,
    parse::{ETH_HLEN, ptr_at},
    verdict::Stage,
};

/// The outer IP header, after Ethernet.
pub const L3: usize = ETH_HLEN;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
/// ICMP's header before the quote: type, code, checksum, 4 more bytes.
pub const ICMP_HLEN: usize = 8;
/// What every error must quote of the L4 header (RFC 792): the ports, and
/// UDP's checksum.
const L4_QUOTED: usize = 8;

/// Byte access to a packet: direct in XDP, through the helpers in TC.
pub trait Packet {
    /// True if the packet is at least `len` bytes long.
    fn holds(&self, len: usize) -> bool;
    fn read<T: Copy>(&self, at: usize) -> Option<T>;
    /// Copies a `T` out of the packet into `dst`, which is map memory:
    /// addresses do not pass through the stack.
    fn read_into<T>(&self, at: usize, dst: &mut T) -> Option<()>;
    fn write<T>(&self, at: usize, value: &T) -> Option<()>;
}

/// An XDP packet's bounds.
struct Direct {
    start: usize,
    end: usize,
}

impl Packet for Direct {
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.start + len <= self.end
    }

    #[inline(always)]
    fn read<T: Copy>(&self, at: usize) -> Option<T> {
        let p: *mut T = ptr_at(self.start, self.end, at)?;
        // SAFETY: bounds-checked by ptr_at.
        Some(unsafe { *p })
    }

    #[inline(always)]
    fn read_into<T>(&self, at: usize, dst: &mut T) -> Option<()> {
        let p: *mut T = ptr_at(self.start, self.end, at)?;
        // SAFETY: bounds-checked by ptr_at; T is a plain value.
        unsafe { core::ptr::copy_nonoverlapping(p, dst, 1) };
        Some(())
    }

    #[inline(always)]
    fn write<T>(&self, at: usize, value: &T) -> Option<()> {
        let p: *mut T = ptr_at(self.start, self.end, at)?;
        // SAFETY: bounds-checked by ptr_at; T is a plain value.
        unsafe { core::ptr::copy_nonoverlapping(value, p, 1) };
        Some(())
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.len() as usize >= len
    }

    #[inline(always)]
    fn read<T: Copy>(&self, at: usize) -> Option<T> {
        self.load(at).ok()
    }

    #[inline(always)]
    fn read_into<T>(&self, at: usize, dst: &mut T) -> Option<()> {
        // The helper itself, with a constant length: `load_bytes` clamps
        // the length to the packet's, which the verifier refuses.
        // SAFETY: `dst` is a live, exclusively borrowed T of that length;
        // any bytes are a valid T for the plain values this is used for.
        let rc = unsafe {
            bpf_skb_load_bytes(
                self.skb.skb as *const c_void,
                at as u32,
                (dst as *mut T).cast(),
                size_of::<T>() as u32,
            )
        };
        (rc == 0).then_some(())
    }

    #[inline(always)]
    fn write<T>(&self, at: usize, value: &T) -> Option<()> {
        self.store(at, value, 0).ok()
    }
}

/// An ICMP error about a TCP, UDP or SCTP packet, and what its translation
/// changes. Addresses and ports as in the packet. It lives in the per-CPU
/// `icmp_scratch`: IPv6's addresses alone would take a large share of the
/// hooks' 512-byte stack, which the flow path nearly fills.
#[repr(C)]
pub struct Error<A> {
    /// Where the outer IP datagram ends, so the quote with it.
    pub end: usize,
    /// The error's own addresses.
    pub outer_src: A,
    pub outer_dst: A,
    /// The quoted packet's.
    pub src: A,
    pub dst: A,
    /// The new address and port of the quoted side that changes.
    pub to: A,
    pub sport: u16,
    pub dport: u16,
    pub to_port: u16,
    pub proto: u8,
    /// True: the quoted packet's source changes (its reply's destination
    /// would); false: its destination.
    pub source_changes: bool,
}

/// The checksums a translation changes, old then new, kept where the
/// helpers can read and write them without a stack slot each.
#[repr(C)]
pub struct Checks {
    icmp: u16,
    inner: u16,
    l4: u16,
    outer: u16,
}

#[repr(C)]
pub struct Scratch {
    e4: Error<u32>,
    e6: Error<Addr6>,
    checks: Checks,
}

impl Scratch {
    #[inline(always)]
    pub fn v6(&mut self) -> (&mut Error<Addr6>, &mut Checks) {
        (&mut self.e6, &mut self.checks)
    }
}

/// Not pinned: only used while one program runs on this CPU.
#[btf_map(name = "icmp_scratch")]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// What differs between ICMP and ICMPv6 errors.
///
/// Both headers are taken without options or extension headers (an error
/// with them passes untouched, as before): at fixed offsets, every bounds
/// check is one the verifier follows, whatever LLVM merges.
pub trait Quoting: Family {
    /// Offsets of the ICMP header, the quoted IP header and the quoted L4
    /// header in the packet.
    const ICMP: usize;
    const INNER: usize;
    const INNER_L4: usize;
    /// The ICMP checksum covers the outer addresses (ICMPv6's pseudo-header).
    const PSEUDO_HEADER: bool;

    fn slot(s: &mut Scratch) -> (&mut Error<Self::Addr>, &mut Checks);
    /// Fills `e` if the packet is an ICMP error of a kind that is
    /// translated, about a TCP, UDP or SCTP packet (see `quoted`).
    fn parse<P: Packet>(p: &P, e: &mut Error<Self::Addr>) -> Option<()>;
}

/// The byte at `at`, read with the one after it (every caller's header goes
/// on): LLVM turns a one-byte bounds check at a variable offset into a
/// comparison the verifier does not take as one.
#[inline(always)]
pub fn byte<P: Packet>(p: &P, at: usize) -> Option<u8> {
    p.read::<[u8; 2]>(at).map(|b| b[0])
}

/// The rest of `parse` once the offsets, addresses and quoted protocol are
/// in: None unless the error goes back to the quoted packet's source and
/// quotes a protocol of ours with its ports.
#[inline(always)]
pub fn quoted<A: PartialEq, P: Packet>(p: &P, e: &mut Error<A>, inner_l4: usize) -> Option<()> {
    let ours = e.proto == IPPROTO_TCP || e.proto == IPPROTO_UDP || e.proto == IPPROTO_SCTP;
    if !ours || e.outer_dst != e.src || inner_l4 + 4 > e.end {
        return None;
    }
    let ports: [u16; 2] = p.read(inner_l4)?;
    e.sport = ports[0];
    e.dport = ports[1];
    Some(())
}

/// What became of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not an error about a flow of ours: untouched.
    NotOurs,
    Translated,
    /// About a flow of ours, but it could not be translated: drop it.
    Failed,
}

/// The XDP verdict for an ICMP error about a flow of ours; None for any
/// other packet (untouched).
#[inline(always)]
pub fn xdp(ctx: &XdpContext) -> Option<u32> {
    let packet = Direct {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    match translate(&packet, Stage::Ingress) {
        Outcome::NotOurs => None,
        Outcome::Translated => Some(xdp_action::XDP_PASS),
        Outcome::Failed => Some(xdp_action::XDP_DROP),
    }
}

/// As `xdp`, at a TC hook of `stage`.
#[inline(always)]
pub fn tc(ctx: &TcContext, stage: Stage) -> Option<i32> {
    match translate(ctx, stage) {
        Outcome::NotOurs => None,
        Outcome::Translated => Some(TC_ACT_OK),
        Outcome::Failed => Some(TC_ACT_SHOT),
    }
}

#[inline(always)]
fn translate<P: Packet>(p: &P, stage: Stage) -> Outcome {
    let Some(ether_type) = p.read::<u16>(12) else {
        return Outcome::NotOurs;
    };
    match u16::from_be(ether_type) {
        ETH_P_IP => error::<V4, P>(p, stage),
        ETH_P_IPV6 => error::<V6, P>(p, stage),
        _ => Outcome::NotOurs,
    }
}

#[inline(always)]
fn error<F: Quoting, P: Packet>(p: &P, stage: Stage) -> Outcome {
    // SAFETY: per-CPU, and only used while this program runs.
    let Some(scratch) = SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s }) else {
        return Outcome::NotOurs;
    };
    let (e, checks) = F::slot(scratch);
    if F::parse(p, e).is_none() || lookup::<F>(e, stage).is_none() {
        return Outcome::NotOurs;
    }
    match rewrite::<F, P>(p, e, checks) {
        Some(()) => {
            maps::count(Counter::IcmpErrorTranslated);
            Outcome::Translated
        }
        None => {
            maps::count(Counter::IcmpErrorFailed);
            Outcome::Failed
        }
    }
}

/// Finds what a reply of the quoted packet would be changed into at this
/// stage and sets the error's `to`, `to_port` and `source_changes`. Entries
/// are only read: an error is no sign of life of its flow.
#[inline(always)]
fn lookup<F: Family>(e: &mut Error<F::Addr>, stage: Stage) -> Option<()> {
    let (to, to_port, to_destination) = match one_entry::<F>(e, stage) {
        Some(found) => found,
        None if ctmap::paired() || ctmap::source_nat() => paired::<F>(e, stage)?,
        None => return None,
    };
    // A source NAT entry still waiting for its port translates nothing.
    if to_port == 0 {
        return None;
    }
    // SAFETY: a field of the error.
    unsafe { copy::store_addr((&raw mut e.to).cast(), &to) };
    e.to_port = to_port;
    e.source_changes = to_destination;
    Some(())
}

/// The quoted packet's translation by a `CT_SOCKET` entry: a reply this
/// node sent from the frontend (at ingress, the error goes to the backend
/// instead), or a client's packet it sent to the backend (the quoted
/// destination becomes the frontend again).
#[inline(always)]
fn one_entry<F: Family>(e: &Error<F::Addr>, stage: Stage) -> Option<(F::Addr, u16, bool)> {
    if stage == Stage::Ingress {
        let from_frontend = |r: &Entry<F::Addr>| F::rev_nat(r.service_id) == Some((e.src, e.sport));
        let key = ct::socket_key::<F>(e.dst, e.dport, e.proto);
        if let Some(entry) = F::ct_get_where(key, Seen::Nothing, from_frontend) {
            return Some((entry.addr, entry.port, true));
        }
    }
    let to_backend = |r: &Entry<F::Addr>| {
        (stage == Stage::Egress || r.flags & CT_AT_EGRESS == 0)
            && r.addr == e.dst
            && r.port == e.dport
    };
    let key = ct::socket_key::<F>(e.src, e.sport, e.proto);
    let entry = F::ct_get_where(key, Seen::Nothing, to_backend)?;
    let (frontend, port) = F::rev_nat(entry.service_id)?;
    Some((frontend, port, false))
}

/// The quoted packet's translation by a pair of entries. FORWARD makes a
/// reply's destination the backend; at egress, an entry of that hook makes
/// its source the frontend or the node.
#[inline(always)]
fn paired<F: Family>(e: &Error<F::Addr>, stage: Stage) -> Option<(F::Addr, u16, bool)> {
    let reply = |e: &Error<F::Addr>, direction| {
        F::Ct::key(e.dst, e.dport, e.src, e.sport, e.proto, direction)
    };
    let forward = match stage {
        Stage::Ingress => F::ct_get(reply(e, CT_FORWARD), Seen::Nothing),
        Stage::Egress => None,
    };
    if let Some(entry) = forward {
        return Some((entry.addr, entry.port, true));
    }
    let here = |r: &Entry<F::Addr>| stage == Stage::Egress || r.flags & CT_EGRESS_ONLY == 0;
    let entry = F::ct_get_where(reply(e, CT_REPLY), Seen::Nothing, here)?;
    let ingress_kind = entry.flags & CT_EGRESS_ONLY == 0;
    let to_destination = ingress_kind && entry.flags & CT_REWRITE_DST != 0;
    Some((entry.addr, entry.port, to_destination))
}

/// The quoted packet's L4 checksum offset, if the quote holds it.
#[inline(always)]
fn l4_check_at<F: Quoting>(e: &Error<F::Addr>) -> Option<usize> {
    let at = match e.proto {
        IPPROTO_TCP => F::INNER_L4 + 16,
        IPPROTO_UDP => F::INNER_L4 + 6,
        _ => return None,
    };
    (at + 2 <= e.end).then_some(at)
}

/// Rewrites the quoted address and port, the error's own address where it
/// is the same endpoint, and every checksum over them; None (nothing
/// written) if the quote is too short or cannot be read, or if a TC write
/// fails (then half written: the caller drops it).
#[inline(always)]
fn rewrite<F: Quoting, P: Packet>(p: &P, e: &Error<F::Addr>, c: &mut Checks) -> Option<()> {
    if F::INNER_L4 + L4_QUOTED > e.end {
        return None;
    }
    // The error goes to the quoted source (`quoted` checked), so its
    // destination follows that; its source follows the quoted destination
    // only if that endpoint sent it (a backend's own refusal). Either way
    // the error's old address is `from`.
    let (from, from_port, addr_at, port_at, outer_at) = if e.source_changes {
        let outer = Some(L3 + F::DADDR);
        (&e.src, e.sport, F::INNER + F::SADDR, F::INNER_L4, outer)
    } else {
        let outer = (e.outer_src == e.dst).then_some(L3 + F::SADDR);
        (&e.dst, e.dport, F::INNER + F::DADDR, F::INNER_L4 + 2, outer)
    };
    let to = &e.to;
    // Reads and sums first: XDP cannot undo half a rewrite.
    let icmp_at = F::ICMP + 2;
    p.read_into(icmp_at, &mut c.icmp)?;
    c.icmp = csum::replace2(csum::replace_addr(c.icmp, from, to), from_port, e.to_port);
    if let Some(off) = F::HEADER_CHECK {
        p.read_into(F::INNER + off, &mut c.inner)?;
        let old = c.inner;
        c.inner = csum::replace_addr(old, from, to);
        c.icmp = csum::replace2(c.icmp, old, c.inner);
    }
    let l4_at = l4_check_at::<F>(e);
    if let Some(at) = l4_at {
        p.read_into(at, &mut c.l4)?;
        let old = c.l4;
        c.l4 = l4_check(e.proto, old, (from, to), (from_port, e.to_port));
        c.icmp = csum::replace2(c.icmp, old, c.l4);
    }
    if outer_at.is_some() {
        if F::PSEUDO_HEADER {
            c.icmp = csum::replace_addr(c.icmp, from, to);
        }
        if let Some(off) = F::HEADER_CHECK {
            p.read_into(L3 + off, &mut c.outer)?;
            c.outer = csum::replace_addr(c.outer, from, to);
        }
    }
    p.write(addr_at, to)?;
    p.write(port_at, &e.to_port)?;
    if let Some(off) = F::HEADER_CHECK {
        p.write(F::INNER + off, &c.inner)?;
    }
    if let Some(at) = l4_at {
        p.write(at, &c.l4)?;
    }
    if let Some(at) = outer_at {
        p.write(at, to)?;
        if let Some(off) = F::HEADER_CHECK {
            p.write(L3 + off, &c.outer)?;
        }
    }
    p.write(icmp_at, &c.icmp)
}

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// IPv4 header fields.
const IPV4_HLEN: usize = 20;
const IP_TOT_LEN: usize = 2;
const IP_FRAG_OFF: usize = 6;
const IP_PROTO: usize = 9;
/// More-fragments and offset; the offset alone.
const IP_MF_OFFSET: u16 = 0x3fff;
const IP_OFFSET: u16 = 0x1fff;

/// True if an IPv4 header without options is at `at`.
#[inline(always)]
fn plain_ipv4<P: Packet>(p: &P, at: usize) -> Option<bool> {
    Some(byte(p, at)? == 0x45)
}

impl Quoting for V4 {
    const ICMP: usize = L3 + IPV4_HLEN;
    const INNER: usize = Self::ICMP + ICMP_HLEN;
    const INNER_L4: usize = Self::INNER + IPV4_HLEN;
    const PSEUDO_HEADER: bool = false;

    #[inline(always)]
    fn slot(s: &mut Scratch) -> (&mut Error<u32>, &mut Checks) {
        (&mut s.e4, &mut s.checks)
    }

    #[inline(always)]
    fn parse<P: Packet>(p: &P, e: &mut Error<u32>) -> Option<()> {
        // Everything up to the quoted ports at once: one bounds check.
        if !p.holds(Self::INNER_L4 + 4) {
            return None;
        }
        if !plain_ipv4(p, L3)? || byte(p, L3 + IP_PROTO)? != IPPROTO_ICMP {
            return None;
        }
        // A fragment of an error is not whole: the node reassembles it if
        // it is for the node.
        let frag_off: u16 = p.read(L3 + IP_FRAG_OFF)?;
        if u16::from_be(frag_off) & IP_MF_OFFSET != 0 {
            return None;
        }
        let kind = byte(p, Self::ICMP)?;
        if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
            return None;
        }
        // A later fragment's quote holds no ports.
        let frag_off: u16 = p.read(Self::INNER + IP_FRAG_OFF)?;
        if !plain_ipv4(p, Self::INNER)? || u16::from_be(frag_off) & IP_OFFSET != 0 {
            return None;
        }
        let total: u16 = p.read(L3 + IP_TOT_LEN)?;
        e.end = L3 + u16::from_be(total) as usize;
        e.proto = byte(p, Self::INNER + IP_PROTO)?;
        e.outer_src = p.read(L3 + Self::SADDR)?;
        e.outer_dst = p.read(L3 + Self::DADDR)?;
        e.src = p.read(Self::INNER + Self::SADDR)?;
        e.dst = p.read(Self::INNER + Self::DADDR)?;
        quoted(p, e, Self::INNER_L4)
    }
}
