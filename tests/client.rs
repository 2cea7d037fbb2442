//! Our WAMP client against the real Crossbar 26.10.1, with autobahn-python
//! peers on the other side: joins (plain and salted WAMP-CRA, anonymous, TLS),
//! typed join errors, events and calls with binary payloads across
//! serializers, the registration meta API, timeouts and connection loss.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use subtocall::discovery::meta::{self, MetaEvent};
use subtocall::wamp::auth::Credentials;
use subtocall::wamp::{
    Client, ClientConfig, CloseReason, ConnectError, Dict, Incoming, IncomingRx, Payload,
    RequestError, Serializer as Ser, Value,
};
use support::crossbar::{BACKEND_USER, SALTED_USER};
use support::peers::{Connection, Invoke, publisher_blob};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn config(crossbar: &Crossbar, serializer: Ser, credentials: Credentials) -> ClientConfig {
    let mut c = ClientConfig::new(crossbar.url(), crossbar.realm());
    c.serializers = vec![serializer];
    c.credentials = credentials;
    c.ca_file = crossbar.ca_file_opt().map(|p| p.to_owned());
    c
}

fn cra((authid, secret): (&str, &str)) -> Credentials {
    Credentials::WampCra {
        authid: authid.into(),
        secret: secret.into(),
    }
}

async fn join(
    crossbar: &Crossbar,
    serializer: Ser,
    credentials: Credentials,
) -> (Client, IncomingRx) {
    Client::connect(config(crossbar, serializer, credentials))
        .await
        .expect("join")
}

/// A JSON line printed by an autobahn peer, read with WAMP's JSON convention
/// (so `"\u0000..."` strings are bytes), as our client would see it.
fn wamp_value(json: &serde_json::Value) -> Value {
    Ser::Json
        .decode_value(&serde_json::to_vec(json).unwrap())
        .unwrap()
}

fn peer_serializer(s: Ser) -> Serializer {
    match s {
        Ser::Json => Serializer::Json,
        Ser::MsgPack => Serializer::Msgpack,
    }
}

fn other(s: Ser) -> Ser {
    match s {
        Ser::Json => Ser::MsgPack,
        Ser::MsgPack => Ser::Json,
    }
}

