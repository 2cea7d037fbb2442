//! The Redis queue's IO half (`streams::carrier`) and its Lua scripts
//! against a real redis-server: what each command does to the streams, the
//! pending lists and the leases, and, above all, what it refuses to do
//! (take back an entry another consumer holds, dead-letter one twice or
//! under another consumer, give up someone else's lease). Also on a
//! three-master Redis Cluster, where the scripts that concern many streams
//! run once per node.

mod support;

use std::sync::Arc;
use std::time::Duration;

use subtocall::streams::carrier::{Carrier, Fields, holder_consumer};
use subtocall::streams::core::{Command, CommandId, EntryId, Failure, Kept, Key, Reply, Unit};
use subtocall::streams::{Keys, Target};
use support::redis::RedisCluster;
use support::resp::Reply as R;
use support::*;

const GROUP: &str = "q";
const CLAIM_IDLE: Duration = Duration::from_secs(2);

fn carrier(url: &str, cluster: bool, consumer: &str) -> Carrier {
    let target = Target::new(url, cluster).expect("target");
    let shared = target.shared().expect("shared");
    Carrier::new(
        target,
        shared,
        Arc::new(Keys::new(GROUP)),
        consumer,
        Duration::from_secs(300),
        CLAIM_IDLE,
    )
}

async fn run(c: &Carrier, command: Command) -> Reply<Fields> {
    c.start(CommandId(1), command).await.1
}

fn unit(procedure: &str, partition: Option<u16>) -> Unit {
    Unit {
        procedure: Arc::from(procedure),
        partition,
    }
}

fn stream(u: &Unit) -> String {
    Keys::new(GROUP).stream_of(u)
}

async fn add(redis: &Redis, u: &Unit, body: &str) -> EntryId {
    let id = redis.command(&["XADD", &stream(u), "*", "e", body]).await;
    EntryId::parse(&id.text().expect("an id")).expect("an entry id")
}

async fn create(c: &Carrier, units: &[Unit]) {
    let r = run(
        c,
        Command::CreateGroups {
            units: units.to_vec(),
        },
    )
    .await;
    assert_eq!(r, Reply::Done);
}

async fn read(c: &Carrier, units: &[Unit], count: usize) -> Vec<(Unit, Vec<(EntryId, String)>)> {
    match run(
        c,
        Command::Read {
            units: units.to_vec(),
            count,
        },
    )
    .await
    {
        Reply::Read(per) => per
            .into_iter()
            .map(|(u, got)| {
                let got = got
                    .into_iter()
                    .map(|g| (g.id, body(g.body.as_ref())))
                    .collect();
                (u, got)
            })
            .collect(),
        other => panic!("read: {other:?}"),
    }
}

