//! IP fragments of translated flows: the first fragment's verdict, kept
//! for the later ones (`frag4`, `frag6`).

use super::Addr6;

/// `FragKey*::hook`: the hook that saw the datagram. Its translation at
/// ingress and at egress are different verdicts on different headers.
pub const FRAG_INGRESS: u8 = 0;
pub const FRAG_EGRESS: u8 = 1;

/// `Frag*Entry::action`: which address of the datagram's first fragment
/// was rewritten, and so of every later one: the source (or destination)
/// becomes the entry's address. The port is the first fragment's new port,
/// kept for inspection only (later fragments carry no ports).
pub const FRAG_SOURCE: u8 = 1;
pub const FRAG_DESTINATION: u8 = 2;

/// Key of `frag4`: one IPv4 datagram as a hook sees it (before its rewrite).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// The IP identification, network byte order.
    pub id: u16,
    pub proto: u8,
    /// `FRAG_INGRESS` or `FRAG_EGRESS`.
    pub hook: u8,
}

/// Value of `frag4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag4Entry {
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// `FRAG_*`.
    pub action: u8,
    pub _pad: u8,
}

/// Key of `frag6`: one IPv6 datagram, by its Fragment header's 32-bit
/// identification (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag6Key {
    pub src_addr: Addr6,
    pub dst_addr: Addr6,
    pub id: u32,
    pub proto: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
}

/// Value of `frag6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frag6Entry {
    pub addr: Addr6,
    pub port: u16,
    pub action: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for Frag4Key {}
    unsafe impl aya::Pod for Frag4Entry {}
    unsafe impl aya::Pod for Frag6Key {}
    unsafe impl aya::Pod for Frag6Entry {}
}
