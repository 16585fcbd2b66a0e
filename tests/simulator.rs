//! The simulator over HTTP: every code it answers, and UserSigs built
//! independently of imattr's signer.

mod common;

use std::io::Write;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use imattr::simulator::{Faults, SimHandle, SimOptions, Simulator, DEFAULT_SECRET_KEY};
use sha2::Sha256;

const APPID: u64 = 1400000000;

/// TLSSigAPIv2 built by hand from the documented algorithm, as Tencent's official libraries do it.
fn hand_sig(key: &str, appid: u64, id: &str, time: u64, expire: u64) -> String {
    let content = format!(
        "TLS.identifier:{id}\nTLS.sdkappid:{appid}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(content.as_bytes());
    let sig = STANDARD.encode(mac.finalize().into_bytes());
    // Field order and spacing as the official Python library writes them.
    let doc = format!(
        r#"{{"TLS.ver": "2.0", "TLS.identifier": "{id}", "TLS.sdkappid": {appid}, "TLS.expire": {expire}, "TLS.time": {time}, "TLS.sig": "{sig}"}}"#
    );
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(doc.as_bytes()).unwrap();
    STANDARD
        .encode(z.finish().unwrap())
        .replace('+', "*")
        .replace('/', "-")
        .replace('=', "_")
}

fn now() -> u64 {
    imattr::tencent::usersig::unix_now()
}

async fn sim(faults: Faults) -> SimHandle {
    Simulator::start(SimOptions {
        attr_names: vec!["sex".into(), "city".into()],
        faults,
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

struct Req<'a> {
    api: &'a str,
    usersig: String,
    identifier: &'a str,
    sdkappid: String,
    random: &'a str,
    contenttype: &'a str,
    body: String,
}

impl Req<'_> {
    fn ok(api: &str, body: &str) -> Req<'static> {
        Req {
            api: Box::leak(api.to_string().into_boxed_str()),
            usersig: hand_sig(DEFAULT_SECRET_KEY, APPID, "administrator", now(), 86400),
            identifier: "administrator",
            sdkappid: APPID.to_string(),
            random: "4294967295",
            contenttype: "json",
            body: body.to_string(),
        }
    }
}

/// An HTTP client that sets no timer of its own (no idle-connection
/// timeout): on paused time the clock then moves only for the simulator's
/// own timers (latency), never while a request is on its way.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(None)
        .build()
        .unwrap()
}

async fn send(sim: &SimHandle, r: &Req<'_>) -> (u16, serde_json::Value) {
    let url = format!(
        "{}/v4/all_member_push/{}?usersig={}&identifier={}&sdkappid={}&random={}&contenttype={}",
        sim.url(),
        r.api,
        r.usersig,
        r.identifier,
        r.sdkappid,
        r.random,
        r.contenttype
    );
    let resp = http().post(url).body(r.body.clone()).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

async fn code(sim: &SimHandle, r: &Req<'_>) -> i64 {
    let (status, body) = send(sim, r).await;
    assert_eq!(status, 200, "{body}");
    body["ErrorCode"].as_i64().unwrap()
}

const SET: &str = r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}}]}"#;

