//! Per-key ordering (`SUBTOCALL_ORDER_BY`) on the real router: events of one
//! key reach the backends one at a time and in the order published, while
//! different keys run in parallel; a backend leaving mid-stream changes
//! neither. Real Crossbar, autobahn backends with random latencies.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use subtocall::streams::carrier::holder_consumer;
use support::ordered::{Verdict, assert_in_order, calls, verdict};
use support::peers::Invoke;
use support::sidecar::Sidecar;
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const KEYS: u32 = 20;
const EVENTS: u32 = 2000;

fn backend(crossbar: &Crossbar, name: &str, procedure: &str) -> BackendOptions {
    BackendOptions {
        name: name.into(),
        invoke: Invoke::RoundRobin,
        delay_ms: 2,
        jitter_ms: 8,
        report_answers: true,
        ..BackendOptions::new(crossbar, &[procedure])
    }
}

#[tokio::test]
async fn events_of_one_key_arrive_one_at_a_time_in_order_while_keys_run_in_parallel() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_ordered";
    let mut a = Backend::spawn(backend(&crossbar, "A", procedure)).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", procedure)).await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_ORDER_BY", "kwarg:k")]);
    sidecar
        .wait_subscribed(&router, "com.example.ordered", WAIT)
        .await;

    let publisher = Publisher::spawn(PublisherOptions {
        quiet: true,
        rate: 1000.0,
        keys: Some(KEYS),
        ..PublisherOptions::new(&crossbar, "com.example.ordered", EVENTS)
    });
    // B leaves mid-stream, with calls in flight: the router cancels them and
    // subtocall retries each on A, its key waiting meanwhile.
    b.wait_for_invocations(EVENTS as usize / 3, WAIT).await;
    let quit_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    b.quit().await;
    publisher.finish().await.assert_success();

    let every: BTreeSet<u64> = (0..u64::from(EVENTS)).collect();
    eventually(WAIT, "every event at a backend", || async {
        let seen: BTreeSet<u64> = calls(&[&a, &b]).iter().map(|c| c.seq).collect();
        (seen == every).then_some(())
    })
    .await;
    sidecar.wait_idle(u64::from(EVENTS), WAIT).await;
    a.sync().await;
    // An answer B gave once it was leaving may never have reached the
    // router (its session was closing): subtocall saw that call fail and
    // rightly called A, possibly before B's answer. Such a call counts as
    // unanswered, like one the router cancelled.
    let mut all = calls(&[&a]);
    all.extend(calls(&[&b]).into_iter().map(|mut c| {
        if c.answered.is_some_and(|at| at >= quit_at) {
            c.answered = None;
        }
        c
    }));
    all.sort_by(|x, y| x.start.total_cmp(&y.start));

    let Verdict {
        keys,
        out_of_order,
        overlapping,
        most,
    } = verdict(&all);
    assert_eq!(keys, KEYS as usize);
    let retried = all.len() - every.len();
    println!(
        "ordering: {} calls for {EVENTS} events ({retried} retried after B left), \
         {out_of_order} out of order, {overlapping} overlapping within a key, \
         up to {most} keys in flight at once",
        all.len()
    );
    assert_in_order(out_of_order, overlapping, most);
    assert_eq!(
        sidecar.metric("subtocall_events_unordered_total").await,
        0.0
    );
}

#[tokio::test]
async fn an_event_without_its_key_is_delivered_unordered_and_counted() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_keyless";
    let a = Backend::spawn(backend(&crossbar, "A", procedure)).await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_ORDER_BY", "kwarg:k")]);
    sidecar
        .wait_subscribed(&router, "com.example.keyless", WAIT)
        .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.keyless", 10)
    })
    .await
    .assert_success();
    a.wait_for_invocations(10, WAIT).await;
    sidecar
        .wait_metric("subtocall_events_unordered_total", |n| n == 10.0, WAIT)
        .await;
    let seqs: BTreeSet<u64> = a
        .invocations()
        .iter()
        .map(|i: &Value| i["kwargs"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..10).collect());
}

#[tokio::test]
async fn a_dead_lettered_head_releases_its_key_and_each_release_is_counted_once() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUB_released";
    // Every call outlasts its timeout and is not retried: each head of the
    // one key is dead-lettered while the later events wait behind it (all
    // five arrive within milliseconds; a head waits 500 ms), so each but the
    // last lets the next go ahead.
    let _a = Backend::spawn(BackendOptions {
        delay_ms: 2_000,
        jitter_ms: 0,
        ..backend(&crossbar, "A", procedure)
    })
    .await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[
            ("SUBTOCALL_ORDER_BY", "kwarg:k"),
            ("SUBTOCALL_CALL_TIMEOUT", "500ms"),
            ("SUBTOCALL_RETRY_MAX_ATTEMPTS", "1"),
        ],
    );
    sidecar
        .wait_subscribed(&router, "com.example.released", WAIT)
        .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        keys: Some(1),
        ..PublisherOptions::new(&crossbar, "com.example.released", 5)
    })
    .await
    .assert_success();
    let idle = sidecar.wait_idle(5, WAIT).await;
    assert_eq!((idle.forwarded, idle.dead_lettered), (0.0, 5.0));
    assert_eq!(sidecar.metric("subtocall_order_released_total").await, 4.0);
}

