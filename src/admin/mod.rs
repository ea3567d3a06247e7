//! The admin server: `/metrics`, `/healthz` (the process is alive), `/readyz` (every
//! part of readiness holds; `?verbose` lists each part and why it does not). Other
//! routers (the history API) are merged onto its port by the app. Depends on the metrics
//! registry and the shared handles only.

use std::future::Future;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::handles::Readiness;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The admin routes, with `extra` (e.g. the history API) merged in; a panic in any
/// handler is answered with a 500 and counted.
pub fn router(metrics: Metrics, readiness: Readiness, extra: Router) -> Router {
    let catch = crate::panics::catch_layer(metrics.clone(), "admin");
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { metrics, readiness })
        .merge(extra)
        .layer(catch)
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

#[derive(Deserialize)]
struct ReadyQuery {
    verbose: Option<String>,
}

/// The readiness report, in the style of the Kubernetes apiserver's `/readyz?verbose`:
/// one `[+]part ok` or `[-]part not ready: why` line per part. Pure.
pub fn report(parts: &[(&'static str, Option<String>)], ready: bool) -> String {
    let mut out = String::new();
    for (name, why) in parts {
        match why {
            None => out.push_str(&format!("[+]{name} ok\n")),
            Some(why) => out.push_str(&format!("[-]{name} not ready: {why}\n")),
        }
    }
    out.push_str(if ready { "ready\n" } else { "not ready\n" });
    out
}

async fn readyz(State(state): State<AdminState>, Query(query): Query<ReadyQuery>) -> impl IntoResponse {
    let ready = state.readiness.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // `?verbose` and `?verbose=1` alike, as the apiserver takes it.
    let verbose = query.verbose.is_some();
    let body = if verbose {
        report(&state.readiness.report(), ready)
    } else if ready {
        "ready\n".to_string()
    } else {
        "not ready\n".to_string()
    };
    (status, body)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verbose_report_names_each_part() {
        let parts = [
            (
                "caches",
                Some("waiting for the initial list of MailboxFilters".to_string()),
            ),
            ("shutdown", None),
        ];
        assert_eq!(
            report(&parts, false),
            "[-]caches not ready: waiting for the initial list of MailboxFilters\n[+]shutdown ok\nnot ready\n"
        );
    }
}
