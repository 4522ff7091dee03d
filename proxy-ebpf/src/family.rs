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
    AFFINITY4, AFFINITY6, BACKENDS4, BACKENDS6, CONNTRACK4, CONNTRACK6, CT_SCRATCH, CtScratch,
    MEMBERS, MEMBERS6, OVERFLOW4, OVERFLOW6, OVERFLOWED, SERVICES4, SERVICES6, SOURCE_RANGES4,
    SOURCE_RANGES6,
};

/// The conntrack map a new flow's entries go to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `ct4`/`ct6`: never evicted.
    Main,
    /// `ct4_overflow`/`ct6_overflow`, LRU: for flows that found `Main` full.
    Overflow,
}

/// True while the overflow maps may hold entries. Until a flow overflows,
/// a conntrack miss costs no second hash lookup.
#[inline(always)]
fn overflowed() -> bool {
    OVERFLOWED.get(0).is_some_and(|v| *v != 0)
}

/// Set before and after an overflow insert. The agent clears it once the
/// overflow maps are empty, then sets it back if it finds an entry after
/// all: whatever the interleaving, it ends set while an entry exists.
#[inline(always)]
fn mark_overflowed() {
    if let Some(v) = OVERFLOWED.get_ptr_mut(0) {
        // SAFETY: a live array value; read first so that the cache line is
        // written only on the first overflow.
        unsafe {
            if *v == 0 {
                *v = 1;
            }
        }
    }
}

/// Where conntrack keys and values are put together for the map helpers,
/// which take them by pointer: on the stack, every one of them would hold
/// its own slot, and together they outgrow BPF's 512 bytes.
#[inline(always)]
fn scratch() -> Option<&'static mut CtScratch> {
    // SAFETY: per-CPU, and only used between a write and the helper call
    // that reads it, with no other use in between.
    CT_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// A backend as the datapath uses it: where to send the flow.
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub addr: A,
    pub port: u16,
    /// `BACKEND_*` bits (of a member).
    pub flags: u8,
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
    /// `CT_STATE_*`, including the packet just seen.
    pub state: u8,
    /// Non-zero while the flow counts as an open connection.
    pub active: u32,
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
    /// The entry; with `seen` (a packet's TCP flags, 0 for other
    /// protocols), the entry also takes in that packet: its time (the clock
    /// is read only for an entry that exists) and state.
    fn ct_get(key: Self::CtKey, seen: Option<u8>) -> Option<Entry<Self::Addr>>;
    /// Writes the entry into `table`; the kernel's error code on failure.
    fn ct_insert(
        table: Table,
        key: Self::CtKey,
        entry: Entry<Self::Addr>,
        flags: u64,
    ) -> Result<(), i64>;
    /// Removes the key from whichever table has it.
    fn ct_remove(key: Self::CtKey);
    /// The entry's `active` field, for an atomic exchange. Only `Main`
    /// entries are ever active.
    fn ct_active(key: Self::CtKey) -> Option<*mut u32>;

    fn affinity_get(service_id: u32, client: Self::Addr) -> Option<*mut AffinityEntry>;
    fn affinity_insert(service_id: u32, client: Self::Addr, entry: AffinityEntry);

    /// True if `client` lies in one of the service's source ranges.
    fn admits(service_id: u32, client: Self::Addr) -> bool;
    /// The node address source NAT uses, if one is known.
    fn snat_addr(config: &NodeConfig) -> Option<Self::Addr>;
    /// The address folded into 32 well-mixed bits, for flow hashing.
    fn addr_hash(addr: Self::Addr) -> u32;
}

