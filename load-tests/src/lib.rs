//! weir-load as a library: simulated MQTT devices (`flood`), fleets of devices over every
//! protocol described in a scenario file (`scenario`, with its JSON report `run_report` and HTML
//! page `html`), the raw Kafka producer baseline (`baseline`), the raw PostgreSQL COPY baseline
//! (`copy_baseline`), the raw SQLite insert baseline (`sqlite_baseline`), a server's CPU time
//! (`cpu`), the end-to-end verifier (`verify`) and the idle-connection memory scenario (`idle`),
//! so weir's integration tests can drive the same code as the `weir-load` CLI.

mod device;
mod fd_limit;
mod outbox;

pub mod baseline;
pub mod copy_baseline;
pub mod cpu;
pub mod flood;
pub mod html;
pub mod idle;
pub mod kafka;
pub mod payload;
pub mod postgres;
pub mod report;
pub mod run_report;
pub mod scenario;
pub mod sqlite_baseline;
pub mod targets;
pub mod verify;

pub use report::{DeviceCount, FloodReport};
