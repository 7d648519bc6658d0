//! The `[cluster]` section: its shape as written, its defaults and bounds, its pure validation,
//! and the settings a node joins the cluster with.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::redact::Redacted;
use crate::validation::{NAME_EXPECTED, Problems, duration_in, interpolate, is_valid_name};

/// Built-in defaults of the `[cluster]` keys.
pub mod defaults {
    use std::time::Duration;

    /// `cluster.prefix`.
    pub const PREFIX: &str = "patchwire";
    /// `cluster.lease_ttl`.
    pub const LEASE_TTL: Duration = Duration::from_secs(3);
    /// `cluster.key_ttl`.
    pub const KEY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `cluster.probe_interval`.
    pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
    /// `cluster.timeout`.
    pub const TIMEOUT: Duration = Duration::from_secs(2);
}

/// Bounds of the `[cluster]` keys.
pub mod limits {
    use std::time::Duration;

    /// `cluster.lease_ttl`: long enough for three renewals over a slow link, short enough that
    /// a failover is not an outage.
    pub const LEASE_TTL: (Duration, Duration) =
        (Duration::from_millis(300), Duration::from_secs(120));
    /// `cluster.key_ttl`: at least a day, so a quiet stream keeps its epoch overnight.
    pub const KEY_TTL: (Duration, Duration) = (
        Duration::from_secs(3600),
        Duration::from_secs(365 * 24 * 3600),
    );
    /// `cluster.probe_interval`.
    pub const PROBE_INTERVAL: (Duration, Duration) =
        (Duration::from_millis(100), Duration::from_secs(600));
    /// `cluster.timeout`.
    pub const TIMEOUT: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(60));
    /// `cluster.prefix`: letters, digits and `.`, `_`, `-`, as names are.
    pub const PREFIX_MAX: usize = 64;
}

/// `[cluster]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// The Redis server every node shares, `redis://[user:password@]host:port[/db]` (or
    /// `rediss://` for TLS); `${VAR}` is replaced by the environment variable `VAR`.
    pub redis: String,
    /// This node's id, unique in the cluster ([default](NodeId::generated): the host name and
    /// a random suffix, new at every start).
    pub node_id: Option<String>,
    /// Prefix of every key and channel, so several clusters can share one Redis
    /// ([default](defaults::PREFIX)).
    pub prefix: Option<String>,
    /// How long a stream's lease lives without renewal: a failed node's streams are polled
    /// again within this plus one poll interval ([default](defaults::LEASE_TTL),
    /// [bounds](limits::LEASE_TTL)).
    #[serde(default, with = "humantime_serde::option")]
    pub lease_ttl: Option<Duration>,
    /// How long a stream's keys stay in Redis without a change or a poll
    /// ([default](defaults::KEY_TTL), [bounds](limits::KEY_TTL)).
    #[serde(default, with = "humantime_serde::option")]
    pub key_ttl: Option<Duration>,
    /// How often each node checks its streams against the log and probes its pub/sub
    /// connection ([default](defaults::PROBE_INTERVAL), [bounds](limits::PROBE_INTERVAL)).
    #[serde(default, with = "humantime_serde::option")]
    pub probe_interval: Option<Duration>,
    /// How long one Redis command may take before it counts as failed, and how long a node
    /// that has just started holds a new subscription while it first reads the log
    /// ([default](defaults::TIMEOUT), [bounds](limits::TIMEOUT)).
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// With `[webhooks]` on an SQLite store (each node's own file): the id of the one node
    /// that delivers them all; every other node leaves them alone. Not with a PostgreSQL
    /// store, which every node shares and delivers from.
    pub webhooks_node: Option<String>,
}

/// A node's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId(pub String);

impl NodeId {
    /// `{host}-{8 hex digits}`: unique enough for a cluster, readable in `/streams`.
    pub fn generated() -> NodeId {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| is_valid_name(h) && h.len() <= 55)
            .unwrap_or_else(|| "node".to_owned());
        NodeId(format!("{host}-{:08x}", rand::random::<u32>()))
    }
}

/// The validated `[cluster]` section.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The Redis URL (may hold a password: show it only through [`Self::shown_redis`]).
    pub redis: Url,
    /// This node's id.
    pub node_id: NodeId,
    /// Whether `node_id` was generated (not set in the file).
    pub node_id_generated: bool,
    /// Key prefix.
    pub prefix: String,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Key TTL.
    pub key_ttl: Duration,
    /// Probe interval.
    pub probe_interval: Duration,
    /// Command timeout.
    pub timeout: Duration,
    /// The one node that delivers webhooks from its own SQLite store, if any.
    pub webhooks_node: Option<NodeId>,
}

impl ClusterSettings {
    /// Whether this node delivers the configured webhooks when they are on a store of its own
    /// (SQLite): only the node `webhooks_node` names.
    pub fn delivers_webhooks(&self) -> bool {
        self.webhooks_node.as_ref() == Some(&self.node_id)
    }
}

impl ClusterSettings {
    /// The Redis URL without its password.
    pub fn shown_redis(&self) -> Redacted {
        Redacted::new(&self.redis)
    }
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("redis", &self.shown_redis().to_string())
            .field("node_id", &self.node_id)
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .field("key_ttl", &self.key_ttl)
            .field("probe_interval", &self.probe_interval)
            .field("timeout", &self.timeout)
            .field("webhooks_node", &self.webhooks_node)
            .finish()
    }
}

