//! The product end to end: the `subtocall` binary beside a real Crossbar,
//! autobahn-python backends and publishers, and a real Redis. Each test says
//! in its name what it proves.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::crossbar::{BACKEND_USER, SALTED_USER};
use support::peers::{Connection, Invoke, Match, publisher_blob, user, wamp_bytes};
use support::resp::Reply;
use support::sidecar::Sidecar;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

fn backend(
    crossbar: &Crossbar,
    name: &str,
    procedures: &[&str],
    serializer: Serializer,
) -> BackendOptions {
    BackendOptions {
        connection: Connection {
            serializer,
            ..BackendOptions::new(crossbar, &[]).connection
        },
        name: name.into(),
        invoke: Invoke::RoundRobin,
        ..BackendOptions::new(crossbar, procedures)
    }
}

/// Waits until the backends together have `n` invocations; returns them all.
async fn invocations(backends: &[&Backend], n: usize) -> Vec<Value> {
    eventually(
        WAIT,
        &format!("{n} invocations across the backends"),
        || async {
            let all: Vec<Value> = backends.iter().flat_map(|b| b.invocations()).collect();
            (all.len() >= n).then_some(all)
        },
    )
    .await
}

/// The `seq` of each invocation (kwargs.seq), sorted.
fn seqs(invocations: &[Value]) -> Vec<u64> {
    let mut seqs: Vec<u64> = invocations
        .iter()
        .map(|i| i["kwargs"]["seq"].as_u64().expect("seq"))
        .collect();
    seqs.sort_unstable();
    seqs
}

async fn two_backends_share_events_exactly_once(sidecar_serializer: &str, peers: Serializer) {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let mut a = Backend::spawn(backend(&crossbar, "A", &["com.example.SUB_status"], peers)).await;
    let mut b = Backend::spawn(backend(&crossbar, "B", &["com.example.SUB_status"], peers)).await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_SERIALIZER", sidecar_serializer)]);
    sidecar
        .wait_subscribed(&router, "com.example.status", WAIT)
        .await;
    assert!(
        sidecar
            .log()
            .contains(&format!("serializer=wamp.2.{sidecar_serializer}")),
        "sidecar negotiated {sidecar_serializer}"
    );

    let published = Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.status", 500)
    })
    .await;
    published.assert_success();

    let all = invocations(&[&a, &b], 500).await;
    assert_eq!(
        seqs(&all),
        (0..500).collect::<Vec<_>>(),
        "each event exactly once"
    );
    for inv in &all {
        let i = inv["kwargs"]["seq"].as_u64().unwrap();
        assert_eq!(inv["procedure"], "com.example.SUB_status");
        assert_eq!(
            inv["args"],
            json!([i, "hello", {"nested": [1, 2.5, null, true]}])
        );
        assert_eq!(inv["kwargs"], json!({"seq": i, "key": "value"}));
    }
    let (na, nb) = (a.invocations().len(), b.invocations().len());
    assert!(na > 0 && nb > 0, "both backends get a share: A={na} B={nb}");
    // Nothing more trickles in afterwards (no duplicates): once the sidecar
    // has finished every event it calls no backend again, and the barrier
    // collects every invocation the backends printed before that.
    sidecar.wait_idle(500, WAIT).await;
    a.sync().await;
    b.sync().await;
    assert_eq!(a.invocations().len() + b.invocations().len(), 500);
}

#[tokio::test]
async fn two_roundrobin_backends_share_500_events_exactly_once_over_json() {
    two_backends_share_events_exactly_once("json", Serializer::Msgpack).await;
}

#[tokio::test]
async fn two_roundrobin_backends_share_500_events_exactly_once_over_msgpack() {
    two_backends_share_events_exactly_once("msgpack", Serializer::Json).await;
}

