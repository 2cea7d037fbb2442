//! `GET /status` and `subtocall status` on the real router: two procedures,
//! one healthy and one whose backend rejects every call (its last error
//! shows), callee counts that follow backends leaving, secrets redacted,
//! exit 1 when not ready; with Redis, the queue's instances and what each
//! holds, and the backlog of the Redis lists.

mod support;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::sidecar::{Sidecar, fake_router_env, mapping, run_subtocall, sidecar_env, status};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "a-secret-that-must-not-show";

/// `subtocall status ARGS` with nothing but PATH in its environment.
async fn subtocall_status(args: &[&str]) -> Output {
    let args: Vec<&str> = ["status"].iter().chain(args).copied().collect();
    run_subtocall(&args, &BTreeMap::new(), WAIT).await
}

fn url(sidecar: &Sidecar) -> String {
    format!("http://127.0.0.1:{}", sidecar.http_port())
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The table row of `procedure` under the MAPPINGS header, as columns.
fn row<'a>(table: &'a str, procedure: &str) -> BTreeMap<&'a str, &'a str> {
    let mut lines = table.lines().skip_while(|l| !l.starts_with("TOPIC"));
    let header = lines.next().expect("the mappings header");
    let line = lines
        .find(|l| l.contains(procedure))
        .unwrap_or_else(|| panic!("no row of {procedure}:\n{table}"));
    // Columns start where the header's names start: after two spaces
    // (names like `IN FLIGHT` have one inside).
    let bytes = header.as_bytes();
    let names: Vec<(usize, &str)> = (0..bytes.len())
        .filter(|&i| bytes[i] != b' ' && (i == 0 || (i >= 2 && &bytes[i - 2..i] == b"  ")))
        .map(|i| (i, header[i..].split("  ").next().unwrap_or("").trim()))
        .collect();
    let mut out = BTreeMap::new();
    for (k, (start, name)) in names.iter().enumerate() {
        let end = names.get(k + 1).map_or(line.len(), |n| n.0.min(line.len()));
        out.insert(*name, line.get(*start..end).unwrap_or("").trim());
    }
    out
}

