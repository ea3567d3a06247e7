//! Serves an axum `Router` on a TCP listener within bounds a client cannot get around:
//! at most `max_connections` at once (more are closed at accept, before anything is read),
//! a request's headers within `header_timeout` (also how long a kept-alive connection may
//! sit idle), and on shutdown the requests in flight finish before `serve` returns.
//! `axum::serve` has no connection cap and no header timeout, which lets slow clients hold
//! sockets and memory for ever. Uses nothing else of the crate.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// From a connection's start (or its previous response) to a request's complete headers.
    pub header_timeout: Duration,
}

/// Serves `app` until `stop`; `ConnectInfo<SocketAddr>` is available to handlers as with
/// `into_make_service_with_connect_info`. `name` labels the log lines; `over_capacity`
/// counts connections closed at accept.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    stop: CancellationToken,
    over_capacity: prometheus::IntCounter,
    name: &'static str,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    warn!(%err, listener = name, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            over_capacity.inc();
            debug!(%peer, listener = name, "too many connections; closed at accept");
            drop(stream);
            continue;
        };
        let (app, stop) = (app.clone(), stop.clone());
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(request.map(axum::body::Body::new))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_timeout)
                .keep_alive(true);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                debug!(%err, %peer, listener = name, "connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}
