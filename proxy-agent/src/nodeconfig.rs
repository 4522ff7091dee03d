//! What the datapath is told about the node beyond its addresses: the
//! ports source NAT may take, and the keys of its flow hash.
//!
//! Source NAT ports are reserved on the node (`ip_local_reserved_ports`),
//! so that no local socket is given one as its ephemeral port and then
//! meets a translated flow's replies.
//!
//! The flow hash is keyed so that clients cannot choose their backend by
//! choosing their ports. Two keys: the node's own, random and kept across
//! agent restarts (in the pinned `lb_config`), for choices only this node
//! makes; and the cluster's, the same on every node, for Maglev and source
//! hashing, whose point is that every node picks the same backend.

use std::{fmt, path::Path, str::FromStr};

use anyhow::Context;

/// Where the kernel keeps the ports it never hands out as ephemeral ones.
pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// An inclusive port range, as `--snat-port-range` takes it: `61000-65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            min: proxy_common::SNAT_PORT_MIN,
            max: proxy_common::SNAT_PORT_MAX,
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?}: expected MIN-MAX, such as 61000-65535");
        let (min, max) = text.trim().split_once('-').ok_or_else(invalid)?;
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| invalid());
        let (min, max) = (port(min)?, port(max)?);
        // Below 1024 are the node's own services; fewer than 1024 ports
        // would run out under a few hundred clients.
        if min < 1024 || max < min || u32::from(max - min) + 1 < 1024 {
            return Err(format!(
                "{text:?}: source NAT needs at least 1024 ports, all above 1023"
            ));
        }
        Ok(PortRange { min, max })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// The flags of `run` that set these.
#[derive(clap::Args, Clone, Debug)]
#[group(id = "NodeConfigFlags")]
pub struct Flags {
    /// Ports source NAT gives translated flows (MIN-MAX, at least 1024 of
    /// them). Reserved in ip_local_reserved_ports so the node's own
    /// sockets never take one.
    #[arg(long, default_value_t = PortRange::default())]
    pub snat_port_range: PortRange,
    /// Secret keying Maglev and source hashing: set the same value on every
    /// node (a flow reaching any node then gets the same backend), and keep
    /// it from clients, who could otherwise choose their backend. Default:
    /// derived from the cluster's identity (the kube-system namespace's
    /// UID), or with --manifests a fixed key.
    #[arg(long, env = "XDPROXY_HASH_KEY", hide_env_values = true)]
    pub hash_key: Option<String>,
}

/// A 64-bit hash key, as the datapath takes it.
pub type Key = [u32; 2];

/// The key `--hash-key` (or the cluster's UID) names: a 64-bit digest of
/// the text (FNV-1a, then splitmix64's finaliser), the same on every node.
pub fn key_of(text: &str) -> Key {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: every input bit reaches every output bit.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    [h as u32, (h >> 32) as u32]
}

/// A random key for this node, from the kernel's generator.
pub fn random_key() -> anyhow::Result<Key> {
    let mut key = [0u32; 2];
    // SAFETY: getrandom writes at most the buffer's length into it.
    let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), size_of::<Key>(), 0) };
    anyhow::ensure!(
        n == size_of::<Key>() as isize,
        "getrandom: {}",
        std::io::Error::last_os_error()
    );
    Ok(key)
}

/// The datapath's node settings other than addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub snat_ports: PortRange,
    /// This node's key; zero until set (a pinned datapath's is kept).
    pub node_key: Key,
    pub cluster_key: Key,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            snat_ports: PortRange::default(),
            node_key: [0; 2],
            cluster_key: key_of(""),
        }
    }
}

/// Adds `range` to the node's reserved ports, keeping what is reserved
/// already (other software reserves ports too).
pub fn reserve(range: PortRange, file: &Path) -> anyhow::Result<()> {
    let current =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let wanted = merged(current.trim(), range);
    if wanted == current.trim() {
        return Ok(());
    }
    std::fs::write(file, &wanted)
        .with_context(|| format!("writing {wanted:?} to {}", file.display()))
}

/// The reservation list with `range` in it (the kernel merges overlaps).
fn merged(current: &str, range: PortRange) -> String {
    let ours = range.to_string();
    let mut parts: Vec<&str> = current
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .collect();
    if covered(&parts, range) {
        return current.to_string();
    }
    parts.push(&ours);
    parts.join(",")
}

/// True if one listed range already covers all of `range`.
fn covered(parts: &[&str], range: PortRange) -> bool {
    parts.iter().any(|p| {
        let (lo, hi) = p.trim().split_once('-').unwrap_or((p.trim(), p.trim()));
        match (lo.parse::<u16>(), hi.parse::<u16>()) {
            (Ok(lo), Ok(hi)) => lo <= range.min && range.max <= hi,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_what_cannot_work() {
        assert_eq!(
            "40000-50000".parse(),
            Ok(PortRange {
                min: 40000,
                max: 50000
            })
        );
        for bad in ["", "61000", "65535-61000", "0-65535", "61000-61100", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert_eq!(PortRange::default().to_string(), "61000-65535");
    }

    #[test]
    fn the_reservation_keeps_what_is_there() {
        let r = PortRange::default();
        assert_eq!(merged("", r), "61000-65535");
        assert_eq!(
            merged("8080,30000-30010", r),
            "8080,30000-30010,61000-65535"
        );
        assert_eq!(merged("60000-65535", r), "60000-65535", "already covered");
    }

    #[test]
    fn keys_are_the_same_for_the_same_text_only() {
        assert_eq!(key_of("a"), key_of("a"));
        assert_ne!(key_of("a"), key_of("b"));
        assert_ne!(key_of("uid-1"), key_of("uid-2"));
    }

    #[test]
    fn reserving_writes_the_file() -> anyhow::Result<()> {
        let file = std::env::temp_dir().join(format!("xdproxy-reserved-{}", std::process::id()));
        std::fs::write(&file, "8080\n")?;
        reserve(PortRange::default(), &file)?;
        let written = std::fs::read_to_string(&file)?;
        std::fs::remove_file(&file)?;
        assert_eq!(written, "8080,61000-65535");
        Ok(())
    }
}
