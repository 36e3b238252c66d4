//! Server-side filters of a subscription, evaluated on the few fields of a log entry that the
//! log keeps beside the encoded message, so no message is decoded to be filtered.

use crate::pb;

/// What a filter looks at; stored beside each log entry and carried by live entries.
pub use crate::store::feedback_log::EntryFields;

impl EntryFields {
    pub fn of(feedback: &pb::Feedback) -> EntryFields {
        EntryFields {
            campaign_id: feedback.campaign_id.clone(),
            metric: feedback.metric,
            score: feedback.score,
            score_category: feedback.score_category,
            has_comment: !feedback.comment.trim().is_empty(),
        }
    }
}

/// A validated subscription filter; every condition that is set must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Empty means any campaign. At most 100 ids, so a linear scan beats hashing.
    pub campaign_ids: Vec<String>,
    /// `pb::Metric` number; `None` means any.
    pub metric: Option<i32>,
    /// `pb::ScoreCategory` numbers; empty means any.
    pub score_categories: Vec<i32>,
    pub min_score: Option<f64>,
    pub max_score: Option<f64>,
    pub has_comment: Option<bool>,
}

impl Filter {
    pub fn matches(&self, entry: &EntryFields) -> bool {
        if !self.campaign_ids.is_empty() && !self.campaign_ids.contains(&entry.campaign_id) {
            return false;
        }
        if self.metric.is_some_and(|metric| metric != entry.metric) {
            return false;
        }
        // A response without a score has the unspecified category, which never matches a list.
        if !self.score_categories.is_empty()
            && (entry.score_category == pb::ScoreCategory::Unspecified as i32
                || !self.score_categories.contains(&entry.score_category))
        {
            return false;
        }
        if !score_in_range(entry.score, self.min_score, self.max_score) {
            return false;
        }
        if self
            .has_comment
            .is_some_and(|wanted| wanted != entry.has_comment)
        {
            return false;
        }
        true
    }
}

/// Whether `score` lies within the inclusive bounds `min..=max`, either of which may be open;
/// a response without a score is outside every range, and inside no range at all.
pub fn score_in_range(score: Option<f64>, min: Option<f64>, max: Option<f64>) -> bool {
    if min.is_none() && max.is_none() {
        return true;
    }
    score.is_some_and(|score| {
        !(min.is_some_and(|min| score < min) || max.is_some_and(|max| score > max))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(campaign: &str, metric: pb::Metric, score: Option<f64>, comment: bool) -> EntryFields {
        EntryFields {
            campaign_id: campaign.to_owned(),
            metric: metric as i32,
            score,
            score_category: crate::convert::score_category(metric, score) as i32,
            has_comment: comment,
        }
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        let filter = Filter::default();
        assert!(filter.matches(&entry("a", pb::Metric::Nps, Some(3.0), false)));
        assert!(filter.matches(&entry("", pb::Metric::Unspecified, None, true)));
    }

    #[test]
    fn every_set_condition_must_hold() {
        let filter = Filter {
            campaign_ids: vec!["a".into(), "b".into()],
            metric: Some(pb::Metric::Nps as i32),
            score_categories: vec![pb::ScoreCategory::Detractor as i32],
            min_score: Some(2.0),
            max_score: Some(6.0),
            has_comment: Some(true),
        };
        assert!(filter.matches(&entry("b", pb::Metric::Nps, Some(6.0), true)));
        assert!(!filter.matches(&entry("c", pb::Metric::Nps, Some(6.0), true)));
        assert!(!filter.matches(&entry("b", pb::Metric::Csat, Some(2.0), true)));
        assert!(!filter.matches(&entry("b", pb::Metric::Nps, Some(7.0), true)));
        assert!(!filter.matches(&entry("b", pb::Metric::Nps, Some(1.0), true)));
        assert!(!filter.matches(&entry("b", pb::Metric::Nps, Some(6.0), false)));
        assert!(!filter.matches(&entry("b", pb::Metric::Nps, None, true)));
    }

    #[test]
    fn responses_without_a_score_never_match_score_conditions() {
        let unscored = entry("a", pb::Metric::Nps, None, false);
        for filter in [
            Filter {
                min_score: Some(0.0),
                ..Filter::default()
            },
            Filter {
                max_score: Some(10.0),
                ..Filter::default()
            },
            Filter {
                score_categories: vec![pb::ScoreCategory::Unspecified as i32],
                ..Filter::default()
            },
        ] {
            assert!(!filter.matches(&unscored), "{filter:?}");
        }
        let without_comment = Filter {
            has_comment: Some(false),
            ..Filter::default()
        };
        assert!(without_comment.matches(&unscored));
    }
}
