//! SurveyService's write validators, as tables: a request, and the fields its violations name
//! (none for a valid request).

use super::*;

use crate::grpc::validate::violated_fields as fields;

fn recipient(email: &str) -> pb::Recipient {
    pb::Recipient {
        email: email.to_owned(),
        ..Default::default()
    }
}

#[test]
fn send_survey_table() {
    let send = |campaign_id: &str, recipients: Vec<pb::Recipient>| pb::SendSurveyRequest {
        campaign_id: campaign_id.to_owned(),
        recipients,
        delay_days: None,
        options: None,
    };
    let valid = || send("c1", vec![recipient("a@example.com")]);
    let cases: Vec<(&str, pb::SendSurveyRequest, Vec<&str>)> = vec![
        ("valid", valid(), vec![]),
        (
            "a campaign id is required",
            send("", vec![recipient("a@example.com")]),
            vec!["campaign_id"],
        ),
        (
            "a campaign id that would change the path",
            send("../x", vec![recipient("a@example.com")]),
            vec!["campaign_id"],
        ),
        ("no recipients", send("c1", vec![]), vec!["recipients"]),
        (
            "not an address",
            send("c1", vec![recipient("nope")]),
            vec!["recipients[0].email"],
        ),
        (
            "each address once, compared normalised",
            send(
                "c1",
                vec![recipient("a@example.com"), recipient(" A@EXAMPLE.com")],
            ),
            vec!["recipients[1].email"],
        ),
        (
            "names are bounded",
            send(
                "c1",
                vec![pb::Recipient {
                    last_name: "x".repeat(MAX_STRING_CHARS + 1),
                    ..recipient("a@example.com")
                }],
            ),
            vec!["recipients[0].last_name"],
        ),
        (
            "a delay of more than a year",
            pb::SendSurveyRequest {
                delay_days: Some(MAX_DELAY_DAYS + 1),
                ..valid()
            },
            vec!["delay_days"],
        ),
        (
            "a negative delay",
            pb::SendSurveyRequest {
                delay_days: Some(-1),
                ..valid()
            },
            vec!["delay_days"],
        ),
        (
            "a delay of a year",
            pb::SendSurveyRequest {
                delay_days: Some(MAX_DELAY_DAYS),
                ..valid()
            },
            vec![],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(send_survey(&request)), expected, "{case}");
    }
}

#[test]
fn feedback_label_tables() {
    let tags =
        |feedback_id: &str, mode: pb::UpdateMode, tags: &[&str]| pb::SetFeedbackTagsRequest {
            feedback_id: feedback_id.to_owned(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            mode: mode as i32,
            options: None,
        };
    use pb::UpdateMode::{Append, Replace, Unspecified};
    let cases: Vec<(&str, pb::SetFeedbackTagsRequest, Vec<&str>)> = vec![
        ("append", tags("f1", Append, &["vip"]), vec![]),
        (
            "replace with nothing clears",
            tags("f1", Replace, &[]),
            vec![],
        ),
        ("append nothing", tags("f1", Append, &[]), vec!["tags"]),
        (
            "the mode is never implied",
            tags("f1", Unspecified, &["vip"]),
            vec!["mode"],
        ),
        (
            "a feedback id is required",
            tags("", Replace, &[]),
            vec!["feedback_id"],
        ),
        ("an empty tag", tags("f1", Append, &[""]), vec!["tags[0]"]),
        (
            "a repeated tag",
            tags("f1", Append, &["a", "a"]),
            vec!["tags[1]"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(set_feedback_tags(&request)), expected, "{case}");
    }

    let topic = |name: &str, sentiment: i32| pb::FeedbackTopic {
        name: name.to_owned(),
        sentiment,
    };
    let topics =
        |mode: pb::UpdateMode, topics: Vec<pb::FeedbackTopic>| pb::SetFeedbackTopicsRequest {
            feedback_id: "f1".to_owned(),
            topics,
            mode: mode as i32,
            options: None,
        };
    let positive = pb::Sentiment::Positive as i32;
    let cases: Vec<(&str, pb::SetFeedbackTopicsRequest, Vec<&str>)> = vec![
        (
            "append",
            topics(Append, vec![topic("price", positive)]),
            vec![],
        ),
        ("append nothing", topics(Append, vec![]), vec!["topics"]),
        (
            "an unknown sentiment",
            topics(Append, vec![topic("price", 99)]),
            vec!["topics[0].sentiment"],
        ),
        (
            "a repeated topic",
            topics(
                Replace,
                vec![topic("price", positive), topic("price", positive)],
            ),
            vec!["topics[1].name"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_eq!(fields(set_feedback_topics(&request)), expected, "{case}");
    }
}
