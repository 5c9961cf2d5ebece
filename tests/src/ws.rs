//! A real WebSocket client for tests: JSON frames in and out, with
//! timeouts, and the close code the server ends with.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for one frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

/// JSON frames of a connection by the subscription `id` they carry.
pub type Frames = BTreeMap<String, Vec<Value>>;

/// The `position.offset` of a frame that must have one.
pub fn offset(frame: &Value) -> u64 {
    frame["position"]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("a position in {frame}"))
}

/// One client connection.
#[derive(Debug)]
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server did next.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A text frame that is JSON.
    Json(Value),
    /// A text frame that is not JSON (`pong`).
    Text(String),
    /// A close frame: code and reason.
    Closed(u16, String),
}

impl WsClient {
    /// Connects to `url` (`ws://…`), with extra headers.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Self, String> {
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| e.to_string())?,
                value.parse().map_err(|e| format!("{e}"))?,
            );
        }
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(WsClient { stream })
    }

    /// Connects to `url` (`ws://host:port/…`) with a receive buffer of
    /// `bytes`: a client that stops reading then backs the server up after
    /// a few frames instead of after megabytes of them.
    pub async fn connect_with_receive_buffer(url: &str, bytes: u32) -> Self {
        let request = url.into_client_request().expect("a WebSocket URL");
        let uri = request.uri();
        let address = format!(
            "{}:{}",
            uri.host().expect("a host"),
            uri.port_u16().expect("a port")
        );
        let address = tokio::net::lookup_host(&address)
            .await
            .expect("the host resolves")
            .next()
            .expect("an address");
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .expect("a socket");
        // Set before connecting, so the window the server sees is small.
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let tcp = socket.connect(address).await.expect("the server accepts");
        let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        WsClient { stream }
    }

    /// Connects to `url`.
    pub async fn connect(url: &str) -> Self {
        Self::connect_with(url, &[])
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::text(text))
            .await
            .expect("the frame is sent");
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, frame: &Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// The next frame (pings are answered by the library and skipped).
    pub async fn receive(&mut self, wait: Duration) -> Option<Received> {
        loop {
            let message = tokio::time::timeout(wait, self.stream.next())
                .await
                .ok()??;
            match message {
                Ok(Message::Text(text)) => {
                    return Some(match serde_json::from_str(&text) {
                        Ok(value) => Received::Json(value),
                        Err(_) => Received::Text(text.to_string()),
                    });
                }
                Ok(Message::Close(frame)) => {
                    return Some(frame.map_or(Received::Closed(1005, String::new()), |f| {
                        Received::Closed(f.code.into(), f.reason.to_string())
                    }));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next JSON frame; panics on anything else.
    pub async fn next_json(&mut self) -> Value {
        match self.receive(FRAME_WAIT).await {
            Some(Received::Json(value)) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Sends a `subscribe` frame and returns its answer, which must be
    /// `subscribed`.
    pub async fn subscribe(&mut self, frame: &Value) -> Value {
        self.send(frame).await;
        let answer = self.next_json().await;
        assert_eq!(answer["type"], "subscribed", "{answer}");
        answer
    }

    /// The next JSON frame whose `type` is `kind`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next_json().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// The close code and reason the server ends with, skipping frames.
    pub async fn closed(&mut self, wait: Duration) -> (u16, String) {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.receive(left).await {
                Some(Received::Closed(code, reason)) => return (code, reason),
                Some(_) => {}
                None => panic!("no close frame within {wait:?}"),
            }
        }
    }

    /// Whether no frame arrives within `wait`.
    pub async fn quiet(&mut self, wait: Duration) -> Option<Received> {
        self.receive(wait).await
    }

    /// JSON frames until the connection is quiet for `quiet`, by `id`.
    pub async fn drain(&mut self, quiet: Duration) -> Frames {
        let mut frames = Frames::new();
        while let Some(received) = self.quiet(quiet).await {
            if let Received::Json(frame) = received {
                let id = frame["id"].as_str().unwrap_or_default().to_owned();
                frames.entry(id).or_default().push(frame);
            }
        }
        frames
    }

    /// Adds the connection's frames to `frames` until `done` holds of
    /// them; panics naming `what` after `wait`.
    pub async fn collect_until(
        &mut self,
        frames: &mut Frames,
        wait: Duration,
        what: &str,
        done: impl Fn(&Frames) -> bool,
    ) {
        let until = tokio::time::Instant::now() + wait;
        while !done(frames) {
            assert!(
                tokio::time::Instant::now() < until,
                "no {what} within {wait:?}: {frames:?}"
            );
            for (id, more) in self.drain(Duration::from_millis(200)).await {
                frames.entry(id).or_default().extend(more);
            }
        }
    }
}
