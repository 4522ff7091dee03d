//! Loading the object, pinning its maps and links under one bpffs directory,
//! and removing all of it again.
//!
//! Links are pinned, so the datapath stays in place when the agent exits
//! (connections keep flowing with the last programmed state); the next agent
//! reuses the maps and swaps its programs into the links; `cleanup` removes
//! it all.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, IterableMap, MapData, MapInfo, ProgramArray, lpm_trie::Key},
    programs::{
        Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use proxy_common::{
    Affinity4Key, Affinity6Key, AffinityEntry, Backend4, Backend6, BackendStatsEntry, CT_GROUP,
    CT_HASH_KEYS, CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_MARKS, ClosedFlow4, ClosedFlow6, Counter,
    Ct4Entry, Ct4Group, Ct4Key, Ct6Entry, Ct6Group, Ct6Key, FILTER_WORDS, Frag4Entry, Frag4Key,
    Frag6Entry, Frag6Key, Frontend4, Frontend6, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK,
    MAX_CT_CLOSED, MAX_CT_OVERFLOW, MAX_FRAGMENTS, MAX_MEMBERS, MAX_SERVICES, MAX_SLOTS,
    MAX_SOCK_NAT, MAX_SOURCE_RANGES, MemberKey, NewFlows, NodeConfig, PROJECT, RingEnds,
    STATS_PER_ENTRY, Service, ServiceStats, ServiceStatsEntry, SlotKey, SockNat4, SockNat4Key,
    SockNat6, SockNat6Key, SourceRange4, SourceRange6, ct_hash_keys, ct_lines, names, programs,
};

use super::{
    super::nodeconfig,
    conntrack::{CtKey, Table},
    ctlines::{CtLines, LineKey, Seed},
    ctstore::CtTables,
    iface::Hook,
    pinned::{self, Pins},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory everything is pinned under.
pub fn pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(PROJECT)
}

/// Mounts bpffs at `root` unless one is there already, as a DaemonSet would.
pub fn ensure_bpffs(root: &Path) -> anyhow::Result<()> {
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let target = CString::new(root.as_os_str().as_bytes()).context("bpffs path")?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("mounting bpffs at {} (needs CAP_SYS_ADMIN)", root.display())
        });
    }
    log::info!("mounted bpffs at {}", root.display());
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    is_fs(path, BPF_FS_MAGIC)
}

/// True if `path` is on a file system of type `magic` (statfs).
pub(super) fn is_fs(path: &Path, magic: i64) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == magic
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub pins: PathBuf,
    /// Link pins this agent attached or took over.
    links: Vec<PathBuf>,
}

/// Capacities per family of the conntrack maps, applied when they are
/// created (`--conntrack-max`, `--conntrack-overflow-max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSizes {
    /// Flows of `ct4_table`, `ct6_table` (see `ct_lines`).
    pub entries: u32,
    /// `ct4_overflow`, `ct6_overflow`.
    pub overflow: u32,
}

impl Default for ConntrackSizes {
    fn default() -> Self {
        ConntrackSizes {
            entries: MAX_CONNTRACK,
            overflow: MAX_CT_OVERFLOW,
        }
    }
}

impl ConntrackSizes {
    /// The maps these sizes apply to, each with its size (a table's groups
    /// and the seed's).
    fn by_map(self) -> [(&'static str, u32); 4] {
        let groups = ct_lines(self.entries) / CT_GROUP + 1;
        [
            (names::CT4_GROUPS, groups),
            (names::CT6_GROUPS, groups),
            (names::OVERFLOW4, self.overflow),
            (names::OVERFLOW6, self.overflow),
        ]
    }

    /// The groups of the tables: `pinned`, those of tables pinned before
    /// (at the size they were made), or those these sizes make; less one.
    pub fn groups_mask(self, pinned: Option<u32>) -> u32 {
        pinned.unwrap_or(ct_lines(self.entries) / CT_GROUP) - 1
    }

    /// Sizes the conntrack maps of `loader`'s object, and tells its
    /// programs the groups of their tables (`groups_mask`) and the
    /// multipliers of their hash (`ct_hash_keys` of the tables' seed).
    pub fn apply<'a>(
        self,
        loader: &mut EbpfLoader<'a>,
        mask: &'a u32,
        keys: &'a [u64; CT_HASH_KEYS],
    ) {
        for (name, max) in self.by_map() {
            let max = match name {
                names::CT4_GROUPS | names::CT6_GROUPS => mask + 2,
                _ => max,
            };
            loader.map_max_entries(name, max);
        }
        loader.override_global(CT_GROUPS_MASK, mask, true);
        loader.override_global(CT_HASH, keys, true);
    }

    /// True for a map whose size these are.
    fn apply_to(self, name: &str) -> bool {
        self.by_map().iter().any(|(n, _)| *n == name)
    }
}

