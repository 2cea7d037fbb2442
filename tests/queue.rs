//! The queue on Redis Streams (`SUBTOCALL_QUEUE=redis`): several instances
//! share the work and an accepted event outlives the instance that accepted
//! it. Proven by breaking things on purpose: an instance SIGKILLed and
//! another upgraded under load, a crash with hundreds of events waiting,
//! Redis restarted mid-stream, a backend rejecting events until they are
//! re-driven from the dead-letter stream, a three-master Redis Cluster,
//! two instances pushing to Redis lists, and calls far longer than the claim
//! idle time that must not be taken over from a live instance. Real Crossbar, real redis-server
//! (private, on free ports), autobahn peers.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use support::redis::RedisCluster;
use support::resp::Reply;
use support::sidecar::{Sidecar, stop_summary};
use support::*;

use support::queue::*;

const WAIT: Duration = Duration::from_secs(30);
/// `SUBTOCALL_MAX_IN_FLIGHT` where a test bounds duplicates by it.
const IN_FLIGHT: usize = 8;

/// Where the queue lives: one redis-server, or a Redis Cluster.
#[derive(Clone, Copy)]
enum Store<'a> {
    Single(&'a Redis),
    Cluster(&'a RedisCluster),
}

impl<'a> Store<'a> {
    /// The instances' environment for this store (see [`queue_env`]).
    fn env(self, crossbar: &Crossbar, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        match self {
            Store::Single(redis) => queue_env(crossbar, &redis.url(), extra),
            Store::Cluster(cluster) => {
                let mut env = queue_env(crossbar, &cluster.url(), extra);
                env.insert("SUBTOCALL_REDIS_CLUSTER".into(), "1".into());
                env
            }
        }
    }

    /// The server that holds `key`.
    async fn node_for(self, key: &str) -> &'a Redis {
        match self {
            Store::Single(redis) => redis,
            Store::Cluster(cluster) => cluster.node_for_key(key).await,
        }
    }
}

/// The failover scenario of issue 11: two instances and two backends (20 ms
/// a call); `per_procedure` events published to each of `procedures`' topics,
/// `rate` events a second in all. Once both instances have delivered 15 %
/// without a duplicate, the first is SIGKILLed; the second carries on alone
/// to 30 %; the first is restarted; then the second gets SIGTERM and is
/// restarted (a rolling upgrade), all while the events are published.
/// Asserts that none is lost and duplicates stay below 1 %.
async fn failover_under_load(store: Store<'_>, procedures: &[&str], per_procedure: u64, rate: f64) {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let topics: Vec<String> = procedures.iter().map(|p| topic_of(p)).collect();
    let total = per_procedure as usize * procedures.len();
    // 20 ms per call: a few calls are in flight whenever an instance goes.
    let slow = |name| BackendOptions {
        delay_ms: 20,
        ..backend(&crossbar, name, procedures)
    };
    let mut a = Backend::spawn(slow("A")).await;
    let mut b = Backend::spawn(slow("B")).await;
    let env = store.env(
        &crossbar,
        &[("SUBTOCALL_MAX_IN_FLIGHT", &IN_FLIGHT.to_string())],
    );
    let mut first = Sidecar::start(env.clone());
    let mut second = Sidecar::start(env);
    wait_subscribers_all(&second, &router, &topics, 2).await;

    let started = Instant::now();
    let publishers: Vec<Publisher> = topics
        .iter()
        .map(|topic| {
            Publisher::spawn(PublisherOptions {
                rate: rate / procedures.len() as f64,
                quiet: true,
                ..PublisherOptions::new(&crossbar, topic, per_procedure as u32)
            })
        })
        .collect();

    // Both instances healthy: each event admitted once, delivered once.
    wait_delivered(&[&a, &b], total * 15 / 100).await;
    a.sync().await;
    b.sync().await;
    let healthy = deliveries(&[&a, &b]);
    assert_eq!(
        duplicates(&healthy),
        0,
        "no duplicate while both instances are healthy ({} events delivered so far)",
        healthy.len()
    );

    // A crash: the survivor carries on alone and, after the claim idle
    // time, takes over what the dead one held.
    first.kill().await;
    let killed_at = started.elapsed();
    wait_subscribers_all(&second, &router, &topics, 1).await;
    wait_delivered(&[&a, &b], total * 30 / 100).await;
    first.restart();
    wait_subscribers_all(&first, &router, &topics, 2).await;
    let restarted_at = started.elapsed();

    // A rolling upgrade of the other: SIGTERM, then the new one.
    let taken_over_by_second = second.metric("subtocall_queue_taken_over_total").await;
    let publishing_at_sigterm = !publishers.iter().all(is_done);
    assert_eq!(
        second.terminate(WAIT).await.code(),
        Some(0),
        "SIGTERM exits 0"
    );
    let terminated_at = started.elapsed();
    // Its last line says where what it accepted went (all into Redis: it
    // dead-lettered nothing), not a balance it cannot know alone.
    let stopped = stop_summary(&second.log());
    assert_eq!(
        stopped["admitted"] + stopped["admitted_elsewhere"],
        stopped["accepted"],
        "{stopped:?}"
    );
    assert_eq!(stopped["dead_lettered"], 0, "{stopped:?}");
    wait_subscribers_all(&first, &router, &topics, 1).await;
    second.restart();
    wait_subscribers_all(&second, &router, &topics, 2).await;
    let upgraded_at = started.elapsed();
    for publisher in publishers {
        publisher.finish().await.assert_success();
    }

    let expected = published(procedures, per_procedure);
    all_delivered(&[&a, &b], &expected).await;
    for procedure in procedures {
        let key = stream_key(GROUP, procedure);
        wait_drained(store.node_for(&key).await, &key).await;
    }
    a.sync().await;
    b.sync().await;
    let all = deliveries(&[&a, &b]);
    let duplicates = duplicates(&all);
    println!(
        "failover: {total} events at {rate}/s over {} procedure(s); SIGKILL at {killed_at:?}, \
         restarted by {restarted_at:?}, SIGTERM done at {terminated_at:?} (still publishing: \
         {publishing_at_sigterm}), upgraded by {upgraded_at:?}; {} distinct delivered, \
         {duplicates} duplicate deliveries ({:.2}%); taken over: {} by the survivor, {} by the \
         restarted one",
        procedures.len(),
        all.len(),
        duplicates as f64 * 100.0 / total as f64,
        taken_over_by_second,
        first.metric("subtocall_queue_taken_over_total").await,
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "zero events lost"
    );
    assert!(
        duplicates * 100 < total,
        "duplicates below 1%: {duplicates} of {total}"
    );
}

