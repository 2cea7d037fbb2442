//! The loopback peer: a minimal WAMP "router" written for the benchmark, so
//! that subtocall's own ceiling can be measured with the real router taken
//! out of the picture. It welcomes anyone, answers the registration meta API
//! with one SUB_ registration, and once subtocall subscribes to the matching
//! topic it pushes EVENTs as fast as subtocall takes them, answering every
//! CALL at once with an empty RESULT.
//!
//! It has to be much cheaper per event than subtocall, or it would measure
//! itself: it runs on one thread, speaks WebSocket by hand (server frames are
//! unmasked, so an EVENT is a pre-encoded frame with the publication id
//! patched in place), reads only the request id out of each CALL, and writes
//! whatever is ready with one syscall. Its own CPU time is reported next to
//! subtocall's so that this can be checked.
//!
//! Flow control: at most `window` events are outstanding (sent but not yet
//! answered by a CALL, or in Redis mode not yet seen in the Redis list), so
//! subtocall's queue never overflows: every event sent is
//! forwarded, and the rate measured is the rate subtocall sustains.
//!
//! A group of peers ([`Peer::start_group`], one per instance of a Redis-queue
//! group) plays one router with several subscribers: every member sends the
//! same publication ids, no member runs more than [`LOCKSTEP`] events ahead
//! of the slowest, the window counts the CALLs answered by any member (each
//! event is delivered by one instance, through its own session), and each
//! member also keeps within `window` of what its own subscriber has taken in
//! ([`PeerStats::subscriber_done`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use subtocall::wamp::message::Event;
use subtocall::wamp::{
    Dict, Message, Payload, PublicationId, RequestId, Serializer, SessionId, SubscriptionId, Value,
};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};

/// The SUB_ procedure the peer advertises, and the topic subtocall derives.
pub const PROCEDURE: &str = "bench.SUB_ev";
pub const TOPIC: &str = "bench.ev";
const REGISTRATION: u64 = 4242;
const EVENT_SUBSCRIPTION: u64 = 7777;
/// Publication ids run from 2^52 up: 16 decimal digits each, so the JSON
/// template is patched in place; as MessagePack every one is a `uint64`.
const FIRST_PUBLICATION: u64 = 1 << 52;
/// Stop filling the output buffer beyond this many unwritten bytes.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// In a group, how far a member may run ahead of the slowest one: as a
/// router, which sends each EVENT to every subscriber, not one instance
/// racing through the ids while the other falls behind.
pub const LOCKSTEP: u64 = 256;

/// With [`PeerConfig::keys`], kwargs `seq` runs from here (16 digits, so
/// that the JSON template is patched in place like the publication id).
const FIRST_KEY: u64 = 1 << 53;

/// What an EVENT carries: a small, realistic status update.
pub fn event_payload() -> Payload {
    payload_with_seq(7)
}

/// [`event_payload`] with kwargs `seq` set to `seq`.
fn payload_with_seq(seq: u64) -> Payload {
    Payload::new(
        vec![
            "status".into(),
            Value::UInt(12345),
            Value::Dict(
                Dict::new()
                    .with("id", 42u64)
                    .with("ok", true)
                    .with("load", 0.25)
                    .with("tags", vec![Value::from("a"), Value::from("b")]),
            ),
        ],
        Dict::new().with("source", "bench").with("seq", seq),
    )
}

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub serializer: Serializer,
    /// Events outstanding at most.
    pub window: u64,
    /// Send exactly this many events, then stop (for instruction counts).
    pub limit: Option<u64>,
    /// Redis mode: completions are counted outside the peer (the length of
    /// the Redis list) instead of by CALLs.
    pub external_completions: Option<Arc<AtomicU64>>,
    /// Send at this many events per second instead of as fast as possible.
    pub rate: Option<f64>,
    /// Give event i the kwarg `seq` = FIRST_KEY + i % N: N ordering keys
    /// (`SUBTOCALL_ORDER_BY=kwarg:seq`).
    pub keys: Option<u64>,
}

