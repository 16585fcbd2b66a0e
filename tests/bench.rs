//! `imattr bench --quick` keeps working and its correctness rows hold (no
//! timing is asserted).

mod common;

/// The rows that say whether a run was correct (unit `bool`), and how many
/// of each a quick run writes. Counted, not filtered: a row renamed or no
/// longer written fails here instead of being skipped.
const CORRECTNESS_ROWS: &[(&str, &str, usize)] = &[
    ("1 broker-bound drain", "final state correct", 1),
    // One per API latency (50 and 250 ms).
    ("2 API-bound", "final state correct", 2),
    ("3 hot accounts", "final state correct", 1),
    // The fast API and the merging backlog.
    ("7 rate-limit regressions", "final state correct", 2),
    // Reads of the stream store (nothing to keep intact: reads take nothing).
    ("8 dead letters", "stats: output right", 1),
    ("8 dead letters", "export: output right", 1),
    ("8 dead letters", "list, first page: output right", 1),
    (
        "8 dead letters",
        "list, a later page (--after): output right",
        1,
    ),
    ("8 dead letters", "replay 10,000 matching: output right", 1),
    // A classic and a quorum updates queue.
    ("9 large bodies", "final state correct", 2),
    ("10 sets and removals", "final state correct", 1),
    (
        "10 sets and removals",
        "50 ms: an account in two requests at once",
        1,
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_quick_runs_every_scenario() {
    let c = common::base_config();
    let (code, out, err) = common::imattr_output(&c, &["bench", "--quick", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let figures: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON report");
    for s in [
        "1 broker-bound drain",
        "2 API-bound",
        "3 hot accounts",
        "4 memory",
        "5 latency",
        "6 refusal burst",
        "7 rate-limit regressions",
        "8 dead letters",
        "9 large bodies",
        "10 sets and removals",
    ] {
        assert!(
            figures.iter().any(|f| f["scenario"] == s),
            "scenario {s} missing: {out}"
        );
    }
    // Correctness is asserted, speed is not.
    for (scenario, metric, want) in CORRECTNESS_ROWS {
        let rows: Vec<&serde_json::Value> = figures
            .iter()
            .filter(|f| f["scenario"] == *scenario && f["metric"] == *metric)
            .collect();
        assert_eq!(
            rows.len(),
            *want,
            "rows {scenario:?} / {metric:?} in: {out}"
        );
        for f in rows {
            assert_eq!(f["pass"], true, "{f}");
        }
    }
    // No correctness row goes unchecked.
    for f in figures.iter().filter(|f| f["unit"] == "bool") {
        assert!(
            CORRECTNESS_ROWS
                .iter()
                .any(|(s, m, _)| f["scenario"] == *s && f["metric"] == *m),
            "a correctness row this test does not know: {f}"
        );
    }
}
