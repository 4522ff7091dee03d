//! The reconciler against a fake set of maps that checks, after every single
//! write, what a packet arriving at that moment would see.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use proxy_agent::{
    balancing::Algorithm,
    cidr::Cidr,
    model::{Desired, Frontend, FrontendState, ObjectKey, Protocol, Scope},
    reconcile::{
        BackendKey, Capacity, Maps, Member, NodeEntry, Reconciler, ServiceEntry, Slot, Snapshot,
        behind::write_behind,
    },
};

/// Room for 100 services and 100 backends, as `Reconciler::new(100, 100)`.
const ROOM: Capacity = Capacity {
    services: 100,
    backends: 100,
    ..Capacity::DATAPATH
};

#[derive(Default)]
struct FakeMaps {
    services: BTreeMap<Frontend, ServiceEntry>,
    slots: BTreeMap<(u32, u32), u32>,
    backends: BTreeMap<u32, BackendKey>,
    members: BTreeMap<(u32, u32), BackendKey>,
    /// Members written as terminating.
    terminating: BTreeSet<(u32, u32)>,
    ranges: BTreeSet<(u32, Cidr)>,
    log: Vec<String>,
    /// Fail the next write whose log line starts with this.
    fail: Option<String>,
    /// Skip the per-write check (for maps corrupted on purpose).
    unchecked: bool,
    config: Option<NodeEntry>,
    /// What each `settle` was given: (frontends, backends).
    settled: Vec<(BTreeSet<Frontend>, BTreeSet<BackendKey>)>,
}

impl FakeMaps {
    fn write(&mut self, line: String) -> anyhow::Result<()> {
        if self
            .fail
            .as_ref()
            .is_some_and(|prefix| line.starts_with(prefix.as_str()))
        {
            self.fail = None;
            anyhow::bail!("injected failure: {line}");
        }
        self.log.push(line);
        Ok(())
    }

    /// A packet's view: every slot below a service's count names a backend
    /// that exists and is a member of the service with the same address; a
    /// service that admits only some sources has ranges.
    fn check(&self) {
        if self.unchecked {
            return;
        }
        for (fe, svc) in &self.services {
            assert!(
                !svc.source_ranges || self.ranges.iter().any(|(id, _)| *id == svc.id),
                "{fe:?} admits ranges it does not have; log {:?}",
                self.log
            );
            // A Maglev table fills table_size slots; a list, backend_count.
            let used = match svc.table_size {
                0 => svc.backend_count,
                size => size,
            };
            assert!(
                svc.backend_count > 0 || svc.table_size == 0,
                "{fe:?} has a table but no backend"
            );
            for slot in 0..used {
                let id = self.slots.get(&(svc.slots_id, slot)).unwrap_or_else(|| {
                    panic!(
                        "{fe:?} count {} but slot {slot} missing; log {:?}",
                        svc.backend_count, self.log
                    )
                });
                assert!(
                    self.backends.contains_key(id),
                    "slot {slot} of {fe:?} names missing backend {id}; log {:?}",
                    self.log
                );
                assert_eq!(
                    self.members.get(&(svc.id, *id)),
                    self.backends.get(id),
                    "slot {slot} of {fe:?} names backend {id}, not a member; log {:?}",
                    self.log
                );
                assert!(
                    !self.terminating.contains(&(svc.id, *id)),
                    "slot {slot} of {fe:?} names terminating backend {id}; log {:?}",
                    self.log
                );
            }
        }
    }

    fn writes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    /// Backend addresses each frontend serves, as the maps say.
    fn served(&self) -> BTreeMap<u16, Vec<IpAddr>> {
        let mut out = BTreeMap::new();
        for (frontend, svc) in &self.services {
            let mut addrs: Vec<IpAddr> = (0..svc.backend_count)
                .map(|s| self.backends[&self.slots[&(svc.slots_id, s)]].addr.ip())
                .collect();
            addrs.sort();
            out.insert(frontend.port, addrs);
        }
        out
    }
}

impl Maps for FakeMaps {
    fn set_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()> {
        self.write(format!("set_backend {id}"))?;
        self.backends.insert(id, *backend);
        self.check();
        Ok(())
    }
    fn remove_backend(&mut self, id: u32, _: &BackendKey) -> anyhow::Result<()> {
        self.write(format!("remove_backend {id}"))?;
        self.backends.remove(&id);
        self.check();
        Ok(())
    }
    fn set_slot(&mut self, slot: Slot, backend_id: u32) -> anyhow::Result<()> {
        self.write(format!(
            "set_slot {}/{} {backend_id}",
            slot.table, slot.index
        ))?;
        self.slots.insert((slot.table, slot.index), backend_id);
        self.check();
        Ok(())
    }
    fn remove_slot(&mut self, slot: Slot) -> anyhow::Result<()> {
        self.write(format!("remove_slot {}/{}", slot.table, slot.index))?;
        self.slots.remove(&(slot.table, slot.index));
        self.check();
        Ok(())
    }
    fn set_service(&mut self, fe: &Frontend, svc: &ServiceEntry) -> anyhow::Result<()> {
        self.write(format!(
            "set_service {} count {} table {}",
            fe.port, svc.backend_count, svc.slots_id
        ))?;
        self.services.insert(*fe, *svc);
        self.check();
        Ok(())
    }
    fn remove_service(&mut self, fe: &Frontend) -> anyhow::Result<()> {
        self.write(format!("remove_service {}", fe.port))?;
        self.services.remove(fe);
        self.check();
        Ok(())
    }
    fn fresh_service_id(&mut self, id: u32, fe: &Frontend) -> anyhow::Result<()> {
        self.write(format!("fresh_service_id {id} port {}", fe.port))
    }
    fn set_member(
        &mut self,
        key: Member,
        backend: &BackendKey,
        terminating: bool,
    ) -> anyhow::Result<()> {
        let tag = if terminating { " terminating" } else { "" };
        self.write(format!(
            "set_member {}/{}{tag}",
            key.service_id, key.backend_id
        ))?;
        let pair = (key.service_id, key.backend_id);
        self.members.insert(pair, *backend);
        match terminating {
            true => self.terminating.insert(pair),
            false => self.terminating.remove(&pair),
        };
        self.check();
        Ok(())
    }
    fn remove_member(&mut self, key: Member, _: &BackendKey) -> anyhow::Result<()> {
        self.write(format!(
            "remove_member {}/{}",
            key.service_id, key.backend_id
        ))?;
        self.members.remove(&(key.service_id, key.backend_id));
        self.terminating.remove(&(key.service_id, key.backend_id));
        self.check();
        Ok(())
    }
    fn set_config(&mut self, config: &NodeEntry) -> anyhow::Result<()> {
        self.write("set_config".into())?;
        self.config = Some(*config);
        Ok(())
    }
    fn set_source_range(&mut self, id: u32, range: Cidr) -> anyhow::Result<()> {
        self.write(format!("set_range {id} {range}"))?;
        self.ranges.insert((id, range));
        self.check();
        Ok(())
    }
    fn remove_source_range(&mut self, id: u32, range: Cidr) -> anyhow::Result<()> {
        self.write(format!("remove_range {id} {range}"))?;
        self.ranges.remove(&(id, range));
        self.check();
        Ok(())
    }

