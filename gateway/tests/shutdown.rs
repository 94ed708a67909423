//! SIGTERM during a QoS 1 stream: the `weir` process drains and exits, and every message it
//! PUBACKed is in the table afterwards.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use weir_protocols::mqtt::{decode, encode, Packet, QoS};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Weir(Child);

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_healthy(ops_port: u16) {
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", ops_port)).await {
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            let mut body = String::new();
            let _ = s.read_to_string(&mut body).await;
            if body.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("weir did not become healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_qos1_stream_loses_no_acked_record() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, ops_port) = (free_port(), free_port());
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[ops]\nlisten = \"127.0.0.1:{ops_port}\"\n\
             [[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
             [fabric]\nlinger_ms = 20\n[shutdown]\ngrace_ms = 20000\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let weir = Weir(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_healthy(ops_port).await;

    let stream = TcpStream::connect(("127.0.0.1", mqtt_port)).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::new();
    encode(&connect_packet("term-dev"), &mut out);
    wr.write_all(&out).await.unwrap();

    // PUBACKs arrive in publish order, so the n-th PUBACK acknowledges the n-th publish.
    let window = Arc::new(Semaphore::new(100));
    let published = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let writer = tokio::spawn({
        let (window, published) = (Arc::clone(&window), Arc::clone(&published));
        async move {
            for seq in 1u64.. {
                window.acquire().await.unwrap().forget();
                let pkid = (seq % 65_535) as u16 + 1;
                let mut out = BytesMut::new();
                encode(
                    &publish(QoS::AtLeastOnce, pkid, "devices/term-dev/t", reading("term-dev", seq)),
                    &mut out,
                );
                published.lock().await.push_back((pkid, seq));
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    });
    let reader = tokio::spawn({
        let (window, published) = (Arc::clone(&window), Arc::clone(&published));
        async move {
            let mut buf = BytesMut::new();
            let mut acked = Vec::new();
            loop {
                while let Some(packet) = decode(&mut buf, 1 << 20).unwrap() {
                    if let Packet::PubAck(pkid) = packet {
                        let (sent_pkid, seq) = published.lock().await.pop_front().unwrap();
                        assert_eq!(pkid, sent_pkid, "PUBACK out of order");
                        acked.push(seq as i64);
                        window.add_permits(1);
                    }
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return acked,
                    Ok(_) => {}
                }
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = weir.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let acked = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("weir closes the connection")
        .unwrap();
    writer.abort();
    let mut weir = weir;
    let status = tokio::task::spawn_blocking(move || weir.0.wait()).await.unwrap().unwrap();
    assert!(status.success(), "weir exited with {status}");

    assert!(acked.len() > 100, "the stream was running when SIGTERM came ({} acked)", acked.len());
    let stored: std::collections::HashSet<i64> =
        rows(&dir.path().join("telemetry.db")).into_iter().map(|(_, seq)| seq).collect();
    let missing: Vec<_> = acked.iter().filter(|s| !stored.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} acked records missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
