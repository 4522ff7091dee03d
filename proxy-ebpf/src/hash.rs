//! Flow hashing for backend choice without per-flow state: Maglev, source
//! hash, and flows that conntrack could not keep. Every packet of a flow,
//! on any CPU, hashes the same. Hashes are keyed (`NodeConfig`'s keys): a
//! client that does not know the key cannot choose its ports or addresses
//! so as to pick its backend.

use core::marker::PhantomData;

use crate::{family::Family, parse::Flow};

/// A 64-bit hash key.
pub type Key = [u32; 2];

/// What backend choice by hash reads of a flow: a packet's, or a socket's.
pub trait Hashed {
    /// Spreads a client's flows over the backends (Maglev).
    fn five_tuple(&self, key: Key) -> u32;
    /// The same for every flow of a client (source hash).
    fn source(&self, key: Key) -> u32;
}

/// A packet's flow, hashed only if the service's algorithm asks.
pub struct OfFlow<'a, F: Family> {
    flow: &'a Flow<F::Addr>,
    family: PhantomData<F>,
}

impl<'a, F: Family> OfFlow<'a, F> {
    #[inline(always)]
    pub fn new(flow: &'a Flow<F::Addr>) -> Self {
        OfFlow {
            flow,
            family: PhantomData,
        }
    }
}

impl<F: Family> Hashed for OfFlow<'_, F> {
    #[inline(always)]
    fn five_tuple(&self, key: Key) -> u32 {
        five_tuple::<F>(self.flow, key)
    }

    #[inline(always)]
    fn source(&self, key: Key) -> u32 {
        source::<F>(self.flow, key)
    }
}

/// MurmurHash3's 32-bit finalizer: every input bit affects every output bit.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `value` under `key`: each half of the key enters before a full mix, so
/// that without the key the output tells nothing of how to change the input
/// for another one.
#[inline(always)]
pub fn keyed(value: u32, key: Key) -> u32 {
    mix(mix(value ^ key[0]) ^ key[1])
}

/// The flow's 5-tuple.
#[inline(always)]
pub fn five_tuple<F: Family>(flow: &Flow<F::Addr>, key: Key) -> u32 {
    let addrs = F::addr_hash(flow.saddr) ^ F::addr_hash(flow.daddr).rotate_left(16);
    let ports = ((flow.sport as u32) << 16) | flow.dport as u32;
    keyed(mix(addrs ^ ports) ^ flow.proto as u32, key)
}

/// The client address only.
#[inline(always)]
pub fn source<F: Family>(flow: &Flow<F::Addr>, key: Key) -> u32 {
    keyed(F::addr_hash(flow.saddr), key)
}
