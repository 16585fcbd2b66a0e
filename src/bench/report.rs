//! The report: one figure per measurement, printed as a table or JSON.

use serde::Serialize;

/// One figure of the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// Scenario number and name.
    pub(crate) scenario: String,
    /// What was measured.
    pub(crate) metric: String,
    /// The measurement.
    pub(crate) value: f64,
    /// Its unit.
    pub(crate) unit: String,
    /// The target, if any.
    pub(crate) target: Option<String>,
    /// Whether the target was met.
    pub(crate) pass: Option<bool>,
}
pub(super) fn print_table(figures: &[Figure]) {
    println!(
        "{:<26} {:<52} {:>12}  {:<12} {:<14} met",
        "scenario", "metric", "value", "unit", "target"
    );
    for f in figures {
        println!(
            "{:<26} {:<52} {:>12.2}  {:<12} {:<14} {}",
            f.scenario,
            f.metric,
            f.value,
            f.unit,
            f.target.clone().unwrap_or_default(),
            match f.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        );
    }
}

pub(super) fn fig(scenario: &str, metric: &str, value: f64, unit: &str) -> Figure {
    Figure {
        scenario: scenario.into(),
        metric: metric.into(),
        value,
        unit: unit.into(),
        target: None,
        pass: None,
    }
}

pub(super) fn target(mut f: Figure, text: &str, pass: bool) -> Figure {
    f.target = Some(text.into());
    f.pass = Some(pass);
    f
}

/// Whether the final state was last-value-wins, as a figure with its target.
pub(super) fn state_figure(scenario: &str, correct: bool) -> Figure {
    target(
        fig(
            scenario,
            "final state correct",
            f64::from(u8::from(correct)),
            "bool",
        ),
        "1",
        correct,
    )
}
