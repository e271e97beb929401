//! The HTTP listener: HTTP/1.1 connections served by hyper, with the
//! limits a port facing the network needs before a request exists.
//!
//! - A request's header must be complete within `[http]
//!   header_read_timeout_secs` of the connection waiting for it: a client
//!   that sends half a header (or nothing) is cut off, and so is an idle
//!   keep-alive connection, whose wait for its next request is the same
//!   wait.
//! - At most `[http] max_connections` connections are open at once; one
//!   over the cap is closed as soon as it is accepted (and counted), so a
//!   flood of slow clients cannot take the port from `/readyz` and
//!   `/metrics` for longer than the timeout.
//!
//! Requests themselves are bounded by the router's layers (time, body,
//! concurrency).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::HttpSettings;
use crate::metrics;

/// How long open connections may take to finish once `stop` is cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `stop`, then lets open requests
/// finish (for a few seconds). A connection's failure ends that
/// connection; a failure to accept is logged and accepting retried.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &HttpSettings,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout())
        .keep_alive(true);
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait a moment, not a spin.
                warn!(error = %err, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "HTTP connection refused: [http] max_connections are open");
            metrics::http_connection_refused();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%peer, error = %err, "HTTP connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("HTTP connections still open at shutdown were closed");
    }
}
