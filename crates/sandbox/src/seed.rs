//! Realistic seed data and simulated survey responses, both from the seeded data generator.

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::config::SeedConfig;
use crate::retently::model::{
    Campaign, CampaignKind, Category, Company, Customer, Feedback, Metric, Property, SentSurvey,
    Template, Topic, normalize_email,
};
use crate::state::World;

const FIRST_NAMES: &[&str] = &[
    "Olivia",
    "Liam",
    "Emma",
    "Noah",
    "Amelia",
    "Oliver",
    "Sophia",
    "Elijah",
    "Isabella",
    "Lucas",
    "Mia",
    "Mateo",
    "Charlotte",
    "Hugo",
    "Ava",
    "Leon",
    "Freya",
    "Arjun",
    "Yuki",
    "Chloe",
    "Samir",
    "Ingrid",
    "Tomás",
    "Aisha",
    "Marek",
    "Léa",
    "Kwame",
    "Sofia",
    "Daniel",
    "Hannah",
];
const LAST_NAMES: &[&str] = &[
    "Smith", "Johnson", "García", "Müller", "Rossi", "Kowalski", "Nguyen", "Patel", "Kim", "Silva",
    "Dubois", "Andersen", "O'Brien", "Novak", "Tanaka", "Okafor", "Jensen", "Martin", "Fischer",
    "Costa", "Ivanova", "Moreau", "Schmidt", "Rahman", "Cohen", "Larsen", "Horvat", "Bianchi",
    "Walsh", "Sato",
];
const COMPANIES: &[(&str, &str, &str)] = &[
    ("Acme Corp", "acme.com", "Manufacturing"),
    ("Globex", "globex.io", "Energy"),
    ("Initech", "initech.com", "Software"),
    ("Umbrella Health", "umbrella-health.com", "Healthcare"),
    ("Stark Logistics", "starklogistics.eu", "Logistics"),
    ("Wayne Retail", "wayneretail.com", "Retail"),
    ("Hooli", "hooli.xyz", "Software"),
    ("Soylent Foods", "soylentfoods.com", "Food & Beverage"),
    ("Vandelay Imports", "vandelay.com", "Wholesale"),
    ("Pied Piper", "piedpiper.net", "Software"),
    ("Tyrell Labs", "tyrell-labs.com", "Biotech"),
    ("Cyberdyne Systems", "cyberdyne.ai", "Robotics"),
];
const FREE_MAIL: &[&str] = &["gmail.com", "outlook.com", "yahoo.com", "proton.me"];
const JOB_TITLES: &[&str] = &[
    "Operations Manager",
    "CTO",
    "Product Manager",
    "Support Lead",
    "Buyer",
    "Marketing Director",
    "Engineer",
    "Founder",
];
const PLACES: &[(&str, &str, &str)] = &[
    ("US", "CA", "San Francisco"),
    ("US", "NY", "New York"),
    ("GB", "England", "London"),
    ("DE", "Berlin", "Berlin"),
    ("FR", "Île-de-France", "Paris"),
    ("CA", "ON", "Toronto"),
    ("AU", "NSW", "Sydney"),
    ("NL", "North Holland", "Amsterdam"),
];
const CUSTOMER_TAGS: &[&str] = &[
    "vip",
    "beta",
    "trial",
    "enterprise",
    "churn-risk",
    "partner",
];
const PLANS: &[&str] = &["Free", "Starter", "Professional plan", "Enterprise"];
const POSITIVE_COMMENTS: &[&str] = &[
    "Great product, our team uses it every day.",
    "Support answered within minutes, thank you!",
    "Setup was painless and the docs are clear.",
    "Exactly what we needed, fair price.",
    "Love the new dashboard.",
    "Fast delivery and everything worked out of the box.",
];
const NEUTRAL_COMMENTS: &[&str] = &[
    "Does the job, but the reporting could be more flexible.",
    "Good overall, a bit pricey for small teams.",
    "Fine, although onboarding took longer than expected.",
    "OK. Would like an export to CSV.",
];
const NEGATIVE_COMMENTS: &[&str] = &[
    "The app was down twice this week.",
    "Billing charged us twice and support was slow to fix it.",
    "Too complicated, we could not find basic settings.",
    "Delivery was late and the package was damaged.",
    "Missing integrations we were promised.",
];
const FEEDBACK_TAGS: &[&str] = &[
    "pricing",
    "support",
    "onboarding",
    "performance",
    "ux",
    "billing",
];
const TOPICS: &[&str] = &[
    "Customer support",
    "Pricing",
    "Ease of use",
    "Reliability",
    "Delivery",
];
const TEAM: &[&str] = &[
    "alex@support.example",
    "sam@support.example",
    "jo@success.example",
];

