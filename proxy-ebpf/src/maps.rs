//! The maps every program shares. Names match `proxy_common::names`.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    cty::c_void,
    helpers::bpf_map_lookup_elem,
    macros::btf_map,
};
use proxy_common::{
    Affinity4Key, Affinity6Key, AffinityEntry, Backend4, Backend6, BackendStatsEntry, CT_MARKS,
    ClosedFlow4, ClosedFlow6, Connections, Counter, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key,
    FILTER_WORDS, Frag4Entry, Frag4Key, Frag6Entry, Frag6Key, Frontend4, Frontend6, MAX_AFFINITY,
    MAX_BACKENDS, MAX_CT_CLOSED, MAX_CT_OVERFLOW, MAX_FRAGMENTS, MAX_MEMBERS, MAX_SERVICES,
    MAX_SLOTS, MAX_SOCK_NAT, MAX_SOURCE_RANGES, MemberKey, NewFlows, NodeConfig, RingEnds,
    STATS_PER_ENTRY, SVC_LISTED, Service, ServiceStats, ServiceStatsEntry, SlotKey, SockNat4,
    SockNat4Key, SockNat6, SockNat6Key, SourceRange4, SourceRange6, stats_slot,
};

/// Maglev tables make slot counts vary by orders of magnitude between
/// services: allocate slots as they are written.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(name = "lb_config")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map(name = "lb4_services")]
pub static SERVICES4: HashMap<Frontend4, Service, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map(name = "lb_slots")]
pub static SLOTS: HashMap<SlotKey, u32, { MAX_SLOTS as usize }, NO_PREALLOC> = HashMap::new();

// An array, as Katran keeps its reals: ids are dense, and a lookup is a
// load the verifier inlines. The agent rewrites an id in place only after
// no slot names it, so a torn read could only reach a flow that picked
// the id before its slot went.
#[btf_map(name = "lb4_backends_v2")]
pub static BACKENDS4: Array<Backend4, { MAX_BACKENDS as usize }> = Array::new();

// New flows that found the conntrack table full. An LRU: under pressure it
// evicts the least recently used of these flows, never one in `ct4_table`.
#[btf_map(name = "ct4_overflow")]
pub static OVERFLOW4: LruHashMap<Ct4Key, Ct4Entry, { MAX_CT_OVERFLOW as usize }> =
    LruHashMap::new();

#[btf_map(name = "ct6_overflow")]
pub static OVERFLOW6: LruHashMap<Ct6Key, Ct6Entry, { MAX_CT_OVERFLOW as usize }> =
    LruHashMap::new();

// Closed flows, oldest first, for the datapath to reclaim when conntrack
// is full (see `closed`). Arrays used as rings.
#[btf_map(name = "ct4_closed")]
pub static CLOSED4: Array<ClosedFlow4, { MAX_CT_CLOSED as usize }> = Array::new();

#[btf_map(name = "ct6_closed")]
pub static CLOSED6: Array<ClosedFlow6, { MAX_CT_CLOSED as usize }> = Array::new();

#[btf_map(name = "ct_closed_ends")]
pub static CLOSED_ENDS: Array<RingEnds, 2> = Array::new();

/// Non-zero while the overflow maps may hold entries (see `ctmap`).
#[btf_map(name = "ct_overflowed")]
pub static OVERFLOWED: Array<u32, 1> = Array::new();

// `CT_SOCKET` entries name their frontend by service id: a reply's new
// source is found here.
#[btf_map(name = "lb4_rev_nat")]
pub static REV_NAT4: Array<Frontend4, { MAX_SERVICES as usize }> = Array::new();

#[btf_map(name = "lb6_rev_nat")]
pub static REV_NAT6: Array<Frontend6, { MAX_SERVICES as usize }> = Array::new();

/// Which kinds of entries beside `CT_SOCKET` may exist (see `ctmap`).
#[btf_map(name = "ct_paired")]
pub static PAIRED: Array<u32, { CT_MARKS as usize }> = Array::new();

