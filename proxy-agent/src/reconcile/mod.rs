//! Turns desired state into the fewest map writes, in a safe order, and keeps
//! an exact record of what the maps hold.
//!
//! Order, so that a packet never meets a dangling reference:
//! backends are written before any slot names them; a backend becomes a
//! member of a service before a slot table it reads names the backend, and
//! stops being one after no table it reads does; a slot table is written in
//! full before an entry points at it (with its count), and deleted only
//! after no entry does (`tables`); source ranges are written before the
//! entry that enables them and removed after; a backend is removed only
//! after no slot names it.
//!
//! A Service whose slot tables would need more than the per-Service budget
//! (`budget`) is not touched: what it had stays programmed, and the pass
//! reports it as invalid.
//!
//! A pass takes the frontends of some Services (`apply_changes`: only those
//! that changed, so one change costs the same at 10 or 10,000 Services) or
//! of all of them (`apply`: also removes whatever nothing explains).

mod adopt;
pub mod behind;
mod byid;
mod entries;
mod ids;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
};

use crate::{cidr::Cidr, nodeconfig::Settings};

pub use adopt::Snapshot;
use adopt::Strays;
use byid::ById;
pub use entries::{Member, NodeEntry, ServiceEntry, Slot};
use ids::Ids;
use tables::SlotTables;
pub use tables::SlotsFull;

use crate::{budget, maglev};
use proxy_common::{MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS};

use crate::model::{Desired, Frontend, FrontendState, ObjectKey, Protocol, Scope};

/// The map operations the reconciler needs; the kernel maps implement it
/// (picking each family's maps), and tests use a fake that records calls
/// and fails on demand.
pub trait Maps {
    fn set_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()>;
    fn remove_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()>;
    fn set_slot(&mut self, slot: Slot, backend_id: u32) -> anyhow::Result<()>;
    fn remove_slot(&mut self, slot: Slot) -> anyhow::Result<()>;
    fn set_service(&mut self, frontend: &Frontend, entry: &ServiceEntry) -> anyhow::Result<()>;
    fn remove_service(&mut self, frontend: &Frontend) -> anyhow::Result<()>;
    /// Makes `backend` a member of a service.
    /// (`terminating`: it keeps its flows but has no slot.)
    fn set_member(
        &mut self,
        member: Member,
        backend: &BackendKey,
        terminating: bool,
    ) -> anyhow::Result<()>;
    fn remove_member(&mut self, member: Member, backend: &BackendKey) -> anyhow::Result<()>;
    /// Admits the sources in `range` to a service with `SVC_SOURCE_RANGES`.
    fn set_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()>;
    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()>;
    /// What the datapath needs of the node (source NAT address and ports).
    fn set_config(&mut self, node: &NodeEntry) -> anyhow::Result<()>;
    /// Readies a fresh service id for `frontend`, before its service entry
    /// is written: marks where the id's statistics start (it may have
    /// served another frontend) and names the frontend at the id in the reverse-NAT map,
    /// where the datapath finds the source of a flow's replies. Once per
    /// id, not per service write.
    fn fresh_service_id(&mut self, service_id: u32, frontend: &Frontend) -> anyhow::Result<()>;

    /// After a pass, with every frontend and backend the maps hold: for
    /// what is kept of all of them at once (`lb_filter`). Iterated only
    /// if needed.
    fn settle(
        &mut self,
        _frontends: &mut dyn Iterator<Item = &Frontend>,
        _backends: &mut dyn Iterator<Item = &BackendKey>,
    ) -> anyhow::Result<()> {
        Ok(())
    }

    // Several entries of one map at once, in order, stopping at the first
    // that fails; the kernel maps write them in few syscalls (a first pass
    // writes hundreds of thousands).

    fn set_backends(&mut self, backends: &[(u32, BackendKey)]) -> Result<(), Partial> {
        each(backends, |(id, b)| self.set_backend(*id, b))
    }

    /// Slots 0.. of table `table`, naming `backends`.
    fn set_slots(&mut self, table: u32, backends: &[u32]) -> Result<(), Partial> {
        let slots: Vec<(Slot, u32)> = (0u32..)
            .zip(backends)
            .map(|(index, b)| (Slot { table, index }, *b))
            .collect();
        each(&slots, |(slot, b)| self.set_slot(*slot, *b))
    }

