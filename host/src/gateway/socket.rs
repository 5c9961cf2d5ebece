//! What every WebSocket connection shares: a writer task draining the
//! outbox and pinging, with a write timeout, a reader that enforces frame
//! size and idle limits and answers text `ping`, the end of every
//! connection with 1001 when sluice stops, and the connection count.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::outbox::{Next, Outbox};
use crate::config::WebSocketConfig;

/// Close codes.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away (idle, or the server stops).
    pub const GOING_AWAY: u16 = 1001;
    /// Policy violation: not authenticated.
    pub const POLICY: u16 = 1008;
    /// A frame too large to read.
    pub const TOO_BIG: u16 = 1009;
    /// Try again later: the client fell too far behind.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Counts connections against the instance limit.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
}

/// A held connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot(Arc<Connections>);

impl Connections {
    /// Takes a slot, unless `limit` connections are open.
    pub fn acquire(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        let mut open = self.open.load(Ordering::Relaxed);
        loop {
            if open >= limit {
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    metrics::gauge!("sluice_ws_connections").increment(1.0);
                    return Some(Slot(self.clone()));
                }
                Err(actual) => open = actual,
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("sluice_ws_connections").decrement(1.0);
    }
}

/// What the reader hands the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text frame within the size limit (text `ping` is answered here).
    Text(String),
    /// A frame over the size limit, with its size.
    TooLarge(usize),
    /// A binary frame.
    Binary,
}

enum Control {
    Close(u16, String),
}

/// One connection, split into a reader (here) and a writer task.
pub struct Session {
    reader: SplitStream<WebSocket>,
    writer: JoinHandle<()>,
    control: mpsc::Sender<Control>,
    outbox: Arc<Outbox>,
    max_frame: usize,
    idle_timeout: Duration,
    /// When the client last proved it reads: a pong to the server's ping,
    /// or a frame of its own other than a ping.
    last_heard: Instant,
    shutdown: watch::Receiver<bool>,
    _slot: Slot,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("queued", &self.outbox.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts the writer of `socket`; the session ends with 1001 "going
    /// away" when `shutdown` turns true.
    pub fn start(
        socket: WebSocket,
        config: &WebSocketConfig,
        slot: Slot,
        shutdown: watch::Receiver<bool>,
    ) -> Session {
        let (sink, reader) = socket.split();
        let byte_limit = usize::try_from(config.send_buffer.as_u64()).unwrap_or(usize::MAX);
        let outbox = Arc::new(Outbox::new(config.send_queue, byte_limit));
        let (control, control_rx) = mpsc::channel(1);
        let writer = tokio::spawn(write(
            sink,
            outbox.clone(),
            control_rx,
            config.ping_interval,
            config.write_timeout,
        ));
        Session {
            reader,
            writer,
            control,
            outbox,
            max_frame: usize::try_from(config.max_frame.as_u64()).unwrap_or(usize::MAX),
            idle_timeout: config.idle_timeout,
            last_heard: Instant::now(),
            shutdown,
            _slot: slot,
        }
    }

    /// Whether sluice is stopping.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The connection's send queue.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Queues a frame that must arrive.
    pub fn send(&self, frame: String) {
        self.outbox.push(frame);
    }

    /// Sends what is queued, then closes with `code` and `reason`.
    pub async fn close(self, code: u16, reason: &str) {
        if self.writer.is_finished() {
            return;
        }
        let (code, reason) = if self.stopping() {
            (close::GOING_AWAY, "going away")
        } else {
            (code, reason)
        };
        let _ = self
            .control
            .send(Control::Close(code, reason.to_owned()))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer).await;
    }

