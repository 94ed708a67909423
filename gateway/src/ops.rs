//! The ops HTTP listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`; over TLS when
//! `[ops.tls]` says so.

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
use crate::metrics::Metrics;

/// Serves ops requests until `shutdown` turns true. With `tls`, each connection's handshake runs
/// in its own task, under the handshake deadline.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
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
        let metrics = Arc::clone(&metrics);
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(stream, metrics).await,
                Some(tls) => {
                    if let Some(handshaken) = tls.handshake(stream).await {
                        serve_connection(handshaken.stream, metrics).await;
                    }
                }
            }
        });
    }
    connections.shutdown().await;
}

async fn serve_connection<I>(io: I, metrics: Arc<Metrics>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let metrics = Arc::clone(&metrics);
        async move { Ok::<_, Infallible>(route(&request, &metrics)) }
    });
    if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%error, "ops connection ended with an error");
    }
}

fn route(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
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
        "/" => text(StatusCode::OK, "weir ops: /metrics /healthz /readyz\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
