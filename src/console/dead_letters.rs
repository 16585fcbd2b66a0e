//! The dead-letter pages: the table (filters in the URL, a cursor per page),
//! the view grouped by error, one dead letter, and the actions (replay with
//! a rate, progress and cancel; delete after a confirmation naming the
//! count; export as NDJSON). What matches "everything matching" is bounded
//! by the time of the confirmation, so an action acts on what was there
//! when the operator started it; the store itself acts only on what was
//! present when the call starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use base64::Engine;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::auth::Who;
use super::pages::{layout, Context, Tab};
use super::{now_ms, Console};
use crate::config::Config;
use crate::dlq::{
    DeadLetterView, Dlq, Filter, Groups, Progress, ReplayOptions, ReplayReport, Summary,
};

/// Rows per page.
pub(crate) const PAGE_SIZE: usize = 50;

/// The store, opened when first needed (a broker down when the console
/// starts must not keep it from starting), again after a failure; and its
/// summary, so that counts read only the dead letters new since the last.
pub(crate) struct Store {
    config: Config,
    dlq: tokio::sync::Mutex<Option<Arc<Dlq>>>,
    summary: tokio::sync::Mutex<Summary>,
}

impl Store {
    pub(crate) fn new(config: &Config) -> Store {
        Store {
            config: config.clone(),
            dlq: tokio::sync::Mutex::new(None),
            summary: tokio::sync::Mutex::new(Summary::new()),
        }
    }

    /// The counts of `filter`: from the summary brought up to date, or from
    /// a full read when the summary cannot answer (account or text).
    pub(crate) async fn groups(&self, filter: &Filter) -> anyhow::Result<Groups> {
        match self.summarised(filter, Summary::groups).await? {
            Some(g) => Ok(g),
            None => self.full(filter).await,
        }
    }

    /// How many match `filter`, and the end of what was counted (the ids
    /// below it): an action bounded by it takes nothing the count did not
    /// see, whatever arrives meanwhile.
    pub(crate) async fn count_to_end(&self, filter: &Filter) -> anyhow::Result<(u64, u64)> {
        if Summary::reads(filter) {
            let mut s = self.summary.lock().await;
            self.refresh(&mut s).await?;
            if let Some(n) = s.count(filter) {
                return Ok((n, s.upto()));
            }
        }
        let f = filter.clone();
        self.with(|d| async move { d.count_to_end(&f).await }).await
    }

    /// A read of the whole store.
    async fn full(&self, filter: &Filter) -> anyhow::Result<Groups> {
        let f = filter.clone();
        Ok(self
            .with(|d| async move { d.stats(&f).await })
            .await?
            .into())
    }

    /// `answer` of the summary brought up to date; `None` when it cannot
    /// answer (a filter it cannot read does not refresh it).
    async fn summarised<T>(
        &self,
        filter: &Filter,
        answer: impl Fn(&Summary, &Filter) -> Option<T>,
    ) -> anyhow::Result<Option<T>> {
        if !Summary::reads(filter) {
            return Ok(None);
        }
        let mut s = self.summary.lock().await;
        self.refresh(&mut s).await?;
        Ok(answer(&s, filter))
    }

    async fn refresh(&self, s: &mut Summary) -> anyhow::Result<u64> {
        self.with(|d| async move { d.refresh_summary(s).await })
            .await
    }

    /// Builds the summary (the first count's full read) in the background,
    /// until `cancel`.
    pub(crate) async fn warm(&self, cancel: CancellationToken) {
        let work = async {
            let mut s = self.summary.lock().await;
            let started = Instant::now();
            match self.refresh(&mut s).await {
                Ok(_) => tracing::info!(
                    rows = s.len(),
                    read_ms = started.elapsed().as_millis() as u64,
                    "Console summarised the dead letters"
                ),
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "Console could not summarise the dead letters yet; the first count will"
                ),
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = work => {}
        }
    }

    async fn get(&self) -> anyhow::Result<Arc<Dlq>> {
        let mut slot = self.dlq.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = Arc::new(Dlq::open(&self.config).await?);
        *slot = Some(d.clone());
        Ok(d)
    }

    /// After a failure: the next use opens the store again.
    async fn forget(&self) {
        self.dlq.lock().await.take();
    }

    /// Runs `f` on the store; a failure makes the next call reopen it.
    async fn with<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Arc<Dlq>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let d = self.get().await?;
        let r = f(d).await;
        if r.is_err() {
            self.forget().await;
        }
        r
    }
}

/// The filters of the table, as the URL carries them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub(crate) struct FilterQuery {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    account: String,
    /// Text in the error or the body.
    #[serde(default)]
    q: String,
    /// Failed at or after: Unix ms, RFC 3339, or `YYYY-MM-DDTHH:MM` (UTC).
    #[serde(default)]
    since: String,
    /// Failed at or before, as `since`.
    #[serde(default)]
    until: String,
    /// The cursor: ids after this one.
    #[serde(default)]
    after: Option<u64>,
}

