//! Each family's ring of flows their clients closed, oldest first
//! (`ct4_closed`/`ct6_closed`, ends in `ct_closed_ends`). Conntrack puts a
//! flow here when it closes and takes the oldest due ones back when a new
//! flow finds the table full (see `ct::reclaim`): the datapath frees what
//! closed flows hold without waiting for the agent's garbage collection.
//!
//! Positions only grow (wrapping); any CPU fills the tail and any CPU
//! advances the head, with atomics on the ends. A slot carries the position
//! it was written for, so that a reader can tell a slot being written or
//! already written over; whoever takes a flow from the ring checks its
//! conntrack entries before touching them, so a slot read mid-write costs
//! at most that flow's early reclaim being skipped.

use proxy_common::{CT_REAP_WAIT, ClosedFlow, MAX_CT_CLOSED, RingEnds, csum::Words};

use crate::{atomic, copy, family::Family, maps::CLOSED_ENDS, parse::Tuple};

const MASK: u32 = MAX_CT_CLOSED - 1;
const _: () = assert!(MAX_CT_CLOSED.is_power_of_two());

#[inline(always)]
fn ends<F: Family>() -> Option<*mut RingEnds> {
    CLOSED_ENDS.get_ptr_mut(F::RING)
}

/// Puts `flow` at the tail, stamped `now`.
#[inline(always)]
pub fn push<F: Family>(flow: &impl Tuple<F::Addr>, now: u32) {
    let Some(ends) = ends::<F>() else {
        return;
    };
    // SAFETY: a field of a live array value, 32-bit aligned.
    let at = unsafe { atomic::fetch_add(&raw mut (*ends).tail, 1) };
    let Some(slot) = F::closed_slot(at & MASK) else {
        return;
    };
    // SAFETY: a live array value; a racing reader is handled (see above).
    unsafe { write(slot, flow, now, at) };
}

/// Writes a ring entry field by field, its padding left alone: assigned
/// whole it became a `memset`/`memmove` call (see `copy`).
///
/// # Safety
/// `to` must point to a live `ClosedFlow`.
#[inline(always)]
unsafe fn write<A: Copy + Words>(
    to: *mut ClosedFlow<A>,
    flow: &impl Tuple<A>,
    closed_at: u32,
    seq: u32,
) {
    // SAFETY: fields of `to`, per the caller.
    unsafe {
        copy::store_addr((&raw mut (*to).client_addr).cast(), &flow.saddr());
        copy::store_addr((&raw mut (*to).frontend_addr).cast(), &flow.daddr());
        (*to).client_port = flow.sport();
        (*to).frontend_port = flow.dport();
        (*to).proto = flow.proto();
        (*to).closed_at = closed_at;
        (*to).seq = seq;
    }
}

/// Takes the oldest flow off the ring, into this CPU's scratch, if it has
/// waited `CT_REAP_WAIT`; None when the ring is empty or its oldest flow is
/// not due (nor, then, any later one). Slots written over before their
/// turn are skipped.
#[inline(always)]
pub fn take_due<F: Family>(now: u32) -> Option<&'static ClosedFlow<F::Addr>> {
    let ends = ends::<F>()?;
    // SAFETY: a live array value; a stale read fails the exchange below.
    let RingEnds { head, tail } = unsafe { *ends };
    if head == tail {
        return None;
    }
    let next = match tail.wrapping_sub(head) > MAX_CT_CLOSED {
        true => tail.wrapping_sub(MAX_CT_CLOSED),
        false => head,
    };
    let flow = F::closed_scratch()?;
    let slot = F::closed_slot(next & MASK)?;
    // SAFETY: a copy out of a live array value into the scratch.
    unsafe { write(flow, &*slot, (*slot).closed_at, (*slot).seq) };
    let whole = flow.seq == next;
    if whole && now.wrapping_sub(flow.closed_at) < CT_REAP_WAIT {
        return None;
    }
    // SAFETY: a field of a live array value, 32-bit aligned.
    let taken =
        unsafe { atomic::compare_exchange(&raw mut (*ends).head, head, next.wrapping_add(1)) };
    (taken && whole).then_some(flow)
}

impl<A: Copy> Tuple<A> for ClosedFlow<A> {
    #[inline(always)]
    fn saddr(&self) -> A {
        self.client_addr
    }
    #[inline(always)]
    fn daddr(&self) -> A {
        self.frontend_addr
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.client_port
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.frontend_port
    }
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
}
