//! A pass's map writes on a thread of their own, behind the reconciler's
//! decisions: the reconciler works out the next Service's entries in user
//! space while the kernel writes the last one's, on the other core. Meant
//! for full passes, whose hundreds of thousands of writes otherwise wait
//! on each other (a first pass at 10,000 Services spent ~40% of its time
//! in the kernel, on one core, with the other idle).
//!
//! The queue tells the reconciler every write succeeded. The writer applies
//! them in order and stops at the first that fails: the maps then hold an
//! ordered prefix of the pass, as if the agent had stopped there, and
//! `write_behind` returns the error. The caller must then re-read the maps
//! (`Reconciler::readopt`) before it relies on the reconciler's record.

use std::sync::mpsc;

use super::{BackendKey, Maps, Member, NodeEntry, Partial, ServiceEntry, Slot};
use crate::{cidr::Cidr, model::Frontend};

type Write<M> = Box<dyn FnOnce(&mut M) -> anyhow::Result<()> + Send>;

/// How many entries a window gathers before it goes to the writer: large
/// enough that its syscalls are few, small enough that the writer starts
/// early and the reconciler and the kernel overlap.
const WINDOW: usize = 8192;

/// Writes the reconciler may be ahead of the writer by (a window each, at
/// most): enough to keep both busy.
const QUEUED: usize = 2;

/// Runs `pass` against a queue whose writes a second thread applies to
/// `maps`; returns what `pass` returned and whether every write went in.
pub fn write_behind<M: Maps + Send + 'static, R>(
    maps: &mut M,
    pass: impl FnOnce(&mut dyn Maps) -> R,
) -> (R, anyhow::Result<()>) {
    // Bounded: a reconciler far ahead of the kernel holds no more than a
    // few windows of entries.
    let (tx, rx) = mpsc::sync_channel::<Write<M>>(QUEUED);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || rx.into_iter().try_for_each(|write| write(maps)));
        let mut queue = Queue {
            tx,
            window: Window::default(),
        };
        let result = pass(&mut queue);
        // Dropping the queue ends the writer's input.
        queue.flush();
        drop(queue);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the map writer panicked")));
        (result, written)
    })
}

/// Entries written since the last removal (or overwrite that must wait for
/// one), by map. Their order between maps is free up to what names what:
/// written in `Window::write`'s order, each Service's entries still reach
/// the maps in the order the reconciler gave them (backends, the service
/// id's reverse NAT, members, source ranges, slots, the service entry).
#[derive(Default)]
struct Window {
    backends: Vec<(u32, BackendKey)>,
    fresh_ids: Vec<(u32, Frontend)>,
    members: Vec<(Member, BackendKey, bool)>,
    ranges: Vec<(u32, Cidr)>,
    slots: Vec<(Slot, u32)>,
    services: Vec<(Frontend, ServiceEntry)>,
}

impl Window {
    fn len(&self) -> usize {
        self.backends.len()
            + self.fresh_ids.len()
            + self.members.len()
            + self.ranges.len()
            + self.slots.len()
            + self.services.len()
    }

    fn write(self, maps: &mut impl Maps) -> anyhow::Result<()> {
        maps.set_backends(&self.backends).map_err(|p| p.error)?;
        maps.fresh_service_ids(&self.fresh_ids)?;
        maps.set_members_of(&self.members).map_err(|p| p.error)?;
        for (id, range) in &self.ranges {
            maps.set_source_range(*id, *range)?;
        }
        maps.set_slots_of(&self.slots).map_err(|p| p.error)?;
        maps.set_services(&self.services).map_err(|p| p.error)
    }
}

struct Queue<M> {
    tx: mpsc::SyncSender<Write<M>>,
    window: Window,
}

impl<M: Maps + 'static> Queue<M> {
    /// Sends what the window gathered to the writer.
    fn flush(&mut self) {
        let window = std::mem::take(&mut self.window);
        if window.len() > 0 {
            self.send(move |maps| window.write(maps));
        }
    }

    fn send(&mut self, write: impl FnOnce(&mut M) -> anyhow::Result<()> + Send + 'static) {
        // A closed queue means the writer stopped at a failure, which
        // `write_behind` reports; what comes after it is not written.
        let _ = self.tx.send(Box::new(write));
    }

    /// A write that must stay in order with everything around it (removals,
    /// single entries): after the window.
    fn in_order(
        &mut self,
        write: impl FnOnce(&mut M) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.flush();
        self.send(write);
        Ok(())
    }

    /// Adds to the window, sent once it is full.
    fn gather(&mut self, add: impl FnOnce(&mut Window)) {
        add(&mut self.window);
        if self.window.len() >= WINDOW {
            self.flush();
        }
    }
}

