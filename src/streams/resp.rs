//! A bare RESP2 connection for a stream's reader. Its replies are the large
//! ones (XREADGROUP and XAUTOCLAIM carry every event read): redis-rs parses
//! each reply into a tree of owned values with a general parser combinator,
//! about a quarter of the Redis queue's cost per event. Here a reply is read
//! into one buffer, checked for completeness by its headers alone, and its
//! strings are handed out as slices of that buffer (no copy, one allocation
//! per read for the whole reply).
//!
//! One command at a time, each with a deadline; on any error the reader
//! drops the connection and opens a new one. On a Redis Cluster the reader
//! connects to the master of its stream's slot and follows `MOVED`.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Deepest nesting of arrays accepted (XREADGROUP replies nest four deep).
const MAX_DEPTH: usize = 8;
/// Longest bulk string or array accepted (Redis's own `proto-max-bulk-len`
/// default is 512 MB).
const MAX_LEN: usize = 512 << 20;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Nil,
    Int(i64),
    /// A simple string (`+OK`).
    Status(Bytes),
    Bulk(Bytes),
    Array(Vec<Reply>),
    /// An error reply (`-ERR ...`), as a value: a command's error is an
    /// [`Error::Server`].
    Error(String),
}

impl Reply {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Reply::Bulk(b) | Reply::Status(b) => Some(b),
            _ => None,
        }
    }

    /// The text of a bulk or simple string, if it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        self.bytes().and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// Why a command got no reply.
#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    Timeout,
    /// The server's bytes are not RESP2 as this client reads it.
    Protocol(&'static str),
    /// The server answered with an error (`NOGROUP ...`, `MOVED ...`).
    Server(String),
    /// The URL names something this client cannot reach (TLS).
    Unsupported(String),
    /// On a cluster: the node of a slot could not be found.
    Cluster(String),
}

impl Error {
    /// The error code of a server error (its first word).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server(message) => message.split_whitespace().next(),
            _ => None,
        }
    }

    /// Where a cluster's `MOVED` redirection points (`host:port`).
    pub fn moved_to(&self) -> Option<(String, u16)> {
        let Error::Server(message) = self else {
            return None;
        };
        let mut words = message.split_whitespace();
        if words.next() != Some("MOVED") {
            return None;
        }
        let (host, port) = words.nth(1)?.rsplit_once(':')?;
        Some((host.to_owned(), port.parse().ok()?))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Timeout => f.write_str("Redis did not answer in time"),
            Error::Protocol(what) => write!(f, "unreadable reply from Redis: {what}"),
            Error::Server(message) => f.write_str(message),
            Error::Unsupported(what) => f.write_str(what),
            Error::Cluster(why) => write!(f, "cannot find the stream's cluster node: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

/// Where to connect and how to log in, from a `REDIS_URL`.
#[derive(Clone)]
pub struct Endpoint {
    addr: Addr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn from_url(url: &str) -> Result<Endpoint, Error> {
        let info = url
            .into_connection_info()
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => {
                return Err(Error::Unsupported(
                    "the Redis queue reads over TCP or a Unix socket, not TLS".into(),
                ));
            }
        };
        let settings = info.redis_settings();
        Ok(Endpoint {
            addr,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
        })
    }

    /// The same login on another node (a cluster's master).
    pub fn at(&self, host: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: Addr::Tcp(host.to_owned(), port),
            ..self.clone()
        }
    }

    /// The database it selects.
    pub fn db(&self) -> i64 {
        self.db
    }

    /// The host of a TCP endpoint.
    pub fn host(&self) -> Option<&str> {
        match &self.addr {
            Addr::Tcp(host, _) => Some(host),
            Addr::Unix(_) => None,
        }
    }
}

pub(super) enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One connection, one command at a time.
pub struct RawConn {
    pub(super) io: Io,
    /// Bytes read and not yet parsed.
    pub(super) input: BytesMut,
    /// The command being written.
    output: Vec<u8>,
}

