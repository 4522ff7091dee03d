//! Types shared by the kernel programs (`proxy-ebpf`) and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so that both
//! sides agree on the layout byte for byte and BTF shows every field.
//! Addresses and ports are stored in network byte order, exactly as they sit
//! in the packet, so the datapath never swaps bytes.
//!
//! IPv4 types carry a `4` in their name. Family-independent types (service
//! entries, slots, statistics) are shared, so IPv6 maps can be added beside
//! the IPv4 ones without changing them.
#![no_std]

pub mod crc32c;
pub mod csum;
pub mod maps;
pub mod mix;

pub use maps::*;

/// The project's name: the bpffs directory under which everything is pinned.
pub const PROJECT: &str = "xdproxy";

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
