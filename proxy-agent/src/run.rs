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
    let earlier = loader::pin_dir(&config.bpffs).exists();
    let (loaded, mut maps) = match start(&config) {
        Ok(started) => started,
        // An earlier agent's datapath keeps serving; a new one is not left
        // half-attached.
        Err(e) if earlier => return Err(e),
        Err(e) => {
            if let Err(cleanup) = loader::cleanup(&config.bpffs) {
                log::error!("removing the partly set-up datapath: {cleanup:#}");
            }
            return Err(e);
        }
    };
    let mut source = ManifestSource::new(&config.manifests);
    let snapshot = maps.snapshot()?;
    if !snapshot.services.is_empty() || !snapshot.backends.is_empty() {
        log::info!(
            "adopting {} service entries, {} slots and {} backends an earlier agent programmed",
            snapshot.services.len(),
            snapshot.slots.len(),
            snapshot.backends.len()
        );
    }
    let mut reconciler = Reconciler::adopt(&snapshot, MAX_SERVICES, MAX_BACKENDS);
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
    loaded.retire_other_links()?;
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
