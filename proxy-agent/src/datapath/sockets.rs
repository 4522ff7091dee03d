//! Destroys sockets still connected to a backend that left its Service, in
//! every network namespace of the host, with sock_diag's SOCK_DESTROY.
//!
//! Socket-level load balancing rewrites a connect() to a VIP into a backend
//! address once; nothing on the packet path revisits that choice afterwards.
//! Without help, a connected UDP socket keeps sending into the void and a TCP
//! one hangs until its retransmission timers give up. Aborting the socket
//! makes the application see ECONNABORTED (a TCP peer gets a RST), and its
//! reconnect goes through the hook again, to a live backend.
//!
//! A sock_diag socket answers for the network namespace it was created in,
//! so one is opened in each namespace by a worker thread that setns'es
//! there. The workers (one per core, ended with the pass, so the caller's
//! thread never changes namespace and no thread stays in a foreign one) go
//! from namespace to namespace rather than one thread each: a thread's
//! spawn and join cost milliseconds on a loaded node, entering a namespace
//! and opening the socket tens of microseconds. They dump; `select` and the
//! destroys run on the caller's thread, with the socket the worker opened.
//!
//! The netlink messages are encoded and decoded byte by byte at the offsets
//! of `linux/netlink.h`, `linux/sock_diag.h` and `linux/inet_diag.h`, so no
//! unaligned reads of a receive buffer are needed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

/// A backend a socket may be connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
}

/// What one [`destroy`] or [`destroy_in`] pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Destroyed {
    /// Namespaces whose sockets were looked at.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub sockets: usize,
    /// Namespaces, dumps or sockets skipped, and why.
    pub errors: Vec<String>,
}

/// In every network namespace of the host, destroys the sockets whose remote
/// end is one of `peers` and for which `select(cookie, local, peer)` says yes
/// (the caller checks the socket cookie against the socket-LB map, so sockets
/// an application connected to the pod address directly are left alone).
/// Blocking; call it from spawn_blocking.
///
/// A socket of an IPv6 family connected to an IPv4-mapped address counts as
/// connected to the IPv4 address; `local` is given in the same form.
///
/// Each namespace costs a walk of the host-wide TCP established hash (about
/// 1 ms at 256 Ki buckets); [`destroy_in`] skips the namespaces that cannot
/// hold such a socket.
pub fn destroy(peers: &[Peer], select: &dyn Fn(u64, SocketAddr, Peer) -> bool) -> Destroyed {
    pass(Search::new(peers), select)
}

/// Like [`destroy`], but only in the namespaces whose cookie is in `netns`:
/// the value of `bpf_get_netns_cookie` in the connect hook, and of
/// `SO_NETNS_COOKIE` on a socket of the namespace. Namespaces left out are
/// not counted in [`Destroyed::namespaces`].
pub fn destroy_in(
    peers: &[Peer],
    netns: &HashSet<u64>,
    select: &dyn Fn(u64, SocketAddr, Peer) -> bool,
) -> Destroyed {
    let mut wanted = Search::new(peers);
    wanted.netns = Some(netns.clone());
    pass(wanted, select)
}

fn pass(wanted: Search, select: &dyn Fn(u64, SocketAddr, Peer) -> bool) -> Destroyed {
    let mut out = Destroyed::default();
    if wanted.dumps.is_empty() {
        return out;
    }
    let namespaces = namespaces(&mut out.errors);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let mut workers = 0;
        for _ in 0..worker_count(namespaces.len()) {
            let (namespaces, next, wanted, tx) = (&namespaces, &next, &wanted, tx.clone());
            match std::thread::Builder::new()
                .name("sock-destroy".into())
                .stack_size(WORKER_STACK)
                .spawn_scoped(scope, move || visit_all(namespaces, next, wanted, &tx))
            {
                Ok(_) => workers += 1,
                Err(err) => out
                    .errors
                    .push(format!("spawning a namespace worker: {err}")),
            }
        }
        drop(tx);
        if workers == 0 && !namespaces.is_empty() {
            out.errors.push("no namespace was visited".into());
        }
        // `select` need not be Sync: it runs here, on the caller's thread.
        for visit in rx {
            settle(visit, select, &mut out);
        }
    });
    out
}

/// Threads visiting namespaces at once: the dumps are kernel CPU time (each
/// TCP dump walks the host-wide established hash), so one per core.
fn worker_count(namespaces: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(1, MAX_WORKERS).min(namespaces)
}

const MAX_WORKERS: usize = 8;
const WORKER_STACK: usize = 128 * 1024;