/// Takes a packet into an entry: refreshes its second (at most one write a
/// second) and its TCP state; returns the state after the packet.
#[inline(always)]
fn take_in(last_seen: *mut u32, state: *mut u8, proto: u8, tcp_flags: u8) -> u8 {
    let now = crate::ct::now();
    // SAFETY: both point into a live map value; a racing CPU stores the same
    // second, or a state that the next packet corrects.
    unsafe {
        let next = crate::ct::next_state(*state, proto, tcp_flags);
        if *last_seen != now || *state != next {
            *last_seen = now;
            *state = next;
        }
        next
    }
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
    fn ct_get(key: Ct4Key, seen: Option<u8>) -> Option<Entry<u32>> {
        let s = scratch()?;
        s.key4 = key;
        let ptr = (CONNTRACK4.get_ptr_mut(&s.key4))
            .or_else(|| overflowed().then(|| OVERFLOW4.get_ptr_mut(&s.key4))?)?;
        // SAFETY: a copy out of a live map value.
        let e = unsafe { *ptr };
        let state = match seen {
            // SAFETY: fields of a live map value.
            Some(tcp_flags) => unsafe {
                take_in(
                    &raw mut (*ptr).last_seen,
                    &raw mut (*ptr).state,
                    key.proto,
                    tcp_flags,
                )
            },
            None => e.state,
        };
        Some(Entry {
            addr: e.nat_addr,
            port: e.nat_port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
            state,
            active: e.active,
        })
    }

    #[inline(always)]
    fn ct_insert(table: Table, key: Ct4Key, e: Entry<u32>, flags: u64) -> Result<(), i64> {
        let s = scratch().ok_or(-1i64)?;
        s.key4 = key;
        s.value4 = Ct4Entry {
            nat_addr: e.addr,
            nat_port: e.port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
            state: e.state,
            _pad: [0; 3],
            active: e.active,
        };
        let inserted = match table {
            Table::Main => CONNTRACK4.insert(&s.key4, &s.value4, flags),
            Table::Overflow => {
                mark_overflowed();
                let inserted = OVERFLOW4.insert(&s.key4, &s.value4, flags);
                mark_overflowed();
                inserted
            }
        };
        inserted.map_err(i64::from)
    }

    #[inline(always)]
    fn ct_remove(key: Ct4Key) {
        if let Some(s) = scratch() {
            s.key4 = key;
            let _ = CONNTRACK4.remove(&s.key4);
            if overflowed() {
                let _ = OVERFLOW4.remove(&s.key4);
            }
        }
    }

    #[inline(always)]
    fn ct_active(key: Ct4Key) -> Option<*mut u32> {
        let s = scratch()?;
        s.key4 = key;
        // SAFETY: a field of a live map value.
        CONNTRACK4
            .get_ptr_mut(&s.key4)
            .map(|e| unsafe { &raw mut (*e).active })
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

    #[inline(always)]
    fn addr_hash(addr: u32) -> u32 {
        crate::hash::mix(addr)
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
    fn ct_get(key: Ct6Key, seen: Option<u8>) -> Option<Entry<Addr6>> {
        let s = scratch()?;
        s.key6 = key;
        let ptr = (CONNTRACK6.get_ptr_mut(&s.key6))
            .or_else(|| overflowed().then(|| OVERFLOW6.get_ptr_mut(&s.key6))?)?;
        // SAFETY: a copy out of a live map value.
        let e = unsafe { *ptr };
        let state = match seen {
            // SAFETY: fields of a live map value.
            Some(tcp_flags) => unsafe {
                take_in(
                    &raw mut (*ptr).last_seen,
                    &raw mut (*ptr).state,
                    key.proto,
                    tcp_flags,
                )
            },
            None => e.state,
        };
        Some(Entry {
            addr: e.nat_addr,
            port: e.nat_port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
            state,
            active: e.active,
        })
    }

    #[inline(always)]
    fn ct_insert(table: Table, key: Ct6Key, e: Entry<Addr6>, flags: u64) -> Result<(), i64> {
        let s = scratch().ok_or(-1i64)?;
        s.key6 = key;
        s.value6 = Ct6Entry {
            nat_addr: e.addr,
            nat_port: e.port,
            flags: e.flags,
            backend_id: e.backend_id,
            service_id: e.service_id,
            last_seen: e.last_seen,
            state: e.state,
            _pad: [0; 3],
            active: e.active,
        };
        let inserted = match table {
            Table::Main => CONNTRACK6.insert(&s.key6, &s.value6, flags),
            Table::Overflow => {
                mark_overflowed();
                let inserted = OVERFLOW6.insert(&s.key6, &s.value6, flags);
                mark_overflowed();
                inserted
            }
        };
        inserted.map_err(i64::from)
    }

    #[inline(always)]
    fn ct_remove(key: Ct6Key) {
        if let Some(s) = scratch() {
            s.key6 = key;
            let _ = CONNTRACK6.remove(&s.key6);
            if overflowed() {
                let _ = OVERFLOW6.remove(&s.key6);
            }
        }
    }

    #[inline(always)]
    fn ct_active(key: Ct6Key) -> Option<*mut u32> {
        let s = scratch()?;
        s.key6 = key;
        // SAFETY: a field of a live map value.
        CONNTRACK6
            .get_ptr_mut(&s.key6)
            .map(|e| unsafe { &raw mut (*e).active })
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

    #[inline(always)]
    fn addr_hash(addr: Addr6) -> u32 {
        crate::hash::mix(
            crate::hash::mix(crate::hash::mix(crate::hash::mix(addr[0]) ^ addr[1]) ^ addr[2])
                ^ addr[3],
        )
    }
}