impl FilterQuery {
    /// The store's filter; the error names the field.
    pub(crate) fn filter(&self) -> Result<Filter, String> {
        let some = |s: &str| {
            let s = s.trim();
            (!s.is_empty()).then(|| s.to_string())
        };
        let code = match some(&self.code) {
            Some(c) => Some(
                c.parse::<i64>()
                    .map_err(|_| format!("code: not a number: {c}"))?,
            ),
            None => None,
        };
        let time = |s: &str, what: &str| -> Result<Option<i64>, String> {
            some(s)
                .map(|s| parse_time(&s).map_err(|e| format!("{what}: {e}")))
                .transpose()
        };
        Ok(Filter {
            reason: some(&self.reason),
            code,
            account: some(&self.account),
            grep: some(&self.q),
            since_ms: time(&self.since, "since")?,
            until_ms: time(&self.until, "until")?,
            ids: None,
            before_id: None,
        })
    }

    /// The filter's fields that are set, for links and hidden inputs.
    fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("reason", self.reason.as_str()),
            ("code", self.code.as_str()),
            ("account", self.account.as_str()),
            ("q", self.q.as_str()),
            ("since", self.since.as_str()),
            ("until", self.until.as_str()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect()
    }

    /// `path?filters[&after=ID]`.
    pub(crate) fn href(&self, path: &str, after: Option<u64>) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.pairs() {
            q.append_pair(k, v);
        }
        if let Some(a) = after {
            q.append_pair("after", &a.to_string());
        }
        let q = q.finish();
        if q.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{q}")
        }
    }

    fn from_pairs(pairs: &[(String, String)]) -> FilterQuery {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        FilterQuery {
            reason: get("reason"),
            code: get("code"),
            account: get("account"),
            q: get("q"),
            since: get("since"),
            until: get("until"),
            after: None,
        }
    }
}

/// Unix ms, RFC 3339, or `YYYY-MM-DDTHH:MM[:SS]` (a browser's
/// datetime-local), taken as UTC.
pub(crate) fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    for f in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    Err(format!(
        "not a time: {s:?} (Unix milliseconds, RFC 3339, or YYYY-MM-DDTHH:MM in UTC)"
    ))
}

/// A time for display, UTC.
pub(crate) fn show_time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "–".into(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

/// The first `n` characters of `s`, with an ellipsis when cut.
fn cut(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().nth(n).is_some() {
        out.push('…');
    }
    out
}

/// An action asked for in a form: selected rows or everything matching.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Target {
    /// The filter it acts on.
    pub filter: Filter,
    /// The filter as the URL carries it (for links back).
    pub query: FilterQuery,
    /// `selected` or `matching`.
    pub scope: &'static str,
    /// The form's other fields.
    pub fields: Vec<(String, String)>,
}

impl Target {
    /// Reads a posted form: `scope`, `ids`, the filters, and for
    /// `matching` the time it was confirmed (`asof`) as an upper bound.
    pub(crate) fn from_form(body: &[u8]) -> Result<Target, String> {
        let fields: Vec<(String, String)> = url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let query = FilterQuery::from_pairs(&fields);
        let (scope, filter) = match get("scope") {
            Some("selected") => {
                let ids = fields
                    .iter()
                    .filter(|(k, _)| k == "ids")
                    .map(|(_, v)| v.parse::<u64>().map_err(|_| format!("not an id: {v}")))
                    .collect::<Result<Vec<u64>, String>>()?;
                if ids.is_empty() {
                    return Err("no row selected".into());
                }
                (
                    "selected",
                    Filter {
                        ids: Some(ids),
                        ..Filter::default()
                    },
                )
            }
            Some("matching") => {
                let mut f = query.filter()?;
                if let Some(asof) = get("asof").and_then(|v| v.parse::<i64>().ok()) {
                    f.until_ms = Some(f.until_ms.map_or(asof, |u| u.min(asof)));
                }
                ("matching", f)
            }
            _ => return Err("scope must be selected or matching".into()),
        };
        let mut filter = filter;
        if let Some(b) = get("before") {
            filter.before_id = Some(b.parse::<u64>().map_err(|_| format!("not an id: {b}"))?);
        }
        // Without its count's bound, a confirmation could take dead letters
        // stored after the count: refuse it and count again.
        if get("confirm") == Some("yes") && filter.before_id.is_none() {
            return Err(
                "this confirmation does not carry what it counted (a page from an older \
                 version?): go back and choose the action again"
                    .into(),
            );
        }
        Ok(Target {
            filter,
            query,
            scope,
            fields,
        })
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    fn confirmed(&self) -> bool {
        self.get("confirm") == Some("yes")
    }

    /// Hidden inputs repeating what the confirmation acts on.
    /// The confirmation repeats the bounds its count had: the page's `asof`
    /// and the store's end (`before`).
    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="scope" value=(self.scope);
            @for (k, v) in self.query.pairs() {
                input type="hidden" name=(k) value=(v);
            }
            @if let Some(ids) = &self.filter.ids {
                @for id in ids {
                    input type="hidden" name="ids" value=(id);
                }
            }
            @if let Some(asof) = self.get("asof") {
                input type="hidden" name="asof" value=(asof);
            }
            @if let Some(before) = self.filter.before_id {
                input type="hidden" name="before" value=(before);
            }
            input type="hidden" name="confirm" value="yes";
        }
    }
}

