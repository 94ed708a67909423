//! The shutdown signal: a `watch` flag that turns true once; tasks await it with [`signalled`].

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
