//! One request/response exchange, shared by the network task that owns the
//! socket and the interpreter thread that runs the application.
//!
//! The interpreter side calls the `start`/`body`/`trailers`/`finish` methods
//! (from the `$send` XS functions); the network side drains the outbound
//! queue through [`crate::body::ResponseBody`] and reports disconnects.  All
//! response sequencing rules live here, so they are unit-testable without Perl.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use tokio::sync::{oneshot, Notify};

use crate::access_log::{AccessLog, Record};
use crate::error::SendError;
use crate::interp::constants::{finish as finish_codes, send as codes};
use crate::interp::mailbox::Mailbox;
use crate::interp::messages::ToPerl;

/// Server-wide settings every exchange needs.
pub struct ExchangeConfig {
    pub high_water: usize,
    pub low_water: usize,
    /// 0 = unlimited.
    pub max_body: u64,
    /// `--body-min-rate` / `--body-rate-grace`: the pace a request body must
    /// keep once the server has waited the grace for it.
    pub body_rate: crate::body::MinRate,
    pub access_log: Option<AccessLog>,
    /// Limits and signals for SSE streams.
    pub streams: crate::sse::StreamSettings,
    /// Which PAGI the server speaks (`--spec-version`).
    pub spec: crate::spec::SpecVersion,
}

/// What the network task receives for the response head.
pub enum Head {
    /// The application started a response.  `close_after`: the
    /// connection cannot be reused after it (a request body was left
    /// unread behind `Expect: 100-continue`); HTTP/1.1 says so on the wire.
    App {
        status: StatusCode,
        headers: HeaderMap,
        close_after: bool,
    },
    /// The server answers in place of the application (413, 500 ...).
    Generated(StatusCode, &'static str),
    /// Close the connection without any response (request timeout).
    Abort,
    /// `websocket.accept`: answer 101 Switching Protocols with these headers.
    Upgrade(HeaderMap),
}

/// How a `$send` went, as a small code for Perl (see HTTP.pm and glue.c;
/// the numbers come from constants.def, group send).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted; resolve the Future now.
    Ready = codes::SENT as isize,
    /// Accepted and the buffer just reached the high-water mark: fire
    /// on_high_water and resolve when Drained arrives.
    HighWater = codes::HIGH_WATER as isize,
    /// Accepted, buffer still above the mark: resolve when Drained arrives.
    StillHigh = codes::STILL_HIGH as isize,
    /// The exchange has ended; the send is a successful no-op.
    Closed = codes::CLOSED as isize,
    /// Accepted; a SendDone message will settle the Future.
    Deferred = codes::DEFERRED as isize,
}

/// What became of a chunk a Rust-side producer offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streamed {
    Queued,
    /// The exchange ended; the producer stops and its send settles quietly.
    Ended,
    /// The chunk would pass the app's declared Content-Length.
    OverLength(u64),
}

/// How far an exchange has got, as `pagi.connection` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndState {
    /// Still running.
    Active,
    /// The response reached its terminal event and the network took it.
    Clean,
    /// Ended abnormally with a standard reason token and, maybe, a detail
    /// saying what the token cannot (a limit, an OS error, an exception).
    Abnormal {
        reason: String,
        detail: Option<String>,
    },
}

/// What `finish` did, reported back to Perl (constants.def, group finish).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishOutcome {
    /// The response was complete; nothing to do.
    Clean = finish_codes::CLEAN as isize,
    /// No response had started: the server sent its 500 backstop.
    Backstop500 = finish_codes::BACKSTOP as isize,
    /// The response was left incomplete and has been cut off.
    Truncated = finish_codes::TRUNCATED as isize,
    /// The client had already gone; nothing was sent and nothing logged.
    AlreadyDisconnected = finish_codes::ALREADY_DISCONNECTED as isize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for http.response.start.
    AwaitingStart,
    /// Started; body (and maybe trailers) still to come.
    Streaming,
    /// The terminal event is queued.
    Finished,
    /// Cut off: the network side sees an error and closes the connection.
    Aborted,
}

/// Facts kept for the access log line.
pub struct RequestFacts {
    pub method: String,
    pub raw_path: Bytes,
    pub query: Bytes,
    pub http_version: &'static str,
    pub client: SocketAddr,
    pub headers: Vec<(Bytes, Bytes)>,
    pub is_head: bool,
    pub started: Instant,
}

struct State {
    phase: Phase,
    head_tx: Option<oneshot::Sender<Head>>,
    /// The application's head, held back until the first body event (the
    /// spec lets a server defer it), so head and body cost one wake-up of the
    /// network task and can leave in one write.
    pending_head: Option<(StatusCode, HeaderMap)>,
    trailers_promised: bool,
    body_done: bool,
    declared_length: Option<u64>,
    body_bytes: u64,
    queue: VecDeque<Frame<Bytes>>,
    buffered: usize,
    high: bool,
    waker: Option<Waker>,
    disconnected: Option<&'static str>,
    /// `disconnect_detail`: never bodies, headers or credentials.
    detail: Option<String>,
    status: Option<u16>,
    flush_pending: bool,
    delivered: bool,
    logged: bool,
    app_running: bool,
    /// hyper will not poll the body again (HEAD, 204/304, or a
    /// Content-Length body fully taken); the response completes when the
    /// application reaches its terminal event.
    network_done: bool,
    abort_flushed: bool,
    /// `Expect: 100-continue` not yet answered: if the app responds without
    /// reading, the connection closes rather than wait for a body.
    continue_unanswered: bool,
    /// An SSE stream or an accepted WebSocket: its log line says how it ended.
    long_lived: bool,
    /// The app's own ending (`sse.close` reason); a disconnect reason otherwise.
    end_reason: Option<String>,
    /// An inline body event was accepted: a file/fh body may not follow
    /// (Www 0.5, "Payload kinds do not mix").
    inline_body: bool,
    /// The terminal event was accepted before any abnormal end: the scope
    /// ended cleanly (as in the reference server, whether or not the client
    /// reads what is still queued).  It stays clean whatever happens next.
    clean_end: bool,
}

/// The verdict on a send that leaves `buffered` bytes queued.  `high`
/// remembers that the mark was crossed, so that on_high_water fires once
/// per crossing (the network side clears it below the low mark).
pub(crate) fn water_mark(buffered: usize, high_water: usize, high: &mut bool) -> SendOutcome {
    if buffered < high_water {
        SendOutcome::Ready
    } else if *high {
        SendOutcome::StillHigh
    } else {
        *high = true;
        SendOutcome::HighWater
    }
}

