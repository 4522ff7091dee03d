//! `proxy-agent plan`: what `run` would program, computed by the same source
//! and model code, printed without touching the kernel.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    model::{self, Clients, Desired, Protocol, Scope, ThisNode},
    source::manifest::{ManifestError, ManifestSource},
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFrontend {
    pub address: String,
    pub port: u16,
    pub protocol: &'static str,
    pub scope: &'static str,
    /// "all", or "local": the entry the socket hooks give pods and
    /// processes on this node, where their backends differ from what
    /// clients elsewhere get (the "all" entry next to it).
    pub clients: Clients,
    pub service: String,
    pub port_name: String,
    pub backends: Vec<String>,
    /// sessionAffinity: ClientIP timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// loadBalancerSourceRanges the datapath enforces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// What a new flow meets with no backend: "reject" (ICMP port
    /// unreachable) or "drop".
    pub without_backends: &'static str,
    /// How a new flow picks its backend.
    pub algorithm: &'static str,
    /// The Maglev table size (maglev and source-hash only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
    /// Terminating endpoints: their flows continue, no new ones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub terminating: Vec<String>,
}

/// A health check node port this node answers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedHealthCheck {
    pub port: u16,
    pub service: String,
    pub local_endpoints: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub frontends: Vec<PlannedFrontend>,
    pub health_check_node_ports: Vec<PlannedHealthCheck>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

/// Reads the manifests as `run` would for `node` (as its flags give it)
/// and computes the frontends; `slot_budget` as `--slot-budget` (0: the
/// default).
pub fn from_manifests(path: &Path, node: ThisNode, slot_budget: u32) -> Plan {
    let mut source = ManifestSource::new(path, node);
    let load = source.load();
    let mut desired = model::desired(&load.objects);
    let budget = match slot_budget {
        0 => crate::budget::DEFAULT_SLOT_BUDGET,
        n => n,
    };
    // As `run` would: a Service over the budget is not programmed.
    let over = crate::budget::over_budget(&desired.frontends, budget);
    desired
        .frontends
        .retain(|_, state| !over.iter().any(|o| o.service == state.service));
    let index = model::SliceIndex::new(&load.objects);
    let health_checks = load
        .objects
        .services
        .keys()
        .filter_map(|key| {
            let (port, local_endpoints) = model::health_check(&load.objects, &index, key)?;
            Some(PlannedHealthCheck {
                port,
                service: key.to_string(),
                local_endpoints,
            })
        })
        .collect();
    plan(&desired, health_checks, &load.errors, &over)
}

fn plan(
    desired: &Desired,
    health_check_node_ports: Vec<PlannedHealthCheck>,
    errors: &[ManifestError],
    over_budget: &[crate::budget::OverBudget],
) -> Plan {
    let frontends = desired
        .frontends
        .iter()
        .map(|(f, state)| PlannedFrontend {
            address: f.addr.to_string(),
            port: f.port,
            protocol: match f.protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
                Protocol::Sctp => "SCTP",
            },
            scope: match state.scope {
                Scope::ClusterIp => "ClusterIP",
                Scope::ExternalIp => "ExternalIP",
                Scope::LoadBalancer => "LoadBalancer",
                Scope::NodePort => "NodePort",
            },
            clients: f.clients,
            service: state.service.to_string(),
            port_name: state.port_name.clone(),
            backends: state.backends.iter().map(ToString::to_string).collect(),
            affinity_timeout_seconds: state.affinity_timeout,
            source_ranges: state
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect(),
            without_backends: if state.drop_when_empty {
                "drop"
            } else {
                "reject"
            },
            algorithm: state.algorithm.name(),
            table_size: state.algorithm.uses_table().then_some(state.table_size),
            terminating: state.terminating.iter().map(ToString::to_string).collect(),
        })
        .collect();
    Plan {
        frontends,
        health_check_node_ports,
        warnings: desired.warnings.clone(),
        errors: (errors.iter().map(ToString::to_string))
            .chain(over_budget.iter().map(ToString::to_string))
            .collect(),
    }
}

impl Plan {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>5} {:<5} {:<12} {:<28} {:<10} {:<24} BACKENDS",
            "ADDRESS", "PORT", "PROTO", "SCOPE", "SERVICE", "PORT NAME", "FLAGS"
        );
        for f in &self.frontends {
            let backends = if f.backends.is_empty() {
                format!("(none: {})", f.without_backends)
            } else {
                f.backends.join(",")
            };
            let _ = writeln!(
                out,
                "{:<16} {:>5} {:<5} {:<12} {:<28} {:<10} {:<24} {backends}",
                f.address,
                f.port,
                f.protocol,
                f.scope,
                f.service,
                f.port_name,
                f.flags()
            );
        }
        for h in &self.health_check_node_ports {
            let _ = writeln!(
                out,
                "health check node port {} for {}: {} local endpoints",
                h.port, h.service, h.local_endpoints
            );
        }
        out
    }
}

impl PlannedFrontend {
    /// The table's short form of what is not plain load balancing.
    fn flags(&self) -> String {
        let mut flags = Vec::new();
        if self.clients == Clients::Local {
            flags.push("local-clients".to_string());
        }
        match self.table_size {
            Some(size) => flags.push(format!("{}/{size}", self.algorithm)),
            None if self.algorithm != "random" => flags.push(self.algorithm.to_string()),
            None => {}
        }
        if !self.terminating.is_empty() {
            flags.push(format!("terminating={}", self.terminating.join("+")));
        }
        if let Some(seconds) = self.affinity_timeout_seconds {
            flags.push(format!("affinity={seconds}s"));
        }
        if !self.source_ranges.is_empty() {
            flags.push(format!("ranges={}", self.source_ranges.join("+")));
        }
        if flags.is_empty() {
            return "-".into();
        }
        flags.join(",")
    }
}
