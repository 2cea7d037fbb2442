//! The shared connection to one Redis (`streams::mux`) against a real
//! redis-server: requests pipelined from many places each get their own
//! reply, a reply that comes too late never answers a later request, and a
//! lost connection fails what waits on it and is made again.

mod support;

use std::time::Duration;

use ::redis::Value;
use futures_util::future::join_all;
use subtocall::streams::mux::Mux;
use subtocall::streams::resp::Endpoint;
use support::*;

fn mux(redis: &Redis, timeout: Duration) -> Mux {
    Mux::new(Endpoint::from_url(&redis.url()).expect("endpoint"), timeout)
}

/// Which connection `c` is, as Redis numbers them.
async fn client_id(c: &mut Mux) -> i64 {
    ::redis::cmd("CLIENT")
        .arg("ID")
        .query_async(c)
        .await
        .expect("client id")
}

/// A connection made (a PING answered), with the command timeout of 5 s.
async fn connected(redis: &Redis) -> Mux {
    let mut m = mux(redis, Duration::from_secs(5));
    let _: () = ::redis::cmd("PING")
        .query_async(&mut m)
        .await
        .expect("ping");
    m
}

/// A section of `INFO`, as text.
async fn info(redis: &Redis, section: &str) -> String {
    match redis.command(&["INFO", section]).await {
        support::resp::Reply::Bulk(Some(info)) => String::from_utf8_lossy(&info).into_owned(),
        other => panic!("INFO {section}: {other:?}"),
    }
}

async fn get(c: &mut Mux, key: &str) -> ::redis::RedisResult<String> {
    ::redis::cmd("GET").arg(key).query_async(c).await
}

#[tokio::test]
async fn requests_from_many_places_each_get_their_own_reply() {
    let redis = Redis::start().await;
    let m = mux(&redis, Duration::from_secs(5));
    let writes = join_all((0..200).map(|i| {
        let mut c = m.clone();
        async move {
            ::redis::cmd("SET")
                .arg(format!("k{i}"))
                .arg(format!("v{i}"))
                .query_async::<()>(&mut c)
                .await
        }
    }))
    .await;
    assert!(writes.iter().all(Result::is_ok), "{writes:?}");
    // Reads, pipelines of several commands and transactions at once, each
    // from a task of its own (woken on its own).
    let reads = join_all((0..200).map(|i| {
        let mut c = m.clone();
        tokio::spawn(async move {
            match i % 3 {
                0 => ::redis::cmd("GET")
                    .arg(format!("k{i}"))
                    .query_async::<String>(&mut c)
                    .await
                    .map(|v| vec![v]),
                // A pipeline, every third one a transaction.
                _ => {
                    let mut pipe = ::redis::pipe();
                    if i % 3 == 2 {
                        pipe.atomic();
                    }
                    pipe.cmd("GET")
                        .arg(format!("k{i}"))
                        .cmd("ECHO")
                        .arg(i)
                        .query_async::<(String, String)>(&mut c)
                        .await
                        .map(|(a, b)| vec![a, b])
                }
            }
        })
    }))
    .await;
    for (i, read) in reads.into_iter().enumerate() {
        let got = read
            .expect("join")
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(got[0], format!("v{i}"), "request {i}");
        if i % 3 != 0 {
            assert_eq!(got[1], i.to_string(), "request {i}");
        }
    }
}

#[tokio::test]
async fn an_error_reply_is_an_error_alone_and_a_value_in_a_pipeline() {
    let redis = Redis::start().await;
    let mut c = mux(&redis, Duration::from_secs(5));
    let sha = "0000000000000000000000000000000000000000";
    let alone = ::redis::cmd("EVALSHA")
        .arg(sha)
        .arg(0)
        .query_async::<Value>(&mut c)
        .await
        .expect_err("no such script");
    assert_eq!(alone.code(), Some("NOSCRIPT"));
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors()
        .cmd("EVALSHA")
        .arg(sha)
        .arg(0)
        .cmd("PING");
    let replies: Vec<::redis::RedisResult<Value>> =
        pipe.query_async(&mut c).await.expect("pipeline");
    assert_eq!(replies.len(), 2);
    assert_eq!(
        replies[0].as_ref().expect_err("no such script").code(),
        Some("NOSCRIPT")
    );
    assert_eq!(
        replies[1].as_ref().ok(),
        Some(&Value::SimpleString("PONG".into()))
    );
    // A transaction with a command Redis refuses to queue does not run.
    let refused = ::redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("t")
        .arg("1")
        .cmd("NOSUCHCOMMAND")
        .query_async::<Value>(&mut c)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        redis.command(&["EXISTS", "t"]).await,
        support::resp::Reply::Integer(0)
    );
}

#[tokio::test]
async fn a_request_not_answered_in_time_drops_its_connection() {
    let redis = Redis::start().await;
    let mut c = mux(&redis, Duration::from_millis(500));
    let (before, after) = one_unanswered(&redis, &mut c, None).await;
    assert_ne!(before, after, "a connection of its own after the timeout");
}