    /// Member entries of `service_id`: (backend id, backend, terminating).
    fn set_members(
        &mut self,
        service_id: u32,
        members: &[(u32, BackendKey, bool)],
    ) -> Result<(), Partial> {
        each(members, |(backend_id, b, terminating)| {
            let member = Member {
                service_id,
                backend_id: *backend_id,
            };
            self.set_member(member, b, *terminating)
        })
    }

    // Entries of several Services at once (`behind` gathers them).

    fn fresh_service_ids(&mut self, ids: &[(u32, Frontend)]) -> anyhow::Result<()> {
        ids.iter()
            .try_for_each(|(id, frontend)| self.fresh_service_id(*id, frontend))
    }

    /// Members: (member, its backend, terminating).
    fn set_members_of(&mut self, members: &[(Member, BackendKey, bool)]) -> Result<(), Partial> {
        each(members, |(member, b, terminating)| {
            self.set_member(*member, b, *terminating)
        })
    }

    fn set_slots_of(&mut self, slots: &[(Slot, u32)]) -> Result<(), Partial> {
        each(slots, |(slot, backend)| self.set_slot(*slot, *backend))
    }

    fn set_services(&mut self, entries: &[(Frontend, ServiceEntry)]) -> Result<(), Partial> {
        each(entries, |(frontend, entry)| {
            self.set_service(frontend, entry)
        })
    }
}

/// How far a write of several entries got: those before `written` are in
/// the map, the one at `written` failed with `error`, the rest were not
/// tried.
#[derive(Debug)]
pub struct Partial {
    pub written: usize,
    pub error: anyhow::Error,
}

impl Partial {
    /// Nothing written: `error` came first.
    pub fn none(error: anyhow::Error) -> Partial {
        Partial { written: 0, error }
    }
}

/// `write` for each item in order, stopping at the first failure.
pub fn each<T>(
    items: &[T],
    mut write: impl FnMut(&T) -> anyhow::Result<()>,
) -> Result<(), Partial> {
    for (written, item) in items.iter().enumerate() {
        write(item).map_err(|error| Partial { written, error })?;
    }
    Ok(())
}

/// The frontends each changed Service wants now (empty: it is gone).
pub type Changes = BTreeMap<ObjectKey, Vec<(Frontend, FrontendState)>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

/// What one frontend should have in the maps, in backend ids.
struct Wanted {
    /// Backends that take new flows.
    count: u32,
    /// Slot contents: the backends, or their Maglev table.
    slots: Vec<u32>,
    /// Every member, and whether it is terminating.
    members: BTreeMap<u32, bool>,
}

/// What one frontend has in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Applied {
    service_id: u32,
    /// The service entry as written (None: no entry yet). Packets only see
    /// slots below its count.
    entry: Option<ServiceEntry>,
    /// The slot table the entry names (0: none), one of its users.
    table: u32,
    /// Backend ids with a member entry for this service.
    members: BTreeSet<u32>,
    /// Adopted members whose entry names another address: rewritten if
    /// still wanted, removed if not.
    stale_members: BTreeSet<u32>,
    /// Members written as terminating.
    terminating: BTreeSet<u32>,
    /// Source ranges written for this service.
    ranges: BTreeSet<Cidr>,
    /// The Service it was programmed for (None: adopted, not yet claimed).
    owner: Option<ObjectKey>,
    /// How that Service reaches it (None: adopted).
    scope: Option<Scope>,
}

/// Outcome of one pass: how many writes, and what could not be done (the
/// previous state of those parts stays programmed; the next pass retries).
#[derive(Debug, Default)]
pub struct Report {
    pub writes: usize,
    pub errors: Vec<String>,
    /// Services left as they were because what they want now is not
    /// acceptable (over the slot budget): not retried until they change.
    pub invalid: Vec<String>,
}

/// How many slots and member entries name each backend id: it is freed
/// only when none does.
#[derive(Debug, Default)]
struct Holds {
    refs: ById<u32>,
    /// Backend ids that may have lost their last holder.
    maybe_unused: BTreeSet<u32>,
}