impl RawConn {
    /// Connects and logs in (AUTH, and SELECT outside a cluster), each step
    /// within `timeout`.
    pub async fn connect(
        endpoint: &Endpoint,
        cluster: bool,
        timeout: Duration,
    ) -> Result<RawConn, Error> {
        let io = tokio::time::timeout(timeout, async {
            Ok::<_, std::io::Error>(match &endpoint.addr {
                Addr::Tcp(host, port) => {
                    let s = TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    Io::Tcp(s)
                }
                Addr::Unix(path) => Io::Unix(UnixStream::connect(path).await?),
            })
        })
        .await
        .map_err(|_| Error::Timeout)??;
        let mut conn = RawConn {
            io,
            input: BytesMut::with_capacity(64 * 1024),
            output: Vec::with_capacity(256),
        };
        if let Some(password) = &endpoint.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            auth.extend(endpoint.username.as_deref().map(str::as_bytes));
            auth.push(password.as_bytes());
            conn.command(&auth, timeout).await?;
        }
        if !cluster && endpoint.db != 0 {
            let db = endpoint.db.to_string();
            conn.command(&[b"SELECT", db.as_bytes()], timeout).await?;
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply, within `timeout`. An error
    /// reply is an [`Error::Server`]; after any error the connection should
    /// be dropped (a late reply would answer the next command).
    pub async fn command(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Reply, Error> {
        let frame = self.frame(args, timeout).await?;
        Ok(Cursor::new(&frame).reply())
    }

    /// Like [`RawConn::command`], but the reply stays as it came, to be
    /// walked with a [`Cursor`] (no tree is built).
    pub async fn frame(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Bytes, Error> {
        self.output.clear();
        encode(&mut self.output, args);
        tokio::time::timeout(timeout, async {
            self.io.write_all(&self.output).await?;
            self.read_frame().await
        })
        .await
        .map_err(|_| Error::Timeout)?
    }

    /// Sends a command and leaves its reply unread (a subscription's
    /// replies are read with [`RawConn::next_frame`]).
    pub async fn send(&mut self, args: &[&[u8]], timeout: Duration) -> Result<(), Error> {
        self.output.clear();
        encode(&mut self.output, args);
        tokio::time::timeout(timeout, self.io.write_all(&self.output))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(Error::Io)
    }

    /// The next reply (or pushed message), however long it takes. Cancel
    /// safe: what was read of an incomplete reply stays buffered.
    pub async fn next_frame(&mut self) -> Result<Bytes, Error> {
        self.read_frame().await
    }

    async fn read_frame(&mut self) -> Result<Bytes, Error> {
        loop {
            if let Some(len) = scan(&self.input, &mut 0, 0)? {
                let frame = self.input.split_to(len).freeze();
                if frame.first() == Some(&b'-') {
                    let Reply::Error(message) = Cursor::new(&frame).reply() else {
                        unreachable!("an error reply")
                    };
                    return Err(Error::Server(message));
                }
                return Ok(frame);
            }
            if self.input.capacity() - self.input.len() < 16 * 1024 {
                self.input.reserve(64 * 1024);
            }
            if self.io.read_buf(&mut self.input).await? == 0 {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    use std::io::Write as _;
    let _ = write!(out, "*{}\r\n", args.len());
    for arg in args {
        let _ = write!(out, "${}\r\n", arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// The length of the complete reply at the start of `buf`, or `None` if
/// more bytes are needed.
pub(super) fn scan(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<usize>, Error> {
    let Some(kind) = buf.get(*pos).copied() else {
        return Ok(None);
    };
    let Some(line) = line(buf, *pos + 1) else {
        return Ok(None);
    };
    let header = &buf[*pos + 1..line];
    *pos = line + 2;
    match kind {
        b'+' | b'-' | b':' => {
            if kind == b':' {
                number(header)?;
            }
        }
        b'$' => {
            let len = number(header)?;
            if len >= 0 {
                let len = length(len)?;
                let end = *pos + len;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(Error::Protocol("a bulk string is not followed by CRLF"));
                }
                *pos = end + 2;
            } else if len != -1 {
                return Err(Error::Protocol("a negative bulk length"));
            }
        }
        b'*' => {
            let len = number(header)?;
            if len >= 0 {
                if depth >= MAX_DEPTH {
                    return Err(Error::Protocol("arrays nested too deep"));
                }
                for _ in 0..length(len)? {
                    if scan(buf, pos, depth + 1)?.is_none() {
                        return Ok(None);
                    }
                }
            } else if len != -1 {
                return Err(Error::Protocol("a negative array length"));
            }
        }
        _ => return Err(Error::Protocol("an unknown reply type")),
    }
    Ok(Some(*pos))
}

/// A walk through a complete reply (as [`RawConn::frame`] gives it), one
/// element at a time. Each step says what it expected; `None` is a nil or
/// an element of another type (skipped over either way).
pub struct Cursor<'a> {
    frame: &'a Bytes,
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(frame: &'a Bytes) -> Cursor<'a> {
        Cursor { frame, pos: 0 }
    }

    /// The header of the next element: its type, its number (0 for a
    /// simple string or an error) and where its line is.
    fn header(&mut self) -> Option<(u8, i64, Range<usize>)> {
        let kind = *self.frame.get(self.pos)?;
        let text = self.pos + 1..line(self.frame, self.pos + 1)?;
        let n = match kind {
            b'$' | b'*' | b':' => number(&self.frame[text.clone()]).ok()?,
            _ => 0,
        };
        self.pos = text.end + 2;
        Some((kind, n, text))
    }

    /// The next element, whole (a nil past the end).
    pub fn reply(&mut self) -> Reply {
        let start = self.pos;
        match self.header() {
            Some((b'+', _, text)) => Reply::Status(self.frame.slice(text)),
            Some((b'-', _, text)) => {
                Reply::Error(String::from_utf8_lossy(&self.frame[text]).into_owned())
            }
            Some((b':', n, _)) => Reply::Int(n),
            Some((b'*', n, _)) if n >= 0 => Reply::Array((0..n).map(|_| self.reply()).collect()),
            Some((b'$', n, _)) if n >= 0 => {
                self.pos = start;
                self.bulk().map_or(Reply::Nil, Reply::Bulk)
            }
            _ => Reply::Nil,
        }
    }

    /// The next element as the value redis-rs's own parser makes of it
    /// (`+OK` is [`redis::Value::Okay`], an error a
    /// [`redis::Value::ServerError`]; a nil past the end).
    pub fn value(&mut self) -> redis::Value {
        use redis::Value;
        let start = self.pos;
        match self.header() {
            Some((b'+', _, text)) => match &self.frame[text] {
                b"OK" => Value::Okay,
                t => Value::SimpleString(String::from_utf8_lossy(t).into_owned()),
            },
            // Rare (a failed command): redis-rs's parser, for its error
            // kinds.
            Some((b'-', _, _)) => redis::parse_redis_value(&self.frame[start..self.pos])
                .unwrap_or_else(|e| Value::SimpleString(e.to_string())),
            Some((b':', n, _)) => Value::Int(n),
            Some((b'*', n, _)) if n >= 0 => Value::Array((0..n).map(|_| self.value()).collect()),
            Some((b'$', n, _)) if n >= 0 => {
                let at = self.pos;
                self.pos += n as usize + 2;
                Value::BulkString(self.frame[at..at + n as usize].to_vec())
            }
            _ => Value::Nil,
        }
    }

    /// The length of an array, whose elements follow.
    pub fn array(&mut self) -> Option<usize> {
        let start = self.pos;
        match self.header()? {
            (b'*', n, _) if n >= 0 => Some(n as usize),
            _ => {
                self.pos = start;
                self.skip();
                None
            }
        }
    }

    /// A bulk string, as a slice of the frame.
    pub fn bulk(&mut self) -> Option<Bytes> {
        let start = self.pos;
        match self.header()? {
            (b'$', n, _) if n >= 0 => {
                let at = self.pos;
                self.pos += n as usize + 2;
                Some(self.frame.slice(at..at + n as usize))
            }
            _ => {
                self.pos = start;
                self.skip();
                None
            }
        }
    }

    /// Steps over the next element, whatever it is.
    pub fn skip(&mut self) {
        match self.header() {
            Some((b'$', n, _)) if n >= 0 => self.pos += n as usize + 2,
            Some((b'*', n, _)) => {
                for _ in 0..n.max(0) {
                    self.skip();
                }
            }
            _ => {}
        }
    }
}

/// Where the CRLF ending the line that starts at `from` is.
fn line(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    let cr = rest.iter().position(|&b| b == b'\r')?;
    (rest.get(cr + 1) == Some(&b'\n')).then_some(from + cr)
}

/// A decimal integer, as RESP writes lengths and integers.
fn number(text: &[u8]) -> Result<i64, Error> {
    let (negative, text) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    let magnitude = digits(text);
    let n = match magnitude {
        Some(m) if negative => 0i64.checked_sub_unsigned(m),
        Some(m) => i64::try_from(m).ok(),
        None => None,
    };
    n.ok_or(Error::Protocol(
        "a length or integer is not a number in range",
    ))
}

/// An unsigned decimal number: digits only, at least one, within `u64`.
pub fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?
    })
}

fn length(n: i64) -> Result<usize, Error> {
    usize::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_LEN)
        .ok_or(Error::Protocol("a length beyond 512 MB"))
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of its hash tag, or
/// of the whole key if it has none, modulo 16384).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tagged {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// A reply as Redis writes it.
#[cfg(test)]
pub(crate) fn write(reply: &Reply, out: &mut Vec<u8>) {
    match reply {
        Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
        Reply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Reply::Status(s) => {
            out.push(b'+');
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
        Reply::Bulk(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for item in items {
                write(item, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(buf: &[u8]) -> Result<Option<(Reply, usize)>, Error> {
        Ok(scan(buf, &mut 0, 0)?.map(|len| {
            let frame = Bytes::copy_from_slice(&buf[..len]);
            (Cursor::new(&frame).reply(), len)
        }))
    }

    fn replies() -> impl Strategy<Value = Reply> {
        let line = "[a-zA-Z0-9 :._-]{0,12}";
        let leaf = prop_oneof![
            Just(Reply::Nil),
            any::<i64>().prop_map(Reply::Int),
            line.prop_map(|s| Reply::Status(Bytes::from(s))),
            line.prop_map(Reply::Error),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Reply::Bulk(Bytes::from(b))),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(Reply::Array)
        })
    }

    proptest! {
        /// Every reply reads back as written, and every cut of it asks for
        /// more bytes rather than yielding a reply or an error.
        #[test]
        fn replies_read_back_whole_and_only_whole(reply in replies(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = Vec::new();
            write(&reply, &mut bytes);
            let len = bytes.len();
            for cut in 0..len {
                prop_assert!(matches!(parse_all(&bytes[..cut]), Ok(None)), "cut at {}", cut);
            }
            bytes.extend_from_slice(&tail);
            let (back, used) = parse_all(&bytes).unwrap().unwrap();
            prop_assert_eq!(back, reply);
            prop_assert_eq!(used, len);
        }

        /// A reply read as a redis-rs value is what redis-rs's own parser
        /// makes of it.
        #[test]
        fn values_are_redis_rs_values(reply in replies()) {
            let mut bytes = Vec::new();
            write(&reply, &mut bytes);
            let frame = Bytes::from(bytes);
            let ours = Cursor::new(&frame).value();
            let theirs = redis::parse_redis_value(&frame).unwrap();
            prop_assert_eq!(ours, theirs);
        }

        /// Arbitrary bytes never panic the reader.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_all(&bytes);
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b"$3\r\nabcd\r\n",
            b"$-2\r\n",
            b"*-3\r\n",
            b":x\r\n",
            b"$99999999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(
                parse_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_cursor_walks_a_reply_in_place() {
        let reply = Reply::Array(vec![
            Reply::Bulk(Bytes::from_static(b"1-0")),
            Reply::Array(vec![Reply::Int(5), Reply::Nil]),
            Reply::Nil,
            Reply::Bulk(Bytes::from_static(b"last")),
        ]);
        let mut bytes = Vec::new();
        write(&reply, &mut bytes);
        let frame = Bytes::from(bytes);
        let mut c = Cursor::new(&frame);
        assert_eq!(c.array(), Some(4));
        assert_eq!(c.bulk().as_deref(), Some(&b"1-0"[..]));
        assert_eq!(
            c.bulk(),
            None,
            "an array where a string was expected is skipped"
        );
        assert_eq!(c.array(), None, "nil");
        assert_eq!(c.bulk().as_deref(), Some(&b"last"[..]));
        assert_eq!(c.bulk(), None, "the end");
    }

    #[test]
    fn numbers_are_decimal_integers() {
        assert_eq!(number(b"0").unwrap(), 0);
        assert_eq!(number(b"-1").unwrap(), -1);
        assert_eq!(number(b"9223372036854775807").unwrap(), i64::MAX);
        assert_eq!(number(b"-9223372036854775808").unwrap(), i64::MIN);
        for bad in [&b""[..], b"-", b"+1", b"1x", b" 1", b"9223372036854775808"] {
            assert!(number(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"XACK", b"s", b""]);
        assert_eq!(out, b"*3\r\n$4\r\nXACK\r\n$1\r\ns\r\n$0\r\n\r\n");
    }

    #[test]
    fn server_errors_give_their_code_and_redirection() {
        let moved = Error::Server("MOVED 3999 127.0.0.1:6381".into());
        assert_eq!(moved.code(), Some("MOVED"));
        assert_eq!(moved.moved_to(), Some(("127.0.0.1".to_owned(), 6381)));
        let nogroup = Error::Server("NOGROUP No such key".into());
        assert_eq!(nogroup.code(), Some("NOGROUP"));
        assert_eq!(nogroup.moved_to(), None);
    }

    #[test]
    fn slots_are_those_redis_computes() {
        // `CLUSTER KEYSLOT` on a Redis 7.0.
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{foo}:stream"), 12182);
        assert_eq!(slot(b"{}foo"), 9500, "an empty tag is no tag");
        assert_eq!(slot(b"a{b}c{d}"), 3300, "the first tag counts");
        assert_eq!(slot(b"{subtocall:p}:stream"), 10271);
    }
}