/// One replay started from the console.
pub(crate) struct Job {
    id: u64,
    by: String,
    what: String,
    started_ms: i64,
    moved: AtomicU64,
    failed: AtomicU64,
    total: AtomicU64,
    cancel: CancellationToken,
    end: Mutex<Option<Result<ReplayReport, String>>>,
}

/// A job as the page and its script see it.
#[derive(Debug, Serialize)]
pub(crate) struct JobView {
    id: u64,
    by: String,
    what: String,
    started_ms: i64,
    /// `running`, `done`, `cancelled` or `failed`.
    state: &'static str,
    moved: u64,
    failed: u64,
    total: u64,
    left: Option<u64>,
    error: Option<String>,
}

impl Job {
    fn view(&self) -> JobView {
        let end = lock(&self.end).clone();
        let (state, left, error) = match &end {
            None => ("running", None, None),
            Some(Ok(r)) if r.cancelled => ("cancelled", Some(r.left), None),
            Some(Ok(r)) => ("done", Some(r.left), None),
            Some(Err(e)) => ("failed", None, Some(e.clone())),
        };
        // Once ended, the report's numbers, which add up: its failed count
        // holds the dead letters that could not be decoded, which the
        // progress leaves out.
        let (moved, failed, total) = match &end {
            Some(Ok(r)) => (r.moved, r.failed, r.moved + r.failed + r.left),
            _ => (
                self.moved.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed),
                self.total.load(Ordering::Relaxed),
            ),
        };
        JobView {
            id: self.id,
            by: self.by.clone(),
            what: self.what.clone(),
            started_ms: self.started_ms,
            state,
            moved,
            failed,
            total,
            left,
            error,
        }
    }
}

/// The dead-letter side of the console: the store and the jobs.
pub(crate) struct DeadLetters {
    store: Store,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    next_job: AtomicU64,
}

impl DeadLetters {
    pub(crate) fn new(config: &Config) -> DeadLetters {
        DeadLetters {
            store: Store::new(config),
            jobs: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(1),
        }
    }