impl Holds {
    fn hold(&mut self, id: u32) {
        *self.refs.or_default(id) += 1;
    }

    fn release(&mut self, id: u32) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        self.maybe_unused.insert(id);
    }
}

pub struct Reconciler {
    frontends: BTreeMap<Frontend, Applied>,
    owners: BTreeMap<ObjectKey, BTreeSet<Frontend>>,
    backends: HashMap<BackendKey, u32>,
    /// The same, by id.
    backend_keys: ById<BackendKey>,
    holds: Holds,
    /// Slot tables in `lb_slots`, shared by the frontends with equal slots.
    tables: SlotTables,
    /// Most `lb_slots` entries one Service's tables may take.
    slot_budget: u32,
    /// Services whose latest wish was over the budget: what they had stays.
    rejected: BTreeSet<ObjectKey>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Entries found in the maps that nothing explains, removed by the next pass.
    strays: Strays,
    /// The node configuration as written (None: not yet).
    config: Option<NodeEntry>,
    /// Source NAT ports and hash keys, for the node configuration.
    node: Settings,
    /// Maglev tables built in this pass: a Service's frontends (cluster IP,
    /// node ports, external IPs) share one backend set, and so one table.
    maglev: BTreeMap<MaglevKey, Vec<u32>>,
}

/// What a Maglev table depends on: the backends in order, their protocol
/// and the table size.
type MaglevKey = (Vec<SocketAddr>, Protocol, u32);

/// How many entries the datapath's maps have room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service ids (`lb_svc_stats`, `lb_source_ranges` per id).
    pub services: u32,
    /// Backend ids (`lb4_backends_v2`, `lb6_backends_v2`).
    pub backends: u32,
    /// `lb_slots` entries.
    pub slots: u32,
}

impl Capacity {
    /// The maps as this agent's datapath creates them.
    pub const DATAPATH: Capacity = Capacity {
        services: MAX_SERVICES,
        backends: MAX_BACKENDS,
        slots: MAX_SLOTS,
    };
}

impl Reconciler {
    /// Nothing applied yet, with the datapath's room for slots.
    pub fn new(max_services: u32, max_backends: u32) -> Self {
        Reconciler::empty(Capacity {
            services: max_services,
            backends: max_backends,
            ..Capacity::DATAPATH
        })
    }

    fn empty(capacity: Capacity) -> Self {
        Reconciler {
            frontends: BTreeMap::new(),
            owners: BTreeMap::new(),
            backends: HashMap::new(),
            backend_keys: ById::default(),
            holds: Holds::default(),
            tables: SlotTables::new(capacity.slots),
            slot_budget: budget::DEFAULT_SLOT_BUDGET,
            rejected: BTreeSet::new(),
            service_ids: Ids::new(capacity.services),
            backend_ids: Ids::new(capacity.backends),
            strays: Strays::default(),
            config: None,
            node: Settings::default(),
            maglev: BTreeMap::new(),
        }
    }

    /// The source NAT ports and hash keys the next pass writes. A node key
    /// already in the datapath (an earlier agent's) is kept: flows steered
    /// by hash keep their backends across restarts.
    pub fn set_node(&mut self, mut settings: Settings) {
        if let Some(key) = (self.config.map(|c| c.settings.node_key)).filter(|k| *k != [0; 2]) {
            settings.node_key = key;
        }
        self.node = settings;
    }

    /// Most `lb_slots` entries one Service's tables may take (from the
    /// next pass on).
    pub fn set_slot_budget(&mut self, budget: u32) {
        self.slot_budget = budget;
    }

