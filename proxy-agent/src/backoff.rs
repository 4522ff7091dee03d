//! When to retry a programming pass that failed: 1 s after the first
//! failure, then twice as long after each failed retry, at most 30 s, and
//! from 1 s again after a pass succeeds. A failure that persists (a full
//! map, a kernel refusing writes) then costs a full pass every 30 s, not
//! every second.

use std::time::{Duration, Instant};

pub const FIRST: Duration = Duration::from_secs(1);
pub const MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Backoff {
    /// The wait after the next failure.
    delay: Duration,
    /// When the pending retry is due (None: nothing to retry).
    due: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            delay: FIRST,
            due: None,
        }
    }
}

impl Backoff {
    /// A pass failed at `now`: a retry is due after the current delay,
    /// which doubles for the next failure. A retry already pending keeps
    /// its time (more failures before it do not push it out).
    pub fn failed(&mut self, now: Instant) {
        if self.due.is_some() {
            return;
        }
        self.due = Some(now + self.delay);
        self.delay = (self.delay * 2).min(MAX);
    }

    /// A full pass succeeded: nothing to retry, and the next failure
    /// waits the first delay again.
    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    /// True if a retry is pending and due at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|due| due <= now)
    }

    /// True if a retry is pending.
    pub fn pending(&self) -> bool {
        self.due.is_some()
    }

    /// Takes the pending retry (the pass runs now; its outcome calls
    /// `failed` or `succeeded`).
    pub fn start(&mut self) {
        self.due = None;
    }

    /// When the pending retry is due.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits between failed retries, from the first failure on.
    #[test]
    fn waits_double_up_to_the_cap_and_reset_on_success() {
        let mut b = Backoff::default();
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..8 {
            b.failed(now);
            let due = b.due().expect("a retry is pending");
            waits.push((due - now).as_secs());
            assert!(!b.is_due(due - Duration::from_millis(1)));
            assert!(b.is_due(due));
            now = due;
            b.start();
            assert!(!b.pending());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.succeeded();
        b.failed(now);
        assert_eq!(b.due(), Some(now + FIRST), "a success resets the delay");
    }

    #[test]
    fn failures_before_a_pending_retry_do_not_delay_it() {
        let mut b = Backoff::default();
        let now = Instant::now();
        b.failed(now);
        b.failed(now + Duration::from_millis(500));
        assert_eq!(b.due(), Some(now + FIRST));
    }
}
