//! The request gate: a thin reader between the socket and hyper that finds
//! each request head in the byte stream and checks it before hyper parses it.
//!
//! hyper quietly accepts some requests the server must refuse (duplicate
//! Content-Length, Content-Length with Transfer-Encoding, which it resolves
//! by dropping a header) and answers its own parse errors with empty bodies.
//! When a head fails a check, the gate hands hyper a stand-in request that
//! carries the verdict in [`REFUSAL_HEADER`], and nothing after it.  The
//! service answers the stand-in with the server's text/plain refusal, so the
//! refusal keeps its place behind any pipelined requests, and hyper closes
//! the connection after it.
//!
//! To find the next head the gate follows body framing (Content-Length or
//! chunked), and it is the stricter of the two parsers: a chunk-size line,
//! chunk delimiter or trailer section it does not accept stops the body
//! with a [`BodyRefusal`] (400, 413 or 431) before hyper sees the bytes, so
//! the two can never disagree about where a request ends.  After an
//! `Upgrade` request it holds what follows until the response is known: a
//! 101 makes it step aside for good, anything else resumes the checks.
//! CONNECT is refused with 501 (the server does not tunnel).
//!
//! A client may shut down its sending side once its requests are out
//! (half-close).  An end of stream that comes after complete requests, while
//! one of them is still unanswered, is therefore held back from hyper until
//! every answer is written (see [`Answers`]).  An end of stream in the middle
//! of a request, or while the last response is already streaming, is the
//! client leaving, as before.  A client that closes completely while its
//! request is unanswered looks the same on the wire (a FIN); it is noticed
//! when a write to it fails, or at once if it resets the connection.
//!
//! hyper's HeaderMap groups values by name, losing the wire order when a name
//! comes back after another (`X-A, X-B, X-A`); hyper keeps its own record of
//! the order private.  The gate notices that rare case and leaves the names
//! in wire order in [`WireOrders`] for the service to claim.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::header::HeaderName;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::write_stall::WriteStall;

/// Carries the refusal status from the gate to the service.  A client that
/// sends it itself is refused.
pub const REFUSAL_HEADER: &str = "x-pagi-rs-refusal";

/// Longest request line accepted; longer gets 414 (the reference's limit).
pub const MAX_REQUEST_LINE: usize = 8192;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header_size: usize,
    pub max_header_count: usize,
    /// 0 = unlimited.
    pub max_body: u64,
}

/// Longest chunk-size line (size and extensions) accepted; longer gets 400.
pub const MAX_CHUNK_LINE: usize = 4096;

/// hyper fails a body whose chunk extensions add up to this many bytes; the
/// gate refuses the same body first, so the two agree.
const MAX_CHUNK_EXTENSIONS: u64 = 16 * 1024;

/// Most bytes read ahead of hyper in one go.
const MAX_READ_AHEAD: usize = 64 * 1024;

/// Most body bytes read straight into hyper's buffer at once.  hyper's
/// buffers are sized for its writes (http1/connection.rs); larger reads
/// would not make uploads faster, but would teach the kernel (whose receive
/// buffer grows with what each read takes) to hold more of a body that a
/// slow app is not reading.
const MAX_BODY_READ: usize = 64 * 1024;

/// Bytes held after an Upgrade request while its answer is pending; beyond
/// this the socket is not read until the answer is known.
const MAX_HELD_AFTER_UPGRADE: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Head,
    Fixed(u64),
    Chunked(Chunk),
    /// The connection was upgraded (101): it is no longer HTTP/1.
    PassThrough,
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers { bytes: usize, fields: usize },
}

/// Why the gate stopped a request body: its chunked framing broke a rule or
/// it grew over a limit.  hyper gets it as the read error, so the body fails;
/// the body pump finds it in the error chain and answers with `status`
/// (before any response started) and the rule as the disconnect detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct BodyRefusal {
    pub status: StatusCode,
    pub detail: String,
}

impl BodyRefusal {
    fn bad(detail: &str) -> BodyRefusal {
        BodyRefusal {
            status: StatusCode::BAD_REQUEST,
            detail: detail.to_string(),
        }
    }

    /// The refusal behind a failed body read, if the gate made it.
    pub fn find<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e BodyRefusal> {
        let mut next: Option<&'e (dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = next {
            if let Some(r) = e.downcast_ref::<BodyRefusal>() {
                return Some(r);
            }
            // io::Error's source() skips its own payload; look at it directly.
            if let Some(r) = e
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<BodyRefusal>())
            {
                return Some(r);
            }
            next = e.source();
        }
        None
    }
}

/// Why a chunk-size line is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkSizeError {
    /// Not 1*HEXDIG followed by nothing or by `;` extensions, or a control
    /// character in the line.
    Invalid,
    /// The size does not fit in 64 bits.
    Overflow,
}

/// A chunk-size line (without its CRLF): `1*HEXDIG [ ";" chunk-ext ]`.
/// Returns the size and the byte count of the extensions (after the `;`).
/// Stricter than hyper's parser (no whitespace, no sign, no `0x`), so a line
/// the gate accepts is one hyper reads the same way.
pub fn parse_chunk_size(line: &[u8]) -> Result<(u64, u64), ChunkSizeError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkSizeError::Invalid);
    }
    let rest = &line[digits..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(ChunkSizeError::Invalid);
    }
    // hyper stops at the first CR of an extension and refuses LF; NUL and
    // the other controls have no business there either.
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(ChunkSizeError::Invalid);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let v = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(v)))
            .ok_or(ChunkSizeError::Overflow)?;
    }
    Ok((size, rest.len().saturating_sub(1) as u64))
}

/// Whether a trailer line (without its CRLF) is a header field: a token
/// name, a colon, and a value without controls other than HTAB.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && HeaderName::from_bytes(name).is_ok()
        && value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// What the service did with the requests the gate handed to hyper, for one
/// connection.  The gate needs it to serve a half-closed client and to know
/// whether an Upgrade request was taken up; the connection needs it for the
/// deadline of the next request head (`head_deadline`).
pub struct Answers {
    /// Heads the gate handed to hyper, stand-ins included.
    heads: AtomicU64,
    /// Responses the service returned (hyper writes their heads).
    started: AtomicU64,
    /// Responses hyper is done with (their bodies dropped: written, or
    /// abandoned with the connection).
    finished: AtomicU64,
    /// A 101 went out: what follows is no longer HTTP/1.
    upgraded: AtomicBool,
    /// The gate handed hyper a stand-in head carrying its refusal (the
    /// connection's last); until then no request can be a refusal.
    refused: AtomicBool,
    /// When the connection last began to wait for a head, in nanoseconds
    /// after `opened`: when it opened, or when the last response it owed
    /// was done.
    waiting_since: AtomicU64,
    /// How long the connection's writes have waited on the client (noted
    /// by the `Watched` writer under the gate).
    write_stall: Arc<WriteStall>,
    /// Set (to the limit, in seconds) when the connection is closed
    /// because the client took no byte for that long.
    write_timed_out: AtomicU64,
    opened: Instant,
    waker: Mutex<Option<Waker>>,
    /// A head was handed to hyper while an earlier request was unanswered
    /// (pipelining): from then on hyper may hold a head and stop reading
    /// while a request is in flight (`reset_watch`).
    pipelined: tokio::sync::Notify,
    pipelined_seen: AtomicBool,
}

impl Default for Answers {
    fn default() -> Answers {
        Answers {
            heads: AtomicU64::new(0),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            waiting_since: AtomicU64::new(0),
            write_stall: Arc::default(),
            write_timed_out: AtomicU64::new(0),
            opened: Instant::now(),
            waker: Mutex::new(None),
            pipelined: tokio::sync::Notify::new(),
            pipelined_seen: AtomicBool::new(false),
        }
    }
}

