//! Conntrack entries and their maps, written once for both families: the
//! family-independent `Entry`, `ct4_table`/`ct6_table` (`ctlines`) and
//! their overflow maps while `ct_overflowed` says they may hold entries, and what a packet changes
//! in an entry (its time and TCP state), and `ct_paired`, which says
//! whether any pairs (`CT_FORWARD`/`CT_REPLY`) or source NAT entries may
//! exist. Keys and values reach the map helpers through the per-CPU
//! `ct_scratch`.

use aya_ebpf::{
    btf_maps::LruHashMap,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use proxy_common::{
    Addr6, CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_SOCKET, CT_STATE_ESTABLISHED, CT_STATE_FIN,
    CT_STATE_OPEN, CT_STATE_RST, CT_UNREPLIED, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, IPPROTO_TCP,
    MAX_CT_OVERFLOW,
};

use crate::{
    atomic,
    ctlines::{Lines4, Lines6},
    maps::{CLOCK, CT_SCRATCH, CtScratch, OVERFLOW4, OVERFLOW6, OVERFLOWED, PAIRED},
    parse::{TCP_FIN, TCP_RST, TCP_SYN},
};

type Overflow<K, V> = LruHashMap<K, V, { MAX_CT_OVERFLOW as usize }>;

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
    /// `CT_STATE_*`, including the packet just seen (of a `CT_SOCKET`
    /// entry: the client's side).
    pub state: u8,
    /// `CT_SOCKET` entries: `CT_STATE_*` of the backend's side.
    pub reply_state: u8,
    /// Source-NATed `CT_SOCKET` entries: the node port, 0 until picked.
    pub node_port: u16,
    /// Non-zero while the flow counts as an open connection.
    pub active: u32,
    /// The direction of the key it was found at (not written).
    pub direction: u8,
}

impl<A> Entry<A> {
    /// True for a flow's only entry (`CT_SOCKET`).
    #[inline(always)]
    pub fn is_socket(&self) -> bool {
        self.direction == CT_SOCKET
    }
}

/// What a packet that finds an entry changes in it.
#[derive(Clone, Copy)]
pub enum Seen {
    /// Nothing: the entry is only read.
    Nothing,
    /// A client's packet (its TCP flags; 0 for other protocols).
    Client(u8),
    /// A packet coming back: a reply entry's own, or the backend's side
    /// of a `CT_SOCKET` entry. It confirms the flow (`CT_UNREPLIED`).
    Reply(u8),
}

/// Coarse monotonic seconds: what conntrack entries remember of time.
#[inline(always)]
pub fn now() -> u32 {
    xdproxy_now()
}

/// `now` as a global function, which the verifier walks once: inlined,
/// its two ways (the cached second, or the clock read) doubled the paths
/// after every call (TC egress 76k -> 137k instructions).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xdproxy_now() -> u32 {
    tick();
    now_ticked()
}

/// `now` right after a `tick`: a read of this CPU's clock, not a call.
/// On this kind of CPU every return pays a mitigation's thunk (the call
/// took 7 ns of an established packet); read so wherever `now` is called,
/// the verifier's walk grew as much as inlining `now` whole did (TC egress
/// 77k -> 140k), so only an established packet's lookup and a new
/// flow's entries (written right after that lookup's tick) read it so.
#[inline(always)]
pub fn now_ticked() -> u32 {
    // SAFETY: this CPU's value, live.
    CLOCK
        .get_ptr(0)
        .map_or(0, |clock| unsafe { (*clock).seconds })
}

/// Brings this CPU's clock to the current second.
///
/// The coarse clock moves only when a tick moves jiffies, so it is read
/// (a helper call and a 64-bit division) once per jiffy and CPU; the
/// verifier inlines `bpf_jiffies64` and this CPU's cache into two loads.
#[inline(always)]
fn tick() {
    // SAFETY: the helper has no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = CLOCK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value, live. A program that interrupts another
    // here writes the same jiffy's second, or leaves an older jiffy,
    // which never matches again.
    unsafe {
        if (*clock).jiffies != jiffies {
            (*clock).seconds = read_clock();
            (*clock).jiffies = jiffies;
        }
    }
}