impl RawCluster {
    /// Validates the section (pure: no connection is made), recording every problem.
    pub fn validate(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Problems,
    ) -> Option<ClusterSettings> {
        let before = problems.len();
        let redis = match interpolate(&self.redis, env) {
            Err(e) => {
                problems.push("cluster.redis", format!("the URL {e}"));
                None
            }
            Ok(resolved) => match Url::parse(resolved.trim()) {
                Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.host().is_some() => {
                    Some(url)
                }
                Ok(url) => {
                    problems.push(
                        "cluster.redis",
                        format!(
                            "expected a redis:// or rediss:// URL with a host such as \
                             \"redis://127.0.0.1:6379\", got {}",
                            Redacted::new(&url)
                        ),
                    );
                    None
                }
                Err(e) => {
                    problems.push(
                        "cluster.redis",
                        format!(
                            "expected a redis:// or rediss:// URL such as \
                             \"redis://127.0.0.1:6379\" ({e})"
                        ),
                    );
                    None
                }
            },
        };
        let node_id = match &self.node_id {
            Some(id) if is_valid_name(id) => Some(NodeId(id.clone())),
            Some(id) => {
                problems.push("cluster.node_id", format!("{NAME_EXPECTED}, got {id:?}"));
                None
            }
            None => Some(NodeId::generated()),
        };
        let webhooks_node = match &self.webhooks_node {
            Some(id) if is_valid_name(id) => Some(NodeId(id.clone())),
            Some(id) => {
                problems.push(
                    "cluster.webhooks_node",
                    format!("expected a node id as `cluster.node_id` takes, got {id:?}"),
                );
                None
            }
            None => None,
        };
        let prefix = self.prefix.as_deref().unwrap_or(defaults::PREFIX);
        if !is_valid_name(prefix) || prefix.len() > limits::PREFIX_MAX {
            problems.push(
                "cluster.prefix",
                format!(
                    "expected 1 to {} letters, digits, '.', '_' or '-', starting with a letter \
                     or digit, got {prefix:?}",
                    limits::PREFIX_MAX
                ),
            );
        }
        let lease_ttl = duration_in(
            problems,
            "cluster.lease_ttl",
            self.lease_ttl,
            defaults::LEASE_TTL,
            limits::LEASE_TTL,
        );
        let key_ttl = duration_in(
            problems,
            "cluster.key_ttl",
            self.key_ttl,
            defaults::KEY_TTL,
            limits::KEY_TTL,
        );
        let probe_interval = duration_in(
            problems,
            "cluster.probe_interval",
            self.probe_interval,
            defaults::PROBE_INTERVAL,
            limits::PROBE_INTERVAL,
        );
        let timeout = duration_in(
            problems,
            "cluster.timeout",
            self.timeout,
            defaults::TIMEOUT,
            limits::TIMEOUT,
        );
        if problems.len() > before {
            return None;
        }
        Some(ClusterSettings {
            redis: redis?,
            node_id_generated: self.node_id.is_none(),
            node_id: node_id?,
            prefix: prefix.to_owned(),
            lease_ttl,
            key_ttl,
            probe_interval,
            timeout,
            webhooks_node,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(redis: &str) -> RawCluster {
        RawCluster {
            redis: redis.to_owned(),
            node_id: None,
            prefix: None,
            lease_ttl: None,
            key_ttl: None,
            probe_interval: None,
            timeout: None,
            webhooks_node: None,
        }
    }

    #[test]
    fn defaults_apply_and_a_node_id_is_generated() {
        let mut problems = Problems::default();
        let settings = raw("redis://127.0.0.1:6379")
            .validate(&|_| None, &mut problems)
            .expect("valid");
        assert!(problems.is_empty());
        assert_eq!(settings.lease_ttl, defaults::LEASE_TTL);
        assert!(settings.node_id_generated);
        assert!(is_valid_name(&settings.node_id.0), "{:?}", settings.node_id);
        assert_ne!(NodeId::generated(), NodeId::generated());
    }

    #[test]
    fn bad_values_are_named_with_their_keys_and_passwords_stay_hidden() {
        let mut problems = Problems::default();
        let mut bad = raw("http://user:hunter2@redis.example:6379");
        bad.node_id = Some("no spaces allowed".into());
        bad.lease_ttl = Some(Duration::from_millis(10));
        bad.prefix = Some("a:b".into());
        assert!(bad.validate(&|_| None, &mut problems).is_none());
        let text = format!("{problems:?}");
        for key in [
            "cluster.redis",
            "cluster.node_id",
            "cluster.lease_ttl",
            "cluster.prefix",
        ] {
            assert!(text.contains(key), "{key} in {text}");
        }
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn the_url_may_come_from_the_environment() {
        let mut problems = Problems::default();
        let settings = raw("${REDIS_URL}")
            .validate(
                &|name| (name == "REDIS_URL").then(|| "redis://:pw@10.0.0.5:6380/2".to_owned()),
                &mut problems,
            )
            .expect("valid");
        assert_eq!(settings.redis.port(), Some(6380));
        assert!(!format!("{settings:?}").contains("pw@"));
    }
}