#[tokio::test]
async fn salted_cra_sidecar_forwards_bytes_in_args_and_kwargs_unchanged() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let a = Backend::spawn(backend(
        &crossbar,
        "A",
        &["com.example.SUB_bin"],
        Serializer::Json,
    ))
    .await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[
            ("BACKEND_USERNAME", SALTED_USER.0),
            ("BACKEND_SECRET", SALTED_USER.1),
            ("SUBTOCALL_SERIALIZER", "msgpack"),
        ],
    );
    sidecar
        .wait_subscribed(&router, "com.example.bin", WAIT)
        .await;
    assert!(
        sidecar.log().contains("authid=\"salted\""),
        "joined as the salted user"
    );
    Publisher::run(PublisherOptions {
        with_bytes: true,
        connection: Connection {
            serializer: Serializer::Msgpack,
            ..Connection::to(&crossbar)
        },
        ..PublisherOptions::new(&crossbar, "com.example.bin", 20)
    })
    .await
    .assert_success();
    let all = invocations(&[&a], 20).await;
    for inv in all {
        let i = inv["kwargs"]["seq"].as_u64().unwrap() as u32;
        let blob = wamp_bytes(&publisher_blob(i));
        assert_eq!(inv["args"][3], blob, "bytes in args");
        assert_eq!(inv["kwargs"]["blob"], blob, "bytes in kwargs");
    }
}

#[tokio::test]
async fn wildcard_registration_forwards_each_concrete_topic_to_its_concrete_procedure() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let mut a = Backend::spawn(BackendOptions {
        match_: Match::Wildcard,
        ..backend(&crossbar, "A", &["com.example..SUB_ev"], Serializer::Json)
    })
    .await;
    let sidecar = Sidecar::start_for(&crossbar, &[]);
    sidecar
        .wait_subscribed(&router, "com.example..ev", WAIT)
        .await;
    for topic in ["com.example.a.ev", "com.example.b.ev"] {
        Publisher::run(PublisherOptions::new(&crossbar, topic, 3))
            .await
            .assert_success();
    }
    let all = invocations(&[&a], 6).await;
    sidecar.wait_idle(6, WAIT).await;
    a.sync().await;
    assert_eq!(a.invocations().len(), 6, "each event once");
    let mut procedures: Vec<(String, u64)> = all
        .iter()
        .map(|i| {
            (
                i["procedure"].as_str().unwrap().to_owned(),
                i["kwargs"]["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    procedures.sort();
    let expected: Vec<(String, u64)> = ["com.example.a.SUB_ev", "com.example.b.SUB_ev"]
        .iter()
        .flat_map(|p| (0..3).map(move |i| (p.to_string(), i)))
        .collect();
    assert_eq!(procedures, expected);
}

#[tokio::test]
async fn two_groups_each_get_every_event_once_over_one_subscription_and_one_leaving_spares_the_other()
 {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let default_group = "com.example.SUB_orders";
    let audit = "com.example.SUB_orders__audit";
    let json = Serializer::Json;
    let mut a1 = Backend::spawn(backend(&crossbar, "A1", &[default_group], json)).await;
    let mut a2 = Backend::spawn(backend(&crossbar, "A2", &[default_group], json)).await;
    let mut b1 = Backend::spawn(backend(&crossbar, "B1", &[audit], json)).await;
    let mut b2 = Backend::spawn(backend(&crossbar, "B2", &[audit], json)).await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_GRACE_PERIOD", "1s")]);
    sidecar
        .wait_metric("subtocall_groups", |n| n == 2.0, WAIT)
        .await;
    sidecar
        .wait_subscribed(&router, "com.example.orders", WAIT)
        .await;
    assert_eq!(
        router.subscribers("com.example.orders").await.len(),
        1,
        "one subscription for both groups"
    );
    assert_eq!(sidecar.metric("subtocall_subscriptions_active").await, 1.0);

    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.orders", 300)
    })
    .await
    .assert_success();
    let defaults = invocations(&[&a1, &a2], 300).await;
    let audits = invocations(&[&b1, &b2], 300).await;
    for (group, procedure, got) in [
        ("default", default_group, &defaults),
        ("audit", audit, &audits),
    ] {
        assert_eq!(
            seqs(got),
            (0..300).collect::<Vec<_>>(),
            "the {group} group gets each event once"
        );
        assert!(got.iter().all(|i| i["procedure"] == procedure));
    }
    for (name, b) in [("A1", &a1), ("A2", &a2), ("B1", &b1), ("B2", &b2)] {
        assert!(
            !b.invocations().is_empty(),
            "{name} gets a share of its group's events"
        );
    }
    // Counted once per group: 300 EVENTs, 600 deliveries.
    let idle = sidecar.wait_idle(600, WAIT).await;
    assert_eq!(idle.forwarded, 600.0);
    for b in [&mut a1, &mut a2, &mut b1, &mut b2] {
        b.sync().await;
    }
    assert_eq!(a1.invocations().len() + a2.invocations().len(), 300);
    assert_eq!(b1.invocations().len() + b2.invocations().len(), 300);

    // The audit group goes: after its grace period it leaves, and the
    // default group carries on over the same subscription.
    b1.quit().await;
    b2.quit().await;
    sidecar
        .wait_metric("subtocall_groups", |n| n == 1.0, WAIT)
        .await;
    assert_eq!(
        router.subscribers("com.example.orders").await.len(),
        1,
        "the subscription stays for the default group"
    );
    assert_eq!(sidecar.metric("subtocall_subscriptions_active").await, 1.0);
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.orders", 100)
    })
    .await
    .assert_success();
    invocations(&[&a1, &a2], 400).await;
    let idle = sidecar.wait_idle(700, WAIT).await;
    assert_eq!(idle.forwarded, 700.0);
    assert_eq!(
        idle.dead_lettered, 0.0,
        "nothing was sent to the gone group"
    );
    assert_eq!(b1.invocations().len() + b2.invocations().len(), 300);
}

