//! The command line, and its pure validation into a [`Plan`].

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

/// The marker placeholder of a body template: replaced by the change number.
pub const K_PLACEHOLDER: &str = "@@K@@";
/// The padding placeholder of a body template: replaced by enough `x` to reach `--body-size`.
pub const PAD_PLACEHOLDER: &str = "@@PAD@@";
/// The default body: a JSON object whose one field changes, so a diffing server (patchwire)
/// sends a small patch while a relaying server (floor.c, Nchan) sends the whole body.
pub const DEFAULT_TEMPLATE: &str = r#"{"m":"MARK@@K@@;","pad":"@@PAD@@"}"#;

/// Open N SSE subscribers against any SSE server, publish K changes (or watch a polled
/// stream), and report latency, delivery, order, throughput and the server's CPU and memory.
#[derive(Debug, Clone, Parser)]
#[command(name = "patchwire-load", version)]
pub struct Args {
    /// SSE URL subscribers GET (http only), e.g. http://127.0.0.1:8080/streams/bench.
    /// Repeatable: subscribers are spread over the URLs round-robin (several nodes of one
    /// cluster), and the report gives each URL's figures besides the overall ones.
    #[arg(long, required_unless_present = "worker")]
    pub url: Vec<String>,
    /// Number of subscribers.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Extra request header for subscribers, "Name: value" (repeatable).
    #[arg(long = "sub-header", value_name = "HEADER")]
    pub sub_headers: Vec<String>,
    /// WebSocket mode: --url is ws://, and every subscriber sends this text message after the
    /// upgrade (repeatable, in order), e.g. '{"type":"subscribe","id":"s","stream":"bench"}'.
    /// Server pings are not answered: keep the server's idle timeout above the run's length.
    #[arg(long = "ws-message", value_name = "TEXT")]
    pub ws_messages: Vec<String>,
    /// URL changes are POSTed to; without it the run is passive (watches a polled stream).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Extra header for publish requests, "Name: value" (repeatable), e.g. the bearer token.
    #[arg(long = "header", value_name = "HEADER")]
    pub publish_headers: Vec<String>,
    /// Body template: `@@K@@` becomes the change number, `@@PAD@@` padding up to --body-size.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    pub body_template: String,
    /// Size in bytes of each published body (needs `@@PAD@@` in the template).
    #[arg(long, default_value_t = 430)]
    pub body_size: usize,
    /// Number of changes published.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub changes: u64,
    /// Time between publishes, e.g. 200ms.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Passive mode: how long to watch.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Passive mode: marks first seen within this long of the start or end are not judged.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// What precedes a change's number in the stream: `MARK` for published bodies; in
    /// passive mode on patchwire, `id: <stream>:` reads the sequence from SSE ids.
    #[arg(long, default_value = "MARK")]
    pub marker: String,
    /// Fraction of subscribers that connect and then never read (0 ≤ f < 1).
    #[arg(long, default_value_t = 0.0)]
    pub stalled_fraction: f64,
    /// Server process ids whose CPU and RSS are measured (repeatable or comma-separated).
    /// With at least as many PIDs as --url, PID i is taken as URL i's server, and each URL's
    /// CPU per delivered event is reported; PIDs past the URLs' (e.g. a cluster's Redis) count
    /// in the total only.
    #[arg(long = "pid", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Worker processes holding the subscribers; 0 picks by the file-descriptor limit
    /// (in-process when one process can hold them all).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Source addresses subscribers connect from, comma-separated (e.g. 127.0.0.1,127.0.0.2);
    /// "auto" uses 127.0.0.x, 25,000 subscribers each, for loopback targets.
    #[arg(long, default_value = "auto")]
    pub source_addrs: String,
    /// Subscribers connected at once before waiting for their response heads.
    #[arg(long, default_value_t = 200)]
    pub connect_batch: usize,
    /// How long one batch of subscribers may take to connect.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Pause between connecting everyone and the first publish (lets the server go idle).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// How long after the last publish to wait for stragglers.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Missing changes are expected (exit 0 anyway), e.g. with a lossy server.
    #[arg(long)]
    pub allow_missing: bool,
    /// Write the report as JSON to this file ("-" for stdout instead of the text report).
    #[arg(long)]
    pub json: Option<String>,
    /// A label printed with the report (e.g. the server's name).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Internal: run as a worker process with this part specification (JSON).
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

/// Why the command line was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArgError {
    /// A URL the tool cannot use.
    #[error("{what} {url:?}: {reason}")]
    Url {
        /// Which argument.
        what: &'static str,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header not of the form "Name: value".
    #[error("header {0:?} is not of the form \"Name: value\"")]
    Header(String),
    /// An out-of-range number.
    #[error("{0}")]
    Range(String),
    /// The body template cannot produce markers.
    #[error("{0}")]
    Template(String),
    /// A source address that is not an IP address.
    #[error("source address {0:?} is not an IP address (or \"auto\")")]
    SourceAddr(String),
}

/// Host, port and path of an http URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or address as written.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query.
    pub path: String,
}

