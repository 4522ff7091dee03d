//! The cluster's objects as the API server's watch streams describe them,
//! with the same validation as manifests: an invalid object keeps its last
//! valid version, and a relist replaces a kind's objects only once it is
//! complete, so a watch that breaks never empties the datapath.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use k8s_openapi::api::core::v1::Node;

use crate::kinds::{self, EndpointSlice, Service};
use kube::{ResourceExt, runtime::watcher::Event};

use crate::model::{self, FieldError, ObjectKey, Objects, SliceIndex, ThisNode};

/// The annotation the EndpointSlice controller sets to when the change that
/// caused this version happened (what kube-proxy measures latency from).
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A relist in progress for one kind, and whether one has completed.
#[derive(Debug)]
struct Kind<K> {
    relist: Option<BTreeMap<ObjectKey, K>>,
    synced: bool,
}

impl<K> Default for Kind<K> {
    fn default() -> Self {
        Kind {
            relist: None,
            synced: false,
        }
    }
}

/// Which Services a pass must look at.
#[derive(Debug, PartialEq, Eq)]
pub enum Dirty {
    /// All of them (after a relist, or when unsure).
    All,
    Services(BTreeSet<ObjectKey>),
}

/// Everything watched, plus what changed since the last sync.
#[derive(Debug, Default)]
pub struct ClusterStore {
    objects: Objects,
    /// This node as the flags give it; its Node object adds the rest.
    node: ThisNode,
    /// Which slices each Service has, kept up to date as they change.
    index: SliceIndex,
    nodes: BTreeMap<ObjectKey, Node>,
    service_kind: Kind<Service>,
    slice_kind: Kind<EndpointSlice>,
    node_kind: Kind<Node>,
    /// When each change not yet programmed happened (trigger time or receipt).
    pending: Vec<Instant>,
    dirty: BTreeSet<ObjectKey>,
    dirty_all: bool,
    /// Objects rejected since the last call to `take_errors`.
    errors: Vec<String>,
}

/// Where the store keeps an object.
trait Keyed {
    fn key(&self) -> ObjectKey;
}

impl<T: kinds::Kind> Keyed for T {
    fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl Keyed for Node {
    fn key(&self) -> ObjectKey {
        ObjectKey {
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
        }
    }
}

impl<K: Keyed + Clone> Kind<K> {
    /// Applies one watch event; `check` validates an object. Returns whether
    /// the programmed objects may have changed.
    fn apply(
        &mut self,
        live: &mut BTreeMap<ObjectKey, K>,
        event: Event<K>,
        check: impl Fn(&K) -> Result<(), FieldError>,
        errors: &mut Vec<String>,
        label: &str,
    ) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let key = object.key();
                let accepted =
                    accept(object, &key, &check, errors, label).or_else(|| live.get(&key).cloned());
                if let (Some(relist), Some(object)) = (self.relist.as_mut(), accepted) {
                    relist.insert(key, object);
                }
                false
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    *live = relist;
                }
                self.synced = true;
                true
            }
            Event::Apply(object) => {
                let key = object.key();
                match accept(object, &key, &check, errors, label) {
                    Some(object) => {
                        live.insert(key, object);
                        true
                    }
                    None => false,
                }
            }
            Event::Delete(object) => live.remove(&object.key()).is_some(),
        }
    }
}

fn accept<K>(
    object: K,
    key: &ObjectKey,
    check: &impl Fn(&K) -> Result<(), FieldError>,
    errors: &mut Vec<String>,
    label: &str,
) -> Option<K> {
    match check(&object) {
        Ok(()) => Some(object),
        Err(e) => {
            errors.push(format!(
                "{label} {key}: {e}; kept its last valid version, if any"
            ));
            None
        }
    }
}

impl ClusterStore {
    /// A store for the node `node` (as its flags give it).
    pub fn new(node: ThisNode) -> Self {
        ClusterStore {
            objects: Objects {
                node: node.clone(),
                ..Objects::default()
            },
            node,
            ..ClusterStore::default()
        }
    }

