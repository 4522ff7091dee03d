//! How a conntrack entry is laid out, once: the family-independent
//! `Record` every reader decodes conntrack entries into (garbage
//! collection, `inspect`, the tests), which of a family's two maps it is
//! in, and the clock its timestamps count.

use std::{io, net::SocketAddr};

use anyhow::Context;
use proxy_common::{Addr6, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, names};
use serde::Serialize;

use super::{
    ctlines::LineKey,
    keys::{socket4, socket6},
};

/// An address and port, as in the packet (network byte order).
pub type AddrPort<A> = (A, u16);

/// A conntrack entry, key and value. `E` holds an address and port: as the
/// map has them (`AddrPort<u32>` for IPv4, `AddrPort<Addr6>` for IPv6), or
/// as a `SocketAddr` once decoded for reading (`CtKey::decode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<E> {
    pub src: E,
    pub dst: E,
    pub proto: u8,
    /// `CT_FORWARD`, `CT_REPLY` or `CT_SOCKET`.
    pub direction: u8,
    /// The address and port the entry rewrites to (the outward entry of a
    /// source-NATed flow: port 0 until egress picks one).
    pub nat: E,
    /// `CT_*` bits.
    pub flags: u16,
    pub backend_id: u32,
    /// The service it was chosen for.
    pub service_id: u32,
    /// Coarse monotonic seconds of the entry's last packet (see `now`).
    pub last_seen: u32,
    /// `CT_STATE_*` of the packets seen in the entry's direction (of a
    /// `CT_SOCKET` entry: the client's).
    pub state: u8,
    /// `CT_SOCKET` entries: `CT_STATE_*` of the backend's packets (0
    /// otherwise).
    pub reply_state: u8,
    /// Source-NATed `CT_SOCKET` entries: the node port (host order) the
    /// client's packets leave with, 0 until picked (0 otherwise).
    pub node_port: u16,
    /// The flow counts as an open connection of its backend (forward and
    /// socket entries only).
    pub active: bool,
}

/// A conntrack entry with addresses and ports as its family's map holds them.
pub type MapRecord<A> = Record<AddrPort<A>>;

impl<E: Copy> Record<E> {
    /// The same entry with each address and port made an `F` by `f`.
    pub fn map_endpoints<F>(&self, f: impl Fn(E) -> F) -> Record<F> {
        Record {
            src: f(self.src),
            dst: f(self.dst),
            proto: self.proto,
            direction: self.direction,
            nat: f(self.nat),
            flags: self.flags,
            backend_id: self.backend_id,
            service_id: self.service_id,
            last_seen: self.last_seen,
            state: self.state,
            reply_state: self.reply_state,
            node_port: self.node_port,
            active: self.active,
        }
    }
}

/// A conntrack key type, with its value type (`LineKey::Value`) and its
/// family's tables.
pub trait CtKey: LineKey {
    type Addr: Copy + Ord;
    /// The overflow map's pinned name.
    const OVERFLOW: &'static str;
    /// The hash map a datapath pinned before the lines kept entries in.
    const LEGACY: &'static str;
    fn record(&self, value: &Self::Value) -> MapRecord<Self::Addr>;
    /// `CT_FORWARD`, `CT_REPLY` or `CT_SOCKET`.
    fn direction(&self) -> u8;
    /// The same key with another direction.
    fn with_direction(&self, direction: u8) -> Self;
    /// The same value with other flags.
    fn with_flags(value: &Self::Value, flags: u16) -> Self::Value;
    /// The value's flags.
    fn flags(value: &Self::Value) -> u16;
    /// An address and port of this family as a socket address (host order).
    fn socket(at: AddrPort<Self::Addr>) -> SocketAddr;

    /// The entry with socket addresses, as people read it.
    fn decode(&self, value: &Self::Value) -> Record<SocketAddr> {
        self.record(value).map_endpoints(Self::socket)
    }
}

/// The families' keys and values have the same fields; only their address
/// types differ.
macro_rules! ct_key {
    ($key:ty, $value:ty, $addr:ty, $maps:expr, $legacy:expr, $socket:expr) => {
        impl CtKey for $key {
            type Addr = $addr;
            const OVERFLOW: &'static str = $maps;
            const LEGACY: &'static str = $legacy;
            fn socket(at: AddrPort<$addr>) -> SocketAddr {
                $socket(at)
            }
            fn direction(&self) -> u8 {
                self.direction
            }
            fn with_direction(&self, direction: u8) -> Self {
                Self { direction, ..*self }
            }
            fn flags(v: &$value) -> u16 {
                v.flags
            }
            fn with_flags(v: &$value, flags: u16) -> $value {
                let mut v = *v;
                v.flags = flags;
                v
            }
            fn record(&self, v: &$value) -> MapRecord<$addr> {
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
                    reply_state: v.reply_state,
                    node_port: u16::from_be(v.node_port),
                    active: v.active != 0,
                }
            }
        }
    };
}

ct_key!(
    Ct4Key,
    Ct4Entry,
    u32,
    names::OVERFLOW4,
    names::LEGACY_CONNTRACK4,
    |(addr, port)| socket4(addr, port)
);
ct_key!(
    Ct6Key,
    Ct6Entry,
    Addr6,
    names::OVERFLOW6,
    names::LEGACY_CONNTRACK6,
    |(addr, port)| socket6(&addr, port)
);

/// Which of its family's two conntrack maps an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// `ct4_table`/`ct6_table`.
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
            Table::Main => K::GROUPS,
            Table::Overflow => K::OVERFLOW,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{CT_SOCKET, CT_STATE_ESTABLISHED, CT_STATE_FIN, IPPROTO_TCP};

    /// A socket entry: the client in the key, the backend in the value,
    /// a state for each side.
    #[test]
    fn a_record_carries_both_sides_states_through_decoding() {
        let key = Ct4Key {
            src_addr: u32::from_be_bytes([10, 0, 1, 2]).to_be(),
            src_port: 40_000u16.to_be(),
            proto: IPPROTO_TCP,
            direction: CT_SOCKET,
            ..Ct4Key::default()
        };
        let value = Ct4Entry {
            nat_addr: u32::from_be_bytes([10, 1, 1, 2]).to_be(),
            nat_port: 8080u16.to_be(),
            state: CT_STATE_FIN,
            reply_state: CT_STATE_ESTABLISHED,
            node_port: 61_000u16.to_be(),
            active: 1,
            ..Ct4Entry::default()
        };
        assert_eq!(key.direction(), CT_SOCKET);
        let record = key.record(&value);
        assert_eq!(
            (record.state, record.reply_state, record.active),
            (CT_STATE_FIN, CT_STATE_ESTABLISHED, true)
        );
        let decoded = key.decode(&value);
        assert_eq!(decoded.reply_state, CT_STATE_ESTABLISHED);
        assert_eq!(decoded.node_port, 61_000, "host order");
        assert_eq!(decoded.src.to_string(), "10.0.1.2:40000");
        assert_eq!(decoded.nat.to_string(), "10.1.1.2:8080");
        assert_eq!(decoded.dst.to_string(), "0.0.0.0:0");
    }
}
