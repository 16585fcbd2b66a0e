//! A corpus of malformed bodies interleaved with valid ones: each
//! malformed one is dead-lettered naming its rule, the valid ones are applied,
//! and the worker stays up throughout.

mod bodies;
mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_corpus_is_dead_lettered_and_valid_ones_applied() {
    let corpus = bodies::malformed();
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
