//! The console's HTML, rendered on the server with maud (escaped at compile
//! time). No inline script or style: the Content-Security-Policy forbids them.

use maud::{html, Markup, DOCTYPE};

use super::Overview;

/// What every page needs.
pub(crate) struct Context {
    /// The CSRF token, for forms and the script's requests.
    pub csrf: String,
    /// `console.read_only`: no action is shown.
    pub read_only: bool,
    /// Who is looking.
    pub who: String,
    /// A worker runs in this process (`imattr run`), not `imattr console`.
    pub with_worker: bool,
}

/// Which tab is open.
#[derive(PartialEq, Eq, Clone, Copy)]
pub(crate) enum Tab {
    Overview,
    DeadLetters,
}

pub(crate) fn layout(ctx: &Context, tab: Tab, title: &str, body: Markup) -> Markup {
    let class = |t: Tab| if t == tab { "tab open" } else { "tab" };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(ctx.csrf);
                title { (title) " · imattr console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body data-read-only=(ctx.read_only) {
                header.top {
                    a.brand href="/console/" { "imattr" }
                    nav {
                        a class=(class(Tab::Overview)) href="/console/" { "Overview" }
                        a class=(class(Tab::DeadLetters)) href="/console/dead-letters" { "Dead letters" }
                    }
                    span.who { (ctx.who) }
                    @if ctx.read_only {
                        span.badge #read-only { "read-only" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A number for display: integers without a fraction, others with one or two digits.
pub(crate) fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

/// A chart the script draws: `series` are keys of the overview's `series`
/// (`prefix.*` for every key of a map).
fn chart(id: &str, title: &str, series: &str, labels: &str) -> Markup {
    html! {
        figure.chart id=(id) data-series=(series) data-labels=(labels) {
            figcaption { (title) }
            svg viewBox="0 0 600 150" preserveAspectRatio="none" role="img" aria-label=(title) {}
            div.legend {}
        }
    }
}

pub(crate) fn overview(ctx: &Context, o: &Overview) -> Markup {
    let last = o.series.t_ms.len().checked_sub(1);
    let rate = |v: &Vec<f64>| last.and_then(|i| v.get(i).copied()).map_or("–".into(), num);
    let dead_total: f64 = o.latest.dead_lettered.values().sum();
    let body = html! {
        h1 { "Overview" }
        section.state #state {
            @match &o.worker {
                Some(w) => {
                    dl {
                        dt { "Worker" }
                        dd { span #worker-state class={"state state-" (w.state)} data-field="worker.state" { (w.state) } }
                        dt { "Paused by" }
                        dd #worker-paused data-field="worker.paused" {
                            @match (&w.paused_code, &w.paused_message) {
                                (Some(code), Some(msg)) => { "ErrorCode " (code) ": " (msg) }
                                _ => { "–" }
                            }
                        }
                        dt { "Broker node" }
                        dd #worker-node data-field="worker.node" { (w.node.as_deref().unwrap_or("–")) }
                        dt { "Not ready because" }
                        dd #worker-not-ready data-field="worker.not_ready" { (w.not_ready.as_deref().unwrap_or("–")) }
                    }
                }
                None => {
                    p.note #no-worker {
                        "No worker runs in this process (" code { "imattr console" } "): the updates queue and the dead letters only."
                    }
                }
            }
            dl {
                dt { "Updates queue" }
                dd { code { (o.queue) } }
                dt { "Consumers" }
                dd #queue-consumers data-field="latest.consumers" { (opt(o.latest.consumers)) }
            }
        }
        section.tiles {
            @if ctx.with_worker {
                div.tile { span.label { "applied/s" } span.value #now-applied data-field="now.applied_per_sec" { (rate(&o.series.applied_per_sec)) } }
                div.tile { span.label { "applied, total" } span.value #total-applied data-field="latest.acked" { (num(o.latest.acked)) } }
                div.tile { span.label { "requests/s" } span.value #now-requests data-field="now.requests_per_sec" { (rate(&o.series.requests_per_sec)) } }
                div.tile { span.label { "refused (60007), total" } span.value #total-refused data-field="latest.refused" { (num(o.latest.refused)) } }
                div.tile { span.label { "retries, total" } span.value #total-retries data-field="latest.retries" { (num(o.latest.retries)) } }
                div.tile { span.label { "allowed rate /s" } span.value #now-rate-allowed data-field="latest.rate_allowed" { (num(o.latest.rate_allowed)) } }
                div.tile { span.label { "pending accounts" } span.value #now-pending data-field="latest.pending_accounts" { (num(o.latest.pending_accounts)) } }
                div.tile { span.label { "requests in flight" } span.value #now-in-flight data-field="latest.in_flight" { (num(o.latest.in_flight)) } }
            }
            div.tile { span.label { "queue ready" } span.value #now-ready data-field="latest.queue_ready" { (opt(o.latest.queue_ready)) } }
            @if ctx.with_worker {
                div.tile { span.label { "queue unacked" } span.value #now-unacked data-field="latest.queue_unacked" { (opt(o.latest.queue_unacked)) } }
                div.tile { span.label { "dead-lettered, total" } span.value #total-dead data-field="latest.dead_lettered_total" { (num(dead_total)) } }
            }
        }
        p.updated { "Last " (o.window_ms / 60_000) " minutes, a reading every " (o.every_ms / 1000) " s; updated " span #updated-at { "now" } "." }
        section.charts {
            @if ctx.with_worker {
                (chart("chart-applied", "Updates applied per second", "applied_per_sec", "applied/s"))
                (chart("chart-requests", "Requests per second", "requests_per_sec,refused_per_sec,retries_per_sec", "requests/s,refused (60007)/s,retries/s"))
                (chart("chart-rate", "Allowed rate (requests per second)", "rate_allowed", "allowed/s"))
                (chart("chart-pending", "Pending accounts", "pending_accounts", "pending"))
                (chart("chart-in-flight", "Requests in flight", "in_flight", "in flight"))
            }
            (chart("chart-queue", "Updates queue depth", "queue_ready,queue_unacked", "ready,unacked"))
            @if ctx.with_worker {
                (chart("chart-dead", "Dead letters per second, by reason", "dead_lettered_per_sec.*", ""))
            }
        }
    };
    layout(ctx, Tab::Overview, "Overview", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(3.0), "3");
        assert_eq!(num(2.5), "2.50");
        assert_eq!(num(12.345), "12.3");
    }

    #[test]
    fn text_is_escaped_and_nothing_is_inline() {
        let ctx = Context {
            csrf: "tok".into(),
            read_only: false,
            who: "<script>alert(1)</script>".into(),
            with_worker: false,
        };
        let page = layout(&ctx, Tab::Overview, "x", html! { p { "a & b" } }).into_string();
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("a &amp; b"));
        assert!(!page.contains(" style="));
        assert!(!page.contains(" onclick="));
        // The only script is the embedded file.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains(r#"<script src="/console/assets/console.js" defer>"#));
    }
}