impl Answers {
    pub fn response_started(&self, status: StatusCode) {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            self.upgraded.store(true, Ordering::Release);
        }
        self.started.fetch_add(1, Ordering::AcqRel);
        self.wake();
    }

    pub fn response_finished(&self) {
        let finished = self.finished.fetch_add(1, Ordering::AcqRel) + 1;
        if finished == self.heads.load(Ordering::Acquire) {
            // Every head answered: from now the connection waits for the next.
            let since = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.waiting_since.store(since, Ordering::Release);
        }
        self.wake();
    }

    /// A complete head went to hyper: the connection no longer waits for
    /// one.  Returns the heads handed so far, this one included.
    pub(super) fn head_handed(&self) -> u64 {
        let heads = self.heads.fetch_add(1, Ordering::AcqRel) + 1;
        if heads > self.finished() + 1 && !self.pipelined_seen.swap(true, Ordering::AcqRel) {
            // notify_one keeps the news for a watcher not yet waiting.
            self.pipelined.notify_one();
        }
        heads
    }

    /// Resolves once a request was pipelined behind an unanswered one.
    pub async fn pipelining_began(&self) {
        if !self.pipelined_seen.load(Ordering::Acquire) {
            self.pipelined.notified().await;
        }
    }

    /// Whether the gate has handed hyper its refusal's stand-in head.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// Heads handed to hyper so far, stand-ins included: each becomes one
    /// call of the service, which counts them the same way.
    fn heads(&self) -> u64 {
        self.heads.load(Ordering::Acquire)
    }

    /// When the connection must have the next request head by, if it is
    /// waiting for one: `timeout` after it began to wait.  None while a
    /// request is being served, and after a 101 (no more HTTP/1 heads).
    ///
    /// This stands in for hyper's `header_read_timeout`, which arms a timer
    /// of tokio's for every request: that cost an allocation, the timer
    /// wheel twice and, every other request, a write to wake tokio's
    /// driver.  One timer per connection checks this instead
    /// (`connection::head_deadline`).
    pub fn head_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.upgraded() || self.heads.load(Ordering::Acquire) != self.finished() {
            return None;
        }
        let since = Duration::from_nanos(self.waiting_since.load(Ordering::Acquire));
        Some(self.opened + since + timeout)
    }

    /// When the connection must have written something by, if a write is
    /// waiting on the client (see write_stall.rs).
    pub fn write_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.write_stall.deadline(timeout)
    }

    /// The connection closes because no byte was written for `timeout`:
    /// the response in flight, if any, ends as the client's timeout.
    pub fn write_timed_out(&self, timeout: Duration) {
        self.write_timed_out
            .store(timeout.as_secs().max(1), Ordering::Release);
    }

    /// The limit a write stall closed the connection at, if one did.
    pub fn write_timeout_hit(&self) -> Option<u64> {
        match self.write_timed_out.load(Ordering::Acquire) {
            0 => None,
            secs => Some(secs),
        }
    }

    /// Where the connection's writer notes what its writes came to.
    pub fn write_stall(&self) -> Arc<WriteStall> {
        self.write_stall.clone()
    }

    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }
}

/// A request's header names in wire order (lower-case), for the requests
/// whose order hyper's HeaderMap cannot show.  The service puts it in the
/// request's extensions; `RequestScope::from_parts` takes it from there.
#[derive(Clone, Debug)]
pub struct WireOrder(pub Vec<HeaderName>);

/// Orders the gate has seen and the service has not yet claimed, for one
/// connection.  The gate scans ahead of hyper (pipelined heads), so several
/// may wait; they are claimed in request order.
#[derive(Default)]
pub struct WireOrders {
    /// Whether `queue` may hold anything: the service's whole cost when no
    /// request on the connection interleaves its headers.
    pending: AtomicBool,
    queue: Mutex<VecDeque<OrderRecord>>,
}

struct OrderRecord {
    /// Which request on the connection (from 1), as the service counts them.
    seq: u64,
    /// The request-target as sent: a check that the record is this request's.
    target: Box<str>,
    order: WireOrder,
}

/// More unclaimed records than this means something is off; the requests
/// beyond it keep HeaderMap order rather than grow the queue.
const MAX_UNCLAIMED_ORDERS: usize = 64;

impl WireOrders {
    fn record(&self, seq: u64, target: &str, order: WireOrder) {
        // A poisoned lock only means another holder panicked; the queue is
        // still a plain list.
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() < MAX_UNCLAIMED_ORDERS {
            queue.push_back(OrderRecord {
                seq,
                target: target.into(),
                order,
            });
            self.pending.store(true, Ordering::Release);
        }
    }

    /// The wire order of request number `seq` (counted from 1), if the gate
    /// recorded one for it.
    pub fn claim(&self, seq: u64, uri: &http::Uri) -> Option<WireOrder> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        // Poison is harmless here, as in `record`.
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // Records for requests hyper never delivered (it failed them) are stale.
        while queue.front().is_some_and(|r| r.seq < seq) {
            queue.pop_front();
        }
        let claimed = match queue.front() {
            Some(r) if r.seq == seq => queue.pop_front().filter(|r| *uri == *r.target),
            _ => None,
        };
        self.pending.store(!queue.is_empty(), Ordering::Release);
        claimed.map(|r| r.order)
    }
}

pub struct Gate<S> {
    inner: S,
    limits: Limits,
    orders: Arc<WireOrders>,
    answers: Arc<Answers>,
    framing: Framing,
    /// Bytes read from the socket, not yet classified.
    raw: BytesMut,
    /// Bytes classified and waiting for hyper.
    out: BytesMut,
    /// A refusal was issued: after `out` drains, hyper reads nothing more.
    closed: bool,
    /// A body was refused: after `out` drains, hyper's read fails with it.
    failed: Option<BodyRefusal>,
    /// The socket failed after bytes that hyper has yet to read.
    read_error: Option<io::Error>,
    peer_eof: bool,
    /// The client half-closed with requests unanswered: hyper hears the end
    /// of stream once they all are.
    half_closed: bool,
    /// Responses whose bytes have begun to go out (see `before_write`).
    begun: u64,
    /// The number of the last Upgrade request whose answer is not known yet:
    /// the bytes after it are held until then.
    upgrade_at: Option<u64>,
    /// That request is a WebSocket handshake, whose client cannot half-close.
    upgrade_is_websocket: bool,
    /// Body bytes and chunk-extension bytes of the chunked body being read.
    chunked_body: u64,
    chunk_extensions: u64,
}

impl<S> Gate<S> {
    pub fn new(
        inner: S,
        limits: Limits,
        orders: Arc<WireOrders>,
        answers: Arc<Answers>,
    ) -> Gate<S> {
        Gate {
            inner,
            limits,
            orders,
            answers,
            framing: Framing::Head,
            raw: BytesMut::with_capacity(8192),
            out: BytesMut::new(),
            closed: false,
            failed: None,
            read_error: None,
            peer_eof: false,
            half_closed: false,
            begun: 0,
            upgrade_at: None,
            upgrade_is_websocket: false,
            chunked_body: 0,
            chunk_extensions: 0,
        }
    }

    /// Whether an Upgrade request's answer is still unknown (and the bytes
    /// after it are held).  Settles it when the answer is in.
    fn upgrade_undecided(&mut self) -> bool {
        let Some(at) = self.upgrade_at else {
            return false;
        };
        if self.answers.upgraded() {
            self.upgrade_at = None;
            self.framing = Framing::PassThrough;
            false
        } else if self.answers.finished() >= at {
            // Answered without a 101: still HTTP/1, checked as before.
            self.upgrade_at = None;
            false
        } else {
            true
        }
    }