/// Loads the object with every map pinned under `<bpffs>/xdproxy`, the
/// conntrack maps sized as `sizes` says. Maps an earlier agent pinned there
/// are reused as they are (with their entries and conntrack state) when
/// their layout is the one this agent expects; maps it did not have are
/// created and pinned.
pub fn load(bpffs: &Path, object: &[u8], sizes: ConntrackSizes) -> anyhow::Result<Loaded> {
    ensure_bpffs(bpffs)?;
    let pins = pin_dir(bpffs);
    fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
    let paths: Vec<(&str, PathBuf)> = names::ALL.iter().map(|n| (*n, pins.join(n))).collect();
    let mut adopted = 0;
    for (name, path) in &paths {
        if check_pinned_layout(name, path, sizes)? {
            adopted += 1;
        }
    }
    if adopted > 0 {
        log::info!("adopting {adopted} maps pinned under {}", pins.display());
    }
    let filter_found = pins.join(names::FILTER).exists();
    let (groups, seed) = pinned_tables(&pins)?;
    let mask = sizes.groups_mask(groups);
    let seed = match seed {
        Some(seed) => seed,
        None => random_seed()?,
    };
    let keys = ct_hash_keys(seed);
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    // A pinned map is reused at the size it has, whatever is set here.
    sizes.apply(&mut loader, &mask, &keys);
    let mut ebpf = loader.load(object).context("loading the eBPF object")?;
    // Before any program can run: none has used a table without its seed.
    seed_tables(&ebpf, seed)?;
    if adopted > 0 {
        assume_pairs(&mut ebpf)?;
    }
    if adopted > 0 && !filter_found {
        assume_every_item(&mut ebpf)?;
    }
    if adopted > 0 {
        copy_legacy_backends(&mut ebpf, bpffs)?;
        copy_legacy_conntrack(&mut ebpf, bpffs)?;
    }
    remove_retired(&pins);
    Ok(Loaded {
        ebpf,
        pins,
        links: Vec::new(),
    })
}

/// Sets both marks of `ct_paired` on a datapath an earlier agent pinned,
/// before any program of this one runs: a version without the flag wrote
/// forward, reply and source NAT entries without setting it, and the new
/// programs must find them from their first packet. Garbage collection
/// clears each once none of its entries is left; until then it costs a
/// lookup.
fn assume_pairs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    // An object without the flag looks for pairs anyway.
    let Some(map) = ebpf.map_mut(names::PAIRED) else {
        return Ok(());
    };
    let mut flag: Array<&mut MapData, u32> = Array::try_from(map)
        .with_context(|| format!("map {} has an unexpected type", names::PAIRED))?;
    for mark in [CT_MARK_PAIRS, CT_MARK_SOURCE_NAT] {
        flag.set(mark, 1, 0)
            .with_context(|| format!("setting {}", names::PAIRED))?;
    }
    Ok(())
}

/// Raises every bit of a new `lb_filter` on a datapath an earlier agent
/// pinned, before any program of this one runs: that agent's conntrack
/// entries may name backends this one will never write, whose replies
/// must still find them. The bits linger from start as the conntrack
/// entries may (`filter`); until then packets cost the lookups they
/// cost before the filter.
fn assume_every_item(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = (ebpf.map_mut(names::FILTER))
        .with_context(|| format!("the eBPF object has no map {}", names::FILTER))?;
    let mut filter: Array<&mut MapData, u64> = Array::try_from(map)
        .with_context(|| format!("map {} has an unexpected type", names::FILTER))?;
    let all: Vec<(u32, u64)> = (0..FILTER_WORDS).map(|word| (word, u64::MAX)).collect();
    super::maps::write_array(&mut filter, &all, names::FILTER)
}

/// Copies the backends of a datapath an earlier version pinned, which kept
/// them in hash maps (`names::LEGACY_BACKENDS4`, `LEGACY_BACKENDS6`), into
/// the arrays, before any program of this one runs: the adopted slots and
/// members name those ids. Each array is written whole, so that ids the
/// hash map does not hold (left by a later version before a downgrade)
/// hold no backend.
fn copy_legacy_backends(ebpf: &mut Ebpf, bpffs: &Path) -> anyhow::Result<()> {
    let pins = Pins::at(bpffs);
    copy_legacy::<Backend4>(ebpf, &pins, names::LEGACY_BACKENDS4, names::BACKENDS4)?;
    copy_legacy::<Backend6>(ebpf, &pins, names::LEGACY_BACKENDS6, names::BACKENDS6)
}