    fn settle(
        &mut self,
        frontends: &mut dyn Iterator<Item = &Frontend>,
        backends: &mut dyn Iterator<Item = &BackendKey>,
    ) -> anyhow::Result<()> {
        let settled = (frontends.copied().collect(), backends.copied().collect());
        self.settled.push(settled);
        Ok(())
    }
}

fn desired(services: &[(u16, &[u8])]) -> Desired {
    let mut out = Desired::default();
    for (port, backends) in services {
        let frontend = Frontend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: *port,
            protocol: Protocol::Tcp,
            clients: Default::default(),
        };
        let state = FrontendState {
            service: ObjectKey {
                namespace: "default".into(),
                name: format!("svc{port}"),
            },
            port_name: String::new(),
            scope: Scope::ClusterIp,
            backends: backends
                .iter()
                .map(|b| SocketAddr::from(([10, 1, *b, 2], 8080)))
                .collect(),
            ..FrontendState::default()
        };
        out.frontends.insert(frontend, state);
    }
    out
}

fn addrs(list: &[u8]) -> Vec<IpAddr> {
    list.iter().map(|b| IpAddr::from([10, 1, *b, 2])).collect()
}

#[test]
fn first_sync_writes_backends_then_members_then_slots_then_the_service() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let report = r.apply(desired(&[(80, &[1, 2])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        maps.writes(),
        [
            "set_config",
            "set_backend 1",
            "set_backend 2",
            "fresh_service_id 1 port 80",
            "set_member 1/1",
            "set_member 1/2",
            "set_slot 1/0 1",
            "set_slot 1/1 2",
            "set_service 80 count 2 table 1"
        ]
    );
    assert_eq!(report.writes, 8);
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let d = desired(&[(80, &[1, 2]), (81, &[2, 3])]);
    r.apply(d.clone(), &mut maps);
    maps.writes();
    let report = r.apply(d.clone(), &mut maps);
    assert_eq!(report.writes, 0);
    assert!(maps.writes().is_empty());
}

/// Make before break: the new table is written in full, the entry
/// switches to it, then the old one goes (never a half-written table).
#[test]
fn adding_a_backend_writes_a_new_table_switches_then_deletes_the_old() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2])]), &mut maps);
    maps.writes();
    r.apply(desired(&[(80, &[1, 2, 3])]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "set_backend 3",
            "set_member 1/3",
            "set_slot 2/0 1",
            "set_slot 2/1 2",
            "set_slot 2/2 3",
            "set_service 80 count 3 table 2",
            "remove_slot 1/1",
            "remove_slot 1/0"
        ]
    );
    assert_eq!(maps.served()[&80], addrs(&[1, 2, 3]));
}

#[test]
fn removing_a_backend_switches_tables_before_deleting() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2, 3])]), &mut maps);
    maps.writes();
    r.apply(desired(&[(80, &[1, 3])]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "set_slot 2/0 1",
            "set_slot 2/1 3",
            "set_service 80 count 2 table 2",
            "remove_slot 1/2",
            "remove_slot 1/1",
            "remove_slot 1/0",
            "remove_member 1/2",
            "remove_backend 2"
        ]
    );
    assert_eq!(maps.served()[&80], addrs(&[1, 3]));
}

#[test]
fn deleting_a_service_removes_its_entry_first_and_shared_backends_stay() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2]), (81, &[2])]), &mut maps);
    maps.writes();
    r.apply(desired(&[(81, &[2])]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "remove_service 80",
            "remove_slot 1/1",
            "remove_slot 1/0",
            "remove_member 1/1",
            "remove_member 1/2",
            "remove_backend 1"
        ]
    );
    assert_eq!(maps.served().len(), 1);
    assert_eq!(r.backend_count(), 1);
}

#[test]
fn ids_are_reused_after_removal() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1])]), &mut maps);
    r.apply(desired(&[]), &mut maps);
    maps.writes();
    r.apply(desired(&[(90, &[4])]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "set_backend 1",
            "fresh_service_id 1 port 90",
            "set_member 1/1",
            "set_slot 1/0 1",
            "set_service 90 count 1 table 1"
        ]
    );
}

