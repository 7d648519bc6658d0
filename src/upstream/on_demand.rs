//! Polling driven by demand: a stream's poller runs while the stream has subscribers, keeps
//! running for a linger period after the last one leaves (so a client that reconnects finds a
//! fresh document), then stops. Used by configured `on_demand` streams and by every dynamic
//! stream of the proxy mode.

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::poller::{Instruction, Poller};
use crate::hub::Stream;

/// What happens once a stream has had no subscriber for the whole linger period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// The stream is gone: the driver ends.
    Stop,
    /// Polling pauses until the next subscriber (the poller was reset by the callback).
    Pause,
    /// A subscriber arrived in the meantime: go on polling.
    Resume,
}

/// How a demand-driven poller runs.
pub struct OnDemand {
    /// How long polling goes on after the last subscriber left.
    pub linger: Duration,
    /// When set, the poller's period follows this value (it changes as subscribers with
    /// different allowed periods come and go).
    pub period: Option<watch::Receiver<Duration>>,
    /// When set, keep-alive comments are sent to subscribers at this interval.
    pub keepalive: Option<Duration>,
}

/// Polls `stream` with `poller` while it has subscribers (plus the linger period), until
/// `shutdown` or until `on_idle` says the stream is gone. Returns the poller.
pub async fn run(
    mut poller: Poller,
    stream: Arc<Stream>,
    mut options: OnDemand,
    shutdown: CancellationToken,
    mut on_idle: impl FnMut(&mut Poller) -> Idle,
) -> Poller {
    let mut demand = stream.demand();
    let mut keepalive = options.keepalive.map(|every| {
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    'paused: loop {
        // Nobody is subscribed: wait for someone.
        while *demand.borrow_and_update() == 0 {
            tokio::select! {
                () = shutdown.cancelled() => return poller,
                changed = demand.changed() => if changed.is_err() { return poller },
            }
        }
        if let Some(period) = &mut options.period {
            poller.set_interval(*period.borrow_and_update());
        }
        let mut due = Instant::now();
        let mut last_start: Option<Instant> = None;
        let mut idle_since: Option<Instant> = None;
        let control = poller.control();
        loop {
            let linger_end = idle_since.map(|since| since + options.linger);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return poller,
                changed = demand.changed() => {
                    if changed.is_err() {
                        return poller;
                    }
                    let subscribed = *demand.borrow_and_update() > 0;
                    idle_since = match (subscribed, idle_since) {
                        (true, _) => None,
                        (false, None) => Some(Instant::now()),
                        (false, since) => since,
                    };
                }
                () = maybe_changed(options.period.as_mut()) => {
                    if let Some(period) = &mut options.period {
                        let interval = *period.borrow_and_update();
                        poller.set_interval(interval);
                        // A shorter period takes effect now, not after the current wait.
                        if let Some(start) = last_start {
                            due = due.min(start + interval);
                        }
                    }
                }
                () = sleep_until_some(linger_end) => {
                    match on_idle(&mut poller) {
                        Idle::Stop => return poller,
                        Idle::Pause => continue 'paused,
                        Idle::Resume => idle_since = None,
                    }
                }
                () = tick(keepalive.as_mut()) => stream.keep_alive(),
                instruction = control.instructed() => match instruction {
                    Instruction::Reconfigure => due = poller.reconfigure(due),
                    // Polled at once, below (the next iteration's wait is over now).
                    Instruction::PollNow => due = Instant::now(),
                },
                () = tokio::time::sleep_until(due) => {
                    last_start = Some(Instant::now());
                    let step = tokio::select! {
                        () = shutdown.cancelled() => return poller,
                        step = poller.poll_once() => step,
                    };
                    due = step.next_due;
                }
            }
        }
    }
}

/// Resolves when the watched value changes; never, without a watch (or once its sender is gone).
async fn maybe_changed(period: Option<&mut watch::Receiver<Duration>>) {
    match period {
        Some(period) => {
            if period.changed().await.is_err() {
                pending::<()>().await;
            }
        }
        None => pending().await,
    }
}

/// Sleeps until `deadline`; never, without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => pending().await,
    }
}

/// The next tick of `ticker`; never, without one.
async fn tick(ticker: Option<&mut tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => pending().await,
    }
}
