//! Redis mode onto streams (`SUBTOCALL_REDIS_TARGET=stream`), read by the
//! documented consumer (`examples/stream_consumer.py`): a consumer killed
//! holding entries loses none of them, the backlog is bounded without
//! trimming anything unread, and a Redis restart mid-stream loses nothing.
//! Real Crossbar, real redis-server, real consumers.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::peers::{StreamConsumer, StreamConsumerOptions};
use support::resp::Reply;
use support::sidecar::Sidecar;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn stream_env<'a>(redis_url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("USE_REDIS_MQ", "1"),
        ("SUBTOCALL_REDIS_TARGET", "stream"),
        ("REDIS_URL", redis_url),
    ];
    env.extend_from_slice(extra);
    env
}

/// The publisher's seqs each consumer handled, with how often.
fn handled(consumers: &[&StreamConsumer]) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for c in consumers {
        for line in c.handled() {
            let seq = line["kwargs"]["seq"].as_u64().expect("the publisher's seq");
            *seen.entry(seq).or_default() += 1;
        }
    }
    seen
}

async fn xlen(redis: &Redis, key: &str) -> i64 {
    match redis.command(&["XLEN", key]).await {
        Reply::Integer(n) => n,
        other => panic!("XLEN {key}: {other:?}"),
    }
}

async fn announce(crossbar: &Crossbar, procedure: &str) -> Backend {
    // In Redis mode a backend announces interest by registering, as usual.
    Backend::spawn(BackendOptions {
        name: "announce".into(),
        ..BackendOptions::new(crossbar, &[procedure])
    })
    .await
}

