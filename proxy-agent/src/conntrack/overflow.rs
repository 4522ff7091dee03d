//! When the datapath may stop looking in the overflow maps.
//!
//! `ct_overflowed` keeps a conntrack miss down to one lookup: while it is 0
//! the datapath never looks in `ct4_overflow`/`ct6_overflow`. The datapath
//! sets it before and after it inserts an overflow entry; only garbage
//! collection clears it, once both overflow maps are empty. Pure: the maps are reached
//! through the two functions it is given, so the order is tested alone.

/// Clears the flag if both overflow maps are `empty`, and sets it back if
/// an entry arrived meanwhile; whether the flag is left set.
///
/// Read, clear, read again: an insert whose first flag write the clear
/// undid either has its entry in place by the second read, which sets the
/// flag back, or sets the flag itself after its insert. While entries exist
/// every pass writes the flag, which also repairs a pass whose write failed.
pub fn settle(
    mut empty: impl FnMut() -> anyhow::Result<bool>,
    mut set: impl FnMut(u32) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    if empty()? {
        set(0)?;
        if empty()? {
            return Ok(false);
        }
    }
    set(1)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Runs `settle` against maps that read as `reads` says, in turn; the
    /// steps taken (`read` or the value written) and the result.
    fn run(reads: &[bool]) -> (Vec<String>, Option<bool>) {
        let steps = RefCell::new(Vec::new());
        let mut reads = reads.iter().copied();
        let result = settle(
            || {
                steps.borrow_mut().push("read".to_string());
                reads
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("unexpected read"))
            },
            |value| {
                steps.borrow_mut().push(format!("set {value}"));
                Ok(())
            },
        );
        (steps.into_inner(), result.ok())
    }

    #[test]
    fn empty_maps_clear_the_flag() {
        assert_eq!(
            run(&[true, true]),
            (
                vec!["read".into(), "set 0".into(), "read".into()],
                Some(false)
            )
        );
    }

    #[test]
    fn entries_keep_the_flag_set() {
        assert_eq!(
            run(&[false]),
            (vec!["read".into(), "set 1".into()], Some(true))
        );
    }

    /// An insert between the first read and the second: the flag goes back.
    #[test]
    fn an_entry_that_arrives_while_clearing_sets_it_back() {
        assert_eq!(
            run(&[true, false]),
            (
                vec!["read".into(), "set 0".into(), "read".into(), "set 1".into()],
                Some(true)
            )
        );
    }

    #[test]
    fn a_failed_read_writes_nothing() {
        let mut wrote = false;
        let result = settle(
            || Err(anyhow::anyhow!("EPERM")),
            |_| {
                wrote = true;
                Ok(())
            },
        );
        assert!(result.is_err());
        assert!(!wrote);
    }
}
