//! The Redis queue under the faults it exists for, as an operator meets
//! them: an instance frozen (SIGSTOP) while it delivers keyed events with a
//! backlog behind each key; two healthy instances working off a backlog
//! over many procedures (duplicates, connections); a SIGKILL and an
//! immediate restart under a stable instance name; an event that kills
//! whoever delivers it; two redrives at once; a master that refuses writes
//! for lack of replicas; and an idle instance told to stop. Real Crossbar,
//! real redis-server, autobahn peers.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use subtocall::forward::key::OrderKey;
use subtocall::streams::carrier::holder_consumer;
use support::ordered::{Verdict, calls, overlaps, verdict};
use support::queue::*;
use support::resp::Reply;
use support::sidecar::{Sidecar, status};
use support::*;

/// A procedure's partition streams under per-key ordering.
const PARTITIONS: u16 = 16;

/// The partitions of `procedure` whose lease `sidecar` holds now.
async fn held_by(redis: &Redis, procedure: &str, sidecar: &Sidecar) -> BTreeSet<u16> {
    let consumer = consumer_of(sidecar).await;
    let mut held = BTreeSet::new();
    for k in 0..PARTITIONS {
        let key = format!("{{{GROUP}:{procedure}}}:lease:{k}");
        let holder = redis.command(&["GET", &key]).await.text();
        if holder.as_deref().map(holder_consumer) == Some(consumer.as_str()) {
            held.insert(k);
        }
    }
    held
}

/// `sidecar`'s consumer name in the queue's group.
async fn consumer_of(sidecar: &Sidecar) -> String {
    status(sidecar).await["queue"]["consumer"]
        .as_str()
        .expect("a consumer name")
        .to_owned()
}

/// `sidecar`'s router session.
async fn session_of(sidecar: &Sidecar) -> Option<u64> {
    status(sidecar).await["router"]["session"].as_u64()
}

/// Now, as the backends note when a call starts (seconds since the epoch).
fn wall_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The partition of ordering key `k` (an integer kwarg) of `procedure`.
fn partition_of(procedure: &str, k: u64) -> u16 {
    OrderKey::of(procedure, &subtocall::wamp::Value::UInt(k)).partition(PARTITIONS)
}

