//! Rate limits that hold across the cluster: each group's quota (a host, or a named group of
//! `upstream.rate_limits`) is one GCRA state in Redis, asked by whichever node polls.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::store::Store;
use crate::metrics::Metrics;
use crate::upstream::ratelimit::{RateLimits, SharedQuota};

/// The cluster's quotas, on the groups' configured limits.
pub struct ClusterQuota {
    store: Store,
    limits: Arc<RateLimits>,
    metrics: Arc<Metrics>,
}

impl ClusterQuota {
    /// Quotas in `store`, of the groups `limits` knows.
    pub fn new(store: Store, limits: Arc<RateLimits>, metrics: Arc<Metrics>) -> Self {
        ClusterQuota {
            store,
            limits,
            metrics,
        }
    }
}

impl SharedQuota for ClusterQuota {
    fn ask<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Option<Duration>> {
        Box::pin(async move {
            let limit = self.limits.quota_of(group);
            match self
                .store
                .rate(
                    &format!("group:{group}"),
                    limit.per_second.get(),
                    Duration::from_secs(1),
                    limit.burst.get(),
                )
                .await
            {
                Ok(wait) => wait,
                Err(error) => {
                    self.metrics.cluster_redis_errors.inc();
                    tracing::debug!(group, %error, "cannot ask the cluster's quota; the local one applies");
                    None
                }
            }
        })
    }
}