    /// Classify as much of `raw` as possible.
    fn scan(&mut self) {
        loop {
            if self.closed {
                return;
            }
            // Settled even with nothing to scan: an idle upgraded stream
            // passes through (and lets go of the buffer) from its first read.
            if self.framing == Framing::Head && self.upgrade_undecided() {
                return;
            }
            if self.raw.is_empty() {
                return;
            }
            match &mut self.framing {
                Framing::PassThrough => {
                    let all = self.raw.split();
                    self.out.unsplit(all);
                    return;
                }
                Framing::Fixed(remaining) => {
                    let n = (*remaining).min(self.raw.len() as u64) as usize;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.framing = Framing::Head;
                    }
                    let part = self.raw.split_to(n);
                    self.out.unsplit(part);
                }
                Framing::Chunked(_) => {
                    if !self.scan_chunked() {
                        return;
                    }
                }
                Framing::Head => {
                    if !self.scan_head() {
                        return;
                    }
                }
            }
        }
    }

    /// Returns false when more bytes are needed.
    fn scan_head(&mut self) -> bool {
        // Empty lines before a request line are tolerated (RFC 9112 §2.2).
        while self.raw.starts_with(b"\r\n") {
            let crlf = self.raw.split_to(2);
            self.out.unsplit(crlf);
        }
        if self.raw.is_empty() {
            return false;
        }
        // One slot more than allowed, so "too many" is seen as such.  The
        // usual limit fits on the stack.  The slots are left uninitialised
        // (httparse writes each one it hands back): filling 4 KiB of them
        // for every request cost more than the parse of a short head.
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut heap = Vec::new();
        let slots: &mut [MaybeUninit<httparse::Header<'_>>] =
            if self.limits.max_header_count < stack.len() {
                &mut stack[..=self.limits.max_header_count]
            } else {
                heap.reserve_exact(self.limits.max_header_count + 1);
                &mut heap.spare_capacity_mut()[..=self.limits.max_header_count]
            };
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(&self.raw, slots) {
            Ok(httparse::Status::Partial) => {
                let line_done = self.raw.windows(2).any(|w| w == b"\r\n");
                if !line_done && self.raw.len() > MAX_REQUEST_LINE {
                    self.refuse(Verdict::Status(StatusCode::URI_TOO_LONG), None);
                } else if self.raw.len() > self.limits.max_header_size.max(MAX_REQUEST_LINE) + 4 {
                    let status = if line_done {
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                    } else {
                        StatusCode::URI_TOO_LONG
                    };
                    self.refuse(Verdict::Status(status), None);
                }
                false
            }
            Err(httparse::Error::TooManyHeaders) => {
                self.refuse(
                    Verdict::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
                    None,
                );
                false
            }
            Err(_) => {
                self.refuse(Verdict::Status(StatusCode::BAD_REQUEST), None);
                false
            }
            Ok(httparse::Status::Complete(len)) => match check_head(&req, len, &self.limits) {
                Ok((framing, upgrade)) => {
                    let heads = self.answers.head_handed();
                    if upgrade != Upgrade::None {
                        self.upgrade_at = Some(heads);
                        self.upgrade_is_websocket = upgrade == Upgrade::WebSocket;
                    }
                    self.chunked_body = 0;
                    self.chunk_extensions = 0;
                    if names_interleave(req.headers) {
                        if let Some(order) = wire_order(req.headers) {
                            let target = req.path.unwrap_or("");
                            self.orders.record(heads, target, order);
                        }
                    }
                    let head = self.raw.split_to(len);
                    self.out.unsplit(head);
                    self.framing = framing;
                    true
                }
                Err(verdict) => {
                    let line = RequestLine::of(&req);
                    self.refuse(verdict, Some(line));
                    false
                }
            },
        }
    }

    /// Follow chunked framing; returns false when more bytes are needed or
    /// the body was refused.
    fn scan_chunked(&mut self) -> bool {
        let Framing::Chunked(state) = &mut self.framing else {
            return true;
        };
        match state {
            Chunk::Size => {
                let line_end = match line_end(&self.raw, MAX_CHUNK_LINE) {
                    LineEnd::Crlf(end) => end,
                    LineEnd::Partial => return false,
                    LineEnd::TooLong => {
                        self.refuse_body(BodyRefusal::bad("chunk size line too long"));
                        return false;
                    }
                    LineEnd::BareLf => {
                        self.refuse_body(BodyRefusal::bad("invalid chunk size line (bare LF)"));
                        return false;
                    }
                };
                let (size, extensions) = match parse_chunk_size(&self.raw[..line_end]) {
                    Ok(parsed) => parsed,
                    Err(ChunkSizeError::Invalid) => {
                        self.refuse_body(BodyRefusal::bad("invalid chunk size line"));
                        return false;
                    }
                    Err(ChunkSizeError::Overflow) => {
                        self.refuse_body(BodyRefusal::bad("chunk size overflows 64 bits"));
                        return false;
                    }
                };
                self.chunk_extensions += extensions;
                if self.chunk_extensions >= MAX_CHUNK_EXTENSIONS {
                    self.refuse_body(BodyRefusal::bad("chunk extensions over 16 KiB"));
                    return false;
                }
                self.chunked_body = self.chunked_body.saturating_add(size);
                let max = self.limits.max_body;
                if max > 0 && self.chunked_body > max {
                    self.refuse_body(BodyRefusal {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        detail: format!("request body exceeds --max-body-size ({max} bytes)"),
                    });
                    return false;
                }
                *state = if size == 0 {
                    Chunk::Trailers {
                        bytes: 0,
                        fields: 0,
                    }
                } else {
                    Chunk::Data(size)
                };
                let part = self.raw.split_to(line_end + 2);
                self.out.unsplit(part);
                true
            }
            Chunk::Data(remaining) => {
                let n = (*remaining).min(self.raw.len() as u64) as usize;
                *remaining -= n as u64;
                if *remaining == 0 {
                    *state = Chunk::DataEnd;
                }
                let part = self.raw.split_to(n);
                self.out.unsplit(part);
                true
            }
            Chunk::DataEnd => {
                if self.raw.len() < 2 {
                    if self.raw.first().is_some_and(|b| *b != b'\r') {
                        self.refuse_body(BodyRefusal::bad("chunk data not followed by CRLF"));
                    }
                    return false;
                }
                if &self.raw[..2] != b"\r\n" {
                    self.refuse_body(BodyRefusal::bad("chunk data not followed by CRLF"));
                    return false;
                }
                *state = Chunk::Size;
                let part = self.raw.split_to(2);
                self.out.unsplit(part);
                true
            }
            Chunk::Trailers { bytes, fields } => {
                let room = self.limits.max_header_size.saturating_sub(*bytes);
                let end = match line_end(&self.raw, room) {
                    LineEnd::Crlf(end) => end,
                    LineEnd::Partial => return false,
                    LineEnd::TooLong => {
                        self.refuse_body(BodyRefusal {
                            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            detail: "trailer section over --max-header-size".into(),
                        });
                        return false;
                    }
                    LineEnd::BareLf => {
                        self.refuse_body(BodyRefusal::bad("invalid trailer field (bare LF)"));
                        return false;
                    }
                };
                if end == 0 {
                    self.framing = Framing::Head;
                } else if !is_field_line(&self.raw[..end]) {
                    self.refuse_body(BodyRefusal::bad("invalid trailer field"));
                    return false;
                } else if *fields >= self.limits.max_header_count {
                    self.refuse_body(BodyRefusal {
                        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        detail: "more trailer fields than --max-header-count".into(),
                    });
                    return false;
                } else {
                    *bytes += end + 2;
                    *fields += 1;
                }
                let part = self.raw.split_to(end + 2);
                self.out.unsplit(part);
                true
            }
        }
    }

    /// Stop the body being read: hyper gets what came before, then `refusal`
    /// as its read error, and nothing after it.
    fn refuse_body(&mut self, refusal: BodyRefusal) {
        self.raw.clear();
        self.closed = true;
        self.failed = Some(refusal);
    }

    fn refuse(&mut self, verdict: Verdict, line: Option<RequestLine>) {
        let (method, target) = match line {
            // hyper takes any CONNECT for a tunnel; the stand-in must not be one.
            _ if verdict == Verdict::Connect => ("GET".to_string(), "/".to_string()),
            // The stand-in must parse, or hyper answers it with its own
            // empty-bodied 400: a target hyper would reject becomes "/".
            Some(l) if l.target.len() <= MAX_REQUEST_LINE => {
                let target = if l.target.parse::<http::Uri>().is_ok() {
                    l.target
                } else {
                    "/".to_string()
                };
                (l.method, target)
            }
            _ => ("GET".to_string(), "/".to_string()),
        };
        let standin = format!(
            "{method} {target} HTTP/1.1\r\nhost: pagi-rs\r\n{REFUSAL_HEADER}: {}\r\n\r\n",
            verdict.header_value()
        );
        self.out.extend_from_slice(standin.as_bytes());
        self.raw.clear();
        self.closed = true;
        // Before the head is handed: hyper cannot read it any earlier.
        self.answers.refused.store(true, Ordering::Release);
        self.answers.head_handed();
    }
}

/// Whether some header name comes back after a different one, so that
/// grouping by name would reorder the head.  Cookie does not count: the scope
/// merges all its values at the first one's place, which grouping keeps.
fn names_interleave(headers: &[httparse::Header<'_>]) -> bool {
    // A 128-bit filter of the names seen keeps the usual head linear; only a
    // "maybe seen" looks back for certain.
    let mut seen = 0u128;
    let mut previous = "";
    for (i, h) in headers.iter().enumerate() {
        if h.name.eq_ignore_ascii_case(previous) {
            continue;
        }
        let bit = name_bit(h.name);
        if seen & bit != 0
            && !h.name.eq_ignore_ascii_case("cookie")
            && headers[..i]
                .iter()
                .any(|earlier| earlier.name.eq_ignore_ascii_case(h.name))
        {
            return true;
        }
        seen |= bit;
        previous = h.name;
    }
    false
}

/// One of 128 bits for a header name, the same whatever its case, from
/// its length and three of its bytes: with the first and last alone a
/// browser's sec-fetch-mode and sec-fetch-site shared a bit, and each such
/// pair cost a look back over the whole head.  Hashing every byte cost more
/// than the looks back it saved.
fn name_bit(name: &str) -> u128 {
    let b = name.as_bytes();
    let at = |i: usize| u32::from(b.get(i).map_or(0, u8::to_ascii_lowercase));
    let len = b.len();
    let mix = (len as u32)
        .wrapping_mul(0x0100_0193)
        .wrapping_add(at(0) << 16)
        .wrapping_add(at(len.wrapping_sub(2)) << 8)
        .wrapping_add(at(len.wrapping_sub(1)));
    1 << (mix.wrapping_mul(0x9E37_79B9) >> 25)
}

/// The names as the scope shows them.  None if one is not a name http
/// accepts (hyper would refuse the head then anyway).
fn wire_order(headers: &[httparse::Header<'_>]) -> Option<WireOrder> {
    headers
        .iter()
        .map(|h| HeaderName::from_bytes(h.name.as_bytes()).ok())
        .collect::<Option<Vec<_>>>()
        .map(WireOrder)
}

struct RequestLine {
    method: String,
    target: String,
}

impl RequestLine {
    fn of(req: &httparse::Request<'_, '_>) -> RequestLine {
        RequestLine {
            method: req.method.unwrap_or("GET").to_string(),
            target: req.path.unwrap_or("/").to_string(),
        }
    }
}

enum LineEnd {
    /// The line ends at this index with CRLF.
    Crlf(usize),
    /// No line end yet, within the limit.
    Partial,
    /// No line end within `max` bytes.
    TooLong,
    /// An LF without its CR: the line is malformed.
    BareLf,
}

/// Where the line at the start of `b` ends, looking no further than `max`
/// bytes (plus its CRLF).
fn line_end(b: &[u8], max: usize) -> LineEnd {
    let window = &b[..b.len().min(max + 2)];
    match window.iter().position(|&c| c == b'\n') {
        Some(0) => LineEnd::BareLf,
        Some(i) if window[i - 1] != b'\r' => LineEnd::BareLf,
        Some(i) => LineEnd::Crlf(i - 1),
        None if b.len() > max + 1 => LineEnd::TooLong,
        None => LineEnd::Partial,
    }
}

/// A head's refusal, carried to the service in [`REFUSAL_HEADER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Status(StatusCode),
    /// CONNECT: the server does not open tunnels (501).
    Connect,
}

impl Verdict {
    fn header_value(self) -> String {
        match self {
            Verdict::Status(s) => s.as_u16().to_string(),
            Verdict::Connect => "501 connect".to_string(),
        }
    }

    /// The verdict a stand-in request carries; an unreadable one is a 400.
    pub fn from_header(value: &[u8]) -> Verdict {
        let text = std::str::from_utf8(value).unwrap_or("");
        if text == "501 connect" {
            return Verdict::Connect;
        }
        Verdict::Status(
            text.parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST),
        )
    }

    /// The status and the text/plain body that answer it.
    pub fn answer(self) -> (StatusCode, &'static str) {
        match self {
            Verdict::Connect => (StatusCode::NOT_IMPLEMENTED, "Not Implemented"),
            Verdict::Status(s) => refusal_text(s.as_u16()),
        }
    }
}

