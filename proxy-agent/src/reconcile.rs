//! Turns desired state into the fewest map writes, in a safe order, and keeps
//! an exact record of what the maps hold.
//!
//! Order, so that a packet never meets a dangling reference:
//! backends are written before any slot names them; a service's slots are
//! written before its count grows; its count shrinks before slots are
//! removed; a backend is removed only after no slot names it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use proxy_common::{Backend4, Frontend4, Service, SlotKey};

use crate::model::{Desired, Frontend, Protocol};

/// The map operations the reconciler needs; the kernel maps implement it,
/// and tests use a fake that records calls and fails on demand.
pub trait Maps {
    fn set_backend(&mut self, id: u32, backend: Backend4) -> anyhow::Result<()>;
    fn remove_backend(&mut self, id: u32) -> anyhow::Result<()>;
    fn set_slot(&mut self, key: SlotKey, backend_id: u32) -> anyhow::Result<()>;
    fn remove_slot(&mut self, key: SlotKey) -> anyhow::Result<()>;
    fn set_service(&mut self, frontend: Frontend4, service: Service) -> anyhow::Result<()>;
    fn remove_service(&mut self, frontend: Frontend4) -> anyhow::Result<()>;
    /// Zeroes a service id's statistics before the id is used again.
    fn reset_stats(&mut self, service_id: u32) -> anyhow::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
}

/// What one frontend has in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    service_id: u32,
    /// The count the service entry holds (None: no entry yet). Packets only
    /// see slots below it.
    count: Option<u32>,
    /// Backend ids in slots 0..slots.len(), possibly more than `count`.
    slots: Vec<u32>,
}

/// Small reusable ids, lowest first; 0 is never handed out.
#[derive(Debug)]
struct Ids {
    next: u32,
    free: BTreeSet<u32>,
    limit: u32,
}

impl Ids {
    fn new(limit: u32) -> Self {
        Ids {
            next: 1,
            free: BTreeSet::new(),
            limit,
        }
    }

    fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.limit).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn give_back(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// Marks an id found in the maps as taken; false if it cannot be.
    fn claim(&mut self, id: u32) -> bool {
        if id == 0 || id >= self.limit {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            return true;
        }
        self.free.remove(&id)
    }
}

/// Outcome of one pass: how many writes, and what could not be done (the
/// previous state of those parts stays programmed; the next pass retries).
#[derive(Debug, Default)]
pub struct Report {
    pub writes: usize,
    pub errors: Vec<String>,
}

pub struct Reconciler {
    frontends: BTreeMap<Frontend, Applied>,
    backends: BTreeMap<BackendKey, u32>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Entries found in the maps that nothing explains, removed by the next pass.
    strays: Strays,
}

/// What the maps hold, as read back after a restart.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(Frontend4, Service)>,
    pub slots: Vec<(SlotKey, u32)>,
    pub backends: Vec<(u32, Backend4)>,
}

#[derive(Debug, Default)]
struct Strays {
    services: Vec<Frontend4>,
    slots: Vec<SlotKey>,
    backends: Vec<u32>,
}

impl Reconciler {
    pub fn new(max_services: u32, max_backends: u32) -> Self {
        Reconciler {
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            service_ids: Ids::new(max_services),
            backend_ids: Ids::new(max_backends),
            strays: Strays::default(),
        }
    }

    /// Takes over what an earlier agent programmed. Entries that are
    /// consistent become the applied state (the next pass leaves them alone
    /// when they are still wanted); anything else is removed by the next pass.
    pub fn adopt(snapshot: &Snapshot, max_services: u32, max_backends: u32) -> Self {
        let mut r = Reconciler::new(max_services, max_backends);
        let mut backends_by_id = BTreeMap::new();
        for (id, backend) in &snapshot.backends {
            // A duplicate address or an id out of range is a stray.
            match adopted_backend(backend) {
                Some(key) if !r.backends.contains_key(&key) && r.backend_ids.claim(*id) => {
                    r.backends.insert(key, *id);
                    backends_by_id.insert(*id, key);
                }
                _ => r.strays.backends.push(*id),
            }
        }
        let mut slots: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for (key, backend) in &snapshot.slots {
            slots
                .entry(key.service_id)
                .or_default()
                .insert(key.slot, *backend);
        }
        for (frontend4, service) in &snapshot.services {
            let own = slots.remove(&service.id).unwrap_or_default();
            match r.adopt_service(frontend4, service, &own, &backends_by_id) {
                Some(kept) => r.strays.slots.extend(
                    own.keys()
                        .skip(kept)
                        .map(|s| slot_key(service.id, *s as usize)),
                ),
                None => {
                    r.strays.services.push(*frontend4);
                    r.strays
                        .slots
                        .extend(own.keys().map(|s| slot_key(service.id, *s as usize)));
                }
            }
        }
        for (id, rest) in slots {
            r.strays
                .slots
                .extend(rest.keys().map(|s| slot_key(id, *s as usize)));
        }
        r
    }

