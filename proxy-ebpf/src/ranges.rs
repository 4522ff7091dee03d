//! loadBalancerSourceRanges: which clients a service admits.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::SourceRange4;

use crate::maps::SOURCE_RANGES4;

/// True if `client` lies in one of the service's ranges.
#[inline(always)]
pub fn admits(service_id: u32, client: u32) -> bool {
    let key = Key::new(
        64,
        SourceRange4 {
            service_id_be: service_id.to_be(),
            addr: client,
        },
    );
    SOURCE_RANGES4.get(&key).is_some()
}
