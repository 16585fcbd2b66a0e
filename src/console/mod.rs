//! The web console under `/console/`: the worker's state and live charts,
//! and the dead letters (docs/console.md). Pages are rendered on the server
//! (maud); one embedded script draws the charts from a JSON endpoint and
//! drives the actions. Every asset is in the binary.
//!
//! - `auth`: who may come in;
//! - `guard`: what a request that changes anything must show;
//! - `samples`: the overview's 15 minutes of readings;
//! - `pages`: the HTML.

pub mod auth;
mod dead_letters;
pub mod guard;
mod pages;
pub mod samples;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::health::Health;
use auth::{Access, Who};
use samples::{History, Reading, Series};

/// The Content-Security-Policy of every console response: scripts, styles,
/// images and requests only from the console itself; nothing inline.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The largest request body taken (a form naming selected rows).
const MAX_BODY_BYTES: usize = 1 << 20;

/// The console of one process: shared by its handlers and its sampler.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    access: Access,
    csrf: String,
    /// The worker in this process; `None` for `imattr console`.
    health: Option<Arc<Health>>,
    history: History,
    prometheus: Option<PrometheusHandle>,
    dead_letters: dead_letters::DeadLetters,
}

impl Console {
    /// A console for a process listening on `listen`; `health` is the worker
    /// of this process, if any. Refuses (exit 2) a listener that is not
    /// loopback when no authentication is configured.
    pub fn new(
        config: &Config,
        listen: SocketAddr,
        health: Option<Arc<Health>>,
    ) -> Result<Console, ConfigError> {
        let access = Access::from_config(&config.console, listen)?;
        Ok(Console {
            inner: Arc::new(Inner {
                config: config.clone(),
                access,
                csrf: guard::new_token(),
                health,
                history: History::default(),
                prometheus: crate::admin::prometheus(),
                dead_letters: dead_letters::DeadLetters::new(config),
            }),
        })
    }

    /// Takes a reading every [`samples::EVERY`] until `cancel`.
    pub fn start_sampling(&self, cancel: CancellationToken) {
        let console = self.clone();
        tokio::spawn(async move { console.sample_loop(cancel).await });
    }

    /// Summarises the dead letters in the background, so that the first
    /// grouped view or confirmation does not wait for a read of the whole
    /// store.
    pub fn start_summary(&self, cancel: CancellationToken) {
        let console = self.clone();
        tokio::spawn(async move { console.inner.dead_letters.warm(cancel).await });
    }

    async fn sample_loop(self, cancel: CancellationToken) {
        let mut depth = QueueDepth::new(&self.inner.config);
        let mut tick = tokio::time::interval(samples::EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let text = self
                .inner
                .prometheus
                .as_ref()
                .map(PrometheusHandle::render)
                .unwrap_or_default();
            let mut r = Reading::from_prometheus(&text, now_ms());
            let look = tokio::select! {
                _ = cancel.cancelled() => break,
                look = depth.look() => look,
            };
            if let Some((ready, consumers)) = look {
                r.queue_ready = Some(ready);
                r.consumers = Some(consumers);
            }
            r.queue_unacked = self.inner.health.as_ref().map(|h| h.unsettled() as u64);
            self.inner.history.push(r);
        }
        depth.close().await;
    }