#[tokio::test]
async fn two_instances_lose_nothing_when_one_is_killed_and_both_are_upgraded_under_load() {
    let redis = Redis::start().await;
    failover_under_load(
        Store::Single(&redis),
        &["com.example.SUB_failover"],
        2000,
        400.0,
    )
    .await;
}

#[tokio::test]
async fn a_killed_instance_restarted_delivers_every_event_it_had_accepted() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_crash";
    let topic = topic_of(procedure);
    // One call at a time, 15 ms each: far slower than the events arrive.
    let mut slow = Backend::spawn(BackendOptions {
        delay_ms: 15,
        concurrency: Some(1),
        ..backend(&crossbar, "slow", &[procedure])
    })
    .await;
    let mut sidecar = Sidecar::start(queue_env(
        &crossbar,
        &redis.url(),
        &[("SUBTOCALL_MAX_IN_FLIGHT", &IN_FLIGHT.to_string())],
    ));
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 400)
    })
    .await
    .assert_success();
    // Accepted means in Redis.
    sidecar
        .wait_metric("subtocall_queue_admitted_total", |n| n == 400.0, WAIT)
        .await;
    let delivered_before = deliveries(&[&slow]).len();
    assert!(
        delivered_before < 400,
        "the crash comes while events wait for the slow backend"
    );

    sidecar.kill().await;
    sidecar.restart();
    let expected = published(&[procedure], 400);
    all_delivered(&[&slow], &expected).await;
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    slow.sync().await;
    let all = deliveries(&[&slow]);
    let duplicates = duplicates(&all);
    let taken_over = sidecar.metric("subtocall_queue_taken_over_total").await;
    println!(
        "crash: 400 accepted, {delivered_before} delivered before SIGKILL, all {} after the \
         restart, {duplicates} duplicates; {taken_over} entries taken over",
        all.len()
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every accepted event delivered"
    );
    // The calls in flight at the crash, and the answered ones whose XACK had
    // not reached Redis, are delivered again.
    assert!(
        duplicates <= 2 * IN_FLIGHT,
        "duplicates at most about the in-flight limit ({IN_FLIGHT}): {duplicates}"
    );
    assert!(
        taken_over > 0.0,
        "the restarted instance took over the entries the killed one held"
    );
}

