//! Test bodies written once for both families: datapath.rs runs them for
//! IPv4, datapath6.rs for IPv6, each on its own lab.

use proxy_common::Counter;

use super::{
    HOOKS, Hook, Loaded, TC_ACT_REDIRECT, XDP_PASS,
    packets::{Family, finish_partial},
};

/// A frontend without backends refuses TCP (`ports.0`) and UDP
/// (`ports.1`) with a port unreachable from the frontend, on both hooks,
/// counted; its checksum holds also after the kernel finishes a partial one
/// at the original L4 checksum offset.
pub fn refuses_without_backends<F: Family>(
    dp: &Loaded,
    (client, empty): (F::Addr, F::Addr),
    (tcp_port, udp_port): (u16, u16),
) {
    for hook in HOOKS {
        for (packet, check_at) in [
            (F::tcp(client, tcp_port, empty, 80), F::L4 + 16),
            (F::udp(client, udp_port, empty, 53), F::L4 + 6),
        ] {
            let before = dp.counter(Counter::Rejected);
            let (verdict, reply) = dp.run(hook, &packet);
            // XDP hands the refusal to the node's stack, addressed to the
            // node as the original was; TC sends it straight back.
            let sent = match hook {
                Hook::Xdp => XDP_PASS,
                Hook::Tc => TC_ACT_REDIRECT,
            };
            assert_eq!(verdict, sent, "{hook:?}");
            assert_eq!(dp.counter(Counter::Rejected), before + 1);
            F::check_port_unreachable(&reply, &packet, (empty, client), hook);
            // A partial checksum the kernel finishes later must not break it.
            let mut finished = reply.clone();
            finish_partial(&mut finished, F::L4, check_at);
            F::check_port_unreachable(&finished, &packet, (empty, client), hook);
        }
    }
}

/// Under externalTrafficPolicy Local, a flow from `client` to `lb` on a
/// node without local endpoints is dropped, not refused, and counted.
pub fn local_policy_drops_without_local_endpoints<F: Family>(
    dp: &Loaded,
    hook: Hook,
    (client, port): (F::Addr, u16),
    lb: F::Addr,
) {
    let (verdict, _) = dp.run(hook, &F::tcp(client, port, lb, 80));
    assert_eq!(verdict, hook.dropped(), "{hook:?}: dropped, not refused");
    assert_eq!(dp.counter(Counter::NoLocalBackend), 1, "{hook:?}");
}

/// Under externalTrafficPolicy Local, the client address reaches the
/// backend unchanged: egress leaves the forwarded packet alone.
pub fn local_policy_keeps_the_client_address<F: Family>(
    dp: &Loaded,
    (client, port): (F::Addr, u16),
    lb: F::Addr,
) {
    let dnat = F::seen(&dp.pass(Hook::Tc, &F::tcp(client, port, lb, 80)));
    let forwarded = F::tcp(client, port, dnat.dst, 8080);
    assert_eq!(dp.egress(&forwarded), forwarded, "no source NAT");
}

/// A client outside a LoadBalancer's source ranges is dropped and counted.
pub fn outside_the_source_ranges_is_dropped<F: Family>(
    dp: &Loaded,
    hook: Hook,
    (outsider, port): (F::Addr, u16),
    lb: F::Addr,
) {
    let (verdict, _) = dp.run(hook, &F::tcp(outsider, port, lb, 80));
    assert_eq!(verdict, hook.dropped(), "{hook:?}: outside the ranges");
    assert_eq!(dp.counter(Counter::SourceRangeDenied), 1, "{hook:?}");
}