/// A response status the application may send: a final status, 200-599.
/// 1xx are interim responses (the server sends 100 Continue itself, and 101
/// belongs to websocket.accept); anything outside 100-599 is no HTTP status.
fn final_status(status: i64) -> Result<StatusCode, SendError> {
    match status {
        200..=599 => StatusCode::from_u16(status as u16)
            .map_err(|_| SendError::Invalid(format!("status {status} is not a valid HTTP status"))),
        100..=199 => Err(SendError::Invalid(format!(
            "status {status} is informational (1xx), not a final response status (200-599)"
        ))),
        _ => Err(SendError::Invalid(format!(
            "status {status} is outside 100-599; a response status must be 200-599"
        ))),
    }
}

/// Largest data frame handed to hyper.
const MAX_FRAME: usize = 64 * 1024;

/// Bits of `interest`: what Perl wants to hear after the app returns.
pub const WANTS_TERMINAL: u8 = 1;

pub struct Exchange {
    pub id: u64,
    mailbox: Arc<Mailbox>,
    config: Arc<ExchangeConfig>,
    pub facts: RequestFacts,
    state: Mutex<State>,
    /// Wakes Rust-side producers (file streaming) when the queue drains or the exchange ends.
    pub progress: Notify,
    /// Wakes whoever waits for the exchange to end (sse.rs's supervisor),
    /// without the per-frame wake-ups of `progress`.
    ended: Notify,
    /// Credit for the request-body pump: one permit per chunk the app may have.
    pub body_credit: tokio::sync::Semaphore,
    interest: AtomicU8,
    /// Milliseconds since `facts.started` of the last read or write progress.
    last_progress_ms: AtomicU64,
    /// Set when the response became an SSE event stream.
    pub event_stream: std::sync::OnceLock<crate::sse::StreamControl>,
    /// Closes the exchange's connection at once (`abort`): nothing queued
    /// is written, and on HTTP/1.1 nothing else can use the connection.
    close_connection: Option<Arc<Notify>>,
    /// Request-body chunks in the mailbox that Perl has not taken yet: an
    /// end Perl learns of early must not overtake them.
    bodies_in_mailbox: AtomicUsize,
}

impl Exchange {
    pub fn new(
        id: u64,
        mailbox: Arc<Mailbox>,
        config: Arc<ExchangeConfig>,
        facts: RequestFacts,
        close_connection: Option<Arc<Notify>>,
    ) -> (Arc<Exchange>, oneshot::Receiver<Head>) {
        let (tx, rx) = oneshot::channel();
        let ex = Arc::new(Exchange {
            id,
            mailbox,
            config,
            facts,
            state: Mutex::new(State {
                phase: Phase::AwaitingStart,
                head_tx: Some(tx),
                pending_head: None,
                trailers_promised: false,
                body_done: false,
                declared_length: None,
                body_bytes: 0,
                queue: VecDeque::new(),
                buffered: 0,
                high: false,
                waker: None,
                disconnected: None,
                detail: None,
                status: None,
                flush_pending: false,
                delivered: false,
                logged: false,
                app_running: true,
                network_done: false,
                abort_flushed: false,
                continue_unanswered: false,
                long_lived: false,
                end_reason: None,
                inline_body: false,
                clean_end: false,
            }),
            progress: Notify::new(),
            ended: Notify::new(),
            body_credit: tokio::sync::Semaphore::new(0),
            interest: AtomicU8::new(0),
            last_progress_ms: AtomicU64::new(0),
            event_stream: std::sync::OnceLock::new(),
            close_connection,
            bodies_in_mailbox: AtomicUsize::new(0),
        });
        (ex, rx)
    }

