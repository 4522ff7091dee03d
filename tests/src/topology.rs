//! The test network: a client, a routing "node" (where the proxy runs) and any
//! number of backends, each in its own namespace and joined to the node by a
//! veth pair.
//!
//! ```text
//!  client ns             node ns                      backend i ns
//!  eth0 10.0.1.2/24 <--> cl0 10.0.1.1/24
//!                        be{i} 10.1.(i+1).1/24 <-->  eth0 10.1.(i+1).2/24
//! ```
//! Every link is dual-stack: fd00:0:1::2/64 and ::1 on the client link,
//! fd00:1:(i+1)::2/64 and ::1 on backend i's.
//!
//! Addresses are fixed: namespaces are isolated, so parallel topologies can
//! reuse them. Veth pairs are created directly inside the namespaces, never in
//! the root namespace, and vanish with them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{
    manifests::{BACKEND_HTTP_PORT, BACKEND_UDP_PORT},
    netns::Netns,
    servers::Servers,
};

/// The client's address (its `eth0`).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The node's address on the client link (`cl0`), the client's gateway.
pub const CLIENT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);

/// Address of backend `i` (its `eth0`): 10.1.(i+1).2.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, backend_octet(i), 2)
}

/// The node's address on backend `i`'s link, that backend's gateway.
pub fn backend_gateway(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, backend_octet(i), 1)
}

/// The client's IPv6 address.
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 2);
/// The node's IPv6 address on the client link.
pub const CLIENT_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 1);

/// IPv6 address of backend `i`: fd00:1:(i+1)::2.
pub fn backend_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, u16::from(backend_octet(i)), 0, 0, 0, 0, 2)
}

fn backend_gateway6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, u16::from(backend_octet(i)), 0, 0, 0, 0, 1)
}

/// Third octet of backend `i`'s subnet. More than 254 backends do not fit the
/// addressing plan; `add_backend` refuses them, so this never wraps in practice.
fn backend_octet(i: usize) -> u8 {
    u8::try_from(i + 1).unwrap_or(u8::MAX)
}

/// Node-side interface facing the client.
pub fn client_iface() -> &'static str {
    "cl0"
}

/// Node-side interface facing backend `i`.
pub fn backend_iface(i: usize) -> String {
    format!("be{i}")
}

/// Interface name used inside the client and backend namespaces.
pub const LEAF_IFACE: &str = "eth0";

/// Highest backend count the 10.1.X.0/24 plan allows.
const MAX_BACKENDS: usize = 254;

/// A built topology; dropping it deletes every namespace (and thus every link).
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
    prefix: String,
}

impl Topology {
    /// Builds client, node and `backends` backend namespaces named
    /// `{prefix}c`, `{prefix}n`, `{prefix}b{i}`.
    pub fn build(prefix: &str, backends: usize) -> Result<Topology> {
        let client = Netns::create(&format!("{prefix}c"))?;
        let node = Netns::create(&format!("{prefix}n"))?;
        let mut topo = Topology {
            client,
            node,
            backends: Vec::new(),
            prefix: prefix.to_string(),
        };
        topo.setup_node()?;
        topo.client_link().create(&topo.node)?;
        for _ in 0..backends {
            topo.wire_backend()?;
        }
        // Wait once at the end so the links' operstate delays overlap.
        topo.client_link().wait_up(&topo.node)?;
        for i in 0..backends {
            topo.backend_link(i).wait_up(&topo.node)?;
        }
        Ok(topo)
    }

    /// Name-reporting servers in every backend: `backend{i}` on TCP 8080 and
    /// UDP 5353, the ports the manifests' slices list.
    pub fn start_servers(&self) -> Result<Vec<Servers>> {
        (0..self.backends.len())
            .map(|i| {
                Servers::start(
                    &self.backends[i],
                    &format!("backend{i}"),
                    BACKEND_HTTP_PORT,
                    BACKEND_UDP_PORT,
                )
            })
            .collect()
    }

    /// The interfaces an agent serves: the client's, with `client_hook`
    /// (`""` or `":xdp"`, say) appended, and every backend's.
    pub fn agent_ifaces(&self, client_hook: &str) -> Vec<String> {
        let mut ifaces = vec![format!("{}{client_hook}", client_iface())];
        ifaces.extend((0..self.backends.len()).map(backend_iface));
        ifaces
    }

    /// Same as the module-level [`CLIENT_ADDR`], for `Topology::CLIENT_ADDR` callers.
    pub const CLIENT_ADDR: Ipv4Addr = CLIENT_ADDR;

