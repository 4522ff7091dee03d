//! Taking over what an earlier agent left in the maps.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Applied, BackendKey, Capacity, Member, NodeEntry, Reconciler, ServiceEntry, Slot, member_key,
};
use crate::{cidr::Cidr, model::Frontend};

/// What the maps of both families hold, as read back after a restart
/// (entries the model cannot express, such as an unknown protocol, are
/// left out by the reader).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(Frontend, ServiceEntry)>,
    pub slots: Vec<(Slot, u32)>,
    pub backends: Vec<(u32, BackendKey)>,
    pub members: Vec<(Member, BackendKey)>,
    /// Members written as terminating.
    pub terminating_members: BTreeSet<Member>,
    /// (service id, range) pairs.
    pub source_ranges: Vec<(u32, Cidr)>,
    pub config: Option<NodeEntry>,
}

/// Entries nothing explains, removed by the next pass (slots: by the slot
/// tables, `SlotTables::adopt_found`).
#[derive(Debug, Default)]
pub(super) struct Strays {
    pub services: Vec<Frontend>,
    pub members: Vec<(Member, BackendKey)>,
    pub source_ranges: Vec<(u32, Cidr)>,
    pub backends: Vec<(u32, BackendKey)>,
}

/// Per-service parts of a snapshot, taken as services claim them.
#[derive(Default)]
struct Parts {
    /// Slot table id -> slot -> backend id.
    slots: BTreeMap<u32, BTreeMap<u32, u32>>,
    members: BTreeMap<u32, BTreeMap<u32, BackendKey>>,
    ranges: BTreeMap<u32, BTreeSet<Cidr>>,
}

impl Parts {
    fn new(snapshot: &Snapshot) -> Self {
        let mut parts = Parts::default();
        for (key, backend) in &snapshot.slots {
            let own = parts.slots.entry(key.table).or_default();
            own.insert(key.index, *backend);
        }
        for (key, backend) in &snapshot.members {
            let own = parts.members.entry(key.service_id).or_default();
            own.insert(key.backend_id, *backend);
        }
        for (id, range) in &snapshot.source_ranges {
            parts.ranges.entry(*id).or_default().insert(*range);
        }
        parts
    }
}

impl Reconciler {
    /// Takes over what an earlier agent programmed. Entries that are
    /// consistent become the applied state (the next pass leaves them alone
    /// when they are still wanted); anything else is removed by the next pass.
    pub fn adopt(snapshot: &Snapshot, capacity: Capacity) -> Self {
        let mut r = Reconciler::empty(capacity);
        r.config = snapshot.config;
        for (id, key) in &snapshot.backends {
            // A duplicate address or id, or an id out of range, is a stray.
            if !r.backends.contains_key(key) && r.backend_ids.claim(*id) {
                r.backends.insert(*key, *id);
                r.backend_keys.insert(*id, *key);
                // Removed by the first pass unless a slot names it.
                r.holds.maybe_unused.insert(*id);
            } else {
                r.strays.backends.push((*id, *key));
            }
        }
        let mut parts = Parts::new(snapshot);
        for (frontend, service) in &snapshot.services {
            if !r.adopt_service(frontend, service, &parts.slots) {
                r.strays.services.push(*frontend);
                continue;
            }
            let terminating = &snapshot.terminating_members;
            r.adopt_extras(*frontend, service.id, &mut parts, terminating);
        }
        // Slots of no adopted table, or past its end, go with the next pass.
        r.tables.adopt_found(&parts.slots);
        for (id, rest) in parts.members {
            let keys = rest.iter().map(|(b, key)| (member_key(id, *b), *key));
            r.strays.members.extend(keys);
        }
        for (id, rest) in parts.ranges {
            r.strays.source_ranges.extend(rest.iter().map(|c| (id, *c)));
        }
        r
    }

    /// Members that name the backend their id stands for, and source
    /// ranges, of an adopted service.
    fn adopt_extras(
        &mut self,
        frontend: Frontend,
        service_id: u32,
        parts: &mut Parts,
        terminating: &BTreeSet<Member>,
    ) {
        let Some(applied) = self.frontends.get_mut(&frontend) else {
            return;
        };
        for (backend, value) in parts.members.remove(&service_id).unwrap_or_default() {
            match self.backend_keys.get(&backend) {
                Some(known) if *known == value => {}
                // Another address, or another family: rewritten or removed.
                Some(known) if known.addr.is_ipv6() == value.addr.is_ipv6() => {
                    applied.stale_members.insert(backend);
                }
                _ => {
                    self.strays
                        .members
                        .push((member_key(service_id, backend), value));
                    continue;
                }
            }
            if applied.members.insert(backend) {
                self.holds.hold(backend);
            }
            if terminating.contains(&member_key(service_id, backend)) {
                applied.terminating.insert(backend);
            }
        }
        applied.ranges = parts.ranges.remove(&service_id).unwrap_or_default();
    }

    /// Adopts one service entry whose slot table (slots 0..count, or
    /// 0..table size, all naming known backends) is usable: adopted with
    /// it, or already adopted for another entry with the same length.
    /// False if the entry is not usable.
    fn adopt_service(
        &mut self,
        frontend: &Frontend,
        service: &ServiceEntry,
        slots: &BTreeMap<u32, BTreeMap<u32, u32>>,
    ) -> bool {
        if self.frontends.contains_key(frontend) || !self.service_ids.claim(service.id) {
            return false;
        }
        // A Maglev table fills table_size slots; a list, backend_count.
        let used = match (service.backend_count, service.table_size) {
            (0, _) => 0,
            (count, 0) => count,
            (_, size) => size,
        } as usize;
        let table = match used {
            0 => 0,
            _ => service.slots_id,
        };
        if table != 0 && !self.adopt_table(table, used, slots.get(&table)) {
            self.service_ids.give_back(service.id);
            return false;
        }
        let applied = Applied {
            service_id: service.id,
            entry: Some(*service),
            table,
            ..Applied::default()
        };
        self.frontends.insert(*frontend, applied);
        true
    }

    /// One more user for slot table `id`, which must hold `len` slots of
    /// known backends.
    fn adopt_table(&mut self, id: u32, len: usize, slots: Option<&BTreeMap<u32, u32>>) -> bool {
        if self.tables.content(id).is_some() {
            return self.tables.adopt_user(id, len);
        }
        let Some(slots) = slots else {
            return false;
        };
        let known =
            |slot: u32| (slots.get(&slot).copied()).filter(|b| self.backend_keys.contains_key(b));
        let Some(content) = (0..len as u32).map(known).collect::<Option<Vec<u32>>>() else {
            return false;
        };
        self.tables.adopt(id, content, &mut self.holds)
    }
}
