//! What `lb_filter` should hold (see `proxy_common::filter`), without the
//! I/O (`maps` writes the words this returns).
//!
//! A bit is raised before any entry names its item, so no packet of a
//! service or reply is ever passed over. It is lowered only by a rebuild
//! from everything the maps hold: a frontend's once its entry went (a
//! packet to it then misses anyway); a backend's only `linger` after it
//! went, as conntrack may still hold flows to it whose replies need their
//! reverse NAT: a reply from a backend that left does not keep its entry
//! alive, and a client's packet moves the flow to another backend, so
//! after the longest conntrack timeout none is left. Bits found in the
//! map at start linger the same way: an earlier agent's backends may have
//! gone while none ran.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use proxy_common::{
    Backend4, Backend6, FILTER_WORDS, FilterSet, Frontend4, Frontend6, filter_addr4, filter_addr6,
    filter_bit, filter_word,
};

use super::keys::{self, BackendValue, FrontendKey};
use crate::{model::Frontend, reconcile::BackendKey};

/// At most one rebuild this often: Services coming and going cost one
/// pass over all items a second, not one per change.
const REBUILD_EVERY: Duration = Duration::from_secs(1);

/// Lingering bits are lowered together, once the oldest is over by this
/// much: a node whose endpoints churn rebuilds once a minute for them.
const LINGER_BATCH: Duration = Duration::from_secs(60);

/// An entry of the service maps as the filter sees it.
pub trait FilterKey {
    fn filter_bit(&self) -> u32;
}

impl FilterKey for Frontend4 {
    fn filter_bit(&self) -> u32 {
        filter_bit(
            FilterSet::Frontend,
            filter_addr4(self.addr),
            self.port,
            self.proto,
        )
    }
}

impl FilterKey for Frontend6 {
    fn filter_bit(&self) -> u32 {
        filter_bit(
            FilterSet::Frontend,
            filter_addr6(self.addr),
            self.port,
            self.proto,
        )
    }
}

impl FilterKey for Backend4 {
    fn filter_bit(&self) -> u32 {
        filter_bit(FilterSet::Backend, filter_addr4(self.addr), self.port, 0)
    }
}

impl FilterKey for Backend6 {
    fn filter_bit(&self) -> u32 {
        filter_bit(FilterSet::Backend, filter_addr6(self.addr), self.port, 0)
    }
}

/// The bit of a frontend: its address, port and protocol.
pub fn frontend_bit(frontend: &Frontend) -> u32 {
    match keys::frontend(frontend) {
        FrontendKey::V4(f) => f.filter_bit(),
        FrontendKey::V6(f) => f.filter_bit(),
    }
}

/// The bit of a backend: the address and port its replies come from.
pub fn backend_bit(backend: &BackendKey) -> u32 {
    match keys::backend(backend) {
        BackendValue::V4(b) => b.filter_bit(),
        BackendValue::V6(b) => b.filter_bit(),
    }
}

/// Word writes: (index, value).
pub type Words = Vec<(u32, u64)>;

pub struct Bits {
    /// The words as written.
    words: Vec<u64>,
    linger: Duration,
    /// Backends gone, oldest first: (until when their bit stays, bit).
    lingering: VecDeque<(Instant, u32)>,
    /// The words found at start, and until when they stay.
    inherited: Option<(Instant, Vec<u64>)>,
    /// A frontend went since the last rebuild (or its writes failed).
    removed: bool,
    rebuilt: Option<Instant>,
}

impl Bits {
    /// The filter as found in the map (`found`, all zero if new).
    pub fn new(found: Vec<u64>, linger: Duration, now: Instant) -> Bits {
        let any = found.iter().any(|w| *w != 0);
        Bits {
            inherited: any.then(|| (now + linger, found.clone())),
            words: found,
            linger,
            lingering: VecDeque::new(),
            removed: false,
            rebuilt: None,
        }
    }

    /// The writes that raise `bits`; `raised` records them once written.
    pub fn raise(&self, bits: impl IntoIterator<Item = u32>) -> Words {
        let mut changed: std::collections::BTreeMap<u32, u64> = Default::default();
        for bit in bits {
            let (word, mask) = filter_word(bit);
            let value = changed.entry(word).or_insert(self.words[word as usize]);
            *value |= mask;
        }
        (changed.into_iter())
            .filter(|(word, value)| self.words[*word as usize] != *value)
            .collect()
    }