    /// Starts the record over from what the maps hold now (after writes
    /// whose outcome it does not know), keeping the node settings and the
    /// budget.
    pub fn readopt(&mut self, snapshot: &Snapshot, capacity: Capacity) {
        let (node, budget) = (self.node, self.slot_budget);
        *self = Reconciler::adopt(snapshot, capacity);
        self.set_node(node);
        self.slot_budget = budget;
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Slot tables in use, and the `lb_slots` entries the maps hold.
    pub fn slot_usage(&self) -> (usize, u64) {
        (self.tables.count(), self.tables.used())
    }

    /// Services kept as they were because they want more slots than the
    /// budget.
    pub fn over_budget(&self) -> usize {
        self.rejected.len()
    }

    /// The slot table a frontend's entry names (0: none).
    pub fn slot_table(&self, frontend: &Frontend) -> Option<u32> {
        self.frontends.get(frontend).map(|a| a.table)
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The service id a frontend has in the maps (its `lb_svc_stats` index).
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.frontends.get(frontend).map(|a| a.service_id)
    }

    /// Brings the maps to `desired` as far as they can go, removing every
    /// frontend it does not list.
    /// Takes `desired` by value: its states move into the pass instead of
    /// being copied (at 10k Services a copy of every backend list).
    pub fn apply(&mut self, desired: Desired, maps: &mut dyn Maps) -> Report {
        let mut report = Report::default();
        self.write_config(&desired, maps, &mut report);
        let listed: BTreeSet<Frontend> = desired.frontends.keys().copied().collect();
        let mut changes: Changes = self
            .owners
            .keys()
            .map(|o| (o.clone(), Vec::new()))
            .collect();
        for (frontend, state) in desired.frontends {
            match changes.get_mut(&state.service) {
                Some(wanted) => wanted.push((frontend, state)),
                None => {
                    changes.insert(state.service.clone(), vec![(frontend, state)]);
                }
            }
        }
        let pass = self.pass(&changes, Some(&listed), maps);
        report.writes += pass.writes;
        report.errors.extend(pass.errors);
        report.invalid.extend(pass.invalid);
        report
    }

    /// The node configuration, written when it changed (before services
    /// that may need it: source NAT without an address only counts).
    fn write_config(&mut self, desired: &Desired, maps: &mut dyn Maps, report: &mut Report) {
        let config = NodeEntry {
            snat_addr4: desired.snat_addr4,
            snat_addr6: desired.snat_addr6,
            settings: self.node,
        };
        if self.config == Some(config) {
            return;
        }
        match maps.set_config(&config) {
            Ok(()) => {
                report.writes += 1;
                self.config = Some(config);
            }
            Err(e) => report.errors.push(format!("node configuration: {e:#}")),
        }
    }

    /// Brings the frontends of the changed Services to what they want now;
    /// everything else is left as it is.
    pub fn apply_changes(&mut self, changes: &Changes, maps: &mut dyn Maps) -> Report {
        self.pass(changes, None, maps)
    }

    /// `listed`: on a full pass, every frontend the desired state lists;
    /// the others go.
    fn pass(
        &mut self,
        changes: &Changes,
        listed: Option<&BTreeSet<Frontend>>,
        maps: &mut dyn Maps,
    ) -> Report {
        let mut report = Report::default();
        self.remove_strays(maps, &mut report);
        let accepted = self.screen(changes, &mut report);
        self.add_backends(&accepted, maps, &mut report);
        for (owner, wanted) in &accepted {
            for (frontend, state) in *wanted {
                self.want(owner, *frontend, state, changes, maps, &mut report);
            }
        }
        for (owner, wanted) in &accepted {
            self.drop_unwanted(owner, wanted, maps, &mut report);
        }
        // Not kept between passes: a table per Maglev service would be.
        self.maglev.clear();
        if let Some(listed) = listed {
            let rejected = &self.rejected;
            let unexplained: Vec<Frontend> = (self.frontends.iter())
                .filter(|(f, a)| {
                    !listed.contains(f) && a.owner.as_ref().is_none_or(|o| !rejected.contains(o))
                })
                .map(|(f, _)| *f)
                .collect();
            for frontend in unexplained {
                self.remove_or_report(frontend, maps, &mut report);
            }
        }
        self.remove_unused_backends(maps, &mut report);
        if let Err(e) = self.settle(maps) {
            report.errors.push(format!("{e:#}"));
        }
        report
    }

    /// `Maps::settle` with every frontend and backend of the record: after
    /// a pass (which does it itself, unless its maps were a queue whose
    /// writes went behind it).
    pub fn settle(&self, maps: &mut dyn Maps) -> anyhow::Result<()> {
        maps.settle(&mut self.frontends.keys(), &mut self.backends.keys())
    }

    /// The changed Services whose slot tables fit the budget; the others
    /// are reported and keep what they have.
    fn screen<'a>(
        &mut self,
        changes: &'a Changes,
        report: &mut Report,
    ) -> Vec<(&'a ObjectKey, &'a [(Frontend, FrontendState)])> {
        let mut accepted = Vec::with_capacity(changes.len());
        for (owner, wanted) in changes {
            match budget::check(owner, wanted, self.slot_budget) {
                Ok(()) => {
                    self.rejected.remove(owner);
                    accepted.push((owner, wanted.as_slice()));
                }
                Err(over) => {
                    self.rejected.insert(owner.clone());
                    report.invalid.push(over.to_string());
                }
            }
        }
        accepted
    }

