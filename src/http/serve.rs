//! Serving connections: hyper's HTTP/1 with a timer, so a client that does not send
//! its headers within `--client-timeout-ms` (or nothing at all) is disconnected (axum's own
//! `serve` cannot set that),
//! `TCP_NODELAY` on every connection, and graceful shutdown: stop accepting, mark the server not
//! ready, let in-flight requests finish for up to the grace period.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use super::{AppState, metrics_router, router};

/// Serves `app` on `listener` until `shutdown` resolves, then waits up to `grace` (if given)
/// for the open connections' requests.
async fn serve_app(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    on_shutdown: impl FnOnce(),
    grace: Option<Duration>,
) {
    // HTTP/1 only: HTTP/2's connection preface is read before any header timeout applies, so a
    // client could hold a connection by sending part of it (deployments put TLS and HTTP/2 in
    // front, at the ingress).
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    // Connections that have not sent a byte yet are dropped at once on shutdown.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Without TCP_NODELAY, a streamed event that follows an earlier response on a keep-alive
        // connection waits ~40 ms for the client's delayed ACK (Nagle).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // A client that sends nothing at all is closed after the header timeout, or at once
            // when the server stops.
            let mut first = [0u8; 1];
            tokio::select! {
                peeked = tokio::time::timeout(header_timeout, tcp.peek(&mut first)) => match peeked {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
                _ = stop.wait_for(|s| *s) => return,
            }
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    on_shutdown();
    match grace {
        Some(grace) => {
            if tokio::time::timeout(grace, graceful.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(
                    ?grace,
                    "shutdown timeout reached with requests still in flight"
                );
            }
        }
        None => drop(graceful),
    }
}

/// Serves the API on `listener` (and `/metrics` on `metrics`, if given) until `shutdown`
/// resolves; then stops accepting, marks the server not ready, and lets in-flight requests
/// finish for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(state.clone()).map_err(std::io::Error::other)?;
    let header_timeout = state.config.client_timeout;
    // Metrics stay scrapeable while requests drain; the task ends with this function.
    let metrics_server = metrics.map(|l| {
        let forever = std::future::pending::<()>();
        tokio::spawn(serve_app(
            l,
            metrics_router(),
            header_timeout,
            forever,
            || {},
            None,
        ))
    });
    let flag = state.clone();
    serve_app(
        listener,
        app,
        header_timeout,
        shutdown,
        move || {
            flag.shutting_down.store(true, Ordering::SeqCst);
            tracing::info!("shutdown requested: refusing new requests, finishing in-flight ones");
        },
        Some(grace),
    )
    .await;
    if let Some(m) = metrics_server {
        m.abort();
    }
    Ok(())
}
