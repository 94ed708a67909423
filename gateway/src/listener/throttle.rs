//! Per-connection message and byte rates: a device over its rate is paused, not dropped.
//!
//! Each limit is a token bucket in its GCRA form (one "theoretical arrival time" per limit
//! instead of a token count and a refill clock): a message costs `1 / rate` seconds of the
//! device's budget per message (and per byte), the budget may run ahead of the clock by up to
//! one second (the burst: one second's worth at full rate), and a device that went beyond it is
//! not read again until the clock catches up. What was read is always handled: nothing is
//! dropped and no message is refused; the device only waits, as it does when the fabric is
//! full (its socket is not read, the kernel window closes, its writes block).
//!
//! One connection is one device for MQTT (the client id is taken over by a newer connection);
//! a raw TCP or WebSocket connection carries the device it names.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{Metrics, ProtocolLabel, ProtocolReasonLabel};

/// How far a device's budget may run ahead of the clock: its burst is one second at full rate.
const BURST: Duration = Duration::from_secs(1);
/// A paused device is read again once this much of its burst is free, not as soon as one
/// message fits: a device held at its rate is woken about ten times a second, not per message.
const RESUME_ROOM: Duration = Duration::from_millis(100);

/// A listener's per-connection rates; 0 is no limit. Shared by the listener's connections and
/// changed in place by a config reload (the next message is charged at the new rate).
#[derive(Debug, Default)]
pub struct RateLimits {
    messages_per_s: AtomicU32,
    bytes_per_s: AtomicU64,
}

impl RateLimits {
    pub fn new(messages_per_s: u32, bytes_per_s: u64) -> Self {
        Self { messages_per_s: AtomicU32::new(messages_per_s), bytes_per_s: AtomicU64::new(bytes_per_s) }
    }

    pub fn set(&self, messages_per_s: u32, bytes_per_s: u64) {
        self.messages_per_s.store(messages_per_s, Ordering::Relaxed);
        self.bytes_per_s.store(bytes_per_s, Ordering::Relaxed);
    }

    /// Messages and bytes per second now.
    pub fn get(&self) -> (u32, u64) {
        (self.messages_per_s.load(Ordering::Relaxed), self.bytes_per_s.load(Ordering::Relaxed))
    }
}

/// Which rate paused a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    Messages,
    Bytes,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::Messages => "messages",
            Limit::Bytes => "bytes",
        }
    }
}

/// A pause: the connection is not read until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    pub until: Instant,
    pub limit: Limit,
}

/// One connection's budget: kept small, every idle connection carries it.
#[derive(Debug, Default)]
pub struct Throttle {
    /// When the device's message (byte) budget is used up to, in nanoseconds since `origin`;
    /// behind the clock when it has budget left.
    messages_at: u64,
    bytes_at: u64,
    /// The connection is paused until then.
    paused_until: Option<Instant>,
}

