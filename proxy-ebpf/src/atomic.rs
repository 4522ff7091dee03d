//! Atomic read-modify-write on map values shared by all CPUs. The BPF
//! target has no `core::sync::atomic` read-modify-write types; the
//! intrinsics lower to BPF_ATOMIC instructions (fetching forms need
//! `-C target-cpu=v3`, kernel 5.12 or later).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg};

/// `*ptr += value`; the value before.
///
/// # Safety
/// `ptr` points into a live map value, 4-byte aligned.
#[inline(always)]
pub unsafe fn fetch_add(ptr: *mut u32, value: u32) -> u32 {
    // SeqCst, not Relaxed: LLVM's BPF backend lowers a relaxed add to the
    // non-fetching form and hands back the addend as the "old" value (round
    // robin then always took the same slot).
    // SAFETY: as the caller promised.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(ptr, value) }
}

/// `*ptr = value`; the value before.
///
/// # Safety
/// As `fetch_add`.
#[inline(always)]
pub unsafe fn swap(ptr: *mut u32, value: u32) -> u32 {
    // SAFETY: as the caller promised.
    unsafe { atomic_xchg::<u32, { AtomicOrdering::Relaxed }>(ptr, value) }
}

/// `*ptr = new` if it still holds `old`; true if it did.
///
/// # Safety
/// As `fetch_add`.
#[inline(always)]
pub unsafe fn compare_exchange(ptr: *mut u32, old: u32, new: u32) -> bool {
    // SAFETY: as the caller promised.
    unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(ptr, old, new).1
    }
}
