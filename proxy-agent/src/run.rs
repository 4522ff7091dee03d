//! The daemon: load and attach, then keep the maps equal to the manifests.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use proxy_common::{MAX_BACKENDS, MAX_SERVICES};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{self, iface::IfaceSpec, loader, maps::MapSet},
    model,
    reconcile::Reconciler,
    source::manifest::ManifestSource,
};

pub struct RunConfig {
    pub manifests: PathBuf,
    pub ifaces: Vec<IfaceSpec>,
    pub bpffs: PathBuf,
    /// How often the manifests are checked for changes.
    pub poll: Duration,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let (loaded, mut maps) = match start(&config) {
        Ok(started) => started,
        Err(e) => {
            // Leave nothing half-attached behind.
            if let Err(cleanup) = loader::cleanup(&config.bpffs) {
                log::error!("removing the partly set-up datapath: {cleanup:#}");
            }
            return Err(e);
        }
    };
    let mut source = ManifestSource::new(&config.manifests);
    let mut reconciler = Reconciler::new(MAX_SERVICES, MAX_BACKENDS);
    sync(&mut source, &mut reconciler, &mut maps);

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut tick = tokio::time::interval(config.poll);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if source.changed() {
                    sync(&mut source, &mut reconciler, &mut maps);
                }
            }
        }
    }
    log::info!(
        "exiting; the datapath stays in place under {} with the last programmed state \
         (`proxy-agent cleanup` removes it)",
        loaded.pins.display()
    );
    Ok(())
}

fn start(config: &RunConfig) -> anyhow::Result<(loader::Loaded, MapSet)> {
    let mut loaded = loader::load(&config.bpffs, datapath::object()?)?;
    for iface in &config.ifaces {
        loaded.attach(iface)?;
    }
    let maps = MapSet::take(&mut loaded.ebpf)?;
    Ok((loaded, maps))
}

/// One pass: read, translate, apply. Errors are logged; nothing stops the loop.
fn sync(source: &mut ManifestSource, reconciler: &mut Reconciler, maps: &mut MapSet) {
    let load = source.load();
    for error in &load.errors {
        log::error!("{error}");
    }
    let desired = model::desired(&load.objects);
    for warning in &desired.warnings {
        log::warn!("{warning}");
    }
    let report = reconciler.apply(&desired, maps);
    for error in &report.errors {
        log::error!("programming: {error}");
    }
    log::info!(
        "synced: {} services, {} endpoint slices -> {} frontends, {} backends ({} map writes)",
        load.objects.services.len(),
        load.objects.slices.len(),
        reconciler.frontend_count(),
        reconciler.backend_count(),
        report.writes
    );
}