/// Counters shared with the harness.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// EVENTs written.
    pub sent: AtomicU64,
    /// CALLs to the SUB_ procedure answered.
    pub answered: AtomicU64,
    /// subtocall subscribed to the topic: discovery is complete.
    pub subscribed: AtomicBool,
    /// Start pushing events (set by the harness).
    pub go: AtomicBool,
    /// Stop pushing events (set by the harness).
    pub stop: AtomicBool,
    /// The first forwarded CALL was checked: procedure, args and kwargs
    /// exactly as published.
    pub payload_checked: AtomicBool,
    /// The peer thread's id, for its CPU time.
    pub tid: AtomicU32,
    /// In a group: how many events this peer's subscriber has dealt with,
    /// as the harness reads them from it (a Redis-queue instance: admitted,
    /// or found admitted by another). The peer sends at most `window` beyond
    /// this: each instance must take in every event, and one that falls
    /// behind would otherwise overflow its buffer while the others carry on.
    pub subscriber_done: AtomicU64,
    pub error: Mutex<Option<String>>,
}

/// A running peer on 127.0.0.1; it runs until the process exits.
pub struct Peer {
    pub port: u16,
    pub stats: Arc<PeerStats>,
}

impl Peer {
    pub fn start(config: PeerConfig) -> Result<Peer> {
        let mut group = Peer::start_group(config, 1)?;
        group.pop().context("a group of one has one peer")
    }

    /// `n` peers fed the same publication ids, each on a listener of its own
    /// for one subscriber; the window is over the CALLs answered by any of
    /// them (see the module's comment).
    pub fn start_group(config: PeerConfig, n: usize) -> Result<Vec<Peer>> {
        let group: Arc<[Arc<PeerStats>]> = (0..n).map(|_| Arc::new(PeerStats::default())).collect();
        let mut peers = Vec::with_capacity(n);
        for stats in group.iter() {
            let port = spawn(config.clone(), stats.clone(), group.clone())?;
            peers.push(Peer {
                port,
                stats: stats.clone(),
            });
        }
        Ok(peers)
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// CPU time of the peer's thread so far.
    pub fn cpu_ns(&self) -> u64 {
        let tid = self.stats.tid.load(Ordering::Relaxed);
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn error(&self) -> Option<String> {
        self.stats.error.lock().ok().and_then(|e| e.clone())
    }
}

/// One peer's listener and thread; returns its port.
fn spawn(config: PeerConfig, stats: Arc<PeerStats>, group: Arc<[Arc<PeerStats>]>) -> Result<u16> {
    let std_listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("bind the loopback peer")?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let thread_stats = stats;
    std::thread::Builder::new()
        .name("loopback-peer".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            thread_stats.tid.store(tid as u32, Ordering::Relaxed);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    set_error(&thread_stats, format!("runtime: {e}"));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return set_error(&thread_stats, format!("listener: {e}")),
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let conn =
                        Conn::new(stream, config.clone(), thread_stats.clone(), group.clone());
                    if let Err(e) = conn.run().await {
                        set_error(&thread_stats, e.to_string());
                    }
                }
            });
        })
        .context("spawn the loopback peer thread")?;
    Ok(port)
}

/// CALLs answered by the peers of a group together.
pub fn answered(group: &[Arc<PeerStats>]) -> u64 {
    group
        .iter()
        .map(|p| p.answered.load(Ordering::Relaxed))
        .sum()
}

fn set_error(stats: &PeerStats, e: String) {
    if let Ok(mut slot) = stats.error.lock() {
        slot.get_or_insert(e);
    }
}

/// One WebSocket frame from the client, unmasked in place.
struct Frame {
    opcode: u8,
    start: usize,
    end: usize,
}