#[test]
fn a_failed_write_keeps_the_old_state_and_the_next_pass_finishes() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1]), (81, &[2])]), &mut maps);
    maps.fail = Some("set_backend".into());
    let report = r.apply(desired(&[(80, &[1, 3]), (81, &[2, 4])]), &mut maps);
    assert_eq!(
        report.errors.len(),
        2,
        "one for the backend, one for the frontend that needs it: {:?}",
        report.errors
    );
    let served = maps.served();
    assert_eq!(served[&80], addrs(&[1]), "80 keeps what it had");
    assert_eq!(served[&81], addrs(&[2, 4]), "81 moved on");
    let report = r.apply(desired(&[(80, &[1, 3]), (81, &[2, 4])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1, 3]));
}

#[test]
fn a_failed_slot_write_leaves_a_consistent_service() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2])]), &mut maps);
    // The third slot of the new table (2) fails: what was written of it goes.
    maps.fail = Some("set_slot 2/2".into());
    let report = r.apply(desired(&[(80, &[1, 2, 3, 4])]), &mut maps);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1, 2]));
    assert_eq!(maps.slots.len(), 2, "only the old table: {:?}", maps.slots);
    r.apply(desired(&[(80, &[1, 2, 3, 4])]), &mut maps);
    assert_eq!(maps.served()[&80], addrs(&[1, 2, 3, 4]));
}

#[test]
fn running_out_of_ids_is_an_error_not_a_crash() {
    let mut maps = FakeMaps::default();
    // Ids start at 1, so a limit of 3 leaves two of each.
    let mut r = Reconciler::new(3, 3);
    let report = r.apply(desired(&[(80, &[1]), (81, &[2]), (82, &[3])]), &mut maps);
    assert!(!report.errors.is_empty());
    assert_eq!(maps.served().len(), 2);
}

impl FakeMaps {
    /// What a restarted agent reads back.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.iter().map(|(f, s)| (*f, *s)).collect(),
            slots: self
                .slots
                .iter()
                .map(|((table, index), b)| {
                    (
                        Slot {
                            table: *table,
                            index: *index,
                        },
                        *b,
                    )
                })
                .collect(),
            backends: self.backends.iter().map(|(id, b)| (*id, *b)).collect(),
            terminating_members: self
                .terminating
                .iter()
                .map(|(service_id, backend_id)| Member {
                    service_id: *service_id,
                    backend_id: *backend_id,
                })
                .collect(),
            members: self
                .members
                .iter()
                .map(|((service_id, backend_id), b)| {
                    (
                        Member {
                            service_id: *service_id,
                            backend_id: *backend_id,
                        },
                        *b,
                    )
                })
                .collect(),
            source_ranges: self.ranges.iter().copied().collect(),
            config: self.config,
        }
    }
}

#[test]
fn a_restarted_agent_adopts_the_maps_and_writes_nothing_when_nothing_changed() {
    let mut maps = FakeMaps::default();
    let d = desired(&[(80, &[1, 2, 3]), (81, &[3, 4])]);
    Reconciler::new(100, 100).apply(d.clone(), &mut maps);
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    let report = adopted.apply(d.clone(), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        maps.writes(),
        Vec::<String>::new(),
        "correct entries are left untouched"
    );
    assert_eq!(adopted.frontend_count(), 2);
    assert_eq!(adopted.backend_count(), 4);
}

#[test]
fn an_adopted_state_changes_with_the_fewest_writes_and_new_ids_do_not_collide() {
    let mut maps = FakeMaps::default();
    Reconciler::new(100, 100).apply(desired(&[(80, &[1, 2]), (81, &[3])]), &mut maps);
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    adopted.apply(
        desired(&[(80, &[1, 2, 5]), (81, &[3]), (82, &[5])]),
        &mut maps,
    );
    // Table ids 1 and 2 are adopted: the new ones do not collide.
    assert_eq!(
        maps.writes(),
        [
            "set_backend 4",
            "set_member 1/4",
            "set_slot 3/0 1",
            "set_slot 3/1 2",
            "set_slot 3/2 4",
            "set_service 80 count 3 table 3",
            "remove_slot 1/1",
            "remove_slot 1/0",
            "fresh_service_id 3 port 82",
            "set_member 3/4",
            "set_slot 4/0 4",
            "set_service 82 count 1 table 4"
        ]
    );
}

