//! Kubernetes semantics, and nothing else: Services and EndpointSlices in,
//! the frontends and backends the datapath should serve out. No I/O.
//!
//! - `objects`: which objects are ours, their keys, validation, slices by
//!   Service;
//! - `node`: the node programmed for (flags and its Node object);
//! - `frontends`: where each Service is reached and the state each
//!   frontend gets;
//! - `endpoints`: which endpoints serve (conditions, traffic policies,
//!   topology);
//! - `health`: health check node ports;
//! - here: the whole desired state, and who wins a frontend two Services
//!   claim.

mod endpoints;
mod frontends;
mod health;
mod node;
mod objects;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::kinds::{EndpointSlice, Service};

pub use frontends::{Clients, DEFAULT_AFFINITY_TIMEOUT, Frontend, FrontendState, Protocol, Scope};
pub use health::health_check;
pub use node::{AUTOSCALER_TAINT, ThisNode, ZONE_LABEL};
pub use objects::{
    FieldError, HEADLESS_LABEL, OURS_SELECTOR, ObjectKey, SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL, SliceIndex, ours, owning_service, validate_service, validate_slice,
};

use frontends::service_frontends;

/// Everything the model reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: BTreeMap<ObjectKey, Service>,
    pub slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// The node the objects are programmed for.
    pub node: ThisNode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendState>,
    /// The addresses source NAT uses: this node's first address of each
    /// family (None: unknown, so flows that need source NAT get none, and a
    /// counter says so).
    pub snat_addr4: Option<Ipv4Addr>,
    pub snat_addr6: Option<Ipv6Addr>,
    /// Things that are valid Kubernetes but cannot all be served (clashes).
    pub warnings: Vec<String>,
    /// Frontends two Services claimed; each loser counted once.
    pub conflicts: usize,
}

/// The desired datapath state for a set of (validated) objects.
pub fn desired(objects: &Objects) -> Desired {
    desired_indexed(objects, &SliceIndex::new(objects))
}

/// As `desired`, with the objects' slice index at hand (the cluster store
/// keeps one up to date: no need to build another per pass).
pub fn desired_indexed(objects: &Objects, index: &SliceIndex) -> Desired {
    let mut out = Desired {
        snat_addr4: objects.node.snat_addr4(),
        snat_addr6: objects.node.snat_addr6(),
        ..Desired::default()
    };
    for (key, service) in &objects.services {
        for (frontend, state) in
            service_frontends(key, service, &index.slices_of(objects, key), &objects.node)
        {
            claim(&mut out, frontend, state);
        }
    }
    // A local-client twin goes with the entry it completes.
    let lost: Vec<Frontend> = out
        .frontends
        .iter()
        .filter(|(f, s)| f.clients == Clients::Local && !completes(&out, f, s))
        .map(|(f, _)| *f)
        .collect();
    for frontend in lost {
        out.frontends.remove(&frontend);
    }
    out
}

/// Adds a frontend unless another Service holds it with a better claim (an
/// allocated address over a written one; else the first Service in name
/// order); the loser is reported and counted.
fn claim(out: &mut Desired, frontend: Frontend, state: FrontendState) {
    let Some(taken) = out.frontends.get(&frontend) else {
        out.frontends.insert(frontend, state);
        return;
    };
    let wins = state.scope.is_allocated() && !taken.scope.is_allocated();
    let (winner, loser) = match wins {
        true => (&state, taken),
        false => (taken, &state),
    };
    out.warnings.push(format!(
        "{}:{}/{:?} is claimed by Service {} ({:?}) and by Service {} ({:?}); serving {}",
        frontend.addr,
        frontend.port,
        frontend.protocol,
        winner.service,
        winner.scope,
        loser.service,
        loser.scope,
        winner.service
    ));
    out.conflicts += 1;
    if wins {
        out.frontends.insert(frontend, state);
    }
}

/// True if the `All` entry of a local twin's frontend is its Service's.
fn completes(out: &Desired, twin: &Frontend, state: &FrontendState) -> bool {
    let main = Frontend {
        clients: Clients::All,
        ..*twin
    };
    out.frontends
        .get(&main)
        .is_some_and(|m| m.service == state.service && m.local_twin)
}

/// What the named Services want now (an empty list for one that is gone),
/// for a pass that touches only them.
pub fn changes(
    objects: &Objects,
    index: &SliceIndex,
    services: &BTreeSet<ObjectKey>,
) -> BTreeMap<ObjectKey, Vec<(Frontend, FrontendState)>> {
    services
        .iter()
        .map(|key| {
            let wanted = match objects.services.get(key) {
                Some(service) => {
                    service_frontends(key, service, &index.slices_of(objects, key), &objects.node)
                }
                None => Vec::new(),
            };
            (key.clone(), wanted)
        })
        .collect()
}