struct Conn {
    stream: TcpStream,
    config: PeerConfig,
    stats: Arc<PeerStats>,
    /// Every peer of the group, this one included (a group of one alone).
    group: Arc<[Arc<PeerStats>]>,
    serializer: Serializer,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    pumping: bool,
    closing: bool,
    /// The whole EVENT frame, publication id included.
    event_frame: Vec<u8>,
    /// Where the ordering key's bytes start in `event_frame`, with keys.
    key_at: Option<usize>,
    /// Where the publication id's bytes start in `event_frame`.
    id_at: usize,
    expected_payload: Payload,
    next_subscription: u64,
    /// When pushing started (paced mode).
    started: Option<std::time::Instant>,
}

impl Conn {
    fn new(
        stream: TcpStream,
        config: PeerConfig,
        stats: Arc<PeerStats>,
        group: Arc<[Arc<PeerStats>]>,
    ) -> Conn {
        let expected_payload = match config.keys {
            Some(_) => payload_with_seq(FIRST_KEY),
            None => event_payload(),
        };
        Conn {
            stream,
            serializer: config.serializer,
            config,
            stats,
            group,
            inbuf: Vec::with_capacity(256 * 1024),
            out: Vec::with_capacity(OUT_HIGH_WATER * 2),
            out_pos: 0,
            pumping: false,
            closing: false,
            event_frame: Vec::new(),
            key_at: None,
            id_at: 0,
            expected_payload,
            next_subscription: 1000,
            started: None,
        }
    }

    async fn run(mut self) -> Result<()> {
        self.handshake().await?;
        self.build_event_frame()?;
        loop {
            let mut progress = self.parse_frames()?;
            if self.closing && self.out_pos == self.out.len() {
                return Ok(());
            }
            progress |= self.produce();
            progress |= self.flush()?;
            match self.fill() {
                Ok(true) => progress = true,
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if progress {
                continue;
            }
            let interest = if self.out_pos < self.out.len() {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            // Waiting for the go signal, or for Redis to catch up: poll.
            let _ =
                tokio::time::timeout(Duration::from_millis(1), self.stream.ready(interest)).await;
        }
    }

    async fn handshake(&mut self) -> Result<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed during the WebSocket handshake");
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = find(&buf, b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > 64 * 1024 {
                bail!("WebSocket handshake request too large");
            }
        };
        let head = std::str::from_utf8(&buf[..head_end]).context("handshake is not UTF-8")?;
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let key = header("Sec-WebSocket-Key").ok_or_else(|| anyhow!("no Sec-WebSocket-Key"))?;
        let offered = header("Sec-WebSocket-Protocol").unwrap_or("");
        let wanted = self.serializer.subprotocol();
        if !offered.split(',').any(|p| p.trim() == wanted) {
            bail!("client did not offer {wanted} (offered {offered:?})");
        }
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {wanted}\r\n\r\n"
        );
        self.stream.write_all(response.as_bytes()).await?;
        self.inbuf.extend_from_slice(&buf[head_end..]);
        Ok(())
    }

    fn build_event_frame(&mut self) -> Result<()> {
        let event = Message::Event(Event {
            subscription: SubscriptionId(EVENT_SUBSCRIPTION),
            publication: PublicationId(FIRST_PUBLICATION),
            details: Dict::new(),
            payload: match self.config.keys {
                Some(_) => payload_with_seq(FIRST_KEY),
                None => event_payload(),
            },
        });
        let body = self.serializer.encode(&event)?;
        let slot_of = |value: u64| -> Result<usize> {
            let marker: Vec<u8> = match self.serializer {
                Serializer::MsgPack => {
                    let mut m = vec![0xcf];
                    m.extend_from_slice(&value.to_be_bytes());
                    m
                }
                Serializer::Json => value.to_string().into_bytes(),
            };
            let at = find(&body, &marker).ok_or_else(|| anyhow!("{value} not in template"))?;
            Ok(at + usize::from(self.serializer == Serializer::MsgPack))
        };
        let key_at = match self.config.keys {
            Some(_) => Some(slot_of(FIRST_KEY)?),
            None => None,
        };
        let id_at = slot_of(FIRST_PUBLICATION)?;
        let mut frame = Vec::new();
        frame_header(&mut frame, self.serializer, body.len());
        self.id_at = frame.len() + id_at;
        self.key_at = key_at.map(|k| frame.len() + k);
        frame.extend_from_slice(&body);
        self.event_frame = frame;
        Ok(())
    }

