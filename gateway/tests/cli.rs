//! The `weir` command line: config checking with exit 64, the shipped default, and the ops
//! endpoints of a running process.

use std::process::Command;

fn weir(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().unwrap()
}

#[test]
fn default_config_round_trips_through_check() {
    let out = weir(&["default-config"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let check = weir(&["check", "--config", path.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn check_exits_64_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "data_dir = \"d\"\n\n[fabric]\nlinger_ms = \"soon\"\n").unwrap();
    let out = weir(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("line 4") && err.contains("linger_ms"), "{err}");

    std::fs::write(&path, "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"0.0.0.0:1883\"\n").unwrap();
    let out = weir(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listeners[0].listen") && err.contains("allow_anonymous"), "{err}");

    let out = weir(&["run", "--config", dir.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml: cannot read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "data_dir = {:?}\n[ops]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\n",
        dir.path().display().to_string()
    );
    let gateway = weir::start(weir::config::Config::parse(&text, "t.toml").unwrap()).await.unwrap();
    let get = |path: &'static str| {
        let addr = gateway.ops_addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut response = String::new();
            s.read_to_string(&mut response).await.unwrap();
            response
        }
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for name in [
        "weir_sink_ready 1",
        "# TYPE weir_records_committed counter",
        "# TYPE weir_sink_batch_duration_seconds histogram",
        "# TYPE weir_fabric_shard_records gauge",
    ] {
        assert!(metrics.contains(name), "missing {name:?} in\n{metrics}");
    }
    gateway.shutdown().await;
}

/// A self-signed certificate and key in `dir`, under `name`.
fn write_cert(dir: &std::path::Path, name: &str) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

#[test]
fn check_names_the_tls_file_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "server");
    let path = dir.path().join("tls.toml");
    let listener = "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:8883\"\n[listeners.tls]\n";
    // Relative to the config file's folder, wherever weir runs from.
    std::fs::write(&path, format!("{listener}cert_file = \"server.pem\"\nkey_file = \"server.key\"\n"))
        .unwrap();
    let out = weir(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&path, format!("{listener}cert_file = \"server.pem\"\nkey_file = \"other.key\"\n"))
        .unwrap();
    let out = weir(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.toml") && err.contains("listeners[0].tls.key_file") && err.contains("other.key"),
        "{err}"
    );
}

/// A `weir run` process on `config` (written to `weir.toml` in `dir`, with `{ops}` replaced by a
/// free ops port); its metrics are read over HTTP.
struct RunningWeir {
    child: std::process::Child,
    ops_port: u16,
    path: std::path::PathBuf,
}

impl RunningWeir {
    fn start(dir: &std::path::Path, config: &str) -> Self {
        let ops_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = dir.join("weir.toml");
        std::fs::write(&path, config.replace("{ops}", &format!("127.0.0.1:{ops_port}"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let weir = Self { child, ops_port, path };
        assert!(weir.wait_for("weir_sink_ready 1"), "weir did not start");
        weir
    }

    fn metrics(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.ops_port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    }

    fn wait_for(&self, what: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if self.metrics().is_some_and(|m| m.contains(what)) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    fn signal(&self, signal: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), signal).unwrap();
    }

    fn stop(mut self) {
        self.signal(rustix::process::Signal::TERM);
        assert!(self.child.wait().unwrap().success());
    }
}

/// SIGHUP reloads the certificates of a running `weir` (and does not stop it); SIGTERM does.
#[test]
fn sighup_reloads_tls_certificates() {
    use rustix::process::Signal;
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "server");
    let weir = RunningWeir::start(
        dir.path(),
        &format!(
            "data_dir = {:?}\n[ops]\nlisten = \"{{ops}}\"\n[[listeners]]\nprotocol = \"mqtt\"\n\
             listen = \"127.0.0.1:0\"\n[listeners.tls]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\n",
            dir.path().join("data")
        ),
    );
    write_cert(dir.path(), "server");
    weir.signal(Signal::HUP);
    assert!(weir.wait_for("weir_tls_reloads_total{result=\"ok\"} 1"), "{:?}", weir.metrics());
    std::fs::write(dir.path().join("server.key"), "garbage").unwrap();
    weir.signal(Signal::HUP);
    assert!(weir.wait_for("weir_tls_reloads_total{result=\"error\"} 1"), "{:?}", weir.metrics());
    weir.stop();
}

/// SIGHUP re-reads the config file: a file that does not load changes nothing (counted as an
/// error, weir keeps running); a valid one applies what can change in place (here a rate) and
/// reports what needs a restart (here the fabric) as "partial".
#[test]
fn sighup_reloads_the_config_and_keeps_the_running_one_when_the_new_is_invalid() {
    use rustix::process::Signal;
    let dir = tempfile::tempdir().unwrap();
    let config = |rate: u32, linger: u32| {
        format!(
            "data_dir = {:?}\n[ops]\nlisten = \"{{ops}}\"\n[[listeners]]\nprotocol = \"mqtt\"\n\
             listen = \"127.0.0.1:0\"\nmax_messages_per_s = {rate}\n[fabric]\nlinger_ms = {linger}\n",
            dir.path().join("data")
        )
    };
    let weir = RunningWeir::start(dir.path(), &config(100, 5));
    let ops = format!("127.0.0.1:{}", weir.ops_port);
    std::fs::write(&weir.path, "[[listeners]]\nprotocol = \"mqtt\"\nmax_messages_per_s = \"fast\"\n")
        .unwrap();
    weir.signal(Signal::HUP);
    assert!(weir.wait_for("weir_config_reloads_total{result=\"error\"} 1"), "{:?}", weir.metrics());
    assert!(weir.wait_for("weir_sink_ready 1"), "weir stopped after an invalid config");

    std::fs::write(&weir.path, config(0, 5).replace("{ops}", &ops)).unwrap();
    weir.signal(Signal::HUP);
    assert!(weir.wait_for("weir_config_reloads_total{result=\"ok\"} 1"), "{:?}", weir.metrics());
    std::fs::write(&weir.path, config(0, 50).replace("{ops}", &ops)).unwrap();
    weir.signal(Signal::HUP);
    assert!(weir.wait_for("weir_config_reloads_total{result=\"partial\"} 1"), "{:?}", weir.metrics());
    weir.stop();
}
