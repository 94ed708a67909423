//! The raw producer baseline and the Kafka verifier against the real broker from
//! `deploy/local/kafka.sh` (started here if it is not running; `WEIR_TEST_KAFKA` names another).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use weir_load::baseline::{self, BaselineParams};
use weir_load::kafka::{create_topic, TopicStatus, CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE};
use weir_load::verify;

fn brokers() -> String {
    match std::env::var("WEIR_TEST_KAFKA") {
        Ok(brokers) => brokers,
        Err(_) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/kafka.sh");
            let status = std::process::Command::new("bash").arg(script).arg("start").status().unwrap();
            assert!(status.success(), "deploy/local/kafka.sh start failed: {status}");
            "127.0.0.1:9092".into()
        }
    }
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_records_are_read_back_complete_and_losses_are_counted() {
    let brokers = brokers();
    let topic = unique("weir-load-roundtrip");
    let params = BaselineParams {
        brokers: brokers.clone(),
        topic: topic.clone(),
        partitions: 3,
        devices: 10,
        duration_secs: 2,
        rate: 2000,
        device_prefix: Some(unique("rt")),
        ..BaselineParams::default()
    };
    let report = baseline::run(params).await.unwrap();
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.sent > 1000, "{report:?}");
    assert_eq!(report.acked, report.sent);
    assert_eq!(report.devices.len(), 10);
    assert!(report.devices.values().all(|d| d.sent == d.acked_through && d.sent > 0), "{:?}", report.devices);
    assert_eq!(report.devices.values().map(|d| d.sent).sum::<u64>(), report.sent);

    let found = verify::kafka::consume(&brokers, &topic, Duration::from_secs(1)).await.unwrap();
    assert_eq!(found.messages, report.sent);
    assert_eq!((found.undecodable, found.without_seq), (0, 0));
    let verdict = verify::verdict(&report.devices, &found);
    assert!(verdict.passed(), "{:?}", verdict.totals);
    assert_eq!(verdict.totals.found, report.sent);
    assert_eq!(verdict.totals.distinct, report.sent);
    assert_eq!((verdict.totals.duplicates, verdict.totals.unexpected), (0, 0));

    // A device that claims 3 more acknowledged records than were written lost exactly those.
    let mut claimed = report.devices.clone();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_decodes_by_content_type_and_falls_back_to_the_key() {
    let brokers = brokers();
    let topic = unique("weir-load-decode");
    assert_eq!(create_topic(&brokers, &topic, 1, false).await.unwrap(), TopicStatus::Created);
    assert_eq!(create_topic(&brokers, &topic, 1, false).await.unwrap(), TopicStatus::Existed);
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("producer");
    let protobuf_without_id = weir_proto::Record { seq: Some(2), ..Default::default() }.encode_to_vec();
    let messages: [(&str, Option<&str>, &[u8]); 4] = [
        ("json-dev", Some(JSON_CONTENT_TYPE), br#"{"device_id":"json-dev","seq":"7"}"#),
        ("json-dev", Some(JSON_CONTENT_TYPE), br#"{"device_id":"json-dev","seq":7}"#),
        ("key-dev", None, &protobuf_without_id),
        ("bad-dev", Some(JSON_CONTENT_TYPE), b"not json"),
    ];
    for (key, content_type, value) in messages {
        let mut record = FutureRecord::to(&topic).key(key).payload(value);
        if let Some(content_type) = content_type {
            record = record.headers(
                OwnedHeaders::new().insert(Header { key: CONTENT_TYPE_HEADER, value: Some(content_type) }),
            );
        }
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    let found = verify::kafka::consume(&brokers, &topic, Duration::from_secs(1)).await.unwrap();
    assert_eq!(found.messages, 4);
    assert_eq!(found.devices["json-dev"], vec![7, 7]);
    assert_eq!(found.devices["key-dev"], vec![2]);
    assert_eq!(found.undecodable, 1);
    assert!(found.first_undecodable.as_deref().unwrap().contains("not a JSON record"), "{found:?}");
    let verdict = verify::verdict(&Default::default(), &found);
    assert_eq!((verdict.totals.devices, verdict.totals.duplicates), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_a_missing_topic_is_an_error() {
    let brokers = brokers();
    let error = verify::kafka::consume(&brokers, &unique("weir-load-missing"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(format!("{error:#}").contains("weir-load-missing"), "{error:#}");
}