#[inline(always)]
fn read_clock() -> u32 {
    // SAFETY: the helper has no preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// A direction's TCP state after a packet with `tcp_flags`. FIN and RST
/// stay: a new SYN on such an entry is a new connection, which the caller
/// sees and handles.
#[inline(always)]
pub fn next_state(state: u8, proto: u8, tcp_flags: u8) -> u8 {
    if proto != IPPROTO_TCP {
        CT_STATE_OPEN
    } else if tcp_flags & TCP_RST != 0 {
        CT_STATE_RST
    } else if tcp_flags & TCP_FIN != 0 || state == CT_STATE_FIN || state == CT_STATE_RST {
        state.max(CT_STATE_FIN)
    } else if tcp_flags & TCP_SYN != 0 {
        state
    } else {
        CT_STATE_ESTABLISHED
    }
}

/// The conntrack map a new flow's entries go to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `ct4_table`/`ct6_table`: never evicted.
    Main,
    /// `ct4_overflow`/`ct6_overflow`, LRU: for flows that found `Main` full.
    Overflow,
}

/// A family's conntrack maps, key and value.
pub trait CtMaps {
    type Addr: Copy;
    type Key: Copy + 'static;
    type Value: Copy + 'static;

    fn key(
        src: Self::Addr,
        sport: u16,
        dst: Self::Addr,
        dport: u16,
        proto: u8,
        direction: u8,
    ) -> Self::Key;
    /// The value at `key` in the main table.
    fn main_find(key: &Self::Key) -> Option<*mut Self::Value>;
    /// Writes the scratch buffer's value at its key into the main table.
    fn main_insert(s: &CtScratch, flags: u64) -> Result<(), i64>;
    /// Removes `key` from the main table.
    fn main_remove(key: &Self::Key);
    fn overflow() -> &'static Overflow<Self::Key, Self::Value>;
    /// This family's places in the scratch buffer.
    fn slots(s: &mut CtScratch) -> (&mut Self::Key, &mut Self::Value);
    fn proto(key: &Self::Key) -> u8;
    fn direction(key: &Self::Key) -> u8;
    /// Writes `e` into `v` field by field. The padding is left alone (the
    /// scratch buffer's stays zero): written with the fields around it,
    /// it made LLVM call a byte-by-byte `memset`, which the verifier
    /// walked byte by byte on every path through every insert.
    fn write_value(v: &mut Self::Value, e: &Entry<Self::Addr>);
    fn entry(v: &Self::Value) -> Entry<Self::Addr>;
    /// The value's service id alone.
    fn service_id(v: &Self::Value) -> u32;
    /// What `peek` copies of the value.
    fn peek(v: &Self::Value) -> Peek<Self::Addr>;
    /// The `last_seen`, `state`, `active` and `flags` fields of a live map
    /// value.
    ///
    /// # Safety
    /// `v` points to a live value of one of the maps.
    unsafe fn fields(v: *mut Self::Value) -> Fields;
}

/// True while the overflow maps may hold entries. Until a flow overflows,
/// a conntrack miss costs no second hash lookup.
#[inline(always)]
pub fn overflowed() -> bool {
    OVERFLOWED.get(0).is_some_and(|v| *v != 0)
}

/// True while `CT_FORWARD` entries, and the `CT_REPLY` entries of their
/// flows, may exist: until a flow needs them (a client port two live flows
/// share), a packet no `CT_SOCKET` entry claims costs no second lookup.
#[inline(always)]
pub fn paired() -> bool {
    raised(CT_MARK_PAIRS)
}

/// True while source-NATed flows' entries (`CT_SOCKET` ones with
/// `CT_SOURCE_NAT`, `CT_OUTWARD`, `CT_REWRITE_DST`) may exist: until a
/// flow is source-NATed, no packet looks for them.
#[inline(always)]
pub fn source_nat() -> bool {
    raised(CT_MARK_SOURCE_NAT)
}

