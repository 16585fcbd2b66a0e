//! The admin endpoint: `GET /healthz`, `/readyz` and `/metrics` (Prometheus text).

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; returns its handle.
pub(crate) fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("imattr_api_request_duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("imattr_request_accounts".into()),
                        &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 75.0, 99.0, 100.0],
                    )
                })
                .ok()?;
            builder.install_recorder().ok()
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    prometheus: Option<PrometheusHandle>,
}

/// Starts the admin endpoint on `listen` ("" turns it off); it stops with
/// `cancel`. Returns the address it listens on.
pub async fn serve(
    listen: &str,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let state = AdminState {
        health,
        prometheus: prometheus(),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    tracing::info!(%addr, "Admin endpoint listening (/healthz, /readyz, /metrics)");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(Some(addr))
}

/// Alive; the body says whether this worker is the active consumer or a standby.
async fn healthz(State(s): State<AdminState>) -> String {
    format!("ok: {}\n", s.health.role())
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    match &s.prometheus {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".into(),
        ),
    }
}
