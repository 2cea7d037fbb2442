//! Backends away, nothing lost: while a group has no callee (within its
//! grace period) its events wait instead of failing, with the memory queue
//! and with the Redis queue; with the Redis queue the groups are kept in
//! Redis, so instances restarted while the backends are away still read
//! for them. And the backlog bound while a group is away. Real Crossbar,
//! real redis-server, autobahn peers.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::sidecar::Sidecar;
use support::*;

use support::queue::*;

/// The publisher's rate: 300 events in 6 s.
const RATE: f64 = 50.0;
/// How long the backends stay away.
const AWAY: Duration = Duration::from_secs(12);

/// The settings of the scenario: a retry budget far shorter than the
/// absence, a grace period far longer.
const WAITING: [(&str, &str); 3] = [
    ("SUBTOCALL_RETRY_MAX_AGE", "5s"),
    ("SUBTOCALL_GRACE_PERIOD", "10m"),
    ("SUBTOCALL_SHUTDOWN_TIMEOUT", "5s"),
];

/// Waits until `sidecar` sees the group of its one procedure waiting for
/// a callee (or not).
async fn wait_waiting(sidecar: &Sidecar, waiting: bool) {
    let want = if waiting { 1.0 } else { 0.0 };
    sidecar
        .wait_metric("subtocall_groups_waiting_for_callee", |n| n == want, WAIT)
        .await;
}