    /// Same as the module-level [`backend_addr`].
    pub fn backend_addr(i: usize) -> Ipv4Addr {
        backend_addr(i)
    }

    /// Same as the module-level [`client_iface`].
    pub fn client_iface() -> &'static str {
        client_iface()
    }

    /// Same as the module-level [`backend_iface`].
    pub fn backend_iface(i: usize) -> String {
        backend_iface(i)
    }

    /// The prefix all namespace names of this topology start with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Makes the node a plain router. rp_filter is off because proxied replies
    /// may legitimately arrive on an interface that is not the route back.
    /// Set before creating links so new interfaces inherit `default`.
    fn setup_node(&self) -> Result<()> {
        self.node.sysctl("net.ipv4.ip_forward", "1")?;
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        self.node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        self.node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        Ok(())
    }

    fn client_link(&self) -> Link<'_> {
        Link {
            node_iface: client_iface().to_string(),
            node_addr: CLIENT_GATEWAY,
            node_addr6: CLIENT_GATEWAY6,
            leaf: &self.client,
            leaf_addr: CLIENT_ADDR,
            leaf_addr6: CLIENT_ADDR6,
        }
    }

    fn backend_link(&self, i: usize) -> Link<'_> {
        Link {
            node_iface: backend_iface(i),
            node_addr: backend_gateway(i),
            node_addr6: backend_gateway6(i),
            leaf: &self.backends[i],
            leaf_addr: backend_addr(i),
            leaf_addr6: backend_addr6(i),
        }
    }

    /// Adds one more backend namespace, wired like the others; returns its index.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.wire_backend()?;
        self.backend_link(i).wait_up(&self.node)?;
        Ok(i)
    }

    /// Creates and wires backend namespace `i` without waiting for its link.
    fn wire_backend(&mut self) -> Result<usize> {
        let i = self.backends.len();
        if i >= MAX_BACKENDS {
            bail!("at most {MAX_BACKENDS} backends fit the 10.1.X.0/24 plan");
        }
        // Pushed so backend_link can borrow it; popped (which deletes the
        // namespace) if wiring fails, keeping indices dense.
        self.backends
            .push(Netns::create(&format!("{}b{i}", self.prefix))?);
        self.backend_link(i)
            .create(&self.node)
            .with_context(|| format!("wiring backend {i} to the node"))
            .inspect_err(|_| drop(self.backends.pop()))?;
        Ok(i)
    }

    /// Turns TX checksum offload off on the client's eth0, so packets reach the
    /// node with complete checksums as they would from a physical wire (veth
    /// otherwise hands XDP CHECKSUM_PARTIAL packets with unfinished checksums).
    pub fn disable_client_tx_checksum(&self) -> Result<()> {
        let ns = self.client.name().to_string();
        self.client
            .run(|| set_tx_csum(LEAF_IFACE, false))?
            .with_context(|| format!("disabling TX checksum offload on {LEAF_IFACE} in {ns}"))
    }

    /// Turns GRO on on the client's eth0. A veth delivers frames that XDP on
    /// its peer sends back (XDP_TX, as for refusals) only when it runs NAPI,
    /// which GRO (or an XDP program of its own) turns on; a physical NIC
    /// needs nothing of the kind.
    pub fn enable_client_gro(&self) -> Result<()> {
        let ns = self.client.name().to_string();
        self.client
            .run(|| set_gro(LEAF_IFACE, true))?
            .with_context(|| format!("enabling GRO on {LEAF_IFACE} in {ns}"))
    }

    /// Makes the node finish every checksum in software before a packet
    /// leaves it, as a physical NIC does in hardware. Without this, a packet
    /// that left a local socket with a partial checksum crosses veths and is
    /// accepted at the far end without its checksum ever being computed, so
    /// a wrong checksum update by the datapath would go unnoticed.
    pub fn finish_checksums_on_node_egress(&self) -> Result<()> {
        let mut ifaces = vec![client_iface().to_string()];
        ifaces.extend((0..self.backends.len()).map(backend_iface));
        let ns = self.node.name().to_string();
        self.node.run(move || -> Result<()> {
            for iface in &ifaces {
                set_tx_csum(iface, false)
                    .with_context(|| format!("disabling TX checksum offload on {iface} in {ns}"))?;
            }
            Ok(())
        })?
    }
}

