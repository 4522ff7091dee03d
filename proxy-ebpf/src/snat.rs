//! Source NAT ports: which node port a source-NATed flow leaves with.
//!
//! A new flow has no port yet: its `CT_SOCKET` entry's `node_port` is 0 (or,
//! for a flow with a pair of entries, its outward entry, written at
//! ingress, has port 0); the egress hook picks the port on the flow's first
//! packet there. Egress runs after forwarding, with a small stack, so the
//! search can afford many tries, and it can drop a packet that finds no
//! port instead of letting it leave with the client's address.
//!
//! A port is free for a backend when neither conntrack table has a reply
//! entry (backend -> node:port), or when that entry's flow has been idle
//! for the protocol's source NAT idle time: then the old flow gives the
//! port up, and its entry goes back to no port, so that if it ever sends
//! again it gets a port of its own instead of sharing this one.

use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::bpf_loop};
use proxy_common::{
    CT_REPLY, CT_REWRITE_DST, CT_UNREPLIED, IPPROTO_UDP, SNAT_IDLE_DATAGRAM, SNAT_IDLE_STREAM,
};

use crate::{
    ct,
    ctmap::{self, CtMaps, Entry, Peek, Seen, Table},
    family::Family,
    maps::CONFIG,
    parse::Flow,
    random::random,
};

/// Ports tried for one flow. Ranges this small or smaller are searched
/// whole, from a random port on; larger ones at random.
const TRIES: u32 = 32;

/// The kernel's answer to an insert into a full hash map.
const E2BIG: i64 = 7;

/// Where a flow's node port is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Its `CT_SOCKET` entry's `node_port`.
    Socket,
    /// Its pair's outward entry (`CT_OUTWARD`, the port in `nat_port`).
    Outward,
}

/// Picks a node port `node` for the flow whose entry `of` (its socket or
/// outward entry, as `holder` says) has none yet (the packet is client ->
/// backend), writes the reply entry that takes the backend's answers back
/// to the client, and records the port in that entry. None if no port is
/// free.
#[inline(always)]
pub fn claim<F: Family>(
    flow: &Flow<F::Addr>,
    of: &Entry<F::Addr>,
    node: F::Addr,
    holder: Holder,
) -> Option<u16> {
    let config = CONFIG.get(0)?;
    let (min, max) = (config.snat_port_min, config.snat_port_max);
    if max < min {
        return None;
    }
    let key = match holder {
        Holder::Socket => ct::socket_key::<F>(flow.saddr, flow.sport, flow.proto),
        Holder::Outward => F::Ct::key(
            flow.saddr, flow.sport, flow.daddr, flow.dport, flow.proto, CT_REPLY,
        ),
    };
    // The reply entry each try writes waits in the scratch buffer, not on
    // the stack, which the search (in its own frame) needs.
    F::ct_stage(&Entry {
        addr: flow.saddr,
        port: flow.sport,
        flags: CT_REWRITE_DST | CT_UNREPLIED,
        last_seen: ctmap::now(),
        reply_state: 0,
        node_port: 0,
        active: 0,
        ..*of
    });
    let mut claim = Claim::<F> {
        // The flow's entries stay together: overflow flows are evicted whole.
        table: F::ct_table(key),
        key,
        socket: holder == Holder::Socket,
        backend: flow.daddr,
        node,
        backend_port: flow.dport,
        proto: flow.proto,
        min,
        range: u32::from(max - min) + 1,
        start: random(),
        port: 0,
    };
    // A port found free is taken here, outside the search: written from
    // the search's frame, the entry's insert would add its own frame to
    // the search's and TC egress's, past BPF's 512 bytes. Another CPU may
    // take the port in between (-EEXIST): then this packet finds none and
    // is dropped as when all are taken, and its retransmission searches
    // again. (A second round made the verifier walk TC egress 76k -> 191k
    // instructions.)
    // bpf_loop: the verifier checks a try once, not once per turn.
    // SAFETY: the callback and its context match what it expects.
    unsafe {
        bpf_loop(
            TRIES,
            try_port::<F> as *mut c_void,
            (&raw mut claim).cast(),
            0,
        )
    };
    // Port 0 is what pending means: never a port picked.
    if claim.port == 0 {
        return None;
    }
    let back = F::Ct::key(
        claim.backend,
        claim.backend_port,
        claim.node,
        claim.port,
        claim.proto,
        CT_REPLY,
    );
    insert::<F>(claim.table, back).ok()?;
    F::ct_set_port(claim.key, claim.port, claim.socket);
    Some(claim.port)
}

