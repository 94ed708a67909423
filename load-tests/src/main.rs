//! weir-load: simulated devices that load an MQTT server (weir or a baseline), the raw Kafka
//! producer, PostgreSQL COPY and SQLite insert baselines, the Kafka, PostgreSQL and SQLite
//! verifiers, and weir's memory per idle connection; each prints JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::Serialize;
use weir_load::report::{self, read_device_counts, write_device_counts, DeviceCounts, FloodReport};
use weir_load::scenario::run::default_report_path;
use weir_load::scenario::{self, RunOptions, Scenario};
use weir_load::{baseline, copy_baseline, flood, html, idle, kafka, postgres, sqlite_baseline, verify};

/// weir's device simulator and benchmark tool.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open N device connections and publish telemetry for a fixed time; print one JSON report.
    Flood(FloodArgs),
    /// Produce the records weir would write straight to Kafka with weir's producer settings;
    /// print one JSON report in flood's shape (the baseline for weir's Kafka sink).
    ProduceBaseline(BaselineArgs),
    /// Read a whole Kafka topic back and count lost and duplicated records per device; print
    /// one JSON object. Exit 0 when nothing acknowledged is missing, 1 otherwise.
    VerifyKafka(VerifyKafkaArgs),
    /// Create a Kafka topic (replication 1) unless it exists, and wait for its partition leaders.
    CreateTopic(CreateTopicArgs),
    /// Delete Kafka topics and everything in them (missing ones are no error).
    DeleteTopics(DeleteTopicsArgs),
    /// Write the rows weir would write straight to PostgreSQL with binary COPY, in batches over
    /// a few connections; print one JSON report in flood's shape (the baseline for weir's
    /// PostgreSQL sink).
    CopyBaseline(CopyBaselineArgs),
    /// Read `(device_id, seq)` of a PostgreSQL table back and count lost and duplicated rows per
    /// device; print one JSON object. Exit 0 when nothing acknowledged is missing, 1 otherwise.
    VerifyPostgres(VerifyPostgresArgs),
    /// Create the table weir's PostgreSQL sink writes, unless it exists.
    CreateTable(CreateTableArgs),
    /// Write the rows weir would write straight into a fresh SQLite file, the way weir's SQLite
    /// sink writes them (WAL, one transaction per batch of prepared single-row inserts); print
    /// one JSON report in flood's shape (the baseline for weir's SQLite sink).
    SqliteBaseline(SqliteBaselineArgs),
    /// Read `(device_id, seq)` of weir's SQLite table back and count lost rows per device (the
    /// table drops duplicates itself); print one JSON object. Exit 0 when nothing acknowledged
    /// is missing, 1 otherwise.
    VerifySqlite(VerifySqliteArgs),
    /// Print one summary line comparing two reports (e.g. weir against Mosquitto).
    Compare(CompareArgs),
    /// Measure weir's memory per idle connection: open N connections over one protocol, each
    /// doing one acknowledged message, leave them idle, and compare weir's RSS before and after.
    /// Prints one JSON object and one SUMMARY line; exit 0 within the protocol's target, 3 over.
    Idle(idle::IdleParams),
    /// Run a scenario file: device groups over MQTT 3.1.1/5, MQTT over WebSocket, WebSocket
    /// ingest and raw TCP, with rates, ramp-up, reconnect storms and bursts. Prints live progress
    /// on stderr, writes a JSON report and a self-contained HTML page, reads the sink back when
    /// the scenario has a [verify] section, and prints one line in `flood`'s shape on stdout
    /// (for `compare`). Exit 1 when the verifier finds acknowledged records missing.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The scenario file (TOML; see load-tests/scenarios/).
    scenario: PathBuf,
    /// The target's name in the report.
    #[arg(long, default_value = "weir")]
    label: String,
    /// Where the JSON report goes (default `weir-load-NAME.json`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the HTML report goes (default `weir-load-NAME.html`).
    #[arg(long)]
    html: Option<PathBuf>,
    /// Also write every device's `{"sent", "acked_through"}` here, as a JSON map by device id.
    #[arg(long)]
    devices_out: Option<PathBuf>,
    /// Override the scenario's duration_s.
    #[arg(long)]
    duration_s: Option<f64>,
    /// No progress line every second.
    #[arg(long)]
    quiet: bool,
    /// Read this server process's CPU time at the start and the end; the stdout line gets
    /// `target_cpu_secs` and `cpu_us_per_msg`.
    #[arg(long)]
    cpu_pid: Option<u32>,
}

