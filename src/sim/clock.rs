//! Where the simulator's current tick comes from: the wall clock, or a handle tests turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The source of the current tick.
#[derive(Debug, Clone)]
pub enum SimClock {
    /// Real time: tick = time since the router was built / the feed's tick length.
    Real,
    /// A tick set by hand, shared by every feed of the router; for tests that control time
    /// without sleeping.
    Manual(ManualClock),
}

/// A shared, cloneable tick counter: every clone sees and moves the same tick.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    tick: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at tick 0.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// The current tick.
    pub fn tick(&self) -> u64 {
        self.tick.load(Ordering::SeqCst)
    }

    /// Moves the clock `n` ticks forward (saturating).
    pub fn advance(&self, n: u64) {
        // fetch_update only fails when the closure returns None, which it never does.
        let _ = self
            .tick
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(n))
            });
    }

    /// Sets the tick; going backwards is allowed (feeds then recompute from tick 0).
    pub fn set(&self, tick: u64) {
        self.tick.store(tick, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_tick() {
        let clock = ManualClock::new();
        let other = clock.clone();
        clock.advance(3);
        assert_eq!(other.tick(), 3);
        other.set(10);
        assert_eq!(clock.tick(), 10);
        clock.advance(u64::MAX);
        assert_eq!(clock.tick(), u64::MAX);
        clock.set(2);
        assert_eq!(other.tick(), 2);
    }
}