/// A port search: what each try needs, and its outcome (`port`, 0 while
/// none is found).
struct Claim<F: Family> {
    /// The key of the entry that keeps the port.
    key: F::CtKey,
    /// That entry is a `CT_SOCKET` one (`node_port`), not an outward one.
    socket: bool,
    backend: F::Addr,
    node: F::Addr,
    backend_port: u16,
    proto: u8,
    table: Table,
    min: u16,
    range: u32,
    start: u32,
    /// The port found free, 0 while none is.
    port: u16,
}

/// One try: the `i`th port; 1 (stop) once one is found free.
extern "C" fn try_port<F: Family>(i: u64, claim: *mut Claim<F>) -> i64 {
    // SAFETY: bpf_loop passes the context it was given.
    let c = unsafe { &mut *claim };
    let offset = match c.range <= TRIES {
        true => c.start.wrapping_add(i as u32),
        false => random(),
    };
    // `range` is never 0; checked, so that no panic path reaches the verifier.
    let port = ((u32::from(c.min) + offset.checked_rem(c.range).unwrap_or(0)) as u16).to_be();
    let back = F::Ct::key(c.backend, c.backend_port, c.node, port, c.proto, CT_REPLY);
    if !free::<F>(c, back, port) {
        return 0;
    }
    c.port = port;
    1
}

/// True if no flow holds the reply entry `back` (from the flow's backend
/// to node port `port`), in either table; an idle holder gives it up.
#[inline(always)]
fn free<F: Family>(c: &Claim<F>, back: F::CtKey, port: u16) -> bool {
    // Only part of the entry is copied: the search's frame, which the
    // conntrack calls it makes add to, has little stack left.
    let Some(holder) = F::ct_peek(back) else {
        return true;
    };
    let limit = match c.proto {
        IPPROTO_UDP => SNAT_IDLE_DATAGRAM,
        _ => SNAT_IDLE_STREAM,
    };
    if ctmap::now().wrapping_sub(holder.last_seen) <= limit {
        return false;
    }
    F::ct_remove(back);
    give_up::<F>(c, &holder, port);
    true
}

/// The idle flow that held node port `port` towards this flow's backend
/// (its reply entry `holder` names its client) no longer has it.
#[inline(always)]
fn give_up<F: Family>(c: &Claim<F>, holder: &Peek<F::Addr>, port: u16) {
    let out = F::Ct::key(
        holder.addr,
        holder.port,
        c.backend,
        c.backend_port,
        c.proto,
        CT_REPLY,
    );
    // Keyed client -> backend: only an outward entry can be there.
    if F::ct_get_where(out, Seen::Nothing, |e| e.port == port).is_some() {
        F::ct_set_port(out, 0, false);
        return;
    }
    let socket = ct::socket_key::<F>(holder.addr, holder.port, c.proto);
    let held =
        |e: &Entry<F::Addr>| e.node_port == port && e.addr == c.backend && e.port == c.backend_port;
    if F::ct_get_where(socket, Seen::Nothing, held).is_some() {
        F::ct_set_port(socket, 0, true);
    }
}

/// Inserts the staged reply entry at `key`; into the overflow table when
/// the main one is full.
#[inline(always)]
fn insert<F: Family>(table: Table, key: F::CtKey) -> Result<(), i64> {
    match F::ct_insert_staged(table, key, BPF_NOEXIST as u64) {
        Err(e) if e == -E2BIG && table == Table::Main => {
            F::ct_insert_staged(Table::Overflow, key, BPF_NOEXIST as u64)
        }
        other => other,
    }
}
