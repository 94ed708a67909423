//! Device authentication and publish ACLs on a whole gateway, with a raw MQTT client on weir's
//! codec (3.1.1 and 5) for exact return and reason codes: password files (also written by the
//! real `weir passwd add`), JWTs (HS256, ES256; bad signature, expired, not yet valid, closed at
//! expiry), identities with wildcards, another device's topic, and the failed-login limit per
//! source address.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::auth::jwt::unix_now;
use weir_protocols::mqtt::{
    Connect, ConnectReturnCode, Packet, Properties, ProtocolVersion, PublishV5, QoS, ReasonCode,
};

const PROMPTLY: Duration = Duration::from_secs(5);
const SECRET: &str = "0123456789abcdef0123456789abcdef";
const OWN_TOPIC_RULE: &str = "acl = [{ publish = \"devices/{device_id}/#\" }, { publish = \"shared/+\" }]\n";

/// Sends CONNECT and returns the CONNACK's code (3.1.1 return code or MQTT 5 reason code).
async fn login(
    client: &mut RawClient,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> u8 {
    let v5 = client.version().is_v5();
    let connect = Connect {
        protocol_level: if v5 { 5 } else { 4 },
        clean_session: true,
        keep_alive_secs: 60,
        client_id: client_id.into(),
        will: None,
        username: username.map(str::to_owned),
        password: password.map(|p| p.as_bytes().to_vec().into()),
    };
    let packet = Packet::connect(connect);
    client.send(&packet).await;
    match client.recv_within(PROMPTLY).await.expect("an answer in time") {
        Some(Packet::ConnAck(ack)) => ack.code as u8,
        Some(Packet::ConnAckV5(ack)) => ack.reason as u8,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Sends a PUBLISH of the client's protocol version.
async fn publish_as(client: &mut RawClient, qos: QoS, pkid: u16, topic: &str, payload: String) {
    let packet = match publish(qos, pkid, topic, payload) {
        Packet::Publish(publish) if client.version().is_v5() => {
            Packet::PublishV5(PublishV5 { publish, properties: Properties::default() })
        }
        packet => packet,
    };
    client.send(&packet).await;
}

/// The reason code of the next MQTT 5 PUBACK, which must be for `pkid`.
async fn puback_v5(client: &mut RawClient, pkid: u16) -> ReasonCode {
    match client.recv_within(PROMPTLY).await.expect("an answer in time") {
        Some(Packet::PubAckV5(ack)) if ack.pkid == pkid => ack.reason,
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;
const BAD_CREDENTIALS_V3: u8 = ConnectReturnCode::BadUsernameOrPassword as u8;
const NOT_AUTHORIZED_V3: u8 = ConnectReturnCode::NotAuthorized as u8;

/// A gateway with one MQTT listener on 127.0.0.1:0 with `auth` (the body of
/// `[listeners.auth]`) and `acl`.
async fn gateway(auth: &str, acl: &str) -> TestGateway {
    TestGateway::start(&format!(
        "[[listeners]]\nprotocol = \"mqtt\"\nlisten = \"127.0.0.1:0\"\n{acl}[listeners.auth]\n{auth}"
    ))
    .await
}

async fn password_gateway(users: &[(&str, &str)], extra: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    for (user, password) in users {
        weir::auth::password::add_user(&file, user, password.as_bytes()).unwrap();
    }
    let auth = format!("kind = \"password_file\"\npassword_file = {:?}\n{extra}", file.display().to_string());
    let gw = gateway(&auth, OWN_TOPIC_RULE).await;
    // The file was read at startup.
    drop(dir);
    gw
}

fn jwt_auth(algorithm: &str, key_file: &Path, leeway_s: u64) -> String {
    format!(
        "kind = \"jwt\"\njwt = {{ algorithm = \"{algorithm}\", key_file = {:?}, leeway_s = {leeway_s} }}\n",
        key_file.display().to_string()
    )
}

fn hs256(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn failures(gw: &TestGateway, reason: &str) -> u64 {
    let text = gw.gateway.metrics().encode();
    let needle = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("weir_auth_failures_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn password_logins_succeed_only_with_the_right_password() {
    let gw = password_gateway(&[("dev-1", "s3cret"), ("dev-2", "other")], "").await;
    let addr = gw.mqtt_addr();

    let mut ok = RawClient::open_as(addr, V311).await;
    assert_eq!(login(&mut ok, "dev-1", Some("dev-1"), Some("s3cret")).await, 0);
    publish_as(&mut ok, QoS::AtLeastOnce, 1, "devices/dev-1/t", reading("dev-1", 1)).await;
    assert!(matches!(ok.recv_within(PROMPTLY).await.expect("an answer in time"), Some(Packet::PubAck(1))));

    for (user, password, code) in [
        (Some("dev-1"), Some("wrong"), BAD_CREDENTIALS_V3),
        (Some("nobody"), Some("s3cret"), BAD_CREDENTIALS_V3),
        (None, None, BAD_CREDENTIALS_V3),
        (Some("dev-1"), None, BAD_CREDENTIALS_V3),
    ] {
        let mut client = RawClient::open_as(addr, V311).await;
        assert_eq!(login(&mut client, "dev-1", user, password).await, code, "{user:?} {password:?}");
        assert!(client.packets_until_closed(PROMPTLY).await.is_some(), "closed after the refusal");
    }
    // Right password, but the client id names another device.
    let mut client = RawClient::open_as(addr, V311).await;
    assert_eq!(login(&mut client, "dev-2", Some("dev-1"), Some("s3cret")).await, NOT_AUTHORIZED_V3);

    // MQTT 5 codes.
    let mut v5 = RawClient::open_as(addr, V5).await;
    assert_eq!(
        login(&mut v5, "dev-2", Some("dev-2"), Some("nope")).await,
        ReasonCode::BadUserNameOrPassword as u8
    );
    let mut v5 = RawClient::open_as(addr, V5).await;
    assert_eq!(login(&mut v5, "dev-2", Some("dev-2"), Some("other")).await, 0);

    assert_eq!(failures(&gw, "wrong_password"), 2);
    assert_eq!(failures(&gw, "unknown_user"), 1);
    assert_eq!(failures(&gw, "missing_credentials"), 2);
    assert_eq!(failures(&gw, "client_id_mismatch"), 1);
    assert_eq!(gw.metric("weir_auth_successes_total"), 3);
    assert!(eventually(PROMPTLY, || rows(&gw.db_path()) == [("dev-1".to_owned(), 1)]).await);
}

#[tokio::test]
async fn a_user_added_with_weir_passwd_logs_in() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    let add = |user: &str, password: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["passwd", "add", "--file", file.to_str().unwrap(), user, "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let added = add("sensor-7", "correct horse");
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let refused = add("#", "x");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wildcard"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("sensor-7:$argon2id$") && !text.contains("correct horse"), "{text}");

    let auth = format!("kind = \"password_file\"\npassword_file = {:?}\n", file.display().to_string());
    let gw = gateway(&auth, OWN_TOPIC_RULE).await;
    let mut client = RawClient::open_as(gw.mqtt_addr(), V311).await;
    assert_eq!(login(&mut client, "sensor-7", Some("sensor-7"), Some("correct horse")).await, 0);
}

#[tokio::test]
async fn jwt_hs256_signature_expiry_and_not_before_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, format!("{SECRET}\n")).unwrap();
    let gw = gateway(&jwt_auth("HS256", &key, 0), OWN_TOPIC_RULE).await;
    let addr = gw.mqtt_addr();
    let now = unix_now();

    let valid = hs256(json!({"sub": "dev-1", "exp": now + 300}), SECRET);
    let mut client = RawClient::open_as(addr, V5).await;
    assert_eq!(login(&mut client, "dev-1", None, Some(&valid)).await, 0, "no user name needed");
    publish_as(&mut client, QoS::AtLeastOnce, 1, "devices/dev-1/t", reading("dev-1", 1)).await;
    assert_eq!(puback_v5(&mut client, 1).await, ReasonCode::Success);
    let mut client = RawClient::open_as(addr, V311).await;
    assert_eq!(login(&mut client, "dev-1", Some("dev-1"), Some(&valid)).await, 0, "or the token's device");

    let bad = ReasonCode::BadUserNameOrPassword as u8;
    for (token, reason) in [
        (
            hs256(json!({"sub": "dev-1", "exp": now + 300}), "another secret of thirty-two bytes"),
            "bad_signature",
        ),
        (hs256(json!({"sub": "dev-1", "exp": now - 60}), SECRET), "token_expired"),
        (hs256(json!({"sub": "dev-1", "exp": now + 300, "nbf": now + 120}), SECRET), "token_not_yet_valid"),
        (hs256(json!({"sub": "dev-1"}), SECRET), "missing_claim"),
        ("garbage".to_owned(), "invalid_token"),
    ] {
        let mut client = RawClient::open_as(addr, V5).await;
        assert_eq!(login(&mut client, "dev-1", None, Some(&token)).await, bad, "{reason}");
        assert_eq!(failures(&gw, reason), 1, "{reason}");
    }
    // A valid token, another device's user name.
    let mut client = RawClient::open_as(addr, V5).await;
    assert_eq!(
        login(&mut client, "dev-1", Some("dev-2"), Some(&valid)).await,
        ReasonCode::NotAuthorized as u8
    );
}

#[tokio::test]
async fn jwt_es256_with_a_key_made_here() {
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = dir.path().join("jwt.pub.pem");
    std::fs::write(&key, pair.public_key_pem()).unwrap();
    let gw = gateway(&jwt_auth("ES256", &key, 5), OWN_TOPIC_RULE).await;
    let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let token = |sub: &str| {
        let claims = json!({"sub": sub, "exp": unix_now() + 300});
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &signing).unwrap()
    };
    let mut client = RawClient::open_as(gw.mqtt_addr(), V5).await;
    assert_eq!(login(&mut client, "dev-es", None, Some(&token("dev-es"))).await, 0);
    // An HS256 token made with the public key as its secret (algorithm confusion) is refused.
    let confused = hs256(json!({"sub": "dev-es", "exp": unix_now() + 300}), &pair.public_key_pem());
    let mut client = RawClient::open_as(gw.mqtt_addr(), V5).await;
    assert_eq!(
        login(&mut client, "dev-es", None, Some(&confused)).await,
        ReasonCode::BadUserNameOrPassword as u8
    );
}

#[tokio::test]
async fn a_token_connection_is_closed_when_the_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, SECRET).unwrap();
    let gw = gateway(&jwt_auth("HS256", &key, 0), OWN_TOPIC_RULE).await;
    let exp = unix_now() + 2;
    let token = hs256(json!({"sub": "dev-1", "exp": exp}), SECRET);
    let mut v5 = RawClient::open_as(gw.mqtt_addr(), V5).await;
    assert_eq!(login(&mut v5, "dev-1", None, Some(&token)).await, 0);
    // MQTT 3.1.1 sends no password without a user name.
    let token = hs256(json!({"sub": "dev-2", "exp": exp}), SECRET);
    let mut v3 = RawClient::open_as(gw.mqtt_addr(), V311).await;
    assert_eq!(login(&mut v3, "dev-2", Some("dev-2"), Some(&token)).await, 0);
    // Still open just before, closed just after (MQTT 5: DISCONNECT 0xA0, maximum connect time).
    let packets = v5.packets_until_closed(Duration::from_secs(6)).await.expect("closed at expiry");
    assert!(unix_now() >= exp, "closed before the token expired");
    assert!(
        matches!(&packets[..], [Packet::DisconnectV5(d)] if d.reason == ReasonCode::MaximumConnectTime),
        "{packets:?}"
    );
    assert_eq!(v3.packets_until_closed(PROMPTLY).await, Some(vec![]));
    let closed = gw.gateway.metrics().encode();
    assert!(closed.contains("reason=\"credentials_expired\"} 2"), "{closed}");
}

#[tokio::test]
async fn a_device_cannot_publish_to_another_devices_topic() {
    let gw = password_gateway(&[("dev-1", "pw1")], "").await;
    let addr = gw.mqtt_addr();

    // MQTT 5, QoS 1: 0x87 for the other device's topic, and the connection goes on.
    let mut v5 = RawClient::open_as(addr, V5).await;
    assert_eq!(login(&mut v5, "dev-1", Some("dev-1"), Some("pw1")).await, 0);
    publish_as(&mut v5, QoS::AtLeastOnce, 1, "devices/dev-2/t", reading("dev-1", 1)).await;
    assert_eq!(puback_v5(&mut v5, 1).await, ReasonCode::NotAuthorized);
    publish_as(&mut v5, QoS::AtLeastOnce, 2, "devices/dev-1/t", reading("dev-1", 2)).await;
    assert_eq!(puback_v5(&mut v5, 2).await, ReasonCode::Success);
    publish_as(&mut v5, QoS::AtLeastOnce, 3, "shared/announce", reading("dev-1", 3)).await;
    assert_eq!(puback_v5(&mut v5, 3).await, ReasonCode::Success);
    // Its own topic, but the reading names another device.
    publish_as(&mut v5, QoS::AtLeastOnce, 4, "devices/dev-1/t", reading("dev-2", 4)).await;
    assert_eq!(puback_v5(&mut v5, 4).await, ReasonCode::NotAuthorized);
    // Wildcards in a topic name are no way around it.
    publish_as(&mut v5, QoS::AtLeastOnce, 5, "devices/+/t", reading("dev-1", 5)).await;
    let answer = v5.recv_within(PROMPTLY).await.expect("an answer in time");
    assert!(
        matches!(&answer, Some(Packet::PubAckV5(a)) if a.reason == ReasonCode::NotAuthorized)
            || matches!(&answer, Some(Packet::DisconnectV5(_))),
        "{answer:?}"
    );

    // MQTT 5, QoS 0: nothing to answer with, so DISCONNECT 0x87.
    let mut v5 = RawClient::open_as(addr, V5).await;
    assert_eq!(login(&mut v5, "dev-1", Some("dev-1"), Some("pw1")).await, 0);
    publish_as(&mut v5, QoS::AtMostOnce, 0, "devices/dev-2/t", reading("dev-1", 6)).await;
    let packets = v5.packets_until_closed(PROMPTLY).await.expect("closed");
    assert!(
        matches!(&packets[..], [Packet::DisconnectV5(d)] if d.reason == ReasonCode::NotAuthorized),
        "{packets:?}"
    );

    // MQTT 3.1.1 has no error ack: the connection is closed, the message not acked.
    let mut v3 = RawClient::open_as(addr, V311).await;
    assert_eq!(login(&mut v3, "dev-1", Some("dev-1"), Some("pw1")).await, 0);
    publish_as(&mut v3, QoS::AtLeastOnce, 7, "devices/dev-2/t", reading("dev-1", 7)).await;
    assert_eq!(v3.packets_until_closed(PROMPTLY).await, Some(vec![]));

    assert!(eventually(PROMPTLY, || rows(&gw.db_path()).len() == 2).await);
    assert_eq!(rows(&gw.db_path()), [("dev-1".to_owned(), 2), ("dev-1".to_owned(), 3)]);
    assert!(gw.metric("weir_acl_denied_total") >= 4);
}

/// Regression for the classic template hole: a device named `#` or `+` must not reach other
/// devices' topics through `devices/{username}/#`. Such identities are refused at login (token
/// claim, user name), and the templates compare them as text (unit tests in auth::acl).
#[tokio::test]
async fn wildcard_identities_cannot_reach_other_topics_through_templates() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, SECRET).unwrap();
    let acl = "acl = [{ publish = \"devices/{username}/#\" }, { publish = \"by-client/{client_id}\" }]\n";
    let gw = gateway(&jwt_auth("HS256", &key, 0), acl).await;
    for identity in ["#", "+", "a/#", "dev-1/+", "x\u{0}y"] {
        let token = hs256(json!({"sub": identity, "exp": unix_now() + 300}), SECRET);
        let mut client = RawClient::open_as(gw.mqtt_addr(), V5).await;
        let code = login(&mut client, "dev-1", None, Some(&token)).await;
        assert_eq!(code, ReasonCode::NotAuthorized as u8, "{identity:?}");
    }
    assert_eq!(failures(&gw, "invalid_identity"), 5);
    // A user name of `#` next to a valid token changes nothing either.
    let token = hs256(json!({"sub": "dev-1", "exp": unix_now() + 300}), SECRET);
    let mut client = RawClient::open_as(gw.mqtt_addr(), V5).await;
    assert_eq!(login(&mut client, "dev-1", Some("#"), Some(&token)).await, ReasonCode::NotAuthorized as u8);

    // The password file refuses such users outright, and `#` is nobody there.
    let pw = password_gateway(&[("dev-1", "pw")], "").await;
    for user in ["#", "+"] {
        let mut client = RawClient::open_as(pw.mqtt_addr(), V311).await;
        assert_eq!(login(&mut client, "x", Some(user), Some("pw")).await, BAD_CREDENTIALS_V3, "{user}");
    }
    let err = weir::auth::password::PasswordFile::parse(
        "#x:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n+:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n",
        "users.txt",
    );
    assert!(err.unwrap_err().to_string().contains("wildcard"));
}