/// What a worker found in one namespace. `diag` is `None` when the namespace
/// could not be entered; it is still usable from any thread, as a socket
/// stays in the namespace it was created in.
struct Visit {
    path: PathBuf,
    diag: Option<Diag>,
    sockets: Vec<Socket>,
    errors: Vec<String>,
}

/// A worker: takes namespaces off the shared list until none are left.
/// Worker threads are short-lived: they end with the pass, so no thread of
/// the process stays in a foreign namespace.
fn visit_all(
    namespaces: &[Namespace],
    next: &AtomicUsize,
    wanted: &Search,
    tx: &mpsc::Sender<Visit>,
) {
    while let Some(ns) = namespaces.get(next.fetch_add(1, Ordering::Relaxed)) {
        if tx.send(visit(ns, wanted)).is_err() {
            return;
        }
    }
}

/// Enters `ns` and dumps the sockets connected to a peer there.
fn visit(ns: &Namespace, wanted: &Search) -> Visit {
    let mut visit = Visit {
        path: ns.path.clone(),
        diag: None,
        sockets: Vec::new(),
        errors: Vec::new(),
    };
    let opened = enter(&ns.file).and_then(|()| Diag::open());
    let mut diag = match opened {
        Ok(diag) => diag,
        Err(err) => {
            visit.errors.push(format!(
                "skipping the network namespace {}: {err}",
                ns.path.display()
            ));
            return visit;
        }
    };
    match wanted.skips(&diag) {
        Ok(false) => {}
        Ok(true) => return visit,
        Err(err) => {
            let err = format!("{}: {err:#}", ns.path.display());
            visit.errors.push(err);
            return visit;
        }
    }
    for dump in &wanted.dumps {
        match diag.dump_or_split(dump, wanted) {
            Ok(sockets) => visit.sockets.extend(sockets),
            Err(err) => visit.errors.push(format!("{}: {err:#}", ns.path.display())),
        }
    }
    visit.diag = Some(diag);
    visit
}

/// Destroys the sockets of one visit that `select` picks.
fn settle(visit: Visit, select: &dyn Fn(u64, SocketAddr, Peer) -> bool, out: &mut Destroyed) {
    out.errors.extend(visit.errors);
    let Some(mut diag) = visit.diag else { return };
    out.namespaces += 1;
    for socket in visit.sockets {
        if !select(socket.id.cookie(), socket.local, socket.peer) {
            continue;
        }
        match diag.destroy(&socket) {
            Ok(()) => out.sockets += 1,
            // Closed by its owner between the dump and now: nothing left to do.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => out.errors.push(format!(
                "{}: destroying the socket {} -> {}: {err}",
                visit.path.display(),
                socket.local,
                socket.peer.addr
            )),
        }
    }
}

