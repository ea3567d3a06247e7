//! Serves an axum `Router` on a TCP listener within bounds a client cannot get around:
//! at most `max_connections` at once and `max_per_address` from one client address (more
//! are closed at accept, before anything is read: one flooding address leaves room for
//! the others),
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
    /// Connections open at once from one client address.
    pub max_per_address: usize,
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
    let per_address = Arc::new(PerAddress::default());
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
        let (Ok(permit), Some(address)) = (
            slots.clone().try_acquire_owned(),
            per_address.take(peer.ip(), bounds.max_per_address),
        ) else {
            over_capacity.inc();
            debug!(%peer, listener = name, "too many connections; closed at accept");
            drop(stream);
            continue;
        };
        let (app, stop) = (app.clone(), stop.clone());
        connections.spawn(async move {
            let _permit = (permit, address);
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

/// Connections per client address, counted while they are open.
#[derive(Default)]
pub struct PerAddress {
    open: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in [`PerAddress`], given back when dropped.
pub struct AddressSlot {
    of: Arc<PerAddress>,
    peer: std::net::IpAddr,
}

impl PerAddress {
    /// A place for one more connection of `peer`, if it has fewer than `max` open.
    pub fn take(self: &Arc<Self>, peer: std::net::IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.open.lock();
        let n = open.entry(peer).or_insert(0);
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(AddressSlot { of: self.clone(), peer })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.of.open.lock();
        if let Some(n) = open.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_at_its_limit_leaves_room_for_others_and_gets_it_back() {
        let per = Arc::new(PerAddress::default());
        let (a, b) = (
            std::net::IpAddr::from([10, 0, 0, 1]),
            std::net::IpAddr::from([10, 0, 0, 2]),
        );
        let held: Vec<_> = (0..3).map(|_| per.take(a, 3).expect("under the limit")).collect();
        assert!(per.take(a, 3).is_none());
        assert!(per.take(b, 3).is_some());
        drop(held);
        let again = per.take(a, 3);
        assert!(again.is_some());
        assert!(
            per.open.lock().get(&a).is_some_and(|n| *n == 1),
            "the dropped ones were given back"
        );
        drop(again);
        assert!(
            per.open.lock().is_empty(),
            "no entry kept for an address without connections"
        );
    }
}