/// The lease holders of `procedure`'s partitions on the Redis queue: the
/// consumer names (host-pid-random) holding them (the holders' names
/// without their incarnation's part).
async fn lease_holders(redis: &Redis, procedure: &str, partitions: u16) -> Vec<String> {
    let mut holders = Vec::new();
    for k in 0..partitions {
        let key = format!("{{subtocall:{procedure}}}:lease:{k}");
        if let support::resp::Reply::Bulk(Some(v)) = redis.command(&["GET", &key]).await {
            let holder = String::from_utf8_lossy(&v);
            holders.push(holder_consumer(&holder).to_owned());
        }
    }
    holders
}

#[tokio::test]
async fn on_the_redis_queue_keys_stay_in_order_across_two_instances_while_one_is_killed() {
    const PARTITIONS: u16 = 8;
    const EVENTS: u32 = 5000;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_ordered_q";
    let a = Backend::spawn(backend(&crossbar, "A", procedure)).await;
    let b = Backend::spawn(backend(&crossbar, "B", procedure)).await;
    let partitions = PARTITIONS.to_string();
    let env = [
        ("SUBTOCALL_ORDER_BY", "kwarg:k"),
        ("SUBTOCALL_QUEUE", "redis"),
        ("REDIS_URL", &redis.url()),
        ("SUBTOCALL_CLAIM_IDLE", "2s"),
        ("SUBTOCALL_ORDER_PARTITIONS", &partitions),
    ];
    let mut one = Sidecar::start_for(&crossbar, &env);
    one.wait_subscribed(&router, "com.example.ordered_q", WAIT)
        .await;
    let publisher = Publisher::spawn(PublisherOptions {
        quiet: true,
        rate: 1000.0,
        keys: Some(KEYS),
        ..PublisherOptions::new(&crossbar, "com.example.ordered_q", EVENTS)
    });
    // The first instance takes every partition; a second one joins
    // mid-stream and gets half of them handed over.
    eventually(WAIT, "the first instance holds every partition", || async {
        let holders = lease_holders(&redis, procedure, PARTITIONS).await;
        (holders.len() == usize::from(PARTITIONS)).then_some(())
    })
    .await;
    let two = Sidecar::start_for(&crossbar, &env);
    let holds = |s: &Sidecar, holders: &[String]| {
        let pid = format!("-{}-", s.pid().expect("running"));
        holders.iter().filter(|h| h.contains(&pid)).count()
    };
    let half = usize::from(PARTITIONS) / 2;
    eventually(
        WAIT,
        "the partitions shared by the two instances",
        || async {
            let holders = lease_holders(&redis, procedure, PARTITIONS).await;
            (holds(&one, &holders) == half && holds(&two, &holders) == half).then_some(())
        },
    )
    .await;
    let handed_over_at = calls(&[&a, &b]).len();
    assert!(
        handed_over_at < EVENTS as usize * 3 / 4,
        "the hand-over came mid-stream ({handed_over_at} delivered)"
    );
    // Kill one of them mid-stream: the other takes its partitions over when
    // their leases lapse.
    eventually(WAIT, "more events delivered", || async {
        (calls(&[&a, &b]).len() >= handed_over_at + 500).then_some(())
    })
    .await;
    let (victim, survivor) = (&mut one, &two);
    victim.kill().await;
    publisher.finish().await.assert_success();

    let every: BTreeSet<u64> = (0..u64::from(EVENTS)).collect();
    eventually(WAIT, "every event at a backend", || async {
        let seen: BTreeSet<u64> = calls(&[&a, &b]).iter().map(|c| c.seq).collect();
        (seen == every).then_some(())
    })
    .await;
    eventually(WAIT, "the survivor holds every partition", || async {
        let pid = format!("-{}-", survivor.pid().expect("running"));
        let holders = lease_holders(&redis, procedure, PARTITIONS).await;
        (holders.len() == usize::from(PARTITIONS) && holders.iter().all(|h| h.contains(&pid)))
            .then_some(())
    })
    .await;
    let all = calls(&[&a, &b]);

    let Verdict {
        keys,
        out_of_order,
        overlapping,
        most,
    } = verdict(&all);
    assert_eq!(keys, KEYS as usize);
    println!(
        "ordering on the Redis queue: {} calls for {EVENTS} events ({} again after the kill; \
         half of {PARTITIONS} partitions handed to the second instance after {handed_over_at} \
         events, the first killed later), {out_of_order} out of order, {overlapping} \
         overlapping within a key, up to {most} keys in flight at once",
        all.len(),
        all.len() - every.len(),
    );
    assert_in_order(out_of_order, overlapping, most);
}
