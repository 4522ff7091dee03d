//! The cluster's objects as the API server's watch streams describe them,
//! with the same validation as manifests: an invalid object keeps its last
//! valid version, and a relist replaces a kind's objects only once it is
//! complete, so a watch that breaks never empties the datapath.

use std::{collections::BTreeMap, time::Instant};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Resource, ResourceExt, runtime::watcher::Event};

use crate::model::{self, FieldError, ObjectKey, Objects};

/// The annotation the EndpointSlice controller sets to when the change that
/// caused this version happened (what kube-proxy measures latency from).
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// One kind's objects, and a relist in progress.
#[derive(Debug)]
struct Kind<K> {
    live: BTreeMap<ObjectKey, K>,
    relist: Option<BTreeMap<ObjectKey, K>>,
    synced: bool,
}

impl<K> Default for Kind<K> {
    fn default() -> Self {
        Kind {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// Everything watched, plus what changed since the last sync.
#[derive(Debug, Default)]
pub struct ClusterStore {
    services: Kind<Service>,
    slices: Kind<EndpointSlice>,
    nodes: Kind<Node>,
    /// When each change not yet programmed happened (trigger time or receipt).
    pending: Vec<Instant>,
    /// Objects rejected since the last call to `take_errors`.
    errors: Vec<String>,
}

fn key<K: Resource>(object: &K) -> ObjectKey {
    ObjectKey {
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
    }
}

impl<K: Resource + Clone> Kind<K> {
    /// Applies one watch event; `check` validates an object. Returns whether
    /// the programmed objects may have changed.
    fn apply(
        &mut self,
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
                let key = key(&object);
                let accepted = accept(object, &key, &check, errors, label)
                    .or_else(|| self.live.get(&key).cloned());
                if let (Some(relist), Some(object)) = (self.relist.as_mut(), accepted) {
                    relist.insert(key, object);
                }
                false
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.live = relist;
                }
                self.synced = true;
                true
            }
            Event::Apply(object) => {
                let key = key(&object);
                match accept(object, &key, &check, errors, label) {
                    Some(object) => {
                        self.live.insert(key, object);
                        true
                    }
                    None => false,
                }
            }
            Event::Delete(object) => self.live.remove(&key(&object)).is_some(),
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
    pub fn service(&mut self, event: Event<Service>) {
        let changed =
            self.services
                .apply(event, model::validate_service, &mut self.errors, "Service");
        self.note(changed, Instant::now());
    }

    pub fn slice(&mut self, event: Event<EndpointSlice>) {
        let trigger = match &event {
            Event::Apply(slice) => trigger_time(slice),
            _ => None,
        };
        let changed = self.slices.apply(
            event,
            model::validate_slice,
            &mut self.errors,
            "EndpointSlice",
        );
        self.note(changed, trigger.unwrap_or_else(Instant::now));
    }

    pub fn node(&mut self, event: Event<Node>) {
        let changed = self
            .nodes
            .apply(event, |_| Ok(()), &mut self.errors, "Node");
        self.note(changed, Instant::now());
    }

    fn note(&mut self, changed: bool, at: Instant) {
        if changed {
            self.pending.push(at);
        }
    }

    /// True once every kind has been listed completely at least once: before
    /// that, programming would remove what is merely not listed yet.
    pub fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.nodes.synced
    }

    /// The objects for the model.
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.live.clone(),
            slices: self.slices.live.clone(),
        }
    }

    pub fn node_object(&self) -> Option<&Node> {
        self.nodes.live.values().next()
    }

    /// When the changes not yet programmed happened; clears them.
    pub fn take_pending(&mut self) -> Vec<Instant> {
        std::mem::take(&mut self.pending)
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
    let value = slice.annotations().get(TRIGGER_TIME)?;
    let at: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(at);
    let age = std::time::Duration::try_from(age).ok()?;
    Instant::now().checked_sub(age)
}
