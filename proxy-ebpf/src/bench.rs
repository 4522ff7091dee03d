//! Benchmark support, never attached by the agent.
//!
//! BPF_PROG_TEST_RUN with repeat > 1 does not restore the packet between
//! runs, so a program that rewrites it would time a different path from the
//! second run on. This wrapper puts the saved packet head back first (and,
//! for new-flow runs, gives it a source never seen before), then tail-calls
//! the program under test. The baseline is the same wrapper calling the empty
//! program, so the copy cancels out.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ProgramArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use proxy_common::{BENCH_HEAD, BenchPacket};

use crate::parse::ptr_at;

#[btf_map(name = "bench_packet")]
static BENCH_PACKET: Array<BenchPacket, 1> = Array::new();

#[btf_map(name = "bench_target")]
static BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

#[xdp]
pub fn xdproxy_bench(ctx: XdpContext) -> u32 {
    restore(&ctx);
    // SAFETY: a tail call either jumps or returns here when the slot is empty.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[inline(always)]
fn restore(ctx: &XdpContext) {
    let (Some(saved), Some(head)) = (
        BENCH_PACKET.get_ptr_mut(0),
        ptr_at::<[u8; BENCH_HEAD]>(ctx.data(), ctx.data_end(), 0),
    ) else {
        return;
    };
    // SAFETY: both pointers were checked (map value, packet bounds).
    unsafe {
        *head = (*saved).head;
        if (*saved).vary_source != 0 {
            let seq = (*saved).seq;
            (*saved).seq = seq.wrapping_add(1);
            // Source address bytes 2-3 and source port: 2^32 distinct flows.
            let bytes = seq.to_be_bytes();
            (*head)[28] = bytes[0];
            (*head)[29] = bytes[1];
            (*head)[34] = bytes[2];
            (*head)[35] = bytes[3];
        }
    }
}
