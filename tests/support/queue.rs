//! What the Redis queue's tests share: an instance's environment, what
//! the backends received (by procedure and sequence number), and waits on
//! the queue's state in Redis and on the router.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use super::peers::{Backend, BackendOptions, Invoke, Publisher, RouterMeta};
use super::redis::Redis;
use super::resp::Reply;
use super::sidecar::{Sidecar, sidecar_env};
use super::{Crossbar, eventually};

/// How long a wait on the queue's state gets.
pub const WAIT: Duration = Duration::from_secs(30);
/// How long every published event gets to reach a backend.
pub const DELIVER: Duration = Duration::from_secs(60);
/// `SUBTOCALL_CLAIM_IDLE`: short, so that a killed instance's entries are
/// taken over within the test.
pub const CLAIM_IDLE: &str = "2s";
/// The default `SUBTOCALL_QUEUE_NAME`: the consumer group and the key namespace.
pub const GROUP: &str = "subtocall";

/// The environment of an instance of the Redis queue at `redis_url` (the
/// `backend` user on `crossbar`, a short claim idle time), plus `extra`.
pub fn queue_env(
    crossbar: &Crossbar,
    redis_url: &str,
    extra: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut env = sidecar_env(crossbar);
    env.insert("SUBTOCALL_QUEUE".into(), "redis".into());
    env.insert("REDIS_URL".into(), redis_url.into());
    env.insert("SUBTOCALL_CLAIM_IDLE".into(), CLAIM_IDLE.into());
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    env
}

/// A roundrobin backend named `name` registering `procedures`.
pub fn backend(crossbar: &Crossbar, name: &str, procedures: &[&str]) -> BackendOptions {
    BackendOptions {
        name: name.into(),
        invoke: Invoke::RoundRobin,
        ..BackendOptions::new(crossbar, procedures)
    }
}

/// `{ns:P}:stream`, the queue stream of `procedure`.
pub fn stream_key(namespace: &str, procedure: &str) -> String {
    format!("{{{namespace}:{procedure}}}:stream")
}

/// `{ns:P}:dead`, the dead-letter stream of `procedure`.
pub fn dead_key(namespace: &str, procedure: &str) -> String {
    format!("{{{namespace}:{procedure}}}:dead")
}

/// The topic of a `...SUB_name` procedure: `...name`.
pub fn topic_of(procedure: &str) -> String {
    procedure.replacen("SUB_", "", 1)
}

/// Every event as `(procedure, kwargs.seq)` with how often a backend answered
/// it normally (a rejected invocation is no delivery).
pub type Deliveries = BTreeMap<(String, u64), usize>;

pub fn deliveries(backends: &[&Backend]) -> Deliveries {
    let mut counts = Deliveries::new();
    for backend in backends {
        for invocation in backend.invocations() {
            if invocation.get("errored").is_none() {
                let procedure = invocation["procedure"].as_str().expect("procedure");
                let seq = invocation["kwargs"]["seq"].as_u64().expect("kwargs.seq");
                *counts.entry((procedure.to_owned(), seq)).or_default() += 1;
            }
        }
    }
    counts
}

/// Deliveries beyond the first of each event.
pub fn duplicates(deliveries: &Deliveries) -> usize {
    deliveries.values().sum::<usize>() - deliveries.len()
}

/// `(procedure, seq)` for `seq` in `0..count` of each procedure: what the
/// publishers send.
pub fn published(procedures: &[&str], count: u64) -> BTreeSet<(String, u64)> {
    procedures
        .iter()
        .flat_map(|p| (0..count).map(move |seq| ((*p).to_owned(), seq)))
        .collect()
}

/// Waits until `n` distinct events reached the backends.
pub async fn wait_delivered(backends: &[&Backend], n: usize) {
    eventually(
        DELIVER,
        &format!("{n} distinct events delivered"),
        || async { (deliveries(backends).len() >= n).then_some(()) },
    )
    .await;
}

/// Waits until every event in `expected` reached a backend.
pub async fn all_delivered(backends: &[&Backend], expected: &BTreeSet<(String, u64)>) {
    eventually(
        DELIVER,
        &format!("all {} events delivered", expected.len()),
        || async {
            let delivered = deliveries(backends);
            expected
                .iter()
                .all(|event| delivered.contains_key(event))
                .then_some(())
        },
    )
    .await;
}

