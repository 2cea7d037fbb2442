//! The shared connection to one Redis server (`REDIS_URL`, or the master
//! the sentinels name; a cluster's nodes keep redis-rs's): every request of
//! the instance pipelined on one socket, replies taken in order. It has no
//! task of its own: whichever of its requests is polled writes what is
//! waiting, reads what came and hands each reply to its request (waking
//! it). redis-rs's multiplexed connection runs a task fed by a channel,
//! answers through another and parses each reply with a general parser
//! combinator: at a moderate rate (one request per event) the Redis queue
//! spent 155,900 instructions per event with it, 137,200 with this
//! (callgrind, 200 events/s from the loopback peer; the memory queue
//! 61,500).
//!
//! Replies become the values redis-rs's own parser makes
//! ([`Cursor::value`]), so commands and pipelines are built and read with
//! redis-rs as before ([`ConnectionLike`]). A request gets its reply within
//! the command timeout or a timeout error; a timeout or an IO error fails
//! every request waiting and drops the connection (one that does not
//! answer may be dead without saying so), and the next request connects
//! again. A request whose future is dropped before its reply is abandoned:
//! its reply, when it comes, answers nobody.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::resp::{self, Cursor, Endpoint, Io, RawConn};

/// A cheap-clone handle on the one connection.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    timeout: Duration,
    state: Mutex<State>,
    /// Held while connecting: one connection at a time.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    link: Option<Link>,
    /// Connections made so far (the current one's number).
    links: u64,
    /// Requests answered (or failed) whose futures have not taken it yet.
    done: HashMap<u64, RedisResult<Vec<Value>>>,
    /// The next request's number.
    next: u64,
}

/// A live connection and the requests waiting on it, in the order they
/// were written.
struct Link {
    /// Its number (`State::links`).
    number: u64,
    io: Io,
    input: BytesMut,
    /// Requests not yet written whole.
    output: Vec<u8>,
    written: usize,
    /// The request that writes what is in `output` at its next poll;
    /// until then nobody does (the requests made in one turn of the loop
    /// go to Redis in one write, as redis-rs's task wrote them).
    flusher: Option<u64>,
    waiting: VecDeque<Waiting>,
}

struct Waiting {
    id: u64,
    /// Replies to pass over first (a transaction's `+QUEUED`s), then how
    /// many to keep.
    skip: usize,
    count: usize,
    replies: Vec<Value>,
    /// The first error among the skipped replies (a transaction that will
    /// not run).
    aborted: Option<RedisError>,
    waker: Option<Waker>,
    /// Its future is gone (timed out, dropped): the replies are dropped.
    abandoned: bool,
}

