//! The cluster's state in Redis, as typed operations: each is one atomic script or command
//! (see [`super::scripts`]). Nothing here keeps state between calls but the connection.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use super::keys::{Keys, StreamKeys};
use super::message::{self, Announcement, LoggedChange};
use super::scripts;
use crate::wire::ChangeKind as Kind;

/// Why an operation on Redis failed. Every failure is transient from the caller's view:
/// retry later (the connection manager reconnects in the background).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something this version cannot read (another version's keys?).
    #[error("unexpected reply from redis ({0})")]
    Reply(&'static str),
}

/// How a stream's keys are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Changes the log keeps (beyond those the stored document needs).
    pub history: usize,
    /// Bytes of payload the log keeps, likewise.
    pub history_bytes: u64,
    /// How long the keys live without a publish or poll (then Redis drops them).
    pub ttl: Duration,
}

/// A change to append.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The lease's fence, or `None` for an unfenced writer (a push, checked by `base` alone).
    pub fence: Option<u64>,
    /// The epoch the change belongs to (`None`: the caller knows none; only a snapshot may
    /// then start one).
    pub epoch: Option<u64>,
    /// The sequence number of the document the change applies to.
    pub base: u64,
    /// Patch or snapshot.
    pub kind: Kind,
    /// The patch or document.
    pub payload: &'a [u8],
    /// When the change happened (ms since the Unix epoch).
    pub at_ms: u64,
    /// The document after the change, for a patch that should store it (a checkpoint).
    pub document: Option<&'a [u8]>,
    /// The epoch to start when there is none (or with `reset`).
    pub new_epoch: u64,
    /// Start a new epoch even though one exists (a writer that cannot rebuild the log's
    /// document: subscribers then get a snapshot, never a patch of a broken log).
    pub reset: bool,
    /// The fingerprint of the writer's configuration of the stream (`None`: a dynamic
    /// stream): refused when the log was claimed for another ([`Store::claim`]).
    pub config: Option<&'a str>,
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Logged as `seq` of `epoch`; `pending` patch bytes are logged since the stored document.
    Ok {
        /// The epoch.
        epoch: u64,
        /// Its sequence number.
        seq: u64,
        /// Patch bytes since the stored document (a checkpoint is due when they outweigh it).
        pending: u64,
    },
    /// A newer lease exists: the caller no longer polls this stream.
    Fenced,
    /// The log was claimed for another configuration of the stream (another node loaded
    /// it): this node writes it again once it loads the same.
    Stale,
    /// The log's top is not the caller's base: it must catch up and try again.
    Conflict {
        /// The current epoch (`None`: the stream has none).
        epoch: Option<u64>,
        /// The current top.
        seq: u64,
    },
}

/// A stream as the log holds it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The epoch.
    pub epoch: u64,
    /// The top of the log.
    pub seq: u64,
    /// The sequence number of `document`.
    pub snap_seq: u64,
    /// The document at `snap_seq` (`None` if its key was lost: the log cannot be rebuilt).
    pub document: Option<Bytes>,
    /// Logged changes, oldest first, from those history keeps (or from `snap_seq + 1`).
    pub changes: Vec<LoggedChange>,
    /// The upstream's failure, if its last poll failed.
    pub failure: Option<Bytes>,
}

/// What the lease's holder last learned from the upstream: carried over to the next holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollState {
    /// The last ETag.
    pub etag: Option<String>,
    /// The last Last-Modified.
    pub last_modified: Option<String>,
    /// When the last poll started (ms, Redis time).
    pub last_poll_ms: Option<u64>,
    /// Upstream requests sent for this stream, by any node.
    pub polls: u64,
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// The caller holds the lease with this fence; `now_ms` is Redis's clock, `poll` what
    /// the previous holders learned.
    Held {
        /// The fence token every write of the holder carries.
        fence: u64,
        /// Redis's time.
        now_ms: u64,
        /// The carried-over poll state.
        poll: PollState,
    },
    /// Another node holds it.
    HeldBy(String),
    /// The stream's log was claimed for another configuration of the stream than the
    /// caller's: it stands by until it loads the same.
    OtherConfig,
}

/// What a node's claim of a stream's log for its configuration did ([`Store::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The log already belonged to this configuration.
    Same,
    /// The log had no configuration yet: it is this one's now, its epoch kept.
    Recorded,
    /// The log belonged to another configuration: it ended, the next write starts a new
    /// epoch, the lease was freed.
    Claimed,
}