#[test]
fn entries_nothing_explains_are_removed_in_a_safe_order() {
    let mut maps = FakeMaps::default();
    Reconciler::new(100, 100).apply(desired(&[(80, &[1, 2]), (81, &[3])]), &mut maps);
    // A slot past the count and a backend no slot names, as a crash between
    // writes could leave them.
    maps.slots.insert((1, 7), 2);
    maps.backends.insert(
        42,
        BackendKey {
            addr: SocketAddr::from(([10, 9, 9, 9], 80)),
            protocol: Protocol::Tcp,
        },
    );
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    let report = adopted.apply(desired(&[(80, &[1, 2])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        maps.writes(),
        [
            "remove_slot 1/7",
            "remove_service 81",
            "remove_slot 2/0",
            "remove_member 2/3",
            "remove_backend 3",
            "remove_backend 42"
        ]
    );
    assert_eq!(maps.served()[&80], addrs(&[1, 2]));
}

#[test]
fn an_inconsistent_service_entry_is_rebuilt_not_trusted() {
    let mut maps = FakeMaps::default();
    Reconciler::new(100, 100).apply(desired(&[(80, &[1, 2])]), &mut maps);
    // Slot 1 lost: the entry's count promises more than the slots hold.
    maps.slots.remove(&(1, 1));
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    let report = adopted.apply(desired(&[(80, &[1, 2])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1, 2]));
    assert!(
        maps.writes()
            .first()
            .is_some_and(|w| w == "remove_service 80")
    );
}

/// The frontends one Service wants, as `model::changes` gives them.
fn change(entries: &[(&str, u16, &[u8])]) -> proxy_agent::reconcile::Changes {
    let mut out = proxy_agent::reconcile::Changes::new();
    for (name, port, backends) in entries {
        let key = ObjectKey {
            namespace: "default".into(),
            name: name.to_string(),
        };
        let wanted = out.entry(key.clone()).or_default();
        if *port == 0 {
            continue;
        }
        let frontend = Frontend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: *port,
            protocol: Protocol::Tcp,
            clients: Default::default(),
        };
        let state = FrontendState {
            service: key,
            port_name: String::new(),
            scope: Scope::ClusterIp,
            backends: backends
                .iter()
                .map(|b| SocketAddr::from(([10, 1, *b, 2], 8080)))
                .collect(),
            ..FrontendState::default()
        };
        wanted.push((frontend, state));
    }
    out
}

#[test]
fn a_partial_pass_touches_only_the_changed_service() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2]), (81, &[2, 3])]), &mut maps);
    maps.writes();
    let report = r.apply_changes(&change(&[("svc80", 80, &[1, 2, 4])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        maps.writes(),
        [
            "set_backend 4",
            "set_member 1/4",
            "set_slot 3/0 1",
            "set_slot 3/1 2",
            "set_slot 3/2 4",
            "set_service 80 count 3 table 3",
            "remove_slot 1/1",
            "remove_slot 1/0"
        ]
    );
    assert_eq!(
        maps.served()[&81],
        addrs(&[2, 3]),
        "the other service is untouched"
    );
}

#[test]
fn a_service_gone_in_a_partial_pass_is_removed_and_its_last_backends_too() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2]), (81, &[2, 3])]), &mut maps);
    maps.writes();
    r.apply_changes(&change(&[("svc80", 0, &[])]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "remove_service 80",
            "remove_slot 1/1",
            "remove_slot 1/0",
            "remove_member 1/1",
            "remove_member 1/2",
            "remove_backend 1"
        ]
    );
    assert_eq!(r.backend_count(), 2, "backend 2 is still named by 81");
}

#[test]
fn a_frontend_held_by_an_unchanged_service_is_not_taken() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1])]), &mut maps);
    let report = r.apply_changes(&change(&[("intruder", 80, &[5])]), &mut maps);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1]));
    // The backend it brought is not left behind.
    assert_eq!(r.backend_count(), 1);
}

/// `change`, with the frontend claimed as an external IP.
fn external(mut changes: proxy_agent::reconcile::Changes) -> proxy_agent::reconcile::Changes {
    for (_, state) in changes.values_mut().flatten() {
        state.scope = Scope::ExternalIp;
    }
    changes
}

#[test]
fn in_partial_passes_an_allocated_address_wins_over_an_external_ip() {
    // An external IP holds the frontend; the cluster IP the API server
    // allocated there takes it over.
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let report = r.apply_changes(&external(change(&[("intruder", 80, &[5])])), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let report = r.apply_changes(&change(&[("dns", 80, &[1])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1]));
    // The external IP cannot take it back, changing alone or with it.
    let report = r.apply_changes(&external(change(&[("intruder", 80, &[6])])), &mut maps);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let mut both = external(change(&[("intruder", 80, &[7])]));
    both.extend(change(&[("dns", 80, &[1, 2])]));
    let report = r.apply_changes(&both, &mut maps);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1, 2]));
}

#[test]
fn partial_and_full_passes_agree() {
    let mut partial_maps = FakeMaps::default();
    let mut partial = Reconciler::new(100, 100);
    partial.apply(desired(&[(80, &[1, 2]), (81, &[3])]), &mut partial_maps);
    partial.apply_changes(&change(&[("svc80", 80, &[2, 5])]), &mut partial_maps);
    partial.apply_changes(
        &change(&[("svc81", 0, &[]), ("svc82", 82, &[5, 6])]),
        &mut partial_maps,
    );
    let mut full_maps = FakeMaps::default();
    Reconciler::new(100, 100).apply(desired(&[(80, &[2, 5]), (82, &[5, 6])]), &mut full_maps);
    assert_eq!(partial_maps.served(), full_maps.served());
    assert_eq!(partial_maps.backends.len(), full_maps.backends.len());
    // And a full pass after partial ones has nothing to do.
    partial_maps.writes();
    let report = partial.apply(desired(&[(80, &[2, 5]), (82, &[5, 6])]), &mut partial_maps);
    assert_eq!(report.writes, 0, "{:?}", partial_maps.writes());
}

fn with_ranges(ranges: &[&str]) -> Desired {
    let mut d = desired(&[(80, &[1, 2])]);
    for state in d.frontends.values_mut() {
        state.scope = Scope::LoadBalancer;
        state.affinity_timeout = Some(30);
        state.source_ranges = ranges.iter().map(|r| r.parse().expect("cidr")).collect();
    }
    d
}

#[test]
fn source_ranges_are_written_before_the_entry_that_enables_them_and_removed_after() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(with_ranges(&[]), &mut maps);
    maps.writes();
    r.apply(with_ranges(&["192.0.2.0/24", "198.51.100.7/32"]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "set_range 1 192.0.2.0/24",
            "set_range 1 198.51.100.7/32",
            "set_service 80 count 2 table 1"
        ]
    );
    let entry = maps.services.values().next().copied().expect("entry");
    assert_eq!(entry.affinity_timeout, Some(30));
    assert!(entry.source_ranges);
    r.apply(with_ranges(&["192.0.2.0/24", "203.0.113.0/24"]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "set_range 1 203.0.113.0/24",
            "remove_range 1 198.51.100.7/32"
        ],
        "a changed set adds before it removes, and the entry stays"
    );
    r.apply(with_ranges(&[]), &mut maps);
    assert_eq!(
        maps.writes(),
        [
            "set_service 80 count 2 table 1",
            "remove_range 1 192.0.2.0/24",
            "remove_range 1 203.0.113.0/24"
        ]
    );
    // A restarted agent adopts members and ranges as they are.
    r.apply(with_ranges(&["10.0.0.0/8"]), &mut maps);
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    let report = adopted.apply(with_ranges(&["10.0.0.0/8"]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.writes(), Vec::<String>::new());
}