impl Mux {
    /// Connects on first use; `timeout` bounds connecting and each request.
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Mux {
        Mux {
            shared: Arc::new(Shared {
                endpoint,
                timeout,
                state: Mutex::new(State::default()),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects now if there is no connection (else on first use).
    pub async fn connect(&self) -> RedisResult<()> {
        self.connected().await
    }

    /// Connects if there is no connection.
    async fn connected(&self) -> RedisResult<()> {
        if self.state().link.is_some() {
            return Ok(());
        }
        let _one = self.shared.connecting.lock().await;
        if self.state().link.is_some() {
            return Ok(());
        }
        let raw = RawConn::connect(&self.shared.endpoint, false, self.shared.timeout)
            .await
            .map_err(raw_error)?;
        let mut state = self.state();
        state.links += 1;
        state.link = Some(Link {
            number: state.links,
            flusher: None,
            io: raw.io,
            input: raw.input,
            output: Vec::with_capacity(4096),
            written: 0,
            waiting: VecDeque::new(),
        });
        Ok(())
    }

    /// Writes what `write` encodes (its replies: `skip` passed over, then
    /// `count` kept) and waits for its replies.
    async fn request(
        &self,
        write: impl FnOnce(&mut Vec<u8>),
        skip: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.connected().await?;
        let (id, link_number, mut defer) = {
            let mut state = self.state();
            let id = state.next;
            state.next += 1;
            let Some(link) = state.link.as_mut() else {
                return Err(dropped("the connection to Redis was lost"));
            };
            // Alone, it is written at once; else the first of a turn's
            // requests writes them all, after the others are made.
            let idle = link.waiting.is_empty() && link.output.is_empty();
            let defer = !idle && link.output.is_empty() && link.flusher.is_none();
            if defer {
                link.flusher = Some(id);
            }
            write(&mut link.output);
            link.waiting.push_back(Waiting {
                id,
                skip,
                count,
                replies: Vec::with_capacity(count),
                aborted: None,
                waker: None,
                abandoned: false,
            });
            (id, link.number, defer)
        };
        let mut pending = Pending { mux: self, id };
        let answer = tokio::time::timeout(
            self.shared.timeout,
            poll_fn(|cx| {
                if std::mem::take(&mut defer) {
                    // Polled again once the turn's other requests are made.
                    pending.mux.wait_on(id, cx);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                pending.mux.poll_request(id, cx)
            }),
        )
        .await;
        match answer {
            Ok(answer) => {
                pending.id = u64::MAX;
                answer
            }
            Err(_) => {
                // A connection that does not answer may be dead without
                // saying so (a host gone, a partition): made again.
                self.drop_link(link_number, timed_out);
                Err(timed_out())
            }
        }
    }

    /// Drops connection `number` if it is still the current one: every
    /// request waiting on it fails with `why`.
    fn drop_link(&self, number: u64, why: impl Fn() -> RedisError) {
        let mut state = self.state();
        if state.link.as_ref().is_none_or(|l| l.number != number) {
            return;
        }
        let link = state.link.take().expect("checked above");
        for w in link.waiting {
            if let Some(waker) = w.waker {
                waker.wake();
            }
            if !w.abandoned {
                state.done.insert(w.id, Err(why()));
            }
        }
    }

    /// Request `id` is woken through `cx` when its reply comes.
    fn wait_on(&self, id: u64, cx: &Context<'_>) {
        let mut state = self.state();
        if let Some(w) = state
            .link
            .as_mut()
            .and_then(|l| l.waiting.iter_mut().find(|w| w.id == id))
        {
            match &w.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => w.waker = Some(cx.waker().clone()),
            }
        }
    }

    fn poll_request(&self, id: u64, cx: &mut Context<'_>) -> Poll<RedisResult<Vec<Value>>> {
        let failed = {
            let mut guard = self.state();
            let state = &mut *guard;
            if let Some(answer) = state.done.remove(&id) {
                state.pass_on();
                return Poll::Ready(answer);
            }
            let Some(link) = state.link.as_mut() else {
                return Poll::Ready(Err(dropped("the connection to Redis was lost")));
            };
            link.drive(cx, id, &mut state.done)
                .err()
                .map(|e| (link.number, e))
        };
        if let Some((number, e)) = failed {
            // Every request on this connection fails; the next connects
            // again.
            self.drop_link(number, || io_error(&e));
        }
        let mut state = self.state();
        if let Some(answer) = state.done.remove(&id) {
            state.pass_on();
            return Poll::Ready(answer);
        }
        drop(state);
        self.wait_on(id, cx);
        Poll::Pending
    }
}

impl State {
    /// A request answered may have been the one the socket wakes when
    /// Redis writes: the first still waiting goes on reading in its place.
    fn pass_on(&self) {
        if let Some(waker) = self
            .link
            .as_ref()
            .and_then(|l| l.waiting.iter().find(|w| !w.abandoned))
            .and_then(|w| w.waker.as_ref())
        {
            waker.wake_by_ref();
        }
    }
}

impl Link {
    /// Writes what waits to be written, reads what came and hands out the
    /// replies; request `me` (being polled) is not woken.
    fn drive(
        &mut self,
        cx: &mut Context<'_>,
        me: u64,
        done: &mut HashMap<u64, RedisResult<Vec<Value>>>,
    ) -> io::Result<()> {
        if self.flusher == Some(me) {
            self.flusher = None;
        }
        while self.flusher.is_none() && self.written < self.output.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.output[self.written..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if self.written == self.output.len() {
            self.output.clear();
            self.written = 0;
        }
        while !self.waiting.is_empty() {
            self.hand_out(me, done)?;
            if self.waiting.is_empty() {
                break;
            }
            if self.input.capacity() - self.input.len() < 16 * 1024 {
                self.input.reserve(64 * 1024);
            }
            let spare = self.input.spare_capacity_mut();
            let mut buf = ReadBuf::uninit(spare);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    // SAFETY: `poll_read` initialised the first `n` bytes
                    // of the spare capacity.
                    unsafe { self.input.set_len(self.input.len() + n) };
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Gives every complete reply read to the request it answers.
    fn hand_out(
        &mut self,
        me: u64,
        done: &mut HashMap<u64, RedisResult<Vec<Value>>>,
    ) -> io::Result<()> {
        while let Some(len) = resp::scan(&self.input, &mut 0, 0).map_err(protocol)? {
            let frame = self.input.split_to(len).freeze();
            let value = Cursor::new(&frame).value();
            let Some(front) = self.waiting.front_mut() else {
                return Err(protocol(resp::Error::Protocol(
                    "a reply nothing was asked for",
                )));
            };
            if front.skip > 0 {
                front.skip -= 1;
                if let (Value::ServerError(e), None) = (&value, &front.aborted) {
                    front.aborted = Some(RedisError::from(e.clone()));
                }
                continue;
            }
            front.replies.push(value);
            if front.replies.len() < front.count {
                continue;
            }
            let w = self.waiting.pop_front().expect("the front");
            if w.abandoned {
                continue;
            }
            done.insert(
                w.id,
                match w.aborted {
                    Some(e) => Err(e),
                    None => Ok(w.replies),
                },
            );
            if w.id != me
                && let Some(waker) = w.waker
            {
                waker.wake();
            }
        }
        Ok(())
    }
}

/// A request on its way; dropped before its answer, it is abandoned (and
/// another request waiting is woken to go on reading in its place).
struct Pending<'a> {
    mux: &'a Mux,
    /// `u64::MAX` once answered.
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.id == u64::MAX {
            return;
        }
        let mut state = self.mux.state();
        state.done.remove(&self.id);
        if let Some(link) = state.link.as_mut() {
            if link.flusher == Some(self.id) {
                // Another writes what it was to write.
                link.flusher = None;
            }
            for w in &mut link.waiting {
                if w.id == self.id {
                    w.abandoned = true;
                } else if let Some(waker) = &w.waker {
                    waker.wake_by_ref();
                }
            }
        }
    }
}

impl ConnectionLike for Mux {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut replies = self
                .request(|out| cmd.write_packed_command(out), 0, 1)
                .await?;
            Ok(replies.pop().unwrap_or(Value::Nil))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let write = |out: &mut Vec<u8>| out.extend_from_slice(&pipeline.get_packed_pipeline());
            self.request(write, offset, count).await
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.endpoint.db()
    }
}

fn raw_error(e: resp::Error) -> RedisError {
    match e {
        resp::Error::Io(e) => RedisError::from(e),
        resp::Error::Timeout => RedisError::from(io::Error::new(
            io::ErrorKind::TimedOut,
            "Redis did not answer in time",
        )),
        other => RedisError::from((
            redis::ErrorKind::Io,
            "cannot connect to Redis",
            other.to_string(),
        )),
    }
}

fn protocol(e: resp::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn io_error(e: &io::Error) -> RedisError {
    RedisError::from(io::Error::new(e.kind(), e.to_string()))
}

fn timed_out() -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

fn dropped(why: &'static str) -> RedisError {
    RedisError::from(io::Error::new(io::ErrorKind::ConnectionReset, why))
}
