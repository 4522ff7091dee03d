//! Socket-level load balancing: cgroup sock_addr hooks that give a local
//! socket's connect() (and an unconnected UDP socket's sendmsg()) to a
//! frontend the address of a backend, chosen by the same maps and
//! algorithms as the packet path, and show the frontend again to
//! recvmsg() and getpeername(). The socket then talks to the backend
//! directly: no per-packet translation, no conntrack, and it works
//! whatever path its packets take (a bridge that never shows the reply to
//! a TC hook, the node's own stack).

use core::marker::PhantomData;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    Counter, IPPROTO_TCP, IPPROTO_UDP, SCOPE_ALL, SCOPE_LOCAL, SOCK_FORWARD, SOCK_REVERSE,
    SVC_AFFINITY, SVC_LOCAL_TWIN, SVC_SOURCE_RANGES, Service,
};

use crate::{
    affinity,
    family::{self, Family, Target},
    hash::{self, AddrHash, Hashed},
    lb::{self, Pick},
    maps, random,
    socknat::{SockFamily, SockKey, Translation},
};

/// The only verdict sock_addr hooks have besides refusing.
pub const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Where a hook finds the address the socket talks to: `user_ip4`, or
/// `user_ip6` holding an IPv6 address or an IPv4-mapped one.
pub trait Dest<A> {
    fn get(ctx: &SockAddrContext) -> A;
    fn set(ctx: &SockAddrContext, addr: A);
}

pub struct User4;
pub struct User6;
/// An IPv4 address as `::ffff:a.b.c.d` in an IPv6 socket's address.
pub struct Mapped4;

impl Dest<u32> for User4 {
    #[inline(always)]
    fn get(ctx: &SockAddrContext) -> u32 {
        // SAFETY: the kernel's context; 32-bit loads are what it allows.
        unsafe { core::ptr::read_volatile(&raw const (*ctx.sock_addr).user_ip4) }
    }

    #[inline(always)]
    fn set(ctx: &SockAddrContext, addr: u32) {
        // SAFETY: as above, a 32-bit store the hook may make.
        unsafe { core::ptr::write_volatile(&raw mut (*ctx.sock_addr).user_ip4, addr) }
    }
}

impl Dest<[u32; 4]> for User6 {
    #[inline(always)]
    fn get(ctx: &SockAddrContext) -> [u32; 4] {
        let mut out = [0u32; 4];
        for (i, word) in out.iter_mut().enumerate() {
            *word = ip6_word(ctx, i);
        }
        out
    }

    #[inline(always)]
    fn set(ctx: &SockAddrContext, addr: [u32; 4]) {
        for (i, word) in addr.iter().enumerate() {
            set_ip6_word(ctx, i, *word);
        }
    }
}

impl Dest<u32> for Mapped4 {
    #[inline(always)]
    fn get(ctx: &SockAddrContext) -> u32 {
        ip6_word(ctx, 3)
    }

    #[inline(always)]
    fn set(ctx: &SockAddrContext, addr: u32) {
        set_ip6_word(ctx, 3, addr)
    }
}

#[inline(always)]
fn ip6_word(ctx: &SockAddrContext, i: usize) -> u32 {
    // SAFETY: the kernel's context, one 32-bit load (the verifier refuses
    // wider ones of user_ip6); i < 4.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.sock_addr).user_ip6[i]) }
}

#[inline(always)]
fn set_ip6_word(ctx: &SockAddrContext, i: usize, word: u32) {
    // SAFETY: as above, a 32-bit store.
    unsafe { core::ptr::write_volatile(&raw mut (*ctx.sock_addr).user_ip6[i], word) }
}

/// True if the IPv6 hook's address is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub fn is_mapped4(ctx: &SockAddrContext) -> bool {
    ip6_word(ctx, 0) == 0
        && ip6_word(ctx, 1) == 0
        && ip6_word(ctx, 2) == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// The port, network byte order (the kernel keeps it in the low 16 bits).
