//! Network-namespace test harness for xdproxy.
//!
//! Builds isolated client / node / backend namespaces joined by veth pairs
//! ([`topology`]), runs name-reporting HTTP and UDP servers in backends
//! ([`servers`]) and drives them from the client ([`clients`]). Everything
//! lives in namespaces created here ([`netns`]) and is deleted on drop, so tests
//! never touch the root namespace and leave nothing behind. Requires root.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod churn;
pub mod clients;
pub mod connrate;
pub mod kubeproxy;
pub mod lab;
pub mod manifests;
pub mod netns;
pub mod node;
pub mod plot;
pub mod privilege;
pub mod servers;
pub mod topology;
pub mod traffic;
pub mod twonode;
