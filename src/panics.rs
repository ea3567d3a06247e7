//! Caught panics. A panic on the data path is a bug; it must fail the one request that
//! met it (with a clear answer), be counted, and leave the listener serving. Depends only
//! on `metrics`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::metrics::Metrics;

/// Replaces the default panic hook (which prints the panic's message) with one that logs
/// where it happened and withholds the message: a panic on input quotes the input (a
/// slicing panic prints the string it cut), and mail data never goes into the log.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            location,
            "panic (a mailhook bug; its message is withheld because it may quote mail data)"
        );
    }));
}

/// Counts a caught panic of `component` (the hook has logged where it happened).
pub fn record(metrics: &Metrics, component: &'static str) {
    metrics.panics.with_label_values(&[component]).inc();
    tracing::error!(
        component,
        "caught a panic (a bug): the request or delivery attempt it happened in failed; everything else goes on"
    );
}

/// What a request that met a panic is told: fixed text, nothing of the input.
pub const ANSWER: &str =
    "internal error (a mailhook bug, counted in mailhook_panics_total; please report it with the operator's log)";

/// A tower layer that answers a panicking HTTP handler with a JSON 500 and counts it.
pub fn catch_layer(
    metrics: Metrics,
    component: &'static str,
) -> tower_http::catch_panic::CatchPanicLayer<impl Fn(Box<dyn std::any::Any + Send>) -> Response + Clone> {
    tower_http::catch_panic::CatchPanicLayer::custom(move |_: Box<dyn std::any::Any + Send>| {
        record(&metrics, component);
        let body = serde_json::json!({ "error": format!("{ANSWER}; nothing was accepted") });
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
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("mailhook_panics_total"), "{body}");
        assert!(
            !error.contains("Grüße") && !error.contains("boundary"),
            "nothing of the input: {body}"
        );
        assert_eq!(metrics.panics.with_label_values(&["ingest"]).get(), 1);
        let ok = client.get(format!("http://{addr}/ok")).send().await.expect("answer");
        assert_eq!(ok.status().as_u16(), 200, "the listener still serves");
    }
}
