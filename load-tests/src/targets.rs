//! The servers a flood spreads its devices over (`flood --targets`), which one each device tries
//! next, and per-target connection counts for the report.
//!
//! Devices are assigned round-robin (device `i` starts on target `i % n`). A device whose
//! connect or reconnect to its target fails moves on to the next target in the list, as a device
//! behind DNS or an L4 load balancer would; after a dropped connection it tries the target it
//! was on first (a restarted server comes back at the same address), and moves on only if that
//! fails.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::DeviceProgress;

/// One MQTT server: a host name or IP address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Target { host: host.into(), port }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target { host: addr.ip().to_string(), port: addr.port() }
    }
}

impl FromStr for Target {
    type Err = String;

    /// `host:port`, `ip:port` or `[ipv6]:port`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (host, port) = text.rsplit_once(':').ok_or_else(|| format!("{text:?}: expected host:port"))?;
        let host = match host.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']').ok_or_else(|| format!("{text:?}: unclosed '['"))?,
            None if host.contains(':') => {
                return Err(format!("{text:?}: write an IPv6 address as [addr]:port"))
            }
            None => host,
        };
        if host.is_empty() {
            return Err(format!("{text:?}: the host is empty"));
        }
        let port = port.parse().map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
        Ok(Target::new(host, port))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The target device `index` starts on, of `targets` (round-robin).
pub fn first_target(index: usize, targets: usize) -> usize {
    index % targets.max(1)
}

/// The target a device tries after a failed connect to `current`: the next one in the list,
/// wrapping around (with one target, the same one again).
pub fn next_target(current: usize, targets: usize) -> usize {
    (current + 1) % targets.max(1)
}

/// Counters of one target, shared by every device of a flood.
#[derive(Debug, Default)]
struct TargetCounters {
    assigned: AtomicU64,
    connections: AtomicU64,
    reconnects: AtomicU64,
    failed_connects: AtomicU64,
    dropped: AtomicU64,
}

/// Every target of one flood and its counters; the devices record what happens on each.
#[derive(Debug)]
pub struct TargetBook {
    targets: Vec<Target>,
    counters: Vec<TargetCounters>,
}

/// Sentinel in [`DeviceProgress::target`]: the device never connected.
pub(crate) const NO_TARGET: usize = usize::MAX;

impl TargetBook {
    /// The book for `targets` (at least one).
    pub fn new(targets: Vec<Target>) -> Arc<Self> {
        assert!(!targets.is_empty(), "a flood needs at least one target");
        let counters = targets.iter().map(|_| TargetCounters::default()).collect();
        Arc::new(TargetBook { targets, counters })
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn target(&self, index: usize) -> &Target {
        &self.targets[index]
    }

    /// Assigns device `index` its first target and counts it there.
    pub(crate) fn assign(&self, index: usize) -> usize {
        let target = first_target(index, self.len());
        self.counters[target].assigned.fetch_add(1, Ordering::SeqCst);
        target
    }

    /// A connection to `target` was accepted (CONNACK); `reconnect` when the device had one
    /// before. The device's current target becomes `target`.
    pub(crate) fn connected(&self, target: usize, reconnect: bool, progress: &DeviceProgress) {
        let counters = &self.counters[target];
        counters.connections.fetch_add(1, Ordering::SeqCst);
        if reconnect {
            counters.reconnects.fetch_add(1, Ordering::SeqCst);
        }
        progress.target.store(target, Ordering::SeqCst);
    }

    /// A connect to `target` failed; returns the target to try next.
    pub(crate) fn connect_failed(&self, target: usize) -> usize {
        self.counters[target].failed_connects.fetch_add(1, Ordering::SeqCst);
        next_target(target, self.len())
    }

    /// A live connection to `target` broke (closed by the server, reset, unwritable).
    pub(crate) fn dropped(&self, target: usize) {
        self.counters[target].dropped.fetch_add(1, Ordering::SeqCst);
    }

    /// The counts now; `devices` gives where each device is (or was last) connected.
    pub(crate) fn counts(&self, devices: &[Arc<DeviceProgress>]) -> Vec<TargetCount> {
        let mut counts: Vec<TargetCount> = self
            .targets
            .iter()
            .zip(&self.counters)
            .map(|(target, c)| TargetCount {
                target: target.to_string(),
                assigned: c.assigned.load(Ordering::SeqCst),
                connections: c.connections.load(Ordering::SeqCst),
                reconnects: c.reconnects.load(Ordering::SeqCst),
                failed_connects: c.failed_connects.load(Ordering::SeqCst),
                dropped: c.dropped.load(Ordering::SeqCst),
                devices_here: 0,
            })
            .collect();
        for device in devices {
            if let Some(count) = counts.get_mut(device.target.load(Ordering::SeqCst)) {
                count.devices_here += 1;
            }
        }
        counts
    }
}

/// What happened on one target during a flood (`targets` in the report, in `--targets` order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCount {
    /// `host:port`.
    pub target: String,
    /// Devices that started on this target (round-robin).
    pub assigned: u64,
    /// Connections this target accepted (CONNACK), first connections and reconnects.
    pub connections: u64,
    /// Of `connections`, those of devices that had lost a connection (here or elsewhere).
    pub reconnects: u64,
    /// Connects that failed here (refused, timed out, CONNACK refused); each sent its device on
    /// to the next target.
    pub failed_connects: u64,
    /// Connections to this target that broke mid-run.
    pub dropped: u64,
    /// Devices whose current connection, or last one once the flood ended, is to this target.
    pub devices_here: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_assigned_round_robin() {
        let assigned: Vec<usize> = (0..7).map(|i| first_target(i, 3)).collect();
        assert_eq!(assigned, [0, 1, 2, 0, 1, 2, 0]);
        assert!((0..5).all(|i| first_target(i, 1) == 0));
    }