    /// Programs one frontend for `owner`, unless another Service that is not
    /// changing in this pass holds it.
    fn want(
        &mut self,
        owner: &ObjectKey,
        frontend: Frontend,
        state: &FrontendState,
        changes: &Changes,
        maps: &mut dyn Maps,
        report: &mut Report,
    ) {
        if let Some(holder) = self.held_against(owner, frontend, state, changes) {
            report.errors.push(format!(
                "{frontend:?} is wanted by {owner} ({:?}) but held by {holder}; kept for {holder}",
                state.scope
            ));
            return;
        }
        let Some(wanted) = self.wanted(frontend, state) else {
            report.errors.push(format!(
                "{frontend:?}: a backend could not be written; kept as it was"
            ));
            return;
        };
        if let Err(e) = self.update_frontend(frontend, owner, (&wanted, state), maps, report) {
            report
                .errors
                .push(format!("{frontend:?}: {e:#}; kept as far as written"));
        }
    }

    /// The other Service that keeps `frontend` from `owner`: one that still
    /// wants it and has the better claim (an allocated address over a
    /// written one; between equals, the one holding it, unless it changes
    /// in this pass too).
    fn held_against(
        &self,
        owner: &ObjectKey,
        frontend: Frontend,
        state: &FrontendState,
        changes: &Changes,
    ) -> Option<ObjectKey> {
        let applied = self.frontends.get(&frontend)?;
        let holder = applied.owner.as_ref().filter(|h| *h != owner)?;
        let still_wanted = changes
            .get(holder)
            .is_none_or(|wanted| wanted.iter().any(|(f, _)| *f == frontend));
        let held_allocated = applied.scope.is_some_and(Scope::is_allocated);
        let mine_allocated = state.scope.is_allocated();
        let keeps = match (held_allocated, mine_allocated) {
            (true, false) => true,
            (false, true) => false,
            _ => !changes.contains_key(holder),
        };
        (still_wanted && keeps).then(|| holder.clone())
    }

    /// The frontend's slots and members in backend ids (None: a backend has
    /// no id, because writing it failed).
    fn wanted(&mut self, frontend: Frontend, state: &FrontendState) -> Option<Wanted> {
        let id = |addr: &SocketAddr| {
            self.backends
                .get(&backend_key(*addr, frontend.protocol))
                .copied()
        };
        let ids: Vec<u32> = state.backends.iter().map(id).collect::<Option<_>>()?;
        let mut members: BTreeMap<u32, bool> = ids.iter().map(|b| (*b, false)).collect();
        for addr in &state.terminating {
            members.entry(id(addr)?).or_insert(true);
        }
        let slots = if state.algorithm.uses_table() && !ids.is_empty() {
            let table = self.maglev_table(frontend.protocol, state);
            table.iter().map(|i| ids[*i as usize]).collect()
        } else {
            ids.clone()
        };
        Some(Wanted {
            count: ids.len() as u32,
            slots,
            members,
        })
    }

    /// The Maglev table of the frontend's backends (indices into
    /// `state.backends`), built once per pass for each backend set.
    fn maglev_table(&mut self, protocol: Protocol, state: &FrontendState) -> &[u32] {
        let key = (state.backends.clone(), protocol, state.table_size);
        self.maglev.entry(key).or_insert_with(|| {
            let names = maglev::backend_names(&state.backends, protocol);
            maglev::table(&names, state.table_size)
        })
    }

