//! History on a protocol that has none: with `SUBTOCALL_RETENTION` every
//! admitted event is also kept per topic, `subtocall replay` puts a window
//! of it back into a procedure's queue (marked replayed), and with
//! `SUBTOCALL_NEW_GROUP_START=retained` a new group starts from its
//! topic's past. Real Crossbar, real redis-server, autobahn peers.

mod support;

use std::collections::BTreeMap;

use support::sidecar::Sidecar;
use support::*;

use support::queue::*;

/// The details kwarg the instances add (`SUBTOCALL_DETAILS_KWARG`).
const DETAILS: &str = "_details";

/// Runs `subtocall replay <args>` against `redis` with `env` (the
/// instances' queue settings), returning its exit code, stdout and stderr.
async fn replay(redis: &Redis, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let output = queue_tool(&redis.url(), "replay", args, env).await;
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Each invocation's seq with whether it came marked replayed, in the
/// order the backend got them.
fn calls(backend: &Backend) -> Vec<(u64, bool)> {
    backend
        .invocations()
        .iter()
        .map(|i| {
            let seq = i["kwargs"]["seq"].as_u64().expect("kwargs.seq");
            (seq, i["kwargs"][DETAILS]["replayed"] == true)
        })
        .collect()
}

/// 200 events delivered; `replay --dry-run` changes nothing; `replay
/// --since 5m` delivers each once more, marked replayed. Without
/// retention, or without the Redis queue, replay refuses and says why.
#[tokio::test]
async fn replay_delivers_each_retained_event_once_more_marked_replayed() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_replayed";
    let topic = topic_of(procedure);
    let a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let settings = [("SUBTOCALL_QUEUE", "redis"), ("SUBTOCALL_RETENTION", "1h")];
    let sidecar = Sidecar::start(queue_env(
        &crossbar,
        &redis.url(),
        &[
            ("SUBTOCALL_RETENTION", "1h"),
            ("SUBTOCALL_DETAILS_KWARG", DETAILS),
        ],
    ));
    sidecar.wait_ready(WAIT).await;
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    Publisher::publish(&crossbar, &topic, 200).await;
    wait_delivered(&[&a], 200).await;
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    let retained = format!("{{{GROUP}:topic:{topic}}}:retained");
    assert_eq!(redis.command(&["XLEN", &retained]).await.integer(), 200);
    assert_eq!(
        sidecar.metric("subtocall_queue_retained_total").await,
        200.0
    );

    let (code, out, err) = replay(
        &redis,
        &settings,
        &["--procedure", procedure, "--since", "5m", "--dry-run"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would replay 200 events"), "{out}");
    let stream = stream_key(GROUP, procedure);
    assert_eq!(
        redis.command(&["XLEN", &stream]).await.integer(),
        0,
        "a dry run writes nothing"
    );

    let (code, out, err) = replay(
        &redis,
        &settings,
        &["--procedure", procedure, "--since", "5m"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replayed 200 events"), "{out}");
    eventually(DELIVER, "every event delivered once more", || async {
        (a.invocations().len() >= 400).then_some(())
    })
    .await;
    wait_drained(&redis, &stream).await;
    let mut seen: BTreeMap<u64, Vec<bool>> = BTreeMap::new();
    for (seq, replayed) in calls(&a) {
        seen.entry(seq).or_default().push(replayed);
    }
    assert_eq!(seen.len(), 200);
    for (seq, marks) in &seen {
        assert_eq!(
            marks,
            &[false, true],
            "event {seq}: once live, once replayed"
        );
    }
    assert_eq!(
        sidecar
            .metric_total("subtocall_events_dead_lettered_total")
            .await,
        0.0
    );

    // Refused, clearly: without retention, and without the Redis queue.
    let (code, _, err) = replay(
        &redis,
        &[("SUBTOCALL_QUEUE", "redis")],
        &["--procedure", procedure, "--since", "5m"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("SUBTOCALL_RETENTION is 0"), "{err}");
    let (code, _, err) = replay(&redis, &[], &["--procedure", procedure, "--since", "5m"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("needs the Redis queue"), "{err}");
    let (code, _, err) = replay(&redis, &settings, &["--procedure", procedure]).await;
    assert_eq!(code, 2, "no window");
    assert!(err.contains("--since"), "{err}");
}

/// `SUBTOCALL_NEW_GROUP_START=retained`: 1,000 events, then a backend
/// registers a new group while 100 more are published (200 a second, so
/// that live events arrive while the past is being admitted). The new
/// group gets all 1,100, once each, in order: the retained ones first,
/// then the live ones, none missing between the two.
#[tokio::test]
async fn a_new_group_starts_with_its_topics_retained_events_then_the_live_ones() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let first = "com.example.SUB_history";
    let late = "com.example.SUB_history__late";
    let topic = topic_of(first);
    let a = Backend::spawn(backend(&crossbar, "A", &[first])).await;
    let sidecar = Sidecar::start(queue_env(
        &crossbar,
        &redis.url(),
        &[
            ("SUBTOCALL_RETENTION", "1h"),
            ("SUBTOCALL_NEW_GROUP_START", "retained"),
            // One call at a time: the order of delivery is the stream's.
            ("SUBTOCALL_MAX_IN_FLIGHT", "1"),
        ],
    ));
    sidecar.wait_ready(WAIT).await;
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    Publisher::publish(&crossbar, &topic, 1000).await;
    wait_delivered(&[&a], 1000).await;

    let publisher = Publisher::spawn(PublisherOptions {
        rate: 200.0,
        quiet: true,
        first: 1000,
        ..PublisherOptions::new(&crossbar, &topic, 100)
    });
    // The new group registers while the 100 are published.
    eventually(WAIT, "some of the 100 delivered", || async {
        (a.invocations().len() >= 1010).then_some(())
    })
    .await;
    let b = Backend::spawn(backend(&crossbar, "B", &[late])).await;
    publisher.finish().await.assert_success();
    eventually(DELIVER, "the new group to get 1,100 events", || async {
        (b.invocations().len() >= 1100).then_some(())
    })
    .await;
    wait_drained(&redis, &stream_key(GROUP, late)).await;
    let got: Vec<u64> = calls(&b).into_iter().map(|(seq, _)| seq).collect();
    let expected: Vec<u64> = (0..1100).collect();
    assert_eq!(got, expected, "all 1,100, once each, in order");
    assert!(sidecar.metric("subtocall_queue_backfilled_total").await >= 1000.0);
    // One copy per topic, not per group.
    let retained = format!("{{{GROUP}:topic:{topic}}}:retained");
    assert_eq!(redis.command(&["XLEN", &retained]).await.integer(), 1100);
    assert_eq!(
        sidecar
            .metric_total("subtocall_events_dead_lettered_total")
            .await,
        0.0
    );
    // Kept as started: an instance that starts later does not give it the
    // past again.
    let started = redis
        .command(&["HEXISTS", &format!("{GROUP}:groups:started"), late])
        .await
        .integer();
    assert_eq!(started, 1);
}

/// On a Redis Cluster the topic's retained stream lives in another hash
/// slot than the procedure's streams: it is written by a script of its
/// own after the admission, once per event, and replay reads it there.
#[tokio::test]
async fn on_a_redis_cluster_events_are_retained_and_replayed_too() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let cluster = support::redis::RedisCluster::start().await;
    let procedure = "com.example.SUB_clustered";
    let topic = topic_of(procedure);
    let a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let mut env = queue_env(
        &crossbar,
        &cluster.url(),
        &[
            ("SUBTOCALL_RETENTION", "1h"),
            ("SUBTOCALL_DETAILS_KWARG", DETAILS),
        ],
    );
    env.insert("SUBTOCALL_REDIS_CLUSTER".into(), "1".into());
    let sidecar = Sidecar::start(env);
    sidecar.wait_ready(WAIT).await;
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    Publisher::publish(&crossbar, &topic, 100).await;
    wait_delivered(&[&a], 100).await;
    let retained = format!("{{{GROUP}:topic:{topic}}}:retained");
    let node = cluster.node_for_key(&retained).await;
    eventually(WAIT, "100 events retained", || async {
        (node.command(&["XLEN", &retained]).await.integer() == 100).then_some(())
    })
    .await;
    let args = ["--procedure", procedure, "--since", "5m"];
    let env = [
        ("SUBTOCALL_REDIS_CLUSTER", "1"),
        ("SUBTOCALL_QUEUE", "redis"),
        ("SUBTOCALL_RETENTION", "1h"),
    ];
    let out = queue_tool(&cluster.url(), "replay", &args, &env).await;
    let stdout = succeeded("replay", &args, out);
    assert!(stdout.contains("replayed 100 events"), "{stdout}");
    eventually(DELIVER, "each event delivered once more", || async {
        (a.invocations().len() >= 200).then_some(())
    })
    .await;
    let replayed = calls(&a).iter().filter(|(_, r)| *r).count();
    assert_eq!(replayed, 100);
}
