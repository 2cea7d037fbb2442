//! Redis fails over and subtocall follows, on the Redis queue: Redis
//! Sentinel (a master, a replica, three sentinels) and a Redis Cluster with
//! a replica per master, each master SIGKILLed mid-stream (a master
//! refusing writes for want of replicas is tests/queue_faults.rs's). Real
//! Crossbar, real redis-server and sentinels (private, on free ports),
//! autobahn peers.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::redis::RedisCluster;
use support::sentinel::{MASTER_NAME, RedisSentinel};
use support::sidecar::{Sidecar, run_subtocall};
use support::*;

use support::queue::*;

/// `subtocall check` with `env`: its exit code and report.
async fn check(env: &BTreeMap<String, String>) -> (Option<i32>, String) {
    let output = run_subtocall(&["check"], env, Duration::from_secs(30)).await;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.code(), report)
}

/// Issue 23's scenario under way: two instances with `env`, two backends,
/// 2,000 events published at 400/s, 600 of them delivered.
struct UnderLoad {
    procedure: &'static str,
    a: Backend,
    b: Backend,
    _instances: [Sidecar; 2],
    publisher: Publisher,
}

/// How many events [`UnderLoad`] publishes.
const TOTAL: u32 = 2_000;

impl UnderLoad {
    async fn start(
        crossbar: &Crossbar,
        procedure: &'static str,
        env: BTreeMap<String, String>,
    ) -> UnderLoad {
        let router = RouterMeta::join(crossbar).await;
        let topic = topic_of(procedure);
        let a = Backend::spawn(backend(crossbar, "A", &[procedure])).await;
        let b = Backend::spawn(backend(crossbar, "B", &[procedure])).await;
        let instances = [Sidecar::start(env.clone()), Sidecar::start(env)];
        for instance in &instances {
            wait_subscribers(instance, &router, &topic, 2).await;
        }
        let publisher = Publisher::spawn(PublisherOptions {
            rate: 400.0,
            quiet: true,
            ..PublisherOptions::new(crossbar, &topic, TOTAL)
        });
        wait_delivered(&[&a, &b], 600).await;
        UnderLoad {
            procedure,
            a,
            b,
            _instances: instances,
            publisher,
        }
    }

    /// After the failover: every event delivered, the stream drained on
    /// `master` (the new one), duplicates below 1 %, nothing dead-lettered.
    /// Prints `what` with how long the delivery of the rest took.
    async fn finish(mut self, master: &Redis, what: &str) {
        let since = Instant::now();
        self.publisher.finish().await.assert_success();
        let expected = published(&[self.procedure], u64::from(TOTAL));
        all_delivered(&[&self.a, &self.b], &expected).await;
        let caught_up = since.elapsed();
        wait_drained(master, &stream_key(GROUP, self.procedure)).await;
        self.a.sync().await;
        self.b.sync().await;
        let all = deliveries(&[&self.a, &self.b]);
        let duplicates = duplicates(&all);
        println!(
            "{what}; all {TOTAL} delivered {caught_up:?} after that; {duplicates} duplicate \
             deliveries"
        );
        assert_eq!(
            all.keys().cloned().collect::<BTreeSet<_>>(),
            expected,
            "zero events lost"
        );
        assert!(
            duplicates * 100 < TOTAL as usize,
            "duplicates below 1%: {duplicates} of {TOTAL}"
        );
        let dead = dead_key(GROUP, self.procedure);
        assert_eq!(
            master.command(&["XLEN", &dead]).await.integer(),
            0,
            "nothing dead-lettered"
        );
    }
}

/// Sentinel: the master SIGKILLed after the 600th delivery. Before,
/// everything after the kill was lost (both instances kept trying the dead
/// address).
#[tokio::test]
async fn with_sentinel_a_master_failover_is_followed_and_nothing_is_lost() {
    let mut redis = RedisSentinel::start().await;
    let crossbar = Crossbar::start().await;
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
    let run = UnderLoad::start(&crossbar, "com.example.SUB_failover", env.clone()).await;
    let old = redis.master_port().await.expect("a master");
    let promoted_in = redis.kill_master().await;
    let new = redis.master_port().await.expect("a new master");
    let what = format!(
        "sentinel failover: master {old} killed after 600 deliveries, {new} promoted \
         {promoted_in:?} later"
    );
    run.finish(redis.server(new), &what).await;
    let (code, report) = check(&env).await;
    assert!(
        code == Some(0) && report.contains(&said),
        "after the failover:\n{report}"
    );
}

/// Redis Cluster with a replica per master: the master holding the queue's
/// stream SIGKILLed under load. Before, a redirection during the failover
/// was final (539 of 2,000 events dead-lettered `rejected`, `Moved`).
#[tokio::test]
async fn on_a_cluster_with_replicas_a_master_failover_is_followed_and_nothing_is_lost() {
    let mut cluster = RedisCluster::start_with_replicas().await;
    let crossbar = Crossbar::start().await;
    let procedure = "com.example.SUB_clfailover";
    let mut env = queue_env(&crossbar, &cluster.url(), &[]);
    env.insert("SUBTOCALL_REDIS_CLUSTER".into(), "1".into());
    let run = UnderLoad::start(&crossbar, procedure, env).await;
    let key = stream_key(GROUP, procedure);
    let (old, new, took) = cluster.kill_master_of(&key).await;
    let master = cluster.node_for_key(&key).await;
    assert_eq!(master.port(), new);
    let what = format!(
        "cluster failover: master {old} killed after 600 deliveries, replica {new} took over \
         {took:?} later"
    );
    run.finish(master, &what).await;
}