    /// See [`Store::warm`].
    pub(crate) async fn warm(&self, cancel: CancellationToken) {
        self.store.warm(cancel).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn page(ctx: &Context, title: &str, body: Markup) -> Response {
    Html(layout(ctx, Tab::DeadLetters, title, body).into_string()).into_response()
}

fn failure(ctx: &Context, status: StatusCode, what: &str, e: impl std::fmt::Display) -> Response {
    let body = html! {
        h1 { "Dead letters" }
        div.flash.bad #error { (what) ": " (e) }
        p { a href="/console/dead-letters" { "Back to the dead letters" } }
    };
    (status, page(ctx, "Error", body)).into_response()
}

fn filter_form(q: &FilterQuery, action: &str) -> Markup {
    html! {
        form.filters method="get" action=(action) #filters {
            label { "Reason"
                select name="reason" {
                    option value="" selected[q.reason.is_empty()] { "any" }
                    @for r in crate::dlq::REASONS {
                        option value=(r) selected[q.reason == *r] { (r) }
                    }
                }
            }
            label { "Code" input type="text" name="code" value=(q.code) size="7" inputmode="numeric"; }
            label { "Account" input type="text" name="account" value=(q.account) size="16"; }
            label { "Text (error or body)" input type="search" name="q" value=(q.q) size="22"; }
            label { "Since (UTC)" input type="text" name="since" value=(q.since) size="17" placeholder="YYYY-MM-DDTHH:MM"; }
            label { "Until (UTC)" input type="text" name="until" value=(q.until) size="17" placeholder="YYYY-MM-DDTHH:MM"; }
            button type="submit" #apply-filter { "Filter" }
            a.button.quiet href=(action) { "Clear" }
        }
    }
}

/// `GET /console/dead-letters`: one page of the table.
pub(crate) async fn table(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    Query(q): Query<FilterQuery>,
) -> Response {
    let ctx = c.page_context(&who);
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return failure(&ctx, StatusCode::BAD_REQUEST, "Bad filter", e),
    };
    let started = Instant::now();
    let dl = &c.inner.dead_letters;
    let after = q.after;
    let result = dl
        .store
        .with(|d| async move { d.page(&filter, after, PAGE_SIZE).await })
        .await;
    let p = match result {
        Ok(p) => p,
        Err(e) => {
            return failure(
                &ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot read the dead letters",
                format!("{e:#}"),
            )
        }
    };
    let read_ms = started.elapsed().as_millis();
    tracing::debug!(
        rows = p.items.len(),
        read_ms,
        "Console dead-letter page read"
    );
    let asof = now_ms();
    let actions = !ctx.read_only;
    let body = html! {
        h1 { "Dead letters" }
        nav.subtabs {
            a.button href=(q.href("/console/dead-letters", None)) { "Table" }
            " "
            a.button.quiet #to-groups href=(q.href("/console/dead-letters/groups", None)) { "Grouped by error" }
        }
        (filter_form(&q, "/console/dead-letters"))
        p.summary {
            span #matching-count data-stats=(q.href("/console/api/dead-letters/stats", None)) { "counting…" }
            " matching. "
            @if let Some(a) = q.after { "Rows after id " (a) ". " }
            span.timing #read-ms { "Page read in " (read_ms) " ms." }
        }
        form #rows-form method="post" data-matching="" {
            input type="hidden" name="csrf" value=(ctx.csrf);
            @for (k, v) in q.pairs() {
                input type="hidden" name=(k) value=(v);
            }
            input type="hidden" name="asof" value=(asof);
            @if actions {
                div.actions #actions {
                    span { span data-selected-count { "0" } " selected:" }
                    button type="submit" name="scope" value="selected" formaction="/console/dead-letters/replay" data-needs-selection #replay-selected { "Replay" }
                    button.danger type="submit" name="scope" value="selected" formaction="/console/dead-letters/delete" data-needs-selection #delete-selected { "Delete" }
                    span { " · everything matching:" }
                    button type="submit" name="scope" value="matching" formaction="/console/dead-letters/replay" #replay-matching { "Replay all" }
                    button.danger type="submit" name="scope" value="matching" formaction="/console/dead-letters/delete" #delete-matching { "Delete all" }
                }
            }
            table.rows #rows {
                thead { tr {
                    @if actions { th { input type="checkbox" #select-all aria-label="select all"; } }
                    th { "id" } th { "failed at" } th { "reason" } th { "code" } th { "account" }
                    th { "error" } th { "attempts" } th { "replays" } th { "body" }
                } }
                tbody {
                    @for v in &p.items {
                        tr data-id=(v.id) {
                            @if actions { td { input.row-select type="checkbox" name="ids" value=(v.id) aria-label="select"; } }
                            td { a href={"/console/dead-letters/" (v.id)} { (v.id) } }
                            td { (show_time(v.failed_at_ms)) }
                            td.reason { (v.reason.as_deref().unwrap_or("–")) }
                            td.code { (v.code.map_or("–".to_string(), |c| c.to_string())) }
                            td.account { (v.account.as_deref().unwrap_or("–")) }
                            td { (cut(v.error.as_deref().unwrap_or("–"), 80)) }
                            td { (v.attempts.map_or("–".to_string(), |a| a.to_string())) }
                            td { (v.replays) }
                            td.body { (body_preview(v)) }
                        }
                    }
                    @if p.items.is_empty() {
                        tr { td colspan="10" #no-rows { "No dead letter matches." } }
                    }
                }
            }
        }
        div.pager {
            @if q.after.is_some() {
                a.button.quiet #first-page href=(q.href("/console/dead-letters", None)) { "First page" }
            }
            @if let Some(next) = p.next_after {
                a.button #next-page href=(q.href("/console/dead-letters", Some(next))) { "Next page" }
            }
            a.button.quiet #export href=(q.href("/console/dead-letters/export", None)) { "Export matching (NDJSON)" }
        }
    };
    page(&ctx, "Dead letters", body)
}

fn body_preview(v: &DeadLetterView) -> String {
    if v.body_encoding == "base64" {
        "(not UTF-8)".into()
    } else {
        cut(&v.body, 60)
    }
}

/// `GET /console/api/dead-letters/stats`: the counts for the filter.
pub(crate) async fn stats_json(State(c): State<Console>, Query(q): Query<FilterQuery>) -> Response {
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    match c.inner.dead_letters.store.groups(&filter).await {
        Ok(s) => Json(serde_json::json!({
            "total": s.total,
            "by_reason": s.by_reason,
            "by_code": s.by_code,
        }))
        .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")).into_response(),
    }
}

/// `GET /console/dead-letters/groups`: counts by error, reason and code.
pub(crate) async fn groups(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    Query(q): Query<FilterQuery>,
) -> Response {
    let ctx = c.page_context(&who);
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return failure(&ctx, StatusCode::BAD_REQUEST, "Bad filter", e),
    };
    let started = Instant::now();
    let s = match c.inner.dead_letters.store.groups(&filter).await {
        Ok(s) => s,
        Err(e) => {
            return failure(
                &ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot count the dead letters",
                format!("{e:#}"),
            )
        }
    };
    let read_ms = started.elapsed().as_millis();
    let link = |field: &str, value: &str| {
        let mut q2 = q.clone();
        match field {
            "reason" => q2.reason = value.to_string(),
            "code" => q2.code = value.to_string(),
            _ => q2.q = value.to_string(),
        }
        q2.href("/console/dead-letters", None)
    };
    let body = html! {
        h1 { "Dead letters, grouped" }
        nav.subtabs {
            a.button.quiet href=(q.href("/console/dead-letters", None)) { "Table" }
            " "
            a.button href=(q.href("/console/dead-letters/groups", None)) { "Grouped by error" }
        }
        (filter_form(&q, "/console/dead-letters/groups"))
        p.summary { span #group-total { (s.total) } " matching. " span.timing { "Counted in " (read_ms) " ms." } }
        h2 { "By error" }
        table.rows #by-error {
            thead { tr { th { "error" } th { "count" } } }
            tbody {
                @for (error, n) in &s.by_error {
                    tr { td { a href=(link("q", error)) { (cut(error, 160)) } } td.count { (n) } }
                }
            }
        }
        h2 { "By reason" }
        table.rows #by-reason {
            thead { tr { th { "reason" } th { "count" } } }
            tbody {
                @for (reason, n) in &s.by_reason {
                    tr { td { a href=(link("reason", reason)) { (reason) } } td.count { (n) } }
                }
            }
        }
        h2 { "By error code" }
        table.rows #by-code {
            thead { tr { th { "code" } th { "count" } } }
            tbody {
                @for (code, n) in &s.by_code {
                    tr { td { a href=(link("code", code)) { (code) } } td.count { (n) } }
                }
            }
        }
    };
    page(&ctx, "Dead letters by error", body)
}

