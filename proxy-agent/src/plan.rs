//! `proxy-agent plan`: what `run` would program, computed by the same source
//! and model code, printed without touching the kernel.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    cidr::Cidr,
    model::{self, Desired, Protocol, Scope},
    source::manifest::{ManifestError, ManifestSource},
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedFrontend {
    pub address: String,
    pub port: u16,
    pub protocol: &'static str,
    pub scope: &'static str,
    pub service: String,
    pub port_name: String,
    pub backends: Vec<String>,
}

#[derive(Serialize)]
pub struct Plan {
    pub frontends: Vec<PlannedFrontend>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

/// Which node to plan for, as `run` would be told.
#[derive(Default)]
pub struct NodeOptions<'a> {
    pub name: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub nodeport_ranges: &'a [Cidr],
}

/// Reads the manifests as `run` would (for the node named and its zone, if
/// given) and computes the frontends.
pub fn from_manifests(path: &Path, node: &NodeOptions) -> Plan {
    let (node_name, zone) = (node.name, node.zone);
    let mut source = ManifestSource::new(path)
        .in_zone(zone)
        .nodeport_ranges(node.nodeport_ranges);
    if let Some(name) = node_name {
        source = source.for_node(name);
    }
    let load = source.load();
    let desired = model::desired(&load.objects);
    plan(&desired, &load.errors)
}

fn plan(desired: &Desired, errors: &[ManifestError]) -> Plan {
    let frontends = desired
        .frontends
        .iter()
        .map(|(f, state)| PlannedFrontend {
            address: f.addr.to_string(),
            port: f.port,
            protocol: match f.protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
            },
            scope: match state.scope {
                Scope::ClusterIp => "ClusterIP",
                Scope::ExternalIp => "ExternalIP",
                Scope::LoadBalancer => "LoadBalancer",
                Scope::NodePort => "NodePort",
            },
            service: state.service.to_string(),
            port_name: state.port_name.clone(),
            backends: state.backends.iter().map(ToString::to_string).collect(),
        })
        .collect();
    Plan {
        frontends,
        warnings: desired.warnings.clone(),
        errors: errors.iter().map(ToString::to_string).collect(),
    }
}

impl Plan {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>5} {:<5} {:<12} {:<28} {:<10} BACKENDS",
            "ADDRESS", "PORT", "PROTO", "SCOPE", "SERVICE", "PORT NAME"
        );
        for f in &self.frontends {
            let backends = if f.backends.is_empty() {
                "(none)".to_string()
            } else {
                f.backends.join(",")
            };
            let _ = writeln!(
                out,
                "{:<16} {:>5} {:<5} {:<12} {:<28} {:<10} {backends}",
                f.address, f.port, f.protocol, f.scope, f.service, f.port_name
            );
        }
        out
    }
}
