//! The `weir` command: run the gateway, check a config, print the default config, manage a
//! password file.

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
    /// Manage a password file ([listeners.auth] kind = "password_file").
    Passwd {
        #[command(subcommand)]
        command: PasswdCommand,
    },
}

#[derive(Subcommand)]
enum PasswdCommand {
    /// Add a user (a device id) or replace its password. The password is read from the terminal
    /// (asked twice, not echoed) or, with --password-stdin or when stdin is not a terminal, as
    /// one line of stdin; never from the command line, where other users could see it.
    Add {
        /// The password file; created (mode 0600) if missing, rewritten atomically.
        #[arg(long, short)]
        file: PathBuf,
        /// The user: the device id the password proves.
        user: String,
        /// Read the password as the first line of stdin, without prompting.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // No transparent huge pages for weir's memory. mimalloc gives each thread's pages their own
    // stretch of its arena, so with THP every thread that allocates at all pins a whole 2 MiB
    // page: idle RSS was 19.1-19.6 MiB (8 MiB of it huge pages, for ~1 MiB of heap), 11.9-12.6
    // MiB without (`load-tests/footprint.sh`), at no measurable cost in CPU per message
    // (`load-tests/bench.sh`). mimalloc's `no_thp` feature stops it asking for huge pages (hosts
    // with THP = madvise); this covers THP = always, where the kernel would use them unasked,
    // for everything allocated from here on (deploy/ also sets MIMALLOC_ALLOW_THP=0, which
    // covers the allocations before main too). Best effort: failing, weir only uses more memory.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    // Bare `weir` is `weir run`: WEIR_CONFIG names its file there too.
    let bare = || Command::Run { config: std::env::var_os("WEIR_CONFIG").map(PathBuf::from) };
    match cli.command.unwrap_or_else(bare) {
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Passwd { command: PasswdCommand::Add { file, user, password_stdin } } => {
            let password = match read_password(password_stdin) {
                Ok(password) => password,
                Err(error) => {
                    eprintln!("weir passwd: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match weir::auth::password::add_user(&file, &user, password.as_bytes()) {
                Ok(()) => {
                    println!("{}: user {user:?} set", file.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("weir passwd: {error}");
                    ExitCode::FAILURE
                }
            }
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
            let path = config;
            let config = match &path {
                Some(path) => match Config::load(path) {
                    Ok(c) => c,
                    Err(error) => {
                        eprintln!("{error}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
                None => Config::default(),
            };
            init_logging(cli.log_format, &cli.log);
            match run(config, path) {
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

fn run(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // Listening before the gateway starts: an early SIGHUP must not end the process.
        let signals = Signals::listen();
        let gateway = weir::start(config).await?;
        signals.until_shutdown(&gateway, path.as_deref()).await;
        let report = gateway.shutdown().await;
        if !report.clean {
            anyhow::bail!("shutdown grace period ran out; unacked work was abandoned");
        }
        Ok(())
    })
}

/// The signals weir acts on: SIGTERM and SIGINT stop it, SIGHUP reloads the config file (what
/// can change in place), TLS certificates and password files.
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

    /// Returns on SIGTERM or SIGINT; each SIGHUP meanwhile reloads the config file at `path`
    /// (a file that does not load or validate changes nothing), TLS certificates and password
    /// files.
    async fn until_shutdown(mut self, gateway: &weir::Gateway, path: Option<&std::path::Path>) {
        loop {
            tokio::select! {
                Some(()) = recv(&mut self.hangup) => {
                    if let Some(path) = path {
                        tracing::info!(path = %path.display(), "SIGHUP received; reloading the config");
                        match Config::load(path) {
                            Ok(config) => {
                                gateway.reload_config(config);
                            }
                            Err(error) => {
                                gateway.config_reload_failed();
                                tracing::error!(%error, "config not reloaded; the running config stays");
                            }
                        }
                    }
                    tracing::info!("reloading TLS certificates");
                    let report = gateway.reload_tls();
                    tracing::info!(reloaded = report.reloaded, failed = report.failed, "TLS reload done");
                    let (reloaded, failed) = gateway.reload_auth();
                    if reloaded + failed > 0 {
                        tracing::info!(reloaded, failed, "password file reload done");
                    }
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

/// The password for `weir passwd add`: one line of stdin, or typed twice at the terminal with
/// echo off.
fn read_password(from_stdin: bool) -> Result<String, String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let read_line = || -> Result<String, String> {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).map_err(|e| format!("cannot read the password: {e}"))?;
        let line = line.strip_suffix('\n').unwrap_or(&line);
        Ok(line.strip_suffix('\r').unwrap_or(line).to_owned())
    };
    if from_stdin || !stdin.is_terminal() {
        return read_line();
    }
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let saved = tcgetattr(&stdin).map_err(|e| format!("cannot read the terminal settings: {e}"))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Now, &quiet).map_err(|e| format!("cannot turn echo off: {e}"))?;
    let ask = |prompt: &str| {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let line = read_line();
        eprintln!();
        line
    };
    let first = ask("Password: ");
    let second = first.is_ok().then(|| ask("Again: "));
    let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
    let first = first?;
    if second.transpose()?.as_deref() != Some(first.as_str()) {
        return Err("the passwords differ".into());
    }
    Ok(first)
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
