//! The daemon: load and attach (or adopt), then keep the maps equal to what
//! the source says, and report how that goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

use crate::{
    backoff::Backoff,
    conntrack,
    datapath::{
        self, cgroup,
        iface::{self, IfaceSpec},
        links, loader,
        maps::MapSet,
        stale,
    },
    healthcheck::{HealthChecks, ServiceHealth},
    http::{self, Endpoints},
    metrics::{Shared, Status},
    model::{self, Desired, ObjectKey, Objects, SliceIndex, ThisNode},
    nodeconfig,
    reconcile::{Capacity, Reconciler, Report, behind},
    source::{
        cluster::{ClusterStore, Dirty},
        kubernetes::{self, Change, Resource},
        manifest::ManifestSource,
        route::Route,
    },
};

/// How long the first event of a burst waits for the rest of it.
const COALESCE: Duration = Duration::from_millis(2);
/// A retry pass not pending: a branch that waits for it never fires.
const NO_RETRY: Duration = Duration::from_secs(3600);
/// Full passes over this many frontends write behind the reconciler, on a
/// thread of their own (smaller ones cost less than the thread).
const WRITE_BEHIND_FROM: usize = 1000;

pub enum Source {
    Manifests(PathBuf),
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// `--kube-apiserver`: the server's URL, overriding the kubeconfig's.
        apiserver: Option<String>,
    },
}

/// Socket-level load balancing (`--socket-lb`).
pub struct SocketLb {
    /// `--cgroup-root`: where to attach (None: the hierarchy's root).
    pub cgroup_root: Option<PathBuf>,
}

pub struct RunConfig {
    pub source: Source,
    /// This node's name: its Node object is watched.
    pub node_name: String,
    /// This node as the flags give it.
    pub node: ThisNode,
    /// `--slot-budget`: most `lb_slots` entries one Service's tables take.
    pub slot_budget: u32,
    /// `--iface`: the first spec that selects an interface decides its hook.
    pub ifaces: Vec<IfaceSpec>,
    /// None: `--socket-lb=false`.
    pub socket_lb: Option<SocketLb>,
    pub bpffs: PathBuf,
    /// How often the manifests are checked for changes.
    pub poll: Duration,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// kube-proxy's healthz timeout: a change waiting longer is unhealthy.
    pub health_timeout: Duration,
    /// Conntrack size, garbage collection interval and timeouts.
    pub conntrack: conntrack::Config,
    /// `--snat-port-range`, `--hash-key`.
    pub node_config: nodeconfig::Flags,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // The API server's lists travel while the datapath loads: the kernel's
    // verifier takes most of a second over the programs.
    let kube = match &config.source {
        Source::Manifests(_) => None,
        Source::Kubernetes {
            kubeconfig,
            apiserver,
        } => Some(KubeStart::begin(kubeconfig.as_deref(), apiserver.as_deref(), &config).await?),
    };
    let earlier = loader::pin_dir(&config.bpffs).exists();
    let (loaded, maps) = match tokio::task::block_in_place(|| create(&config, earlier)) {
        Ok(created) => created,
        Err(e) => return Err(given_up(&config.bpffs, earlier, e)),
    };
    let status = Shared::default();
    let pins = loaded.pins.clone();
    let mut attaching = Attaching::begin(loaded, &config, earlier);
    conntrack::spawn(config.bpffs.clone(), &config.conntrack, &status);
    let timeout = config.health_timeout;
    spawn_http(config.health_addr, Endpoints::Health { timeout }, &status);
    spawn_http(config.metrics_addr, Endpoints::Metrics, &status);
    let health_checks = health_checks(config.health_addr.ip(), &status, timeout);
    let mut programmer = Programmer::adopt(maps, status, health_checks)?;
    let mut node = node_settings(&config.node_config)?;
    programmer.reconciler.set_node(node);
    programmer.sweeper = config
        .socket_lb
        .as_ref()
        .map(|_| Arc::new(stale::Sweeper::new(&config.bpffs)));
    programmer.reconciler.set_slot_budget(config.slot_budget);
    let mut signals = Signals::new()?;
    match (&config.source, kube) {
        (Source::Manifests(path), _) => {
            let source = ManifestSource::new(path, config.node.clone());
            manifest_loop(
                source,
                config.poll,
                &mut programmer,
                &mut attaching,
                &mut signals,
            )
            .await?
        }
        (Source::Kubernetes { .. }, Some(mut kube)) => {
            if let Some(key) = kube.cluster_key.take() {
                node.cluster_key = key.await.unwrap_or_else(|_| nodeconfig::key_of(""));
                programmer.reconciler.set_node(node);
            }
            let store = ClusterStore::new(config.node.clone());
            kube_loop(
                kube,
                &config.node_name,
                store,
                (&mut programmer, &mut attaching),
                &mut signals,
            )
            .await?
        }
        (Source::Kubernetes { .. }, None) => anyhow::bail!("the API server's watches never began"),
    }
    log::info!(
        "exiting; the datapath stays in place under {} with the last programmed state \
         (`proxy-agent cleanup` removes it)",
        pins.display()
    );
    Ok(())
}

