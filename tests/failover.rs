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
    instances: [Sidecar; 2],
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
            instances,
            publisher,
        }
    }

    /// After the failover: every event delivered, the stream drained on
    /// `master` (the new one), duplicates below 1 %, nothing dead-lettered.
    /// Prints `what` with how long the delivery of the rest took.
    async fn finish(mut self, master: &Redis, what: &str) {
        let since = Instant::now();
        let before = deliveries(&[&self.a, &self.b]).len();
        eventually(
            Duration::from_secs(10),
            "forwarding again within 10 s of the promotion",
            || async { (deliveries(&[&self.a, &self.b]).len() > before).then_some(()) },
        )
        .await;
        let resumed = since.elapsed();
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
            "{what}; forwarding again {resumed:?} after that, all {TOTAL} delivered \
             {caught_up:?} after it; {duplicates} duplicate deliveries"
        );
        let (mut reoffered, mut unconfirmed) = (0.0, 0.0);
        for instance in &self.instances {
            assert!(!instance.has_exited(), "both instances alive");
            reoffered += instance
                .metric("subtocall_queue_reoffered_events_total")
                .await;
            unconfirmed += instance.metric("subtocall_queue_unconfirmed_events").await;
        }
        println!("copies offered again: {reoffered}; unconfirmed now: {unconfirmed}");
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

/// Sentinel: the master SIGKILLed after the 600th delivery, with
/// `SUBTOCALL_REDIS_WAIT_REPLICAS=wait`. Before, everything after the kill
/// was lost (both instances kept trying the dead address). The promoted
/// master has no replica: with WAIT the queue must keep running.
async fn sentinel_failover(procedure: &'static str, wait: &str) {
    let mut redis = RedisSentinel::start().await;
    let crossbar = Crossbar::start().await;
    // REDIS_URL names no server that exists: the sentinels name the master.
    let env = queue_env(
        &crossbar,
        "redis://127.0.0.1:1",
        &[
            ("SUBTOCALL_REDIS_SENTINELS", &redis.sentinels()),
            ("SUBTOCALL_REDIS_SENTINEL_MASTER", MASTER_NAME),
            ("SUBTOCALL_REDIS_WAIT_REPLICAS", wait),
        ],
    );
    let said = format!("at the master {MASTER_NAME} (named by 3 sentinels) answers PING");
    let (code, report) = check(&env).await;
    assert!(code == Some(0) && report.contains(&said), "{report}");
    let topology = format!("topology: master {MASTER_NAME} (Sentinel) with replicas 127.0.0.1:");
    assert!(report.contains(&topology), "{report}");
    let short = "SUBTOCALL_REDIS_WAIT_REPLICAS=1 but 0 replicas are online";
    assert!(!report.contains(short), "{report}");
    let run = UnderLoad::start(&crossbar, procedure, env.clone()).await;
    let old = redis.master_port().await.expect("a master");
    // /readyz says not ready while no master answers.
    let promoted = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        let mut unready = false;
        while !promoted.load(std::sync::atomic::Ordering::Relaxed) {
            unready |= !run.instances[0].is_ready().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unready
    };
    let kill = async {
        let took = redis.kill_master().await;
        promoted.store(true, std::sync::atomic::Ordering::Relaxed);
        took
    };
    let (promoted_in, unready) = tokio::join!(kill, watch);
    assert!(unready, "not ready while no master answered");
    run.instances[0].wait_ready(Duration::from_secs(15)).await;
    let new = redis.master_port().await.expect("a new master");
    let what = format!(
        "sentinel failover (WAIT_REPLICAS={wait}): master {old} killed after 600 deliveries, \
         {new} promoted {promoted_in:?} later"
    );
    run.finish(redis.server(new), &what).await;
    let (code, report) = check(&env).await;
    assert!(
        code == Some(0) && report.contains(&said),
        "after the failover:\n{report}"
    );
    // The promoted master has no replica yet: said, not failed.
    assert_eq!(report.contains(short), wait == "1", "{report}");
}

#[tokio::test]
async fn with_sentinel_a_master_failover_is_followed_and_nothing_is_lost() {
    sentinel_failover("com.example.SUB_failover", "1").await;
}

/// The same without WAIT: what it loses is the figure in doc/operations.md.
#[tokio::test]
async fn with_sentinel_and_no_wait_a_master_failover_is_followed() {
    sentinel_failover("com.example.SUB_failover0", "0").await;
}

