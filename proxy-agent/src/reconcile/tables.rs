//! Slot tables: `lb_slots` holds one copy of each distinct slot content (a
//! Maglev table, or a list of backends), under a table id that service
//! entries name (`Service::slots_id`). Frontends whose slots would be equal
//! share it, so a Service's cluster IP, node ports and external IPs cost one
//! table, not one each.
//!
//! Make before break: a changed frontend gets a new table (or an existing
//! equal one) written in full before its entry points at it; a table is
//! deleted only once no entry points at it; and its id is handed out again
//! only in a later pass, so a packet that read an entry just before the
//! switch never reads another table's slots under the old id.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
};

use super::{Holds, Maps, Report, ids::Ids, slot_key};

/// SlotTable ids: at most one table per frontend entry (both families), plus
/// those waiting to be deleted or reused.
pub const TABLE_IDS: u32 = 4 * proxy_common::MAX_SERVICES;

/// One table in use.
#[derive(Debug)]
struct SlotTable {
    /// Backend id of each slot, as written.
    slots: Vec<u32>,
    /// Frontends whose entry names it.
    users: usize,
    hash: u64,
}

/// Slots to delete: of a table nobody uses, or found at adoption.
#[derive(Debug, Default)]
struct Doomed {
    /// Slot and the backend it holds (None: not counted in `Holds`),
    /// deleted from the end.
    slots: Vec<(u32, Option<u32>)>,
    /// The id goes back once they are gone (false: slots beyond the end of
    /// a table still in use).
    frees_id: bool,
}

#[derive(Debug)]
pub struct SlotTables {
    ids: Ids,
    live: BTreeMap<u32, SlotTable>,
    /// Content hash -> live tables with it.
    by_hash: HashMap<u64, Vec<u32>>,
    doomed: BTreeMap<u32, Doomed>,
    /// Ids freed in this pass: reused from the next one.
    cooling: Vec<u32>,
    /// `lb_slots` entries written and not yet deleted.
    used: u64,
    /// `lb_slots`' capacity.
    capacity: u64,
}

/// The pass cannot write a table without going past `lb_slots`' capacity.
#[derive(Debug)]
pub struct SlotsFull {
    pub used: u64,
    pub wanted: u64,
    pub capacity: u64,
}

impl std::fmt::Display for SlotsFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lb_slots is full: {} of {} entries in use, a new table needs {}",
            self.used, self.capacity, self.wanted
        )
    }
}

impl std::error::Error for SlotsFull {}

fn content_hash(slots: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    slots.hash(&mut h);
    h.finish()
}

impl SlotTables {
    pub fn new(capacity: u32) -> Self {
        SlotTables {
            ids: Ids::new(TABLE_IDS),
            live: BTreeMap::new(),
            by_hash: HashMap::new(),
            doomed: BTreeMap::new(),
            cooling: Vec::new(),
            used: 0,
            capacity: u64::from(capacity),
        }
    }

    /// SlotTables in use.
    pub fn count(&self) -> usize {
        self.live.len()
    }

    /// `lb_slots` entries the maps hold (as far as known).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The slots of table `id` (None: no such table; id 0 is none).
    pub fn content(&self, id: u32) -> Option<&[u32]> {
        self.live.get(&id).map(|t| t.slots.as_slice())
    }

    /// At the start of a pass: ids freed by earlier passes may go out
    /// again, and what could not be deleted before is tried again.
    pub fn begin_pass(&mut self, maps: &mut dyn Maps, holds: &mut Holds, report: &mut Report) {
        for id in std::mem::take(&mut self.cooling) {
            self.ids.give_back(id);
        }
        let pending: Vec<u32> = self.doomed.keys().copied().collect();
        for id in pending {
            self.delete(id, maps, holds, report);
        }
    }

    /// A table with these slots, for one more user: an equal one if there
    /// is one, else a new one written in full (0 for no slots: no table).
    pub fn acquire(
        &mut self,
        slots: &[u32],
        maps: &mut dyn Maps,
        holds: &mut Holds,
        report: &mut Report,
    ) -> anyhow::Result<u32> {
        if slots.is_empty() {
            return Ok(0);
        }
        let hash = content_hash(slots);
        if let Some(id) = self.find(hash, slots) {
            if let Some(table) = self.live.get_mut(&id) {
                table.users += 1;
            }
            return Ok(id);
        }
        let wanted = slots.len() as u64;
        if self.used + wanted > self.capacity {
            return Err(SlotsFull {
                used: self.used,
                wanted,
                capacity: self.capacity,
            }
            .into());
        }
        let id = self
            .ids
            .take()
            .ok_or_else(|| anyhow::anyhow!("no slot table id left"))?;
        let (written, failed) = match maps.set_slots(id, slots) {
            Ok(()) => (slots.len(), None),
            Err(p) => (p.written.min(slots.len()), Some(p.error)),
        };
        for backend in &slots[..written] {
            self.used += 1;
            holds.hold(*backend);
            report.writes += 1;
        }
        if let Some(e) = failed {
            // What was written goes again, and the id with it.
            let written = (0..written).map(|s| (s as u32, Some(slots[s]))).collect();
            self.doom(id, written, true);
            self.delete(id, maps, holds, report);
            return Err(e);
        }
        let table = SlotTable {
            slots: slots.to_vec(),
            users: 1,
            hash,
        };
        self.live.insert(id, table);
        self.by_hash.entry(hash).or_default().push(id);
        Ok(id)
    }

