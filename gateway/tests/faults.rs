//! The fault-injection suite (issue 6): real `weir` processes (this build's binary), loaded by
//! weir-load's simulated devices with outboxes (`flood --reconnect`: a dropped connection is
//! reconnected and every unacknowledged publish resent with its seq), and counted by weir-load's
//! verifier from what the sink holds. The cases run one at a time (some stop the shared Kafka
//! broker) and each prints one `FAULT <case>: sent=… acked=… found=… lost=… duplicated=… …`
//! line, so a reader of the CI log sees the evidence and not only "ok".

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::kafka::{kafka_sh_async as kafka, unique_topic};
use common::process::{
    explain_loss, kafka_sink, read_kafka, read_sqlite, start_flood, wait_backlog_drained, wait_for,
    WeirProcess,
};
use common::WriteLock;
use prost::Message as _;
use tokio::sync::Mutex;
use weir_load::flood::FloodParams;
use weir_load::verify::{verdict, Totals};

/// One case at a time: some stop the shared broker, all measure rates on a shared machine.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Bytes of a segment header and of a frame header (gateway/src/buffer/format.rs).
const SEGMENT_HEADER_LEN: u64 = 24;
const FRAME_HEADER_LEN: u64 = 16;

// ---------------------------------------------------------------------------------------------
// Configs, load, verdicts
// ---------------------------------------------------------------------------------------------

const SQLITE_SINK: &str = "[sink]\nkind = \"sqlite\"\n";

fn disk_buffer(max_bytes: u64, segment_bytes: u64) -> String {
    format!(
        "[buffer]\nkind = \"disk\"\nmax_bytes = {max_bytes}\nsegment_bytes = {segment_bytes}\nfsync = \"batch\"\n"
    )
}

/// A flood of `devices` outbox devices at `rate` messages per second each for `secs`.
fn flood_params(weir: &WeirProcess, case: &str, devices: u32, rate: u32, secs: u64) -> FloodParams {
    let mut params = FloodParams::new(weir.mqtt.ip().to_string(), weir.mqtt.port());
    params.connections = devices;
    params.qos = 1;
    params.rate_per_conn = rate;
    params.duration_secs = secs;
    params.max_inflight = 100;
    params.drain_timeout_secs = 120;
    params.reconnect = true;
    params.client_prefix = Some(unique_topic(case));
    params.label = format!("faults-{case}");
    params
}

/// The one line a reader of the CI log looks for.
fn print_fault_line(case: &str, totals: &Totals, duplicated: u64, extra: &str) {
    println!(
        "FAULT {case}: sent={} acked={} found={} lost={} duplicated={duplicated} {extra}",
        totals.sent, totals.acked, totals.found, totals.lost
    );
}

/// Starts the broker again when dropped, so a failing case does not leave it stopped for the
/// rest of the suite (or for the next test binary).
struct KafkaBackOnDrop;