/// Redis Cluster with a replica per master: the master holding the queue's
/// stream SIGKILLed under load. Before, a redirection during the failover
/// was final (539 of 2,000 events dead-lettered `rejected`, `Moved`).
#[tokio::test]
async fn on_a_cluster_with_replicas_a_master_failover_is_followed_and_nothing_is_lost() {
    let mut cluster = RedisCluster::start_with_replicas().await;
    let crossbar = Crossbar::start().await;
    let procedure = "com.example.SUB_clfailover";
    let env = queue_env(
        &crossbar,
        &cluster.url(),
        &[
            ("SUBTOCALL_REDIS_CLUSTER", "1"),
            ("SUBTOCALL_REDIS_WAIT_REPLICAS", "1"),
        ],
    );
    let (code, report) = check(&env).await;
    assert!(
        code == Some(0)
            && report.contains("topology: a cluster of 3 masters")
            && report.matches(" with replicas 127.0.0.1:").count() == 3
            && !report.contains("SUBTOCALL_REDIS_WAIT_REPLICAS=1 but"),
        "{report}"
    );
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

/// A master and its replica (in sync), a Crossbar and a meta session on it.
struct Replicated {
    master: Redis,
    replica: Redis,
    crossbar: Crossbar,
    router: RouterMeta,
}

impl Replicated {
    async fn start() -> Replicated {
        let master = Redis::start().await;
        let replica = Redis::start_replica_of(master.port()).await;
        replica.wait_in_sync(Duration::from_secs(20)).await;
        let crossbar = Crossbar::start().await;
        let router = RouterMeta::join(&crossbar).await;
        Replicated {
            master,
            replica,
            crossbar,
            router,
        }
    }
}

/// `SUBTOCALL_REDIS_WAIT_REPLICAS=1` and the replica frozen (SIGSTOP): the
/// WAITs fall short, delivery goes on, nothing is dead-lettered, and the
/// unconfirmed copies are counted and bounded (`SUBTOCALL_REDIS_WAIT_COPIES`:
/// a backlog behind a slow backend, the oldest let go and counted); the
/// replica goes on (SIGCONT), is counted again and the copies drain to 0.
#[tokio::test]
async fn with_the_replica_gone_delivery_goes_on_and_the_unconfirmed_copies_are_bounded() {
    let Replicated {
        master,
        replica,
        crossbar,
        router,
    } = Replicated::start().await;
    let procedure = "com.example.SUB_replicagone";
    let topic = topic_of(procedure);
    let env = queue_env(
        &crossbar,
        &master.url(),
        &[
            ("SUBTOCALL_REDIS_WAIT_REPLICAS", "1"),
            ("SUBTOCALL_REDIS_WAIT_COPIES", "100"),
        ],
    );
    // 50 calls a second: 300 events at 300/s make a backlog.
    let mut a = Backend::spawn(BackendOptions {
        delay_ms: 20,
        concurrency: Some(1),
        ..backend(&crossbar, "A", &[procedure])
    })
    .await;
    let instance = Sidecar::start(env);
    wait_subscribers(&instance, &router, &topic, 1).await;
    // Two runs of the numbered publisher number their events alike: counted
    // by calls (one instance, nothing taken over: no duplicates).
    let publish = |count: u32, rate: f64| {
        Publisher::spawn(PublisherOptions {
            rate,
            quiet: true,
            ..PublisherOptions::new(&crossbar, &topic, count)
        })
    };
    let calls = |n: usize| {
        let a = &a;
        async move {
            eventually(Duration::from_secs(30), &format!("{n} calls"), || async {
                (a.invocations().len() >= n).then_some(())
            })
            .await;
        }
    };
    publish(50, 50.0).finish().await.assert_success();
    calls(50).await;
    let metric = |name: &'static str| {
        let instance = &instance;
        async move { instance.metric(name).await }
    };
    eventually(Duration::from_secs(10), "the 50 confirmed", || async {
        (metric("subtocall_queue_unconfirmed_events").await == 0.0
            && metric("subtocall_redis_replicas_acknowledging").await == 1.0)
            .then_some(())
    })
    .await;

    replica.signal(libc::SIGSTOP);
    publish(300, 300.0).finish().await.assert_success();
    eventually(Duration::from_secs(10), "all 350 admitted", || async {
        (metric("subtocall_queue_admitted_total").await >= 350.0).then_some(())
    })
    .await;
    let backlog = 350 - a.invocations().len();
    let unconfirmed = metric("subtocall_queue_unconfirmed_events").await;
    let let_go = metric("subtocall_queue_unprotected_events_total").await;
    println!(
        "replica frozen, 300 events admitted, {backlog} not yet delivered: {unconfirmed} \
         unconfirmed copies held, {let_go} let go"
    );
    assert!(
        unconfirmed <= 100.0,
        "bounded by SUBTOCALL_REDIS_WAIT_COPIES: {unconfirmed}"
    );
    assert!(
        backlog <= 100 || let_go > 0.0,
        "past the bound the oldest are let go and counted"
    );
    calls(350).await;
    let acknowledging = metric("subtocall_redis_replicas_acknowledging").await;
    assert_eq!(acknowledging, 0.0, "the WAITs fall short");
    let status = instance.http_get("/status").await.expect("/status").1;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(
        status["queue"]["replicas"]["wanted"], 1,
        "/status shows it: {status}"
    );
    assert_eq!(status["queue"]["replicas"]["acknowledging"], 0);
    assert_eq!(
        status["queue"]["replicas"]["unprotected_total"].as_f64(),
        Some(metric("subtocall_queue_unprotected_events_total").await)
    );

    replica.signal(libc::SIGCONT);
    eventually(Duration::from_secs(15), "the copies confirmed", || async {
        (metric("subtocall_queue_unconfirmed_events").await == 0.0
            && metric("subtocall_redis_replicas_acknowledging").await == 1.0)
            .then_some(())
    })
    .await;
    let dead = dead_key(GROUP, procedure);
    assert_eq!(master.command(&["XLEN", &dead]).await.integer(), 0);
    a.sync().await;
    assert_eq!(
        a.invocations().len(),
        350,
        "every event delivered once, none dead-lettered"
    );
}

