//! What the load examples (`push_load`, `webhook_load`) share: their positional arguments, the
//! runtime they run on, a receiver on 127.0.0.1 and percentiles of latencies. A module, not an
//! example: Cargo makes targets only of `examples/*.rs` and `examples/*/main.rs`.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use tokio_util::sync::CancellationToken;

/// The `i`th argument as a whole number, `default` when it is absent.
pub fn arg(args: &[String], i: usize, default: u64) -> Result<u64, String> {
    match args.get(i) {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| {
            format!(
                "expected a whole number as argument {}, got {text:?}",
                i + 1
            )
        }),
    }
}

/// Runs `main` on a multi-threaded runtime; an error is printed after the example's `name`.
pub fn run(name: &str, main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A receiver on 127.0.0.1 that answers `ok` to every request, after handing its body to
/// `record` (with `state`), until the returned token is cancelled.
pub async fn receiver<S: Clone + Send + Sync + 'static>(
    state: S,
    record: fn(&S, Bytes),
) -> anyhow::Result<(SocketAddr, CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .fallback(move |State(state): State<S>, body: Bytes| async move {
            record(&state, body);
            "ok"
        })
        .with_state(state);
    let stop = CancellationToken::new();
    let server_stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await;
    });
    Ok((addr, stop))
}

/// The `p` quantile (0 to 1) of `sorted`, by the nearest rank; zero when it is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
