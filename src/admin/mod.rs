//! The admin server: `/metrics`, `/healthz` (the process is alive), `/readyz` (every
//! part of readiness holds; `?verbose` lists each part and why it does not). Other
//! routers (the history API) are merged onto its port by the app. With `--metrics-auth
//! kubernetes`, `/metrics` (which names every namespace's subscriptions) answers only a
//! bearer token whose user may `get` the non-resource URL `/metrics`, as Prometheus is
//! allowed to scrape the apiserver. Depends on the metrics registry, `auth` and the
//! shared handles only.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;

use crate::auth::kubernetes::{Access, Decision, KubernetesAccess};
use crate::handles::Readiness;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
    /// Who may scrape `/metrics`; None: anyone who reaches the port.
    scrapers: Option<std::sync::Arc<KubernetesAccess>>,
    /// Failed scrapes per client address: unknown tokens cost a TokenReview each.
    failures: std::sync::Arc<crate::auth::FailureLimit>,
}

/// The admin routes, with `extra` (e.g. the history API) merged in; a panic in any
/// handler is answered with a 500 and counted.
pub fn router(
    metrics: Metrics,
    readiness: Readiness,
    scrapers: Option<std::sync::Arc<KubernetesAccess>>,
    extra: Router,
) -> Router {
    let catch = crate::panics::catch_layer(metrics.clone(), "admin");
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState {
            metrics,
            readiness,
            scrapers,
            failures: std::sync::Arc::default(),
        })
        .merge(extra)
        .layer(catch)
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

async fn metrics_handler(
    State(state): State<AdminState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(scrapers) = &state.scrapers {
        let now = std::time::Instant::now();
        let token = crate::auth::bearer(&headers).filter(|t| !t.is_empty());
        // Without a token nothing is asked of the apiserver: not counted, never locked.
        if token.is_some()
            && let Some(left) = state.failures.locked(peer.ip(), now)
        {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, left.as_secs().max(1).to_string())],
                "too many failed authentications from this address\n",
            )
                .into_response();
        }
        let decision = match token {
            None => Ok(Decision::Unauthenticated),
            Some(token) => scrapers.decide(token, Access::Path("/metrics")).await,
        };
        match decision {
            Ok(Decision::Allowed) => {}
            Ok(Decision::Unauthenticated) => {
                if token.is_some() {
                    state.failures.failed(peer.ip(), now);
                }
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "/metrics needs Authorization: Bearer <a Kubernetes token allowed to get the non-resource URL /metrics> (--metrics-auth kubernetes)\n",
                )
                    .into_response();
            }
            Ok(Decision::Denied(why)) => return (StatusCode::FORBIDDEN, format!("{why}\n")).into_response(),
            Err(err) => {
                tracing::warn!(err = %crate::error_chain(&err), "cannot judge a /metrics token");
                return (StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n")).into_response();
            }
        }
    }
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