    fn drop_unwanted(
        &mut self,
        owner: &ObjectKey,
        wanted: &[(Frontend, FrontendState)],
        maps: &mut dyn Maps,
        report: &mut Report,
    ) {
        let keep: BTreeSet<Frontend> = wanted.iter().map(|(f, _)| *f).collect();
        let held = self.owners.get(owner).cloned().unwrap_or_default();
        for frontend in held.difference(&keep) {
            self.remove_or_report(*frontend, maps, report);
        }
    }

    fn remove_or_report(&mut self, frontend: Frontend, maps: &mut dyn Maps, report: &mut Report) {
        if let Err(e) = self.remove_frontend(frontend, maps, report) {
            report.errors.push(format!("removing {frontend:?}: {e:#}"));
        }
    }

    fn add_backends(
        &mut self,
        changes: &[(&ObjectKey, &[(Frontend, FrontendState)])],
        maps: &mut dyn Maps,
        report: &mut Report,
    ) {
        let wanted = changes.iter().flat_map(|(_, wanted)| wanted.iter());
        let mut new: Vec<(u32, BackendKey)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (frontend, state) in wanted {
            for addr in state.backends.iter().chain(&state.terminating) {
                let key = backend_key(*addr, frontend.protocol);
                if self.backends.contains_key(&key) || !seen.insert(key) {
                    continue;
                }
                let Some(id) = self.backend_ids.take() else {
                    report.errors.push(format!("no backend id left for {addr}"));
                    continue;
                };
                new.push((id, key));
            }
        }
        let mut rest = new.as_slice();
        while !rest.is_empty() {
            let (written, failed) = match maps.set_backends(rest) {
                Ok(()) => (rest.len(), None),
                Err(p) => (p.written.min(rest.len() - 1), Some(p.error)),
            };
            for (id, key) in &rest[..written] {
                report.writes += 1;
                self.backends.insert(*key, *id);
                self.backend_keys.insert(*id, *key);
                // Unused until a slot names it.
                self.holds.maybe_unused.insert(*id);
            }
            let Some(e) = failed else { break };
            let (id, key) = rest[written];
            self.backend_ids.give_back(id);
            report.errors.push(format!("backend {}: {e:#}", key.addr));
            rest = &rest[written + 1..];
        }
    }

    /// The frontend's entry for `owner`, created (with a fresh service id)
    /// if it has none.
    fn entry(
        &mut self,
        frontend: Frontend,
        owner: &ObjectKey,
        maps: &mut dyn Maps,
    ) -> anyhow::Result<&mut Applied> {
        if !self.frontends.contains_key(&frontend) {
            let id = self
                .service_ids
                .take()
                .ok_or_else(|| anyhow::anyhow!("no service id left"))?;
            if let Err(e) = maps.fresh_service_id(id, &frontend) {
                self.service_ids.give_back(id);
                return Err(e);
            }
            let fresh = Applied {
                service_id: id,
                ..Applied::default()
            };
            self.frontends.insert(frontend, fresh);
        }
        let applied = self
            .frontends
            .get_mut(&frontend)
            .ok_or_else(|| anyhow::anyhow!("entry vanished"))?;
        if applied.owner.as_ref() != Some(owner) {
            if let Some(previous) = applied.owner.replace(owner.clone()) {
                remove_owned(&mut self.owners, &previous, &frontend);
            }
            self.owners
                .entry(owner.clone())
                .or_default()
                .insert(frontend);
        }
        Ok(applied)
    }

