//! The `imattr` binary: configuration errors, SIGTERM, publish and the DLQ tools.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key_and_never_shows_secrets() {
    let mut c = base_config();
    c.tencent.secret_key = imattr::config::Secret::new("TOPSECRETKEY123");
    c.amqp.url = imattr::config::AmqpUrl::new("amqp://user:TOPSECRETPW@127.0.0.1:5672/%2f");
    let (code, out, err) = imattr_output(&c, &["config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("TOPSECRET") && !err.contains("TOPSECRET"),
        "{out}{err}"
    );
    assert!(out.contains("amqp://user:***@127.0.0.1:5672/%2f"), "{out}");

    let mut cmd = imattr(&c);
    cmd.env("IMATTR_BATCH__MAX_ACCOUNTS", "101").arg("config");
    let o = cmd.output().await.unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("max_accounts"), "{err}");
    assert!(!err.contains("TOPSECRET"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[tencent]\nsecret_kye = \"TOPSECRETKEY123\"\n").unwrap();
    let (code, _, err) = imattr_output(&c, &["--config", path.to_str().unwrap(), "config"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("tencent.secret_kye"), "{err}");
    assert!(!err.contains("TOPSECRET"), "{err}");

    let (code, _, err) = imattr_output(&c, &["no-such-command"]).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn unreachable_broker_says_how_to_start_one() {
    let mut c = base_config();
    c.amqp.url = unreachable_amqp_url();
    let (code, _, err) = imattr_output(&c, &["dlq", "list"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot connect to RabbitMQ"), "{err}");
    assert!(err.contains("rabbitmq-server -detached"), "{err}");
    assert!(!err.contains("guest:guest"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(
        err.matches("Connection refused").count(),
        1,
        "said once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_0_and_a_restart_finishes() {
    signal_mid_stream_exits_0_and_a_restart_finishes("-TERM").await;
}

/// Ctrl-C in a terminal: the same graceful stop as SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_stream_exits_0_and_a_restart_finishes() {
    signal_mid_stream_exits_0_and_a_restart_finishes("-INT").await;
}

async fn signal_mid_stream_exits_0_and_a_restart_finishes(sig: &str) {
    let (mut sb, mut child, expected) = child_worker_mid_stream(3000, 400).await;
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    // Not killed by the signal (no code then): it stopped and exited 0.
    assert_eq!(status.code(), Some(0), "{sig}: {status:?}");
    let left = sb.depth(&sb.config.amqp.queue.clone()).await.unwrap();
    assert!(left < 3000, "progress was made and acked");
    // The stuck account's update at least, held unacked until the stop.
    assert!(left > 0, "stopped mid-stream: {left} left");
    sb.sim.update_faults(|f| f.fail_accounts.clear());
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    assert_final_monotonic(&sb, &expected).await;
    finish(sb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_from_the_command_line_and_files() {
    let mut sb = sandbox(&["sex", "city"], Faults::default(), |_| {}).await;
    sb.start_worker();
    let (code, out, err) = imattr_output(
        &sb.config,
        &[
            "publish",
            "--account",
            "xiaojun012",
            "--attr",
            "sex=attr1",
            "--attr",
            "city=attr2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "published 1");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.ndjson");
    let mut lines = String::new();
    for i in 0..500 {
        lines.push_str(&format!(
            "{{\"To_Account\":\"f{i}\",\"Attrs\":{{\"city\":\"c{i}\"}}}}\n"
        ));
    }
    lines.push_str("{\"To_Account\":\"bad\"}\n");
    lines.push_str("not json\n");
    std::fs::write(&file, &lines).unwrap();
    let (code, out, err) =
        imattr_output(&sb.config, &["publish", "--file", file.to_str().unwrap()]).await;
    assert_eq!(code, 1, "invalid lines refuse the whole file");
    assert!(err.contains("line 501: Attrs is missing"), "{err}");
    assert!(err.contains("line 502: body is not valid JSON"), "{err}");
    assert!(out.is_empty(), "{out}");
    // Nothing from the refused file reached the broker: once drained, only the
    // single update published before it was applied.
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(
        sb.state().len(),
        1,
        "nothing of the refused file was published"
    );

    let (code, out, err) = imattr_output(
        &sb.config,
        &[
            "publish",
            "--file",
            file.to_str().unwrap(),
            "--skip-invalid",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "published 500");
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    assert_eq!(state.len(), 501);
    assert_eq!(state["xiaojun012"]["city"], "attr2");
    assert_eq!(state["f499"]["city"], "c499");

    // --remove publishes `"city":null`, which removes the attribute.
    let (code, out, err) = imattr_output(
        &sb.config,
        &[
            "publish",
            "--account",
            "xiaojun012",
            "--attr",
            "sex=attr3",
            "--remove",
            "city",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "published 1");
    let (code, out, err) = imattr_output(
        &sb.config,
        &["publish", "--account", "f499", "--remove", "city"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "published 1");
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    assert_eq!(
        state
            .get("xiaojun012")
            .map(|a| a.clone().into_iter().collect::<Vec<_>>()),
        Some(vec![("sex".to_string(), "attr3".to_string())])
    );
    assert!(!state.contains_key("f499"), "{:?}", state.get("f499"));
    sb.cleanup().await.unwrap();
}

/// A drained sandbox whose DLQ holds three messages rejected by the API
/// (90033 on `city`) and one invalid message; one good update was applied.
async fn with_dead_letters() -> Sandbox {
    let faults = Faults {
        reject_attrs: vec!["city".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["sex", "city"], faults, |c| {
        c.attributes.allowed = vec!["sex".into(), "city".into()]
    })
    .await;
    sb.start_worker();
    for i in 0..3 {
        sb.publish(update(&format!("r{i}"), &[("city", &format!("c{i}"))]))
            .await
            .unwrap();
    }
    sb.publish(br#"{"To_Account":"x","Attrs":{"age":"1"}}"#)
        .await
        .unwrap();
    sb.publish(update("ok", &[("sex", "m")])).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4);
    sb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_shows_dead_letters_and_leaves_them() {
    let sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    let (code, table, err) = imattr_output(&cfg, &["dlq", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(table.starts_with("ID  ACCOUNT"), "{table}");
    assert_eq!(table.lines().count(), 5, "{table}");
    assert!(
        table.contains("rejected") && table.contains("90033") && table.contains("invalid-message"),
        "{table}"
    );
    let (code, table2, err) = imattr_output(&cfg, &["dlq", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(table, table2, "listing removed nothing");
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4);
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_json_carries_headers_reason_and_account() {
    let sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    let (code, json, err) = imattr_output(&cfg, &["dlq", "list", "--json", "--limit", "2"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json.lines().count(), 2);
    let (code, json, err) = imattr_output(&cfg, &["dlq", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    let rejected: Vec<_> = rows
        .iter()
        .filter(|r| r["headers"]["x-imattr-reason"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 3);
    assert_eq!(rejected[0]["headers"]["x-imattr-error-code"], 90033);
    assert_eq!(rejected[0]["body_encoding"], "utf8");
    let invalid: Vec<_> = rows
        .iter()
        .filter(|r| r["reason"] == "invalid-message")
        .collect();
    assert_eq!(invalid.len(), 1);
    assert!(invalid[0]["error"].as_str().unwrap().contains("Attrs.age"));
    assert_eq!(
        invalid[0]["account"], "x",
        "the account of an invalid message, when readable"
    );
    sb.cleanup().await.unwrap();
}

/// The dead-letter header names, spelled out here rather than taken from
/// the constants the writer and the tools share: a renamed constant changes
/// both sides at once, and only literals catch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_headers_have_their_documented_names() {
    let sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    let (code, json, err) =
        imattr_output(&cfg, &["dlq", "list", "--json", "--reason", "rejected"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{json}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut accounts = Vec::new();
    for r in &rows {
        let h = &r["headers"];
        let account = h["x-imattr-account"].as_str().unwrap().to_string();
        assert_eq!(h["x-imattr-original-routing-key"], account.as_str(), "{h}");
        assert_eq!(h["x-imattr-error"], "invalid attribute: city", "{h}");
        assert!(h["x-imattr-attempts"].as_i64().unwrap() >= 1, "{h}");
        let at = h["x-imattr-failed-at"].as_i64().unwrap();
        assert!(at > now_ms - 600_000 && at <= now_ms, "{h}");
        assert_eq!(h["x-imattr-reason"], "rejected", "{h}");
        assert_eq!(h["x-imattr-error-code"], 90033, "{h}");
        assert_eq!(h["x-imattr-source-queue"], cfg.amqp.queue.as_str(), "{h}");
        // The top-level fields are read from those same headers.
        assert_eq!(r["account"], account.as_str());
        assert_eq!(r["failed_at_ms"], at);
        accounts.push(account);
    }
    accounts.sort();
    assert_eq!(accounts, ["r0", "r1", "r2"]);

    // A dead letter as the broker holds it: the stream's raw headers.
    let mut reader = imattr::dlq::reader::AmqpReader::connect(&cfg.amqp, "imattr test raw")
        .await
        .unwrap();
    let dlq = cfg.amqp.dead_letter_queue.as_str();
    let last = reader
        .last_offset(dlq)
        .await
        .unwrap()
        .expect("dead letters");
    let mut raw = Vec::new();
    reader
        .read(dlq, 0, last, |m| {
            raw.push(m.headers);
            std::ops::ControlFlow::Continue(())
        })
        .await
        .unwrap();
    reader.close().await;
    assert_eq!(raw.len(), 4);
    let text = |h: &lapin::types::FieldTable, k: &str| match h.inner().get(k) {
        Some(lapin::types::AMQPValue::LongString(s)) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        other => panic!("{k}: {other:?}"),
    };
    let int = |h: &lapin::types::FieldTable, k: &str| match h.inner().get(k) {
        Some(lapin::types::AMQPValue::LongLongInt(n)) => *n,
        other => panic!("{k}: {other:?}"),
    };
    let r0 = raw
        .iter()
        .find(|h| {
            h.inner().get("x-imattr-account").is_some() && text(h, "x-imattr-account") == "r0"
        })
        .expect("r0's dead letter");
    assert_eq!(text(r0, "x-imattr-error"), "invalid attribute: city");
    assert_eq!(text(r0, "x-imattr-original-routing-key"), "r0");
    assert!(int(r0, "x-imattr-attempts") >= 1);
    assert!(int(r0, "x-imattr-failed-at") > now_ms - 600_000);
    sb.cleanup().await.unwrap();
}

/// Times are printed in UTC with a `Z`, like the logs, whatever the
/// machine's zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_stats_print_utc_times() {
    let sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    let run = |args: &'static [&'static str]| {
        let cfg = cfg.clone();
        async move {
            let out = imattr(&cfg)
                .env("TZ", "Asia/Shanghai")
                .args(args)
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let utc = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let json = run(&["dlq", "list", "--json", "--limit", "1"]).await;
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    let at = first["failed_at_ms"].as_i64().unwrap();
    let table = run(&["dlq", "list", "--limit", "1"]).await;
    assert!(table.contains(&utc(at)), "{} in {table}", utc(at));
    let stats: serde_json::Value =
        serde_json::from_str(&run(&["dlq", "stats", "--json"]).await).unwrap();
    let (oldest, newest) = (
        stats["oldest_failed_at_ms"].as_i64().unwrap(),
        stats["newest_failed_at_ms"].as_i64().unwrap(),
    );
    let text = run(&["dlq", "stats"]).await;
    let want = format!("failed between {} and {}", utc(oldest), utc(newest));
    assert!(text.contains(&want), "{want} in {text}");
    sb.cleanup().await.unwrap();
}

/// A body that is not UTF-8 has no readable account: `--account` finds its
/// dead letter by the routing key publishers set to the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_by_account_finds_a_body_that_is_not_utf8() {
    let mut sb = sandbox(&["sex"], Faults::default(), |_| {}).await;
    sb.start_worker();
    let cfg = sb.config.clone();
    let conn = imattr::amqp::topology::connect(&cfg.amqp, "imattr test raw")
        .await
        .unwrap();
    let mut p = imattr::publish::Publisher::new(&conn, &cfg.amqp.exchange)
        .await
        .unwrap();
    p.publish(
        "binacc",
        &[0xff, 0xfe, 0x00, 0x80],
        imattr::publish::update_properties(),
    )
    .await
    .unwrap();
    p.publish("other", b"not json", imattr::publish::update_properties())
        .await
        .unwrap();
    p.finish().await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.dead_letters().await.unwrap().len(), 2);

    let (code, out, err) =
        imattr_output(&cfg, &["dlq", "list", "--json", "--account", "binacc"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["account"], "binacc");
    assert_eq!(rows[0]["reason"], "invalid-message");
    assert_eq!(rows[0]["body_encoding"], "base64");
    assert!(rows[0]["headers"].get("x-imattr-account").is_none());
    let (code, table, err) = imattr_output(&cfg, &["dlq", "list", "--account", "binacc"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .is_some_and(|a| a == "binacc"),
        "{table}"
    );
    let (code, out, err) =
        imattr_output(&cfg, &["dlq", "replay", "--account", "binacc", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would replay 1");
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_export_writes_every_dead_letter_and_removes_none() {
    let sb = with_dead_letters().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dead.ndjson");
    let (code, _, err) = imattr_output(
        &sb.config,
        &["dlq", "export", "--out", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 4);
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4);
    // With the filters of list and replay.
    for (args, want) in [
        (&["--reason", "rejected"][..], vec!["r0", "r1", "r2"]),
        (&["--code", "0"][..], vec!["x"]),
        (&["--account", "r1"][..], vec!["r1"]),
    ] {
        let (code, text, err) =
            imattr_output(&sb.config, &[&["dlq", "export"][..], args].concat()).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        let mut accounts: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["account"].as_str().unwrap().to_string()
            })
            .collect();
        accounts.sort();
        assert_eq!(accounts, want, "{args:?}");
    }
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4);
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_dry_run_counts_by_filter_and_moves_nothing() {
    let mut sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    // The cause is gone and no worker consumes: a message moved by mistake
    // would wait in the updates queue, and later be applied.
    sb.sim.update_faults(|f| f.reject_attrs.clear());
    sb.stop_worker().await.unwrap();
    let before = sb.dead_letters().await.unwrap();
    let (code, out, err) =
        imattr_output(&cfg, &["dlq", "replay", "--code", "90033", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would replay 3");
    let (code, out, err) = imattr_output(
        &cfg,
        &["dlq", "replay", "--reason", "invalid-message", "--dry-run"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would replay 1");
    let (code, out, err) = imattr_output(&cfg, &["dlq", "replay", "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would replay 4");
    assert_eq!(sb.depth(&cfg.amqp.queue).await.unwrap(), 0, "nothing moved");
    let after = sb.dead_letters().await.unwrap();
    assert_eq!(after, before, "the same dead letters, in the same order");
    assert!(after
        .iter()
        .all(|d| d.headers.get("x-imattr-replays").is_none()));
    // And nothing reaches the API once a worker runs again.
    sb.start_worker();
    sb.wait_drained(DRAIN).await.unwrap();
    assert!(!sb.state().contains_key("r0"));
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4);
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_after_the_fix_applies_only_the_matching_ones() {
    let sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    sb.sim.update_faults(|f| f.reject_attrs.clear());
    let (code, out, err) =
        imattr_output(&cfg, &["dlq", "replay", "--code", "90033", "--limit", "2"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "moved 2, left 1, failed 0");
    sb.wait_drained(DRAIN).await.unwrap();
    assert_eq!(sb.dead_letters().await.unwrap().len(), 2, "--limit held");
    let (code, out, err) = imattr_output(&cfg, &["dlq", "replay", "--reason", "rejected"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "moved 1, left 0, failed 0");
    sb.wait_drained(DRAIN).await.unwrap();
    let state = sb.state();
    for i in 0..3 {
        assert_eq!(state[&format!("r{i}")]["city"], format!("c{i}"));
    }
    let dead = sb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason.as_deref(), Some("invalid-message"));
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_purge_refuses_without_yes_then_deletes_everything() {
    let sb = with_dead_letters().await;
    let cfg = sb.config.clone();
    let (code, _, err) = imattr_output(&cfg, &["dlq", "purge"]).await;
    assert_eq!(code, 2, "bad usage: {err}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4);
    // With the filters of replay: only the matching ones, the others in order.
    let before = sb.dead_letters().await.unwrap();
    let (code, out, err) = imattr_output(&cfg, &["dlq", "purge", "--yes", "--account", "r1"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "purged 1");
    let (code, out, err) = imattr_output(&cfg, &["dlq", "purge", "--yes", "--code", "0"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "purged 1");
    let left = sb.dead_letters().await.unwrap();
    let want: Vec<_> = before
        .into_iter()
        .filter(|d| d.code == Some(90033) && d.account.as_deref() != Some("r1"))
        .collect();
    assert_eq!(left, want);
    assert_eq!(left.len(), 2);
    let (code, out, err) = imattr_output(&cfg, &["dlq", "purge", "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "purged 2");
    assert!(sb.dead_letters().await.unwrap().is_empty());
    sb.cleanup().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_keeps_body_properties_routing_key_and_counts_replays() {
    let faults = Faults {
        reject_attrs: vec!["city".into()],
        ..Faults::default()
    };
    let mut sb = sandbox(&["sex", "city"], faults, |_| {}).await;
    sb.start_worker();
    let body = update("again", &[("city", "x")]);
    sb.publish(&body).await.unwrap();
    sb.wait_drained(DRAIN).await.unwrap();
    let cfg = sb.config.clone();
    for round in 1..=2 {
        let (code, out, err) = imattr_output(&cfg, &["dlq", "replay"]).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), "moved 1, left 0, failed 0");
        sb.wait_drained(DRAIN).await.unwrap();
        let dead = sb.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 1);
        let d = &dead[0];
        assert_eq!(d.body.as_bytes(), &body[..]);
        assert_eq!(d.headers["x-imattr-replays"], round);
        assert_eq!(d.routing_key.as_deref(), Some("again"));
        assert_eq!(d.properties["content_type"], "application/json");
    }
    sb.cleanup().await.unwrap();
}

/// Bad usage exits 2, naming the problem, before anything is published.
#[tokio::test]
async fn bad_usage_exits_2() {
    let mut c = base_config();
    c.attributes.allowed = vec!["sex".into(), "city".into()];
    // Nothing may be reached: the broker is not even there.
    c.amqp.url = unreachable_amqp_url();
    let cases: &[(&[&str], &str)] = &[
        (&["publish"], "--account"),
        (
            &["publish", "--account", "a", "--attr", "sex"],
            "NAME=VALUE",
        ),
        (&["publish", "--attr", "sex=m"], "--account"),
        (&["publish", "--account", "a"], "--attr"),
        (&["publish", "--account", "a"], "--remove"),
        (&["publish", "--remove", "sex"], "--account"),
        (
            &["publish", "--account", "a", "--remove", "age"],
            "Attrs.age is not one of the app's attribute names",
        ),
        (
            &[
                "publish",
                "--account",
                "a",
                "--attr",
                "sex=m",
                "--remove",
                "sex",
            ],
            "Attrs.sex appears twice",
        ),
        // An update on the command line that breaks a rule.
        (
            &["publish", "--account", "a", "--attr", "age=30"],
            "Attrs.age is not one of the app's attribute names",
        ),
        (
            &["publish", "--account", "", "--attr", "sex=m"],
            "To_Account",
        ),
        (&["dlq", "purge"], "--yes"),
        (&["dlq", "list", "--limit", "x"], "--limit"),
        (&["dlq", "list", "--wide", "--json"], "--json"),
        // 0 asks for nothing: bad usage, not "nothing matches".
        (&["dlq", "list", "--limit", "0"], "at least 1"),
        (
            &["dlq", "replay", "--limit", "0", "--dry-run"],
            "at least 1",
        ),
        (&["simulate", "--latency-ms", "20..5"], "MIN..MAX"),
        (&["bench", "--only", "11"], "--only"),
        (&["bench", "--rounds", "0"], "--rounds"),
        (&["no-such-command"], "no-such-command"),
    ];
    for (args, want) in cases {
        let (code, out, err) = imattr_output(&c, args).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("cannot connect"), "{args:?}: {err}");
    }
    // Help is not an error.
    let (code, out, _) = imattr_output(&c, &["publish", "--help"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("--dry-run"), "{out}");
}

/// `publish` checks attribute names against attributes.allowed; `--dry-run`
/// checks a file and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_checks_names_and_dry_run_publishes_nothing() {
    let sb = sandbox(&["sex", "city"], Faults::default(), |c| {
        c.attributes.allowed = vec!["sex".into(), "city".into()];
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.ndjson");
    std::fs::write(
        &file,
        "{\"To_Account\":\"a\",\"Attrs\":{\"sex\":\"m\"}}\n{\"To_Account\":\"b\",\"Attrs\":{\"city\":\"x\"}}\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) =
        imattr_output(&sb.config, &["publish", "--dry-run", "--file", path]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would publish 2");
    let (code, out, err) = imattr_output(
        &sb.config,
        &["publish", "--dry-run", "--account", "c", "--attr", "sex=f"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "would publish 1");
    // A name the app does not have is refused before publishing, as the
    // worker would dead-letter it.
    std::fs::write(
        &file,
        "{\"To_Account\":\"a\",\"Attrs\":{\"level\":\"3\"}}\n",
    )
    .unwrap();
    let (code, _, err) = imattr_output(&sb.config, &["publish", "--dry-run", "--file", path]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("line 1: Attrs.level is not one of the app's attribute names"),
        "{err}"
    );
    assert!(err.contains("nothing would be published"), "{err}");
    let (code, _, err) = imattr_output(&sb.config, &["publish", "--file", path]).await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        sb.depth(&sb.config.amqp.queue).await.unwrap(),
        0,
        "nothing was published"
    );
    sb.cleanup().await.unwrap();
}

/// Only `run` and `declare` create the updates queue; a publisher needs the
/// exchange alone, whatever arguments the operator gave the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_never_create_the_updates_queue() {
    let sb = sandbox(&["sex"], Faults::default(), |_| {}).await;
    let queue = sb.config.amqp.queue.clone();
    sb.delete_queue(&queue).await.unwrap();
    // A mistyped queue name: the dlq tools leave no queue behind.
    let mut mistyped = sb.config.clone();
    mistyped.amqp.queue = format!("{queue}.typo");
    let (code, _, err) = imattr_output(&mistyped, &["dlq", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = imattr_output(&mistyped, &["dlq", "stats"]).await;
    assert_eq!(code, 0, "{err}");
    let typo = mistyped.amqp.queue.clone();
    // Deleted before asserting, so that a failure leaves nothing behind.
    let created = sb.queue_exists(&typo).await.unwrap();
    sb.delete_queue(&typo).await.unwrap();
    assert!(!created, "dlq created the queue");
    assert!(sb
        .queue_exists(&sb.config.amqp.dead_letter_queue)
        .await
        .unwrap());
    // With no queue bound, publish refuses instead of losing the update.
    let publish = ["publish", "--account", "a", "--attr", "sex=m"];
    let (code, out, err) = imattr_output(&mistyped, &publish).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("routes the message to no queue"), "{err}");
    assert!(err.contains("imattr declare"), "{err}");
    let created = sb.queue_exists(&typo).await.unwrap();
    sb.delete_queue(&typo).await.unwrap();
    assert!(!created, "publish created the queue");
    assert!(
        !sb.queue_exists(&queue).await.unwrap(),
        "publish created the queue"
    );
    // `declare` creates it as `run` would, here without single active
    // consumer; a publisher configured otherwise still publishes.
    let mut other_args = sb.config.clone();
    other_args.amqp.single_active_consumer = false;
    let (code, out, err) = imattr_output(&other_args, &["declare"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("bound to queue {queue} (classic)")),
        "{out}"
    );
    assert!(sb.queue_exists(&queue).await.unwrap());
    let (code, out, err) = imattr_output(&sb.config, &publish).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "published 1");
    assert_eq!(sb.depth(&queue).await.unwrap(), 1);
    // `run` itself still refuses the queue's other arguments (status 2).
    let (code, _, err) = imattr_output(&sb.config, &["declare"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("x-single-active-consumer is not set on the broker"),
        "{err}"
    );
    sb.cleanup().await.unwrap();
}

/// `imattr config` names the file and variables it used; `--check` checks
/// what `run` would, in one line.
#[tokio::test]
async fn config_names_its_sources_and_check_checks() {
    let c = base_config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imattr.toml");
    std::fs::write(&path, "[batch]\nmax_wait_ms = 70\n").unwrap();
    let p = path.to_str().unwrap();
    let (code, out, err) = imattr_output(&c, &["--config", p, "config"]).await;
    assert_eq!(code, 0, "{err}");
    let canonical = std::fs::canonicalize(&path).unwrap();
    assert!(
        out.starts_with(&format!("# loaded from file {}\n", canonical.display())),
        "{out}"
    );
    assert!(out.contains("# environment: IMATTR_"), "{out}");
    assert!(
        out.contains("IMATTR_BATCH__MAX_WAIT_MS"),
        "the test's own variable: {out}"
    );
    assert!(out.parse::<toml::Table>().is_ok(), "still TOML: {out}");
    // Without a file (and no ./config/imattr.toml): it says so.
    let empty = tempfile::tempdir().unwrap();
    let o = imattr(&c)
        .arg("config")
        .current_dir(empty.path())
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("# loaded from no file"), "{out}");
    // --check: the API credentials are missing from the defaults.
    let (code, out, err) = imattr_output(&c, &["--config", p, "config", "--check"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("tencent.sdkappid"), "{err}");
    let mut ok = c.clone();
    ok.tencent.sdkappid = 1_400_000_000;
    ok.tencent.secret_key = imattr::config::Secret::new("k");
    let (code, out, err) = imattr_output(&ok, &["--config", p, "config", "--check"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("configuration OK: file "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
}

/// A closed standard output (`| head`) ends the command quietly, status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly_with_0() {
    let sb = with_dead_letters().await;
    for args in [
        &["man"][..],
        &["completions", "bash"][..],
        &["config"][..],
        &["dlq", "list"][..],
        &["dlq", "list", "--json"][..],
        &["dlq", "stats"][..],
        &["dlq", "export"][..],
    ] {
        let mut child = imattr(&sb.config)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -0`: the reader goes away before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} said: {err}");
    }
    assert_eq!(sb.dead_letters().await.unwrap().len(), 4, "nothing lost");
    sb.cleanup().await.unwrap();
}

/// Text logs carry colours only on a terminal: not into a pipe or a file.
#[tokio::test]
async fn logs_into_a_pipe_have_no_colours() {
    let mut c = base_config();
    c.amqp.url = unreachable_amqp_url();
    c.tencent.sdkappid = 1_400_000_000;
    c.tencent.secret_key = imattr::config::Secret::new("k");
    c.tencent.base_url = format!(
        "http://{}",
        unreachable_amqp_url()
            .to_string()
            .split('@')
            .nth(1)
            .unwrap()
            .trim_end_matches("/%2f")
    );
    c.attributes.allowed = vec!["a".into()];
    c.admin.listen = String::new();
    let mut cmd = imattr(&c);
    cmd.env_remove("NO_COLOR")
        .arg("run")
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&seen).contains("Cannot reach RabbitMQ") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(
            deadline,
            tokio::io::AsyncReadExt::read(&mut stderr, &mut buf),
        )
        .await
        .expect("a WARN line in time")
        .unwrap();
        assert!(n > 0, "stderr closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    child.kill().await.unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("WARN"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a pipe: {text:?}");
}

/// A host name that does not resolve is told as such, not as a broker to start.
#[tokio::test]
async fn an_unknown_host_is_told_apart_from_a_stopped_broker() {
    let mut c = base_config();
    c.amqp.url =
        imattr::config::AmqpUrl::new("amqp://guest:s3cr3tpw@no-such-host.invalid:5672/%2f");
    let (code, _, err) = imattr_output(&c, &["dlq", "list"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not resolve (DNS)"), "{err}");
    assert!(!err.contains("RabbitMQ running"), "{err}");
    assert!(!err.contains("s3cr3tpw"), "{err}");
}

/// Through the binary and the environment: an all-digit secret key is
/// taken and never shown; a URL with a bad port, no host or a password the
/// parser reads differently is refused up front (status 2) by every
/// command, showing none of its password.
#[tokio::test]
async fn secrets_and_urls_from_the_environment() {
    let mut c = base_config();
    c.tencent.secret_key = imattr::config::Secret::new("5843210987");
    let (code, out, err) = imattr_output(&c, &["config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("secret_key = \"<redacted>\""), "{out}");
    assert!(
        !out.contains("5843210987") && !err.contains("5843210987"),
        "{out}{err}"
    );
    for url in [
        "amqp://guest:s3cr3tpw@127.0.0.1:99999/%2f",
        "amqp:/guest:s3cr3tpw@127.0.0.1:5672/%2f",
        "amqp://guest:pa/ss#s3cr3tpw@127.0.0.1:5672/%2f",
        "amqp://guest:s3cr3tpw@127.0.0.1:5672/%2f,amqp://other:pw@127.0.0.1:5673/%2f",
    ] {
        let mut c = base_config();
        c.amqp.url = imattr::config::AmqpUrl::new(url);
        for args in [&["config"][..], &["dlq", "list"][..], &["run"][..]] {
            let (code, out, err) = imattr_output(&c, args).await;
            assert_eq!(code, 2, "{url} {args:?}: {out}{err}");
            assert!(err.contains("amqp.url"), "{url} {args:?}: {err}");
            assert!(
                !out.contains("s3cr3tpw") && !err.contains("s3cr3tpw"),
                "{url}: {err}"
            );
        }
    }
}