fn copy_legacy<B: Pod + Default>(
    ebpf: &mut Ebpf,
    pins: &Pins,
    from: &str,
    to: &str,
) -> anyhow::Result<()> {
    let Some(legacy) = pins.optional_map::<HashMap<MapData, u32, B>>(from)? else {
        return Ok(());
    };
    let held = pinned::entries(
        &legacy,
        2 * pinned::capacity(legacy.map(), MAX_BACKENDS) + 1,
    )
    .with_context(|| format!("reading {}", pins.path(from).display()))?;
    let map = (ebpf.map_mut(to)).with_context(|| format!("the eBPF object has no map {to}"))?;
    let mut array: Array<&mut MapData, B> =
        Array::try_from(map).with_context(|| format!("map {to} has an unexpected type"))?;
    let mut all = vec![B::default(); array.len() as usize];
    for (id, backend) in &held {
        if let Some(at) = all.get_mut(*id as usize) {
            *at = *backend;
        }
    }
    let entries: Vec<(u32, B)> = (0u32..).zip(all).collect();
    super::maps::write_array(&mut array, &entries, to)?;
    log::info!("copied {} backends from {from} into {to}", held.len());
    Ok(())
}

/// The program globals that hold the conntrack tables' groups, less one,
/// and their hash's multipliers.
const CT_GROUPS_MASK: &str = "CT_GROUPS_MASK";
const CT_HASH: &str = "CT_HASH";

/// The groups (the seed's not counted) and the seed of the conntrack
/// tables pinned under `pins`, if any: both families' must agree, as the
/// programs have one count and one set of multipliers for both.
fn pinned_tables(pins: &Path) -> anyhow::Result<(Option<u32>, Option<Seed>)> {
    let mismatch = |name: &str| {
        anyhow::anyhow!(
            "the conntrack tables pinned under {} do not match each other ({name}); \
             `proxy-agent cleanup` removes them",
            pins.display()
        )
    };
    let mut found: Option<(u32, Seed)> = None;
    for (name, table) in [
        (names::CT4_GROUPS, pinned_table::<Ct4Key>(pins)?),
        (names::CT6_GROUPS, pinned_table::<Ct6Key>(pins)?),
    ] {
        let Some(table) = table else {
            continue;
        };
        if found.is_some_and(|seen| seen != table) {
            return Err(mismatch(name));
        }
        found = Some(table);
    }
    Ok((found.map(|f| f.0), found.map(|f| f.1)))
}

/// The groups and seed of the family's table pinned under `pins`.
fn pinned_table<K: LineKey>(pins: &Path) -> anyhow::Result<Option<(u32, Seed)>> {
    let path = pins.join(K::GROUPS);
    if !path.exists() {
        return Ok(None);
    }
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let lines = CtLines::<K>::new(&map).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some((lines.groups(), lines.seed()?)))
}

/// A seed for new tables: random, so that clients cannot tell which
/// group their flows hash to.
fn random_seed() -> anyhow::Result<Seed> {
    let (a, b) = (nodeconfig::random_key()?, nodeconfig::random_key()?);
    Ok([a[0], a[1], b[0], b[1]])
}

/// Keeps `seed` in both tables (unchanged in tables that had it), whose
/// programs were given the multipliers drawn from it.
pub fn seed_tables(ebpf: &Ebpf, seed: Seed) -> anyhow::Result<()> {
    CtTables::<Ct4Key>::of(ebpf)?.main.set_seed(seed)?;
    CtTables::<Ct6Key>::of(ebpf)?.main.set_seed(seed)
}

/// Copies the conntrack entries of a datapath pinned by an earlier
/// version into the table, before any program of this one runs, so that
/// its open connections keep their backends: from the hash maps before
/// conntrack's own table (`names::LEGACY_CONNTRACK4`, `6`), or from the
/// table before its seed (`names::LEGACY_GROUPS4`, `6`), whose groups
/// were hashed otherwise. An entry whose group is full goes to the
/// overflow map.
fn copy_legacy_conntrack(ebpf: &mut Ebpf, bpffs: &Path) -> anyhow::Result<()> {
    let pins = Pins::at(bpffs);
    copy_legacy_flows::<Ct4Key>(ebpf, &pins)?;
    copy_legacy_flows::<Ct6Key>(ebpf, &pins)
}

fn copy_legacy_flows<K: CtKey>(ebpf: &mut Ebpf, pins: &Pins) -> anyhow::Result<()> {
    for (from, held) in [
        (K::LEGACY, legacy_hash_flows::<K>(pins)?),
        (K::LEGACY_GROUPS, CtTables::<K>::legacy_table(pins)?),
    ] {
        if let Some(held) = held {
            copy_flows::<K>(ebpf, from, &held)?;
        }
    }
    Ok(())
}

/// Conntrack entries read from a map.
type Flows<K> = std::collections::HashMap<K, <K as LineKey>::Value>;