// --- what to look for -------------------------------------------------------

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h): dump requests and their answers.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY` (linux/sock_diag.h).
const SOCK_DESTROY: u16 = 21;
/// `INET_DIAG_REQ_BYTECODE`: the request attribute holding a filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Filter op that always takes its `no` branch.
const INET_DIAG_BC_JMP: u8 = 1;
/// Filter op "remote port equals", the port in the `no` field of the next op.
const INET_DIAG_BC_D_EQ: u8 = 12;

/// TCP states (bits by `TCP_*` number) in which an application may still
/// use the socket: established, syn-sent, syn-recv, fin-wait-1/2,
/// close-wait, last-ack, closing. Not listen (no peer), close or time-wait
/// (no application behind them).
const TCP_STATES: u32 = 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;
/// UDP has no states to speak of; unconnected sockets match no peer anyway.
const UDP_STATES: u32 = u32::MAX;

/// Beyond this many distinct ports the filter program would not fit a
/// netlink attribute (12 bytes a port, 16-bit length): filter in user space only.
const MAX_FILTER_PORTS: usize = 4096;

/// `TCPDIAG_GETSOCK` (linux/inet_diag.h): the original request type. Unlike
/// `SOCK_DIAG_BY_FAMILY` it dumps both families in one walk of the
/// host-wide established hash, which dominates the cost of a pass.
const TCPDIAG_GETSOCK: u16 = 18;

/// One dump request, with its filter program.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dump {
    /// `SOCK_DIAG_BY_FAMILY` for one family, or `TCPDIAG_GETSOCK` for both
    /// (`family` is then AF_UNSPEC); the answers carry the same type.
    ty: u16,
    family: u8,
    proto: u8,
    states: u32,
    bytecode: Vec<u8>,
    /// The same dump one family at a time, for a kernel that refuses this one.
    split: Vec<Dump>,
}

impl Dump {
    fn by_family(family: i32, proto: u8, states: u32, bytecode: &[u8]) -> Dump {
        Dump {
            ty: SOCK_DIAG_BY_FAMILY,
            family: family as u8,
            proto,
            states,
            bytecode: bytecode.to_vec(),
            split: Vec::new(),
        }
    }
}

/// The peers, keyed by their canonical form, the dumps that can find them,
/// and the namespaces to look in (all when `None`).
#[derive(Debug)]
struct Search {
    peers: HashMap<Peer, Peer>,
    dumps: Vec<Dump>,
    netns: Option<HashSet<u64>>,
}

impl Search {
    fn new(peers: &[Peer]) -> Search {
        let by_key: HashMap<Peer, Peer> = peers.iter().map(|p| (canonical(*p), *p)).collect();
        let mut dumps = Vec::new();
        for (proto, states) in [(IPPROTO_TCP, TCP_STATES), (IPPROTO_UDP, UDP_STATES)] {
            let of_proto: Vec<&Peer> = by_key.keys().filter(|p| p.proto == proto).collect();
            if of_proto.is_empty() {
                continue;
            }
            let ports: BTreeSet<u16> = of_proto.iter().map(|p| p.addr.port()).collect();
            let bytecode = port_filter(&ports);
            // An IPv4 peer is reachable from AF_INET sockets and, v4-mapped,
            // from dual-stack AF_INET6 ones; an IPv6 peer only from AF_INET6.
            let mut split = Vec::new();
            if of_proto.iter().any(|p| p.addr.is_ipv4()) {
                split.push(Dump::by_family(libc::AF_INET, proto, states, &bytecode));
            }
            split.push(Dump::by_family(libc::AF_INET6, proto, states, &bytecode));
            if proto == IPPROTO_TCP {
                dumps.push(Dump {
                    ty: TCPDIAG_GETSOCK,
                    family: libc::AF_UNSPEC as u8,
                    proto,
                    states,
                    bytecode,
                    split,
                });
            } else {
                // UDP has no both-families request; its hash is small anyway.
                dumps.extend(split);
            }
        }
        Search {
            peers: by_key,
            dumps,
            netns: None,
        }
    }

    /// Whether the namespace of `diag` is left out.
    fn skips(&self, diag: &Diag) -> Result<bool> {
        let Some(netns) = &self.netns else {
            return Ok(false);
        };
        Ok(!netns.contains(&diag.netns_cookie()?))
    }

    /// The socket described by a `SOCK_DIAG_BY_FAMILY` answer, if its remote
    /// end is one of the peers.
    fn candidate(&self, proto: u8, payload: &[u8]) -> Option<Socket> {
        let (family, id) = decode_diag_msg(payload)?;
        let remote = socket_addr(family, &id.dst, id.dport)?;
        let peer = *self.peers.get(&Peer {
            addr: remote,
            proto,
        })?;
        let local = socket_addr(family, &id.src, id.sport)?;
        Some(Socket {
            family,
            proto,
            id,
            local,
            peer,
        })
    }
}

/// The form sockets are matched in: IPv4-mapped addresses as IPv4, no flow
/// label or scope.
fn canonical(peer: Peer) -> Peer {
    Peer {
        addr: SocketAddr::new(peer.addr.ip().to_canonical(), peer.addr.port()),
        proto: peer.proto,
    }
}

/// An address of an `inet_diag_sockid`, IPv4-mapped ones as IPv4.
fn socket_addr(family: u8, addr: &[u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(*addr)).to_canonical(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A filter program accepting sockets whose remote port is one of `ports`,
/// so the kernel sends only those; empty (no filter) when there are too many.
///
/// Laid out as "p1 or (p2 or (...))": each test jumps on a match to a JMP
/// that leaves the program (accept) and otherwise over that JMP to the next
/// test; the last test's miss jumps 4 bytes past the end (reject). The
/// kernel's audit only admits jumps landing on an op reached by following
/// every op's `yes` branch from the start, which this chain satisfies.
fn port_filter(ports: &BTreeSet<u16>) -> Vec<u8> {
    if ports.is_empty() || ports.len() > MAX_FILTER_PORTS {
        return Vec::new();
    }
    const TEST: usize = 8;
    const JMP: usize = 4;
    let total = ports.len() * (TEST + JMP) - JMP;
    let mut bc = Vec::with_capacity(total);
    for (i, port) in ports.iter().enumerate() {
        bc.extend(bc_op(INET_DIAG_BC_D_EQ, TEST as u8, (TEST + JMP) as u16));
        bc.extend(bc_op(0, 0, *port));
        if i + 1 < ports.len() {
            let to_end = total - bc.len();
            // to_end <= total < 2^16 as ports.len() <= MAX_FILTER_PORTS.
            bc.extend(bc_op(INET_DIAG_BC_JMP, JMP as u8, to_end as u16));
        }
    }
    bc
}

/// `struct inet_diag_bc_op { u8 code; u8 yes; u16 no; }`.
fn bc_op(code: u8, yes: u8, no: u16) -> [u8; 4] {
    let no = no.to_ne_bytes();
    [code, yes, no[0], no[1]]
}

// --- namespaces -------------------------------------------------------------

/// A network namespace, held open so it cannot go away while it is visited.
struct Namespace {
    file: File,
    path: PathBuf,
}

/// Every distinct network namespace: named ones first (they may hold no
/// process), then those of all processes.
fn namespaces(errors: &mut Vec<String>) -> Vec<Namespace> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for path in namespace_paths(errors) {
        match open_namespace(&path, &mut seen) {
            Ok(Some(ns)) => found.push(ns),
            Ok(None) => {}
            Err(err) => errors.push(format!("{err:#}")),
        }
    }
    found
}

fn namespace_paths(errors: &mut Vec<String>) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        match std::fs::read_dir(dir) {
            Ok(entries) => paths.extend(entries.filter_map(|e| e.ok()).map(|e| e.path())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => errors.push(format!("listing {dir}: {err}")),
        }
    }
    match std::fs::read_dir("/proc") {
        Ok(entries) => paths.extend(
            entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|e| e.path().join("ns/net")),
        ),
        Err(err) => errors.push(format!("listing /proc: {err}")),
    }
    paths
}

/// Opens a namespace not seen before; `None` for one already seen.
fn open_namespace(path: &Path, seen: &mut HashSet<(u64, u64)>) -> Result<Option<Namespace>> {
    // A process that exits during the walk shows up as ENOENT here.
    let what = || format!("skipping the network namespace {}", path.display());
    // stat first: most processes share a namespace, and opening each would cost more.
    let meta = std::fs::metadata(path).with_context(what)?;
    if seen.contains(&(meta.dev(), meta.ino())) {
        return Ok(None);
    }
    let file = File::open(path).with_context(what)?;
    // The pid may have been reused between stat and open: trust the open file.
    let meta = file.metadata().with_context(what)?;
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(None);
    }
    Ok(Some(Namespace {
        file,
        path: path.to_path_buf(),
    }))
}

// --- sock_diag over netlink -------------------------------------------------

/// Length of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// Length of `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// Length of `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// Length of `struct inet_diag_req` (the compatibility request).
const COMPAT_REQ_LEN: usize = 4 + SOCKID_LEN + 8;
/// Length of `struct inet_diag_msg`: family, state, timer, retrans, id,
/// expires, rqueue, wqueue, uid, inode.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// The kernel never sends a dump datagram larger than 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// The kernel answers at once; this only bounds a pass should it not.
const RECV_TIMEOUT: Duration = Duration::from_millis(500);