    /// The state, locked.  A poisoned lock means a panic (a bug) while it
    /// was held, which may have left the state half-updated: it is not
    /// trusted to go on.  The exchange ends there as a server error (the
    /// connection closes, the application hears `server_error`) and the
    /// poison is cleared, so every later call sees a plain ended exchange.
    /// The rest of the server is unaffected.
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(st) => st,
            Err(poisoned) => {
                let mut st = poisoned.into_inner();
                self.state.clear_poison();
                self.end_after_panic(&mut st);
                st
            }
        }
    }

    fn end_after_panic(&self, st: &mut State) {
        tracing::error!(
            "internal error: a panic left request {} in an unknown state; ending it",
            self.id
        );
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        let detail = "internal error while handling the request".to_string();
        st.disconnected = Some("server_error");
        st.detail = Some(detail.clone());
        st.phase = Phase::Aborted;
        st.abort_flushed = true;
        st.queue.clear();
        st.buffered = 0;
        st.pending_head = None;
        if let Some(tx) = st.head_tx.take() {
            let _ = tx.send(Head::Abort);
        }
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        if let Some(close) = &self.close_connection {
            close.notify_one();
        }
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        self.body_credit.close();
        // The mailbox lock is only ever taken after this one.
        self.mailbox.push(ToPerl::Disconnect {
            id: self.id,
            reason: "server_error",
            detail: Some(detail),
        });
    }

    /// Hand a request-body chunk to the interpreter; false (and nothing
    /// sent) once the exchange has ended.  Decided under the state lock, so
    /// that the chunk cannot overtake the Disconnect message of an end
    /// recorded meanwhile: an end recorded first drops it, one recorded
    /// after queues its message behind it.
    pub fn deliver_body(&self, data: Bytes, more: bool) -> bool {
        let st = self.lock();
        if st.delivered || st.disconnected.is_some() {
            return false;
        }
        self.bodies_in_mailbox.fetch_add(1, Ordering::AcqRel);
        self.mailbox.push(ToPerl::Body {
            id: self.id,
            data,
            more,
        });
        drop(st);
        true
    }

    /// Perl took one request-body chunk out of the mailbox.
    pub fn body_taken(&self) {
        let _ = self
            .bodies_in_mailbox
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Request-body chunks queued for Perl that it has not taken yet.
    pub fn bodies_in_mailbox(&self) -> usize {
        self.bodies_in_mailbox.load(Ordering::Acquire)
    }

    pub fn config(&self) -> &ExchangeConfig {
        &self.config
    }

    pub fn mark_progress(&self) {
        let ms = self.facts.started.elapsed().as_millis() as u64;
        self.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    pub fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed));
        self.facts.started.elapsed().saturating_sub(last)
    }

    /// Perl wants to hear how the request ends.  If it already ended
    /// cleanly, say so now (a late on_complete still fires).
    pub fn register_interest(&self, bits: u8) {
        self.interest.fetch_or(bits, Ordering::AcqRel);
        let delivered = {
            let st = self.lock();
            st.delivered && st.disconnected.is_none()
        };
        if delivered {
            self.mailbox.push(ToPerl::Complete { id: self.id });
        }
    }

    fn wants_terminal(&self, st: &State) -> bool {
        st.app_running || self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0
    }

    // ---- interpreter side: the application's $send -------------------------

    pub fn start(
        &self,
        status: i64,
        headers: &[(&[u8], &[u8])],
        trailers: bool,
    ) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return Ok(SendOutcome::Closed);
        }
        if st.phase != Phase::AwaitingStart {
            return Err(SendError::Sequence("http.response.start was already sent"));
        }
        let status = final_status(status)?;
        let (map, declared) = build_headers(headers, true)?;
        st.declared_length = declared;
        st.trailers_promised = trailers;
        st.phase = Phase::Streaming;
        st.status = Some(status.as_u16());
        st.pending_head = Some((status, map));
        drop(st);
        self.mark_progress();
        Ok(SendOutcome::Ready)
    }

    /// `sse.start`: the head of an event stream.  Unlike an ordinary head it
    /// leaves at once, so the client's EventSource opens before the first
    /// event.  Adds the stream headers the application left out.
    pub fn start_event_stream(
        &self,
        status: i64,
        headers: &[(&[u8], &[u8])],
    ) -> Result<SendOutcome, SendError> {
        let outcome = self.start(status, headers, false)?;
        let mut st = self.lock();
        if let Some((_, map)) = st.pending_head.as_mut() {
            crate::sse::add_stream_headers(map);
            // An event stream has no length; one would end it early.
            map.remove(http::header::CONTENT_LENGTH);
        }
        st.declared_length = None;
        st.long_lived = true;
        let head = Self::take_head(&mut st);
        drop(st);
        Self::send_head(head);
        Ok(outcome)
    }

    /// `websocket.accept`: the 101 head goes to the network task, which
    /// hands the socket to the WebSocket connection.  False when it is too
    /// late (the client left, or a response was already decided).
    pub fn upgrade(&self, headers: HeaderMap) -> bool {
        let mut st = self.lock();
        if st.phase != Phase::AwaitingStart || st.disconnected.is_some() {
            return false;
        }
        let Some(tx) = st.head_tx.take() else {
            return false;
        };
        st.phase = Phase::Finished;
        // The access log shows what went on the wire: HTTP/2 accepts with
        // 200 (RFC 8441), HTTP/1.1 with 101.
        st.status = Some(if self.facts.http_version == "2" {
            200
        } else {
            101
        });
        st.long_lived = true;
        drop(st);
        self.mark_progress();
        tx.send(Head::Upgrade(headers)).is_ok()
    }

    /// The server answers for the application with a short text response
    /// (a WebSocket handshake refused with 403).  No-op once a response began.
    pub fn refuse(&self, status: StatusCode, text: &'static str) {
        let mut st = self.lock();
        if st.phase != Phase::AwaitingStart || st.disconnected.is_some() {
            return;
        }
        let Some(tx) = st.head_tx.take() else { return };
        st.phase = Phase::Finished;
        st.clean_end = true;
        st.status = Some(status.as_u16());
        drop(st);
        let _ = tx.send(Head::Generated(status, text));
        self.write_access_log();
    }

    /// How the application itself ended the stream (`sse.close` reason).
    pub fn set_end_reason(&self, reason: &str) {
        let mut st = self.lock();
        if st.end_reason.is_none() {
            st.end_reason = Some(reason.to_string());
        }
    }

    /// Resolves when the exchange ends (create it, then check `has_ended`).
    pub fn end_signal(&self) -> tokio::sync::futures::Notified<'_> {
        self.ended.notified()
    }

    /// Release a held-back head to the network task (call after unlocking).
    ///
    /// hyper writes only the trailer fields a `Trailer` header announced.  So
    /// a head that promised trailers without one waits, once its body is
    /// complete, for the trailers event, which names them (see `trailers`).
    /// A head whose body streams before the trailers cannot wait: the app
    /// must announce them itself (README).
    fn take_head(st: &mut State) -> Option<(oneshot::Sender<Head>, Head)> {
        let awaiting_trailer_names = st.trailers_promised
            && st.body_done
            && st.phase == Phase::Streaming
            && st.declared_length.is_none()
            && st
                .pending_head
                .as_ref()
                .is_some_and(|(_, map)| !map.contains_key(http::header::TRAILER));
        if awaiting_trailer_names {
            return None;
        }
        let (status, headers) = st.pending_head.take()?;
        let close_after = st.continue_unanswered;
        st.head_tx.take().map(|tx| {
            (
                tx,
                Head::App {
                    status,
                    headers,
                    close_after,
                },
            )
        })
    }

    fn send_head(head: Option<(oneshot::Sender<Head>, Head)>) {
        if let Some((tx, head)) = head {
            let _ = tx.send(head);
        }
    }

    pub fn body(&self, data: &[u8], more: bool) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return Ok(SendOutcome::Closed);
        }
        match st.phase {
            Phase::AwaitingStart => {
                return Err(SendError::Sequence(
                    "http.response.body before http.response.start",
                ))
            }
            Phase::Finished | Phase::Aborted => {
                return Err(SendError::Sequence("the response is already complete"))
            }
            Phase::Streaming if st.body_done => {
                return Err(SendError::Sequence(
                    "the body is complete; only http.response.trailers may follow",
                ))
            }
            Phase::Streaming => {}
        }
        let len = data.len() as u64;
        if let Some(declared) = st.declared_length {
            if st.body_bytes + len > declared {
                return Err(SendError::Invalid(format!(
                    "body of {} bytes exceeds the declared Content-Length of {declared}",
                    st.body_bytes + len
                )));
            }
        }
        st.body_bytes += len;
        st.inline_body = true;
        if !data.is_empty() && !self.facts.is_head {
            // hyper takes a whole frame into its own buffer at once; small
            // frames keep buffered_amount (and the water marks) truthful.
            let mut bytes = Bytes::copy_from_slice(data);
            while bytes.len() > MAX_FRAME {
                st.queue.push_back(Frame::data(bytes.split_to(MAX_FRAME)));
            }
            st.queue.push_back(Frame::data(bytes));
            st.buffered += data.len();
        }
        if !more {
            st.body_done = true;
            if !st.trailers_promised {
                st.phase = Phase::Finished;
                st.clean_end = true;
            }
        }
        if st.network_done {
            st.queue.clear();
            st.buffered = 0;
        }
        let outcome = self.water_mark_outcome(&mut st);
        let head = Self::take_head(&mut st);
        let waker = st.waker.take();
        self.deliver_if_done(st);
        self.mark_progress();
        Self::send_head(head);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(outcome)
    }

    fn water_mark_outcome(&self, st: &mut State) -> SendOutcome {
        water_mark(st.buffered, self.config.high_water, &mut st.high)
    }

    pub fn trailers(&self, headers: &[(&[u8], &[u8])]) -> Result<SendOutcome, SendError> {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return Ok(SendOutcome::Closed);
        }
        if st.phase != Phase::Streaming {
            return Err(SendError::Sequence(match st.phase {
                Phase::AwaitingStart => "http.response.trailers before http.response.start",
                _ => "the response is already complete",
            }));
        }
        if !st.trailers_promised {
            return Err(SendError::Sequence(
                "http.response.trailers without trailers => 1 in http.response.start",
            ));
        }
        if st.declared_length.is_some() && !self.facts.is_head {
            return Err(SendError::Invalid(
                "trailers need chunked framing, but the response has a Content-Length".into(),
            ));
        }
        let (map, _) = build_headers(headers, false)?;
        if let Some((_, head)) = st.pending_head.as_mut() {
            if !head.contains_key(http::header::TRAILER) && !map.is_empty() {
                let names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
                if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
                    head.insert(http::header::TRAILER, v);
                }
            }
        }
        if !self.facts.is_head {
            st.queue.push_back(Frame::trailers(map));
        }
        st.body_done = true;
        st.phase = Phase::Finished;
        st.clean_end = true;
        let head = Self::take_head(&mut st);
        let waker = st.waker.take();
        self.deliver_if_done(st);
        self.mark_progress();
        Self::send_head(head);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(SendOutcome::Ready)
    }

    /// Checks before a file/fh body, so that a refused send changes nothing.
    /// For a HEAD request the file is not even opened: the body ends here.
    pub fn begin_stream_body(&self) -> Result<Option<SendOutcome>, SendError> {
        {
            let st = self.lock();
            if st.disconnected.is_some() {
                return Ok(Some(SendOutcome::Closed));
            }
            match st.phase {
                Phase::AwaitingStart => {
                    return Err(SendError::Sequence(
                        "http.response.body before http.response.start",
                    ))
                }
                Phase::Streaming if !st.body_done => {}
                _ => return Err(SendError::Sequence("the response is already complete")),
            }
            if st.inline_body && self.config.spec.is_current() {
                return Err(SendError::Sequence(
                    "a file or fh body cannot follow inline body events; send the whole body inline",
                ));
            }
        }
        if self.facts.is_head {
            self.end_streamed();
            return Ok(Some(SendOutcome::Ready));
        }
        Ok(None)
    }

    /// Queue one chunk from a Rust-side producer (file streaming), waiting
    /// while the buffer is above the high-water mark.
    pub async fn push_streamed(&self, chunk: Bytes) -> Streamed {
        loop {
            let notified = self.progress.notified();
            {
                let mut st = self.lock();
                if st.disconnected.is_some() || st.phase == Phase::Aborted {
                    return Streamed::Ended;
                }
                if let Some(declared) = st.declared_length {
                    if st.body_bytes + chunk.len() as u64 > declared {
                        return Streamed::OverLength(declared);
                    }
                }
                if st.network_done {
                    // hyper writes no body here (204/304): count and drop.
                    st.body_bytes += chunk.len() as u64;
                    return Streamed::Queued;
                }
                if st.buffered < self.config.high_water {
                    st.body_bytes += chunk.len() as u64;
                    st.buffered += chunk.len();
                    st.queue.push_back(Frame::data(chunk));
                    let head = Self::take_head(&mut st);
                    let waker = st.waker.take();
                    drop(st);
                    Self::send_head(head);
                    self.mark_progress();
                    if let Some(w) = waker {
                        w.wake();
                    }
                    return Streamed::Queued;
                }
            }
            notified.await;
        }
    }

    /// The producer finished a file/fh body: the response is complete.
    pub fn end_streamed(&self) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.phase != Phase::Streaming {
            return;
        }
        st.body_done = true;
        if !st.trailers_promised {
            st.phase = Phase::Finished;
            st.clean_end = true;
        }
        let head = Self::take_head(&mut st);
        let waker = st.waker.take();
        self.deliver_if_done(st);
        Self::send_head(head);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// `http.fullflush`: settles once everything queued has been taken by the network.
    pub fn fullflush(&self) -> SendOutcome {
        let mut st = self.lock();
        if st.disconnected.is_some() {
            return SendOutcome::Closed;
        }
        let head = Self::take_head(&mut st);
        let outcome = if st.buffered == 0 {
            SendOutcome::Ready
        } else {
            st.flush_pending = true;
            SendOutcome::Deferred
        };
        drop(st);
        Self::send_head(head);
        outcome
    }

    /// The application's Future settled (with `error` if it failed).
    pub fn finish(&self, error: Option<&str>, interested: bool) -> FinishOutcome {
        if interested {
            self.register_interest(WANTS_TERMINAL);
        }
        // The application can no longer read the request body: let the pump
        // drop it (hyper then drains or closes).
        self.body_credit.close();
        self.mailbox.in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut st = self.lock();
        st.app_running = false;
        if st.disconnected.is_some() {
            return FinishOutcome::AlreadyDisconnected;
        }
        let err = error.map(|e| e.trim_end());
        match st.phase {
            Phase::Finished => {
                let head = Self::take_head(&mut st);
                drop(st);
                Self::send_head(head);
                if let Some(e) = err {
                    tracing::error!("PAGI application error (after response complete): {e}");
                }
                FinishOutcome::Clean
            }
            Phase::Aborted => FinishOutcome::AlreadyDisconnected,
            Phase::AwaitingStart => {
                let detail = match err {
                    Some(e) => {
                        tracing::error!("PAGI application error: {e}");
                        e.to_string()
                    }
                    None => {
                        let what = "application returned without starting a response";
                        tracing::error!("PAGI {what}");
                        what.to_string()
                    }
                };
                st.disconnected = Some("server_error");
                st.detail = Some(detail);
                st.status = Some(500);
                st.phase = Phase::Finished;
                let tx = st.head_tx.take();
                drop(st);
                if let Some(tx) = tx {
                    let _ = tx.send(Head::Generated(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Internal Server Error",
                    ));
                }
                self.write_access_log();
                FinishOutcome::Backstop500
            }
            Phase::Streaming
                if st.long_lived && err.is_none() && !self.config.spec.is_current() =>
            {
                // Www 0.3: an SSE app that returns after its last event ends
                // the stream as sse.close would.  From 0.6 on, sse.close is
                // the only clean end and a return is an incomplete response.
                st.body_done = true;
                st.phase = Phase::Finished;
                st.clean_end = true;
                if st.end_reason.is_none() {
                    st.end_reason = Some("app_returned".into());
                }
                let waker = st.waker.take();
                drop(st);
                if let Some(w) = waker {
                    w.wake();
                }
                FinishOutcome::Clean
            }
            Phase::Streaming => {
                let detail = match err {
                    Some(e) => {
                        if st.long_lived {
                            tracing::error!("PAGI application error (SSE): {e}");
                        } else {
                            tracing::error!("PAGI application error (after response started): {e}");
                        }
                        e.to_string()
                    }
                    None => {
                        let what = if st.long_lived {
                            "application returned after sse.start without sse.close"
                        } else if st.body_done {
                            "application returned with an incomplete response (trailers were declared but never sent)"
                        } else {
                            "application returned with an incomplete response"
                        };
                        tracing::error!("PAGI {what}");
                        what.to_string()
                    }
                };
                st.disconnected = Some("server_error");
                st.detail = Some(detail);
                st.phase = Phase::Aborted;
                // The head goes out so the client sees a started, then cut, response.
                let head = Self::take_head(&mut st);
                let waker = st.waker.take();
                drop(st);
                Self::send_head(head);
                if let Some(w) = waker {
                    w.wake();
                }
                self.progress.notify_waiters();
                self.ended.notify_waiters();
                self.write_access_log();
                FinishOutcome::Truncated
            }
        }
    }

    pub fn set_continue_unanswered(&self, v: bool) {
        self.lock().continue_unanswered = v;
    }

    /// The application asked for (more of) the request body.
    pub fn want_body(&self) {
        self.lock().continue_unanswered = false;
        self.body_credit.add_permits(1);
    }

    /// Live figure for pagi.transport.
    pub fn buffered_amount(&self) -> usize {
        self.lock().buffered
    }

    // ---- network side ------------------------------------------------------

    /// The client or the network ended the exchange before the response was
    /// delivered.  Idempotent; the first reason wins.
    pub fn network_gone(&self, reason: &'static str, detail: Option<String>) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        if st.phase != Phase::Finished {
            st.phase = Phase::Aborted;
        }
        st.head_tx = None;
        st.pending_head = None;
        self.end_abnormally(st, reason, detail);
    }

    /// `pagi.connection->abort`: end the exchange now, with no response if
    /// none has started, without writing what is queued, and close its
    /// connection.  False when the exchange had already ended (the first
    /// outcome stands).  Perl, which asked, tells the application itself.
    pub fn app_abort(&self, detail: Option<String>) -> bool {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.clean_end {
            return false;
        }
        st.phase = Phase::Aborted;
        // No flush turn: abort must not wait for writes the peer may block.
        st.abort_flushed = true;
        st.queue.clear();
        st.buffered = 0;
        st.pending_head = None;
        let head_tx = st.head_tx.take();
        st.disconnected = Some("app_abort");
        st.detail = detail;
        let waker = st.waker.take();
        drop(st);
        if let Some(tx) = head_tx {
            let _ = tx.send(Head::Abort);
        }
        if let Some(close) = &self.close_connection {
            close.notify_one();
        }
        if let Some(w) = waker {
            w.wake();
        }
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        self.body_credit.close();
        self.write_access_log();
        true
    }

    /// How far the exchange has got (`pagi.connection` reads this, so its
    /// facts are current even before the message saying so is dispatched).
    pub fn end_state(&self) -> EndState {
        let st = self.lock();
        match st.disconnected {
            _ if st.clean_end => EndState::Clean,
            Some(reason) => EndState::Abnormal {
                reason: reason.to_string(),
                detail: st.detail.clone(),
            },
            None => EndState::Active,
        }
    }

    /// An SSE response that became an event stream (`sse.start`), as
    /// opposed to one refused with an ordinary response.
    pub fn is_event_stream(&self) -> bool {
        self.lock().long_lived
    }

    /// Stop the exchange from the server side.  With no response started yet
    /// the server answers `status` (e.g. 413); otherwise the response is cut
    /// off.  Either way the connection closes and the app hears `reason`.
    pub fn server_abort(
        &self,
        reason: &'static str,
        detail: Option<String>,
        response: Option<(StatusCode, &'static str)>,
    ) {
        let mut st = self.lock();
        if st.disconnected.is_some() || st.delivered {
            return;
        }
        st.pending_head = None;
        match (st.head_tx.take(), response) {
            (Some(tx), Some((status, text))) => {
                st.status = Some(status.as_u16());
                st.phase = Phase::Finished;
                let _ = tx.send(Head::Generated(status, text));
            }
            (Some(tx), None) => {
                st.phase = Phase::Aborted;
                let _ = tx.send(Head::Abort);
            }
            (None, _) => st.phase = Phase::Aborted,
        }
        self.end_abnormally(st, reason, detail);
    }

    /// Record an abnormal end and tell everyone waiting: the network task,
    /// Rust-side producers, the body pump, and the application.
    fn end_abnormally(
        &self,
        mut st: MutexGuard<'_, State>,
        reason: &'static str,
        detail: Option<String>,
    ) {
        st.disconnected = Some(reason);
        st.detail = detail.clone();
        let notify_perl = self.wants_terminal(&st);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        self.body_credit.close();
        if notify_perl {
            self.mailbox.push(ToPerl::Disconnect {
                id: self.id,
                reason,
                detail,
            });
        }
        self.write_access_log();
    }

    /// Next frame for hyper; see body.rs.
    pub fn poll_frame(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        use std::task::Poll;
        let mut st = self.lock();
        if let Some(frame) = st.queue.pop_front() {
            if let Some(data) = frame.data_ref() {
                st.buffered -= data.len();
            }
            let mut drained = false;
            if st.high && st.buffered < self.config.low_water {
                st.high = false;
                drained = true;
            }
            let flushed = st.flush_pending && st.buffered == 0;
            if flushed {
                st.flush_pending = false;
            }
            drop(st);
            self.mark_progress();
            self.progress.notify_waiters();
            if drained {
                self.mailbox.push(ToPerl::Drained { id: self.id });
            }
            if flushed {
                self.mailbox.push(ToPerl::SendDone {
                    id: self.id,
                    error: None,
                });
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match st.phase {
            Phase::Aborted if !st.abort_flushed => {
                // One more turn so hyper flushes the bytes it already took;
                // erroring now would discard them and hide the truncation.
                st.abort_flushed = true;
                drop(st);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Phase::Aborted => Poll::Ready(Some(Err(BodyAborted))),
            Phase::Finished if st.disconnected.is_none() && !st.delivered => {
                st.delivered = true;
                let notify_perl = self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0;
                drop(st);
                self.ended.notify_waiters();
                if notify_perl {
                    self.mailbox.push(ToPerl::Complete { id: self.id });
                }
                self.write_access_log();
                Poll::Ready(None)
            }
            Phase::Finished => Poll::Ready(None),
            _ => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// hyper dropped the response body.  That is a disconnect, unless hyper
    /// simply had nothing more to write (see `network_done`).
    pub fn body_dropped(&self, reason: &'static str, detail: &'static str) {
        let mut st = self.lock();
        let no_body_on_wire = self.facts.is_head || matches!(st.status, Some(204) | Some(304));
        let length_satisfied =
            st.queue.is_empty() && st.declared_length.is_some_and(|d| st.body_bytes >= d);
        // hyper stops polling once is_end_stream() is true, so a finished,
        // fully taken body is dropped without a final poll.
        let all_taken = st.queue.is_empty() && st.phase == Phase::Finished;
        if st.disconnected.is_none()
            && !st.delivered
            && st.phase != Phase::Aborted
            && (no_body_on_wire || length_satisfied || all_taken)
        {
            st.network_done = true;
            st.queue.clear();
            st.buffered = 0;
            self.deliver_if_done(st);
            return;
        }
        drop(st);
        self.network_gone(reason, Some(detail.to_string()));
    }

    /// With the network done, reaching the terminal event completes the response.
    fn deliver_if_done(&self, mut st: MutexGuard<'_, State>) {
        if !st.network_done
            || st.phase != Phase::Finished
            || st.delivered
            || st.disconnected.is_some()
        {
            return;
        }
        st.delivered = true;
        let notify_perl = self.interest.load(Ordering::Acquire) & WANTS_TERMINAL != 0;
        drop(st);
        self.progress.notify_waiters();
        self.ended.notify_waiters();
        if notify_perl {
            self.mailbox.push(ToPerl::Complete { id: self.id });
        }
        self.write_access_log();
    }

    pub fn is_body_end(&self) -> bool {
        let st = self.lock();
        st.queue.is_empty() && st.phase == Phase::Finished
    }

    pub fn declared_length(&self) -> Option<u64> {
        self.lock().declared_length
    }

    pub fn has_ended(&self) -> bool {
        let st = self.lock();
        st.delivered || st.disconnected.is_some()
    }

    /// One access-log line per exchange, written when it ends.
    pub fn write_access_log(&self) {
        let Some(log) = &self.config.access_log else {
            return;
        };
        let (status, bytes, end_reason) = {
            let mut st = self.lock();
            if st.logged {
                return;
            }
            st.logged = true;
            let end_reason = if st.long_lived {
                st.end_reason
                    .clone()
                    .or_else(|| st.disconnected.map(str::to_string))
            } else {
                None
            };
            // Application body bytes only: the server's own refusal bodies
            // are not counted, as in the reference server.
            (st.status, st.body_bytes, end_reason)
        };
        let f = &self.facts;
        log.write(&Record {
            client: Some(f.client),
            method: &f.method,
            raw_path: &f.raw_path,
            query: &f.query,
            http_version: f.http_version,
            status,
            body_bytes: bytes,
            duration: f.started.elapsed(),
            headers: &f.headers,
            end_reason: end_reason.as_deref(),
        });
    }
}

/// The body stream was cut off; hyper closes the connection without the
/// terminating chunk, so the client sees the truncation.
#[derive(Debug, thiserror::Error)]
#[error("response aborted")]
pub struct BodyAborted;

/// Connection-level and framing headers belong to the server (Spec/Www.pod).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "transfer-encoding" | "keep-alive" | "proxy-connection"
    )
}

/// Validate and convert application headers.  Anything that could split the
/// response (CR, LF, NUL, other controls, non-token names) fails the send.
pub(crate) fn build_headers(
    headers: &[(&[u8], &[u8])],
    response: bool,
) -> Result<(HeaderMap, Option<u64>), SendError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    let mut declared = None;
    for (name, value) in headers {
        let hname = HeaderName::from_bytes(name).map_err(|_| {
            SendError::Header(format!(
                "name {:?} is not a valid header name",
                String::from_utf8_lossy(name)
            ))
        })?;
        let hvalue = HeaderValue::from_bytes(value).map_err(|_| {
            SendError::Header(format!(
                "value of {:?} contains a control character (CR, LF, NUL ...)",
                hname.as_str()
            ))
        })?;
        if response && is_hop_by_hop(&hname) {
            tracing::debug!(
                "connection-specific header '{}' stripped from HTTP/1.1 response",
                hname
            );
            continue;
        }
        if response && hname == http::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    SendError::Header("content-length must be a non-negative integer".into())
                })?;
            if declared.is_some_and(|d| d != n) {
                return Err(SendError::Header(
                    "conflicting content-length headers".into(),
                ));
            }
            if declared.is_some() {
                continue;
            }
            declared = Some(n);
        }
        map.append(hname, hvalue);
    }
    Ok((map, declared))
}