impl Drop for KafkaBackOnDrop {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/kafka.sh");
        match Command::new("bash").arg(script).arg("start").status() {
            Ok(status) if status.success() => {}
            other => eprintln!("faults: restarting Kafka failed: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Case: the broker is down for 60 s
// ---------------------------------------------------------------------------------------------

/// Kafka stopped for 60 s under QoS 1 load with the disk buffer on and acks at the buffer:
/// devices keep being acknowledged, the backlog grows on disk, drains once the broker is back,
/// and nothing acknowledged is missing from the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_down_60s() {
    let _serial = SERIAL.lock().await;
    const CASE: &str = "kafka_down_60s";
    const OUTAGE: Duration = Duration::from_secs(60);
    const DEVICES: u32 = 30;
    const RATE: u32 = 100;
    kafka(&["start"]).await;
    let topic = unique_topic("weir-faults-down");
    let dir = tempfile::tempdir().unwrap();
    let sections = format!("{}\n{}", kafka_sink(&topic, 4), disk_buffer(1 << 30, 8 << 20));
    let mut weir = WeirProcess::new(dir.path(), "buffered", "", &sections);
    weir.start().await;

    // Publishing covers the warm-up (~5 s) and the outage, and ends while the broker restarts
    // (~15-20 s), so the drain afterwards is measured without new load.
    let (watch, flood) = start_flood(flood_params(&weir, "down", DEVICES, RATE, 75));
    assert!(
        wait_for(Duration::from_secs(30), || watch.snapshot().acked > 5 * u64::from(DEVICES * RATE)).await,
        "the stream never got going: {:?}",
        watch.snapshot()
    );
    assert!(weir.metric("weir_records_committed_total") > 0, "records reach Kafka before the outage");

    let back_on_drop = KafkaBackOnDrop;
    kafka(&["stop"]).await;
    let outage_began = Instant::now();
    // Delivery reports of what the broker took before it exited may still be on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed_before = weir.metric("weir_records_committed_total");
    let acked_at_stop = watch.snapshot().acked;
    let mut samples = Vec::new();
    let mut peak_bytes = 0;
    while outage_began.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_secs(10).min(OUTAGE.saturating_sub(outage_began.elapsed()))).await;
        let (acked, unacked, bytes) = (
            watch.snapshot().acked,
            weir.metric("weir_buffer_unacked_records"),
            weir.metric("weir_buffer_bytes"),
        );
        peak_bytes = peak_bytes.max(bytes);
        println!(
            "{CASE}: outage t={:>2.0}s acked={acked} buffer_unacked_records={unacked} buffer_bytes={bytes}",
            outage_began.elapsed().as_secs_f64()
        );
        samples.push((acked, unacked, bytes));
    }
    let acked_during_outage = samples.last().unwrap().0 - acked_at_stop;
    let committed_during_outage = weir.metric("weir_records_committed_total") - committed_before;
    kafka(&["start"]).await;
    drop(back_on_drop);
    let broker_back_after = outage_began.elapsed();