/// One veth pair between the node and a leaf (client or backend) namespace.
struct Link<'a> {
    node_iface: String,
    node_addr: Ipv4Addr,
    node_addr6: Ipv6Addr,
    leaf: &'a Netns,
    leaf_addr: Ipv4Addr,
    leaf_addr6: Ipv6Addr,
}

impl Link<'_> {
    /// Creates the pair inside the node namespace with its peer placed directly
    /// into the leaf namespace, addresses both ends, brings them up and points
    /// the leaf's default route at the node.
    fn create(&self, node: &Netns) -> Result<()> {
        self.try_create(node).with_context(|| {
            format!(
                "linking {} in {} to {} in {}",
                self.node_iface,
                node.name(),
                LEAF_IFACE,
                self.leaf.name()
            )
        })
    }

    fn try_create(&self, node: &Netns) -> Result<()> {
        node.add_veth(&self.node_iface, self.leaf, LEAF_IFACE)?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", self.node_addr),
            "dev",
            &self.node_iface,
        ])?;
        node.ip(&["link", "set", &self.node_iface, "up"])?;
        self.leaf.ip(&[
            "addr",
            "add",
            &format!("{}/24", self.leaf_addr),
            "dev",
            LEAF_IFACE,
        ])?;
        self.leaf.ip(&["link", "set", LEAF_IFACE, "up"])?;
        self.leaf.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.node_addr.to_string(),
        ])?;
        // No duplicate address detection: the addresses are usable at once.
        node.ip(&[
            "addr",
            "add",
            &format!("{}/64", self.node_addr6),
            "dev",
            &self.node_iface,
            "nodad",
        ])?;
        self.leaf.ip(&[
            "addr",
            "add",
            &format!("{}/64", self.leaf_addr6),
            "dev",
            LEAF_IFACE,
            "nodad",
        ])?;
        self.leaf.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.node_addr6.to_string(),
        ])?;
        Ok(())
    }

    /// Waits until both ends report operstate UP. Carrier (and thus traffic)
    /// is there at once, but the kernel's linkwatch may defer the operstate
    /// change by up to a second; waiting keeps tests from observing a link
    /// that tools still show as DOWN.
    fn wait_up(&self, node: &Netns) -> Result<()> {
        let deadline = Instant::now() + LINK_UP_TIMEOUT;
        wait_oper_up(node, &self.node_iface, deadline)?;
        wait_oper_up(self.leaf, LEAF_IFACE, deadline)
    }
}

/// How long a fresh veth pair may take to report operstate UP.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

fn wait_oper_up(ns: &Netns, iface: &str, deadline: Instant) -> Result<()> {
    loop {
        let line = ns.ip(&["-o", "link", "show", "dev", iface])?;
        if line.contains(" state UP ") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{iface} in namespace {} not operationally up: {}",
                ns.name(),
                line.trim()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIOCETHTOOL ioctl number (linux/sockios.h).
const SIOCETHTOOL: libc::Ioctl = 0x8946;
/// Legacy ethtool commands for TX checksumming (linux/ethtool.h).
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` union member; padded to the kernel's 40 bytes.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// Sets TX checksum offload on `iface` in the calling thread's namespace and
/// verifies the result with a read-back.
pub(crate) fn set_tx_csum(iface: &str, on: bool) -> Result<()> {
    set_feature(
        iface,
        (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM),
        on,
        "TX checksum offload",
    )
}

/// Sets GRO on `iface` in the calling thread's namespace, read back.
fn set_gro(iface: &str, on: bool) -> Result<()> {
    set_feature(iface, (ETHTOOL_GGRO, ETHTOOL_SGRO), on, "GRO")
}

/// One on/off feature through its legacy ethtool (get, set) commands.
fn set_feature(iface: &str, (get, set): (u32, u32), on: bool, what: &str) -> Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("creating ioctl socket");
    }
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    ethtool_value(&sock, iface, set, u32::from(on)).with_context(|| format!("setting {what}"))?;
    let now = ethtool_value(&sock, iface, get, 0).with_context(|| format!("reading {what}"))?;
    if (now != 0) != on {
        bail!("{what} on {iface} is still {now} after setting it to {on}");
    }
    Ok(())
}

/// Issues one legacy ethtool get/set command and returns the resulting value.
fn ethtool_value(sock: &OwnedFd, iface: &str, cmd: u32, data: u32) -> Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    if iface.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} too long");
    }
    for (dst, src) in req.name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a properly laid out ifreq whose data pointer refers to a
    // live ethtool_value; both outlive the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfreqData) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("SIOCETHTOOL on {iface}"));
    }
    Ok(value.data)
}
