//! kube-proxy's rule sets, for the side-by-side benchmark: the same Services
//! written as kube-proxy's iptables mode writes them (for
//! `iptables-restore`, legacy or nft) and as its nftables mode does (for
//! `nft -f`), and loaded with the system's tools inside a namespace.
//!
//! The layouts follow kube-proxy's: in iptables mode a `KUBE-SERVICES`
//! chain with one rule per Service port, walked in order, each jumping to
//! a `KUBE-SVC-*` chain that picks an endpoint with `statistic` rules and
//! jumps to its `KUBE-SEP-*` chain, which DNATs; in nftables mode a
//! `service-ips` verdict map from address, protocol and port to a
//! per-Service chain that picks an endpoint with `numgen random` and a
//! verdict map. Both mark hairpin and off-cluster traffic for masquerade
//! as kube-proxy does. Chain names are derived from the Service and
//! endpoint the way kube-proxy's are meant to be (stable, unique), not
//! with its exact hash.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

use crate::netns::Netns;

/// The pod network kube-proxy is told (`--cluster-cidr`): traffic from
/// elsewhere to a Service is masqueraded. It holds the bench's client
/// (10.0.1.2), which stands for a pod, as xdproxy treats it: a pod's
/// connection to a cluster IP keeps its source address. (Masqueraded, each
/// endpoint would have only the node's ports for every client, and
/// conntrack keeps a port for 120 s after a close.)
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// One Service port and its ready endpoints.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    fn id(&self) -> String {
        format!("{}/{}:tcp", self.namespace, self.name)
    }
}

/// Which of kube-proxy's rule sets, loaded by which tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::IptablesLegacy, Mode::IptablesNft, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesNft => "iptables-nft",
            Mode::Nftables => "nftables",
        }
    }

    /// The program that loads this mode's rules from standard input, as
    /// kube-proxy runs it (`--noflush` for the restores), or replacing the
    /// tables the rules name.
    fn loader(self, noflush: bool) -> (&'static str, &'static [&'static str]) {
        match (self, noflush) {
            (Mode::IptablesLegacy, true) => ("iptables-legacy-restore", &["--noflush"]),
            (Mode::IptablesLegacy, false) => ("iptables-legacy-restore", &[]),
            (Mode::IptablesNft, true) => ("iptables-nft-restore", &["--noflush"]),
            (Mode::IptablesNft, false) => ("iptables-nft-restore", &[]),
            (Mode::Nftables, _) => ("nft", &["-f", "-"]),
        }
    }

    /// The rules for `services`, as this mode's loader reads them.
    pub fn rules(self, services: &[ServicePort]) -> String {
        match self {
            Mode::IptablesLegacy | Mode::IptablesNft => iptables_restore(services),
            Mode::Nftables => nft_script(services),
        }
    }

    /// Loads `rules` into `ns` with this mode's tool, as kube-proxy's
    /// first full sync does (`--noflush`, as kube-proxy restores): the time
    /// the tool took, or None if it had not finished within `limit` (it is
    /// killed then).
    pub fn load(
        self,
        ns: &Netns,
        rules: &str,
        limit: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        self.run_loader(true, ns, rules, limit)
    }

    /// Puts `rules` into `ns` for traffic to go through, the quickest way
    /// the tool has: the iptables restores replace the nat table instead of
    /// merging into it, which is the same result in a namespace that holds
    /// nothing else (and `iptables-nft-restore --noflush` is quadratic in
    /// the number of chains). nftables' rules go on top of what is there:
    /// `flush` first when reloading.
    pub fn install(self, ns: &Netns, rules: &str) -> anyhow::Result<Duration> {
        const INSTALL_LIMIT: Duration = Duration::from_secs(600);
        self.run_loader(false, ns, rules, INSTALL_LIMIT)?
            .with_context(|| format!("{} took over {INSTALL_LIMIT:?}", self.name()))
    }

    fn run_loader(
        self,
        noflush: bool,
        ns: &Netns,
        rules: &str,
        limit: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let (program, args) = self.loader(noflush);
        let started = Instant::now();
        let mut child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        // Written from a thread: a slow loader reads its input as it goes,
        // and the limit must hold while it does.
        let mut stdin = child.stdin.take().context("loader stdin")?;
        let text = rules.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
        while child.try_wait()?.is_none() {
            if started.elapsed() > limit {
                child
                    .kill()
                    .with_context(|| format!("stopping {program}"))?;
                child.wait()?;
                let _ = writer.join();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the thread writing to {program} panicked"))?
            .with_context(|| format!("writing rules to {program}"))?;
        let took = started.elapsed();
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Some(took))
    }

    /// Removes what `load` put into `ns`.
    pub fn flush(self, ns: &Netns) -> anyhow::Result<()> {
        let (program, args): (&str, &[&str]) = match self {
            Mode::IptablesLegacy => ("iptables-legacy", &["-t", "nat", "-F"]),
            Mode::IptablesNft => ("iptables-nft", &["-t", "nat", "-F"]),
            Mode::Nftables => ("nft", &["delete", "table", "ip", "kube-proxy"]),
        };
        let status = ns
            .command(program)
            .args(args)
            .status()
            .with_context(|| format!("running {program}"))?;
        ensure!(status.success(), "{program} {args:?} failed: {status}");
        if self != Mode::Nftables {
            let x = ns
                .command(program)
                .args(["-t", "nat", "-X"])
                .status()
                .with_context(|| format!("running {program} -X"))?;
            ensure!(x.success(), "{program} -t nat -X failed: {x}");
        }
        Ok(())
    }
}

/// A stable chain-name suffix for `what` (16 characters, as kube-proxy's).
fn suffix(what: &str) -> String {
    // FNV-1a, 64 bits: stable across runs, unique enough for names.
    let hash = what.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016X}")
}