#[tokio::test]
async fn redis_restart_mid_stream_loses_nothing_and_readiness_follows_redis() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let mut redis = Redis::start_persistent().await;
    let procedure = "com.example.SUB_redisdown";
    let topic = topic_of(procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let sidecar = Sidecar::start(queue_env(&crossbar, &redis.url(), &[]));
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    sidecar
        .wait_for("/readyz to answer 200", WAIT, || sidecar.is_ready())
        .await;
    sidecar
        .wait_metric("subtocall_redis_up", |up| up == 1.0, WAIT)
        .await;

    let publisher = Publisher::spawn(PublisherOptions {
        rate: 200.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 1000)
    });
    wait_delivered(&[&a], 100).await;
    redis.stop().await;
    sidecar
        .wait_for("/readyz to say not ready", WAIT, || async {
            !sidecar.is_ready().await
        })
        .await;
    sidecar
        .wait_metric("subtocall_redis_up", |up| up == 0.0, WAIT)
        .await;
    // Redis stays down while half a second's worth of events (100) arrives,
    // or until the publisher is done if that comes first.
    let received = "subtocall_events_received_total";
    let before = sidecar.metric(received).await;
    sidecar
        .wait_for("100 events received while Redis is down", WAIT, || async {
            let now = sidecar.try_metric(received).await;
            is_done(&publisher) || now.is_some_and(|n| n >= before + 100.0)
        })
        .await;
    assert!(
        !sidecar.is_ready().await,
        "still not ready while Redis is down"
    );

    redis.start_again().await;
    sidecar
        .wait_for("/readyz to answer 200 again", WAIT, || sidecar.is_ready())
        .await;
    sidecar
        .wait_metric("subtocall_redis_up", |up| up == 1.0, WAIT)
        .await;
    publisher.finish().await.assert_success();

    let expected = published(&[procedure], 1000);
    all_delivered(&[&a], &expected).await;
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    a.sync().await;
    let all = deliveries(&[&a]);
    println!(
        "Redis restart: 1000 events, {} distinct delivered, {} duplicates, {} Redis errors",
        all.len(),
        duplicates(&all),
        sidecar.metric("subtocall_redis_errors_total").await
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "nothing lost"
    );
}

#[tokio::test]
async fn events_dead_lettered_while_a_backend_rejects_them_are_delivered_after_redrive() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    // Not the default, so that the CLI is seen to read the variable.
    let namespace = "orders-queue";
    let procedures = ["com.example.SUB_dl_orders", "com.example.SUB_dl_mail"];
    let mut callee = Backend::spawn(backend(&crossbar, "B", &procedures)).await;
    callee.reject_calls(true).await;
    let sidecar = Sidecar::start(queue_env(
        &crossbar,
        &redis.url(),
        &[("SUBTOCALL_QUEUE_NAME", namespace)],
    ));
    for procedure in procedures {
        wait_subscribers(&sidecar, &router, &topic_of(procedure), 1).await;
    }
    let started = SystemTime::now();
    for procedure in procedures {
        Publisher::run(PublisherOptions {
            quiet: true,
            ..PublisherOptions::new(&crossbar, &topic_of(procedure), 10)
        })
        .await
        .assert_success();
    }
    // An application error is final: each event dead-lettered at once.
    sidecar
        .wait_metric(
            r#"subtocall_events_dead_lettered_total{reason="rejected"}"#,
            |n| n == 20.0,
            WAIT,
        )
        .await;
    // The metric counts a dead letter when it is decided; the committer
    // writes it to the dead-letter stream right after.
    for procedure in procedures {
        let key = dead_key(namespace, procedure);
        eventually(WAIT, &format!("10 dead letters in {key}"), || async {
            (redis.command(&["XLEN", &key]).await.integer() == 10).then_some(())
        })
        .await;
    }

    let letters = parse_list(&dead_letters(&redis, namespace, &["list"]).await);
    let mut listed = BTreeSet::new();
    for letter in &letters {
        let procedure = letter["procedure"].as_str().expect("procedure");
        assert!(procedures.contains(&procedure), "{letter}");
        let id = letter["id"].as_str().expect("id");
        assert!(
            id.split_once('-')
                .is_some_and(|(ms, n)| ms.parse::<u64>().is_ok() && n.parse::<u64>().is_ok()),
            "id is a stream entry id: {letter}"
        );
        assert_eq!(letter["reason"], "rejected", "{letter}");
        assert!(
            letter["attempts"].as_u64().is_some_and(|n| n >= 1),
            "{letter}"
        );
        assert!(
            letter["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("com.example.error.rejected")),
            "{letter}"
        );
        let at = letter["dead_lettered_at"]
            .as_str()
            .expect("dead_lettered_at");
        let at = humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{e}: {letter}"));
        assert!(
            at >= started - Duration::from_secs(1) && at <= SystemTime::now(),
            "dead_lettered_at is when it happened: {letter}"
        );
        let event = &letter["event"];
        assert_eq!(event["procedure"], procedure, "{letter}");
        assert_eq!(event["topic"], topic_of(procedure), "{letter}");
        assert!(event["publication"].is_u64(), "{letter}");
        let seq = event["kwargs"]["seq"].as_u64().expect("kwargs.seq");
        listed.insert((procedure.to_owned(), seq));
    }
    let expected = published(&procedures, 10);
    assert_eq!(letters.len(), 20, "one line per dead letter");
    assert_eq!(listed, expected, "every rejected event is listed");
    let orders =
        parse_list(&dead_letters(&redis, namespace, &["list", "--procedure", procedures[0]]).await);
    assert_eq!(orders.len(), 10);
    assert!(orders.iter().all(|l| l["procedure"] == procedures[0]));
    let limited = dead_letters(&redis, namespace, &["list", "--limit", "3"]).await;
    assert_eq!(parse_list(&limited).len(), 3);

    // The backend is fixed: part of one procedure's dead letters first, then the rest.
    callee.reject_calls(false).await;
    let some = ["redrive", "--procedure", procedures[0], "--limit", "4"];
    assert_eq!(
        dead_letters(&redis, namespace, &some).await.trim(),
        "redriven 4"
    );
    wait_delivered(&[&callee], 4).await;
    assert_eq!(
        parse_list(&dead_letters(&redis, namespace, &["list"]).await).len(),
        16,
        "the re-driven ones left the dead-letter streams"
    );
    assert_eq!(
        dead_letters(&redis, namespace, &["redrive"]).await.trim(),
        "redriven 16"
    );

    all_delivered(&[&callee], &expected).await;
    for procedure in procedures {
        wait_drained_in(&redis, &stream_key(namespace, procedure), namespace).await;
        let key = dead_key(namespace, procedure);
        assert_eq!(redis.command(&["XLEN", &key]).await.integer(), 0, "{key}");
    }
    callee.sync().await;
    let all = deliveries(&[&callee]);
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every re-driven event delivered"
    );
    assert_eq!(duplicates(&all), 0, "each delivered once");
    assert_eq!(
        dead_letters(&redis, namespace, &["list"]).await,
        "",
        "no dead letter left"
    );
    assert_eq!(
        sidecar.metric("subtocall_events_forwarded_total").await,
        20.0
    );
}

