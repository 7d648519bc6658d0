//! A human summary of a validated configuration, printed by `patchwire check`.
//!
//! Header values, URL userinfo and query values may be secrets: they are never printed.

use std::fmt::Write as _;

use url::Url;

use super::model::{Config, Cors, LogFormat};
use crate::proxy::config::{HostPattern, ProxySettings};
use crate::sinks::webhook::config::WebhookSettings;
use crate::upstream::config::RateLimit;

use crate::validation::{fmt_bytes, fmt_duration};

fn quota(limit: &RateLimit) -> String {
    format!("{}/s, burst {}", limit.per_second, limit.burst)
}

/// The URL as every output shows it (see [`crate::redact`]).
fn redacted(url: &Url) -> String {
    crate::redact::Redacted::new(url).to_string()
}

/// Summarizes `config`: listeners, shared upstream settings and every stream, without secrets.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_description(&mut out, config);
    out
}

fn write_description(out: &mut String, config: &Config) -> std::fmt::Result {
    if let Some(source) = &config.source {
        writeln!(out, "configuration: {}", source.display())?;
    }
    let s = &config.server;
    let cors = match &s.cors {
        Cors::Disabled => "disabled".to_owned(),
        Cors::AnyOrigin => "any origin".to_owned(),
        Cors::Origins(origins) => origins
            .iter()
            .map(|o| o.to_str().unwrap_or("<non-ASCII>"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    writeln!(out, "server: listening on {}", s.listen)?;
    writeln!(
        out,
        "  keepalive {}, retry hint {}, subscriber buffer {}, stall timeout {}, shutdown grace {}",
        fmt_duration(s.keepalive),
        fmt_duration(s.retry_hint),
        s.subscriber_buffer,
        fmt_duration(s.stall_timeout),
        fmt_duration(s.shutdown_grace)
    )?;
    writeln!(
        out,
        "  header timeout {}, idle timeout {}, body timeout {}, at most {} connections, \
         gzip level {}",
        fmt_duration(s.header_timeout),
        fmt_duration(s.idle_timeout),
        fmt_duration(s.body_timeout),
        s.max_connections,
        s.gzip_level.get()
    )?;
    writeln!(out, "  CORS: {cors}")?;
    let format = match config.log.format {
        LogFormat::Plain => "plain",
        LogFormat::Json => "json",
    };
    writeln!(out, "log: {format}, filter {:?}", config.log.filter)?;
    let u = &config.upstream;
    writeln!(out, "upstream: user agent {:?}", u.user_agent)?;
    writeln!(
        out,
        "  backoff {} to {}, x{} per failure, jitter {}; Retry-After capped at {}",
        fmt_duration(u.backoff.initial),
        fmt_duration(u.backoff.max),
        u.backoff.multiplier,
        u.backoff.jitter,
        fmt_duration(u.backoff.max_retry_after)
    )?;
    writeln!(
        out,
        "  default rate limit per host: {}",
        quota(&u.default_rate_limit)
    )?;
    for (name, limit) in &u.rate_limits {
        writeln!(out, "  rate-limit group {name:?}: {}", quota(limit))?;
    }
    match &config.simulator {
        Some(sim) => {
            writeln!(out, "simulator: listening on {}", sim.listen)?;
            for feed in &sim.feeds {
                writeln!(
                    out,
                    "  feed {:?} at http://{}/feeds/{}: {} vehicles, {} routes, tick {}, seed {}",
                    feed.name,
                    sim.listen,
                    feed.name,
                    feed.vehicles,
                    feed.routes,
                    fmt_duration(feed.tick),
                    feed.seed
                )?;
            }
        }
        None => writeln!(out, "simulator: off")?,
    }
    writeln!(out, "streams ({}):", config.streams.len())?;
    for st in &config.streams {
        let group_quota = u
            .rate_limits
            .get(&st.rate_limit_group)
            .map(|l| format!("named group, {}", quota(l)))
            .unwrap_or_else(|| format!("per host, {}", quota(&u.default_rate_limit)));
        writeln!(out, "  {} (served at /streams/{})", st.name, st.name)?;
        writeln!(out, "    url:        {}", redacted(&st.url))?;
        let demand = match st.on_demand {
            Some(linger) => format!(
                ", on demand (only while subscribed, lingering {} after the last one leaves)",
                fmt_duration(linger)
            ),
            None => String::new(),
        };
        writeln!(
            out,
            "    polling:    every {}, timeout {}{demand}",
            fmt_duration(st.interval),
            fmt_duration(st.timeout)
        )?;
        writeln!(
            out,
            "    body:       {}, at most {}",
            st.format.as_str(),
            fmt_bytes(st.max_body_bytes)
        )?;
        writeln!(
            out,
            "    history:    {} changes, at most {}",
            st.history,
            fmt_bytes(st.history_bytes)
        )?;
        writeln!(
            out,
            "    rate limit: {:?} ({group_quota})",
            st.rate_limit_group
        )?;
        let mut names: Vec<&str> = st.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        let names = if names.is_empty() {
            "none".to_owned()
        } else {
            format!("{} (values hidden)", names.join(", "))
        };
        writeln!(out, "    headers:    {names}")?;
        writeln!(
            out,
            "    diff:       a patch larger than {}% of the snapshot is sent as a snapshot",
            st.diff.max_patch_ratio * 100.0
        )?;
        describe_views(out, &st.name, st.views.as_ref())?;
        if !st.diff.keys.is_empty() {
            let keys: Vec<String> = st
                .diff
                .keys
                .iter()
                .map(|k| format!("{} by {}", k.array, k.key))
                .collect();
            writeln!(out, "    keys:       {}", keys.join(", "))?;
        }
        if !st.diff.ignore.is_empty() {
            let ignore: Vec<&str> = st.diff.ignore.iter().map(|p| p.as_str()).collect();
            writeln!(out, "    ignore:     {}", ignore.join(", "))?;
        }
    }
    if !config.push_streams.is_empty() {
        writeln!(out, "push streams ({}):", config.push_streams.len())?;
        for st in &config.push_streams {
            writeln!(
                out,
                "  {name} (served at /streams/{name}; fed by POST/PATCH /streams/{name} with the [push] token)",
                name = st.name
            )?;
            writeln!(
                out,
                "    history:    {} changes, at most {}",
                st.history,
                fmt_bytes(st.history_bytes)
            )?;
            describe_views(out, &st.name, st.views.as_ref())?;
        }
    }
    if let Some(push) = &config.push {
        writeln!(
            out,
            "push: bearer token set (hidden), bodies up to {}",
            fmt_bytes(push.max_body_bytes)
        )?;
    }
    if let Some(w) = &config.webhooks {
        describe_webhooks(out, w)?;
    }
    if let Some(p) = &config.proxy {
        describe_proxy(out, p)?;
    }
    if let Some(c) = &config.cluster {
        writeln!(
            out,
            "cluster: node {}{} on {} (keys under {}:), leases of {}, probes every {}{}",
            c.node_id.0,
            if c.node_id_generated {
                " (generated)"
            } else {
                ""
            },
            c.shown_redis(),
            c.prefix,
            fmt_duration(c.lease_ttl),
            fmt_duration(c.probe_interval),
            match &c.webhooks_node {
                Some(node) if c.delivers_webhooks() =>
                    format!(", delivers the webhooks ({})", node.0),
                Some(node) => format!(", webhooks delivered by {}", node.0),
                None => String::new(),
            }
        )?;
    }
    writeln!(
        out,
        "views: at most {} at once over every stream",
        config.max_views
    )?;
    for sink in &config.broker_sinks {
        use crate::sinks::broker::config::{BrokerKind, shown_url};
        let (url, detail) = match &sink.kind {
            BrokerKind::Nats(n) => (
                shown_url(&n.url),
                format!(
                    "JetStream stream {} ({:?}, {} replica(s), max age {}, {} per subject)",
                    n.jetstream,
                    n.storage,
                    n.replicas,
                    fmt_duration(n.max_age),
                    n.max_messages_per_subject
                ),
            ),
            BrokerKind::Redis(r) => (shown_url(&r.url), format!("MAXLEN ~ {}", r.maxlen)),
        };
        let targets: Vec<String> = sink
            .streams
            .iter()
            .map(|s| format!("{} → {}", s.name, s.destination))
            .collect();
        writeln!(
            out,
            "sink {} ({}, {}): {} on {url}, {}; {}",
            sink.name,
            sink.kind.as_str(),
            sink.mode.as_str(),
            targets.join(", "),
            detail,
            format_args!(
                "up to {} messages ({}) queued per stream, {} in flight",
                sink.buffer,
                fmt_bytes(sink.buffer_bytes),
                sink.batch
            )
        )?;
    }
    let ws = &config.websocket;
    if ws.enabled {
        writeln!(
            out,
            "websocket: GET /ws, up to {} subscriptions per connection, client messages up to {} \
             and {}/s, a ping every {}, closed after {} of silence",
            ws.max_subscriptions,
            fmt_bytes(ws.max_message_size as u64),
            ws.max_messages_per_second,
            fmt_duration(ws.ping_interval),
            fmt_duration(ws.idle_timeout)
        )?;
    } else {
        writeln!(out, "websocket: off (GET /ws is a 404)")?;
    }
    Ok(())
}

/// A stream's views, one line (and one per named view).
fn describe_views(
    out: &mut String,
    stream: &str,
    views: Option<&crate::views::config::ViewsSettings>,
) -> std::fmt::Result {
    let Some(views) = views else {
        return writeln!(out, "    views:      none ([streams.filtering] not set)");
    };
    let aliases: Vec<String> = views
        .selector
        .aliases
        .iter()
        .map(|(name, paths)| {
            let paths: Vec<String> = paths.iter().map(ToString::to_string).collect();
            format!("{name} ({})", paths.join(" | "))
        })
        .collect();
    writeln!(
        out,
        "    views:      entities at /{} keyed by {}; aliases: {}; {}; at most {} at once, \
         each kept {} after its last subscriber",
        views.selector.entities.join("/"),
        views.selector.key.join("/"),
        if aliases.is_empty() {
            "none".to_owned()
        } else {
            aliases.join(", ")
        },
        if views.ad_hoc {
            "ad hoc views allowed"
        } else {
            "only the named views"
        },
        views.max_views,
        fmt_duration(views.linger)
    )?;
    for (name, spec) in &views.named {
        writeln!(
            out,
            "      {stream}@{name}: {}",
            if spec.canonical().is_empty() {
                "the whole document".to_owned()
            } else {
                spec.canonical()
            }
        )?;
    }
    Ok(())
}

fn hosts(patterns: &[HostPattern]) -> String {
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_proxy(out: &mut String, p: &ProxySettings) -> std::fmt::Result {
    writeln!(
        out,
        "proxy: dynamic streams at GET /{{target URL}} for clients with a token (X-Sd-Token)"
    )?;
    writeln!(out, "  hosts:      {}", hosts(&p.allowed_hosts))?;
    writeln!(
        out,
        "  targets:    {}",
        if p.allow_private {
            "private addresses allowed"
        } else {
            "public addresses only"
        }
    )?;
    writeln!(
        out,
        "  polling:    every {} (never more often than every {}), timeout {}, linger {}, \
         keepalive {}",
        fmt_duration(p.interval),
        fmt_duration(p.min_interval),
        fmt_duration(p.timeout),
        fmt_duration(p.linger),
        fmt_duration(p.keepalive)
    )?;
    for (pattern, interval) in &p.host_intervals {
        writeln!(out, "  host {pattern}: every {}", fmt_duration(*interval))?;
    }
    writeln!(
        out,
        "  limits:     {} streams, {} of snapshots, bodies up to {}, history {} changes or {}",
        p.max_streams,
        fmt_bytes(p.max_memory),
        fmt_bytes(p.max_body_bytes),
        p.history,
        fmt_bytes(p.history_bytes)
    )?;
    writeln!(
        out,
        "  views:      at most {} per stream, kept {} after their last subscriber",
        p.max_views_per_stream,
        fmt_duration(p.view_linger)
    )?;
    for t in &p.tokens {
        let mut line = format!(
            "  token {:?} (value hidden): {} connections, {}/s, burst {}, hosts: {}",
            t.name,
            t.max_connections,
            t.connections_per_second,
            t.connections_burst,
            t.allowed_hosts
                .as_deref()
                .map_or_else(|| "all allowed".to_owned(), hosts)
        );
        if let Some(interval) = t.interval {
            line.push_str(&format!(", every {}", fmt_duration(interval)));
        }
        if !t.min_interval.is_zero() {
            line.push_str(&format!(
                ", never more often than every {}",
                fmt_duration(t.min_interval)
            ));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn describe_webhooks(out: &mut String, w: &WebhookSettings) -> std::fmt::Result {
    let schedule: Vec<String> = w.schedule.delays.iter().map(|d| fmt_duration(*d)).collect();
    writeln!(out, "webhooks:")?;
    writeln!(out, "  outbox:     {}", w.store)?;
    writeln!(
        out,
        "  admin API:  {}",
        if w.admin_token.is_some() {
            "enabled (bearer token hidden)"
        } else {
            "disabled (no webhooks.admin_token)"
        }
    )?;
    writeln!(
        out,
        "  targets:    {}",
        if w.allow_private_targets {
            "private addresses allowed"
        } else {
            "public addresses only"
        }
    )?;
    writeln!(
        out,
        "  attempts:   {} ({}), timeout {}",
        schedule.len(),
        schedule.join(", "),
        fmt_duration(w.attempt_timeout)
    )?;
    for e in &w.endpoints {
        writeln!(
            out,
            "  endpoint {:?}: {} <- {} ({} mode, secret hidden)",
            e.id,
            redacted(&e.url),
            e.streams.join(", "),
            e.mode.as_str()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords_and_query_values() {
        let url = Url::parse("https://user:pw@example.com/v1?key=s3cret&route=12").unwrap();
        let shown = redacted(&url);
        assert!(
            !shown.contains("s3cret") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(
            shown.contains("key=REDACTED") && shown.contains("route=REDACTED"),
            "{shown}"
        );
        let plain = Url::parse("http://127.0.0.1:8081/feeds/fleet").unwrap();
        assert_eq!(redacted(&plain), "http://127.0.0.1:8081/feeds/fleet");
    }
}
