//! An accepted WebSocket: tokio-tungstenite frames the upgraded socket.
//!
//! The reader (this task) owns the decision of how the socket ends: a peer
//! Close, a drop, a protocol failure, a keepalive or idle timeout, a closing
//! phase that ran out of time, server shutdown or the application's abort.
//! The writer (a task of its own) sends what the application queued, so a
//! client that stops reading stalls only the writer, never the detection of
//! its departure.
//!
//! A client that takes no byte of what is written to it for `--timeout`
//! (write_stall.rs) is gone: the reader, which watches every other bound,
//! watches that one too.
//!
//! The application hears `websocket.disconnect` only once the transport is
//! really closed (Www 0.6).  A closing handshake has two phases, each bounded
//! by `--ws-close-timeout`: the Close frames are exchanged (a peer that never
//! answers ends `close_timeout`), then the server closes its side of the TCP
//! connection and waits for the peer to close its own (one that never does
//! ends `close_incomplete`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::outbox::OutboxReceiver;
use super::session::{Ending, Outbound, Session};
use crate::write_stall::{Watched, WriteStall};

/// The byte stream under an accepted WebSocket: hyper's upgraded socket on
/// HTTP/1.1, one stream on HTTP/2 (http2::io).  Boxed: one virtual call per
/// read or write costs nothing next to framing, and keeps one `run`.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type Transport = Box<dyn Io>;

type Socket = WebSocketStream<Transport>;
type Sink = SplitSink<Socket, Message>;
type Stream = SplitStream<Socket>;

/// How long the writer may take to flush a final Close frame of a failed
/// connection (no handshake follows it), and then the peer to close its
/// side (our lingering close).
const FINAL_FLUSH: Duration = Duration::from_secs(2);

const FAR: Duration = Duration::from_secs(86_400 * 365);

/// Why reading stopped, and what is left to do with the transport.
enum ReadEnd {
    /// Drop the connection now: the peer is gone, or the app aborted.
    Drop(Ending),
    /// Our Close for a server shutting down is queued: let it out, then
    /// drop the connection (the process is going; a peer that does not
    /// answer must not hold it up).
    Flush(Ending),
    /// We failed the connection (a rule the peer broke): let our Close
    /// out, then close in order, reading until the peer's FIN.
    Fail(Ending),
    /// The Close frames were exchanged: close the TCP connection cleanly.
    Handshake(Ending),
}

pub async fn run(session: Arc<Session>, transport: Transport, shutdown: watch::Receiver<bool>) {
    let settings = &session.settings;
    let config = settings.tungstenite_config();
    let stall = Arc::new(WriteStall::default());
    let transport: Transport = Box::new(Watched::new(transport, stall.clone()));
    let socket = Socket::from_raw_socket(transport, Role::Server, Some(config)).await;
    let Some(outbound) = session.take_outbound() else {
        return;
    };
    let (sink, mut stream) = socket.split();
    let (write_failed_tx, write_failed_rx) = watch::channel(None);
    let mut writer = tokio::spawn(write_loop(session.clone(), sink, outbound, write_failed_tx));
    session.touch();

    let end = read_loop(&session, &mut stream, shutdown, write_failed_rx, &stall).await;
    session.reading_over();
    let close_timeout = session.settings.close_timeout;
    let ending = match end {
        ReadEnd::Drop(ending) => {
            writer.abort();
            let _ = (&mut writer).await;
            drop(stream);
            ending
        }
        ReadEnd::Flush(ending) => {
            session.finish_writer();
            let _ = final_flush(&mut writer).await;
            drop(stream);
            ending
        }
        ReadEnd::Fail(ending) => {
            session.finish_writer();
            // A lingering close.  Closed at once with the peer's later
            // bytes unread, the socket would answer them with a reset,
            // which can destroy our Close frame in the peer's buffer before
            // it reads it: a client that broke a rule would see the
            // connection fail without learning which (RFC 6455 7.1.1 has the
            // server close first, cleanly).  Bounded like the flush.
            let sink = final_flush(&mut writer).await;
            if let Some(Ok(socket)) = sink.map(|sink| sink.reunite(stream)) {
                close_transport(socket, FINAL_FLUSH).await;
            }
            ending
        }
        ReadEnd::Handshake(ending) => {
            session.finish_writer();
            let sink = match tokio::time::timeout(close_timeout, &mut writer).await {
                Ok(Ok(sink)) => sink,
                _ => {
                    writer.abort();
                    None
                }
            };
            let closed = match sink.map(|sink| sink.reunite(stream)) {
                Some(Ok(socket)) => close_transport(socket, close_timeout).await,
                _ => false,
            };
            if closed {
                ending
            } else {
                Ending {
                    peer: ending.peer,
                    ..Ending::abnormal(
                        "close_incomplete",
                        format!(
                            "the peer did not close the connection within {}s of the closing handshake (--ws-close-timeout)",
                            close_timeout.as_secs()
                        ),
                    )
                }
            }
        }
    };
    // The transport is closed (dropped) by now: only then does the app hear.
    session.end(ending);
}