/// The first campaigns, in order: every metric has an active transactional campaign (NPS and
/// CES without throttle, CSAT with 30 days, STAR with 7), two regular ones and a paused one.
const CAMPAIGN_PATTERN: &[(CampaignKind, Metric, bool, u32, &str, &str)] = &[
    (
        CampaignKind::Transactional,
        Metric::Nps,
        true,
        0,
        "Post-purchase NPS",
        "email",
    ),
    (
        CampaignKind::Transactional,
        Metric::Csat,
        true,
        30,
        "Support ticket CSAT",
        "email",
    ),
    (
        CampaignKind::Transactional,
        Metric::Ces,
        true,
        0,
        "Onboarding effort (CES)",
        "email",
    ),
    (
        CampaignKind::Transactional,
        Metric::Star,
        true,
        7,
        "Delivery rating",
        "email",
    ),
    (
        CampaignKind::Regular,
        Metric::Nps,
        true,
        90,
        "Quarterly relationship NPS",
        "email",
    ),
    (
        CampaignKind::Regular,
        Metric::Csat,
        true,
        0,
        "In-app satisfaction pulse",
        "in-app",
    ),
    (
        CampaignKind::Transactional,
        Metric::Nps,
        false,
        0,
        "Legacy checkout NPS (paused)",
        "email",
    ),
];

fn template_subject(metric: Metric) -> &'static str {
    match metric {
        Metric::Nps => "How likely are you to recommend us to a friend?",
        Metric::Csat => "How satisfied were you with our service?",
        Metric::Ces => "How easy was it to get what you needed?",
        Metric::Star => "How would you rate your experience?",
    }
}

/// Fills an empty world. Ids come from `world.ids`, every other choice from `world.rng`.
pub(crate) fn seed(world: &mut World, config: &SeedConfig, now: DateTime<Utc>) {
    for index in 0..config.templates {
        let metric = Metric::ALL[index % Metric::ALL.len()];
        let round = index / Metric::ALL.len();
        let name = if round == 0 {
            format!("{} email template", metric.upper())
        } else {
            format!("{} email template v{}", metric.upper(), round + 1)
        };
        let created = now - days(world, 200, 400);
        let template = Template {
            id: world.ids.next(),
            name,
            channel: "email".to_owned(),
            metric,
            subject: template_subject(metric).to_owned(),
            created,
        };
        world.retently.templates.push(template);
    }

    for index in 0..config.campaigns {
        let (kind, metric, active, throttle, name, channel) = match CAMPAIGN_PATTERN.get(index) {
            Some((kind, metric, active, throttle, name, channel)) => (
                *kind,
                *metric,
                *active,
                *throttle,
                (*name).to_owned(),
                *channel,
            ),
            None => {
                let metric = Metric::ALL[index % Metric::ALL.len()];
                let name = format!("{} campaign #{}", metric.upper(), index + 1);
                (CampaignKind::Regular, metric, true, 0, name, "email")
            }
        };
        let template_id = world
            .retently
            .templates
            .iter()
            .find(|template| template.metric == metric)
            .or_else(|| world.retently.templates.first())
            .map(|template| template.id.clone());
        let created = now - days(world, 120, 200);
        let campaign = Campaign {
            id: world.ids.next(),
            name,
            is_active: active,
            template_id,
            metric,
            kind,
            channel: channel.to_owned(),
            throttle_days: throttle,
            created,
        };
        world.retently.campaigns.push(campaign);
    }

    for index in 0..config.companies {
        let (name, domain, industry) = COMPANIES[index % COMPANIES.len()];
        let round = index / COMPANIES.len();
        let (name, domain) = if round == 0 {
            (name.to_owned(), domain.to_owned())
        } else {
            let (stem, tld) = domain.split_once('.').unwrap_or((domain, "com"));
            (
                format!("{name} {}", round + 1),
                format!("{stem}{}.{tld}", round + 1),
            )
        };
        let tags = pick_some(world, &["key-account", "smb", "emea", "na", "apac"], 2);
        let created = now - days(world, 180, 720);
        let company = Company {
            id: world.ids.next(),
            domain,
            name,
            industry: Some(industry.to_owned()),
            tags,
            created,
        };
        world.retently.companies.push(company);
    }

    for _ in 0..config.customers {
        let created = now - days(world, 91, 365);
        seed_customer(world, created);
    }

    if world.retently.campaigns.is_empty() || world.retently.customers.is_empty() {
        return;
    }
    let customer_ids: Vec<String> = world.retently.customers.keys().cloned().collect();
    let mut responses = Vec::with_capacity(config.feedback);
    for _ in 0..config.feedback {
        let responded = now - minutes(world, 5, 90 * 24 * 60);
        responses.push(responded);
    }
    // Oldest first, so the feedback list is in arrival order like a live account's.
    responses.sort();
    for responded in responses {
        let campaign_index = pick_campaign(world);
        let customer_id = customer_ids[world.rng.random_range(0..customer_ids.len())].clone();
        let sent = responded - minutes(world, 5, 48 * 60);
        let survey_index = new_survey(world, campaign_index, &customer_id, sent, "campaign");
        respond(world, survey_index, responded);
    }
    // Surveys that were sent but not (yet) answered: about one for every two responses.
    for _ in 0..config.feedback / 2 {
        let campaign_index = pick_campaign(world);
        let customer_id = customer_ids[world.rng.random_range(0..customer_ids.len())].clone();
        let sent = now - minutes(world, 60, 90 * 24 * 60);
        let survey_index = new_survey(world, campaign_index, &customer_id, sent, "campaign");
        let roll: f64 = world.rng.random();
        let survey = &mut world.retently.outbox[survey_index];
        if roll < 0.05 {
            survey.bounced = true;
        } else if roll < 0.08 {
            survey.opted_out = true;
            survey.opened = Some(sent + Duration::hours(2));
        } else if roll < 0.5 {
            survey.opened = Some(sent + Duration::hours(3));
        }
    }
    world.retently.outbox.sort_by_key(|survey| survey.created);
}

