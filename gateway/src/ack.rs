//! Ack tokens: the thread from a device message through the fabric and sink back to its
//! connection. A message's acknowledgement is sent when every record of it has an outcome.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use weir_protocols::mqtt::session::Outcome;

use crate::config::AckPoint;

/// An outcome report for one message: the connection's in-flight id and what happened.
pub type AckEvent = (u64, Outcome);

/// Where one connection's outcome reports arrive. Each in-flight message reports exactly once,
/// so the inbox never holds more reports than the connection has messages in flight (which the
/// connection bounds): it needs no capacity of its own. Cheaper than a channel for an idle
/// connection: one small allocation, and waiting keeps the waker here, not in a future.
#[derive(Debug, Default)]
pub struct AckInbox {
    inner: Mutex<InboxInner>,
}

#[derive(Debug, Default)]
struct InboxInner {
    events: Vec<AckEvent>,
    waker: Option<Waker>,
}

impl AckInbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn report(&self, event: AckEvent) {
        let waker = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.events.push(event);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Takes one report if there is one (in no particular order).
    pub fn try_next(&self) -> Option<AckEvent> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).events.pop()
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<AckEvent> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(event) = inner.events.pop() {
            return Poll::Ready(event);
        }
        if !inner.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            inner.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits for the next report. Cancel-safe: a report is only taken when it is returned.
    pub async fn next(&self) -> AckEvent {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Gives back the room a busy moment left, once no report is waiting.
    pub fn release_idle_memory(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.events.is_empty() && inner.events.capacity() > 0 {
            inner.events = Vec::new();
        }
    }
}

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
    /// Settled when the disk buffer has synced the record (`ack = "buffered"`), not at the
    /// sink's commit.
    at_sync: bool,
    /// The worst outcome reported so far (`Outcome` ranked Stored < Dropped < Failed).
    worst: AtomicU8,
    inbox: Arc<AckInbox>,
}

impl AckToken {
    /// A token for in-flight message `id` whose outcome is reported to `inbox`, settled at the
    /// sink's commit.
    pub fn new(id: u64, inbox: Arc<AckInbox>) -> Self {
        Self::at(id, inbox, AckPoint::Committed)
    }

    /// A token settled at `point`: the disk buffer settles `Buffered` tokens after its fsync,
    /// everything else settles them after the sink's commit.
    pub fn at(id: u64, inbox: Arc<AckInbox>, point: AckPoint) -> Self {
        let at_sync = point == AckPoint::Buffered;
        Self {
            shared: Arc::new(Shared { id, at_sync, worst: AtomicU8::new(rank(Outcome::Stored)), inbox }),
            settled: false,
        }
    }

    /// A token for a listener with `point`, or none when the listener acks on receipt.
    pub fn for_point(point: AckPoint, id: u64, inbox: &Arc<AckInbox>) -> Option<Self> {
        (point != AckPoint::Received).then(|| Self::at(id, Arc::clone(inbox), point))
    }

    /// True when the disk buffer's fsync, not the sink's commit, settles this token.
    pub fn settles_at_sync(&self) -> bool {
        self.shared.at_sync
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
        // The connection may be gone (device disconnected); then nobody reads the report.
        self.inbox.report((self.id, outcome));
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
        let rx = AckInbox::new();
        let mut shares = AckToken::new(7, Arc::clone(&rx)).split(3);
        shares.pop().unwrap().settle(Outcome::Stored);
        shares.pop().unwrap().settle(Outcome::Stored);
        assert!(rx.try_next().is_none());
        shares.pop().unwrap().settle(Outcome::Stored);
        assert_eq!(rx.try_next().unwrap(), (7, Outcome::Stored));
        assert!(rx.try_next().is_none());
    }

    #[test]
    fn worst_outcome_wins_and_unsettled_drop_is_failure() {
        let rx = AckInbox::new();
        let mut shares = AckToken::new(1, Arc::clone(&rx)).split(2);
        shares.pop().unwrap().settle(Outcome::Dropped);
        shares.pop().unwrap().settle(Outcome::Stored);
        assert_eq!(rx.try_next().unwrap(), (1, Outcome::Dropped));

        let shares = AckToken::new(2, Arc::clone(&rx)).split(2);
        drop(shares);
        assert_eq!(rx.try_next().unwrap(), (2, Outcome::Failed));

        assert!(AckToken::new(3, Arc::clone(&rx)).split(0).is_empty());
        assert_eq!(rx.try_next().unwrap(), (3, Outcome::Stored));
    }

    #[tokio::test]
    async fn a_waiting_connection_is_woken_by_the_report() {
        let inbox = AckInbox::new();
        let waiter = tokio::spawn({
            let inbox = Arc::clone(&inbox);
            async move { inbox.next().await }
        });
        tokio::task::yield_now().await;
        AckToken::new(9, Arc::clone(&inbox)).settle(Outcome::Stored);
        assert_eq!(waiter.await.unwrap(), (9, Outcome::Stored));
        inbox.release_idle_memory();
        assert!(inbox.try_next().is_none());
    }
}
