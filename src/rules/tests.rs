use std::collections::BTreeMap;

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

use super::*;

fn text(value: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    }
}

fn number(value: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(value)),
    }
}

fn flag(value: bool) -> Value {
    Value {
        kind: Some(Kind::BoolValue(value)),
    }
}

fn fields(pairs: &[(&str, Value)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// The one rule of a file whose rule has `audience` (TOML inline table).
fn rule_with(audience: &str) -> Rule {
    let file = format!(
        "[[rule]]\nid = \"r\"\nevents = [\"e\"]\ncampaign = \"c1\"\naudience = {audience}\n"
    );
    let mut rules = parse_file(&file).unwrap_or_else(|e| panic!("{audience}: {e}"));
    rules.remove(0)
}

fn matches(audience: &str, properties: &Struct, traits: &Struct) -> bool {
    rule_with(audience).decide(
        "cust",
        "msg",
        &Attributes {
            properties: Some(properties),
            traits: Some(traits),
        },
    ) == Decision::Send
}

#[test]
fn each_operator_decides_on_properties_and_traits() {
    let props = fields(&[
        ("country", text("US")),
        ("total", number(120.0)),
        ("total_text", text("80")),
        ("gift", flag(true)),
        ("ordered_at", text("2026-03-10T12:00:00Z")),
        (
            "nothing",
            Value {
                kind: Some(Kind::NullValue(0)),
            },
        ),
    ]);
    let traits = fields(&[("plan", text("pro")), ("signed_up", text("2025-01-15"))]);
    let cases: &[(&str, bool)] = &[
        (r#"{ property = "country", eq = "US" }"#, true),
        (r#"{ property = "country", eq = "DE" }"#, false),
        (r#"{ property = "country", ne = "DE" }"#, true),
        (r#"{ property = "country", ne = "US" }"#, false),
        (r#"{ trait = "plan", in = ["pro", "enterprise"] }"#, true),
        (r#"{ trait = "plan", in = ["free"] }"#, false),
        (r#"{ property = "gift", eq = true }"#, true),
        (r#"{ property = "total", eq = 120 }"#, true),
        (r#"{ property = "total", gt = 100 }"#, true),
        (r#"{ property = "total", gt = 120 }"#, false),
        (r#"{ property = "total", gte = 120 }"#, true),
        (r#"{ property = "total", lt = 120 }"#, false),
        (r#"{ property = "total", lte = 120.0 }"#, true),
        // Numbers sent as strings compare as numbers.
        (r#"{ property = "total_text", lt = 100 }"#, true),
        (r#"{ property = "country", gt = 1 }"#, false),
        (r#"{ property = "ordered_at", after = "2026-03-01" }"#, true),
        (
            r#"{ property = "ordered_at", before = "2026-03-01" }"#,
            false,
        ),
        (
            r#"{ property = "ordered_at", before = 2026-04-01T00:00:00Z }"#,
            true,
        ),
        (
            r#"{ trait = "signed_up", before = "2025-02-01T00:00:00+01:00" }"#,
            true,
        ),
        (r#"{ property = "country", exists = true }"#, true),
        (r#"{ trait = "country", exists = true }"#, false),
        (r#"{ trait = "country", exists = false }"#, true),
        // A null value counts as missing.
        (r#"{ property = "nothing", exists = false }"#, true),
    ];
    for (audience, expected) in cases {
        assert_eq!(matches(audience, &props, &traits), *expected, "{audience}");
    }
}

#[test]
fn a_missing_attribute_fails_every_operator_but_exists_false() {
    let empty = Struct::default();
    for audience in [
        r#"{ property = "country", eq = "US" }"#,
        r#"{ property = "country", ne = "US" }"#,
        r#"{ property = "country", in = ["US"] }"#,
        r#"{ property = "total", gt = 1 }"#,
        r#"{ property = "total", lte = 1 }"#,
        r#"{ property = "at", before = "2030-01-01" }"#,
        r#"{ property = "at", after = "2000-01-01" }"#,
        r#"{ property = "country", exists = true }"#,
    ] {
        assert!(!matches(audience, &empty, &empty), "{audience}");
    }
    assert!(matches(
        r#"{ property = "country", exists = false }"#,
        &empty,
        &empty
    ));
    // No traits at all is the same as none of them.
    let rule = rule_with(r#"{ trait = "plan", eq = "pro" }"#);
    let decision = rule.decide(
        "c",
        "m",
        &Attributes {
            properties: None,
            traits: None,
        },
    );
    assert_eq!(decision, Decision::FilteredOut);
}

#[test]
fn all_of_and_any_of_nest() {
    let audience = r#"{ all = [
        { property = "country", in = ["US", "CA"] },
        { any = [ { trait = "plan", eq = "pro" }, { property = "total", gte = 100 } ] },
    ] }"#;
    let cases = [
        (
            fields(&[("country", text("US"))]),
            fields(&[("plan", text("pro"))]),
            true,
        ),
        (
            fields(&[("country", text("CA")), ("total", number(150.0))]),
            fields(&[]),
            true,
        ),
        (
            fields(&[("country", text("CA")), ("total", number(50.0))]),
            fields(&[("plan", text("free"))]),
            false,
        ),
        (
            fields(&[("country", text("DE"))]),
            fields(&[("plan", text("pro"))]),
            false,
        ),
    ];
    for (props, traits, expected) in cases {
        assert_eq!(
            matches(audience, &props, &traits),
            expected,
            "{props:?} {traits:?}"
        );
    }
    // Lists are not scalars: no operator but exists takes them.
    let listed = fields(&[(
        "country",
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![text("US")],
            })),
        },
    )]);
    assert!(!matches(
        r#"{ property = "country", eq = "US" }"#,
        &listed,
        &fields(&[])
    ));
    assert!(
        rule_with(audience)
            .audience
            .unwrap()
            .to_string()
            .starts_with("all(property.country in")
    );
}

#[test]
fn twenty_percent_of_ten_thousand_customers_are_sampled_and_a_retry_decides_the_same() {
    let rule = parse_file(
        "[[rule]]\nid = \"nps-20\"\nevents = [\"order\"]\ncampaign = \"c1\"\nsample_percent = 20\n",
    )
    .unwrap()
    .remove(0);
    let taken: Vec<bool> = (0..10_000)
        .map(|i| rule.sampled_in(&format!("customer-{i}"), &format!("message-{i}")))
        .collect();
    let share = taken.iter().filter(|t| **t).count() as f64 / 10_000.0;
    assert!((0.185..=0.215).contains(&share), "sampled {share}");
    // The same event (customer and message id) retried decides the same.
    for (i, first) in taken.iter().enumerate() {
        assert_eq!(
            rule.sampled_in(&format!("customer-{i}"), &format!("message-{i}")),
            *first
        );
    }
    // 0 and 100 are exact.
    let mut all = rule.clone();
    all.sample_percent = 100.0;
    let mut none = rule.clone();
    none.sample_percent = 0.0;
    assert!((0..1000).all(|i| all.sampled_in(&i.to_string(), "m")));
    assert!((0..1000).all(|i| !none.sampled_in(&i.to_string(), "m")));
}

#[test]
fn a_file_with_a_mistake_is_refused_with_where_and_why() {
    let cases = [
        (
            "[[rule]]\nid = \"a\"\nevents = []\ncampaign = \"c\"\n",
            "rule[0] (a).events",
        ),
        (
            "[[rule]]\nid = \"a b\"\nevents = [\"e\"]\ncampaign = \"c\"\n",
            "rule[0].id",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\n[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\n",
            "another rule has this id",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\nsample_percent = 120\n",
            "sample_percent",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\ndelay_days = 400\n",
            "delay_days",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\nthrottle_days = 0\n",
            "throttle_days",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\ncooldown = \"soon\"\n",
            "cooldown",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\naudience = { property = \"x\", eq = 1, ne = 2 }\n",
            "exactly one operator",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\naudience = { all = [ { property = \"x\" } ] }\n",
            "rule[0] (a).audience.all[0]",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\naudience = { property = \"x\", before = \"yesterday\" }\n",
            "before",
        ),
        (
            "[[rule]]\nid = \"a\"\nevents = [\"e\"]\ncampaign = \"c\"\ncolour = \"red\"\n",
            "unknown field",
        ),
    ];
    for (file, expected) in cases {
        let error = parse_file(file).unwrap_err();
        assert!(
            error.contains(expected),
            "{error} should mention {expected}"
        );
    }
}

/// A rules file of one rule sending `campaign` on `event`.
fn one_rule(id: &str, event: &str, campaign: &str) -> String {
    format!("[[rule]]\nid = \"{id}\"\nevents = [\"{event}\"]\ncampaign = \"{campaign}\"\n")
}

/// Writes `contents` to `name` in `dir` and returns its path.
fn write_file(dir: &tempfile::TempDir, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn environment_mappings_join_the_file_rules_unless_a_file_rule_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(&dir, "rules.toml", &one_rule("orders", "order", "c1"));
    let mut environment = EventMappings::new();
    environment.insert("order".into(), vec!["c1".into(), "c2".into()]);
    let rules = EventRules::load(Some(path), environment).unwrap();
    let set = rules.current();
    let ids: Vec<&str> = set.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["orders", "env:order:c2"]);
    assert_eq!(set.mappings()["order"], ["c1", "c2"]);
}

#[test]
fn a_reload_takes_a_good_file_and_refuses_a_bad_one_keeping_the_rules_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(&dir, "rules.toml", &one_rule("one", "e", "c1"));
    let rules = EventRules::load(Some(path.clone()), EventMappings::new()).unwrap();
    let first = rules.current();
    assert_eq!(rules.reload(), Ok(Reloaded::Unchanged));

    std::fs::write(&path, one_rule("two", "e", "c2")).unwrap();
    assert_eq!(rules.reload(), Ok(Reloaded::Replaced { rules: 1 }));
    let second = rules.current();
    assert_eq!(second.rules[0].id, "two");
    assert_ne!(second.version, first.version);

    std::fs::write(&path, "[[rule]]\nid = \"three\"\nevents = [\"e\"]\n").unwrap();
    let refused = rules.reload().unwrap_err();
    assert!(refused.contains("campaign"), "{refused}");
    assert_eq!(rules.current().rules[0].id, "two");
    assert_eq!(rules.current().version, second.version);
    assert_eq!(rules.refused(), Some(refused.clone()));
    // Asked again (SIGHUP) with the same bad file: the same refusal.
    assert_eq!(rules.reload(), Err(refused));

    std::fs::remove_file(&path).unwrap();
    assert!(rules.reload().unwrap_err().contains("cannot read"));
    assert_eq!(rules.current().rules[0].id, "two");
}

#[test]
fn the_settings_load_the_rules_file_and_the_cooldown_and_refuse_bad_ones() {
    use crate::config::{Config, MapSource, UpstreamMode};
    let dir = tempfile::tempdir().unwrap();
    let good = write_file(&dir, "good.toml", &one_rule("a", "e", "c1"));
    let bad = write_file(&dir, "bad.toml", "[[rule]]\nid = \"a\"\nevents = [\"e\"]\n");
    let load =
        |pairs: Vec<(&str, &str)>| Config::load(&MapSource::new(pairs), UpstreamMode::Sandbox);

    let config = load(vec![
        ("CXGW_EVENT_RULES_FILE", good.to_str().unwrap()),
        ("CXGW_EVENT_MAPPINGS", "e=c2"),
        ("CXGW_SURVEY_COOLDOWN", "14d"),
    ])
    .unwrap();
    let rules = config.event_rules.current();
    assert_eq!(rules.rules.len(), 2);
    assert_eq!(config.event_rules.file(), Some(good.as_path()));
    assert_eq!(
        config.survey_cooldown,
        Some(Duration::from_secs(14 * 24 * 3600))
    );

    // Off unless set; `off` and `0s` are off too.
    assert_eq!(load(vec![]).unwrap().survey_cooldown, None);
    assert_eq!(
        load(vec![("CXGW_SURVEY_COOLDOWN", "off")])
            .unwrap()
            .survey_cooldown,
        None
    );
    assert_eq!(
        load(vec![("CXGW_SURVEY_COOLDOWN", "0s")])
            .unwrap()
            .survey_cooldown,
        None
    );

    for (key, value) in [
        ("CXGW_EVENT_RULES_FILE", bad.to_str().unwrap()),
        ("CXGW_EVENT_RULES_FILE", "/nonexistent/rules.toml"),
        ("CXGW_EVENT_RULES_FILE", " "),
        ("CXGW_SURVEY_COOLDOWN", "soon"),
        ("CXGW_SURVEY_COOLDOWN", "400d"),
    ] {
        let error = load(vec![(key, value)]).unwrap_err();
        assert_eq!(error.key, key, "{value}: {error}");
    }
}
