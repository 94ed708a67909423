//! weir-load: simulated devices that load an MQTT server (weir or a baseline) and report JSON.

mod device;
mod flood;
mod payload;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::report::FloodReport;

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
    Flood(flood::FloodArgs),
    /// Print one summary line comparing two flood reports (e.g. weir against Mosquitto).
    Compare(CompareArgs),
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// Scenario name printed in the summary line.
    #[arg(long)]
    scenario: String,
    /// Report of the reference server (its last non-empty line is the JSON object).
    #[arg(long)]
    baseline: PathBuf,
    /// Report of the server under test.
    #[arg(long)]
    candidate: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Flood(args) => {
            let report = flood::run(args).await?;
            println!("{}", serde_json::to_string(&report)?);
            // A report is printed either way; a run where nothing got through is still a failure.
            let nothing_went_through = report.sent == 0 && report.errors > 0;
            Ok(if nothing_went_through { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Compare(args) => {
            let baseline = read_report(&args.baseline)?;
            let candidate = read_report(&args.candidate)?;
            println!("{}", report::comparison_line(&args.scenario, &baseline, &candidate));
            Ok(ExitCode::SUCCESS)
        }
    }
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