    fn update_frontend(
        &mut self,
        frontend: Frontend,
        owner: &ObjectKey,
        (wanted, state): (&Wanted, &FrontendState),
        maps: &mut dyn Maps,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        self.entry(frontend, owner, maps)?;
        if let Some(applied) = self.frontends.get_mut(&frontend) {
            applied.scope = Some(state.scope);
        }
        let Reconciler {
            frontends,
            holds,
            tables,
            backend_keys,
            ..
        } = self;
        let applied = frontends
            .get_mut(&frontend)
            .ok_or_else(|| anyhow::anyhow!("entry vanished"))?;
        let id = applied.service_id;
        let members: BTreeSet<u32> = wanted.members.keys().copied().collect();
        // Members that take new flows, and new terminating ones, before any
        // slot names them; a member that begins terminating only after no
        // slot does (below).
        let early = |b: &u32, t: &bool| !*t || !applied.members.contains(b);
        let (first, later): (Vec<_>, Vec<_>) =
            wanted.members.iter().partition(|(b, t)| early(b, t));
        write_members(applied, first, backend_keys, holds, maps, report)?;
        let ranges = range_set(&state.source_ranges);
        for range in ranges.difference(&applied.ranges.clone()) {
            maps.set_source_range(id, *range)?;
            report.writes += 1;
            applied.ranges.insert(*range);
        }
        // Make before break: the table is complete before the entry names
        // it, and the old one goes only once no entry does.
        let unchanged = match applied.table {
            0 => wanted.slots.is_empty(),
            table => tables.content(table) == Some(wanted.slots.as_slice()),
        };
        let table = match unchanged {
            true => applied.table,
            false => tables.acquire(&wanted.slots, maps, holds, report)?,
        };
        let entry = ServiceEntry::new(id, table, wanted.count, state);
        if applied.entry != Some(entry) {
            if let Err(e) = maps.set_service(&frontend, &entry) {
                if table != applied.table {
                    tables.release(table, maps, holds, report);
                }
                return Err(e);
            }
            report.writes += 1;
            applied.entry = Some(entry);
        }
        if table != applied.table {
            let old = std::mem::replace(&mut applied.table, table);
            tables.release(old, maps, holds, report);
        }
        write_members(applied, later, backend_keys, holds, maps, report)?;
        let gone: Vec<u32> = applied.members.difference(&members).copied().collect();
        remove_members(applied, gone, backend_keys, holds, maps, report)?;
        let gone: Vec<_> = applied.ranges.difference(&ranges).copied().collect();
        remove_ranges(applied, gone, maps, report)
    }

    fn remove_frontend(
        &mut self,
        frontend: Frontend,
        maps: &mut dyn Maps,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        // Out of the map while its entries go, back in if one cannot.
        let Some(mut applied) = self.frontends.remove(&frontend) else {
            return Ok(());
        };
        if let Err(e) = self.clear_frontend(&frontend, &mut applied, maps, report) {
            self.frontends.insert(frontend, applied);
            return Err(e);
        }
        if let Some(owner) = &applied.owner {
            remove_owned(&mut self.owners, owner, &frontend);
        }
        self.service_ids.give_back(applied.service_id);
        Ok(())
    }

    /// Removes a frontend's service entry, table, members and ranges.
    fn clear_frontend(
        &mut self,
        frontend: &Frontend,
        applied: &mut Applied,
        maps: &mut dyn Maps,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        if applied.entry.is_some() {
            maps.remove_service(frontend)?;
            report.writes += 1;
            applied.entry = None;
        }
        let table = std::mem::take(&mut applied.table);
        self.tables.release(table, maps, &mut self.holds, report);
        let gone: Vec<u32> = applied.members.iter().copied().collect();
        let keys = &self.backend_keys;
        remove_members(applied, gone, keys, &mut self.holds, maps, report)?;
        let gone: Vec<_> = applied.ranges.iter().copied().collect();
        remove_ranges(applied, gone, maps, report)
    }

    fn remove_unused_backends(&mut self, maps: &mut dyn Maps, report: &mut Report) {
        let candidates = std::mem::take(&mut self.holds.maybe_unused);
        for id in candidates {
            if self.holds.refs.get(&id).is_some_and(|n| *n > 0) {
                continue;
            }
            let Some(key) = self.backend_keys.get(&id).copied() else {
                continue;
            };
            match maps.remove_backend(id, &key) {
                Ok(()) => {
                    report.writes += 1;
                    self.backends.remove(&key);
                    self.backend_keys.remove(&id);
                    self.holds.refs.remove(&id);
                    self.backend_ids.give_back(id);
                }
                Err(e) => {
                    self.holds.maybe_unused.insert(id);
                    report
                        .errors
                        .push(format!("removing backend {}: {e:#}", key.addr));
                }
            }
        }
    }