    /// The next frame from the client; `None` once the connection is over
    /// (closed by the client, idle past the timeout, the writer ended, or
    /// sluice stopping). Cancel-safe.
    pub async fn next(&mut self) -> Option<Incoming> {
        loop {
            if self.writer.is_finished() {
                return None;
            }
            if self.stopping() {
                let _ = self
                    .control
                    .try_send(Control::Close(close::GOING_AWAY, "going away".into()));
                return None;
            }
            let idle_at = self.last_heard + self.idle_timeout;
            let message = tokio::select! {
                message = self.reader.next() => message,
                _ = tokio::time::sleep_until(idle_at) => {
                    metrics::counter!("sluice_ws_idle_closes_total").increment(1);
                    let _ = self.control.try_send(Control::Close(close::GOING_AWAY, "idle".into()));
                    return None;
                }
                _ = &mut self.writer => return None,
                _ = self.shutdown.changed() => continue,
            };
            // A client's own pings do not prove it reads what it is sent.
            if !matches!(&message, Some(Ok(Message::Ping(_))))
                && !matches!(&message, Some(Ok(Message::Text(text))) if text.as_str() == "ping")
            {
                self.last_heard = Instant::now();
            }
            match message {
                None | Some(Ok(Message::Close(_))) => return None,
                Some(Err(error)) => {
                    let (code, reason) = if error.to_string().contains("too long") {
                        (close::TOO_BIG, "frame too large")
                    } else {
                        (close::NORMAL, "protocol error")
                    };
                    tracing::debug!(%error, "WebSocket read failed");
                    let _ = self.control.try_send(Control::Close(code, reason.into()));
                    return None;
                }
                Some(Ok(Message::Text(text))) => {
                    if text.len() > self.max_frame {
                        return Some(Incoming::TooLarge(text.len()));
                    }
                    if text.as_str() == "ping" {
                        self.outbox.push("pong".into());
                        continue;
                    }
                    return Some(Incoming::Text(text.to_string()));
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if bytes.len() > self.max_frame {
                        return Some(Incoming::TooLarge(bytes.len()));
                    }
                    return Some(Incoming::Binary);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            }
        }
    }
}

async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    control: mpsc::Receiver<Control>,
    ping_interval: Duration,
    write_timeout: Duration,
) {
    write_until_closed(&mut sink, &outbox, control, ping_interval, write_timeout).await;
    outbox.shut();
}

/// Why the writer stopped sending.
enum Ended {
    /// The connection is closed (or a close frame was sent).
    Closed,
    /// A write did not finish within the write timeout.
    Stalled,
}

async fn write_until_closed(
    sink: &mut SplitSink<WebSocket, Message>,
    outbox: &Outbox,
    mut control: mpsc::Receiver<Control>,
    ping_interval: Duration,
    write_timeout: Duration,
) {
    let mut ping = tokio::time::interval(ping_interval);
    ping.tick().await;
    let closing = |code: u16, reason: &str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }))
    };
    // Every write gets the write timeout: a client that stops reading
    // fills its TCP window, and then the write waits.
    async fn send(
        sink: &mut SplitSink<WebSocket, Message>,
        message: Message,
        timeout: Duration,
    ) -> Result<(), Ended> {
        match tokio::time::timeout(timeout, sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Closed),
            Err(_) => Err(Ended::Stalled),
        }
    }
    let ended = loop {
        let sent = tokio::select! {
            biased;
            next = outbox.next() => match next {
                Next::Frame(frame) => {
                    metrics::counter!("sluice_ws_frames_sent_total").increment(1);
                    send(sink, Message::Text(frame.into()), write_timeout).await
                }
                Next::TooSlow => {
                    metrics::counter!("sluice_ws_slow_consumer_closes_total").increment(1);
                    tracing::info!("closing a WebSocket client that fell too far behind");
                    let _ = send(sink, closing(close::TRY_AGAIN_LATER, "too slow: send queue full"), write_timeout).await;
                    return;
                }
            },
            command = control.recv() => {
                if let Some(Control::Close(code, reason)) = command {
                    // What is queued goes first (an error frame before a close).
                    while let Some(frame) = outbox.try_frame() {
                        if send(sink, Message::Text(frame.into()), write_timeout).await.is_err() {
                            return;
                        }
                    }
                    let _ = send(sink, closing(code, &reason), write_timeout).await;
                }
                return;
            }
            _ = ping.tick() => send(sink, Message::Ping(Default::default()), write_timeout).await,
        };
        if let Err(ended) = sent {
            break ended;
        }
    };
    if let Ended::Stalled = ended {
        metrics::counter!("sluice_ws_write_timeouts_total").increment(1);
        tracing::info!(
            ?write_timeout,
            "closing a WebSocket client that stopped reading"
        );
        // The close frame gets one more short chance; then the TCP
        // connection is simply dropped.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(closing(close::TRY_AGAIN_LATER, "too slow: write timed out")),
        )
        .await;
    }
}