#[btf_map(name = "lb4_members")]
pub static MEMBERS4: HashMap<MemberKey, Backend4, { MAX_MEMBERS as usize }> = HashMap::new();

#[btf_map(name = "lb4_affinity")]
pub static AFFINITY4: LruHashMap<Affinity4Key, AffinityEntry, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb4_src_ranges")]
pub static SOURCE_RANGES4: LpmTrie<SourceRange4, u32, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

#[btf_map(name = "lb6_services")]
pub static SERVICES6: HashMap<Frontend6, Service, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map(name = "lb6_backends_v2")]
pub static BACKENDS6: Array<Backend6, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map(name = "lb6_members")]
pub static MEMBERS6: HashMap<MemberKey, Backend6, { MAX_MEMBERS as usize }> = HashMap::new();

#[btf_map(name = "lb6_affinity")]
pub static AFFINITY6: LruHashMap<Affinity6Key, AffinityEntry, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb6_src_ranges")]
pub static SOURCE_RANGES6: LpmTrie<SourceRange6, u32, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Conntrack keys and values on their way into the map helpers (see
/// `family`). Not pinned.
#[repr(C)]
pub struct CtScratch {
    pub key4: Ct4Key,
    pub value4: Ct4Entry,
    pub key6: Ct6Key,
    pub value6: Ct6Entry,
    /// A closed flow taken off its ring (see `closed`).
    pub closed4: ClosedFlow4,
    pub closed6: ClosedFlow6,
}

#[btf_map(name = "ct_scratch")]
pub static CT_SCRATCH: PerCpuArray<CtScratch, 1> = PerCpuArray::new();

/// The second conntrack last read on this CPU, and the jiffy it read it
/// in (see `ctmap::now`). Not pinned: a cache.
#[repr(C)]
pub struct Clock {
    pub jiffies: u64,
    pub seconds: u32,
    pub _pad: u32,
}

#[btf_map(name = "ct_clock")]
pub static CLOCK: PerCpuArray<Clock, 1> = PerCpuArray::new();

/// A new flow's chosen backend, from the program its first packet met to
/// the new-flow program that one tail-calls (see `lb::hand_over`). Per
/// CPU, written right before the tail call: nothing else runs between on
/// that CPU. Pinned, as the tail-call maps are.
#[btf_map(name = "new_flow")]
pub static NEW_FLOW: PerCpuArray<NewFlows, 1> = PerCpuArray::new();

/// The new-flow program of each program type (slot 0), set by the agent.
#[btf_map(name = "xdp_new_flow")]
pub static XDP_NEW_FLOW: ProgramArray<1> = ProgramArray::new();

#[btf_map(name = "tc_new_flow")]
pub static TC_NEW_FLOW: ProgramArray<1> = ProgramArray::new();

/// Room to build a refusal in, off the 512-byte BPF stack. Not pinned.
#[btf_map(name = "scratch")]
pub static SCRATCH: PerCpuArray<[u8; 256], 1> = PerCpuArray::new();

/// A per-CPU scratch buffer seen as a `T` made of bytes only.
#[inline(always)]
pub fn scratch<T>() -> Option<&'static mut T> {
    const { assert!(core::mem::size_of::<T>() <= 256 && core::mem::align_of::<T>() == 1) };
    let buf = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU, so no other user while this program runs; T is
    // byte-aligned and fits, as checked at compile time.
    Some(unsafe { &mut *(buf as *mut T) })
}

/// 64 ids an entry (see `STATS_PER_ENTRY`).
#[btf_map(name = "lb_svc_stats")]
pub static SERVICE_STATS: PerCpuArray<
    ServiceStatsEntry,
    { (MAX_SERVICES / STATS_PER_ENTRY) as usize },
> = PerCpuArray::new();

/// Written by the agent only: where each service id's counts start.
#[btf_map(name = "lb_stats_base")]
pub static SERVICE_STATS_BASE: Array<ServiceStats, { MAX_SERVICES as usize }> = Array::new();

#[btf_map(name = "lb_be_flows")]
pub static BACKEND_STATS: PerCpuArray<
    BackendStatsEntry,
    { (MAX_BACKENDS / STATS_PER_ENTRY) as usize },