#[tokio::test]
async fn accepts_hand_built_usersigs_and_applies() {
    let s = sim(Faults::default()).await;
    let r = Req::ok("im_set_attr", SET);
    assert_eq!(code(&s, &r).await, 0);
    assert_eq!(s.state()["a"]["sex"], "m");
    let (_, body) = send(&s, &Req::ok("im_get_attr", r#"{"To_Account":["a","b"]}"#)).await;
    assert_eq!(body["UserAttrs"][0]["Attrs"]["sex"], "m");
    assert_eq!(body["UserAttrs"][1]["To_Account"], "b");
    let (_, body) = send(&s, &Req::ok("im_get_attr_name", "{}")).await;
    assert_eq!(body["AttrNames"]["1"], "city");
    assert_eq!(
        code(
            &s,
            &Req::ok("im_set_attr_name", r#"{"AttrNames":{"2":"level"}}"#)
        )
        .await,
        0
    );
    assert_eq!(
        code(
            &s,
            &Req::ok(
                "im_set_attr",
                r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"level":"3"}}]}"#
            )
        )
        .await,
        0
    );
    assert_eq!(
        code(
            &s,
            &Req::ok(
                "im_remove_attr",
                r#"{"UserAttrs":[{"To_Account":"a","Attrs":["sex"]}]}"#
            )
        )
        .await,
        0
    );
    assert_eq!(s.state()["a"].len(), 1);
    assert_eq!(s.state()["a"]["level"], "3");
    // The documented test vector verifies (its HMAC is right) but expired long ago.
    let mut r = Req::ok("im_set_attr", SET);
    r.usersig = hand_sig(
        DEFAULT_SECRET_KEY,
        APPID,
        "administrator",
        1700000000,
        86400,
    );
    assert_eq!(code(&s, &r).await, 70001);
    // Our own signer's usersig is accepted too.
    let mut r = Req::ok("im_set_attr", SET);
    r.usersig = imattr::tencent::usersig::gen_usersig_at(
        DEFAULT_SECRET_KEY,
        APPID,
        "administrator",
        now(),
        3600,
    );
    assert_eq!(code(&s, &r).await, 0);
    let stats = s.stats();
    assert_eq!(stats.count("im_set_attr", 0), 3);
    assert_eq!(stats.count("im_set_attr", 70001), 1);
    let http_stats: serde_json::Value = reqwest::get(format!("{}/__simulator/stats", s.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http_stats["requests"]["im_set_attr"]["0"], 3);
    assert_eq!(http_stats["regressions"], 0);
    assert_eq!(http_stats["overlapping_account_requests"], 0);
    let http_state: serde_json::Value = reqwest::get(format!("{}/__simulator/state", s.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http_state["a"]["level"], "3");
}

#[tokio::test]
async fn query_and_signature_checks() {
    let s = sim(Faults::default()).await;
    let base = || Req::ok("im_set_attr", SET);
    let mut r = base();
    r.random = "";
    assert_eq!(code(&s, &r).await, 60002, "missing random");
    let mut r = base();
    r.random = "4294967296";
    assert_eq!(code(&s, &r).await, 60002, "random over u32");
    let mut r = base();
    r.contenttype = "xml";
    assert_eq!(code(&s, &r).await, 60002, "contenttype");
    let mut r = base();
    r.sdkappid = "1400000001".into();
    assert_eq!(code(&s, &r).await, 70020, "unknown sdkappid");
    let mut r = base();
    r.usersig = "not!a!sig".into();
    assert_eq!(code(&s, &r).await, 70003, "undecodable");
    let mut r = base();
    r.usersig = hand_sig("another-key", APPID, "administrator", now(), 86400);
    assert_eq!(code(&s, &r).await, 70005, "bad HMAC");
    let mut r = base();
    r.usersig = hand_sig(DEFAULT_SECRET_KEY, APPID, "administrator", now() - 1000, 10);
    assert_eq!(code(&s, &r).await, 70001, "expired");
    let mut r = base();
    r.usersig = hand_sig(DEFAULT_SECRET_KEY, APPID, "someone", now(), 86400);
    assert_eq!(code(&s, &r).await, 70013, "identifier differs");
    let mut r = base();
    r.usersig = hand_sig(
        DEFAULT_SECRET_KEY,
        1400000009,
        "administrator",
        now(),
        86400,
    );
    assert_eq!(code(&s, &r).await, 70014, "sdkappid differs");
    let mut r = base();
    r.identifier = "someone";
    r.usersig = hand_sig(DEFAULT_SECRET_KEY, APPID, "someone", now(), 86400);
    assert_eq!(code(&s, &r).await, 60010, "not the admin");
    assert_eq!(send(&s, &Req::ok("im_unknown", "{}")).await.0, 404);
}

#[tokio::test]
async fn body_checks() {
    let s = sim(Faults {
        max_accounts: 3,
        reject_attrs: vec!["city".into()],
        ..Faults::default()
    })
    .await;
    let req = |b: &str| Req::ok("im_set_attr", b);
    assert_eq!(code(&s, &req("{not json")).await, 90001);
    let four = r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}},{"To_Account":"b","Attrs":{"sex":"m"}},{"To_Account":"c","Attrs":{"sex":"m"}},{"To_Account":"d","Attrs":{"sex":"m"}}]}"#;
    assert_eq!(code(&s, &req(four)).await, 90018);
    assert_eq!(
        code(
            &s,
            &req(r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"age":"1"}}]}"#)
        )
        .await,
        90033,
        "unregistered"
    );
    let long = format!(
        r#"{{"UserAttrs":[{{"To_Account":"a","Attrs":{{"sex":"{}"}}}}]}}"#,
        "v".repeat(51)
    );
    assert_eq!(code(&s, &req(&long)).await, 90033, "value over 50 bytes");
    let eleven: String = (0..11)
        .map(|i| format!("\"k{i}\":\"v\""))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        code(
            &s,
            &req(&format!(
                r#"{{"UserAttrs":[{{"To_Account":"a","Attrs":{{{eleven}}}}}]}}"#
            ))
        )
        .await,
        90033,
        "over 10 names"
    );
    assert_eq!(
        code(
            &s,
            &req(r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"city":"x"}}]}"#)
        )
        .await,
        90033,
        "--reject-attr"
    );
    assert!(s.state().is_empty(), "a refused request writes nothing");
}

