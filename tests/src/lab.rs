//! The fixture many namespace tests start from: the web Service (every
//! backend of a [`Topology`]) in a manifest, the backends' servers, and an
//! agent serving the client's traffic to it.

use std::path::Path;

use anyhow::Result;

use crate::{
    agent::Agent,
    manifests::{self, ManifestFile},
    netns::unique_prefix,
    servers::Servers,
    topology::Topology,
};

/// Fields drop in order: the agent (it cleans its pins), the servers, the
/// namespaces, the manifest directory.
pub struct WebLab {
    pub agent: Agent,
    _servers: Vec<Servers>,
    pub topology: Topology,
    _manifest: ManifestFile,
}

impl WebLab {
    /// `backends` backends, the web Service with `extra` appended to its
    /// manifest, and an agent started with `flags` on the client and
    /// backend interfaces (TC), namespaces named after `tag`.
    pub fn start(tag: &str, backends: usize, extra: &str, flags: &[&str]) -> Result<WebLab> {
        let topology = Topology::build(&unique_prefix(tag), backends)?;
        topology.finish_checksums_on_node_egress()?;
        let servers = topology.start_servers()?;
        let all: Vec<usize> = (0..backends).collect();
        let manifest = ManifestFile::new(
            &format!("{tag}-{}", topology.prefix()),
            &(manifests::web(&all) + extra),
        )?;
        let ifaces = topology.agent_ifaces("");
        let agent = Agent::start_flags(&topology.node, manifest.path(), &ifaces, flags)?;
        Ok(WebLab {
            agent,
            _servers: servers,
            topology,
            _manifest: manifest,
        })
    }

    /// A datapath counter by name (0 if the agent does not list it).
    pub fn counter(&self, name: &str) -> Result<u64> {
        Ok(self.agent.counters()?.get(name).copied().unwrap_or(0))
    }

    /// Where the agent's maps are pinned.
    pub fn bpffs(&self) -> &Path {
        self.agent.bpffs()
    }
}