#[test]
fn a_member_naming_another_address_is_replaced() {
    let mut maps = FakeMaps::default();
    let d = desired(&[(80, &[1, 2])]);
    Reconciler::new(100, 100).apply(d.clone(), &mut maps);
    // A stray member left by a crash, and one whose address is wrong.
    let wrong = maps.backends[&1];
    maps.members.insert((1, 2), wrong);
    maps.members.insert((9, 1), wrong);
    maps.unchecked = true;
    maps.writes();
    let snapshot = maps.snapshot();
    let mut adopted = Reconciler::adopt(&snapshot, ROOM);
    let report = adopted.apply(d.clone(), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let writes = maps.writes();
    assert!(
        writes.contains(&"remove_member 9/1".to_string()),
        "{writes:?}"
    );
    assert_eq!(maps.members[&(1, 2)], maps.backends[&2], "{writes:?}");
    maps.unchecked = false;
    maps.check();
}

#[test]
fn a_backend_stays_while_a_member_entry_names_it_even_after_a_failed_pass() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1])]), &mut maps);
    // Members for 2 and 3 get written, then a slot write fails.
    maps.fail = Some("set_slot 2/1".into());
    let report = r.apply(desired(&[(80, &[1, 2, 3])]), &mut maps);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    for (key, backend) in &maps.members {
        assert!(
            maps.backends.get(&key.1) == Some(backend),
            "member {key:?} names a backend that was removed"
        );
    }
    // Dropping them later works, and everything is cleaned up.
    let report = r.apply(desired(&[(80, &[1])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.members.len(), 1);
    assert_eq!(maps.backends.len(), 1);
    let report = r.apply(desired(&[]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(maps.members.is_empty() && maps.backends.is_empty());
}

/// The one frontend of `desired` with its state changed by `f`.
fn with_state(mut d: Desired, f: impl Fn(&mut FrontendState)) -> Desired {
    for state in d.frontends.values_mut() {
        f(state);
    }
    d
}

fn maglev(d: Desired) -> Desired {
    with_state(d, |s| {
        s.algorithm = Algorithm::Maglev;
        s.table_size = 251;
    })
}

/// Slot contents of the single service, by slot.
fn slot_contents(maps: &FakeMaps) -> Vec<u32> {
    maps.slots.values().copied().collect()
}

#[test]
fn a_maglev_service_gets_its_table_in_slots_and_keeps_most_of_it_when_a_backend_leaves() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let report = r.apply(maglev(desired(&[(80, &[1, 2, 3, 4, 5])])), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let svc = *maps.services.values().next().expect("service");
    assert_eq!(
        (svc.algorithm, svc.table_size, svc.backend_count),
        (Algorithm::Maglev, 251, 5)
    );
    let before = slot_contents(&maps);
    assert_eq!(before.len(), 251);
    let used: BTreeSet<u32> = before.iter().copied().collect();
    assert_eq!(used.len(), 5, "every backend has slots");
    r.apply(maglev(desired(&[(80, &[1, 2, 3, 5])])), &mut maps);
    let after = slot_contents(&maps);
    let removed = *used
        .difference(&after.iter().copied().collect())
        .next()
        .expect("a backend left the table");
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a && **b != removed)
        .count();
    // Maglev moves the removed backend's slots and only a few others.
    assert!(moved < 251 / 10, "{moved} slots of staying backends moved");
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    adopted.apply(maglev(desired(&[(80, &[1, 2, 3, 5])])), &mut maps);
    assert_eq!(maps.writes(), Vec::<String>::new(), "a table is adopted");
}

#[test]
fn terminating_backends_stay_members_without_slots_and_flip_in_place() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let terminating = |ids: &'static [u8]| {
        move |s: &mut FrontendState| {
            s.terminating = ids
                .iter()
                .map(|b| SocketAddr::from(([10, 1, *b, 2], 8080)))
                .collect();
        }
    };
    let d = with_state(desired(&[(80, &[1, 2])]), terminating(&[3]));
    let report = r.apply(d.clone(), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.members.len(), 3);
    assert_eq!(maps.terminating.len(), 1);
    assert_eq!(
        maps.services.values().next().map(|s| s.backend_count),
        Some(2)
    );
    maps.writes();
    // Backend 2 begins terminating: its member entry is rewritten, not
    // removed, so its flows keep it.
    r.apply(
        with_state(desired(&[(80, &[1])]), terminating(&[2, 3])),
        &mut maps,
    );
    let log = maps.writes();
    assert!(log.iter().any(|l| l.ends_with(" terminating")), "{log:?}");
    assert!(
        !log.iter().any(|l| l.starts_with("remove_member")),
        "{log:?}"
    );
    assert_eq!(maps.members.len(), 3);
    assert_eq!(maps.terminating.len(), 2);
    let d = with_state(desired(&[(80, &[1])]), terminating(&[2, 3]));
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    adopted.apply(d.clone(), &mut maps);
    assert_eq!(maps.writes(), Vec::<String>::new(), "flags are adopted");
    // Gone from the slice: no longer a member.
    adopted.apply(desired(&[(80, &[1])]), &mut maps);
    assert_eq!(maps.members.len(), 1);
    assert!(maps.terminating.is_empty());
}

