//! One customer's survey history, computed from the log's latest versions of their responses:
//! a summary per metric (`SurveyService.GetCustomerFeedbackHistory`).
//!
//! The trend of a metric looks at the customer's latest `window` scored responses, oldest to
//! newest, splits them into an older and a newer half (the middle one of an odd count belongs
//! to neither, so both halves weigh the same number of answers) and compares the newer half's
//! mean with the older half's. A difference of at least a tenth of the metric's answer range
//! counts as a direction: one NPS point, or 0.4 of a CSAT star, is what an account manager
//! notices; less is noise between single answers.

use crate::convert::{score_category, timestamp_to_ms};
use crate::pb;

/// Trend window when the caller does not choose one.
pub const DEFAULT_TREND_WINDOW: usize = 5;
/// The largest trend window a caller may ask for.
pub const MAX_TREND_WINDOW: usize = 100;

/// The smallest difference of half-window means that counts as a direction, per metric: a
/// tenth of the answer range (NPS 0..10, CSAT and STAR 1..5, CES 1..7).
fn trend_threshold(metric: pb::Metric) -> f64 {
    match metric {
        pb::Metric::Nps => 1.0,
        pb::Metric::Csat | pb::Metric::Star => 0.4,
        pb::Metric::Ces => 0.6,
        pb::Metric::Unspecified => f64::INFINITY,
    }
}

/// The direction of `scores` (oldest first) and the newer half's mean minus the older half's,
/// or `None` below two scores.
pub fn trend(metric: pb::Metric, scores: &[f64]) -> (pb::ScoreTrend, Option<f64>) {
    if scores.len() < 2 {
        return (pb::ScoreTrend::InsufficientData, None);
    }
    let half = scores.len() / 2;
    let older = &scores[..half];
    let newer = &scores[scores.len() - half..];
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let delta = mean(newer) - mean(older);
    // Means of decimal answers are not exact in binary: a difference that is a tenth of the
    // range on paper must count as one.
    let threshold = trend_threshold(metric) - 1e-9;
    let direction = if delta >= threshold {
        pb::ScoreTrend::Improving
    } else if delta <= -threshold {
        pb::ScoreTrend::Declining
    } else {
        pb::ScoreTrend::Stable
    };
    (direction, Some(delta))
}

/// One summary per metric the customer answered, ordered by metric, from their responses
/// newest first (as [`super::FeedbackLog::customer_responses`] returns them).
pub fn summarize(responses: &[pb::Feedback], window: usize) -> Vec<pb::CustomerMetricSummary> {
    let metrics = [
        pb::Metric::Nps,
        pb::Metric::Csat,
        pb::Metric::Ces,
        pb::Metric::Star,
        pb::Metric::Unspecified,
    ];
    metrics
        .into_iter()
        .filter_map(|metric| summarize_metric(responses, metric, window))
        .collect()
}

fn summarize_metric(
    responses: &[pb::Feedback],
    metric: pb::Metric,
    window: usize,
) -> Option<pb::CustomerMetricSummary> {
    let of_metric: Vec<&pb::Feedback> = responses
        .iter()
        .filter(|feedback| feedback.metric() == metric)
        .collect();
    let latest = of_metric.first()?;
    let earliest = of_metric.last()?;
    // Newest first, like the responses.
    let scores: Vec<f64> = of_metric
        .iter()
        .filter_map(|feedback| feedback.score.filter(|score| score.is_finite()))
        .collect();
    let latest_score = scores.first().copied();
    let average_score =
        (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64);
    let mut windowed: Vec<f64> = scores.iter().take(window).copied().collect();
    windowed.reverse();
    let (trend, trend_delta) = trend(metric, &windowed);
    Some(pb::CustomerMetricSummary {
        metric: metric as i32,
        response_count: i64::try_from(of_metric.len()).unwrap_or(i64::MAX),
        scored_count: i64::try_from(scores.len()).unwrap_or(i64::MAX),
        latest_score,
        latest_score_category: score_category(metric, latest_score) as i32,
        average_score,
        first_response_time: earliest.create_time,
        last_response_time: latest.create_time,
        trend: trend as i32,
        trend_delta,
        trend_window_size: i32::try_from(windowed.len()).unwrap_or(i32::MAX),
    })
}

/// The `(create_time_ms, feedback_id)` keyset position of a response, for paging.
pub fn position(feedback: &pb::Feedback) -> (i64, String) {
    (
        feedback.create_time.as_ref().map_or(0, timestamp_to_ms),
        feedback.feedback_id.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: &str, metric: pb::Metric, score: Option<f64>, seconds: i64) -> pb::Feedback {
        pb::Feedback {
            feedback_id: id.into(),
            metric: metric as i32,
            score,
            create_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn trends_compare_the_halves_of_the_window() {
        use pb::ScoreTrend::*;
        assert_eq!(trend(pb::Metric::Nps, &[7.0]), (InsufficientData, None));
        assert_eq!(trend(pb::Metric::Nps, &[]), (InsufficientData, None));
        // The middle answer of an odd window belongs to neither half.
        assert_eq!(
            trend(pb::Metric::Nps, &[4.0, 0.0, 6.0]),
            (Improving, Some(2.0))
        );
        assert_eq!(trend(pb::Metric::Nps, &[9.0, 9.0, 6.0, 7.0]).0, Declining);
        // Just under a tenth of the range is noise; exactly a tenth is a direction.
        assert_eq!(trend(pb::Metric::Nps, &[8.0, 8.9]).0, Stable);
        assert_eq!(trend(pb::Metric::Csat, &[4.0, 4.4]).0, Improving);
        assert_eq!(trend(pb::Metric::Ces, &[5.0, 4.4]).0, Declining);
    }

    #[test]
    fn summaries_cover_each_metric_over_all_responses() {
        // Newest first, as the log returns them.
        let responses = vec![
            response("f6", pb::Metric::Nps, Some(3.0), 600),
            response("f5", pb::Metric::Csat, Some(5.0), 500),
            response("f4", pb::Metric::Nps, None, 400),
            response("f3", pb::Metric::Nps, Some(6.0), 300),
            response("f2", pb::Metric::Nps, Some(9.0), 200),
            response("f1", pb::Metric::Nps, Some(10.0), 100),
        ];
        let summaries = summarize(&responses, 3);
        assert_eq!(summaries.len(), 2);
        let nps = &summaries[0];
        assert_eq!(nps.metric(), pb::Metric::Nps);
        assert_eq!((nps.response_count, nps.scored_count), (5, 4));
        assert_eq!(nps.latest_score, Some(3.0));
        assert_eq!(nps.latest_score_category(), pb::ScoreCategory::Detractor);
        assert_eq!(nps.average_score, Some(7.0));
        assert_eq!(nps.first_response_time.unwrap().seconds, 100);
        assert_eq!(nps.last_response_time.unwrap().seconds, 600);
        // Window of 3 scored answers, oldest first: 9, 6, 3.
        assert_eq!(nps.trend_window_size, 3);
        assert_eq!(nps.trend(), pb::ScoreTrend::Declining);
        assert_eq!(nps.trend_delta, Some(-6.0));
        let csat = &summaries[1];
        assert_eq!(csat.metric(), pb::Metric::Csat);
        assert_eq!(csat.latest_score_category(), pb::ScoreCategory::Promoter);
        assert_eq!(csat.trend(), pb::ScoreTrend::InsufficientData);
        assert_eq!(csat.trend_delta, None);
    }
}