#[tokio::test]
async fn on_a_redis_cluster_streams_spread_over_the_masters_and_failover_loses_nothing() {
    let cluster = RedisCluster::start().await;
    // Names whose hash tags fall on all three masters of the fixture.
    let procedures = [
        "com.example.SUB_cl0",
        "com.example.SUB_cl1",
        "com.example.SUB_cl2",
    ];
    let mut masters = BTreeSet::new();
    for procedure in procedures {
        let key = stream_key(GROUP, procedure);
        masters.insert(cluster.node_for_key(&key).await.port());
    }
    assert!(
        masters.len() > 1,
        "test precondition: the procedures' slots are on more than one master"
    );

    failover_under_load(Store::Cluster(&cluster), &procedures, 600, 400.0).await;

    let mut holding = BTreeSet::new();
    for procedure in procedures {
        let key = stream_key(GROUP, procedure);
        let node = cluster.node_for_key(&key).await;
        assert_eq!(
            node.command(&["TYPE", &key]).await,
            Reply::Simple("stream".to_owned()),
            "{key} is a stream on the master of its slot (port {})",
            node.port()
        );
        holding.insert(node.port());
    }
    assert!(
        holding.len() > 1,
        "streams on more than one master: {holding:?}"
    );
}

#[tokio::test]
async fn two_instances_in_redis_mode_push_each_event_once() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_mq";
    let topic = topic_of(procedure);
    // Only its registration matters: it makes the instances subscribe.
    let _announce = Backend::spawn(backend(&crossbar, "announce", &[procedure])).await;
    let env = queue_env(&crossbar, &redis.url(), &[("USE_REDIS_MQ", "1")]);
    let first = Sidecar::start(env.clone());
    let second = Sidecar::start(env);
    wait_subscribers(&second, &router, &topic, 2).await;

    Publisher::run(PublisherOptions {
        rate: 250.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 500)
    })
    .await
    .assert_success();
    let list = format!("queue:{procedure}");
    eventually(WAIT, "500 envelopes in the list", || async {
        (redis.llen(&list).await >= 500).then_some(())
    })
    .await;
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;

    let mut seqs: Vec<u64> = redis
        .lrange_json(&list)
        .await
        .iter()
        .map(|envelope| {
            assert_eq!(envelope["procedure"], procedure, "{envelope}");
            assert_eq!(envelope["topic"], topic, "{envelope}");
            envelope["kwargs"]["seq"].as_u64().expect("kwargs.seq")
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..500).collect::<Vec<_>>(), "each event pushed once");

    // Every instance offered every event; one admitted each, and delivery was shared.
    for sidecar in [&first, &second] {
        sidecar
            .wait_for("every event offered", WAIT, || async {
                let value = |name| sidecar.try_metric(name);
                let (Some(received), Some(admitted), Some(elsewhere)) = (
                    value("subtocall_events_received_total").await,
                    value("subtocall_queue_admitted_total").await,
                    value("subtocall_queue_admitted_elsewhere_total").await,
                ) else {
                    return false;
                };
                received == 500.0 && admitted + elsewhere == 500.0
            })
            .await;
    }
    let admitted = "subtocall_queue_admitted_total";
    let forwarded = "subtocall_events_forwarded_total";
    let (admitted_1, admitted_2) = (first.metric(admitted).await, second.metric(admitted).await);
    let (pushed_1, pushed_2) = (
        first.metric(forwarded).await,
        second.metric(forwarded).await,
    );
    println!(
        "Redis mode, two instances: admitted {admitted_1} + {admitted_2}, pushed {pushed_1} + {pushed_2}"
    );
    assert_eq!(admitted_1 + admitted_2, 500.0, "each event admitted once");
    assert_eq!(pushed_1 + pushed_2, 500.0, "each event pushed once");
    assert!(
        pushed_1 > 0.0 && pushed_2 > 0.0,
        "both instances push: {pushed_1} and {pushed_2}"
    );
}

