//! The result of a run, as text for people and JSON for scripts.

use std::fmt;

use serde::Serialize;

use super::stats::Summary;

/// One measured process's CPU over the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcessCpu {
    /// The process.
    pub pid: u32,
    /// CPU seconds (user + system) from the first publish to the end of the run.
    pub cpu_s: f64,
}

/// What the subscribers of one `--url` received, and what its server cost.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// The URL.
    pub url: String,
    /// Reading subscribers connected to it.
    pub readers: usize,
    /// (reader, change) pairs delivered.
    pub delivered: u64,
    /// (reader, change) pairs missing.
    pub missing: u64,
    /// Marks received after a higher one.
    pub out_of_order: u64,
    /// Publish-to-receive latency over its (reader, change) pairs, ms.
    pub latency_ms: Option<Summary>,
    /// Per change, time until its last reader had it, ms.
    pub reach_all_ms: Option<Summary>,
    /// Body bytes on the wire per marked event.
    pub wire_bytes_per_event: f64,
    /// Its server's PID, when a `--pid` was given per `--url`.
    pub pid: Option<u32>,
    /// That process's CPU seconds over the run.
    pub cpu_s: Option<f64>,
    /// That process's CPU per event its subscribers received, µs.
    pub cpu_us_per_event: Option<f64>,
}

/// What the server cost, from /proc.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    /// The processes measured.
    pub pids: Vec<u32>,
    /// CPU seconds (user + system) from the first publish to the end of the run.
    pub cpu_s: f64,
    /// CPU per delivered event, µs.
    pub cpu_us_per_event: Option<f64>,
    /// RSS before subscribers connected, KiB.
    pub rss_before_kib: u64,
    /// RSS with every subscriber connected and idle, KiB.
    pub rss_idle_kib: u64,
    /// RSS at the end of the run, KiB.
    pub rss_end_kib: u64,
    /// Highest RSS sampled (every 100 ms) during the run, KiB.
    pub rss_peak_kib: u64,
    /// (idle − before) / connected subscribers, KiB.
    pub rss_per_idle_subscriber_kib: f64,
    /// end − idle, KiB.
    pub rss_growth_kib: i64,
    /// Each process's CPU (they add up to `cpu_s`).
    pub processes: Vec<ProcessCpu>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The caller's label.
    pub label: String,
    /// "publish" or "passive".
    pub mode: &'static str,
    /// Subscribers asked for.
    pub subscribers: usize,
    /// Reading subscribers connected.
    pub readers: usize,
    /// Stalled subscribers connected.
    pub stalled: usize,
    /// Stalled subscribers still connected at the end.
    pub stalled_alive: usize,
    /// Non-200 responses.
    pub rejected: usize,
    /// Connections that failed.
    pub failed: usize,
    /// The first connection failure.
    pub first_error: Option<String>,
    /// Processes holding subscribers.
    pub processes: usize,
    /// Of which worker processes (0: in-process).
    pub workers: usize,
    /// Source addresses used (empty: the kernel's choice).
    pub source_addrs: Vec<String>,
    /// Changes judged.
    pub changes: usize,
    /// (reader, change) pairs delivered.
    pub delivered: u64,
    /// (reader, change) pairs missing.
    pub missing: u64,
    /// Readers that missed something.
    pub readers_missing: usize,
    /// Marks received after a higher one.
    pub out_of_order: u64,
    /// Marks received twice.
    pub duplicates: u64,
    /// Marks not among the judged changes.
    pub foreign: u64,
    /// Changes that did not reach every reader.
    pub incomplete_changes: usize,
    /// Readers whose connection ended during the run.
    pub ended_early: usize,
    /// Why the first of them ended.
    pub first_end_reason: Option<String>,
    /// Publish-to-receive latency over all (reader, change) pairs, ms.
    pub latency_ms: Option<Summary>,
    /// Per change, time until the last reader had it, ms (from the publish; from the first
    /// receipt when watching).
    pub reach_all_ms: Option<Summary>,
    /// Seconds from the first publish (or the start) to the end.
    pub window_s: f64,
    /// Marked events received per second, all readers.
    pub events_per_s: f64,
    /// Body bytes received per second, all readers.
    pub bytes_per_s: f64,
    /// Body bytes on the wire per marked event (framing, ids and keep-alives included).
    pub wire_bytes_per_event: f64,
    /// The server's CPU and memory, given its PIDs.
    pub server: Option<ServerReport>,
    /// Per `--url`, in the order given.
    pub targets: Vec<TargetReport>,
}

