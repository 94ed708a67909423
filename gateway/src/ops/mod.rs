//! The ops HTTP listener: `/` (the dashboard), `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`, `/api/stats` (every metric sample as JSON) and `/api/devices` (the source table);
//! over TLS when `[ops.tls]` says so.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::listener::tls::TlsServer;
use crate::listener::ws::percent_decode;
use crate::metrics::Metrics;
use crate::sources::{DeviceQuery, Filter, SortKey, Sources};

/// The dashboard: one self-contained page (no build step, no CDN), polling the JSON APIs.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the ops endpoints read.
#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    /// `None` when source tracking is off (`[sources] max_devices = 0`).
    pub sources: Option<Arc<Sources>>,
}

/// Serves ops requests until `shutdown` turns true. With `tls`, each connection's handshake runs
/// in its own task, under the handshake deadline.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    tls: Option<Arc<TlsServer>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "ops accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        let state = state.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(stream, state).await,
                Some(tls) => {
                    if let Some(handshaken) = tls.handshake(stream).await {
                        serve_connection(handshaken.stream, state).await;
                    }
                }
            }
        });
    }
    connections.shutdown().await;
}

async fn serve_connection<I>(io: I, state: OpsState)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(&request, &state)) }
    });
    if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%error, "ops connection ended with an error");
    }
}

fn route(request: &Request<Incoming>, state: &OpsState) -> Response<Full<Bytes>> {
    let metrics = &state.metrics;
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if metrics.sink_connected.get() != 1 {
                text(StatusCode::SERVICE_UNAVAILABLE, "sink not connected\n".into())
            } else if metrics.sink_ready.get() != 1 {
                text(StatusCode::SERVICE_UNAVAILABLE, "sink failing\n".into())
            } else {
                text(StatusCode::OK, "ready\n".into())
            }
        }
        "/" => with_type(StatusCode::OK, DASHBOARD.into(), "text/html; charset=utf-8"),
        "/api/stats" => json(StatusCode::OK, &stats(&metrics.encode())),
        "/api/devices" => match (&state.sources, device_query(request.uri().query().unwrap_or(""))) {
            (None, _) => {
                json_error(StatusCode::NOT_FOUND, "source tracking is off ([sources] max_devices = 0)")
            }
            (_, Err(error)) => json_error(StatusCode::BAD_REQUEST, &error),
            (Some(sources), Ok(query)) => {
                json(StatusCode::OK, &sources.query(&query, crate::listener::ingest::now_ms()))
            }
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string(value) {
        Ok(body) => with_type(status, body, "application/json"),
        Err(error) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

fn json_error(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    with_type(status, serde_json::json!({ "error": error }).to_string(), "application/json")
}

/// `/api/devices?offset=0&limit=100&sort=message_rate&order=desc&filter=gaps&device=pump`.
fn device_query(query: &str) -> Result<DeviceQuery, String> {
    let mut parsed = DeviceQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value =
            percent_decode(value).ok_or_else(|| format!("{name}: not valid percent-encoded UTF-8"))?;
        let number = |what: &str| {
            value.parse::<usize>().map_err(|_| format!("{what}: {value:?} is not a whole number"))
        };
        match name {
            "offset" => parsed.offset = number("offset")?,
            "limit" => parsed.limit = number("limit")?.min(DeviceQuery::MAX_LIMIT),
            "sort" => {
                parsed.sort = SortKey::parse(&value).ok_or_else(|| {
                    format!(
                    "sort: {value:?} is not one of device, last_seen, first_seen, messages, message_rate, \
                         byte_rate, gaps, duplicates, dead_letters, skew, schema_changes"
                )
                })?
            }
            "order" => {
                parsed.descending = match value.as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => return Err(format!("order: {value:?} is not asc or desc")),
                }
            }
            "filter" if value.is_empty() => parsed.filter = None,
            "filter" => {
                parsed.filter = Some(Filter::parse(&value).ok_or_else(|| {
                    format!(
                        "filter: {value:?} is not one of silent, gaps, schema_changed, skewed, dead_letters"
                    )
                })?)
            }
            "device" => parsed.device = Some(value).filter(|v| !v.is_empty()),
            other => {
                return Err(format!(
                    "unknown parameter {other:?} (offset, limit, sort, order, filter, device)"
                ))
            }
        }
    }
    Ok(parsed)
}

/// One metric sample of `/api/stats`.
#[derive(Debug, serde::Serialize, PartialEq)]
struct Sample {
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, serde::Serialize)]
struct Stats {
    ts_ms: i64,
    samples: Vec<Sample>,
}

/// Every sample of the text exposition as JSON (histogram buckets left out: their sums and
/// counts stay), for the dashboard to compute rates from.
fn stats(exposition: &str) -> Stats {
    let samples = exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(parse_sample)
        .filter(|s| !s.name.ends_with("_bucket") && !s.name.ends_with("_created"))
        .collect();
    Stats { ts_ms: crate::listener::ingest::now_ms(), samples }
}

/// `name{a="x",b="y"} 1.5` (label values as the exposition escapes them: `\"`, `\\`, `\n`).
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse::<f64>().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample { name: series.to_owned(), labels: Default::default(), value });
    };
    let mut labels = std::collections::BTreeMap::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (label, after) = rest.split_once("=\"")?;
        let mut text = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => text.push('\n'),
                    c => text.push(c),
                },
                (_, c) => text.push(c),
            }
        };
        labels.insert(label.trim_start_matches(',').to_owned(), text);
        rest = &after[end + 1..];
    }
    Some(Sample { name: name.to_owned(), labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_their_labels() {
        let text = "# HELP x y\nweir_records_decoded_total 12\n\
                    weir_connections_active{protocol=\"mqtt\"} 3\n\
                    weir_odd{a=\"q\\\"x\",b=\"\"} 1.5e0\n\
                    weir_batch_seconds_bucket{le=\"0.1\"} 4\n# EOF\n";
        let stats = stats(text);
        let names: Vec<&str> = stats.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["weir_records_decoded_total", "weir_connections_active", "weir_odd"]);
        assert_eq!(stats.samples[1].labels.get("protocol").map(String::as_str), Some("mqtt"));
        assert_eq!(stats.samples[2].labels.get("a").map(String::as_str), Some("q\"x"));
        assert_eq!(stats.samples[2].labels.get("b").map(String::as_str), Some(""));
        assert_eq!(stats.samples[2].value, 1.5);
    }

    #[test]
    fn device_queries_are_checked() {
        let q =
            device_query("offset=10&limit=5000&sort=gaps&order=desc&filter=silent&device=pump%2F1").unwrap();
        assert_eq!(
            (q.offset, q.limit, q.sort, q.descending),
            (10, DeviceQuery::MAX_LIMIT, SortKey::Gaps, true)
        );
        assert_eq!((q.filter, q.device.as_deref()), (Some(Filter::Silent), Some("pump/1")));
        for bad in ["limit=x", "sort=size", "order=up", "filter=noisy", "colour=red", "device=%zz"] {
            assert!(device_query(bad).is_err(), "{bad}");
        }
    }
}
