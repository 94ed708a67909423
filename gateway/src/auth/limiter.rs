//! Failed-authentication rate limit per source address: a token bucket per address that each
//! failure empties by one and time refills. With the bucket empty, an attempt is refused at
//! once without checking its credentials (brute force gets neither answers nor CPU). The table
//! is bounded: addresses whose bucket is full again carry no information and are dropped first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Addresses tracked at most; beyond, refilled entries are swept, then arbitrary ones evicted
/// (a flood from many addresses can only make the limit forget, never grow memory).
pub const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
pub struct FailureLimiter {
    burst: f64,
    per_second: f64,
    max_tracked: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl FailureLimiter {
    /// `burst` failures at once from one address, then `per_minute` more each minute.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Self::with_capacity(burst, per_minute, MAX_TRACKED)
    }

    fn with_capacity(burst: u32, per_minute: u32, max_tracked: usize) -> Self {
        Self {
            burst: f64::from(burst),
            per_second: f64::from(per_minute) / 60.0,
            max_tracked,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an attempt from `ip` may be checked at `now` (its bucket is not empty).
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        match buckets.get_mut(&key(ip)) {
            None => true,
            Some(bucket) => {
                self.refill(bucket, now);
                bucket.tokens >= 1.0
            }
        }
    }

    /// Records a failed attempt from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let ip = key(ip);
        if !buckets.contains_key(&ip) && buckets.len() >= self.max_tracked {
            buckets.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
                b.tokens + elapsed * self.per_second < self.burst
            });
            if buckets.len() >= self.max_tracked {
                if let Some(victim) = buckets.keys().next().copied() {
                    buckets.remove(&victim);
                }
            }
        }
        let bucket = buckets.entry(ip).or_insert(Bucket { tokens: self.burst, refilled: now });
        self.refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.refilled = now;
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// IPv6 addresses are limited per /64 (one host usually holds a whole /64); IPv4 per address.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn failures_empty_the_bucket_and_time_refills_it() {
        let limiter = FailureLimiter::new(3, 60);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.allows(a, t0));
            limiter.failed(a, t0);
        }
        assert!(!limiter.allows(a, t0), "three failures: the fourth attempt is not checked");
        assert!(limiter.allows(b, t0), "another address is not affected");
        assert!(!limiter.allows(a, t0 + Duration::from_millis(900)));
        assert!(limiter.allows(a, t0 + Duration::from_secs(1)), "one a second comes back");
    }

    #[test]
    fn ipv6_is_limited_per_slash_64() {
        let limiter = FailureLimiter::new(1, 1);
        let t0 = Instant::now();
        limiter.failed("2001:db8::1".parse().unwrap(), t0);
        assert!(!limiter.allows("2001:db8::ffff:2".parse().unwrap(), t0));
        assert!(limiter.allows("2001:db8:0:1::1".parse().unwrap(), t0));
        limiter.failed("::ffff:10.1.2.3".parse().unwrap(), t0);
        assert!(!limiter.allows("10.1.2.3".parse().unwrap(), t0));
    }

    #[test]
    fn the_table_is_bounded() {
        let limiter = FailureLimiter::with_capacity(2, 60, 100);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            limiter.failed(IpAddr::V4(i.into()), t0);
        }
        assert!(limiter.tracked() <= 100);
        // Refilled entries go first: a later flood keeps the recent offenders' state.
        let later = t0 + Duration::from_secs(10);
        let offender: IpAddr = "192.0.2.1".parse().unwrap();
        limiter.failed(offender, later);
        limiter.failed(offender, later);
        for i in 0..99u32 {
            limiter.failed(IpAddr::V4((1_000_000 + i).into()), later);
        }
        assert!(!limiter.allows(offender, later));
    }
}
