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

/// What a metric is, for its `# TYPE` and how it is registered.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the worker exports, with its `# HELP` text (docs/metrics.md
/// explains each). All are exported from the start, at zero, so that a
/// standby or an idle worker shows every series a dashboard asks for.
const METRICS: &[(&str, Kind, &str)] = &[
    (
        "imattr_messages_received_total",
        Kind::Counter,
        "Deliveries taken from the updates queue, valid or not; redeliveries count again.",
    ),
    (
        "imattr_messages_redelivered_total",
        Kind::Counter,
        "Deliveries the broker marked redelivered.",
    ),
    (
        "imattr_messages_acked_total",
        Kind::Counter,
        "Messages acknowledged after every account they touch was accepted by the API.",
    ),
    (
        "imattr_messages_dead_lettered_total",
        Kind::Counter,
        "Messages whose dead-letter copy the broker confirmed, by reason.",
    ),
    (
        "imattr_api_requests_total",
        Kind::Counter,
        "im_set_attr requests, every attempt, by the class of the answer and its ErrorCode.",
    ),
    (
        "imattr_api_request_duration_seconds",
        Kind::Histogram,
        "Time from sending an im_set_attr request to its answer or failure, in seconds.",
    ),
    (
        "imattr_request_accounts",
        Kind::Histogram,
        "Accounts in each im_set_attr request.",
    ),
    (
        "imattr_pending_accounts",
        Kind::Gauge,
        "Accounts with updates received but not settled.",
    ),
    (
        "imattr_held_bytes",
        Kind::Gauge,
        "Bytes of message bodies held, plus read and not yet taken in; reads stop at amqp.max_held_bytes.",
    ),
    (
        "imattr_in_flight_requests",
        Kind::Gauge,
        "Batches being sent, retried or bisected.",
    ),
    (
        "imattr_retries_total",
        Kind::Counter,
        "Waits before retrying a transient failure.",
    ),
    (
        "imattr_paused",
        Kind::Gauge,
        "1 while consuming is paused because the API answered with a misconfigured code.",
    ),
    (
        "imattr_usersig_renewals_total",
        Kind::Counter,
        "UserSigs regenerated because the API refused the current one.",
    ),
    (
        "imattr_broker_reconnects_total",
        Kind::Counter,
        "Broker sessions lost or failed and reconnected.",
    ),
    (
        "imattr_rate_limit_current",
        Kind::Gauge,
        "The request rate allowed now, requests per second.",
    ),
    (
        "imattr_rate_limited_total",
        Kind::Counter,
        "Answers refusing a request for its rate.",
    ),
    (
        "imattr_active",
        Kind::Gauge,
        "1 on the worker that consumes, 0 on a hot standby.",
    ),
    (
        "imattr_build_info",
        Kind::Gauge,
        "Always 1; the version label is imattr's version.",
    ),
];

/// The dead-letter reasons, whose series are exported from the start.
const DEAD_LETTER_REASONS: [&str; 3] = ["invalid-message", "rejected", "retries-exhausted"];

/// Describes every metric and registers its series at zero (or, for the
/// gauges that have one, its starting value), without changing any value
/// another part of the process has set already.
fn register_metrics() {
    for (name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
        match (*name, kind) {
            ("imattr_messages_dead_lettered_total", _) => {
                for reason in DEAD_LETTER_REASONS {
                    metrics::counter!(*name, "reason" => reason).increment(0);
                }
            }
            ("imattr_api_requests_total", _) => {
                metrics::counter!(*name, "class" => "success", "code" => "0").increment(0);
            }
            ("imattr_build_info", _) => {
                metrics::gauge!(*name, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            }
            (_, Kind::Counter) => metrics::counter!(*name).increment(0),
            (_, Kind::Gauge) => metrics::gauge!(*name).increment(0.0),
            (_, Kind::Histogram) => drop(metrics::histogram!(*name)),
        }
    }
    process_collector().describe();
}

/// RSS, CPU time, open file descriptors… of this process (`process_*`),
/// read from /proc when `/metrics` is asked.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

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
            let handle = builder.install_recorder().ok()?;
            register_metrics();
            Some(handle)
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
    serve_with(listen, health, None, cancel).await
}

/// [`serve`], with the web console's routes (under `/console/`) when given.
pub async fn serve_with(
    listen: &str,
    health: Arc<Health>,
    console: Option<Router>,
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
    let app = match console {
        Some(console) => {
            tracing::info!(%addr, "Console listening on http://{addr}/console/");
            app.merge(console)
        }
        None => app,
    };
    tracing::info!(%addr, "Admin endpoint listening (/healthz, /readyz, /metrics)");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(Some(addr))
}

/// Alive; the body says what the worker is doing (`Health::role`).
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
        Some(h) => {
            process_collector().collect();
            (StatusCode::OK, h.render())
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".into(),
        ),
    }
}
