//! How long a conntrack entry may go without a packet, by protocol and TCP
//! state, and the duration syntax the flags take.

use std::time::Duration;

use proxy_common::{CT_STATE_FIN, CT_STATE_RST, CT_STATE_SYN, IPPROTO_TCP, IPPROTO_UDP};

/// Seconds an entry may stay idle, by protocol and by the TCP state of the
/// packets seen in its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP, only SYNs seen in this direction: a handshake that never
    /// finishes.
    pub tcp_syn: u32,
    /// TCP, data seen: an open connection. kube-proxy's default for
    /// `--conntrack-tcp-timeout-established` (24 h).
    pub tcp_established: u32,
    /// TCP, this direction sent a FIN. Short, because the other direction's
    /// entry keeps the flow alive while that side still sends.
    pub tcp_fin: u32,
    /// TCP, a RST seen: the connection is over in both directions (see
    /// `expiry`).
    pub tcp_rst: u32,
    pub udp: u32,
    /// Every other protocol (SCTP).
    pub other: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Timeouts {
    /// The defaults (a const, so that flags can show them).
    pub const DEFAULT: Timeouts = Timeouts {
        tcp_syn: 60,
        tcp_established: 86_400,
        tcp_fin: 10,
        tcp_rst: 10,
        udp: 60,
        other: 300,
    };

    /// The idle time allowed to an entry of `proto` in `state`.
    pub fn of(&self, proto: u8, state: u8) -> u32 {
        match proto {
            IPPROTO_TCP => match state {
                CT_STATE_SYN => self.tcp_syn,
                CT_STATE_FIN => self.tcp_fin,
                CT_STATE_RST => self.tcp_rst,
                // Established, and any state this agent does not know (a
                // newer kernel side): an unknown state must not cut an open
                // connection short.
                _ => self.tcp_established,
            },
            IPPROTO_UDP => self.udp,
            _ => self.other,
        }
    }

    /// The longest idle time any entry is allowed.
    pub fn longest(&self) -> u32 {
        [
            self.tcp_syn,
            self.tcp_established,
            self.tcp_fin,
            self.tcp_rst,
            self.udp,
            self.other,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// The idle time allowed to an entry of a flow nothing has answered
    /// yet: no longer than a handshake that never finishes, whatever state
    /// its packets claimed (a bare ACK claims an established connection).
    pub fn unconfirmed(&self, proto: u8, state: u8) -> u32 {
        self.of(proto, state).min(self.tcp_syn)
    }
}

/// A duration as Go's `time.ParseDuration` (and so kube-proxy's flags)
/// takes it, `24h`, `1h30m`, `1.5h`, `300ms`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let invalid = || format!("invalid duration {text:?} (examples: 10s, 1h30m, 24h, 1.5h, 90)");
    if text.starts_with('-') {
        return Err(format!("{text:?}: a duration cannot be negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let (part, after) = component(rest).ok_or_else(invalid)?;
        nanos = nanos.checked_add(part).ok_or_else(invalid)?;
        rest = after;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| invalid())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// One `<number>[.<fraction>]<unit>` at the start of `text`, in
/// nanoseconds, and what follows it.
fn component(text: &str) -> Option<(u128, &str)> {
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let whole_len = digits(text);
    let (whole, rest) = text.split_at(whole_len);
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after) => after.split_at(digits(after)),
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let unit_len = rest
        .find(|c: char| c.is_ascii_digit() || c == '.')
        .unwrap_or(rest.len());
    let (unit, rest) = rest.split_at(unit_len);
    let scale = unit_nanos(unit)?;
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = whole.checked_mul(scale)?;
    // Digits past nanosecond precision (at most 18 of them count) change nothing.
    let fraction = &fraction[..fraction.len().min(18)];
    if !fraction.is_empty() {
        let denominator = 10u128.pow(fraction.len() as u32);
        nanos = nanos.checked_add(fraction.parse::<u128>().ok()? * scale / denominator)?;
    }
    Some((nanos, rest))
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// A timeout flag's value in whole seconds: at least one second (the
/// datapath's clock counts seconds), a fraction rounded up.
pub fn parse_timeout(text: &str) -> Result<u32, String> {
    let duration = parse_duration(text)?;
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    if seconds == 0 {
        return Err(format!("{text:?}: a timeout must be at least 1s"));
    }
    u32::try_from(seconds).map_err(|_| format!("{text:?}: at most {}s", u32::MAX))
}

/// The garbage collection interval: at least one second, as entries age in
/// whole seconds.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < Duration::from_secs(1) {
        return Err(format!("{text:?}: the interval must be at least 1s"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{CT_STATE_ESTABLISHED, CT_STATE_OPEN, IPPROTO_SCTP};

    #[test]
    fn defaults_follow_kube_proxy_and_the_brief() {
        let t = Timeouts::default();
        let table = [
            (IPPROTO_TCP, CT_STATE_SYN, 60),
            (IPPROTO_TCP, CT_STATE_ESTABLISHED, 86_400),
            (IPPROTO_TCP, CT_STATE_FIN, 10),
            (IPPROTO_TCP, CT_STATE_RST, 10),
            // Unknown or impossible TCP states live as long as open connections.
            (IPPROTO_TCP, CT_STATE_OPEN, 86_400),
            (IPPROTO_TCP, 200, 86_400),
            (IPPROTO_UDP, CT_STATE_OPEN, 60),
            // UDP has no state; whatever the byte says, UDP's timeout.
            (IPPROTO_UDP, CT_STATE_FIN, 60),
            (IPPROTO_SCTP, CT_STATE_OPEN, 300),
            (1, CT_STATE_OPEN, 300),
        ];
        for (proto, state, want) in table {
            assert_eq!(t.of(proto, state), want, "proto {proto} state {state}");
        }
    }

    #[test]
    fn each_field_is_used_for_its_case() {
        let t = Timeouts {
            tcp_syn: 1,
            tcp_established: 2,
            tcp_fin: 3,
            tcp_rst: 4,
            udp: 5,
            other: 6,
        };
        assert_eq!(t.of(IPPROTO_TCP, CT_STATE_SYN), 1);
        assert_eq!(t.of(IPPROTO_TCP, CT_STATE_ESTABLISHED), 2);
        assert_eq!(t.of(IPPROTO_TCP, CT_STATE_FIN), 3);
        assert_eq!(t.of(IPPROTO_TCP, CT_STATE_RST), 4);
        assert_eq!(t.of(IPPROTO_UDP, CT_STATE_OPEN), 5);
        assert_eq!(t.of(IPPROTO_SCTP, CT_STATE_OPEN), 6);
    }

    #[test]
    fn durations_parse_as_go_does() {
        let ok = [
            ("24h", 86_400_000),
            ("10s", 10_000),
            ("1h30m", 5_400_000),
            ("24h0m0s", 86_400_000),
            ("1.5h", 5_400_000),
            (".5s", 500),
            ("1.s", 1_000),
            ("300ms", 300),
            ("1500us", 1),
            ("2m3s", 123_000),
            ("+5s", 5_000),
            ("0", 0),
            // Plain numbers are seconds.
            ("90", 90_000),
            (" 15 ", 15_000),
        ];
        for (text, millis) in ok {
            assert_eq!(
                parse_duration(text).map(|d| d.as_millis()),
                Ok(millis),
                "{text}"
            );
        }
        assert_eq!(parse_duration("1ns"), Ok(Duration::from_nanos(1)));
        assert_eq!(parse_duration("1\u{b5}s"), Ok(Duration::from_micros(1)));
        assert_eq!(parse_duration("1\u{3bc}s"), Ok(Duration::from_micros(1)));
        let bad = [
            "",
            "h",
            "10x",
            "1d",
            "-1s",
            "1h 30m",
            "1.s.",
            "s10",
            "1e3s",
            ".",
            "1h-5m",
            "99999999999999999999h",
        ];
        for text in bad {
            assert!(parse_duration(text).is_err(), "{text:?} must be refused");
        }
    }

    #[test]
    fn timeouts_are_whole_seconds_of_at_least_one() {
        assert_eq!(parse_timeout("24h"), Ok(86_400));
        assert_eq!(parse_timeout("10"), Ok(10));
        assert_eq!(parse_timeout("1500ms"), Ok(2), "fractions round up");
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_timeout("1ms"), Ok(1));
        assert!(parse_timeout("200000000h").is_err(), "beyond u32 seconds");
        assert_eq!(parse_interval("10s"), Ok(Duration::from_secs(10)));
        assert!(parse_interval("500ms").is_err());
    }
}