impl Report {
    /// Whether the run failed its delivery check.
    pub fn delivery_failed(&self) -> bool {
        self.missing > 0 || self.out_of_order > 0 || self.changes == 0
    }
}

fn ms(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}  (n={})",
            s.p50, s.p90, s.p99, s.max, s.mean, s.count
        ),
        None => "n/a".into(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", self.label)
        };
        writeln!(
            f,
            "patchwire-load{label} ({}): {} subscribers: {} reading, {} stalled ({} still connected), {} rejected, {} failed; {} process(es), source addresses {}",
            self.mode,
            self.subscribers,
            self.readers,
            self.stalled,
            self.stalled_alive,
            self.rejected,
            self.failed,
            self.processes,
            if self.source_addrs.is_empty() {
                "kernel's choice".to_owned()
            } else {
                self.source_addrs.join(",")
            }
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "  first connection error: {e}")?;
        }
        writeln!(
            f,
            "  delivery: {} changes judged, {} delivered, {} missing ({} readers, {} changes incomplete), {} out of order, {} duplicates, {} foreign marks",
            self.changes,
            self.delivered,
            self.missing,
            self.readers_missing,
            self.incomplete_changes,
            self.out_of_order,
            self.duplicates,
            self.foreign
        )?;
        if self.ended_early > 0 {
            writeln!(
                f,
                "  {} readers' connections ended during the run; first: {}",
                self.ended_early,
                self.first_end_reason.as_deref().unwrap_or("?")
            )?;
        }
        writeln!(f, "  latency ms:   {}", ms(&self.latency_ms))?;
        writeln!(f, "  reach-all ms: {}", ms(&self.reach_all_ms))?;
        writeln!(
            f,
            "  received: {:.0} events/s, {:.2} MB/s, {:.0} B on the wire per event, over {:.2} s",
            self.events_per_s,
            self.bytes_per_s / 1e6,
            self.wire_bytes_per_event,
            self.window_s
        )?;
        if let Some(s) = &self.server {
            writeln!(
                f,
                "  server {:?}: CPU {:.2} s = {} µs per delivered event; RSS {} KiB before, {} KiB idle ({:.2} KiB per idle subscriber), {} KiB at the end ({:+} KiB during the run, peak {} KiB)",
                s.pids,
                s.cpu_s,
                s.cpu_us_per_event
                    .map_or("n/a".to_owned(), |c| format!("{c:.1}")),
                s.rss_before_kib,
                s.rss_idle_kib,
                s.rss_per_idle_subscriber_kib,
                s.rss_end_kib,
                s.rss_growth_kib,
                s.rss_peak_kib
            )?;
            if s.processes.len() > 1 {
                let each: Vec<String> = s
                    .processes
                    .iter()
                    .map(|p| format!("{} {:.2} s", p.pid, p.cpu_s))
                    .collect();
                writeln!(f, "  CPU per process: {}", each.join(", "))?;
            }
        }
        if self.targets.len() > 1 {
            for t in &self.targets {
                let cpu = match (t.pid, t.cpu_s, t.cpu_us_per_event) {
                    (Some(pid), Some(cpu_s), per_event) => format!(
                        "; server {pid}: CPU {cpu_s:.2} s = {} µs per delivered event",
                        per_event.map_or("n/a".to_owned(), |c| format!("{c:.1}"))
                    ),
                    _ => String::new(),
                };
                writeln!(
                    f,
                    "  {}: {} readers, {} delivered, {} missing, {} out of order, {:.0} B per event{cpu}",
                    t.url,
                    t.readers,
                    t.delivered,
                    t.missing,
                    t.out_of_order,
                    t.wire_bytes_per_event
                )?;
                writeln!(f, "    latency ms:   {}", ms(&t.latency_ms))?;
                writeln!(f, "    reach-all ms: {}", ms(&t.reach_all_ms))?;
            }
        }
        Ok(())
    }
}
