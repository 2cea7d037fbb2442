//! Batch calls (`SUBBATCH_` registrations) on the real router: thousands of
//! events reach the backends once each, many to a call, in the order
//! received inside each call, with binary payloads kept binary in both
//! serializers; with ordering keys, a key's next batch waits for its
//! previous one. Real Crossbar, autobahn backends.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use support::peers::{Invoke, Serializer, publisher_blob, wamp_bytes};
use support::sidecar::Sidecar;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// A backend slow enough (about 110 ms a call) that the publisher always
/// outpaces it, however loaded the machine: with 2 batch calls in flight, a
/// publisher taking `t` seconds sees at most about `2 * t / 0.1` calls while
/// it publishes, and the rest comes full. With a backend of 10 ms a call the
/// count of calls measured how fast the publisher ran: 1,000 events took 125
/// calls here, 202 with two busy loops beside them.
fn slow_backend(
    crossbar: &Crossbar,
    name: &str,
    procedure: &str,
    ser: Serializer,
) -> BackendOptions {
    BackendOptions {
        delay_ms: 100,
        jitter_ms: 20,
        ..backend(crossbar, name, procedure, ser)
    }
}

fn backend(crossbar: &Crossbar, name: &str, procedure: &str, ser: Serializer) -> BackendOptions {
    let mut options = BackendOptions {
        name: name.into(),
        invoke: Invoke::RoundRobin,
        delay_ms: 5,
        jitter_ms: 10,
        report_answers: true,
        ..BackendOptions::new(crossbar, &[procedure])
    };
    options.connection.serializer = ser;
    options
}

/// One batch call as a backend saw it: its events' seqs in order, when it
/// started and when it was answered.
#[derive(Debug)]
struct BatchCall {
    events: Vec<Value>,
    start: f64,
    answered: Option<f64>,
}

fn batch_calls(backends: &[&Backend]) -> Vec<BatchCall> {
    let mut all = Vec::new();
    for b in backends {
        let answers = b.answered_at();
        for inv in b.invocations() {
            assert_eq!(
                inv["kwargs"],
                serde_json::json!({}),
                "a batch has no kwargs"
            );
            all.push(BatchCall {
                events: inv["args"].as_array().expect("a list of events").clone(),
                start: inv["at"].as_f64().unwrap(),
                answered: answers.get(&inv["call"].as_u64().unwrap()).copied(),
            });
        }
    }
    all.sort_by(|a, b| a.start.total_cmp(&b.start));
    all
}

fn seq(event: &Value) -> u64 {
    event["kwargs"]["seq"]
        .as_u64()
        .expect("the publisher's seq")
}

/// Publishes `events` events with bytes to a batch procedure served by two
/// backends, all peers speaking `ser`, and checks what the backends got.
async fn batches_in(ser: Serializer, events: u32) {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUBBATCH_batched";
    let a = Backend::spawn(slow_backend(&crossbar, "A", procedure, ser)).await;
    let b = Backend::spawn(slow_backend(&crossbar, "B", procedure, ser)).await;
    let sidecar_ser = match ser {
        Serializer::Json => "json",
        _ => "msgpack",
    };
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_SERIALIZER", sidecar_ser)]);
    sidecar
        .wait_subscribed(&router, "com.example.batched", WAIT)
        .await;
    let mut options = PublisherOptions {
        quiet: true,
        with_bytes: true,
        ..PublisherOptions::new(&crossbar, "com.example.batched", events)
    };
    options.connection.serializer = ser;
    Publisher::run(options).await.assert_success();
    sidecar.wait_idle(u64::from(events), WAIT).await;

    let calls = batch_calls(&[&a, &b]);
    let mut seen = BTreeSet::new();
    let mut largest = 0;
    for call in &calls {
        largest = largest.max(call.events.len());
        let seqs: Vec<u64> = call.events.iter().map(seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a batch holds its events in the order received: {seqs:?}"
        );
        for event in &call.events {
            let i = seq(event);
            assert!(seen.insert(i), "event {i} delivered twice");
            let blob = wamp_bytes(&publisher_blob(i as u32));
            assert_eq!(event["args"][0], i, "args as published");
            assert_eq!(event["args"][3], blob, "binary stays binary in args");
            assert_eq!(event["kwargs"]["blob"], blob, "and in kwargs");
            assert_eq!(event["topic"], "com.example.batched");
            assert!(event["publication"].as_u64().is_some(), "{event}");
        }
    }
    assert_eq!(seen, (0..u64::from(events)).collect(), "every event once");
    assert!(
        largest <= 100,
        "SUBTOCALL_BATCH_MAX_EVENTS holds: {largest}"
    );
    println!(
        "batches ({ser:?}): {events} events in {} calls, largest {largest}",
        calls.len()
    );
    assert!(
        calls.len() * 5 <= events as usize,
        "real batching: {} calls for {events} events",
        calls.len()
    );
    assert_eq!(
        sidecar.metric("subtocall_batch_calls_total").await,
        calls.len() as f64
    );
    assert_eq!(
        sidecar.metric("subtocall_events_forwarded_total").await,
        f64::from(events)
    );
}

