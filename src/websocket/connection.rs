//! An accepted WebSocket: tokio-tungstenite frames the upgraded socket.
//!
//! The reader (this task) owns the decision of how the socket ends: a peer
//! Close, a drop, a protocol failure, a keepalive or idle timeout, the
//! application's close deadline, or server shutdown.  The writer (a task of
//! its own) sends what the application queued, so a client that stops
//! reading stalls only the writer, never the detection of its departure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::session::{Ending, Outbound, Session};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// How long the writer may take to flush a final Close frame.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

const FAR: Duration = Duration::from_secs(86_400 * 365);

pub async fn run(session: Arc<Session>, upgraded: Upgraded, shutdown: watch::Receiver<bool>) {
    let settings = &session.settings;
    let config = WebSocketConfig::default()
        .max_frame_size(settings.max_frame_size)
        // A message may span frames; bound it too, generously.
        .max_message_size(settings.max_frame_size.map(|f| f.max(16 << 20)));
    let socket = Socket::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let Some(outbound) = session.take_outbound() else {
        return;
    };
    let (sink, stream) = socket.split();
    let (write_failed_tx, write_failed_rx) = watch::channel(false);
    let writer = tokio::spawn(write_loop(session.clone(), sink, outbound, write_failed_tx));
    session.touch();

    let ending = read_loop(&session, stream, shutdown, write_failed_rx).await;
    // A drop or a dead peer gets no Close frame; every other ending has one
    // queued (ours, or tungstenite's reply) that should reach the peer.
    let flush = ending.clean
        || !matches!(
            ending.reason.as_str(),
            "client_closed" | "keepalive_timeout" | "write_error" | "idle_timeout"
        );
    session.end(ending);
    if flush {
        // Let a Close frame already queued (ours or the reply) reach the peer.
        session.finish_writer();
        let mut writer = writer;
        if tokio::time::timeout(FINAL_FLUSH, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    } else {
        writer.abort();
    }
}

/// Why reading stopped, before it becomes an [`Ending`].
fn error_ending(session: &Session, err: &WsError) -> Ending {
    match err {
        WsError::Utf8(_) => {
            session.close_frame(1007, "Invalid UTF-8");
            Ending::protocol(1007)
        }
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            tracing::warn!("PAGI connection error: Payload is too big.");
            session.close_frame(1009, "Message too big");
            Ending::protocol(1009)
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Ending::abnormal("client_closed")
        }
        WsError::Protocol(p) => {
            tracing::debug!("WebSocket protocol error: {p}");
            session.close_frame(1002, "Protocol error");
            Ending::protocol(1002)
        }
        WsError::Io(e) => {
            tracing::debug!("WebSocket read error: {e}");
            Ending::abnormal("client_closed")
        }
        _ => Ending::abnormal("client_closed"),
    }
}