/// Typed access to the cluster's keys.
#[derive(Clone)]
pub struct Store {
    connection: ConnectionManager,
    keys: Keys,
    publish: Script,
    load: Script,
    acquire: Script,
    claim: Script,
    renew: Script,
    release: Script,
    heartbeat: Script,
    polled: Script,
    health: Script,
    rate: Script,
    connections: Script,
    demand: Script,
    evict: Script,
    identity: Script,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("keys", &self.keys).finish()
    }
}

impl Store {
    /// A store over `connection` (which reconnects by itself), keys under `keys`.
    pub fn new(connection: ConnectionManager, keys: Keys) -> Self {
        Store {
            connection,
            keys,
            publish: Script::new(scripts::PUBLISH),
            load: Script::new(scripts::LOAD),
            acquire: Script::new(scripts::ACQUIRE),
            claim: Script::new(scripts::CLAIM),
            renew: Script::new(scripts::RENEW),
            release: Script::new(scripts::RELEASE),
            heartbeat: Script::new(scripts::HEARTBEAT),
            polled: Script::new(scripts::POLLED),
            health: Script::new(scripts::HEALTH),
            rate: Script::new(scripts::RATE),
            connections: Script::new(scripts::CONNECTIONS),
            demand: Script::new(scripts::DEMAND),
            evict: Script::new(scripts::EVICT),
            identity: Script::new(scripts::IDENTITY),
        }
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn stream_keys(&self, stream: &str) -> StreamKeys {
        self.keys.stream(stream)
    }

    /// Round-trip time of a `PING`.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(started.elapsed())
    }