#[tokio::test]
async fn thousands_of_events_reach_a_batch_procedure_once_each_in_order_with_msgpack_bytes() {
    batches_in(Serializer::Msgpack, 3000).await;
}

#[tokio::test]
async fn batches_keep_binary_in_json_too() {
    batches_in(Serializer::Json, 1000).await;
}

#[tokio::test]
async fn with_ordering_a_keys_next_batch_waits_for_its_previous_one() {
    const KEYS: u32 = 8;
    const EVENTS: u32 = 2000;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedure = "com.example.SUBBATCH_keyed";
    let a = Backend::spawn(backend(&crossbar, "A", procedure, Serializer::Msgpack)).await;
    let b = Backend::spawn(backend(&crossbar, "B", procedure, Serializer::Msgpack)).await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[
            ("SUBTOCALL_ORDER_BY", "kwarg:k"),
            ("SUBTOCALL_BATCH_IN_FLIGHT", "4"),
            ("SUBTOCALL_BATCH_MAX_EVENTS", "20"),
        ],
    );
    sidecar
        .wait_subscribed(&router, "com.example.keyed", WAIT)
        .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        rate: 2000.0,
        keys: Some(KEYS),
        ..PublisherOptions::new(&crossbar, "com.example.keyed", EVENTS)
    })
    .await
    .assert_success();
    sidecar.wait_idle(u64::from(EVENTS), WAIT).await;

    let calls = batch_calls(&[&a, &b]);
    let key = |e: &Value| e["kwargs"]["k"].as_u64().expect("a key");
    // Per key: its batches, in the order they started.
    let mut by_key: BTreeMap<u64, Vec<(&BatchCall, Vec<u64>)>> = BTreeMap::new();
    for call in &calls {
        let mut seqs_of: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for e in &call.events {
            seqs_of.entry(key(e)).or_default().push(seq(e));
        }
        for (k, seqs) in seqs_of {
            by_key.entry(k).or_default().push((call, seqs));
        }
    }
    assert_eq!(by_key.len(), KEYS as usize);
    let (mut out_of_order, mut overlapping) = (0, 0);
    for batches in by_key.values() {
        let seqs: Vec<u64> = batches.iter().flat_map(|(_, s)| s.clone()).collect();
        out_of_order += seqs.windows(2).filter(|w| w[1] <= w[0]).count();
        for pair in batches.windows(2) {
            let (earlier, later) = (pair[0].0, pair[1].0);
            if earlier.answered.is_some_and(|at| later.start < at) {
                overlapping += 1;
            }
        }
    }
    let mixed = calls
        .iter()
        .filter(|c| c.events.iter().map(key).collect::<BTreeSet<_>>().len() > 1)
        .count();
    println!(
        "ordered batches: {EVENTS} events in {} calls ({mixed} with several keys), \
         {out_of_order} out of order, {overlapping} overlapping within a key",
        calls.len()
    );
    assert_eq!(
        out_of_order, 0,
        "every key's events in order, inside and across batches"
    );
    assert_eq!(
        overlapping, 0,
        "a key's next batch waits for its previous one"
    );
    assert!(mixed > 0, "a batch carries several keys");
    assert!(
        calls.len() < EVENTS as usize / 2,
        "real batching: {} calls",
        calls.len()
    );
}

