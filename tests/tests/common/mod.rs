//! The datapath loaded in this process (no pins, no interfaces), programmed
//! through the agent's own model and reconciler, and run with
//! BPF_PROG_TEST_RUN.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use proxy_agent::kinds::{EndpointSlice, Service};
use proxy_agent::{
    datapath::{self, loader, maps::MapSet},
    model::{self, Desired, ObjectKey, Objects},
    reconcile::Reconciler,
};
use proxy_common::{Counter, MAX_BACKENDS, MAX_SERVICES, programs};

pub mod both;
pub mod packets;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The ingress hooks a packet can be run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

pub const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

impl Hook {
    /// The verdict that lets a packet through.
    pub fn passed(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::Tc => TC_ACT_OK,
        }
    }

    /// The verdict that drops a packet.
    pub fn dropped(self) -> u32 {
        match self {
            Hook::Xdp => XDP_DROP,
            Hook::Tc => TC_ACT_SHOT,
        }
    }
}

/// True when a datapath test can run: root, and an agent built with its eBPF
/// object. Under CI=true a missing one is a failure; elsewhere the test says
/// loudly that it did not run.
pub fn ready(test: &str) -> bool {
    if !proxy_tests::privilege::require_root(test) {
        return false;
    }
    if datapath::OBJECT.is_empty() {
        let why = "needs the eBPF object: run the tests with `cargo xtask test`";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test} {why}; CI=true, so this is a failure, not a skip");
        }
        eprintln!("NOT RUN: {test} {why}");
        return false;
    }
    true
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub maps: MapSet,
    pub reconciler: Reconciler,
}

/// Every XDP and TC program of the object.
pub const ALL_PROGRAMS: [&str; 7] = [
    programs::XDP,
    programs::XDP_NEW,
    programs::TC_NEW,
    programs::XDP_EMPTY,
    programs::XDP_BENCH,
    programs::TC_INGRESS,
    programs::TC_EGRESS,
];

impl Loaded {
    pub fn new() -> anyhow::Result<Loaded> {
        Self::load(&mut EbpfLoader::new(), &ALL_PROGRAMS)
    }

    /// For the datapath benchmark: also its conntrack micro-benchmarks, with
    /// their map sized as `ct4`.
    pub fn for_bench() -> anyhow::Result<Loaded> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(proxy_common::names::BENCH_CT, proxy_common::MAX_CONNTRACK);
        loader.map_max_entries(
            proxy_common::names::BENCH_CT_HIT,
            proxy_common::MAX_CONNTRACK,
        );
        let mut names = ALL_PROGRAMS.to_vec();
        names.extend([
            programs::XDP_BENCH_CT_LOOKUP,
            programs::XDP_BENCH_CT_LOOKUP_INSERT,
            programs::XDP_BENCH_CT_INSERT,
            programs::XDP_BENCH_CT_HIT,
            programs::XDP_BENCH_LINES_LOOKUP,
            programs::XDP_BENCH_LINES_LOOKUP_INSERT,
            programs::XDP_BENCH_LINES_HIT,
        ]);
        Self::load(&mut loader, &names)
    }

    /// With the conntrack maps of both families sized as given and their
    /// hash seeded (as the agent's loader does), and only the programs
    /// named verified.
    pub fn with_conntrack(max: u32, overflow_max: u32, names: &[&str]) -> anyhow::Result<Loaded> {
        let sizes = loader::ConntrackSizes {
            entries: max,
            overflow: overflow_max,
        };
        let mask = sizes.groups_mask(None);
        let seed = [0x5eed, 1, 2, 3];
        let keys = proxy_common::ct_hash_keys(seed);
        let mut ebpf_loader = EbpfLoader::new();
        sizes.apply(&mut ebpf_loader, &mask, &keys);
        let loaded = Self::load(&mut ebpf_loader, names)?;
        loader::seed_tables(&loaded.ebpf, seed)?;
        Ok(loaded)
    }

    /// As a datapath the agent creates at start (nothing pinned before):
    /// its maps taken as such, only the new-flow programs verified.
    pub fn created_now() -> anyhow::Result<Loaded> {
        Self::load_as(&mut EbpfLoader::new(), &[], false)
    }

    fn load(loader: &mut EbpfLoader, names: &[&str]) -> anyhow::Result<Loaded> {
        Self::load_as(loader, names, true)
    }

    /// `adopted`: as `MapSet::take` has it.
    fn load_as(loader: &mut EbpfLoader, names: &[&str], adopted: bool) -> anyhow::Result<Loaded> {
        let mut ebpf = loader
            .load(datapath::object()?)
            .context("loading the eBPF object")?;
        // New flows continue in these, whichever hook is tested.
        let new_flow = [programs::XDP_NEW, programs::TC_NEW];
        let wanted = names
            .iter()
            .chain(new_flow.iter().filter(|n| !names.contains(n)));
        for name in wanted {
            let program = ebpf.program_mut(name).with_context(|| name.to_string())?;
            match program {
                aya::programs::Program::Xdp(xdp) => xdp.load(),
                aya::programs::Program::SchedClassifier(tc) => tc.load(),
                _ => bail!("{name} is neither XDP nor TC"),
            }
            .with_context(|| format!("verifying {name}"))?;
        }
        loader::set_new_flow_programs(&mut ebpf)?;
        let maps = MapSet::take(&mut ebpf, Duration::from_secs(86_400), adopted)?;
        Ok(Loaded {
            ebpf,
            maps,
            reconciler: Reconciler::new(MAX_SERVICES, MAX_BACKENDS),
        })
    }

    pub fn program(&mut self, desired: &Desired) -> anyhow::Result<()> {
        let report = self.reconciler.apply(desired.clone(), &mut self.maps);
        if !report.errors.is_empty() {
            bail!("programming failed: {:?}", report.errors);
        }
        Ok(())
    }

    /// Programs the maps from Kubernetes YAML, through the model.
    pub fn program_yaml(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.program(&model::desired(&objects(yaml)?))
    }

    /// As `program_yaml`, for node `name` with these addresses.
    pub fn program_node(
        &mut self,
        yaml: &str,
        name: &str,
        addresses: &[std::net::IpAddr],
    ) -> anyhow::Result<()> {
        let mut objects = objects(yaml)?;
        objects.node.name = Some(name.into());
        objects.node.addresses = addresses.to_vec();
        self.program(&model::desired(&objects))
    }

    /// (return value, packet out, kernel-measured ns) of one XDP run.
    pub fn xdp_named(&self, name: &str, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>, u64)> {
        self.xdp_repeat(name, packet, 1)
    }

    /// As `xdp_named`, `repeat` times over the same input; ns is per run.
    pub fn xdp_repeat(
        &self,
        name: &str,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(u32, Vec<u8>, u64)> {
        let prog: &Xdp = self
            .ebpf
            .program(name)
            .with_context(|| name.to_string())?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 512];
        let mut opts = options(packet, &mut out);
        opts.repeat = repeat;
        let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        Ok(finish(result, out))
    }

    pub fn xdp(&self, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.xdp_named(programs::XDP, packet)
            .map(|(r, p, _)| (r, p))
    }

    pub fn tc(&self, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.tc_named(programs::TC_INGRESS, packet)
    }

    pub fn tc_egress(&self, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        self.tc_named(programs::TC_EGRESS, packet)
    }

    /// The hook's verdict and packet out, whatever they are.
    pub fn run(&self, hook: Hook, packet: &[u8]) -> (u32, Vec<u8>) {
        match hook {
            Hook::Xdp => self.xdp(packet),
            Hook::Tc => self.tc(packet),
        }
        .unwrap_or_else(|e| panic!("{hook:?} test run of a {}-byte packet: {e:#}", packet.len()))
    }

    /// Runs the hook, which must pass the packet on.
    pub fn pass(&self, hook: Hook, packet: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run(hook, packet);
        assert_eq!(verdict, hook.passed(), "{hook:?} must pass the packet on");
        out
    }

    /// Runs the egress program, which must pass the packet on.
    pub fn egress(&self, packet: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.tc_egress(packet).expect("egress run");
        assert_eq!(verdict, TC_ACT_OK, "egress");
        out
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.maps.counter(counter).expect("counter")
    }

    fn tc_named(&self, name: &str, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self.ebpf.program(name).context("tc")?.try_into()?;
        let mut out = vec![0u8; packet.len() + 512];
        let result = prog
            .test_run(options(packet, &mut out))
            .context("BPF_PROG_TEST_RUN")?;
        let (ret, packet, _) = finish(result, out);
        Ok((ret, packet))
    }
}

