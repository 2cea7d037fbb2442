//! Redis fails over and subtocall follows, on the Redis queue: Redis
//! Sentinel (a master, a replica, three sentinels) and a Redis Cluster with
//! a replica per master, each master SIGKILLed mid-stream; and a master
//! refusing writes for want of replicas (`NOREPLICAS`), waited for. Real
//! Crossbar, real redis-server and sentinels (private, on free ports),
//! autobahn peers.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::redis::RedisCluster;
use support::resp::Reply;
use support::sentinel::{MASTER_NAME, RedisSentinel};
use support::sidecar::Sidecar;
use support::*;

use support::queue::*;

/// `subtocall check` with `env`: its exit code and report.
async fn check(env: &BTreeMap<String, String>) -> (Option<i32>, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_subtocall"))
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("subtocall check finishes")
        .expect("subtocall check runs");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), report)
}

/// The scenario of issue 23: two instances, two backends, 2,000 events at
/// 400/s, the master SIGKILLed at the 600th delivered. Before, everything
/// after the kill was lost (both instances kept trying the dead address).
#[tokio::test]
async fn with_sentinel_a_master_failover_is_followed_and_nothing_is_lost() {
    let mut redis = RedisSentinel::start().await;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_failover";
    let topic = topic_of(procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    // REDIS_URL names no server that exists: the sentinels name the master.
    let env = queue_env(
        &crossbar,
        "redis://127.0.0.1:1",
        &[
            ("SUBTOCALL_REDIS_SENTINELS", &redis.sentinels()),
            ("SUBTOCALL_REDIS_SENTINEL_MASTER", MASTER_NAME),
        ],
    );
    let said = format!("at the master {MASTER_NAME} (named by 3 sentinels) answers PING");
    let (code, report) = check(&env).await;
    assert!(code == Some(0) && report.contains(&said), "{report}");
    let first = Sidecar::start(env.clone());
    let second = Sidecar::start(env.clone());
    wait_subscribers(&second, &router, &topic, 2).await;
    wait_subscribers(&first, &router, &topic, 2).await;

    let total = 2_000;
    let publisher = Publisher::spawn(PublisherOptions {
        rate: 400.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, total)
    });
    wait_delivered(&[&a, &b], 600).await;
    let old = redis.master_port().await.expect("a master");
    let promoted_in = redis.kill_master().await;
    let new = redis.master_port().await.expect("a new master");
    let killed_at = Instant::now();
    publisher.finish().await.assert_success();

    let expected = published(&[procedure], u64::from(total));
    all_delivered(&[&a, &b], &expected).await;
    let caught_up = killed_at.elapsed();
    // Everything went through the new master, and it holds nothing more.
    let key = stream_key(GROUP, procedure);
    wait_drained(redis.server(new), &key).await;
    let (code, report) = check(&env).await;
    assert!(
        code == Some(0) && report.contains(&said),
        "after the failover:\n{report}"
    );
    a.sync().await;
    b.sync().await;
    let all = deliveries(&[&a, &b]);
    let duplicates = duplicates(&all);
    println!(
        "sentinel failover: master {old} killed after 600 deliveries, {new} promoted \
         {promoted_in:?} later; all {total} delivered {caught_up:?} after the promotion; \
         {duplicates} duplicate deliveries"
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "zero events lost"
    );
    assert!(
        duplicates * 100 < total as usize,
        "duplicates below 1%: {duplicates} of {total}"
    );
    let dead = dead_key(GROUP, procedure);
    assert_eq!(
        redis.server(new).command(&["XLEN", &dead]).await.integer(),
        0,
        "nothing dead-lettered"
    );
}

/// Redis Cluster with a replica per master: the master holding the queue's
/// stream SIGKILLed under load. Before, a redirection during the failover
/// was final (539 of 2,000 events dead-lettered `rejected`, `Moved`).
#[tokio::test]
async fn on_a_cluster_with_replicas_a_master_failover_is_followed_and_nothing_is_lost() {
    let mut cluster = RedisCluster::start_with_replicas().await;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_clfailover";
    let topic = topic_of(procedure);
    let key = stream_key(GROUP, procedure);
    let dead = dead_key(GROUP, procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    let mut env = queue_env(&crossbar, &cluster.url(), &[]);
    env.insert("SUBTOCALL_REDIS_CLUSTER".into(), "1".into());
    let first = Sidecar::start(env.clone());
    let second = Sidecar::start(env);
    wait_subscribers(&second, &router, &topic, 2).await;
    wait_subscribers(&first, &router, &topic, 2).await;

    let total = 2_000;
    let publisher = Publisher::spawn(PublisherOptions {
        rate: 400.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, total)
    });
    wait_delivered(&[&a, &b], 600).await;
    let (old, new, took) = cluster.kill_master_of(&key).await;
    let promoted = Instant::now();
    publisher.finish().await.assert_success();

    let expected = published(&[procedure], u64::from(total));
    all_delivered(&[&a, &b], &expected).await;
    let caught_up = promoted.elapsed();
    let node = cluster.node_for_key(&key).await;
    assert_eq!(node.port(), new);
    wait_drained(node, &key).await;
    a.sync().await;
    b.sync().await;
    let all = deliveries(&[&a, &b]);
    let duplicates = duplicates(&all);
    println!(
        "cluster failover: master {old} killed after 600 deliveries, replica {new} took over \
         {took:?} later; all {total} delivered {caught_up:?} after that; {duplicates} \
         duplicate deliveries"
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "zero events lost"
    );
    assert!(
        duplicates * 100 < total as usize,
        "duplicates below 1%: {duplicates} of {total}"
    );
    assert_eq!(
        node.command(&["XLEN", &dead]).await.integer(),
        0,
        "nothing dead-lettered"
    );
}

/// A master that refuses writes for want of replicas (`min-replicas-to-write`,
/// answered `NOREPLICAS`) is waited for, not given up on: the events wait
/// and are delivered once it takes writes again.
#[tokio::test]
async fn a_master_without_the_replicas_it_requires_is_waited_for_not_given_up_on() {
    let redis = Redis::start().await;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_noreplicas";
    let topic = topic_of(procedure);
    let mut a = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let sidecar = Sidecar::start(queue_env(&crossbar, &redis.url(), &[]));
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    let refuse = |n: &'static str| {
        let redis = &redis;
        async move {
            let reply = redis
                .command(&["CONFIG", "SET", "min-replicas-to-write", n])
                .await;
            assert_eq!(reply, Reply::Simple("OK".into()));
        }
    };
    refuse("1").await;
    let total = 50;
    Publisher::spawn(PublisherOptions::new(&crossbar, &topic, total))
        .finish()
        .await
        .assert_success();
    // Every event was tried and refused, none given up.
    eventually(WAIT, "the sidecar retrying admissions", || async {
        (sidecar.metric("subtocall_redis_errors_total").await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(deliveries(&[&a]).len(), 0, "nothing admitted while refused");
    refuse("0").await;
    let expected = published(&[procedure], u64::from(total));
    all_delivered(&[&a], &expected).await;
    a.sync().await;
    let dead = dead_key(GROUP, procedure);
    assert_eq!(redis.command(&["XLEN", &dead]).await.integer(), 0);
    assert_eq!(
        sidecar
            .metric(r#"subtocall_events_dead_lettered_total{reason="rejected"}"#)
            .await,
        0.0
    );
}