/// One Service (`name`) with a frontend on each port, all with the same
/// backends.
fn one_service(name: &str, ports: &[u16], backends: &[u8]) -> Vec<(Frontend, FrontendState)> {
    let mut d = desired(&ports.iter().map(|p| (*p, backends)).collect::<Vec<_>>());
    for state in d.frontends.values_mut() {
        state.service.name = name.into();
    }
    d.frontends.into_iter().collect()
}

fn merged(parts: &[Vec<(Frontend, FrontendState)>]) -> Desired {
    let mut d = Desired::default();
    d.frontends.extend(parts.iter().flatten().cloned());
    d
}

fn tables_named(maps: &FakeMaps) -> BTreeSet<u32> {
    maps.services.values().map(|s| s.slots_id).collect()
}

#[test]
fn thirty_two_frontends_of_a_large_maglev_table_share_one_copy() {
    let mut maps = FakeMaps {
        // 131071 slots under 32 entries: checking every slot of every entry
        // after every write would take hours; the checked tests below use
        // small tables.
        unchecked: true,
        ..FakeMaps::default()
    };
    let mut r = Reconciler::new(100, 100);
    let ports: Vec<u16> = (1..=32).collect();
    let d = with_state(merged(&[one_service("big", &ports, &[1, 2, 3])]), |s| {
        s.algorithm = Algorithm::Maglev;
        s.table_size = 131_071;
    });
    let report = r.apply(d.clone(), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.invalid.is_empty(), "{:?}", report.invalid);
    assert_eq!(maps.services.len(), 32);
    assert_eq!(maps.slots.len(), 131_071, "one table, not 32");
    assert_eq!(tables_named(&maps).len(), 1);
    assert_eq!(r.slot_usage(), (1, 131_071));
    maps.unchecked = false;
    maps.check();
}

#[test]
fn frontends_with_equal_slots_share_a_table_until_the_last_one_leaves() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let a = one_service("a", &[80, 81, 82], &[1, 2]);
    let b = one_service("b", &[90], &[1, 2]);
    let c = one_service("c", &[91], &[2, 1]);
    r.apply(
        maglev(merged(&[a.clone(), b.clone(), c.clone()])),
        &mut maps,
    );
    assert_eq!(tables_named(&maps), [1].into(), "same backends, one table");
    assert_eq!(maps.slots.len(), 251);
    maps.writes();
    // Another algorithm over the same list: another table (slots differ).
    r.apply(merged(&[a.clone(), b.clone()]), &mut maps);
    let log = maps.writes();
    assert_eq!(r.slot_usage(), (1, 2), "{log:?}");
    assert_eq!(tables_named(&maps), [2].into());
    // Frontends leave one by one; the table goes with the last.
    r.apply(merged(std::slice::from_ref(&a)), &mut maps);
    let log = maps.writes();
    assert!(!log.iter().any(|l| l.starts_with("remove_slot")), "{log:?}");
    r.apply(merged(&[]), &mut maps);
    let log = maps.writes();
    let last_entry = log.iter().rposition(|l| l.starts_with("remove_service"));
    let first_slot = log.iter().position(|l| l.starts_with("remove_slot"));
    assert!(
        last_entry < first_slot,
        "entries go before their table: {log:?}"
    );
    assert!(maps.slots.is_empty());
    assert_eq!(r.slot_usage(), (0, 0));
}

#[test]
fn a_shared_table_that_changes_is_replaced_make_before_break() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(
        merged(&[one_service("a", &[80, 81, 82], &[1, 2])]),
        &mut maps,
    );
    maps.writes();
    r.apply(
        merged(&[one_service("a", &[80, 81, 82], &[1, 3])]),
        &mut maps,
    );
    let log = maps.writes();
    let pos = |f: &dyn Fn(&String) -> bool| log.iter().position(f);
    let rpos = |f: &dyn Fn(&String) -> bool| log.iter().rposition(f);
    let new_slots = rpos(&|l| l.starts_with("set_slot 2/"));
    let switches: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("set_service"))
        .collect();
    assert_eq!(switches.len(), 3, "{log:?}");
    assert!(switches.iter().all(|l| l.ends_with("table 2")), "{log:?}");
    assert!(
        new_slots < pos(&|l| l.starts_with("set_service")),
        "{log:?}"
    );
    assert!(
        rpos(&|l| l.starts_with("set_service")) < pos(&|l| l.starts_with("remove_slot 1/")),
        "the old table goes after the last switch: {log:?}"
    );
    assert_eq!(r.slot_usage(), (1, 2));
}

#[test]
fn a_freed_table_id_is_reused_only_in_a_later_pass() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2])]), &mut maps);
    // Table 1 is replaced and deleted; the new frontend in the same pass
    // does not get its id, though it is the lowest free one.
    r.apply(desired(&[(80, &[1, 3]), (81, &[5])]), &mut maps);
    let table = |maps: &FakeMaps, port: u16| {
        maps.services
            .iter()
            .find(|(f, _)| f.port == port)
            .map(|(_, s)| s.slots_id)
    };
    assert_eq!((table(&maps, 80), table(&maps, 81)), (Some(2), Some(3)));
    r.apply(desired(&[(80, &[1, 3]), (81, &[5]), (82, &[6])]), &mut maps);
    assert_eq!(table(&maps, 82), Some(1), "reused a pass later");
}