async fn next_event(incoming: &mut IncomingRx) -> subtocall::wamp::Event {
    loop {
        match tokio::time::timeout(WAIT, incoming.recv()).await {
            Ok(Some(Incoming::Event(e))) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("session ended while waiting for an event"),
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn joins_with_plain_cra_salted_cra_and_anonymous_over_both_serializers() {
    let crossbar = Crossbar::start().await;
    for serializer in [Ser::Json, Ser::MsgPack] {
        for (credentials, authid, role, method) in [
            (cra(BACKEND_USER), Some("backend"), "backend", "wampcra"),
            (cra(SALTED_USER), Some("salted"), "backend", "wampcra"),
            (Credentials::Anonymous, None, "public", "anonymous"),
        ] {
            let (client, _incoming) = join(&crossbar, serializer, credentials).await;
            let info = client.session();
            assert_eq!(client.serializer(), serializer);
            assert_eq!(info.realm, "realm1");
            assert_eq!(info.authrole.as_deref(), Some(role));
            assert_eq!(info.authmethod.as_deref(), Some(method));
            if let Some(authid) = authid {
                assert_eq!(info.authid.as_deref(), Some(authid));
            }
            assert!(
                info.details.get_str("x_cb_node").is_some(),
                "Crossbar's extra WELCOME keys are kept"
            );
            assert_eq!(
                client.leave(WAIT).await,
                CloseReason::Goodbye("wamp.close.normal".into())
            );
        }
    }
}

/// Collects everything tracing writes while it is the default subscriber.
#[derive(Clone, Default)]
struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn wrong_secret_and_unknown_user_are_terminal_errors_that_never_show_the_secret() {
    let crossbar = Crossbar::start().await;
    let capture = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let capture = capture.clone();
            move || capture.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    const SECRET: &str = "not-the-secret-7f3a9c";

    for serializer in [Ser::Json, Ser::MsgPack] {
        let wrong = Client::connect(config(&crossbar, serializer, cra(("backend", SECRET))))
            .await
            .expect_err("wrong secret must not join");
        assert!(wrong.is_terminal(), "{wrong}");
        let ConnectError::Join(ref e) = wrong else {
            panic!("expected a join error, got {wrong:?}")
        };
        assert_eq!(
            e.to_string(),
            "router aborted the session: wamp.error.not_authorized (WAMP-CRA client signature is invalid)"
        );

        let unknown = Client::connect(config(&crossbar, serializer, cra(("nobody", SECRET))))
            .await
            .expect_err("unknown user must not join");
        assert!(unknown.is_terminal());
        assert!(
            unknown
                .to_string()
                .contains("no principal with authid \"nobody\" exists"),
            "{unknown}"
        );
        for shown in [
            format!("{wrong} {wrong:?}"),
            format!("{unknown} {unknown:?}"),
        ] {
            assert!(!shown.contains(SECRET), "secret in error: {shown}");
        }
        let cfg = format!(
            "{:?}",
            config(&crossbar, serializer, cra(("backend", SECRET)))
        );
        assert!(!cfg.contains(SECRET), "secret in config Debug: {cfg}");
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.contains(SECRET), "secret in logs:\n{logs}");
}

async fn autobahn_events_arrive_intact(ours: Ser) {
    let crossbar = Crossbar::start().await;
    let (client, mut incoming) = join(&crossbar, ours, Credentials::Anonymous).await;
    let topic = "com.example.intact";
    let subscription = client.subscribe(topic, Dict::new()).await.unwrap();
    // The publisher speaks the other serializer: the router converts, and
    // bytes must survive the trip (msgpack bin <-> JSON "\u0000"+base64).
    let output = Publisher::run(PublisherOptions {
        connection: Connection {
            serializer: peer_serializer(other(ours)),
            ..Connection::to(&crossbar)
        },
        with_bytes: true,
        ..PublisherOptions::new(&crossbar, topic, 3)
    })
    .await;
    output.assert_success();
    let publications = output.lines_with("publication");
    for i in 0..3u32 {
        let event = next_event(&mut incoming).await;
        assert_eq!(event.subscription, subscription);
        assert_eq!(
            Some(event.publication.0),
            publications[i as usize]["publication"].as_u64()
        );
        let blob = Value::Bytes(publisher_blob(i));
        assert_eq!(
            event.payload.args,
            vec![
                Value::UInt(i.into()),
                "hello".into(),
                Value::Dict(Dict::new().with(
                    "nested",
                    vec![
                        Value::UInt(1),
                        Value::Float(2.5),
                        Value::Null,
                        Value::Bool(true)
                    ]
                )),
                blob.clone(),
            ]
        );
        assert_eq!(event.payload.kwargs.get("blob"), Some(&blob));
        assert_eq!(event.payload.kwargs.get_u64("seq"), Some(i.into()));
        assert_eq!(event.payload.kwargs.get_str("key"), Some("value"));
    }
}

#[tokio::test]
async fn events_from_an_autobahn_json_publisher_arrive_intact_over_msgpack() {
    autobahn_events_arrive_intact(Ser::MsgPack).await;
}

#[tokio::test]
async fn events_from_an_autobahn_msgpack_publisher_arrive_intact_over_json() {
    autobahn_events_arrive_intact(Ser::Json).await;
}

#[tokio::test]
async fn calls_reach_an_autobahn_backend_and_return_its_result_with_bytes_intact() {
    let crossbar = Crossbar::start().await;
    for (ours, theirs) in [(Ser::MsgPack, Ser::Json), (Ser::Json, Ser::MsgPack)] {
        let procedure = format!(
            "com.example.echo_{}",
            theirs.subprotocol().replace('.', "_")
        );
        let backend = Backend::spawn(BackendOptions {
            connection: Connection {
                serializer: peer_serializer(theirs),
                ..BackendOptions::new(&crossbar, &[]).connection
            },
            name: "echo".into(),
            ..BackendOptions::new(&crossbar, &[procedure.as_str()])
        })
        .await;
        let (client, _incoming) = join(&crossbar, ours, cra(BACKEND_USER)).await;
        let blob = Value::Bytes(vec![0, 1, 2, 0xff, 0xfe]);
        let result = client
            .call(
                &procedure,
                Payload::new(vec![blob.clone()], Dict::new().with("k", blob.clone())),
                Dict::new(),
                None,
            )
            .await
            .unwrap();
        // backend.py answers [name, args[0]].
        assert_eq!(result.payload.args, vec!["echo".into(), blob.clone()]);
        let seen = backend.wait_for_invocations(1, WAIT).await;
        assert_eq!(
            wamp_value(&seen[0]["kwargs"]),
            Value::Dict(Dict::new().with("k", blob))
        );
        assert_eq!(
            seen[0]["caller_authid"], "backend",
            "caller disclosed to the callee"
        );

        let missing = client
            .call(
                "com.example.nobody_home",
                Payload::default(),
                Dict::new(),
                None,
            )
            .await
            .unwrap_err();
        let RequestError::Wamp(e) = missing else {
            panic!("{missing:?}")
        };
        assert_eq!(e.error, "wamp.error.no_such_procedure");
    }
}

#[tokio::test]
async fn our_registration_serves_an_autobahn_caller() {
    let crossbar = Crossbar::start().await;
    let (client, mut incoming) = join(&crossbar, Ser::MsgPack, cra(BACKEND_USER)).await;
    let procedure = "com.example.ours";
    client
        .register(procedure, Dict::new().with("invoke", "roundrobin"))
        .await
        .unwrap();
    let serve = tokio::spawn(async move {
        for _ in 0..3 {
            match tokio::time::timeout(WAIT, incoming.recv()).await {
                Ok(Some(Incoming::Invocation(inv))) => {
                    let reply = Payload::new(
                        vec!["ours".into(), inv.payload.args[0].clone()],
                        Dict::new(),
                    );
                    client.yield_result(inv.request, reply).await.unwrap();
                }
                other => panic!("expected an invocation, got {other:?}"),
            }
        }
    });
    let output = Caller::run(CallerOptions::new(&crossbar, procedure, 3)).await;
    output.assert_success();
    serve.await.unwrap();
    let answers: Vec<_> = output
        .lines_with("args")
        .into_iter()
        .map(|line| line["args"].clone())
        .collect();
    assert_eq!(
        answers,
        (0..3)
            .map(|i| serde_json::json!(["ours", i]))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn registration_meta_api_decodes_as_in_the_reference_captures() {
    let crossbar = Crossbar::start().await;
    let (client, mut incoming) = join(&crossbar, Ser::Json, cra(BACKEND_USER)).await;
    let mut topics = std::collections::HashMap::new();
    for topic in meta::META_TOPICS {
        topics.insert(client.subscribe(topic, Dict::new()).await.unwrap(), topic);
    }
    let procedure = "com.example.SUB_meta";
    let mut backend = Backend::spawn(BackendOptions {
        invoke: Invoke::RoundRobin,
        ..BackendOptions::new(&crossbar, &[procedure])
    })
    .await;
    let registration = backend.registration_id(procedure);
    let session = backend.session_id();

    let mut next_meta = async || {
        let event = next_event(&mut incoming).await;
        let topic = topics[&event.subscription];
        meta::parse_meta_event(topic, &event.payload.args).expect("meta event decodes")
    };
    let MetaEvent::Created { session: s, info } = next_meta().await else {
        panic!("on_create first")
    };
    assert_eq!(s.map(|s| s.0), Some(session));
    assert_eq!(info.id.0, registration);
    assert_eq!(info.uri, procedure);
    assert_eq!(info.invoke, "roundrobin");
    assert!(
        matches!(next_meta().await, MetaEvent::Registered { registration: r, .. } if r.0 == registration)
    );

    let listed = client
        .call(meta::LIST, Payload::default(), Dict::new(), None)
        .await
        .unwrap();
    let list = meta::parse_list_result(&listed.payload.args).unwrap();
    assert!(list.ids().any(|id| id.0 == registration), "{list:?}");
    let got = client
        .call(
            meta::GET,
            Payload::new(vec![Value::UInt(registration)], Dict::new()),
            Dict::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        meta::parse_get_result(&got.payload.args).unwrap().uri,
        procedure
    );

    // The callee's session ends: the meta events carry a null session id (P9).
    backend.quit().await;
    let MetaEvent::Unregistered {
        session,
        registration: r,
    } = next_meta().await
    else {
        panic!("on_unregister")
    };
    assert_eq!((session, r.0), (None, registration));
    let MetaEvent::Deleted {
        session,
        registration: r,
    } = next_meta().await
    else {
        panic!("on_delete")
    };
    assert_eq!((session, r.0), (None, registration));

    let gone = client
        .call(
            meta::GET,
            Payload::new(vec![Value::UInt(registration)], Dict::new()),
            Dict::new(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(gone, RequestError::Wamp(e) if e.error == meta::NO_SUCH_REGISTRATION));
}

#[tokio::test]
async fn call_timeout_resolves_the_call_and_leaves_the_session_usable() {
    let crossbar = Crossbar::start().await;
    let _slow = Backend::spawn(BackendOptions {
        delay_ms: 10_000,
        ..BackendOptions::new(&crossbar, &["com.example.slow"])
    })
    .await;
    let _fast = Backend::spawn(BackendOptions::new(&crossbar, &["com.example.fast"])).await;
    let (client, _incoming) = join(&crossbar, Ser::MsgPack, cra(BACKEND_USER)).await;
    let started = std::time::Instant::now();
    let err = client
        .call(
            "com.example.slow",
            Payload::default(),
            Dict::new(),
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(err, RequestError::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let ok = client
        .call(
            "com.example.fast",
            Payload::new(vec![1u64.into()], Dict::new()),
            Dict::new(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ok.payload.args[1], Value::UInt(1));
}

#[tokio::test]
async fn pending_calls_fail_with_connection_lost_when_the_router_goes_away() {
    let mut crossbar = Crossbar::start().await;
    let _slow = Backend::spawn(BackendOptions {
        delay_ms: 30_000,
        ..BackendOptions::new(&crossbar, &["com.example.slow"])
    })
    .await;
    let (client, mut incoming) = join(&crossbar, Ser::MsgPack, cra(BACKEND_USER)).await;
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call(
                    "com.example.slow",
                    Payload::default(),
                    Dict::new(),
                    Some(Duration::from_secs(60)),
                )
                .await
        })
    };
    // Let the CALL reach the router before it goes.
    eventually(WAIT, "the slow backend is invoked", || async {
        (!_slow.invocations().is_empty()).then_some(())
    })
    .await;
    crossbar.stop().await;
    let result = tokio::time::timeout(WAIT, pending)
        .await
        .expect("resolved")
        .unwrap();
    assert_eq!(result, Err(RequestError::ConnectionLost));
    assert!(
        tokio::time::timeout(WAIT, incoming.recv())
            .await
            .unwrap()
            .is_none(),
        "incoming closes"
    );
    let reason = client.closed().await;
    assert!(
        matches!(
            reason,
            CloseReason::Goodbye(_) | CloseReason::ConnectionLost(_)
        ),
        "{reason:?}"
    );
    let after = client
        .call("com.example.slow", Payload::default(), Dict::new(), None)
        .await;
    assert_eq!(
        after,
        Err(RequestError::ConnectionLost),
        "a closed client fails fast"
    );
}

#[tokio::test]
async fn wss_join_works_with_the_extra_ca_file_and_fails_without_it() {
    let crossbar = Crossbar::start_with(CrossbarOptions {
        tls: true,
        ..CrossbarOptions::default()
    })
    .await;
    assert!(crossbar.url().starts_with("wss://"));
    let (client, _incoming) = join(&crossbar, Ser::MsgPack, cra(BACKEND_USER)).await;
    assert_eq!(client.session().authrole.as_deref(), Some("backend"));
    client.leave(WAIT).await;

    let mut untrusted = config(&crossbar, Ser::MsgPack, cra(BACKEND_USER));
    untrusted.ca_file = None;
    let err = Client::connect(untrusted).await.unwrap_err();
    assert!(matches!(err, ConnectError::Transport { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// A call still unwritten when the time it had to be written by has passed
/// (a paused process: the Redis queue's lease of its entries may have
/// passed to another instance meanwhile) is never written: it fails with
/// `Fenced`, the backend never sees it, and the calls around it go out.
#[tokio::test]
async fn a_call_past_the_time_it_had_to_be_written_by_is_not_written() {
    use subtocall::wamp::connection::Connection as Conn;
    use subtocall::wamp::session::{Output, Success};

    let crossbar = Crossbar::start().await;
    let backend = Backend::spawn(BackendOptions::new(&crossbar, &["com.example.fenced"])).await;
    let mut conn: Conn<u32> = Conn::connect(&config(&crossbar, Ser::MsgPack, cra(BACKEND_USER)))
        .await
        .expect("join");
    let call = |conn: &mut Conn<u32>, n: u64| {
        let payload = Payload::new(vec![n.into()], Dict::new());
        conn.session()
            .call("com.example.fenced", Dict::new(), payload, n as u32, None);
    };
    let now = std::time::Instant::now();
    call(&mut conn, 1);
    // Decided in time, written too late: as after a pause.
    call(&mut conn, 2);
    conn.session().send_last_by(now);
    call(&mut conn, 3);
    conn.session().send_last_by(now + Duration::from_secs(60));
    while conn.poll_output().is_some() {}
    conn.flush().await;
    assert!(conn.has_output(), "the fenced call is answered at once");

    let mut replies = std::collections::BTreeMap::new();
    let started = std::time::Instant::now();
    while replies.len() < 3 {
        assert!(started.elapsed() < WAIT, "replies so far: {replies:?}");
        while let Some(output) = conn.poll_output() {
            if let Output::Reply { token, reply } = output {
                let args = reply.map(|s| match s {
                    Success::Result { payload, .. } => payload.args,
                    other => panic!("{other:?}"),
                });
                replies.insert(token, args);
            }
        }
        conn.flush().await;
        if replies.len() < 3 {
            tokio::time::timeout(WAIT, conn.wait())
                .await
                .expect("a reply");
        }
    }
    assert_eq!(replies[&2], Err(RequestError::Fenced));
    assert_eq!(replies[&1].as_ref().unwrap()[1], Value::UInt(1));
    assert_eq!(replies[&3].as_ref().unwrap()[1], Value::UInt(3));
    let seen = backend.wait_for_invocations(2, WAIT).await;
    let args: Vec<_> = seen.iter().map(|i| i["args"][0].clone()).collect();
    assert_eq!(args, [1, 3], "the fenced call never reached the backend");
}
