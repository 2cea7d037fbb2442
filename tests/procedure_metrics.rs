//! Metrics per procedure (`subtocall_procedure_*`) on the real router: each
//! procedure's received, forwarded and dead-lettered counts, what it has in
//! flight and waiting, and the cap that folds procedures beyond
//! `SUBTOCALL_METRICS_MAX_PROCEDURES` into `procedure="other"`.

mod support;

use std::time::Duration;

use support::sidecar::Sidecar;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn series(metric: &str, procedure: &str, group: &str) -> String {
    format!("{metric}{{procedure=\"{procedure}\",group=\"{group}\"}}")
}

#[tokio::test]
async fn each_procedure_has_its_own_counts_in_flight_and_waiting() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let _good = Backend::spawn(BackendOptions::shared(
        &crossbar,
        "good",
        "com.example.SUB_good",
    ))
    .await;
    let mut bad = Backend::spawn(BackendOptions::shared(
        &crossbar,
        "bad",
        "com.example.SUB_bad__audit",
    ))
    .await;
    bad.reject_calls(true).await;
    let _slow = Backend::spawn(BackendOptions {
        delay_ms: 3000,
        ..BackendOptions::shared(&crossbar, "slow", "com.example.SUB_slow")
    })
    .await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_MAX_IN_FLIGHT", "2")]);
    for topic in ["com.example.good", "com.example.bad", "com.example.slow"] {
        sidecar.wait_subscribed(&router, topic, WAIT).await;
    }
    Publisher::publish(&crossbar, "com.example.good", 20).await;
    Publisher::publish(&crossbar, "com.example.bad", 10).await;
    sidecar.wait_idle(30, WAIT).await;
    let good = |m| series(m, "com.example.SUB_good", "default");
    let bad = |m| series(m, "com.example.SUB_bad__audit", "audit");
    assert_eq!(
        sidecar
            .metric(&good("subtocall_procedure_events_received_total"))
            .await,
        20.0
    );
    assert_eq!(
        sidecar
            .metric(&good("subtocall_procedure_events_forwarded_total"))
            .await,
        20.0
    );
    assert_eq!(
        sidecar
            .metric(&good("subtocall_procedure_forward_latency_seconds_count"))
            .await,
        20.0
    );
    assert_eq!(
        sidecar
            .metric(&bad("subtocall_procedure_events_received_total"))
            .await,
        10.0
    );
    let rejected = "subtocall_procedure_events_dead_lettered_total{procedure=\"com.example.SUB_bad__audit\",group=\"audit\",reason=\"rejected\"}";
    assert_eq!(sidecar.metric(rejected).await, 10.0);
    assert_eq!(
        sidecar
            .try_metric(&bad("subtocall_procedure_events_forwarded_total"))
            .await
            .unwrap_or(0.0),
        0.0
    );

    // Five events for a backend that takes 3 s each, two calls at a time:
    // two in flight, three waiting, the oldest of them for a while.
    Publisher::publish(&crossbar, "com.example.slow", 5).await;
    let slow = |m| series(m, "com.example.SUB_slow", "default");
    sidecar
        .wait_for(
            "two in flight and three waiting for SUB_slow",
            WAIT,
            || async {
                let in_flight = sidecar
                    .try_metric(&slow("subtocall_procedure_in_flight"))
                    .await;
                let waiting = sidecar
                    .try_metric(&slow("subtocall_procedure_waiting"))
                    .await;
                let oldest = sidecar
                    .try_metric(&slow("subtocall_procedure_oldest_waiting_seconds"))
                    .await;
                in_flight == Some(2.0) && waiting == Some(3.0) && oldest.is_some_and(|s| s > 0.5)
            },
        )
        .await;
    // The other procedures have nothing waiting.
    assert_eq!(
        sidecar.metric(&good("subtocall_procedure_waiting")).await,
        0.0
    );
}

#[tokio::test]
async fn procedures_beyond_the_cap_are_counted_under_other() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let _a = Backend::spawn(BackendOptions::shared(
        &crossbar,
        "a",
        "com.example.SUB_first",
    ))
    .await;
    let _b = Backend::spawn(BackendOptions::shared(
        &crossbar,
        "b",
        "com.example.SUB_second",
    ))
    .await;
    let _c = Backend::spawn(BackendOptions::shared(
        &crossbar,
        "c",
        "com.example.SUB_third",
    ))
    .await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_METRICS_MAX_PROCEDURES", "1")]);
    for topic in [
        "com.example.first",
        "com.example.second",
        "com.example.third",
    ] {
        sidecar.wait_subscribed(&router, topic, WAIT).await;
    }
    Publisher::publish(&crossbar, "com.example.first", 5).await;
    sidecar.wait_idle(5, WAIT).await;
    Publisher::publish(&crossbar, "com.example.second", 7).await;
    Publisher::publish(&crossbar, "com.example.third", 9).await;
    sidecar.wait_idle(21, WAIT).await;
    let own = series(
        "subtocall_procedure_events_forwarded_total",
        "com.example.SUB_first",
        "default",
    );
    let other = series(
        "subtocall_procedure_events_forwarded_total",
        "other",
        "other",
    );
    assert_eq!(sidecar.metric(&own).await, 5.0);
    assert_eq!(sidecar.metric(&other).await, 16.0);
    assert_eq!(
        sidecar.metric("subtocall_metrics_procedures_other").await,
        2.0
    );
}