fn legacy_hash_flows<K: CtKey>(pins: &Pins) -> anyhow::Result<Option<Flows<K>>> {
    let Some(legacy) = pins.optional_map::<HashMap<MapData, K, K::Value>>(K::LEGACY)? else {
        return Ok(None);
    };
    let held = pinned::entries(
        &legacy,
        2 * pinned::capacity(legacy.map(), MAX_CONNTRACK) + 1,
    )
    .with_context(|| format!("reading {}", pins.path(K::LEGACY).display()))?;
    Ok(Some(held))
}

/// Writes `held`, read from `from`, into the table.
fn copy_flows<K: CtKey>(ebpf: &mut Ebpf, from: &str, held: &Flows<K>) -> anyhow::Result<()> {
    let mut tables = CtTables::<K>::of(ebpf)?;
    let mut overflowed = 0;
    for (key, value) in held {
        if tables.main.insert(*key, *value)?.is_err() {
            tables.insert(Table::Overflow, *key, *value)?;
            overflowed += 1;
        }
    }
    if overflowed > 0 {
        mark_overflowed(ebpf)?;
    }
    log::info!(
        "copied {} conntrack entries from {from} into {} ({overflowed} into {})",
        held.len(),
        K::GROUPS,
        K::OVERFLOW
    );
    Ok(())
}

/// Raises `ct_overflowed`: entries were put in the overflow maps.
fn mark_overflowed(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = (ebpf.map_mut(names::OVERFLOWED))
        .with_context(|| format!("the eBPF object has no map {}", names::OVERFLOWED))?;
    let mut flag: Array<&mut MapData, u32> = Array::try_from(map)
        .with_context(|| format!("map {} has an unexpected type", names::OVERFLOWED))?;
    flag.set(0, 1, 0)
        .with_context(|| format!("setting {}", names::OVERFLOWED))
}