/// `GET /console/dead-letters/{id}`: one dead letter, whole.
pub(crate) async fn detail(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
) -> Response {
    let ctx = c.page_context(&who);
    let found = c
        .inner
        .dead_letters
        .store
        .with(|d| async move { d.show(id).await })
        .await;
    let v = match found {
        Ok(Some(v)) => v,
        Ok(None) => return failure(&ctx, StatusCode::NOT_FOUND, "No such dead letter", id),
        Err(e) => {
            return failure(
                &ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot read the dead letter",
                format!("{e:#}"),
            )
        }
    };
    let pretty = |j: &serde_json::Value| serde_json::to_string_pretty(j).unwrap_or_default();
    let body = html! {
        h1 { "Dead letter " (v.id) }
        p { a href="/console/dead-letters" { "← All dead letters" } }
        @if let Some(r) = &v.resolved {
            div.flash #resolved { "Resolved: " (r) }
        }
        dl.fields #fields {
            dt { "reason" } dd #f-reason { (v.reason.as_deref().unwrap_or("–")) }
            dt { "error code" } dd { (v.code.map_or("–".to_string(), |c| c.to_string())) }
            dt { "error" } dd #f-error { (v.error.as_deref().unwrap_or("–")) }
            dt { "account" } dd #f-account { (v.account.as_deref().unwrap_or("–")) }
            dt { "failed accounts" } dd #f-failed-accounts {
                @if v.failed_accounts.is_empty() { "–" } @else { (v.failed_accounts.join(", ")) }
            }
            dt { "attempts" } dd { (v.attempts.map_or("–".to_string(), |a| a.to_string())) }
            dt { "failed at" } dd { (show_time(v.failed_at_ms)) }
            dt { "source queue" } dd { (v.source_queue.as_deref().unwrap_or("–")) }
            dt { "routing key" } dd { (v.routing_key.as_deref().unwrap_or("–")) }
        }
        h2 { "Replay trace" }
        dl.fields #replay-trace {
            dt { "replayed" } dd { (v.replays) " time(s) before this failure" }
            dt { "last replayed at" } dd { (show_time(v.last_replayed_at_ms)) }
            dt { "now" } dd { (v.resolved.as_deref().unwrap_or("in the store, not resolved")) }
        }
        @if !ctx.read_only && v.resolved.is_none() {
            form.actions method="post" {
                input type="hidden" name="csrf" value=(ctx.csrf);
                input type="hidden" name="ids" value=(v.id);
                button type="submit" name="scope" value="selected" formaction="/console/dead-letters/replay" #replay-one { "Replay" }
                button.danger type="submit" name="scope" value="selected" formaction="/console/dead-letters/delete" #delete-one { "Delete" }
            }
        }
        h2 { "Body" }
        (render_body(&v))
        h2 { "Headers" }
        pre #headers { (pretty(&v.headers)) }
        h2 { "Properties" }
        pre #properties { (pretty(&v.properties)) }
        h2 { "x-death" }
        @if v.x_death.is_null() {
            p.note { "None: imattr dead-lettered it itself." }
        } @else {
            pre #x-death { (pretty(&v.x_death)) }
        }
    };
    page(&ctx, &format!("Dead letter {id}"), body)
}

/// The body: JSON pretty-printed, other text as it is, bytes that are not
/// UTF-8 said to be so and shown in hex.
pub(crate) fn render_body(v: &DeadLetterView) -> Markup {
    if v.body_encoding == "base64" {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&v.body)
            .unwrap_or_default();
        return html! {
            p.binary #body-binary { "Not UTF-8: " (bytes.len()) " bytes, shown in hex." }
            pre #body { (hex_dump(&bytes)) }
        };
    }
    let text = serde_json::from_str::<serde_json::Value>(&v.body)
        .ok()
        .and_then(|j| serde_json::to_string_pretty(&j).ok())
        .unwrap_or_else(|| v.body.clone());
    html! { pre #body { (text) } }
}

/// 16 bytes a line: offset, hex, and the printable ASCII.
pub(crate) fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = line
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:08x}  {:<47}  {}\n",
            i * 16,
            hex.join(" "),
            ascii
        ));
    }
    out
}

