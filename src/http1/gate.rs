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
//! chunked).  After an `Upgrade` request it steps aside for good.
//!
//! hyper's HeaderMap groups values by name, losing the wire order when a name
//! comes back after another (`X-A, X-B, X-A`); hyper keeps its own record of
//! the order private.  The gate notices that rare case and leaves the names
//! in wire order in [`WireOrders`] for the service to claim.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http::header::HeaderName;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Head,
    Fixed(u64),
    Chunked(Chunk),
    /// The stream is no longer (checkable) HTTP/1: pass everything through.
    PassThrough,
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
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
    /// Heads handed to hyper so far, stand-ins included: each becomes one
    /// call of the service, which counts them the same way.
    heads: u64,
    framing: Framing,
    /// Bytes read from the socket, not yet classified.
    raw: BytesMut,
    /// Bytes classified and waiting for hyper.
    out: BytesMut,
    /// A refusal was issued: after `out` drains, hyper reads nothing more.
    closed: bool,
    peer_eof: bool,
}

impl<S> Gate<S> {
    pub fn new(inner: S, limits: Limits, orders: Arc<WireOrders>) -> Gate<S> {
        Gate {
            inner,
            limits,
            orders,
            heads: 0,
            framing: Framing::Head,
            raw: BytesMut::with_capacity(8192),
            out: BytesMut::new(),
            closed: false,
            peer_eof: false,
        }
    }

