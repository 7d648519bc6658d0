//! Consumers of the broker sinks, independent of patchwire's code: a JetStream pull consumer
//! (async-nats) and `XREAD` (the redis crate), and the check every test makes of what they
//! received: one line per stream, patches only after their base, rebuilt into a document.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures_util::StreamExt as _;
use serde_json::Value;

/// One message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its attributes (`ce-…`, `content-type`, and `Nats-Msg-Id` over NATS).
    pub headers: BTreeMap<String, String>,
    /// The patch or the document.
    pub payload: Value,
}

impl Received {
    /// Attribute `name`.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
    }

    fn number(&self, name: &str) -> u64 {
        self.header(name)
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e} in {:?}", self.headers))
    }

    /// `ce-epoch`.
    pub fn epoch(&self) -> u64 {
        self.number("ce-epoch")
    }

    /// `ce-seq`.
    pub fn seq(&self) -> u64 {
        self.number("ce-seq")
    }

    /// Whether it is a whole document.
    pub fn is_snapshot(&self) -> bool {
        self.header("ce-type") == "stream.snapshot"
    }
}

/// What a line of messages came to.
#[derive(Debug, Default)]
pub struct Line {
    /// The document rebuilt from it.
    pub document: Option<Value>,
    /// Messages after removing those with an id seen before.
    pub distinct: usize,
    /// Messages whose id was seen before (a consumer drops them).
    pub duplicates: usize,
    /// Snapshots after the first message.
    pub snapshots_after_first: usize,
    /// Epochs, in order.
    pub epochs: Vec<u64>,
    /// Sequence numbers, in order (duplicates removed).
    pub seqs: Vec<u64>,
}

/// Checks `messages` as a consumer would apply them and rebuilds the document: every message
/// carries the CloudEvents attributes, ids are `{stream}:{epoch}:{seq}`, a repeated id is
/// dropped, sequence numbers rise within an epoch, and a patch comes only right after its
/// base (same epoch, `ce-baseseq` = the previous `ce-seq`; tests of streams also check that
/// every sequence number is there).
pub fn rebuild(stream: &str, messages: &[Received]) -> Result<Line, String> {
    let mut line = Line::default();
    let mut seen = HashSet::new();
    let mut last: Option<(u64, u64)> = None;
    for (i, m) in messages.iter().enumerate() {
        for name in ["ce-specversion", "ce-id", "ce-type", "ce-source", "ce-time"] {
            if !m.headers.contains_key(name) {
                return Err(format!("message {i} lacks {name}: {:?}", m.headers));
            }
        }
        if m.header("ce-specversion") != "1.0" || m.header("ce-stream") != stream {
            return Err(format!("message {i}: {:?}", m.headers));
        }
        let (epoch, seq) = (m.epoch(), m.seq());
        if m.header("ce-id") != format!("{stream}:{epoch}:{seq}") {
            return Err(format!(
                "message {i}: id {} ≠ its position",
                m.header("ce-id")
            ));
        }
        if let Some(msg_id) = m.headers.get("Nats-Msg-Id")
            && msg_id != m.header("ce-id")
        {
            return Err(format!("message {i}: Nats-Msg-Id {msg_id} ≠ ce-id"));
        }
        if !seen.insert(m.header("ce-id").to_owned()) {
            line.duplicates += 1;
            continue;
        }
        if i > 0 && m.is_snapshot() {
            line.snapshots_after_first += 1;
        }
        if m.is_snapshot() {
            if m.header("content-type") != "application/json" {
                return Err(format!(
                    "message {i}: snapshot content-type {:?}",
                    m.headers
                ));
            }
            if let Some((e, s)) = last
                && e == epoch
                && seq <= s
            {
                return Err(format!(
                    "message {i}: snapshot at {seq} after {s}: not in order"
                ));
            }
            line.document = Some(m.payload.clone());
        } else {
            if m.header("content-type") != "application/json-patch+json" {
                return Err(format!("message {i}: patch content-type {:?}", m.headers));
            }
            // A stream's patch applies to `seq - 1`; a view's to its previous change (views
            // change at some of their stream's sequence numbers only).
            let base = m.number("ce-baseseq");
            if last != Some((epoch, base)) || base >= seq {
                return Err(format!(
                    "message {i}: patch {epoch}:{seq} on base {base} after {last:?}: a gap"
                ));
            }
            let document = line
                .document
                .as_mut()
                .ok_or_else(|| format!("message {i}: a patch before any document"))?;
            let patch: json_patch::Patch = serde_json::from_value(m.payload.clone())
                .map_err(|e| format!("message {i}: not a patch: {e}"))?;
            json_patch::patch(document, &patch)
                .map_err(|e| format!("message {i}: does not apply: {e}"))?;
        }
        if line.epochs.last() != Some(&epoch) {
            line.epochs.push(epoch);
        }
        line.seqs.push(seq);
        line.distinct += 1;
        last = Some((epoch, seq));
    }
    Ok(line)
}