    /// Adopts one service entry whose slots 0..count all name known
    /// backends; returns how many slots it kept, None if it is not usable.
    fn adopt_service(
        &mut self,
        frontend4: &Frontend4,
        service: &Service,
        slots: &BTreeMap<u32, u32>,
        backends: &BTreeMap<u32, BackendKey>,
    ) -> Option<usize> {
        let frontend = adopted_frontend(frontend4)?;
        let kept: Vec<u32> = (0..service.backend_count)
            .map(|slot| {
                slots
                    .get(&slot)
                    .copied()
                    .filter(|id| backends.contains_key(id))
            })
            .collect::<Option<_>>()?;
        if self.frontends.contains_key(&frontend) || !self.service_ids.claim(service.id) {
            return None;
        }
        let len = kept.len();
        let applied = Applied {
            service_id: service.id,
            count: Some(service.backend_count),
            slots: kept,
        };
        self.frontends.insert(frontend, applied);
        Some(len)
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The service id a frontend has in the maps (its `lb_stats` index).
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.frontends.get(frontend).map(|a| a.service_id)
    }

    /// Brings the maps to `desired` as far as they can go.
    pub fn apply(&mut self, desired: &Desired, maps: &mut dyn Maps) -> Report {
        let mut report = Report::default();
        self.remove_strays(maps, &mut report);
        self.add_backends(desired, maps, &mut report);
        for (frontend, state) in &desired.frontends {
            let wanted: Option<Vec<u32>> = state
                .backends
                .iter()
                .map(|addr| {
                    self.backends
                        .get(&backend_key(*addr, frontend.protocol))
                        .copied()
                })
                .collect();
            let Some(wanted) = wanted else {
                report.errors.push(format!(
                    "{frontend:?}: a backend could not be written; kept as it was"
                ));
                continue;
            };
            if let Err(e) = self.update_frontend(*frontend, &wanted, maps, &mut report) {
                report
                    .errors
                    .push(format!("{frontend:?}: {e:#}; kept as far as written"));
            }
        }
        self.remove_frontends(desired, maps, &mut report);
        self.remove_backends(maps, &mut report);
        report
    }

    /// Service entries first, then the slots, then backends: the usual order.
    fn remove_strays(&mut self, maps: &mut dyn Maps, report: &mut Report) {
        let strays = std::mem::take(&mut self.strays);
        for frontend in strays.services {
            match maps.remove_service(frontend) {
                Ok(()) => report.writes += 1,
                Err(e) => report
                    .errors
                    .push(format!("removing a stray service entry: {e:#}")),
            }
        }
        for key in strays.slots {
            match maps.remove_slot(key) {
                Ok(()) => report.writes += 1,
                Err(e) => report.errors.push(format!("removing a stray slot: {e:#}")),
            }
        }
        for id in strays.backends {
            match maps.remove_backend(id) {
                Ok(()) => report.writes += 1,
                Err(e) => report
                    .errors
                    .push(format!("removing a stray backend: {e:#}")),
            }
        }
    }

    fn add_backends(&mut self, desired: &Desired, maps: &mut dyn Maps, report: &mut Report) {
        for (frontend, state) in &desired.frontends {
            for addr in &state.backends {
                let key = backend_key(*addr, frontend.protocol);
                if self.backends.contains_key(&key) {
                    continue;
                }
                let Some(id) = self.backend_ids.take() else {
                    report.errors.push(format!("no backend id left for {addr}"));
                    continue;
                };
                match maps.set_backend(id, backend4(&key)) {
                    Ok(()) => {
                        report.writes += 1;
                        self.backends.insert(key, id);
                    }
                    Err(e) => {
                        self.backend_ids.give_back(id);
                        report.errors.push(format!("backend {addr}: {e:#}"));
                    }
                }
            }
        }
    }