/// Wait (up to FINAL_FLUSH) for the writer, told to finish, to let out
/// what is queued: its half of the socket back, or None if it failed or
/// took too long (then it is stopped).
async fn final_flush(writer: &mut tokio::task::JoinHandle<Option<Sink>>) -> Option<Sink> {
    match tokio::time::timeout(FINAL_FLUSH, &mut *writer).await {
        Ok(Ok(sink)) => sink,
        _ => {
            writer.abort();
            let _ = writer.await;
            None
        }
    }
}

/// Close our side of the TCP connection and wait for the peer to close its
/// own (RFC 6455 7.1.1: the server closes first).  True when it did.
async fn close_transport(mut socket: Socket, limit: Duration) -> bool {
    let io = socket.get_mut();
    let closed = async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 512];
        loop {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(limit, closed).await.is_ok()
}

/// A read error, as an ending: the rule a peer broke is the detail.
fn error_ending(session: &Session, err: &WsError) -> ReadEnd {
    match err {
        WsError::Utf8(_) => {
            session.close_frame(1007, "Invalid UTF-8");
            ReadEnd::Fail(Ending::protocol(
                1007,
                "a text frame or Close reason is not valid UTF-8".into(),
            ))
        }
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            tracing::warn!("PAGI connection error: Payload is too big.");
            session.close_frame(1009, "Message too big");
            ReadEnd::Fail(Ending::protocol(
                1009,
                too_big_detail(&session.settings, *size, *max_size),
            ))
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ReadEnd::Drop(Ending::abnormal(
                "client_closed",
                "connection reset without a closing handshake".to_string(),
            ))
        }
        WsError::Protocol(p) => {
            tracing::debug!("WebSocket protocol error: {p}");
            session.close_frame(1002, "Protocol error");
            ReadEnd::Fail(Ending::protocol(1002, p.to_string()))
        }
        WsError::Io(e) => {
            tracing::debug!("WebSocket read error: {e}");
            ReadEnd::Drop(Ending::abnormal("client_closed", e.to_string()))
        }
        other => ReadEnd::Drop(Ending::abnormal("client_closed", other.to_string())),
    }
}

/// Which limit a too-big frame or message broke.  tungstenite reports both
/// alike, with the limit it applied: the frame limit is the smaller of the
/// two (see Settings::effective_frame_limit), so a limit other than the
/// message's is the frame's.  When the two are equal a frame over it is a
/// message over it too.
fn too_big_detail(settings: &super::Settings, size: usize, max_size: usize) -> String {
    if settings.max_frame_size.is_none() && settings.max_message_size.is_none() {
        format!(
            "a frame or message of {size} bytes exceeds the server's own limit of {max_size} bytes"
        )
    } else if settings.max_message_size == Some(max_size) {
        // For a fragmented message `size` is what had arrived when it broke the limit.
        format!(
            "a message of {size} bytes or more exceeds the limit of {max_size} bytes (--max-ws-message-size)"
        )
    } else {
        format!(
            "a frame of {size} bytes exceeds the limit of {max_size} bytes (--max-ws-frame-size)"
        )
    }
}

