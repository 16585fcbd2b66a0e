//! The API client against a real local HTTP server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::post;
use axum::Router;
use imattr::config::Secret;
use imattr::tencent::client::{api, set_attr_body};
use imattr::tencent::usersig::{unix_now, verify_usersig};
use imattr::tencent::{Class, Client, Reply, Signer};

const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";

type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>, String)>>>;
type Replies = Arc<Mutex<std::vec::IntoIter<(u16, &'static str)>>>;

/// A recording server answering each request with the next canned reply.
async fn recording_server(replies: Vec<(u16, &'static str)>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let replies = Arc::new(Mutex::new(replies.into_iter()));
    async fn handle(
        State((seen, replies)): State<(Seen, Replies)>,
        Path(api): Path<String>,
        RawQuery(q): RawQuery,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> (axum::http::StatusCode, &'static str) {
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        seen.lock()
            .unwrap()
            .push((api, q.unwrap_or_default(), body.to_vec(), ct));
        let (status, body) = replies
            .lock()
            .unwrap()
            .next()
            .unwrap_or((200, r#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#));
        (axum::http::StatusCode::from_u16(status).unwrap(), body)
    }
    let app = Router::new()
        .route("/v4/all_member_push/{api}", post(handle))
        .with_state((seen.clone(), replies));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn client(base: &str, timeout: Duration) -> Client {
    let signer = Arc::new(Signer::from_key(
        Secret::new(KEY),
        1400000000,
        "administrator",
        86400,
    ));
    Client::new(base, signer, timeout, 100, 4).unwrap()
}

#[tokio::test]
async fn exact_path_query_and_body() {
    let (base, seen) = recording_server(vec![]).await;
    let c = client(&base, Duration::from_secs(5));
    let body = set_attr_body(&[("xiaojun012", vec![("sex", "attr1"), ("city", "attr2")])]);
    let r = c.call(api::SET_ATTR, body.clone()).await;
    assert_eq!(r.class, Class::Success);
    let r2 = c.call(api::SET_ATTR, body.clone()).await;
    assert_eq!(r2.class, Class::Success);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let mut randoms = Vec::new();
    for (path_api, query, got_body, ct) in seen.iter() {
        assert_eq!(path_api, "im_set_attr");
        assert_eq!(ct, "application/json");
        assert_eq!(
            String::from_utf8(got_body.clone()).unwrap(),
            r#"{"UserAttrs":[{"To_Account":"xiaojun012","Attrs":{"sex":"attr1","city":"attr2"}}]}"#
        );
        let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let mut keys: Vec<&str> = q.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["contenttype", "identifier", "random", "sdkappid", "usersig"]
        );
        assert_eq!(q["contenttype"], "json");
        assert_eq!(q["identifier"], "administrator");
        assert_eq!(q["sdkappid"], "1400000000");
        randoms.push(q["random"].parse::<u32>().expect("random is a u32"));
        let doc = verify_usersig(&q["usersig"], KEY, 1400000000, "administrator", unix_now())
            .expect("usersig verifies");
        assert_eq!(doc.expire, 86400);
    }
    assert_ne!(randoms[0], randoms[1], "a fresh random per request");
}

#[tokio::test]
async fn answers_are_classified() {
    let (base, _) = recording_server(vec![
        (200, r#"{"ActionStatus":"FAIL","ErrorInfo":"Internal service error","ErrorCode":91000}"#),
        (200, r#"{"ActionStatus":"FAIL","ErrorInfo":"Invalid attribute","ErrorCode":90033,"Extra":1}"#),
        (502, "bad gateway"),
        (200, "<html>not json</html>"),
        (200, r#"{"ActionStatus":"FAIL","ErrorInfo":"??","ErrorCode":12345}"#),
    ])
    .await;
    let c = client(&base, Duration::from_secs(5));
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert_eq!((r.class, r.reply.code()), (Class::Transient, 91000));
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert_eq!((r.class, r.reply.code()), (Class::Rejected, 90033));
    assert_eq!(r.reply.info(), "Invalid attribute");
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert_eq!(
        (r.class, r.reply.clone()),
        (Class::Transient, Reply::HttpStatus(502))
    );
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert!(matches!(r.reply, Reply::Unparseable(_)), "{:?}", r.reply);
    assert_eq!(r.class, Class::Transient);
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert_eq!((r.class, r.reply.code()), (Class::Unknown, 12345));
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_transient_and_never_show_the_usersig() {
    // A server that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            if let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }
    });
    let c = client(&format!("http://{addr}"), Duration::from_millis(300));
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert_eq!(r.reply, Reply::Timeout);
    assert_eq!(r.class, Class::Transient);

    // Nothing listens on this port.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = client(&format!("http://{free}"), Duration::from_secs(2));
    let sig = c.signer().usersig();
    let r = c.call(api::SET_ATTR, b"{}".to_vec()).await;
    assert_eq!(r.class, Class::Transient);
    let Reply::Connection(text) = &r.reply else {
        panic!("expected a connection error, got {:?}", r.reply)
    };
    assert!(!text.contains(&sig), "{text}");
    assert!(!text.contains("usersig"), "{text}");
    assert!(!r.reply.info().contains(&sig));
    assert!(!format!("{:?}", r.reply).contains(&sig));
}

#[tokio::test]
async fn convenience_calls_renew_the_usersig_once() {
    let (base, seen) = recording_server(vec![
        (200, r#"{"ActionStatus":"FAIL","ErrorInfo":"UserSig expired","ErrorCode":70001}"#),
        (200, r#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0,"AttrNames":{"0":"sex","1":"city"}}"#),
    ])
    .await;
    let c = client(&base, Duration::from_secs(5));
    let names = c.get_attr_names().await.unwrap();
    assert_eq!(names.get("1").map(String::as_str), Some("city"));
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(
        c.signer().renewals(),
        2,
        "the usersig was generated again after 70001"
    );
}