    /// The console's routes, all under `/console/`, behind its gate.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/console", get(|| async { Redirect::to("/console/") }))
            .route("/console/", get(overview_page))
            .route("/console/api/overview", get(overview_json))
            .route("/console/assets/{name}", get(asset))
            .route("/console/dead-letters", get(dead_letters::table))
            .route("/console/dead-letters/groups", get(dead_letters::groups))
            .route("/console/dead-letters/export", get(dead_letters::export))
            .route("/console/dead-letters/{id}", get(dead_letters::detail))
            .route("/console/dead-letters/replay", post(dead_letters::replay))
            .route("/console/dead-letters/delete", post(dead_letters::delete))
            .route(
                "/console/api/dead-letters/stats",
                get(dead_letters::stats_json),
            )
            .route("/console/jobs/{id}", get(dead_letters::job_page))
            .route("/console/jobs/{id}/cancel", post(dead_letters::job_cancel))
            .route("/console/api/jobs/{id}", get(dead_letters::job_json))
            .layer(axum::middleware::from_fn_with_state(self.clone(), gate))
            .with_state(self.clone())
    }

    /// What the overview shows now.
    pub fn overview(&self) -> Overview {
        let readings = self.inner.history.snapshot();
        let latest = readings.last().cloned().unwrap_or_default();
        Overview {
            now_ms: now_ms(),
            every_ms: samples::EVERY.as_millis() as u64,
            window_ms: samples::WINDOW.as_millis() as u64,
            worker: self.inner.health.as_ref().map(|h| WorkerState::of(h)),
            queue: self.inner.config.amqp.queue.clone(),
            latest,
            series: Series::from_readings(&readings),
        }
    }

    fn page_context(&self, who: &Who) -> pages::Context {
        pages::Context {
            csrf: self.inner.csrf.clone(),
            read_only: self.inner.config.console.read_only,
            who: who.to_string(),
            with_worker: self.inner.health.is_some(),
        }
    }
}

/// The overview's data (`GET /console/api/overview`).
#[derive(Debug, Serialize)]
pub struct Overview {
    /// When, Unix milliseconds.
    pub now_ms: i64,
    /// How often a reading is taken, in milliseconds.
    pub every_ms: u64,
    /// How long readings are kept, in milliseconds.
    pub window_ms: u64,
    /// The worker of this process (none for `imattr console`).
    pub worker: Option<WorkerState>,
    /// The updates queue's name.
    pub queue: String,
    /// The last reading: totals since the worker started, gauges now.
    pub latest: Reading,
    /// The charts' series.
    pub series: Series,
}

/// What the worker is doing.
#[derive(Debug, Serialize)]
pub struct WorkerState {
    /// `connecting`, `starting`, `standby`, `active` or `stopping`; `paused`
    /// while the API answers a misconfigured code.
    pub state: String,
    /// The misconfigured code the API answered, while paused.
    pub paused_code: Option<i64>,
    /// Its message (the API's ErrorInfo).
    pub paused_message: Option<String>,
    /// The broker node connected to, `host:port`.
    pub node: Option<String>,
    /// Why the worker is not ready, if it is not.
    pub not_ready: Option<String>,
}

