//! Socket-level load balancing: the socket hooks' translations
//! (`sock4_nat`, `sock6_nat`).

use super::Addr6;

/// Key of `sock4_nat`: one socket (its cookie) and an address it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockNat4Key {
    /// bpf_get_socket_cookie(): unique per socket for the kernel's uptime.
    pub cookie: u64,
    /// The frontend (`SOCK_FORWARD`) or the backend (`SOCK_REVERSE`).
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

/// A socket's unconnected UDP datagrams to a frontend: which backend.
pub const SOCK_FORWARD: u8 = 0;
/// What a socket connected to a backend through the hooks sees as its
/// peer: the frontend.
pub const SOCK_REVERSE: u8 = 1;

/// Value of `sock4_nat`: the other side of the translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockNat4 {
    /// bpf_get_netns_cookie() of the socket's network namespace: where to
    /// look for it when its backend leaves.
    pub netns_cookie: u64,
    /// The backend (`SOCK_FORWARD`) or the frontend (`SOCK_REVERSE`).
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub service_id: u32,
}

/// Key of `sock6_nat`, as `SockNat4Key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockNat6Key {
    pub cookie: u64,
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: u32,
}

/// Value of `sock6_nat`, as `SockNat4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockNat6 {
    pub netns_cookie: u64,
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub _pad2: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for SockNat4Key {}
    unsafe impl aya::Pod for SockNat4 {}
    unsafe impl aya::Pod for SockNat6Key {}
    unsafe impl aya::Pod for SockNat6 {}
}