/// `struct inet_diag_sockid`, ports in host order, addresses as on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

impl SockId {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend(self.sport.to_be_bytes());
        out.extend(self.dport.to_be_bytes());
        out.extend(self.src);
        out.extend(self.dst);
        out.extend(self.ifindex.to_ne_bytes());
        out.extend(self.cookie[0].to_ne_bytes());
        out.extend(self.cookie[1].to_ne_bytes());
    }

    fn decode(b: &[u8]) -> Option<SockId> {
        let b: &[u8; SOCKID_LEN] = b.get(..SOCKID_LEN)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(SockId {
            sport: u16::from_be_bytes([b[0], b[1]]),
            dport: u16::from_be_bytes([b[2], b[3]]),
            src: b[4..20].try_into().ok()?,
            dst: b[20..36].try_into().ok()?,
            ifindex: u32_at(36),
            cookie: [u32_at(40), u32_at(44)],
        })
    }

    /// The socket cookie as `bpf_get_socket_cookie` returns it.
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[1]) << 32 | u64::from(self.cookie[0])
    }
}

/// A socket found connected to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Socket {
    family: u8,
    proto: u8,
    id: SockId,
    local: SocketAddr,
    peer: Peer,
}

/// `struct inet_diag_req_v2`.
fn encode_req(out: &mut Vec<u8>, family: u8, proto: u8, states: u32, id: &SockId) {
    out.extend([family, proto, 0, 0]);
    out.extend(states.to_ne_bytes());
    id.encode(out);
}

