//! The raw COPY baseline and the PostgreSQL verifier against the real server from
//! `deploy/local/postgres.sh` (started here if it is not running; `WEIR_TEST_POSTGRES` names
//! another by URL).

use std::time::{SystemTime, UNIX_EPOCH};

use weir_load::copy_baseline::{self, CopyBaselineParams};
use weir_load::postgres::{self, DEFAULT_URL};
use weir_load::verify;

fn url() -> String {
    match std::env::var("WEIR_TEST_POSTGRES") {
        Ok(url) => url,
        Err(_) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/postgres.sh");
            let status = std::process::Command::new("bash").arg(script).arg("start").status().unwrap();
            assert!(status.success(), "deploy/local/postgres.sh start failed: {status}");
            DEFAULT_URL.into()
        }
    }
}

/// A fresh lower-case name (tables) or prefix (device ids).
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

async fn drop_table(url: &str, table: &str) {
    let client = postgres::connect(url).await.unwrap();
    client.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await.unwrap();
}

fn params(url: &str, table: &str, prefix: &str, direct: bool) -> CopyBaselineParams {
    CopyBaselineParams {
        url: url.into(),
        table: table.into(),
        devices: 10,
        duration_secs: 2,
        batch: 500,
        connections: 3,
        direct,
        device_prefix: Some(prefix.into()),
        ..CopyBaselineParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_rows_are_read_back_complete_and_losses_are_counted() {
    let url = url();
    let table = unique("weir_load_rt");
    let staging = copy_baseline::run(params(&url, &table, &unique("st"), false)).await.unwrap();
    assert_eq!(staging.label, "raw-copy");
    assert_eq!(staging.errors, 0, "{staging:?}");
    assert!(staging.sent >= 1000, "{staging:?}");
    assert_eq!(staging.sent % 500, 0, "whole batches only: {staging:?}");
    assert_eq!(staging.acked, staging.sent);
    assert!(staging.ack_latency_ms.is_some());
    assert_eq!(staging.devices.len(), 10);
    assert!(
        staging.devices.values().all(|d| d.sent == d.acked_through && d.sent > 0),
        "{:?}",
        staging.devices
    );
    assert_eq!(staging.devices.values().map(|d| d.sent).sum::<u64>(), staging.sent);

    let direct = copy_baseline::run(params(&url, &table, &unique("di"), true)).await.unwrap();
    assert_eq!(direct.label, "raw-copy-direct");
    assert_eq!((direct.errors, direct.acked), (0, direct.sent), "{direct:?}");

    // Filtered to one run's devices, the other run's rows are not even read.
    let ids: Vec<String> = staging.devices.keys().cloned().collect();
    let found = verify::postgres::consume(&url, &table, Some(&ids)).await.unwrap();
    assert_eq!(found.messages, staging.sent);
    assert_eq!((found.undecodable, found.without_seq), (0, 0));
    let verdict = verify::verdict(&staging.devices, &found);
    assert!(verdict.passed(), "{:?}", verdict.totals);
    assert_eq!((verdict.totals.found, verdict.totals.distinct), (staging.sent, staging.sent));
    assert_eq!(
        (verdict.totals.duplicates, verdict.totals.unexpected, verdict.totals.other_devices),
        (0, 0, 0)
    );

    // Unfiltered, everything is read; the direct run's devices are the "other" ones.
    let everything = verify::postgres::consume(&url, &table, None).await.unwrap();
    assert_eq!(everything.messages, staging.sent + direct.sent);
    let verdict = verify::verdict(&direct.devices, &everything);
    assert!(verdict.passed(), "{:?}", verdict.totals);
    assert_eq!((verdict.totals.other_devices, verdict.totals.other_messages), (10, staging.sent));

    // A device that claims 3 more acknowledged rows than were written lost exactly those.
    let mut claimed = staging.devices.clone();
    let (device, count) = claimed.iter_mut().next().unwrap();
    let device = device.clone();
    count.sent += 3;
    count.acked_through += 3;
    let acked_through = count.acked_through;
    let verdict = verify::verdict(&claimed, &found);
    assert_eq!(verdict.totals.lost, 3);
    let row = verdict.lossy_devices(20).next().unwrap();
    assert_eq!(row.device_id, device);
    assert_eq!(row.lost_ranges, vec![(acked_through - 2, acked_through)]);

    drop_table(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_skips_rows_already_there_and_direct_copy_fails_on_them() {
    let url = url();
    let table = unique("weir_load_conflict");
    let prefix = unique("cf");
    let first =
        copy_baseline::run(CopyBaselineParams { duration_secs: 1, ..params(&url, &table, &prefix, false) })
            .await
            .unwrap();
    assert_eq!((first.errors, first.acked), (0, first.sent), "{first:?}");

    // The same device ids and seqs again: ON CONFLICT DO NOTHING commits them as no-ops.
    let again =
        copy_baseline::run(CopyBaselineParams { duration_secs: 1, ..params(&url, &table, &prefix, false) })
            .await
            .unwrap();
    assert_eq!((again.errors, again.acked), (0, again.sent), "{again:?}");
    let found = verify::postgres::consume(&url, &table, None).await.unwrap();
    assert_eq!(found.messages, first.sent.max(again.sent), "the key keeps one row per (device_id, seq)");
    let verdict = verify::verdict(&Default::default(), &found);
    assert_eq!(verdict.totals.duplicates, 0);

    // A direct COPY of the same keys violates the unique key: every connection's first batch
    // fails, nothing is acknowledged, and the rows written count as errors.
    let direct =
        copy_baseline::run(CopyBaselineParams { duration_secs: 1, ..params(&url, &table, &prefix, true) })
            .await
            .unwrap();
    assert_eq!(direct.acked, 0, "{direct:?}");
    assert_eq!(direct.errors, direct.sent);
    assert!(direct.sent > 0);
    assert!(direct.ack_latency_ms.is_none());
    assert!(direct.devices.values().all(|d| d.acked_through == 0), "{:?}", direct.devices);

    drop_table(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_counts_null_and_negative_seqs_and_rejects_missing_tables() {
    let url = url();
    let table = unique("weir_load_odd");
    let client = postgres::connect(&url).await.unwrap();
    postgres::create_table(&client, &table, false).await.unwrap();
    postgres::create_table(&client, &table, false).await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (device_id, seq, received_ts, protocol, source, metrics, tags) VALUES
             ('a', 1, now(), 'mqtt', 's', '{{}}', '{{}}'),
             ('a', 3, now(), 'mqtt', 's', '{{}}', '{{}}'),
             ('a', NULL, now(), 'mqtt', 's', '{{}}', '{{}}'),
             ('b', -1, now(), 'mqtt', 's', '{{}}', '{{}}')"
        ))
        .await
        .unwrap();
    let found = verify::postgres::consume(&url, &table, None).await.unwrap();
    assert_eq!(found.messages, 4);
    assert_eq!(found.devices["a"], vec![1, 3]);
    assert_eq!((found.without_seq, found.undecodable), (1, 1));
    assert!(found.first_undecodable.as_deref().unwrap().contains("negative seq -1"), "{found:?}");
    let only_b = verify::postgres::consume(&url, &table, Some(&["b".to_owned()])).await.unwrap();
    assert_eq!((only_b.messages, only_b.undecodable), (1, 1));

    // --recreate empties it.
    postgres::create_table(&client, &table, true).await.unwrap();
    assert_eq!(verify::postgres::consume(&url, &table, None).await.unwrap().messages, 0);
    drop_table(&url, &table).await;

    let missing = unique("weir_load_missing");
    let error = verify::postgres::consume(&url, &missing, None).await.unwrap_err();
    assert!(format!("{error:#}").contains(&missing), "{error:#}");
    let error = verify::postgres::consume(&url, "Robert'); DROP TABLE x;--", None).await.unwrap_err();
    assert!(format!("{error:#}").contains("table name"), "{error:#}");
}