#[tokio::test]
async fn repeated_failures_from_one_address_are_rate_limited() {
    let gw = password_gateway(&[("dev-1", "pw1")], "max_failures = 3\nfailures_per_minute = 1\n").await;
    let addr = gw.mqtt_addr();
    for _ in 0..3 {
        let mut client = RawClient::open_from(addr, V5, "127.0.0.1").await;
        let code = login(&mut client, "dev-1", Some("dev-1"), Some("guess")).await;
        assert_eq!(code, ReasonCode::BadUserNameOrPassword as u8);
    }
    // Over the limit: refused at once, the right password included, without a check.
    let started = std::time::Instant::now();
    for password in ["guess", "pw1"] {
        let mut client = RawClient::open_from(addr, V5, "127.0.0.1").await;
        let code = login(&mut client, "dev-1", Some("dev-1"), Some(password)).await;
        assert_eq!(code, ReasonCode::QuotaExceeded as u8, "{password}");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(gw.metric("weir_auth_rate_limited_total"), 2);
    assert_eq!(failures(&gw, "wrong_password"), 3, "refused attempts are not checked");
    // Another address still logs in.
    let mut client = RawClient::open_from(addr, V5, "127.0.0.2").await;
    assert_eq!(login(&mut client, "dev-1", Some("dev-1"), Some("pw1")).await, 0);
    // 3.1.1 is told "server unavailable".
    let mut client = RawClient::open_from(addr, V311, "127.0.0.1").await;
    let code = login(&mut client, "dev-1", Some("dev-1"), Some("pw1")).await;
    assert_eq!(code, ConnectReturnCode::ServerUnavailable as u8);
}

/// `POST /ingest` with an `Authorization` header, answered with the HTTP status weir gives.
async fn post(addr: SocketAddr, path: &str, authorization: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let authorization = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: weir\r\nContent-Type: application/json\r\n{authorization}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PROMPTLY, stream.read_to_end(&mut response)).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn websocket_and_http_ingest_authenticate_with_the_authorization_header() {
    use base64::Engine;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    weir::auth::password::add_user(&file, "dev-1", b"pw1").unwrap();
    let gw = TestGateway::start(&format!(
        "[[listeners]]\nprotocol = \"ws\"\nlisten = \"127.0.0.1:0\"\n[listeners.auth]\nkind = \"password_file\"\npassword_file = {:?}\n",
        file.display().to_string()
    ))
    .await;
    let addr = gw.mqtt_addr();
    let basic = |user: &str, password: &str| {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
    };
    let own = r#"{"seq":1,"metrics":{"t":1}}"#;

    let (status, text) = post(addr, "/ingest", Some(&basic("dev-1", "pw1")), own).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = post(addr, "/ingest", Some(&basic("dev-1", "nope")), own).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("WWW-Authenticate: Basic") || text.contains("www-authenticate: Basic"), "{text}");
    let (status, _) = post(addr, "/ingest", None, own).await;
    assert_eq!(status, 401);
    // Another device in the URL, or in the reading.
    let (status, text) = post(addr, "/ingest?device=dev-2", Some(&basic("dev-1", "pw1")), own).await;
    assert_eq!(status, 403, "{text}");
    let theirs = r#"{"device_id":"dev-2","seq":2,"metrics":{"t":1}}"#;
    let (status, text) = post(addr, "/ingest", Some(&basic("dev-1", "pw1")), theirs).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("not_authorized"), "{text}");

    // A WebSocket: refused without credentials, served with them.
    let url = format!("ws://{addr}/ingest");
    assert!(tokio_tungstenite::connect_async(url.as_str()).await.is_err());
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("authorization", basic("dev-1", "pw1").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::Text(r#"{"seq":3,"metrics":{"t":1}}"#.into())).await.unwrap();
    ws.send(Message::Text(r#"{"device_id":"dev-2","seq":4,"metrics":{"t":1}}"#.into())).await.unwrap();
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        match tokio::time::timeout(PROMPTLY, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
                statuses.push(reply["error"].as_str().unwrap_or("ok").to_owned());
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(statuses, ["ok", "not_authorized"]);
    assert!(
        eventually(PROMPTLY, || rows(&gw.db_path()) == [("dev-1".to_owned(), 1), ("dev-1".to_owned(), 3)])
            .await
    );
    assert_eq!(gw.metric("weir_acl_denied_total"), 2);
}

#[tokio::test]
async fn the_password_file_is_reread_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    weir::auth::password::add_user(&file, "dev-1", b"pw1").unwrap();
    let auth = format!("kind = \"password_file\"\npassword_file = {:?}\n", file.display().to_string());
    let gw = gateway(&auth, OWN_TOPIC_RULE).await;
    let login_as = |user: &'static str, password: &'static str| {
        let addr = gw.mqtt_addr();
        async move { login(&mut RawClient::open_as(addr, V311).await, user, Some(user), Some(password)).await }
    };
    assert_eq!(login_as("dev-2", "pw2").await, BAD_CREDENTIALS_V3);
    weir::auth::password::add_user(&file, "dev-2", b"pw2").unwrap();
    assert_eq!(gw.gateway.reload_auth(), (1, 0));
    assert_eq!(login_as("dev-2", "pw2").await, 0);
    // A broken file keeps the users loaded before.
    std::fs::write(&file, "garbage\n").unwrap();
    assert_eq!(gw.gateway.reload_auth(), (0, 1));
    assert_eq!(login_as("dev-1", "pw1").await, 0);
    assert_eq!(gw.metric("weir_auth_reloads_total"), 2);
}
