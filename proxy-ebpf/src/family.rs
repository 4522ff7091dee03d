//! IPv4 and IPv6 behind one interface, so that service lookup, conntrack,
//! source NAT, affinity and source ranges are written once: each family
//! has its own maps (lb4_* / lb6_*), keys and values.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    Addr6, Affinity4Key, Affinity6Key, AffinityEntry, Backend4, Backend6, Chosen, ClosedFlow,
    Ct4Key, Ct6Key, Frontend4, Frontend6, MemberKey, NodeConfig, SCOPE_ALL, Service, SourceRange4,
    SourceRange6, csum::Words,
};

use crate::{
    ctmap::{self, Ct4, Ct6, CtMaps, Entry, Peek, Seen, Table},
    filter::FilterAddr,
    hash::AddrHash,
    maps::{
        self, AFFINITY4, AFFINITY6, BACKENDS4, BACKENDS6, CLOSED4, CLOSED6, CT_SCRATCH,
        MEMBER_GONE, MEMBERS4, MEMBERS6, NEW_FLOW, REV_NAT4, REV_NAT6, SERVICES4, SERVICES6,
        SOURCE_RANGES4, SOURCE_RANGES6,
    },
    parse::{Ipv4Hdr, Ipv6Hdr},
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
    type Addr: Copy + Default + PartialEq + AddrHash + FilterAddr + Words + 'static;
    type CtKey: Copy;
    /// The family's conntrack maps.
    type Ct: CtMaps<Addr = Self::Addr, Key = Self::CtKey>;
    /// The family's IP header (without options).
    type Header;
    /// Offsets in the IP header: the addresses, and the header checksum
    /// (IPv4's; IPv6 has none).
    const SADDR: usize;
    const DADDR: usize;
    const HEADER_CHECK: Option<usize>;
    /// The family's entry in `ct_closed_ends`.
    const RING: u32;

    /// The entry of a frontend for clients of `scope` (`SCOPE_*`).
    fn service(addr: Self::Addr, port: u16, proto: u8, scope: u8) -> Option<Service>;
    /// The backend a slot's id names.
    fn backend(id: u32) -> Option<Target<Self::Addr>>;
    /// The backend as a member of the service.
    fn member(key: MemberKey) -> Option<Target<Self::Addr>>;
    /// True if the member exists at `addr` and `port`: compared in place.
    fn member_is(key: MemberKey, addr: Self::Addr, port: u16) -> bool;
    /// The address and port of the frontend with service id `id`, if the
    /// agent wrote it (`lb4_rev_nat`/`lb6_rev_nat`).
    fn rev_nat(id: u32) -> Option<(Self::Addr, u16)>;
    /// True if the frontend at id `id` (`lb4_rev_nat`/`lb6_rev_nat`) is
    /// (`addr`, `port`, `proto`) for every client (`SCOPE_ALL`, as the
    /// ingress hooks look frontends up): compared in place.
    fn frontend_is(id: u32, addr: Self::Addr, port: u16, proto: u8) -> bool;

    /// See `ctmap::get`.
    #[inline(always)]
    fn ct_get(key: Self::CtKey, seen: Seen) -> Option<Entry<Self::Addr>> {
        ctmap::get::<Self::Ct>(key, seen)
    }
    /// See `ctmap::get_where`.
    #[inline(always)]
    fn ct_get_where(
        key: Self::CtKey,
        seen: Seen,
        ours: impl Fn(&Entry<Self::Addr>) -> bool,
    ) -> Option<Entry<Self::Addr>> {
        ctmap::get_where::<Self::Ct>(key, seen, ours)
    }
    /// See `ctmap::get_judged`.
    #[inline(always)]
    fn ct_get_judged(
        key: Self::CtKey,
        seen: Seen,
        judge: impl Fn(&Entry<Self::Addr>) -> Option<bool>,
    ) -> Option<Entry<Self::Addr>> {
        ctmap::get_judged::<Self::Ct>(key, seen, judge)
    }
    /// See `ctmap::flags`.
    #[inline(always)]
    fn ct_flags(key: Self::CtKey) -> Option<u16> {
        ctmap::flags::<Self::Ct>(key)
    }
    /// See `ctmap::peek`.
    #[inline(always)]
    fn ct_peek(key: Self::CtKey) -> Option<Peek<Self::Addr>> {
        ctmap::peek::<Self::Ct>(key)
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
    /// See `ctmap::stage`.
    #[inline(always)]
    fn ct_stage(entry: &Entry<Self::Addr>) {
        ctmap::stage::<Self::Ct>(entry)
    }
    /// See `ctmap::insert_staged`.
    #[inline(always)]
    fn ct_insert_staged(table: Table, key: Self::CtKey, flags: u64) -> Result<(), i64> {
        ctmap::insert_staged::<Self::Ct>(table, key, flags)
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
    fn ct_set_port(key: Self::CtKey, port: u16, node: bool) {
        ctmap::set_port::<Self::Ct>(key, port, node)
    }
    /// See `ctmap::deactivate`.
    #[inline(always)]
    fn ct_deactivate(key: Self::CtKey) -> Option<u32> {
        ctmap::deactivate::<Self::Ct>(key)
    }

    /// A slot of the family's closed-flow ring (`ct4_closed`/`ct6_closed`).
    fn closed_slot(index: u32) -> Option<*mut ClosedFlow<Self::Addr>>;
    /// This CPU's room for a closed flow taken off the ring: off the stack,
    /// which the paths that reclaim flows have no room left on.
    fn closed_scratch() -> Option<&'static mut ClosedFlow<Self::Addr>>;

    fn affinity_get(service_id: u32, client: Self::Addr) -> Option<*mut AffinityEntry>;
    fn affinity_insert(service_id: u32, client: Self::Addr, entry: AffinityEntry);

    /// True if `client` lies in one of the service's source ranges.
    fn admits(service_id: u32, client: Self::Addr) -> bool;
    /// The node address source NAT uses, if one is known.
    fn snat_addr(config: &NodeConfig) -> Option<Self::Addr>;
    /// This CPU's `Chosen` of the family in `new_flow`.
    fn chosen() -> Option<*mut Chosen<Self::Addr>>;
}

/// The backend `backend_id` as a member of service `service_id`.
#[inline(always)]
pub fn member<F: Family>(service_id: u32, backend_id: u32) -> Option<Target<F::Addr>> {
    F::member(MemberKey {
        service_id,
        backend_id,
    })
}

/// True if the backend of a flow's entry is still a member of service
/// `service_id`, at the entry's address and port. Looked up only if the
/// service's members may have lost one since the entry's last packet
/// (`proxy_common::names::MEMBER_GONE`): otherwise the entry's backend is
/// still what it was then, and an established packet spares a hash
/// lookup. Only the answer is on the stack (TC's is nearly full).
#[inline(always)]
pub fn entry_backend_stays<F: Family>(service_id: &u32, entry: &Entry<F::Addr>) -> bool {
    !member_gone_since(service_id, entry.last_seen)
        || F::member_is(
            MemberKey {
                service_id: *service_id,
                backend_id: entry.backend_id,
            },
            entry.addr,
            entry.port,
        )
}

/// True if the service's members may have lost one at or after `second`:
/// the same second counts (the agent writes the second after it), and so
/// does an unreadable time.
/// The id is read where it is (`service_id` points into the caller's
/// copy): a key of its own would take stack TC does not have.
#[inline(always)]
fn member_gone_since(service_id: &u32, second: u32) -> bool {
    // SAFETY: an array of u32 keyed by u32.
    let at = unsafe { maps::lookup::<u32>((&raw const MEMBER_GONE).cast(), service_id) };
    // SAFETY: a live array value.
    at.is_none_or(|t| unsafe { *t } >= second)
}

/// The families' impls differ only in names, types and header offsets: the
/// maps and their fields are the same, so one body serves both.
macro_rules! family {
    (
        $name:ident {
            addr: $addr:ty,
            header: $header:ty,
            saddr: $saddr:expr,
            daddr: $daddr:expr,
            header_check: $check:expr,
            ct: $ct:ident($ct_key:ty),
            closed: $closed:ident[$ring:expr]($scratch:ident),
            services: $services:ident($frontend:ident),
            rev_nat: $rev_nat:ident,
            backends: $backends:ident($backend:ty),
            members: $members:ident,
            affinity: $affinity:ident($affinity_key:ident),
            source_ranges: $ranges:ident($range:ident),
            snat_addr: $snat:ident,
            chosen: $chosen:ident $(,)?
        }
    ) => {
        pub struct $name;

        impl Family for $name {
            type Addr = $addr;
            type CtKey = $ct_key;
            type Ct = $ct;
            type Header = $header;
            const SADDR: usize = $saddr;
            const DADDR: usize = $daddr;
            const HEADER_CHECK: Option<usize> = $check;
            const RING: u32 = $ring;

            #[inline(always)]
            fn service(addr: $addr, port: u16, proto: u8, scope: u8) -> Option<Service> {
                let key = $frontend {
                    addr,
                    port,
                    proto,
                    scope,
                };
                // SAFETY: a copy out of a live map value.
                $services.get_ptr(key).map(|s| unsafe { *s })
            }

            #[inline(always)]
            fn backend(id: u32) -> Option<Target<$addr>> {
                // SAFETY: a live array value.
                let b = unsafe { &*$backends.get_ptr(id)? };
                b.present().then(|| Target::from(b))
            }

            #[inline(always)]
            fn member(key: MemberKey) -> Option<Target<$addr>> {
                // SAFETY: a copy out of a live map value.
                $members.get_ptr(key).map(|b| Target::from(unsafe { &*b }))
            }

            #[inline(always)]
            fn member_is(key: MemberKey, addr: $addr, port: u16) -> bool {
                // SAFETY: fields of a live map value.
                $members
                    .get_ptr(key)
                    .is_some_and(|b| unsafe { (*b).addr == addr && (*b).port == port })
            }

            #[inline(always)]
            fn rev_nat(id: u32) -> Option<(Self::Addr, u16)> {
                let f = $rev_nat.get_ptr(id)?;
                // SAFETY: fields of a live array value.
                let port = unsafe { (*f).port };
                // An array reads zero where nothing was written.
                // SAFETY: as above.
                (port != 0).then(|| (unsafe { (*f).addr }, port))
            }

            #[inline(always)]
            fn frontend_is(id: u32, addr: $addr, port: u16, proto: u8) -> bool {
                // SAFETY: fields of a live array value.
                $rev_nat.get_ptr(id).is_some_and(|f| unsafe {
                    (*f).port == port
                        && (*f).addr == addr
                        && (*f).proto == proto
                        && (*f).scope == SCOPE_ALL
                })
            }

            #[inline(always)]
            fn closed_slot(index: u32) -> Option<*mut ClosedFlow<$addr>> {
                $closed.get_ptr_mut(index)
            }

            #[inline(always)]
            fn closed_scratch() -> Option<&'static mut ClosedFlow<$addr>> {
                // SAFETY: per-CPU, and used by one reclaim at a time (see
                // `ct::reclaim`).
                CT_SCRATCH
                    .get_ptr_mut(0)
                    .map(|s| unsafe { &mut (*s).$scratch })
            }

            #[inline(always)]
            fn affinity_get(service_id: u32, client: $addr) -> Option<*mut AffinityEntry> {
                $affinity.get_ptr_mut($affinity_key {
                    service_id,
                    client_addr: client,
                })
            }

            #[inline(always)]
            fn affinity_insert(service_id: u32, client: $addr, entry: AffinityEntry) {
                let key = $affinity_key {
                    service_id,
                    client_addr: client,
                };
                // A failed write only costs this client its affinity.
                let _ = $affinity.insert(key, entry, 0);
            }

            #[inline(always)]
            fn admits(service_id: u32, client: $addr) -> bool {
                let data = $range {
                    service_id_be: service_id.to_be(),
                    addr: client,
                };
                // A lookup key is matched at its full length: the service id
                // and every bit of the address.
                let bits = (8 * size_of::<$range>()) as u32;
                $ranges.get(&Key::new(bits, data)).is_some()
            }

            #[inline(always)]
            fn snat_addr(config: &NodeConfig) -> Option<$addr> {
                let addr = config.$snat;
                (addr != <$addr>::default()).then_some(addr)
            }

            #[inline(always)]
            fn chosen() -> Option<*mut Chosen<$addr>> {
                // SAFETY: a field of a live per-CPU value; no reference made.
                NEW_FLOW
                    .get_ptr_mut(0)
                    .map(|n| unsafe { &raw mut (*n).$chosen })
            }
        }

        impl From<&$backend> for Target<$addr> {
            #[inline(always)]
            fn from(b: &$backend) -> Self {
                Target {
                    addr: b.addr,
                    port: b.port,
                    flags: b.flags,
                }
            }
        }
    };
}

family!(V4 {
    addr: u32,
    header: Ipv4Hdr,
    saddr: 12,
    daddr: 16,
    header_check: Some(10),
    ct: Ct4(Ct4Key),
    closed: CLOSED4[0](closed4),
    services: SERVICES4(Frontend4),
    rev_nat: REV_NAT4,
    backends: BACKENDS4(Backend4),
    members: MEMBERS4,
    affinity: AFFINITY4(Affinity4Key),
    source_ranges: SOURCE_RANGES4(SourceRange4),
    snat_addr: snat_addr4,
    chosen: v4,
});

family!(V6 {
    addr: Addr6,
    header: Ipv6Hdr,
    saddr: 8,
    daddr: 24,
    header_check: None,
    ct: Ct6(Ct6Key),
    closed: CLOSED6[1](closed6),
    services: SERVICES6(Frontend6),
    rev_nat: REV_NAT6,
    backends: BACKENDS6(Backend6),
    members: MEMBERS6,
    affinity: AFFINITY6(Affinity6Key),
    source_ranges: SOURCE_RANGES6(SourceRange6),
    snat_addr: snat_addr6,
    chosen: v6,
});
