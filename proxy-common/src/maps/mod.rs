//! Map names, limits, keys and values, shared by the kernel programs and
//! the agent, one file per job (as Cilium splits its headers): `lb`,
//! `filter`, `conntrack`, `config`, `socket`, `frag`, `stats`, `bench`, and the
//! `names` of maps and `programs`. Everything is re-exported here (and from
//! the crate root), so `proxy_common::maps::X` and `proxy_common::X` name
//! the same item whichever file holds it.

mod bench;
mod config;
mod conntrack;
mod ctlines;
mod filter;
mod frag;
mod lb;
pub mod names;
pub mod programs;
mod socket;
mod stats;

pub use bench::*;
pub use config::*;
pub use conntrack::*;
pub use ctlines::*;
pub use filter::*;
pub use frag::*;
pub use lb::*;
pub use socket::*;
pub use stats::*;

/// An IPv6 address as four 32-bit words in network byte order, exactly as
/// in the packet.
pub type Addr6 = [u32; 4];

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Frontend4>(), 8);
        assert_eq!(size_of::<Service>(), 28);
        assert_eq!(size_of::<NewFlows>(), 40 + 52);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend4>(), 8);
        assert_eq!(size_of::<Ct4Key>(), 16);
        assert_eq!(size_of::<Ct4Entry>(), 28);
        assert_eq!(size_of::<ServiceStats>(), 16);
        assert_eq!(size_of::<ServiceStatsEntry>(), 16 * 64);
        assert_eq!(size_of::<BackendStatsEntry>(), 8 * 64);
        assert_eq!(size_of::<MemberKey>(), 8);
        assert_eq!(size_of::<Affinity4Key>(), 8);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<SourceRange4>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 40);
        assert_eq!(size_of::<Frontend6>(), 20);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<Ct6Key>(), 40);
        assert_eq!(size_of::<Ct6Entry>(), 40);
        assert_eq!(size_of::<BackendStats>(), 8);
        assert_eq!(size_of::<Affinity6Key>(), 20);
        assert_eq!(size_of::<SourceRange6>(), 20);
        assert_eq!(size_of::<SockNat4Key>(), 16);
        assert_eq!(size_of::<SockNat4>(), 24);
        assert_eq!(size_of::<SockNat6Key>(), 32);
        assert_eq!(size_of::<SockNat6>(), 40);
        assert_eq!(size_of::<Frag4Key>(), 12);
        assert_eq!(size_of::<Frag4Entry>(), 8);
        assert_eq!(size_of::<Frag6Key>(), 40);
        assert_eq!(size_of::<Frag6Entry>(), 20);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in names::ALL {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
