//! Rate-limited logging for events a misbehaving fleet can produce by the thousand (dead
//! letters, drops, sequence gaps): each kind logs at most `PER_WINDOW` lines per 10 s window, and
//! the first line of the next window says how many were left out. Every event is counted in the
//! metrics either way; the log shows examples, not a copy of the counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines per window, per kind.
const PER_WINDOW: u64 = 20;
const WINDOW_MS: u64 = 10_000;

/// One kind of event's log budget. `const`-constructible, for statics.
pub struct LogBudget {
    what: &'static str,
    /// Start of the current window, ms since the epoch.
    window_start_ms: AtomicU64,
    logged: AtomicU64,
    suppressed: AtomicU64,
}

impl LogBudget {
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            window_start_ms: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether one more line may be logged now. Racing callers may let a line or two more
    /// through at a window's turn; the bound holds otherwise.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS
            && self.window_start_ms.compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
            let left_out = self.suppressed.swap(0, Ordering::Relaxed);
            if left_out > 0 {
                tracing::warn!(
                    what = self.what,
                    left_out,
                    "log lines left out in the last window (rate limit; see the metrics)"
                );
            }
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < PER_WINDOW {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Undecodable payloads stored as dead letters.
pub static DEAD_LETTERS: LogBudget = LogBudget::new("dead letters");
/// Records dropped under `when_full = "drop_newest"`.
pub static DROPS: LogBudget = LogBudget::new("dropped records");
/// What the source table notices (gaps, restarts, schema changes).
pub static SOURCE_EVENTS: LogBudget = LogBudget::new("source events");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lets_its_budget_through_and_counts_the_rest() {
        let budget = LogBudget::new("test");
        let allowed = (0..100).filter(|_| budget.allow()).count();
        assert_eq!(allowed, PER_WINDOW as usize);
        assert_eq!(budget.suppressed.load(Ordering::Relaxed), 100 - PER_WINDOW);
        // A new window starts the count again.
        budget.window_start_ms.store(0, Ordering::Relaxed);
        assert!(budget.allow());
        assert_eq!(budget.suppressed.load(Ordering::Relaxed), 0);
    }
}
