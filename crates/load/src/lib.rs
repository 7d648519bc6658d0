//! `patchwire-load`: an SSE load client for patchwire and any other SSE server.
//!
//! - [`args`]: the command line and its pure validation into a [`Plan`].
//! - [`http`]: a minimal HTTP/1.1 response reader (chunked, sized, close-delimited bodies).
//! - [`marker`]: finds `MARK<k>;` (or SSE ids) in the stream without parsing events.
//! - [`part`]: subscribers held by one process, driven by commands.
//! - [`publish`]: one POST per change.
//! - [`run`]: the coordinator; worker processes when one process cannot hold everyone.
//! - [`check`]: delivery, order and latency judged from receipts.
//! - [`stats`], [`report`], [`sys`]: percentiles, the report, /proc and the fd limit.
//! - [`ws`]: WebSocket mode: the handshake and the client's masked text frames.

// Nothing from the servers it measures may panic the tool. It is a command-line tool: its
// reports and warnings go to stdout and stderr.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod args;
pub mod check;
pub mod http;
pub mod marker;
pub mod part;
pub mod publish;
pub mod report;
pub mod run;
pub mod stats;
pub mod sys;
pub mod ws;

pub use args::{Args, Plan};
pub use report::Report;
pub use run::{run, worker};

/// Why a load run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line was refused.
    #[error(transparent)]
    Args(#[from] args::ArgError),
    /// A host name did not resolve.
    #[error("resolving {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// A server process could not be measured.
    #[error("reading /proc for server pid {pid}: {source}")]
    Proc {
        /// The process.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The file-descriptor limit could not be read.
    #[error("reading the file-descriptor limit: {0}")]
    FdLimit(std::io::Error),
    /// Worker processes are needed but cannot be used.
    #[error("{0}")]
    Workers(String),
    /// A worker process could not be started.
    #[error("starting worker {exe}: {source}")]
    Spawn {
        /// The program.
        exe: String,
        /// Why.
        source: std::io::Error,
    },
    /// A part failed or misbehaved.
    #[error("part {part}: {message}")]
    Part {
        /// Which part (usize::MAX: unknown).
        part: usize,
        /// What happened.
        message: String,
    },
    /// A worker message could not be encoded or decoded.
    #[error("worker protocol: {0}")]
    Protocol(serde_json::Error),
    /// A worker could not write to its stdout.
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
    /// Publishing a change failed.
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
    /// A phase took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// No subscriber got a 200 response.
    #[error("no subscriber connected; first error: {0}")]
    NobodyConnected(String),
}
