//! SIGTERM with calls in flight, many times over, on the real router: the
//! drain waits for the answers of the calls it made, and never for the
//! deadline. (Once in about 30 runs of a black-box check a drain kept one
//! answered call in flight until the deadline dead-lettered it.)

mod support;

use std::time::{Duration, Instant};

use subtocall::wamp::auth::Credentials;
use subtocall::wamp::{Client, ClientConfig, Dict, Payload, Serializer, Value};
use support::sidecar::{Sidecar, stop_summary};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Sidecars stopped at once, each serving a procedure of its own.
const LANES: usize = 4;

/// Stops per lane.
const ROUNDS: usize = 75;

/// Events per stop: published at once, so that the backend's delay keeps
/// several calls in flight.
const EVENTS: u64 = 6;

async fn publisher(crossbar: &Crossbar) -> Client {
    let mut config = ClientConfig::new(crossbar.url(), crossbar.realm());
    config.serializers = vec![Serializer::MsgPack];
    config.credentials = Credentials::Anonymous;
    config.ca_file = crossbar.ca_file_opt().map(|p| p.to_owned());
    Client::connect(config).await.expect("publisher joins").0
}

/// One lane: start a sidecar, publish, SIGTERM while its calls are in
/// flight (at a moment that moves from round to round), and check that it
/// delivered everything it accepted and exited without waiting for the
/// deadline. Returns the slowest exit and in how many rounds the drain
/// began with calls in flight.
async fn lane(crossbar: &Crossbar, router: &RouterMeta, lane: usize) -> (Duration, usize) {
    let topic = format!("com.example.drain{lane}");
    let filter = format!("^com\\.example\\.SUB_drain{lane}$");
    let client = publisher(crossbar).await;
    let mut slowest = Duration::ZERO;
    let mut caught = 0;
    for round in 0..ROUNDS {
        let mut sidecar = Sidecar::start_for(
            crossbar,
            &[
                ("SUBTOCALL_REGISTRATION_FILTER", filter.as_str()),
                // Far beyond the backend's delay: a drain that waits for
                // it is unmistakable.
                ("SUBTOCALL_SHUTDOWN_TIMEOUT", "30s"),
            ],
        );
        sidecar.wait_subscribed(router, &topic, WAIT).await;
        for n in 0..EVENTS {
            let kwargs = Dict::new()
                .with("lane", lane as u64)
                .with("round", round as u64)
                .with("seq", n);
            let options = Dict::new().with("acknowledge", true);
            client
                .publish(&topic, Payload::new(Vec::<Value>::new(), kwargs), options)
                .await
                .expect("publish");
        }
        // The backend answers after 20-50 ms: stopping 0-45 ms after the
        // last publication catches the calls before, while and after they
        // are made and answered.
        tokio::time::sleep(Duration::from_millis(
            (round as u64 * 7 + lane as u64 * 11) % 46,
        ))
        .await;
        let started = Instant::now();
        let status = sidecar.terminate(WAIT).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        let log = sidecar.log();
        assert_eq!(status.code(), Some(0), "lane {lane} round {round}:\n{log}");
        let s = stop_summary(&log);
        caught += usize::from(in_flight_at_drain(&log) > 0);
        assert_eq!(
            (s["forwarded"], s["dead_lettered"]),
            (s["accepted"], 0),
            "lane {lane} round {round}: every accepted event delivered, none given up:\n{log}"
        );
        assert!(
            took < Duration::from_secs(5),
            "lane {lane} round {round}: the drain took {took:?} with {s:?}:\n{log}"
        );
    }
    (slowest, caught)
}

/// The calls in flight when the drain began, as its first line says.
fn in_flight_at_drain(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("shutdown requested"))
        .unwrap_or_else(|| panic!("no drain line in:\n{log}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("in_flight=")?.parse().ok())
        .unwrap_or_else(|| panic!("no in_flight in {line}"))
}

#[tokio::test]
async fn sigterm_with_calls_in_flight_waits_for_their_answers_and_never_for_the_deadline() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let procedures: Vec<String> = (0..LANES)
        .map(|i| format!("com.example.SUB_drain{i}"))
        .collect();
    let names: Vec<&str> = procedures.iter().map(String::as_str).collect();
    let backend = Backend::spawn(BackendOptions {
        delay_ms: 20,
        jitter_ms: 30,
        ..BackendOptions::new(&crossbar, &names)
    })
    .await;
    let started = Instant::now();
    let lanes = (0..LANES).map(|i| lane(&crossbar, &router, i));
    let lanes = futures_util::future::join_all(lanes).await;
    let caught: usize = lanes.iter().map(|(_, c)| c).sum();
    let slowest = lanes.iter().map(|(s, _)| *s).max().unwrap_or_default();
    println!(
        "{} stops in {:?}, {caught} of them with calls in flight; slowest exit after SIGTERM: \
         {slowest:?}; backend saw {} calls",
        LANES * ROUNDS,
        started.elapsed(),
        backend.invocations().len()
    );
    // The test is about drains with calls in flight: most must have some.
    assert!(
        caught * 2 > LANES * ROUNDS,
        "only {caught} drains began with calls in flight"
    );
}