/// Every stream of `procedure` (its plain one and its partitions) empty,
/// nothing pending.
async fn wait_all_drained(redis: &Redis, procedure: &str) {
    wait_drained(redis, &stream_key(GROUP, procedure)).await;
    for k in 0..PARTITIONS {
        wait_drained(redis, &format!("{}:{k}", stream_key(GROUP, procedure))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_frozen_for_7s_while_it_delivers_never_overlaps_a_key_or_breaks_its_order() {
    const EVENTS: u32 = 2000;
    const KEYS: u32 = 4;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_frozen";
    let topic = topic_of(procedure);
    // 10 ms a call, one call of a key at a time: 100 a second per key, below
    // the 125 published: a backlog builds up behind each key.
    let slow = |name: &str| BackendOptions {
        delay_ms: 10,
        report_answers: true,
        ..backend(&crossbar, name, &[procedure])
    };
    let mut a = Backend::spawn(slow("A")).await;
    let mut b = Backend::spawn(slow("B")).await;
    let env = queue_env(
        &crossbar,
        &redis.url(),
        &[("SUBTOCALL_ORDER_BY", "kwarg:k")],
    );
    let one = Sidecar::start(env.clone());
    let two = Sidecar::start(env);
    wait_subscribers(&two, &router, &topic, 2).await;
    let publisher = Publisher::spawn(PublisherOptions {
        rate: 500.0,
        quiet: true,
        keys: Some(KEYS),
        ..PublisherOptions::new(&crossbar, &topic, EVENTS)
    });
    // The partitions shared (once the first events made the procedure
    // known); the instance frozen holds at least one of the keys.
    eventually(
        WAIT,
        "the partitions shared by the two instances",
        || async {
            let (h1, h2) = (
                held_by(&redis, procedure, &one).await,
                held_by(&redis, procedure, &two).await,
            );
            (h1.len() == 8 && h2.len() == 8).then_some(())
        },
    )
    .await;
    let keys: Vec<u16> = (0..u64::from(KEYS))
        .map(|k| partition_of(procedure, k))
        .collect();
    let held_one = held_by(&redis, procedure, &one).await;
    let (frozen, other) = if keys.iter().any(|p| held_one.contains(p)) {
        (&one, &two)
    } else {
        (&two, &one)
    };
    let frozen_keys = {
        let held = held_by(&redis, procedure, frozen).await;
        keys.iter().filter(|p| held.contains(p)).count()
    };

    eventually(WAIT, "300 events delivered", || async {
        (calls(&[&a, &b]).len() >= 300).then_some(())
    })
    .await;
    // A VM pause, a stalled host: frozen for 7 s, then let go on.
    let pid = frozen.pid().expect("running");
    send_signal(pid, libc::SIGSTOP);
    let frozen_at = Instant::now();
    let stopped_wall = wall_clock();
    let consumer = consumer_of(other).await;
    eventually(
        WAIT,
        "the other instance holding every partition",
        || async {
            let all = held_by(&redis, procedure, other).await.len() == usize::from(PARTITIONS);
            (all && !consumer.is_empty()).then_some(())
        },
    )
    .await;
    let taken_over_after = frozen_at.elapsed();
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(frozen_at.elapsed())).await;
    send_signal(pid, libc::SIGCONT);
    let continued_wall = wall_clock();
    publisher.finish().await.assert_success();

    let every: BTreeSet<u64> = (0..u64::from(EVENTS)).collect();
    eventually(DELIVER, "every event at a backend", || async {
        let seen: BTreeSet<u64> = calls(&[&a, &b]).iter().map(|c| c.seq).collect();
        (seen == every).then_some(())
    })
    .await;
    wait_all_drained(&redis, procedure).await;
    a.sync().await;
    b.sync().await;
    let all = calls(&[&a, &b]);
    let Verdict {
        keys,
        out_of_order,
        overlapping,
        ..
    } = verdict(&all);
    let duplicates = all.len() - every.len();
    let fenced = frozen.metric("subtocall_queue_fenced_total").await;
    println!(
        "frozen instance: {EVENTS} events at 500/s over {KEYS} keys ({frozen_keys} on the frozen \
         instance); frozen for 7 s, its partitions taken over after {taken_over_after:?}; \
         {} calls, {duplicates} duplicates, {out_of_order} out of order, {overlapping} \
         overlapping within a key; {fenced} entries fenced on the frozen instance",
        all.len()
    );
    assert_eq!(keys, KEYS as usize);
    let sessions = (session_of(frozen).await, session_of(other).await);
    assert_eq!(
        overlapping,
        0,
        "never two calls of a key at once (frozen: session {:?}, other: {:?}; \
         SIGSTOP at {stopped_wall:.3}, SIGCONT at {continued_wall:.3}): {:#?}",
        sessions.0,
        sessions.1,
        overlaps(&all)
    );
    assert_eq!(out_of_order, 0, "first deliveries of each key in order");
    assert!(
        duplicates * 100 <= EVENTS as usize,
        "duplicates at most 1%: {duplicates}"
    );
    assert!(!frozen.has_exited(), "the frozen instance lives on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_healthy_instances_work_off_a_backlog_over_30_procedures_without_duplicates_on_few_connections()
 {
    const PROCEDURES: usize = 30;
    const EVENTS: u32 = 1200;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedures: Vec<String> = (0..PROCEDURES)
        .map(|i| format!("com.example.SUB_backlog{i}"))
        .collect();
    let names: Vec<&str> = procedures.iter().map(String::as_str).collect();
    let topics: Vec<String> = procedures.iter().map(|p| topic_of(p)).collect();
    // Two serial backends at 20 ms a call: 100 events a second in all, a
    // 12 s backlog.
    let serial = |name: &str| BackendOptions {
        delay_ms: 20,
        concurrency: Some(1),
        ..backend(&crossbar, name, &names)
    };
    let mut a = Backend::spawn(serial("A")).await;
    let mut b = Backend::spawn(serial("B")).await;
    let env = queue_env(&crossbar, &redis.url(), &[]);
    let one = Sidecar::start(env.clone());
    let two = Sidecar::start(env);
    wait_subscribers_all(&two, &router, &topics, 2).await;

    Publisher::run(PublisherOptions {
        more_topics: topics[1..].to_vec(),
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topics[0], EVENTS)
    })
    .await
    .assert_success();
    let expected: BTreeSet<(String, u64)> = (0..u64::from(EVENTS))
        .map(|i| (procedures[i as usize % PROCEDURES].clone(), i))
        .collect();
    // While the backlog is worked off: how many connections each instance
    // has to Redis.
    let mut most = [0usize; 2];
    // The connections of the sample with the most, for a failure to show.
    let mut worst: [Vec<String>; 2] = Default::default();
    let mut samples = 0;
    eventually(DELIVER, "every event delivered", || {
        samples += 1;
        for (i, s) in [&one, &two].iter().enumerate() {
            let lines = connection_lines(s.pid().expect("running"), redis.port());
            if lines.len() > most[i] {
                most[i] = lines.len();
                worst[i] = lines;
            }
        }
        let done = deliveries(&[&a, &b]).len() >= expected.len();
        async move { done.then_some(()) }
    })
    .await;
    for procedure in &names {
        wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    }
    a.sync().await;
    b.sync().await;
    let all = deliveries(&[&a, &b]);
    let duplicates = duplicates(&all);
    let taken_over = one.metric("subtocall_queue_taken_over_total").await
        + two.metric("subtocall_queue_taken_over_total").await;
    println!(
        "backlog: {EVENTS} events over {PROCEDURES} procedures, two serial backends at 20 ms; \
         {duplicates} duplicates, {taken_over} entries taken over; Redis connections at most \
         {} and {} (sampled {samples} times while busy)",
        most[0], most[1]
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "nothing lost"
    );
    assert!(
        duplicates * 100 <= EVENTS as usize,
        "duplicates at most 1%: {duplicates}"
    );
    assert_eq!(taken_over, 0.0, "nothing taken from a live instance");
    for (i, n) in most.iter().enumerate() {
        assert!(*n >= 1, "instance {i}'s connections were seen");
        let log = [&one, &two][i].log();
        assert!(
            *n <= 5,
            "at most 5 Redis connections per instance: {n} on instance {i}:\n{}\n\
             its warnings and errors:\n{}",
            worst[i].join("\n"),
            log.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test]
async fn with_a_stable_instance_name_a_killed_and_restarted_instance_takes_up_its_entries_at_once()
{
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_stable";
    let topic = topic_of(procedure);
    // One call at a time, 15 ms each: far slower than the events arrive.
    let mut slow = Backend::spawn(BackendOptions {
        delay_ms: 15,
        concurrency: Some(1),
        ..backend(&crossbar, "slow", &[procedure])
    })
    .await;
    // The default claim idle time (30 s): what a restart with a new name
    // would wait for.
    let mut env = queue_env(
        &crossbar,
        &redis.url(),
        &[
            ("SUBTOCALL_INSTANCE_ID", "subtocall-0"),
            ("SUBTOCALL_MAX_IN_FLIGHT", "8"),
        ],
    );
    env.remove("SUBTOCALL_CLAIM_IDLE");
    let mut sidecar = Sidecar::start(env);
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 400)
    })
    .await
    .assert_success();
    sidecar
        .wait_metric("subtocall_queue_admitted_total", |n| n == 400.0, WAIT)
        .await;
    let before = deliveries(&[&slow]).len();
    assert!(before < 400, "the crash comes while events wait");

    sidecar.kill().await;
    let restarted = Instant::now();
    sidecar.restart();
    let expected = published(&[procedure], 400);
    all_delivered(&[&slow], &expected).await;
    let took = restarted.elapsed();
    wait_drained(&redis, &stream_key(GROUP, procedure)).await;
    slow.sync().await;
    let all = deliveries(&[&slow]);
    let duplicates = duplicates(&all);
    println!(
        "stable name: {} events waiting at the SIGKILL, all delivered {took:?} after the \
         restart (the backend takes about {:?} for them), {duplicates} duplicates",
        400 - before,
        Duration::from_millis(15 * (400 - before) as u64)
    );
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "every accepted event delivered"
    );
    assert!(
        took < Duration::from_secs(20),
        "none waited for the claim idle time (30 s): {took:?}"
    );
    assert!(
        duplicates <= 16,
        "duplicates at most about the in-flight limit: {duplicates}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_kills_whoever_delivers_it_is_dead_lettered_after_five_deliveries_and_its_key_goes_on()
 {
    const POISON: u64 = 1000;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_poison";
    let topic = topic_of(procedure);
    // The poison's call never comes back: the test kills the instance that
    // made it, as if delivering it had killed it.
    let mut backend = Backend::spawn(BackendOptions {
        hang_on_kwarg: Some("poison".into()),
        ..backend(&crossbar, "B", &[procedure])
    })
    .await;
    let env = queue_env(
        &crossbar,
        &redis.url(),
        &[
            ("SUBTOCALL_ORDER_BY", "kwarg:k"),
            ("SUBTOCALL_CLAIM_IDLE", "1s"),
        ],
    );
    let mut instances = [Sidecar::start(env.clone()), Sidecar::start(env)];
    wait_subscribers(&instances[1], &router, &topic, 2).await;
    // The poison first, then three events of its key.
    Publisher::run(PublisherOptions {
        quiet: true,
        payload: Some(json!({"args": [], "kwargs": {"seq": POISON, "k": 0, "poison": true}})),
        ..PublisherOptions::new(&crossbar, &topic, 1)
    })
    .await
    .assert_success();
    Publisher::run(PublisherOptions {
        quiet: true,
        keys: Some(1),
        ..PublisherOptions::new(&crossbar, &topic, 3)
    })
    .await
    .assert_success();

    let dead = dead_key(GROUP, procedure);
    let mut killed = BTreeSet::new();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < DELIVER,
            "the poison was not dead-lettered in {DELIVER:?} ({} deliveries)",
            killed.len()
        );
        if redis.command(&["XLEN", &dead]).await.integer() > 0 {
            break;
        }
        // Each delivery of the poison kills the instance that made it; it
        // comes back at once (a supervisor restarting it).
        for inv in backend.invocations() {
            let call = inv["call"].as_u64().expect("call");
            if inv["kwargs"]["poison"] != json!(true) || !killed.insert(call) {
                continue;
            }
            let caller = inv["caller"].as_u64().expect("the caller is disclosed");
            for s in instances.iter_mut() {
                let session = match s.http_get("/status").await {
                    Some((200, body)) => serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["router"]["session"].as_u64()),
                    _ => None,
                };
                if session == Some(caller) {
                    s.kill().await;
                    s.restart();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its key goes on.
    let expected: BTreeSet<(String, u64)> = (0..3).map(|i| (procedure.to_owned(), i)).collect();
    eventually(DELIVER, "the key's later events delivered", || async {
        let delivered: BTreeSet<(String, u64)> = deliveries(&[&backend])
            .into_keys()
            .filter(|(_, s)| *s < 3)
            .collect();
        (delivered == expected).then_some(())
    })
    .await;
    backend.sync().await;
    let poison_calls = backend
        .invocations()
        .iter()
        .filter(|inv| inv["kwargs"]["poison"] == json!(true))
        .count();
    let Reply::Array(Some(letters)) = redis.command(&["XRANGE", &dead, "-", "+"]).await else {
        panic!("XRANGE {dead}")
    };
    let fields: Vec<Vec<String>> = letters
        .iter()
        .map(|l| match l {
            Reply::Array(Some(pair)) => match &pair[1] {
                Reply::Array(Some(f)) => f.iter().map(|v| v.text().unwrap_or_default()).collect(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        })
        .collect();
    println!(
        "poison: delivered {poison_calls} times, each killing its instance; dead letter {fields:?}"
    );
    assert_eq!(poison_calls, 5, "delivered five times, then dead-lettered");
    assert_eq!(fields.len(), 1, "one dead letter");
    let record: BTreeMap<&str, &str> = fields[0]
        .chunks(2)
        .map(|kv| (kv[0].as_str(), kv[1].as_str()))
        .collect();
    assert_eq!(record["reason"], "max_deliveries");
    let event: Value = serde_json::from_str(record["event"]).expect("the event's envelope");
    assert_eq!(event["kwargs"]["seq"], json!(POISON));
}

#[tokio::test]
async fn two_redrives_at_once_move_each_dead_letter_back_once_and_keyed_ones_to_their_partition() {
    const LETTERS: u64 = 200;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_redrive";
    let dead = dead_key(GROUP, procedure);
    for i in 0..LETTERS {
        // Every other event has an ordering key.
        let kwargs = if i % 2 == 0 {
            json!({"seq": i, "k": i % 7})
        } else {
            json!({"seq": i})
        };
        let envelope = json!({
            "procedure": procedure, "topic": topic_of(procedure), "publication": 5000 + i,
            "args": [], "kwargs": kwargs,
        });
        redis
            .command(&[
                "XADD",
                &dead,
                "*",
                "reason",
                "rejected",
                "attempts",
                "1",
                "event",
                &envelope.to_string(),
            ])
            .await;
    }
    redis
        .command(&["SADD", &format!("{GROUP}:procedures"), procedure])
        .await;
    let redrive = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_subtocall"))
            .args(["dead-letters", "redrive"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("REDIS_URL", redis.url())
            .env("SUBTOCALL_ORDER_BY", "kwarg:k")
            .kill_on_drop(true)
            .output()
    };
    let (first, second) = tokio::join!(redrive(), redrive());
    let moved = |out: std::io::Result<std::process::Output>| {
        let out = out.expect("run subtocall dead-letters redrive");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.trim()
            .strip_prefix("redriven ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("unexpected output {text:?}"))
    };
    let (m1, m2) = (moved(first), moved(second));
    println!("two redrives at once moved {m1} and {m2} of {LETTERS} dead letters");
    assert_eq!(m1 + m2, LETTERS, "each letter moved once");
    assert_eq!(redis.command(&["XLEN", &dead]).await.integer(), 0);
    // Where each went: keyed ones to their key's partition, the others to
    // the plain stream.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..LETTERS {
        let stream = if i % 2 == 0 {
            format!(
                "{}:{}",
                stream_key(GROUP, procedure),
                partition_of(procedure, i % 7)
            )
        } else {
            stream_key(GROUP, procedure)
        };
        *expected.entry(stream).or_default() += 1;
    }
    for (stream, n) in &expected {
        assert_eq!(
            redis.command(&["XLEN", stream]).await.integer(),
            *n,
            "{stream}"
        );
    }
}

#[tokio::test]
async fn a_master_refusing_writes_for_lack_of_replicas_delays_events_and_loses_none() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_noreplicas";
    let topic = topic_of(procedure);
    let backend = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    let sidecar = Sidecar::start(queue_env(&crossbar, &redis.url(), &[]));
    wait_subscribers(&sidecar, &router, &topic, 1).await;
    sidecar.wait_ready(WAIT).await;
    // Writes now need a replica there is none of: NOREPLICAS.
    redis
        .command(&["CONFIG", "SET", "min-replicas-to-write", "1"])
        .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, &topic, 50)
    })
    .await
    .assert_success();
    sidecar
        .wait_metric("subtocall_redis_up", |up| up == 0.0, WAIT)
        .await;
    assert!(deliveries(&[&backend]).is_empty(), "nothing admitted");
    redis
        .command(&["CONFIG", "SET", "min-replicas-to-write", "0"])
        .await;
    all_delivered(&[&backend], &published(&[procedure], 50)).await;
    let dead = sidecar
        .metric_total("subtocall_events_dead_lettered_total")
        .await;
    println!("NOREPLICAS: 50 events waited, then all delivered; {dead} dead-lettered");
    assert_eq!(dead, 0.0, "waiting, not failing");
}

#[tokio::test]
async fn an_idle_ordered_instance_stops_within_2s_and_hands_its_partitions_over() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_handover";
    let topic = topic_of(procedure);
    let _backend = Backend::spawn(backend(&crossbar, "B", &[procedure])).await;
    let env = queue_env(
        &crossbar,
        &redis.url(),
        &[
            ("SUBTOCALL_ORDER_BY", "kwarg:k"),
            ("SUBTOCALL_CLAIM_IDLE", "3s"),
        ],
    );
    let mut one = Sidecar::start(env.clone());
    let two = Sidecar::start(env);
    wait_subscribers(&two, &router, &topic, 2).await;
    Publisher::run(PublisherOptions {
        quiet: true,
        keys: Some(8),
        ..PublisherOptions::new(&crossbar, &topic, 40)
    })
    .await
    .assert_success();
    eventually(WAIT, "the partitions shared", || async {
        let (h1, h2) = (
            held_by(&redis, procedure, &one).await,
            held_by(&redis, procedure, &two).await,
        );
        (h1.len() == 8 && h2.len() == 8).then_some(())
    })
    .await;
    wait_all_drained(&redis, procedure).await;

    let asked = Instant::now();
    assert_eq!(one.terminate(WAIT).await.code(), Some(0), "SIGTERM exits 0");
    let took = asked.elapsed();
    eventually(
        WAIT,
        "the other instance holding every partition",
        || async {
            (held_by(&redis, procedure, &two).await.len() == usize::from(PARTITIONS)).then_some(())
        },
    )
    .await;
    let handed = asked.elapsed();
    println!(
        "idle SIGTERM: exited after {took:?}; every partition with the other after {handed:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "exits within 2 s when idle: {took:?}"
    );
    assert!(
        handed < Duration::from_secs(3),
        "its partitions handed over before their leases (3 s) lapse: {handed:?}"
    );
}