#[inline(always)]
fn raised(mark: u32) -> bool {
    PAIRED.get(mark).is_some_and(|v| *v != 0)
}

/// Set before and after an overflow insert. The agent clears it once the
/// overflow maps are empty, then sets it back if it finds an entry after
/// all: whatever the interleaving, it ends set while an entry exists.
#[inline(always)]
fn mark_overflowed() {
    mark(&OVERFLOWED, 0);
}

/// As `mark_overflowed`, once a flow's `CT_FORWARD`/`CT_REPLY` entries are
/// written (by `ct`, which knows when): no packet looks for them before
/// the flow's first packet has left, which is after this.
#[inline(always)]
pub fn mark_paired() {
    mark(&PAIRED, CT_MARK_PAIRS);
}

/// As `mark_paired`, once a source-NATed flow's entries are written at
/// ingress: before its first packet reaches egress, where its node port
/// is picked and its `CT_REWRITE_DST` entry written.
#[inline(always)]
pub fn mark_source_nat() {
    mark(&PAIRED, CT_MARK_SOURCE_NAT);
}

#[inline(always)]
fn mark<const N: usize>(flag: &aya_ebpf::btf_maps::Array<u32, N>, index: u32) {
    if let Some(v) = flag.get_ptr_mut(index) {
        // SAFETY: a live array value; read first so that the cache line is
        // written only on the first raise.
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

/// The value at `key`, in the main map or, while in use, the overflow map.
#[inline(always)]
fn lookup<M: CtMaps>(key: &M::Key) -> Option<*mut M::Value> {
    M::main_find(key).or_else(|| overflowed().then(|| M::overflow().get_ptr_mut(key))?)
}

/// Pointers to the fields of a live map value that packets change.
pub struct Fields {
    pub port: *mut u16,
    pub last_seen: *mut u32,
    pub state: *mut u8,
    pub reply_state: *mut u8,
    pub active: *mut u32,
    pub flags: *mut u16,
    pub backend_id: *mut u32,
    pub node_port: *mut u16,
}

/// Takes a packet into an entry: refreshes its second (at most one write a
/// second; not with `refresh` false) and the TCP state of the packet's
/// side, and confirms an unreplied flow if the packet came back; returns
/// the state after the packet, or None if nothing was seen.
#[inline(always)]
fn take_in(
    f: &Fields,
    proto: u8,
    seen: Seen,
    socket: bool,
    refresh: bool,
    clock: impl Fn() -> u32,
) -> Option<u8> {
    let (tcp_flags, state, reply) = match seen {
        Seen::Nothing => return None,
        Seen::Client(flags) => (flags, f.state, false),
        Seen::Reply(flags) if socket => (flags, f.reply_state, true),
        Seen::Reply(flags) => (flags, f.state, true),
    };
    // SAFETY: all point into a live map value; a racing CPU stores the same
    // second, flags, or a state that the next packet corrects.
    unsafe {
        let now = if refresh { clock() } else { *f.last_seen };
        let next = next_state(*state, proto, tcp_flags);
        if *f.last_seen != now || *state != next {
            *f.last_seen = now;
            *state = next;
        }
        if reply && *f.flags & CT_UNREPLIED != 0 {
            *f.flags &= !CT_UNREPLIED;
        }
        Some(next)
    }
}

/// The entry, which also takes in the packet `seen`: its time (the clock
/// is read only for an entry that exists) and state.
#[inline(always)]
pub fn get<M: CtMaps>(key: M::Key, seen: Seen) -> Option<Entry<M::Addr>> {
    get_where::<M>(key, seen, |_| true)
}

/// `get` for an entry that `ours` accepts: one another hook acts on is
/// neither returned nor touched.
#[inline(always)]
pub fn get_where<M: CtMaps>(
    key: M::Key,
    seen: Seen,
    ours: impl Fn(&Entry<M::Addr>) -> bool,
) -> Option<Entry<M::Addr>> {
    get_judged::<M>(key, seen, |e| ours(e).then_some(true))
}

/// `get_where` whose `judge` also says whether the packet refreshes the
/// entry's second (None: not ours; its state is taken in either way).
#[inline(always)]
pub fn get_judged<M: CtMaps>(
    key: M::Key,
    seen: Seen,
    judge: impl Fn(&Entry<M::Addr>) -> Option<bool>,
) -> Option<Entry<M::Addr>> {
    let ptr = locate::<M>(key)?;
    // SAFETY: a live map value.
    let mut entry = unsafe { entry_at::<M>(ptr, &key) };
    let refresh = judge(&entry)?;
    // SAFETY: a live map value.
    let fields = unsafe { M::fields(ptr) };
    let socket = entry.is_socket();
    match take_in(&fields, M::proto(&key), seen, socket, refresh, now) {
        Some(next) if socket && matches!(seen, Seen::Reply(_)) => entry.reply_state = next,
        Some(next) => entry.state = next,
        None => {}
    }
    Some(entry)
}

/// The value at `key`, looked up through this CPU's scratch key.
#[inline(always)]
fn locate<M: CtMaps>(key: M::Key) -> Option<*mut M::Value> {
    let (k, _) = M::slots(scratch()?);
    *k = key;
    lookup::<M>(k)
}

/// What a lookup found at a key.
pub enum Found<V> {
    /// The value of an entry the caller accepted, the packet taken in, and
    /// its second from before (as `get_judged` returns it: a check of
    /// what may have changed since the flow's last packet needs it).
    Entry(*mut V, u32),
    /// An entry the caller did not accept, left as it was.
    NotOurs,
    /// Nothing (or no scratch space to look with).
    Absent,
}

/// `get_judged` that says whether an entry the judge refused was there,
/// and leaves the copy of what it found to the caller (`entry_at`): a
/// pointer takes less of the stack than an entry, which TC has little of.
#[inline(always)]
pub fn find_where<M: CtMaps>(
    key: M::Key,
    seen: Seen,
    judge: impl Fn(&Entry<M::Addr>) -> Option<bool>,
) -> Found<M::Value> {
    // Before the lookup: its two ways meet where the state is small.
    tick();
    let Some(ptr) = locate::<M>(key) else {
        return Found::Absent;
    };
    // SAFETY: a live map value.
    let entry = unsafe { entry_at::<M>(ptr, &key) };
    let Some(refresh) = judge(&entry) else {
        return Found::NotOurs;
    };
    // SAFETY: a live map value.
    let fields = unsafe { M::fields(ptr) };
    take_in(
        &fields,
        M::proto(&key),
        seen,
        entry.is_socket(),
        refresh,
        now_ticked,
    );
    Found::Entry(ptr, entry.last_seen)
}

/// The entry in `value`, found at `key`, as it is after the packet that
/// found it was taken in (a racing CPU's packet may have moved it on).
///
/// # Safety
///
/// `value` must be a live map value.
#[inline(always)]
pub unsafe fn entry_at<M: CtMaps>(value: *mut M::Value, key: &M::Key) -> Entry<M::Addr> {
    // SAFETY: the caller's promise.
    let mut entry = M::entry(unsafe { &*value });
    entry.direction = M::direction(key);
    entry
}

/// The flags of the entry at `key`, if there is one; nothing else is
/// copied to the stack, which the paths that need this have little of.
#[inline(always)]
pub fn flags<M: CtMaps>(key: M::Key) -> Option<u16> {
    let (k, _) = M::slots(scratch()?);
    *k = key;
    let ptr = lookup::<M>(k)?;
    // SAFETY: a field of a live map value.
    Some(unsafe { *M::fields(ptr).flags })
}

/// Part of an entry: a smaller copy than `get`'s, for paths with little
/// stack left.
#[derive(Clone, Copy)]
pub struct Peek<A> {
    pub addr: A,
    pub port: u16,
    pub flags: u16,
    pub state: u8,
    pub node_port: u16,
    pub last_seen: u32,
}

/// Part of the entry at `key`, if there is one; the entry is only read.
#[inline(always)]
pub fn peek<M: CtMaps>(key: M::Key) -> Option<Peek<M::Addr>> {
    let (k, _) = M::slots(scratch()?);
    *k = key;
    let ptr = lookup::<M>(k)?;
    // SAFETY: a copy out of a live map value.
    Some(M::peek(unsafe { &*ptr }))
}

/// Writes the entry into `table`; the kernel's error code on failure.
#[inline(always)]
pub fn insert<M: CtMaps>(
    table: Table,
    key: M::Key,
    entry: Entry<M::Addr>,
    flags: u64,
) -> Result<(), i64> {
    let (k, v) = M::slots(scratch().ok_or(-1i64)?);
    *k = key;
    M::write_value(v, &entry);
    write::<M>(table, flags)
}

/// Inserts the scratch buffer's key and value into `table`, raising
/// `ct_overflowed` around an overflow insert.
#[inline(always)]
fn write<M: CtMaps>(table: Table, flags: u64) -> Result<(), i64> {
    let s = scratch().ok_or(-1i64)?;
    if table == Table::Main {
        return M::main_insert(s, flags);
    }
    let (k, v) = M::slots(s);
    mark_overflowed();
    let inserted = M::overflow().insert(k, v, flags);
    mark_overflowed();
    inserted.map_err(i64::from)
}

/// Puts `entry` in the scratch buffer for `insert_staged`, which may then
/// write it under several keys in turn: lookups and removals only use the
/// buffer's key slot. Spares callers with little stack a copy of it.
#[inline(always)]
pub fn stage<M: CtMaps>(entry: &Entry<M::Addr>) {
    if let Some((_, v)) = scratch().map(M::slots) {
        M::write_value(v, entry);
    }
}

/// Writes the value the last `insert` or `stage` put in the scratch buffer
/// at `key`, as `insert` would.
#[inline(always)]
pub fn insert_staged<M: CtMaps>(table: Table, key: M::Key, flags: u64) -> Result<(), i64> {
    let (k, _) = M::slots(scratch().ok_or(-1i64)?);
    *k = key;
    write::<M>(table, flags)
}

/// Removes the key from whichever table has it.
#[inline(always)]
pub fn remove<M: CtMaps>(key: M::Key) {
    if let Some((k, _)) = scratch().map(M::slots) {
        *k = key;
        M::main_remove(k);
        if overflowed() {
            let _ = M::overflow().remove(&*k);
        }
    }
}

/// The table that holds `key`: `Main` unless only the overflow table does.
#[inline(always)]
pub fn table_of<M: CtMaps>(key: M::Key) -> Table {
    let Some((k, _)) = scratch().map(M::slots) else {
        return Table::Main;
    };
    *k = key;
    match M::main_find(k) {
        Some(_) => Table::Main,
        None => Table::Overflow,
    }
}

/// Sets the port of the entry at `key` (`nat_port`, or with `node` its
/// `node_port`), in place: a racing reader sees the old port or the new
/// one, never a mix.
#[inline(always)]
pub fn set_port<M: CtMaps>(key: M::Key, port: u16, node: bool) {
    let Some((k, _)) = scratch().map(M::slots) else {
        return;
    };
    *k = key;
    if let Some(ptr) = lookup::<M>(k) {
        // SAFETY: a field of a live map value; a 16-bit store is atomic.
        unsafe {
            let fields = M::fields(ptr);
            *(if node { fields.node_port } else { fields.port }) = port;
        }
    }
}

/// Clears the entry's `active` field, atomically: its backend id if this
/// call is the one that cleared it (whichever CPU gets there first). Only
/// `Main` entries are ever active.
#[inline(always)]
pub fn deactivate<M: CtMaps>(key: M::Key) -> Option<u32> {
    let (k, _) = M::slots(scratch()?);
    *k = key;
    let ptr = M::main_find(k)?;
    // SAFETY: a live map value; its `active` field is 32-bit aligned.
    unsafe {
        let fields = M::fields(ptr);
        (atomic::swap(fields.active, 0) != 0).then(|| *fields.backend_id)
    }
}

/// The families' impls differ only in names and types: the fields are the
/// same, so one body serves both.
macro_rules! ct_maps {
    ($name:ident, $addr:ty, $key:ident, $value:ident, $main:ident, $overflow:ident, $k:ident, $v:ident) => {
        pub struct $name;

        impl CtMaps for $name {
            type Addr = $addr;
            type Key = $key;
            type Value = $value;

            #[inline(always)]
            fn key(
                src: $addr,
                sport: u16,
                dst: $addr,
                dport: u16,
                proto: u8,
                direction: u8,
            ) -> $key {
                $key {
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
            fn main_find(key: &$key) -> Option<*mut $value> {
                $main::find(key)
            }

            #[inline(always)]
            fn main_insert(s: &CtScratch, flags: u64) -> Result<(), i64> {
                $main::insert(s, flags)
            }

            #[inline(always)]
            fn main_remove(key: &$key) {
                $main::remove(key)
            }

            #[inline(always)]
            fn overflow() -> &'static Overflow<$key, $value> {
                &$overflow
            }

            #[inline(always)]
            fn slots(s: &mut CtScratch) -> (&mut $key, &mut $value) {
                (&mut s.$k, &mut s.$v)
            }

            #[inline(always)]
            fn proto(key: &$key) -> u8 {
                key.proto
            }

            #[inline(always)]
            fn direction(key: &$key) -> u8 {
                key.direction
            }

            #[inline(always)]
            fn write_value(v: &mut $value, e: &Entry<$addr>) {
                v.nat_addr = e.addr;
                v.nat_port = e.port;
                v.flags = e.flags;
                v.backend_id = e.backend_id;
                v.service_id = e.service_id;
                v.last_seen = e.last_seen;
                v.state = e.state;
                v.reply_state = e.reply_state;
                v.node_port = e.node_port;
                v.active = e.active;
            }

            #[inline(always)]
            fn entry(v: &$value) -> Entry<$addr> {
                Entry {
                    addr: v.nat_addr,
                    port: v.nat_port,
                    flags: v.flags,
                    backend_id: v.backend_id,
                    service_id: v.service_id,
                    last_seen: v.last_seen,
                    state: v.state,
                    reply_state: v.reply_state,
                    node_port: v.node_port,
                    active: v.active,
                    direction: 0,
                }
            }

            #[inline(always)]
            fn service_id(v: &$value) -> u32 {
                v.service_id
            }

            #[inline(always)]
            fn peek(v: &$value) -> Peek<$addr> {
                Peek {
                    addr: v.nat_addr,
                    port: v.nat_port,
                    flags: v.flags,
                    state: v.state,
                    node_port: v.node_port,
                    last_seen: v.last_seen,
                }
            }

            #[inline(always)]
            unsafe fn fields(v: *mut $value) -> Fields {
                // SAFETY: the caller's.
                unsafe {
                    Fields {
                        port: &raw mut (*v).nat_port,
                        last_seen: &raw mut (*v).last_seen,
                        state: &raw mut (*v).state,
                        reply_state: &raw mut (*v).reply_state,
                        active: &raw mut (*v).active,
                        flags: &raw mut (*v).flags,
                        backend_id: &raw mut (*v).backend_id,
                        node_port: &raw mut (*v).node_port,
                    }
                }
            }
        }
    };
}

ct_maps!(Ct4, u32, Ct4Key, Ct4Entry, Lines4, OVERFLOW4, key4, value4);
ct_maps!(
    Ct6, Addr6, Ct6Key, Ct6Entry, Lines6, OVERFLOW6, key6, value6
);