/// A live instance keeps what it holds: calls that take several times
/// `SUBTOCALL_CLAIM_IDLE` are not taken over by the other instance (their
/// idle time is refreshed), so none is made twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_of_a_live_instance_are_not_taken_over() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_long";
    let topic = topic_of(procedure);
    // Each call takes 2.5 s: five claim-idle periods of 500 ms.
    let slow = Backend::spawn(BackendOptions {
        delay_ms: 2_500,
        ..backend(&crossbar, "slow", &[procedure])
    })
    .await;
    let env = queue_env(
        &crossbar,
        &redis.url(),
        &[("SUBTOCALL_CLAIM_IDLE", "500ms")],
    );
    let first = Sidecar::start(env.clone());
    let second = Sidecar::start(env);
    wait_subscribers(&second, &router, &topic, 2).await;

    Publisher::run(PublisherOptions {
        rate: 50.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 10)
    })
    .await
    .assert_success();
    all_delivered(&[&slow], &published(&[procedure], 10)).await;
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;

    let seen = deliveries(&[&slow]);
    assert_eq!(duplicates(&seen), 0, "no call made twice: {seen:?}");
    for sidecar in [&first, &second] {
        assert_eq!(
            sidecar.metric("subtocall_queue_taken_over_total").await,
            0.0,
            "nothing taken over from a live instance"
        );
    }
}

#[tokio::test]
async fn two_groups_on_the_redis_queue_each_get_every_event_once_from_two_instances() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let default_group = "com.example.SUB_grouped";
    let audit = "com.example.SUB_grouped__audit";
    let topic = topic_of(default_group);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[default_group])).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", &[audit])).await;
    let env = queue_env(&crossbar, &redis.url(), &[]);
    let first = Sidecar::start(env.clone());
    let second = Sidecar::start(env);
    for sidecar in [&first, &second] {
        sidecar
            .wait_metric("subtocall_groups", |n| n == 2.0, WAIT)
            .await;
    }
    // One subscription per instance for both groups.
    wait_subscribers(&second, &router, &topic, 2).await;

    Publisher::run(PublisherOptions {
        rate: 400.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 400)
    })
    .await
    .assert_success();
    let expected: BTreeSet<(String, u64)> = published(&[default_group, audit], 400);
    all_delivered(&[&a, &b], &expected).await;
    // Each group is its own stream, drained by both instances.
    for procedure in [default_group, audit] {
        wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    }
    a.sync().await;
    b.sync().await;
    let all = deliveries(&[&a, &b]);
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "both groups get every event"
    );
    assert_eq!(duplicates(&all), 0, "each group gets each event once");
    let admitted = first.metric("subtocall_queue_admitted_total").await
        + second.metric("subtocall_queue_admitted_total").await;
    assert_eq!(admitted, 800.0, "admitted once per group");
}
