//! Which hook an interface gets.
//!
//! XDP sees packets before the kernel has an skb, so it cannot tell a full
//! checksum from a partial one (CHECKSUM_PARTIAL, left by local sockets that
//! offload checksumming, as on every veth). It is right only where packets
//! come from a wire. TC sees the skb, and its helpers handle both.

use std::{fmt, str::FromStr};

use anyhow::Context;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        })
    }
}

/// `IF`, `IF:xdp` or `IF:tc` (interface names cannot contain ':').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceSpec {
    pub name: String,
    /// None: chosen by the interface's driver.
    pub hook: Option<Hook>,
}

impl FromStr for IfaceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, hook) = match s.split_once(':') {
            None => (s, None),
            Some((name, "xdp")) => (name, Some(Hook::Xdp)),
            Some((name, "tc")) => (name, Some(Hook::Tc)),
            Some((_, other)) => return Err(format!("unknown hook {other:?} (use xdp or tc)")),
        };
        if name.is_empty() || name.len() > 15 {
            return Err(format!("{name:?} is not an interface name"));
        }
        Ok(IfaceSpec {
            name: name.to_string(),
            hook,
        })
    }
}

impl IfaceSpec {
    /// The hook to use: the one asked for, else TC for virtual interfaces fed
    /// by local sockets, XDP for the rest.
    pub fn resolve(&self) -> anyhow::Result<Hook> {
        if let Some(hook) = self.hook {
            return Ok(hook);
        }
        let driver = driver(&self.name).with_context(|| format!("interface {}", self.name))?;
        Ok(match driver.as_str() {
            "veth" | "tun" | "bridge" | "dummy" => Hook::Tc,
            _ => Hook::Xdp,
        })
    }
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    rest: [u8; 160],
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut DrvInfo,
    _pad: [u8; 16],
}

/// The interface's driver name (ETHTOOL_GDRVINFO), in the caller's netns.
fn driver(name: &str) -> anyhow::Result<String> {
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: plain socket syscall; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: req and info outlive the call and have the layout the kernel expects.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err).context("reading the driver name (does the interface exist?)");
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_interface_specs() {
        assert_eq!(
            "eth0".parse(),
            Ok(IfaceSpec {
                name: "eth0".into(),
                hook: None
            })
        );
        assert_eq!(
            "eth0:xdp".parse(),
            Ok(IfaceSpec {
                name: "eth0".into(),
                hook: Some(Hook::Xdp)
            })
        );
        assert_eq!(
            "veth1:tc".parse(),
            Ok(IfaceSpec {
                name: "veth1".into(),
                hook: Some(Hook::Tc)
            })
        );
        assert!("eth0:foo".parse::<IfaceSpec>().is_err());
        assert!("".parse::<IfaceSpec>().is_err());
        assert!("a-very-long-interface-name".parse::<IfaceSpec>().is_err());
    }

    #[test]
    fn loopback_has_no_wire() {
        // lo has no ethtool driver info; the error must name the interface.
        let spec: IfaceSpec = "no-such-if0".parse().unwrap();
        let err = spec.resolve().unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"));
    }
}
