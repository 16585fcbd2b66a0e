//! The README's session, run as written: every command between its
//! `<!-- session: start -->` and `<!-- session: end -->` markers, and every
//! output it shows checked. Only what must vary may: times, large numbers
//! (Unix times), the widths of table columns, and the ports and queue names,
//! which are this test's own (free ports, random names) and are read back as
//! the README's before comparing.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use regex::Regex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

const README_SIM: &str = "127.0.0.1:18080";
const README_ADMIN: &str = "127.0.0.1:9464";

/// One `$ command` and the lines shown after it.
#[derive(Debug)]
struct Step {
    command: String,
    output: Vec<String>,
}

/// The session's steps, in order, from every console block between the markers.
fn session() -> Vec<Step> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- session: start -->")
        .expect("the README marks its session");
    let end = readme.find("<!-- session: end -->").expect("and its end");
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = line == "```console";
            continue;
        }
        if !in_block {
            continue;
        }
        match line.strip_prefix("$ ") {
            Some(command) => steps.push(Step {
                command: command.to_string(),
                output: Vec::new(),
            }),
            None => steps
                .last_mut()
                .expect("output follows a command")
                .output
                .push(line.to_string()),
        }
    }
    steps
}

/// What may differ between runs, replaced by fixed words, and this run's
/// ports and names replaced by the README's.
struct Normalizer {
    back: Vec<(String, String)>,
    time: Regex,
    number: Regex,
}

impl Normalizer {
    fn new(back: Vec<(String, String)>) -> Self {
        Normalizer {
            back,
            // 2026-11-25T18:03:24.123456Z, 2026-11-25 18:03:24, 18:03:24Z …
            time: Regex::new(
                r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}:\d{2}(\.\d+)?)?Z?|\d{2}:\d{2}:\d{2}(\.\d+)?Z?",
            )
            .unwrap(),
            number: Regex::new(r"\d{10,}").unwrap(),
        }
    }

    fn line(&self, line: &str) -> String {
        let mut s = line.to_string();
        for (actual, shown) in &self.back {
            s = s.replace(actual.as_str(), shown);
        }
        let s = self.time.replace_all(&s, "<time>");
        let s = self.number.replace_all(&s, "<number>");
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn lines(&self, lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| self.line(l))
            .filter(|l| !l.is_empty())
            .collect()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The worker's own counts from `/metrics`: (received, acked + dead-lettered).
async fn settled(admin: &str) -> Option<(f64, f64)> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        sum("imattr_messages_received_total"),
        sum("imattr_messages_acked_total") + sum("imattr_messages_dead_lettered_total"),
    ))
}

/// Waits until the worker has settled at least `sent` messages and holds none.
async fn wait_settled(admin: &str, sent: f64) {
    let deadline = tokio::time::Instant::now() + DRAIN;
    loop {
        if let Some((received, done)) = settled(admin).await {
            if received >= sent && done >= received {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not settle {sent} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a background process as Ctrl-C would.
async fn interrupt(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_session_runs_as_written() {
    let steps = session();
    assert!(steps.len() > 10, "{steps:?}");
    let (sim_port, admin_port) = (free_port(), free_port());
    let sim_addr = format!("127.0.0.1:{sim_port}");
    let admin_addr = format!("127.0.0.1:{admin_port}");
    // The queues are this test's own; the README's are the defaults.
    let sb = sandbox(&[], Faults::default(), |c| {
        c.admin.listen = admin_addr.clone();
    })
    .await;
    let a = &sb.config.amqp;
    let norm = Normalizer::new(vec![
        (sim_addr.clone(), README_SIM.into()),
        (admin_addr.clone(), README_ADMIN.into()),
        (a.queue.clone(), "imattr.updates".into()),
        (a.dead_letter_queue.clone(), "imattr.dead".into()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut env: HashMap<String, String> = HashMap::new();
    let mut simulator: Option<Child> = None;
    let mut worker: Option<Child> = None;
    let worker_log = dir.path().join("worker.log");
    // Messages published or replayed so far, for waiting on the worker.
    let mut sent = 0.0;
    for step in &steps {
        let command = step.command.replace(README_SIM, &sim_addr);
        let words: Vec<&str> = command.split_whitespace().collect();
        let want = norm.lines(&step.output);
        if words[0] == "export" {
            for kv in &words[1..] {
                let (k, v) = kv.split_once('=').expect("export K=V");
                env.insert(k.to_string(), v.to_string());
            }
            continue;
        }
        assert_eq!(words[0], "imattr", "{command}");
        let mut cmd = imattr(&sb.config);
        cmd.args(&words[1..]).envs(&env).current_dir(dir.path());
        match words[1] {
            "simulate" => {
                if let Some(mut old) = simulator.take() {
                    interrupt(&mut old).await;
                }
                let mut child = cmd
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
                let mut got = Vec::new();
                for _ in &want {
                    let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
                        .await
                        .expect("the simulator says where it listens")
                        .unwrap()
                        .expect("a line");
                    got.push(line);
                }
                assert_eq!(norm.lines(&got), want, "$ {command}");
                simulator = Some(child);
            }
            "run" => {
                let log = std::fs::File::create(&worker_log).unwrap();
                let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
                worker = Some(child);
                // Its first lines, in order, as shown.
                let deadline = tokio::time::Instant::now() + DRAIN;
                loop {
                    let text = std::fs::read_to_string(&worker_log).unwrap_or_default();
                    let got = norm.lines(&text.lines().map(str::to_string).collect::<Vec<_>>());
                    let mut rest = want.iter();
                    let mut next = rest.next();
                    for g in &got {
                        if Some(g) == next {
                            next = rest.next();
                        }
                    }
                    if next.is_none() {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "$ {command}: {next:?} not in the log:\n{text}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let ready = format!("http://{admin_addr}/readyz");
                let deadline = tokio::time::Instant::now() + DRAIN;
                while !reqwest::get(&ready)
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    assert!(tokio::time::Instant::now() < deadline, "never ready");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ => {
                // A reader types the next command once the worker is done
                // with the last one.
                wait_settled(&admin_addr, sent).await;
                let out = cmd.output().await.unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                let got = norm.lines(&stdout.lines().map(str::to_string).collect::<Vec<_>>());
                assert!(
                    out.status.success(),
                    "$ {command}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(got, want, "$ {command}\n{stdout}");
                for line in stdout.lines() {
                    // `published N` and a replay's `moved N, left L, failed F`.
                    for counted in ["published ", "moved "] {
                        if let Some(rest) = line.strip_prefix(counted) {
                            let n = rest.split(',').next().unwrap_or(rest);
                            sent += n.trim().parse::<f64>().unwrap();
                        }
                    }
                }
            }
        }
    }
    for child in [simulator.as_mut(), worker.as_mut()].into_iter().flatten() {
        interrupt(child).await;
    }
    sb.cleanup().await.unwrap();
}