    /// Bits raised, as written.
    pub fn raised(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Records words as written.
    pub fn written(&mut self, words: &[(u32, u64)]) {
        for (word, value) in words {
            self.words[*word as usize] = *value;
        }
    }

    pub fn frontend_gone(&mut self) {
        self.removed = true;
    }

    /// Needs no rebuild before its lingering is over.
    pub fn backend_gone(&mut self, bit: u32, now: Instant) {
        self.lingering.push_back((now + self.linger, bit));
    }

    /// The writes that bring the words to `live` (the bits of every item
    /// the maps hold) and what still lingers; none if no rebuild is due.
    /// `written` records them.
    pub fn rebuild(&mut self, live: impl IntoIterator<Item = u32>, now: Instant) -> Words {
        if !self.due(now) {
            return Vec::new();
        }
        while self
            .lingering
            .front()
            .is_some_and(|(until, _)| *until <= now)
        {
            self.lingering.pop_front();
        }
        if self
            .inherited
            .as_ref()
            .is_some_and(|(until, _)| *until <= now)
        {
            self.inherited = None;
        }
        let mut want = match &self.inherited {
            Some((_, found)) => found.clone(),
            None => vec![0; FILTER_WORDS as usize],
        };
        let lingering = self.lingering.iter().map(|(_, bit)| *bit);
        for bit in live.into_iter().chain(lingering) {
            let (word, mask) = filter_word(bit);
            want[word as usize] |= mask;
        }
        self.removed = false;
        self.rebuilt = Some(now);
        (0u32..)
            .zip(want)
            .filter(|(word, value)| self.words[*word as usize] != *value)
            .collect()
    }

    /// A rebuild's words were not all written: the next one is due.
    pub fn unsettled(&mut self) {
        self.removed = true;
    }

    /// A frontend went, the oldest lingering bit is over by
    /// `LINGER_BATCH`, or the inherited words are over; and the last
    /// rebuild is `REBUILD_EVERY` ago.
    fn due(&self, now: Instant) -> bool {
        let lingered =
            (self.lingering.front()).is_some_and(|(until, _)| *until + LINGER_BATCH <= now);
        let inherited = (self.inherited.as_ref()).is_some_and(|(until, _)| *until <= now);
        let over = self.removed || lingered || inherited;
        over && self.rebuilt.is_none_or(|at| now >= at + REBUILD_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_secs(100);

    fn raised(bits: &Bits, bit: u32) -> bool {
        let (word, mask) = filter_word(bit);
        bits.words[word as usize] & mask != 0
    }

    fn raise(bits: &mut Bits, items: &[u32]) {
        let words = bits.raise(items.iter().copied());
        bits.written(&words);
    }

    fn rebuild(bits: &mut Bits, live: &[u32], now: Instant) -> usize {
        let words = bits.rebuild(live.iter().copied(), now);
        bits.written(&words);
        words.len()
    }

    #[test]
    fn raising_writes_only_words_that_change() {
        let mut bits = Bits::new(vec![0; FILTER_WORDS as usize], LINGER, Instant::now());
        assert_eq!(bits.raise([1, 2, 64]).len(), 2);
        raise(&mut bits, &[1, 2, 64]);
        assert!(raised(&bits, 1) && raised(&bits, 64) && !raised(&bits, 3));
        assert_eq!(bits.raised(), 3);
        assert!(bits.raise([1, 64]).is_empty());
    }

    #[test]
    fn a_frontend_goes_at_the_next_rebuild_a_backend_after_it_lingered() {
        let start = Instant::now();
        let mut bits = Bits::new(vec![0; FILTER_WORDS as usize], LINGER, start);
        let (frontend, backend, other) = (7, 900, 5000);
        raise(&mut bits, &[frontend, backend, other]);
        assert_eq!(rebuild(&mut bits, &[frontend, backend, other], start), 0);
        bits.frontend_gone();
        bits.backend_gone(backend, start);
        rebuild(&mut bits, &[other], start + REBUILD_EVERY);
        assert!(!raised(&bits, frontend), "a frontend that went is cleared");
        assert!(raised(&bits, backend), "a backend that went lingers");
        assert!(raised(&bits, other));
        rebuild(&mut bits, &[other], start + LINGER);
        assert!(raised(&bits, backend), "lowered with others a minute later");
        rebuild(&mut bits, &[other], start + LINGER + LINGER_BATCH);
        assert!(!raised(&bits, backend), "cleared once its flows are over");
        assert!(raised(&bits, other));
    }

    #[test]
    fn rebuilds_wait_for_a_removal_and_come_at_most_once_a_second() {
        let start = Instant::now();
        let mut bits = Bits::new(vec![0; FILTER_WORDS as usize], LINGER, start);
        raise(&mut bits, &[1, 2]);
        assert_eq!(rebuild(&mut bits, &[1], start), 0, "nothing went");
        bits.frontend_gone();
        assert_eq!(rebuild(&mut bits, &[1], start), 1);
        raise(&mut bits, &[2]);
        bits.frontend_gone();
        assert_eq!(rebuild(&mut bits, &[1], start), 0, "too soon");
        assert!(raised(&bits, 2));
        assert_eq!(rebuild(&mut bits, &[1], start + REBUILD_EVERY), 1);
        assert!(!raised(&bits, 2));
    }

    #[test]
    fn bits_found_at_start_linger() {
        let start = Instant::now();
        let mut found = vec![0; FILTER_WORDS as usize];
        found[3] = 1;
        let mut bits = Bits::new(found, LINGER, start);
        bits.frontend_gone();
        rebuild(&mut bits, &[], start);
        assert!(
            raised(&bits, 3 * 64),
            "an earlier agent's backend may have flows"
        );
        assert_eq!(rebuild(&mut bits, &[], start + LINGER), 1);
        assert!(!raised(&bits, 3 * 64));
    }

    #[test]
    fn a_backend_back_before_its_lingering_ends_stays() {
        let start = Instant::now();
        let mut bits = Bits::new(vec![0; FILTER_WORDS as usize], LINGER, start);
        raise(&mut bits, &[40]);
        bits.backend_gone(40, start);
        assert_eq!(rebuild(&mut bits, &[40], start + LINGER + LINGER_BATCH), 0);
        assert!(raised(&bits, 40));
    }
}