/// The Kubernetes source from before the datapath loads: its watches
/// already listing, their events queued, and the cluster's hash key on
/// its way.
struct KubeStart {
    route: Route,
    changes: (
        mpsc::UnboundedSender<Change>,
        mpsc::UnboundedReceiver<Change>,
    ),
    watches: kubernetes::Watches,
    /// None: `--hash-key` gave it.
    cluster_key: Option<tokio::task::JoinHandle<nodeconfig::Key>>,
}

impl KubeStart {
    async fn begin(
        kubeconfig: Option<&Path>,
        apiserver: Option<&str>,
        config: &RunConfig,
    ) -> anyhow::Result<KubeStart> {
        let bootstrap = kubernetes::config(kubeconfig, apiserver).await?;
        let route = Route::new(bootstrap, apiserver.is_some());
        let (tx, rx) = mpsc::unbounded_channel();
        let watches = kubernetes::watch(route.bootstrap_client()?, &config.node_name, tx.clone());
        let cluster_key = match config.node_config.hash_key {
            Some(_) => None,
            None => Some(tokio::spawn(cluster_key(route.bootstrap_client()?))),
        };
        Ok(KubeStart {
            route,
            changes: (tx, rx),
            watches,
            cluster_key,
        })
    }
}

/// Reserves the source NAT ports on the node and picks the hash keys (the
/// cluster's from `--hash-key`, else a fixed one until the cluster's own
/// is known).
fn node_settings(flags: &nodeconfig::Flags) -> anyhow::Result<nodeconfig::Settings> {
    let ports = flags.snat_port_range;
    if let Err(e) = nodeconfig::reserve(ports, Path::new(nodeconfig::RESERVED_PORTS)) {
        log::warn!(
            "could not reserve the source NAT ports {ports}: {e:#}; local sockets may be given \
             one of them as their ephemeral port"
        );
    }
    Ok(nodeconfig::Settings {
        snat_ports: ports,
        node_key: nodeconfig::random_key()?,
        cluster_key: nodeconfig::key_of(flags.hash_key.as_deref().unwrap_or_default()),
    })
}