#[test]
fn a_service_over_the_slot_budget_keeps_what_it_had_and_others_go_on() {
    let mut maps = FakeMaps::default();
    // Room for two 251-slot tables per Service.
    let mut r = Reconciler::adopt(
        &Snapshot::default(),
        Capacity {
            slots: 100_000,
            ..ROOM
        },
    );
    r.set_slot_budget(600);
    let big = |ports: &[u16], backends: &[u8]| one_service("big", ports, backends);
    let mut wanted = vec![big(&[80], &[1, 2]), one_service("small", &[90], &[1])];
    let report = r.apply(maglev(merged(&wanted)), &mut maps);
    assert!(report.invalid.is_empty() && report.errors.is_empty());
    let before = maps.served();
    // Three distinct tables (753 slots): over the budget. The small one
    // changes in the same pass and is programmed.
    let mut three = big(&[80], &[1, 2]);
    for (frontend, state) in three.iter_mut() {
        frontend.port = 80;
        state.backends.push(SocketAddr::from(([10, 1, 9, 2], 8080)));
    }
    let mut more = big(&[81], &[3]);
    more.extend(big(&[82], &[4]));
    three.extend(more);
    wanted = vec![three, one_service("small", &[90], &[1, 5])];
    maps.writes();
    let report = r.apply(maglev(merged(&wanted)), &mut maps);
    assert_eq!(report.invalid.len(), 1, "{:?}", report.invalid);
    assert!(
        report.invalid[0].contains("default/big"),
        "{:?}",
        report.invalid
    );
    assert!(
        report.errors.is_empty(),
        "not a failed write: {:?}",
        report.errors
    );
    assert_eq!(r.over_budget(), 1);
    let after = maps.served();
    assert_eq!(after[&80], before[&80], "the old state stays programmed");
    assert!(!after.contains_key(&81) && !after.contains_key(&82));
    let entry = |maps: &FakeMaps, port: u16| {
        let found = maps.services.iter().find(|(f, _)| f.port == port);
        found.map(|(_, s)| (s.backend_count, s.slots_id))
    };
    assert_eq!(
        entry(&maps, 90).map(|e| e.0),
        Some(2),
        "another Service is unaffected"
    );
    // Within the budget again: programmed, no longer counted.
    let report = r.apply(
        maglev(merged(&[
            big(&[80, 81], &[1, 2]),
            one_service("small", &[90], &[1, 5]),
        ])),
        &mut maps,
    );
    assert!(report.invalid.is_empty() && report.errors.is_empty());
    assert_eq!(r.over_budget(), 0);
    assert_eq!(entry(&maps, 81), entry(&maps, 80), "one table for both");
}

#[test]
fn a_table_that_does_not_fit_the_map_fails_that_frontend_only() {
    let mut maps = FakeMaps::default();
    // lb_slots of 600: two 251-slot tables fit, a third does not.
    let mut r = Reconciler::adopt(&Snapshot::default(), Capacity { slots: 600, ..ROOM });
    r.set_slot_budget(600);
    let d = maglev(desired(&[(80, &[1]), (81, &[2])]));
    assert!(r.apply(d.clone(), &mut maps).errors.is_empty());
    let before = maps.served();
    maps.writes();
    let report = r.apply(
        maglev(desired(&[(80, &[1, 3]), (81, &[2]), (82, &[4])])),
        &mut maps,
    );
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    assert!(
        report.errors.iter().all(|e| e.contains("lb_slots is full")),
        "{:?}",
        report.errors
    );
    let after = maps.served();
    assert_eq!(after[&80], before[&80], "80 keeps its table");
    assert_eq!(after[&81], before[&81]);
    assert!(!after.contains_key(&82));
    assert_eq!(maps.slots.len(), 502, "nothing half-written is left");
    assert!(!maps.writes().iter().any(|l| l.starts_with("set_slot")));
}

#[test]
fn a_restarted_agent_adopts_shared_tables_without_rewriting_them() {
    let mut maps = FakeMaps::default();
    let d = maglev(merged(&[
        one_service("a", &[80, 81, 82], &[1, 2]),
        one_service("b", &[90], &[3]),
    ]));
    Reconciler::new(100, 100).apply(d.clone(), &mut maps);
    maps.writes();
    let mut adopted = Reconciler::adopt(&maps.snapshot(), ROOM);
    assert_eq!(adopted.slot_usage(), (2, 502));
    let report = adopted.apply(d.clone(), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.writes(), Vec::<String>::new());
    // The adopted table is still shared: it goes only with its last user.
    adopted.apply(
        maglev(merged(&[
            one_service("a", &[80], &[1, 2]),
            one_service("b", &[90], &[3]),
        ])),
        &mut maps,
    );
    let log = maps.writes();
    assert!(!log.iter().any(|l| l.starts_with("remove_slot")), "{log:?}");
    assert_eq!(adopted.slot_usage(), (2, 502));
}

#[test]
fn a_table_whose_deletion_fails_goes_in_the_next_pass_and_its_id_waits() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2])]), &mut maps);
    maps.fail = Some("remove_slot 1/".into());
    let report = r.apply(desired(&[(80, &[1, 3])]), &mut maps);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1, 3]), "the switch happened");
    assert!(maps.slots.contains_key(&(1, 1)), "table 1 still there");
    assert_eq!(
        r.backend_count(),
        3,
        "backend 2 stays while a slot names it"
    );
    // The next pass deletes it first; its id is not handed out meanwhile.
    let report = r.apply(desired(&[(80, &[1, 3]), (81, &[5])]), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!maps.slots.keys().any(|(t, _)| *t == 1), "{:?}", maps.slots);
    assert_eq!(tables_named(&maps), [2, 3].into());
    assert_eq!(r.backend_count(), 3, "backend 2 went with its last slot");
    assert_eq!(r.slot_usage(), (2, 3));
}

/// What the maps hold, to compare two ways of writing the same passes.
type Contents = (
    BTreeMap<Frontend, ServiceEntry>,
    BTreeMap<(u32, u32), u32>,
    BTreeMap<u32, BackendKey>,
    BTreeMap<(u32, u32), BackendKey>,
    BTreeSet<(u32, u32)>,
    BTreeSet<(u32, Cidr)>,
);