/// The group's only backend leaves; once `sidecar` sees the group waiting,
/// 80 events are published to `topic`, 30 more than the bound the test set:
/// waits until those 30 are dead-lettered with `reason`.
async fn overflow_while_away(
    backend: &mut Backend,
    sidecar: &Sidecar,
    crossbar: &Crossbar,
    topic: &str,
    reason: &str,
) {
    backend.kill().await;
    wait_waiting(sidecar, true).await;
    Publisher::publish(crossbar, topic, 80).await;
    let sample = format!(r#"subtocall_events_dead_lettered_total{{reason="{reason}"}}"#);
    sidecar.wait_metric(&sample, |n| n == 30.0, WAIT).await;
}

/// Dead letters of every reason, as `sidecar` counts them.
/// 300 events published at [`RATE`] to `topic`; once 100 reached A or B,
/// both are SIGKILLed. The publisher goes on: it is returned, with when the
/// backends left.
async fn publish_and_lose_both(
    crossbar: &Crossbar,
    topic: &str,
    a: &mut Backend,
    b: &mut Backend,
) -> (Publisher, Instant) {
    let publisher = Publisher::spawn(PublisherOptions {
        rate: RATE,
        quiet: true,
        ..PublisherOptions::new(crossbar, topic, 300)
    });
    wait_delivered(&[&*a, &*b], 100).await;
    a.kill().await;
    b.kill().await;
    (publisher, Instant::now())
}

/// A backend C registers `procedure`; the publisher ends and every one of
/// its 300 events reaches `gone` or C. Returns C and those events.
async fn one_comes_back(
    crossbar: &Crossbar,
    procedure: &str,
    publisher: Publisher,
    gone: [&Backend; 2],
) -> (Backend, BTreeSet<(String, u64)>) {
    let c = Backend::spawn(backend(crossbar, "C", &[procedure])).await;
    publisher.finish().await.assert_success();
    let expected = published(&[procedure], 300);
    all_delivered(&[gone[0], gone[1], &c], &expected).await;
    (c, expected)
}

/// Every one of `expected` delivered, at most 1 % of them twice.
fn each_once_at_most_1_percent_twice(backends: &[&Backend], expected: &BTreeSet<(String, u64)>) {
    let all = deliveries(backends);
    assert_eq!(&all.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(
        duplicates(&all) <= 3,
        "at most 1 % twice: {}",
        duplicates(&all)
    );
}

async fn dead_lettered(sidecar: &Sidecar) -> f64 {
    sidecar
        .metric_total("subtocall_events_dead_lettered_total")
        .await
}

/// Memory queue, one instance: 300 events at 50/s; after the 100th both
/// backends leave; 12 s later one comes back. Every event is delivered,
/// none dead-lettered, though the retry budget's age is 5 s.
#[tokio::test]
async fn with_the_memory_queue_events_wait_for_a_backend_that_is_away() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_away";
    let topic = topic_of(procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    let sidecar = Sidecar::start_for(&crossbar, &WAITING);
    sidecar.wait_subscribed(&router, &topic, WAIT).await;

    let (publisher, left) = publish_and_lose_both(&crossbar, &topic, &mut a, &mut b).await;
    wait_waiting(&sidecar, true).await;
    let status = support::sidecar::status(&sidecar).await;
    let mapping = &status["mappings"][0];
    assert_eq!(mapping["waiting_for_callee"], true, "{mapping}");

    tokio::time::sleep_until((left + AWAY).into()).await;
    assert_eq!(
        dead_lettered(&sidecar).await,
        0.0,
        "nothing dead-lettered while away"
    );
    assert!(
        sidecar.metric("subtocall_queue_depth").await > 0.0,
        "the events published meanwhile wait"
    );
    let (c, expected) = one_comes_back(&crossbar, procedure, publisher, [&a, &b]).await;
    wait_waiting(&sidecar, false).await;
    each_once_at_most_1_percent_twice(&[&a, &b, &c], &expected);
    let idle = sidecar.wait_idle(300, WAIT).await;
    assert_eq!((idle.forwarded, idle.dead_lettered), (300.0, 0.0));
}

/// The Redis queue, two instances: as above, and while the backends are
/// away both instances are restarted one after the other (a rolling
/// upgrade of subtocall). The restarted instances know the group from
/// Redis and keep reading for it; every event is delivered once the
/// backend is back, none dead-lettered.
#[tokio::test]
async fn with_the_redis_queue_instances_restarted_while_backends_are_away_lose_nothing() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_kept";
    let topic = topic_of(procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    let env = queue_env(&crossbar, &redis.url(), &WAITING);
    let mut first = Sidecar::start(env.clone());
    let mut second = Sidecar::start(env);
    for sidecar in [&first, &second] {
        sidecar.wait_ready(WAIT).await;
    }
    wait_subscribers(&second, &router, &topic, 2).await;

    let (publisher, left) = publish_and_lose_both(&crossbar, &topic, &mut a, &mut b).await;
    for sidecar in [&first, &second] {
        wait_waiting(sidecar, true).await;
    }
    // The group is kept in Redis, away.
    let kept = redis
        .command(&["HGET", "subtocall:groups", procedure])
        .await;
    let kept: serde_json::Value =
        serde_json::from_str(&kept.text().expect("a kept group")).expect("JSON");
    assert!(kept["away_since_ms"].is_u64(), "{kept}");

    // A rolling upgrade of subtocall while the backends are away: each
    // instance comes back reading for the group before the next goes.
    for sidecar in [&mut first, &mut second] {
        sidecar.terminate(WAIT).await;
        sidecar.restart();
        sidecar.wait_ready(WAIT).await;
        wait_waiting(sidecar, true).await;
        wait_subscribers(sidecar, &router, &topic, 2).await;
    }
    let groups = subtocall_groups(&redis, &["list"]).await;
    assert!(
        groups.contains(procedure) && groups.contains("away"),
        "groups list: {groups}"
    );

    tokio::time::sleep_until((left + AWAY).into()).await;
    for sidecar in [&first, &second] {
        assert_eq!(
            dead_lettered(sidecar).await,
            0.0,
            "nothing dead-lettered while away"
        );
    }
    let (c, expected) = one_comes_back(&crossbar, procedure, publisher, [&a, &b]).await;
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    for sidecar in [&first, &second] {
        wait_waiting(sidecar, false).await;
        assert_eq!(dead_lettered(sidecar).await, 0.0);
    }
    each_once_at_most_1_percent_twice(&[&a, &b, &c], &expected);
    let kept = redis
        .command(&["HGET", "subtocall:groups", procedure])
        .await;
    let kept: serde_json::Value =
        serde_json::from_str(&kept.text().expect("a kept group")).expect("JSON");
    assert!(kept["away_since_ms"].is_null(), "a callee again: {kept}");

    // Forgetting a group asks for confirmation, then drops it.
    let asked = subtocall_groups_output(&redis, &["forget", procedure]).await;
    assert_eq!(asked.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&asked.stdout).contains("--yes"));
    assert_eq!(
        redis
            .command(&["HEXISTS", "subtocall:groups", procedure])
            .await
            .integer(),
        1
    );
    let forgot = subtocall_groups(&redis, &["forget", procedure, "--yes"]).await;
    assert!(forgot.contains("forgot"), "{forgot}");
    assert_eq!(
        redis
            .command(&["HEXISTS", "subtocall:groups", procedure])
            .await
            .integer(),
        0
    );
    let unknown = subtocall_groups_output(&redis, &["forget", procedure]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no group is kept"));
}

/// The backlog bound while a group is away (memory queue): past
/// `SUBTOCALL_QUEUE_CAPACITY` the overflow is dead-lettered with its
/// reason and counted; everything else is delivered when a backend comes.
#[tokio::test]
async fn while_a_group_is_away_its_backlog_is_bounded_and_the_overflow_dead_lettered() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_bounded";
    let topic = topic_of(procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[
            ("SUBTOCALL_GRACE_PERIOD", "10m"),
            ("SUBTOCALL_QUEUE_CAPACITY", "50"),
        ],
    );
    sidecar.wait_subscribed(&router, &topic, WAIT).await;
    overflow_while_away(&mut a, &sidecar, &crossbar, &topic, "overflow").await;
    assert_eq!(sidecar.metric("subtocall_queue_depth").await, 50.0);
    let b = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    wait_delivered(&[&b], 50).await;
    sidecar.wait_idle(80, WAIT).await;
    let all = deliveries(&[&b]);
    // drop-newest: the first 50 waited, the last 30 were refused.
    let expected: BTreeSet<(String, u64)> = (0..50).map(|s| (procedure.to_owned(), s)).collect();
    assert_eq!(all.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(dead_lettered(&sidecar).await, 30.0, "the overflow only");
    assert_eq!(
        sidecar.metric("subtocall_events_forwarded_total").await,
        50.0
    );
}

/// The Redis queue's backlog bound while a group is away
/// (`SUBTOCALL_QUEUE_MAX_BACKLOG`=50, 80 events): with drop-newest the last
/// 30 are refused, with drop-oldest the first 30 are removed; either way
/// they are counted, dead-lettered with reason `backlog` and kept in the
/// dead-letter stream, and the other 50 are delivered when a backend comes.
#[tokio::test]
async fn on_the_redis_queue_a_groups_backlog_is_bounded_with_the_overflow_policy() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    for (policy, kept) in [("drop-newest", 0..50u64), ("drop-oldest", 30..80u64)] {
        let redis = Redis::start().await;
        let procedure = format!("com.example.SUB_bound_{}", policy.replace('-', "_"));
        let topic = topic_of(&procedure);
        let mut a = Backend::spawn(backend(&crossbar, "A", &[&procedure])).await;
        let sidecar = Sidecar::start(queue_env(
            &crossbar,
            &redis.url(),
            &[
                ("SUBTOCALL_GRACE_PERIOD", "10m"),
                ("SUBTOCALL_QUEUE_MAX_BACKLOG", "50"),
                ("SUBTOCALL_OVERFLOW", policy),
            ],
        ));
        sidecar.wait_ready(WAIT).await;
        wait_subscribers(&sidecar, &router, &topic, 1).await;
        overflow_while_away(&mut a, &sidecar, &crossbar, &topic, "backlog").await;
        let dead = dead_key(GROUP, &procedure);
        eventually(WAIT, "30 dead letters stored", || async {
            (redis.command(&["XLEN", &dead]).await.integer() == 30).then_some(())
        })
        .await;
        let stream = stream_key(GROUP, &procedure);
        assert_eq!(
            redis.command(&["XLEN", &stream]).await.integer(),
            50,
            "{policy}"
        );
        let b = Backend::spawn(backend(&crossbar, "B", &[&procedure])).await;
        wait_delivered(&[&b], 50).await;
        wait_drained(&redis, &stream).await;
        let got: BTreeSet<u64> = deliveries(&[&b]).keys().map(|(_, seq)| *seq).collect();
        assert_eq!(got, kept.collect::<BTreeSet<_>>(), "{policy}");
        assert_eq!(
            dead_lettered(&sidecar).await,
            30.0,
            "{policy}: the overflow only"
        );
        assert_eq!(
            sidecar.metric("subtocall_redis_errors_total").await,
            0.0,
            "{policy}: no Redis error; log:\n{}",
            sidecar.log()
        );
    }
}