    /// Service entries first, then slots (with the slot tables: those of
    /// no entry, and what earlier passes could not delete), then members,
    /// then backends: the usual order.
    fn remove_strays(&mut self, maps: &mut dyn Maps, report: &mut Report) {
        let strays = std::mem::take(&mut self.strays);
        let mut results = Vec::new();
        for frontend in strays.services {
            results.push(maps.remove_service(&frontend));
        }
        self.tables.begin_pass(maps, &mut self.holds, report);
        for (key, backend) in strays.members {
            results.push(maps.remove_member(key, &backend));
        }
        for (id, range) in strays.source_ranges {
            results.push(maps.remove_source_range(id, range));
        }
        for (id, backend) in strays.backends {
            results.push(maps.remove_backend(id, &backend));
        }
        for result in results {
            match result {
                Ok(()) => report.writes += 1,
                Err(e) => report.errors.push(format!("removing a stray entry: {e:#}")),
            }
        }
    }
}

/// Writes the member entries (backend id, terminating) that are not
/// already as wanted.
fn write_members<'a>(
    applied: &mut Applied,
    members: impl IntoIterator<Item = (&'a u32, &'a bool)>,
    backend_keys: &ById<BackendKey>,
    holds: &mut Holds,
    maps: &mut dyn Maps,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut unknown = None;
    let mut writes = Vec::new();
    for (&backend, &terminating) in members {
        if applied.members.contains(&backend)
            && !applied.stale_members.contains(&backend)
            && applied.terminating.contains(&backend) == terminating
        {
            continue;
        }
        match backend_keys.get(&backend) {
            Some(key) => writes.push((backend, *key, terminating)),
            None => {
                unknown = Some(anyhow::anyhow!("backend {backend} unknown"));
                break;
            }
        }
    }
    let (written, failed) = match maps.set_members(applied.service_id, &writes) {
        Ok(()) => (writes.len(), unknown),
        Err(p) => (p.written.min(writes.len()), Some(p.error)),
    };
    for &(backend, _, terminating) in &writes[..written] {
        report.writes += 1;
        // A member entry holds its backend like a slot does.
        if applied.members.insert(backend) {
            holds.hold(backend);
        }
        applied.stale_members.remove(&backend);
        match terminating {
            true => applied.terminating.insert(backend),
            false => applied.terminating.remove(&backend),
        };
    }
    failed.map_or(Ok(()), Err)
}

/// Removes the member entries of `gone`, releasing their backends.
fn remove_members(
    applied: &mut Applied,
    gone: Vec<u32>,
    backend_keys: &ById<BackendKey>,
    holds: &mut Holds,
    maps: &mut dyn Maps,
    report: &mut Report,
) -> anyhow::Result<()> {
    for backend in gone {
        let key = backend_keys
            .get(&backend)
            .ok_or_else(|| anyhow::anyhow!("backend {backend} unknown"))?;
        maps.remove_member(member_key(applied.service_id, backend), key)?;
        report.writes += 1;
        applied.members.remove(&backend);
        applied.terminating.remove(&backend);
        holds.release(backend);
    }
    Ok(())
}

fn remove_ranges<R: IntoIterator<Item = Cidr>>(
    applied: &mut Applied,
    gone: R,
    maps: &mut dyn Maps,
    report: &mut Report,
) -> anyhow::Result<()> {
    for range in gone {
        maps.remove_source_range(applied.service_id, range)?;
        report.writes += 1;
        applied.ranges.remove(&range);
    }
    Ok(())
}

fn remove_owned(
    owners: &mut BTreeMap<ObjectKey, BTreeSet<Frontend>>,
    owner: &ObjectKey,
    frontend: &Frontend,
) {
    if let Some(set) = owners.get_mut(owner) {
        set.remove(frontend);
        if set.is_empty() {
            owners.remove(owner);
        }
    }
}

fn backend_key(addr: SocketAddr, protocol: Protocol) -> BackendKey {
    BackendKey { addr, protocol }
}

fn slot_key(table: u32, slot: usize) -> Slot {
    Slot {
        table,
        index: slot as u32,
    }
}

fn member_key(service_id: u32, backend_id: u32) -> Member {
    Member {
        service_id,
        backend_id,
    }
}

/// A frontend's source ranges (the model gives each frontend those of its
/// own family).
fn range_set(ranges: &[Cidr]) -> BTreeSet<Cidr> {
    ranges.iter().copied().collect()
}