    /// Classify as much of `raw` as possible.
    fn scan(&mut self) {
        loop {
            if self.raw.is_empty() || self.closed {
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
        // usual limit fits on the stack.
        let mut stack = [httparse::EMPTY_HEADER; 128];
        let mut heap;
        let slots: &mut [httparse::Header<'_>] = if self.limits.max_header_count < stack.len() {
            &mut stack[..=self.limits.max_header_count]
        } else {
            heap = vec![httparse::EMPTY_HEADER; self.limits.max_header_count + 1];
            &mut heap
        };
        let mut req = httparse::Request::new(slots);
        match req.parse(&self.raw) {
            Ok(httparse::Status::Partial) => {
                let line_done = self.raw.windows(2).any(|w| w == b"\r\n");
                if !line_done && self.raw.len() > MAX_REQUEST_LINE {
                    self.refuse(StatusCode::URI_TOO_LONG, None);
                } else if self.raw.len() > self.limits.max_header_size.max(MAX_REQUEST_LINE) + 4 {
                    let status = if line_done {
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
                    } else {
                        StatusCode::URI_TOO_LONG
                    };
                    self.refuse(status, None);
                }
                false
            }
            Err(httparse::Error::TooManyHeaders) => {
                self.refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, None);
                false
            }
            Err(_) => {
                self.refuse(StatusCode::BAD_REQUEST, None);
                false
            }
            Ok(httparse::Status::Complete(len)) => match check_head(&req, len, &self.limits) {
                Ok(framing) => {
                    self.heads += 1;
                    if names_interleave(req.headers) {
                        if let Some(order) = wire_order(req.headers) {
                            let target = req.path.unwrap_or("");
                            self.orders.record(self.heads, target, order);
                        }
                    }
                    let head = self.raw.split_to(len);
                    self.out.unsplit(head);
                    self.framing = framing;
                    true
                }
                Err(status) => {
                    let line = RequestLine::of(&req);
                    self.refuse(status, Some(line));
                    false
                }
            },
        }
    }

    /// Follow chunked framing; returns false when more bytes are needed.
    fn scan_chunked(&mut self) -> bool {
        let Framing::Chunked(state) = &mut self.framing else {
            return true;
        };
        match state {
            Chunk::Size => {
                let Some(end) = find_crlf(&self.raw) else {
                    if self.raw.len() > 4096 {
                        self.framing = Framing::PassThrough; // hyper will reject it
                    }
                    return false;
                };
                let line = &self.raw[..end];
                let digits = line.split(|b| *b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(digits)
                    .ok()
                    .map(str::trim)
                    .and_then(|s| u64::from_str_radix(s, 16).ok());
                match size {
                    Some(0) => *state = Chunk::Trailers,
                    Some(n) => *state = Chunk::Data(n),
                    None => {
                        self.framing = Framing::PassThrough;
                        return true;
                    }
                }
                let part = self.raw.split_to(end + 2);
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
                    return false;
                }
                *state = Chunk::Size;
                let part = self.raw.split_to(2);
                self.out.unsplit(part);
                true
            }
            Chunk::Trailers => {
                let Some(end) = find_crlf(&self.raw) else {
                    if self.raw.len() > self.limits.max_header_size {
                        self.framing = Framing::PassThrough;
                    }
                    return false;
                };
                if end == 0 {
                    self.framing = Framing::Head;
                }
                let part = self.raw.split_to(end + 2);
                self.out.unsplit(part);
                true
            }
        }
    }

    fn refuse(&mut self, status: StatusCode, line: Option<RequestLine>) {
        let (method, target) = match line {
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
            status.as_u16()
        );
        self.out.extend_from_slice(standin.as_bytes());
        self.raw.clear();
        self.closed = true;
        self.heads += 1;
    }
}

/// Whether some header name comes back after a different one, so that
/// grouping by name would reorder the head.  Cookie does not count: the scope
/// merges all its values at the first one's place, which grouping keeps.
fn names_interleave(headers: &[httparse::Header<'_>]) -> bool {
    // A 64-bit filter of the names seen keeps the usual head linear; only a
    // "maybe seen" looks back for certain.
    let mut seen = 0u64;
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

/// One of 64 bits for a header name, the same whatever its case.
fn name_bit(name: &str) -> u64 {
    let b = name.as_bytes();
    let first = b.first().map_or(0, u8::to_ascii_lowercase);
    let last = b.last().map_or(0, u8::to_ascii_lowercase);
    let mix = b.len() * 31 + usize::from(first) * 7 + usize::from(last);
    1 << (mix % 64)
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

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// The checks hyper does not make (or makes silently), in the reference
/// server's order.  Ok gives the body framing that follows the head.
fn check_head(
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    limits: &Limits,
) -> Result<Framing, StatusCode> {
    let target_len = req.path.map(str::len).unwrap_or(0);
    if target_len > MAX_REQUEST_LINE {
        return Err(StatusCode::URI_TOO_LONG);
    }
    if head_len > limits.max_header_size || req.headers.len() > limits.max_header_count {
        return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let http11 = req.version == Some(1);
    let mut hosts = 0;
    let mut host: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut cl_count = 0;
    let mut te: Option<Vec<u8>> = None;
    let mut upgrade = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case(REFUSAL_HEADER) {
            return Err(StatusCode::BAD_REQUEST);
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            cl_count += 1;
            let v = h.value;
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(StatusCode::BAD_REQUEST);
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
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if (http11 && hosts == 0) || hosts > 1 {
        return Err(StatusCode::BAD_REQUEST);
    }
    check_target(req.method.unwrap_or(""), req.path.unwrap_or(""), host)?;
    if cl_count > 1 {
        return Err(StatusCode::BAD_REQUEST);
    }
    if let Some(te) = &te {
        if content_length.is_some() {
            return Err(StatusCode::BAD_REQUEST);
        }
        if !http11 {
            return Err(StatusCode::BAD_REQUEST);
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
            Some(i) if i + 1 != codings.len() => Err(StatusCode::BAD_REQUEST),
            // A coding before chunked that we would have to decode.
            Some(_) if codings.len() > 1 => Err(StatusCode::NOT_IMPLEMENTED),
            Some(_) => Ok(if upgrade {
                Framing::PassThrough
            } else {
                Framing::Chunked(Chunk::Size)
            }),
            None => Err(StatusCode::NOT_IMPLEMENTED),
        };
    }
    if let Some(n) = content_length {
        if limits.max_body > 0 && n > limits.max_body {
            return Err(StatusCode::PAYLOAD_TOO_LARGE);
        }
    }
    if upgrade {
        return Ok(Framing::PassThrough);
    }
    Ok(match content_length {
        Some(n) if n > 0 => Framing::Fixed(n),
        _ => Framing::Head,
    })
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
    // CONNECT's authority-form is hyper's business (it treats CONNECT as an
    // upgrade); what such a request gets is unchanged.
    if method == "CONNECT" {
        return Ok(());
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
                return Poll::Ready(Ok(()));
            }
            if this.peer_eof {
                return Poll::Ready(Ok(()));
            }
            if this.closed {
                // Not EOF: hyper would abandon the stand-in request.  Its
                // response carries `connection: close`, which ends the
                // connection once written.
                return Poll::Pending;
            }
            if this.framing == Framing::PassThrough && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.raw.reserve(8192);
            let n = {
                let spare = this.raw.spare_capacity_mut();
                let mut rb = ReadBuf::uninit(spare);
                match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => rb.filled().len(),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            };
            if n == 0 {
                // Hand hyper what is left (a partial head it will reject), then EOF.
                this.peer_eof = true;
                let rest = this.raw.split();
                this.out.unsplit(rest);
                continue;
            }
            // SAFETY: poll_read initialised exactly `n` bytes of the spare capacity.
            unsafe { this.raw.set_len(this.raw.len() + n) };
            this.scan();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
        let mut g = Gate::new((), LIMITS, Arc::default());
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
            None,
            "authority-form is CONNECT's"
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
    }

    fn claimed(g: &Gate<()>, seq: u64, target: &str) -> Option<Vec<String>> {
        g.orders
            .claim(seq, &target.parse().unwrap())
            .map(|o| o.0.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn each_pipelined_request_gets_its_own_order() {
        let mut g = Gate::new((), LIMITS, Arc::default());
        g.raw.extend_from_slice(
            b"GET /1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\n\
POST /2 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nContent-Length: 3\r\nX-A: 2\r\n\r\nabc\
GET /3 HTTP/1.1\r\nHost: x\r\n\r\n\
GET /4 HTTP/1.1\r\nX-B: 1\r\nHost: x\r\nX-B: 2\r\n\r\n",
        );
        g.scan();
        assert!(!g.closed);
        assert_eq!(g.heads, 4);
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
        let mut g = Gate::new((), LIMITS, Arc::default());
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
        let mut g = Gate::new((), LIMITS, Arc::default());
        g.raw.extend_from_slice(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
GET /after HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 1\r\nX-A: 2\r\n\r\n",
        );
        g.scan();
        assert_eq!(g.framing, Framing::PassThrough);
        assert_eq!(g.heads, 1);
        assert!(!g.orders.pending.load(Ordering::Acquire));
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
}
