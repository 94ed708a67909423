//! Scale-out (DESIGN.md "Scale beyond one machine", issue 8): three real `weir` processes (this
//! build's binary) on loopback write to one topic of one real Kafka broker, with weir-load's
//! outbox devices (`flood --reconnect`) spread over them round-robin. One instance is SIGKILLed
//! mid-stream; its devices reconnect to the next instance that answers and resend what was not
//! acknowledged; weir-load's verifier reads the topic back. Nothing acknowledged may be missing.
//! Duplicates are expected (a device resends what was in flight at the kill, and the dead
//! instance may have written some of it) and printed: consumers drop them by (device_id, seq).
//! The case prints one `SCALE-OUT: …` line with the evidence.
//!
//! No serial lock: this is its own test binary with one case, and cargo runs test binaries one
//! after another, so it cannot overlap faults.rs or kafka_faults.rs, which stop or kill the
//! shared broker. A second case added here that stops the broker needs a lock like faults.rs's.

mod common;

use std::time::{Duration, Instant};

use common::kafka::{brokers, kafka_sh_async, unique_topic};
use common::process::{explain_loss, kafka_sink, read_kafka, start_flood, wait_for, WeirProcess};
use weir_load::flood::FloodParams;
use weir_load::verify::verdict;

const INSTANCES: usize = 3;
/// The instance SIGKILLed mid-stream (its devices move on to instance 0, the next target).
const KILLED: usize = 2;
const DEVICES: u32 = 90;
/// Messages per second per device.
const RATE: u32 = 20;
const PUBLISH_SECS: u64 = 20;
/// From the start of the flood to the kill.
const KILL_AFTER: Duration = Duration::from_secs(8);
/// Partitions of the topic: more than instances, so every instance writes to every partition.
const PARTITIONS: u32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_one_killed_mid_stream_lose_nothing_acknowledged() {
    let began = Instant::now();
    kafka_sh_async(&["start"]).await;
    let topic = unique_topic("weir-scale-out");
    // Created up front, so the three instances do not race to create it.
    let created = weir_load::kafka::create_topic(&brokers(), &topic, PARTITIONS as i32, false).await;
    created.expect("topic created");
    let dirs: Vec<tempfile::TempDir> = (0..INSTANCES).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut instances: Vec<WeirProcess> = dirs
        .iter()
        .map(|dir| WeirProcess::new(dir.path(), "committed", "", &kafka_sink(&topic, PARTITIONS)))
        .collect();
    for weir in &mut instances {
        weir.start().await;
    }

    let mut params = FloodParams::spread(instances.iter().map(|weir| weir.mqtt));
    params.connections = DEVICES;
    params.qos = 1;
    params.rate_per_conn = RATE;
    params.duration_secs = PUBLISH_SECS;
    params.max_inflight = 100;
    params.drain_timeout_secs = 60;
    params.reconnect = true;
    params.client_prefix = Some(unique_topic("scale"));
    params.label = "scale-out".into();
    let flood_began = Instant::now();
    let (watch, flood) = start_flood(params);

    // Every instance takes its share and commits to the topic before the kill.
    let flowing = wait_for(Duration::from_secs(30), || {
        watch.snapshot().acked > 2 * u64::from(DEVICES * RATE)
            && instances.iter().all(|weir| weir.metric("weir_records_committed_total") > 0)
    })
    .await;
    assert!(flowing, "the stream never got going on every instance: {:?}", watch.snapshot());
    let assigned = watch.targets();
    for (index, target) in assigned.iter().enumerate() {
        assert_eq!(
            target.devices_here,
            u64::from(DEVICES) / INSTANCES as u64,
            "instance {index}: {target:?}"
        );
    }
    tokio::time::sleep_until((flood_began + KILL_AFTER).into()).await;

    // What the whole fleet had in flight (published, PUBACK not yet seen), sampled for 300 ms up
    // to the kill (max). The devices publish in step (paced from one common start), so whether
    // the kill catches the killed instance's devices with a publish in flight is all or nothing.
    let mut fleet_in_flight_at_kill = 0;
    for _ in 0..10 {
        fleet_in_flight_at_kill = fleet_in_flight_at_kill.max(watch.snapshot().in_flight);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let committed_by_killed = instances[KILLED].metric("weir_records_committed_total");
    let before = watch.snapshot();
    instances[KILLED].sigkill();
    let killed_at = flood_began.elapsed();

    // Every device of the killed instance is connected to another one, and has resent its
    // outbox there; the survivors see every device.
    let moved = wait_for(Duration::from_secs(30), || {
        watch.targets()[KILLED].devices_here == 0 && watch.snapshot().connected == u64::from(DEVICES)
    })
    .await;
    let moved_in = flood_began.elapsed() - killed_at;
    assert!(moved, "devices did not move: {:?} {:?}", watch.snapshot(), watch.targets());
    assert!(
        flood_began.elapsed() < Duration::from_secs(PUBLISH_SECS),
        "the devices moved after publishing ended ({moved_in:?}): the case proves nothing about moving mid-stream"
    );
    let survivors_active = || {
        let survivors = instances.iter().enumerate().filter(|(index, _)| *index != KILLED);
        survivors.map(|(_, weir)| weir.metric("weir_connections_active")).sum::<u64>()
    };
    let all_on_survivors =
        wait_for(Duration::from_secs(10), || survivors_active() == u64::from(DEVICES)).await;
    assert!(all_on_survivors, "weir's own count of connections: {} of {DEVICES}", survivors_active());
    let resent_after_kill = watch.snapshot().resent - before.resent;

    let report = flood.await.unwrap();
    let found = read_kafka(&topic).await;
    let mut per_instance = Vec::new();
    for (index, weir) in instances.iter_mut().enumerate() {
        let target = &report.targets[index];
        if index == KILLED {
            per_instance.push(format!(
                "{index}:killed_at={:.1}s,assigned={},connections={},dropped={},ended_here={},committed_before_kill={committed_by_killed}",
                killed_at.as_secs_f64(),
                target.assigned,
                target.connections,
                target.dropped,
                target.devices_here
            ));
            continue;
        }
        per_instance.push(format!(
            "{index}:assigned={},connections={},reconnects={},dropped={},ended_here={},committed={},opened={}",
            target.assigned,
            target.connections,
            target.reconnects,
            target.dropped,
            target.devices_here,
            weir.metric("weir_records_committed_total"),
            weir.metric("weir_connections_opened_total")
        ));
        weir.terminate().await;
    }
    let verdict = verdict(&report.devices, &found);
    let totals = &verdict.totals;
    println!(
        "SCALE-OUT: instances={INSTANCES} killed=1 devices={} sent={} acked={} found={} lost={} duplicated={} \
         reconnects={} per-instance=[{}] resent={} resent_after_kill={resent_after_kill} \
         fleet_in_flight_at_kill={fleet_in_flight_at_kill} moved_in={:.1}s errors={} elapsed={:.1}s",
        totals.devices,
        totals.sent,
        totals.acked,
        totals.found,
        totals.lost,
        totals.duplicates,
        report.reconnects,
        per_instance.join("; "),
        report.resent,
        moved_in.as_secs_f64(),
        report.errors,
        began.elapsed().as_secs_f64()
    );

    assert_eq!(totals.lost, 0, "acked records lost: {}", explain_loss(&verdict));
    assert_eq!(report.errors, 0, "no device gave up");
    assert_eq!(totals.devices, u64::from(DEVICES));
    for (device_id, count) in &report.devices {
        assert!(count.sent > 0 && count.acked_through == count.sent, "{device_id}: {count:?}");
    }
    let planned = u64::from(DEVICES * RATE) * PUBLISH_SECS;
    assert!(totals.sent * 10 >= planned * 9, "{} of {planned} planned publishes went out", totals.sent);
    assert_eq!((totals.unexpected, totals.undecodable, totals.without_seq), (0, 0, 0));
    // A record is written twice only when its device resent it after the kill.
    assert!(
        totals.duplicates <= report.resent,
        "{} duplicates > {} resent",
        totals.duplicates,
        report.resent
    );

    // From the devices' side: the killed instance's devices all lost their connection, came back
    // on the others (and only there), and stayed; nobody else was disturbed.
    let killed = &report.targets[KILLED];
    let its_devices = assigned[KILLED].devices_here;
    assert_eq!((killed.dropped, killed.reconnects, killed.devices_here), (its_devices, 0, 0), "{killed:?}");
    let survivors: Vec<_> = report.targets.iter().enumerate().filter(|(index, _)| *index != KILLED).collect();
    for (index, target) in &survivors {
        assert_eq!(target.dropped, 0, "instance {index} dropped no device: {target:?}");
    }
    let reconnects_to_survivors: u64 = survivors.iter().map(|(_, t)| t.reconnects).sum();
    assert_eq!(reconnects_to_survivors, report.reconnects);
    assert!(report.reconnects >= its_devices, "every device of the killed instance reconnected");
    assert_eq!(survivors.iter().map(|(_, t)| t.devices_here).sum::<u64>(), u64::from(DEVICES));
}
