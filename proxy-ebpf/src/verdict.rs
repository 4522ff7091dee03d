//! What a program decides for a packet (`Verdict`), the rewrite it
//! applies (`Rewrite`, `Side`), and where it runs (`Stage`). A leaf: the
//! deciding modules (lb, ct) and the applying ones (nat, frag, icmp) share
//! these types without importing each other.

/// Which end of the packet changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client to service: the destination becomes the backend.
    Destination,
    /// Backend to client: the source becomes the service again.
    Source,
}

/// Where a program runs: ingress hooks translate towards backends and most
/// replies; the egress hook only the source rewrites left for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingress,
    Egress,
}

pub struct Rewrite<A> {
    pub side: Side,
    pub addr: A,
    pub port: u16,
}

pub enum Verdict<A> {
    /// Not ours, or nothing to change: untouched.
    Pass,
    Rewrite(Rewrite<A>),
    /// A new flow given a backend: the program continues in its new-flow
    /// program (`lb::start`), or, if that cannot run, rewrites as this says
    /// without conntrack state.
    NewFlow(Rewrite<A>),
    /// A service's packet it must not serve (source outside its ranges, no
    /// local endpoint under externalTrafficPolicy: Local).
    Drop,
    /// A service without endpoints: refuse, as kube-proxy's REJECT does.
    /// From XDP the refusal goes up the node's stack, which routes it.
    Reject,
    /// As `Reject`, for a frontend that may be one of the node's own
    /// addresses: the stack would drop a packet from there as a martian, so
    /// XDP sends the refusal straight back out.
    RejectToSender,
    /// A TCP connection whose backend left the service: reset it, so the
    /// client learns now instead of after its timeouts.
    Reset,
    /// As `Reset`, sent as `RejectToSender` is.
    ResetToSender,
}
