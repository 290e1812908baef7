//! One request/response exchange, shared by the network task that owns the
//! socket and the interpreter thread that runs the application.
//!
//! The interpreter side calls the `start`/`body`/`trailers`/`finish` methods
//! (from the `$send` XS functions); the network side drains the outbound
//! queue through [`crate::body::ResponseBody`] and reports disconnects.  All
//! response sequencing rules live here, so they are unit-testable without Perl.
//!
//! This file holds the types and the shared state; the rest is split by job.

/// The access-log facts and the line written when the exchange ends.
mod access;
/// How the exchange ends, and who hears of it.
mod end;
/// Validation and conversion of the application's headers.
mod headers;
/// What the protocol side calls: frames to write, the body's end or drop.
mod network;
/// The frames queued for the network, small body pieces joined.
mod outgoing;
/// The application's `$send`: the response's phases.
mod send;
/// File and fh bodies streamed by a Rust-side producer.
mod stream;
/// Wake-ups of network tasks held to the end of the interpreter's batch.
pub mod wakeups;
/// When a send waits for the buffer to drain, and when Perl hears of it.
mod water;

pub use water::BulkHint;
pub(crate) use water::WaterMarks;

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::sync::{oneshot, Notify};

use crate::access_log::AccessLog;
use crate::interp::constants::{finish as finish_codes, send as codes};
use crate::interp::mailbox::Mailbox;
use crate::interp::messages::ToPerl;

pub use access::RequestFacts;
pub(crate) use headers::{build_headers, Section};
pub use network::BodyAborted;

/// Server-wide settings every exchange needs.
pub struct ExchangeConfig {
    pub high_water: usize,
    pub low_water: usize,
    /// 0 = unlimited.
    pub max_body: u64,
    /// `--read-buffer-size`: the most request-body bytes in one
    /// http.request event.
    pub read_buffer_size: usize,
    /// `--write-buffer-size`: the largest data frame handed to the
    /// connection (a larger body event or file read is cut to it).
    pub write_buffer_size: usize,
    /// `--body-min-rate` / `--body-rate-grace`: the pace a request body must
    /// keep once the server has waited the grace for it.
    pub body_rate: crate::body::MinRate,
    pub access_log: Option<AccessLog>,
    /// Limits and signals for SSE streams.
    pub streams: crate::sse::StreamSettings,
    /// Which PAGI the server speaks (`--spec-version`).
    pub spec: crate::spec::SpecVersion,
}

impl ExchangeConfig {
    /// How much a file or fh body keeps queued ahead of the network: one
    /// write's worth ([`bytes_per_write`]), or the high-water mark if that
    /// is more.  The app does not see this pace (its send settles once the
    /// whole file is out), so only memory bounds it.  Held to the mark,
    /// each write carried at most two 64 KiB chunks, and a cached 1 MiB
    /// file went out at 0.70 of plain hyper's rate instead of 0.85.
    pub fn file_window(&self) -> usize {
        self.high_water.max(bytes_per_write(self.write_buffer_size))
    }
}

/// Body frames a connection takes for one write.  hyper polls the body for
/// frames until its write buffer is full or none is ready, then writes what
/// it holds in one `writev`; at one frame (a 64 KiB buffer against 64 KiB
/// frames), every frame was a write of its own even when the app had
/// already queued the next.  Four let the frames an app queued while the
/// last write ran leave together: about a tenth more for a streamed 1 MiB
/// response (`bench/README.md`, body-bench).  http1::connection sizes
/// hyper's buffer by it.
pub const FRAMES_PER_WRITE: usize = 4;