/// The clock the budgets are kept on: nanoseconds since the process's first throttle (so that
/// a budget is an integer, not an `Instant`). A time before it counts as it.
fn now_ns(now: Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// Charges `cost` units at `per_s` units per second to the budget at `at`; returns the time
/// (ns) at which it is back within the burst with `RESUME_ROOM` to spare, if it is beyond the
/// burst now.
fn charge(at: &mut u64, now: u64, cost: u64, per_s: u64) -> Option<u64> {
    if per_s == 0 {
        return None;
    }
    let cost_ns = u64::try_from(u128::from(cost) * 1_000_000_000 / u128::from(per_s)).unwrap_or(u64::MAX);
    *at = (*at).max(now).saturating_add(cost_ns);
    let burst = BURST.as_nanos() as u64;
    (at.saturating_sub(burst) > now).then(|| at.saturating_sub(burst) + RESUME_ROOM.as_nanos() as u64)
}

impl Throttle {
    /// Charges one message of `bytes` to the budget (after it was read: it is handled either
    /// way). Returns the pause it earned, if the device is now over one of its rates.
    pub fn charge(&mut self, limits: &RateLimits, bytes: usize, now: Instant) -> Option<Pause> {
        let (messages_per_s, bytes_per_s) = limits.get();
        if messages_per_s == 0 && bytes_per_s == 0 {
            return None;
        }
        let t = now_ns(now);
        let by_messages =
            charge(&mut self.messages_at, t, 1, messages_per_s.into()).map(|at| (at, Limit::Messages));
        let by_bytes = charge(&mut self.bytes_at, t, bytes as u64, bytes_per_s).map(|at| (at, Limit::Bytes));
        let (at, limit) = match (by_messages, by_bytes) {
            (Some(m), Some(b)) => m.max(b),
            (m, b) => m.or(b)?,
        };
        let until = now + Duration::from_nanos(at - t);
        self.paused_until = Some(until);
        Some(Pause { until, limit })
    }

    /// Whether the connection must not be read now.
    pub fn is_paused(&self) -> bool {
        self.paused_until.is_some()
    }

    /// When reading may resume, while paused.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Ends a pause whose time has come; true if reading may go on.
    pub fn resume_if_due(&mut self, now: Instant) -> bool {
        if self.paused_until.is_some_and(|until| until > now) {
            return false;
        }
        self.paused_until = None;
        true
    }
}

/// Counts a pause (`weir_throttled_total`, `weir_throttled_seconds_total`).
pub fn count_pause(metrics: &Metrics, protocol: &'static str, pause: Pause, now: Instant) {
    metrics.throttled.get_or_create(&ProtocolReasonLabel { protocol, reason: pause.limit.label() }).inc();
    let seconds = pause.until.saturating_duration_since(now).as_secs_f64();
    metrics.throttled_seconds.get_or_create(&ProtocolLabel { protocol }).inc_by(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages at `rate` per second arriving as fast as they are let in: how many in `span`.
    fn admitted_in(limits: RateLimits, bytes: usize, span: Duration) -> (usize, Option<Limit>) {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        let (mut now, mut n, mut limit) = (start, 0, None);
        while now < start + span {
            n += 1;
            if let Some(pause) = throttle.charge(&limits, bytes, now) {
                assert!(pause.until > now);
                limit = Some(pause.limit);
                assert!(!throttle.resume_if_due(now));
                now = pause.until;
                assert!(throttle.resume_if_due(now));
            }
        }
        (n, limit)
    }

    #[test]
    fn a_device_gets_its_burst_then_its_rate() {
        // 1,000 messages/s: one second of burst at once, then 1,000 a second.
        let (n, limit) = admitted_in(RateLimits::new(1_000, 0), 10, Duration::from_secs(5));
        assert!((5_900..=6_001).contains(&n), "{n} messages in 5 s");
        assert_eq!(limit, Some(Limit::Messages));

        // 1 MB/s of 10 kB messages: the byte rate binds, not the (ample) message rate.
        let (n, limit) = admitted_in(RateLimits::new(1_000_000, 1_000_000), 10_000, Duration::from_secs(5));
        assert!((590..=601).contains(&n), "{n} messages in 5 s");
        assert_eq!(limit, Some(Limit::Bytes));
    }

    #[test]
    fn no_limit_never_pauses() {
        let mut throttle = Throttle::default();
        let now = Instant::now();
        for _ in 0..100_000 {
            assert_eq!(throttle.charge(&RateLimits::default(), 1 << 20, now), None);
        }
        assert!(!throttle.is_paused());
    }

    #[test]
    fn a_quiet_device_earns_its_burst_back_but_no_more() {
        let limits = RateLimits::new(100, 0);
        let mut throttle = Throttle::default();
        let start = Instant::now();
        // 100 at once fit the burst; the 101st pauses.
        let paused = (0..101).position(|_| throttle.charge(&limits, 1, start).is_some());
        assert_eq!(paused, Some(100));
        // An hour of silence earns one burst, not an hour's worth.
        let later = start + Duration::from_secs(3600);
        assert!(throttle.resume_if_due(later));
        let paused = (0..1_000).position(|_| throttle.charge(&limits, 1, later).is_some());
        assert_eq!(paused, Some(100));
    }

    #[test]
    fn one_message_larger_than_the_burst_is_let_in_and_paid_for() {
        let limits = RateLimits::new(0, 1_000);
        let mut throttle = Throttle::default();
        let now = Instant::now();
        let pause = throttle.charge(&limits, 5_000, now).expect("paused");
        // 5 s of budget, 1 s of it the burst: 4 s of waiting, and 0.1 s for room to read on.
        assert_eq!(pause.until - now, Duration::from_millis(4_100));
        assert_eq!(pause.limit, Limit::Bytes);
    }
}