impl Exchange {
    /// Send a message about this exchange to its interpreter.
    pub fn mailbox_push(&self, msg: ToPerl) {
        self.mailbox.push(msg);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn exchange(is_head: bool) -> (Arc<Exchange>, oneshot::Receiver<Head>) {
        exchange_speaking(is_head, crate::spec::SpecVersion::Www06)
    }

    pub(crate) fn exchange_speaking(
        is_head: bool,
        spec: crate::spec::SpecVersion,
    ) -> (Arc<Exchange>, oneshot::Receiver<Head>) {
        let mailbox = Arc::new(Mailbox::new().unwrap());
        mailbox.in_flight.fetch_add(1, Ordering::AcqRel);
        let config = Arc::new(ExchangeConfig {
            body_rate: crate::body::MinRate::OFF,
            high_water: 10,
            low_water: 4,
            max_body: 0,
            access_log: None,
            streams: crate::sse::StreamSettings {
                idle_timeout: None,
                shutdown: tokio::sync::watch::channel(false).1,
            },
            spec,
        });
        let facts = RequestFacts {
            method: "GET".into(),
            raw_path: Bytes::from_static(b"/"),
            query: Bytes::new(),
            http_version: "1.1",
            client: "127.0.0.1:1".parse().unwrap(),
            headers: vec![],
            is_head,
            started: Instant::now(),
        };
        Exchange::new(1, mailbox, config, facts, None)
    }

    pub(crate) fn poll(
        ex: &Exchange,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyAborted>>> {
        let waker = futures_noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        ex.poll_frame(&mut cx)
    }

    fn futures_noop_waker() -> Waker {
        Waker::noop().clone()
    }

    #[test]
    fn header_injection_fails_the_send_and_sends_nothing() {
        let (ex, mut rx) = exchange(false);
        for (n, v) in [
            (&b"x-a"[..], &b"ok\r\nx-evil: 1"[..]),
            (b"x-a", b"a\nb"),
            (b"x-a", b"a\0b"),
            (b"x a", b"v"),
            (b"x-a\r\n", b"v"),
        ] {
            let err = ex.start(200, &[(n, v)], false).unwrap_err();
            assert!(matches!(err, SendError::Header(_)), "{err}");
        }
        assert!(rx.try_recv().is_err(), "no head may reach the network");
        assert_eq!(
            ex.start(200, &[(b"x-a", b"fine")], false).unwrap(),
            SendOutcome::Ready
        );
    }

    #[test]
    fn sequence_rules() {
        let (ex, _rx) = exchange(false);
        assert!(matches!(ex.body(b"x", false), Err(SendError::Sequence(_))));
        ex.start(200, &[], false).unwrap();
        assert!(matches!(
            ex.start(200, &[], false),
            Err(SendError::Sequence(_))
        ));
        assert!(
            matches!(ex.trailers(&[]), Err(SendError::Sequence(_))),
            "trailers not promised"
        );
        ex.body(b"abc", false).unwrap();
        assert!(matches!(ex.body(b"x", false), Err(SendError::Sequence(_))));
    }

    #[test]
    fn invalid_status_is_refused() {
        let (ex, mut rx) = exchange(false);
        for status in [42, 99, 600, 999, 1000, -200, i64::MAX] {
            match ex.start(status, &[], false) {
                Err(SendError::Invalid(msg)) => assert!(msg.contains("100-599"), "{status}: {msg}"),
                other => panic!("{status}: {other:?}"),
            }
        }
        match ex.start(101, &[], false) {
            Err(SendError::Invalid(msg)) => assert!(msg.contains("informational"), "{msg}"),
            other => panic!("101: {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "nothing reached the network");
        for status in [200, 404, 599] {
            let (ex, _rx) = exchange(false);
            assert_eq!(ex.start(status, &[], false).unwrap(), SendOutcome::Ready);
        }
    }

    #[test]
    fn a_body_chunk_never_follows_the_disconnect() {
        let (ex, _rx) = exchange(false);
        assert!(ex.deliver_body(Bytes::from_static(b"one"), true));
        assert_eq!(ex.bodies_in_mailbox(), 1);
        ex.network_gone("client_closed", None);
        assert!(
            !ex.deliver_body(Bytes::from_static(b"two"), false),
            "a chunk offered after the end is dropped"
        );
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        let kinds: Vec<&str> = q
            .iter()
            .map(|m| match m {
                ToPerl::Body { .. } => "body",
                ToPerl::Disconnect { .. } => "disconnect",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["body", "disconnect"]);
        ex.body_taken();
        assert_eq!(ex.bodies_in_mailbox(), 0);
        ex.body_taken();
        assert_eq!(ex.bodies_in_mailbox(), 0, "never below zero");
    }

    #[test]
    fn a_poisoned_exchange_ends_as_a_server_error() {
        let (ex, mut rx) = exchange(false);
        let ex2 = ex.clone();
        let _ = std::thread::spawn(move || {
            let _st = ex2.state.lock().unwrap();
            panic!("a bug while the state is locked");
        })
        .join();
        assert!(ex.state.is_poisoned());
        assert_eq!(
            ex.start(200, &[], false).unwrap(),
            SendOutcome::Closed,
            "sends are no-ops on the ended exchange"
        );
        assert!(
            !ex.state.is_poisoned(),
            "the poison is cleared once handled"
        );
        assert!(
            matches!(ex.end_state(), EndState::Abnormal { reason, .. } if reason == "server_error")
        );
        assert!(matches!(rx.try_recv(), Ok(Head::Abort)));
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(
            m,
            ToPerl::Disconnect {
                reason: "server_error",
                ..
            }
        )));
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_content_length_enforced() {
        let (ex, mut rx) = exchange(false);
        ex.start(
            200,
            &[
                (b"transfer-encoding", b"chunked"),
                (b"connection", b"close"),
                (b"content-length", b"3"),
            ],
            false,
        )
        .unwrap();
        assert!(
            rx.try_recv().is_err(),
            "the head waits for the first body event"
        );
        assert!(matches!(
            ex.body(b"abcd", false),
            Err(SendError::Invalid(_))
        ));
        assert_eq!(ex.body(b"abc", false).unwrap(), SendOutcome::Ready);
        match rx.try_recv() {
            Ok(Head::App { headers: map, .. }) => {
                assert!(map.get("transfer-encoding").is_none());
                assert!(map.get("connection").is_none());
                assert_eq!(map.get("content-length").unwrap(), "3");
            }
            _ => panic!("expected the app head"),
        }
    }

    #[test]
    fn water_marks_are_edge_triggered() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], false).unwrap();
        assert_eq!(ex.body(b"123456", true).unwrap(), SendOutcome::Ready);
        assert_eq!(ex.body(b"123456", true).unwrap(), SendOutcome::HighWater);
        assert_eq!(ex.body(b"1", true).unwrap(), SendOutcome::StillHigh);
        assert_eq!(ex.buffered_amount(), 13);
        let _ = poll(&ex); // 7 left: still above low water
        assert_eq!(ex.buffered_amount(), 7);
        let _ = poll(&ex); // 1 left: below low water, Drained pushed
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(m, ToPerl::Drained { .. })));
        assert_eq!(ex.body(b"1", false).unwrap(), SendOutcome::Ready);
    }

    #[test]
    fn trailers_rules() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[(b"content-length", b"2")], true).unwrap();
        ex.body(b"ab", false).unwrap();
        assert!(
            matches!(ex.trailers(&[(b"x-t", b"1")]), Err(SendError::Invalid(_))),
            "CL forbids trailers"
        );

        let (ex, _rx) = exchange(false);
        ex.start(200, &[], true).unwrap();
        ex.body(b"ab", false).unwrap();
        assert!(!ex.is_body_end(), "trailers still owed");
        ex.trailers(&[(b"x-t", b"1")]).unwrap();
        let _ = poll(&ex);
        assert!(matches!(poll(&ex), std::task::Poll::Ready(Some(Ok(f))) if f.is_trailers()));
        assert!(matches!(poll(&ex), std::task::Poll::Ready(None)));
    }

    #[test]
    fn head_requests_discard_body_bytes_but_complete() {
        let (ex, _rx) = exchange(true);
        ex.start(200, &[], false).unwrap();
        assert_eq!(ex.body(&[0u8; 100], false).unwrap(), SendOutcome::Ready);
        assert_eq!(ex.buffered_amount(), 0);
        assert!(matches!(poll(&ex), std::task::Poll::Ready(None)));
    }

    #[test]
    fn head_request_with_a_file_body_completes_without_reading_it() {
        let (ex, mut rx) = exchange(true);
        ex.start(200, &[(b"content-length", b"1234")], false)
            .unwrap();
        assert_eq!(ex.begin_stream_body().unwrap(), Some(SendOutcome::Ready));
        assert!(
            matches!(rx.try_recv(), Ok(Head::App { .. })),
            "the head goes out"
        );
        assert_eq!(ex.finish(None, false), FinishOutcome::Clean);
    }

    #[test]
    fn finish_without_response_is_a_500_backstop() {
        let (ex, mut rx) = exchange(false);
        assert_eq!(
            ex.finish(Some("boom at app.pl line 3.\n"), false),
            FinishOutcome::Backstop500
        );
        assert!(
            matches!(rx.try_recv(), Ok(Head::Generated(s, _)) if s == StatusCode::INTERNAL_SERVER_ERROR)
        );
    }

    #[test]
    fn finish_after_disconnect_sends_nothing() {
        let (ex, mut rx) = exchange(false);
        ex.network_gone("client_closed", None);
        assert_eq!(
            ex.finish(Some("boom"), false),
            FinishOutcome::AlreadyDisconnected
        );
        assert!(rx.try_recv().is_err());
        // sends after a disconnect are no-ops
        assert_eq!(ex.start(200, &[], false).unwrap(), SendOutcome::Closed);
        assert_eq!(ex.body(b"x", false).unwrap(), SendOutcome::Closed);
    }

    #[test]
    fn incomplete_response_is_truncated() {
        let (ex, _rx) = exchange(false);
        ex.start(200, &[], false).unwrap();
        ex.body(b"partial", true).unwrap();
        assert_eq!(ex.finish(None, false), FinishOutcome::Truncated);
        let _ = poll(&ex); // the queued chunk
        assert!(
            poll(&ex).is_pending(),
            "one turn for hyper to flush what it took"
        );
        assert!(matches!(
            poll(&ex),
            std::task::Poll::Ready(Some(Err(BodyAborted)))
        ));
    }

    #[test]
    fn server_abort_before_start_sends_generated_status() {
        let (ex, mut rx) = exchange(false);
        ex.server_abort(
            "body_too_large",
            None,
            Some((StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large")),
        );
        assert!(
            matches!(rx.try_recv(), Ok(Head::Generated(s, _)) if s == StatusCode::PAYLOAD_TOO_LARGE)
        );
        let mut q = VecDeque::new();
        ex.mailbox.take_all(&mut q);
        assert!(q.iter().any(|m| matches!(
            m,
            ToPerl::Disconnect {
                reason: "body_too_large",
                ..
            }
        )));
        assert_eq!(ex.start(200, &[], false).unwrap(), SendOutcome::Closed);
    }

    mod header_properties {
        use super::super::build_headers;
        use proptest::prelude::*;

        /// RFC 9110 tchar: the bytes a header name may be made of.
        const TCHAR: &[u8] =
            b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

        fn is_control(b: u8) -> bool {
            (b < 0x20 && b != b'\t') || b == 0x7f
        }

        fn token() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(prop::sample::select(TCHAR.to_vec()), 1..24)
        }

        /// Field content: visible ASCII, spaces and tabs inside, obs-text.
        fn field_value() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(
                prop_oneof![0x21u8..=0x7e, Just(b' '), Just(b'\t'), 0x80u8..=0xff],
                0..40,
            )
            .prop_map(|mut v| {
                // Leading or trailing whitespace is not field content.
                while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                    v.remove(0);
                }
                while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
                    v.pop();
                }
                v
            })
        }

        proptest! {
            #[test]
            fn never_panics_on_any_bytes(
                name in prop::collection::vec(any::<u8>(), 0..16),
                value in prop::collection::vec(any::<u8>(), 0..32),
                response in any::<bool>(),
            ) {
                let _ = build_headers(&[(&name, &value)], response);
            }

            #[test]
            fn valid_tokens_and_values_pass(name in token(), value in field_value()) {
                // content-length has its own rule; connection headers are stripped.
                prop_assume!(!name.eq_ignore_ascii_case(b"content-length"));
                let (map, _) = build_headers(&[(&name, &value)], false)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(map.len(), 1);
                prop_assert_eq!(map.iter().next().unwrap().1.as_bytes(), &value[..]);
            }

            #[test]
            fn a_control_in_the_value_is_refused(
                name in token(),
                before in field_value(),
                after in field_value(),
                control in prop_oneof![0u8..0x09, 0x0au8..0x20, Just(0x7fu8)],
            ) {
                let value = [&before[..], &[control], &after[..]].concat();
                prop_assert!(build_headers(&[(&name, &value)], true).is_err());
                prop_assert!(build_headers(&[(&name, &value)], false).is_err());
            }

            #[test]
            fn a_name_that_is_not_a_token_is_refused(
                before in token(),
                after in token(),
                bad in any::<u8>().prop_filter("not a tchar", |b| !TCHAR.contains(b)),
            ) {
                let name = [&before[..], &[bad], &after[..]].concat();
                prop_assert!(build_headers(&[(&name, b"v")], true).is_err());
                prop_assert!(build_headers(&[(&name, b"v")], false).is_err());
            }

            #[test]
            fn cr_lf_and_nul_never_get_through(
                name in prop::collection::vec(any::<u8>(), 1..16),
                value in prop::collection::vec(any::<u8>(), 0..32),
            ) {
                if let Ok((map, _)) = build_headers(&[(&name, &value)], false) {
                    for (n, v) in map.iter() {
                        prop_assert!(!n.as_str().bytes().any(is_control));
                        prop_assert!(!v.as_bytes().iter().any(|&b| is_control(b)));
                    }
                }
            }
        }
    }
}