#[derive(Debug, clap::Args)]
struct FloodArgs {
    #[command(flatten)]
    params: flood::FloodParams,
    /// Also write every device's `{"sent", "acked_through"}` here, as a JSON map by device id.
    #[arg(long)]
    devices_out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BaselineArgs {
    #[command(flatten)]
    params: baseline::BaselineParams,
    /// Also write every simulated device's `{"sent", "acked_through"}` here (delivery reports).
    #[arg(long)]
    devices_out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct CopyBaselineArgs {
    #[command(flatten)]
    params: copy_baseline::CopyBaselineParams,
    /// Also write every simulated device's `{"sent", "acked_through"}` here (committed rows).
    #[arg(long)]
    devices_out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct SqliteBaselineArgs {
    #[command(flatten)]
    params: sqlite_baseline::SqliteBaselineParams,
    /// Also write every simulated device's `{"sent", "acked_through"}` here (committed rows).
    #[arg(long)]
    devices_out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct VerifyKafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Per-device counts from `flood --devices-out` (repeatable; the files are merged). Without
    /// any, every device found is checked for duplicates only.
    #[arg(long)]
    devices_in: Vec<PathBuf>,
    /// Once caught up with the topic, stop after this long without a new message.
    #[arg(long, default_value_t = 10)]
    idle_timeout_secs: u64,
    /// Device rows (those that lost records) printed at most.
    #[arg(long, default_value_t = 20)]
    max_rows: usize,
    /// After the JSON object, also print one `SUMMARY NAME: ...` line (for bench.sh).
    #[arg(long, value_name = "NAME")]
    summary: Option<String>,
}

#[derive(Debug, clap::Args)]
struct VerifyPostgresArgs {
    /// PostgreSQL connection URL (no TLS).
    #[arg(long, default_value = postgres::DEFAULT_URL)]
    url: String,
    /// The table weir's sink writes.
    #[arg(long, default_value = "telemetry")]
    table: String,
    /// Per-device counts from `flood --devices-out` (repeatable; the files are merged). Only
    /// these devices' rows are read. Without any, every row is read and every device found is
    /// checked for duplicates only.
    #[arg(long)]
    devices_in: Vec<PathBuf>,
    /// Device rows (those that lost records) printed at most.
    #[arg(long, default_value_t = 20)]
    max_rows: usize,
    /// After the JSON object, also print one `SUMMARY NAME: ...` line (for bench.sh).
    #[arg(long, value_name = "NAME")]
    summary: Option<String>,
}

#[derive(Debug, clap::Args)]
struct VerifySqliteArgs {
    /// The database file weir's SQLite sink writes (`data_dir/telemetry.db` by default).
    #[arg(long)]
    db: PathBuf,
    #[arg(long, default_value = "telemetry")]
    table: String,
    /// Per-device counts from `flood --devices-out` (repeatable; the files are merged).
    /// Without any, every device found is checked.
    #[arg(long)]
    devices_in: Vec<PathBuf>,
    /// Device rows (those that lost records) printed at most.
    #[arg(long, default_value_t = 20)]
    max_rows: usize,
    /// After the JSON object, also print one `SUMMARY NAME: ...` line.
    #[arg(long, value_name = "NAME")]
    summary: Option<String>,
}

#[derive(Debug, clap::Args)]
struct CreateTableArgs {
    /// PostgreSQL connection URL (no TLS).
    #[arg(long, default_value = postgres::DEFAULT_URL)]
    url: String,
    #[arg(long, default_value = "telemetry")]
    table: String,
    /// Drop the table (and everything in it) first, so the run starts empty.
    #[arg(long)]
    recreate: bool,
}

#[derive(Debug, clap::Args)]
struct CreateTopicArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..))]
    partitions: i32,
    /// Delete the topic (and everything in it) first, so the run starts empty.
    #[arg(long)]
    recreate: bool,
}

#[derive(Debug, clap::Args)]
struct DeleteTopicsArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(required = true)]
    topics: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// Scenario name printed in the summary line.
    #[arg(long)]
    scenario: String,
    /// Report of the reference run (its last non-empty line is the JSON object).
    #[arg(long)]
    baseline: PathBuf,
    /// Report of the run under test.
    #[arg(long)]
    candidate: PathBuf,
    /// Compare p50/p99/p999 latencies (paced runs at the same load) instead of throughput.
    #[arg(long, conflicts_with = "cpu")]
    latency: bool,
    /// Compare the server's CPU per message (runs with `flood --cpu-pid` at the same load)
    /// instead of throughput.
    #[arg(long)]
    cpu: bool,
    /// With --cpu: the most candidate/baseline CPU per message allowed, reported as met or
    /// MISSED (e.g. 0.5).
    #[arg(long, requires = "cpu")]
    max_cpu_ratio: Option<f64>,
    /// With --cpu: the msgs/s both runs were offered (devices x rate); a run that completed
    /// under 95% of the messages offered in its duration gets a warning.
    #[arg(long, requires = "cpu")]
    offered_msgs_per_sec: Option<f64>,
    /// With --latency: the candidate's p99 target, reported as met or MISSED.
    #[arg(long, requires = "latency")]
    p99_target_ms: Option<f64>,
    /// Throughput comparison: the least candidate/baseline msgs/s ratio, reported as met or
    /// MISSED (e.g. 0.8).
    #[arg(long, conflicts_with_all = ["latency", "cpu"])]
    min_ratio: Option<f64>,
    /// Throughput comparison: the candidate's least msgs/s, an absolute target reported as
    /// met or MISSED (e.g. 300000).
    #[arg(long, conflicts_with_all = ["latency", "cpu"])]
    min_rate: Option<f64>,
}

