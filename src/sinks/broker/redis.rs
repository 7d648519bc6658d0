//! Redis Streams: each stream's messages as entries of its key (`XADD … MAXLEN ~`), the
//! CloudEvents attributes as fields and the payload as the `data` field. A batch is appended by
//! one script, which skips entries the key already holds (same epoch, sequence number at or
//! below its last entry's), so a batch published twice is stored once, and refuses a patch
//! whose base is not the key's last entry; the last entry is read back with
//! `XREVRANGE … COUNT 1`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::config::{RedisSettings, shown_url};
use super::message::{Message, Position};
use super::{Acked, Broker, BrokerError, BrokerFuture};

/// The field holding the payload.
pub const DATA_FIELD: &str = "data";

/// Appends the entries of ARGV after `maxlen` (each: epoch, seq, base or "" for a document,
/// field count, fields…) that follow the key's last entry; returns how many it skipped. A
/// patch whose base is not the key's last entry (the key was lost or trimmed away while the
/// publisher was idle) is refused with a `GAP` error, entries before it staying appended: the
/// publisher then reads the key back and resyncs with a document.
const APPEND: &str = r"
local key = KEYS[1]
local maxlen = ARGV[1]
local epoch, seq = nil, nil
local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'ce-epoch' then epoch = fields[i + 1]
    elseif fields[i] == 'ce-seq' then seq = tonumber(fields[i + 1]) end
  end
end
local skipped = 0
local i = 2
while i <= #ARGV do
  local e, s, base, n = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3])
  local entry = {}
  for j = 1, n do entry[j] = ARGV[i + 3 + j] end
  i = i + 4 + n
  if epoch == e and seq ~= nil and s <= seq then
    skipped = skipped + 1
  elseif base ~= '' and not (epoch == e and seq == tonumber(base)) then
    return redis.error_reply('GAP the key does not end at the base of ' .. e .. ':' .. s)
  else
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(entry))
    epoch, seq = e, s
  end
end
return skipped
";

/// A Redis Streams broker.
pub struct RedisStreams {
    connection: ConnectionManager,
    maxlen: u64,
    append: Script,
    url: String,
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("Redis: {what}: {error}"))
}

impl RedisStreams {
    /// A broker on `settings`' server; the connection is made on first use and remade after
    /// failures.
    pub fn connect(settings: &RedisSettings, timeout: Duration) -> Result<RedisStreams, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("{}: {e}", shown_url(&settings.url)))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("{}: {e}", shown_url(&settings.url)))?;
        Ok(RedisStreams {
            connection,
            maxlen: settings.maxlen,
            append: Script::new(APPEND),
            url: shown_url(&settings.url),
        })
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| unavailable(&format!("PING {}", self.url), e))
    }

    async fn last_of(&self, key: &str, stream: &str) -> Result<Option<Position>, BrokerError> {
        let mut connection = self.connection.clone();
        let entries: Value = redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(|e| unavailable(&format!("XREVRANGE {key}"), e))?;
        let id = last_entry_field(&entries, "ce-id");
        let position = id.as_deref().and_then(|id| Position::of_id(stream, id));
        if position.is_none() && id.is_some() {
            tracing::warn!(
                key,
                "the last entry of the key is not one of the stream's; starting the stream over with a snapshot"
            );
        }
        Ok(position)
    }

    async fn publish_all(&self, key: &str, messages: &[Message]) -> Result<Acked, BrokerError> {
        let mut invocation = self.append.key(key);
        invocation.arg(self.maxlen);
        for message in messages {
            let attributes = message.attributes();
            invocation
                .arg(message.epoch.to_string())
                .arg(message.seq)
                .arg(message.base_seq.map(|b| b.to_string()).unwrap_or_default())
                .arg(2 * (attributes.len() + 1));
            for (name, value) in attributes {
                invocation.arg(name).arg(value);
            }
            invocation.arg(DATA_FIELD).arg(message.payload.as_ref());
        }
        let mut connection = self.connection.clone();
        let skipped: usize = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| unavailable(&format!("XADD {key}"), e))?;
        Ok(Acked {
            duplicates: skipped,
        })
    }
}

/// The value of `field` in the one entry of an `XREVRANGE … COUNT 1` answer.
fn last_entry_field(answer: &Value, field: &str) -> Option<String> {
    let Value::Array(entries) = answer else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    let Value::Array(fields) = entry.get(1)? else {
        return None;
    };
    fields.chunks(2).find_map(|pair| match pair {
        [Value::BulkString(name), Value::BulkString(value)] if name == field.as_bytes() => {
            String::from_utf8(value.clone()).ok()
        }
        _ => None,
    })
}

impl Broker for RedisStreams {
    fn prepare(&self) -> BrokerFuture<'_, ()> {
        Box::pin(self.ping())
    }

    fn last<'a>(
        &'a self,
        destination: &'a str,
        stream: &'a str,
    ) -> BrokerFuture<'a, Option<Position>> {
        Box::pin(self.last_of(destination, stream))
    }

    fn publish<'a>(
        &'a self,
        destination: &'a str,
        messages: &'a [Message],
    ) -> BrokerFuture<'a, Acked> {
        Box::pin(self.publish_all(destination, messages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_entry_is_read_by_field() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let answer = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("ce-specversion"),
                bulk("1.0"),
                bulk("ce-id"),
                bulk("fleet:9:5"),
            ]),
        ])]);
        assert_eq!(
            last_entry_field(&answer, "ce-id").as_deref(),
            Some("fleet:9:5")
        );
        assert_eq!(last_entry_field(&answer, "ce-seq"), None);
        assert_eq!(last_entry_field(&Value::Array(vec![]), "ce-id"), None);
        assert_eq!(last_entry_field(&Value::Nil, "ce-id"), None);
    }
}