    pub fn service(&mut self, event: Event<Service>) {
        let touched = match &event {
            Event::Apply(s) | Event::Delete(s) => Some(s.key()),
            _ => None,
        };
        let relisted = matches!(event, Event::InitDone);
        let live = &mut self.objects.services;
        let changed = self.service_kind.apply(
            live,
            event,
            model::validate_service,
            &mut self.errors,
            "Service",
        );
        self.note(
            changed,
            Instant::now(),
            touched.into_iter().collect(),
            relisted,
        );
    }

    pub fn slice(&mut self, event: Event<EndpointSlice>) {
        let (touched, trigger, owners) = match &event {
            Event::Apply(slice) | Event::Delete(slice) => {
                let key = slice.key();
                // Its Service now, and the one it belonged to before (labels can change).
                let before = self
                    .objects
                    .slices
                    .get(&key)
                    .and_then(|old| model::owning_service(&key.namespace, old));
                let now = model::owning_service(&key.namespace, slice);
                let trigger = matches!(event, Event::Apply(_))
                    .then(|| trigger_time(slice))
                    .flatten();
                if let Some(before) = &before {
                    self.index.remove(&key, before);
                }
                (Some(key), trigger, before.into_iter().chain(now).collect())
            }
            _ => (None, None, Vec::new()),
        };
        // Read above, and never again: each slice's copy would be held as
        // long as the slice is.
        let event = event.modify(|slice| slice.metadata.annotations = None);
        let relisted = matches!(event, Event::InitDone);
        let live = &mut self.objects.slices;
        let changed = self.slice_kind.apply(
            live,
            event,
            model::validate_slice,
            &mut self.errors,
            "EndpointSlice",
        );
        if relisted {
            self.index = SliceIndex::new(&self.objects);
        } else if let Some(key) = touched
            && let Some(slice) = self.objects.slices.get(&key)
        {
            // The version that is live now (an invalid update kept the old one).
            self.index.insert(&key, slice);
        }
        self.note(
            changed,
            trigger.unwrap_or_else(Instant::now),
            owners,
            relisted,
        );
    }

    pub fn node(&mut self, event: Event<Node>) {
        let relisted = matches!(event, Event::InitDone);
        let changed =
            self.node_kind
                .apply(&mut self.nodes, event, |_| Ok(()), &mut self.errors, "Node");
        // Its zone steers topology-aware routing and its addresses carry
        // NodePorts: when they change, every Service is looked at again.
        let seen = self.node.seeing(self.nodes.values().next());
        let moved =
            seen.zone != self.objects.node.zone || seen.addresses != self.objects.node.addresses;
        self.objects.node = seen;
        self.note(changed, Instant::now(), Vec::new(), relisted || moved);
    }

    fn note(&mut self, changed: bool, at: Instant, services: Vec<ObjectKey>, relisted: bool) {
        if changed {
            self.pending.push(at);
            self.dirty.extend(services);
            self.dirty_all |= relisted;
        }
    }

    /// True once every kind has been listed completely at least once: before
    /// that, programming would remove what is merely not listed yet.
    pub fn synced(&self) -> bool {
        self.service_kind.synced && self.slice_kind.synced && self.node_kind.synced
    }

    /// The objects for the model.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The objects' slices by Service, for a pass over some Services.
    pub fn index(&self) -> &SliceIndex {
        &self.index
    }

    /// When the changes not yet programmed happened; clears them.
    pub fn take_pending(&mut self) -> Vec<Instant> {
        std::mem::take(&mut self.pending)
    }

    /// Which Services the next pass must look at; clears it.
    pub fn take_dirty(&mut self) -> Dirty {
        let services = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.dirty_all) {
            Dirty::All
        } else {
            Dirty::Services(services)
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.errors)
    }
}

/// The slice's trigger time as an Instant in this process's clock, if the
/// annotation is there, parses, and is not in the future.
fn trigger_time(slice: &EndpointSlice) -> Option<Instant> {
    let value = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME)?;
    let at: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(at);
    let age = std::time::Duration::try_from(age).ok()?;
    Instant::now().checked_sub(age)
}