#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the kernel's context, a 32-bit load.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.sock_addr).user_port) as u16 }
}

#[inline(always)]
fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: as above, a 32-bit store.
    unsafe { core::ptr::write_volatile(&raw mut (*ctx.sock_addr).user_port, port as u32) }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: the kernel's context, a 32-bit load.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.sock_addr).protocol) as u8 }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a sock_addr context is what the helper takes.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The socket, as the maps know it.
#[derive(Clone, Copy)]
struct Socket {
    cookie: u64,
    /// Its network namespace: the client identity of affinity and source
    /// hashing, and where to find the socket when its backend leaves.
    netns: u64,
}

#[inline(always)]
fn socket(ctx: &SockAddrContext) -> Socket {
    Socket {
        cookie: cookie(ctx),
        // SAFETY: a sock_addr context is what the helper takes.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    }
}

/// A frontend, with the entry for clients on this node where it has one.
#[inline(always)]
fn lookup<F: Family>(addr: F::Addr, port: u16, proto: u8) -> Option<Service> {
    let service = F::service(addr, port, proto, SCOPE_ALL)?;
    if service.flags & SVC_LOCAL_TWIN == 0 {
        return Some(service);
    }
    F::service(addr, port, proto, SCOPE_LOCAL).or(Some(service))
}

/// What a hook does with a socket's address.
enum Choice<A> {
    /// Not for the socket hooks: leave it to the packet path.
    Untouched,
    /// No endpoints: fail the call.
    Refuse,
    Backend(u32, Target<A>),
}

/// A socket's hashes: its namespace's client identity, and for the
/// 5-tuple a random value, since its source port is not known yet (the
/// socket keeps the backend it gets, so nothing needs to hash the same
/// twice).
struct OfSocket<F: Family> {
    client: F::Addr,
    family: PhantomData<F>,
}

impl<F: Family> Hashed for OfSocket<F> {
    #[inline(always)]
    fn five_tuple(&self, key: hash::Key) -> u32 {
        hash::keyed(self.client.addr_hash() ^ random::random(), key)
    }

    #[inline(always)]
    fn source(&self, key: hash::Key) -> u32 {
        hash::keyed(self.client.addr_hash(), key)
    }
}

/// A backend for a new socket flow to `service`.
#[inline(always)]
fn choose<F: SockFamily>(sock: Socket, service: &Service) -> Choice<F::Addr> {
    // Source ranges need the client's address, which a socket may not have
    // yet: the packet path enforces them.
    if service.flags & SVC_SOURCE_RANGES != 0 {
        return Choice::Untouched;
    }
    if service.backend_count == 0 {
        return Choice::Refuse;
    }
    let client = F::netns_client(sock.netns);
    let affinity = service.flags & SVC_AFFINITY != 0;
    let remembered = match affinity {
        true => affinity::backend::<F>(service, client),
        false => None,
    };
    let hashed = OfSocket::<F> {
        client,
        family: PhantomData,
    };
    let chosen = match remembered {
        Some(chosen) => Some(chosen),
        None => lb::select::<F, _>(service, &hashed, Pick::Algorithm),
    };
    let Some((id, backend)) = chosen else {
        return Choice::Untouched;
    };
    if affinity {
        affinity::remember::<F>(service, client, id);
    }
    maps::count_backend_flow(id);
    maps::count(Counter::SockConnect);
    Choice::Backend(id, backend)
}

/// The socket's peer will be the backend: getpeername() and recvmsg()
/// must show the frontend.
#[inline(always)]
fn remember_reverse<F: SockFamily>(
    sock: Socket,
    proto: u8,
    frontend: (F::Addr, u16),
    service_id: u32,
    (id, backend): (u32, &Target<F::Addr>),
) {
    let key = SockKey {
        cookie: sock.cookie,
        addr: backend.addr,
        port: backend.port,
        proto,
        direction: SOCK_REVERSE,
    };
    let value = Translation {
        netns_cookie: sock.netns,
        addr: frontend.0,
        port: frontend.1,
        backend_id: id,
        service_id,
    };
    if F::sock_insert(key, value).is_err() {
        maps::count(Counter::SockNatFailed);
    }
}

#[inline(always)]
fn refuse() -> i32 {
    maps::count(Counter::SockRefused);
    // SAFETY: the helper only sets the value the syscall returns.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

/// connect(): a TCP or UDP socket connecting to a frontend is connected to
/// a backend instead.
#[inline(always)]
pub fn connect<F: SockFamily, D: Dest<F::Addr>>(ctx: &SockAddrContext) -> i32 {
    let proto = protocol(ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let (addr, port) = (D::get(ctx), port(ctx));
    let Some(service) = lookup::<F>(addr, port, proto) else {
        return PROCEED;
    };
    let sock = socket(ctx);
    match choose::<F>(sock, &service) {
        Choice::Untouched => PROCEED,
        Choice::Refuse => refuse(),
        Choice::Backend(id, backend) => {
            remember_reverse::<F>(sock, proto, (addr, port), service.id, (id, &backend));
            D::set(ctx, backend.addr);
            set_port(ctx, backend.port);
            PROCEED
        }
    }
}

/// sendmsg() with an address, on an unconnected UDP socket: the socket's
/// datagrams to a frontend keep going to one backend while it is a member,
/// as conntrack keeps a UDP flow's.
#[inline(always)]
pub fn sendmsg<F: SockFamily, D: Dest<F::Addr>>(ctx: &SockAddrContext) -> i32 {
    let proto = protocol(ctx);
    if proto != IPPROTO_UDP {
        return PROCEED;
    }
    let (addr, port) = (D::get(ctx), port(ctx));
    let Some(service) = lookup::<F>(addr, port, proto) else {
        return PROCEED;
    };
    let sock = socket(ctx);
    let forward = SockKey {
        cookie: sock.cookie,
        addr,
        port,
        proto,
        direction: SOCK_FORWARD,
    };
    if let Some(backend) = still_served::<F>(forward, &service) {
        D::set(ctx, backend.addr);
        set_port(ctx, backend.port);
        return PROCEED;
    }
    match choose::<F>(sock, &service) {
        Choice::Untouched => PROCEED,
        Choice::Refuse => refuse(),
        Choice::Backend(id, backend) => {
            let to_backend = Translation {
                netns_cookie: sock.netns,
                addr: backend.addr,
                port: backend.port,
                backend_id: id,
                service_id: service.id,
            };
            if F::sock_insert(forward, to_backend).is_err() {
                maps::count(Counter::SockNatFailed);
            }
            remember_reverse::<F>(sock, proto, (addr, port), service.id, (id, &backend));
            D::set(ctx, backend.addr);
            set_port(ctx, backend.port);
            PROCEED
        }
    }
}

/// The backend a socket's earlier datagrams went to, if it still serves
/// the service (terminating included: its flows continue).
#[inline(always)]
fn still_served<F: SockFamily>(
    forward: SockKey<F::Addr>,
    service: &Service,
) -> Option<Target<F::Addr>> {
    let earlier = F::sock_get(forward)?;
    if earlier.service_id != service.id {
        return None;
    }
    family::member::<F>(service.id, earlier.backend_id)
        .filter(|b| b.addr == earlier.addr && b.port == earlier.port)
}

/// recvmsg() and getpeername(): a backend the hooks chose shows as the
/// frontend the application asked for.
#[inline(always)]
pub fn peer<F: SockFamily, D: Dest<F::Addr>>(ctx: &SockAddrContext) -> i32 {
    let proto = protocol(ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let key = SockKey {
        cookie: cookie(ctx),
        addr: D::get(ctx),
        port: port(ctx),
        proto,
        direction: SOCK_REVERSE,
    };
    if let Some(frontend) = F::sock_get(key) {
        D::set(ctx, frontend.addr);
        set_port(ctx, frontend.port);
    }
    PROCEED
}
