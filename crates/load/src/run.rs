//! The coordinator: spread subscribers over parts (in this process or worker processes),
//! publish or watch, measure the server, collect receipts, judge them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::LoadError;
use super::args::{Mode, Plan, SourceAddrs};
use super::check::{self, Judged};
use super::part::{self, Command, PartEvent, PartReport, PartSpec, Ready, Receipts, Target};
use super::publish;
use super::report::{ProcessCpu, Report, ServerReport, TargetReport};
use super::stats::Summary;
use super::sys;

/// Subscribers per source address when spreading over 127.0.0.x (below the ~28,000
/// ephemeral ports one address has towards one destination).
const PER_SOURCE_ADDR: usize = 25_000;
/// File descriptors a part keeps for itself besides its subscribers.
const FD_RESERVE: u64 = 256;

/// Where a part runs.
struct PartHandle {
    commands: mpsc::Sender<Command>,
    child: Option<tokio::process::Child>,
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, LoadError> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| LoadError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    addrs.next().ok_or_else(|| LoadError::Resolve {
        host: host.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
    })
}

fn source_addrs(plan: &Plan, target: SocketAddr) -> Vec<IpAddr> {
    match &plan.source_addrs {
        SourceAddrs::List(list) => list.clone(),
        SourceAddrs::Auto => match target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && plan.subscribers > PER_SOURCE_ADDR => {
                let count = plan.subscribers.div_ceil(PER_SOURCE_ADDR).min(250);
                (1..=count as u8)
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                    .collect()
            }
            _ => Vec::new(),
        },
    }
}

fn share(total: usize, parts: usize, i: usize) -> usize {
    total / parts + usize::from(i < total % parts)
}

fn measure<T>(pids: &[u32], read: fn(u32) -> std::io::Result<T>) -> Result<Vec<T>, LoadError> {
    pids.iter()
        .map(|&pid| read(pid).map_err(|source| LoadError::Proc { pid, source }))
        .collect()
}

fn total_rss(pids: &[u32]) -> Result<u64, LoadError> {
    Ok(measure(pids, sys::rss_kib)?.into_iter().sum())
}

fn cpu_s(ticks: u64) -> f64 {
    ticks as f64 / sys::ticks_per_second() as f64
}

