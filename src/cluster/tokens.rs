//! A proxy token's limits across the cluster: its open connections counted on every node (one
//! entry per node in Redis, refreshed while the node holds connections, so a node that died
//! stops counting once its entry expires), and its rate of new connections as one GCRA state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store::Store;
use crate::metrics::Metrics;

/// Why the cluster refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// The token has its maximum of connections open across the cluster.
    TooManyConnections,
    /// The token opened connections faster than allowed across the cluster.
    RateLimited,
}

/// The cluster-wide counts of this node's admitted connections.
pub struct SharedTokens {
    store: Store,
    node: Arc<str>,
    ttl: Duration,
    metrics: Arc<Metrics>,
    /// Open connections on this node, by token digest (with the token's limit).
    open: Mutex<HashMap<String, (u64, u64)>>,
}

/// A connection counted in the cluster: released (on every node's count) when dropped.
pub struct SharedAdmission {
    tokens: Arc<SharedTokens>,
    digest: String,
}

impl Drop for SharedAdmission {
    fn drop(&mut self) {
        let limit = {
            let mut open = self.tokens.lock();
            let Some((count, limit)) = open.get_mut(&self.digest) else {
                return;
            };
            *count = count.saturating_sub(1);
            let limit = *limit;
            if *count == 0 {
                open.remove(&self.digest);
            }
            limit
        };
        let tokens = self.tokens.clone();
        let digest = std::mem::take(&mut self.digest);
        // Dropped on a connection's way out; the release needs Redis, so it runs apart. If it
        // fails, this node's entry still expires once it stops being refreshed.
        tokio::spawn(async move {
            if let Err(error) = tokens
                .store
                .connections(&digest, &tokens.node, -1, limit, tokens.ttl)
                .await
            {
                tokens.metrics.cluster_redis_errors.inc();
                tracing::debug!(%error, "cannot release a token's connection in the cluster");
            }
        });
    }
}

impl SharedTokens {
    /// Counts in `store` for `node`; entries live `ttl` past their last refresh.
    pub fn new(store: Store, node: Arc<str>, ttl: Duration, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(SharedTokens {
            store,
            node,
            ttl,
            metrics,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one more connection of the token whose digest is `digest`, if the cluster is
    /// under its limits (`max` open, `per_second` new with bursts of `burst`). When Redis
    /// cannot be reached the connection is admitted on this node's limits alone (`Ok(None)`).
    pub async fn admit(
        self: &Arc<Self>,
        digest: &str,
        max: u64,
        per_second: u32,
        burst: u32,
    ) -> Result<Option<SharedAdmission>, TokenRefusal> {
        match self
            .store
            .rate(
                &format!("token:{digest}"),
                per_second,
                Duration::from_secs(1),
                burst,
            )
            .await
        {
            Ok(Some(_)) => return Err(TokenRefusal::RateLimited),
            Ok(None) => {}
            Err(error) => return Ok(self.unreachable(&error)),
        }
        match self
            .store
            .connections(digest, &self.node, 1, max, self.ttl)
            .await
        {
            Ok(Some(_)) => {
                let mut open = self.lock();
                let entry = open.entry(digest.to_owned()).or_insert((0, max));
                entry.0 += 1;
                Ok(Some(SharedAdmission {
                    tokens: self.clone(),
                    digest: digest.to_owned(),
                }))
            }
            Ok(None) => Err(TokenRefusal::TooManyConnections),
            Err(error) => Ok(self.unreachable(&error)),
        }
    }

    fn unreachable(&self, error: &super::store::StoreError) -> Option<SharedAdmission> {
        self.metrics.cluster_redis_errors.inc();
        tracing::debug!(%error, "cannot count a token's connection in the cluster; this node's limits apply");
        None
    }

    /// Refreshes this node's entries (every third of their TTL) until `shutdown`.
    pub async fn refresh(self: Arc<Self>, shutdown: CancellationToken) {
        let step = (self.ttl / 3).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(step) => {}
            }
            let open: Vec<(String, u64)> = self
                .lock()
                .iter()
                .map(|(digest, (_, limit))| (digest.clone(), *limit))
                .collect();
            for (digest, limit) in open {
                if let Err(error) = self
                    .store
                    .connections(&digest, &self.node, 0, limit, self.ttl)
                    .await
                {
                    self.metrics.cluster_redis_errors.inc();
                    tracing::debug!(%error, "cannot refresh a token's connections in the cluster");
                }
            }
        }
    }
}
