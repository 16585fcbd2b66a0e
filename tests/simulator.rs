//! The simulator over HTTP: every code it answers, and UserSigs built
//! independently of imattr's signer (issue 4).

use std::io::Write;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use imattr::simulator::{Faults, SimHandle, SimOptions, Simulator, DEFAULT_SECRET_KEY};
use sha2::Sha256;

const APPID: u64 = 1400000000;

/// TLSSigAPIv2 built by hand from CONTRACT §2, as Tencent's official libraries do it.
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
    let resp = reqwest::Client::new()
        .post(url)
        .body(r.body.clone())
        .send()
        .await
        .unwrap();
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
    // The CONTRACT's test vector verifies (its HMAC is right) but expired long ago.
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

#[tokio::test]
async fn injected_faults() {
    let s = sim(Faults {
        rate_limit: 5,
        ..Faults::default()
    })
    .await;
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
    let t = std::time::Instant::now();
    assert_eq!(code(&s, &Req::ok("im_set_attr", SET)).await, 0);
    assert!(t.elapsed() >= std::time::Duration::from_millis(150));
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