/// One run, packet restored: the kernel copies `input` in afresh each call.
fn options<'a>(input: &'a [u8], output: &'a mut [u8]) -> TestRunOptions<'a> {
    TestRunOptions {
        data_in: Some(input),
        data_out: Some(output),
        repeat: 1,
        ..Default::default()
    }
}

fn finish(result: TestRunResult, mut out: Vec<u8>) -> (u32, Vec<u8>, u64) {
    out.truncate(result.data_size_out as usize);
    (result.return_value, out, result.duration.as_nanos() as u64)
}

/// Services and EndpointSlices from a multi-document YAML string.
pub fn objects(yaml: &str) -> anyhow::Result<Objects> {
    use serde::Deserialize;
    let mut out = Objects::default();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let meta = value.get("metadata").context("metadata")?;
        let key = ObjectKey {
            namespace: meta
                .get("namespace")
                .and_then(|v| v.as_str())
                .unwrap_or("default")
                .into(),
            name: meta
                .get("name")
                .and_then(|v| v.as_str())
                .context("name")?
                .into(),
        };
        match kind.as_str() {
            "Service" => {
                out.services
                    .insert(key, serde_yaml::from_value::<Service>(value)?);
            }
            "EndpointSlice" => {
                out.slices
                    .insert(key, serde_yaml::from_value::<EndpointSlice>(value)?);
            }
            other => bail!("unexpected kind {other}"),
        }
    }
    Ok(out)
}

/// CRC32c, bit by bit: the reference for SCTP checksums.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Fills every line of a family's own conntrack table with `value` under
/// keys of flows that never come (`key(i)` for i = 0, 1, ...: keys land in
/// groups by hash, so more keys than lines are tried); their keys.
#[allow(dead_code)]
pub fn fill_lines<K: proxy_agent::datapath::conntrack::CtKey>(
    tables: &proxy_agent::datapath::ctstore::CtTables<K>,
    key: impl Fn(u32) -> K,
    value: K::Value,
) -> Vec<K> {
    let lines = tables.main.lines();
    let mut keys = Vec::new();
    for i in 0..64 * lines as u32 {
        if keys.len() == lines {
            break;
        }
        if tables.main.insert(key(i), value).expect("mapped").is_ok() {
            keys.push(key(i));
        }
    }
    assert_eq!(keys.len(), lines, "every line of the table filled");
    keys
}