    #[test]
    fn a_failed_connect_moves_on_to_the_next_target_and_wraps() {
        assert_eq!(next_target(0, 3), 1);
        assert_eq!(next_target(1, 3), 2);
        assert_eq!(next_target(2, 3), 0);
        assert_eq!(next_target(0, 1), 0, "one target: the same one again");
        // Starting anywhere, n failures visit every target once and come back.
        for start in 0..3 {
            let mut visited = vec![start];
            for _ in 0..3 {
                visited.push(next_target(*visited.last().unwrap(), 3));
            }
            assert_eq!(visited[3], start);
            let mut seen = visited[..3].to_vec();
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2]);
        }
    }

    #[test]
    fn the_book_counts_per_target() {
        let book = TargetBook::new(vec![Target::new("a", 1), Target::new("b", 2)]);
        let devices: Vec<Arc<DeviceProgress>> = (0..3).map(|_| Arc::default()).collect();
        assert_eq!([book.assign(0), book.assign(1), book.assign(2)], [0, 1, 0]);
        // Device 0 and 2 connect to a, device 1 fails on b and lands on a.
        book.connected(0, false, &devices[0]);
        book.connected(0, false, &devices[2]);
        assert_eq!(book.connect_failed(1), 0);
        book.connected(0, false, &devices[1]);
        // a drops device 2, which fails to come back there and reconnects to b.
        book.dropped(0);
        assert_eq!(book.connect_failed(0), 1);
        book.connected(1, true, &devices[2]);
        let counts = book.counts(&devices);
        let a = TargetCount {
            target: "a:1".into(),
            assigned: 2,
            connections: 3,
            reconnects: 0,
            failed_connects: 1,
            dropped: 1,
            devices_here: 2,
        };
        let b = TargetCount {
            target: "b:2".into(),
            assigned: 1,
            connections: 1,
            reconnects: 1,
            failed_connects: 1,
            dropped: 0,
            devices_here: 1,
        };
        assert_eq!(counts, [a, b]);
    }

    #[test]
    fn targets_parse_and_print() {
        assert_eq!("127.0.0.1:1883".parse(), Ok(Target::new("127.0.0.1", 1883)));
        assert_eq!("weir-0.weir:1883".parse(), Ok(Target::new("weir-0.weir", 1883)));
        assert_eq!("[::1]:1884".parse(), Ok(Target::new("::1", 1884)));
        assert_eq!(Target::new("::1", 1884).to_string(), "[::1]:1884");
        assert_eq!(Target::new("localhost", 1).to_string(), "localhost:1");
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(Target::from(addr), Target::new("127.0.0.1", 9));
        for bad in ["localhost", ":1883", "host:", "host:70000", "::1:1883", "[::1:1883"] {
            assert!(bad.parse::<Target>().is_err(), "{bad} should not parse");
        }
    }
}