#[tokio::test]
async fn a_consumer_killed_holding_entries_loses_none_of_1000_events() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _announce = announce(&crossbar, "com.example.SUB_st").await;
    let sidecar = Sidecar::start_for(&crossbar, &stream_env(&redis.url(), &[]));
    sidecar
        .wait_subscribed(&router, "com.example.st", WAIT)
        .await;
    let stream = "queue:com.example.SUB_st";
    let consumer = |name: &str| StreamConsumerOptions {
        handle_ms: 5,
        ..StreamConsumerOptions::new(&redis.url(), stream, name)
    };
    let mut a = StreamConsumer::spawn(consumer("a")).await;
    let b = StreamConsumer::spawn(consumer("b")).await;
    let publisher = Publisher::spawn(PublisherOptions {
        quiet: true,
        rate: 500.0,
        ..PublisherOptions::new(&crossbar, "com.example.st", 1000)
    });
    eventually(WAIT, "a has handled some", || async {
        (a.handled().len() >= 100).then_some(())
    })
    .await;
    // Killed mid-batch: it holds entries read and not acknowledged.
    a.kill().await;
    publisher.finish().await.assert_success();
    let every: BTreeSet<u64> = (0..1000).collect();
    let seen = eventually(WAIT, "every event handled", || async {
        let seen = handled(&[&a, &b]);
        (seen.keys().copied().collect::<BTreeSet<_>>() == every).then_some(seen)
    })
    .await;
    let claimed = b
        .handled()
        .iter()
        .filter(|l| l["deliveries"].as_u64() > Some(1))
        .count();
    let twice = seen.values().filter(|n| **n > 1).count();
    println!(
        "stream target: 1,000 events, a killed after {} handled; b claimed {claimed} \
         entries a held, {twice} handled twice",
        a.handled().len()
    );
    assert!(claimed > 0, "b took over what a held when it died");
    assert_eq!(
        sidecar.metric("subtocall_events_forwarded_total").await,
        1000.0
    );
    // Everything acknowledged is trimmed at the next check.
    eventually(WAIT, "the acknowledged entries trimmed", || async {
        (xlen(&redis, stream).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_backlog_is_bounded_without_trimming_anything_unread() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _announce = announce(&crossbar, "com.example.SUB_full").await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &stream_env(&redis.url(), &[("SUBTOCALL_REDIS_MAX_BACKLOG", "200")]),
    );
    sidecar
        .wait_subscribed(&router, "com.example.full", WAIT)
        .await;
    let stream = "queue:com.example.SUB_full";
    // The stream and its group exist before the first event.
    eventually(WAIT, "the group created on discovery", || async {
        let groups = redis.command(&["XINFO", "GROUPS", stream]).await;
        matches!(groups, Reply::Array(Some(ref g)) if g.len() == 1).then_some(())
    })
    .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.full", 300)
    })
    .await
    .assert_success();
    let idle = sidecar.wait_idle(300, WAIT).await;
    assert_eq!(idle.forwarded, 200.0, "the bound's worth added");
    assert_eq!(idle.dead_lettered, 100.0, "the rest dead-lettered");
    assert_eq!(
        sidecar
            .metric("subtocall_events_dead_lettered_total{reason=\"backlog\"}")
            .await,
        100.0
    );
    assert_eq!(xlen(&redis, stream).await, 200, "nothing unread trimmed");
    assert_eq!(
        sidecar
            .metric(&format!("subtocall_stream_backlog{{stream=\"{stream}\"}}"))
            .await,
        200.0
    );
    assert!(
        sidecar
            .metric(&format!(
                "subtocall_stream_oldest_unacked_seconds{{stream=\"{stream}\"}}"
            ))
            .await
            >= 0.0
    );
    // The group was there before any backend read: a consumer starting now
    // gets the first 200 events, in order.
    let c = StreamConsumer::spawn(StreamConsumerOptions::new(&redis.url(), stream, "late")).await;
    let seqs = eventually(WAIT, "the 200 entries handled", || async {
        let lines = c.handled();
        (lines.len() >= 200).then(|| {
            lines
                .iter()
                .map(|l| l["kwargs"]["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        })
    })
    .await;
    assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    // Once acknowledged, they are trimmed (at the next check, within 5 s)
    // and the backlog falls to zero.
    eventually(WAIT, "the acknowledged entries trimmed", || async {
        (xlen(&redis, stream).await == 0).then_some(())
    })
    .await;
    sidecar
        .wait_metric(
            &format!("subtocall_stream_backlog{{stream=\"{stream}\"}}"),
            |n| n == 0.0,
            WAIT,
        )
        .await;
}

#[tokio::test]
async fn a_redis_restart_mid_stream_loses_nothing() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let mut redis = Redis::start_persistent().await;
    let _announce = announce(&crossbar, "com.example.SUB_rs").await;
    let sidecar = Sidecar::start_for(&crossbar, &stream_env(&redis.url(), &[]));
    sidecar
        .wait_subscribed(&router, "com.example.rs", WAIT)
        .await;
    let stream = "queue:com.example.SUB_rs";
    let consumer =
        StreamConsumer::spawn(StreamConsumerOptions::new(&redis.url(), stream, "c")).await;
    let publisher = Publisher::spawn(PublisherOptions {
        quiet: true,
        rate: 200.0,
        ..PublisherOptions::new(&crossbar, "com.example.rs", 600)
    });
    eventually(WAIT, "some events handled", || async {
        (consumer.handled().len() >= 100).then_some(())
    })
    .await;
    redis.stop().await;
    sidecar
        .wait_metric("subtocall_redis_errors_total", |n| n > 0.0, WAIT)
        .await;
    redis.start_again().await;
    publisher.finish().await.assert_success();
    let every: BTreeSet<u64> = (0..600).collect();
    let seen = eventually(WAIT, "every event handled", || async {
        let seen = handled(&[&consumer]);
        (seen.keys().copied().collect::<BTreeSet<_>>() == every).then_some(seen)
    })
    .await;
    let twice = seen.values().filter(|n| **n > 1).count();
    println!("stream target across a Redis restart: 600 events, {twice} handled twice");
}

/// The publisher's seqs in the envelopes a stream holds, in stream order.
async fn stream_seqs(redis: &Redis, stream: &str) -> Vec<u64> {
    let Reply::Array(Some(entries)) = redis.command(&["XRANGE", stream, "-", "+"]).await else {
        panic!("XRANGE {stream}")
    };
    entries
        .iter()
        .map(|entry| {
            let Reply::Array(Some(parts)) = entry else {
                panic!("entry {entry:?}")
            };
            let Some(Reply::Array(Some(fields))) = parts.get(1) else {
                panic!("fields of {entry:?}")
            };
            assert!(matches!(&fields[0], Reply::Bulk(Some(f)) if f == b"event"));
            let Reply::Bulk(Some(json)) = &fields[1] else {
                panic!("value of {entry:?}")
            };
            let envelope: serde_json::Value = serde_json::from_slice(json).expect("JSON");
            envelope["kwargs"]["seq"].as_u64().expect("kwargs.seq")
        })
        .collect()
}

#[tokio::test]
async fn two_instances_on_the_redis_queue_add_each_event_once() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _announce = announce(&crossbar, "com.example.SUB_twice").await;
    let url = redis.url();
    let env = stream_env(&url, &[("SUBTOCALL_QUEUE", "redis")]);
    let _first = Sidecar::start_for(&crossbar, &env);
    let _second = Sidecar::start_for(&crossbar, &env);
    eventually(WAIT, "both instances subscribed", || async {
        (router.subscribers("com.example.twice").await.len() == 2).then_some(())
    })
    .await;
    Publisher::run(PublisherOptions {
        quiet: true,
        rate: 250.0,
        ..PublisherOptions::new(&crossbar, "com.example.twice", 500)
    })
    .await
    .assert_success();
    let stream = "queue:com.example.SUB_twice";
    let mut seqs = eventually(WAIT, "500 entries in the stream", || async {
        let seqs = stream_seqs(&redis, stream).await;
        (seqs.len() >= 500).then_some(seqs)
    })
    .await;
    seqs.sort_unstable();
    assert_eq!(seqs, (0..500).collect::<Vec<_>>(), "each event added once");
}

#[tokio::test]
async fn with_drop_oldest_the_oldest_entries_nobody_was_handed_make_room() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _announce = announce(&crossbar, "com.example.SUB_room").await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &stream_env(
            &redis.url(),
            &[
                ("SUBTOCALL_REDIS_MAX_BACKLOG", "100"),
                ("SUBTOCALL_OVERFLOW", "drop-oldest"),
            ],
        ),
    );
    sidecar
        .wait_subscribed(&router, "com.example.room", WAIT)
        .await;
    let stream = "queue:com.example.SUB_room";
    let publish = |n: u32| {
        Publisher::run(PublisherOptions {
            quiet: true,
            ..PublisherOptions::new(&crossbar, "com.example.room", n)
        })
    };
    publish(100).await.assert_success();
    sidecar
        .wait_metric("subtocall_events_forwarded_total", |n| n == 100.0, WAIT)
        .await;
    // A backend takes ten and is still working on them.
    redis
        .command(&[
            "XREADGROUP",
            "GROUP",
            "backends",
            "w",
            "COUNT",
            "10",
            "STREAMS",
            stream,
            ">",
        ])
        .await;
    publish(50).await.assert_success();
    sidecar
        .wait_metric("subtocall_events_forwarded_total", |n| n == 150.0, WAIT)
        .await;
    sidecar
        .wait_metric(
            "subtocall_events_dead_lettered_total{reason=\"backlog\"}",
            |n| n == 50.0,
            WAIT,
        )
        .await;
    // The second publisher numbers from 0 again: its events are the last 50
    // entries. What is left of the first: the ten handed out, and the 40
    // newest.
    let seqs = stream_seqs(&redis, stream).await;
    let expected: Vec<u64> = (0..10).chain(60..100).chain(0..50).collect();
    assert_eq!(
        seqs, expected,
        "the oldest entries nobody was handed made room"
    );
}