/// What a request's `Upgrade` header asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upgrade {
    None,
    /// `websocket` among its tokens: an opening handshake.
    WebSocket,
    Other,
}

impl Upgrade {
    fn of(value: &[u8]) -> Upgrade {
        let websocket = value
            .split(|b| *b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"websocket"));
        if websocket {
            Upgrade::WebSocket
        } else {
            Upgrade::Other
        }
    }
}

/// The checks hyper does not make (or makes silently), in the reference
/// server's order.  Ok gives the body framing that follows the head, and
/// what the request asks to upgrade to.
fn check_head(
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    limits: &Limits,
) -> Result<(Framing, Upgrade), Verdict> {
    let target_len = req.path.map(str::len).unwrap_or(0);
    if target_len > MAX_REQUEST_LINE {
        return Err(Verdict::Status(StatusCode::URI_TOO_LONG));
    }
    if head_len > limits.max_header_size || req.headers.len() > limits.max_header_count {
        return Err(Verdict::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }
    let http11 = req.version == Some(1);
    let mut hosts = 0;
    let mut host: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut cl_count = 0;
    let mut te: Option<Vec<u8>> = None;
    let mut upgrade = Upgrade::None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case(REFUSAL_HEADER) {
            return Err(Verdict::Status(StatusCode::BAD_REQUEST));
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            cl_count += 1;
            let v = h.value;
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(Verdict::Status(StatusCode::BAD_REQUEST));
            }
            // More than 19 digits cannot be a length we would accept.
            let n = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let mut all = te.take().unwrap_or_default();
            if !all.is_empty() {
                all.push(b',');
            }
            all.extend_from_slice(h.value);
            te = Some(all);
        } else if name.eq_ignore_ascii_case("upgrade") && upgrade != Upgrade::WebSocket {
            upgrade = Upgrade::of(h.value);
        }
    }
    if req.method == Some("CONNECT") {
        // Tunnels are not implemented: 501, and nothing after the request
        // is read.
        return Err(Verdict::Connect);
    }
    if (http11 && hosts == 0) || hosts > 1 {
        return Err(Verdict::Status(StatusCode::BAD_REQUEST));
    }
    // RFC 9112 §3.2: 400 for a Host that is not a valid one.
    if host.is_some_and(|h| !crate::host::is_valid(h)) {
        return Err(Verdict::Status(StatusCode::BAD_REQUEST));
    }
    check_target(req.method.unwrap_or(""), req.path.unwrap_or(""), host)
        .map_err(Verdict::Status)?;
    if cl_count > 1 {
        return Err(Verdict::Status(StatusCode::BAD_REQUEST));
    }
    if let Some(te) = &te {
        if content_length.is_some() {
            return Err(Verdict::Status(StatusCode::BAD_REQUEST));
        }
        if !http11 {
            return Err(Verdict::Status(StatusCode::BAD_REQUEST));
        }
        let codings: Vec<&[u8]> = te
            .split(|b| *b == b',')
            .map(|c| c.trim_ascii())
            .filter(|c| !c.is_empty())
            .collect();
        let chunked_at = codings
            .iter()
            .position(|c| c.eq_ignore_ascii_case(b"chunked"));
        return match chunked_at {
            // chunked, but not last: the body length cannot be known.
            Some(i) if i + 1 != codings.len() => Err(Verdict::Status(StatusCode::BAD_REQUEST)),
            // A coding before chunked that we would have to decode.
            Some(_) if codings.len() > 1 => Err(Verdict::Status(StatusCode::NOT_IMPLEMENTED)),
            Some(_) => Ok((Framing::Chunked(Chunk::Size), upgrade)),
            None => Err(Verdict::Status(StatusCode::NOT_IMPLEMENTED)),
        };
    }
    if let Some(n) = content_length {
        if limits.max_body > 0 && n > limits.max_body {
            return Err(Verdict::Status(StatusCode::PAYLOAD_TOO_LARGE));
        }
    }
    let framing = match content_length {
        Some(n) if n > 0 => Framing::Fixed(n),
        _ => Framing::Head,
    };
    Ok((framing, upgrade))
}