/// The lagging-replica scenario: what it lost, duplicate deliveries, and
/// the copies the instances offered again.
struct Lagged {
    lost: usize,
    duplicates: usize,
    offered_again: f64,
}

/// A replica that lags when its master dies: its link held by a proxy
/// (connected, hearing nothing) from before 400 events are published at
/// 400/s to two instances whose slow backends (50 ms a call, one at a
/// time) cannot keep up, then the master SIGKILLed. The
/// sentinels promote a replica that never got those events nor their
/// claims. With `wait` = 1 the instances offer their unconfirmed copies to
/// it; with 0 nothing brings back what was not yet delivered.
async fn lagging_replica_failover(procedure: &'static str, wait: &str) -> Lagged {
    let mut redis = RedisSentinel::start_with_link().await;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let topic = topic_of(procedure);
    let env = queue_env(
        &crossbar,
        "redis://127.0.0.1:1",
        &[
            ("SUBTOCALL_REDIS_SENTINELS", &redis.sentinels()),
            ("SUBTOCALL_REDIS_SENTINEL_MASTER", MASTER_NAME),
            ("SUBTOCALL_REDIS_WAIT_REPLICAS", wait),
            ("SUBTOCALL_MAX_IN_FLIGHT", "4"),
        ],
    );
    // 20 calls a second each: most of the 400 still wait in Redis at the kill.
    let slow = |name: &str| BackendOptions {
        delay_ms: 50,
        concurrency: Some(1),
        ..backend(&crossbar, name, &[procedure])
    };
    let mut a = Backend::spawn(slow("A")).await;
    let mut b = Backend::spawn(slow("B")).await;
    let instances = [Sidecar::start(env.clone()), Sidecar::start(env)];
    for instance in &instances {
        wait_subscribers(instance, &router, &topic, 2).await;
    }
    redis.lag_replica().await;
    let total = 400;
    Publisher::spawn(PublisherOptions {
        rate: 400.0,
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, total)
    })
    .finish()
    .await
    .assert_success();
    eventually(Duration::from_secs(10), "all 400 admitted", || async {
        let mut admitted = 0.0;
        for instance in &instances {
            admitted += instance.metric("subtocall_queue_admitted_total").await;
        }
        (admitted >= f64::from(total)).then_some(())
    })
    .await;
    let delivered_before = deliveries(&[&a, &b]).len();
    let promoted_in = redis.kill_master().await;
    let new = redis.master_port().await.expect("a new master");
    let expected = published(&[procedure], u64::from(total));
    if wait == "0" {
        // Until the new master's stream is drained and the instances idle:
        // what is not delivered then never will be.
        wait_drained(redis.server(new), &stream_key(GROUP, procedure)).await;
        eventually(Duration::from_secs(30), "both instances idle", || async {
            for instance in &instances {
                if instance.metric("subtocall_calls_in_flight").await > 0.0
                    || instance.metric("subtocall_queue_depth").await > 0.0
                {
                    return None;
                }
            }
            Some(())
        })
        .await;
    } else {
        all_delivered(&[&a, &b], &expected).await;
        wait_drained(redis.server(new), &stream_key(GROUP, procedure)).await;
    }
    a.sync().await;
    b.sync().await;
    let all = deliveries(&[&a, &b]);
    let mut offered_again = 0.0;
    for instance in &instances {
        assert!(!instance.has_exited(), "both instances alive");
        offered_again += instance
            .metric("subtocall_queue_reoffered_events_total")
            .await;
    }
    let lagged = Lagged {
        lost: expected.iter().filter(|e| !all.contains_key(*e)).count(),
        duplicates: duplicates(&all),
        offered_again,
    };
    println!(
        "lagging replica (WAIT_REPLICAS={wait}): {delivered_before} of {total} delivered when \
         the master was killed, replica promoted {promoted_in:?} later; lost {}, {} duplicate \
         deliveries, {} copies offered again",
        lagged.lost, lagged.duplicates, lagged.offered_again
    );
    lagged
}

