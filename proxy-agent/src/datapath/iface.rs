//! Which interfaces the agent serves (`--iface`), and which hook each gets.
//!
//! XDP sees packets before the kernel has an skb, so it cannot tell a full
//! checksum from a partial one (CHECKSUM_PARTIAL, left by local sockets that
//! offload checksumming, as on every veth). It is right only where packets
//! come from a wire. TC sees the skb, and its helpers handle both.

use std::{fmt, str::FromStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

impl Hook {
    /// The hook for an interface of this rtnetlink link kind (IFLA_INFO_KIND;
    /// None for a physical NIC): TC for virtual interfaces fed by local
    /// sockets, XDP for the rest.
    pub fn for_kind(kind: Option<&str>) -> Hook {
        match kind {
            Some("veth" | "tun" | "bridge" | "dummy") => Hook::Tc,
            _ => Hook::Xdp,
        }
    }
}

/// Which interfaces a spec selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// The interfaces that carry the default routes (IPv4 and IPv6, main
    /// table, every nexthop of a multipath route), followed as they change.
    Auto,
    /// An interface name, or a glob over names: `*` matches any run of
    /// characters, `?` any one character.
    Glob(String),
}

/// The longest interface name (IFNAMSIZ less its NUL).
const MAX_NAME: usize = 15;

impl Pattern {
    /// True if this glob matches `name` (`Auto` never matches by name).
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Pattern::Auto => false,
            Pattern::Glob(glob) => glob_match(glob.as_bytes(), name.as_bytes()),
        }
    }
}

/// Shell-style matching of `*` and `?` against a whole name; on a mismatch
/// after a `*`, that `*` takes one more character and matching resumes.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was and where in the name its match ends now.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = name.get(n) {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&want) if want == b'?' || want == c => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp + 1;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// `PATTERN`, `PATTERN:xdp` or `PATTERN:tc`, PATTERN being an interface
/// name, a glob over names or `auto` (interface names cannot contain ':').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceSpec {
    pub pattern: Pattern,
    /// None: chosen by the interface's kind.
    pub hook: Option<Hook>,
}

impl IfaceSpec {
    /// `auto` with the hook chosen by kind: what `run` serves without `--iface`.
    pub fn auto() -> IfaceSpec {
        IfaceSpec {
            pattern: Pattern::Auto,
            hook: None,
        }
    }
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
        let pattern = if name == "auto" {
            Pattern::Auto
        } else {
            check_glob(name)?;
            Pattern::Glob(name.to_string())
        };
        Ok(IfaceSpec { pattern, hook })
    }
}

/// A glob that could match some interface name: not empty, no character a
/// name cannot have, and no more fixed characters than a name can hold.
fn check_glob(glob: &str) -> Result<(), String> {
    let fixed = glob.chars().filter(|c| *c != '*').count();
    let bad = glob.chars().any(|c| c == '/' || c.is_whitespace());
    if glob.is_empty() || bad || fixed > MAX_NAME {
        return Err(format!(
            "{glob:?} is not an interface name or pattern (at most {MAX_NAME} characters \
             besides `*`, no '/' or spaces)"
        ));
    }
    Ok(())
}

impl fmt::Display for IfaceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pattern {
            Pattern::Auto => f.write_str("auto")?,
            Pattern::Glob(glob) => f.write_str(glob)?,
        }
        match self.hook {
            Some(hook) => write!(f, ":{hook}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(name: &str, hook: Option<Hook>) -> IfaceSpec {
        IfaceSpec {
            pattern: Pattern::Glob(name.into()),
            hook,
        }
    }

    #[test]
    fn parses_interface_specs() {
        assert_eq!("eth0".parse(), Ok(glob("eth0", None)));
        assert_eq!("eth0:xdp".parse(), Ok(glob("eth0", Some(Hook::Xdp))));
        assert_eq!("veth1:tc".parse(), Ok(glob("veth1", Some(Hook::Tc))));
        assert_eq!("veth*:tc".parse(), Ok(glob("veth*", Some(Hook::Tc))));
        assert_eq!("auto".parse(), Ok(IfaceSpec::auto()));
        assert_eq!(
            "auto:xdp".parse(),
            Ok(IfaceSpec {
                pattern: Pattern::Auto,
                hook: Some(Hook::Xdp)
            })
        );
        assert!("eth0:foo".parse::<IfaceSpec>().is_err());
        assert!("".parse::<IfaceSpec>().is_err());
        assert!(":tc".parse::<IfaceSpec>().is_err());
        assert!("a-very-long-interface-name".parse::<IfaceSpec>().is_err());
        assert!("a/b".parse::<IfaceSpec>().is_err());
        assert!("a b".parse::<IfaceSpec>().is_err());
        // Stars match nothing as well, so they do not count against the length.
        assert!("*fifteen-chars-1*".parse::<IfaceSpec>().is_ok());
    }

    #[test]
    fn specs_print_as_given() {
        for text in ["eth0", "veth*:tc", "auto", "auto:xdp", "eth?:xdp"] {
            let spec: IfaceSpec = text.parse().expect(text);
            assert_eq!(spec.to_string(), text);
        }
    }

    #[test]
    fn globs_match_whole_names() {
        let cases = [
            ("veth*", "veth1234", true),
            ("veth*", "veth", true),
            ("veth*", "xveth1", false),
            ("eth?", "eth0", true),
            ("eth?", "eth10", false),
            ("eth?", "eth", false),
            ("cni0", "cni0", true),
            ("cni0", "cni01", false),
            ("*", "lo", true),
            ("*0", "cni0", true),
            ("*0", "cni1", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("**x", "x", true),
            ("?*", "", false),
        ];
        for (pattern, name, want) in cases {
            let got = Pattern::Glob(pattern.into()).matches_name(name);
            assert_eq!(got, want, "{pattern} against {name}");
        }
        assert!(!Pattern::Auto.matches_name("auto"));
    }

    #[test]
    fn hooks_follow_the_link_kind() {
        for kind in ["veth", "tun", "bridge", "dummy"] {
            assert_eq!(Hook::for_kind(Some(kind)), Hook::Tc, "{kind}");
        }
        assert_eq!(Hook::for_kind(None), Hook::Xdp, "a physical NIC");
        assert_eq!(Hook::for_kind(Some("vxlan")), Hook::Xdp);
    }
}
