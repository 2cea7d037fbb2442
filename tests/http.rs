//! The `/metrics`, `/healthz` and `/readyz` listener under abuse: idle and
//! half-sent connections, more of them than the process may open files, and
//! the address it logs. The limits themselves are tested on the listener
//! alone (`http::serve`, with short timeouts); the rest on the binary, whose
//! router does not exist: it keeps trying to reach one on a closed port, which
//! is what keeps its router link busy.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use subtocall::http::{self, Limits};
use subtocall::metrics::Metrics;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use support::free_port;
use support::sidecar::{Sidecar, http_get};

const WAIT: Duration = Duration::from_secs(30);

/// A sidecar whose router does not exist (a closed port on 127.0.0.1), so it
/// retries every few hundred milliseconds and logs why each attempt failed.
fn sidecar_without_router(extra: &[(&str, &str)]) -> Sidecar {
    let mut env = BTreeMap::new();
    env.insert(
        "WAMP_URL".to_owned(),
        format!("ws://127.0.0.1:{}/ws", free_port()),
    );
    env.insert(
        "SUBTOCALL_RECONNECT_INITIAL_BACKOFF".to_owned(),
        "50ms".to_owned(),
    );
    env.insert(
        "SUBTOCALL_RECONNECT_MAX_BACKOFF".to_owned(),
        "200ms".to_owned(),
    );
    for (name, value) in extra {
        env.insert((*name).to_owned(), (*value).to_owned());
    }
    Sidecar::start(env)
}

#[tokio::test]
async fn idle_and_half_sent_connections_cannot_starve_healthz_or_the_router_link() {
    // What the probe of issue 10 did: an open-file limit of 128, then 200
    // connections that never finish a request.
    let sidecar = sidecar_without_router(&[]);
    let failures = "subtocall_router_connect_failures_total";
    sidecar.wait_metric(failures, |n| n >= 1.0, WAIT).await;
    sidecar.limit_open_files(128);

    let mut held = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(("127.0.0.1", sidecar.http_port()))
            .await
            .expect("the kernel completes the handshake even before accept");
        if i % 2 == 1 {
            // Half a request head, as a slowloris client sends it.
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write half a request");
        }
        held.push(stream);
    }

    assert_eq!(
        sidecar.http_get("/healthz").await.map(|r| r.0),
        Some(200),
        "/healthz must answer while 200 idle connections are open"
    );
    assert_eq!(sidecar.http_get("/readyz").await.map(|r| r.0), Some(503));

    // The router link can still open a socket: the next attempts fail
    // because nothing listens, not because the process has no file left.
    let before = sidecar.metric(failures).await;
    sidecar
        .wait_metric(failures, |n| n >= before + 3.0, WAIT)
        .await;
    let log = sidecar.log();
    assert!(
        !log.contains("Too many open files"),
        "the listener used up the open-file limit:\n{log}"
    );
    drop(held);
}

#[tokio::test]
async fn with_port_0_the_log_names_the_port_actually_bound() {
    let sidecar = sidecar_without_router(&[("SUBTOCALL_HTTP_ADDR", "127.0.0.1:0")]);
    let needle = "serving /metrics, /healthz, /readyz and /status";
    // The log line is the feature under test: with port 0 nothing else
    // says where the listener is.
    sidecar
        .wait_for("the startup line naming the port", WAIT, || async {
            sidecar.log().contains(needle)
        })
        .await;
    let log = sidecar.log();
    let line = log
        .lines()
        .find(|line| line.contains(needle))
        .expect("the line waited for");
    let addr: SocketAddr = line
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("no addr=IP:PORT in {line:?}"));
    assert_ne!(addr.port(), 0, "{line}");
    let healthz = http_get(addr, "/healthz").await;
    assert_eq!(healthz.map(|r| r.0), Some(200), "{line}");
}

// ---- the listener alone, with short limits

/// `http::serve` on a free port of 127.0.0.1, stopped when dropped.
struct Listener {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Listener {
    async fn start(limits: Limits) -> Listener {
        let listener = http::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(
            listener,
            Arc::new(Metrics::new()),
            None,
            limits,
            stop.clone(),
        ));
        Listener { addr, stop }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    async fn healthz(&self) -> Option<u16> {
        http_get(self.addr, "/healthz").await.map(|r| r.0)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Reads (and discards) until the server closes the connection; how long
/// that took, or `None` if it was still open after `within`.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let until_eof = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(within, until_eof)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// Sends one keep-alive `GET /healthz` and reads its whole response.
async fn keep_alive_healthz(stream: &mut TcpStream) -> bool {
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    let read_response = async {
        // The body is "ok\n"; nothing follows it on a keep-alive connection.
        while !response.ends_with(b"\r\n\r\nok\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    tokio::time::timeout(Duration::from_secs(5), read_response)
        .await
        .unwrap_or(false)
}

#[tokio::test]
async fn idle_half_sent_and_kept_alive_connections_are_closed_after_the_request_head_timeout() {
    let head_timeout = Duration::from_millis(300);
    let listener = Listener::start(Limits {
        request_head_timeout: head_timeout,
        max_connection_age: Duration::from_secs(60),
        max_connections: 8,
    })
    .await;

    let mut idle = listener.connect().await;
    let mut half_sent = listener.connect().await;
    half_sent
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut kept_alive = listener.connect().await;
    assert!(keep_alive_healthz(&mut kept_alive).await);
    assert_eq!(listener.healthz().await, Some(200));

    for (name, stream) in [
        ("idle", &mut idle),
        ("half-sent", &mut half_sent),
        ("kept-alive", &mut kept_alive),
    ] {
        let closed_after = closed_by_server(stream, Duration::from_secs(10)).await;
        let closed_after = closed_after
            .unwrap_or_else(|| panic!("the {name} connection is still open after 10 s"));
        assert!(
            closed_after <= Duration::from_secs(5),
            "the {name} connection was closed only after {closed_after:?}"
        );
    }
}

#[tokio::test]
async fn at_the_connection_limit_the_oldest_connection_makes_room_for_a_new_one() {
    let listener = Listener::start(Limits {
        request_head_timeout: Duration::from_secs(60),
        max_connection_age: Duration::from_secs(60),
        max_connections: 4,
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(listener.connect().await);
    }
    // A probe gets through at once, although every slot is held.
    assert_eq!(listener.healthz().await, Some(200));

    // The listener holds at most 4: the 6 oldest made room for the 4 newest,
    // the 7th for the probe.
    let (oldest, newest) = idle.split_at_mut(7);
    for (n, stream) in oldest.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, Duration::from_secs(5))
                .await
                .is_some(),
            "idle connection {n} is still open"
        );
    }
    for stream in newest {
        assert!(
            keep_alive_healthz(stream).await,
            "a newest connection still works"
        );
    }
}

#[tokio::test]
async fn a_busy_connection_is_closed_after_its_maximum_age_between_two_responses() {
    let max_age = Duration::from_millis(500);
    let listener = Listener::start(Limits {
        request_head_timeout: Duration::from_secs(5),
        max_connection_age: max_age,
        max_connections: 4,
    })
    .await;
    let mut busy = listener.connect().await;
    let started = Instant::now();
    let mut answered = 0;
    while keep_alive_healthz(&mut busy).await {
        answered += 1;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still open after {answered} requests in 10 s"
        );
        // A client that asks every 20 ms never lets the head timeout fire.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= max_age && answered >= 5,
        "closed after {:?} and {answered} answers",
        started.elapsed()
    );
}
