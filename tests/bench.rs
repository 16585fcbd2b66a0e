//! `imattr bench --quick` keeps working (no timing is asserted).

mod common;

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
    ] {
        assert!(
            figures.iter().any(|f| f["scenario"] == s),
            "scenario {s} missing: {out}"
        );
    }
    // Correctness is asserted, speed is not.
    for f in figures
        .iter()
        .filter(|f| f["metric"] == "final state correct")
    {
        assert_eq!(f["pass"], true, "{f}");
    }
}
