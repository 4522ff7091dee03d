//! `lb_filter` read (see `proxy_common::filter`): may a packet be a
//! service's, or a reply of a tracked flow? A "no" is certain, and spares
//! the hash-map lookups that would have missed.

use proxy_common::{Addr6, FilterSet, filter_addr4, filter_addr6, filter_bit, filter_word};

use crate::{maps::FILTER, parse::Flow};

/// An address folded as the agent folds it for the filter.
pub trait FilterAddr: Copy {
    fn filter_addr(self) -> u32;
}

impl FilterAddr for u32 {
    #[inline(always)]
    fn filter_addr(self) -> u32 {
        filter_addr4(self)
    }
}

impl FilterAddr for Addr6 {
    #[inline(always)]
    fn filter_addr(self) -> u32 {
        filter_addr6(self)
    }
}

/// False if no frontend has the packet's destination.
#[inline(always)]
pub fn may_be_frontend<A: FilterAddr>(flow: &Flow<A>) -> bool {
    raised(filter_bit(
        FilterSet::Frontend,
        flow.daddr.filter_addr(),
        flow.dport,
        flow.proto,
    ))
}

/// False if no backend has the packet's source: no flow's reply.
#[inline(always)]
pub fn may_be_backend<A: FilterAddr>(flow: &Flow<A>) -> bool {
    raised(filter_bit(
        FilterSet::Backend,
        flow.saddr.filter_addr(),
        flow.sport,
        0,
    ))
}

#[inline(always)]
fn raised(bit: u32) -> bool {
    let (word, mask) = filter_word(bit);
    // Always found: `filter_word` stays inside the array.
    FILTER.get(word).is_none_or(|w| *w & mask != 0)
}
