//! A tiny blocking Redis client (RESP2) for what the benchmark asks Redis:
//! PING, LLEN, DEL, SADD, INFO. Integer, status, error and (for INFO) bulk
//! string replies are understood.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};

pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn connect(port: u16) -> Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends one command; returns an integer reply, or 0 for a status reply.
    pub fn command(&mut self, args: &[&str]) -> Result<i64> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(req.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let line = line.trim_end();
        match line.as_bytes().first() {
            Some(b':') => Ok(line[1..].parse()?),
            Some(b'+') => Ok(0),
            Some(b'-') => bail!("redis: {}", &line[1..]),
            _ => Err(anyhow!("unexpected redis reply {line:?}")),
        }
    }

    /// Sends one command whose reply is a bulk string (INFO).
    pub fn text(&mut self, args: &[&str]) -> Result<String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(req.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let Some(len) = line.trim_end().strip_prefix('$') else {
            bail!("unexpected redis reply {:?}", line.trim_end());
        };
        let mut body = vec![0; len.parse::<usize>()? + 2];
        std::io::Read::read_exact(&mut self.reader, &mut body)?;
        body.truncate(body.len() - 2);
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