    /// Appends a change to `stream`'s log (atomically: fence, base, append, document, trim,
    /// announce).
    pub async fn append(
        &self,
        stream: &str,
        change: &Append<'_>,
        retention: &Retention,
    ) -> Result<Appended, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let (status, epoch, seq, pending): (String, String, u64, u64) = self
            .publish
            .key(&keys.meta)
            .key(&keys.log)
            .key(&keys.snap)
            .arg(change.fence.unwrap_or(0))
            .arg(change.epoch.unwrap_or(0))
            .arg(change.base)
            .arg(message::code(change.kind))
            .arg(change.payload)
            .arg(change.at_ms)
            .arg(change.document.unwrap_or_default())
            .arg(retention.history)
            .arg(retention.history_bytes)
            .arg(millis(retention.ttl))
            .arg(self.keys.channel())
            .arg(stream)
            .arg(change.new_epoch)
            .arg(if change.reset { "1" } else { "0" })
            .arg(change.config.unwrap_or_default())
            .invoke_async(&mut connection)
            .await?;
        let epoch: u64 = epoch.parse().map_err(|_| StoreError::Reply("epoch"))?;
        Ok(match status.as_str() {
            "ok" => Appended::Ok {
                epoch,
                seq,
                pending,
            },
            "fenced" => Appended::Fenced,
            "stale" => Appended::Stale,
            "conflict" => Appended::Conflict {
                epoch: (epoch != 0).then_some(epoch),
                seq,
            },
            _ => return Err(StoreError::Reply("publish status")),
        })
    }

    /// Everything needed to serve `stream`, `None` if it has no epoch (never published, or
    /// its keys were lost).
    pub async fn load(&self, stream: &str, history: usize) -> Result<Option<Loaded>, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let reply: Value = self
            .load
            .key(&keys.meta)
            .key(&keys.log)
            .key(&keys.snap)
            .arg(history)
            .invoke_async(&mut connection)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(StoreError::Reply("load"));
        };
        let mut parts = parts.into_iter();
        let (Some(meta), Some(document), Some(entries)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Ok(None);
        };
        let meta = fields(meta)?;
        let epoch = number(&meta, "epoch").ok_or(StoreError::Reply("epoch"))?;
        let document = match document {
            Value::Nil => None,
            Value::BulkString(bytes) => Some(Bytes::from(bytes)),
            _ => return Err(StoreError::Reply("document")),
        };
        Ok(Some(Loaded {
            epoch,
            seq: number(&meta, "seq").unwrap_or(0),
            snap_seq: number(&meta, "snap_seq").unwrap_or(0),
            document,
            changes: entries_of(entries, epoch)?,
            failure: meta.get("failure").map(|f| Bytes::copy_from_slice(f)),
        }))
    }

    /// The logged changes of `stream` from `from` to `to` (inclusive), oldest first; fewer
    /// (or none) when the log no longer holds them.
    pub async fn range(
        &self,
        stream: &str,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Result<Vec<LoggedChange>, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let reply: Value = redis::cmd("XRANGE")
            .arg(&keys.log)
            .arg(format!("{from}-0"))
            .arg(format!("{to}-0"))
            .query_async(&mut connection)
            .await?;
        entries_of(reply, epoch)
    }

    /// The epoch and top of each stream, pipelined (`None`: no epoch).
    pub async fn positions(&self, streams: &[&str]) -> Result<Vec<Option<(u64, u64)>>, StoreError> {
        let mut pipe = redis::pipe();
        for stream in streams {
            pipe.cmd("HMGET")
                .arg(self.stream_keys(stream).meta)
                .arg("epoch")
                .arg("seq");
        }
        let mut connection = self.connection.clone();
        let replies: Vec<(Option<u64>, Option<u64>)> = pipe.query_async(&mut connection).await?;
        Ok(replies
            .into_iter()
            .map(|(epoch, seq)| epoch.map(|e| (e, seq.unwrap_or(0))))
            .collect())
    }

    /// Takes (or renews) `stream`'s lease for `node`, running the configuration of the stream
    /// whose fingerprint is `config` (`None`: a dynamic stream).
    pub async fn acquire(
        &self,
        stream: &str,
        node: &str,
        ttl: Duration,
        retention: &Retention,
        config: Option<&str>,
    ) -> Result<Lease, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let reply: Value = self
            .acquire
            .key(&keys.lease)
            .key(&keys.meta)
            .arg(node)
            .arg(millis(ttl))
            .arg(millis(retention.ttl))
            .arg(config.unwrap_or_default())
            .invoke_async(&mut connection)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(StoreError::Reply("acquire"));
        };
        let mut parts = parts.into_iter();
        let (held, other_config) = match parts.next() {
            Some(Value::Int(1)) => (true, false),
            Some(Value::Int(2)) => (false, true),
            _ => (false, false),
        };
        if other_config {
            return Ok(Lease::OtherConfig);
        }
        let who = text(parts.next()).ok_or(StoreError::Reply("acquire holder"))?;
        let now_ms = match parts.next() {
            Some(Value::Int(n)) => u64::try_from(n).unwrap_or(0),
            _ => return Err(StoreError::Reply("acquire time")),
        };
        if !held {
            return Ok(Lease::HeldBy(who));
        }
        let fence = who.parse().map_err(|_| StoreError::Reply("fence"))?;
        let meta = match parts.next() {
            Some(meta) => fields(meta)?,
            None => HashMap::new(),
        };
        let present = |name: &str| {
            meta.get(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Ok(Lease::Held {
            fence,
            now_ms,
            poll: PollState {
                etag: present("etag"),
                last_modified: present("last_modified"),
                last_poll_ms: number(&meta, "last_poll"),
                polls: number(&meta, "polls").unwrap_or(0),
            },
        })
    }

    /// Claims `stream`'s log for the configuration whose fingerprint is `config`, as `node`
    /// loads it (see [`scripts::CLAIM`]).
    pub async fn claim(
        &self,
        stream: &str,
        node: &str,
        config: &str,
        retention: &Retention,
    ) -> Result<Claimed, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let claimed: String = self
            .claim
            .key(&keys.meta)
            .key(&keys.lease)
            .key(&keys.log)
            .key(&keys.snap)
            .arg(config)
            .arg(node)
            .arg(millis(retention.ttl))
            .arg(self.keys.channel())
            .arg(stream)
            .invoke_async(&mut connection)
            .await?;
        match claimed.as_str() {
            "same" => Ok(Claimed::Same),
            "recorded" => Ok(Claimed::Recorded),
            "claimed" => Ok(Claimed::Claimed),
            _ => Err(StoreError::Reply("claim")),
        }
    }

    /// Whether `node` last loaded the configuration `stream`'s log belongs to (a node that
    /// recorded none, or another, does not: a holder keeps the lease rather than hand it
    /// there). `true` when the log records no configuration.
    pub async fn runs_config_of(&self, stream: &str, node: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let (config, nodes): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.stream_keys(stream).meta)
            .arg("config")
            .arg(format!("cfg:{node}"))
            .query_async(&mut connection)
            .await?;
        Ok(config.is_none() || config == nodes)
    }

    /// Who holds `stream`'s lease and for how much longer, `None` when it is free.
    pub async fn holder(&self, stream: &str) -> Result<Option<(String, Duration)>, StoreError> {
        let lease = self.stream_keys(stream).lease;
        let mut connection = self.connection.clone();
        let (value, pttl): (Option<String>, i64) = redis::pipe()
            .get(&lease)
            .pttl(&lease)
            .query_async(&mut connection)
            .await?;
        Ok(value.map(|value| {
            let holder = value
                .rsplit_once(' ')
                .map_or(value.as_str(), |(node, _)| node);
            let left = Duration::from_millis(u64::try_from(pttl).unwrap_or(0));
            (holder.to_owned(), left)
        }))
    }

    /// Extends a held lease; `false` when it is no longer `node`'s with `fence`.
    pub async fn renew(
        &self,
        stream: &str,
        node: &str,
        fence: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let held: i64 = self
            .renew
            .key(self.stream_keys(stream).lease)
            .arg(node)
            .arg(fence)
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await?;
        Ok(held == 1)
    }

    /// Gives up a held lease and announces it; `false` when it was not held.
    pub async fn release(&self, stream: &str, node: &str, fence: u64) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let released: i64 = self
            .release
            .key(self.stream_keys(stream).lease)
            .arg(node)
            .arg(fence)
            .arg(self.keys.channel())
            .arg(stream)
            .invoke_async(&mut connection)
            .await?;
        Ok(released == 1)
    }

    /// Marks `node` live for `ttl` and returns the live nodes; `None` removes `node`.
    pub async fn heartbeat(
        &self,
        node: &str,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, StoreError> {
        let mut connection = self.connection.clone();
        let ttl = ttl.map(|t| millis(t).to_string()).unwrap_or_default();
        Ok(self
            .heartbeat
            .key(self.keys.nodes())
            .arg(node)
            .arg(ttl)
            .arg(self.keys.channel())
            .invoke_async(&mut connection)
            .await?)
    }

    /// Records a poll of the holder with `fence`; returns its Redis time, `None` if fenced.
    pub async fn polled(
        &self,
        stream: &str,
        fence: u64,
        etag: Option<&str>,
        last_modified: Option<&str>,
        retention: &Retention,
    ) -> Result<Option<u64>, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let at: u64 = self
            .polled
            .key(&keys.meta)
            .key(&keys.log)
            .key(&keys.snap)
            .arg(fence)
            .arg(etag.unwrap_or_default())
            .arg(last_modified.unwrap_or_default())
            .arg(millis(retention.ttl))
            .invoke_async(&mut connection)
            .await?;
        Ok((at != 0).then_some(at))
    }

    /// Asks the shared rate limit `name` (`quota` requests per `period`, at most `burst` at
    /// once) for one request: `None` when it may go now, else how long to wait.
    pub async fn rate(
        &self,
        name: &str,
        quota: u32,
        period: Duration,
        burst: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let interval = u64::try_from(period.as_micros() / u128::from(quota.max(1)))
            .unwrap_or(u64::MAX)
            .max(1);
        let mut connection = self.connection.clone();
        let wait: u64 = self
            .rate
            .key(self.keys.rate(name))
            .arg(interval)
            .arg(burst.max(1))
            .invoke_async(&mut connection)
            .await?;
        Ok((wait > 0).then(|| Duration::from_micros(wait)))
    }

    /// Changes `node`'s count of connections for the token whose digest is `token` by
    /// `change` (+1 admits one if the cluster-wide count stays within `limit`; -1 releases
    /// one; 0 refreshes the entry, which expires `ttl` after its last change). Returns the
    /// cluster-wide count, `None` when admission was refused.
    pub async fn connections(
        &self,
        token: &str,
        node: &str,
        change: i64,
        limit: u64,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let mut connection = self.connection.clone();
        let count: i64 = self
            .connections
            .key(self.keys.token_connections(token))
            .arg(node)
            .arg(change)
            .arg(limit)
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await?;
        Ok(u64::try_from(count).ok())
    }

    /// Records `node`'s demand for `stream` (its subscribers ask for polls every `period`;
    /// `None` withdraws it) for `ttl`, and returns every live node's demand.
    pub async fn demand(
        &self,
        stream: &str,
        node: &str,
        period: Option<Duration>,
        ttl: Duration,
    ) -> Result<Vec<(String, Duration)>, StoreError> {
        let mut connection = self.connection.clone();
        let flat: Vec<String> = self
            .demand
            .key(self.stream_keys(stream).demand)
            .arg(node)
            .arg(period.map(|p| millis(p).to_string()).unwrap_or_default())
            .arg(millis(ttl))
            .invoke_async(&mut connection)
            .await?;
        Ok(flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [node, period] => Some((
                    node.clone(),
                    Duration::from_millis(period.parse().unwrap_or(0)),
                )),
                _ => None,
            })
            .collect())
    }

    /// Deletes `stream`'s keys if no node but `node` wants it and none holds its lease;
    /// `true` if so.
    pub async fn evict(&self, stream: &str, node: &str) -> Result<bool, StoreError> {
        let keys = self.stream_keys(stream);
        let mut connection = self.connection.clone();
        let deleted: i64 = self
            .evict
            .key(&keys.meta)
            .key(&keys.log)
            .key(&keys.snap)
            .key(&keys.lease)
            .key(&keys.demand)
            .arg(node)
            .invoke_async(&mut connection)
            .await?;
        Ok(deleted == 1)
    }

    /// The secret naming dynamic streams on every node (created by the first to ask).
    pub async fn identity_key(&self) -> Result<[u8; 32], StoreError> {
        let fresh: [u8; 32] = rand::random();
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let mut connection = self.connection.clone();
        let stored: String = self
            .identity
            .key(self.keys.identity_key())
            .arg(hex)
            .invoke_async(&mut connection)
            .await?;
        let mut key = [0u8; 32];
        if stored.len() != 64 {
            return Err(StoreError::Reply("identity key"));
        }
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&stored[2 * i..2 * i + 2], 16)
                .map_err(|_| StoreError::Reply("identity key"))?;
        }
        Ok(key)
    }

    /// Records the upstream's failure (or its end, `None`) and announces it; `false` if
    /// fenced.
    pub async fn health(
        &self,
        stream: &str,
        fence: u64,
        epoch: u64,
        node: &str,
        failure: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let message = Announcement::encode_health(stream, epoch, node, failure);
        let mut connection = self.connection.clone();
        let done: i64 = self
            .health
            .key(self.stream_keys(stream).meta)
            .arg(fence)
            .arg(failure.unwrap_or_default())
            .arg(self.keys.channel())
            .arg(message)
            .invoke_async(&mut connection)
            .await?;
        Ok(done == 1)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn text(value: Option<Value>) -> Option<String> {
    match value? {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A flat field/value array (HGETALL) as a map.
fn fields(value: Value) -> Result<HashMap<String, Vec<u8>>, StoreError> {
    let items = match value {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return Err(StoreError::Reply("hash")),
    };
    let mut map = HashMap::new();
    let mut items = items.into_iter();
    while let (Some(name), Some(value)) = (items.next(), items.next()) {
        let (Value::BulkString(name), Value::BulkString(value)) = (name, value) else {
            return Err(StoreError::Reply("hash field"));
        };
        map.insert(String::from_utf8_lossy(&name).into_owned(), value);
    }
    Ok(map)
}

fn number(map: &HashMap<String, Vec<u8>>, name: &str) -> Option<u64> {
    std::str::from_utf8(map.get(name)?).ok()?.parse().ok()
}

/// XRANGE entries (`[[id, [field, value, …]], …]`) as changes of `epoch`.
fn entries_of(value: Value, epoch: u64) -> Result<Vec<LoggedChange>, StoreError> {
    let Value::Array(entries) = value else {
        return Err(StoreError::Reply("entries"));
    };
    entries
        .into_iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                return Err(StoreError::Reply("entry"));
            };
            let mut parts = parts.into_iter();
            let id = text(parts.next()).ok_or(StoreError::Reply("entry id"))?;
            let seq = id
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(StoreError::Reply("entry id"))?;
            let mut body = fields(parts.next().ok_or(StoreError::Reply("entry fields"))?)?;
            let kind = body
                .get("k")
                .and_then(|k| message::kind_of(k))
                .ok_or(StoreError::Reply("entry kind"))?;
            Ok(LoggedChange {
                epoch,
                seq,
                kind,
                at_ms: number(&body, "t").unwrap_or(0),
                payload: Bytes::from(body.remove("p").unwrap_or_default()),
            })
        })
        .collect()
}