async fn read_loop(
    session: &Session,
    stream: &mut Stream,
    mut shutdown: watch::Receiver<bool>,
    mut write_failed: watch::Receiver<Option<String>>,
    stall: &WriteStall,
) -> ReadEnd {
    let settings = session.settings.clone();
    let limit = settings.close_timeout;
    // The peer's Close, once seen, and when: its handshake ends when
    // tungstenite has sent the answer.
    let mut peer_close: Option<(Ending, Instant)> = None;
    let mut next_ping: Option<Instant> = None;
    let mut pong_deadline: Option<Instant> = None;
    let mut keepalive = None;
    loop {
        let wake = session.reader_wake.notified();
        let taken = session.taken.notified();
        let view = session.reader_view();
        if let Some(forced) = &view.forced {
            if forced.immediate {
                return ReadEnd::Drop(forced.ending.clone());
            }
        }
        // A Close of ours is out (the app's, or the server's 1008/1011).
        let our_close_at = view.app_closed_at.or(view.forced.as_ref().map(|f| f.at));
        let closing = our_close_at.is_some() || peer_close.is_some();
        // Past --max-receive-queue messages in transit to the interpreter,
        // stop reading: TCP pushes back instead of memory growing.  While
        // closing, read on: the peer's Close must be seen.
        let may_read = session.may_read();
        // websocket.keepalive changed: start its schedule again.
        if view.keepalive != keepalive {
            keepalive = view.keepalive;
            next_ping = keepalive.map(|k| Instant::now() + k.interval);
            if keepalive.and_then(|k| k.timeout).is_none() {
                pong_deadline = None;
            }
        }
        let now = Instant::now();
        let closing_deadline = match (&peer_close, our_close_at) {
            (Some((_, at)), _) => Some(*at + limit),
            (None, Some(at)) => Some(at + limit),
            (None, None) => None,
        };
        let close_in = closing_deadline.map_or(FAR, |d| d.saturating_duration_since(now));
        let idle_in = match settings.idle_timeout {
            Some(idle) if !closing => idle.saturating_sub(session.idle_for()),
            _ => FAR,
        };
        let ping_in = next_ping
            .filter(|_| !closing)
            .map_or(FAR, |t| t.saturating_duration_since(now));
        let pong_in = pong_deadline.map_or(FAR, |t| t.saturating_duration_since(now));
        // A stall that begins while this sleeps is seen at its next wake-up:
        // within the timeout, or twice it at most.
        let stall_in = match settings.write_timeout {
            Some(limit) if !closing => stall
                .deadline(limit)
                .map_or(limit, |t| t.saturating_duration_since(now)),
            _ => FAR,
        };
        let timer = idle_in
            .min(close_in)
            .min(ping_in)
            .min(pong_in)
            .min(stall_in);
        // Messages are the app's only while nobody is closing the socket on
        // the server's side, and until the peer said Close.
        let deliver = view.forced.is_none() && peer_close.is_none();

        tokio::select! {
            _ = taken, if !may_read && !closing => {}
            frame = stream.next(), if may_read || closing => match frame {
                Some(Ok(Message::Text(text))) => {
                    session.touch();
                    if deliver {
                        session.deliver(true, text.into());
                    }
                }
                Some(Ok(Message::Binary(data))) => {
                    session.touch();
                    if deliver {
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
                    session.peer_closed();
                    let ending = match frame {
                        // tungstenite replaced an invalid close code with 1002
                        // and answered it: that is our protocol close.
                        Some(f) if f.code == CloseCode::Protocol && f.reason == "Protocol violation" => {
                            return ReadEnd::Fail(Ending::protocol(
                                1002,
                                "the peer's Close frame carried an invalid close code".into(),
                            ));
                        }
                        // The answer to a Close of ours: tungstenite passes
                        // its code on unchecked, since there is nothing left
                        // to answer.  A code no peer may send still breaks
                        // the protocol, and the app is told so, not given
                        // the code (the handshake itself is over: the
                        // connection then closes in order).
                        Some(f) if !f.code.is_allowed() => Ending::protocol(
                            1002,
                            format!(
                                "the peer's answer to our Close carried the invalid close code {}",
                                u16::from(f.code)
                            ),
                        ),
                        Some(f) => Ending::handshake(u16::from(f.code), f.reason.to_string()),
                        None => Ending::handshake(1005, String::new()),
                    };
                    peer_close = Some((ending, Instant::now()));
                }
                Some(Ok(Message::Frame(_))) => {}
                // tungstenite's server side reports the handshake complete
                // (ConnectionClosed, which tokio-tungstenite turns into the
                // end of the stream) once its answer to the peer's Close is
                // flushed; then the TCP connection is closed in order.  The
                // end of the stream without a Close is the peer gone.
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => {
                    return match peer_close {
                        Some((ending, _)) => ReadEnd::Handshake(ending),
                        None => ReadEnd::Drop(Ending::abnormal(
                            "client_closed",
                            "the connection closed without a closing handshake".to_string(),
                        )),
                    };
                }
                Some(Err(e)) => {
                    if let Some((ending, _)) = peer_close {
                        return ReadEnd::Drop(ending);
                    }
                    return error_ending(session, &e);
                }
            },
            _ = tokio::time::sleep(timer) => {
                let now = Instant::now();
                if pong_deadline.is_some_and(|t| t <= now) {
                    tracing::warn!("WebSocket keepalive timeout - no pong received");
                    let waited = keepalive.and_then(|k| k.timeout).unwrap_or_default();
                    return ReadEnd::Drop(Ending::abnormal(
                        "keepalive_timeout",
                        format!("no pong within {}s of a ping", waited.as_secs_f64()),
                    ));
                }
                if closing_deadline.is_some_and(|d| d <= now) {
                    return ReadEnd::Drop(match peer_close {
                        Some((ending, _)) => Ending {
                            peer: ending.peer,
                            ..Ending::abnormal(
                                "close_incomplete",
                                format!(
                                    "the answer to the peer's Close could not be sent within {}s (--ws-close-timeout)",
                                    limit.as_secs()
                                ),
                            )
                        },
                        None => Ending::abnormal(
                            "close_timeout",
                            format!("no Close from the peer within {}s of ours (--ws-close-timeout)", limit.as_secs()),
                        ),
                    });
                }
                if let (Some(limit), false) = (settings.write_timeout, closing) {
                    if stall.deadline(limit).is_some_and(|t| t <= now) {
                        tracing::debug!("WebSocket client took nothing written to it for {}s: closing", limit.as_secs());
                        return ReadEnd::Drop(Ending::abnormal(
                            "client_timeout",
                            format!(
                                "the client took no byte of what was sent for {}s (--timeout)",
                                limit.as_secs().max(1)
                            ),
                        ));
                    }
                }
                if let (Some(idle), false) = (settings.idle_timeout, closing) {
                    if session.idle_for() >= idle {
                        tracing::warn!(
                            "WebSocket idle timeout ({}s) - closing connection",
                            idle.as_secs()
                        );
                        return ReadEnd::Drop(Ending::abnormal(
                            "idle_timeout",
                            format!("no frame either way for {}s (--ws-idle-timeout)", idle.as_secs()),
                        ));
                    }
                }
                if let (Some(k), Some(t), false) = (keepalive, next_ping, closing) {
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
                return ReadEnd::Flush(Ending::abnormal(
                    "server_shutdown",
                    "the server is shutting down".to_string(),
                ));
            }
            Ok(failed) = write_failed.wait_for(Option::is_some) => {
                let error = failed.clone().unwrap_or_default();
                return ReadEnd::Drop(Ending::abnormal("write_error", error));
            }
        }
    }
}

/// Sends queued messages, many per flush when they are waiting.  Hands its
/// half of the socket back when told to finish, for the closing handshake's
/// last step.
async fn write_loop(
    session: Arc<Session>,
    mut sink: Sink,
    mut outbound: OutboxReceiver<Outbound>,
    failed: watch::Sender<Option<String>>,
) -> Option<Sink> {
    const BATCH: usize = 64;
    while let Some(first) = outbound.recv().await {
        let mut data_bytes = 0;
        let mut data_messages = 0;
        let mut finish = false;
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(item) = next.take() {
            let message = match item {
                Outbound::Data(m, len) => {
                    data_bytes += len;
                    data_messages += 1;
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
                    let _ = failed.send(Some(e.to_string()));
                    return None;
                }
            }
            batched += 1;
            if batched < BATCH {
                next = outbound.try_recv();
            }
        }
        // The split sink holds the last message fed until this flush, so a
        // send tungstenite refuses after the peer's Close is refused here:
        // dropped like those refused at feed.  The flush must then go on,
        // for what tungstenite has queued itself: its answer to that Close.
        let mut flushed = sink.flush().await;
        if matches!(
            flushed,
            Err(WsError::Protocol(ProtocolError::SendAfterClosing))
        ) {
            flushed = sink.flush().await;
        }
        match flushed {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(e) => {
                tracing::debug!("WebSocket write error: {e}");
                let _ = failed.send(Some(e.to_string()));
                return None;
            }
        }
        if data_messages > 0 {
            session.sent(data_messages, data_bytes);
        }
        if finish {
            return Some(sink);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    }

    /// The app's answer to a message reaches the writer after the peer's
    /// Close: the split sink holds it until the flush, where tungstenite
    /// refuses it.  The flush must still let out tungstenite's own answer to
    /// that Close (here to an invalid code: 1002).
    #[tokio::test]
    async fn a_send_refused_after_the_peers_close_does_not_hold_back_the_answer_to_it() {
        let (session, _head) = crate::websocket::session::tests::session();
        session.accept(None, &[]).unwrap();
        session.send(true, b"answer").unwrap();
        session.finish_writer();

        let (server_end, mut client) = tokio::io::duplex(4096);
        let transport: Transport = Box::new(server_end);
        let socket = Socket::from_raw_socket(transport, Role::Server, None).await;
        let (sink, mut stream) = socket.split();
        client
            .write_all(&client_frame(0x8, &999u16.to_be_bytes()))
            .await
            .unwrap();
        let close = stream.next().await.unwrap().unwrap();
        assert!(matches!(close, Message::Close(Some(ref f)) if f.code == CloseCode::Protocol));

        let (failed_tx, failed_rx) = watch::channel(None);
        let outbound = session.take_outbound().unwrap();
        let sink = write_loop(session.clone(), sink, outbound, failed_tx).await;
        assert!(
            sink.is_some(),
            "the writer finished, not failed: {:?}",
            *failed_rx.borrow()
        );

        let mut answer = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut answer))
            .await
            .expect("the answer to the Close was sent")
            .unwrap();
        // 0x88: a final Close; 20 bytes: the code and tungstenite's reason.
        assert_eq!(
            answer,
            [0x88, 20, 0x03, 0xea],
            "a Close 1002, nothing before it"
        );
    }
}