    /// One user less for table `id`; without users it is deleted.
    pub fn release(
        &mut self,
        id: u32,
        maps: &mut dyn Maps,
        holds: &mut Holds,
        report: &mut Report,
    ) {
        let Some(table) = self.live.get_mut(&id) else {
            return;
        };
        table.users = table.users.saturating_sub(1);
        if table.users > 0 {
            return;
        }
        let Some(table) = self.live.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_hash.get_mut(&table.hash) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_hash.remove(&table.hash);
            }
        }
        let slots = (table.slots.into_iter().enumerate())
            .map(|(s, b)| (s as u32, Some(b)))
            .collect();
        self.doom(id, slots, true);
        self.delete(id, maps, holds, report);
    }

    fn find(&self, hash: u64, slots: &[u32]) -> Option<u32> {
        let candidates = self.by_hash.get(&hash)?;
        candidates
            .iter()
            .copied()
            .find(|id| self.content(*id) == Some(slots))
    }

    fn doom(&mut self, id: u32, slots: Vec<(u32, Option<u32>)>, frees_id: bool) {
        let doomed = self.doomed.entry(id).or_default();
        doomed.slots.extend(slots);
        doomed.frees_id |= frees_id;
    }

    /// Deletes a doomed table's slots from the end; stops at the first
    /// error (the rest is tried in the next pass).
    fn delete(&mut self, id: u32, maps: &mut dyn Maps, holds: &mut Holds, report: &mut Report) {
        let Some(doomed) = self.doomed.get_mut(&id) else {
            return;
        };
        while let Some(&(slot, backend)) = doomed.slots.last() {
            if let Err(e) = maps.remove_slot(slot_key(id, slot as usize)) {
                report
                    .errors
                    .push(format!("removing slot table {id}: {e:#}"));
                return;
            }
            doomed.slots.pop();
            report.writes += 1;
            self.used = self.used.saturating_sub(1);
            if let Some(backend) = backend {
                holds.release(backend);
            }
        }
        let frees_id = doomed.frees_id;
        self.doomed.remove(&id);
        if frees_id && !self.live.contains_key(&id) {
            self.cooling.push(id);
        }
    }

    /// Adoption: table `id` with these slots (every one naming a known
    /// backend) for its first user; false if the id cannot be taken.
    pub fn adopt(&mut self, id: u32, slots: Vec<u32>, holds: &mut Holds) -> bool {
        if slots.is_empty() || !self.ids.claim(id) {
            return false;
        }
        for backend in &slots {
            holds.hold(*backend);
        }
        let hash = content_hash(&slots);
        self.by_hash.entry(hash).or_default().push(id);
        self.live.insert(
            id,
            SlotTable {
                slots,
                users: 1,
                hash,
            },
        );
        true
    }

    /// Adoption: one more user of an adopted table whose length is `len`.
    pub fn adopt_user(&mut self, id: u32, len: usize) -> bool {
        match self.live.get_mut(&id) {
            Some(table) if table.slots.len() == len => {
                table.users += 1;
                true
            }
            _ => false,
        }
    }

    /// Adoption: every slot found in the maps counts against the capacity;
    /// those no adopted table explains are deleted by the next pass.
    pub fn adopt_found(&mut self, found: &BTreeMap<u32, BTreeMap<u32, u32>>) {
        for (id, slots) in found {
            self.used += slots.len() as u64;
            let len = self.live.get(id).map(|t| t.slots.len() as u32);
            let extra: Vec<(u32, Option<u32>)> = slots
                .keys()
                .filter(|s| len.is_none_or(|len| **s >= len))
                .map(|s| (*s, None))
                .collect();
            if extra.is_empty() {
                continue;
            }
            // An id nobody uses is taken until its slots are gone.
            let frees_id = len.is_none() && self.ids.claim(*id);
            self.doom(*id, extra, frees_id);
        }
    }
}
