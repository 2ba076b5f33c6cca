//! [`Engine::subscribe`](crate::Engine::subscribe)'s stream of delivery state changes: what each
//! durable batch did to each delivery, told in order to every subscriber through a bounded
//! broadcast. The engine never waits for a subscriber: one that falls more than the buffer
//! behind loses the oldest changes and is told how many.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use herald_projector::{Delivery, DeliveryId, DeliveryStatus, EndpointId, ReadTables, Tables};
use tokio::sync::broadcast;

/// Changes kept for a subscriber that has not read them yet, at most; older ones are dropped
/// for it (it is told how many: [`SubscriptionError::Missed`]).
pub const SUBSCRIPTION_BUFFER: usize = 4096;

/// A delivery as a batch left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryChange {
    pub delivery_id: DeliveryId,
    pub status: DeliveryStatus,
    /// Attempts made, over the delivery's whole life.
    pub attempt_count: u32,
    /// `None`: an inline delivery (a publish's `webhook_url`).
    pub endpoint_id: Option<EndpointId>,
}

impl DeliveryChange {
    fn of(d: &Delivery) -> DeliveryChange {
        DeliveryChange {
            delivery_id: d.id,
            status: d.status,
            attempt_count: d.attempt_count,
            endpoint_id: d.endpoint_id,
        }
    }
}

/// Why [`Subscription::recv`] gave no change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The subscriber fell behind by more than [`SUBSCRIPTION_BUFFER`] changes: this many, the
    /// oldest, were dropped for it. The next call gives the oldest change still kept.
    Missed(u64),
    /// The engine stopped: no change will come.
    Closed,
    /// [`Subscription::recv_timeout`] only: nothing came in time.
    Timeout,
}

impl std::fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscriptionError::Missed(n) => write!(f, "missed {n} delivery changes"),
            SubscriptionError::Closed => f.write_str("the engine stopped"),
            SubscriptionError::Timeout => f.write_str("no delivery change in time"),
        }
    }
}

impl std::error::Error for SubscriptionError {}

/// A subscriber's end: the delivery changes of every batch made durable after it subscribed,
/// in the log's order (see [`Engine::subscribe`](crate::Engine::subscribe)).
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<DeliveryChange>,
    /// The subscribers the command machine looks at (without the broadcast's lock): one less
    /// when this one is dropped.
    subscribers: Arc<AtomicUsize>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

fn received(
    r: Result<DeliveryChange, broadcast::error::RecvError>,
) -> Result<DeliveryChange, SubscriptionError> {
    r.map_err(|e| match e {
        broadcast::error::RecvError::Lagged(n) => SubscriptionError::Missed(n),
        broadcast::error::RecvError::Closed => SubscriptionError::Closed,
    })
}

impl Subscription {
    /// A subscription on `rx`, counted in `subscribers` while it lives.
    pub(crate) fn new(
        rx: broadcast::Receiver<DeliveryChange>,
        subscribers: Arc<AtomicUsize>,
    ) -> Subscription {
        subscribers.fetch_add(1, Ordering::Relaxed);
        Subscription { rx, subscribers }
    }

    /// The next change; waits for one.
    pub async fn recv(&mut self) -> Result<DeliveryChange, SubscriptionError> {
        received(self.rx.recv().await)
    }

    /// The next change if one is there, else [`SubscriptionError::Timeout`] at once.
    pub fn try_recv(&mut self) -> Result<DeliveryChange, SubscriptionError> {
        self.rx.try_recv().map_err(|e| match e {
            broadcast::error::TryRecvError::Lagged(n) => SubscriptionError::Missed(n),
            broadcast::error::TryRecvError::Closed => SubscriptionError::Closed,
            broadcast::error::TryRecvError::Empty => SubscriptionError::Timeout,
        })
    }

    /// The next change, waiting at most `timeout`, blocking the thread: for code that is not
    /// async. It needs no runtime; do not call it from inside one (it would block a worker).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<DeliveryChange, SubscriptionError> {
        block_on_until(self.rx.recv(), Instant::now() + timeout)
            .map_or(Err(SubscriptionError::Timeout), received)
    }
}

/// Wakes the thread that waits in [`block_on_until`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on this thread until it is ready (`Some`) or `deadline` passes (`None`), parked
/// in between until its waker or the deadline wakes it.
fn block_on_until<F: Future>(fut: F, deadline: Instant) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

/// Tables that note every delivery the fold writes into `changes`, and are otherwise `tables`.
pub(crate) struct Watched<'w, T> {
    pub tables: T,
    pub changes: &'w mut Vec<DeliveryChange>,
}

impl<T: ReadTables> ReadTables for Watched<'_, T> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.tables.get(key)
    }
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.tables.scan(from, to, limit)
    }
    fn scan_rev(&self, from: &[u8], to: &[u8], limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.tables.scan_rev(from, to, limit)
    }
    fn scan_index(
        &self,
        chunks: &dyn ReadTables,
        range: &herald_projector::IndexRange<'_>,
    ) -> Result<Vec<Vec<u8>>, herald_projector::CorruptValue> {
        self.tables.scan_index(chunks, range)
    }
}

impl<T: Tables> Tables for Watched<'_, T> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.tables.put(key, value)
    }
    fn delete(&mut self, key: &[u8]) {
        self.tables.delete(key)
    }
    fn add_entry(&mut self, key: &[u8]) -> Result<(), herald_projector::CorruptValue> {
        self.tables.add_entry(key)
    }
    fn remove_entry(&mut self, key: &[u8]) -> Result<(), herald_projector::CorruptValue> {
        self.tables.remove_entry(key)
    }
    fn delivery_written(&mut self, delivery: &Delivery) {
        self.changes.push(DeliveryChange::of(delivery));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_change_is_counted_and_the_next_kept_one_follows() {
        let (tx, rx) = broadcast::channel(2);
        let subscribers = Arc::new(AtomicUsize::new(0));
        let mut sub = Subscription::new(rx, subscribers.clone());
        assert_eq!(subscribers.load(Ordering::Relaxed), 1);
        let change = |n: u128| DeliveryChange {
            delivery_id: DeliveryId(uuid::Uuid::from_u128(n)),
            status: DeliveryStatus::Pending,
            attempt_count: 0,
            endpoint_id: None,
        };
        for n in 0..5 {
            tx.send(change(n)).unwrap();
        }
        assert_eq!(sub.try_recv(), Err(SubscriptionError::Missed(3)));
        assert_eq!(sub.recv_timeout(Duration::from_secs(1)), Ok(change(3)));
        assert_eq!(sub.recv_timeout(Duration::from_secs(1)), Ok(change(4)));
        assert_eq!(sub.recv_timeout(Duration::from_millis(20)), Err(SubscriptionError::Timeout));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(change(5)).unwrap();
        });
        assert_eq!(sub.recv_timeout(Duration::from_secs(5)), Ok(change(5)));
        sender.join().unwrap();
        assert_eq!(sub.recv_timeout(Duration::from_secs(1)), Err(SubscriptionError::Closed));
        drop(sub);
        assert_eq!(subscribers.load(Ordering::Relaxed), 0);
    }
}
