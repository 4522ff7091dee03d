//! Conntrack garbage collection against real maps: the object loaded with
//! its maps pinned in a private bpffs, entries written straight into
//! `ct4`/`ct6` with ages relative to the kernel's coarse clock, one pass run
//! through the agent's own `Gc`, and what remains read back. And
//! `--conntrack-max`: the size the maps are created with, and a pinned map
//! of another size adopted as it is.

mod common;

use std::{
    collections::HashSet,
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context, ensure};
use aya::maps::{Array, MapData, MapInfo};
use proxy_agent::{
    conntrack::{Gc, Timeouts},
    datapath::{self, loader},
    datapath::{
        conntrack::{CtKey, Table, now},
        ctstore::CtTables,
        pinned::Pins,
    },
};
use proxy_common::{
    Addr6, CT_AT_EGRESS, CT_FORWARD, CT_GROUP, CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_OUTWARD,
    CT_REPLY, CT_REWRITE_DST, CT_SOCKET, CT_SOURCE_NAT, CT_STATE_ESTABLISHED, CT_STATE_FIN,
    CT_STATE_OPEN, CT_STATE_RST, CT_STATE_SYN, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, IPPROTO_TCP,
    IPPROTO_UDP, MAX_SERVICES, ct_lines, names,
};

/// Short timeouts, so that "expired" needs only minutes of uptime.
const TIMEOUTS: Timeouts = Timeouts {
    tcp_syn: 20,
    tcp_established: 100,
    tcp_fin: 5,
    tcp_rst: 5,
    udp: 30,
    other: 50,
};
const SIZE: u32 = 4096;
/// The most seconds before now an entry here was last seen.
const OLDEST: u32 = 200;

/// The datapath's clock, once the machine has been up longer than `age`:
/// entries that old cannot be stamped earlier (seconds since boot), so on a
/// machine that has just booted the test waits instead of failing.
fn uptime_past(age: u32) -> anyhow::Result<u32> {
    let up = now()?;
    if up <= age {
        eprintln!("the machine booted {up} s ago; waiting until {age} s");
        std::thread::sleep(std::time::Duration::from_secs(u64::from(age + 1 - up)));
    }
    let now = now()?;
    ensure!(
        now > age,
        "the clock reads {now} s after waiting past {age} s"
    );
    Ok(now)
}

/// The object loaded with its maps pinned under a bpffs of its own, in a
/// scratch directory; dropping it removes the pins, unmounts and deletes
/// the directory, whether the test passed or not.
struct Pinned {
    scratch: PathBuf,
    loaded: Option<loader::Loaded>,
}

