//! The admin server: `/metrics`, `/healthz` (the process is alive), `/readyz` (the
//! operator has started its parts and can do its job), and with a token file the
//! authenticated history API under `/v1/` that the `mailhook` subcommands call.

pub mod client;
pub mod history;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::archive::RawLinks;
use crate::metrics::Metrics;
use crate::store::Store;

/// Whether the operator is ready to serve; shared by the parts that decide it.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

pub fn router(
    metrics: Metrics,
    readiness: Readiness,
    history: history::History,
    raw_links: Option<Arc<RawLinks>>,
    store: Arc<dyn Store>,
) -> Router {
    let catch = crate::panics::catch_layer(metrics.clone(), "admin");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { metrics, readiness })
        .merge(history::router(history));
    let app = match raw_links {
        Some(links) => app.merge(crate::archive::router(links, store)),
        None => app,
    };
    app.layer(catch)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_handler(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.ready.set(i64::from(state.readiness.is_ready()));
    match state.metrics.render() {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            body,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}