/// On paused time: the limiter's window is decided by the order of the
/// requests, not by how fast this machine sends them.
#[tokio::test(start_paused = true)]
async fn injected_faults() {
    let s = sim(Faults {
        rate_limit: 5,
        ..Faults::default()
    })
    .await;
    // All eight within one (frozen) second: five pass, three are refused.
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(code(&s, &Req::ok("im_set_attr", SET)).await);
    }
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 5, "{codes:?}");
    assert_eq!(
        codes.iter().filter(|c| **c == 60007).count(),
        3,
        "{codes:?}"
    );
    // The limit is per API.
    assert_eq!(code(&s, &Req::ok("im_get_attr_name", "{}")).await, 0);
    // A second later the window has moved on: admitted again.
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);

    s.set_faults(Faults {
        rate_limit: 0,
        misconfigured: true,
        ..Faults::default()
    });
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 90009);
    s.set_faults(Faults {
        rate_limit: 0,
        fail_rate: 1.0,
        ..Faults::default()
    });
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 91000);
    s.set_faults(Faults {
        rate_limit: 0,
        http_error_rate: 1.0,
        ..Faults::default()
    });
    assert_eq!(send(&s, &Req::ok("im_set_attr", SET)).await.0, 500);
    s.set_faults(Faults {
        rate_limit: 0,
        latency_ms: (150, 150),
        ..Faults::default()
    });
    let t = tokio::time::Instant::now();
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
    let took = t.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(150)
            && took < std::time::Duration::from_millis(151),
        "{took:?}"
    );
    assert_eq!(s.stats().count("im_set_attr", -500), 1);
}

#[tokio::test]
async fn pause_refuses_connections_and_resume_keeps_state() {
    let mut s = sim(Faults::default()).await;
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
    let url = s.url();
    s.pause().await;
    assert!(reqwest::get(format!("{url}/__simulator/stats"))
        .await
        .is_err());
    s.resume().await.unwrap();
    assert_eq!(s.url(), url);
    assert_eq!(s.state()["a"]["sex"], "m");
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
}