#[tokio::test]
async fn a_request_given_up_leaves_its_reply_to_nobody() {
    let redis = Redis::start().await;
    let mut c = mux(&redis, Duration::from_secs(5));
    // Its caller stops waiting long before the request's own deadline.
    let given_up = Some(Duration::from_millis(200));
    let (before, after) = one_unanswered(&redis, &mut c, given_up).await;
    assert_eq!(before, after, "the same connection");
}

/// A request (GET a) made while `redis` is frozen gets no answer: it times
/// out, or its caller gives up after `give_up`. Then, thawed, the next
/// request (GET b) gets its own answer, not the first one's. Which
/// connection asked, before and after.
async fn one_unanswered(redis: &Redis, c: &mut Mux, give_up: Option<Duration>) -> (i64, i64) {
    redis.command(&["SET", "a", "late"]).await;
    redis.command(&["SET", "b", "mine"]).await;
    let before = client_id(c).await;
    redis.signal(libc::SIGSTOP);
    match give_up {
        Some(after) => {
            let gone = tokio::time::timeout(after, get(c, "a")).await;
            assert!(gone.is_err(), "no answer from a frozen server");
        }
        None => {
            let e = get(c, "a")
                .await
                .expect_err("no answer from a frozen server");
            assert!(e.is_timeout(), "{e}");
        }
    }
    redis.signal(libc::SIGCONT);
    assert_eq!(get(c, "b").await.expect("an answer"), "mine");
    (before, client_id(c).await)
}

#[tokio::test]
async fn requests_made_in_one_turn_go_to_redis_in_few_writes() {
    let redis = Redis::start().await;
    let m = connected(&redis).await;
    let reads = || async {
        info(&redis, "stats")
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix("total_reads_processed:")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .expect("total_reads_processed")
    };
    let before = reads().await;
    // 100 requests made in one poll of `join_all`, one turn of this task.
    let answers = join_all((0..100).map(|i| {
        let mut c = m.clone();
        async move {
            ::redis::cmd("ECHO")
                .arg(i)
                .query_async::<String>(&mut c)
                .await
        }
    }))
    .await;
    assert!(answers.iter().all(Result::is_ok));
    // Each INFO is one read on its own connection.
    let reads_of_the_requests = reads().await - before - 1;
    println!("100 requests: {reads_of_the_requests} reads by redis-server");
    assert!(
        reads_of_the_requests <= 10,
        "{reads_of_the_requests} reads for 100 requests made at once"
    );
}

#[tokio::test]
async fn a_lost_connection_fails_what_waits_and_is_made_again() {
    let mut redis = Redis::start().await;
    let mut c = mux(&redis, Duration::from_secs(5));
    let _: () = ::redis::cmd("PING")
        .query_async(&mut c)
        .await
        .expect("ping");
    // Blocked on the server when it dies: an IO error, not a hang.
    let mut blocked = c.clone();
    let waiting = tokio::spawn(async move {
        ::redis::cmd("BLPOP")
            .arg("nothing")
            .arg(0)
            .query_async::<Value>(&mut blocked)
            .await
    });
    blocked_clients(&redis, 1).await;
    redis.kill().await;
    let failed = waiting.await.expect("join").expect_err("the server died");
    assert!(
        failed.is_io_error() || failed.is_connection_dropped(),
        "{failed}"
    );
    let refused = ::redis::cmd("PING").query_async::<String>(&mut c).await;
    assert!(refused.is_err(), "nobody listens: {refused:?}");
    redis.start_again().await;
    let pong = ::redis::cmd("PING").query_async::<String>(&mut c).await;
    assert_eq!(pong.expect("connected again"), "PONG");
}

#[tokio::test]
async fn a_request_answered_hands_the_reading_on_to_the_next_one_waiting() {
    let redis = Redis::start().await;
    let m = connected(&redis).await;
    let blpop = |list: &'static str| {
        let mut c = m.clone();
        async move {
            ::redis::cmd("BLPOP")
                .arg(list)
                .arg(0)
                .query_async::<(String, String)>(&mut c)
                .await
        }
    };
    // `first` is polled again after `second` (its task woken by something
    // else): the socket then wakes `first` alone when Redis writes.
    let nudge = std::sync::Arc::new(tokio::sync::Notify::new());
    let first = tokio::spawn({
        let nudge = nudge.clone();
        let request = blpop("one");
        async move { tokio::join!(request, nudge.notified()).0 }
    });
    blocked_clients(&redis, 1).await;
    let second = tokio::spawn(blpop("two"));
    tokio::task::yield_now().await;
    nudge.notify_one();
    tokio::task::yield_now().await;
    redis.command(&["LPUSH", "one", "a"]).await;
    let a = first.await.expect("join").expect("first");
    assert_eq!(a.1, "a");
    redis.command(&["LPUSH", "two", "b"]).await;
    // Not at the request's deadline (when its timer wakes it).
    let b = tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("the second request answered when its reply came")
        .expect("join")
        .expect("second");
    assert_eq!(b.1, "b");
}

async fn blocked_clients(redis: &Redis, n: usize) {
    let want = format!("blocked_clients:{n}");
    eventually(Duration::from_secs(5), &want, || async {
        info(redis, "clients").await.contains(&want).then_some(())
    })
    .await;
}
