//! One WebSocket's shared state: the application's sends arrive here from
//! the interpreter thread, the connection tasks take them from here, and
//! the end of the socket is decided here exactly once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::StatusCode;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::outbox::{outbox, OutboxReceiver, OutboxSender};
use super::Settings;
use crate::error::SendError;
use crate::exchange::{Exchange, FinishOutcome, SendOutcome};
use crate::interp::mailbox::Mailbox;
use crate::interp::messages::ToPerl;

/// Which bound on what the application leaves unread it broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnreadLimit {
    /// `--max-receive-queue` messages.
    Messages(usize),
    /// The inbound byte budget (`--max-ws-message-size`).
    Bytes(usize),
}

/// What the writer task sends, in order.
pub enum Outbound {
    /// An application message; counts toward the water marks.
    Data(Message, usize),
    /// A ping or a Close frame of the server's own.
    Control(Message),
    /// Flush and stop: the socket is ending.
    Finish,
}

/// How the socket ended, as `websocket.disconnect` and `pagi.connection`
/// report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    pub code: u16,
    /// The peer's Close reason text after a completed handshake; otherwise
    /// the standard reason token.
    pub reason: String,
    /// A completed closing handshake (as opposed to a drop, a timeout or a
    /// protocol failure): pagi.connection then reports a clean completion.
    pub clean: bool,
    /// `disconnect_detail` of an abnormal end: the rule broken, the OS
    /// error, the interval, the limit.  Never the peer's Close reason.
    pub detail: Option<String>,
    /// The peer's Close frame, if one arrived (`close_code`, `close_reason`).
    pub peer: Option<(u16, String)>,
}

impl Ending {
    pub fn abnormal(reason: &str, detail: impl Into<Option<String>>) -> Ending {
        Ending {
            code: 1006,
            reason: reason.to_string(),
            clean: false,
            detail: detail.into(),
            peer: None,
        }
    }

    pub fn protocol(code: u16, detail: String) -> Ending {
        Ending {
            code,
            reason: "protocol_error".into(),
            clean: false,
            detail: Some(detail),
            peer: None,
        }
    }

    /// A closing handshake completed: the peer's code and reason text.
    pub fn handshake(code: u16, reason: String) -> Ending {
        Ending {
            code,
            reason: reason.clone(),
            clean: true,
            detail: None,
            peer: Some((code, reason)),
        }
    }
}

/// An ending the server decided before the socket finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forced {
    pub ending: Ending,
    /// Drop the socket now, with no Close frame (`abort`).  Otherwise a
    /// Close frame went out and the closing handshake runs its course.
    pub immediate: bool,
    pub at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the application's accept, close or denial.
    Handshake,
    /// Accepted: messages flow.
    Open,
    /// The application refused (403 or its own response).
    Refused,
    /// The socket is gone; sends are quiet no-ops.
    Ended,
}

/// Keepalive pings asked for by `websocket.keepalive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    /// No pong within this long after a ping ends the socket (1006).
    pub timeout: Option<Duration>,
}

/// See [`Session::reader_view`].
pub struct ReaderView {
    pub forced: Option<Forced>,
    pub keepalive: Option<Keepalive>,
    pub app_closed_at: Option<Instant>,
}

struct State {
    phase: Phase,
    /// Application data queued for the writer and not yet written: what
    /// `buffered_amount` reports and the water marks watch.
    buffered: usize,
    /// How many application messages that is (see Settings::queued_message_cost).
    queued_messages: usize,
    marks: crate::exchange::WaterMarks,
    /// When the application sent websocket.close (it may send nothing after).
    app_closed_at: Option<Instant>,
    /// The peer's Close arrived and was answered: sends are quiet no-ops,
    /// since nothing may follow our Close on the wire.
    peer_closed: bool,
    /// The reader stopped for good (a Close, a failure, the peer gone):
    /// no message the interpreter has not been sent yet will come.
    reading_over: bool,
    keepalive: Option<Keepalive>,
    /// An ending the server decided before the socket finished (queue
    /// overflow, an app that left without closing, abort).
    forced: Option<Forced>,
    /// How it ended, once the transport closed.
    ending: Option<Ending>,
    app_running: bool,
}

pub struct Session {
    pub id: u64,
    /// The handshake's exchange: denial responses, 403/500, the access log.
    pub exchange: Arc<Exchange>,
    mailbox: Arc<Mailbox>,
    pub settings: Arc<Settings>,
    state: Mutex<State>,
    /// Unbounded as a channel, but what the application puts in is bounded
    /// by `max_send_backlog` (see `send`); the server's own control frames
    /// are a Close or two and a ping per keepalive interval.
    outbound: OutboxSender<Outbound>,
    outbound_rx: Mutex<Option<OutboxReceiver<Outbound>>>,
    /// Wakes the reader to re-read its timers (keepalive, close deadline,
    /// a forced ending).
    pub reader_wake: Notify,
    /// Milliseconds since `created` of the last frame in either direction.
    last_activity_ms: AtomicU64,
    /// Received messages posted to the interpreter and not yet taken.
    in_transit: AtomicUsize,
    /// Their payload bytes.
    in_transit_bytes: AtomicUsize,
    /// The interpreter took one (the reader may read again).
    pub taken: Notify,
    created: Instant,
}

