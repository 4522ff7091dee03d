//! xdproxy agent: Kubernetes Services and EndpointSlices in, eBPF maps out.
//!
//! source (manifests) -> model (pure) -> reconciler (diff) -> datapath (maps).

pub mod backoff;
pub mod balancing;
pub mod budget;
pub mod cidr;
pub mod conntrack;
pub mod datapath;
pub mod healthcheck;
pub mod http;
pub mod inspect;
pub mod kinds;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod node;
pub mod nodeconfig;
pub mod plan;
pub mod reconcile;
pub mod run;
pub mod source;
