//! Flow hashing for backend choice without per-flow state: Maglev, source
//! hash, and flows that conntrack could not keep. Every packet of a flow,
//! on any CPU, hashes the same. Hashes are keyed (`NodeConfig`'s keys): a
//! client that does not know the key cannot choose its ports or addresses
//! so as to pick its backend.

use proxy_common::Addr6;

use crate::parse::Flow;

/// A 64-bit hash key.
pub type Key = [u32; 2];

/// What backend choice by hash reads of a flow: a packet's, or a socket's.
pub trait Hashed {
    /// Spreads a client's flows over the backends (Maglev).
    fn five_tuple(&self, key: Key) -> u32;
    /// The same for every flow of a client (source hash).
    fn source(&self, key: Key) -> u32;
}

/// An address (of either family) folded into 32 well-mixed bits, for flow
/// hashing.
pub trait AddrHash: Copy {
    fn addr_hash(self) -> u32;
}

impl AddrHash for u32 {
    #[inline(always)]
    fn addr_hash(self) -> u32 {
        mix(self)
    }
}

impl AddrHash for Addr6 {
    #[inline(always)]
    fn addr_hash(self) -> u32 {
        mix(mix(mix(mix(self[0]) ^ self[1]) ^ self[2]) ^ self[3])
    }
}

/// A packet's flow, hashed only if the service's algorithm asks.
pub struct OfFlow<'a, A> {
    flow: &'a Flow<A>,
}

impl<'a, A> OfFlow<'a, A> {
    #[inline(always)]
    pub fn new(flow: &'a Flow<A>) -> Self {
        OfFlow { flow }
    }
}

impl<A: AddrHash> Hashed for OfFlow<'_, A> {
    #[inline(always)]
    fn five_tuple(&self, key: Key) -> u32 {
        five_tuple(self.flow, key)
    }

    #[inline(always)]
    fn source(&self, key: Key) -> u32 {
        source(self.flow, key)
    }
}

pub use proxy_common::mix::fmix32 as mix;

/// `value` under `key`: each half of the key enters before a full mix, so
/// that without the key the output tells nothing of how to change the input
/// for another one.
#[inline(always)]
pub fn keyed(value: u32, key: Key) -> u32 {
    mix(mix(value ^ key[0]) ^ key[1])
}

/// The flow's 5-tuple.
#[inline(always)]
pub fn five_tuple<A: AddrHash>(flow: &Flow<A>, key: Key) -> u32 {
    let addrs = flow.saddr.addr_hash() ^ flow.daddr.addr_hash().rotate_left(16);
    let ports = ((flow.sport as u32) << 16) | flow.dport as u32;
    keyed(mix(addrs ^ ports) ^ flow.proto as u32, key)
}

/// The client address only.
#[inline(always)]
pub fn source<A: AddrHash>(flow: &Flow<A>, key: Key) -> u32 {
    keyed(flow.saddr.addr_hash(), key)
}