impl Session {
    pub fn new(
        exchange: Arc<Exchange>,
        mailbox: Arc<Mailbox>,
        settings: Arc<Settings>,
    ) -> Arc<Session> {
        let (tx, rx) = outbox();
        Arc::new(Session {
            id: exchange.id,
            exchange,
            mailbox,
            settings,
            state: Mutex::new(State {
                phase: Phase::Handshake,
                buffered: 0,
                queued_messages: 0,
                marks: Default::default(),
                app_closed_at: None,
                peer_closed: false,
                reading_over: false,
                keepalive: None,
                forced: None,
                ending: None,
                app_running: true,
            }),
            outbound: tx,
            outbound_rx: Mutex::new(Some(rx)),
            reader_wake: Notify::new(),
            last_activity_ms: AtomicU64::new(0),
            in_transit: AtomicUsize::new(0),
            in_transit_bytes: AtomicUsize::new(0),
            taken: Notify::new(),
            created: Instant::now(),
        })
    }

    /// The state, locked.  A poisoned lock means a panic (a bug) while it
    /// was held, which may have left the state half-updated: the socket is
    /// not trusted to go on.  An open socket is dropped at once, as by
    /// `abort` but ending `server_error`; a handshake is answered 500 (the
    /// handshake's exchange ends it).  The poison is cleared, so this is
    /// done once; the rest of the server is unaffected.
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(st) => st,
            Err(poisoned) => {
                let mut st = poisoned.into_inner();
                self.state.clear_poison();
                tracing::error!(
                    "internal error: a panic left WebSocket {} in an unknown state; ending it",
                    self.id
                );
                let detail = "internal error while handling the WebSocket".to_string();
                match st.phase {
                    Phase::Open => {
                        st.forced = Some(Forced {
                            ending: Ending::abnormal("server_error", detail),
                            immediate: true,
                            at: Instant::now(),
                        });
                        self.reader_wake.notify_one();
                    }
                    Phase::Handshake | Phase::Refused => self.exchange.server_abort(
                        "server_error",
                        Some(detail),
                        Some((StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")),
                    ),
                    Phase::Ended => {}
                }
                st
            }
        }
    }

    // ---- interpreter side: the application's $send -------------------------