fn body(fields: Option<&Fields>) -> String {
    fields
        .and_then(|f| f.first())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

async fn take(
    c: &Carrier,
    u: &Unit,
    cursor: EntryId,
    min_idle: Option<Duration>,
    count_own: bool,
) -> (EntryId, Vec<(EntryId, u32, String)>) {
    match run(
        c,
        Command::Take {
            unit: u.clone(),
            cursor,
            count: 10,
            min_idle,
            count_own,
        },
    )
    .await
    {
        Reply::Taken { next, got } => (
            next,
            got.into_iter()
                .map(|g| (g.id, g.deliveries, body(g.body.as_ref())))
                .collect(),
        ),
        other => panic!("take: {other:?}"),
    }
}

/// `XPENDING stream group - + 100` as (id, consumer, deliveries).
async fn pending(redis: &Redis, u: &Unit) -> Vec<(String, String, i64)> {
    match redis
        .command(&["XPENDING", &stream(u), GROUP, "-", "+", "100"])
        .await
    {
        R::Array(Some(rows)) => rows
            .iter()
            .map(|r| match r {
                R::Array(Some(f)) => (
                    f[0].text().unwrap_or_default(),
                    f[1].text().unwrap_or_default(),
                    f[3].integer(),
                ),
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("XPENDING: {other:?}"),
    }
}

#[tokio::test]
async fn reads_span_streams_and_takes_claim_only_what_another_left_idle() {
    let redis = Redis::start().await;
    let a = carrier(&redis.url(), false, "a");
    let b = carrier(&redis.url(), false, "b");
    let plain = unit("p.SUB_x", None);
    let part = unit("p.SUB_x", Some(3));
    create(&a, &[plain.clone(), part.clone()]).await;
    let e1 = add(&redis, &plain, "one").await;
    let e2 = add(&redis, &plain, "two").await;
    let e3 = add(&redis, &part, "three").await;

    // One read over both streams, at most one entry of each.
    let got = read(&a, &[plain.clone(), part.clone()], 1).await;
    assert_eq!(
        got,
        vec![
            (plain.clone(), vec![(e1, "one".to_owned())]),
            (part.clone(), vec![(e3, "three".to_owned())]),
        ]
    );
    let got = read(&b, std::slice::from_ref(&plain), 5).await;
    assert_eq!(got, vec![(plain.clone(), vec![(e2, "two".to_owned())])]);

    // b's own entry: taken without counting, or counted after a restart.
    let (_, own) = take(&b, &plain, EntryId::ZERO, None, false).await;
    assert_eq!(own, vec![(e2, 1, "two".to_owned())]);
    let (_, own) = take(&b, &plain, EntryId::ZERO, None, true).await;
    assert_eq!(
        own,
        vec![(e2, 2, "two".to_owned())],
        "counted as delivered again"
    );

    // a's entry is not b's to take while it is not idle long enough ...
    let (next, none) = take(&b, &plain, EntryId::ZERO, Some(CLAIM_IDLE), false).await;
    assert_eq!(
        none,
        vec![(e2, 2, "two".to_owned())],
        "only b's own entry: a's is too fresh"
    );
    assert_eq!(next, e2, "it stops after an entry handed out before");
    // ... and is, with no idle time required (a partition's new holder).
    let (_, claimed) = take(&b, &part, EntryId::ZERO, Some(Duration::ZERO), false).await;
    assert_eq!(claimed, vec![(e3, 2, "three".to_owned())]);
    assert_eq!(
        pending(&redis, &part).await,
        vec![(e3.to_string(), "b".to_owned(), 2)]
    );

    // An entry deleted while pending is acknowledged away, never handed out.
    redis
        .command(&["XDEL", &stream(&plain), &e1.to_string()])
        .await;
    let (next, got) = take(&a, &plain, EntryId::ZERO, None, false).await;
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(next, EntryId::ZERO, "at the end");
    assert_eq!(
        pending(&redis, &plain).await,
        vec![(e2.to_string(), "b".to_owned(), 2)]
    );
}

/// On one Redis a lease is its holder's for as long as the holder
/// heartbeats: one heartbeat keeps any number of leases (no command per
/// lease), a silent holder's leases are taken once it has been silent for
/// the lease time, and the silent holder then finds them gone. A lease under
/// one's own name (an earlier incarnation's) is taken back only when the
/// core says so.
#[tokio::test]
async fn on_one_redis_a_lease_lasts_while_its_holder_heartbeats_and_no_longer() {
    let redis = Redis::start().await;
    let a = carrier(&redis.url(), false, "a");
    let b = carrier(&redis.url(), false, "b");
    const PARTS: u16 = 200;
    let parts: Vec<Unit> = (0..PARTS).map(|k| unit("p.SUB_l", Some(k))).collect();
    create(&a, &parts).await;
    let ttl = Duration::from_millis(400);
    // Takes up to `want` of the partitions it does not hold, as the core
    // asks.
    let keepalive = |renew: Vec<Unit>, want: usize| Command::Keepalive {
        settle: vec![],
        take: match want {
            0 => vec![],
            _ => vec![(
                Arc::from("p.SUB_l"),
                (0..PARTS)
                    .filter(|k| !renew.iter().any(|u| u.partition == Some(*k)))
                    .collect(),
                want,
            )],
        },
        renew,
        refresh: vec![],
        ttl,
    };
    let kept = |r: Reply<Fields>| match r {
        Reply::Kept(k) => k,
        other => panic!("keepalive: {other:?}"),
    };
    let held: Vec<Unit> = kept(run(&a, keepalive(vec![], 150)).await)
        .taken
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(held.len(), 150);
    let lease = |k: u16| Keys::new(GROUP).lease("p.SUB_l", k);
    assert_eq!(
        redis.command(&["PTTL", &lease(0)]).await.integer(),
        -1,
        "a lease on one Redis does not expire by itself"
    );
    // b takes only what nobody holds.
    let taken_b: Vec<Unit> = kept(run(&b, keepalive(vec![], 200)).await)
        .taken
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(taken_b.len(), 50, "{taken_b:?}");

    // a renews its 150 leases with a heartbeat, not a command per lease.
    let commands = || async {
        let info = redis
            .command(&["INFO", "stats"])
            .await
            .text()
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse::<i64>().ok())
            .expect("total_commands_processed")
    };
    let before = commands().await;
    let renewed = kept(run(&a, keepalive(held.clone(), 0)).await).renewed;
    let spent = commands().await - before - 1;
    assert!(renewed.iter().all(|(_, ours)| *ours) && renewed.len() == 150);
    assert!(spent < 20, "{spent} commands to renew 150 leases");

    // a goes silent; b, heartbeating, takes a's leases once a has been
    // silent for the lease time, and not before.
    let started = std::time::Instant::now();
    let taken = eventually(Duration::from_secs(5), "a's leases taken", || async {
        let taken = kept(run(&b, keepalive(taken_b.clone(), 100)).await).taken;
        (!taken.is_empty()).then_some(taken)
    })
    .await;
    assert!(
        started.elapsed() >= ttl - Duration::from_millis(50),
        "taken after {:?}, before a was silent for the lease time",
        started.elapsed()
    );
    let b_silent = std::time::Instant::now();
    assert_eq!(taken.len(), 100);
    // a finds out: its heartbeat had lapsed, so each lease is looked at.
    let renewed = kept(run(&a, keepalive(held.clone(), 0)).await).renewed;
    let still: Vec<Unit> = renewed
        .into_iter()
        .filter(|(_, ours)| *ours)
        .map(|(u, _)| u)
        .collect();
    assert_eq!(still.len(), 50, "the 50 b did not take are still a's");

    // b restarted under its own name is a new holder: the leases of b's
    // earlier incarnation (whose last calls may still run) lapse as
    // anybody's do, and are not taken back at once.
    let b2 = carrier(&redis.url(), false, "b");
    let back = eventually(Duration::from_secs(5), "b's leases taken", || async {
        // a stays live.
        kept(run(&a, keepalive(still.clone(), 0)).await);
        let back = kept(run(&b2, keepalive(vec![], 200)).await).taken;
        (!back.is_empty()).then_some(back)
    })
    .await;
    assert!(
        b_silent.elapsed() >= ttl - Duration::from_millis(50),
        "taken {:?} after b's last heartbeat",
        b_silent.elapsed()
    );
    assert_eq!(back.len(), 150, "b's 150, none of a's 50");

    // Settling (a lease this holder may hold without knowing it): given up
    // if it is this holder's, left alone if it is another's.
    let (mine, theirs) = (still[0].clone(), back[0].0.clone());
    kept(
        run(
            &a,
            Command::Keepalive {
                settle: vec![mine.clone(), theirs.clone()],
                renew: vec![],
                take: vec![],
                refresh: vec![],
                ttl,
            },
        )
        .await,
    );
    let get = |u: &Unit| {
        let key = Keys::new(GROUP).lease_of(u).expect("a partition");
        let redis = &redis;
        async move { redis.command(&["GET", &key]).await.text() }
    };
    assert_eq!(get(&mine).await, None, "a's own, given up");
    assert_eq!(
        get(&theirs).await.as_deref(),
        Some(b2.holder()),
        "b2's, left alone"
    );
}

#[tokio::test]
async fn keepalive_refreshes_only_what_is_still_ours_and_leases_are_never_taken_from_their_holder()
{
    let redis = Redis::start().await;
    let a = carrier(&redis.url(), false, "a");
    let b = carrier(&redis.url(), false, "b");
    let plain = unit("p.SUB_k", None);
    let parts: Vec<Unit> = (0..4).map(|k| unit("p.SUB_k", Some(k))).collect();
    create(&a, std::slice::from_ref(&plain)).await;
    create(&a, &parts).await;
    // Partition 1 has an entry a previous holder read and never finished.
    add(&redis, &parts[1], "left").await;
    read(&b, &parts[1..2], 1).await;
    let e1 = add(&redis, &plain, "one").await;
    let e2 = add(&redis, &plain, "two").await;
    read(&a, std::slice::from_ref(&plain), 10).await;
    // b takes e2 over (as after a's pause).
    redis
        .command(&["XCLAIM", &stream(&plain), GROUP, "b", "0", &e2.to_string()])
        .await;

    let keepalive = |renew: Vec<Unit>, want: usize| Command::Keepalive {
        settle: vec![],
        renew,
        take: vec![(Arc::from("p.SUB_k"), vec![0, 1, 2, 3], want)],
        refresh: vec![(plain.clone(), vec![e1, e2])],
        ttl: CLAIM_IDLE,
    };
    let Reply::Kept(kept) = run(&a, keepalive(vec![], 2)).await else {
        panic!("keepalive")
    };
    assert_eq!(
        kept.lost,
        vec![Key {
            unit: plain.clone(),
            id: e2
        }],
        "e2 is b's now"
    );
    assert_eq!(
        kept.taken,
        vec![(parts[0].clone(), true), (parts[1].clone(), false)],
        "two leases taken, as asked; partition 1 has an entry pending"
    );
    assert_eq!((kept.instances, kept.departures), (1, 0));
    assert_eq!(
        pending(&redis, &plain).await,
        vec![
            (e1.to_string(), "a".to_owned(), 1),
            (e2.to_string(), "b".to_owned(), 2)
        ],
        "e2 was not taken back"
    );

    // b cannot renew or take a's leases; it takes the free ones.
    let Reply::Kept(kept_b) = run(
        &b,
        Command::Keepalive {
            settle: vec![],
            renew: parts[..2].to_vec(),
            take: vec![(Arc::from("p.SUB_k"), vec![0, 1, 2, 3], 4)],
            refresh: vec![],
            ttl: CLAIM_IDLE,
        },
    )
    .await
    else {
        panic!("keepalive")
    };
    assert_eq!(
        kept_b,
        Kept {
            instances: 2,
            departures: 0,
            renewed: vec![(parts[0].clone(), false), (parts[1].clone(), false)],
            taken: vec![(parts[2].clone(), true), (parts[3].clone(), true)],
            lost: vec![],
        }
    );
    let Reply::Kept(kept) = run(&a, keepalive(parts[..2].to_vec(), 0)).await else {
        panic!("keepalive")
    };
    assert_eq!(
        kept.renewed,
        vec![(parts[0].clone(), true), (parts[1].clone(), true)]
    );

    // Giving up: only one's own.
    assert_eq!(
        run(
            &a,
            Command::GiveUp {
                units: parts.clone()
            }
        )
        .await,
        Reply::Done
    );
    let holders = |k: u16| {
        let key = Keys::new(GROUP).lease("p.SUB_k", k);
        let redis = &redis;
        async move { redis.command(&["GET", &key]).await.text() }
    };
    assert_eq!(holders(0).await, None);
    assert_eq!(holders(2).await.as_deref().map(holder_consumer), Some("b"));

    // a leaves: b counts a departure (and would look for what a left).
    assert_eq!(run(&a, Command::Leave { units: vec![] }).await, Reply::Done);
    let Reply::Kept(kept_b) = run(
        &b,
        Command::Keepalive {
            settle: vec![],
            renew: vec![],
            take: vec![],
            refresh: vec![],
            ttl: CLAIM_IDLE,
        },
    )
    .await
    else {
        panic!("keepalive")
    };
    assert_eq!((kept_b.instances, kept_b.departures), (1, 1));
}

#[tokio::test]
async fn a_dead_letter_is_written_once_and_never_under_another_consumer() {
    let redis = Redis::start().await;
    let a = carrier(&redis.url(), false, "a");
    let plain = unit("p.SUB_d", None);
    create(&a, std::slice::from_ref(&plain)).await;
    let e1 = add(&redis, &plain, "one").await;
    let e2 = add(&redis, &plain, "two").await;
    read(&a, std::slice::from_ref(&plain), 10).await;
    redis
        .command(&["XCLAIM", &stream(&plain), GROUP, "b", "0", &e2.to_string()])
        .await;
    let dead_letter = |id| Command::DeadLetter {
        key: Key {
            unit: plain.clone(),
            id,
        },
        fields: vec![("reason", b"rejected".to_vec())],
    };
    // Sent twice (a lost reply): stored once.
    assert_eq!(run(&a, dead_letter(e1)).await, Reply::Done);
    assert_eq!(run(&a, dead_letter(e1)).await, Reply::Done);
    // b holds e2: a does not dead-letter it.
    assert_eq!(run(&a, dead_letter(e2)).await, Reply::Done);
    let dead = "{q:p.SUB_d}:dead";
    assert_eq!(redis.command(&["XLEN", dead]).await.integer(), 1);
    assert_eq!(
        pending(&redis, &plain).await,
        vec![(e2.to_string(), "b".to_owned(), 2)]
    );
    assert_eq!(
        redis.command(&["XLEN", &stream(&plain)]).await.integer(),
        1,
        "e1 deleted, e2 kept"
    );

    // Released only if ours: e2 is b's.
    assert_eq!(
        run(
            &a,
            Command::Release {
                keys: vec![Key {
                    unit: plain.clone(),
                    id: e2
                }],
                idle: Duration::from_secs(60),
            }
        )
        .await,
        Reply::Done
    );
    let (_, stale) = take(
        &a,
        &plain,
        EntryId::ZERO,
        Some(Duration::from_secs(30)),
        false,
    )
    .await;
    assert!(stale.is_empty(), "b's entry stays b's: {stale:?}");
}

#[tokio::test]
async fn a_scan_finds_streams_with_entries_left_idle() {
    let redis = Redis::start().await;
    let a = carrier(&redis.url(), false, "a");
    let idle = unit("p.SUB_s1", None);
    let fresh = unit("p.SUB_s2", None);
    create(&a, &[idle.clone(), fresh.clone()]).await;
    let e = add(&redis, &idle, "x").await;
    add(&redis, &fresh, "y").await;
    read(&a, &[idle.clone(), fresh.clone()], 10).await;
    // Left idle by a consumer that stopped answering.
    redis
        .command(&[
            "XCLAIM",
            &stream(&idle),
            GROUP,
            "gone",
            "0",
            &e.to_string(),
            "IDLE",
            "60000",
        ])
        .await;
    let r = run(
        &a,
        Command::Scan {
            units: vec![idle.clone(), fresh.clone()],
            idle: Duration::from_secs(30),
        },
    )
    .await;
    assert_eq!(r, Reply::Stale(vec![idle]));
}

#[tokio::test]
async fn a_missing_group_is_said_and_can_be_created_again() {
    let redis = Redis::start().await;
    let a = carrier(&redis.url(), false, "a");
    let u = unit("p.SUB_g", None);
    let r = run(
        &a,
        Command::Read {
            units: vec![u.clone()],
            count: 1,
        },
    )
    .await;
    assert!(matches!(r, Reply::Failed(Failure::NoGroup(_))), "{r:?}");
    create(&a, std::slice::from_ref(&u)).await;
    create(&a, std::slice::from_ref(&u)).await;
    let r = run(
        &a,
        Command::Read {
            units: vec![u],
            count: 1,
        },
    )
    .await;
    assert_eq!(r, Reply::Read(vec![]), "nothing after the wait");
}

/// `n` events of `procedure` (publications from `first`), in partition
/// `lane` if any, as the admission stage hands them over.
fn events(
    procedure: &str,
    lane: Option<u16>,
    first: u64,
    n: u64,
) -> Vec<subtocall::forward::Job<Box<subtocall::forward::envelope::SharedEvent>>> {
    (first..first + n)
        .map(|p| {
            let envelope = serde_json::json!({
                "procedure": procedure, "topic": "p.x", "publication": p,
                "args": [p], "kwargs": {},
            });
            let mut event = subtocall::forward::envelope::SharedEvent::from_envelope(
                envelope.to_string().as_bytes(),
            )
            .expect("an envelope");
            event.lane = lane;
            subtocall::forward::Job::new(Box::new(event), std::time::Instant::now())
        })
        .collect()
}

#[tokio::test]
async fn an_admission_reads_what_it_is_granted_and_a_partition_only_under_its_lease_and_carries_acknowledgements()
 {
    use subtocall::streams::admit::{AdmitSink, Grants};
    use subtocall::streams::core::{Grant, GrantId};

    /// Grants `count` (none for 0) and carries `acks`.
    struct Scripted {
        count: usize,
        acks: Vec<Key>,
    }
    impl Grants for Scripted {
        fn grant(&mut self, _: &Unit) -> Option<Grant> {
            (self.count > 0).then_some(Grant {
                id: GrantId(7),
                count: self.count,
            })
        }
        fn ride_acks(&mut self, procedure: &str) -> Option<(CommandId, Command)> {
            let keys: Vec<Key> = self
                .acks
                .iter()
                .filter(|k| &*k.unit.procedure == procedure)
                .cloned()
                .collect();
            (!keys.is_empty()).then_some((CommandId(9), Command::Ack { keys }))
        }
    }

    let redis = Redis::start().await;
    let target = Target::new(&redis.url(), false).expect("target");
    let keys = Arc::new(Keys::new(GROUP));
    let metrics = Arc::new(subtocall::metrics::Metrics::new());
    let admit = |consumer: &str| {
        AdmitSink::new(
            target.shared().expect("shared"),
            keys.clone(),
            consumer,
            &format!("{consumer}#1"),
            Duration::from_secs(300),
            metrics.clone(),
        )
    };
    let (a, b) = (admit("a"), admit("b"));
    let plain = unit("p.SUB_adm", None);
    let part = unit("p.SUB_adm", Some(1));
    create(
        &carrier(&redis.url(), false, "a"),
        &[plain.clone(), part.clone()],
    )
    .await;
    let grant = |count| Scripted {
        count,
        acks: vec![],
    };

    // Three appended, two read back (the grant), as ids of the events given.
    let done = a
        .admit(&events("p.SUB_adm", None, 1, 3), Some(&mut grant(2)))
        .await;
    assert!(matches!(done.report, subtocall::sink::Report::All(Ok(()))));
    let (id, taken) = &done.taken[0];
    assert_eq!(*id, GrantId(7));
    let taken = taken.as_ref().expect("taken");
    assert_eq!(taken.len(), 2);
    assert!(
        taken.iter().all(|g| g.body.is_some()),
        "bodies from the events given"
    );
    // b offers the same three (none appended again) and reads the third,
    // which a appended: its fields come from Redis.
    let done = b
        .admit(&events("p.SUB_adm", None, 1, 3), Some(&mut grant(5)))
        .await;
    let taken = done.taken[0].1.as_ref().expect("taken");
    assert_eq!(taken.len(), 1);
    assert_eq!(redis.command(&["XLEN", &stream(&plain)]).await.integer(), 3);
    assert_eq!(pending(&redis, &plain).await.len(), 3);
    let a_took: Vec<Key> = pending(&redis, &plain)
        .await
        .into_iter()
        .filter(|(_, owner, _)| owner == "a")
        .map(|(id, _, _)| Key {
            unit: plain.clone(),
            id: EntryId::parse(&id).expect("an id"),
        })
        .collect();
    assert_eq!(a_took.len(), 2);

    // a's next admission of the procedure (to one of its partitions, a
    // stream in the same slot) carries a's acknowledgements of the plain
    // stream: acknowledged and deleted.
    let done = a
        .admit(
            &events("p.SUB_adm", Some(2), 4, 1),
            Some(&mut Scripted {
                count: 0,
                acks: a_took,
            }),
        )
        .await;
    assert!(matches!(done.report, subtocall::sink::Report::All(Ok(()))));
    assert_eq!(done.acked, vec![(CommandId(9), Ok(()))]);
    assert_eq!(redis.command(&["XLEN", &stream(&plain)]).await.integer(), 1);
    assert_eq!(pending(&redis, &plain).await.len(), 1, "b's alone");

    // A partition: appended, but read only by its lease holder.
    let done = a
        .admit(&events("p.SUB_adm", Some(1), 10, 2), Some(&mut grant(5)))
        .await;
    assert!(
        done.taken[0].1.as_ref().expect("taken").is_empty(),
        "no lease: nothing read"
    );
    let lease = Keys::new(GROUP).lease("p.SUB_adm", 1);
    redis.command(&["SET", &lease, "a#1"]).await;
    let done = b
        .admit(&events("p.SUB_adm", Some(1), 12, 1), Some(&mut grant(5)))
        .await;
    assert!(
        done.taken[0].1.as_ref().expect("taken").is_empty(),
        "a's lease, not b's"
    );
    let done = a
        .admit(&events("p.SUB_adm", Some(1), 13, 1), Some(&mut grant(5)))
        .await;
    let taken = done.taken[0].1.as_ref().expect("taken");
    assert_eq!(taken.len(), 4, "the holder reads them all, in order");
    assert!(taken.windows(2).all(|w| w[0].id < w[1].id));

    // A large batch is read up to the grant, as the events given.
    let big = unit("p.SUB_big", None);
    create(
        &carrier(&redis.url(), false, "a"),
        std::slice::from_ref(&big),
    )
    .await;
    let done = a
        .admit(&events("p.SUB_big", None, 100, 40), Some(&mut grant(30)))
        .await;
    assert!(matches!(done.report, subtocall::sink::Report::All(Ok(()))));
    let taken = done.taken[0].1.as_ref().expect("taken");
    assert_eq!(taken.len(), 30, "as many as granted");
    assert!(taken.iter().all(|g| g.body.is_some()));
    assert!(taken.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(redis.command(&["XLEN", &stream(&big)]).await.integer(), 40);
    assert_eq!(pending(&redis, &big).await.len(), 30);

    // A group lost with Redis's data: still admitted, nothing read.
    redis.command(&["DEL", &stream(&plain)]).await;
    let done = a
        .admit(&events("p.SUB_adm", None, 20, 1), Some(&mut grant(5)))
        .await;
    assert!(matches!(done.report, subtocall::sink::Report::All(Ok(()))));
    assert!(done.taken[0].1.as_ref().expect("taken").is_empty());
    assert_eq!(redis.command(&["XLEN", &stream(&plain)]).await.integer(), 1);
}

#[tokio::test]
async fn on_a_cluster_keepalive_and_scans_run_once_per_node_over_many_slots() {
    let cluster = RedisCluster::start().await;
    let a = carrier(&cluster.url(), true, "a");
    // Procedures whose slots spread over the masters.
    let procedures: Vec<String> = (0..12).map(|i| format!("p.SUB_c{i}")).collect();
    let plain: Vec<Unit> = procedures.iter().map(|p| unit(p, None)).collect();
    create(&a, &plain).await;
    for u in &plain {
        let node = cluster.node_for_key(&stream(u)).await;
        add(node, u, "x").await;
    }
    let got = match run(
        &a,
        Command::Read {
            units: plain.clone(),
            count: 5,
        },
    )
    .await
    {
        Reply::Read(per) => per,
        other => panic!("{other:?}"),
    };
    assert_eq!(got.len(), 12, "one entry from each procedure's stream");
    let refresh: Vec<(Unit, Vec<EntryId>)> = got
        .iter()
        .map(|(u, g)| (u.clone(), vec![g[0].id]))
        .collect();
    let Reply::Kept(kept) = run(
        &a,
        Command::Keepalive {
            settle: vec![],
            renew: vec![],
            take: procedures
                .iter()
                .map(|p| (Arc::from(p.as_str()), vec![0, 1], 1))
                .collect(),
            refresh,
            ttl: CLAIM_IDLE,
        },
    )
    .await
    else {
        panic!("keepalive")
    };
    assert!(kept.lost.is_empty(), "{kept:?}");
    assert_eq!(kept.taken.len(), 12, "one lease of each procedure");
    let r = run(
        &a,
        Command::Scan {
            units: plain.clone(),
            idle: Duration::from_secs(30),
        },
    )
    .await;
    assert_eq!(r, Reply::Stale(vec![]));
    let r = run(
        &a,
        Command::Leave {
            units: kept.taken.iter().map(|(u, _)| u.clone()).collect(),
        },
    )
    .await;
    assert_eq!(r, Reply::Done);
}