/// Every message JetStream stream `jetstream` holds on `subject`, oldest first, read by a pull
/// consumer.
pub async fn jetstream_messages(url: &str, jetstream: &str, subject: &str) -> Vec<Received> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let context = jetstream::new(client);
    let stream = context
        .get_stream(jetstream)
        .await
        .expect("the JetStream stream exists");
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut received = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .expect("fetch");
        let before = received.len();
        while let Some(message) = batch.next().await {
            let message = message.expect("a message");
            let mut headers = BTreeMap::new();
            if let Some(map) = &message.headers {
                for (name, values) in map.iter() {
                    if let Some(value) = values.first() {
                        headers.insert(name.to_string(), value.as_str().to_owned());
                    }
                }
            }
            let payload = serde_json::from_slice(&message.payload).expect("JSON payload");
            received.push(Received { headers, payload });
        }
        if received.len() == before {
            return received;
        }
    }
}

/// Every entry of Redis stream `key`, oldest first, read with `XREAD` from the start.
pub async fn redis_entries(url: &str, key: &str) -> Vec<Received> {
    let client = redis::Client::open(url).expect("redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let mut after = "0-0".to_owned();
    let mut received = Vec::new();
    loop {
        let answer: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(500)
            .arg("STREAMS")
            .arg(key)
            .arg(&after)
            .query_async(&mut connection)
            .await
            .expect("XREAD");
        let entries = xread_entries(&answer);
        if entries.is_empty() {
            return received;
        }
        for (id, fields) in entries {
            after = id;
            let mut headers = BTreeMap::new();
            let mut payload = Value::Null;
            for (name, value) in fields {
                if name == "data" {
                    payload = serde_json::from_slice(&value).expect("JSON data");
                } else {
                    headers.insert(name, String::from_utf8(value).expect("UTF-8 field"));
                }
            }
            received.push(Received { headers, payload });
        }
    }
}

type Entry = (String, Vec<(String, Vec<u8>)>);

/// The entries of an `XREAD` answer for one key (RESP2 arrays, or a RESP3 map).
fn xread_entries(answer: &redis::Value) -> Vec<Entry> {
    use redis::Value as V;
    let text = |v: &V| match v {
        V::BulkString(b) => String::from_utf8(b.clone()).unwrap_or_default(),
        V::SimpleString(s) => s.clone(),
        other => panic!("unexpected {other:?}"),
    };
    let per_key = match answer {
        V::Nil => return Vec::new(),
        V::Array(keys) => match keys.first() {
            Some(V::Array(pair)) => pair.get(1).cloned(),
            _ => return Vec::new(),
        },
        V::Map(pairs) => pairs.first().map(|(_, v)| v.clone()),
        other => panic!("unexpected XREAD answer {other:?}"),
    };
    let Some(V::Array(entries)) = per_key else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|entry| {
            let V::Array(parts) = entry else {
                panic!("unexpected entry {entry:?}")
            };
            let id = text(&parts[0]);
            let V::Array(fields) = &parts[1] else {
                panic!("unexpected fields {:?}", parts[1])
            };
            let fields = fields
                .chunks(2)
                .map(|pair| {
                    let value = match &pair[1] {
                        V::BulkString(b) => b.clone(),
                        other => text(other).into_bytes(),
                    };
                    (text(&pair[0]), value)
                })
                .collect();
            (id, fields)
        })
        .collect()
}

/// `XLEN key`.
pub async fn redis_len(url: &str, key: &str) -> u64 {
    let client = redis::Client::open(url).expect("redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut connection)
        .await
        .expect("XLEN")
}
