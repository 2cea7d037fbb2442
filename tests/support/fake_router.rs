//! A scripted fake WAMP router, only for faults a real Crossbar cannot be made
//! to produce: malformed frames, unknown message types, oversized messages,
//! a router that goes silent. It speaks `wamp.2.json` over a WebSocket on a
//! free port, and each accepted connection is handed to the test as a
//! [`FakeSession`] to script.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const WAIT: Duration = Duration::from_secs(10);

/// Listens on 127.0.0.1 (free port) and hands over each connection.
pub struct FakeRouter {
    port: u16,
    sessions: mpsc::Receiver<FakeSession>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRouter {
    pub async fn start() -> FakeRouter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, sessions) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if let Some(ws) = accept(stream).await {
                    let _ = tx.send(FakeSession { ws }).await;
                }
            }
        });
        FakeRouter {
            port,
            sessions,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next client connection.
    pub async fn next_session(&mut self) -> FakeSession {
        tokio::time::timeout(WAIT, self.sessions.recv())
            .await
            .expect("a client connects to the fake router")
            .expect("listener alive")
    }

    /// The next client connection if one comes within `within`.
    pub async fn try_next_session(&mut self, within: Duration) -> Option<FakeSession> {
        tokio::time::timeout(within, self.sessions.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next client connection, after answering its HELLO with WELCOME.
    pub async fn next_joined(&mut self) -> FakeSession {
        let mut session = self.next_session().await;
        let hello = session.recv().await.expect("HELLO");
        assert_eq!(hello[0], 1, "first message is HELLO: {hello}");
        session.send_json(json!([2, 4242, {"realm": "realm1", "authrole": "backend", "roles": {"broker": {}, "dealer": {"features": {"call_canceling": true}}}}])).await;
        session
    }
}

impl Drop for FakeRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(stream: TcpStream) -> Option<WebSocketStream<TcpStream>> {
    tokio_tungstenite::accept_hdr_async(stream, pick_json)
        .await
        .ok()
}

// The callback's signature is tungstenite's, large error type included.
#[allow(clippy::result_large_err)]
fn pick_json(_req: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    response.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("wamp.2.json"),
    );
    Ok(response)
}

/// One client connection, scripted by the test.
pub struct FakeSession {
    ws: WebSocketStream<TcpStream>,
}

impl FakeSession {
    pub async fn send_json(&mut self, message: Value) {
        self.send_text(&message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send to the client");
    }

    /// Sends several messages in one write, so that the client reads them
    /// in one go (e.g. a reply and the event that follows it).
    pub async fn send_together(&mut self, messages: &[Value]) {
        for m in messages {
            self.ws
                .feed(Message::Text(m.to_string().into()))
                .await
                .expect("send to the client");
        }
        self.ws.flush().await.expect("send to the client");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send to the client");
    }

    /// The next WAMP message from the client (pings are answered and skipped);
    /// `None` when the client closed the connection.
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the client says something")?;
            match frame {
                Ok(Message::Text(t)) => {
                    return Some(serde_json::from_str(&t).expect("client sends JSON"));
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Closes the WebSocket with `code` (e.g. 1009, message too big).
    pub async fn close_with(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }

    /// Reads until the client closes, returning every WAMP message it sent.
    pub async fn recv_until_closed(&mut self) -> Vec<Value> {
        let mut messages = Vec::new();
        while let Some(m) = self.recv().await {
            messages.push(m);
        }
        messages
    }

    /// Stops reading from the socket (so pings go unanswered) and keeps the
    /// connection open until the returned guard is dropped.
    pub fn go_silent(self) -> SilentSession {
        SilentSession { _ws: self.ws }
    }
}

/// A connection nobody reads from.
pub struct SilentSession {
    _ws: WebSocketStream<TcpStream>,
}
