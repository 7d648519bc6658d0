//! Per-group request quotas: every stream in a rate-limit group shares one limiter.
//!
//! A group is either a named group from `upstream.rate_limits` or, by default, the upstream's
//! `host:port` (already resolved into `StreamSettings::rate_limit_group` by validation), so two
//! streams polling one host never exceed that host's quota together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::config::{RateLimit, StreamSettings, UpstreamSettings};

/// A quota shared beyond this process (the nodes of a cluster), asked before every request
/// after the local limiter: the local one bounds this node, the shared one all of them.
pub trait SharedQuota: Send + Sync {
    /// Asks `group`'s shared quota for one request: `None` when it may go now, else how long
    /// to wait before asking again. When the shared state cannot be reached the request goes
    /// (the local limiter still applies): polling for this node's subscribers matters more.
    fn ask<'a>(&'a self, group: &'a str) -> BoxFuture<'a, Option<std::time::Duration>>;
}

/// The limiter shared by every stream of one group.
pub type GroupLimiter<C = DefaultClock> =
    RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The governor quota for a configured rate limit.
pub fn quota(limit: RateLimit) -> Quota {
    Quota::per_second(limit.per_second).allow_burst(limit.burst)
}

/// governor's clock on tokio's time: quota waits then follow tokio's clock, paused in tests
/// (`#[tokio::test(start_paused = true)]`), so a poller's schedule under a quota is checked
/// exactly instead of against the wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// One limiter per rate-limit group, created from the configuration and on demand.
pub struct RateLimits<C: Clock = DefaultClock> {
    clock: C,
    default_quota: RateLimit,
    groups: Mutex<HashMap<String, Group<C>>>,
}

/// A group's quota and its limiter.
type Group<C> = (RateLimit, Arc<GroupLimiter<C>>);

impl RateLimits<DefaultClock> {
    /// Limiters for the named groups and for every stream's group, on the real clock.
    pub fn new(upstream: &UpstreamSettings, streams: &[StreamSettings]) -> Self {
        Self::with_clock(upstream, streams, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Like [`RateLimits::new`] on the given clock (tests use `FakeRelativeClock`).
    pub fn with_clock(upstream: &UpstreamSettings, streams: &[StreamSettings], clock: C) -> Self {
        let limits = RateLimits {
            clock,
            default_quota: upstream.default_rate_limit,
            groups: Mutex::new(HashMap::new()),
        };
        for (name, limit) in &upstream.rate_limits {
            limits.get_or_insert(name, *limit);
        }
        for stream in streams {
            // A group that is not a named one is a `host:port` on the default quota.
            limits.limiter(&stream.rate_limit_group);
        }
        limits
    }

    /// The limiter of `group`; a group not seen before is created with the default quota
    /// (it is a `host:port` group).
    pub fn limiter(&self, group: &str) -> Arc<GroupLimiter<C>> {
        self.get_or_insert(group, self.default_quota)
    }

    /// The limiter of `group`, created with `quota` if the group does not exist yet. An
    /// existing group keeps its limiter (and quota), so streams added at runtime share it.
    pub fn get_or_insert(&self, group: &str, quota: RateLimit) -> Arc<GroupLimiter<C>> {
        // The map is only touched while building pollers; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still usable.
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, limiter)) = groups.get(group) {
            return Arc::clone(limiter);
        }
        let limiter = Arc::new(RateLimiter::direct_with_clock(
            self::quota(quota),
            self.clock.clone(),
        ));
        groups.insert(group.to_owned(), (quota, Arc::clone(&limiter)));
        limiter
    }

    /// The quota of `group` (the default quota for a group not seen before).
    pub fn quota_of(&self, group: &str) -> RateLimit {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups
            .get(group)
            .map_or(self.default_quota, |(quota, _)| *quota)
    }

    /// The names of the groups that exist, sorted.
    pub fn groups(&self) -> Vec<String> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = groups.keys().cloned().collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::num::NonZeroU32;
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;
    use http::HeaderMap;
    use url::Url;

    use super::*;
    use crate::diff::DiffOptions;
    use crate::upstream::config::BackoffSettings;
    use crate::upstream::decode::Format;

    fn limit(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second: NonZeroU32::new(per_second).expect("test quota is non-zero"),
            burst: NonZeroU32::new(burst).expect("test burst is non-zero"),
        }
    }

    fn upstream() -> UpstreamSettings {
        UpstreamSettings {
            user_agent: "patchwire-test".into(),
            default_rate_limit: limit(1, 2),
            rate_limits: BTreeMap::from([("shared".to_owned(), limit(1, 1))]),
            backoff: BackoffSettings {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: 0.2,
                max_retry_after: Duration::from_secs(300),
            },
        }
    }

    fn stream(name: &str, url: &str, group: &str) -> StreamSettings {
        StreamSettings {
            name: name.into(),
            url: Url::parse(url).expect("test URL is valid"),
            headers: HeaderMap::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_body_bytes: 1 << 20,
            format: Format::Json,
            history: 16,
            history_bytes: 16 << 20,
            rate_limit_group: group.into(),
            diff: DiffOptions::default(),
            on_demand: None,
            views: None,
        }
    }

    #[test]
    fn two_streams_on_one_host_share_one_quota() {
        let clock = FakeRelativeClock::default();
        let streams = [
            stream("a", "http://api.example:80/a", "api.example:80"),
            stream("b", "http://api.example:80/b", "api.example:80"),
            stream("c", "http://other.example:80/c", "other.example:80"),
        ];
        let limits = RateLimits::with_clock(&upstream(), &streams, clock.clone());
        let a = limits.limiter(&streams[0].rate_limit_group);
        let b = limits.limiter(&streams[1].rate_limit_group);
        let c = limits.limiter(&streams[2].rate_limit_group);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));

        // Default quota: 1/s with a burst of 2, spent by a and b together.
        assert!(a.check().is_ok());
        assert!(b.check().is_ok());
        assert!(a.check().is_err());
        assert!(b.check().is_err());
        // Another host is unaffected.
        assert!(c.check().is_ok());
        // One second later one more request is allowed, for either stream.
        clock.advance(Duration::from_secs(1));
        assert!(b.check().is_ok());
        assert!(a.check().is_err());
    }

    #[test]
    fn named_groups_use_their_own_quota_across_hosts() {
        let clock = FakeRelativeClock::default();
        let streams = [
            stream("a", "http://one.example/a", "shared"),
            stream("b", "http://two.example/b", "shared"),
        ];
        let limits = RateLimits::with_clock(&upstream(), &streams, clock.clone());
        let a = limits.limiter("shared");
        let b = limits.limiter("shared");
        assert!(Arc::ptr_eq(&a, &b));
        // The named quota has a burst of 1, not the default 2.
        assert!(a.check().is_ok());
        assert!(b.check().is_err());
        assert_eq!(
            limits.groups(),
            vec!["shared".to_owned()],
            "a stream in a named group creates no host group"
        );
    }

    #[test]
    fn groups_added_at_runtime_are_shared_and_keep_their_first_quota() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(&upstream(), &[], clock.clone());
        let first = limits.get_or_insert("new.example:443", limit(1, 1));
        let second = limits.get_or_insert("new.example:443", limit(100, 100));
        assert!(Arc::ptr_eq(&first, &second));
        assert!(first.check().is_ok());
        assert!(second.check().is_err());
        assert_eq!(
            limits.groups(),
            vec!["new.example:443".to_owned(), "shared".to_owned()]
        );
    }
}
