//! IPv4 and IPv6 behind one interface, so that service lookup, conntrack,
//! source NAT, affinity and source ranges are written once: each family
//! has its own maps (lb4_* / lb6_*), keys and values.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    Addr6, Affinity4Key, Affinity6Key, AffinityEntry, Backend4, Backend6, Ct4Key, Ct6Key,
    Frontend4, Frontend6, MemberKey, NodeConfig, Service, SourceRange4, SourceRange6,
};

use crate::{
    ctmap::{self, Ct4, Ct6, CtMaps, Entry, Table},
    hash::AddrHash,
    maps::{
        AFFINITY4, AFFINITY6, BACKENDS4, BACKENDS6, MEMBERS4, MEMBERS6, SERVICES4, SERVICES6,
        SOURCE_RANGES4, SOURCE_RANGES6,
    },
};

/// A backend as the datapath uses it: where to send the flow.
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub addr: A,
    pub port: u16,
    /// `BACKEND_*` bits (of a member).
    pub flags: u8,
}

pub trait Family {
    type Addr: Copy + PartialEq + AddrHash;
    type CtKey: Copy;
    /// The family's conntrack maps.
    type Ct: CtMaps<Addr = Self::Addr, Key = Self::CtKey>;

    /// The entry of a frontend for clients of `scope` (`SCOPE_*`).
    fn service(addr: Self::Addr, port: u16, proto: u8, scope: u8) -> Option<Service>;
    /// The backend a slot's id names.
    fn backend(id: u32) -> Option<Target<Self::Addr>>;
    /// The backend as a member of the service.
    fn member(key: MemberKey) -> Option<Target<Self::Addr>>;

    #[inline(always)]
    fn ct_key(
        src: Self::Addr,
        sport: u16,
        dst: Self::Addr,
        dport: u16,
        proto: u8,
        direction: u8,
    ) -> Self::CtKey {
        Self::Ct::key(src, sport, dst, dport, proto, direction)
    }
    /// See `ctmap::get`.
    #[inline(always)]
    fn ct_get(key: Self::CtKey, seen: Option<u8>) -> Option<Entry<Self::Addr>> {
        ctmap::get::<Self::Ct>(key, seen)
    }
    /// See `ctmap::insert`.
    #[inline(always)]
    fn ct_insert(
        table: Table,
        key: Self::CtKey,
        entry: Entry<Self::Addr>,
        flags: u64,
    ) -> Result<(), i64> {
        ctmap::insert::<Self::Ct>(table, key, entry, flags)
    }
    /// See `ctmap::remove`.
    #[inline(always)]
    fn ct_remove(key: Self::CtKey) {
        ctmap::remove::<Self::Ct>(key)
    }
    /// See `ctmap::table_of`.
    #[inline(always)]
    fn ct_table(key: Self::CtKey) -> Table {
        ctmap::table_of::<Self::Ct>(key)
    }
    /// See `ctmap::set_port`.
    #[inline(always)]
    fn ct_set_port(key: Self::CtKey, port: u16) {
        ctmap::set_port::<Self::Ct>(key, port)
    }
    /// See `ctmap::active`.
    #[inline(always)]
    fn ct_active(key: Self::CtKey) -> Option<*mut u32> {
        ctmap::active::<Self::Ct>(key)
    }

    fn affinity_get(service_id: u32, client: Self::Addr) -> Option<*mut AffinityEntry>;
    fn affinity_insert(service_id: u32, client: Self::Addr, entry: AffinityEntry);

    /// True if `client` lies in one of the service's source ranges.
    fn admits(service_id: u32, client: Self::Addr) -> bool;
    /// The node address source NAT uses, if one is known.
    fn snat_addr(config: &NodeConfig) -> Option<Self::Addr>;
}