#[tokio::test]
async fn late_registration_is_picked_up_and_a_backend_swap_within_grace_loses_nothing() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_GRACE_PERIOD", "30s")]);
    // Ready: joined, and the (empty) list of registrations is known.
    sidecar.wait_ready(WAIT).await;
    assert_eq!(sidecar.metric("subtocall_registrations_tracked").await, 0.0);

    // Registered after the sidecar started; the plain com.example.swap
    // procedure (no SUB_ marker) must never be called by the sidecar.
    let mut a = Backend::spawn(backend(
        &crossbar,
        "A",
        &["com.example.SUB_swap", "com.example.swap"],
        Serializer::Json,
    ))
    .await;
    sidecar
        .wait_subscribed(&router, "com.example.swap", WAIT)
        .await;
    Publisher::run(PublisherOptions {
        payload: None,
        ..PublisherOptions::new(&crossbar, "com.example.swap", 5)
    })
    .await
    .assert_success();
    invocations(&[&a], 5).await;

    // The last callee leaves: the subscription stays for the grace period.
    a.quit().await;
    sidecar
        .wait_metric("subtocall_registrations_tracked", |n| n == 0.0, WAIT)
        .await;
    assert_eq!(
        router.subscribers("com.example.swap").await.len(),
        1,
        "the subscription stays for the grace period"
    );
    // Published while no backend exists at all: the event waits for a
    // callee, no call is made for it.
    sidecar
        .wait_metric("subtocall_groups_waiting_for_callee", |n| n == 1.0, WAIT)
        .await;
    let retried = sidecar.metric("subtocall_events_retried_total").await;
    let gap = Publisher::run(PublisherOptions {
        payload: Some(json!({"args": ["during the gap"], "kwargs": {"seq": 100}})),
        ..PublisherOptions::new(&crossbar, "com.example.swap", 1)
    })
    .await;
    gap.assert_success();
    sidecar
        .wait_metric("subtocall_queue_depth", |n| n == 1.0, WAIT)
        .await;
    assert_eq!(sidecar.metric("subtocall_calls_in_flight").await, 0.0);
    assert_eq!(
        sidecar.metric("subtocall_events_retried_total").await,
        retried,
        "no call, no retry"
    );

    let b = Backend::spawn(backend(
        &crossbar,
        "B",
        &["com.example.SUB_swap"],
        Serializer::Json,
    ))
    .await;
    let got = invocations(&[&b], 1).await;
    assert_eq!(got[0]["args"], json!(["during the gap"]));
    let log = sidecar.log();
    assert!(
        log.contains(
            "the default group of topic com.example.swap has a registration again within the grace period"
        ),
        "the subscription was resumed"
    );
    assert!(
        !log.contains("unsubscribed from com.example.swap"),
        "the subscription was kept, not torn down and rebuilt"
    );
    let plain_calls: Vec<Value> = a
        .invocations()
        .into_iter()
        .filter(|i| i["procedure"] == "com.example.swap")
        .collect();
    assert!(
        plain_calls.is_empty(),
        "non-SUB_ procedure was called: {plain_calls:?}"
    );
}