impl Pinned {
    fn new(tag: &str) -> anyhow::Result<Pinned> {
        let scratch = std::env::temp_dir().join(format!("xdproxy-ct-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).context("scratch dir")?;
        Ok(Pinned {
            scratch,
            loaded: None,
        })
    }

    fn bpffs(&self) -> PathBuf {
        self.scratch.join("bpffs")
    }

    fn pin(&self, name: &str) -> PathBuf {
        loader::pin_dir(&self.bpffs()).join(name)
    }

    /// The map pinned as `name`, opened as the agent opens it.
    fn map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        &self,
        name: &str,
    ) -> anyhow::Result<T> {
        Pins::at(&self.bpffs()).map(name)
    }

    /// Loads (or reloads, adopting the pins) with `--conntrack-max SIZE`.
    fn load(&mut self, conntrack_max: u32) -> anyhow::Result<&mut loader::Loaded> {
        self.loaded = None;
        let sizes = loader::ConntrackSizes {
            entries: conntrack_max,
            ..loader::ConntrackSizes::default()
        };
        let loaded = loader::load(&self.bpffs(), datapath::object()?, sizes)?;
        Ok(self.loaded.insert(loaded))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.loaded = None;
        let bpffs = self.bpffs();
        if let Err(e) = loader::cleanup(&bpffs) {
            eprintln!("removing the pins: {e:#}");
        }
        if let Ok(c) = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid path; failure (never mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn v4(a: [u8; 4]) -> u32 {
    u32::from(Ipv4Addr::from(a)).to_be()
}

fn v6(text: &str) -> Addr6 {
    let octets = text.parse::<Ipv6Addr>().map_or([0; 16], |a| a.octets());
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// An entry to write: its name (for messages), key, value, and whether one
/// pass must keep it.
struct Case<K, V> {
    name: &'static str,
    key: K,
    value: V,
    keep: bool,
}

/// A flow's entries, built from its endpoints and the coarse clock.
struct Flow4 {
    client: (u32, u16),
    frontend: (u32, u16),
    backend: (u32, u16),
    proto: u8,
    backend_id: u32,
    now: u32,
}

impl Flow4 {
    fn key(&self, src: (u32, u16), dst: (u32, u16), direction: u8) -> Ct4Key {
        Ct4Key {
            src_addr: src.0,
            dst_addr: dst.0,
            src_port: src.1.to_be(),
            dst_port: dst.1.to_be(),
            proto: self.proto,
            direction,
            _pad: 0,
        }
    }

    fn value(&self, nat: (u32, u16), flags: u16, idle: u32, state: u8, active: bool) -> Ct4Entry {
        Ct4Entry {
            nat_addr: nat.0,
            nat_port: nat.1.to_be(),
            flags,
            backend_id: self.backend_id,
            service_id: 1,
            last_seen: self.now - idle,
            state,
            reply_state: 0,
            node_port: 0,
            active: u32::from(active),
        }
    }

    fn forward(&self, idle: u32, state: u8, active: bool) -> (Ct4Key, Ct4Entry) {
        (
            self.key(self.client, self.frontend, CT_FORWARD),
            self.value(self.backend, 0, idle, state, active),
        )
    }

    fn reply(&self, flags: u16, idle: u32, state: u8) -> (Ct4Key, Ct4Entry) {
        (
            self.key(self.backend, self.client, CT_REPLY),
            self.value(self.frontend, flags, idle, state, false),
        )
    }

    /// Source NAT's pair: C -> B leaving as node:port, B -> node:port back to C.
    fn snat(&self, node: (u32, u16), idle: [u32; 2], state: u8) -> [(Ct4Key, Ct4Entry); 2] {
        [
            (
                self.key(self.client, self.backend, CT_REPLY),
                self.value(node, CT_OUTWARD, idle[0], state, false),
            ),
            (
                self.key(self.backend, node, CT_REPLY),
                self.value(self.client, CT_REWRITE_DST, idle[1], state, false),
            ),
        ]
    }
}

fn case<K, V>(name: &'static str, (key, value): (K, V), keep: bool) -> Case<K, V> {
    Case {
        name,
        key,
        value,
        keep,
    }
}

/// The IPv4 table: what each flow looks like and whether it stays.
fn ipv4_cases(now: u32) -> Vec<Case<Ct4Key, Ct4Entry>> {
    use CT_STATE_ESTABLISHED as EST;
    let node = (v4([10, 0, 0, 1]), 61_000);
    let flow = |client: u8, backend_id: u32, proto: u8| Flow4 {
        client: (v4([10, 0, 1, client]), 40_000 + u16::from(client)),
        frontend: (v4([10, 96, 0, 10]), 80),
        backend: (v4([10, 1, 1, 2]), 8080),
        proto,
        backend_id,
        now,
    };
    let (a, b, c) = (
        flow(1, 1, IPPROTO_TCP),
        flow(2, 1, IPPROTO_TCP),
        flow(3, 1, IPPROTO_TCP),
    );
    let (d, e, f) = (
        flow(4, 2, IPPROTO_UDP),
        flow(5, 3, IPPROTO_TCP),
        flow(6, 3, IPPROTO_UDP),
    );
    let (g, h, i) = (
        flow(7, 1, IPPROTO_TCP),
        flow(8, 1, IPPROTO_TCP),
        flow(9, 4, IPPROTO_TCP),
    );
    let [e_out, e_back] = e.snat(node, [OLDEST, OLDEST], EST);
    let [f_out, f_back] = f.snat((node.0, 61_001), [40, 2], CT_STATE_OPEN);
    vec![
        case("fresh forward", a.forward(1, EST, true), true),
        case("fresh reply", a.reply(0, 0, EST), true),
        case(
            "idle forward of a live pair",
            b.forward(OLDEST, EST, true),
            true,
        ),
        case("live reply", b.reply(CT_AT_EGRESS, 3, EST), true),
        case("closed forward", c.forward(10, CT_STATE_FIN, false), false),
        case("closed reply", c.reply(0, 10, CT_STATE_FIN), false),
        case(
            "idle udp forward",
            d.forward(40, CT_STATE_OPEN, true),
            false,
        ),
        case("idle udp reply", d.reply(0, 40, CT_STATE_OPEN), false),
        case("snat forward", e.forward(OLDEST, EST, true), false),
        case("snat reply", e.reply(CT_AT_EGRESS, OLDEST, EST), false),
        case("snat out", e_out, false),
        case("snat back", e_back, false),
        case(
            "live snat forward",
            f.forward(40, CT_STATE_OPEN, true),
            true,
        ),
        case(
            "live snat reply",
            f.reply(CT_AT_EGRESS, 40, CT_STATE_OPEN),
            true,
        ),
        case("live snat out", f_out, true),
        case("live snat back", f_back, true),
        case("orphan reply", g.reply(0, 10, CT_STATE_FIN), false),
        case("young syn", h.forward(10, CT_STATE_SYN, true), true),
        case("reset forward", i.forward(10, CT_STATE_RST, true), false),
        case("reset peer", i.reply(0, 10, EST), false),
    ]
}

fn ipv6_cases(now: u32) -> Vec<Case<Ct6Key, Ct6Entry>> {
    let key = |src: (&str, u16), dst: (&str, u16), proto: u8, direction: u8| Ct6Key {
        src_addr: v6(src.0),
        dst_addr: v6(dst.0),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        proto,
        direction,
        _pad: 0,
    };
    let value = |nat: (&str, u16), idle: u32, state: u8, backend_id: u32, active: bool| Ct6Entry {
        nat_addr: v6(nat.0),
        nat_port: nat.1.to_be(),
        flags: 0,
        backend_id,
        service_id: 2,
        last_seen: now - idle,
        state,
        reply_state: 0,
        node_port: 0,
        active: u32::from(active),
    };
    let (c1, c2, f, b) = (
        ("fd00:1::2", 40_001),
        ("fd00:1::3", 40_002),
        ("fd00:96::10", 53),
        ("fd00:2::2", 5353),
    );
    let udp = IPPROTO_UDP;
    let tcp = IPPROTO_TCP;
    vec![
        Case {
            name: "fresh udp forward",
            key: key(c1, f, udp, CT_FORWARD),
            value: value(b, 5, CT_STATE_OPEN, 5, true),
            keep: true,
        },
        Case {
            name: "fresh udp reply",
            key: key(b, c1, udp, CT_REPLY),
            value: value(f, 5, CT_STATE_OPEN, 5, false),
            keep: true,
        },
        Case {
            name: "stale syn forward",
            key: key(c2, (f.0, 80), tcp, CT_FORWARD),
            value: value((b.0, 8080), 30, CT_STATE_SYN, 5, true),
            keep: false,
        },
        Case {
            name: "stale syn reply",
            key: key((b.0, 8080), c2, tcp, CT_REPLY),
            value: value((f.0, 80), 30, CT_STATE_SYN, 5, false),
            keep: false,
        },
    ]
}

/// Writes the cases into the map; the keys that must remain.
fn write<K: CtKey>(
    tables: &mut CtTables<K>,
    cases: &[Case<K, K::Value>],
) -> anyhow::Result<HashSet<K>> {
    for c in cases {
        (tables.insert(Table::Main, c.key, c.value))
            .with_context(|| format!("writing {}", c.name))?;
    }
    Ok(cases.iter().filter(|c| c.keep).map(|c| c.key).collect())
}

fn remaining<K: CtKey>(tables: &CtTables<K>) -> anyhow::Result<HashSet<K>> {
    Ok(tables.entries(Table::Main)?.into_keys().collect())
}

impl Pinned {
    /// A family's conntrack tables, opened as the agent opens them.
    fn ct<K: CtKey>(&self) -> anyhow::Result<CtTables<K>> {
        CtTables::open(&Pins::at(&self.bpffs()))
    }
}

/// Names of the cases whose keys are in `keys`.
fn names_of<K: Eq + Hash, V>(cases: &[Case<K, V>], keys: &HashSet<K>) -> Vec<&'static str> {
    cases
        .iter()
        .filter(|c| keys.contains(&c.key))
        .map(|c| c.name)
        .collect()
}

#[test]
fn a_pass_deletes_expired_flows_whole_and_reaps_their_connections() -> anyhow::Result<()> {
    if !common::ready("a_pass_deletes_expired_flows_whole_and_reaps_their_connections") {
        return Ok(());
    }
    let mut pinned = Pinned::new("gc")?;
    pinned.load(SIZE)?;
    let now = uptime_past(OLDEST)?;
    let cases4 = ipv4_cases(now);
    let cases6 = ipv6_cases(now);
    let mut ct4 = pinned.ct::<Ct4Key>()?;
    let mut ct6 = pinned.ct::<Ct6Key>()?;
    let keep4 = write(&mut ct4, &cases4)?;
    let keep6 = write(&mut ct6, &cases6)?;
    let mut reaped: Array<MapData, u32> = pinned.map(names::REAPED)?;
    // Earlier passes' counts are added to, not replaced.
    reaped.set(3, 5, 0)?;

    let mut gc = Gc::open(&pinned.bpffs(), TIMEOUTS)?;
    let stats = gc.pass()?;

    let left4 = remaining(&ct4)?;
    let left6 = remaining(&ct6)?;
    assert_eq!(
        names_of(&cases4, &left4),
        names_of(&cases4, &keep4),
        "IPv4 entries left"
    );
    assert_eq!(left4, keep4);
    assert_eq!(
        names_of(&cases6, &left6),
        names_of(&cases6, &keep6),
        "IPv6 entries left"
    );
    assert_eq!(left6, keep6);
    assert_eq!(
        (stats.entries4, stats.entries6),
        (cases4.len(), cases6.len())
    );
    let deleted = cases4.len() + cases6.len() - keep4.len() - keep6.len();
    assert_eq!(stats.deleted, deleted);
    assert_eq!((stats.reaped, stats.revived), (4, 0));
    // Backend 1: its closed and live flows are not reaped; 2: the idle UDP
    // flow; 3: the source-NATed flow, on top of 5; 4: the reset connection;
    // 5: the IPv6 handshake.
    let counts: Vec<u32> = (0..=5)
        .map(|id| reaped.get(&id, 0))
        .collect::<Result<_, _>>()?;
    assert_eq!(counts, [0, 0, 1, 6, 1, 1], "lb_reaped by backend id");

    let again = gc.pass()?;
    assert_eq!(
        (again.entries4, again.entries6, again.deleted, again.reaped),
        (keep4.len(), keep6.len(), 0, 0),
        "a second pass finds nothing more"
    );
    Ok(())
}

/// The two marks of `ct_paired`, as the datapath reads them.
fn marks(pinned: &Pinned) -> anyhow::Result<[u32; 2]> {
    let flag: Array<MapData, u32> = pinned.map(names::PAIRED)?;
    Ok([
        flag.get(&CT_MARK_PAIRS, 0)?,
        flag.get(&CT_MARK_SOURCE_NAT, 0)?,
    ])
}

#[test]
fn each_mark_of_ct_paired_falls_once_its_own_entries_are_gone() -> anyhow::Result<()> {
    if !common::ready("each_mark_of_ct_paired_falls_once_its_own_entries_are_gone") {
        return Ok(());
    }
    use CT_STATE_ESTABLISHED as EST;
    let mut pinned = Pinned::new("marks")?;
    pinned.load(SIZE)?;
    let now = uptime_past(OLDEST)?;
    let flow = |client: u8| Flow4 {
        client: (v4([10, 0, 1, client]), 40_000),
        frontend: (v4([10, 96, 0, 10]), 80),
        backend: (v4([10, 1, 1, 2]), 8080),
        proto: IPPROTO_TCP,
        backend_id: 1,
        now,
    };
    let (paired, natted) = (flow(1), flow(2));
    let node = (v4([10, 0, 0, 1]), 61_000);
    // A source-NATed flow: its socket entry and its two source NAT entries.
    let socket = |idle| {
        let key = natted.key(natted.client, (0, 0), CT_SOCKET);
        let flags = CT_SOURCE_NAT | CT_AT_EGRESS;
        (key, natted.value(natted.backend, flags, idle, EST, true))
    };
    let live_nat = [
        socket(1),
        natted.snat(node, [1, 1], EST)[0],
        natted.snat(node, [1, 1], EST)[1],
    ];
    let expired_pair = [
        paired.forward(OLDEST, EST, true),
        paired.reply(0, OLDEST, EST),
    ];
    let mut ct4 = pinned.ct::<Ct4Key>()?;
    for (key, value) in live_nat.iter().chain(&expired_pair) {
        ct4.insert(Table::Main, *key, *value)?;
    }
    // As the datapath leaves them once it wrote such entries.
    let mut flag: Array<MapData, u32> = pinned.map(names::PAIRED)?;
    flag.set(CT_MARK_PAIRS, 1, 0)?;
    flag.set(CT_MARK_SOURCE_NAT, 1, 0)?;

    let mut gc = Gc::open(&pinned.bpffs(), TIMEOUTS)?;
    let stats = gc.pass()?;
    assert_eq!((stats.paired, stats.source_nat), (false, true));
    assert_eq!(
        marks(&pinned)?,
        [0, 1],
        "the pair went, the source NAT flow lives"
    );
    assert_eq!(remaining(&ct4)?.len(), 3);

    // The source-NATed flow expires too.
    let old = natted.snat(node, [OLDEST, OLDEST], EST);
    for (key, value) in [socket(OLDEST), old[0], old[1]] {
        ct4.insert(Table::Main, key, value)?;
    }
    let stats = gc.pass()?;
    assert_eq!((stats.paired, stats.source_nat), (false, false));
    assert_eq!(marks(&pinned)?, [0, 0]);
    assert!(remaining(&ct4)?.is_empty());
    Ok(())
}

/// `n` one-entry UDP flows to backend `backend_id`, each from a client of
/// its own; every other one idle past the UDP timeout. Each with whether a
/// pass keeps it.
fn udp_flows(n: u32, backend_id: u32, now: u32) -> Vec<(Ct4Key, Ct4Entry, bool)> {
    (0..n)
        .map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            let flow = Flow4 {
                client: (v4([10, a, b, c]), 40_000),
                frontend: (v4([10, 96, 0, 10]), 53),
                backend: (v4([10, 1, 1, 2]), 5353),
                proto: IPPROTO_UDP,
                backend_id,
                now,
            };
            let keep = i % 2 == 1;
            let idle = if keep { 0 } else { TIMEOUTS.udp + 30 };
            let (key, value) = flow.forward(idle, CT_STATE_OPEN, true);
            (key, value, keep)
        })
        .collect()
}

/// More entries than one batch read returns: a pass still reads each once
/// and deletes exactly the expired ones.
#[test]
fn a_pass_reads_every_entry_of_a_large_map() -> anyhow::Result<()> {
    if !common::ready("a_pass_reads_every_entry_of_a_large_map") {
        return Ok(());
    }
    const FLOWS: u32 = 5_000;
    const BACKEND: u32 = 9;
    let mut pinned = Pinned::new("many")?;
    // Lines enough that no group of eight runs full.
    pinned.load(4 * SIZE)?;
    let now = uptime_past(OLDEST)?;
    let flows = udp_flows(FLOWS, BACKEND, now);
    let mut ct4 = pinned.ct::<Ct4Key>()?;
    for (key, value, _) in &flows {
        ct4.insert(Table::Main, *key, *value)?;
    }
    let keep: HashSet<Ct4Key> = flows.iter().filter(|f| f.2).map(|f| f.0).collect();

    let stats = Gc::open(&pinned.bpffs(), TIMEOUTS)?.pass()?;

    let expired = flows.len() - keep.len();
    assert_eq!(stats.entries4, flows.len(), "entries read");
    assert_eq!((stats.deleted, stats.revived), (expired, 0));
    assert_eq!(stats.reaped, expired as u64);
    assert!(
        remaining(&ct4)? == keep,
        "the live entries, and only they, are left"
    );
    let reaped: Array<MapData, u32> = pinned.map(names::REAPED)?;
    assert_eq!(reaped.get(&BACKEND, 0)?, expired as u32);
    Ok(())
}

#[test]
fn conntrack_max_sizes_the_maps_and_a_pinned_size_is_kept() -> anyhow::Result<()> {
    if !common::ready("conntrack_max_sizes_the_maps_and_a_pinned_size_is_kept") {
        return Ok(());
    }
    let mut pinned = Pinned::new("max")?;
    pinned.load(SIZE)?;
    let sizes = |pinned: &Pinned| -> anyhow::Result<[u32; 3]> {
        let max = |name: &str| MapInfo::from_pin(pinned.pin(name)).map(|i| i.max_entries());
        Ok([
            max(names::CT4_GROUPS)?,
            max(names::CT6_GROUPS)?,
            max(names::SERVICES4)?,
        ])
    };
    // The groups keys hash to, and the seed's.
    let groups = ct_lines(SIZE) / CT_GROUP + 1;
    assert_eq!(sizes(&pinned)?, [groups, groups, MAX_SERVICES]);

    // An open connection in the pinned map...
    let mut ct4 = pinned.ct::<Ct4Key>()?;
    let now = now()?;
    let (key, value) = ipv4_cases(now)
        .into_iter()
        .next()
        .map(|c| (c.key, c.value))
        .context("a case")?;
    ct4.insert(Table::Main, key, value)?;
    drop(ct4);
    // ... survives an agent asking for another size, which gets the old
    // one, and its programs find the entries where they are.
    pinned.load(2 * SIZE)?;
    assert_eq!(sizes(&pinned)?, [groups, groups, MAX_SERVICES]);
    let ct4 = pinned.ct::<Ct4Key>()?;
    assert_eq!(ct4.main.get(&key)?, Some(value), "the pinned entry is kept");
    Ok(())
}