/// Runs a whole measurement. `worker_exe` is the program started (with `--worker`) when
/// the subscribers do not fit in this process; without it, everything runs in-process.
pub async fn run(plan: &Plan, worker_exe: Option<&Path>) -> Result<Report, LoadError> {
    let mut targets = Vec::with_capacity(plan.endpoints.len());
    for endpoint in &plan.endpoints {
        targets.push(Target {
            addr: resolve(&endpoint.host, endpoint.port).await?,
            authority: endpoint.authority(),
            path: endpoint.path.clone(),
        });
    }
    let Some(target) = targets.first().map(|t| t.addr) else {
        return Err(LoadError::Workers("no --url to connect to".into()));
    };
    let publish_target = match &plan.mode {
        Mode::Publish(p) => Some(resolve(&p.endpoint.host, p.endpoint.port).await?),
        Mode::Passive { .. } => None,
    };
    let fd_limit = sys::raise_fd_limit().map_err(LoadError::FdLimit)?;
    let capacity = fd_limit.saturating_sub(FD_RESERVE).max(1) as usize;
    let workers = if plan.workers > 0 {
        plan.workers
    } else if plan.subscribers <= capacity {
        0
    } else {
        plan.subscribers.div_ceil(capacity)
    };
    if workers > 0 && worker_exe.is_none() {
        return Err(LoadError::Workers(format!(
            "{} subscribers need {workers} worker processes (fd limit {fd_limit}), but this run is in-process only",
            plan.subscribers
        )));
    }
    let sources = source_addrs(plan, target);
    let parts = workers.max(1);
    let rss_before = total_rss(&plan.pids)?;

    let (events_tx, mut events) = mpsc::channel::<(usize, PartEvent)>(1024);
    let mut handles = Vec::with_capacity(parts);
    let mut offset = 0;
    for i in 0..parts {
        let readers = share(plan.subscribers - plan.stalled, parts, i);
        let stalled = share(plan.stalled, parts, i);
        // Rotate source addresses so each part uses all of them evenly.
        let mut part_sources = sources.clone();
        if !part_sources.is_empty() {
            let len = part_sources.len();
            part_sources.rotate_left(offset % len);
        }
        let spec = PartSpec {
            targets: targets.clone(),
            first_index: offset,
            headers: plan.sub_headers.clone(),
            ws_messages: plan.ws_messages.clone(),
            readers,
            stalled,
            source_addrs: part_sources,
            marker: plan.marker.clone(),
            connect_batch: plan.connect_batch,
            connect_timeout_ms: plan.connect_timeout.as_millis() as u64,
        };
        offset += readers + stalled;
        let handle = match worker_exe {
            Some(exe) if workers > 0 => spawn_worker(exe, i, &spec, events_tx.clone())?,
            _ => spawn_local(i, spec, events_tx.clone()),
        };
        handles.push(handle);
    }
    drop(events_tx);

    // Connecting is bounded by the batches' timeouts; allow that plus slack.
    let batches = plan.subscribers.div_ceil(plan.connect_batch) as u32;
    let connect_bound = plan.connect_timeout * (batches + 1) + Duration::from_secs(30);
    let mut ready = Ready::default();
    for _ in 0..parts {
        match next_event(&mut events, connect_bound, "connecting").await? {
            (_, PartEvent::Ready(r)) => {
                ready.readers += r.readers;
                ready.stalled += r.stalled;
                ready.rejected += r.rejected;
                ready.failed += r.failed;
                if ready.first_error.is_none() {
                    ready.first_error = r.first_error;
                }
            }
            (i, other) => return Err(unexpected(i, &other)),
        }
    }
    if ready.readers == 0 {
        return Err(LoadError::NobodyConnected(
            ready
                .first_error
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
        ));
    }
    tokio::time::sleep(plan.settle).await;
    let rss_idle = total_rss(&plan.pids)?;
    let cpu_start = measure(&plan.pids, sys::cpu_ticks)?;
    let peak = Arc::new(AtomicU64::new(rss_idle));
    let sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_rss(
        plan.pids.clone(),
        peak.clone(),
        sampling.clone(),
    ));

    let last = match &plan.mode {
        Mode::Publish(p) => Some(p.changes),
        Mode::Passive { .. } => None,
    };
    for handle in &handles {
        send(handle, Command::Start { last }).await?;
    }
    for _ in 0..parts {
        match next_event(&mut events, Duration::from_secs(30), "starting").await? {
            (_, PartEvent::Started) => {}
            (i, other) => return Err(unexpected(i, &other)),
        }
    }
    let start_us = sys::monotonic_us();
    let mut publish_us = Vec::new();
    let mut end_us;
    match (&plan.mode, publish_target) {
        (Mode::Publish(p), Some(publish_target)) => {
            let first = tokio::time::Instant::now();
            for k in 1..=p.changes {
                tokio::time::sleep_until(first + p.interval * (k - 1) as u32).await;
                let request = publish::request(p, &p.body(k));
                publish_us.push(sys::monotonic_us());
                publish::publish(publish_target, &request).await?;
            }
            // Wait for every part to report completion, or the drain timeout.
            let deadline = tokio::time::Instant::now() + plan.drain_timeout;
            let mut complete = 0;
            end_us = 0;
            while complete < parts {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some((_, PartEvent::Complete { at_us }))) => {
                        complete += 1;
                        end_us = end_us.max(at_us);
                    }
                    Ok(Some((i, PartEvent::Failed(message)))) => {
                        return Err(LoadError::Part { part: i, message });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            if complete < parts {
                end_us = sys::monotonic_us();
            }
        }
        (Mode::Passive { duration, .. }, _) => {
            tokio::time::sleep(*duration).await;
            end_us = sys::monotonic_us();
        }
        (Mode::Publish(_), None) => unreachable!("publish target resolved above"),
    }
    let cpu_end = measure(&plan.pids, sys::cpu_ticks)?;
    let rss_end = total_rss(&plan.pids)?;
    sampling.cancel();
    let _ = sampler.await;

    for handle in &handles {
        send(handle, Command::Report).await?;
    }
    let mut reports: Vec<PartReport> = Vec::with_capacity(parts);
    while reports.len() < parts {
        match next_event(&mut events, Duration::from_secs(120), "reporting").await? {
            (_, PartEvent::Report(r)) => reports.push(r),
            (_, PartEvent::Complete { .. }) => {}
            (i, other) => return Err(unexpected(i, &other)),
        }
    }
    for handle in handles {
        // Closing a worker's stdin lets it exit (its stdin reader is a blocking read).
        let PartHandle { commands, child } = handle;
        drop(commands);
        if let Some(mut child) = child {
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    let readers: Vec<_> = reports
        .iter()
        .flat_map(|r| r.readers.iter().cloned())
        .collect();
    let stalled_alive = reports.iter().map(|r| r.stalled_alive).sum();
    let judged = match &plan.mode {
        Mode::Publish(_) => Judged::Published {
            publish_us: publish_us.clone(),
        },
        Mode::Passive { grace, .. } => Judged::Observed {
            marks: check::observed_marks(
                &readers,
                start_us + grace.as_micros() as u64,
                end_us.saturating_sub(grace.as_micros() as u64),
            ),
        },
    };
    let mut delivery = check::check(&readers, &judged);
    // Each process's CPU over the run; with a PID per URL, PID i is URL i's server (PIDs
    // past the URLs', such as a cluster's Redis, count in the total only).
    let processes: Vec<ProcessCpu> = plan
        .pids
        .iter()
        .zip(cpu_start.iter().zip(&cpu_end))
        .map(|(&pid, (start, end))| ProcessCpu {
            pid,
            cpu_s: cpu_s(end.saturating_sub(*start)),
        })
        .collect();
    let paired = processes.len() >= plan.endpoints.len();
    let per_target = plan
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let mine: Vec<Receipts> = readers.iter().filter(|r| r.target == i).cloned().collect();
            let mut d = check::check(&mine, &judged);
            let marks: u64 = mine.iter().map(|r| r.marks.len() as u64).sum();
            let bytes: u64 = mine.iter().map(|r| r.bytes).sum();
            let process = paired.then(|| processes[i]);
            TargetReport {
                url: format!("http://{}{}", endpoint.authority(), endpoint.path),
                readers: mine.len(),
                delivered: d.delivered,
                missing: d.missing,
                out_of_order: d.out_of_order,
                latency_ms: Summary::of(&mut d.latencies_us).map(|s| s.scaled(1e-3)),
                reach_all_ms: Summary::of(&mut d.reach_all_us).map(|s| s.scaled(1e-3)),
                wire_bytes_per_event: if marks > 0 {
                    bytes as f64 / marks as f64
                } else {
                    0.0
                },
                pid: process.map(|p| p.pid),
                cpu_s: process.map(|p| p.cpu_s),
                cpu_us_per_event: process
                    .filter(|_| d.delivered > 0)
                    .map(|p| p.cpu_s * 1e6 / d.delivered as f64),
            }
        })
        .collect();
    let window_s =
        end_us.saturating_sub(publish_us.first().copied().unwrap_or(start_us)) as f64 / 1e6;
    let bytes: u64 = readers.iter().map(|r| r.bytes).sum();
    let marks: u64 = readers.iter().map(|r| r.marks.len() as u64).sum();
    let ended: Vec<&str> = readers.iter().filter_map(|r| r.ended.as_deref()).collect();
    let server = if plan.pids.is_empty() {
        None
    } else {
        let cpu_s = processes.iter().map(|p| p.cpu_s).sum::<f64>();
        let connected = (ready.readers + ready.stalled).max(1);
        Some(ServerReport {
            pids: plan.pids.clone(),
            cpu_s,
            cpu_us_per_event: (delivery.delivered > 0)
                .then(|| cpu_s * 1e6 / delivery.delivered as f64),
            rss_before_kib: rss_before,
            rss_idle_kib: rss_idle,
            rss_end_kib: rss_end,
            rss_peak_kib: peak.load(Ordering::Relaxed).max(rss_end),
            rss_per_idle_subscriber_kib: rss_idle.saturating_sub(rss_before) as f64
                / connected as f64,
            rss_growth_kib: rss_end as i64 - rss_idle as i64,
            processes,
        })
    };
    Ok(Report {
        label: String::new(),
        mode: match plan.mode {
            Mode::Publish(_) => "publish",
            Mode::Passive { .. } => "passive",
        },
        subscribers: plan.subscribers,
        readers: ready.readers,
        stalled: ready.stalled,
        stalled_alive,
        rejected: ready.rejected,
        failed: ready.failed,
        first_error: ready.first_error,
        processes: parts,
        workers,
        source_addrs: sources.iter().map(ToString::to_string).collect(),
        changes: delivery.changes,
        delivered: delivery.delivered,
        missing: delivery.missing,
        readers_missing: delivery.readers_missing,
        out_of_order: delivery.out_of_order,
        duplicates: delivery.duplicates,
        foreign: delivery.foreign,
        incomplete_changes: delivery.incomplete_changes,
        ended_early: ended.len(),
        first_end_reason: ended.first().map(|s| (*s).to_owned()),
        latency_ms: Summary::of(&mut delivery.latencies_us).map(|s| s.scaled(1e-3)),
        reach_all_ms: Summary::of(&mut delivery.reach_all_us).map(|s| s.scaled(1e-3)),
        window_s,
        events_per_s: if window_s > 0.0 {
            marks as f64 / window_s
        } else {
            0.0
        },
        bytes_per_s: if window_s > 0.0 {
            bytes as f64 / window_s
        } else {
            0.0
        },
        wire_bytes_per_event: if marks > 0 {
            bytes as f64 / marks as f64
        } else {
            0.0
        },
        server,
        targets: per_target,
    })
}

