//! Who wants a stream polled on demand: each node with subscribers to it keeps an entry in the
//! stream's demand hash (refreshed every third of the lease TTL, withdrawn when its last
//! subscriber leaves), saying how often its subscribers ask for polls. The lease keeper ranks
//! only those nodes; the poller follows the shortest period any of them asks for.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::store::Store;
use crate::metrics::Metrics;

/// Resolves when `value` changes; never once its sender is gone (a fixed value).
async fn changed<T>(value: &mut watch::Receiver<T>) {
    if value.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One node's demand for one stream.
pub struct Wants {
    /// The store.
    pub store: Store,
    /// This node.
    pub node: Arc<str>,
    /// The stream.
    pub stream: String,
    /// How long an entry lives without a refresh.
    pub ttl: Duration,
    /// Subscriptions to the stream on this node.
    pub local: watch::Receiver<usize>,
    /// The period this node's subscribers ask for.
    pub period: watch::Receiver<Duration>,
    /// The nodes that want the stream (for the keeper).
    pub nodes: watch::Sender<Arc<[String]>>,
    /// The shortest period any of them asks for (for the poller).
    pub shortest: watch::Sender<Duration>,
    /// Counts Redis errors.
    pub metrics: Arc<Metrics>,
}

impl Wants {
    /// Keeps the entry right until `retired`, then withdraws it.
    pub async fn run(mut self, retired: CancellationToken) {
        let step = (self.ttl / 3).max(Duration::from_millis(10));
        loop {
            let wanted =
                (*self.local.borrow_and_update() > 0).then(|| *self.period.borrow_and_update());
            match self
                .store
                .demand(&self.stream, &self.node, wanted, self.ttl)
                .await
            {
                Ok(live) => {
                    let nodes: Arc<[String]> = live.iter().map(|(node, _)| node.clone()).collect();
                    self.nodes.send_if_modified(|current| {
                        let changed = **current != *nodes;
                        if changed {
                            *current = nodes;
                        }
                        changed
                    });
                    if let Some(shortest) =
                        live.iter().map(|(_, p)| *p).filter(|p| !p.is_zero()).min()
                    {
                        self.shortest.send_if_modified(|current| {
                            std::mem::replace(current, shortest) != shortest
                        });
                    }
                }
                Err(error) => {
                    self.metrics.cluster_redis_errors.inc();
                    tracing::debug!(stream = %self.stream, %error, "cannot record this node's demand");
                }
            }
            tokio::select! {
                () = retired.cancelled() => break,
                () = tokio::time::sleep(step) => {}
                () = changed(&mut self.local) => {}
                () = changed(&mut self.period) => {}
            }
        }
        if let Err(error) = self
            .store
            .demand(&self.stream, &self.node, None, self.ttl)
            .await
        {
            tracing::debug!(stream = %self.stream, %error, "cannot withdraw this node's demand; it expires");
        }
    }
}