/// `struct inet_diag_req`, the request of `TCPDIAG_GETSOCK`: family,
/// src_len, dst_len, ext, id, states, dbs.
fn encode_compat_req(out: &mut Vec<u8>, family: u8, states: u32, id: &SockId) {
    out.extend([family, 0, 0, 0]);
    id.encode(out);
    out.extend(states.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
}

/// A dump request body, with the filter program as its attribute.
fn dump_request(dump: &Dump) -> Vec<u8> {
    let mut body = Vec::with_capacity(COMPAT_REQ_LEN + 4 + dump.bytecode.len());
    let id = SockId::default();
    if dump.ty == TCPDIAG_GETSOCK {
        encode_compat_req(&mut body, dump.family, dump.states, &id);
    } else {
        encode_req(&mut body, dump.family, dump.proto, dump.states, &id);
    }
    if !dump.bytecode.is_empty() {
        // port_filter keeps the program well below 64 KiB.
        let len = (4 + dump.bytecode.len()) as u16;
        body.extend(len.to_ne_bytes());
        body.extend(INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        body.extend(&dump.bytecode);
    }
    body
}

/// Whether a dump failed because the kernel does not know the request, as
/// opposed to failing while answering it.
fn refused(err: &anyhow::Error) -> bool {
    let refusals = [libc::EINVAL, libc::ENOENT, libc::EOPNOTSUPP];
    err.chain()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| {
            e.raw_os_error()
                .is_some_and(|code| refusals.contains(&code))
        })
}

/// The family and id of a `struct inet_diag_msg`.
fn decode_diag_msg(payload: &[u8]) -> Option<(u8, SockId)> {
    if payload.len() < MSG_LEN {
        return None;
    }
    Some((payload[0], SockId::decode(&payload[4..])?))
}

/// One netlink message of a received datagram.
#[derive(Debug, PartialEq, Eq)]
struct NlMsg<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
fn split(mut buf: &[u8]) -> Result<Vec<NlMsg<'_>>> {
    let mut msgs = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            bail!(
                "malformed netlink message: length {len}, {} bytes left",
                buf.len()
            );
        }
        msgs.push(NlMsg {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    Ok(msgs)
}

/// The errno of an `NLMSG_ERROR` (0 for an acknowledgement).
fn nl_errno(payload: &[u8]) -> Result<i32> {
    let code: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("truncated netlink error message"))?;
    Ok(-i32::from_ne_bytes(code))
}