/// kube-proxy's iptables mode, nat table, for `iptables-restore --noflush`.
pub fn iptables_restore(services: &[ServicePort]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    rules.push_str(concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    ));
    for svc in services {
        let id = svc.id();
        let svc_chain = format!("KUBE-SVC-{}", suffix(&id));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{id} cluster IP\" -m tcp --dport {} -j {svc_chain}",
            svc.vip, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{id} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            svc.vip, svc.port
        );
        let n = svc.endpoints.len();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", suffix(&format!("{id}/{ep}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            // Endpoint i of n takes 1/(n-i) of what the earlier ones left.
            let pick = match n - i {
                1 => String::new(),
                left => format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / left as f64
                ),
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{id} -> {ep}\"{pick} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {}/32 -m comment --comment \"{id}\" -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{id}\" -m tcp -j DNAT --to-destination {ep}"
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// kube-proxy's nftables mode, for `nft -f`.
pub fn nft_script(services: &[ServicePort]) -> String {
    let mut out = String::from("add table ip kube-proxy\n");
    out.push_str(concat!(
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
        "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n",
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
        "add chain ip kube-proxy services\n",
        "add chain ip kube-proxy masquerading\n",
        "add chain ip kube-proxy mark-for-masquerade\n",
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n",
        "add rule ip kube-proxy nat-prerouting jump services\n",
        "add rule ip kube-proxy nat-output jump services\n",
        "add rule ip kube-proxy nat-postrouting jump masquerading\n",
        "add rule ip kube-proxy masquerading meta mark & 0x4000 == 0 return\n",
        "add rule ip kube-proxy masquerading meta mark set meta mark ^ 0x4000\n",
        "add rule ip kube-proxy masquerading masquerade fully-random\n",
        "add rule ip kube-proxy mark-for-masquerade meta mark set meta mark | 0x4000\n",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    ));
    for svc in services {
        let id = svc.id();
        let chain = format!(
            "service-{}-{}-{}-tcp-{}",
            suffix(&id),
            svc.namespace,
            svc.name,
            svc.port
        );
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip, svc.port
        );
        let mut picks = Vec::new();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let ep_chain = format!(
                "endpoint-{}-{}-tcp-{}",
                suffix(&format!("{id}/{ep}")),
                ep.ip(),
                ep.port()
            );
            let _ = writeln!(out, "add chain ip kube-proxy {ep_chain}");
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {ep_chain} ip saddr {} jump mark-for-masquerade",
                ep.ip()
            );
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {ep_chain} meta l4proto tcp dnat to {ep}"
            );
            picks.push(format!("{i} : goto {ep_chain}"));
        }
        if !picks.is_empty() {
            let _ = writeln!(
                out,
                "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
                picks.len(),
                picks.join(" , ")
            );
        }
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . tcp . {} : goto {chain} }}",
            svc.vip, svc.port
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<ServicePort> {
        (0..2)
            .map(|i| ServicePort {
                namespace: "bench".into(),
                name: format!("svc{i}"),
                vip: Ipv4Addr::new(10, 96, 0, 10 + i),
                port: 80,
                endpoints: (0..3)
                    .map(|e| SocketAddrV4::new(Ipv4Addr::new(10, 100 + e, 0, i), 8080))
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn iptables_rules_pick_each_endpoint_evenly_and_end_with_node_ports() {
        let rules = iptables_restore(&two());
        assert!(
            rules.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"),
            "{rules}"
        );
        assert!(rules.ends_with("-j KUBE-NODEPORTS\nCOMMIT\n"), "{rules}");
        assert_eq!(rules.matches("--probability 0.33333333333").count(), 2);
        assert_eq!(rules.matches("--probability 0.50000000000").count(), 2);
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 6);
        // Services in the order given: the last one is matched last.
        let first = rules.find("-d 10.96.0.10/32 -p tcp").expect("svc0");
        let second = rules.find("-d 10.96.0.11/32 -p tcp").expect("svc1");
        assert!(first < second);
    }

    #[test]
    fn nft_rules_map_each_service_and_pick_among_its_endpoints() {
        let script = nft_script(&two());
        assert_eq!(
            script
                .matches("add element ip kube-proxy service-ips")
                .count(),
            2
        );
        assert_eq!(script.matches("numgen random mod 3 vmap").count(), 2);
        assert_eq!(script.matches("dnat to 10.").count(), 6);
        assert!(
            script.contains("10.96.0.11 . tcp . 80 : goto service-"),
            "{script}"
        );
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        assert_eq!(suffix("a"), suffix("a"));
        assert_ne!(suffix("bench/svc0:tcp"), suffix("bench/svc1:tcp"));
        assert_eq!(suffix("x").len(), 16);
    }
}
