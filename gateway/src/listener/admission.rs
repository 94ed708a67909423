//! Admission control at accept: a token bucket on new connections per listener and a cap on
//! connections per source address. A refused connection is answered at once and closed (MQTT:
//! a CONNACK saying why, when the CONNECT comes quickly; other protocols: closed), never left
//! hanging, and counted by reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdmissionConfig;
use crate::metrics::{Metrics, ProtocolReasonLabel};

/// Refused connections being answered at once; beyond this many, a refused connection is
/// closed without an answer (a flood must not buy itself tasks).
const ANSWERING: usize = 256;
/// The longest a refused MQTT connection is given to send its CONNECT (to be told why).
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// More new connections than `max_connection_rate` allows (with `connection_burst`).
    Rate,
    /// Its source address holds `max_connections_per_ip` connections already.
    PerAddress,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate => "rate",
            Refusal::PerAddress => "per_ip",
        }
    }
}

/// One listener's admission state.
#[derive(Debug)]
pub struct Admission {
    config: AdmissionConfig,
    bucket: Mutex<Bucket>,
    per_address: Mutex<HashMap<IpAddr, u32>>,
    answering: Arc<Semaphore>,
    refused_rate: Counter,
    refused_per_ip: Counter,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// A connection's share of its source address's count, returned when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.per_address.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig, protocol: &'static str, metrics: &Metrics) -> Arc<Self> {
        let refused = |reason| {
            metrics.connections_refused.get_or_create(&ProtocolReasonLabel { protocol, reason }).clone()
        };
        Arc::new(Admission {
            bucket: Mutex::new(Bucket {
                tokens: f64::from(config.connection_burst),
                refilled: Instant::now(),
            }),
            per_address: Mutex::new(HashMap::new()),
            answering: Arc::new(Semaphore::new(ANSWERING)),
            refused_rate: refused(Refusal::Rate.label()),
            refused_per_ip: refused(Refusal::PerAddress.label()),
            config,
        })
    }

    /// Admits a new connection from `ip` at `now`, or says why not (and counts it).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Option<AddressSlot>, Refusal> {
        let refusal = self.check(ip, now);
        match refusal {
            Ok(slot) => Ok(slot),
            Err(Refusal::Rate) => {
                self.refused_rate.inc();
                Err(Refusal::Rate)
            }
            Err(Refusal::PerAddress) => {
                self.refused_per_ip.inc();
                Err(Refusal::PerAddress)
            }
        }
    }

    fn check(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Option<AddressSlot>, Refusal> {
        let max_per_ip = self.config.max_connections_per_ip;
        if max_per_ip > 0 {
            let counts = self.per_address.lock().unwrap_or_else(PoisonError::into_inner);
            if counts.get(&ip).is_some_and(|n| *n as usize >= max_per_ip) {
                return Err(Refusal::PerAddress);
            }
        }
        if self.config.max_connection_rate > 0 {
            let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
            let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
            let burst = f64::from(self.config.connection_burst);
            bucket.tokens = (bucket.tokens + elapsed * f64::from(self.config.max_connection_rate)).min(burst);
            bucket.refilled = now;
            if bucket.tokens < 1.0 {
                return Err(Refusal::Rate);
            }
            bucket.tokens -= 1.0;
        }
        if max_per_ip == 0 {
            return Ok(None);
        }
        *self.per_address.lock().unwrap_or_else(PoisonError::into_inner).entry(ip).or_insert(0) += 1;
        Ok(Some(AddressSlot { admission: Arc::clone(self), ip }))
    }

    /// A permit to answer one refused connection, if fewer than [`ANSWERING`] are being
    /// answered; otherwise the connection is just closed.
    pub fn answering(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.answering).try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(rate: u32, burst: u32, per_ip: usize) -> Arc<Admission> {
        let config = AdmissionConfig {
            max_connection_rate: rate,
            connection_burst: burst,
            max_connections_per_ip: per_ip,
        };
        Admission::new(config, "mqtt", &Metrics::new())
    }

    #[test]
    fn the_bucket_admits_the_burst_then_the_rate() {
        let a = admission(100, 10, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let admitted = (0..50).filter(|_| a.admit(ip, t0).is_ok()).count();
        assert_eq!(admitted, 10, "the burst");
        // 100/s: 50 ms later, 5 more.
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!((0..50).filter(|_| a.admit(ip, t1).is_ok()).count(), 5);
        // Never more than the burst, however long it was quiet.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..50).filter(|_| a.admit(ip, t2).is_ok()).count(), 10);
        assert_eq!(a.refused_rate.get(), 40 + 45 + 40);
    }

    #[test]
    fn an_address_holds_at_most_its_share_until_a_connection_ends() {
        let a = admission(0, 0, 2);
        let (one, two): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        let first = a.admit(one, now).unwrap();
        let _second = a.admit(one, now).unwrap();
        assert_eq!(a.admit(one, now).unwrap_err(), Refusal::PerAddress);
        let _other = a.admit(two, now).unwrap();
        drop(first);
        let _third = a.admit(one, now).unwrap();
        assert_eq!(a.refused_per_ip.get(), 1);
    }
}