impl WorkerState {
    fn of(h: &Health) -> WorkerState {
        let pause = h.pause();
        let state = if pause.is_some() && h.is_consuming() {
            "paused".to_string()
        } else {
            h.role().to_string()
        };
        WorkerState {
            state,
            paused_code: pause.as_ref().map(|(c, _)| *c),
            paused_message: pause.map(|(_, m)| m),
            node: h.node(),
            not_ready: h.readiness().err(),
        }
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Every console request passes here: authentication, then for a request
/// that changes anything read-only, same origin and the CSRF token; every
/// response gets the security headers.
async fn gate(State(c): State<Console>, req: Request, next: Next) -> Response {
    let mut resp = match admit(&c, req).await {
        Ok(req) => next.run(req).await,
        Err(resp) => resp,
    };
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn admit(c: &Console, req: Request) -> Result<Request, Response> {
    let Some(who) = c.inner.access.check(req.headers()) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            [(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"imattr console\", charset=\"UTF-8\""),
            )],
            "authentication required\n",
        )
            .into_response());
    };
    let mut req = if guard::changes_state(req.method()) {
        let path = req.uri().path().to_string();
        let refuse = |why: guard::Refusal| {
            tracing::warn!(who = %who, path = %path, why = %why, "Console request refused");
            (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
        };
        if c.inner.config.console.read_only {
            return Err(refuse(guard::Refusal::ReadOnly));
        }
        guard::same_origin(req.headers()).map_err(refuse)?;
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
            .await
            .map_err(|_| (StatusCode::PAYLOAD_TOO_LARGE, "request too large\n").into_response())?;
        let is_form = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let field = is_form.then(|| guard::form_value(&bytes, "csrf")).flatten();
        if !guard::csrf_ok(&parts.headers, field.as_deref(), &c.inner.csrf) {
            return Err(refuse(guard::Refusal::Csrf));
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    req.extensions_mut().insert(who);
    Ok(req)
}

async fn overview_page(
    State(c): State<Console>,
    axum::Extension(who): axum::Extension<Who>,
) -> Response {
    axum::response::Html(pages::overview(&c.page_context(&who), &c.overview()).into_string())
        .into_response()
}

async fn overview_json(State(c): State<Console>) -> Json<Overview> {
    Json(c.overview())
}

/// The embedded assets.
async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.js" => (
            include_str!("assets/console.js"),
            "text/javascript; charset=utf-8",
        ),
        "console.css" => (
            include_str!("assets/console.css"),
            "text/css; charset=utf-8",
        ),
        _ => return (StatusCode::NOT_FOUND, "not found\n").into_response(),
    };
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(kind)),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// The updates queue's depth, from a passive declare on a connection of
/// the console's own (opened when first needed, again after a failure).
struct QueueDepth {
    config: Config,
    conn: Option<(lapin::Connection, lapin::Channel)>,
    /// No new connection before this, after one failed.
    retry_at: tokio::time::Instant,
}

/// How long a look at the queue may take before the reading goes without it.
const LOOK_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long after a failed connection the next is tried.
const RECONNECT_AFTER: Duration = Duration::from_secs(10);

impl QueueDepth {
    fn new(config: &Config) -> QueueDepth {
        QueueDepth {
            config: config.clone(),
            conn: None,
            retry_at: tokio::time::Instant::now(),
        }
    }

    /// (ready, consumers), or None when the broker cannot tell now.
    async fn look(&mut self) -> Option<(u64, u64)> {
        match tokio::time::timeout(LOOK_TIMEOUT, self.try_look()).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(
                    error = format!("{e:#}"),
                    "Console cannot read the queue's depth"
                );
                self.conn = None;
                None
            }
            Err(_) => {
                self.conn = None;
                None
            }
        }
    }

    async fn try_look(&mut self) -> anyhow::Result<(u64, u64)> {
        if self.conn.is_none() {
            if tokio::time::Instant::now() < self.retry_at {
                anyhow::bail!("waiting before connecting again");
            }
            self.retry_at = tokio::time::Instant::now() + RECONNECT_AFTER;
            let name = format!(
                "imattr console {} pid {}",
                self.config.amqp.queue,
                std::process::id()
            );
            let conn = crate::amqp::nodes::connect_first(&self.config.amqp, &name).await?;
            let ch = conn.create_channel().await.context("opening a channel")?;
            self.conn = Some((conn, ch));
        }
        let Some((_, ch)) = &self.conn else {
            anyhow::bail!("not connected");
        };
        let (ready, consumers) = crate::dlq::pass::count(ch, &self.config.amqp.queue).await?;
        Ok((u64::from(ready), u64::from(consumers)))
    }

    async fn close(self) {
        if let Some((conn, _)) = self.conn {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.close(200, "imattr console stopping".into()),
            )
            .await;
        }
    }
}

/// `imattr console`: the console without a worker on `listen`, until `cancel`.
pub async fn serve_alone(
    config: &Config,
    listen: SocketAddr,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let console = Console::new(config, listen, None)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("console: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    console.start_sampling(cancel.clone());
    console.start_summary(cancel.clone());
    let app = Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .merge(console.router());
    tracing::info!(%addr, read_only = config.console.read_only, "Console listening on http://{addr}/console/");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .context("serving the console")
}