/// The cluster's hash key: derived from the kube-system namespace's UID,
/// which every node reads alike. Without it (no permission, no answer in
/// 5 s) the fixed key stays, and the operator is told to set --hash-key.
async fn cluster_key(client: kube::Client) -> nodeconfig::Key {
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let got = tokio::time::timeout(Duration::from_secs(5), namespaces.get("kube-system")).await;
    let uid = match got {
        Ok(Ok(ns)) => ns.metadata.uid.ok_or_else(|| "it has no UID".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".to_string()),
    };
    match uid {
        Ok(uid) => nodeconfig::key_of(&uid),
        Err(why) => {
            log::warn!(
                "reading the kube-system namespace for the cluster's hash key: {why}; Maglev \
                 and source hashing use a fixed key (set --hash-key on every node)"
            );
            nodeconfig::key_of("")
        }
    }
}

/// Creates (or adopts, if `earlier` pinned them) the datapath's maps,
/// before any program loads.
fn create(config: &RunConfig, earlier: bool) -> anyhow::Result<(loader::Loaded, MapSet)> {
    let sizes = config.conntrack.sizes();
    let started = Instant::now();
    let mut loaded = loader::load(&config.bpffs, datapath::object()?, sizes)?;
    log::info!("maps ready in {:?}", started.elapsed());
    let mut maps = MapSet::take(&mut loaded.ebpf, config.conntrack.longest_life(), earlier)?;
    // Before the programs that read them are attached. Maps created just
    // now hold no entry to list or raise: rewriting every id's slot (4 MiB)
    // would only delay the start.
    if earlier {
        let started = Instant::now();
        let restored = maps.restore_by_id()?;
        log::info!(
            "adopted service entries listed by id and their filter bits raised: {restored}, in {:?}",
            started.elapsed()
        );
    }
    Ok((loaded, maps))
}

/// Verifies the programs the interfaces `ifaces` selects now need,
/// attaches them (and the socket hooks) and says so on `attached`; then
/// verifies the other programs, which only interfaces that appear later
/// may need, at the lowest priority: the first programming pass may still
/// be running. A program the kernel refuses still stops the agent at
/// start. The watcher returned follows the interfaces' changes.
fn attach(
    mut loaded: loader::Loaded,
    ifaces: &[IfaceSpec],
    socket_lb: Option<&Path>,
    attached: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<(loader::Loaded, links::Watcher)> {
    let started = Instant::now();
    let mut watcher = links::Watcher::open(ifaces)?;
    let hooks = watcher.hooks_wanted();
    loaded.load_programs(&hooks)?;
    log::info!(
        "programs verified in {:?} (those of {}; the others next)",
        started.elapsed(),
        hook_list(&hooks)
    );
    if let Some(root) = socket_lb {
        loaded.attach_socket_hooks(root)?;
    }
    watcher.attach_all(&mut loaded);
    loaded.retire_other_links();
    // The receiver is gone only if the agent is stopping.
    let _ = attached.send(());
    // These programs name their maps by the fds the object was loaded
    // with: the maps taken out of it (`MapSet`) stay open for the agent's
    // life, so none of those fds can name anything else by now.
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                lowest_priority();
                loaded.load_programs(&loader::ALL_HOOKS)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a program load panicked"))?
    })?;
    log::info!("the other programs verified in {:?}", started.elapsed());
    Ok((loaded, watcher))
}

