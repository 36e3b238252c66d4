//! Survey sends batched across replicas by one sender (see `upstream::retently::spool`), and
//! what its death does: three gateway processes on one PostgreSQL database and one emulator
//! (harness: `replicas.rs`). The crowd's batching is in `scaleout_budget.rs`.
//!
//! The kill falls mid-call by construction: the emulator holds every `/survey` call, and the
//! sender is killed once its call for the send is held there.
//!
//! Needs the test cluster of `scripts/postgres.sh`; skipped without it unless
//! `CXGW_TEST_REQUIRE_POSTGRES=1`.

use std::time::Duration;

use cx_gateway::pb;
use cx_gateway::pb::survey_service_client::SurveyServiceClient;
use cx_gateway::sandbox_mode::EmbeddedSandbox;
use cx_sandbox::{Api, HoldSpec, Sandbox, SandboxConfig};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::child::ChildGateway;
use crate::replicas::SharedDatabase;
use crate::support::eventually;

const SURVEY_ROUTE: &str = "/api/v2/survey";
const LEADS: &str = "survey sender leads";

fn leads(replica: &ChildGateway) -> bool {
    replica
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains(LEADS))
}

async fn send(channel: Channel, campaign: String, email: &str) -> pb::RecipientResult {
    let mut request = tonic::Request::new(pb::SendSurveyRequest {
        campaign_id: campaign,
        recipients: vec![pb::Recipient {
            email: email.to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(60));
    let mut response = SurveyServiceClient::new(channel)
        .send_survey(request)
        .await
        .expect("the call is answered")
        .into_inner();
    response.results.remove(0)
}

/// The recipients of every `/survey` call the emulator handled.
fn surveyed(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .handle()
        .survey_sends()
        .into_iter()
        .flat_map(|send| send.recipients)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_surveys_a_killed_sender_leaves_its_call_in_doubt_and_another_sends_the_rest() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let handle = sandbox.handle().clone();
    let campaign = handle
        .transactional_campaign("NPS")
        .expect("the default seed has a transactional NPS campaign");
    let settings = [
        ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
        ("CXGW_POSTGRES_POLLER_LEASE", "1s".to_owned()),
    ];
    let mut replicas = database.start_replicas(3, &emulator, &settings).await;
    eventually(
        "a replica leads the survey sender",
        Duration::from_secs(30),
        || replicas.iter().filter(|replica| leads(replica)).count() == 1,
    )
    .await;
    let sender = replicas.iter().position(leads).unwrap();
    let dead = replicas.remove(sender);

    // A send made through another replica reaches the wire through the sender, where it is held.
    handle.hold(
        Api::Retently,
        HoldSpec {
            route: Some(SURVEY_ROUTE.to_owned()),
            ..HoldSpec::default()
        },
    );
    let in_doubt = tokio::spawn(send(
        replicas[0].channel.clone(),
        campaign.clone(),
        "held@example.com",
    ));
    eventually("the send on the wire", Duration::from_secs(30), || {
        handle.held(Api::Retently) == 1
    })
    .await;
    dead.kill();

    // Another replica takes the sender over; the caller learns that its send may have gone out.
    let in_doubt = in_doubt.await.unwrap();
    assert_eq!(in_doubt.outcome, pb::RecipientOutcome::Unknown as i32);
    let error = in_doubt.error.expect("the send failed");
    assert_eq!(error.code, tonic::Code::Unavailable as i32);
    assert_eq!(error.reason, "SURVEY_SENDER_LOST");
    assert!(
        replicas.iter().any(leads),
        "a surviving replica leads the survey sender"
    );

    // The new sender sends what comes next, and never sends the one in doubt again (the dead
    // sender's held call went with its connection, or was handled once if the emulator let it
    // in before it saw the connection close).
    handle.release(Api::Retently);
    let after = send(replicas[1].channel.clone(), campaign, "after@example.com").await;
    assert_eq!(
        after.outcome,
        pb::RecipientOutcome::Scheduled as i32,
        "{after:?}"
    );
    let surveyed = surveyed(&sandbox);
    let count = |email: &str| surveyed.iter().filter(|to| to.as_str() == email).count();
    assert_eq!(count("after@example.com"), 1, "{surveyed:?}");
    assert!(count("held@example.com") <= 1, "{surveyed:?}");

    for replica in replicas {
        assert_eq!(replica.terminate().code(), Some(0));
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaleout_surveys_a_draining_sender_answers_what_it_took_before_handing_over() {
    let Some(mut database) = SharedDatabase::create().await else {
        return;
    };
    let sandbox = Sandbox::new(SandboxConfig::default());
    let emulator = EmbeddedSandbox::spawn(
        sandbox.clone(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let handle = sandbox.handle().clone();
    let campaign = handle
        .transactional_campaign("NPS")
        .expect("the default seed has a transactional NPS campaign");
    let settings = [
        ("CXGW_FEEDBACK_SYNC", "false".to_owned()),
        ("CXGW_POSTGRES_POLLER_LEASE", "1s".to_owned()),
    ];
    let mut replicas = database.start_replicas(2, &emulator, &settings).await;
    eventually(
        "a replica leads the survey sender",
        Duration::from_secs(30),
        || replicas.iter().filter(|replica| leads(replica)).count() == 1,
    )
    .await;
    let sender = replicas.remove(replicas.iter().position(leads).unwrap());
    let other = replicas.remove(0);

    handle.hold(
        Api::Retently,
        HoldSpec {
            route: Some(SURVEY_ROUTE.to_owned()),
            ..HoldSpec::default()
        },
    );
    let on_the_wire = tokio::spawn(send(
        other.channel.clone(),
        campaign.clone(),
        "rolled@example.com",
    ));
    eventually("the send on the wire", Duration::from_secs(30), || {
        handle.held(Api::Retently) == 1
    })
    .await;
    // The sender drains (a rolling upgrade) while its call is held; the call is let through
    // only once the drain has begun.
    sender.send_sigterm();
    eventually("the sender draining", Duration::from_secs(30), || {
        sender
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("\"draining\""))
    })
    .await;
    // While its call is out, the draining sender keeps renewing its lease (the holder stays,
    // the expiry moves on), so no successor settles the send as lost.
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lease = || async {
        let row = client
            .query_one(
                "SELECT holder, expires_at FROM leases WHERE name LIKE 'survey-sender:%'",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, std::time::SystemTime>(1),
        )
    };
    let (holder, draining_expiry) = lease().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (now_holder, expiry) = lease().await;
        assert_eq!(now_holder, holder, "the draining sender keeps its lease");
        if expiry > draining_expiry {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the draining sender renews its lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!leads(&other));
    handle.release(Api::Retently);
    let rolled = on_the_wire.await.unwrap();
    assert_eq!(
        rolled.outcome,
        pb::RecipientOutcome::Scheduled as i32,
        "the drained sender answered its send: {rolled:?}"
    );
    let (status, _) = sender.wait_with_log();
    assert_eq!(status.code(), Some(0));

    // The other replica took the sender over and sends on.
    let next = send(other.channel.clone(), campaign, "next@example.com").await;
    assert_eq!(
        next.outcome,
        pb::RecipientOutcome::Scheduled as i32,
        "{next:?}"
    );
    assert!(
        leads(&other),
        "the remaining replica leads the survey sender"
    );
    assert_eq!(
        surveyed(&sandbox),
        vec![
            "rolled@example.com".to_owned(),
            "next@example.com".to_owned()
        ]
    );
    assert_eq!(other.terminate().code(), Some(0));
    emulator.stop().await;
}
