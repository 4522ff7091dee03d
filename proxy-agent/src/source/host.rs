//! The host's own addresses, read from the kernel.
//!
//! A node needs an address of each family to source-NAT from. In a cluster
//! its Node object names them; run from manifest files without a Node for
//! this host, the agent takes the host's own, as masquerading in
//! kube-proxy's rules would.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// The global-scope addresses of the host's interfaces that are up, in the
/// kernel's order; loopback and link-local ones are left out.
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut next = list;
    while !next.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*next };
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        // SAFETY: ifa_addr is null or points at a sockaddr of its family.
        if let Some(addr) = up.then(|| unsafe { address(ifa.ifa_addr) }).flatten()
            && global(addr)
            && !out.contains(&addr)
        {
            out.push(addr);
        }
        next = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, no longer used.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// # Safety
/// `sa` is null or points at a socket address of the family it names.
unsafe fn address(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's promise; the family says which struct it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
            }
            _ => None,
        }
    }
}

/// An address other hosts can reach this one at.
fn global(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local() && !a.is_unspecified(),
        IpAddr::V6(a) => !a.is_loopback() && !a.is_unicast_link_local() && !a.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_link_local_are_not_the_hosts_addresses() {
        assert!(!global("127.0.0.1".parse().unwrap()));
        assert!(!global("169.254.1.1".parse().unwrap()));
        assert!(!global("fe80::1".parse().unwrap()));
        assert!(!global("::1".parse().unwrap()));
        assert!(global("10.0.0.1".parse().unwrap()));
        assert!(global("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn the_host_list_holds_no_loopback() {
        let found = addresses().expect("getifaddrs");
        assert!(found.iter().all(|a| !a.is_loopback()), "{found:?}");
    }
}