/// A NETLINK_SOCK_DIAG socket of one namespace.
struct Diag {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Diag {
    /// Opens a socket in the calling thread's namespace.
    fn open() -> io::Result<Diag> {
        Ok(Diag {
            fd: diag_socket()?,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// The cookie of the namespace the socket was created in.
    fn netns_cookie(&self) -> Result<u64> {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: writes at most `len` bytes into a live u64.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("reading SO_NETNS_COOKIE");
        }
        Ok(cookie)
    }

    /// Runs `dump`, or its per-family parts on a kernel that refuses it.
    fn dump_or_split(&mut self, dump: &Dump, wanted: &Search) -> Result<Vec<Socket>> {
        match self.dump(dump, wanted) {
            Err(err) if !dump.split.is_empty() && refused(&err) => {
                let mut found = Vec::new();
                for part in &dump.split {
                    found.extend(self.dump(part, wanted)?);
                }
                Ok(found)
            }
            other => other,
        }
    }

    /// Dumps the sockets of one family and protocol connected to a peer.
    fn dump(&mut self, dump: &Dump, wanted: &Search) -> Result<Vec<Socket>> {
        let what = || {
            format!(
                "dumping {} sockets of family {}",
                proto_name(dump.proto),
                dump.family
            )
        };
        let seq = self
            .send(
                dump.ty,
                (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
                &dump_request(dump),
            )
            .with_context(what)?;
        let mut found = Vec::new();
        loop {
            let len = self.recv().with_context(what)?;
            for msg in split(&self.buf[..len]).with_context(what)? {
                match i32::from(msg.ty) {
                    _ if msg.seq != seq => {}
                    libc::NLMSG_DONE => return Ok(found),
                    libc::NLMSG_ERROR => {
                        let errno = nl_errno(msg.payload).with_context(what)?;
                        return Err(io::Error::from_raw_os_error(errno)).with_context(what);
                    }
                    _ if msg.ty == dump.ty => {
                        found.extend(wanted.candidate(dump.proto, msg.payload))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Destroys one socket, named by its full id so that a socket which
    /// replaced it under the same addresses is not hit.
    fn destroy(&mut self, socket: &Socket) -> io::Result<()> {
        let mut body = Vec::with_capacity(REQ_LEN);
        encode_req(&mut body, socket.family, socket.proto, u32::MAX, &socket.id);
        let seq = self.send(
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            &body,
        )?;
        loop {
            let len = self.recv().map_err(io::Error::other)?;
            let msgs = split(&self.buf[..len]).map_err(io::Error::other)?;
            let ack = msgs
                .iter()
                .find(|m| m.seq == seq && i32::from(m.ty) == libc::NLMSG_ERROR);
            if let Some(ack) = ack {
                return match nl_errno(ack.payload).map_err(io::Error::other)? {
                    0 => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                };
            }
        }
    }

    /// Sends one request; returns its sequence number.
    fn send(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend((len as u32).to_ne_bytes());
        msg.extend(ty.to_ne_bytes());
        msg.extend(flags.to_ne_bytes());
        msg.extend(self.seq.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(body);
        // SAFETY: sends from a live buffer of the given length on an open fd.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        match usize::try_from(sent) {
            Ok(n) if n == msg.len() => Ok(self.seq),
            Ok(n) => Err(io::Error::other(format!(
                "netlink sent {n} of {} bytes",
                msg.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    /// Receives one datagram into `buf`; returns its length.
    fn recv(&mut self) -> Result<usize> {
        loop {
            // SAFETY: receives into a live buffer of the given length on an open fd.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            let Ok(len) = usize::try_from(got) else {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        bail!("no answer from the kernel within {RECV_TIMEOUT:?}")
                    }
                    _ => return Err(err).context("receiving from sock_diag"),
                }
            };
            if len > self.buf.len() {
                bail!(
                    "sock_diag datagram of {len} bytes does not fit {} bytes",
                    self.buf.len()
                );
            }
            return Ok(len);
        }
    }
}

/// Moves the calling thread into the network namespace behind `file`.
fn enter(file: &File) -> io::Result<()> {
    // SAFETY: a plain syscall on an open fd; it affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A NETLINK_SOCK_DIAG socket in the calling thread's namespace.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: passes a live timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "other",
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    const AF_INET: u8 = libc::AF_INET as u8;
    const AF_INET6: u8 = libc::AF_INET6 as u8;

    fn peer(addr: &str, proto: u8) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            proto,
        }
    }

    fn v4_mapped(ip: [u8; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&ip);
        a
    }

    fn v4(ip: [u8; 4]) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&ip);
        a
    }

    /// An `inet_diag_msg` as the kernel sends it.
    fn diag_msg(family: u8, id: &SockId) -> Vec<u8> {
        let mut msg = vec![family, 1, 0, 0];
        id.encode(&mut msg);
        msg.extend([0u8; 20]);
        msg
    }

    #[test]
    fn sockid_layout_and_round_trip() {
        let id = SockId {
            sport: 0x1234,
            dport: 53,
            src: v4([10, 0, 0, 1]),
            dst: v4([192, 0, 2, 2]),
            ifindex: 7,
            cookie: [0xdead_beef, 0x42],
        };
        let mut b = Vec::new();
        id.encode(&mut b);
        assert_eq!(b.len(), SOCKID_LEN);
        assert_eq!(&b[..4], &[0x12, 0x34, 0, 53], "ports in network order");
        assert_eq!(&b[20..24], &[192, 0, 2, 2]);
        assert_eq!(SockId::decode(&b), Some(id));
        assert_eq!(id.cookie(), 0x42_dead_beef);
        assert_eq!(SockId::decode(&b[..SOCKID_LEN - 1]), None);
    }

    #[test]
    fn request_and_message_lengths() {
        let mut req = Vec::new();
        encode_req(
            &mut req,
            AF_INET,
            IPPROTO_TCP,
            TCP_STATES,
            &SockId::default(),
        );
        assert_eq!(req.len(), REQ_LEN);
        assert_eq!(REQ_LEN, 56);
        assert_eq!(MSG_LEN, 72);
        let dump = Dump::by_family(libc::AF_INET, IPPROTO_UDP, 1, &[0; 8]);
        let body = dump_request(&dump);
        assert_eq!(body.len(), REQ_LEN + 4 + 8);
        assert_eq!(u16::from_ne_bytes([body[REQ_LEN], body[REQ_LEN + 1]]), 12);
        assert_eq!(
            u16::from_ne_bytes([body[REQ_LEN + 2], body[REQ_LEN + 3]]),
            INET_DIAG_REQ_BYTECODE
        );
        let tcp = &Search::new(&[peer("192.0.2.2:80", IPPROTO_TCP)]).dumps[0];
        let body = dump_request(tcp);
        assert_eq!(COMPAT_REQ_LEN, 60);
        assert_eq!(body.len(), COMPAT_REQ_LEN + 4 + 8);
        assert_eq!(body[0], libc::AF_UNSPEC as u8);
        let states = &body[4 + SOCKID_LEN..8 + SOCKID_LEN];
        assert_eq!(states, TCP_STATES.to_ne_bytes(), "states after the id");
    }

    #[test]
    fn addresses_v4_v6_and_v4_mapped() {
        let sa = |f, a, p| socket_addr(f, &a, p);
        assert_eq!(
            sa(AF_INET, v4([192, 0, 2, 2]), 80),
            Some("192.0.2.2:80".parse().unwrap())
        );
        assert_eq!(
            sa(AF_INET6, v4_mapped([192, 0, 2, 2]), 80),
            Some("192.0.2.2:80".parse().unwrap())
        );
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        assert_eq!(
            sa(AF_INET6, v6.octets(), 80),
            Some("[2001:db8::5]:80".parse().unwrap())
        );
        assert_eq!(sa(99, v6.octets(), 80), None);
    }

    #[test]
    fn candidates_match_address_port_and_protocol() {
        let wanted = Search::new(&[
            peer("192.0.2.2:53", IPPROTO_UDP),
            peer("[2001:db8::5]:80", IPPROTO_TCP),
        ]);
        let id = |dst, dport| SockId {
            sport: 40000,
            dport,
            src: v4_mapped([192, 0, 2, 1]),
            dst,
            ..SockId::default()
        };
        let mapped = wanted.candidate(
            IPPROTO_UDP,
            &diag_msg(AF_INET6, &id(v4_mapped([192, 0, 2, 2]), 53)),
        );
        let mapped = mapped.expect("a dual-stack socket to a v4-mapped peer is a candidate");
        assert_eq!(mapped.peer, peer("192.0.2.2:53", IPPROTO_UDP));
        assert_eq!(mapped.local, "192.0.2.1:40000".parse().unwrap());
        assert_eq!(mapped.family, AF_INET6);
        assert!(
            wanted
                .candidate(
                    IPPROTO_TCP,
                    &diag_msg(AF_INET6, &id(v4_mapped([192, 0, 2, 2]), 53))
                )
                .is_none()
        );
        assert!(
            wanted
                .candidate(
                    IPPROTO_UDP,
                    &diag_msg(AF_INET6, &id(v4_mapped([192, 0, 2, 2]), 54))
                )
                .is_none()
        );
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        assert!(
            wanted
                .candidate(IPPROTO_TCP, &diag_msg(AF_INET6, &id(v6.octets(), 80)))
                .is_some()
        );
        assert!(
            wanted
                .candidate(
                    IPPROTO_TCP,
                    &diag_msg(AF_INET6, &id(v6.octets(), 80))[..MSG_LEN - 1]
                )
                .is_none()
        );
    }

    #[test]
    fn a_v4_mapped_peer_counts_as_ipv4() {
        let wanted = Search::new(&[peer("[::ffff:192.0.2.2]:53", IPPROTO_UDP)]);
        let id = SockId {
            dport: 53,
            dst: v4([192, 0, 2, 2]),
            ..SockId::default()
        };
        let found = wanted
            .candidate(IPPROTO_UDP, &diag_msg(AF_INET, &id))
            .expect("candidate");
        assert_eq!(
            found.peer,
            peer("[::ffff:192.0.2.2]:53", IPPROTO_UDP),
            "select sees the peer as given"
        );
    }

    #[test]
    fn dumps_only_what_can_match() {
        let families = |dumps: &[Dump]| -> Vec<(u16, u8, u8)> {
            dumps.iter().map(|d| (d.ty, d.family, d.proto)).collect()
        };
        assert_eq!(Search::new(&[]).dumps, vec![]);
        let v6_tcp = Search::new(&[peer("[2001:db8::5]:80", IPPROTO_TCP)]);
        let both = (TCPDIAG_GETSOCK, libc::AF_UNSPEC as u8, IPPROTO_TCP);
        assert_eq!(families(&v6_tcp.dumps), vec![both]);
        let by_family = (SOCK_DIAG_BY_FAMILY, AF_INET6, IPPROTO_TCP);
        assert_eq!(families(&v6_tcp.dumps[0].split), vec![by_family]);
        let v4_udp = Search::new(&[peer("192.0.2.2:53", IPPROTO_UDP)]);
        assert_eq!(
            families(&v4_udp.dumps),
            vec![
                (SOCK_DIAG_BY_FAMILY, AF_INET, IPPROTO_UDP),
                (SOCK_DIAG_BY_FAMILY, AF_INET6, IPPROTO_UDP)
            ]
        );
    }

    #[test]
    fn only_unknown_requests_fall_back() {
        let refusal = anyhow::Error::from(io::Error::from_raw_os_error(libc::EINVAL));
        assert!(refused(&refusal.context("dumping")));
        let other = anyhow::Error::from(io::Error::from_raw_os_error(libc::ENOBUFS));
        assert!(!refused(&other));
        assert!(!refused(&anyhow!("malformed netlink message")));
    }

    /// The kernel's walk of a filter program (inet_diag_bc_run), for D_EQ and JMP.
    fn run_filter(bc: &[u8], dport: u16) -> bool {
        let mut pos = 0usize;
        while pos < bc.len() {
            let (code, yes, no) = (
                bc[pos],
                bc[pos + 1] as usize,
                u16::from_ne_bytes([bc[pos + 2], bc[pos + 3]]),
            );
            let taken = match code {
                INET_DIAG_BC_JMP => false,
                INET_DIAG_BC_D_EQ => u16::from_ne_bytes([bc[pos + 6], bc[pos + 7]]) == dport,
                _ => panic!("unexpected op {code}"),
            };
            pos += if taken { yes } else { no as usize };
        }
        pos == bc.len()
    }

    /// The kernel's audit (inet_diag_bc_audit): the `yes` chain ends exactly
    /// at the end, every `no` lands on that chain, at the end or 4 past it.
    fn audit(bc: &[u8]) {
        let mut chain = BTreeSet::new();
        let mut pos = 0usize;
        while pos < bc.len() {
            chain.insert(pos);
            pos += bc[pos + 1] as usize;
        }
        assert_eq!(pos, bc.len(), "the yes chain must end at the end");
        for &at in &chain {
            let target = at + u16::from_ne_bytes([bc[at + 2], bc[at + 3]]) as usize;
            assert!(
                target >= bc.len() && target <= bc.len() + 4 || chain.contains(&target),
                "no at {at}"
            );
        }
    }

    #[test]
    fn port_filter_accepts_exactly_its_ports() {
        for ports in [vec![53], vec![53, 80], vec![1, 80, 443, 8080, 65535]] {
            let set: BTreeSet<u16> = ports.iter().copied().collect();
            let bc = port_filter(&set);
            audit(&bc);
            for port in [0, 1, 52, 53, 54, 80, 443, 8080, 65535] {
                assert_eq!(
                    run_filter(&bc, port),
                    set.contains(&port),
                    "{ports:?} port {port}"
                );
            }
        }
        assert!(port_filter(&BTreeSet::new()).is_empty());
        let many: BTreeSet<u16> = (0..=MAX_FILTER_PORTS as u16).collect();
        assert!(port_filter(&many).is_empty(), "too many ports: no filter");
        let most: BTreeSet<u16> = (0..MAX_FILTER_PORTS as u16).collect();
        let bc = port_filter(&most);
        audit(&bc);
        assert!(run_filter(&bc, 4095) && !run_filter(&bc, 4096));
    }

    fn nlmsg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        m.extend(ty.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(payload);
        m
    }

    #[test]
    fn split_messages_and_errors() {
        let mut buf = nlmsg(SOCK_DIAG_BY_FAMILY, 3, &[1, 2]);
        buf.extend([0, 0]); // alignment padding
        buf.extend(nlmsg(
            libc::NLMSG_ERROR as u16,
            3,
            &(-libc::ENOENT).to_ne_bytes(),
        ));
        let msgs = split(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0],
            NlMsg {
                ty: SOCK_DIAG_BY_FAMILY,
                seq: 3,
                payload: &[1, 2]
            }
        );
        assert_eq!(nl_errno(msgs[1].payload).unwrap(), libc::ENOENT);
        assert!(nl_errno(&[0, 0]).is_err());
        let mut bad = nlmsg(SOCK_DIAG_BY_FAMILY, 1, &[]);
        bad[0] = 100;
        assert!(split(&bad).is_err(), "length beyond the datagram");
        bad[0] = 4;
        assert!(split(&bad).is_err(), "length below the header");
    }
}