#[tokio::test]
async fn the_example_consumer_moves_an_entry_delivered_too_often_to_the_dead_letter_stream() {
    let redis = Redis::start().await;
    let stream = "queue:com.example.SUB_poison";
    redis
        .command(&["XGROUP", "CREATE", stream, "backends", "0", "MKSTREAM"])
        .await;
    let Reply::Bulk(Some(id)) = redis
        .command(&["XADD", stream, "*", "event", r#"{"kwargs": {"seq": 7}}"#])
        .await
    else {
        panic!("XADD gave no id")
    };
    let id = String::from_utf8(id).unwrap();
    // A consumer that keeps dying on it: handed out five times already.
    redis
        .command(&[
            "XREADGROUP",
            "GROUP",
            "backends",
            "ghost",
            "STREAMS",
            stream,
            ">",
        ])
        .await;
    redis
        .command(&[
            "XCLAIM",
            stream,
            "backends",
            "ghost",
            "0",
            &id,
            "RETRYCOUNT",
            "5",
        ])
        .await;
    let consumer = StreamConsumer::spawn(StreamConsumerOptions {
        claim_idle_ms: 100,
        max_deliveries: 5,
        ..StreamConsumerOptions::new(&redis.url(), stream, "c")
    })
    .await;
    // Its sixth delivery is one too many: moved, acknowledged, not handled.
    let dead = format!("{stream}:dead");
    eventually(WAIT, "the entry in the dead-letter stream", || async {
        (xlen(&redis, &dead).await == 1).then_some(())
    })
    .await;
    assert!(consumer.handled().is_empty(), "{:?}", consumer.handled());
    let Reply::Array(Some(pending)) = redis.command(&["XPENDING", stream, "backends"]).await else {
        panic!("XPENDING")
    };
    assert_eq!(pending.first(), Some(&Reply::Integer(0)), "acknowledged");
}
