//! IPv4 and IPv6 behind one interface, so that service lookup, conntrack,
//! source NAT, affinity and source ranges are written once: each family
//! has its own maps (lb4_* / lb6_*), keys and values.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    Addr6, Affinity4Key, Affinity6Key, AffinityEntry, Backend4, Backend6, Ct4Entry, Ct4Key,
    Ct6Entry, Ct6Key, Frontend4, Frontend6, MemberKey, NodeConfig, Service, SourceRange4,
    SourceRange6,
};

use crate::maps::{
    AFFINITY4, AFFINITY6, BACKENDS4, BACKENDS6, CONNTRACK4, CONNTRACK6, MEMBERS, MEMBERS6,
    SERVICES4, SERVICES6, SOURCE_RANGES4, SOURCE_RANGES6,
};

/// A backend as the datapath uses it: where to send the flow.
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub addr: A,
    pub port: u16,
}

/// A conntrack value, family-independent.
#[derive(Clone, Copy)]
pub struct Entry<A> {
    pub addr: A,
    pub port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// Coarse seconds of the entry's last packet.
    pub last_seen: u32,
}

pub trait Family {
    type Addr: Copy + PartialEq;
    type CtKey: Copy;

    fn service(addr: Self::Addr, port: u16, proto: u8) -> Option<Service>;
    /// The backend a slot's id names.
    fn backend(id: u32) -> Option<Target<Self::Addr>>;
    /// The backend as a member of the service.
    fn member(key: MemberKey) -> Option<Target<Self::Addr>>;

    fn ct_key(
        src: Self::Addr,
        sport: u16,
        dst: Self::Addr,
        dport: u16,
        proto: u8,
        direction: u8,
    ) -> Self::CtKey;
    /// The entry as it was; with `touch`, also marks it used now (the
    /// clock is read only for an entry that exists).
    fn ct_get(key: Self::CtKey, touch: bool) -> Option<Entry<Self::Addr>>;
    fn ct_insert(key: Self::CtKey, entry: Entry<Self::Addr>, flags: u64) -> bool;
    fn ct_remove(key: Self::CtKey);

    fn affinity_get(service_id: u32, client: Self::Addr) -> Option<*mut AffinityEntry>;
    fn affinity_insert(service_id: u32, client: Self::Addr, entry: AffinityEntry);

    /// True if `client` lies in one of the service's source ranges.
    fn admits(service_id: u32, client: Self::Addr) -> bool;
    /// The node address source NAT uses, if one is known.
    fn snat_addr(config: &NodeConfig) -> Option<Self::Addr>;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    type CtKey = Ct4Key;

    #[inline(always)]
    fn service(addr: u32, port: u16, proto: u8) -> Option<Service> {
        let key = Frontend4 {
            addr,
            port,
            proto,
            _pad: 0,
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
        MEMBERS.get_ptr(key).map(|b| target4(unsafe { &*b }))
    }

    #[inline(always)]
    fn ct_key(src: u32, sport: u16, dst: u32, dport: u16, proto: u8, direction: u8) -> Ct4Key {
        Ct4Key {
            src_addr: src,
            dst_addr: dst,
            src_port: sport,
            dst_port: dport,
            proto,
            direction,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn ct_get(key: Ct4Key, touch: bool) -> Option<Entry<u32>> {
        let ptr = CONNTRACK4.get_ptr_mut(key)?;
        // SAFETY: a copy out of a live map value.
        let e = unsafe { *ptr };
        if touch {
            let now = crate::ct::now();
            if now != e.last_seen {
                // SAFETY: a live map value; racing CPUs store the same second.
                unsafe { (*ptr).last_seen = now };
            }
        }
        Some(Entry {
            addr: e.nat_addr,
            port: e.nat_port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
        })
    }

    #[inline(always)]
    fn ct_insert(key: Ct4Key, e: Entry<u32>, flags: u64) -> bool {
        let value = Ct4Entry {
            nat_addr: e.addr,
            nat_port: e.port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
        };
        CONNTRACK4.insert(key, value, flags).is_ok()
    }

    #[inline(always)]
    fn ct_remove(key: Ct4Key) {
        let _ = CONNTRACK4.remove(key);
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
    }
}

#[inline(always)]
fn target6(b: &Backend6) -> Target<Addr6> {
    Target {
        addr: b.addr,
        port: b.port,
    }
}

impl Family for V6 {
    type Addr = Addr6;
    type CtKey = Ct6Key;

    #[inline(always)]
    fn service(addr: Addr6, port: u16, proto: u8) -> Option<Service> {
        let key = Frontend6 {
            addr,
            port,
            proto,
            _pad: 0,
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
    fn ct_key(src: Addr6, sport: u16, dst: Addr6, dport: u16, proto: u8, direction: u8) -> Ct6Key {
        Ct6Key {
            src_addr: src,
            dst_addr: dst,
            src_port: sport,
            dst_port: dport,
            proto,
            direction,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn ct_get(key: Ct6Key, touch: bool) -> Option<Entry<Addr6>> {
        let ptr = CONNTRACK6.get_ptr_mut(key)?;
        // SAFETY: a copy out of a live map value.
        let e = unsafe { *ptr };
        if touch {
            let now = crate::ct::now();
            if now != e.last_seen {
                // SAFETY: a live map value; racing CPUs store the same second.
                unsafe { (*ptr).last_seen = now };
            }
        }
        Some(Entry {
            addr: e.nat_addr,
            port: e.nat_port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
        })
    }

    #[inline(always)]
    fn ct_insert(key: Ct6Key, e: Entry<Addr6>, flags: u64) -> bool {
        let value = Ct6Entry {
            nat_addr: e.addr,
            nat_port: e.port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
        };
        CONNTRACK6.insert(key, value, flags).is_ok()
    }

    #[inline(always)]
    fn ct_remove(key: Ct6Key) {
        let _ = CONNTRACK6.remove(key);
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