#[tokio::test]
async fn with_wait_what_a_lagging_replica_lacks_is_offered_again_and_nothing_is_lost() {
    let lagged = lagging_replica_failover("com.example.SUB_lagging", "1").await;
    assert_eq!(lagged.lost, 0, "zero events lost");
    assert!(lagged.offered_again > 0.0, "the copies were offered again");
}

/// The same scenario without WAIT loses events: what the test above guards
/// against (and the figure in doc/operations.md).
#[tokio::test]
async fn without_wait_a_lagging_replica_loses_what_was_not_yet_delivered() {
    let lagged = lagging_replica_failover("com.example.SUB_lagging0", "0").await;
    assert!(
        lagged.lost > 0,
        "nothing brought back what the replica lacked"
    );
    assert_eq!(lagged.offered_again, 0.0);
}

/// Redis mode (`USE_REDIS_MQ`) with `SUBTOCALL_REDIS_WAIT_REPLICAS=1`: each
/// push is followed by a WAIT; with the replica in step none is counted
/// unconfirmed, with it frozen every push still lands and is counted.
#[tokio::test]
async fn in_redis_mode_pushes_the_replica_did_not_confirm_are_counted() {
    let Replicated {
        master,
        replica,
        crossbar,
        router,
    } = Replicated::start().await;
    let procedure = "com.example.SUB_pushwait";
    let topic = topic_of(procedure);
    let _announce = Backend::spawn(backend(&crossbar, "A", &[procedure])).await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[
            ("USE_REDIS_MQ", "1"),
            ("REDIS_URL", &master.url()),
            ("SUBTOCALL_REDIS_WAIT_REPLICAS", "1"),
        ],
    );
    sidecar
        .wait_subscribed(&router, &topic, Duration::from_secs(30))
        .await;
    let key = format!("queue:{procedure}");
    let publish_and_wait = |n: i64| {
        let (crossbar, topic, key, master) = (&crossbar, &topic, &key, &master);
        async move {
            Publisher::run(PublisherOptions::new(crossbar, topic, 20))
                .await
                .assert_success();
            eventually(Duration::from_secs(30), "pushed", || async {
                (master.llen(key).await == n).then_some(())
            })
            .await;
        }
    };
    publish_and_wait(20).await;
    let unconfirmed = "subtocall_redis_writes_unconfirmed_total";
    assert_eq!(
        sidecar.metric(unconfirmed).await,
        0.0,
        "the replica keeps up"
    );
    replica.signal(libc::SIGSTOP);
    publish_and_wait(40).await;
    eventually(Duration::from_secs(10), "the 20 counted", || async {
        (sidecar.metric(unconfirmed).await == 20.0).then_some(())
    })
    .await;
    replica.signal(libc::SIGCONT);
}
