//! The `switchyard` command line: configuration, logging, and the
//! composition root.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use switchyard_drivers::Registry;
use tracing_subscriber::EnvFilter;

use crate::{
    domain::SystemClock,
    server::{self, DEFAULT_HORIZON_DAYS},
};

/// Books control actions on home-energy devices, and never lets two
/// writers silently fight over a device.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate {
        /// Database URL.
        #[arg(
            long = "database",
            env = "SWITCHYARD_DATABASE_URL",
            default_value = "sqlite://switchyard.db"
        )]
        database: String,
    },
}

/// `switchyard serve` options.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Database URL: `sqlite://PATH` (created if missing) or `sqlite::memory:`.
    #[arg(
        long = "database",
        env = "SWITCHYARD_DATABASE_URL",
        default_value = "sqlite://switchyard.db"
    )]
    pub database: String,
    /// Do not create the demo devices on an empty database.
    #[arg(long)]
    pub no_demo: bool,
    /// Log format.
    #[arg(
        long,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// How many days ahead an action may start.
    #[arg(long, env = "SWITCHYARD_HORIZON_DAYS", default_value_t = DEFAULT_HORIZON_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub horizon_days: u32,
    /// Seconds to let running calls finish on SIGTERM/SIGINT.
    #[arg(long, env = "SWITCHYARD_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Registers SIGTERM/SIGINT handlers now (so a signal that arrives while
/// starting up is not fatal) and resolves when one arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received"),
                        _ = int.recv() => tracing::info!("SIGINT received"),
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `switchyard serve`.
pub async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    init_logging(args.log_format);
    let shutdown = shutdown_signal();
    let app = server::build_app(
        &args.database,
        Arc::new(SystemClock),
        Registry::builtin(),
        args.horizon_days,
    )
    .await?;
    if !args.no_demo {
        let n = server::seed_demo(&app).await?;
        if n > 0 {
            tracing::info!(devices = n, "created demo devices on the empty database");
        }
    }
    let dispatcher = server::dispatcher(&app, crate::dispatch::DispatchConfig::default());
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = %args.database, "listening");
    server::serve(
        app,
        listener,
        shutdown,
        Duration::from_secs(args.shutdown_grace_seconds),
        Some(dispatcher),
    )
    .await
}

/// Entry point shared by every binary that runs the service.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Serve(args) => serve(args).await,
            Cmd::Migrate { database } => server::build_app(
                &database,
                Arc::new(SystemClock),
                Registry::builtin(),
                DEFAULT_HORIZON_DAYS,
            )
            .await
            .map(|_| ())
            .map_err(Into::into),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
