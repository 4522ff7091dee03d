//! How a conntrack entry is laid out, once: the family-independent
//! `Record` every reader decodes `ct4`/`ct6` entries into (garbage
//! collection, `inspect`, the tests), which of a family's two maps it is
//! in, and the clock its timestamps count.

use std::{hash::Hash, io};

use anyhow::Context;
use aya::Pod;
use proxy_common::{Addr6, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, names};
use serde::Serialize;

/// An address and port, as in the packet (network byte order).
pub type AddrPort<A> = (A, u16);

/// A conntrack entry, key and value. `A` is the family's address type
/// (`u32` for IPv4, `Addr6` for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<A> {
    pub src: AddrPort<A>,
    pub dst: AddrPort<A>,
    pub proto: u8,
    /// `CT_FORWARD`, `CT_REPLY` or `CT_EGRESS`.
    pub direction: u8,
    /// The address and port the entry rewrites to (an egress entry of a
    /// source-NATed flow: port 0 until egress picks one).
    pub nat: AddrPort<A>,
    /// `CT_*` bits.
    pub flags: u16,
    pub backend_id: u32,
    /// The service it was chosen for.
    pub service_id: u32,
    /// Coarse monotonic seconds of the entry's last packet (see `now`).
    pub last_seen: u32,
    /// `CT_STATE_*` of the packets seen in the entry's direction.
    pub state: u8,
    /// The flow counts as an open connection of its backend (forward
    /// entries only).
    pub active: bool,
}

/// A conntrack key type, with its value type and its family's maps.
pub trait CtKey: Pod + Eq + Hash {
    type Value: Pod;
    type Addr: Copy + Ord;
    /// The main map's pinned name, the overflow map's.
    const MAPS: (&'static str, &'static str);
    fn record(&self, value: &Self::Value) -> Record<Self::Addr>;
}

/// The families' keys and values have the same fields; only their address
/// types differ.
macro_rules! ct_key {
    ($key:ty, $value:ty, $addr:ty, $maps:expr) => {
        impl CtKey for $key {
            type Value = $value;
            type Addr = $addr;
            const MAPS: (&'static str, &'static str) = $maps;
            fn record(&self, v: &$value) -> Record<$addr> {
                Record {
                    src: (self.src_addr, self.src_port),
                    dst: (self.dst_addr, self.dst_port),
                    proto: self.proto,
                    direction: self.direction,
                    nat: (v.nat_addr, v.nat_port),
                    flags: v.flags,
                    backend_id: v.backend_id,
                    service_id: v.service_id,
                    last_seen: v.last_seen,
                    state: v.state,
                    active: v.active != 0,
                }
            }
        }
    };
}

ct_key!(Ct4Key, Ct4Entry, u32, (names::CONNTRACK4, names::OVERFLOW4));
ct_key!(
    Ct6Key,
    Ct6Entry,
    Addr6,
    (names::CONNTRACK6, names::OVERFLOW6)
);

/// Which of its family's two conntrack maps an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// `ct4`/`ct6`.
    Main,
    /// `ct4_overflow`/`ct6_overflow`: flows that found the main map full.
    Overflow,
}

impl Table {
    /// As in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Table::Main => "main",
            Table::Overflow => "overflow",
        }
    }

    /// The map of this table for keys `K`.
    pub fn map_name<K: CtKey>(self) -> &'static str {
        match self {
            Table::Main => K::MAPS.0,
            Table::Overflow => K::MAPS.1,
        }
    }
}

/// Coarse monotonic seconds, the clock the datapath stamps entries with
/// (`bpf_ktime_get_coarse_ns`). The agent must not run in a time namespace
/// with a monotonic offset, or its seconds would not be the kernel's.
pub fn now() -> anyhow::Result<u32> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("clock_gettime(CLOCK_MONOTONIC_COARSE)");
    }
    // As the datapath does: the low 32 bits of the seconds.
    Ok(ts.tv_sec as u32)
}
