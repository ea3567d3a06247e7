//! Caught panics. A panic on the data path is a bug; it must fail the one request that
//! met it (with a clear answer), be counted, and leave the listener serving. Depends only
//! on `metrics`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::metrics::Metrics;

/// The message of a caught panic's payload.
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Counts a caught panic of `component` and logs it (never the input that caused it).
pub fn record(metrics: &Metrics, component: &'static str, payload: &(dyn std::any::Any + Send)) -> String {
    metrics.panics.with_label_values(&[component]).inc();
    let message = message(payload);
    tracing::error!(component, %message, "caught a panic; the request got an error and the listener goes on");
    message
}

/// A tower layer that answers a panicking HTTP handler with a JSON 500 and counts it.
pub fn catch_layer(
    metrics: Metrics,
    component: &'static str,
) -> tower_http::catch_panic::CatchPanicLayer<impl Fn(Box<dyn std::any::Any + Send>) -> Response + Clone> {
    tower_http::catch_panic::CatchPanicLayer::custom(move |payload: Box<dyn std::any::Any + Send>| {
        let message = record(&metrics, component, payload.as_ref());
        let body = serde_json::json!({
            "error": format!("internal error (a mailhook bug, counted in mailhook_panics_total; please report it): {message}; nothing was accepted"),
        });
        (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panicking handler gets a JSON 500, the panic is counted, and the same listener
    /// serves the next request.
    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_listener_goes_on() {
        let metrics = Metrics::new().expect("metrics");
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    let subject = "Grüße";
                    // Byte offset 3 is inside "ü": the bug class this guards against.
                    #[allow(clippy::string_slice)]
                    let cut = &subject[..3];
                    cut.to_string()
                }),
            )
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .layer(catch_layer(metrics.clone(), "ingest"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let boom = client.get(format!("http://{addr}/boom")).send().await.expect("answer");
        assert_eq!(boom.status().as_u16(), 500);
        let body: serde_json::Value = serde_json::from_str(&boom.text().await.expect("body")).expect("json");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("mailhook_panics_total") && e.contains("char boundary")),
            "{body}"
        );
        assert_eq!(metrics.panics.with_label_values(&["ingest"]).get(), 1);
        let ok = client.get(format!("http://{addr}/ok")).send().await.expect("answer");
        assert_eq!(ok.status().as_u16(), 200, "the listener still serves");
    }
}