async fn read_loop(
    session: &Session,
    mut stream: futures_util::stream::SplitStream<Socket>,
    mut shutdown: watch::Receiver<bool>,
    mut write_failed: watch::Receiver<bool>,
) -> Ending {
    let settings = session.settings.clone();
    // The peer's Close, once seen: reported when the socket finishes.
    let mut peer_close: Option<Ending> = None;
    let mut next_ping: Option<Instant> = None;
    let mut pong_deadline: Option<Instant> = None;
    let mut keepalive = None;
    loop {
        let wake = session.reader_wake.notified();
        let taken = session.taken.notified();
        // Past --max-receive-queue messages in transit to the interpreter,
        // stop reading: TCP pushes back instead of memory growing.
        let may_read = session.may_read();
        let view = session.reader_view();
        if let Some(forced) = view.forced {
            return forced;
        }
        // websocket.keepalive changed: start its schedule again.
        if view.keepalive != keepalive {
            keepalive = view.keepalive;
            next_ping = keepalive.map(|k| Instant::now() + k.interval);
            if keepalive.and_then(|k| k.timeout).is_none() {
                pong_deadline = None;
            }
        }
        let now = Instant::now();
        let idle_in = settings
            .idle_timeout
            .map_or(FAR, |limit| limit.saturating_sub(session.idle_for()));
        let close_in = view.app_closed_at.map_or(FAR, |at| {
            (at + settings.close_timeout).saturating_duration_since(now)
        });
        let ping_in = next_ping.map_or(FAR, |t| t.saturating_duration_since(now));
        let pong_in = pong_deadline.map_or(FAR, |t| t.saturating_duration_since(now));
        let timer = idle_in.min(close_in).min(ping_in).min(pong_in);

        tokio::select! {
            _ = taken, if !may_read => {}
            frame = stream.next(), if may_read => match frame {
                Some(Ok(Message::Text(text))) => {
                    if peer_close.is_none() {
                        session.deliver(true, text.into());
                    }
                }
                Some(Ok(Message::Binary(data))) => {
                    if peer_close.is_none() {
                        session.deliver(false, data);
                    }
                }
                Some(Ok(Message::Ping(_))) => session.touch(), // tungstenite answers it
                Some(Ok(Message::Pong(_))) => {
                    session.touch();
                    pong_deadline = None;
                }
                Some(Ok(Message::Close(frame))) => {
                    session.touch();
                    peer_close = Some(match frame {
                        // tungstenite replaced an invalid close code with 1002
                        // and answered it: that is our protocol close.
                        Some(f) if f.code == CloseCode::Protocol && f.reason == "Protocol violation" => {
                            Ending::protocol(1002)
                        }
                        Some(f) => Ending {
                            code: u16::from(f.code),
                            reason: f.reason.to_string(),
                            clean: true,
                        },
                        None => Ending { code: 1005, reason: String::new(), clean: true },
                    });
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => {
                    return peer_close.unwrap_or_else(|| Ending::abnormal("client_closed"));
                }
                Some(Err(e)) => {
                    if let Some(closed) = peer_close {
                        return closed;
                    }
                    return error_ending(session, &e);
                }
            },
            _ = tokio::time::sleep(timer) => {
                let now = Instant::now();
                if pong_deadline.is_some_and(|t| t <= now) {
                    tracing::warn!("WebSocket keepalive timeout - no pong received");
                    return Ending::abnormal("keepalive_timeout");
                }
                if let Some(limit) = settings.idle_timeout {
                    if session.idle_for() >= limit {
                        tracing::warn!(
                            "WebSocket idle timeout ({}s) - closing connection",
                            limit.as_secs()
                        );
                        return Ending::abnormal("idle_timeout");
                    }
                }
                if view.app_closed_at.is_some_and(|at| at + settings.close_timeout <= now) {
                    return peer_close.unwrap_or_else(|| Ending::abnormal("close_timeout"));
                }
                if let (Some(k), Some(t)) = (keepalive, next_ping) {
                    if t <= now {
                        session.queue_control(Message::Ping(Default::default()));
                        next_ping = Some(now + k.interval);
                        if let (Some(timeout), None) = (k.timeout, pong_deadline) {
                            pong_deadline = Some(now + timeout);
                        }
                    }
                }
            }
            _ = wake => {}
            Ok(_) = shutdown.wait_for(|down| *down) => {
                session.close_frame(1001, "Server shutting down");
                return Ending::abnormal("server_shutdown");
            }
            Ok(_) = write_failed.wait_for(|failed| *failed) => {
                return Ending::abnormal("write_error");
            }
        }
    }
}

/// Sends queued messages, many per flush when they are waiting.
async fn write_loop(
    session: Arc<Session>,
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    failed: watch::Sender<bool>,
) {
    const BATCH: usize = 64;
    while let Some(first) = outbound.recv().await {
        let mut data_bytes = 0;
        let mut finish = false;
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(item) = next.take() {
            let message = match item {
                Outbound::Data(m, len) => {
                    data_bytes += len;
                    m
                }
                Outbound::Control(m) => m,
                Outbound::Finish => {
                    finish = true;
                    break;
                }
            };
            match sink.feed(message).await {
                Ok(()) => {}
                // After a Close, later messages are dropped, as the spec
                // wants sends after the end to be quiet.
                Err(WsError::Protocol(ProtocolError::SendAfterClosing)) => {}
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
                Err(e) => {
                    tracing::debug!("WebSocket write error: {e}");
                    let _ = failed.send(true);
                    return;
                }
            }
            batched += 1;
            if batched < BATCH {
                next = outbound.try_recv().ok();
            }
        }
        match sink.flush().await {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(e) => {
                tracing::debug!("WebSocket write error: {e}");
                let _ = failed.send(true);
                return;
            }
        }
        if data_bytes > 0 {
            session.sent(data_bytes);
        }
        if finish {
            return;
        }
    }
}
