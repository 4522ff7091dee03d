//! What the pinned maps hold, decoded from their byte layout (network byte
//! order, per-family structs) into addresses and ports, but not interpreted
//! yet. The reports are built from these by pure functions, and unit tests
//! build them by hand.

use std::{collections::BTreeMap, net::SocketAddr};

use proxy_common::{
    Backend4, Backend6, Connections, Frontend4, Frontend6, Service, ServiceStats, SlotKey,
};

use crate::datapath::{
    conntrack::{Record, Table},
    keys::{socket4, socket6},
};

/// An address, port and IP protocol number, as a map key or value holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub proto: u8,
}

/// The frontends and backends of both families hold an address, a port
/// and a protocol alike; only how the address reads differs.
macro_rules! endpoint_from {
    (|$v:ident| $addr:expr, $($ty:ty),+) => {$(
        impl From<&$ty> for Endpoint {
            fn from($v: &$ty) -> Self {
                Endpoint {
                    addr: $addr,
                    proto: $v.proto,
                }
            }
        }
    )+};
}

endpoint_from!(|v| socket4(v.addr, v.port), Frontend4, Backend4);
endpoint_from!(|v| socket6(&v.addr, v.port), Frontend6, Backend6);

/// One entry of `lb4_services` or `lb6_services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub frontend: Endpoint,
    /// `SCOPE_*`: which clients the entry is for.
    pub scope: u8,
    pub entry: Service,
}

/// One entry of `lb4_members` or `lb6_members`: a backend as a service uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Endpoint,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

/// A backend's counters. `None`: the map is not pinned (a datapath older
/// than the counter) or has no index for this backend id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendActivity {
    /// `lb_be_flows`, summed over CPUs.
    pub flows: Option<u64>,
    /// `lb_conns`.
    pub connections: Option<Connections>,
    /// `lb_reaped`.
    pub reaped: Option<u32>,
}

/// The load-balancing maps of both families: what `services` and
/// `backends` show.
#[derive(Clone, Debug, Default)]
pub struct LbRecords {
    pub services: Vec<ServiceRecord>,
    /// `lb_slots`: (service id, slot) -> backend id.
    pub slots: BTreeMap<SlotKey, u32>,
    /// `lb4_backends_v2` and `lb6_backends_v2`: backend id -> address.
    pub backends: BTreeMap<u32, Endpoint>,
    pub members: Vec<MemberRecord>,
    /// `lb_svc_stats` of each service id, summed over CPUs, since `lb_stats_base`.
    pub service_stats: BTreeMap<u32, ServiceStats>,
    /// Of each backend id that appears in a backends, members or slots map.
    pub activity: BTreeMap<u32, BackendActivity>,
}

/// One entry of `ct4_table`, `ct6_table` or their overflow maps, and which
/// it is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtRecord {
    pub table: Table,
    pub entry: Record<SocketAddr>,
    /// A `CT_SOCKET` entry's frontend, as `lb4_rev_nat`/`lb6_rev_nat` name
    /// it at the entry's service id; None for other entries, and when the
    /// array has no frontend there (or is not pinned).
    pub frontend: Option<SocketAddr>,
}