impl Endpoint {
    /// Parses an `http://` URL (or `ws://`, where `websocket` allows it).
    pub fn parse(what: &'static str, raw: &str) -> Result<Endpoint, ArgError> {
        Self::parse_scheme(what, raw, false)
    }

    fn parse_scheme(what: &'static str, raw: &str, websocket: bool) -> Result<Endpoint, ArgError> {
        let fail = |reason: &str| ArgError::Url {
            what,
            url: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let url = url::Url::parse(raw).map_err(|e| fail(&e.to_string()))?;
        match (url.scheme(), websocket) {
            ("http", false) | ("ws", true) => {}
            (_, false) => return Err(fail("only http:// is supported")),
            (_, true) => return Err(fail("with --ws-message, only ws:// is supported")),
        }
        let host = url
            .host_str()
            .ok_or_else(|| fail("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let mut path = url.path().to_owned();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        Ok(Endpoint { host, port, path })
    }

    /// The `Host` header value.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Which source addresses subscribers connect from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAddrs {
    /// 127.0.0.x for loopback targets when there are more subscribers than one address's
    /// ephemeral ports; otherwise the kernel's choice.
    Auto,
    /// These, round-robin.
    List(Vec<IpAddr>),
}

/// What to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishPlan {
    /// Where.
    pub endpoint: Endpoint,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The template, `@@PAD@@` already expanded.
    pub template: String,
    /// How many changes.
    pub changes: u64,
    /// Time between publishes.
    pub interval: Duration,
}

impl PublishPlan {
    /// The body of change `k`.
    pub fn body(&self, k: u64) -> String {
        self.template.replace(K_PLACEHOLDER, &k.to_string())
    }
}

/// Publish changes, or watch.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Publish changes and measure their latency.
    Publish(PublishPlan),
    /// Watch for this long; judge marks first seen more than `grace` after the start and
    /// before the end.
    Passive {
        /// How long to watch.
        duration: Duration,
        /// Margin at both ends.
        grace: Duration,
    },
}

/// A validated run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Where subscribers connect (at least one): subscriber `i` to `endpoints[i % len]`.
    pub endpoints: Vec<Endpoint>,
    /// Extra subscriber headers.
    pub sub_headers: Vec<(String, String)>,
    /// WebSocket mode: the text messages each subscriber sends after the upgrade (empty: SSE).
    pub ws_messages: Vec<String>,
    /// Subscribers in all.
    pub subscribers: usize,
    /// Of which this many stall.
    pub stalled: usize,
    /// Publish or watch.
    pub mode: Mode,
    /// Marker prefix.
    pub marker: String,
    /// Server PIDs to measure.
    pub pids: Vec<u32>,
    /// Worker processes (0: decide from the fd limit).
    pub workers: usize,
    /// Source addresses.
    pub source_addrs: SourceAddrs,
    /// Connection batch size.
    pub connect_batch: usize,
    /// Time allowed per batch.
    pub connect_timeout: Duration,
    /// Pause before publishing.
    pub settle: Duration,
    /// Wait for stragglers.
    pub drain_timeout: Duration,
    /// Missing changes do not fail the run.
    pub allow_missing: bool,
}

