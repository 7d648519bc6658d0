//! The `patchwire` command: run the proxy, check a configuration, or serve the simulated feeds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use patchwire::config::{self, Config, LogFormat};

/// A polling-to-push streaming proxy: polls each upstream API once and pushes its changes as
/// RFC 6902 JSON Patches to every subscriber over Server-Sent Events.
#[derive(Debug, Parser)]
#[command(
    name = "patchwire",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a command: `run` with this configuration.
    #[command(flatten)]
    run: ConfigFile,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default command).
    Run(ConfigFile),
    /// Validate a configuration and print the streams it would run; exits non-zero if invalid.
    Check(ConfigFile),
    /// Serve only the simulated feeds of a configuration's `[simulator]` table.
    Simulate(ConfigFile),
    /// Print the AsyncAPI 3.0 document of a configuration's streams (JSON) and exit; document
    /// schemas come from the streams' `schema` files (and, for `gtfs-rt`, the projection).
    Asyncapi(ConfigFile),
    /// Print the OpenAPI 3.1 document of a configuration's HTTP endpoints (JSON) and exit.
    Openapi(ConfigFile),
}

#[derive(Debug, clap::Args)]
struct ConfigFile {
    /// Configuration file (TOML or YAML).
    #[arg(
        long,
        short,
        env = "PATCHWIRE_CONFIG",
        default_value = "config/default.toml"
    )]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // No command is `run`, with the top-level `--config` (or PATCHWIRE_CONFIG, or the default).
    let command = cli.command.unwrap_or(Command::Run(cli.run));
    match command {
        Command::Check(ConfigFile { config }) => check(&config),
        Command::Run(ConfigFile { config }) => match load(&config) {
            Some(config) => serve(config, Mode::Proxy),
            None => ExitCode::from(2),
        },
        Command::Simulate(ConfigFile { config }) => match load(&config) {
            Some(config) => serve(config, Mode::SimulatorOnly),
            None => ExitCode::from(2),
        },
        Command::Asyncapi(ConfigFile { config }) => contract(&config, Contract::AsyncApi),
        Command::Openapi(ConfigFile { config }) => contract(&config, Contract::OpenApi),
    }
}

#[derive(Debug, Clone, Copy)]
enum Contract {
    AsyncApi,
    OpenApi,
}

/// Prints a configuration's contract (pretty JSON) to stdout.
fn contract(path: &Path, which: Contract) -> ExitCode {
    use patchwire::contracts::{Surface, asyncapi, openapi};
    let Some(config) = load(path) else {
        return ExitCode::from(2);
    };
    let surface = Surface::of(&config);
    let schemas = surface.static_schemas();
    let document = match which {
        Contract::AsyncApi => asyncapi::document(&surface, &schemas),
        Contract::OpenApi => openapi::document(&surface, &schemas),
    };
    match serde_json::to_string_pretty(&document) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: cannot write the document: {error}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Option<Config> {
    match config::load(path) {
        Ok(config) => Some(config),
        Err(error) => {
            eprintln!("error: invalid configuration\n{error}");
            None
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Some(config) => {
            println!("{}: ok", path.display());
            print!("{}", config::describe(&config));
            ExitCode::SUCCESS
        }
        None => ExitCode::from(2),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Proxy,
    SimulatorOnly,
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: a file, journald or `docker logs` gets plain
    // text (and `NO_COLOR` turns them off anywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
}

fn serve(config: Config, mode: Mode) -> ExitCode {
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let result = match mode {
            Mode::Proxy => proxy(config, shutdown).await,
            Mode::SimulatorOnly => simulate(config, shutdown).await,
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn simulate(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(settings) = config.simulator else {
        anyhow::bail!(
            "{}: no enabled [simulator] table to serve",
            config
                .source
                .as_deref()
                .unwrap_or(Path::new("<config>"))
                .display()
        );
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (`simulator.listen`): {e}",
                settings.listen
            )
        })?;
    patchwire::sim::serve(listener, settings, shutdown).await?;
    Ok(())
}

/// Builds the application, reloads its configuration on SIGHUP, and runs it.
async fn proxy(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listeners = patchwire::app::Listeners::bind(&config).await?;
    let app = patchwire::app::App::build(config, listeners, shutdown.clone()).await?;
    if let Some(reloader) = app.reloader() {
        reload_on_hangup(reloader, shutdown);
    }
    app.run().await
}

/// Reloads the configuration file at every SIGHUP (the answer goes to the log), until
/// `shutdown`.
#[cfg(unix)]
fn reload_on_hangup(
    reloader: std::sync::Arc<dyn patchwire::api::reload::Reload>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP: reload with POST /admin/reload");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = hangups.recv() => {
                    if received.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading the configuration");
                    let answer = reloader.reload().await;
                    tracing::info!(status = answer.status.as_u16(), answer = %answer.body, "SIGHUP: reload answered");
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn reload_on_hangup(
    _reloader: std::sync::Arc<dyn patchwire::api::reload::Reload>,
    _shutdown: CancellationToken,
) {
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