/// Unpins maps an earlier version pinned under names this one no longer
/// uses, so an upgraded node does not keep them; `cleanup` removes
/// whatever is left anyway.
fn remove_retired(pins: &Path) {
    for name in names::RETIRED {
        let path = pins.join(name);
        match fs::remove_file(&path) {
            Ok(()) => log::info!("removed {}, pinned by an earlier version", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// How a pinned map compares with the layout this agent expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fit {
    /// The layout expected: adopt it.
    Expected,
    /// A conntrack map of another size: adopted as it is, as its open
    /// connections matter more than the size asked for.
    Resized,
    /// Another key or value size, or another size of a map the flags do
    /// not size: not usable.
    Mismatch,
}

/// Compares the (key size, value size, max entries) `found` pinned for
/// `name` with the layout `want`.
fn fit(name: &str, found: (u32, u32, u32), want: (u32, u32, u32), sizes: ConntrackSizes) -> Fit {
    if found == want {
        Fit::Expected
    } else if sizes.apply_to(name) && (found.0, found.1) == (want.0, want.1) {
        Fit::Resized
    } else {
        Fit::Mismatch
    }
}

/// True if a map is pinned at `path` with the layout this agent expects
/// (a conntrack map also with another size); an error if it is pinned with
/// another one.
fn check_pinned_layout(name: &str, path: &Path, sizes: ConntrackSizes) -> anyhow::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let info = MapInfo::from_pin(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(want) = layout(name, sizes) else {
        return Ok(false);
    };
    let found = (info.key_size(), info.value_size(), info.max_entries());
    match fit(name, found, want, sizes) {
        Fit::Expected => Ok(true),
        Fit::Resized => {
            log::warn!(
                "{} holds {} entries, not the {} asked for: keeping it and its connections; \
                 the new size applies after `proxy-agent cleanup`",
                path.display(),
                found.2,
                want.2
            );
            Ok(true)
        }
        Fit::Mismatch => anyhow::bail!(
            "{} has key/value size and capacity {found:?}, this agent expects {want:?}: the \
             map layout changed; `proxy-agent cleanup` removes the old datapath (open \
             connections lose their conntrack state)",
            path.display()
        ),
    }
}

/// (key size, value size, max entries) of each map the object defines.
fn layout(name: &str, sizes: ConntrackSizes) -> Option<(u32, u32, u32)> {
    Some(match name {
        names::SERVICES4 => kv::<Frontend4, Service>(MAX_SERVICES),
        names::NEW_FLOW => kv::<u32, NewFlows>(1),
        names::XDP_NEW_FLOW | names::TC_NEW_FLOW => kv::<u32, u32>(1),
        names::SLOTS => kv::<SlotKey, u32>(MAX_SLOTS),
        names::BACKENDS4 => kv::<u32, Backend4>(MAX_BACKENDS),
        names::CT4_GROUPS => kv::<u32, Ct4Group>(ct_lines(sizes.entries) / CT_GROUP + 1),
        names::SERVICE_STATS => kv::<u32, ServiceStatsEntry>(MAX_SERVICES / STATS_PER_ENTRY),
        names::SERVICE_STATS_BASE => kv::<u32, ServiceStats>(MAX_SERVICES),
        names::BACKEND_STATS => kv::<u32, BackendStatsEntry>(MAX_BACKENDS / STATS_PER_ENTRY),
        names::COUNTERS => kv::<u32, u64>(Counter::COUNT),
        names::CONFIG => kv::<u32, NodeConfig>(1),
        names::SERVICES6 => kv::<Frontend6, Service>(MAX_SERVICES),
        names::BACKENDS6 => kv::<u32, Backend6>(MAX_BACKENDS),
        names::MEMBERS6 => kv::<MemberKey, Backend6>(MAX_MEMBERS),
        names::CT6_GROUPS => kv::<u32, Ct6Group>(ct_lines(sizes.entries) / CT_GROUP + 1),
        names::AFFINITY6 => kv::<Affinity6Key, AffinityEntry>(MAX_AFFINITY),
        names::SOURCE_RANGES6 => kv::<Key<SourceRange6>, u32>(MAX_SOURCE_RANGES),
        names::MEMBERS4 => kv::<MemberKey, Backend4>(MAX_MEMBERS),
        names::AFFINITY4 => kv::<Affinity4Key, AffinityEntry>(MAX_AFFINITY),
        names::SOURCE_RANGES4 => kv::<Key<SourceRange4>, u32>(MAX_SOURCE_RANGES),
        names::OVERFLOW4 => kv::<Ct4Key, Ct4Entry>(sizes.overflow),
        names::OVERFLOW6 => kv::<Ct6Key, Ct6Entry>(sizes.overflow),
        names::OVERFLOWED => kv::<u32, u32>(1),
        names::PAIRED => kv::<u32, u32>(CT_MARKS),
        names::REV_NAT4 => kv::<u32, Frontend4>(MAX_SERVICES),
        names::MEMBER_GONE => kv::<u32, u32>(MAX_SERVICES),
        names::FILTER => kv::<u32, u64>(FILTER_WORDS),
        names::SERVICES_BY_ID => kv::<u32, Service>(MAX_SERVICES),
        names::REV_NAT6 => kv::<u32, Frontend6>(MAX_SERVICES),
        names::CLOSED4 => kv::<u32, ClosedFlow4>(MAX_CT_CLOSED),
        names::CLOSED6 => kv::<u32, ClosedFlow6>(MAX_CT_CLOSED),
        names::CLOSED_ENDS => kv::<u32, RingEnds>(2),
        names::SOCK_NAT4 => kv::<SockNat4Key, SockNat4>(MAX_SOCK_NAT),
        names::SOCK_NAT6 => kv::<SockNat6Key, SockNat6>(MAX_SOCK_NAT),
        names::FRAGMENTS4 => kv::<Frag4Key, Frag4Entry>(MAX_FRAGMENTS),
        names::FRAGMENTS6 => kv::<Frag6Key, Frag6Entry>(MAX_FRAGMENTS),
        _ => return None,
    })
}

/// The layout of a map from `K` to `V` with room for `max` entries.
fn kv<K, V>(max: u32) -> (u32, u32, u32) {
    (size_of::<K>() as u32, size_of::<V>() as u32, max)
}

/// One program on one interface hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attachment {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Attachment {
    /// The name part of its link pin (`link_<tag>_<iface>`).
    fn tag(self) -> &'static str {
        match self {
            Attachment::Xdp => "xdp",
            Attachment::TcIngress => "tc",
            Attachment::TcEgress => "tcout",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Attachment::Xdp => programs::XDP,
            Attachment::TcIngress => programs::TC_INGRESS,
            Attachment::TcEgress => programs::TC_EGRESS,
        }
    }
}

impl Attachment {
    fn ingress(hook: Hook) -> Attachment {
        match hook {
            Hook::Xdp => Attachment::Xdp,
            Hook::Tc => Attachment::TcIngress,
        }
    }
}

impl Loaded {
    /// Loads (verifies) the programs `hooks` need, each on its own thread
    /// (the verifier takes a tenth to a third of a second over each), and
    /// puts the new-flow programs among them where their ingress programs
    /// tail-call them. Programs only other hooks need wait for a call that
    /// names those (`ALL_HOOKS`: all of them).
    pub fn load_programs(&mut self, hooks: &[Hook]) -> anyhow::Result<()> {
        let wanted = programs_for(hooks);
        let found: Vec<(&str, &mut Program)> = self
            .ebpf
            .programs_mut()
            .filter(|(name, _)| wanted.contains(name))
            .collect();
        for name in &wanted {
            anyhow::ensure!(
                found.iter().any(|(n, _)| n == name),
                "the eBPF object has no program {name}"
            );
        }
        let unloaded: Vec<_> = found.into_iter().filter(|(_, p)| p.fd().is_err()).collect();
        if unloaded.is_empty() {
            return Ok(());
        }
        std::thread::scope(|scope| {
            let loads: Vec<_> = unloaded
                .into_iter()
                .map(|(name, program)| scope.spawn(move || ensure_loaded(name, program)))
                .collect();
            loads.into_iter().try_for_each(|load| {
                load.join()
                    .map_err(|_| anyhow::anyhow!("a program load panicked"))?
            })
        })?;
        set_new_flow_programs(&mut self.ebpf)
    }

    /// Attaches the right ingress program to `iface`, and the egress program
    /// that finishes replies for frontends on the node's own addresses, and
    /// pins the links. Links an earlier agent pinned there get the new
    /// programs atomically, so no packet goes unprocessed.
    pub fn attach(&mut self, iface: &str, hook: Hook) -> anyhow::Result<()> {
        self.load_programs(&[hook])?;
        self.attach_one(Attachment::ingress(hook), iface)?;
        self.attach_one(Attachment::TcEgress, iface)
    }

    /// Unpins the links of `iface` for `hook`; the kernel detaches their
    /// programs (at once, or already did when the interface went).
    pub fn detach(&mut self, iface: &str, hook: Hook) -> anyhow::Result<()> {
        let mut result = Ok(());
        for what in [Attachment::ingress(hook), Attachment::TcEgress] {
            let path = self.link_pin(what, iface);
            self.links.retain(|p| *p != path);
            if path.exists()
                && let Err(e) = unpin_link(&path)
            {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Moves the pins of an interface renamed from `from` to `to`: its links
    /// stay attached, under the name it has now.
    pub fn rename(&mut self, from: &str, to: &str, hook: Hook) -> anyhow::Result<()> {
        for what in [Attachment::ingress(hook), Attachment::TcEgress] {
            let (old, new) = (self.link_pin(what, from), self.link_pin(what, to));
            fs::rename(&old, &new).with_context(|| {
                format!("moving the pin {} to {}", old.display(), new.display())
            })?;
            self.links.retain(|p| *p != old);
            self.links.push(new);
        }
        Ok(())
    }

    fn link_pin(&self, what: Attachment, iface: &str) -> PathBuf {
        self.pins.join(format!("link_{}_{iface}", what.tag()))
    }

    fn attach_one(&mut self, what: Attachment, iface: &str) -> anyhow::Result<()> {
        let tag = what.tag();
        let path = self.link_pin(what, iface);
        // Kept from retirement even if attaching fails: an earlier agent's
        // link there still serves the interface.
        if !self.links.contains(&path) {
            self.links.push(path.clone());
        }
        if path.exists() {
            match self.replace_program(what, &path) {
                Ok(()) => {
                    log::info!("replaced the {tag} program on {iface} atomically");
                    return Ok(());
                }
                Err(e) => {
                    // A link whose interface went away cannot be updated.
                    log::warn!("{}: {e:#}; attaching afresh", path.display());
                    unpin_link(&path)?;
                }
            }
        }
        let link: FdLink = match what {
            Attachment::Xdp => self.attach_xdp(iface)?,
            Attachment::TcIngress => self.attach_tc(iface, TcAttachType::Ingress)?,
            Attachment::TcEgress => self.attach_tc(iface, TcAttachType::Egress)?,
        };
        link.pin(&path)
            .with_context(|| format!("pinning the link at {}", path.display()))?;
        log::info!("attached {tag} to {iface}");
        Ok(())
    }

    fn replace_program(&mut self, what: Attachment, path: &Path) -> anyhow::Result<()> {
        let link: FdLink = PinnedLink::from_pin(path)
            .context("opening the pinned link")?
            .into();
        if what == Attachment::Xdp {
            let program: &mut Xdp = self.loaded_program(what.program())?;
            program.attach_to_link(XdpLink::try_from(link)?)?;
        } else {
            let program: &mut SchedClassifier = self.loaded_program(what.program())?;
            program.attach_to_link(SchedClassifierLink::try_from(link)?)?;
        }
        Ok(())
    }

    /// Marks a link pin as this agent's, so it is not retired.
    pub(super) fn keep_link(&mut self, path: PathBuf) {
        if !self.links.contains(&path) {
            self.links.push(path);
        }
    }

    /// Detaches links pinned by an earlier agent for interfaces (or hooks)
    /// this one does not serve. A pin that cannot be removed is logged and
    /// the rest are still retired.
    pub fn retire_other_links(&self) {
        let Ok(entries) = fs::read_dir(&self.pins) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let is_link = path
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"link_"));
            if is_link && !self.links.contains(&path) {
                log::info!("detaching {}: not asked for any more", path.display());
                if let Err(e) = unpin_link(&path) {
                    log::error!("{e:#}");
                }
            }
        }
    }

    fn attach_xdp(&mut self, iface: &str) -> anyhow::Result<FdLink> {
        let program: &mut Xdp = self.loaded_program(programs::XDP)?;
        let id = program
            .attach(iface, XdpMode::default())
            .with_context(|| format!("attaching XDP to {iface}"))?;
        let link = program.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("XDP on {iface} is not a bpf_link (kernel < 5.9?)"))
    }

    fn attach_tc(&mut self, iface: &str, direction: TcAttachType) -> anyhow::Result<FdLink> {
        let name = match direction {
            TcAttachType::Egress => programs::TC_EGRESS,
            _ => programs::TC_INGRESS,
        };
        let program: &mut SchedClassifier = self.loaded_program(name)?;
        let id = program
            .attach(iface, direction)
            .with_context(|| format!("attaching TC {direction:?} to {iface}"))?;
        let link = program.take_link(id)?;
        FdLink::try_from(link)
            .with_context(|| format!("TC on {iface} is not a TCX link (kernel < 6.6?)"))
    }

    /// The program, verified and loaded into the kernel.
    fn loaded_program<'a, T>(&'a mut self, name: &str) -> anyhow::Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
        T: LoadedCheck,
    {
        let program: &mut T = self.program(name)?;
        program
            .ensure_loaded()
            .with_context(|| format!("verifying {name}"))?;
        Ok(program)
    }

    fn program<'a, T>(&'a mut self, name: &str) -> anyhow::Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?;
        program
            .try_into()
            .with_context(|| format!("program {name} has an unexpected type"))
    }
}