/// Waits until the stream at `key` on `node` holds nothing: every entry
/// delivered, acknowledged and deleted, none pending in the group. From then
/// on no instance delivers one of its events again, so what the backends
/// have seen after a `sync` is final.
pub async fn wait_drained(node: &Redis, key: &str) {
    wait_drained_in(node, key, GROUP).await
}

/// [`wait_drained`] for the queue (and consumer group) named `group`.
pub async fn wait_drained_in(node: &Redis, key: &str, group: &str) {
    eventually(
        WAIT,
        &format!("{key} empty, nothing pending in group {group}"),
        || async {
            let length = node.command(&["XLEN", key]).await.integer();
            // [count, smallest id, greatest id, [[consumer, count], ...]]
            let pending = match node.command(&["XPENDING", key, group]).await {
                Reply::Array(Some(summary)) => summary[0].integer(),
                // NOGROUP: no instance has created its group yet.
                Reply::Error(_) => return None,
                other => panic!("XPENDING {key} {group}: {other:?}"),
            };
            (length == 0 && pending == 0).then_some(())
        },
    )
    .await;
}

/// Waits until the router shows exactly `n` subscribers on `topic`; panics
/// with `sidecar`'s log if it exits first.
pub async fn wait_subscribers(sidecar: &Sidecar, router: &RouterMeta, topic: &str, n: usize) {
    let what = format!("the router to show {n} subscriber(s) on {topic}");
    sidecar
        .wait_for(&what, WAIT, || async move {
            router.subscribers(topic).await.len() == n
        })
        .await;
}

/// [`wait_subscribers`] for each of `topics`.
pub async fn wait_subscribers_all(
    sidecar: &Sidecar,
    router: &RouterMeta,
    topics: &[String],
    n: usize,
) {
    for topic in topics {
        wait_subscribers(sidecar, router, topic, n).await;
    }
}

/// Whether a publisher has printed its final line (published everything).
pub fn is_done(publisher: &Publisher) -> bool {
    !publisher
        .lines_matching(|line| line["done"] == json!(true))
        .is_empty()
}

/// Runs `subtocall dead-letters <args>` against `redis` and queue `namespace`,
/// checks that it exits 0, and returns its stdout.
pub async fn dead_letters(redis: &Redis, namespace: &str, args: &[&str]) -> String {
    let env = [("SUBTOCALL_QUEUE_NAME", namespace)];
    succeeded(
        "dead-letters",
        args,
        queue_tool(&redis.url(), "dead-letters", args, &env).await,
    )
}

/// Runs `subtocall <command> <args>` against the Redis at `url`, with only
/// `env` set beside it (and PATH), and returns how it ended.
pub async fn queue_tool(
    url: &str,
    command: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_subtocall"));
    run.arg(command)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("REDIS_URL", url)
        .kill_on_drop(true);
    for (k, v) in env {
        run.env(k, v);
    }
    tokio::time::timeout(WAIT, run.output())
        .await
        .unwrap_or_else(|_| panic!("subtocall {command} {args:?} took over {WAIT:?}"))
        .unwrap_or_else(|e| panic!("run subtocall {command}: {e}"))
}

/// The stdout of a tool's run, which must have exited 0.
pub fn succeeded(command: &str, args: &[&str], output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "subtocall {command} {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `dead-letters list` output: one JSON object per line.
pub fn parse_list(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a list line that is not JSON ({e}): {line:?}"))
        })
        .collect()
}

/// Runs `subtocall groups <args>` against `redis` (queue `subtocall`, the
/// Redis queue), checks that it exits 0, and returns its stdout.
pub async fn subtocall_groups(redis: &Redis, args: &[&str]) -> String {
    succeeded("groups", args, subtocall_groups_output(redis, args).await)
}

/// Runs `subtocall groups <args>` against `redis` and returns how it ended.
pub async fn subtocall_groups_output(redis: &Redis, args: &[&str]) -> std::process::Output {
    queue_tool(
        &redis.url(),
        "groups",
        args,
        &[("SUBTOCALL_QUEUE", "redis")],
    )
    .await
}