    // The backlog drains into the broker: sampled every 2 s until it is empty.
    let drain_began = Instant::now();
    loop {
        let (unacked, bytes) = (weir.metric("weir_buffer_unacked_records"), weir.metric("weir_buffer_bytes"));
        println!(
            "{CASE}: broker back t={:>2.0}s buffer_unacked_records={unacked} buffer_bytes={bytes}",
            drain_began.elapsed().as_secs_f64()
        );
        peak_bytes = peak_bytes.max(bytes);
        if unacked == 0 {
            break;
        }
        assert!(
            drain_began.elapsed() < Duration::from_secs(180),
            "the backlog did not drain within 180 s\n{}",
            weir.log_tail(30)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let drained_in = drain_began.elapsed();
    let bytes_after = weir.metric("weir_buffer_bytes");
    let report = flood.await.unwrap();
    let found = read_kafka(&topic).await;
    weir.terminate().await;
    let verdict = verdict(&report.devices, &found);
    print_fault_line(
        CASE,
        &verdict.totals,
        verdict.totals.duplicates,
        &format!(
            "outage={}s acked_during_outage={acked_during_outage} buffer_peak_bytes={peak_bytes} \
             buffer_peak_unacked={} buffer_bytes_after={bytes_after} broker_back_after={:.0}s \
             drained_in={:.1}s reconnects={} errors={}",
            OUTAGE.as_secs(),
            samples.iter().map(|s| s.1).max().unwrap_or(0),
            broker_back_after.as_secs_f64(),
            drained_in.as_secs_f64(),
            report.reconnects,
            report.errors
        ),
    );

    // Acks went on for the whole outage, at more than half the offered rate.
    let offered = u64::from(DEVICES * RATE) * OUTAGE.as_secs();
    assert!(
        acked_during_outage > offered / 2,
        "{acked_during_outage} acked during the outage of {offered} offered"
    );
    for pair in samples.windows(2) {
        assert!(pair[1].0 > pair[0].0, "acks stalled during the outage: {samples:?}");
        assert!(pair[1].1 > pair[0].1 && pair[1].2 > pair[0].2, "the buffer did not grow: {samples:?}");
    }
    assert_eq!(committed_during_outage, 0, "nothing can be committed while the broker is down");
    // Everything acknowledged during the outage was on disk, waiting for the broker.
    assert!(samples.last().unwrap().1 >= acked_during_outage, "backlog below the acks: {samples:?}");
    assert!(
        bytes_after < peak_bytes,
        "drained segments are deleted: {bytes_after} of {peak_bytes} bytes left"
    );
    assert_eq!(verdict.totals.lost, 0, "acked records lost: {}", explain_loss(&verdict));
    assert_eq!(report.errors, 0, "no device gave up");
}

// ---------------------------------------------------------------------------------------------
// Case: weir SIGKILLed 5 times under load
// ---------------------------------------------------------------------------------------------

/// What was in flight at one kill.
#[derive(Debug, Default)]
struct Kill {
    /// Device side, sampled for 300 ms up to the kill (max): published, PUBACK not yet seen.
    device_in_flight: u64,
    /// weir side, sampled likewise: entries in the buffer not yet committed by the sink.
    buffer_unacked: u64,
    /// What the devices actually resent after this kill (their outboxes when the connection
    /// broke), and what the restarted weir replayed from its buffer.
    resent: u64,
    replayed: u64,
}

/// weir SIGKILLed under load 5 times in a row and restarted on the same data directory each
/// time: nothing acknowledged is lost, and duplicates stay within what was in flight.
async fn sigkill_5_times(case: &str, buffered: bool) {
    const DEVICES: u32 = 30;
    const RATE: u32 = 100;
    const PUBLISH_SECS: u64 = 50;
    kafka(&["start"]).await;
    let topic = unique_topic(&format!("weir-faults-{}", case.replace('_', "-")));
    let dir = tempfile::tempdir().unwrap();
    let (ack, sections) = if buffered {
        ("buffered", format!("{}\n{}", kafka_sink(&topic, 4), disk_buffer(1 << 30, 8 << 20)))
    } else {
        ("committed", kafka_sink(&topic, 4))
    };
    let mut weir = WeirProcess::new(dir.path(), ack, "", &sections);
    weir.start().await;

    let (watch, flood) = start_flood(flood_params(&weir, "kill", DEVICES, RATE, PUBLISH_SECS));
    let publishing_began = Instant::now();
    assert!(
        wait_for(Duration::from_secs(30), || watch.snapshot().acked > 3 * u64::from(DEVICES * RATE)).await,
        "the stream never got going: {:?}",
        watch.snapshot()
    );
    let buffer_metric = |weir: &WeirProcess, name: &str| if buffered { weir.metric(name) } else { 0 };
    let mut kills: Vec<Kill> = Vec::new();
    for number in 1..=5 {
        // Flowing again: acks grow on the current process.
        let acked = watch.snapshot().acked;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = watch.snapshot();
        assert!(now.acked > acked + 1000, "kill {number}: acks are not flowing ({acked} → {})", now.acked);

        let mut kill = Kill::default();
        for _ in 0..10 {
            kill.device_in_flight = kill.device_in_flight.max(watch.snapshot().in_flight);
            kill.buffer_unacked =
                kill.buffer_unacked.max(buffer_metric(&weir, "weir_buffer_unacked_records"));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // This process's replay at its start (the restart after the previous kill).
        if let Some(previous) = kills.last_mut() {
            previous.replayed = buffer_metric(&weir, "weir_buffer_replayed_records_total");
        }
        let before = watch.snapshot();
        weir.sigkill();
        assert!(
            publishing_began.elapsed() < Duration::from_secs(PUBLISH_SECS),
            "kill {number} came after the devices stopped publishing: restarts are too slow for this schedule"
        );
        weir.start().await;
        // Each device reconnects once per kill, and counts as connected once its outbox is
        // resent.
        let all_back = wait_for(Duration::from_secs(30), || {
            let s = watch.snapshot();
            s.reconnects >= before.reconnects + u64::from(DEVICES) && s.connected == u64::from(DEVICES)
        })
        .await;
        assert!(all_back, "kill {number}: devices did not come back: {:?}", watch.snapshot());
        kill.resent = watch.snapshot().resent - before.resent;
        println!(
            "{case}: kill {number}: device_in_flight={} buffer_unacked={} resent_after={}",
            kill.device_in_flight, kill.buffer_unacked, kill.resent
        );
        kills.push(kill);
    }

    let report = flood.await.unwrap();
    if buffered {
        wait_backlog_drained(&weir, Duration::from_secs(60)).await;
    }
    kills.last_mut().unwrap().replayed = buffer_metric(&weir, "weir_buffer_replayed_records_total");
    let found = read_kafka(&topic).await;
    weir.terminate().await;
    let verdict = verdict(&report.devices, &found);
    // The bound on duplicates. A record is written twice only when it is written again after a
    // kill, in one of two ways:
    // - a device resends it, not having seen its PUBACK: what was in flight on the device side
    //   when the connection broke, exactly what `resent` counts;
    // - the restarted weir replays it from the buffer: everything after the watermark persisted
    //   in the log at the kill, exactly what `weir_buffer_replayed_records_total` counts (0 without
    //   a buffer). This is more than `weir_buffer_unacked_records` sampled before the kill: the
    //   watermark is persisted at most every 200 ms, so the replay also repeats up to ~200 ms of
    //   records the sink had committed.
    // The idempotent producer adds none within one process. So duplicates ≤ Σ over the kills of
    // (resent + replayed), the records in flight at the kills as each side measured them.
    let bound: u64 = kills.iter().map(|k| k.resent + k.replayed).sum();
    let list = |f: fn(&Kill) -> u64| kills.iter().map(f).map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    print_fault_line(
        case,
        &verdict.totals,
        verdict.totals.duplicates,
        &format!(
            "kills=5 device_in_flight_at_kills=[{}] buffer_unacked_at_kills=[{}] resent=[{}] replayed=[{}] \
             in_flight_bound={bound} reconnects={} errors={}",
            list(|k| k.device_in_flight),
            list(|k| k.buffer_unacked),
            list(|k| k.resent),
            list(|k| k.replayed),
            report.reconnects,
            report.errors
        ),
    );
    assert_eq!(verdict.totals.lost, 0, "acked records lost: {}", explain_loss(&verdict));
    assert!(
        verdict.totals.duplicates <= bound,
        "{} duplicates > {bound} in flight",
        verdict.totals.duplicates
    );
    assert_eq!(report.errors, 0, "no device gave up");
    assert!(report.reconnects >= 5 * u64::from(DEVICES), "every device reconnected after every kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_5_times_committed() {
    let _serial = SERIAL.lock().await;
    sigkill_5_times("sigkill_5_times_committed", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_5_times_buffered() {
    let _serial = SERIAL.lock().await;
    sigkill_5_times("sigkill_5_times", true).await;
}

// ---------------------------------------------------------------------------------------------
// Case: the buffer's filesystem fills
// ---------------------------------------------------------------------------------------------

/// A tmpfs of a fixed size mounted for the test; unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(Tmpfs { path: path.to_path_buf() })
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the filesystem of `dir` with `dir/filler` until ENOSPC, then gives back `leave` bytes.
fn fill(dir: &Path, leave: u64) -> u64 {
    let path = dir.join("filler");
    let mut file = File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
    let len = file.metadata().unwrap().len();
    file.set_len(len.saturating_sub(leave)).unwrap();
    len.saturating_sub(leave)
}

/// The buffer's directory on a 4 MiB tmpfs that fills while the sink is stalled (SQLite locked
/// by the test): weir stays up, devices are held (no acks), appends wait on `disk_full`; once
/// space returns and the lock is released everything is delivered, and a restart finds no
/// damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_filesystem() {
    let _serial = SERIAL.lock().await;
    const CASE: &str = "tiny_filesystem";
    let dir = tempfile::tempdir().unwrap();
    let mut weir = WeirProcess::new(
        dir.path(),
        "buffered",
        "max_packet_bytes = 4096\n",
        &format!("{SQLITE_SINK}\n{}", disk_buffer(64 << 20, 256 << 10)),
    );
    let tmpfs = match Tmpfs::mount(&weir.buffer_dir(), "4m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            println!("FAULT {CASE}: SKIPPED: cannot mount a tmpfs here ({reason})");
            return;
        }
    };
    weir.start().await;
    let lock = WriteLock::take(&weir.db_path());
    let filler_bytes = fill(&tmpfs.path, 512 << 10);

    let (watch, flood) = start_flood(flood_params(&weir, "tinyfs", 10, 100, 25));
    assert!(
        wait_for(Duration::from_secs(30), || weir.labelled("weir_buffer_full_total", "reason=\"disk_full\"")
            > 0)
        .await,
        "appends never hit the full disk: {:?}\n{}",
        watch.snapshot(),
        weir.log_tail(20)
    );
    // Held: once what was in flight settles, no more acks while the disk is full.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = watch.snapshot();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = watch.snapshot();
    let disk_full_waits = weir.labelled("weir_buffer_full_total", "reason=\"disk_full\"");
    assert!(weir.running() && weir.healthy(), "weir stays up on a full disk\n{}", weir.log_tail(20));
    assert_eq!(still.acked, held.acked, "no acks while nothing can be buffered");
    assert!(still.in_flight > 0, "devices are waiting: {still:?}");
    println!(
        "{CASE}: disk full: acked={} device_in_flight={} buffer_bytes={} disk_full_waits={disk_full_waits}",
        still.acked,
        still.in_flight,
        weir.metric("weir_buffer_bytes")
    );

    fs::remove_file(tmpfs.path.join("filler")).unwrap();
    lock.release();
    let report = flood.await.unwrap();
    wait_backlog_drained(&weir, Duration::from_secs(60)).await;
    let found = read_sqlite(weir.db_path()).await;
    let duplicates = weir.metric("weir_records_duplicate_total");
    weir.terminate().await;
    weir.start().await;
    let corruptions = weir.metric("weir_buffer_corruptions_total");
    let replayed = weir.metric("weir_buffer_replayed_records_total");
    weir.terminate().await;
    let verdict = verdict(&report.devices, &found);
    print_fault_line(
        CASE,
        &verdict.totals,
        duplicates,
        &format!(
            "filler_bytes={filler_bytes} acked_while_full={} disk_full_waits={disk_full_waits} \
             corruptions_after_restart={corruptions} replayed_after_restart={replayed} reconnects={} errors={}",
            still.acked - held.acked,
            report.reconnects,
            report.errors
        ),
    );
    // What weir said about it, once when the disk filled and once when room returned.
    let log = weir.log_text();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disk buffer full") || l.contains("disk buffer has room again"))
        .collect();
    for line in &said {
        println!("{CASE}: log: {line}");
    }
    assert_eq!(verdict.totals.lost, 0, "acked records lost: {}", explain_loss(&verdict));
    assert_eq!(corruptions, 0, "a full disk left damage behind");
    assert!(
        said.iter().any(|l| l.contains("No space left")),
        "the log names the full disk:\n{}",
        weir.log_tail(30)
    );
    assert!(said.iter().any(|l| l.contains("room again")), "the log says when room returned");
    assert_eq!(report.errors, 0);
    assert_eq!(report.reconnects, 0, "weir never dropped a device");
    drop(tmpfs);
}

// ---------------------------------------------------------------------------------------------
// Case: damaged segment files
// ---------------------------------------------------------------------------------------------

/// One frame of a segment file.
#[derive(Debug, Clone)]
struct Frame {
    offset: u64,
    len: u64,
    device_id: String,
    seq: u64,
}

/// Every frame of a segment written by weir (format in gateway/src/buffer/format.rs), with the
/// record each entry holds.
fn frames(path: &Path) -> Vec<Frame> {
    let bytes = fs::read(path).unwrap();
    let mut frames = Vec::new();
    let mut at = SEGMENT_HEADER_LEN as usize;
    while at + FRAME_HEADER_LEN as usize <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let payload_at = at + FRAME_HEADER_LEN as usize;
        let Some(payload) = bytes.get(payload_at..payload_at + len) else { break };
        let item = weir_proto::v1::BufferedItem::decode(payload).expect("a BufferedItem");
        let Some(weir_proto::v1::buffered_item::Item::Record(record)) = item.item else {
            panic!("a dead letter in {}", path.display());
        };
        frames.push(Frame {
            offset: at as u64,
            len: len as u64,
            device_id: record.device_id,
            seq: record.seq.expect("flood records carry seqs"),
        });
        at = payload_at + len;
    }
    frames
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "wal")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Segments written while the sink was stalled; weir SIGKILLed; one segment truncated in the
/// middle of an entry and another with bytes flipped inside one entry's payload: weir starts,
/// reports both, and delivers every record outside the damaged regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damaged_segments() {
    let _serial = SERIAL.lock().await;
    const CASE: &str = "damaged_segments";
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so there are many: a segment must hold 4 of the largest messages plus
    // 64 KiB, hence the small packet limit (the flood's messages are ~200 bytes).
    let mut weir = WeirProcess::new(
        dir.path(),
        "buffered",
        "max_packet_bytes = 4096\n",
        &format!("{SQLITE_SINK}\n{}", disk_buffer(64 << 20, 128 << 10)),
    );
    weir.start().await;
    let lock = WriteLock::take(&weir.db_path());
    let (watch, flood) = start_flood(flood_params(&weir, "damage", 10, 100, 6));
    let report = flood.await.unwrap();
    assert_eq!(report.acked, report.sent, "everything acked from the buffer while the sink is stalled");
    assert_eq!(weir.metric("weir_records_committed_total"), 0, "the sink is stalled");
    let segments = segment_files(&weir.buffer_dir());
    assert!(segments.len() >= 6, "several segments: {segments:?}");
    weir.sigkill();
    let _ = watch;

    // Truncate the second segment in the middle of its middle entry: that entry and the rest of
    // the segment are gone. Flip a byte in the middle of the payload of the fourth segment's
    // middle entry: that entry alone is gone. Neither is the newest segment (a torn tail there is
    // a normal crash, repaired by truncation).
    let mut destroyed: BTreeSet<(String, u64)> = BTreeSet::new();
    let truncated = &segments[1];
    let truncated_frames = frames(truncated);
    let cut_from = truncated_frames.len() / 2;
    let cut = &truncated_frames[cut_from];
    let cut_at = cut.offset + FRAME_HEADER_LEN + cut.len / 2;
    OpenOptions::new().write(true).open(truncated).unwrap().set_len(cut_at).unwrap();
    destroyed.extend(truncated_frames[cut_from..].iter().map(|f| (f.device_id.clone(), f.seq)));
    let flipped = &segments[3];
    let flipped_frames = frames(flipped);
    let victim = &flipped_frames[flipped_frames.len() / 2];
    let mut bytes = fs::read(flipped).unwrap();
    let flip_at = (victim.offset + FRAME_HEADER_LEN + victim.len / 2) as usize;
    bytes[flip_at] ^= 0xff;
    bytes[flip_at + 1] ^= 0xff;
    fs::write(flipped, bytes).unwrap();
    destroyed.insert((victim.device_id.clone(), victim.seq));
    println!(
        "{CASE}: {} segments; truncated {} at byte {cut_at} (entries {}..{} of {}), flipped 2 bytes at {flip_at} \
         of {} (entry {} of {})",
        segments.len(),
        truncated.file_name().unwrap().to_string_lossy(),
        cut_from,
        truncated_frames.len(),
        truncated_frames.len(),
        flipped.file_name().unwrap().to_string_lossy(),
        flipped_frames.len() / 2,
        flipped_frames.len()
    );

    lock.release();
    weir.start().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(weir.running(), "weir stays up after finding damage\n{}", weir.log_tail(30));
    let drained_in = wait_backlog_drained(&weir, Duration::from_secs(60)).await;
    let corruptions = weir.metric("weir_buffer_corruptions_total");
    let reported_lost = weir.metric("weir_buffer_lost_records_total");
    let replayed = weir.metric("weir_buffer_replayed_records_total");
    let duplicates = weir.metric("weir_records_duplicate_total");
    let found = read_sqlite(weir.db_path()).await;
    weir.terminate().await;
    let log = weir.log_text();
    let damage_lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("damage")
                && [truncated, flipped].iter().any(|p| l.contains(&*p.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    let verdict = verdict(&report.devices, &found);
    let mut missing: BTreeSet<(String, u64)> = BTreeSet::new();
    for (device_id, count) in &report.devices {
        let seqs: BTreeSet<u64> = found.devices.get(device_id).into_iter().flatten().copied().collect();
        missing
            .extend((1..=count.acked_through).filter(|s| !seqs.contains(s)).map(|s| (device_id.clone(), s)));
    }
    print_fault_line(
        CASE,
        &verdict.totals,
        duplicates,
        &format!(
            "segments={} destroyed={} corruptions_reported={corruptions} lost_reported={reported_lost} \
             replayed={replayed} drained_in={:.1}s log_lines={}",
            segments.len(),
            destroyed.len(),
            drained_in.as_secs_f64(),
            damage_lines.len()
        ),
    );
    for line in &damage_lines {
        println!("{CASE}: log: {line}");
    }
    assert!(corruptions >= 2, "both damaged regions reported: {corruptions}");
    assert!(damage_lines.len() >= 2, "the log names both damaged segments:\n{}", weir.log_tail(30));
    assert_eq!(missing, destroyed, "exactly the records in the damaged regions are missing");
    assert!(verdict.totals.lost <= reported_lost, "weir reports at least what was lost");
    assert_eq!(verdict.totals.found, verdict.totals.acked - verdict.totals.lost);
}
