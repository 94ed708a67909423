//! Ack tokens: the thread from a device message through the fabric and sink back to its
//! connection. A message's acknowledgement is sent when every record of it has an outcome.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use weir_protocols::mqtt::session::Outcome;

/// An outcome report for one message: the connection's in-flight id and what happened.
pub type AckEvent = (u64, Outcome);

/// One record's share of a message's acknowledgement. Settle it with the record's outcome;
/// dropping it unsettled (a task died, shutdown before the commit) counts as `Failed`, so a
/// device is never acked for a record that was not stored.
#[derive(Debug)]
pub struct AckToken {
    shared: Arc<Shared>,
    settled: bool,
}

#[derive(Debug)]
struct Shared {
    id: u64,
    /// The worst outcome reported so far (`Outcome` ranked Stored < Dropped < Failed).
    worst: AtomicU8,
    acks_tx: flume::Sender<AckEvent>,
}

impl AckToken {
    /// A token for in-flight message `id` whose outcome goes to `acks_tx`. The channel must have
    /// room for one event per message in flight (the connection bounds how many that is), so
    /// reporting never waits.
    pub fn new(id: u64, acks_tx: flume::Sender<AckEvent>) -> Self {
        Self {
            shared: Arc::new(Shared { id, worst: AtomicU8::new(rank(Outcome::Stored)), acks_tx }),
            settled: false,
        }
    }

    /// Splits the token into `n` shares, one per record of the message. With `n == 0` the
    /// message had nothing to store and is reported as stored at once.
    pub fn split(self, n: usize) -> Vec<AckToken> {
        if n == 0 {
            self.settle(Outcome::Stored);
            return Vec::new();
        }
        let mut shares = Vec::with_capacity(n);
        for _ in 1..n {
            shares.push(AckToken { shared: Arc::clone(&self.shared), settled: false });
        }
        shares.push(self);
        shares
    }

    /// Reports this record's outcome; the message is reported when its last share settles.
    pub fn settle(mut self, outcome: Outcome) {
        self.shared.worst.fetch_max(rank(outcome), Ordering::Relaxed);
        self.settled = true;
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.worst.fetch_max(rank(Outcome::Failed), Ordering::Relaxed);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let outcome = match self.worst.load(Ordering::Relaxed) {
            0 => Outcome::Stored,
            1 => Outcome::Dropped,
            _ => Outcome::Failed,
        };
        // The connection may be gone (device disconnected); then nobody needs the ack.
        let _ = self.acks_tx.try_send((self.id, outcome));
    }
}

fn rank(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Stored => 0,
        Outcome::Dropped => 1,
        Outcome::Failed => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_reported_once_after_its_last_record() {
        let (tx, rx) = flume::bounded(4);
        let mut shares = AckToken::new(7, tx).split(3);
        shares.pop().unwrap().settle(Outcome::Stored);
        shares.pop().unwrap().settle(Outcome::Stored);
        assert!(rx.try_recv().is_err());
        shares.pop().unwrap().settle(Outcome::Stored);
        assert_eq!(rx.try_recv().unwrap(), (7, Outcome::Stored));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn worst_outcome_wins_and_unsettled_drop_is_failure() {
        let (tx, rx) = flume::bounded(4);
        let mut shares = AckToken::new(1, tx.clone()).split(2);
        shares.pop().unwrap().settle(Outcome::Dropped);
        shares.pop().unwrap().settle(Outcome::Stored);
        assert_eq!(rx.try_recv().unwrap(), (1, Outcome::Dropped));

        let shares = AckToken::new(2, tx.clone()).split(2);
        drop(shares);
        assert_eq!(rx.try_recv().unwrap(), (2, Outcome::Failed));

        assert!(AckToken::new(3, tx).split(0).is_empty());
        assert_eq!(rx.try_recv().unwrap(), (3, Outcome::Stored));
    }
}
