//! The `weir` command: run the gateway, check a config, print the default config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use weir::config::{Config, DEFAULT_CONFIG};

/// glibc's allocator spends a sixth of weir's CPU under load (per-record allocations across
/// threads); mimalloc's thread-local free lists are much cheaper for this pattern.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error (EX_CONFIG is 78; weir uses EX_USAGE, 64, as documented).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "weir", version, about = "IoT telemetry ingestion gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log output format.
    #[arg(long, global = true, env = "WEIR_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `weir=debug` (tracing env-filter syntax).
    #[arg(long, global = true, env = "WEIR_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default command; with no --config, the embedded default).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, env = "WEIR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file; exit 64 with file, line and reason on error.
    Check {
        #[arg(long, short, env = "WEIR_CONFIG")]
        config: PathBuf,
    },
    /// Print the documented default configuration.
    DefaultConfig,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            let config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(error) => {
                        eprintln!("{error}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                None => Config::default(),
            };
            init_logging(cli.log_format, &cli.log);
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("weir: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // Listening before the gateway starts: an early SIGHUP must not end the process.
        let signals = Signals::listen();
        let gateway = weir::start(config).await?;
        signals.until_shutdown(&gateway).await;
        let report = gateway.shutdown().await;
        if !report.clean {
            anyhow::bail!("shutdown grace period ran out; unacked work was abandoned");
        }
        Ok(())
    })
}

/// The signals weir acts on: SIGTERM and SIGINT stop it, SIGHUP reloads TLS certificates.
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let terminate = signal(SignalKind::terminate())
            .map_err(|error| tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops weir"))
            .ok();
        let hangup = signal(SignalKind::hangup())
            .map_err(
                |error| tracing::error!(%error, "cannot listen for SIGHUP; TLS certificates will not reload"),
            )
            .ok();
        Self { terminate, hangup }
    }

    /// Returns on SIGTERM or SIGINT; each SIGHUP meanwhile reloads the TLS certificates.
    async fn until_shutdown(mut self, gateway: &weir::Gateway) {
        loop {
            tokio::select! {
                Some(()) = recv(&mut self.hangup) => {
                    tracing::info!("SIGHUP received; reloading TLS certificates");
                    let report = gateway.reload_tls();
                    tracing::info!(reloaded = report.reloaded, failed = report.failed, "TLS reload done");
                }
                Some(()) = recv(&mut self.terminate) => {
                    tracing::info!("SIGTERM received");
                    return;
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT received");
                    return;
                }
            }
        }
    }
}

/// The next delivery of `signal`; never, when weir could not listen for it.
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
