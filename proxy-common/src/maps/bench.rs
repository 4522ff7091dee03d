//! The benchmark wrapper's saved packet (`bench_packet`).

/// Bytes of packet head the benchmark wrapper restores: Ethernet, IPv4
/// without options, TCP without options, and 10 bytes to spare.
pub const BENCH_HEAD: usize = 64;

/// The benchmark wrapper's saved packet (see proxy-ebpf's bench.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchPacket {
    pub head: [u8; BENCH_HEAD],
    /// Non-zero: every run gets a source address and port not seen before.
    pub vary_source: u32,
    pub seq: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no invalid bit patterns.
    unsafe impl aya::Pod for BenchPacket {}
}
