//! A tiny RESP2 client for tests: one command per TCP connection, replies parsed in full.
//!
//! Just enough to inspect what the sidecar wrote to Redis (`LLEN`, `LRANGE`, ...) without a
//! Redis crate. `parse` is pure; `command` does the IO with a 5 s timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for connecting, writing and reading one command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `None` is the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` is the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The integer of an `Integer` reply; panics otherwise.
    pub fn integer(&self) -> i64 {
        match self {
            Reply::Integer(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// The UTF-8 text of a simple or bulk string reply; `None` for the null bulk string.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Bulk(Some(bytes)) => {
                Some(String::from_utf8(bytes.clone()).expect("UTF-8 bulk string"))
            }
            Reply::Bulk(None) => None,
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    /// The elements of an array of bulk strings, as UTF-8 text.
    pub fn texts(&self) -> Vec<String> {
        match self {
            Reply::Array(Some(items)) => items
                .iter()
                .map(|item| item.text().expect("non-null element"))
                .collect(),
            Reply::Array(None) => Vec::new(),
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

/// Sends one command to 127.0.0.1:`port` and returns the reply (an error reply is `Ok`).
pub async fn command(port: u16, args: &[&str]) -> std::io::Result<Reply> {
    tokio::time::timeout(COMMAND_TIMEOUT, command_inner(port, args))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "redis command timed out"))?
}

async fn command_inner(port: u16, args: &[&str]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(&encode(args)).await?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match parse(&buffer) {
            Ok(Some((reply, _used))) => return Ok(reply),
            Ok(None) => {}
            Err(message) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    message,
                ));
            }
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "redis closed the connection mid-reply",
            ));
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the start of `input`: `Ok(None)` when more bytes are needed,
/// otherwise the reply and how many bytes it used.
pub fn parse(input: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = input.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = input[..line_end].split_first() else {
        return Err("empty RESP line".to_owned());
    };
    let line = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let after_line = line_end + 2;
    let number = || {
        line.parse::<i64>()
            .map_err(|e| format!("bad RESP length {line:?}: {e}"))
    };
    match kind {
        b'+' => Ok(Some((Reply::Simple(line.to_owned()), after_line))),
        b'-' => Ok(Some((Reply::Error(line.to_owned()), after_line))),
        b':' => Ok(Some((Reply::Integer(number()?), after_line))),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Reply::Bulk(None), after_line)));
            };
            if input.len() < after_line + len + 2 {
                return Ok(None);
            }
            let data = input[after_line..after_line + len].to_vec();
            Ok(Some((Reply::Bulk(Some(data)), after_line + len + 2)))
        }
        b'*' => {
            let Ok(count) = usize::try_from(number()?) else {
                return Ok(Some((Reply::Array(None), after_line)));
            };
            let mut used = after_line;
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                match parse(&input[used..])? {
                    Some((item, item_len)) => {
                        items.push(item);
                        used += item_len;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), used)))
        }
        other => Err(format!("unknown RESP type byte {other:#04x}")),
    }
}