/// The bytes of one write: [`FRAMES_PER_WRITE`] frames, never under
/// 64 KiB nor over 1 MiB.
pub fn bytes_per_write(write_buffer_size: usize) -> usize {
    write_buffer_size
        .saturating_mul(FRAMES_PER_WRITE)
        .clamp(64 * 1024, 1024 * 1024)
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

/// How a `$send` went, as a small code for Perl (see HTTP.pm and send.c;
/// the numbers come from constants.def, group send).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted; resolve the Future now.
    Ready = codes::SENT as isize,
    /// Accepted, but it found the buffer at the high-water mark (or would
    /// leave twice the mark queued): fire on_high_water and resolve when
    /// Drained arrives.
    HighWater = codes::HIGH_WATER as isize,
    /// As HighWater, when on_high_water has already fired for this
    /// crossing: resolve when Drained arrives.
    StillHigh = codes::STILL_HIGH as isize,
    /// Accepted into a buffer below the mark, which it brought to the mark:
    /// resolve now, and fire on_high_water (see [`WaterMarks::on_send`]).
    ReachedHigh = codes::REACHED_HIGH as isize,
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
    /// The network writes no body (a 204 or 304 whose body hyper dropped):
    /// the producer stops reading and ends the body, as a HEAD request's
    /// file is never opened.  An endless fh (a pipe) would otherwise be
    /// read for ever.
    NotWanted,
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
    queue: outgoing::OutgoingFrames,
    buffered: usize,
    marks: WaterMarks,
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

/// Bits of `interest`: what Perl wants to hear after the app returns.
pub const WANTS_TERMINAL: u8 = 1;
/// ...and that it has on_drain callbacks: every drain is news to it.
pub const WANTS_DRAIN: u8 = 2;

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
    /// [`coarse_clock_ms`] at the last read or write progress.
    last_progress_ms: AtomicU64,
    /// Set when the response became an SSE event stream.
    pub event_stream: std::sync::OnceLock<crate::sse::StreamControl>,
    /// Closes the exchange's connection at once (`abort`): nothing queued
    /// is written, and on HTTP/1.1 nothing else can use the connection.
    close_connection: Option<Arc<Notify>>,
    /// The connection's writer, told when more body follows at once (HTTP/1.1
    /// over TCP; see http1/segments.rs).
    bulk_hint: Option<Arc<BulkHint>>,
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
        bulk_hint: Option<Arc<BulkHint>>,
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
                queue: outgoing::OutgoingFrames::default(),
                buffered: 0,
                marks: WaterMarks::default(),
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
            last_progress_ms: AtomicU64::new(coarse_clock_ms()),
            event_stream: std::sync::OnceLock::new(),
            close_connection,
            bulk_hint,
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

    /// Hand a request-body chunk to the interpreter; false (and nothing
    /// sent) once the exchange has ended.  Decided under the state lock, so
    /// that the chunk cannot overtake the Disconnect message of an end
    /// recorded meanwhile: an end recorded first drops it, one recorded
    /// after queues its message behind it.
    pub fn deliver_body(&self, mut data: crate::body::BodyChunk, more: bool) -> bool {
        // Outside the lock: the copy is the size of the chunk.
        data.join_for_perl();
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

    /// Called for every frame sent and taken, so it reads the coarse clock.
    pub fn mark_progress(&self) {
        self.last_progress_ms
            .store(coarse_clock_ms(), Ordering::Relaxed);
    }

    /// How long since the last progress, give or take the coarse clock's
    /// tick (a few milliseconds): the timeouts it serves count in seconds.
    pub fn since_progress(&self) -> Duration {
        let last = self.last_progress_ms.load(Ordering::Relaxed);
        Duration::from_millis(coarse_clock_ms().saturating_sub(last))
    }

    pub fn set_continue_unanswered(&self, v: bool) {
        self.lock().continue_unanswered = v;
    }

    /// The application asked for (more of) the request body.
    pub fn want_body(&self) {
        self.lock().continue_unanswered = false;
        self.body_credit.add_permits(1);
    }

    /// Send a message about this exchange to its interpreter.
    pub fn mailbox_push(&self, msg: ToPerl) {
        self.mailbox.push(msg);
    }
}

/// Milliseconds on CLOCK_MONOTONIC_COARSE: the time of the last timer
/// tick, a sixth of the cost of the precise clock (3 ns against 19 here).
/// Progress is marked per frame, thousands of times per second on an SSE
/// stream; the precise reads were 2 % of the interpreter's time.
fn coarse_clock_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which we own.
    // CLOCK_MONOTONIC_COARSE exists on every Linux this builds for; were
    // the call to fail, `now` stays zero and progress reads as "none yet".
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    (now.tv_sec as u64) * 1000 + (now.tv_nsec as u64) / 1_000_000
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::VecDeque;
    use std::time::Instant;

    use bytes::Bytes;
    use http_body::Frame;

    use super::*;

    pub(crate) fn exchange(is_head: bool) -> (Arc<Exchange>, oneshot::Receiver<Head>) {
        exchange_speaking(is_head, crate::spec::SpecVersion::Www06)
    }

    pub(crate) fn exchange_speaking(
        is_head: bool,
        spec: crate::spec::SpecVersion,
    ) -> (Arc<Exchange>, oneshot::Receiver<Head>) {
        exchange_closing(is_head, spec, None)
    }

    /// An exchange whose transport `close` ends at once (the connection's
    /// or stream's notify, as the protocols give it).
    pub(crate) fn exchange_closing(
        is_head: bool,
        spec: crate::spec::SpecVersion,
        close: Option<Arc<Notify>>,
    ) -> (Arc<Exchange>, oneshot::Receiver<Head>) {
        let mailbox = Arc::new(Mailbox::new().unwrap());
        mailbox.in_flight.fetch_add(1, Ordering::AcqRel);
        let config = Arc::new(ExchangeConfig {
            body_rate: crate::body::MinRate::OFF,
            high_water: 10,
            low_water: 4,
            max_body: 0,
            read_buffer_size: 64 * 1024,
            write_buffer_size: 64 * 1024,
            access_log: None,
            streams: crate::sse::StreamSettings {
                idle_timeout: None,
                shutdown: tokio::sync::watch::channel(false).1,
            },
            spec,
        });
        let facts = RequestFacts {
            method: http::Method::GET,
            raw_path: Bytes::from_static(b"/"),
            query: Bytes::new(),
            http_version: "1.1",
            client: crate::service::Peer::Tcp("127.0.0.1:1".parse().unwrap()),
            headers: vec![],
            is_head,
            started: Instant::now(),
        };
        Exchange::new(1, mailbox, config, facts, close, None)
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
    fn progress_is_timed_on_the_coarse_clock() {
        let (ex, _rx) = exchange(false);
        std::thread::sleep(Duration::from_millis(60));
        let idle = ex.since_progress();
        assert!(
            idle >= Duration::from_millis(50) && idle < Duration::from_secs(2),
            "{idle:?} since the exchange began"
        );
        ex.mark_progress();
        assert!(ex.since_progress() < Duration::from_millis(20));
    }

    #[test]
    fn a_body_chunk_never_follows_the_disconnect() {
        let (ex, _rx) = exchange(false);
        assert!(ex.deliver_body(Bytes::from_static(b"one").into(), true));
        assert_eq!(ex.bodies_in_mailbox(), 1);
        ex.network_gone("client_closed", None);
        assert!(
            !ex.deliver_body(Bytes::from_static(b"two").into(), false),
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
}