fn seed_customer(world: &mut World, created: DateTime<Utc>) {
    let first = *FIRST_NAMES.choose(&mut world.rng).unwrap_or(&"Alex");
    let last = *LAST_NAMES.choose(&mut world.rng).unwrap_or(&"Doe");
    let with_company = !world.retently.companies.is_empty() && world.rng.random_bool(0.7);
    let (domain, company) = if with_company {
        let index = world.rng.random_range(0..world.retently.companies.len());
        let company = &world.retently.companies[index];
        (
            company.domain.clone(),
            Some((company.name.clone(), company.id.clone())),
        )
    } else {
        let domain = *FREE_MAIL.choose(&mut world.rng).unwrap_or(&"example.com");
        (domain.to_owned(), None)
    };
    let local: String = format!("{first}.{last}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect::<String>()
        .to_lowercase();
    let mut email = format!("{local}@{domain}");
    let mut suffix = 2;
    while world.retently.by_email.contains_key(&email) {
        email = format!("{local}{suffix}@{domain}");
        suffix += 1;
    }
    let place = *PLACES
        .choose(&mut world.rng)
        .unwrap_or(&("US", "CA", "San Francisco"));
    let plan = *PLANS.choose(&mut world.rng).unwrap_or(&"Free");
    let signup = created - Duration::days(world.rng.random_range(0..30));
    let seats = world.rng.random_range(1..250);
    let tags = pick_some(world, CUSTOMER_TAGS, 2);
    let job_title = JOB_TITLES
        .choose(&mut world.rng)
        .map(|title| (*title).to_owned());
    let customer = Customer {
        id: world.ids.next(),
        email: email.clone(),
        first_name: Some(first.to_owned()),
        last_name: Some(last.to_owned()),
        company_name: company.as_ref().map(|(name, _)| name.clone()),
        company_id: company.map(|(_, id)| id),
        job_title,
        country: Some(place.0.to_owned()),
        state: Some(place.1.to_owned()),
        city: Some(place.2.to_owned()),
        tags,
        properties: vec![
            Property {
                label: "Subscription name".to_owned(),
                name: "subscription_name".to_owned(),
                kind: "text".to_owned(),
                value: plan.to_owned(),
            },
            Property {
                label: "Register date".to_owned(),
                name: "register_date".to_owned(),
                kind: "date".to_owned(),
                value: crate::time::iso(signup),
            },
            Property {
                label: "Seats".to_owned(),
                name: "seats".to_owned(),
                kind: "integer".to_owned(),
                value: seats.to_string(),
            },
        ],
        created,
        updated: created,
        unsubscribed: false,
        unsubscribe_message: None,
    };
    world
        .retently
        .by_email
        .insert(normalize_email(&email), customer.id.clone());
    world
        .retently
        .customers
        .insert(customer.id.clone(), customer);
}

/// Active campaigns get nine in ten responses; paused ones keep a little history.
fn pick_campaign(world: &mut World) -> usize {
    let campaigns = &world.retently.campaigns;
    let active: Vec<usize> = (0..campaigns.len())
        .filter(|index| campaigns[*index].is_active)
        .collect();
    if !active.is_empty() && world.rng.random_bool(0.9) {
        active[world.rng.random_range(0..active.len())]
    } else {
        world.rng.random_range(0..campaigns.len())
    }
}

/// Records a sent survey of `campaign_index` to `customer_id` and returns its outbox index.
pub(crate) fn new_survey(
    world: &mut World,
    campaign_index: usize,
    customer_id: &str,
    sent: DateTime<Utc>,
    sent_by: &str,
) -> usize {
    let survey_id = world.ids.next();
    let message_id = crate::ids::hex(&world.rng.random::<[u8; 16]>());
    let campaign = &world.retently.campaigns[campaign_index];
    let template = campaign.template_id.as_ref().and_then(|id| {
        world
            .retently
            .templates
            .iter()
            .find(|template| &template.id == id)
    });
    let customer = world.retently.customers.get(customer_id);
    let survey = SentSurvey {
        survey_id,
        response_id: None,
        customer_id: customer_id.to_owned(),
        email: customer.map(|c| c.email.clone()).unwrap_or_default(),
        first_name: customer.and_then(|c| c.first_name.clone()),
        last_name: customer.and_then(|c| c.last_name.clone()),
        company_name: customer.and_then(|c| c.company_name.clone()),
        company_id: customer.and_then(|c| c.company_id.clone()),
        tags: customer.map(|c| c.tags.clone()).unwrap_or_default(),
        custom_props: customer.map(|c| c.properties.clone()).unwrap_or_default(),
        campaign_id: campaign.id.clone(),
        campaign_name: campaign.name.clone(),
        template_id: campaign.template_id.clone(),
        subject: template
            .map(|template| template.subject.clone())
            .unwrap_or_else(|| template_subject(campaign.metric).to_owned()),
        channel: campaign.channel.clone(),
        sent_by: sent_by.to_owned(),
        created: sent,
        sent,
        opened: None,
        responded: None,
        opted_out: false,
        bounced: false,
        message_id,
    };
    world.retently.outbox.push(survey);
    world.retently.outbox.len() - 1
}

/// Answers the survey at `survey_index` at `at` and returns the new feedback's index (`None` if
/// the survey's campaign is gone, which cannot happen while campaigns are never deleted).
pub(crate) fn respond(world: &mut World, survey_index: usize, at: DateTime<Utc>) -> Option<usize> {
    let survey = world.retently.outbox.get(survey_index)?;
    let campaign = world.retently.campaign(&survey.campaign_id)?.clone();
    let feedback_id = world.ids.next();
    let metric = campaign.metric;
    let score = draw_score(world, metric);
    let category = metric.category(score);
    let comment = if world.rng.random_bool(0.65) {
        let pool = match category {
            Category::Positive => POSITIVE_COMMENTS,
            Category::Neutral => NEUTRAL_COMMENTS,
            Category::Negative => NEGATIVE_COMMENTS,
        };
        (*pool.choose(&mut world.rng).unwrap_or(&"")).to_owned()
    } else {
        String::new()
    };
    let feedback_tags = if comment.is_empty() {
        Vec::new()
    } else {
        pick_some(world, FEEDBACK_TAGS, 2)
    };
    let topics = if comment.is_empty() || world.rng.random_bool(0.5) {
        Vec::new()
    } else {
        let name = *TOPICS.choose(&mut world.rng).unwrap_or(&"Customer support");
        let sentiment = match category {
            Category::Positive => "positive",
            Category::Neutral => "neutral",
            Category::Negative => "negative",
        };
        vec![Topic {
            name: name.to_owned(),
            sentiment: sentiment.to_owned(),
        }]
    };
    let resolved = category == Category::Negative && world.rng.random_bool(0.4);
    let assigned = if category == Category::Negative {
        TEAM.choose(&mut world.rng)
            .map(|member| (*member).to_owned())
    } else {
        None
    };
    let checkbox = world.rng.random_bool(0.3);
    let survey = &world.retently.outbox[survey_index];
    let customer = world.retently.customers.get(&survey.customer_id);
    let feedback = Feedback {
        id: feedback_id.clone(),
        survey_id: survey.survey_id.clone(),
        customer_id: survey.customer_id.clone(),
        email: survey.email.clone(),
        first_name: survey.first_name.clone(),
        last_name: survey.last_name.clone(),
        company_name: survey.company_name.clone(),
        company_id: survey.company_id.clone(),
        job_title: customer.and_then(|c| c.job_title.clone()),
        country: customer.and_then(|c| c.country.clone()),
        state: customer.and_then(|c| c.state.clone()),
        city: customer.and_then(|c| c.city.clone()),
        tags: survey.tags.clone(),
        custom_props: survey.custom_props.clone(),
        campaign_id: campaign.id.clone(),
        campaign_name: campaign.name.clone(),
        metric,
        created: at,
        score,
        comment,
        checkbox,
        feedback_tags,
        topics,
        status: if resolved { "closed" } else { "open" }.to_owned(),
        assigned,
        resolved,
        channel: survey.channel.clone(),
    };
    let survey = &mut world.retently.outbox[survey_index];
    survey.response_id = Some(feedback_id);
    survey.opened.get_or_insert(at);
    survey.responded = Some(at);
    world.retently.push_feedback(feedback);
    Some(world.retently.feedback.len() - 1)
}

/// New responses arriving now: half of them answer a survey that was sent and is still
/// unanswered (when a few random probes find one), the others a fresh survey of an active campaign
/// to a random customer. Returns the indexes of the new feedback; fewer than `count` only when there is no
/// campaign or no customer to answer.
pub(crate) fn simulate(world: &mut World, count: usize, now: DateTime<Utc>) -> Vec<usize> {
    let mut created = Vec::with_capacity(count);
    for _ in 0..count {
        if world.retently.campaigns.is_empty() || world.retently.customers.is_empty() {
            break;
        }
        // Half of the time, answer a survey that is out and unanswered: a few random probes of
        // the outbox rather than a scan, so simulation stays cheap however large it grows.
        let answer_pending = world.rng.random_bool(0.5);
        let mut survey_index = None;
        if answer_pending && !world.retently.outbox.is_empty() {
            for _ in 0..8 {
                let index = world.rng.random_range(0..world.retently.outbox.len());
                let survey = &world.retently.outbox[index];
                if survey.response_id.is_none()
                    && !survey.bounced
                    && !survey.opted_out
                    && survey.sent <= now
                    && world.retently.customers.contains_key(&survey.customer_id)
                {
                    survey_index = Some(index);
                    break;
                }
            }
        }
        let survey_index = match survey_index {
            Some(index) => index,
            None => {
                let campaign_index = pick_campaign(world);
                let nth = world.rng.random_range(0..world.retently.customers.len());
                let Some(customer_id) = world.retently.customers.keys().nth(nth).cloned() else {
                    break;
                };
                let sent = now - minutes(world, 1, 120);
                new_survey(world, campaign_index, &customer_id, sent, "campaign")
            }
        };
        created.extend(respond(world, survey_index, now));
    }
    created
}

/// A believable answer: most customers are happy, a long tail is not.
fn draw_score(world: &mut World, metric: Metric) -> i64 {
    let weights: &[u32] = match metric {
        Metric::Nps => &[2, 1, 1, 2, 2, 3, 4, 8, 12, 25, 40],
        Metric::Csat => &[5, 8, 12, 35, 40],
        Metric::Ces => &[3, 4, 6, 10, 20, 30, 27],
        Metric::Star => &[4, 6, 12, 33, 45],
    };
    let total: u32 = weights.iter().sum();
    let mut roll = world.rng.random_range(0..total);
    let (low, _) = metric.scale();
    for (offset, weight) in weights.iter().enumerate() {
        if roll < *weight {
            return low + offset as i64;
        }
        roll -= weight;
    }
    metric.scale().1
}

fn pick_some(world: &mut World, pool: &[&str], max: usize) -> Vec<String> {
    let count = world.rng.random_range(0..=max);
    let mut picked: Vec<String> = pool
        .choose_multiple(&mut world.rng, count)
        .map(|tag| (*tag).to_owned())
        .collect();
    picked.sort();
    picked
}

fn days(world: &mut World, from: i64, to: i64) -> Duration {
    Duration::seconds(world.rng.random_range(from * 86_400..to * 86_400))
}

fn minutes(world: &mut World, from: i64, to: i64) -> Duration {
    Duration::seconds(world.rng.random_range(from * 60..to * 60))
}