fn parse_header(raw: &str) -> Result<(String, String), ArgError> {
    let (name, value) = raw
        .split_once(':')
        .ok_or_else(|| ArgError::Header(raw.to_owned()))?;
    let name = name.trim();
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid_name || value.contains(['\r', '\n']) {
        return Err(ArgError::Header(raw.to_owned()));
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

impl Args {
    /// Validates the arguments (no I/O).
    pub fn validate(&self) -> Result<Plan, ArgError> {
        if self.url.is_empty() {
            return Err(ArgError::Url {
                what: "--url",
                url: String::new(),
                reason: "required".into(),
            });
        }
        let endpoints = self
            .url
            .iter()
            .map(|url| Endpoint::parse_scheme("--url", url, !self.ws_messages.is_empty()))
            .collect::<Result<Vec<_>, _>>()?;
        if self.subscribers == 0 || self.subscribers > 1_000_000 {
            return Err(ArgError::Range(format!(
                "--subscribers must be 1 to 1,000,000, not {}",
                self.subscribers
            )));
        }
        if endpoints.len() > self.subscribers {
            return Err(ArgError::Range(format!(
                "{} URLs for {} subscribers: every URL needs at least one",
                endpoints.len(),
                self.subscribers
            )));
        }
        if !(0.0..1.0).contains(&self.stalled_fraction) {
            return Err(ArgError::Range(format!(
                "--stalled-fraction must be at least 0 and below 1, not {}",
                self.stalled_fraction
            )));
        }
        let stalled = (self.subscribers as f64 * self.stalled_fraction).round() as usize;
        if stalled >= self.subscribers {
            return Err(ArgError::Range(format!(
                "--stalled-fraction {} stalls all {} subscribers; at least one must read",
                self.stalled_fraction, self.subscribers
            )));
        }
        if self.marker.is_empty() || self.marker.len() > 64 {
            return Err(ArgError::Range("--marker must be 1 to 64 bytes".to_owned()));
        }
        if self.connect_batch == 0 {
            return Err(ArgError::Range("--connect-batch must be at least 1".into()));
        }
        let sub_headers = self
            .sub_headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<Result<_, _>>()?;
        let mode = match (&self.publish_url, self.duration) {
            (Some(_), Some(_)) => {
                return Err(ArgError::Range(
                    "--duration is for passive runs; with --publish-url, use --changes and --interval"
                        .into(),
                ));
            }
            (Some(url), None) => Mode::Publish(self.publish_plan(url)?),
            (None, Some(duration)) => {
                if duration <= self.grace * 2 {
                    return Err(ArgError::Range(format!(
                        "--duration {} leaves nothing to judge: it must exceed twice --grace ({})",
                        humantime::format_duration(duration),
                        humantime::format_duration(self.grace)
                    )));
                }
                Mode::Passive {
                    duration,
                    grace: self.grace,
                }
            }
            (None, None) => {
                return Err(ArgError::Range(
                    "give --publish-url to publish changes, or --duration to watch a polled stream"
                        .into(),
                ));
            }
        };
        let source_addrs = if self.source_addrs == "auto" {
            SourceAddrs::Auto
        } else {
            SourceAddrs::List(
                self.source_addrs
                    .split(',')
                    .map(|a| {
                        a.trim()
                            .parse()
                            .map_err(|_| ArgError::SourceAddr(a.to_owned()))
                    })
                    .collect::<Result<_, _>>()?,
            )
        };
        Ok(Plan {
            endpoints,
            sub_headers,
            ws_messages: self.ws_messages.clone(),
            subscribers: self.subscribers,
            stalled,
            mode,
            marker: self.marker.clone(),
            pids: self.pids.clone(),
            workers: self.workers,
            source_addrs,
            connect_batch: self.connect_batch,
            connect_timeout: self.connect_timeout,
            settle: self.settle,
            drain_timeout: self.drain_timeout,
            allow_missing: self.allow_missing,
        })
    }

    fn publish_plan(&self, url: &str) -> Result<PublishPlan, ArgError> {
        let endpoint = Endpoint::parse("--publish-url", url)?;
        if self.changes == 0 || self.changes > 1_000_000 {
            return Err(ArgError::Range(format!(
                "--changes must be 1 to 1,000,000, not {}",
                self.changes
            )));
        }
        if self.interval.is_zero() {
            return Err(ArgError::Range("--interval must be positive".into()));
        }
        let marked = format!("{}{K_PLACEHOLDER}", self.marker);
        if !self.body_template.contains(&marked) {
            return Err(ArgError::Template(format!(
                "--body-template must contain {marked:?} so subscribers can tell changes apart"
            )));
        }
        if self.body_size > 64 << 20 {
            return Err(ArgError::Range("--body-size must be at most 64 MiB".into()));
        }
        let template = if self.body_template.contains(PAD_PLACEHOLDER) {
            // Sized for a typical change number; bodies differ by a few bytes at most.
            let bare = self
                .body_template
                .replace(PAD_PLACEHOLDER, "")
                .replace(K_PLACEHOLDER, &self.changes.min(99).to_string());
            let pad = "x".repeat(self.body_size.saturating_sub(bare.len()));
            self.body_template.replace(PAD_PLACEHOLDER, &pad)
        } else {
            self.body_template.clone()
        };
        if template.contains('\u{0}') {
            return Err(ArgError::Template(
                "--body-template must not contain NUL".into(),
            ));
        }
        let headers = self
            .publish_headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<Result<_, _>>()?;
        Ok(PublishPlan {
            endpoint,
            headers,
            template,
            changes: self.changes,
            interval: self.interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["patchwire-load", "--url", "http://127.0.0.1:8080/streams/b"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn a_publishing_run() {
        let plan = args(&[
            "--publish-url",
            "http://127.0.0.1:8080/streams/b?x=1",
            "--header",
            "Authorization: Bearer abc",
            "-n",
            "100",
            "--stalled-fraction",
            "0.1",
        ])
        .validate()
        .unwrap();
        assert_eq!(plan.subscribers, 100);
        assert_eq!(plan.stalled, 10);
        assert_eq!(plan.endpoints.len(), 1);
        assert_eq!(plan.endpoints[0].path, "/streams/b");
        let Mode::Publish(publish) = &plan.mode else {
            panic!("expected a publishing run")
        };
        assert_eq!(publish.endpoint.path, "/streams/b?x=1");
        assert_eq!(
            publish.headers,
            vec![("Authorization".to_owned(), "Bearer abc".to_owned())]
        );
        let body = publish.body(7);
        assert!(body.contains("MARK7;"));
        assert!((428..=432).contains(&body.len()), "{}", body.len());
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["m"], "MARK7;");
    }

    #[test]
    fn refusals() {
        let refused = |extra: &[&str]| args(extra).validate().unwrap_err();
        assert!(matches!(refused(&[]), ArgError::Range(_)));
        assert!(matches!(refused(&["--duration", "3s"]), ArgError::Range(_)));
        let publish = ["--publish-url", "http://127.0.0.1:1/p"];
        assert!(matches!(
            refused(&[&publish[..], &["--stalled-fraction", "1"]].concat()),
            ArgError::Range(_)
        ));
        assert!(matches!(
            refused(&[&publish[..], &["-n", "0"]].concat()),
            ArgError::Range(_)
        ));
        assert!(matches!(
            refused(&[&publish[..], &["--header", "no colon"]].concat()),
            ArgError::Header(_)
        ));
        assert!(matches!(
            refused(&[&publish[..], &["--body-template", "{\"k\":@@K@@}"]].concat()),
            ArgError::Template(_)
        ));
        assert!(matches!(
            refused(&[&publish[..], &["--source-addrs", "localhost"]].concat()),
            ArgError::SourceAddr(_)
        ));
        assert!(matches!(
            refused(&["--publish-url", "https://x/p"]),
            ArgError::Url { .. }
        ));
        assert!(matches!(
            refused(&[&publish[..], &["--duration", "10s"]].concat()),
            ArgError::Range(_)
        ));
        // One subscriber of one, half stalled, rounds to one stalled: refused.
        assert!(matches!(
            refused(&[&publish[..], &["-n", "1", "--stalled-fraction", "0.5"]].concat()),
            ArgError::Range(_)
        ));
    }

    #[test]
    fn several_urls() {
        let plan = args(&[
            "--url",
            "http://127.0.0.1:8082/streams/b",
            "--url",
            "http://127.0.0.1:8083/streams/b",
            "--publish-url",
            "http://127.0.0.1:8080/streams/b",
            "-n",
            "3",
        ])
        .validate()
        .unwrap();
        let ports: Vec<u16> = plan.endpoints.iter().map(|e| e.port).collect();
        assert_eq!(ports, vec![8080, 8082, 8083]);
        // Fewer subscribers than URLs would leave a URL unmeasured.
        let refused = args(&[
            "--url",
            "http://127.0.0.1:8082/streams/b",
            "--publish-url",
            "http://127.0.0.1:8080/streams/b",
            "-n",
            "1",
        ])
        .validate()
        .unwrap_err();
        assert!(matches!(refused, ArgError::Range(_)), "{refused}");
    }

    #[test]
    fn a_passive_run() {
        let plan = args(&["--duration", "10s", "--marker", "id: fleet:"])
            .validate()
            .unwrap();
        assert_eq!(
            plan.mode,
            Mode::Passive {
                duration: Duration::from_secs(10),
                grace: Duration::from_secs(2)
            }
        );
        assert_eq!(plan.source_addrs, SourceAddrs::Auto);
    }
}
