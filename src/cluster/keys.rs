//! Where a cluster keeps what in Redis: every key of one stream shares a hash tag (`{name}`),
//! so one stream's keys live in one slot of a Redis Cluster and one script may touch them all.

/// The names of the keys and channel a cluster uses, under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The keys of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    /// Hash: `epoch`, `seq` (the top of the log), `fence` (of the current lease),
    /// `snap_seq` (the sequence number of the stored document), poll state and failure.
    pub meta: String,
    /// Redis Stream of changes, entry ids `{seq}-0`.
    pub log: String,
    /// String: the document at `snap_seq`, as JSON.
    pub snap: String,
    /// String `"{node} {fence}"` with a TTL: who polls the stream.
    pub lease: String,
    /// Sorted set of node ids with subscribers to the stream, scored by expiry (dynamic
    /// streams only: their poller runs while anyone watches).
    pub demand: String,
    /// Hash: the upstream a dynamic stream polls (its URL and forwarded headers).
    pub target: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `patchwire`).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The keys of the stream `name`. Braces in a name would change the hash tag, so they are
    /// replaced (stream names are validated to exclude them; this keeps the slot right anyway).
    pub fn stream(&self, name: &str) -> StreamKeys {
        let tag: String = name
            .chars()
            .map(|c| if c == '{' || c == '}' { '_' } else { c })
            .collect();
        let key = |what: &str| format!("{}:{{{tag}}}:{what}", self.prefix);
        StreamKeys {
            meta: key("meta"),
            log: key("log"),
            snap: key("snap"),
            lease: key("lease"),
            demand: key("demand"),
            target: key("target"),
        }
    }

    /// Sorted set of live nodes, scored by the time (ms) their heartbeat expires.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The pub/sub channel every change, failure and lease release is announced on.
    pub fn channel(&self) -> String {
        format!("{}:announce", self.prefix)
    }

    /// The key of the secret that names dynamic streams the same way on every node.
    pub fn identity_key(&self) -> String {
        format!("{}:proxy:identity", self.prefix)
    }

    /// Hash of open connections per node for one proxy token (by the token's digest).
    pub fn token_connections(&self, token_digest: &str) -> String {
        format!("{}:token:{{{token_digest}}}:connections", self.prefix)
    }

    /// The GCRA state of a rate limit shared by the cluster (a host group, or a token's rate
    /// of new connections).
    pub fn rate(&self, what: &str) -> String {
        format!("{}:rate:{{{what}}}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_keys_share_one_hash_tag() {
        let keys = Keys::new("pw").stream("fleet");
        for key in [
            &keys.meta,
            &keys.log,
            &keys.snap,
            &keys.lease,
            &keys.demand,
            &keys.target,
        ] {
            assert!(key.starts_with("pw:{fleet}:"), "{key}");
        }
    }

    #[test]
    fn braces_cannot_move_a_stream_to_another_slot() {
        let keys = Keys::new("pw").stream("a}b{c");
        assert_eq!(keys.meta, "pw:{a_b_c}:meta");
    }
}
