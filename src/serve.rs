//! Serves an axum `Router` on a TCP listener within bounds a client cannot get around:
//! at most `max_connections` at once and `max_per_address` from one client address (more
//! are closed at accept, before anything is read: one flooding address leaves room for
//! the others),
//! a request's headers within `header_timeout` (also how long a kept-alive connection may
//! sit idle), and on shutdown the requests in flight finish before `serve` returns.
//! `axum::serve` has no connection cap and no header timeout, which lets slow clients hold
//! sockets and memory for ever. Uses nothing else of the crate.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// How long writing an answer may make no progress, on every listener served here.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_per_address: usize,
    /// From a connection's start (or its previous response) to a request's complete headers.
    pub header_timeout: Duration,
    /// How long writing an answer may make no progress: a client that stops reading loses
    /// the connection instead of holding it.
    pub write_timeout: Duration,
}

/// Serves `app` until `stop`; `ConnectInfo<SocketAddr>` is available to handlers as with
/// `into_make_service_with_connect_info`. `name` labels the log lines and `refused`
/// (`[name, reason]`) the connections closed at accept.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    stop: CancellationToken,
    refused: prometheus::IntCounterVec,
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refused.with_label_values(&[name, "connections"]).inc();
            debug!(%peer, listener = name, "too many connections; closed at accept");
            drop(stream);
            continue;
        };
        let Some(address) = per_address.take(peer.ip(), bounds.max_per_address) else {
            refused.with_label_values(&[name, "connections_per_address"]).inc();
            debug!(%peer, listener = name, "too many connections from this address; closed at accept");
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
            let io = WriteDeadline::new(stream, bounds.write_timeout);
            let connection = builder.serve_connection(TokioIo::new(io), service);
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

/// A connection whose writes may not stall longer than `limit`.
struct WriteDeadline<T> {
    io: T,
    limit: Duration,
    /// Since when a write has been waiting, as a timer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(io: T, limit: Duration) -> WriteDeadline<T> {
        WriteDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    /// After the inner write answered `Pending`: pending still, or an error once the
    /// stall has lasted `limit`.
    fn stall(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its answer",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => this.stall(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(r) => {
                this.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => this.stall(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.stall(cx).map(Err),
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_limit() {
        use tokio::io::AsyncWriteExt as _;
        // A peer that never reads: the pipe fills and writes wait.
        let (near, _far) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(near, Duration::from_secs(30));
        let err = io.write_all(&[0; 4096]).await.expect_err("a stalled write must end");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

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