> = PerCpuArray::new();

#[btf_map(name = "lb_conns")]
pub static CONNECTIONS: Array<Connections, { MAX_BACKENDS as usize }> = Array::new();

/// Written by the agent only: connections its garbage collection removed.
#[btf_map(name = "lb_reaped")]
pub static REAPED: Array<u32, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map(name = "lb_rr")]
pub static ROUND_ROBIN: Array<u32, { MAX_SERVICES as usize }> = Array::new();

/// See `proxy_common::names::MEMBER_GONE`.
#[btf_map(name = "lb_member_gone")]
pub static MEMBER_GONE: Array<u32, { MAX_SERVICES as usize }> = Array::new();

/// See `proxy_common::names::SERVICES_BY_ID`.
#[btf_map(name = "lb_svc_by_id")]
pub static SERVICES_BY_ID: Array<Service, { MAX_SERVICES as usize }> = Array::new();

/// The service entry of id `id`, if its frontend has one.
#[inline(always)]
pub fn service_by_id(id: u32) -> Option<Service> {
    SERVICES_BY_ID
        .get(id)
        .filter(|s| s.flags & SVC_LISTED != 0)
        .copied()
}

/// See `proxy_common::filter`.
#[btf_map(name = "lb_filter")]
pub static FILTER: Array<u64, { FILTER_WORDS as usize }> = Array::new();

#[btf_map(name = "counters")]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_service(id: u32, bytes: u64) {
    let (entry, at) = stats_slot(id);
    if let Some(e) = SERVICE_STATS.get_ptr_mut(entry) {
        // SAFETY: per-CPU slot, as above; `at` < 64.
        unsafe {
            let s = &mut (*e).by_id[at];
            s.packets += 1;
            s.bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_backend_flow(id: u32) {
    let (entry, at) = stats_slot(id);
    if let Some(e) = BACKEND_STATS.get_ptr_mut(entry) {
        // SAFETY: per-CPU slot, as above; `at` < 64.
        unsafe { (*e).by_id[at].flows += 1 };
    }
}

// Socket-level load balancing. LRUs: an entry lives as long as its socket
// is in use, and nobody tells the datapath when a socket closes.
#[btf_map(name = "sock4_nat")]
pub static SOCK_NAT4: LruHashMap<SockNat4Key, SockNat4, { MAX_SOCK_NAT as usize }> =
    LruHashMap::new();

#[btf_map(name = "sock6_nat")]
pub static SOCK_NAT6: LruHashMap<SockNat6Key, SockNat6, { MAX_SOCK_NAT as usize }> =
    LruHashMap::new();

/// Fragment keys and values on their way into the map helpers, off the
/// stack (see `frag`). Not pinned.
#[repr(C)]
pub struct FragScratch {
    pub key4: Frag4Key,
    pub value4: Frag4Entry,
    pub key6: Frag6Key,
    pub value6: Frag6Entry,
}

#[btf_map(name = "frag_scratch")]
pub static FRAG_SCRATCH: PerCpuArray<FragScratch, 1> = PerCpuArray::new();

// Fragmented datagrams (see `frag`). LRUs: nothing tells the datapath when
// a datagram's last fragment has passed.
#[btf_map(name = "frag4")]
pub static FRAGMENTS4: LruHashMap<Frag4Key, Frag4Entry, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

#[btf_map(name = "frag6")]
pub static FRAGMENTS6: LruHashMap<Frag6Key, Frag6Entry, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// A map lookup with a key the caller keeps (aya's take it by value, onto
/// the stack).
///
/// # Safety
/// `map` is a map whose key type `key` points to, and whose values are `V`.
#[inline(always)]
pub unsafe fn lookup<V>(map: *const c_void, key: *const impl Sized) -> Option<*mut V> {
    // SAFETY: the caller's.
    let value = unsafe { bpf_map_lookup_elem(map.cast_mut(), key.cast()) };
    (!value.is_null()).then_some(value.cast())
}