/// The backend `backend_id` as a member of service `service_id`.
#[inline(always)]
pub fn member<F: Family>(service_id: u32, backend_id: u32) -> Option<Target<F::Addr>> {
    F::member(MemberKey {
        service_id,
        backend_id,
    })
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    type CtKey = Ct4Key;
    type Ct = Ct4;

    #[inline(always)]
    fn service(addr: u32, port: u16, proto: u8, scope: u8) -> Option<Service> {
        let key = Frontend4 {
            addr,
            port,
            proto,
            scope,
        };
        // SAFETY: a copy out of a live map value.
        SERVICES4.get_ptr(key).map(|s| unsafe { *s })
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Target<u32>> {
        // SAFETY: a copy out of a live map value.
        BACKENDS4.get_ptr(id).map(|b| target4(unsafe { &*b }))
    }

    #[inline(always)]
    fn member(key: MemberKey) -> Option<Target<u32>> {
        // SAFETY: a copy out of a live map value.
        MEMBERS4.get_ptr(key).map(|b| target4(unsafe { &*b }))
    }

    #[inline(always)]
    fn affinity_get(service_id: u32, client: u32) -> Option<*mut AffinityEntry> {
        AFFINITY4.get_ptr_mut(Affinity4Key {
            service_id,
            client_addr: client,
        })
    }

    #[inline(always)]
    fn affinity_insert(service_id: u32, client: u32, entry: AffinityEntry) {
        let key = Affinity4Key {
            service_id,
            client_addr: client,
        };
        // A failed write only costs this client its affinity.
        let _ = AFFINITY4.insert(key, entry, 0);
    }

    #[inline(always)]
    fn admits(service_id: u32, client: u32) -> bool {
        let data = SourceRange4 {
            service_id_be: service_id.to_be(),
            addr: client,
        };
        SOURCE_RANGES4.get(&Key::new(64, data)).is_some()
    }

    #[inline(always)]
    fn snat_addr(config: &NodeConfig) -> Option<u32> {
        (config.snat_addr4 != 0).then_some(config.snat_addr4)
    }
}

#[inline(always)]
fn target4(b: &Backend4) -> Target<u32> {
    Target {
        addr: b.addr,
        port: b.port,
        flags: b.flags,
    }
}

#[inline(always)]
fn target6(b: &Backend6) -> Target<Addr6> {
    Target {
        addr: b.addr,
        port: b.port,
        flags: b.flags,
    }
}

impl Family for V6 {
    type Addr = Addr6;
    type CtKey = Ct6Key;
    type Ct = Ct6;

    #[inline(always)]
    fn service(addr: Addr6, port: u16, proto: u8, scope: u8) -> Option<Service> {
        let key = Frontend6 {
            addr,
            port,
            proto,
            scope,
        };
        // SAFETY: a copy out of a live map value.
        SERVICES6.get_ptr(key).map(|s| unsafe { *s })
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Target<Addr6>> {
        // SAFETY: a copy out of a live map value.
        BACKENDS6.get_ptr(id).map(|b| target6(unsafe { &*b }))
    }

    #[inline(always)]
    fn member(key: MemberKey) -> Option<Target<Addr6>> {
        // SAFETY: a copy out of a live map value.
        MEMBERS6.get_ptr(key).map(|b| target6(unsafe { &*b }))
    }

    #[inline(always)]
    fn affinity_get(service_id: u32, client: Addr6) -> Option<*mut AffinityEntry> {
        AFFINITY6.get_ptr_mut(Affinity6Key {
            service_id,
            client_addr: client,
        })
    }

    #[inline(always)]
    fn affinity_insert(service_id: u32, client: Addr6, entry: AffinityEntry) {
        let key = Affinity6Key {
            service_id,
            client_addr: client,
        };
        // A failed write only costs this client its affinity.
        let _ = AFFINITY6.insert(key, entry, 0);
    }

    #[inline(always)]
    fn admits(service_id: u32, client: Addr6) -> bool {
        let data = SourceRange6 {
            service_id_be: service_id.to_be(),
            addr: client,
        };
        SOURCE_RANGES6.get(&Key::new(160, data)).is_some()
    }

    #[inline(always)]
    fn snat_addr(config: &NodeConfig) -> Option<Addr6> {
        (config.snat_addr6 != [0; 4]).then_some(config.snat_addr6)
    }
}
