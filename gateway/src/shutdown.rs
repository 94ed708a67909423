//! The shutdown signal: a `watch` flag that turns true once; tasks await it with [`signalled`].
//! Device connections wait on the cheaper [`ShutdownSignal`], fired at the same time.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

/// Completes when the flag is (or becomes) true, or when its sender is gone.
pub async fn signalled(flag: &mut watch::Receiver<bool>) {
    loop {
        let set = *flag.borrow_and_update();
        if set || flag.changed().await.is_err() {
            return;
        }
    }
}

/// The shutdown signal as connection tasks wait for it: thousands of idle connections each
/// wait, so the waiting must be cheap. A `watch` (or `Notify`) future is about 140 bytes in
/// every task; here the waiting future is a few bytes and each waker sits in one shared table.
#[derive(Debug, Default)]
pub struct ShutdownSignal {
    fired: AtomicBool,
    wakers: Mutex<WakerTable>,
}

#[derive(Debug, Default)]
struct WakerTable {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl ShutdownSignal {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Signals every subscriber, now and later.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = {
            let mut table = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
            table.slots.iter_mut().filter_map(Option::take).collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A subscription for one task.
    pub fn subscribe(self: &Arc<Self>) -> ShutdownWatch {
        let mut table = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match table.free.pop() {
            Some(slot) => slot,
            None => {
                table.slots.push(None);
                table.slots.len() - 1
            }
        };
        ShutdownWatch { signal: Arc::clone(self), slot, registered: None }
    }
}

/// One task's subscription to a [`ShutdownSignal`].
#[derive(Debug)]
pub struct ShutdownWatch {
    signal: Arc<ShutdownSignal>,
    slot: usize,
    /// The waker last put in the table: re-registering only when it changes keeps the table's
    /// lock off the busy path.
    registered: Option<Waker>,
}

impl ShutdownWatch {
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            {
                let mut table = self.signal.wakers.lock().unwrap_or_else(PoisonError::into_inner);
                table.slots[self.slot] = Some(waker.clone());
            }
            self.registered = Some(waker);
            // Fired between the check above and the registration: do not miss it.
            if self.signal.fired.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// Completes once the signal has fired. Cancel-safe.
    pub fn fired(&mut self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| self.poll_fired(cx))
    }
}

impl Drop for ShutdownWatch {
    fn drop(&mut self) {
        let mut table = self.signal.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        table.slots[self.slot] = None;
        table.free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_wake_on_fire_and_slots_are_reused() {
        let signal = ShutdownSignal::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let mut watch = signal.subscribe();
                tokio::spawn(async move { watch.fired().await })
            })
            .collect();
        tokio::task::yield_now().await;
        let dropped = signal.subscribe();
        drop(dropped);
        assert_eq!(signal.wakers.lock().unwrap().free.len(), 1, "a dropped subscription frees its slot");
        assert!(waiters.iter().all(|w| !w.is_finished()));
        signal.fire();
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        }
        // Subscribing after the fact completes at once.
        signal.subscribe().fired().await;
    }
}