    /// `websocket.accept`: the application's headers and subprotocol for
    /// the accepting response; the protocol adds its own (http1/ the
    /// RFC 6455 upgrade headers, http2/ nothing).
    pub fn accept(
        &self,
        subprotocol: Option<&[u8]>,
        headers: &[(&[u8], &[u8])],
    ) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Handshake => {}
            Phase::Ended => return Ok(SendOutcome::Closed),
            Phase::Open => {
                return Err(SendError::Sequence(
                    "cannot send 'websocket.accept' after websocket.accept",
                ))
            }
            Phase::Refused => {
                return Err(SendError::Sequence(
                    "cannot send 'websocket.accept' after refusing the handshake",
                ))
            }
        }
        if let Some(sub) = subprotocol {
            let token = !sub.is_empty()
                && sub
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!#$&'*+^`|".contains(b));
            if !token {
                return Err(SendError::Invalid(format!(
                    "Invalid subprotocol: {:?}",
                    String::from_utf8_lossy(sub)
                )));
            }
        }
        let (mut map, _) =
            crate::exchange::build_headers(headers, crate::exchange::Section::Accept)?;
        if let Some(sub) = subprotocol {
            // Checked above to be a token, so a valid header value.
            if let Ok(v) = HeaderValue::from_bytes(sub) {
                map.insert("sec-websocket-protocol", v);
            }
        }
        if !self.exchange.upgrade(map) {
            // The client left while the application decided.
            st.phase = Phase::Ended;
            return Ok(SendOutcome::Closed);
        }
        st.phase = Phase::Open;
        drop(st);
        self.touch();
        Ok(SendOutcome::Ready)
    }

    /// `websocket.send`: queue one message for the writer.
    pub fn send(&self, text: bool, data: &[u8]) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Open if st.app_closed_at.is_some() => {
                return Err(SendError::Sequence(
                    "cannot send 'websocket.send' after websocket.close",
                ))
            }
            Phase::Open if st.peer_closed || st.forced.is_some() => return Ok(SendOutcome::Closed),
            Phase::Open => {}
            Phase::Ended => return Ok(SendOutcome::Closed),
            Phase::Handshake | Phase::Refused => {
                return Err(SendError::Sequence(
                    "cannot send 'websocket.send' before websocket.accept",
                ))
            }
        }
        // An app that does not await its sends would otherwise queue without
        // bound toward a peer that is not reading.  One that awaits them
        // never gets here: it waits above the high-water mark, which watches
        // the same backlog.
        if self.backlog(&st) >= self.settings.max_send_backlog {
            return Err(SendError::Backlog(format!(
                "{} messages ({} bytes) are already queued for a peer that is not reading them, \
                 over the limit of {} bytes ({} x --write-high-watermark); await each send",
                st.queued_messages,
                st.buffered,
                self.settings.max_send_backlog,
                super::SEND_BACKLOG_HIGH_WATERS,
            )));
        }
        let bytes = Bytes::copy_from_slice(data);
        let message = if text {
            let text = Utf8Bytes::try_from(bytes)
                .map_err(|_| SendError::Invalid("websocket.send 'text' is not UTF-8".into()))?;
            Message::Text(text)
        } else {
            Message::Binary(bytes)
        };
        let before = self.backlog(&st);
        st.buffered += data.len();
        st.queued_messages += 1;
        let after = self.backlog(&st);
        let outcome = st
            .marks
            .on_send(before, after, self.exchange.config().high_water);
        // Sent under the lock so that sends keep their order across threads.
        self.outbound.send(Outbound::Data(message, data.len()));
        Ok(outcome)
    }

    /// `websocket.close`: after accept, a Close frame starts the closing
    /// handshake.  Before it, Www 0.6 refuses with an HTTP response instead,
    /// so the send fails; Www 0.3 refuses the handshake with 403.
    pub fn close(&self, code: u16, reason: &[u8]) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Handshake if self.exchange.config().spec.is_current() => {
                Err(SendError::Sequence(
                    "websocket.close before websocket.accept; refuse the handshake with an http.response.start of status 300 or more",
                ))
            }
            Phase::Handshake => {
                st.phase = Phase::Refused;
                drop(st);
                self.exchange
                    .refuse(http::StatusCode::FORBIDDEN, "Forbidden");
                Ok(SendOutcome::Ready)
            }
            Phase::Open if st.app_closed_at.is_some() => Err(SendError::Sequence(
                "cannot send 'websocket.close' after websocket.close",
            )),
            // Our Close already answered the peer's, or the server is closing.
            Phase::Open if st.peer_closed || st.forced.is_some() => Ok(SendOutcome::Closed),
            Phase::Open => {
                let reason = Utf8Bytes::try_from(Bytes::copy_from_slice(reason)).map_err(|_| {
                    SendError::Invalid("websocket.close 'reason' is not UTF-8".into())
                })?;
                if reason.len() > 123 {
                    return Err(SendError::Invalid(
                        "websocket.close 'reason' is longer than 123 bytes".into(),
                    ));
                }
                let code = CloseCode::from(code);
                // 1005, 1006, 1015 and unassigned codes may not appear in a
                // Close frame (RFC 6455, 7.4); a peer sending them fails with 1002.
                if !code.is_allowed() {
                    return Err(SendError::Invalid(format!(
                        "websocket.close 'code' {} may not be sent in a Close frame",
                        u16::from(code)
                    )));
                }
                st.app_closed_at = Some(Instant::now());
                let frame = CloseFrame { code, reason };
                self.outbound
                    .send(Outbound::Control(Message::Close(Some(frame))));
                drop(st);
                self.reader_wake.notify_one();
                Ok(SendOutcome::Ready)
            }
            Phase::Refused => Err(SendError::Sequence(
                "cannot send 'websocket.close' after refusing the handshake",
            )),
            Phase::Ended => Ok(SendOutcome::Closed),
        }
    }

    /// `websocket.keepalive`: the last setting wins; `None` stops it.
    pub fn set_keepalive(&self, keepalive: Option<Keepalive>) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Open if st.peer_closed || st.forced.is_some() => return Ok(SendOutcome::Closed),
            Phase::Open => {}
            Phase::Ended => return Ok(SendOutcome::Closed),
            _ => {
                return Err(SendError::Sequence(
                    "cannot send 'websocket.keepalive' before websocket.accept",
                ))
            }
        }
        st.keepalive = keepalive;
        drop(st);
        self.reader_wake.notify_one();
        Ok(SendOutcome::Ready)
    }

    /// The application left more unread than `limit` allows: close with
    /// 1008 and report `queue_overflow`.  True when the message that went
    /// past the limit must be dropped (with every later one: the app is
    /// given a beginning of what the peer sent, then the end).  False when
    /// the peer has sent its last message already (its Close came, or the
    /// reader stopped): what is still on its way to the interpreter is all
    /// there is, bounded by the in-transit budget, and dropping it would
    /// lose messages under an ending that says nothing was lost.
    pub fn overflow(&self, limit: UnreadLimit) -> bool {
        let mut st = self.lock();
        if st.peer_closed || st.reading_over || st.phase == Phase::Ended {
            return false;
        }
        if st.phase != Phase::Open || st.forced.is_some() {
            return true;
        }
        // The app's Close is out already: no second one (the peer's Close
        // cannot have come, see above).
        let app_closed = st.app_closed_at.is_some();
        st.forced = Some(Forced {
            ending: Ending {
                code: 1008,
                reason: "queue_overflow".into(),
                clean: false,
                detail: Some(match limit {
                    UnreadLimit::Messages(n) => format!(
                        "more than {n} received messages left unread (--max-receive-queue)"
                    ),
                    UnreadLimit::Bytes(n) => format!(
                        "received messages left unread would exceed {n} bytes (--max-ws-message-size)"
                    ),
                }),
                peer: None,
            },
            immediate: false,
            at: Instant::now(),
        });
        drop(st);
        if !app_closed {
            self.close_frame(1008, "Message queue overflow");
        }
        self.reader_wake.notify_one();
        true
    }

    /// The reader stopped for good: see [`Session::overflow`].
    pub fn reading_over(&self) {
        self.lock().reading_over = true;
    }

    /// `pagi.connection->abort` on an accepted socket: end it now, with no
    /// Close frame.  False when it had already ended.
    pub fn abort(&self, detail: Option<String>) -> bool {
        let mut st = self.lock();
        match st.phase {
            Phase::Ended => return false,
            Phase::Open => {}
            // Before accept the handshake's exchange is what ends.
            Phase::Handshake | Phase::Refused => {
                drop(st);
                return self.exchange.app_abort(detail);
            }
        }
        st.forced = Some(Forced {
            ending: Ending::abnormal("app_abort", detail),
            immediate: true,
            at: Instant::now(),
        });
        drop(st);
        self.reader_wake.notify_one();
        true
    }

    /// How far the socket has got, for `pagi.connection`: before accept
    /// (or after a refusal) the handshake's exchange says.
    /// Also gives the peer's Close, and the `websocket.disconnect` code.
    pub fn end_state(
        &self,
    ) -> (
        crate::exchange::EndState,
        Option<(u16, String)>,
        Option<u16>,
    ) {
        use crate::exchange::EndState;
        let st = self.lock();
        match (&st.ending, st.phase) {
            (Some(e), _) if e.clean => (EndState::Clean, e.peer.clone(), Some(e.code)),
            (Some(e), _) => (
                EndState::Abnormal {
                    reason: e.reason.clone(),
                    detail: e.detail.clone(),
                },
                e.peer.clone(),
                Some(e.code),
            ),
            (None, Phase::Handshake | Phase::Refused) => {
                drop(st);
                (self.exchange.end_state(), None, None)
            }
            (None, _) => (EndState::Active, None, None),
        }
    }

    /// The peer's Close arrived (and tungstenite answered it).
    pub fn peer_closed(&self) {
        self.lock().peer_closed = true;
    }

    /// The application's Future settled.  With no decision, Www 0.6 answers
    /// the 500 backstop (0.3: 403); an accepted socket the app did not close
    /// is closed with 1011 and ends `server_error`.
    pub fn app_finished(&self, error: Option<&str>) -> FinishOutcome {
        let mut st = self.lock();
        st.app_running = false;
        match st.phase {
            Phase::Handshake => {
                st.phase = Phase::Refused;
                drop(st);
                if error.is_none() && !self.exchange.config().spec.is_current() {
                    self.exchange
                        .refuse(http::StatusCode::FORBIDDEN, "Forbidden");
                }
                self.exchange.finish(error, false)
            }
            Phase::Refused => {
                drop(st);
                self.exchange.finish(error, false)
            }
            Phase::Open => {
                // Sending websocket.close, or hearing the peer's Close, is
                // the app's terminal act; without either the session is
                // incomplete (Www 0.6): Close 1011, and it ends server_error.
                let unclosed = st.app_closed_at.is_none() && !st.peer_closed && st.forced.is_none();
                let detail = match (error, unclosed) {
                    (Some(e), _) => {
                        tracing::error!("PAGI application error (WebSocket): {}", e.trim_end());
                        e.trim_end().to_string()
                    }
                    (None, _) => {
                        "application returned from an accepted WebSocket without a closing handshake"
                            .to_string()
                    }
                };
                if unclosed {
                    if error.is_none() {
                        tracing::error!("PAGI {detail}");
                    }
                    st.forced = Some(Forced {
                        ending: Ending {
                            code: 1011,
                            reason: "server_error".into(),
                            clean: false,
                            detail: Some(detail),
                            peer: None,
                        },
                        immediate: false,
                        at: Instant::now(),
                    });
                }
                drop(st);
                if unclosed {
                    self.close_frame(1011, "");
                    self.reader_wake.notify_one();
                }
                self.exchange.finish(None, false)
            }
            Phase::Ended => {
                drop(st);
                if let Some(e) = error {
                    tracing::error!("PAGI application error (WebSocket): {}", e.trim_end());
                }
                self.exchange.finish(None, false)
            }
        }
    }

    /// What the queued application messages cost: their payload, plus a
    /// fixed cost per message so that empty ones are paced and bounded too.
    /// The water marks and the send backlog limit watch this;
    /// `buffered_amount` reports the payload.
    fn backlog(&self, st: &State) -> usize {
        st.buffered + st.queued_messages * self.settings.queued_message_cost
    }

    pub fn buffered_amount(&self) -> usize {
        let st = self.lock();
        if st.phase == Phase::Ended {
            0
        } else {
            st.buffered
        }
    }

    // ---- network side -------------------------------------------------------

    /// The writer's queue; taken once, by the connection task.  Only ever
    /// `take`n under this lock, which cannot panic half-way: recovering from
    /// a poisoned lock is sound.
    pub fn take_outbound(&self) -> Option<OutboxReceiver<Outbound>> {
        self.outbound_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn queue_control(&self, message: Message) {
        self.outbound.send(Outbound::Control(message));
    }

    pub fn close_frame(&self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        };
        self.queue_control(Message::Close(Some(frame)));
    }

    pub fn finish_writer(&self) {
        self.outbound.send(Outbound::Finish);
    }

    /// The writer handed `messages` application messages of `len` bytes in
    /// all to the socket.
    pub fn sent(&self, messages: usize, len: usize) {
        let drained = {
            let mut st = self.lock();
            st.buffered = st.buffered.saturating_sub(len);
            st.queued_messages = st.queued_messages.saturating_sub(messages);
            let backlog = self.backlog(&st);
            st.marks.on_written(
                backlog,
                self.exchange.config().low_water,
                self.exchange.wants_drain_news(),
            )
        };
        self.touch();
        if let Some(news) = drained {
            self.mailbox.push(ToPerl::Drained {
                id: self.id,
                settles_wait: news.settles_wait,
            });
        }
    }

    /// A frame went either way: the idle timeout starts again.
    pub fn touch(&self) {
        let ms = self.created.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(last)
    }

    /// What the reader needs each turn, under one lock: an ending the server
    /// decided, the keepalive setting, and when the application closed.
    pub fn reader_view(&self) -> ReaderView {
        let st = self.lock();
        ReaderView {
            forced: st.forced.clone(),
            keepalive: st.keepalive,
            app_closed_at: st.app_closed_at,
        }
    }

    /// A received message for the application.
    pub fn deliver(&self, text: bool, data: Bytes) {
        self.touch();
        self.in_transit.fetch_add(1, Ordering::AcqRel);
        self.in_transit_bytes
            .fetch_add(data.len(), Ordering::AcqRel);
        self.mailbox.push(ToPerl::WsReceive {
            id: self.id,
            text,
            data,
        });
    }

    /// The interpreter took a message of `len` bytes posted by `deliver`.
    pub fn taken_by_interpreter(&self, len: usize) {
        let messages = self.in_transit.fetch_sub(1, Ordering::AcqRel);
        let bytes = self.in_transit_bytes.fetch_sub(len, Ordering::AcqRel);
        if messages >= self.settings.max_in_transit || bytes >= self.settings.max_in_transit_bytes {
            self.taken.notify_one();
        }
    }

    /// Messages `deliver` posted that the interpreter has not taken yet.
    /// The end of the socket is known to the interpreter (through
    /// `end_state`) before these reach it; its `$receive` must not let the
    /// end overtake them.
    pub fn messages_in_transit(&self) -> usize {
        self.in_transit.load(Ordering::Acquire)
    }

    /// Whether the reader may read another message: the interpreter is not
    /// too far behind this socket, in messages or in bytes.  One message
    /// always passes, so what is in transit stays under the byte bound plus
    /// one message.
    pub fn may_read(&self) -> bool {
        self.in_transit.load(Ordering::Acquire) < self.settings.max_in_transit
            && self.in_transit_bytes.load(Ordering::Acquire) < self.settings.max_in_transit_bytes
    }

    /// The socket ended and its transport is closed: record how, tell the
    /// application (once) and log the line.  An ending the server decided
    /// earlier wins, keeping the peer's Close if one came.
    pub fn end(&self, ending: Ending) {
        let ending = {
            let mut st = self.lock();
            if st.phase == Phase::Ended {
                return;
            }
            st.phase = Phase::Ended;
            st.buffered = 0;
            st.queued_messages = 0;
            let ending = match st.forced.take() {
                Some(forced) => Ending {
                    peer: ending.peer,
                    ..forced.ending
                },
                None => ending,
            };
            st.ending = Some(ending.clone());
            ending
        };
        let log_reason = if ending.clean {
            format!("close_{}", ending.code)
        } else {
            ending.reason.clone()
        };
        self.exchange.set_end_reason(&log_reason);
        self.exchange.write_access_log();
        self.mailbox.push(ToPerl::WsDisconnect {
            id: self.id,
            ending,
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::exchange::Head;
    use std::collections::VecDeque;

    pub(crate) fn session() -> (Arc<Session>, tokio::sync::oneshot::Receiver<Head>) {
        session_speaking(crate::spec::SpecVersion::Www06)
    }

    fn session_speaking(
        spec: crate::spec::SpecVersion,
    ) -> (Arc<Session>, tokio::sync::oneshot::Receiver<Head>) {
        // No cost per message, so that the water-mark arithmetic is the payload's.
        session_with(spec, 0)
    }

    /// A session whose queued messages cost QUEUED_MESSAGE_COST each.
    fn session_costing_messages() -> (Arc<Session>, tokio::sync::oneshot::Receiver<Head>) {
        session_with(
            crate::spec::SpecVersion::Www06,
            super::super::QUEUED_MESSAGE_COST,
        )
    }

    fn session_with(
        spec: crate::spec::SpecVersion,
        queued_message_cost: usize,
    ) -> (Arc<Session>, tokio::sync::oneshot::Receiver<Head>) {
        let (ex, head) = crate::exchange::tests::exchange_speaking(false, spec);
        let mailbox = Arc::new(Mailbox::new().unwrap());
        let settings = Arc::new(Settings {
            max_frame_size: None,
            max_message_size: None,
            read_window: crate::websocket::MAX_READ_WINDOW,
            idle_timeout: None,
            write_timeout: None,
            close_timeout: Duration::from_secs(1),
            max_in_transit: 2,
            max_in_transit_bytes: 10,
            max_send_backlog: 200,
            queued_message_cost,
        });
        (Session::new(ex, mailbox, settings), head)
    }

    fn perl_messages(ws: &Session) -> Vec<ToPerl> {
        let mut out = VecDeque::new();
        ws.mailbox.take_all(&mut out);
        out.into_iter().collect()
    }

    #[test]
    fn a_poisoned_open_socket_is_dropped_as_a_server_error() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        let ws2 = ws.clone();
        let _ = std::thread::spawn(move || {
            let _st = ws2.state.lock().unwrap();
            panic!("a bug while the state is locked");
        })
        .join();
        let view = ws.reader_view();
        let forced = view.forced.expect("the socket is ended");
        assert!(forced.immediate);
        assert_eq!(forced.ending.reason, "server_error");
        assert!(
            !ws.state.is_poisoned(),
            "the poison is cleared once handled"
        );
    }

    #[test]
    fn nothing_is_sent_before_accept() {
        let (ws, _head) = session();
        assert!(matches!(ws.send(true, b"hi"), Err(SendError::Sequence(_))));
        assert!(matches!(
            ws.set_keepalive(None),
            Err(SendError::Sequence(_))
        ));
    }

    #[test]
    fn accept_carries_the_subprotocol_and_no_protocol_headers() {
        let (ws, mut head) = session();
        let extra: &[(&[u8], &[u8])] = &[(b"x-extra", b"1")];
        assert_eq!(ws.accept(Some(b"chat.v2"), extra), Ok(SendOutcome::Ready));
        let Ok(Head::Upgrade(map)) = head.try_recv() else {
            panic!("no 101 head")
        };
        assert_eq!(map["sec-websocket-protocol"], "chat.v2");
        assert_eq!(map["x-extra"], "1");
        // RFC 8441 forbids the RFC 6455 upgrade headers on HTTP/2; http1/
        // adds them to its 101.
        for name in ["upgrade", "connection", "sec-websocket-accept"] {
            assert!(map.get(name).is_none(), "{name}");
        }
        assert!(matches!(ws.accept(None, &[]), Err(SendError::Sequence(_))));
    }

    #[test]
    fn a_subprotocol_must_be_a_token() {
        let (ws, mut head) = session();
        assert!(matches!(
            ws.accept(Some(b"a b"), &[]),
            Err(SendError::Invalid(_))
        ));
        assert!(head.try_recv().is_err(), "nothing was answered");
        assert_eq!(ws.accept(None, &[]), Ok(SendOutcome::Ready));
    }

    #[test]
    fn close_before_accept_fails_in_www_0_6_and_changes_nothing() {
        let (ws, mut head) = session();
        assert!(matches!(ws.close(1000, b""), Err(SendError::Sequence(_))));
        assert!(head.try_recv().is_err(), "nothing was answered");
        assert_eq!(ws.accept(None, &[]), Ok(SendOutcome::Ready));
    }

    #[test]
    fn close_before_accept_is_a_403_in_www_0_3() {
        let (ws, mut head) = session_speaking(crate::spec::SpecVersion::Www03);
        assert_eq!(ws.close(1000, b""), Ok(SendOutcome::Ready));
        assert!(matches!(
            head.try_recv(),
            Ok(Head::Generated(StatusCode::FORBIDDEN, _))
        ));
        assert!(matches!(ws.accept(None, &[]), Err(SendError::Sequence(_))));
    }

    #[test]
    fn returning_without_a_decision_is_the_500_backstop_in_www_0_6() {
        let (ws, mut head) = session();
        assert_eq!(ws.app_finished(None), FinishOutcome::Backstop500);
        assert!(matches!(
            head.try_recv(),
            Ok(Head::Generated(StatusCode::INTERNAL_SERVER_ERROR, _))
        ));
        let (ws, mut head) = session_speaking(crate::spec::SpecVersion::Www03);
        ws.app_finished(None);
        assert!(matches!(
            head.try_recv(),
            Ok(Head::Generated(StatusCode::FORBIDDEN, _))
        ));
    }

    #[test]
    fn leaving_an_accepted_socket_unclosed_ends_it_1011_server_error() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        ws.app_finished(None);
        let view = ws.reader_view();
        let forced = view.forced.expect("an ending decided by the server");
        assert!(!forced.immediate, "the closing handshake still runs");
        assert_eq!(
            (forced.ending.code, forced.ending.reason.as_str()),
            (1011, "server_error")
        );
        // The peer's answer is kept as close_code, the outcome stays 1011.
        ws.end(Ending::handshake(1011, String::new()));
        let (state, peer, code) = ws.end_state();
        assert!(
            matches!(state, crate::exchange::EndState::Abnormal { ref reason, .. } if reason == "server_error")
        );
        assert_eq!(peer, Some((1011, String::new())));
        assert_eq!(code, Some(1011));
    }

    #[test]
    fn after_the_peers_close_sends_are_quiet_no_ops() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        ws.peer_closed();
        assert_eq!(ws.send(true, b"late"), Ok(SendOutcome::Closed));
        assert_eq!(ws.close(1000, b""), Ok(SendOutcome::Closed));
        assert_eq!(ws.buffered_amount(), 0, "nothing was queued");
        ws.app_finished(None);
        assert!(
            ws.reader_view().forced.is_none(),
            "hearing the peer's Close was the app's terminal act"
        );
    }

    #[test]
    fn abort_ends_an_accepted_socket_at_once_and_only_once() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        assert!(ws.abort(Some("quota".into())));
        let forced = ws.reader_view().forced.unwrap();
        assert!(forced.immediate);
        assert_eq!(forced.ending.code, 1006);
        assert_eq!(forced.ending.reason, "app_abort");
        assert_eq!(forced.ending.detail.as_deref(), Some("quota"));
        ws.end(Ending::abnormal("client_closed", None));
        assert!(!ws.abort(None), "a second abort changes nothing");
        let (state, _, _) = ws.end_state();
        assert!(
            matches!(state, crate::exchange::EndState::Abnormal { ref reason, .. } if reason == "app_abort")
        );
    }

    #[test]
    fn sends_wait_above_the_high_mark_and_resume_below_the_low_one() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        // The test exchange's marks: high 10, low 4.
        assert_eq!(ws.send(false, b"123456"), Ok(SendOutcome::Ready));
        assert_eq!(ws.send(false, b"123456"), Ok(SendOutcome::ReachedHigh));
        assert_eq!(ws.send(false, b"1"), Ok(SendOutcome::StillHigh));
        assert_eq!(ws.buffered_amount(), 13);
        ws.sent(1, 6);
        assert!(perl_messages(&ws).is_empty(), "still above the low mark");
        ws.sent(1, 6);
        assert!(matches!(perl_messages(&ws)[..], [ToPerl::Drained { .. }]));
        assert_eq!(ws.buffered_amount(), 1);
    }

    #[test]
    fn after_the_apps_close_sends_fail_and_after_the_end_they_are_quiet() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        ws.close(1000, b"bye").unwrap();
        assert!(matches!(ws.send(true, b"x"), Err(SendError::Sequence(_))));
        assert!(matches!(ws.close(1000, b""), Err(SendError::Sequence(_))));
        ws.end(Ending::abnormal("client_closed", None));
        assert_eq!(ws.send(true, b"x"), Ok(SendOutcome::Closed));
    }

    #[test]
    fn the_end_is_reported_once_and_a_forced_ending_wins() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        ws.overflow(UnreadLimit::Messages(2));
        ws.end(Ending::abnormal("client_closed", None));
        ws.end(Ending::abnormal("write_error", None));
        let ends: Vec<_> = perl_messages(&ws)
            .into_iter()
            .filter_map(|m| match m {
                ToPerl::WsDisconnect { ending, .. } => Some((ending.code, ending.reason)),
                _ => None,
            })
            .collect();
        assert_eq!(ends, vec![(1008, "queue_overflow".to_string())]);
    }

    #[test]
    fn reading_pauses_while_the_interpreter_is_behind() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        ws.deliver(true, Bytes::from_static(b"a"));
        assert!(ws.may_read());
        ws.deliver(true, Bytes::from_static(b"b"));
        assert!(!ws.may_read(), "two in transit with a limit of two");
        ws.taken_by_interpreter(1);
        assert!(ws.may_read());
    }

    #[test]
    fn reading_pauses_while_too_many_bytes_are_in_transit() {
        use futures_util::FutureExt;
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        // The test settings: 10 bytes in transit.
        ws.deliver(false, Bytes::from_static(b"1234"));
        assert!(ws.may_read(), "4 of 10 bytes");
        ws.deliver(false, Bytes::from_static(b"123456"));
        assert!(!ws.may_read(), "10 of 10 bytes");
        assert!(
            ws.taken.notified().now_or_never().is_none(),
            "nothing taken yet"
        );
        ws.taken_by_interpreter(4);
        assert!(
            ws.taken.notified().now_or_never().is_some(),
            "taking one wakes the paused reader"
        );
        assert!(ws.may_read(), "6 of 10 bytes");
        ws.taken_by_interpreter(6);
        // One message always passes, whatever its size; then reading pauses.
        ws.deliver(false, Bytes::from(vec![0; 1000]));
        assert!(!ws.may_read(), "a message over the budget pauses reading");
        ws.taken_by_interpreter(1000);
        assert!(ws.may_read());
    }

    #[test]
    fn a_send_past_the_backlog_limit_fails_and_queues_nothing() {
        let (ws, _head) = session_costing_messages();
        ws.accept(None, &[]).unwrap();
        let mut outbound = ws.take_outbound().unwrap();
        // The test settings: a backlog of 200, each message costing 64 more.
        // A send made below it is queued whatever its size.
        assert!(ws.send(false, &[7; 500]).is_ok());
        let refused = ws.send(false, b"x");
        let Err(SendError::Backlog(why)) = refused else {
            panic!("queued past the backlog: {refused:?}")
        };
        assert!(why.contains("await each send"), "{why}");
        assert!(why.contains("--write-high-watermark"), "{why}");
        assert_eq!(ws.buffered_amount(), 500, "the refused send queued nothing");
        assert!(matches!(outbound.try_recv(), Some(Outbound::Data(_, 500))));
        assert!(outbound.try_recv().is_none(), "one message in the queue");
        // Once written, sends are taken again.
        ws.sent(1, 500);
        assert!(ws.send(true, b"again").is_ok());
    }

    #[test]
    fn empty_messages_count_toward_the_backlog() {
        let (ws, _head) = session_costing_messages();
        ws.accept(None, &[]).unwrap();
        for queued in 0..4 {
            assert!(ws.send(false, b"").is_ok(), "{} of 200", queued * 64);
        }
        assert!(
            matches!(ws.send(false, b""), Err(SendError::Backlog(_))),
            "256 of 200: a flood of empty messages is bounded too"
        );
        ws.sent(2, 0);
        assert!(ws.send(false, b"").is_ok());
    }

    #[test]
    fn the_water_marks_watch_the_backlog_so_an_awaiting_app_never_reaches_its_limit() {
        let (ws, _head) = session_costing_messages();
        ws.accept(None, &[]).unwrap();
        // The test exchange's marks: high 10, low 4.  An empty message costs
        // 64, over twice the mark: the send waits, as one of 20 bytes would.
        assert_eq!(ws.send(false, b""), Ok(SendOutcome::HighWater));
        assert_eq!(ws.buffered_amount(), 0, "buffered_amount is the payload");
        ws.sent(1, 0);
        assert!(
            matches!(perl_messages(&ws)[..], [ToPerl::Drained { .. }]),
            "drained once the message is out"
        );
        assert_eq!(ws.send(false, b""), Ok(SendOutcome::HighWater));
    }

    #[test]
    fn an_overflow_while_the_peer_may_send_more_drops_that_message_and_the_rest() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        assert!(
            ws.overflow(UnreadLimit::Messages(2)),
            "the first is dropped"
        );
        assert!(
            ws.reader_view().forced.is_some(),
            "and the socket ends 1008"
        );
        assert!(ws.overflow(UnreadLimit::Messages(2)), "so are later ones");
    }

    #[test]
    fn an_overflow_after_the_peer_sent_its_last_message_keeps_it() {
        for stop in [Session::peer_closed as fn(&Session), Session::reading_over] {
            let (ws, _head) = session();
            ws.accept(None, &[]).unwrap();
            stop(&ws);
            assert!(
                !ws.overflow(UnreadLimit::Bytes(4096)),
                "nothing more can come: kept"
            );
            assert!(ws.reader_view().forced.is_none(), "and no 1008 is decided");
        }
    }

    #[test]
    fn overflowing_the_unread_bytes_names_the_limit() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        ws.overflow(UnreadLimit::Bytes(4096));
        let forced = ws.reader_view().forced.unwrap();
        assert_eq!(
            (forced.ending.code, forced.ending.reason.as_str()),
            (1008, "queue_overflow")
        );
        let detail = forced.ending.detail.unwrap();
        assert!(detail.contains("4096 bytes"), "{detail}");
        assert!(detail.contains("--max-ws-message-size"), "{detail}");
    }

    #[test]
    fn reserved_close_codes_are_refused() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        for code in [999, 1004, 1005, 1006, 1015, 5000] {
            assert!(
                matches!(ws.close(code, b""), Err(SendError::Invalid(_))),
                "{code}"
            );
        }
        assert_eq!(ws.close(4000, b""), Ok(SendOutcome::Ready));
    }

    #[test]
    fn a_close_reason_over_123_bytes_is_refused() {
        let (ws, _head) = session();
        ws.accept(None, &[]).unwrap();
        let long = vec![b'a'; 124];
        assert!(matches!(ws.close(1000, &long), Err(SendError::Invalid(_))));
        assert_eq!(ws.close(1000, &long[..123]), Ok(SendOutcome::Ready));
    }
}