#[tokio::test]
async fn on_the_redis_queue_batches_are_made_from_what_the_readers_hand_over() {
    const EVENTS: u32 = 1000;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUBBATCH_queued";
    let a = Backend::spawn(slow_backend(&crossbar, "A", procedure, Serializer::Msgpack)).await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("SUBTOCALL_QUEUE", "redis"), ("REDIS_URL", &redis.url())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.queued", WAIT)
        .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        with_bytes: true,
        ..PublisherOptions::new(&crossbar, "com.example.queued", EVENTS)
    })
    .await
    .assert_success();
    eventually(WAIT, "every event at the backend", || async {
        let n: usize = batch_calls(&[&a]).iter().map(|c| c.events.len()).sum();
        (n >= EVENTS as usize).then_some(())
    })
    .await;
    sidecar
        .wait_metric(
            "subtocall_events_forwarded_total",
            |n| n == f64::from(EVENTS),
            WAIT,
        )
        .await;
    let calls = batch_calls(&[&a]);
    let seqs: BTreeSet<u64> = calls
        .iter()
        .flat_map(|c| c.events.iter().map(seq))
        .collect();
    assert_eq!(seqs, (0..u64::from(EVENTS)).collect(), "every event once");
    for e in calls.iter().flat_map(|c| &c.events) {
        assert_eq!(
            e["kwargs"]["blob"],
            wamp_bytes(&publisher_blob(seq(e) as u32))
        );
    }
    println!(
        "batches (Redis queue): {EVENTS} events in {} calls",
        calls.len()
    );
    assert!(
        calls.len() * 5 <= EVENTS as usize,
        "real batching: {} calls for {EVENTS} events",
        calls.len()
    );
}

#[tokio::test]
async fn in_redis_mode_a_batch_procedures_events_are_pushed_one_by_one() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _announce = Backend::spawn(backend(
        &crossbar,
        "A",
        "com.example.SUBBATCH_listed",
        Serializer::Json,
    ))
    .await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("USE_REDIS_MQ", "1"), ("REDIS_URL", &redis.url())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.listed", WAIT)
        .await;
    Publisher::run(PublisherOptions::new(&crossbar, "com.example.listed", 50))
        .await
        .assert_success();
    let key = "queue:com.example.SUBBATCH_listed";
    eventually(WAIT, "50 envelopes in Redis", || async {
        (redis.llen(key).await == 50).then_some(())
    })
    .await;
    for (i, env) in redis.lrange_json(key).await.iter().enumerate() {
        assert_eq!(env["procedure"], "com.example.SUBBATCH_listed");
        assert_eq!(env["kwargs"]["seq"], i, "one envelope per event, in order");
    }
    assert_eq!(sidecar.metric("subtocall_batch_calls_total").await, 0.0);
}

/// The events' seqs of each call a backend got, in call order, with
/// whether the backend rejected the call.
fn seqs_of_calls(backend: &Backend) -> Vec<(Vec<u64>, bool)> {
    backend
        .invocations()
        .iter()
        .map(|inv| {
            let seqs = inv["args"].as_array().unwrap().iter().map(seq).collect();
            (seqs, inv["errored"].as_bool() == Some(true))
        })
        .collect()
}

#[tokio::test]
async fn a_batch_is_retried_whole_and_dead_lettered_whole() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    // One backend dies holding its second call (the router cancels it: a
    // retryable failure), the other rejects its second call (an application
    // error: final).
    let procedure = "com.example.SUBBATCH_whole";
    let mut dies = Backend::spawn(BackendOptions {
        die_on_call: Some(2),
        ..backend(&crossbar, "dies", procedure, Serializer::Msgpack)
    })
    .await;
    let rejects = Backend::spawn(BackendOptions {
        error_on_call: Some(2),
        ..backend(&crossbar, "rejects", procedure, Serializer::Msgpack)
    })
    .await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_BATCH_MAX_EVENTS", "10")]);
    sidecar
        .wait_subscribed(&router, "com.example.whole", WAIT)
        .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.whole", 300)
    })
    .await
    .assert_success();
    assert_eq!(
        dies.wait_exit(WAIT).await.code(),
        Some(3),
        "it died on its second call"
    );
    let idle = sidecar.wait_idle(300, WAIT).await;

    let lost_with_the_dead = seqs_of_calls(&dies).pop().expect("the call it died on").0;
    let calls = seqs_of_calls(&rejects);
    let rejected: Vec<u64> = calls
        .iter()
        .filter(|(_, errored)| *errored)
        .flat_map(|(s, _)| s.clone())
        .collect();
    assert!(!rejected.is_empty(), "the second call was rejected");
    assert!(
        calls.iter().any(|(s, _)| *s == lost_with_the_dead),
        "the batch the dead backend held came again whole: {lost_with_the_dead:?}"
    );
    assert_eq!(
        idle.dead_lettered,
        rejected.len() as f64,
        "the rejected batch is dead-lettered whole, each event counted"
    );
    assert_eq!(
        sidecar
            .metric("subtocall_events_dead_lettered_total{reason=\"rejected\"}")
            .await,
        rejected.len() as f64
    );
    assert_eq!(idle.forwarded, 300.0 - rejected.len() as f64);
    assert!(
        sidecar.metric("subtocall_events_retried_total").await >= lost_with_the_dead.len() as f64,
        "every event of the retried batch counts as retried"
    );
}