fn set_body(account: &str, attr: &str, value: &str) -> String {
    format!(r#"{{"UserAttrs":[{{"To_Account":"{account}","Attrs":{{"{attr}":"{value}"}}}}]}}"#)
}

async fn http_stats(url: &str) -> serde_json::Value {
    reqwest::get(format!("{url}/__simulator/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn integer_values_going_backwards_are_counted_as_regressions() {
    let s = sim(Faults::default()).await;
    for v in ["5", "9", "3", "4", "x", "1"] {
        assert_eq!(
            code(&s, &Req::ok("im_set_attr", &set_body("a", "sex", v))).await,
            0
        );
    }
    assert_eq!(
        code(&s, &Req::ok("im_set_attr", &set_body("b", "sex", "0"))).await,
        0
    );
    // Only 9 → 3: "x" is no integer, so neither 4 → x nor x → 1 compares.
    assert_eq!(s.stats().regressions, 1);
    assert_eq!(http_stats(&s.url()).await["regressions"], 1);
}

#[tokio::test]
async fn a_failing_account_answers_91000_until_it_is_cleared() {
    let s = sim(Faults {
        fail_accounts: vec!["bad".into()],
        ..Faults::default()
    })
    .await;
    let two = r#"{"UserAttrs":[{"To_Account":"ok","Attrs":{"sex":"m"}},{"To_Account":"bad","Attrs":{"sex":"m"}}]}"#;
    assert_eq!(code(&s, &Req::ok("im_set_attr", two)).await, 91000);
    assert!(s.state().is_empty(), "nothing of the request was applied");
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
    s.update_faults(|f| f.fail_accounts.clear());
    assert_eq!(code(&s, &Req::ok("im_set_attr", two)).await, 0);
    assert_eq!(s.state().len(), 3);
}

/// Requests on separate keep-alive connections of one client are served
/// at once: one request's latency holds up no other connection. On paused
/// time the clock moves only once all four wait on their latency.
#[tokio::test(start_paused = true)]
async fn connections_are_served_concurrently() {
    let s = sim(Faults {
        latency_ms: (300, 300),
        rate_limit: 0,
        ..Faults::default()
    })
    .await;
    let client = http();
    let t = tokio::time::Instant::now();
    let reqs = ["a", "b", "c", "d"].map(|a| {
        let r = Req::ok("im_set_attr", &set_body(a, "sex", "m"));
        let url = format!(
            "{}/v4/all_member_push/im_set_attr?usersig={}&identifier=administrator&sdkappid={APPID}&random=1&contenttype=json",
            s.url(),
            r.usersig
        );
        client.post(url).body(r.body).send()
    });
    for r in futures_util::future::join_all(reqs).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(s.state().len(), 4);
    assert_eq!(s.stats().max_concurrent_requests, 4);
    // One latency for all four, not four in a row.
    let took = t.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(300)
            && took < std::time::Duration::from_millis(301),
        "{took:?}"
    );
}

/// Reads the address `imattr simulate` prints first on stdout.
async fn spawn_simulate(args: &[&str]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = common::imattr(&common::base_config())
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    (child, url)
}

async fn post_raw(url: &str, api: &str, body: &str) -> reqwest::Response {
    let sig = hand_sig(DEFAULT_SECRET_KEY, APPID, "administrator", now(), 86400);
    let url = format!(
        "{url}/v4/all_member_push/{api}?usersig={sig}&identifier=administrator&sdkappid={APPID}&random=1&contenttype=json"
    );
    http()
        .post(url)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn post(url: &str, api: &str, body: &str) -> i64 {
    let v: serde_json::Value = post_raw(url, api, body).await.json().await.unwrap();
    v["ErrorCode"].as_i64().unwrap()
}

#[tokio::test]
async fn simulate_as_a_process_prints_its_address_and_takes_every_fault() {
    let (mut child, url) = spawn_simulate(&[
        "--attr-names",
        "sex,city",
        "--fail-account",
        "bad",
        "--fail-account",
        "worse",
        "--reject-attr",
        "city",
        "--max-accounts",
        "1",
        "--latency-ms",
        "1..3",
        "--fail-rate",
        "0",
        "--http-error-rate",
        "0",
        "--rate-limit",
        "5",
        "--rate-limit-mode",
        "strict",
        "--rate-limit-scope",
        "shared",
        "--reject-account",
        "refused",
    ])
    .await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let two = r#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}},{"To_Account":"b","Attrs":{"sex":"m"}}]}"#;
    let codes = [
        post(&url, "im_set_attr", &set_body("bad", "sex", "m")).await,
        post(&url, "im_set_attr", &set_body("worse", "sex", "m")).await,
        post(&url, "im_set_attr", &set_body("a", "city", "x")).await,
        post(&url, "im_set_attr", two).await,
        post(&url, "im_set_attr", &set_body("a", "sex", "m")).await,
    ];
    assert_eq!(codes, [91000, 91000, 90033, 90018, 0]);
    // The rate limit and the latency act in time, which a process cannot
    // pause: that they were taken is read back; how the limiter counts is
    // tested on paused time (`injected_faults`).
    let faults: Faults = http()
        .get(format!("{url}/__simulator/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        faults,
        Faults {
            fail_rate: 0.0,
            http_error_rate: 0.0,
            latency_ms: (1, 3),
            rate_limit: 5,
            rate_limit_mode: imattr::simulator::RateLimitMode::Strict,
            rate_limit_scope: imattr::simulator::RateLimitScope::Shared,
            max_accounts: 1,
            reject_attrs: vec!["city".into()],
            misconfigured: false,
            fail_accounts: vec!["bad".into(), "worse".into()],
            reject_accounts: vec!["refused".into()],
        }
    );
    let stats = http_stats(&url).await;
    assert_eq!(stats["requests"]["im_set_attr"]["0"], 1, "{stats}");
    assert_eq!(stats["regressions"], 0);
    // Faults change while it runs: the failing account is cleared (and
    // the rate limit, which five requests used up, with it).
    let cleared = Faults {
        fail_accounts: Vec::new(),
        rate_limit: 0,
        ..faults
    };
    let r = http()
        .post(format!("{url}/__simulator/faults"))
        .json(&cleared)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    assert_eq!(
        post(&url, "im_set_attr", &set_body("bad", "sex", "m")).await,
        0
    );
    child.kill().await.unwrap();

    let (mut child, url) = spawn_simulate(&["--misconfigured"]).await;
    assert_eq!(post(&url, "im_get_attr_name", "{}").await, 90009);
    child.kill().await.unwrap();
    let (mut child, url) =
        spawn_simulate(&["--http-error-rate", "1", "--rate-limit-mode", "lenient"]).await;
    assert_eq!(post_raw(&url, "im_get_attr_name", "{}").await.status(), 500);
    let faults: Faults = http()
        .get(format!("{url}/__simulator/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        faults.rate_limit_mode,
        imattr::simulator::RateLimitMode::Lenient
    );
    child.kill().await.unwrap();
}

/// On paused time: "for a while" is 300 ms of the simulator's clock, however
/// slowly this machine sends the requests in between.
#[tokio::test(start_paused = true)]
async fn the_refuse_control_refuses_everything_for_a_while() {
    let s = sim(Faults::default()).await;
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
    let r = http()
        .post(format!("{}/__simulator/refuse?ms=300", s.url()))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 60007);
    assert_eq!(code(&s, &Req::ok("im_get_attr_name", "{}")).await, 60007);
    tokio::time::advance(std::time::Duration::from_millis(299)).await;
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 60007);
    tokio::time::advance(std::time::Duration::from_millis(1)).await;
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
}