#[tokio::test]
async fn redis_mode_pushes_300_envelopes_in_order_that_a_redis_client_can_blpop() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    // In Redis mode a backend announces interest by registering, as usual,
    // and consumes the list.
    let _announce = Backend::spawn(backend(
        &crossbar,
        "A",
        &["com.example.SUB_q"],
        Serializer::Json,
    ))
    .await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("USE_REDIS_MQ", "1"), ("REDIS_URL", &redis.url())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.q", WAIT)
        .await;
    let published = Publisher::run(PublisherOptions::new(&crossbar, "com.example.q", 300)).await;
    published.assert_success();
    let publications: Vec<u64> = published
        .lines_with("publication")
        .iter()
        .map(|l| l["publication"].as_u64().unwrap())
        .collect();

    let key = "queue:com.example.SUB_q";
    eventually(WAIT, "300 envelopes in Redis", || async {
        (redis.llen(key).await == 300).then_some(())
    })
    .await;
    let envelopes = redis.lrange_json(key).await;
    for (i, env) in envelopes.iter().enumerate() {
        assert_eq!(env["procedure"], "com.example.SUB_q");
        assert_eq!(env["topic"], "com.example.q");
        assert_eq!(
            env["args"],
            json!([i, "hello", {"nested": [1, 2.5, null, true]}]),
            "in order"
        );
        assert_eq!(env["kwargs"], json!({"seq": i, "key": "value"}));
        assert_eq!(env["publication"].as_u64(), Some(publications[i]));
        assert!(env["received_at"].as_str().unwrap().ends_with('Z'));
        assert!(
            env.get("publisher").is_some(),
            "publisher field present (null when undisclosed)"
        );
    }
    let popped = redis.command(&["BLPOP", key, "1"]).await;
    let Reply::Array(Some(items)) = popped else {
        panic!("BLPOP answered {popped:?}")
    };
    let [Reply::Bulk(Some(list)), Reply::Bulk(Some(first))] = &items[..] else {
        panic!("BLPOP answered {items:?}")
    };
    assert_eq!(list.as_slice(), key.as_bytes());
    let first: Value = serde_json::from_slice(first).unwrap();
    assert_eq!(first["kwargs"]["seq"], 0, "BLPOP takes the oldest first");
    assert!(
        _announce.invocations().is_empty(),
        "Redis mode makes no calls"
    );
}

#[tokio::test]
async fn details_kwarg_tells_the_backend_topic_publication_and_disclosed_publisher() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let a = Backend::spawn(backend(
        &crossbar,
        "A",
        &["com.example.SUB_who"],
        Serializer::Json,
    ))
    .await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_DETAILS_KWARG", "_details")]);
    sidecar
        .wait_subscribed(&router, "com.example.who", WAIT)
        .await;
    // The backend role has disclose.publisher = true in the test router config.
    let published = Publisher::run(PublisherOptions {
        connection: Connection {
            auth: user(BACKEND_USER),
            ..Connection::to(&crossbar)
        },
        ..PublisherOptions::new(&crossbar, "com.example.who", 1)
    })
    .await;
    published.assert_success();
    let publication = published.lines_with("publication")[0]["publication"]
        .as_u64()
        .unwrap();
    let inv = &invocations(&[&a], 1).await[0];
    let details = &inv["kwargs"]["_details"];
    assert_eq!(details["topic"], "com.example.who");
    assert_eq!(details["publication"].as_u64(), Some(publication));
    assert!(details["publisher"].as_u64().is_some(), "{details}");
    assert_eq!(details["publisher_authid"], "backend");
    assert_eq!(details["publisher_authrole"], "backend");
    assert_eq!(
        inv["kwargs"]["seq"], 0,
        "the event's own kwargs are untouched"
    );

    // Without the setting, nothing is added.
    let mut env: BTreeMap<String, String> = sidecar.env().clone();
    env.remove("SUBTOCALL_DETAILS_KWARG");
    // A fresh port: the killed sidecar may not have released its own yet.
    env.remove("SUBTOCALL_HTTP_ADDR");
    let killed = router.subscribers("com.example.who").await;
    drop(sidecar);
    let plain = Sidecar::start(env);
    // The router drops the killed sidecar's subscription when it notices the
    // connection is gone: wait for a subscriber that is not the killed one.
    plain
        .wait_for("the new sidecar to subscribe", WAIT, || async {
            let subscribers = router.subscribers("com.example.who").await;
            !subscribers.is_empty() && subscribers.iter().all(|s| !killed.contains(s))
        })
        .await;
    Publisher::run(PublisherOptions::new(&crossbar, "com.example.who", 1))
        .await
        .assert_success();
    let all = invocations(&[&a], 2).await;
    assert!(all[1]["kwargs"].get("_details").is_none(), "{}", all[1]);
}