#[tokio::test]
async fn status_shows_each_mapping_its_callees_counts_and_last_error() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let good_procedure = "com.example.SUB_good";
    let bad_procedure = "com.example.SUB_bad__audit";
    let good = Backend::spawn(BackendOptions::shared(&crossbar, "good-1", good_procedure)).await;
    let mut second =
        Backend::spawn(BackendOptions::shared(&crossbar, "good-2", good_procedure)).await;
    let mut bad = Backend::spawn(BackendOptions::shared(&crossbar, "bad", bad_procedure)).await;
    bad.reject_calls(true).await;
    let mut env = sidecar_env(&crossbar);
    env.insert("SUBTOCALL_RETRY_MAX_ATTEMPTS".into(), "2".into());
    env.insert("SUBTOCALL_RETRY_INITIAL_BACKOFF".into(), "10ms".into());
    // A token in the URL's query: hidden like the secret.
    env.insert(
        "WAMP_URL".into(),
        format!("{}?token={SECRET}", env["WAMP_URL"]),
    );
    let sidecar = Sidecar::start(env);
    for topic in ["com.example.good", "com.example.bad"] {
        sidecar.wait_subscribed(&router, topic, WAIT).await;
    }
    sidecar.wait_ready(WAIT).await;
    Publisher::publish(&crossbar, "com.example.good", 20).await;
    Publisher::publish(&crossbar, "com.example.bad", 10).await;
    sidecar.wait_idle(30, WAIT).await;

    let s = status(&sidecar).await;
    let text = s.to_string();
    assert!(!text.contains(SECRET), "a secret shows: {s:#}");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["ready"], true);
    assert_eq!(s["draining"], false);
    let r = &s["router"];
    assert_eq!(r["connected"], true, "{s:#}");
    assert_eq!(r["realm"], crossbar.realm());
    assert!(r["session"].as_u64().is_some_and(|id| id > 0), "{s:#}");
    assert!(r["joined_at"].as_str().is_some(), "{s:#}");
    assert!(
        r["url"].as_str().unwrap().starts_with("ws://127.0.0.1:"),
        "{s:#}"
    );
    assert_eq!(r["reconnects"], 0);
    assert_eq!(s["queue"]["kind"], "memory");
    assert_eq!(s["delivery"], "wamp");
    let setting = |name: &str| {
        s["configuration"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in the configuration: {s:#}"))
            .clone()
    };
    assert_eq!(setting("BACKEND_SECRET")["value"], "***");
    assert_eq!(setting("BACKEND_SECRET")["set"], true);
    assert_eq!(setting("SUBTOCALL_RETRY_MAX_ATTEMPTS")["value"], "2");
    assert_eq!(setting("SUBTOCALL_MAX_IN_FLIGHT")["set"], false);

    let g = mapping(&s, good_procedure);
    assert_eq!(g["topic"], "com.example.good");
    assert_eq!(g["match"], "exact");
    assert_eq!(g["group"], "default");
    assert_eq!(g["batch"], false);
    assert_eq!(
        g["registrations"],
        serde_json::json!([good.registration_id(good_procedure)])
    );
    assert_eq!(g["callees"], 2, "{g:#}");
    assert_eq!(g["subscription_state"], "subscribed");
    assert!(g["subscription"].as_u64().is_some(), "{g:#}");
    assert_eq!(g["received"], 20);
    assert_eq!(g["forwarded"], 20);
    assert_eq!(g["dead_lettered"], serde_json::json!({}));
    assert_eq!(g["in_flight"], 0);
    assert_eq!(g["waiting"], 0);
    assert_eq!(g["last_error"], Value::Null, "{g:#}");

    let b = mapping(&s, bad_procedure);
    assert_eq!(b["topic"], "com.example.bad");
    assert_eq!(b["group"], "audit");
    assert_eq!(b["callees"], 1, "{b:#}");
    assert_eq!(b["received"], 10);
    assert_eq!(b["forwarded"], 0);
    assert_eq!(b["dead_lettered"], serde_json::json!({"rejected": 10}));
    let error = b["last_error"].as_str().expect("a last error");
    assert!(error.contains("com.example.error.rejected"), "{b:#}");
    assert!(b["last_error_at"].as_str().is_some(), "{b:#}");
    assert!(
        b["last_error_seconds"].as_f64().is_some_and(|s| s < 60.0),
        "{b:#}"
    );

    // The same as tables.
    let out = subtocall_status(&["--url", &url(&sidecar)]).await;
    let table = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.lines().next().unwrap().contains("READY"), "{table}");
    let good_row = row(&table, good_procedure);
    assert_eq!(good_row["CALLEES"], "2", "{table}");
    assert_eq!(good_row["FORWARDED"], "20", "{table}");
    assert_eq!(good_row["LAST ERROR"], "-", "{table}");
    let bad_row = row(&table, bad_procedure);
    assert_eq!(bad_row["GROUP"], "audit", "{table}");
    assert_eq!(bad_row["DEAD"], "10", "{table}");
    assert!(
        bad_row["LAST ERROR"].contains("com.example.error.rejected"),
        "{table}"
    );
    assert!(table.contains("rejected 10"), "{table}");
    assert!(!table.contains(SECRET), "{table}");
    // --json gives /status as it is.
    let out = subtocall_status(&["--url", &url(&sidecar), "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(mapping(&json, good_procedure)["forwarded"], 20);

    // A backend leaves: the callee count drops.
    second.quit().await;
    eventually(WAIT, "one callee of SUB_good left", || async {
        let s = status(&sidecar).await;
        (mapping(&s, good_procedure)["callees"] == 1).then_some(())
    })
    .await;
    let table = stdout(&subtocall_status(&["--url", &url(&sidecar)]).await);
    assert_eq!(row(&table, good_procedure)["CALLEES"], "1", "{table}");
    // The other procedure is untouched.
    assert_eq!(
        mapping(&status(&sidecar).await, bad_procedure)["callees"],
        1
    );
    drop(good);
}

#[tokio::test]
async fn status_exits_1_when_the_sidecar_is_not_ready_or_not_there() {
    // A router that is not there: the sidecar runs, never ready.
    let closed = free_port();
    let env = fake_router_env(&format!("ws://127.0.0.1:{closed}/ws"), &[]);
    let sidecar = Sidecar::start(env);
    let s = eventually(WAIT, "/status answers", || async {
        match sidecar.http_get("/status").await {
            Some((200, body)) => Some(serde_json::from_str::<Value>(&body).unwrap()),
            _ => None,
        }
    })
    .await;
    assert_eq!(s["ready"], false);
    assert_eq!(s["router"]["connected"], false);
    assert_eq!(s["mappings"], serde_json::json!([]));
    let out = subtocall_status(&["--url", &url(&sidecar)]).await;
    let table = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(
        table.lines().next().unwrap().contains("NOT READY"),
        "{table}"
    );
    assert!(table.contains("not connected"), "{table}");

    // Nothing listening: exit 1 with a reason; a bad --url: exit 2.
    let nobody = free_port();
    let out = subtocall_status(&["--url", &format!("http://127.0.0.1:{nobody}")]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot ask"),
        "{out:?}"
    );
    let out = subtocall_status(&["--url", "https://127.0.0.1:1"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Without --url it asks SUBTOCALL_HTTP_ADDR, parsed as the sidecar does.
    let off = tokio::process::Command::new(env!("CARGO_BIN_EXE_subtocall"))
        .arg("status")
        .env_clear()
        .env("SUBTOCALL_HTTP_ADDR", "OFF")
        .output()
        .await
        .expect("subtocall status runs");
    assert_eq!(off.status.code(), Some(2), "{off:?}");
    assert!(
        String::from_utf8_lossy(&off.stderr).contains("--url"),
        "{off:?}"
    );
}

#[tokio::test]
async fn on_the_redis_queue_status_shows_each_instance_and_the_partitions_it_holds() {
    const PARTITIONS: u64 = 4;
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_held";
    let _a = Backend::spawn(BackendOptions::shared(&crossbar, "A", procedure)).await;
    let partitions = PARTITIONS.to_string();
    let env = [
        ("SUBTOCALL_ORDER_BY", "kwarg:k"),
        ("SUBTOCALL_QUEUE", "redis"),
        ("REDIS_URL", &redis.url()),
        ("SUBTOCALL_CLAIM_IDLE", "2s"),
        ("SUBTOCALL_ORDER_PARTITIONS", &partitions),
    ];
    let one = Sidecar::start_for(&crossbar, &env);
    one.wait_subscribed(&router, "com.example.held", WAIT).await;
    let two = Sidecar::start_for(&crossbar, &env);
    two.wait_ready(WAIT).await;
    Publisher::run(PublisherOptions {
        quiet: true,
        keys: Some(8),
        ..PublisherOptions::new(&crossbar, "com.example.held", 40)
    })
    .await
    .assert_success();
    // Both instances heartbeat and share the partitions half and half.
    let s = eventually(
        WAIT,
        "two instances holding two partitions each",
        || async {
            let s = status(&one).await;
            let instances = s["queue"]["instances"].as_array()?.clone();
            let halves = instances.len() == 2
                && instances.iter().all(|i| {
                    i["partitions"].as_array().map(Vec::len) == Some(PARTITIONS as usize / 2)
                        && i["heartbeat_seconds"].as_f64().is_some_and(|h| h < 10.0)
                });
            halves.then_some(s)
        },
    )
    .await;
    let q = &s["queue"];
    assert_eq!(q["kind"], "redis");
    assert_eq!(q["name"], "subtocall");
    assert_eq!(q["redis_up"], true);
    assert_eq!(q["error"], Value::Null);
    let this: Vec<&Value> = q["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["this"] == true)
        .collect();
    assert_eq!(this.len(), 1, "{q:#}");
    assert_eq!(this[0]["consumer"], q["consumer"]);
    let pid = format!("-{}-", one.pid().unwrap());
    assert!(
        this[0]["consumer"].as_str().unwrap().contains(&pid),
        "{q:#}"
    );
    let mut held: Vec<String> = q["instances"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["partitions"].as_array().unwrap().clone())
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    held.sort();
    let every: Vec<String> = (0..PARTITIONS)
        .map(|k| format!("{procedure}#{k}"))
        .collect();
    assert_eq!(held, every, "{q:#}");
    assert!(
        q["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|st| st["unit"] == format!("{procedure}#0")),
        "{q:#}"
    );
    sidecar_idle(&one, &two, 40).await;
    let table = stdout(&subtocall_status(&["--url", &url(&two)]).await);
    assert!(table.contains("INSTANCES"), "{table}");
    let this_line = table
        .lines()
        .find(|l| l.contains("(this)"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        this_line.contains(&format!("-{}-", two.pid().unwrap())),
        "{table}"
    );
    assert!(this_line.contains("2: "), "{table}");
}

/// Both instances' forwarded counts add up to `n`.
async fn sidecar_idle(one: &Sidecar, two: &Sidecar, n: u64) {
    eventually(WAIT, "every event forwarded", || async {
        let a = one.try_metric("subtocall_events_forwarded_total").await?;
        let b = two.try_metric("subtocall_events_forwarded_total").await?;
        (a + b == n as f64).then_some(())
    })
    .await;
}

#[tokio::test]
async fn in_redis_mode_status_shows_the_backlog_of_each_list() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_listed";
    let _a = Backend::spawn(BackendOptions::shared(&crossbar, "A", procedure)).await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("USE_REDIS_MQ", "1"), ("REDIS_URL", &redis.url())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.listed", WAIT)
        .await;
    Publisher::publish(&crossbar, "com.example.listed", 7).await;
    sidecar.wait_idle(7, WAIT).await;
    let s = status(&sidecar).await;
    assert_eq!(s["delivery"], "redis-list");
    let targets = s["redis_targets"].as_array().expect("redis targets");
    assert_eq!(targets.len(), 1, "{s:#}");
    let key = format!("queue:{procedure}");
    assert_eq!(targets[0]["key"], key);
    assert_eq!(targets[0]["kind"], "list");
    assert_eq!(targets[0]["backlog"], 7);
    assert_eq!(redis.llen(&key).await, 7);
    let table = stdout(&subtocall_status(&["--url", &url(&sidecar)]).await);
    let line = table
        .lines()
        .skip_while(|l| !l.starts_with("REDIS TARGETS"))
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.split_whitespace().nth(2) == Some("7"), "{table}");
}

#[tokio::test]
async fn on_the_redis_queue_without_ordering_each_instance_still_heartbeats() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let _a = Backend::spawn(BackendOptions::shared(
        &crossbar,
        "A",
        "com.example.SUB_plain",
    ))
    .await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[("SUBTOCALL_QUEUE", "redis"), ("REDIS_URL", &redis.url())],
    );
    sidecar
        .wait_subscribed(&router, "com.example.plain", WAIT)
        .await;
    Publisher::publish(&crossbar, "com.example.plain", 5).await;
    sidecar.wait_idle(5, WAIT).await;
    // Acknowledgements may wait a few milliseconds for an admission to ride
    // on (`streams::core::ACK_LINGER`).
    let s = eventually(
        WAIT,
        "this instance heartbeating, its stream acknowledged and emptied",
        || async {
            let s = status(&sidecar).await;
            let beating = s["queue"]["instances"].as_array()?.iter().any(|i| {
                i["this"] == true && i["heartbeat_seconds"].as_f64().is_some_and(|h| h < 10.0)
            });
            // Its pending count and length are read one after the other:
            // an acknowledgement can land between the two.
            let stream = &s["queue"]["streams"][0];
            let acked = stream["pending"] == 0 && stream["length"] == 0;
            (beating && acked).then_some(s)
        },
    )
    .await;
    let q = &s["queue"];
    assert_eq!(q["instances"].as_array().unwrap().len(), 1, "{q:#}");
    assert_eq!(q["instances"][0]["partitions"], serde_json::json!([]));
    assert_eq!(
        q["streams"],
        serde_json::json!([{"unit": "com.example.SUB_plain", "length": 0, "pending": 0, "oldest_seconds": null}]),
        "{q:#}"
    );
    assert_eq!(mapping(&s, "com.example.SUB_plain")["forwarded"], 5);
}

#[tokio::test]
async fn with_the_stream_target_status_shows_each_streams_backlog() {
    let crossbar = Crossbar::start().await;
    let router = RouterMeta::join(&crossbar).await;
    let redis = Redis::start().await;
    let procedure = "com.example.SUB_streamed";
    let _a = Backend::spawn(BackendOptions::shared(&crossbar, "A", procedure)).await;
    let sidecar = Sidecar::start_for(
        &crossbar,
        &[
            ("USE_REDIS_MQ", "1"),
            ("REDIS_URL", &redis.url()),
            ("SUBTOCALL_REDIS_TARGET", "stream"),
        ],
    );
    sidecar
        .wait_subscribed(&router, "com.example.streamed", WAIT)
        .await;
    Publisher::publish(&crossbar, "com.example.streamed", 9).await;
    sidecar.wait_idle(9, WAIT).await;
    // Nobody reads the stream: all nine are backlog.
    let s = status(&sidecar).await;
    assert_eq!(s["delivery"], "redis-stream");
    let t = &s["redis_targets"][0];
    assert_eq!(t["key"], format!("queue:{procedure}"), "{s:#}");
    assert_eq!(t["kind"], "stream");
    assert_eq!(t["length"], 9, "{t:#}");
    assert_eq!(t["backlog"], 9, "{t:#}");
    assert!(
        t["oldest_unacked_seconds"]
            .as_f64()
            .is_some_and(|a| a >= 0.0),
        "{t:#}"
    );
}
