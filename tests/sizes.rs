//! Message sizes against the real Crossbar: a forwarded CALL over
//! `SUBTOCALL_MAX_CALL_SIZE` is dead-lettered as `too_large` without being
//! sent (it would make the router close the connection, again at every
//! retry), and the session and the other events are unaffected.

mod support;

use std::time::Duration;

use serde_json::json;
use support::peers::RouterMeta;
use support::sidecar::Sidecar;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_call_over_the_size_limit_is_dead_lettered_unsent_and_the_session_goes_on() {
    let crossbar = Crossbar::start().await;
    let backend = Backend::spawn(BackendOptions::new(&crossbar, &["com.example.SUB_big"])).await;
    let sidecar = Sidecar::start_for(&crossbar, &[("SUBTOCALL_MAX_CALL_SIZE", "1KiB")]);
    let router = RouterMeta::join(&crossbar).await;
    sidecar
        .wait_subscribed(&router, "com.example.big", WAIT)
        .await;

    Publisher::run(PublisherOptions {
        payload: Some(json!({"args": ["x".repeat(2000)], "kwargs": {}})),
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.big", 3)
    })
    .await
    .assert_success();
    Publisher::run(PublisherOptions {
        quiet: true,
        ..PublisherOptions::new(&crossbar, "com.example.big", 5)
    })
    .await
    .assert_success();

    let too_large = "subtocall_events_dead_lettered_total{reason=\"too_large\"}";
    eventually(WAIT, "3 too_large dead letters, 5 forwarded", || async {
        let dead = sidecar.metric(too_large).await;
        let forwarded = sidecar.metric("subtocall_events_forwarded_total").await;
        (dead == 3.0 && forwarded == 5.0).then_some(())
    })
    .await;
    let seqs: Vec<_> = backend
        .invocations()
        .iter()
        .map(|i| i["kwargs"]["seq"].clone())
        .collect();
    assert_eq!(
        seqs.len(),
        5,
        "only the small events reach the backend: {seqs:?}"
    );
    assert_eq!(sidecar.metric("subtocall_events_retried_total").await, 0.0);
    assert_eq!(
        sidecar.metric("subtocall_router_reconnects_total").await,
        0.0
    );
}
