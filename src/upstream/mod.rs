//! Upstreams: polling one API on a schedule, fetching with conditional requests, decoding.
//!
//! - [`config`]: the `[upstream]`, `[stream_defaults]` and polled `[[streams]]` sections: shape,
//!   defaults and bounds, pure validation, the settings pollers are built from.
//! - [`poller`]: one task per stream; the schedule, failures and recovery.
//! - [`fetch`]: one conditional GET within a timeout and a body cap.
//! - [`ratelimit`]: one shared quota per rate-limit group.
//! - [`backoff`]: the retry schedule after failures (pure).
//! - [`decode`]: bodies into JSON documents.
//!
//! Wiring (in `app`): one [`Fetcher`] from `upstream.user_agent`, one [`RateLimits`] from
//! `upstream` and the streams, then per stream a [`Poller`] with
//! `limits.limiter(&stream.rate_limit_group)` and the hub as its [`Publish`]; keep
//! `poller.status()` for the listing and spawn `poller.run(shutdown.child_token())`.

pub mod backoff;
pub mod config;
pub mod decode;
pub mod fetch;
pub mod on_demand;
pub mod poller;
pub mod ratelimit;

pub use fetch::{FetchError, FetchRequest, Fetched, Fetcher, Upstream, Validators};
pub use poller::{LastOutcome, PollReport, PollStatus, PollStep, Poller, Publish, PublishResult};
pub use ratelimit::{GroupLimiter, RateLimits, TokioClock};