/// `GET /console/dead-letters/export`: NDJSON of the matching (or the
/// `ids`) dead letters, removing nothing.
pub(crate) async fn export(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    raw: axum::extract::RawQuery,
) -> Response {
    let raw = raw.0.unwrap_or_default();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let q = FilterQuery::from_pairs(&pairs);
    let mut filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let ids: Vec<u64> = pairs
        .iter()
        .filter(|(k, _)| k == "ids")
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    if !ids.is_empty() {
        filter = Filter {
            ids: Some(ids),
            ..Filter::default()
        };
    }
    // Written to an unlinked temporary file, then streamed: the export of a
    // large store must not be held in memory.
    let path = std::env::temp_dir().join(format!(
        "imattr-console-export-{}-{:016x}.ndjson",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = c
        .inner
        .dead_letters
        .store
        .with(|d| {
            let path = path.clone();
            async move {
                let file = std::fs::File::create(&path)?;
                let mut w = std::io::BufWriter::new(file);
                let n = d.export(&filter, &mut w).await?;
                Ok(n)
            }
        })
        .await;
    let opened = tokio::fs::File::open(&path).await;
    let _ = std::fs::remove_file(&path);
    let n = match result {
        Ok(n) => n,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("export failed: {e:#}\n"),
            )
                .into_response()
        }
    };
    let Ok(file) = opened else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "export file gone\n").into_response();
    };
    tracing::info!(who = %who, action = "export", count = n, "Console exported dead letters");
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(k) => {
                buf.truncate(k);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            ),
            (
                CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"dead-letters.ndjson\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The target an action's form names and, until it is confirmed, its count
/// for the confirmation; or the page saying why not (`nothing`: the title
/// when the form names nothing).
async fn target_and_count(
    c: &Console,
    ctx: &Context,
    body: &[u8],
    nothing: &str,
) -> Result<(Target, Option<u64>), Response> {
    let mut t =
        Target::from_form(body).map_err(|e| failure(ctx, StatusCode::BAD_REQUEST, nothing, e))?;
    if t.confirmed() {
        return Ok((t, None));
    }
    // The store's count, selected rows too: one may have been replayed or
    // deleted meanwhile. What it covered bounds the action (the form
    // carries it), so a dead letter stored after the count is left alone.
    let (n, end) = c
        .inner
        .dead_letters
        .store
        .count_to_end(&t.filter)
        .await
        .map_err(|e| {
            failure(
                ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot count",
                format!("{e:#}"),
            )
        })?;
    t.filter.before_id = Some(t.filter.before_id.map_or(end, |b| b.min(end)));
    Ok((t, Some(n)))
}

/// `POST /console/dead-letters/delete`: a confirmation naming the count,
/// then (`confirm=yes`) the deletion and what it did.
pub(crate) async fn delete(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    body: Bytes,
) -> Response {
    let ctx = c.page_context(&who);
    let (t, n) = match target_and_count(&c, &ctx, &body, "Nothing to delete").await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if let Some(n) = n {
        let body = html! {
            h1 { "Delete dead letters" }
            p #confirm-text { "Delete " strong #confirm-count { (n) } " dead letter(s) (" (t.scope) ")? There is no undo." }
            form method="post" action="/console/dead-letters/delete" {
                input type="hidden" name="csrf" value=(ctx.csrf);
                (t.hidden())
                input type="hidden" name="expected" value=(n);
                button.danger type="submit" #confirm-delete { "Delete " (n) }
                " "
                a.button.quiet href=(t.query.href("/console/dead-letters", None)) { "Cancel" }
            }
        };
        return page(&ctx, "Delete?", body);
    }
    let by = format!("console ({who})");
    let f = t.filter.clone();
    let result = c
        .inner
        .dead_letters
        .store
        .with(|d| async move { d.delete(&f, &by).await })
        .await;
    match result {
        Ok(n) => {
            tracing::info!(who = %who, action = "delete", scope = t.scope, count = n, "Console deleted dead letters");
            let body = html! {
                h1 { "Dead letters deleted" }
                div.flash #result { "Deleted " strong #deleted-count { (n) } " dead letter(s)"
                    @if let Some(e) = t.get("expected") { " (the confirmation named " (e) ")" } "." }
                p { a.button href=(t.query.href("/console/dead-letters", None)) #back { "Back to the dead letters" } }
            };
            page(&ctx, "Deleted", body)
        }
        Err(e) => failure(
            &ctx,
            StatusCode::SERVICE_UNAVAILABLE,
            "Delete failed",
            format!("{e:#}"),
        ),
    }
}

/// `POST /console/dead-letters/replay`: a confirmation naming the count with
/// a rate, then (`confirm=yes`) a job, and its page.
pub(crate) async fn replay(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    body: Bytes,
) -> Response {
    let ctx = c.page_context(&who);
    let (t, n) = match target_and_count(&c, &ctx, &body, "Nothing to replay").await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if let Some(n) = n {
        let body = html! {
            h1 { "Replay dead letters" }
            p #confirm-text { "Send " strong #confirm-count { (n) } " dead letter(s) (" (t.scope) ") back to the updates exchange." }
            form method="post" action="/console/dead-letters/replay" {
                input type="hidden" name="csrf" value=(ctx.csrf);
                (t.hidden())
                p { label { "At most " input type="number" name="rate" min="0.1" step="any" placeholder="no limit" #rate; " per second" } }
                p { label { input type="checkbox" name="whole" value="yes"; " whole messages (not only the failed accounts' entries)" } }
                button type="submit" #confirm-replay { "Replay " (n) }
                " "
                a.button.quiet href=(t.query.href("/console/dead-letters", None)) { "Cancel" }
            }
        };
        return page(&ctx, "Replay?", body);
    }
    let rate = t
        .get("rate")
        .and_then(|r| r.trim().parse::<f64>().ok())
        .filter(|r| *r > 0.0 && r.is_finite());
    let dl = &c.inner.dead_letters;
    let id = dl.next_job.fetch_add(1, Ordering::Relaxed);
    let job = Arc::new(Job {
        id,
        by: who.to_string(),
        what: format!(
            "replay of the {} dead letters{}",
            t.scope,
            rate.map_or(String::new(), |r| format!(" at {r}/s"))
        ),
        started_ms: now_ms(),
        moved: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        total: AtomicU64::new(0),
        cancel: CancellationToken::new(),
        end: Mutex::new(None),
    });
    lock(&dl.jobs).insert(id, job.clone());
    let options = ReplayOptions {
        filter: t.filter.clone(),
        limit: None,
        dry_run: false,
        whole: t.get("whole") == Some("yes"),
        rate_per_sec: rate,
        cancel: job.cancel.clone(),
        by: format!("console ({who})"),
    };
    let console = c.clone();
    let scope = t.scope;
    tokio::spawn(async move {
        let j = job.clone();
        let progress = move |p: &Progress| {
            j.moved.store(p.moved, Ordering::Relaxed);
            j.failed.store(p.failed, Ordering::Relaxed);
            j.total.store(p.total, Ordering::Relaxed);
        };
        let result = console
            .inner
            .dead_letters
            .store
            .with(|d| async move { d.replay(&options, &progress).await })
            .await;
        match &result {
            Ok(r) => tracing::info!(
                who = %job.by,
                action = "replay",
                scope,
                count = r.moved,
                failed = r.failed,
                left = r.left,
                cancelled = r.cancelled,
                "Console replayed dead letters"
            ),
            Err(e) => {
                tracing::warn!(who = %job.by, action = "replay", scope, error = format!("{e:#}"), "Console replay failed")
            }
        }
        *lock(&job.end) = Some(result.map_err(|e| format!("{e:#}")));
    });
    Redirect::to(&format!("/console/jobs/{id}")).into_response()
}

fn find_job(c: &Console, id: u64) -> Option<Arc<Job>> {
    lock(&c.inner.dead_letters.jobs).get(&id).cloned()
}

/// `GET /console/jobs/{id}`: a replay's progress, live.
pub(crate) async fn job_page(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
) -> Response {
    let ctx = c.page_context(&who);
    let Some(job) = find_job(&c, id) else {
        return failure(&ctx, StatusCode::NOT_FOUND, "No such job", id);
    };
    let v = job.view();
    let body = html! {
        h1 { "Replay " (v.id) }
        div.job #job data-job=(v.id) data-state=(v.state) {
            p { (v.what) ", started by " (v.by) " at " (show_time(Some(v.started_ms))) "." }
            p { progress max=(v.total.max(1)) value=(v.moved + v.failed) {} }
            dl.fields {
                dt { "state" } dd #job-state data-job-field="state" { (v.state) }
                dt { "replayed" } dd #job-moved data-job-field="moved" { (v.moved) }
                dt { "not replayed (refused by the broker, or not decodable)" } dd #job-failed data-job-field="failed" { (v.failed) }
                dt { "to do" } dd #job-total data-job-field="total" { (v.total) }
                dt { "left" } dd #job-left data-job-field="left" { (v.left.map_or("–".to_string(), |l| l.to_string())) }
                dt { "error" } dd #job-error data-job-field="error" { (v.error.as_deref().unwrap_or("–")) }
            }
            @if v.state == "running" && !ctx.read_only {
                form.cancel method="post" action={"/console/jobs/" (v.id) "/cancel"} {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    button.danger type="submit" #cancel-job { "Cancel" }
                }
            }
        }
        p { a.button href="/console/dead-letters" #back { "Back to the dead letters" } }
    };
    page(&ctx, "Replay", body)
}

/// `GET /console/api/jobs/{id}`.
pub(crate) async fn job_json(State(c): State<Console>, Path(id): Path<u64>) -> Response {
    match find_job(&c, id) {
        Some(j) => Json(j.view()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such job\n").into_response(),
    }
}

/// `POST /console/jobs/{id}/cancel`: the replay stops at its next batch.
pub(crate) async fn job_cancel(
    State(c): State<Console>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
) -> Response {
    let Some(job) = find_job(&c, id) else {
        return (StatusCode::NOT_FOUND, "no such job\n").into_response();
    };
    job.cancel.cancel();
    tracing::info!(who = %who, action = "cancel", job = id, "Console cancelled a replay");
    Redirect::to(&format!("/console/jobs/{id}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_from_the_url_and_back() {
        let q: FilterQuery = serde_urlencoded_like(
            "reason=rejected&code=90033&account=a%20b&q=&since=2026-01-02T03:04&after=7",
        );
        let f = q.filter().unwrap();
        assert_eq!(f.reason.as_deref(), Some("rejected"));
        assert_eq!(f.code, Some(90033));
        assert_eq!(f.account.as_deref(), Some("a b"));
        assert_eq!(f.grep, None);
        assert_eq!(f.since_ms, Some(1_767_323_040_000));
        assert_eq!(q.after, Some(7));
        assert_eq!(
            q.href("/console/dead-letters", Some(9)),
            "/console/dead-letters?reason=rejected&code=90033&account=a+b&since=2026-01-02T03%3A04&after=9"
        );
        assert_eq!(FilterQuery::default().href("/x", None), "/x");
        let bad = FilterQuery {
            code: "x".into(),
            ..FilterQuery::default()
        };
        assert!(bad.filter().unwrap_err().contains("code"));
    }

    fn serde_urlencoded_like(s: &str) -> FilterQuery {
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(s.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let mut q = FilterQuery::from_pairs(&pairs);
        q.after = pairs
            .iter()
            .find(|(k, _)| k == "after")
            .and_then(|(_, v)| v.parse().ok());
        q
    }

    #[test]
    fn times_in_three_forms() {
        assert_eq!(parse_time("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_time("2026-01-02T03:04:05Z").unwrap(),
            parse_time("2026-01-02T03:04:05").unwrap()
        );
        assert_eq!(
            parse_time("2026-01-02T03:04").unwrap(),
            parse_time("2026-01-02T03:04:00Z").unwrap()
        );
        assert!(parse_time("yesterday").is_err());
        assert_eq!(show_time(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(show_time(None), "–");
    }

    #[test]
    fn targets_of_a_form() {
        let t = Target::from_form(b"scope=selected&ids=3&ids=5&csrf=x").unwrap();
        assert_eq!(t.filter.ids, Some(vec![3, 5]));
        assert!(!t.confirmed());
        assert!(Target::from_form(b"scope=selected").is_err());
        assert!(Target::from_form(b"scope=selected&ids=x").is_err());
        // Everything matching, bounded by the confirmation's time.
        let t = Target::from_form(
            b"scope=matching&reason=rejected&until=5000&asof=4000&before=9&confirm=yes",
        )
        .unwrap();
        assert_eq!(t.filter.reason.as_deref(), Some("rejected"));
        assert_eq!(t.filter.until_ms, Some(4000));
        assert!(t.confirmed());
        let t = Target::from_form(b"scope=matching&asof=4000").unwrap();
        assert_eq!(t.filter.until_ms, Some(4000));
        assert!(Target::from_form(b"ids=1").is_err());
        assert!(Target::from_form(b"scope=matching&before=x").is_err());
        // A confirmation must carry its count's end.
        assert!(Target::from_form(b"scope=matching&asof=4000&confirm=yes").is_err());
        assert!(Target::from_form(b"scope=selected&ids=3&confirm=yes").is_err());
    }

    /// The inputs of `form` as a posted body.
    fn posted(form: &str) -> String {
        let attr = |input: &str, name: &str| {
            let at = input.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            input[at..at + input[at..].find('"').unwrap()].to_string()
        };
        form.split("<input")
            .skip(1)
            .map(|i| format!("{}={}", attr(i, "name"), attr(i, "value")))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// A confirmation carries the bounds it counted with: the page's time and
    /// the store's end, so the action takes nothing the count did not.
    #[test]
    fn a_confirmation_repeats_the_bounds_of_its_count() {
        let mut t = Target::from_form(b"scope=matching&reason=rejected&asof=4000").unwrap();
        t.filter.before_id = Some(17);
        let again = Target::from_form(posted(&t.hidden().into_string()).as_bytes()).unwrap();
        assert!(again.confirmed());
        assert_eq!(again.filter, t.filter);
        assert_eq!(again.filter.until_ms, Some(4000));
        assert_eq!(again.filter.before_id, Some(17));
        let mut t = Target::from_form(b"scope=selected&ids=3&ids=20").unwrap();
        t.filter.before_id = Some(10);
        let again = Target::from_form(posted(&t.hidden().into_string()).as_bytes()).unwrap();
        assert_eq!(again.filter, t.filter);
    }

    #[test]
    fn bodies_that_are_not_utf8_are_said_to_be() {
        assert_eq!(
            hex_dump(b"ab\xff"),
            format!("00000000  {:<47}  ab.\n", "61 62 ff")
        );
        assert_eq!(cut("héllo", 2), "hé…");
        assert_eq!(cut("hé", 2), "hé");
        assert_eq!(cut("hél", 2), "hé…");
    }
}