fn contents(maps: &FakeMaps) -> Contents {
    (
        maps.services.clone(),
        maps.slots.clone(),
        maps.backends.clone(),
        maps.members.clone(),
        maps.terminating.clone(),
        maps.ranges.clone(),
    )
}

/// Passes with every kind of write: a first sync, backends added and
/// removed, one beginning to terminate (also while another frontend's
/// entry keeps the old table), a Maglev table, source ranges, a Service
/// gone.
fn passes() -> Vec<Desired> {
    let terminating = |s: &mut FrontendState| {
        s.terminating = vec![SocketAddr::from(([10, 1, 4, 2], 8080))];
    };
    let with_lb = |d: Desired| {
        merged(&[
            with_ranges(&["192.0.2.0/24"])
                .frontends
                .into_iter()
                .collect(),
            d.frontends.into_iter().collect(),
        ])
    };
    vec![
        desired(&[(80, &[1, 2]), (81, &[2, 3]), (82, &[4, 5, 6])]),
        with_lb(desired(&[(81, &[2, 3, 7]), (82, &[4, 5, 6]), (83, &[1])])),
        with_lb(maglev(desired(&[
            (81, &[2, 7]),
            (82, &[5, 6]),
            (83, &[1, 8]),
        ]))),
        with_state(desired(&[(82, &[5, 6]), (83, &[1, 8])]), terminating),
        desired(&[(83, &[8])]),
        // Two frontends share a table; one backend begins terminating.
        merged(&[one_service("pair", &[90, 91], &[1, 4])]),
        with_state(merged(&[one_service("pair", &[90, 91], &[1])]), terminating),
    ]
}

#[test]
fn passes_written_behind_end_as_direct_passes_and_each_write_is_safe() {
    let (mut direct, mut behind) = (FakeMaps::default(), FakeMaps::default());
    let (mut a, mut b) = (Reconciler::new(100, 100), Reconciler::new(100, 100));
    for (n, d) in passes().into_iter().enumerate() {
        let report = a.apply(d.clone(), &mut direct);
        assert!(report.errors.is_empty(), "pass {n}: {:?}", report.errors);
        // FakeMaps checks what a packet would see after every single write,
        // in the order the writer applies them.
        let (report, written) = write_behind(&mut behind, |maps| b.apply(d, maps));
        assert!(report.errors.is_empty(), "pass {n}: {:?}", report.errors);
        assert!(written.is_ok(), "pass {n}: {written:?}");
        assert_eq!(contents(&behind), contents(&direct), "pass {n}");
    }
}

/// Maps that keep what is derived from all entries at once (`lb_filter`)
/// get every frontend and backend the record holds after a pass: a direct
/// pass settles itself; one written behind through the queue cannot, and
/// `Reconciler::settle` does it after.
#[test]
fn a_pass_settles_the_maps_with_all_it_holds_and_one_written_behind_after() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    r.apply(desired(&[(80, &[1, 2]), (81, &[2, 3])]), &mut maps);
    r.apply(desired(&[(80, &[1, 2])]), &mut maps);
    let (frontends, backends) = maps.settled.last().cloned().expect("settled");
    assert_eq!(frontends, maps.services.keys().copied().collect());
    assert_eq!(backends, maps.backends.values().copied().collect());

    let mut behind = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let (_, written) = write_behind(&mut behind, |m| r.apply(desired(&[(80, &[1, 2])]), m));
    assert!(written.is_ok(), "{written:?}");
    assert!(
        behind.settled.is_empty(),
        "the queue does not lend the record"
    );
    r.settle(&mut behind).expect("settle");
    let (frontends, _) = behind.settled.last().cloned().expect("settled");
    assert_eq!(frontends, behind.services.keys().copied().collect());
}

#[test]
fn a_pass_written_behind_gathers_each_kind_of_entry_across_services() {
    let mut maps = FakeMaps::default();
    let mut r = Reconciler::new(100, 100);
    let d = desired(&[(80, &[1, 2]), (81, &[2, 3])]);
    let (_, written) = write_behind(&mut maps, |m| r.apply(d, m));
    assert!(written.is_ok(), "{written:?}");
    let log = maps.writes();
    let at = |kind: &str| -> Vec<usize> {
        let found = log.iter().enumerate().filter(|(_, l)| l.starts_with(kind));
        found.map(|(i, _)| i).collect()
    };
    let (members, slots, services) = (at("set_member"), at("set_slot"), at("set_service"));
    assert_eq!(
        (members.len(), slots.len(), services.len()),
        (4, 4, 2),
        "{log:?}"
    );
    assert!(members.iter().max() < slots.iter().min(), "{log:?}");
    assert!(slots.iter().max() < services.iter().min(), "{log:?}");
}

#[test]
fn a_write_behind_stops_at_a_failure_and_a_pass_after_readopting_finishes() {
    let mut maps = FakeMaps {
        fail: Some("set_slot".into()),
        ..FakeMaps::default()
    };
    let mut r = Reconciler::new(100, 100);
    let d = desired(&[(80, &[1, 2]), (81, &[2, 3])]);
    let (report, written) = write_behind(&mut maps, |m| r.apply(d.clone(), m));
    assert!(report.errors.is_empty(), "the queue took every write");
    assert!(written.is_err(), "the writer says one failed");
    assert!(
        maps.slots.is_empty(),
        "nothing after the failure: {:?}",
        maps.log
    );
    assert!(maps.services.is_empty(), "no entry names a missing slot");
    r.readopt(&maps.snapshot(), ROOM);
    let report = r.apply(d, &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(maps.served()[&80], addrs(&[1, 2]));
    assert_eq!(maps.served()[&81], addrs(&[2, 3]));
}