/// The request-target forms of RFC 9112 §3.2, each only where it belongs.
/// hyper takes any target `http::Uri` parses ("foo" becomes an authority
/// with an empty path), so the reference's refusals are made here.
fn check_target(method: &str, target: &str, host: Option<&[u8]>) -> Result<(), StatusCode> {
    if target.starts_with('/') {
        return Ok(());
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(())
        } else {
            Err(StatusCode::BAD_REQUEST)
        };
    }
    let uri: http::Uri = target.parse().map_err(|_| StatusCode::BAD_REQUEST)?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        // authority-form outside CONNECT, or not a target at all.
        return Err(StatusCode::BAD_REQUEST);
    };
    // The scope shows only the path and query, so the app routes by the Host
    // header; a target naming another authority must not slip past it.
    // userinfo in a target is an error (RFC 9110 §4.2.4).
    if authority.as_str().contains('@') {
        return Err(StatusCode::BAD_REQUEST);
    }
    match host {
        // HTTP/1.0 may omit Host: the target is all there is.
        None => Ok(()),
        Some(host) if same_authority(scheme, authority, host) => Ok(()),
        Some(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// Whether a Host header value names the target's authority: host compared
/// case-insensitively, an omitted port taken as the scheme's default.
fn same_authority(scheme: &str, target: &http::uri::Authority, host: &[u8]) -> bool {
    let host = host.trim_ascii();
    if host.contains(&b'@') {
        return false;
    }
    let Ok(host) = http::uri::Authority::try_from(host) else {
        return false;
    };
    let is = |name: &str| scheme.eq_ignore_ascii_case(name);
    let default_port = if is("http") || is("ws") {
        Some(80)
    } else if is("https") || is("wss") {
        Some(443)
    } else {
        None
    };
    target.host().eq_ignore_ascii_case(host.host())
        && target.port_u16().or(default_port) == host.port_u16().or(default_port)
}

/// The reason text of each refusal, sent as the text/plain body.
pub fn refusal_text(status: u16) -> (StatusCode, &'static str) {
    match status {
        413 => (StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large"),
        414 => (StatusCode::URI_TOO_LONG, "URI Too Long"),
        431 => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request Header Fields Too Large",
        ),
        501 => (StatusCode::NOT_IMPLEMENTED, "Unsupported Transfer-Encoding"),
        _ => (StatusCode::BAD_REQUEST, "Bad Request"),
    }
}

impl<S> Gate<S> {
    /// The client ended its side.  Decide whether hyper hears it now.
    fn on_peer_eof(&mut self) {
        self.peer_eof = true;
        if self.upgrade_at.is_some() && self.upgrade_is_websocket {
            // A WebSocket client cannot half-close: without its sending side
            // it could send no frame, not even a close.  Its FIN while the
            // app decides on the handshake is the client leaving, and the
            // app must hear websocket.disconnect now, not at a write that
            // may never come (an app awaiting $receive before accepting).
            // Bytes it sent after the handshake will never be read.
            self.raw.clear();
            self.upgrade_at = None;
            return;
        }
        if self.upgrade_at.is_some() {
            // The bytes held after an Upgrade request are checked once its
            // answer is known, like any others (see poll_read).
            self.half_closed = true;
            return;
        }
        let between_requests = self.framing == Framing::Head && self.raw.is_empty();
        // A request whose response has not begun to go out: its client
        // cannot have seen anything of it, so it is waiting for it.  Once
        // response bytes are on the wire, a FIN may answer them: the client
        // is leaving.
        if between_requests && self.begun < self.answers.heads() {
            self.half_closed = true;
            return;
        }
        // Hand hyper what is left (a partial head it will reject), then EOF.
        let rest = self.raw.split();
        self.out.unsplit(rest);
        self.upgrade_at = None;
    }

    /// A half-closed client is done once every request it sent is answered.
    fn half_close_done(&self, cx: &Context<'_>) -> bool {
        self.answers.register(cx.waker());
        self.answers.finished() >= self.answers.heads()
    }
}

impl<S: AsyncRead + Unpin> Gate<S> {
    /// Read from the socket into `raw`: one buffer, or with `all` everything
    /// it has now (up to MAX_READ_AHEAD), so that an end of stream sent right
    /// behind a request is seen.  Ready(Ok(eof)) once something was read or
    /// the stream ended; an error after some bytes waits in `read_error`
    /// until hyper has them.
    fn read_ahead(&mut self, cx: &mut Context<'_>, all: bool) -> Poll<io::Result<bool>> {
        let mut got_bytes = false;
        loop {
            if got_bytes && (!all || self.raw.len() >= MAX_READ_AHEAD) {
                return Poll::Ready(Ok(false));
            }
            self.raw.reserve(8192);
            let n = {
                let spare = self.raw.spare_capacity_mut();
                let mut rb = ReadBuf::uninit(spare);
                match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(e)) if got_bytes => {
                        self.read_error = Some(e);
                        return Poll::Ready(Ok(false));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending if got_bytes => return Poll::Ready(Ok(false)),
                    Poll::Pending => return Poll::Pending,
                }
            };
            if n == 0 {
                return Poll::Ready(Ok(true));
            }
            // SAFETY: poll_read initialised exactly `n` bytes of the spare capacity.
            unsafe { self.raw.set_len(self.raw.len() + n) };
            got_bytes = true;
        }
    }

    /// Body bytes of known length need no checks: read them straight into
    /// hyper's buffer, up to what is left of the body (and
    /// [`MAX_BODY_READ`]), instead of through `raw` and `out`.  That spares
    /// a copy of every byte, and hyper's buffer, which grows with the
    /// stream, makes the reads larger than the gate's own (8 KiB).  `None` when the socket reached its end:
    /// the caller goes on as after any end of stream.
    fn read_body_through(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        remaining: u64,
    ) -> Option<Poll<io::Result<()>>> {
        let limit = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.remaining())
            .min(MAX_BODY_READ);
        if limit == 0 {
            // No room: an empty read here would look like the end of stream.
            return Some(Poll::Ready(Ok(())));
        }
        let mut part = buf.take(limit);
        match Pin::new(&mut self.inner).poll_read(cx, &mut part) {
            Poll::Ready(Ok(())) => {}
            other => return Some(other),
        }
        let n = part.filled().len();
        if n == 0 {
            self.on_peer_eof();
            return None;
        }
        // SAFETY: `part` is a window on `buf`'s unfilled part, and the
        // read initialised (and filled) its first `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        let left = remaining - n as u64;
        self.framing = if left == 0 {
            Framing::Head
        } else {
            Framing::Fixed(left)
        };
        Some(Poll::Ready(Ok(())))
    }

    /// Called before each write: when it begins a new response, first look
    /// for an end of stream that is already there, so that a FIN sent
    /// before the response is taken for the half-close it is.
    fn before_write(&mut self, cx: &mut Context<'_>) {
        let started = self.answers.started();
        if started <= self.begun {
            return;
        }
        let quiet = self.peer_eof
            || self.closed
            || self.failed.is_some()
            || self.read_error.is_some()
            || self.framing == Framing::PassThrough;
        if !quiet {
            match self.read_ahead(cx, true) {
                Poll::Ready(Ok(eof)) => {
                    self.scan();
                    if eof {
                        self.on_peer_eof();
                    }
                    // hyper's next read has bytes (or the end) waiting.
                    cx.waker().wake_by_ref();
                }
                Poll::Ready(Err(e)) => {
                    self.read_error = Some(e);
                    cx.waker().wake_by_ref();
                }
                Poll::Pending => {}
            }
        }
        self.begun = started;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                if this.out.is_empty() {
                    // `out` is a view of `raw`'s buffer: let go of it, so
                    // that `raw` owns that buffer alone again and its next
                    // reserve reuses it instead of allocating another for
                    // every request.
                    this.out = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(refusal) = &this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    refusal.clone(),
                )));
            }
            if let Some(e) = this.read_error.take() {
                return Poll::Ready(Err(e));
            }
            if this.peer_eof {
                if !this.raw.is_empty() && !this.closed {
                    // Held after an Upgrade request: scan once it is answered.
                    this.answers.register(cx.waker());
                    this.scan();
                    if !this.out.is_empty() {
                        continue;
                    }
                    if this.upgrade_at.is_some() {
                        return Poll::Pending;
                    }
                    // A partial head: hyper's to reject.
                    let rest = this.raw.split();
                    this.out.unsplit(rest);
                    continue;
                }
                if this.half_closed && !this.half_close_done(cx) {
                    return Poll::Pending;
                }
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                // Not EOF: hyper would abandon the stand-in request.  Its
                // response carries `connection: close`, which ends the
                // connection once written.
                return Poll::Pending;
            }
            if this.upgrade_at.is_some() {
                // Held bytes wait for the Upgrade request's answer, which
                // wakes this task through `answers`.
                this.answers.register(cx.waker());
                this.scan();
                if !this.out.is_empty() {
                    continue;
                }
                if this.upgrade_at.is_some() && this.raw.len() >= MAX_HELD_AFTER_UPGRADE {
                    return Poll::Pending;
                }
            }
            if this.framing == Framing::PassThrough && this.raw.is_empty() {
                // Stepped aside for good (a 101): the buffer would sit
                // unused for the rest of a WebSocket's life, 8 KiB each.
                if this.raw.capacity() > 0 {
                    this.raw = BytesMut::new();
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if let Framing::Fixed(remaining) = this.framing {
                if this.raw.is_empty() && this.upgrade_at.is_none() {
                    match this.read_body_through(cx, buf, remaining) {
                        Some(polled) => return polled,
                        None => continue,
                    }
                }
            }
            // One buffer: before_write looks for a FIN that came along.
            let eof = match this.read_ahead(cx, false) {
                Poll::Ready(Ok(eof)) => eof,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            this.scan();
            if eof {
                this.on_peer_eof();
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.before_write(cx);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.before_write(cx);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_size: 8192,
        max_header_count: 100,
        max_body: 1000,
    };

    /// Feed `input` in pieces of `step` bytes; return what hyper would see.
    fn through(input: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        for piece in input.chunks(step.max(1)) {
            g.raw.extend_from_slice(piece);
            g.scan();
        }
        let mut seen = g.out.to_vec();
        if !g.closed {
            seen.extend_from_slice(&g.raw);
        }
        (seen, g.closed)
    }

    fn verdict(input: &[u8]) -> Option<u16> {
        let (seen, closed) = through(input, usize::MAX);
        closed.then(|| {
            let s = String::from_utf8_lossy(&seen);
            let at = s
                .find(REFUSAL_HEADER)
                .expect("stand-in carries the verdict");
            s[at + REFUSAL_HEADER.len() + 2..at + REFUSAL_HEADER.len() + 5]
                .parse()
                .unwrap()
        })
    }

    #[test]
    fn valid_pipelined_requests_pass_through_untouched_in_any_split() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        for step in [1, 2, 3, 7, 64, usize::MAX] {
            let (seen, closed) = through(input, step);
            assert!(!closed, "step {step}");
            assert_eq!(seen, input.to_vec(), "step {step}");
        }
    }

    #[test]
    fn refusals_hyper_would_not_make() {
        assert_eq!(
            verdict(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
            ),
            Some(400)
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Some(501)
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some(501)
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\n\r\n"),
            Some(400),
            "no Host on 1.1"
        );
        assert_eq!(
            verdict(b"GET / HTTP/1.0\r\n\r\n"),
            None,
            "1.0 needs no Host"
        );
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Some(400)
        );
        for bad in ["user@x", "a/b", "x y", "x:8a"] {
            assert_eq!(
                verdict(format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n").as_bytes()),
                Some(400),
                "Host: {bad}"
            );
        }
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"), None);
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"),
            None,
            "an empty Host: a target with no authority"
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n"),
            Some(413)
        );
        assert_eq!(verdict(b"GARBAGE\r\n\r\n"), Some(400));
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost: x\r\nx-pagi-rs-refusal: 200\r\n\r\n"),
            Some(400),
            "no forging"
        );
    }

    #[test]
    fn request_target_forms_only_where_they_belong() {
        let with_host = |line: &str, host: &str| {
            verdict(format!("{line} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        };
        assert_eq!(with_host("GET /p?q=1", "x"), None, "origin-form");
        assert_eq!(
            with_host("OPTIONS *", "x"),
            None,
            "asterisk-form on OPTIONS"
        );
        assert_eq!(
            with_host("GET *", "x"),
            Some(400),
            "asterisk-form elsewhere"
        );
        assert_eq!(with_host("OPTIONS *?x", "x"), Some(400), "'*' is all of it");
        assert_eq!(with_host("GET example.com:80", "example.com"), Some(400));
        assert_eq!(with_host("POST example.com", "example.com"), Some(400));
        assert_eq!(with_host("GET foo", "x"), Some(400), "not a target at all");
        assert_eq!(with_host("GET ?x=1", "x"), Some(400));
        assert_eq!(
            with_host("CONNECT example.com:443", "example.com:443"),
            Some(501),
            "authority-form is CONNECT's, and CONNECT is not implemented"
        );

        let absolute = "GET http://example.com/path?q=1";
        assert_eq!(with_host(absolute, "example.com"), None);
        assert_eq!(
            with_host(absolute, "EXAMPLE.com:80"),
            None,
            "80 is http's default"
        );
        assert_eq!(with_host("GET http://example.com:80/", "example.com"), None);
        assert_eq!(
            with_host("GET https://example.com/", "example.com:443"),
            None
        );
        assert_eq!(
            with_host("GET http://example.com", "example.com"),
            None,
            "no path"
        );
        assert_eq!(with_host("GET http://[::1]:8080/", "[::1]:8080"), None);
        assert_eq!(with_host(absolute, "other.com"), Some(400));
        assert_eq!(with_host(absolute, "example.com:8080"), Some(400));
        assert_eq!(
            with_host("GET https://example.com/", "example.com:80"),
            Some(400)
        );
        assert_eq!(
            with_host("GET http://u@example.com/", "example.com"),
            Some(400),
            "userinfo"
        );
        assert_eq!(with_host(absolute, "u@example.com"), Some(400));
        assert_eq!(with_host(absolute, ""), Some(400));
        assert_eq!(with_host("GET http:///path", "example.com"), Some(400));
        assert_eq!(
            verdict(format!("{absolute} HTTP/1.0\r\n\r\n").as_bytes()),
            None,
            "HTTP/1.0 without Host: the target stands alone"
        );
    }

    #[test]
    fn a_refused_target_hyper_cannot_parse_becomes_slash_in_the_stand_in() {
        let (seen, closed) = through(b"GET http:///path HTTP/1.1\r\nHost: x\r\n\r\n", usize::MAX);
        assert!(closed);
        assert!(
            seen.starts_with(b"GET / HTTP/1.1\r\n"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
        let (seen, _) = through(b"GET foo HTTP/1.1\r\nHost: x\r\n\r\n", usize::MAX);
        assert!(
            seen.starts_with(b"GET foo HTTP/1.1\r\n"),
            "kept where it parses"
        );
    }

    fn names(head: &str) -> Vec<String> {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(head.as_bytes()).unwrap().is_complete());
        let interleave = names_interleave(req.headers);
        let order = wire_order(req.headers).unwrap();
        assert_eq!(order.0.len(), req.headers.len());
        let mut v: Vec<String> = order.0.iter().map(|n| n.to_string()).collect();
        v.insert(0, interleave.to_string());
        v
    }

    #[test]
    fn only_a_name_that_comes_back_after_another_interleaves() {
        let head = |lines: &str| format!("GET / HTTP/1.1\r\n{lines}\r\n");
        assert_eq!(
            names(&head("X-A: 1\r\nX-B: 2\r\nx-a: 3\r\n")),
            ["true", "x-a", "x-b", "x-a"],
            "case does not matter; names are lower-cased"
        );
        assert_eq!(names(&head("X-A: 1\r\nX-A: 2\r\nX-B: 3\r\n"))[0], "false");
        assert_eq!(
            names(&head("Cookie: a\r\nX-B: 2\r\nCookie: b\r\n"))[0],
            "false",
            "cookies merge at the first one's place anyway"
        );
        assert_eq!(
            names(&head("Cookie: a\r\nX-B: 2\r\nCookie: b\r\nX-B: 3\r\n"))[0],
            "true"
        );
        // Many distinct names fill the filter; none repeats.
        let many: String = (0..30).map(|i| format!("x-header-{i}: v\r\n")).collect();
        assert_eq!(names(&head(&many))[0], "false");
        let many_then_repeat = format!("{many}x-header-3: again\r\n");
        assert_eq!(names(&head(&many_then_repeat))[0], "true");
        // A browser's names, some alike but for a middle byte.
        let browser = "Host: x\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n\
                       Sec-Fetch-Site: none\r\nSec-Fetch-User: ?1\r\nAccept: */*\r\n";
        assert_eq!(names(&head(browser))[0], "false");
        let browser_then_repeat = format!("{browser}sec-fetch-mode: cors\r\n");
        assert_eq!(names(&head(&browser_then_repeat))[0], "true");
    }

    #[test]
    fn a_name_has_one_filter_bit_whatever_its_case() {
        assert_eq!(name_bit("Sec-Fetch-Mode"), name_bit("sec-fetch-mode"));
        assert_eq!(name_bit("Sec-Fetch-Mode").count_ones(), 1);
        assert_ne!(name_bit("sec-fetch-mode"), name_bit("sec-fetch-site"));
    }

    fn claimed(g: &Gate<()>, seq: u64, target: &str) -> Option<Vec<String>> {
        g.orders
            .claim(seq, &target.parse().unwrap())
            .map(|o| o.0.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn each_pipelined_request_gets_its_own_order() {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"GET /1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n\
POST /2 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nContent-Length: 3\r\nX-A: 2\r\n\r\nabc\
GET /3 HTTP/1.1\r\nHost: x\r\n\r\n\
GET /4 HTTP/1.1\r\nX-B: 1\r\nHost: x\r\nX-B: 2\r\n\r\n",
        );
        g.scan();
        assert!(!g.closed);
        assert_eq!(g.answers.heads(), 4);
        assert!(g.orders.pending.load(Ordering::Acquire));
        assert_eq!(claimed(&g, 1, "/1"), None, "nothing recorded for the first");
        assert_eq!(
            claimed(&g, 2, "/2"),
            Some(vec![
                "host".into(),
                "x-a".into(),
                "content-length".into(),
                "x-a".into()
            ])
        );
        assert_eq!(claimed(&g, 3, "/3"), None);
        assert_eq!(
            claimed(&g, 4, "/4"),
            Some(vec!["x-b".into(), "host".into(), "x-b".into()])
        );
        assert!(!g.orders.pending.load(Ordering::Acquire), "all claimed");
    }

    #[test]
    fn an_order_goes_only_to_its_own_request() {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 1\r\nX-A: 2\r\n\r\n\
GET /b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 1\r\nX-A: 2\r\n\r\n",
        );
        g.scan();
        assert_eq!(claimed(&g, 1, "/other"), None, "same number, other target");
        // A record left behind (hyper never delivered its request) is dropped
        // when a later request claims.
        g.raw
            .extend_from_slice(b"GET /c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 1\r\nX-A: 2\r\n\r\n");
        g.scan();
        assert_eq!(claimed(&g, 3, "/c").map(|n| n.len()), Some(4));
        assert!(!g.orders.pending.load(Ordering::Acquire));
        assert_eq!(claimed(&g, 2, "/b"), None, "stale by now");
    }

    #[test]
    fn after_an_upgrade_nothing_more_is_recorded() {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
GET /after HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 1\r\nX-A: 2\r\n\r\n",
        );
        g.scan();
        assert_eq!(
            g.answers.heads(),
            1,
            "what follows an Upgrade request waits for its answer"
        );
        g.answers.response_started(StatusCode::SWITCHING_PROTOCOLS);
        g.scan();
        assert_eq!(g.framing, Framing::PassThrough);
        assert_eq!(g.answers.heads(), 1);
        assert!(!g.orders.pending.load(Ordering::Acquire));
        assert!(
            g.out.ends_with(b"X-A: 2\r\n\r\n"),
            "passed through as it is"
        );
    }

    #[test]
    fn an_upgrade_answered_without_101_keeps_every_later_request_checked() {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"GET /one HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n\
POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        );
        g.scan();
        assert_eq!(g.answers.heads(), 1);
        assert!(!g.closed);
        g.answers.response_started(StatusCode::OK);
        g.scan();
        assert!(!g.closed, "held until the answer is written");
        g.answers.response_finished();
        g.scan();
        assert!(g.closed, "the second request is checked and refused");
        assert_eq!(g.answers.heads(), 2);
    }

    #[test]
    fn connect_gets_501_and_nothing_after_it_is_read() {
        let (seen, closed) = through(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n",
            usize::MAX,
        );
        assert!(closed);
        let s = String::from_utf8(seen).unwrap();
        assert!(
            s.starts_with("GET / HTTP/1.1\r\n"),
            "the stand-in is no tunnel: {s}"
        );
        assert!(s.contains("x-pagi-rs-refusal: 501 connect\r\n"), "{s}");
        assert!(!s.contains("/never"));
        assert_eq!(
            Verdict::from_header(b"501 connect").answer(),
            (StatusCode::NOT_IMPLEMENTED, "Not Implemented")
        );
        assert_eq!(
            Verdict::from_header(b"413"),
            Verdict::Status(StatusCode::PAYLOAD_TOO_LARGE)
        );
        assert_eq!(
            Verdict::from_header(b"junk"),
            Verdict::Status(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            verdict(b"CONNECT example.com:443 HTTP/1.0\r\n\r\n"),
            Some(501),
            "on 1.0 too"
        );
    }

    /// Feed a chunked POST with `body` after its head; the refusal, if any,
    /// and what hyper would see.
    fn chunked(body: &[u8]) -> (Option<BodyRefusal>, Vec<u8>) {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        g.raw.extend_from_slice(body);
        g.scan();
        (g.failed.clone(), g.out.to_vec())
    }

    fn refused(body: &[u8]) -> Option<(u16, String)> {
        chunked(body).0.map(|r| (r.status.as_u16(), r.detail))
    }

    #[test]
    fn malformed_chunk_size_lines_are_refused_not_passed_through() {
        for bad in [
            &b"3x\r\nabc\r\n0\r\n\r\n"[..],
            b" 3\r\nabc\r\n0\r\n\r\n",
            b"0x3\r\nabc\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"-1\r\n",
            b"3 \r\nabc\r\n0\r\n\r\n",
            b"\r\n",
            b"3;a\rb\r\nabc\r\n",
            b"3;a\x00\r\nabc\r\n",
        ] {
            let (status, detail) = refused(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(status, 400, "{bad:?}");
            assert_eq!(detail, "invalid chunk size line", "{bad:?}");
        }
        assert_eq!(
            refused(b"ffffffffffffffffff\r\n"),
            Some((400, "chunk size overflows 64 bits".into()))
        );
        assert_eq!(
            refused(b"3\nabc\r\n0\r\n\r\n"),
            Some((400, "invalid chunk size line (bare LF)".into()))
        );
        assert_eq!(
            refused(b"3\r\nabcXY0\r\n\r\n"),
            Some((400, "chunk data not followed by CRLF".into()))
        );
        let long = format!("1;{}", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            refused(long.as_bytes()),
            Some((400, "chunk size line too long".into())),
            "refused before the line ends"
        );
        // Within the line limit each, over hyper's total for a body.
        let ext = format!("1;{}\r\nx\r\n", "e".repeat(4000));
        assert_eq!(
            refused(ext.repeat(5).as_bytes()),
            Some((400, "chunk extensions over 16 KiB".into()))
        );
        let (refusal, seen) = chunked(b"5\r\nhello\r\nzz\r\n");
        assert!(refusal.is_some());
        assert!(
            seen.ends_with(b"5\r\nhello\r\n"),
            "hyper gets what came before"
        );
    }

    #[test]
    fn a_chunked_body_over_the_limit_is_413() {
        assert_eq!(
            refused(b"200\r\n").map(|r| r.0),
            None,
            "512 bytes are within 1000"
        );
        let (status, detail) =
            refused(&[&b"200\r\n"[..], &[b'a'; 512], b"\r\n200\r\n"].concat()).unwrap();
        assert_eq!(status, 413);
        assert!(detail.contains("--max-body-size (1000 bytes)"), "{detail}");
    }

    #[test]
    fn trailers_are_checked_and_bounded() {
        assert_eq!(refused(b"0\r\nx-t: 1\r\n\r\n"), None);
        assert_eq!(
            refused(b"0\r\nno colon\r\n\r\n"),
            Some((400, "invalid trailer field".into()))
        );
        assert_eq!(
            refused(b"0\r\nx-t: 1\nx-u: 2\r\n\r\n"),
            Some((400, "invalid trailer field (bare LF)".into()))
        );
        let big = format!("0\r\nx-big: {}\r\n\r\n", "b".repeat(9000));
        assert_eq!(refused(big.as_bytes()).map(|r| r.0), Some(431));
        let many: String = (0..101).map(|i| format!("x-t{i}: v\r\n")).collect();
        assert_eq!(
            refused(format!("0\r\n{many}\r\n").as_bytes()).map(|r| r.0),
            Some(431)
        );
    }

    #[test]
    fn every_pipelined_request_is_checked_after_long_extensions_and_trailers() {
        let ext = "e".repeat(3000);
        let trailers: String = (0..50).map(|i| format!("x-t{i}: v\r\n")).collect();
        let input = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             3;{ext}\r\nabc\r\n0\r\n{trailers}\r\n\
             POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
        );
        for step in [1, 7, 100, usize::MAX] {
            let (seen, closed) = through(input.as_bytes(), step);
            assert!(closed, "step {step}: the second request is refused");
            let s = String::from_utf8(seen).unwrap();
            assert!(s.contains("x-pagi-rs-refusal: 400"), "step {step}");
        }
    }

    #[test]
    fn what_follows_an_upgrade_request_is_checked_even_after_the_end_of_stream() {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"GET /one HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n\
POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        );
        g.scan();
        g.on_peer_eof();
        assert!(g.half_closed);
        assert!(
            !g.out.ends_with(b"x"),
            "nothing held is handed over unchecked"
        );
        g.answers.response_started(StatusCode::OK);
        g.answers.response_finished();
        g.scan();
        assert!(g.closed, "the second request is refused");
    }

    #[test]
    fn a_websocket_client_that_ends_its_side_during_the_handshake_has_left() {
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: h2c, WebSocket\r\nConnection: upgrade\r\n\r\n\
\x81\x85abcd",
        );
        g.scan();
        assert!(g.upgrade_at.is_some(), "the handshake's answer is awaited");
        g.on_peer_eof();
        assert!(!g.half_closed, "no half-close: hyper hears the end now");
        assert!(g.raw.is_empty(), "the frame bytes held are dropped");
        assert!(
            !g.out.ends_with(b"abcd"),
            "and never handed to hyper as HTTP"
        );
    }

    #[test]
    fn pipelining_is_a_head_handed_while_one_is_unanswered() {
        let answers = Answers::default();
        answers.head_handed();
        answers.response_started(StatusCode::OK);
        answers.response_finished();
        answers.head_handed();
        assert!(
            !answers.pipelined_seen.load(Ordering::Acquire),
            "one request after another is not pipelining"
        );
        answers.head_handed();
        assert!(
            answers.pipelined_seen.load(Ordering::Acquire),
            "a second head while the first is unanswered"
        );
    }

    #[test]
    fn upgrade_names_websocket_among_its_tokens() {
        assert_eq!(Upgrade::of(b"websocket"), Upgrade::WebSocket);
        assert_eq!(Upgrade::of(b"h2c , WebSocket"), Upgrade::WebSocket);
        assert_eq!(Upgrade::of(b"h2c"), Upgrade::Other);
        assert_eq!(Upgrade::of(b"websocket2"), Upgrade::Other);
    }

    #[test]
    fn a_half_close_waits_for_unanswered_requests_only() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(input);
        g.scan();
        g.on_peer_eof();
        assert!(g.half_closed, "EOF after a complete, unanswered request");

        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(input);
        g.scan();
        g.answers.response_started(StatusCode::OK);
        g.on_peer_eof();
        assert!(g.half_closed, "a response decided but not yet written");

        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(input);
        g.scan();
        g.answers.response_started(StatusCode::OK);
        g.begun = 1;
        g.on_peer_eof();
        assert!(!g.half_closed, "response bytes are out: the client left");

        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw
            .extend_from_slice(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab");
        g.scan();
        g.on_peer_eof();
        assert!(!g.half_closed, "EOF in the middle of a body");

        let mut g = Gate::new((), LIMITS, Arc::default(), Arc::default());
        g.raw.extend_from_slice(b"GET /a HTTP/1.1\r\nHo");
        g.scan();
        g.on_peer_eof();
        assert!(!g.half_closed, "EOF in the middle of a head");
        assert_eq!(
            g.out.as_ref(),
            b"GET /a HTTP/1.1\r\nHo",
            "handed to hyper to reject"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The grammar, written the plain way: 1*HEXDIG, then nothing or
        /// ";" and bytes without controls (HTAB allowed); the value in 64 bits.
        fn model(line: &[u8]) -> Result<u64, ChunkSizeError> {
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            let (hex, rest) = line.split_at(digits);
            let ext_ok = rest.is_empty()
                || (rest[0] == b';'
                    && rest.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)));
            if digits == 0 || !ext_ok {
                return Err(ChunkSizeError::Invalid);
            }
            let hex = std::str::from_utf8(hex).unwrap().trim_start_matches('0');
            if hex.len() > 16 {
                return Err(ChunkSizeError::Overflow);
            }
            Ok(if hex.is_empty() {
                0
            } else {
                u64::from_str_radix(hex, 16).unwrap()
            })
        }

        fn line_bytes() -> impl Strategy<Value = Vec<u8>> {
            let alphabet =
                prop::sample::select(b"0123456789abcdefABCDEFxX+- ;=\t\r\n\x00\x7f\"g".to_vec());
            prop_oneof![
                prop::collection::vec(alphabet, 0..24),
                prop::collection::vec(any::<u8>(), 0..24),
            ]
        }

        proptest! {
            #[test]
            fn chunk_size_parser_agrees_with_the_grammar(line in line_bytes()) {
                let parsed = parse_chunk_size(&line).map(|(size, _)| size);
                prop_assert_eq!(parsed, model(&line));
            }

            #[test]
            fn a_well_formed_size_line_reads_back(
                size in any::<u64>(),
                upper in any::<bool>(),
                zeros in 0usize..4,
                ext in prop::collection::vec(prop::sample::select(b"az=;\" \t".to_vec()), 0..20),
            ) {
                let hex = if upper { format!("{size:X}") } else { format!("{size:x}") };
                let ext = if ext.is_empty() {
                    String::new()
                } else {
                    format!(";{}", String::from_utf8(ext).unwrap())
                };
                let line = format!("{}{hex}{ext}", "0".repeat(zeros));
                prop_assert_eq!(parse_chunk_size(line.as_bytes()).map(|(s, _)| s), Ok(size));
            }

            #[test]
            fn a_valid_chunked_body_passes_the_gate_untouched(
                chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..6),
                step in 1usize..50,
            ) {
                let mut input = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for c in &chunks {
                    input.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    input.extend_from_slice(c);
                    input.extend_from_slice(b"\r\n");
                }
                input.extend_from_slice(b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n");
                let (seen, closed) = through(&input, step);
                prop_assert!(!closed);
                prop_assert_eq!(seen, input);
            }
        }
    }
    #[test]
    fn size_limits_answer_while_the_head_is_still_arriving() {
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
        assert_eq!(verdict(long_target.as_bytes()), Some(414));
        let unfinished = format!("GET /{}", "a".repeat(20_000));
        assert_eq!(
            verdict(unfinished.as_bytes()),
            Some(414),
            "refused before the line ends"
        );
        let big_header = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
            "b".repeat(9000)
        );
        assert_eq!(verdict(big_header.as_bytes()), Some(431));
        let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
        assert_eq!(
            verdict(format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()),
            Some(431)
        );
    }

    /// The header count limit, on both sides of the 128 slots kept on the
    /// stack: exactly the limit passes, one more is refused.
    #[test]
    fn header_count_limit_holds_with_slots_on_the_stack_and_on_the_heap() {
        for max_header_count in [3, 127, 128, 300] {
            let head = |fields: usize| {
                let lines: String = (1..fields).map(|i| format!("x-h{i}: v{i}\r\n")).collect();
                format!("GET / HTTP/1.1\r\nHost: x\r\n{lines}\r\n")
            };
            let limits = Limits {
                max_header_count,
                max_header_size: 64 * 1024,
                ..LIMITS
            };
            let mut g = Gate::new((), limits, Arc::default(), Arc::default());
            g.raw.extend_from_slice(head(max_header_count).as_bytes());
            g.scan();
            assert!(!g.closed, "{max_header_count} fields at the limit");
            assert_eq!(g.out.len(), head(max_header_count).len());
            let mut g = Gate::new((), limits, Arc::default(), Arc::default());
            g.raw
                .extend_from_slice(head(max_header_count + 1).as_bytes());
            g.scan();
            assert!(g.closed, "{} fields over the limit", max_header_count + 1);
            let seen = String::from_utf8_lossy(&g.out).into_owned();
            assert!(seen.contains(&format!("{REFUSAL_HEADER}: 431")), "{seen}");
        }
    }

    #[test]
    fn a_refusal_keeps_its_place_behind_earlier_requests() {
        let input = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nPOST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxGET /never HTTP/1.1\r\n";
        let (seen, closed) = through(input, 5);
        assert!(closed);
        let s = String::from_utf8(seen).unwrap();
        assert!(
            s.starts_with(
                "GET /ok HTTP/1.1\r\nHost: x\r\n\r\nPOST /bad HTTP/1.1\r\nhost: pagi-rs\r\n"
            ),
            "{s}"
        );
        assert!(!s.contains("/never"));
    }

    /// Read what hyper would see through a gate over a real stream, with
    /// read buffers of the sizes in `reads` (in turn), until the gate has
    /// nothing more to give for a while.  Also returns each read's length.
    async fn read_through_gate(
        input: Vec<u8>,
        piece: usize,
        reads: &[usize],
    ) -> (Vec<u8>, Vec<usize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Limits {
            max_body: 0,
            ..LIMITS
        };
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let writer = tokio::spawn(async move {
            for part in input.chunks(piece) {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            // Kept open: an end of stream here would be a half-close.
            client
        });
        let mut gate = Gate::new(server, limits, Arc::default(), Arc::default());
        let mut seen = Vec::new();
        let mut lengths = Vec::new();
        for &size in reads.iter().cycle() {
            let mut buf = vec![0u8; size];
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(300), gate.read(&mut buf));
            match read.await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => {
                    seen.extend_from_slice(&buf[..n]);
                    lengths.push(n);
                }
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
        }
        drop(writer.await);
        (seen, lengths)
    }

    #[tokio::test]
    async fn after_a_101_the_gate_lets_go_of_its_buffer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut gate = Gate::new(server, LIMITS, Arc::default(), Arc::default());
        let head =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        client.write_all(head).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = gate.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &head[..]);
        assert!(gate.raw.capacity() > 0, "a head is read through the buffer");
        gate.answers
            .response_started(StatusCode::SWITCHING_PROTOCOLS);
        // An idle WebSocket: its first read finds nothing to read.
        let idle =
            tokio::time::timeout(std::time::Duration::from_millis(20), gate.read(&mut buf)).await;
        assert!(idle.is_err(), "nothing to read yet");
        assert_eq!(gate.framing, Framing::PassThrough);
        assert_eq!(
            gate.raw.capacity(),
            0,
            "nothing held for the upgraded stream"
        );
        client.write_all(b"frame").await.unwrap();
        let n = gate.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"frame", "passed through");
        assert_eq!(gate.raw.capacity(), 0);
    }

    #[tokio::test]
    async fn a_body_read_straight_through_takes_at_most_max_body_read_at_once() {
        let body = vec![b'u'; 200_000];
        let mut input = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let head_len = input.len();
        input.extend_from_slice(&body);
        let (seen, lengths) = read_through_gate(input.clone(), input.len(), &[400_000]).await;
        assert_eq!(seen, input, "every byte arrives, in order");
        // The head comes out of the gate's own buffer; the body after it.
        let mut body_reads = lengths.iter().scan(0, |at, &n| {
            *at += n;
            Some((*at, n))
        });
        assert!(
            body_reads.all(|(end, n)| end <= head_len || n <= MAX_BODY_READ),
            "reads of {lengths:?} into buffers of 400 KB"
        );
        assert!(lengths.len() >= 4, "200 KB of body in {lengths:?}");
    }

    #[tokio::test]
    async fn a_known_length_body_read_straight_through_leaves_the_checks_in_place() {
        // The body holds what would be refused as a head; the request after
        // it is refused as one.
        let fake_head = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        let body: Vec<u8> = fake_head
            .iter()
            .chain(b"\x00\xff".iter())
            .copied()
            .cycle()
            .take(70_001)
            .collect();
        let mut input = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(&body);
        let good = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        input.extend_from_slice(good);
        let expected_len = input.len();
        input.extend_from_slice(
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        );
        for (piece, reads) in [
            (999, &[5usize, 100, 65_536, 3][..]),
            (70_000, &[400_000][..]),
            (1, &[8192][..]),
        ] {
            let (seen, _) = read_through_gate(input.clone(), piece, reads).await;
            assert!(
                seen.len() > expected_len,
                "piece {piece}: {} bytes",
                seen.len()
            );
            assert_eq!(
                &seen[..expected_len],
                &input[..expected_len],
                "piece {piece}"
            );
            let rest = String::from_utf8_lossy(&seen[expected_len..]).into_owned();
            assert!(
                rest.starts_with("POST /bad HTTP/1.1\r\nhost: pagi-rs\r\n")
                    && rest.contains(REFUSAL_HEADER),
                "piece {piece}: {rest}"
            );
        }
    }

    #[test]
    fn a_write_timeout_is_reported_in_whole_seconds() {
        let answers = Answers::default();
        assert_eq!(answers.write_timeout_hit(), None);
        answers.write_timed_out(Duration::from_millis(300));
        assert_eq!(
            answers.write_timeout_hit(),
            Some(1),
            "reported in whole seconds, at least 1"
        );
    }
}