    /// Queues EVENTs while the window and the output buffer allow.
    fn produce(&mut self) -> bool {
        let s = &self.stats;
        if !self.pumping || !s.go.load(Ordering::Relaxed) || s.stop.load(Ordering::Relaxed) {
            return false;
        }
        let completed = match &self.config.external_completions {
            Some(c) => c.load(Ordering::Relaxed),
            None => answered(&self.group),
        };
        let mut sent = s.sent.load(Ordering::Relaxed);
        let mut limit = self.config.limit.unwrap_or(u64::MAX);
        if self.group.len() > 1 {
            let slowest = self
                .group
                .iter()
                .map(|p| p.sent.load(Ordering::Relaxed))
                .min();
            limit = limit
                .min(slowest.unwrap_or(0) + LOCKSTEP)
                .min(s.subscriber_done.load(Ordering::Relaxed) + self.config.window);
        }
        if let Some(rate) = self.config.rate {
            let started = *self.started.get_or_insert_with(std::time::Instant::now);
            limit = limit.min((started.elapsed().as_secs_f64() * rate) as u64 + 1);
        }
        let before = sent;
        while sent < limit
            && sent - completed.min(sent) < self.config.window
            && self.out.len() - self.out_pos < OUT_HIGH_WATER
        {
            let base = self.out.len();
            self.out.extend_from_slice(&self.event_frame);
            let id = FIRST_PUBLICATION + sent;
            write_slot(self.serializer, &mut self.out[base + self.id_at..], id);
            if let (Some(at), Some(keys)) = (self.key_at, self.config.keys) {
                let key = FIRST_KEY + sent % keys.max(1);
                write_slot(self.serializer, &mut self.out[base + at..], key);
            }
            sent += 1;
        }
        s.sent.store(sent, Ordering::Relaxed);
        sent > before
    }

