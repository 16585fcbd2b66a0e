//! A corpus of malformed bodies interleaved with valid ones: each
//! malformed one is dead-lettered naming its rule, the valid ones are applied,
//! and the worker stays up throughout.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;

fn corpus() -> Vec<(Vec<u8>, &'static str)> {
    let mut c: Vec<(Vec<u8>, &'static str)> = Vec::new();
    let valid = br#"{"To_Account":"a","Attrs":{"sex":"m"}}"#;
    // Binary and encoding.
    c.push((vec![0x00, 0x01, 0x02, 0xff], "not UTF-8"));
    c.push((vec![0xff; 64], "not UTF-8"));
    c.push((
        b"{\"To_Account\":\"a\xc3\",\"Attrs\":{\"sex\":\"m\"}}".to_vec(),
        "not UTF-8",
    ));
    c.push((vec![0xef, 0xbb, 0xbf, b'{', b'}'], "not valid JSON"));
    c.push((b"\x1f\x8b\x08\x00gzip".to_vec(), "not UTF-8"));
    // Truncations of a valid body at every few bytes.
    for cut in [1, 5, 12, 20, 28, 35] {
        c.push((valid[..cut].to_vec(), "not valid JSON"));
    }
    // Trailing garbage.
    for tail in [&b" x"[..], b"}", b"{}", b",", b"\x00"] {
        let mut b = valid.to_vec();
        b.extend_from_slice(tail);
        c.push((b, "not valid JSON"));
    }
    // Not JSON at all / wrong top level.
    for (b, rule) in [
        (&b""[..], "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b"null", "neither"),
        (b"true", "neither"),
        (b"42", "neither"),
        (b"\"str\"", "neither"),
        (b"[]", "neither"),
        (
            b"[{\"To_Account\":\"a\",\"Attrs\":{\"sex\":\"m\"}}]",
            "neither",
        ),
        (b"{}", "neither"),
        (
            b"{\"to_account\":\"a\",\"attrs\":{\"sex\":\"m\"}}",
            "neither",
        ),
    ] {
        c.push((b.to_vec(), rule));
    }
    // Deep nesting.
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    c.push((deep.into_bytes(), "neither"));
    let deep_attr = format!(
        r#"{{"To_Account":"a","Attrs":{{"sex":{}"x"{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    c.push((deep_attr.into_bytes(), "Attrs.sex is an array"));
    let deep_obj = format!(
        r#"{{"To_Account":"a","Attrs":{}}}"#,
        "{\"x\":".repeat(200) + "1" + &"}".repeat(200)
    );
    c.push((deep_obj.into_bytes(), "Attrs.x is an object, not a string"));
    // Size.
    let mut big = br#"{"To_Account":"a","Attrs":{"sex":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    big.extend_from_slice(b"\"}}");
    c.push((big, "over the 1048576-byte limit"));
    // Wrong types.
    for (b, rule) in [
        (&br#"{"To_Account":1,"Attrs":{"sex":"m"}}"#[..], "To_Account is a number"),
        (br#"{"To_Account":true,"Attrs":{"sex":"m"}}"#, "To_Account is a boolean"),
        (br#"{"To_Account":["a"],"Attrs":{"sex":"m"}}"#, "To_Account is an array"),
        (br#"{"To_Account":{"a":1},"Attrs":{"sex":"m"}}"#, "To_Account is an object"),
        (br#"{"To_Account":null,"Attrs":{"sex":"m"}}"#, "To_Account is null"),
        (br#"{"To_Account":"a","Attrs":null}"#, "Attrs is null"),
        (br#"{"To_Account":"a","Attrs":"sex=m"}"#, "Attrs is a string"),
        (br#"{"To_Account":"a","Attrs":5}"#, "Attrs is a number"),
        (br#"{"To_Account":"a","Attrs":{"sex":null}}"#, "Attrs.sex is null"),
        (br#"{"To_Account":"a","Attrs":{"sex":1.5}}"#, "Attrs.sex is a number"),
        (br#"{"To_Account":"a","Attrs":{"sex":false}}"#, "Attrs.sex is a boolean"),
        (br#"{"To_Account":"a","Attrs":{"sex":["m"]}}"#, "Attrs.sex is an array"),
        (br#"{"UserAttrs":"a"}"#, "UserAttrs is a string"),
        (br#"{"UserAttrs":null}"#, "UserAttrs is null"),
        (br#"{"UserAttrs":[null]}"#, "UserAttrs[0] is null"),
        (br#"{"UserAttrs":[[]]}"#, "UserAttrs[0] is an array"),
        (br#"{"UserAttrs":[{"To_Account":"a"}]}"#, "UserAttrs[0].Attrs is missing"),
        (br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}},{"To_Account":"","Attrs":{"sex":"m"}}]}"#, "UserAttrs[1].To_Account is empty"),
    ] {
        c.push((b.to_vec(), rule));
    }
    // Limits in bytes, with multi-byte UTF-8.
    let v51 = "é".repeat(25) + "x";
    c.push((
        format!(r#"{{"To_Account":"a","Attrs":{{"sex":"{v51}"}}}}"#).into_bytes(),
        "Attrs.sex is 51 bytes",
    ));
    let a33 = "账".repeat(11); // 33 bytes
    c.push((
        format!(r#"{{"To_Account":"{a33}","Attrs":{{"sex":"m"}}}}"#).into_bytes(),
        "To_Account is 33 bytes",
    ));
    c.push((
        format!(
            r#"{{"To_Account":"{}","Attrs":{{"sex":"m"}}}}"#,
            "b".repeat(33)
        )
        .into_bytes(),
        "To_Account is 33 bytes",
    ));
    // Unknown attributes and names.
    c.push((
        br#"{"To_Account":"a","Attrs":{"age":"1"}}"#.to_vec(),
        "Attrs.age is not one of",
    ));
    c.push((
        br#"{"To_Account":"a","Attrs":{"Sex":"m"}}"#.to_vec(),
        "Attrs.Sex is not one of",
    ));
    c.push((
        br#"{"To_Account":"a","Attrs":{"":"m"}}"#.to_vec(),
        "empty attribute name",
    ));
    // Duplicate keys.
    c.push((
        br#"{"To_Account":"a","Attrs":{"sex":"m","sex":"f"}}"#.to_vec(),
        "Attrs.sex appears twice",
    ));
    c.push((
        br#"{"To_Account":"a","To_Account":"b","Attrs":{"sex":"m"}}"#.to_vec(),
        "duplicate field `To_Account`",
    ));
    c.push((
        br#"{"To_Account":"a","Attrs":{"sex":"m"},"Attrs":{"sex":"f"}}"#.to_vec(),
        "duplicate field `Attrs`",
    ));
    c.push((
        br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"},"Attrs":{}}]}"#.to_vec(),
        "UserAttrs[0].Attrs appears twice",
    ));
    // Shapes mixed or empty.
    c.push((
        br#"{"To_Account":"a","Attrs":{"sex":"m"},"UserAttrs":[]}"#.to_vec(),
        "mixes",
    ));
    c.push((br#"{"UserAttrs":[]}"#.to_vec(), "UserAttrs is empty"));
    c.push((
        br#"{"To_Account":"a","Attrs":{}}"#.to_vec(),
        "Attrs is empty",
    ));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_corpus_is_dead_lettered_and_valid_ones_applied() {
    let corpus = corpus();
    assert!(corpus.len() >= 50, "{} bodies", corpus.len());
    let mut sb = sandbox(&["sex", "city"], Faults::default(), |c| {
        c.attributes.allowed = vec!["sex".into(), "city".into()];
    })
    .await;
    sb.start_worker();
    let mut expected: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for (i, (body, _)) in corpus.iter().enumerate() {
        let account = format!("v{}", i % 17);
        let value = i.to_string();
        expected
            .entry(account.clone())
            .or_default()
            .insert("city".into(), value.clone());
        sb.publish(update(&account, &[("city", &value)]))
            .await
            .unwrap();
        sb.publish(body).await.unwrap();
    }
    sb.wait_drained(DRAIN).await.unwrap();
    assert!(sb.health.readiness().is_ok(), "the worker is alive");
    assert_eq!(sb.state(), expected);
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), corpus.len());
    let mut unmatched: Vec<&[u8]> = Vec::new();
    let bodies: Vec<Vec<u8>> = dead
        .iter()
        .map(|d| match d.body_encoding {
            "base64" => {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &d.body).unwrap()
            }
            _ => d.body.clone().into_bytes(),
        })
        .collect();
    let mut used = vec![false; dead.len()];
    for (body, rule) in &corpus {
        match (0..dead.len()).find(|&i| !used[i] && &bodies[i] == body) {
            Some(i) => {
                used[i] = true;
                let d = &dead[i];
                assert_eq!(d.reason.as_deref(), Some("invalid-message"));
                assert_eq!(d.code, Some(0));
                let err = d.error.as_deref().unwrap();
                assert!(err.contains(rule), "expected {rule:?} in {err:?}");
            }
            None => unmatched.push(body),
        }
    }
    assert!(
        unmatched.is_empty(),
        "{} bodies not dead-lettered byte for byte",
        unmatched.len()
    );
    assert_eq!(sb.sim.stats().count("im_set_attr", 90033), 0);
    sb.cleanup().await.unwrap();
}