/// Removes every link (detaching its program) and map pinned under
/// `<bpffs>/xdproxy`, then the directory. Nothing there is not an error.
pub fn cleanup(bpffs: &Path) -> anyhow::Result<usize> {
    let pins = pin_dir(bpffs);
    let Ok(entries) = fs::read_dir(&pins) else {
        return Ok(0);
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // Links first, so no program runs against maps being removed.
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"link_"))
    });
    let mut removed = 0;
    for path in paths {
        let is_link = path
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"link_"));
        if is_link {
            unpin_link(&path)?;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        removed += 1;
    }
    fs::remove_dir(&pins).with_context(|| format!("removing {}", pins.display()))?;
    Ok(removed)
}

fn unpin_link(path: &Path) -> anyhow::Result<()> {
    let link = PinnedLink::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = link
        .unpin()
        .with_context(|| format!("unpinning {}", path.display()))?;
    // The kernel detaches the program when the last reference goes.
    drop(fd);
    Ok(())
}

/// The programs `hooks` need: each one's ingress program and the new-flow
/// program it tail-calls, and the egress program every interface has.
pub fn programs_for(hooks: &[Hook]) -> Vec<&'static str> {
    let mut names = Vec::new();
    for hook in hooks {
        let (ingress, new_flow) = match hook {
            Hook::Xdp => (programs::XDP, programs::XDP_NEW),
            Hook::Tc => (programs::TC_INGRESS, programs::TC_NEW),
        };
        names.extend([ingress, new_flow, programs::TC_EGRESS]);
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// Every hook, so every program an interface may need.
pub const ALL_HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

/// Puts the new-flow programs that are loaded where the XDP and TC ingress
/// programs tail-call them; an ingress program is loaded only with its
/// new-flow program (`programs_for`). Without them, new flows would be
/// forwarded without conntrack entries (and counted as `ct_insert_failed`).
pub fn set_new_flow_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let slots = [
        (names::XDP_NEW_FLOW, programs::XDP_NEW),
        (names::TC_NEW_FLOW, programs::TC_NEW),
    ];
    for (array, name) in slots {
        let program = ebpf
            .program(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?;
        let Ok(fd) = program.fd() else {
            continue;
        };
        let fd = fd
            .try_clone()
            .with_context(|| format!("the fd of {name}"))?;
        let map = ebpf
            .map_mut(array)
            .with_context(|| format!("the eBPF object has no map {array}"))?;
        ProgramArray::try_from(map)?
            .set(0, &fd, 0)
            .with_context(|| format!("putting {name} into {array}"))?;
    }
    Ok(())
}

/// Loading a program once, whichever its type.
/// Loads (verifies) an XDP or TC program unless an earlier call did.
fn ensure_loaded(name: &str, program: &mut Program) -> anyhow::Result<()> {
    let loaded = match program {
        Program::Xdp(p) => p.ensure_loaded(),
        Program::SchedClassifier(p) => p.ensure_loaded(),
        _ => anyhow::bail!("program {name} has an unexpected type"),
    };
    loaded.with_context(|| format!("verifying {name}"))
}

pub trait LoadedCheck {
    fn ensure_loaded(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl LoadedCheck for Xdp {
    fn ensure_loaded(&mut self) -> Result<(), aya::programs::ProgramError> {
        if self.fd().is_err() {
            self.load()?;
        }
        Ok(())
    }
}

impl LoadedCheck for SchedClassifier {
    fn ensure_loaded(&mut self) -> Result<(), aya::programs::ProgramError> {
        if self.fd().is_err() {
            self.load()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: ConntrackSizes = ConntrackSizes {
        entries: 4096,
        overflow: 2048,
    };

    #[test]
    fn a_hook_needs_its_ingress_and_new_flow_programs_and_egress() {
        assert!(programs_for(&[]).is_empty());
        let mut tc = vec![programs::TC_INGRESS, programs::TC_NEW, programs::TC_EGRESS];
        tc.sort_unstable();
        assert_eq!(programs_for(&[Hook::Tc]), tc);
        let mut xdp = vec![programs::XDP, programs::XDP_NEW, programs::TC_EGRESS];
        xdp.sort_unstable();
        assert_eq!(programs_for(&[Hook::Xdp]), xdp);
        let all = programs_for(&ALL_HOOKS);
        assert_eq!(all.len(), 5, "{all:?}");
        assert_eq!(programs_for(&[Hook::Tc, Hook::Xdp, Hook::Tc]), all);
    }

    #[test]
    fn the_overflow_maps_are_conntrack_maps_sized_by_their_flag() {
        let ct4 = (size_of::<Ct4Key>() as u32, size_of::<Ct4Entry>() as u32);
        let ct6 = (size_of::<Ct6Key>() as u32, size_of::<Ct6Entry>() as u32);
        assert_eq!(layout(names::CT4_GROUPS, SIZES), Some((4, 392, 1025)));
        assert_eq!(layout(names::OVERFLOW4, SIZES), Some((ct4.0, ct4.1, 2048)));
        assert_eq!(layout(names::CT6_GROUPS, SIZES), Some((4, 680, 1025)));
        assert_eq!(layout(names::OVERFLOW6, SIZES), Some((ct6.0, ct6.1, 2048)));
        assert_eq!(layout(names::OVERFLOWED, SIZES), Some((4, 4, 1)));
    }

    /// The maps of the one-entry conntrack: arrays indexed by service id,
    /// and a flag. A datapath pinned before them has none of them: the
    /// loader creates them then (no pin to check).
    #[test]
    fn the_reverse_nat_maps_and_the_pairs_flag_have_their_layouts() {
        assert_eq!(layout(names::PAIRED, SIZES), Some((4, 4, 2)));
        let frontends = [
            (names::REV_NAT4, size_of::<Frontend4>()),
            (names::REV_NAT6, size_of::<Frontend6>()),
        ];
        for (name, value) in frontends {
            let want = (4, value as u32, MAX_SERVICES);
            assert_eq!(layout(name, SIZES), Some(want), "{name}");
            assert_eq!(fit(name, want, want, SIZES), Fit::Expected, "{name}");
            let smaller = (4, value as u32, MAX_SERVICES / 2);
            assert_eq!(fit(name, smaller, want, SIZES), Fit::Mismatch, "{name}");
        }
        for name in [names::PAIRED, names::REV_NAT4, names::REV_NAT6] {
            assert!(names::ALL.contains(&name), "{name} is pinned");
        }
        let missing = std::env::temp_dir().join(format!("xdproxy-loader-{}", std::process::id()));
        assert!(matches!(
            check_pinned_layout(names::PAIRED, &missing.join(names::PAIRED), SIZES),
            Ok(false)
        ));
    }

    #[test]
    fn the_sized_maps_are_maps_of_the_object() {
        for (name, _) in SIZES.by_map() {
            assert!(names::ALL.contains(&name), "{name}");
        }
    }

    #[test]
    fn conntrack_maps_of_another_size_are_adopted_and_nothing_else() {
        for name in [
            names::CT4_GROUPS,
            names::CT6_GROUPS,
            names::OVERFLOW4,
            names::OVERFLOW6,
        ] {
            let Some(want) = layout(name, SIZES) else {
                panic!("{name} has a layout");
            };
            assert_eq!(fit(name, want, want, SIZES), Fit::Expected, "{name}");
            let bigger = (want.0, want.1, 2 * want.2);
            assert_eq!(fit(name, bigger, want, SIZES), Fit::Resized, "{name}");
            let other_value = (want.0, want.1 + 4, want.2);
            assert_eq!(fit(name, other_value, want, SIZES), Fit::Mismatch, "{name}");
        }
        let flag = (4, 4, 1);
        assert_eq!(fit(names::OVERFLOWED, flag, flag, SIZES), Fit::Expected);
        assert_eq!(
            fit(names::OVERFLOWED, (4, 4, 2), flag, SIZES),
            Fit::Mismatch,
            "only the flags' maps change size"
        );
    }
}