async fn sample_rss(pids: Vec<u32>, peak: Arc<AtomicU64>, stop: CancellationToken) {
    if pids.is_empty() {
        return;
    }
    loop {
        if let Ok(rss) = total_rss(&pids) {
            peak.fetch_max(rss, Ordering::Relaxed);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

async fn send(handle: &PartHandle, command: Command) -> Result<(), LoadError> {
    handle
        .commands
        .send(command)
        .await
        .map_err(|_| LoadError::Part {
            part: usize::MAX,
            message: "a part stopped taking commands".into(),
        })
}

async fn next_event(
    events: &mut mpsc::Receiver<(usize, PartEvent)>,
    within: Duration,
    doing: &'static str,
) -> Result<(usize, PartEvent), LoadError> {
    match tokio::time::timeout(within, events.recv()).await {
        Ok(Some((part, PartEvent::Failed(message)))) => Err(LoadError::Part { part, message }),
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err(LoadError::Part {
            part: usize::MAX,
            message: format!("every part ended while {doing}"),
        }),
        Err(_) => Err(LoadError::Timeout(format!("{doing} took over {within:?}"))),
    }
}

fn unexpected(part: usize, event: &PartEvent) -> LoadError {
    LoadError::Part {
        part,
        message: format!("unexpected event {event:?}"),
    }
}

fn spawn_local(i: usize, spec: PartSpec, events: mpsc::Sender<(usize, PartEvent)>) -> PartHandle {
    let (commands, command_rx) = mpsc::channel(16);
    let (part_tx, mut part_rx) = mpsc::channel(16);
    tokio::spawn(part::run(spec, command_rx, part_tx));
    tokio::spawn(async move {
        while let Some(event) = part_rx.recv().await {
            if events.send((i, event)).await.is_err() {
                return;
            }
        }
    });
    PartHandle {
        commands,
        child: None,
    }
}

fn spawn_worker(
    exe: &Path,
    i: usize,
    spec: &PartSpec,
    events: mpsc::Sender<(usize, PartEvent)>,
) -> Result<PartHandle, LoadError> {
    let spec_json = serde_json::to_string(spec).map_err(LoadError::Protocol)?;
    let mut child = tokio::process::Command::new(exe)
        .arg("--worker")
        .arg(spec_json)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| LoadError::Spawn {
            exe: exe.display().to_string(),
            source,
        })?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(LoadError::Workers(
            "a worker's pipes were not set up".into(),
        ));
    };
    let (commands, mut command_rx) = mpsc::channel::<Command>(16);
    tokio::spawn(async move {
        while let Some(command) = command_rx.recv().await {
            let Ok(mut line) = serde_json::to_string(&command) else {
                return;
            };
            line.push('\n');
            if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut reported = false;
        loop {
            let event = match lines.next_line().await {
                Ok(Some(line)) => serde_json::from_str::<PartEvent>(&line).unwrap_or_else(|e| {
                    PartEvent::Failed(format!("worker {i} sent an unreadable line: {e}"))
                }),
                Ok(None) if reported => return,
                Ok(None) => PartEvent::Failed(format!("worker {i} exited before reporting")),
                Err(e) => PartEvent::Failed(format!("reading worker {i}: {e}")),
            };
            let last = matches!(event, PartEvent::Failed(_));
            reported |= matches!(event, PartEvent::Report(_));
            if events.send((i, event)).await.is_err() || last {
                return;
            }
        }
    });
    Ok(PartHandle {
        commands,
        child: Some(child),
    })
}

/// Runs this process as a worker: the part specification is `spec_json`, commands arrive
/// as JSON lines on stdin, events leave as JSON lines on stdout.
pub async fn worker(spec_json: &str) -> Result<(), LoadError> {
    let spec: PartSpec = serde_json::from_str(spec_json).map_err(LoadError::Protocol)?;
    sys::raise_fd_limit().map_err(LoadError::FdLimit)?;
    let (commands, command_rx) = mpsc::channel(16);
    let (events_tx, mut events) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Command>(&line) {
                Ok(command) => {
                    if commands.send(command).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("patchwire-load worker: ignoring unreadable command {line:?}: {e}");
                }
            }
        }
        // The coordinator is gone: report and exit.
        let _ = commands.send(Command::Report).await;
    });
    let part = tokio::spawn(part::run(spec, command_rx, events_tx));
    let mut stdout = tokio::io::stdout();
    while let Some(event) = events.recv().await {
        let mut line = serde_json::to_string(&event).map_err(LoadError::Protocol)?;
        line.push('\n');
        stdout
            .write_all(line.as_bytes())
            .await
            .map_err(LoadError::Stdout)?;
        stdout.flush().await.map_err(LoadError::Stdout)?;
    }
    let _ = part.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for total in [0, 1, 7, 10_000, 20_001] {
            for parts in 1..5 {
                let sum: usize = (0..parts).map(|i| share(total, parts, i)).sum();
                assert_eq!(sum, total);
            }
        }
    }
}
