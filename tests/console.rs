//! The web console in a real browser (headless Chromium through WebDriver),
//! against `imattr run` and `imattr console` child processes, RabbitMQ and
//! the simulator. Each test saves screenshots of the pages it sees
//! (target/tmp/console-screenshots; docs/console/ with IMATTR_UPDATE_SCREENSHOTS=1).

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use browser::{free_port, Browser};
use common::*;
use imattr::amqp::deadletter::{dead_letter_properties, Failure, Reason};
use imattr::amqp::topology;
use imattr::config::{Config, Secret};
use imattr::publish::{update_properties, Publisher};

/// `imattr console` on a free loopback port, as a child; its base URL.
async fn console_alone(config: &Config) -> (tokio::process::Child, String) {
    let port = free_port();
    let child = imattr(config)
        .args(["console", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_listening(&base).await;
    (child, base)
}

async fn wait_listening(base: &str) {
    until(Duration::from_secs(30), "the console listening", || async {
        reqwest::get(format!("{base}/console/assets/console.css"))
            .await
            .is_ok()
    })
    .await;
}

/// A counter's value in a worker's `/metrics`.
async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn number(text: &str) -> f64 {
    text.trim().parse().unwrap_or(f64::NAN)
}

/// The overview's numbers move while a backlog drains, without reloading
/// the page, and end equal to `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_moves_while_a_backlog_drains() {
    // Slow enough to be watched: 10 accounts a request, 20 requests a second.
    let faults = Faults {
        latency_ms: (5, 15),
        ..Faults::default()
    };
    let sb = sandbox(&["n"], faults, |c| {
        c.batch.max_accounts = 10;
        c.tencent.rate_limit_per_sec = 20;
        c.tencent.max_in_flight = 4;
        // Part of the backlog stays ready in the queue, part is held unacked.
        c.amqp.prefetch = 500;
        c.console.enabled = true;
    })
    .await;
    let n = 3000;
    for i in 0..n {
        sb.publish(update(&format!("acc{i}"), &[("n", "1")]))
            .await
            .unwrap();
    }
    sb.confirm().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::spawn(&sb.config, dir.path(), 0);
    let base = format!("http://{}", worker.admin);
    wait_listening(&base).await;

    let b = Browser::start().await;
    b.goto(&format!("{base}/console/")).await;
    // A mark that a reload would wipe.
    b.js("window.__stayed = true; return null;", vec![]).await;
    b.wait_text("#worker-state", Duration::from_secs(30), "active", |t| {
        t == "active"
    })
    .await;
    let node = b.text("#worker-node").await;
    assert!(node.contains(':'), "the broker node as host:port: {node}");
    let first = b
        .wait_text(
            "#total-applied",
            Duration::from_secs(30),
            "some applied",
            |t| number(t) > 0.0,
        )
        .await;
    let second = b
        .wait_text(
            "#total-applied",
            Duration::from_secs(30),
            "more applied, without a reload",
            |t| number(t) > number(&first),
        )
        .await;
    assert!(number(&second) < n as f64, "still draining: {second}");
    // Charts drawn from several readings.
    b.wait_text("#now-applied", Duration::from_secs(30), "a rate", |t| {
        number(t) > 0.0
    })
    .await;
    let points = b
        .js(
            "return document.querySelector('#chart-applied polyline').getAttribute('points');",
            vec![],
        )
        .await;
    assert!(points.as_str().is_some_and(|p| p.contains(',')), "{points}");
    let ready = b.text("#now-ready").await;
    assert!(number(&ready) > 0.0, "a backlog still queued: {ready}");
    let unacked = b.text("#now-unacked").await;
    assert!(number(&unacked) > 0.0, "some held by the worker: {unacked}");
    b.screenshot("overview").await;
    assert_eq!(
        b.js("return window.__stayed === true;", vec![]).await,
        serde_json::json!(true),
        "the page was reloaded"
    );

    sb.wait_drained(DRAIN).await.ok();
    // Ends equal to /metrics (the page refreshes itself).
    let acked = metric(&base, "imattr_messages_acked_total").await;
    assert!(acked >= n as f64, "{acked}");
    b.wait_text(
        "#total-applied",
        Duration::from_secs(30),
        "the page agreeing with /metrics",
        |t| number(t) == acked,
    )
    .await;
    let refused = metric(&base, "imattr_rate_limited_total").await;
    b.wait_text(
        "#total-refused",
        Duration::from_secs(30),
        "refusals as /metrics",
        |t| number(t) == refused,
    )
    .await;
    b.close().await;
    drop(worker);
    sb.cleanup().await.unwrap();
}

/// A form on another origin that posts to the console (a forged request),
/// and a form of the console's own page without the CSRF token, are refused;
/// the same form with the token passes the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_and_tokenless_posts_are_refused() {
    let sb = sandbox(&["n"], Faults::default(), |_| {}).await;
    let (_console, base) = console_alone(&sb.config).await;
    let target = format!("{base}/console/dead-letters/delete");

    let b = Browser::start().await;
    b.goto(&format!("{base}/console/")).await;
    let token = b
        .js(
            "return document.querySelector('meta[name=csrf-token]').content;",
            vec![],
        )
        .await;
    let token = token.as_str().unwrap().to_string();
    assert_eq!(token.len(), 64);

    // Another origin (another port): even with the right token, refused.
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_addr = evil.local_addr().unwrap();
    let page = format!(
        "<!DOCTYPE html><form method=post action=\"{target}\">\
         <input type=hidden name=csrf value=\"{token}\"><input type=hidden name=scope value=matching>\
         <button id=go>go</button></form>"
    );
    let evil_app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    tokio::spawn(async move { axum::serve(evil, evil_app).await });
    b.goto(&format!("http://{evil_addr}/")).await;
    b.client
        .find(fantoccini::Locator::Css("#go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let text = b
        .wait_text("body", Duration::from_secs(10), "the answer", |t| {
            t.contains("refused")
        })
        .await;
    assert!(text.contains("not a same-origin request"), "{text}");
    b.screenshot("refused-cross-origin").await;

    // The console's own page, a form without the token.
    b.goto(&format!("{base}/console/")).await;
    let submit = "const f = document.createElement('form'); f.method = 'post'; \
                  f.action = arguments[0]; \
                  if (arguments[1]) { const i = document.createElement('input'); i.type = 'hidden'; \
                  i.name = 'csrf'; i.value = arguments[1]; f.appendChild(i); } \
                  document.body.appendChild(f); f.submit(); return null;";
    b.js(submit, vec![target.clone().into(), serde_json::Value::Null])
        .await;
    let text = b
        .wait_text("body", Duration::from_secs(10), "the answer", |t| {
            t.contains("refused")
        })
        .await;
    assert!(text.contains("CSRF token"), "{text}");

    // The same with the token passes the gate (whatever the action says).
    b.goto(&format!("{base}/console/")).await;
    b.js(submit, vec![target.clone().into(), token.clone().into()])
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = b.body().await;
    assert!(!text.contains("refused"), "{text}");

    // Without a browser's headers (a script): refused too.
    let r = reqwest::Client::new()
        .post(&target)
        .header("x-csrf-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    b.close().await;
    sb.cleanup().await.unwrap();
}

/// Read-only: the page says so and every POST is refused, token or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_shows_and_takes_no_action() {
    let sb = sandbox(&["n"], Faults::default(), |c| {
        c.console.read_only = true;
    })
    .await;
    let (_console, base) = console_alone(&sb.config).await;
    let b = Browser::start().await;
    b.goto(&format!("{base}/console/")).await;
    assert!(b.has("#read-only").await);
    assert!(!b.has("form[method=post]").await);
    let token = b
        .js(
            "return document.querySelector('meta[name=csrf-token]').content;",
            vec![],
        )
        .await;
    let status = b
        .js(
            "return fetch('/console/dead-letters/delete', {method: 'POST', \
             headers: {'x-csrf-token': arguments[0]}}).then(r => r.text().then(t => [r.status, t]));",
            vec![token],
        )
        .await;
    assert_eq!(status[0], 403, "{status}");
    assert!(
        status[1].as_str().unwrap().contains("read-only"),
        "{status}"
    );
    b.screenshot("read-only").await;
    b.close().await;
    sb.cleanup().await.unwrap();
}

/// A listener that is not loopback does not start without authentication
/// (exit 2, saying why), for `imattr console` and for `imattr run`; with a
/// token it starts and asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_needs_authentication() {
    let mut config = base_config();
    let listen = format!("0.0.0.0:{}", free_port());
    let refused = |config: Config, args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::time::timeout(Duration::from_secs(60), imattr_output(&config, &args))
            .await
            .expect("it started instead of refusing")
    };
    let (code, _, err) = refused(
        config.clone(),
        vec!["console".into(), "--listen".into(), listen.clone()],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a loopback address"), "{err}");

    let sb = sandbox(&["n"], Faults::default(), |c| {
        c.console.enabled = true;
        c.admin.listen = listen.clone();
    })
    .await;
    let (code, _, err) = refused(sb.config.clone(), vec!["run".into()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a loopback address"), "{err}");

    config.console.token = Secret::new("t0ken-for-the-test");
    let port = free_port();
    let _child = imattr(&config)
        .args(["console", "--listen", &format!("0.0.0.0:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_listening(&base).await;
    let r = reqwest::get(format!("{base}/console/")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = reqwest::Client::new()
        .get(format!("{base}/console/"))
        .bearer_auth("t0ken-for-the-test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    let page = r.text().await.unwrap();
    assert!(
        !page.contains("t0ken-for-the-test"),
        "the token is rendered"
    );
    // A browser logs in with the token as the basic password.
    let b = Browser::start().await;
    b.goto(&format!(
        "http://operator:t0ken-for-the-test@127.0.0.1:{port}/console/"
    ))
    .await;
    assert_eq!(b.text(".who").await, "token");
    b.close().await;
    sb.cleanup().await.unwrap();
}

/// The dead letters' rows in the table now.
/// Stores an `invalid-message` dead letter for `account` as the worker
/// does (into the stream by name, confirmed), failed at Unix ms 1.
async fn store_dead_letter_failed_long_ago(c: &Config, account: &str) {
    let conn = topology::connect(&c.amqp, "test dead letter")
        .await
        .unwrap();
    let mut p = Publisher::new(&conn, "").await.unwrap();
    let f = Failure {
        reason: Reason::InvalidMessage,
        code: 0,
        error: "stored late".into(),
        account: Some(account.into()),
        attempts: 1,
    };
    let props = dead_letter_properties(&update_properties(), &f, &[], &c.amqp.queue, account, 1);
    p.publish(&c.amqp.dead_letter_queue, b"{late", props)
        .await
        .unwrap();
    p.finish().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}

async fn rows(b: &Browser) -> Vec<String> {
    let v = b
        .js(
            "return Array.from(document.querySelectorAll('#rows tr[data-id] td.account')).map(e => e.textContent);",
            vec![],
        )
        .await;
    serde_json::from_value(v).unwrap()
}

async fn click(b: &Browser, css: &str) {
    b.client
        .find(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// The table, its filters, the grouped view and a dead letter's page;
/// replaying selected rows changes the API's state and takes them out of
/// the store; deleting everything matching names the count first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_filtered_shown_replayed_and_deleted() {
    let faults = Faults {
        reject_accounts: vec!["bad1".into(), "bad2".into(), "bad3".into()],
        ..Faults::default()
    };
    let sb = sandbox(&["n"], faults, |c| c.console.enabled = true).await;
    for a in ["bad1", "bad2", "bad3"] {
        sb.publish(update(a, &[("n", "7")])).await.unwrap();
    }
    sb.publish(b"{not json".as_slice()).await.unwrap();
    sb.publish(b"\xff\xfe\x00binary".as_slice()).await.unwrap();
    sb.confirm().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::spawn(&sb.config, dir.path(), 0);
    let base = format!("http://{}", worker.admin);
    wait_listening(&base).await;
    until(Duration::from_secs(60), "five dead letters", || async {
        let Ok(r) = reqwest::get(format!("{base}/console/api/dead-letters/stats")).await else {
            return false;
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        v["total"] == 5
    })
    .await;

    let b = Browser::start().await;
    b.goto(&format!("{base}/console/dead-letters")).await;
    assert_eq!(rows(&b).await.len(), 5);
    b.wait_text(
        "#matching-count",
        Duration::from_secs(30),
        "the count",
        |t| t == "5",
    )
    .await;
    b.screenshot("dead-letters").await;

    // A filter narrows the table, and stays in the URL.
    b.js(
        "document.querySelector('#filters select[name=reason]').value = 'rejected'; return null;",
        vec![],
    )
    .await;
    click(&b, "#apply-filter").await;
    b.wait_text(
        "#matching-count",
        Duration::from_secs(30),
        "filtered",
        |t| t == "3",
    )
    .await;
    let url = b.client.current_url().await.unwrap();
    assert!(url.as_str().contains("reason=rejected"), "{url}");
    let mut accounts = rows(&b).await;
    accounts.sort();
    assert_eq!(accounts, ["bad1", "bad2", "bad3"]);
    b.goto(&format!("{base}/console/dead-letters?account=bad2"))
        .await;
    assert_eq!(rows(&b).await, ["bad2"]);

    // Grouped by error.
    b.goto(&format!("{base}/console/dead-letters/groups")).await;
    assert_eq!(b.text("#group-total").await, "5");
    let by_reason = b.text("#by-reason").await;
    assert!(
        by_reason.contains("rejected 3") && by_reason.contains("invalid-message 2"),
        "{by_reason}"
    );
    b.screenshot("dead-letters-grouped").await;

    // The body that is not UTF-8 is shown as such.
    b.goto(&format!(
        "{base}/console/dead-letters?reason=invalid-message"
    ))
    .await;
    let id = b
        .js(
            "return Array.from(document.querySelectorAll('#rows tr[data-id]')).find(r => r.textContent.includes('(not UTF-8)')).dataset.id;",
            vec![],
        )
        .await;
    let id = id.as_str().unwrap().to_string();
    b.goto(&format!("{base}/console/dead-letters/{id}")).await;
    assert!(b.text("#body-binary").await.contains("Not UTF-8: 9 bytes"));
    assert!(b.text("#body").await.contains("ff fe 00"));
    assert!(b.text("#headers").await.contains("x-imattr-reason"));
    b.screenshot("dead-letter").await;

    // Replay two selected rows, once the API accepts them.
    sb.sim.set_faults(Faults::default());
    b.goto(&format!("{base}/console/dead-letters?reason=rejected"))
        .await;
    b.js(
        "document.querySelectorAll('#rows tr[data-id]').forEach(r => { \
           if (['bad1','bad2'].includes(r.querySelector('td.account').textContent)) \
             r.querySelector('input.row-select').click(); }); return null;",
        vec![],
    )
    .await;
    click(&b, "#replay-selected").await;
    assert_eq!(b.text("#confirm-count").await, "2");
    b.screenshot("replay-confirm").await;
    click(&b, "#confirm-replay").await;
    b.wait_text(
        "#job-state",
        Duration::from_secs(60),
        "the replay done",
        |t| t == "done",
    )
    .await;
    assert_eq!(b.text("#job-moved").await, "2");
    b.screenshot("replay-job").await;
    let sim = &sb.sim;
    eventually(DRAIN, "the API has bad1 and bad2", || {
        let s = sim.state();
        s.get("bad1").and_then(|a| a.get("n")).map(String::as_str) == Some("7")
            && s.get("bad2").and_then(|a| a.get("n")).map(String::as_str) == Some("7")
    })
    .await;
    b.goto(&format!("{base}/console/dead-letters?reason=rejected"))
        .await;
    assert_eq!(rows(&b).await, ["bad3"], "the replayed rows left the store");

    // Delete everything matching: the confirmation names the count.
    b.goto(&format!(
        "{base}/console/dead-letters?reason=invalid-message"
    ))
    .await;
    click(&b, "#delete-matching").await;
    assert_eq!(b.text("#confirm-count").await, "2");
    // Stored after the count, though it failed long before: the deletion
    // confirmed for 2 leaves it.
    store_dead_letter_failed_long_ago(&sb.config, "late").await;
    click(&b, "#confirm-delete").await;
    assert_eq!(b.text("#deleted-count").await, "2");
    b.goto(&format!("{base}/console/dead-letters")).await;
    assert_eq!(rows(&b).await, ["bad3", "late"]);

    // The grouped view counts what is left, then what comes after.
    b.goto(&format!("{base}/console/dead-letters/groups")).await;
    assert_eq!(b.text("#group-total").await, "2");
    sb.publish(b"{still not json".as_slice()).await.unwrap();
    sb.confirm().await.unwrap();
    until(
        Duration::from_secs(60),
        "the new dead letter counted",
        || async {
            let Ok(r) = reqwest::get(format!("{base}/console/api/dead-letters/stats")).await else {
                return false;
            };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            v["total"] == 3
        },
    )
    .await;
    b.goto(&format!("{base}/console/dead-letters/groups")).await;
    assert_eq!(b.text("#group-total").await, "3");
    let by_reason = b.text("#by-reason").await;
    assert!(
        by_reason.contains("rejected 1") && by_reason.contains("invalid-message 2"),
        "{by_reason}"
    );
    let logs = worker.logs();
    assert!(
        logs.contains("Console replayed dead letters") && logs.contains("count=2"),
        "{logs}"
    );
    assert!(logs.contains("Console deleted dead letters"), "{logs}");
    b.close().await;
    drop(worker);
    sb.cleanup().await.unwrap();
}
