//! The socket hooks' per-family state: a socket's translations in
//! `sock4_nat`/`sock6_nat`, and the client identity affinity uses.

use proxy_common::{Addr6, SockNat4, SockNat4Key, SockNat6, SockNat6Key};

use crate::{
    family::{Family, V4, V6},
    maps::{SOCK_NAT4, SOCK_NAT6},
};

/// One translation of one socket, family-independent.
#[derive(Clone, Copy)]
pub struct Translation<A> {
    /// The socket's network namespace (bpf_get_netns_cookie).
    pub netns_cookie: u64,
    /// The backend (forward) or the frontend (reverse).
    pub addr: A,
    pub port: u16,
    pub backend_id: u32,
    pub service_id: u32,
}

/// Where a socket's translation is kept.
#[derive(Clone, Copy)]
pub struct SockKey<A> {
    pub cookie: u64,
    /// The frontend (forward) or the backend (reverse).
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    /// `SOCK_FORWARD` or `SOCK_REVERSE`.
    pub direction: u8,
}

pub trait SockFamily: Family {
    fn sock_get(key: SockKey<Self::Addr>) -> Option<Translation<Self::Addr>>;
    fn sock_insert(key: SockKey<Self::Addr>, value: Translation<Self::Addr>) -> Result<(), i32>;
    /// The client a socket's network namespace stands for, for session
    /// affinity and source hashing: a hook runs before the socket has a
    /// source address, but every socket of a pod shares its namespace, as
    /// it shares its address. The value lies in a range no packet carries
    /// as its source (0.0.0.0/8, ::/64), so it cannot meet a real
    /// client's entry.
    fn netns_client(netns_cookie: u64) -> Self::Addr;
}

impl SockFamily for V4 {
    #[inline(always)]
    fn sock_get(key: SockKey<u32>) -> Option<Translation<u32>> {
        let key = SockNat4Key {
            cookie: key.cookie,
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            direction: key.direction,
        };
        // SAFETY: a copy out of a live map value.
        let value = unsafe { *SOCK_NAT4.get_ptr(key)? };
        Some(Translation {
            netns_cookie: value.netns_cookie,
            addr: value.addr,
            port: value.port,
            backend_id: value.backend_id,
            service_id: value.service_id,
        })
    }

    #[inline(always)]
    fn sock_insert(key: SockKey<u32>, value: Translation<u32>) -> Result<(), i32> {
        let key = SockNat4Key {
            cookie: key.cookie,
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            direction: key.direction,
        };
        let value = SockNat4 {
            netns_cookie: value.netns_cookie,
            addr: value.addr,
            port: value.port,
            _pad: 0,
            backend_id: value.backend_id,
            service_id: value.service_id,
        };
        SOCK_NAT4.insert(key, value, 0)
    }

    #[inline(always)]
    fn netns_client(netns_cookie: u64) -> u32 {
        // The first octet (the lowest byte in memory) stays 0.
        (crate::hash::mix(netns_cookie as u32 ^ (netns_cookie >> 32) as u32)) << 8
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn sock_get(key: SockKey<Addr6>) -> Option<Translation<Addr6>> {
        let key = SockNat6Key {
            cookie: key.cookie,
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            direction: key.direction,
            _pad: 0,
        };
        // SAFETY: a copy out of a live map value.
        let value = unsafe { *SOCK_NAT6.get_ptr(key)? };
        Some(Translation {
            netns_cookie: value.netns_cookie,
            addr: value.addr,
            port: value.port,
            backend_id: value.backend_id,
            service_id: value.service_id,
        })
    }

    #[inline(always)]
    fn sock_insert(key: SockKey<Addr6>, value: Translation<Addr6>) -> Result<(), i32> {
        let key = SockNat6Key {
            cookie: key.cookie,
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            direction: key.direction,
            _pad: 0,
        };
        let value = SockNat6 {
            netns_cookie: value.netns_cookie,
            addr: value.addr,
            port: value.port,
            _pad: 0,
            backend_id: value.backend_id,
            service_id: value.service_id,
            _pad2: 0,
        };
        SOCK_NAT6.insert(key, value, 0)
    }

    #[inline(always)]
    fn netns_client(netns_cookie: u64) -> Addr6 {
        [0, 0, netns_cookie as u32, (netns_cookie >> 32) as u32]
    }
}