    fn update_frontend(
        &mut self,
        frontend: Frontend,
        wanted: &[u32],
        maps: &mut dyn Maps,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let applied = match self.frontends.get_mut(&frontend) {
            Some(applied) => applied,
            None => {
                let id = self
                    .service_ids
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("no service id left"))?;
                if let Err(e) = maps.reset_stats(id) {
                    self.service_ids.give_back(id);
                    return Err(e);
                }
                let fresh = Applied {
                    service_id: id,
                    ..Applied::default()
                };
                self.frontends.entry(frontend).or_insert(fresh)
            }
        };
        let id = applied.service_id;
        for (slot, backend) in wanted.iter().enumerate() {
            if applied.slots.get(slot) == Some(backend) {
                continue;
            }
            maps.set_slot(slot_key(id, slot), *backend)?;
            report.writes += 1;
            if slot < applied.slots.len() {
                applied.slots[slot] = *backend;
            } else {
                applied.slots.push(*backend);
            }
        }
        let count = wanted.len() as u32;
        if applied.count != Some(count) {
            maps.set_service(frontend4(&frontend), service(id, count))?;
            report.writes += 1;
            applied.count = Some(count);
        }
        while applied.slots.len() > wanted.len() {
            maps.remove_slot(slot_key(id, applied.slots.len() - 1))?;
            report.writes += 1;
            applied.slots.pop();
        }
        Ok(())
    }

    fn remove_frontends(&mut self, desired: &Desired, maps: &mut dyn Maps, report: &mut Report) {
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|f| !desired.frontends.contains_key(f))
            .copied()
            .collect();
        for frontend in gone {
            if let Err(e) = self.remove_frontend(frontend, maps, report) {
                report.errors.push(format!("removing {frontend:?}: {e:#}"));
            }
        }
    }

    fn remove_frontend(
        &mut self,
        frontend: Frontend,
        maps: &mut dyn Maps,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let Some(applied) = self.frontends.get_mut(&frontend) else {
            return Ok(());
        };
        if applied.count.is_some() {
            maps.remove_service(frontend4(&frontend))?;
            report.writes += 1;
            applied.count = None;
        }
        while !applied.slots.is_empty() {
            maps.remove_slot(slot_key(applied.service_id, applied.slots.len() - 1))?;
            report.writes += 1;
            applied.slots.pop();
        }
        let id = applied.service_id;
        self.frontends.remove(&frontend);
        self.service_ids.give_back(id);
        Ok(())
    }

    fn remove_backends(&mut self, maps: &mut dyn Maps, report: &mut Report) {
        let used: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|a| a.slots.iter().copied())
            .collect();
        let unused: Vec<(BackendKey, u32)> = self
            .backends
            .iter()
            .filter(|(_, id)| !used.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (key, id) in unused {
            match maps.remove_backend(id) {
                Ok(()) => {
                    report.writes += 1;
                    self.backends.remove(&key);
                    self.backend_ids.give_back(id);
                }
                Err(e) => report
                    .errors
                    .push(format!("removing backend {}: {e:#}", key.addr)),
            }
        }
    }
}

fn backend_key(addr: SocketAddrV4, protocol: Protocol) -> BackendKey {
    BackendKey { addr, protocol }
}

fn slot_key(service_id: u32, slot: usize) -> SlotKey {
    SlotKey {
        service_id,
        slot: slot as u32,
    }
}

fn service(id: u32, count: u32) -> Service {
    Service {
        id,
        backend_count: count,
        flags: 0,
        _pad: 0,
    }
}

/// Map form of a frontend: address and port in network byte order.
pub fn frontend4(frontend: &Frontend) -> Frontend4 {
    Frontend4 {
        addr: u32::from(frontend.addr).to_be(),
        port: frontend.port.to_be(),
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

fn backend4(key: &BackendKey) -> Backend4 {
    Backend4 {
        addr: u32::from(*key.addr.ip()).to_be(),
        port: key.addr.port().to_be(),
        proto: key.protocol.number(),
        _pad: 0,
    }
}

fn adopted_protocol(number: u8) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .find(|p| p.number() == number)
}

fn adopted_frontend(f: &Frontend4) -> Option<Frontend> {
    Some(Frontend {
        addr: std::net::Ipv4Addr::from(u32::from_be(f.addr)),
        port: u16::from_be(f.port),
        protocol: adopted_protocol(f.proto)?,
    })
}

fn adopted_backend(b: &Backend4) -> Option<BackendKey> {
    Some(BackendKey {
        addr: SocketAddrV4::new(
            std::net::Ipv4Addr::from(u32::from_be(b.addr)),
            u16::from_be(b.port),
        ),
        protocol: adopted_protocol(b.proto)?,
    })
}
