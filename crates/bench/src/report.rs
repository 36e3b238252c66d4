//! What a run found: one [`ScenarioReport`] per scenario (figures, each target with its verdict,
//! notes), printed as a table and written as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::machine::Machine;

/// Whether a scenario ran.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum Status {
    Ran,
    /// The RPC it drives is not served by this build, or a precondition is missing.
    NotRun(String),
    /// Setting it up or driving it failed.
    Failed(String),
}

/// One measured figure, with the same-run baseline it is compared against when there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// `value / baseline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

/// A target of the task and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    /// The target as stated (`>= 90% of bare`).
    pub wanted: String,
    /// What was measured, formatted.
    pub actual: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub id: &'static str,
    pub title: &'static str,
    #[serde(flatten)]
    pub status: Status,
    pub figures: Vec<Figure>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    pub duration_s: f64,
    /// 1-minute load average when the scenario started and ended (other work on the machine).
    pub load_average: [Option<f64>; 2],
}

impl ScenarioReport {
    pub fn new(id: &'static str, title: &'static str) -> ScenarioReport {
        ScenarioReport {
            id,
            title,
            status: Status::Ran,
            figures: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            duration_s: 0.0,
            load_average: [None, None],
        }
    }

    #[cfg(test)]
    pub fn not_run(mut self, reason: impl Into<String>) -> ScenarioReport {
        self.status = Status::NotRun(reason.into());
        self
    }

    pub fn with_duration(mut self, duration: Duration) -> ScenarioReport {
        self.duration_s = duration.as_secs_f64();
        self
    }

    pub fn figure(&mut self, name: impl Into<String>, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            baseline: None,
            ratio: None,
        });
    }

    /// A figure next to its baseline; the ratio is `value / baseline`.
    pub fn compared(
        &mut self,
        name: impl Into<String>,
        value: f64,
        baseline: f64,
        unit: &'static str,
    ) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            baseline: Some(baseline),
            ratio: (baseline != 0.0).then(|| value / baseline),
        });
    }

    pub fn target(
        &mut self,
        name: impl Into<String>,
        wanted: impl Into<String>,
        actual: impl Into<String>,
        met: bool,
    ) {
        self.targets.push(Target {
            name: name.into(),
            wanted: wanted.into(),
            actual: actual.into(),
            met,
        });
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The scenario's block of the printed table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let status = match &self.status {
            Status::Ran => "ran".to_owned(),
            Status::NotRun(reason) => format!("not run: {reason}"),
            Status::Failed(reason) => format!("FAILED: {reason}"),
        };
        let load = match self.load_average {
            [Some(start), Some(end)] => format!(", load average {start:.1} -> {end:.1}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "== {} — {} ({status}, {:.0} s{load})",
            self.id, self.title, self.duration_s
        );
        if !self.figures.is_empty() {
            let width = self
                .figures
                .iter()
                .map(|f| f.name.chars().count())
                .max()
                .unwrap_or(0)
                .max(6);
            let _ = writeln!(
                out,
                "   {:<width$}  {:>14}  {:>14}  {:>8}",
                "figure", "value", "baseline", "ratio"
            );
            for figure in &self.figures {
                let baseline = figure
                    .baseline
                    .map_or_else(String::new, |b| format_value(b, figure.unit));
                let ratio = figure.ratio.map_or_else(String::new, |r| format!("{r:.3}"));
                let _ = writeln!(
                    out,
                    "   {:<width$}  {:>14}  {:>14}  {:>8}",
                    figure.name,
                    format_value(figure.value, figure.unit),
                    baseline,
                    ratio
                );
            }
        }
        for target in &self.targets {
            let verdict = if target.met { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "   target {}: want {}, got {} — {verdict}",
                target.name, target.wanted, target.actual
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "   note: {note}");
        }
        out
    }
}

/// A number with its unit, at a precision that suits the unit.
pub fn format_value(value: f64, unit: &str) -> String {
    match unit {
        // Microseconds keep their precision where it matters and turn into milliseconds where
        // it does not.
        "us" if value.abs() >= 10_000.0 => format!("{:.1} ms", value / 1_000.0),
        "us" | "ms" | "s" | "%" | "KiB" | "MiB" => format!("{value:.1} {unit}"),
        "cores" => format!("{value:.2} {unit}"),
        "rps" | "items/s" => format!("{value:.0} {unit}"),
        "" => format_count(value),
        _ => format!("{} {unit}", format_count(value)),
    }
}

fn format_count(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub mode: &'static str,
    pub machine: Machine,
    pub duration_s: f64,
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub fn new(
        machine: Machine,
        mode: &'static str,
        duration: Duration,
        scenarios: Vec<ScenarioReport>,
    ) -> Report {
        Report {
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            mode,
            machine,
            duration_s: duration.as_secs_f64(),
            scenarios,
        }
    }

    /// One line per scenario: ran / not run / failed, targets met and missed.
    pub fn render_summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "summary ({} run, {:.0} s):",
            self.mode, self.duration_s
        );
        for scenario in &self.scenarios {
            let met = scenario.targets.iter().filter(|t| t.met).count();
            let missed: Vec<&str> = scenario
                .targets
                .iter()
                .filter(|t| !t.met)
                .map(|t| t.name.as_str())
                .collect();
            let line = match &scenario.status {
                Status::Ran if missed.is_empty() => format!("ran, {met} targets met"),
                Status::Ran => format!(
                    "ran, {met} targets met, {} missed ({})",
                    missed.len(),
                    missed.join(", ")
                ),
                Status::NotRun(reason) => format!("not run: {reason}"),
                Status::Failed(reason) => format!("FAILED: {reason}"),
            };
            let _ = writeln!(out, "   {:<18} {line}", scenario.id);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_run_scenario_says_why_in_the_table_and_the_json() {
        let report =
            ScenarioReport::new("fan-out", "Fan-out").not_run("Subscribe is UNIMPLEMENTED");
        assert!(
            report
                .render()
                .contains("not run: Subscribe is UNIMPLEMENTED")
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["status"], "not_run");
        assert_eq!(json["reason"], "Subscribe is UNIMPLEMENTED");
    }

    #[test]
    fn a_compared_figure_carries_its_ratio_and_a_missed_target_is_loud() {
        let mut report = ScenarioReport::new("raw-rpc", "Raw RPC cost");
        report.compared("throughput", 90.0, 100.0, "rps");
        report.target("throughput", ">= 90% of bare", "80%", false);
        assert_eq!(report.figures[0].ratio, Some(0.9));
        let table = report.render();
        assert!(table.contains("0.900"), "{table}");
        assert!(table.contains("MISSED"), "{table}");
    }
}