/// The hooks, as a list to read.
fn hook_list(hooks: &[iface::Hook]) -> String {
    match hooks {
        [] => "no interface".to_string(),
        _ => hooks
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Nice 19 for the calling thread and the threads it starts (Linux keeps
/// a nice value per thread): they get the CPU the agent's other threads
/// leave. Nice ranks threads within their cgroup, so a DaemonSet pod's
/// share of the node is the same either way.
fn lowest_priority() {
    // SAFETY: no pointers; `who` 0 is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        log::debug!(
            "lowering the priority of verifying: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An earlier agent's datapath keeps serving; a new one is not left
/// half-attached.
fn given_up(bpffs: &Path, earlier: bool, e: anyhow::Error) -> anyhow::Error {
    if !earlier && let Err(cleanup) = loader::cleanup(bpffs) {
        log::error!("removing the partly set-up datapath: {cleanup:#}");
    }
    e
}

/// The programs verifying and attaching on a thread of their own while the
/// maps, which exist before them, take their first pass: the kernel's
/// verifier (most of a second) and the first pass overlap, on two cores.
/// Two steps: attached (the datapath serves), then done (every program
/// verified, the watcher following the interfaces).
struct Attaching {
    task: Option<tokio::task::JoinHandle<anyhow::Result<(loader::Loaded, links::Watcher)>>>,
    /// Until the interfaces at start are attached.
    attached: Option<tokio::sync::oneshot::Receiver<()>>,
    bpffs: PathBuf,
    earlier: bool,
}

impl Attaching {
    fn begin(loaded: loader::Loaded, config: &RunConfig, earlier: bool) -> Attaching {
        let ifaces = config.ifaces.clone();
        let cgroup_root = config.socket_lb.as_ref().map(|s| s.cgroup_root.clone());
        let (tell, attached) = tokio::sync::oneshot::channel();
        let task = tokio::task::spawn_blocking(move || {
            let root = cgroup_root
                .map(|r| cgroup::root(r.as_deref()))
                .transpose()?;
            attach(loaded, &ifaces, root.as_deref(), tell)
        });
        Attaching {
            task: Some(task),
            attached: Some(attached),
            bpffs: config.bpffs.clone(),
            earlier,
        }
    }

    fn pending(&self) -> bool {
        self.task.is_some()
    }

    /// False until the datapath serves the interfaces there were at start.
    fn serving(&self) -> bool {
        self.attached.is_none()
    }

    /// Why the agent is not ready yet on this account.
    fn not_ready(&self) -> Option<String> {
        (!self.serving()).then(|| "loading and attaching the datapath's programs".to_string())
    }

    /// Waits for the next step (at once if it came): the attach, then the
    /// end, after which the watcher follows the interfaces.
    async fn finish(&mut self, programmer: &mut Programmer) -> anyhow::Result<()> {
        if let Some(attached) = self.attached.as_mut() {
            let told = attached.await.is_ok();
            self.attached = None;
            if told {
                self.now_serving(programmer);
                return Ok(());
            }
            // The task ended without attaching: its error is below.
        }
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let joined = task.await;
        self.task = None;
        let attached = joined
            .map_err(|e| anyhow::anyhow!("attaching the datapath: {e}"))
            .and_then(|r| r);
        let (loaded, watcher) = match attached {
            Ok(attached) => attached,
            Err(e) => return Err(given_up(&self.bpffs, self.earlier, e)),
        };
        watcher.spawn(loaded, programmer.status.clone())?;
        Ok(())
    }

    fn now_serving(&self, programmer: &mut Programmer) {
        programmer.attached();
        if self.earlier {
            // Now that the programs that wrote them are gone.
            let bpffs = self.bpffs.clone();
            tokio::task::spawn_blocking(move || match conntrack::upgrade::rewrite(&bpffs) {
                Ok((0, 0)) => {}
                Ok((rewritten, deleted)) => log::info!(
                    "conntrack of an earlier version: {rewritten} egress entries rewritten, \
                     {deleted} without a flow removed"
                ),
                Err(e) => log::error!("rewriting an earlier version's conntrack: {e:#}"),
            });
        }
    }
}

/// Health check node ports answer on the health server's address (both
/// families when that is 0.0.0.0, as a load balancer may probe over either),
/// and fail when the agent itself is unhealthy, as kube-proxy's do.
fn health_checks(bind: IpAddr, status: &Shared, timeout: Duration) -> HealthChecks {
    let bind = if bind == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        // A [::] socket takes IPv4 too (unless the host set bindv6only).
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        bind
    };
    let status = status.clone();
    let healthy = move || status.lock().is_ok_and(|s| s.healthy(timeout));
    HealthChecks::new(bind, Arc::new(healthy))
}

fn spawn_http(addr: SocketAddr, endpoints: Endpoints, status: &Shared) {
    let status = status.clone();
    tokio::spawn(async move {
        // The datapath matters more than its reports: a taken port is logged.
        if let Err(e) = http::serve(addr, endpoints, status).await {
            log::error!("{e:#}");
        }
    });
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    async fn any(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn manifest_loop(
    mut source: ManifestSource,
    poll: Duration,
    programmer: &mut Programmer,
    attaching: &mut Attaching,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            _ = signals.any() => return Ok(()),
            _ = tick.tick() => {}
            attached = attaching.finish(programmer), if attaching.pending() => {
                attached?;
                programmer.status(|s| s.not_ready = attaching.not_ready());
                continue;
            }
        }
        if source.changed() || programmer.retry.is_due(Instant::now()) {
            let seen = Instant::now();
            let load = source.load();
            for error in &load.errors {
                log::error!("{error}");
            }
            programmer.status(|s| {
                s.not_ready = attaching.not_ready();
                s.node_eligible = !load.objects.node.leaving;
            });
            let index = SliceIndex::new(&load.objects);
            programmer.program(&load.objects, &index, &[seen]);
        }
    }
}

async fn kube_loop(
    kube: KubeStart,
    node_name: &str,
    mut store: ClusterStore,
    (programmer, attaching): (&mut Programmer, &mut Attaching),
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let KubeStart {
        mut route,
        changes: (tx, mut rx),
        // Kept alive by the binding: dropping the watches stops them.
        watches: mut _watches,
        ..
    } = kube;
    let mut health = ApiHealth::default();
    loop {
        tokio::select! {
            _ = signals.any() => return Ok(()),
            Some(change) = rx.recv() => {
                health.note(&mut store, change);
                // A burst arrives together: take what is queued, wait a
                // moment for stragglers, take those too.
                drain(&mut rx, &mut store, &mut health);
                tokio::time::sleep(COALESCE).await;
                drain(&mut rx, &mut store, &mut health);
            }
            _ = tokio::time::sleep_until(programmer.retry_at()), if programmer.retry.pending() => {}
            // Whichever comes first, the lists or the programs: a slow API
            // server does not hold the attach back.
            attached = attaching.finish(programmer), if attaching.pending() => attached?,
        }
        for error in store.take_errors() {
            log::error!("{error}");
        }
        programmer.status(|s| {
            s.not_ready = attaching.not_ready().or_else(|| health.not_ready(&store));
            s.node_eligible = !store.objects().node.leaving;
            if store.has_pending() {
                s.oldest_pending.get_or_insert_with(Instant::now);
            }
        });
        // Changes go in as they come; what a failed pass left undone waits
        // for its retry (a full pass) on the backoff schedule.
        let retry = programmer.retry.is_due(Instant::now());
        if store.synced() && (store.has_pending() || retry) {
            let pending = store.take_pending();
            match store.take_dirty() {
                Dirty::Services(services) if !retry => {
                    programmer.program_changes(store.objects(), store.index(), &services, &pending)
                }
                _ => programmer.program(store.objects(), store.index(), &pending),
            }
        }
        // The route through the kubernetes Service is tried once the
        // programs that serve it are attached: before, it cannot answer.
        if store.synced() && attaching.serving() {
            let failing = health.failing();
            if let Some(client) = route.next(store.objects(), failing, node_name).await {
                // Dropping the old watches stops them; the new ones list
                // afresh, and a relist replaces objects only when complete.
                _watches = kubernetes::watch(client, node_name, tx.clone());
            }
        }
    }
}

fn drain(
    rx: &mut mpsc::UnboundedReceiver<Change>,
    store: &mut ClusterStore,
    health: &mut ApiHealth,
) {
    while let Ok(change) = rx.try_recv() {
        health.note(store, change);
    }
}

/// Which watches are failing right now, for logs and readiness.
#[derive(Default)]
struct ApiHealth {
    failing: std::collections::BTreeMap<Resource, String>,
}

impl ApiHealth {
    fn note(&mut self, store: &mut ClusterStore, change: Change) {
        let resource = change.resource();
        match change {
            Change::Trouble(_, why) => {
                if self.failing.insert(resource, why.clone()).is_none() {
                    log::warn!("{why}; the datapath keeps the last programmed state, retrying");
                }
                return;
            }
            Change::Reachable => {
                if !self.failing.is_empty() {
                    log::info!("the API server answers again");
                    self.failing.clear();
                }
                return;
            }
            Change::Service(event) => store.service(*event),
            Change::Slice(event) => store.slice(*event),
            Change::Node(event) => store.node(*event),
        }
        if self.failing.remove(&resource).is_some() {
            log::info!("watching {resource:?} works again");
        }
    }

    fn failing(&self) -> bool {
        !self.failing.is_empty()
    }

    fn not_ready(&self, store: &ClusterStore) -> Option<String> {
        if let Some(why) = self.failing.values().next() {
            return Some(why.clone());
        }
        (!store.synced()).then(|| "waiting for the initial lists from the API server".to_string())
    }
}

/// Desired state to maps, with the bookkeeping kube-proxy's metrics expect.
struct Programmer {
    reconciler: Reconciler,
    maps: MapSet,
    status: Shared,
    /// When to retry what failed passes left undone (a full pass).
    retry: Backoff,
    health_checks: HealthChecks,
    /// Each Service's health check node port and local endpoint count.
    health_wanted: BTreeMap<ObjectKey, (u16, usize)>,
    /// With socket-level load balancing: destroys the sockets the hooks
    /// connected to backends that left.
    sweeper: Option<Arc<stale::Sweeper>>,
    /// False until the programs are attached: a pass before that programs
    /// the maps but serves nobody yet, and says so only once they are.
    serving: bool,
    /// The report of such a pass, logged when the programs are attached.
    held: Option<String>,
    /// A write behind a full pass failed: the reconciler's record may not
    /// match the maps until it is read back from them.
    record_stale: bool,
}

impl Programmer {
    fn adopt(
        maps: MapSet,
        status: Shared,
        health_checks: HealthChecks,
    ) -> anyhow::Result<Programmer> {
        let snapshot = maps.snapshot()?;
        if !snapshot.services.is_empty() || !snapshot.backends.is_empty() {
            log::info!(
                "adopting {} service entries, {} slots and {} backends an earlier agent programmed",
                snapshot.services.len(),
                snapshot.slots.len(),
                snapshot.backends.len()
            );
        }
        Ok(Programmer {
            reconciler: Reconciler::adopt(&snapshot, Capacity::DATAPATH),
            maps,
            status,
            retry: Backoff::default(),
            health_checks,
            health_wanted: BTreeMap::new(),
            sweeper: None,
            serving: false,
            held: None,
            record_stale: false,
        })
    }

    /// The programs are attached: the maps serve traffic from now on.
    fn attached(&mut self) {
        self.serving = true;
        if let Some(line) = self.held.take() {
            log::info!("{line}");
        }
    }

    /// When the pending retry is due (far away when none is).
    fn retry_at(&self) -> tokio::time::Instant {
        let due = (self.retry.due()).unwrap_or_else(|| Instant::now() + NO_RETRY);
        tokio::time::Instant::from_std(due)
    }

    /// Brings the health check node ports up to date for these Services
    /// (all of them: None).
    fn sync_health_checks(
        &mut self,
        objects: &Objects,
        index: &SliceIndex,
        services: Option<&BTreeSet<ObjectKey>>,
    ) {
        match services {
            Some(keys) => {
                for key in keys {
                    match model::health_check(objects, index, key) {
                        Some(wanted) => self.health_wanted.insert(key.clone(), wanted),
                        None => self.health_wanted.remove(key),
                    };
                }
            }
            None => {
                self.health_wanted = objects
                    .services
                    .keys()
                    .filter_map(|k| Some((k.clone(), model::health_check(objects, index, k)?)))
                    .collect();
            }
        }
        let mut ports = BTreeMap::new();
        for (service, (port, local_endpoints)) in &self.health_wanted {
            let health = ServiceHealth {
                service: service.clone(),
                local_endpoints: *local_endpoints,
            };
            if let Some(other) = ports.insert(*port, health) {
                log::warn!(
                    "health check node port {port} is claimed twice ({})",
                    other.service
                );
            }
        }
        for error in self.health_checks.sync(&ports) {
            log::error!("{error}; retried on the next sync");
        }
    }

    fn status(&self, update: impl FnOnce(&mut Status)) {
        if let Ok(mut status) = self.status.lock() {
            update(&mut status);
        }
    }

    /// A full pass; `changes` are when the changes it carries happened.
    fn program(&mut self, objects: &Objects, index: &SliceIndex, changes: &[Instant]) {
        let started = Instant::now();
        let desired = model::desired_indexed(objects, index);
        for warning in &desired.warnings {
            log::warn!("{warning}");
        }
        self.status(|s| s.frontend_conflicts = desired.conflicts);
        let report = self.apply_all(desired, objects, index);
        // A full pass is the retry of whatever earlier ones left undone.
        match report.errors.is_empty() {
            true => self.retry.succeeded(),
            false => self.retry.start(),
        }
        self.sweep_stale_sockets();
        self.sync_health_checks(objects, index, None);
        self.record(objects, &report, started, changes, "all services");
    }

    /// The reconciler's full pass; a large one with its map writes behind
    /// it, on another thread (`behind`).
    fn apply_all(&mut self, desired: Desired, objects: &Objects, index: &SliceIndex) -> Report {
        if let Err(e) = self.readopt_if_stale() {
            return Report {
                errors: vec![e],
                ..Report::default()
            };
        }
        if desired.frontends.len() < WRITE_BEHIND_FROM {
            return self.reconciler.apply(desired, &mut self.maps);
        }
        let Programmer {
            reconciler, maps, ..
        } = self;
        let (mut report, written) =
            behind::write_behind(maps, |queue| reconciler.apply(desired, queue));
        let Err(e) = written else {
            // The queue cannot lend the writer the pass's record.
            if let Err(e) = reconciler.settle(maps) {
                report.errors.push(format!("{e:#}"));
            }
            return report;
        };
        // The maps hold the pass up to the write that failed: read them back
        // and pass again, one write at a time, for each Service's errors.
        log::warn!("a full pass's write failed: {e:#}; reading the maps back to pass again");
        self.record_stale = true;
        if let Err(e) = self.readopt_if_stale() {
            return Report {
                errors: vec![e],
                ..Report::default()
            };
        }
        self.reconciler
            .apply(model::desired_indexed(objects, index), &mut self.maps)
    }

    /// Rebuilds the reconciler's record from the maps if a write behind
    /// it failed; until that works, no pass writes anything.
    fn readopt_if_stale(&mut self) -> Result<(), String> {
        if !self.record_stale {
            return Ok(());
        }
        let snapshot = (self.maps.snapshot())
            .map_err(|e| format!("reading the maps back after a failed write: {e:#}"))?;
        self.reconciler.readopt(&snapshot, Capacity::DATAPATH);
        self.record_stale = false;
        Ok(())
    }

    /// A pass over the Services that changed only.
    fn program_changes(
        &mut self,
        objects: &Objects,
        index: &SliceIndex,
        services: &BTreeSet<ObjectKey>,
        changes: &[Instant],
    ) {
        let started = Instant::now();
        let wanted = model::changes(objects, index, services);
        let report = match self.readopt_if_stale() {
            Ok(()) => self.reconciler.apply_changes(&wanted, &mut self.maps),
            Err(e) => Report {
                errors: vec![e],
                ..Report::default()
            },
        };
        self.sweep_stale_sockets();
        self.sync_health_checks(objects, index, Some(services));
        self.record(
            objects,
            &report,
            started,
            changes,
            &format!("{} changed services", services.len()),
        );
    }

    /// Sockets connected to backends this pass removed go, in the
    /// background: the maps already send new connections elsewhere.
    fn sweep_stale_sockets(&mut self) {
        let left = self.maps.take_left();
        let Some(sweeper) = self.sweeper.clone().filter(|_| !left.is_empty()) else {
            return;
        };
        tokio::task::spawn_blocking(move || match sweeper.sweep(&left) {
            Ok(done) => {
                if done.sockets > 0 {
                    log::info!(
                        "destroyed {} sockets connected to {} backends that left (in {} network namespaces)",
                        done.sockets,
                        left.len(),
                        done.namespaces
                    );
                }
                for error in done.errors {
                    log::debug!("stale sockets: {error}");
                }
            }
            Err(e) => log::error!("stale sockets: {e:#}"),
        });
    }

    fn record(
        &mut self,
        objects: &Objects,
        report: &Report,
        started: Instant,
        changes: &[Instant],
        scope: &str,
    ) {
        let done = Instant::now();
        for error in &report.errors {
            log::error!("programming: {error}");
        }
        for invalid in &report.invalid {
            log::error!("{invalid}");
        }
        if !report.errors.is_empty() {
            self.retry.failed(done);
            if let Some(due) = self.retry.due() {
                log::warn!(
                    "programming failed; a full pass retries in {:?}",
                    due.saturating_duration_since(done)
                );
            }
        }
        let (frontends, backends) = (
            self.reconciler.frontend_count(),
            self.reconciler.backend_count(),
        );
        let (slot_tables, slots) = self.reconciler.slot_usage();
        let over_budget = self.reconciler.over_budget();
        let filter_bits = self.maps.filter_bits_raised();
        let failed = self.retry.pending();
        self.status(|s| {
            s.sync_duration.observe((done - started).as_secs_f64());
            for at in changes {
                s.network_programming
                    .observe(done.saturating_duration_since(*at).as_secs_f64());
            }
            s.sync_errors += report.errors.len() as u64;
            s.last_sync = Some(SystemTime::now());
            s.oldest_pending = failed.then_some(s.oldest_pending.unwrap_or(started));
            s.frontends = frontends;
            s.backends = backends;
            s.slot_tables = slot_tables;
            s.slots = slots;
            s.services_over_slot_budget = over_budget;
            s.filter_bits = filter_bits;
        });
        let line = format!(
            "synced: {} services, {} endpoint slices -> {frontends} frontends, {backends} backends ({} map writes) in {:?} ({scope})",
            objects.services.len(),
            objects.slices.len(),
            report.writes,
            done - started
        );
        match self.serving {
            true => log::info!("{line}"),
            false => self.held = Some(line),
        }
    }
}
