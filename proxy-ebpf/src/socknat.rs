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

/// The map access of one family: the two families' maps differ only in
/// their key and value types.
macro_rules! sock_family {
    ($family:ty, $addr:ty, $key:ident, $value:ident, $map:ident, $client:ident) => {
        impl From<SockKey<$addr>> for $key {
            #[inline(always)]
            fn from(key: SockKey<$addr>) -> Self {
                $key {
                    cookie: key.cookie,
                    addr: key.addr,
                    port: key.port,
                    proto: key.proto,
                    direction: key.direction,
                    ..Default::default()
                }
            }
        }

        impl SockFamily for $family {
            #[inline(always)]
            fn sock_get(key: SockKey<$addr>) -> Option<Translation<$addr>> {
                // SAFETY: a copy out of a live map value.
                let value = unsafe { *$map.get_ptr($key::from(key))? };
                Some(Translation {
                    netns_cookie: value.netns_cookie,
                    addr: value.addr,
                    port: value.port,
                    backend_id: value.backend_id,
                    service_id: value.service_id,
                })
            }

            #[inline(always)]
            fn sock_insert(key: SockKey<$addr>, value: Translation<$addr>) -> Result<(), i32> {
                let value = $value {
                    netns_cookie: value.netns_cookie,
                    addr: value.addr,
                    port: value.port,
                    backend_id: value.backend_id,
                    service_id: value.service_id,
                    ..Default::default()
                };
                $map.insert($key::from(key), value, 0)
            }

            #[inline(always)]
            fn netns_client(netns_cookie: u64) -> $addr {
                $client(netns_cookie)
            }
        }
    };
}

sock_family!(V4, u32, SockNat4Key, SockNat4, SOCK_NAT4, netns_client_v4);
sock_family!(V6, Addr6, SockNat6Key, SockNat6, SOCK_NAT6, netns_client_v6);

/// The first octet (the lowest byte in memory) stays 0.
#[inline(always)]
fn netns_client_v4(netns_cookie: u64) -> u32 {
    crate::hash::mix(netns_cookie as u32 ^ (netns_cookie >> 32) as u32) << 8
}

#[inline(always)]
fn netns_client_v6(netns_cookie: u64) -> Addr6 {
    [0, 0, netns_cookie as u32, (netns_cookie >> 32) as u32]
}