impl<M: Maps + 'static> Maps for Queue<M> {
    fn set_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()> {
        let backend = *backend;
        self.in_order(move |m| m.set_backend(id, &backend))
    }

    fn remove_backend(&mut self, id: u32, backend: &BackendKey) -> anyhow::Result<()> {
        let backend = *backend;
        self.in_order(move |m| m.remove_backend(id, &backend))
    }

    fn set_slot(&mut self, slot: Slot, backend_id: u32) -> anyhow::Result<()> {
        self.in_order(move |m| m.set_slot(slot, backend_id))
    }

    fn remove_slot(&mut self, slot: Slot) -> anyhow::Result<()> {
        self.in_order(move |m| m.remove_slot(slot))
    }

    fn set_service(&mut self, frontend: &Frontend, entry: &ServiceEntry) -> anyhow::Result<()> {
        let (frontend, entry) = (*frontend, *entry);
        self.gather(|w| w.services.push((frontend, entry)));
        Ok(())
    }

    fn remove_service(&mut self, frontend: &Frontend) -> anyhow::Result<()> {
        let frontend = *frontend;
        self.in_order(move |m| m.remove_service(&frontend))
    }

    fn set_member(
        &mut self,
        member: Member,
        backend: &BackendKey,
        terminating: bool,
    ) -> anyhow::Result<()> {
        let backend = *backend;
        self.in_order(move |m| m.set_member(member, &backend, terminating))
    }

    fn remove_member(&mut self, member: Member, backend: &BackendKey) -> anyhow::Result<()> {
        let backend = *backend;
        self.in_order(move |m| m.remove_member(member, &backend))
    }

    fn set_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()> {
        self.gather(|w| w.ranges.push((service_id, range)));
        Ok(())
    }

    fn remove_source_range(&mut self, service_id: u32, range: Cidr) -> anyhow::Result<()> {
        self.in_order(move |m| m.remove_source_range(service_id, range))
    }

    fn set_config(&mut self, node: &NodeEntry) -> anyhow::Result<()> {
        let node = *node;
        self.in_order(move |m| m.set_config(&node))
    }

    fn fresh_service_id(&mut self, service_id: u32, frontend: &Frontend) -> anyhow::Result<()> {
        let frontend = *frontend;
        self.gather(|w| w.fresh_ids.push((service_id, frontend)));
        Ok(())
    }

    fn set_backends(&mut self, backends: &[(u32, BackendKey)]) -> Result<(), Partial> {
        // A first pass adds every backend at once: in windows, so that the
        // writer's copies of them do not pile up (peak RSS).
        for chunk in backends.chunks(WINDOW) {
            self.gather(|w| w.backends.extend_from_slice(chunk));
        }
        Ok(())
    }

    fn set_slots(&mut self, table: u32, backends: &[u32]) -> Result<(), Partial> {
        self.gather(|w| {
            let slots = (0u32..).zip(backends);
            w.slots
                .extend(slots.map(|(index, b)| (Slot { table, index }, *b)))
        });
        Ok(())
    }

    fn set_members(
        &mut self,
        service_id: u32,
        members: &[(u32, BackendKey, bool)],
    ) -> Result<(), Partial> {
        // A member that begins terminating is rewritten only after no slot
        // names it: the slots and entries before it must be in first.
        if members.iter().any(|(_, _, terminating)| *terminating) {
            let members = members.to_vec();
            self.flush();
            self.send(move |m| m.set_members(service_id, &members).map_err(|p| p.error));
            return Ok(());
        }
        self.gather(|w| {
            w.members.extend(members.iter().map(|(backend_id, b, t)| {
                let member = Member {
                    service_id,
                    backend_id: *backend_id,
                };
                (member, *b, *t)
            }))
        });
        Ok(())
    }
}
