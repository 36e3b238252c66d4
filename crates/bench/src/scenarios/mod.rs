//! The seven scenarios. Each builds its own [`super::stage::Stage`], drives it, and fills a
//! [`ScenarioReport`]; an error keeps what was measured so far and marks the scenario failed.

pub mod added_latency;
pub mod fan_out;
pub mod feedback_sync;
pub mod raw_rpc;
pub mod retainly_batching;
pub mod scale_out;
pub mod survey_coalescing;

use super::process::Binaries;
use super::report::{ScenarioReport, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    RawRpc,
    AddedLatency,
    SurveyCoalescing,
    RetainlyBatching,
    FeedbackSync,
    FanOut,
    ScaleOut,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::RawRpc,
        Scenario::AddedLatency,
        Scenario::SurveyCoalescing,
        Scenario::RetainlyBatching,
        Scenario::FeedbackSync,
        Scenario::FanOut,
        Scenario::ScaleOut,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Scenario::RawRpc => "raw-rpc",
            Scenario::AddedLatency => "added-latency",
            Scenario::SurveyCoalescing => "survey-coalescing",
            Scenario::RetainlyBatching => "retainly-batching",
            Scenario::FeedbackSync => "feedback-sync",
            Scenario::FanOut => "fan-out",
            Scenario::ScaleOut => "scale-out",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Scenario::RawRpc => "1. raw RPC cost: cached ListCampaigns vs a bare tonic server",
            Scenario::AddedLatency => {
                "2. added latency: GetFeedback through the gateway vs straight to the upstream"
            }
            Scenario::SurveyCoalescing => {
                "3. survey coalescing: SendSurvey from many callers under the 150/min budget"
            }
            Scenario::RetainlyBatching => "4. Retainly batching: UpsertCustomers from many callers",
            Scenario::FeedbackSync => "5. feedback sync: existing responses into the log",
            Scenario::FanOut => "6. fan-out: FeedbackStream.Subscribe to many subscribers",
            Scenario::ScaleOut => {
                "7. scale-out: 1 and 3 replicas on PostgreSQL next to the embedded store"
            }
        }
    }

    pub fn from_id(id: &str) -> Option<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.id().eq_ignore_ascii_case(id))
    }

    pub async fn run(self, binaries: &Binaries, quick: bool) -> ScenarioReport {
        let mut report = ScenarioReport::new(self.id(), self.title());
        let result = match self {
            Scenario::RawRpc => raw_rpc::run(&mut report, binaries, quick).await,
            Scenario::AddedLatency => added_latency::run(&mut report, binaries, quick).await,
            Scenario::SurveyCoalescing => {
                survey_coalescing::run(&mut report, binaries, quick).await
            }
            Scenario::RetainlyBatching => {
                retainly_batching::run(&mut report, binaries, quick).await
            }
            Scenario::FeedbackSync => feedback_sync::run(&mut report, binaries, quick).await,
            Scenario::FanOut => fan_out::run(&mut report, binaries, quick).await,
            Scenario::ScaleOut => scale_out::run(&mut report, binaries, quick).await,
        };
        if let Err(error) = result {
            report.status = Status::Failed(format!("{error:#}"));
        }
        report
    }
}

/// The reason a scenario cannot run when its RPC answers `UNIMPLEMENTED`, `None` otherwise.
pub fn unimplemented(status: &tonic::Status, rpc: &str) -> Option<String> {
    (status.code() == tonic::Code::Unimplemented)
        .then(|| format!("{rpc} answers UNIMPLEMENTED in this build"))
}

/// A request with a deadline, so no call of the benchmark can hang.
pub fn request<T>(message: T, timeout: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Percentage with one decimal, for target texts.
pub fn percent(part: f64, whole: f64) -> f64 {
    if whole == 0.0 {
        0.0
    } else {
        100.0 * part / whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_ids_round_trip() {
        for scenario in Scenario::ALL {
            assert_eq!(Scenario::from_id(scenario.id()), Some(scenario));
        }
        assert_eq!(Scenario::from_id("FAN-OUT"), Some(Scenario::FanOut));
        assert_eq!(Scenario::from_id("nope"), None);
    }

    #[test]
    fn only_unimplemented_means_not_run() {
        let status = tonic::Status::unimplemented("not here");
        assert!(unimplemented(&status, "X.Y").is_some());
        assert!(unimplemented(&tonic::Status::invalid_argument("bad"), "X.Y").is_none());
    }
}