/// What `verify-kafka` and `verify-postgres` print.
#[derive(Debug, Serialize)]
struct VerifyOutput<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<&'a str>,
    passed: bool,
    totals: &'a verify::Totals,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_undecodable: Option<&'a str>,
    /// Devices that lost records, at most `--max-rows`.
    lossy_devices: Vec<&'a verify::DeviceVerdict>,
    lossy_devices_not_shown: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Flood(args) => {
            let report = flood::run(args.params).await?;
            finish_run(&report, args.devices_out.as_deref())
        }
        Command::ProduceBaseline(args) => {
            let report = baseline::run(args.params).await?;
            finish_run(&report, args.devices_out.as_deref())
        }
        Command::VerifyKafka(args) => verify_kafka(args).await,
        Command::CreateTopic(args) => {
            let status =
                kafka::create_topic(&args.brokers, &args.topic, args.partitions, args.recreate).await?;
            eprintln!("create-topic: {} on {}: {status:?}", args.topic, args.brokers);
            Ok(ExitCode::SUCCESS)
        }
        Command::CopyBaseline(args) => {
            let report = copy_baseline::run(args.params).await?;
            let status = finish_run(&report, args.devices_out.as_deref())?;
            // Rows written but no batch committed: nothing got through either.
            Ok(if report.acked == 0 && report.errors > 0 { ExitCode::FAILURE } else { status })
        }
        Command::SqliteBaseline(args) => {
            let report = tokio::task::spawn_blocking(move || sqlite_baseline::run(args.params))
                .await
                .context("the SQLite writer thread panicked")??;
            let status = finish_run(&report, args.devices_out.as_deref())?;
            // Rows written but no batch committed: nothing got through either.
            Ok(if report.acked == 0 && report.errors > 0 { ExitCode::FAILURE } else { status })
        }
        Command::DeleteTopics(args) => {
            kafka::delete_topics(&args.brokers, &args.topics).await?;
            eprintln!("delete-topics: {} on {}: deleted", args.topics.join(", "), args.brokers);
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyPostgres(args) => verify_postgres(args).await,
        Command::VerifySqlite(args) => {
            let expected = read_expected(&args.devices_in)?;
            let (db, table) = (args.db.clone(), args.table.clone());
            let found = tokio::task::spawn_blocking(move || verify::sqlite::read(&db, &table))
                .await
                .context("the SQLite reader thread panicked")??;
            print_verdict(
                VerifiedSource::Table(&args.table),
                &expected,
                &found,
                args.max_rows,
                args.summary.as_deref(),
            )
        }
        Command::CreateTable(args) => {
            let client = postgres::connect(&args.url).await?;
            postgres::create_table(&client, &args.table, args.recreate).await?;
            eprintln!(
                "create-table: {} at {}: {}",
                args.table,
                args.url,
                if args.recreate { "recreated" } else { "exists" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare(args) => {
            let baseline = read_report(&args.baseline)?;
            let candidate = read_report(&args.candidate)?;
            let line = if args.latency {
                report::latency_line(&args.scenario, &baseline, &candidate, args.p99_target_ms)
            } else if args.cpu {
                report::cpu_line(
                    &args.scenario,
                    &baseline,
                    &candidate,
                    args.max_cpu_ratio,
                    args.offered_msgs_per_sec,
                )
            } else {
                let mut line = report::comparison_line(&args.scenario, &baseline, &candidate);
                if let Some(min_ratio) = args.min_ratio {
                    line.push_str(&report::ratio_target(&baseline, &candidate, min_ratio));
                }
                if let Some(min_rate) = args.min_rate {
                    line.push_str(&report::rate_target(&candidate, min_rate));
                }
                line
            };
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run_scenario(args).await,
        Command::Idle(params) => {
            let report = idle::run(params).await?;
            println!("{}", serde_json::to_string(&report)?);
            println!("{}", report.summary_line());
            Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
    }
}

async fn run_scenario(args: RunArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let mut scenario = Scenario::parse(&text).with_context(|| format!("in {}", args.scenario.display()))?;
    if let Some(duration) = args.duration_s {
        scenario.duration_s = duration;
        scenario
            .check()
            .with_context(|| format!("{} with --duration-s {duration}", args.scenario.display()))?;
    }
    let options =
        RunOptions { label: args.label, scenario_text: text, quiet: args.quiet, cpu_pid: args.cpu_pid };
    let outcome = scenario::run(&scenario, &options).await?;
    let json_path = args.json.unwrap_or_else(|| default_report_path(&scenario.name, "json"));
    let html_path = args.html.unwrap_or_else(|| default_report_path(&scenario.name, "html"));
    std::fs::write(&json_path, serde_json::to_vec_pretty(&outcome.report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&html_path, html::render(&outcome.report))
        .with_context(|| format!("writing {}", html_path.display()))?;
    for (reason, count) in &outcome.errors_by_reason {
        eprintln!("run: {count} x {reason}");
    }
    if let Some(verify) = &outcome.report.verify {
        eprintln!(
            "run: verify {}: {} (acked {}, found {}, lost {}, duplicates {})",
            verify.sink,
            if verify.passed { "PASSED" } else { "FAILED" },
            verify.acked,
            verify.found,
            verify.lost,
            verify.duplicates
        );
    }
    eprintln!("run: report in {} and {}", json_path.display(), html_path.display());
    let flood = outcome.flood_report(&scenario);
    let status = finish_run(&flood, args.devices_out.as_deref())?;
    Ok(match &outcome.report.verify {
        Some(verify) if !verify.passed => ExitCode::FAILURE,
        _ => status,
    })
}

/// Prints the report line, writes the device counts if asked, and fails a run where nothing got
/// through (the report is printed either way).
fn finish_run(report: &FloodReport, devices_out: Option<&Path>) -> anyhow::Result<ExitCode> {
    if let Some(path) = devices_out {
        write_device_counts(path, &report.devices)?;
    }
    println!("{}", serde_json::to_string(report)?);
    let nothing_went_through = report.sent == 0 && report.errors > 0;
    Ok(if nothing_went_through { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Merges the `--devices-in` files; a device in two files is an error.
fn read_expected(paths: &[PathBuf]) -> anyhow::Result<DeviceCounts> {
    let mut expected = DeviceCounts::new();
    for path in paths {
        for (device, count) in read_device_counts(path)? {
            if expected.insert(device.clone(), count).is_some() {
                bail!("device {device} appears in more than one --devices-in file");
            }
        }
    }
    Ok(expected)
}

/// Where a verifier read from, for its output.
enum VerifiedSource<'a> {
    Topic(&'a str),
    Table(&'a str),
}

/// Prints the verdict's JSON object (and the SUMMARY line when asked); exit 0 when it passed.
fn print_verdict(
    source: VerifiedSource<'_>,
    expected: &DeviceCounts,
    found: &verify::Found,
    max_rows: usize,
    summary: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let verdict = verify::verdict(expected, found);
    let lossy = verdict.devices.iter().filter(|d| d.lost > 0).count();
    let (topic, table) = match source {
        VerifiedSource::Topic(topic) => (Some(topic), None),
        VerifiedSource::Table(table) => (None, Some(table)),
    };
    let output = VerifyOutput {
        topic,
        table,
        passed: verdict.passed(),
        totals: &verdict.totals,
        first_undecodable: found.first_undecodable.as_deref(),
        lossy_devices: verdict.lossy_devices(max_rows).collect(),
        lossy_devices_not_shown: lossy.saturating_sub(max_rows),
    };
    println!("{}", serde_json::to_string(&output)?);
    if let Some(name) = summary {
        println!("{}", verdict.summary_line(name));
    }
    Ok(if verdict.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn verify_kafka(args: VerifyKafkaArgs) -> anyhow::Result<ExitCode> {
    let expected = read_expected(&args.devices_in)?;
    let found =
        verify::kafka::consume(&args.brokers, &args.topic, Duration::from_secs(args.idle_timeout_secs))
            .await
            .with_context(|| format!("reading topic {}", args.topic))?;
    print_verdict(
        VerifiedSource::Topic(&args.topic),
        &expected,
        &found,
        args.max_rows,
        args.summary.as_deref(),
    )
}

async fn verify_postgres(args: VerifyPostgresArgs) -> anyhow::Result<ExitCode> {
    let expected = read_expected(&args.devices_in)?;
    let devices: Vec<String> = expected.keys().cloned().collect();
    let filter = (!devices.is_empty()).then_some(devices.as_slice());
    // The errors name the table.
    let found = verify::postgres::consume(&args.url, &args.table, filter).await?;
    print_verdict(
        VerifiedSource::Table(&args.table),
        &expected,
        &found,
        args.max_rows,
        args.summary.as_deref(),
    )
}

fn read_report(path: &Path) -> anyhow::Result<FloodReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .with_context(|| format!("{} is empty", path.display()))?;
    serde_json::from_str(line).with_context(|| format!("parsing the report in {}", path.display()))
}
