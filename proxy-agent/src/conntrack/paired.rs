//! When the datapath may stop looking for entries other than `CT_SOCKET`.
//!
//! Most flows have one `CT_SOCKET` entry. `ct_paired` has two marks, each
//! keeping a kind of lookup alive while it is up:
//! - `CT_MARK_PAIRS`: flows whose client port another live flow already
//!   holds get a forward and a reply entry;
//! - `CT_MARK_SOURCE_NAT`: source-NATed flows' entries (their socket entry,
//!   which names their node port, and their node-port `CT_REWRITE_DST`
//!   entry; a pair's outward entry).
//!
//! The datapath raises a mark once it writes such an entry; only garbage
//! collection clears it, once no such entry is left in any conntrack map,
//! with `overflow::settle`'s read, clear, read again. Pure: the maps are
//! reached through the functions it is given.

use proxy_common::{
    CT_MARK_PAIRS, CT_MARK_SOURCE_NAT, CT_MARKS, CT_OUTWARD, CT_REPLY, CT_REWRITE_DST, CT_SOCKET,
    CT_SOURCE_NAT,
};

use super::overflow;

/// The marks of `ct_paired`, by index.
pub const MARKS: [u32; CT_MARKS as usize] = [CT_MARK_PAIRS, CT_MARK_SOURCE_NAT];

/// The mark an entry with this direction and these flags keeps up, if
/// any: source-NATed flows' entries their own, every other entry but a
/// `CT_SOCKET` one (a legacy egress direction included) the pairs'.
pub fn mark_of(direction: u8, flags: u16) -> Option<u32> {
    match direction {
        CT_SOCKET if flags & CT_SOURCE_NAT != 0 => Some(CT_MARK_SOURCE_NAT),
        CT_SOCKET => None,
        CT_REPLY if flags & (CT_OUTWARD | CT_REWRITE_DST) != 0 => Some(CT_MARK_SOURCE_NAT),
        _ => Some(CT_MARK_PAIRS),
    }
}

/// How many of the entries (direction, flags) keep up each mark, by index.
pub fn count(entries: impl IntoIterator<Item = (u8, u16)>) -> [usize; CT_MARKS as usize] {
    let mut counts = [0; CT_MARKS as usize];
    for (direction, flags) in entries {
        if let Some(mark) = mark_of(direction, flags) {
            counts[mark as usize] += 1;
        }
    }
    counts
}

/// Settles the flag, which reads `flag` now, after a pass that left `left`
/// pair entries in the maps; whether the flag is left set.
///
/// The pass's own count is the first read, so a pass that still sees
/// pairs costs no more than its single write. `none_left` (the read after
/// the clear) walks the maps again, but only when the flag goes from set
/// to clear: a flag already clear with nothing left is not written at all,
/// so nothing the datapath set can be undone, and it needs no second read.
///
/// On an error the flag is set again if it can be: a flag left clear would
/// hide the pairs written since the pass counted until the next pass, a
/// flag left set costs lookups only.
pub fn settle(
    flag: u32,
    left: usize,
    mut none_left: impl FnMut() -> anyhow::Result<bool>,
    mut set: impl FnMut(u32) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    if flag == 0 && left == 0 {
        return Ok(false);
    }
    let mut counted = Some(left == 0);
    let empty = || match counted.take() {
        Some(none) => Ok(none),
        None => none_left(),
    };
    let settled = overflow::settle(empty, &mut set);
    if settled.is_err() {
        // The error is what the caller reports; this write is a best effort.
        let _ = set(1);
    }
    settled
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use proxy_common::{CT_AT_EGRESS, CT_FORWARD, CT_UNREPLIED};

    use crate::conntrack::upgrade::LEGACY_EGRESS;

    #[test]
    fn each_entry_keeps_up_its_own_mark() {
        let entries = [
            (CT_SOCKET, CT_SOURCE_NAT | CT_AT_EGRESS),
            (CT_FORWARD, 0),
            (CT_SOCKET, 0),
            (CT_REPLY, 0),
            (CT_REPLY, CT_SOURCE_NAT | CT_AT_EGRESS),
            (CT_REPLY, CT_OUTWARD),
            (CT_REPLY, CT_REWRITE_DST | CT_UNREPLIED),
            (LEGACY_EGRESS, CT_OUTWARD),
        ];
        assert_eq!(count(entries), [4, 3]);
        assert_eq!(count([(CT_SOCKET, 0), (CT_SOCKET, CT_AT_EGRESS)]), [0, 0]);
        assert_eq!(count([]), [0, 0]);
    }

    /// Runs `settle` with the flag reading `flag`, `left` pairs counted,
    /// and the maps re-read as `rereads` says in turn; the steps taken and
    /// the result.
    fn run(flag: u32, left: usize, rereads: &[bool]) -> (Vec<String>, Option<bool>) {
        let steps = RefCell::new(Vec::new());
        let mut rereads = rereads.iter().copied();
        let result = settle(
            flag,
            left,
            || {
                steps.borrow_mut().push("reread".to_string());
                rereads
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("unexpected reread"))
            },
            |value| {
                steps.borrow_mut().push(format!("set {value}"));
                Ok(())
            },
        );
        (steps.into_inner(), result.ok())
    }

    /// (flag, pairs left, rereads) -> (steps, flag left set).
    type Row = (u32, usize, &'static [bool], &'static [&'static str], bool);

    #[test]
    fn the_flag_is_cleared_only_when_no_pair_is_left_after_the_clear() {
        let table: [Row; 6] = [
            // Pairs left: set, whatever the flag read; no walk.
            (1, 3, &[], &["set 1"], true),
            (0, 1, &[], &["set 1"], true),
            // Clear already, nothing left: no write, no walk.
            (0, 0, &[], &[], false),
            // The last pair went: clear, and the walk finds none.
            (1, 0, &[true], &["set 0", "reread"], false),
            // A pair written while clearing: set back.
            (1, 0, &[false], &["set 0", "reread", "set 1"], true),
            // A flag some other value than 1 counts as set.
            (7, 0, &[true], &["set 0", "reread"], false),
        ];
        for (flag, left, rereads, steps, set) in table {
            let steps: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                run(flag, left, rereads),
                (steps, Some(set)),
                "flag {flag}, {left} left"
            );
        }
    }

    #[test]
    fn a_failed_reread_sets_the_flag_again() {
        let mut writes = Vec::new();
        let result = settle(
            1,
            0,
            || Err(anyhow::anyhow!("EPERM")),
            |value| {
                writes.push(value);
                Ok(())
            },
        );
        assert!(result.is_err(), "the pass reports it; the next one retries");
        assert_eq!(writes, [0, 1]);
    }
}