    /// Writes what is buffered, without waiting.
    fn flush(&mut self) -> Result<bool> {
        let mut progress = false;
        while self.out_pos < self.out.len() {
            match self.stream.try_write(&self.out[self.out_pos..]) {
                Ok(n) => {
                    self.out_pos += n;
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > OUT_HIGH_WATER {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(progress)
    }

    /// Reads what is available, without waiting.
    fn fill(&mut self) -> std::io::Result<bool> {
        if self.inbuf.capacity() - self.inbuf.len() < 64 * 1024 {
            self.inbuf.reserve(64 * 1024);
        }
        match self.stream.try_read_buf(&mut self.inbuf) {
            Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn parse_frames(&mut self) -> Result<bool> {
        let mut consumed = 0;
        let mut progress = false;
        while let Some((frame, len)) = next_frame(&mut self.inbuf[consumed..])? {
            let (start, end) = (consumed + frame.start, consumed + frame.end);
            consumed += len;
            progress = true;
            match frame.opcode {
                1 | 2 => self.on_data(start, end)?,
                8 => {
                    // Close: answer it and stop.
                    self.out.extend_from_slice(&[0x88, 0x00]);
                    self.closing = true;
                }
                9 => {
                    let payload = self.inbuf[start..end].to_vec();
                    self.out.push(0x8a);
                    self.out.push(payload.len() as u8);
                    self.out.extend_from_slice(&payload);
                }
                10 => {}
                other => bail!("unexpected WebSocket opcode {other}"),
            }
        }
        if consumed > 0 {
            self.inbuf.drain(..consumed);
        }
        Ok(progress)
    }

    fn on_data(&mut self, start: usize, end: usize) -> Result<()> {
        if self.pumping
            && self.stats.payload_checked.load(Ordering::Relaxed)
            && let Some(request) = fast_call_request(self.serializer, &self.inbuf[start..end])
        {
            self.stats.answered.fetch_add(1, Ordering::Relaxed);
            self.result_frame(request);
            return Ok(());
        }
        let msg = self.serializer.decode(&self.inbuf[start..end])?;
        self.on_message(msg)
    }

    /// `[50, request, {}]`, written by hand: the hot path.
    fn result_frame(&mut self, request: u64) {
        match self.serializer {
            Serializer::MsgPack => {
                let mut body = [0u8; 16];
                body[0] = 0x93;
                body[1] = 0x32;
                let mut w = &mut body[2..];
                let before = w.len();
                // Writing into a 14-byte slice cannot run out of room: a
                // uint is at most 9 bytes.
                let _ = rmp::encode::write_uint(&mut w, request);
                let n = 2 + before - w.len();
                body[n] = 0x80;
                self.out.push(0x82);
                self.out.push((n + 1) as u8);
                self.out.extend_from_slice(&body[..n + 1]);
            }
            Serializer::Json => {
                let text = format!("[50,{request},{{}}]");
                self.out.push(0x81);
                self.out.push(text.len() as u8);
                self.out.extend_from_slice(text.as_bytes());
            }
        }
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        let body = self.serializer.encode(msg)?;
        frame_header(&mut self.out, self.serializer, body.len());
        self.out.extend_from_slice(&body);
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<()> {
        match msg {
            Message::Hello { realm, .. } => {
                let features = |pairs: &[&str]| {
                    Dict::new().with(
                        "features",
                        pairs.iter().map(|f| (*f, true)).collect::<Dict>(),
                    )
                };
                let roles = Dict::new()
                    .with(
                        "broker",
                        features(&["pattern_based_subscription", "publisher_identification"]),
                    )
                    .with(
                        "dealer",
                        features(&["call_canceling", "shared_registration"]),
                    );
                self.send(&Message::Welcome {
                    session: SessionId(1),
                    details: Dict::new()
                        .with("realm", realm)
                        .with("authid", "bench")
                        .with("authrole", "bench")
                        .with("authmethod", "anonymous")
                        .with("roles", roles),
                })
            }
            Message::Subscribe { request, topic, .. } => {
                let id = if topic == TOPIC {
                    self.pumping = true;
                    self.stats.subscribed.store(true, Ordering::Relaxed);
                    EVENT_SUBSCRIPTION
                } else {
                    self.next_subscription += 1;
                    self.next_subscription
                };
                self.send(&Message::Subscribed {
                    request,
                    subscription: SubscriptionId(id),
                })
            }
            Message::Unsubscribe { request, .. } => self.send(&Message::Unsubscribed {
                request,
                details: Dict::new(),
            }),
            Message::Call {
                request,
                procedure,
                payload,
                ..
            } => self.on_call(request, &procedure, payload),
            Message::Goodbye { .. } => {
                self.send(&Message::Goodbye {
                    details: Dict::new(),
                    reason: "wamp.close.goodbye_and_out".into(),
                })?;
                self.closing = true;
                Ok(())
            }
            other => bail!("the loopback peer does not handle {}", other.name()),
        }
    }

    fn on_call(&mut self, request: RequestId, procedure: &str, payload: Payload) -> Result<()> {
        let args = match procedure {
            "wamp.registration.list" => vec![Value::Dict(
                Dict::new()
                    .with("exact", vec![Value::UInt(REGISTRATION)])
                    .with("prefix", Vec::<Value>::new())
                    .with("wildcard", Vec::<Value>::new()),
            )],
            "wamp.registration.get" => vec![Value::Dict(
                Dict::new()
                    .with("id", REGISTRATION)
                    .with("created", "2026-01-01T00:00:00.000Z")
                    .with("uri", PROCEDURE)
                    .with("match", "exact")
                    .with("invoke", "roundrobin"),
            )],
            PROCEDURE => {
                if payload != self.expected_payload {
                    bail!("forwarded CALL payload differs from the EVENT's: {payload:?}");
                }
                self.stats.payload_checked.store(true, Ordering::Relaxed);
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                self.result_frame(request.0);
                return Ok(());
            }
            other => {
                return self.send(&Message::Error {
                    request_type: 48,
                    request,
                    details: Dict::new(),
                    error: "wamp.error.no_such_procedure".into(),
                    payload: Payload::new(vec![format!("no {other} here").into()], Dict::new()),
                });
            }
        };
        self.send(&Message::Result {
            request,
            details: Dict::new(),
            payload: Payload::new(args, Dict::new()),
        })
    }
}

/// The request id of a CALL, read without decoding the rest; `None` for any
/// other message.
fn fast_call_request(serializer: Serializer, body: &[u8]) -> Option<u64> {
    match serializer {
        Serializer::MsgPack => {
            // fixarray of 4..=6 elements, then the positive fixint 48.
            if !(0x94..=0x96).contains(body.first()?) || *body.get(1)? != 0x30 {
                return None;
            }
            let mut rest = &body[2..];
            rmp::decode::read_int::<u64, _>(&mut rest).ok()
        }
        Serializer::Json => {
            let rest = body.strip_prefix(b"[48,")?;
            let end = rest.iter().position(|&b| b == b',')?;
            std::str::from_utf8(&rest[..end]).ok()?.trim().parse().ok()
        }
    }
}

/// The next complete client frame in `buf` (unmasked in place) and its
/// length on the wire, or `None` if it has not fully arrived.
fn next_frame(buf: &mut [u8]) -> Result<Option<(Frame, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x80 == 0 {
        bail!("fragmented WebSocket frames are not supported by the loopback peer");
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    if let Some(m) = mask {
        for (i, b) in buf[at..at + len].iter_mut().enumerate() {
            *b ^= m[i & 3];
        }
    }
    Ok(Some((
        Frame {
            opcode: b0 & 0x0f,
            start: at,
            end: at + len,
        },
        at + len,
    )))
}

/// A server frame header (unmasked, final) for a text (JSON) or binary
/// (MessagePack) message of `len` bytes.
fn frame_header(out: &mut Vec<u8>, serializer: Serializer, len: usize) {
    out.push(if serializer.is_text() { 0x81 } else { 0x82 });
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Writes `v` (which has exactly 16 digits) as ASCII into `slot`.
/// Writes `v` over a template's number at the start of `slot`: 8 bytes of a
/// MessagePack `uint64`, or 16 JSON digits.
fn write_slot(serializer: Serializer, slot: &mut [u8], v: u64) {
    match serializer {
        Serializer::MsgPack => slot[..8].copy_from_slice(&v.to_be_bytes()),
        Serializer::Json => write_digits16(&mut slot[..16], v),
    }
}

fn write_digits16(slot: &mut [u8], mut v: u64) {
    for b in slot.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_request_ids_are_read_from_both_serializers() {
        for ser in Serializer::ALL {
            for request in [1u64, 200, 70_000, 5_000_000_000] {
                let call = Message::Call {
                    request: RequestId(request),
                    options: Dict::new(),
                    procedure: PROCEDURE.into(),
                    payload: event_payload(),
                };
                let body = ser.encode(&call).unwrap();
                assert_eq!(fast_call_request(ser, &body), Some(request), "{ser}");
            }
        }
    }

    #[test]
    fn sixteen_digit_ids_are_written_in_place() {
        let mut slot = [0u8; 16];
        write_digits16(&mut slot, FIRST_PUBLICATION + 12);
        assert_eq!(&slot, b"4503599627370508");
    }
}
