//! The Rust functions that the C layer's XS subs (src/interp/c/) call.  They
//! run on an interpreter thread, inside a call from Perl, and never call back
//! into Perl.  Each catches panics (its whole body runs inside `guarded` or
//! `with_ctx`, or a helper built on them; a unit test below checks): a
//! panic must not unwind into C frames, and must not abort the server.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::os::fd::FromRawFd;
use std::os::raw::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

use super::ffi::{PagiMsg, PagiStr, PagiTls};
use super::lent::Lender;
use super::mailbox::Mailbox;
use super::messages::{kind, ToPerl};
use super::Control;
use crate::error::SendError;
use crate::exchange::{EndState, Exchange, SendOutcome};
use crate::websocket::session::{Keepalive, Session, UnreadLimit};

/// Request ids are unique and sequential: they need no hashing.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Objects by request id, on this interpreter's thread.
type Registry<T> = HashMap<u64, Arc<T>, std::hash::BuildHasherDefault<IdHasher>>;
type ExchangeMap = Registry<Exchange>;
type SessionMap = Registry<Session>;

/// Per-interpreter-thread state.  Only this thread touches it, so no locks;
/// borrows never live across a call into Perl.
pub struct WorkerCtx {
    pub mailbox: Arc<Mailbox>,
    /// Body strings lent to the network, and those it gave back.
    lender: Arc<Lender>,
    pub control: mpsc::Sender<Control>,
    pub runtime: tokio::runtime::Handle,
    inbox: VecDeque<ToPerl>,
    /// The message last handed to Perl; its data backs the pointers in PagiMsg.
    current: Option<ToPerl>,
    header_buf: Vec<PagiStr>,
    /// A BODY message's pieces, pointed at by PagiMsg like `header_buf`.
    piece_buf: Vec<PagiStr>,
    /// A TLS request's extension and its certificate chain, pointed at by
    /// PagiMsg like `header_buf`; the strings are the current message's.
    tls_buf: Box<PagiTls>,
    tls_chain_buf: Vec<PagiStr>,
    exchanges: ExchangeMap,
    /// WebSocket sessions, by the id of their handshake exchange.
    sessions: SessionMap,
    last_error: String,
    /// What `pagi_rs_end_state` last reported; its strings back the pointers.
    last_end: (EndState, Option<(u16, String)>),
}

thread_local! {
    static CTX: RefCell<Option<WorkerCtx>> = const { RefCell::new(None) };
}

pub fn install(
    mailbox: Arc<Mailbox>,
    control: mpsc::Sender<Control>,
    runtime: tokio::runtime::Handle,
) {
    CTX.with(|c| {
        *c.borrow_mut() = Some(WorkerCtx {
            lender: Lender::new(Arc::clone(&mailbox)),
            mailbox,
            control,
            runtime,
            inbox: VecDeque::new(),
            current: None,
            header_buf: Vec::new(),
            piece_buf: Vec::new(),
            tls_buf: Box::new(PagiTls::NONE),
            tls_chain_buf: Vec::new(),
            exchanges: ExchangeMap::default(),
            sessions: SessionMap::default(),
            last_error: String::new(),
            last_end: (EndState::Active, None),
        })
    });
}

pub fn uninstall() {
    CTX.with(|c| c.borrow_mut().take());
}

fn with_ctx<R>(default: R, f: impl FnOnce(&mut WorkerCtx) -> R) -> R {
    match catch_unwind(AssertUnwindSafe(|| {
        CTX.with(|c| c.borrow_mut().as_mut().map(f))
    })) {
        Ok(Some(r)) => r,
        Ok(None) => default,
        Err(_) => {
            tracing::error!("internal error: panic in an interpreter callback");
            default
        }
    }
}

fn exchange(id: u64) -> Option<Arc<Exchange>> {
    CTX.with(|c| {
        c.borrow()
            .as_ref()
            .and_then(|ctx| ctx.exchanges.get(&id).cloned())
    })
}

fn session(id: u64) -> Option<Arc<Session>> {
    CTX.with(|c| {
        c.borrow()
            .as_ref()
            .and_then(|ctx| ctx.sessions.get(&id).cloned())
    })
}

fn guarded<R>(default: R, f: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!("internal error: panic in an interpreter callback");
        default
    })
}

/// Store an error message for C to copy; valid until the next call.
fn report(err: *mut PagiStr, msg: String) -> c_int {
    with_ctx((), |ctx| {
        ctx.last_error = msg;
        if !err.is_null() {
            // SAFETY: err points at a PagiStr on the XS function's stack.
            unsafe { *err = PagiStr::from_bytes(ctx.last_error.as_bytes()) };
        }
    });
    -1
}

fn outcome(result: Result<SendOutcome, SendError>, err: *mut PagiStr) -> c_int {
    match result {
        Ok(o) => o as c_int,
        Err(e) => report(err, e.to_string()),
    }
}

/// # Safety
/// `hdrs` points at `2 * n` PagiStr values alive for this call.
unsafe fn header_pairs<'a>(hdrs: *const PagiStr, n: usize) -> Vec<(&'a [u8], &'a [u8])> {
    if hdrs.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: guaranteed by the caller (headers_from_sv in src/interp/c/convert.c).
    let flat = unsafe { std::slice::from_raw_parts(hdrs, 2 * n) };
    // SAFETY: each entry points into a Perl string alive for this XS call.
    flat.chunks_exact(2)
        .map(|p| unsafe { (p[0].as_bytes(), p[1].as_bytes()) })
        .collect()
}

/// The body of the BODY message being read, given up to the caller as the
/// buffer of a Perl string: its pointer, with the string's length and the
/// allocated size in `len` and `size`.  The buffer comes from the C
/// library's malloc and ends in a NUL (see `malloc::PerlBuffer`); from here
/// Perl owns it.  Null when there is none to give (the body is still in
/// pieces, or was given already): the caller copies `pieces` instead.
#[no_mangle]
pub extern "C" fn pagi_rs_adopt_body(len: *mut usize, size: *mut usize) -> *mut c_char {
    with_ctx(std::ptr::null_mut(), |ctx| {
        let Some(ToPerl::Body { data, .. }) = ctx.current.as_mut() else {
            return std::ptr::null_mut();
        };
        let Some(buf) = data.take_joined() else {
            return std::ptr::null_mut();
        };
        let (ptr, n, allocated) = buf.take();
        // SAFETY: the C caller passes two writable size_t slots.
        unsafe {
            *len = n;
            *size = allocated;
        }
        ptr.cast()
    })
}

/// Move newly arrived messages into the inbox; returns how many arrived.
/// While the interpreter works through them, the wake-ups its sends cause
/// are held (`exchange::wakeups`); they go out when it finds no more.
#[no_mangle]
pub extern "C" fn pagi_rs_wake_ack() -> c_int {
    with_ctx(0, |ctx| {
        let n = ctx.mailbox.take_all(&mut ctx.inbox);
        crate::interp::scheduling::took_messages(n);
        if n > 0 {
            crate::exchange::wakeups::hold();
        } else {
            crate::exchange::wakeups::release();
        }
        n as c_int
    })
}

/// Does anything besides the running app wait for the interpreter: a
/// message taken and not yet handed to Perl, or one still in the mailbox?
/// send.c asks when an app has held the interpreter for a whole turn.
#[no_mangle]
pub extern "C" fn pagi_rs_others_waiting() -> c_int {
    with_ctx(0, |ctx| {
        c_int::from(!ctx.inbox.is_empty() || ctx.mailbox.has_messages())
    })
}

/// An app that yielded its turn (send.c) runs again from the loop, outside
/// any batch of messages: hold (1) the wake-ups its sends cause while it
/// runs, as a batch would, and release (0) them when it stops.
#[no_mangle]
pub extern "C" fn pagi_rs_hold_wakeups(hold: c_int) {
    guarded((), || {
        if hold != 0 {
            crate::exchange::wakeups::hold();
        } else {
            crate::exchange::wakeups::release();
        }
    })
}

/// Fill `out` with the next message; 0 when the inbox is empty.
#[no_mangle]
pub extern "C" fn pagi_rs_next_message(out: *mut PagiMsg) -> c_int {
    with_ctx(0, |ctx| {
        crate::exchange::wakeups::release_overdue(ctx.inbox.len());
        ctx.current = None;
        let msg = loop {
            match ctx.inbox.pop_front() {
                None => return 0,
                // Taking it was the point (Pool::ping); Perl never sees it.
                Some(ToPerl::Ping) => continue,
                Some(msg) => break msg,
            }
        };
        // SAFETY: out points at a zeroed PagiMsg on the XS function's stack.
        let m = unsafe { &mut *out };
        match &msg {
            ToPerl::Request {
                exchange,
                scope,
                session,
            } => {
                ctx.mailbox.request_taken();
                ctx.exchanges.insert(exchange.id, exchange.clone());
                if let Some(session) = session {
                    ctx.sessions.insert(exchange.id, session.clone());
                }
                m.kind = kind::REQUEST;
                m.id = exchange.id;
                // A port of -1 and a NULL host leave `client` out and make
                // `server`'s port undef (a Unix socket: request.c).
                let client_port = match scope.client {
                    crate::service::Peer::Tcp(addr) => i64::from(addr.port()),
                    crate::service::Peer::Unix => -1,
                };
                m.num = [
                    client_port,
                    scope.server_port.map_or(-1, i64::from),
                    scope.body as i64,
                    scope.kind as i64,
                ];
                let strs: [Option<&[u8]>; 9] = [
                    Some(scope.http_version.as_bytes()),
                    Some(scope.method.as_str().as_bytes()),
                    Some(scope.scheme.as_bytes()),
                    Some(scope.path()),
                    Some(&scope.raw_path),
                    Some(&scope.query_string),
                    Some(scope.root_path.as_bytes()),
                    scope.client_host.as_deref().map(str::as_bytes),
                    Some(&scope.server_host),
                ];
                for (i, s) in strs.iter().enumerate() {
                    m.str[i] = s.map_or(PagiStr::NULL, PagiStr::from_bytes);
                }
                m.nstr = strs.len();
                // path (index 3) and root_path (6) are text when they decode.
                m.utf8_mask = (u32::from(scope.path_is_utf8) << 3) | (1 << 6);
                ctx.header_buf.clear();
                for (n, v) in crate::scope::scope_headers(scope) {
                    ctx.header_buf.push(PagiStr::from_bytes(n));
                    ctx.header_buf.push(PagiStr::from_bytes(v));
                }
                m.headers = ctx.header_buf.as_ptr();
                m.nheaders = ctx.header_buf.len() / 2;
                m.has_headers = 1;
                if let Some(tls) = &scope.tls {
                    ctx.tls_chain_buf.clear();
                    ctx.tls_chain_buf.extend(
                        tls.client_cert_chain
                            .iter()
                            .map(|pem| PagiStr::from_bytes(pem.as_bytes())),
                    );
                    *ctx.tls_buf = PagiTls {
                        server_cert: PagiStr::from_bytes(tls.server_cert.as_bytes()),
                        client_cert_chain: ctx.tls_chain_buf.as_ptr(),
                        nclient_cert_chain: ctx.tls_chain_buf.len(),
                        client_cert_name: optional_str(tls.client_cert_name.as_deref()),
                        tls_version: tls.tls_version.map_or(-1, i32::from),
                        cipher_suite: tls.cipher_suite.map_or(-1, i32::from),
                    };
                    m.tls = &*ctx.tls_buf;
                }
            }
            ToPerl::Body { id, data, more } => {
                if let Some(ex) = ctx.exchanges.get(id) {
                    ex.body_taken();
                }
                m.kind = kind::BODY;
                m.id = *id;
                m.num[0] = i64::from(*more);
                ctx.piece_buf.clear();
                ctx.piece_buf.extend(data.parts().map(PagiStr::from_bytes));
                m.pieces = ctx.piece_buf.as_ptr();
                m.npieces = ctx.piece_buf.len();
                // See pagi_rs_adopt_body.
                m.adoptable = c_int::from(data.is_joined());
            }
            ToPerl::Disconnect { id, reason, detail } => {
                m.kind = kind::DISCONNECT;
                m.id = *id;
                m.str[0] = PagiStr::from_bytes(reason.as_bytes());
                m.str[1] = optional_str(detail.as_deref());
                m.nstr = 2;
                m.utf8_mask = 1 << 1;
            }
            ToPerl::WsReceive { id, text, data } => {
                if let Some(ws) = ctx.sessions.get(id) {
                    ws.taken_by_interpreter(data.len());
                }
                m.kind = kind::WS_RECEIVE;
                m.id = *id;
                m.num[0] = i64::from(*text);
                m.str[0] = PagiStr::from_bytes(data);
                m.nstr = 1;
                m.utf8_mask = u32::from(*text);
            }
            ToPerl::WsDisconnect { id, ending } => {
                m.kind = kind::WS_DISCONNECT;
                m.id = *id;
                m.num[0] = i64::from(ending.code);
                m.num[1] = i64::from(ending.clean);
                m.num[2] = ending
                    .peer
                    .as_ref()
                    .map_or(-1, |(code, _)| i64::from(*code));
                m.str[0] = PagiStr::from_bytes(ending.reason.as_bytes());
                m.str[1] = optional_str(ending.detail.as_deref());
                m.str[2] = optional_str(ending.peer.as_ref().map(|(_, r)| r.as_str()));
                m.nstr = 3;
                m.utf8_mask = 0b111;
            }
            ToPerl::Drained { id, settles_wait } => {
                m.kind = kind::DRAINED;
                m.id = *id;
                m.num[0] = i64::from(*settles_wait);
            }
            ToPerl::SendDone { id, error } => {
                m.kind = kind::SEND_DONE;
                m.id = *id;
                m.str[0] = match error {
                    Some(e) => PagiStr::from_bytes(e.as_bytes()),
                    None => PagiStr::NULL,
                };
                m.nstr = 1;
            }
            ToPerl::Complete { id } => {
                m.kind = kind::COMPLETE;
                m.id = *id;
            }
            ToPerl::LifespanStartup { worker } => {
                m.kind = kind::LIFESPAN_STARTUP;
                m.num[0] = worker.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX));
            }
            ToPerl::LifespanShutdown => m.kind = kind::LIFESPAN_SHUTDOWN,
            ToPerl::Stop => m.kind = kind::STOP,
            ToPerl::Ping => unreachable!("skipped above"),
        }
        ctx.current = Some(msg);
        1
    })
}

fn optional_str(s: Option<&str>) -> PagiStr {
    s.map_or(PagiStr::NULL, |s| PagiStr::from_bytes(s.as_bytes()))
}

/// `pagi.connection`'s facts for request `id`, straight from the core, so
/// that they are current before the message announcing them is dispatched.
/// Returns -1 for an id the core has forgotten, 0 while active, 1 after a
/// clean end, 2 after an abnormal one; `out` then carries the reason
/// (str 0), the detail (str 1), the peer's Close code (num 0, -1 for none)
/// and reason (str 2), and a WebSocket's `websocket.disconnect` code (num 1,
/// -1 for none), valid until the next call.
#[no_mangle]
pub extern "C" fn pagi_rs_end_state(id: u64, out: *mut PagiMsg) -> c_int {
    with_ctx(end_state::FORGOTTEN, |ctx| {
        let (end, peer, code) = if let Some(ws) = ctx.sessions.get(&id) {
            ws.end_state()
        } else if let Some(ex) = ctx.exchanges.get(&id) {
            (ex.end_state(), None, None)
        } else {
            return end_state::FORGOTTEN;
        };
        ctx.last_end = (end, peer);
        // SAFETY: out points at a zeroed PagiMsg on the XS function's stack.
        let m = unsafe { &mut *out };
        let (end, peer) = &ctx.last_end;
        m.num[0] = peer.as_ref().map_or(-1, |(code, _)| i64::from(*code));
        m.num[1] = code.map_or(-1, i64::from);
        m.str[2] = optional_str(peer.as_ref().map(|(_, r)| r.as_str()));
        match end {
            EndState::Active => end_state::ACTIVE,
            EndState::Clean => end_state::CLEAN,
            EndState::Abnormal { reason, detail } => {
                m.str[0] = PagiStr::from_bytes(reason.as_bytes());
                m.str[1] = optional_str(detail.as_deref());
                end_state::ABNORMAL
            }
        }
    })
}

/// `pagi.connection->abort($detail)`: 1 when it ended the scope, 0 when
/// the scope had already ended (its outcome stands).
#[no_mangle]
pub extern "C" fn pagi_rs_abort(id: u64, ptr: *const c_char, len: usize, has: c_int) -> c_int {
    guarded(0, || {
        // SAFETY: ptr/len describe the detail text alive for this XS call.
        let detail = unsafe { optional_bytes(ptr, len, has) }
            .map(|d| String::from_utf8_lossy(d).into_owned());
        if let Some(ws) = session(id) {
            return c_int::from(ws.abort(detail));
        }
        match exchange(id) {
            Some(ex) => c_int::from(ex.app_abort(detail)),
            None => 0,
        }
    })
}

/// Apply one send to request `id`: an unknown id (a request already
/// forgotten) is a successful no-op, as any send after the end is.
fn send_to(
    id: u64,
    err: *mut PagiStr,
    send: impl FnOnce(&Exchange) -> Result<SendOutcome, SendError>,
) -> c_int {
    send_registered(|ctx| &ctx.exchanges, id, err, send)
}

/// Run `send` on the object registered under `id` in `registry`.
///
/// The send runs on the registry's own `Arc`, borrowed, not on a clone: the
/// clone and its drop were two atomic operations on every event an app
/// sends (bench/README.md, session 24).  Nothing a send does reaches the
/// registry (sends change the exchange and the network's wake-ups), and
/// the outcome, whose error report writes to this thread's context, is
/// settled after the borrow ends.
fn send_registered<T>(
    registry: impl for<'a> FnOnce(&'a WorkerCtx) -> &'a Registry<T>,
    id: u64,
    err: *mut PagiStr,
    send: impl FnOnce(&T) -> Result<SendOutcome, SendError>,
) -> c_int {
    guarded(-1, || {
        let result = CTX.with(|c| {
            let ctx = c.borrow();
            let registered = registry(ctx.as_ref()?).get(&id)?;
            Some(send(registered))
        });
        match result {
            Some(result) => outcome(result, err),
            None => SendOutcome::Closed as c_int,
        }
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_response_start(
    id: u64,
    status: i64,
    hdrs: *const PagiStr,
    n: usize,
    trailers: c_int,
    err: *mut PagiStr,
) -> c_int {
    send_to(id, err, |ex| {
        // SAFETY: the C layer passes 2n entries that live for this call.
        let pairs = unsafe { header_pairs(hdrs, n) };
        ex.start(status, &pairs, trailers != 0)
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_response_body(
    id: u64,
    ptr: *const c_char,
    len: usize,
    more: c_int,
    err: *mut PagiStr,
) -> c_int {
    send_to(id, err, |ex| {
        // SAFETY: ptr/len describe the body string alive for this XS call.
        let data = unsafe { PagiStr { ptr, len }.as_bytes() };
        ex.body(data, more != 0)
    })
}

/// `pagi_rs_response_body` for a body string lent without a copy: `sv` is a
/// scalar the C layer made to share the application's string (convert.c's
/// lend_body), and its one reference passes to Rust whatever happens here.
#[no_mangle]
pub extern "C" fn pagi_rs_response_body_lent(
    id: u64,
    sv: *mut c_void,
    ptr: *const c_char,
    len: usize,
    more: c_int,
    err: *mut PagiStr,
) -> c_int {
    guarded(-1, || {
        // Without an interpreter context (never while one serves) the
        // scalar is left alone: a leak, not a free on the wrong thread.
        let Some(lender) = with_ctx(None, |ctx| Some(Arc::clone(&ctx.lender))) else {
            return SendOutcome::Closed as c_int;
        };
        // SAFETY: lend_body made `sv` for this call and hands over its
        // reference; ptr/len is its string, shared copy-on-write, which
        // Perl never writes while `sv` holds it.
        let data = unsafe { lender.lend(sv, ptr.cast(), len) };
        // Dropped unsent (an error, a closed exchange), it comes straight back.
        send_to(id, err, move |ex| ex.body_bytes(data, more != 0))
    })
}

/// Scalars the network gave back (see `interp::lent`): up to `cap` of them
/// into `out`, for the interpreter to free; returns how many.
#[no_mangle]
pub extern "C" fn pagi_rs_take_returned_loans(out: *mut *mut c_void, cap: usize) -> usize {
    with_ctx(0, |ctx| {
        if out.is_null() || cap == 0 {
            return 0;
        }
        // SAFETY: out points at `cap` writable slots on the C caller's stack.
        let slots = unsafe { std::slice::from_raw_parts_mut(out, cap) };
        ctx.lender.take_returned(slots)
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_response_trailers(
    id: u64,
    hdrs: *const PagiStr,
    n: usize,
    err: *mut PagiStr,
) -> c_int {
    send_to(id, err, |ex| {
        // SAFETY: the C layer passes 2n entries that live for this call.
        let pairs = unsafe { header_pairs(hdrs, n) };
        ex.trailers(&pairs)
    })
}

fn runtime() -> Option<tokio::runtime::Handle> {
    CTX.with(|c| c.borrow().as_ref().map(|ctx| ctx.runtime.clone()))
}

/// What a `file` or `fh` body streams: the file, the offset asked for (None:
/// where it is), the length (None: to EOF), and bytes that go first.
type FileBody = (std::fs::File, Option<u64>, Option<u64>, bytes::Bytes);

fn start_file_stream(
    id: u64,
    err: *mut PagiStr,
    open: impl FnOnce() -> Result<FileBody, String>,
) -> c_int {
    guarded(-1, || {
        let Some(ex) = exchange(id) else {
            return SendOutcome::Closed as c_int;
        };
        match ex.begin_stream_body() {
            Err(e) => return report(err, e.to_string()),
            Ok(Some(done)) => return done as c_int,
            Ok(None) => {}
        }
        let opened = open().and_then(|(file, offset, length, first)| {
            let source = crate::file::Source::of(&file, offset)?;
            Ok((file, source, length, first))
        });
        let (file, source, length, first) = match opened {
            Ok(v) => v,
            Err(e) => return report(err, SendError::File(e).to_string()),
        };
        let Some(rt) = runtime() else {
            return report(err, "no runtime".into());
        };
        rt.spawn(crate::file::stream(ex, file, source, length, first));
        SendOutcome::Deferred as c_int
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_response_file(
    id: u64,
    path: *const c_char,
    plen: usize,
    offset: i64,
    length: i64,
    err: *mut PagiStr,
) -> c_int {
    start_file_stream(id, err, move || {
        // SAFETY: path/plen describe the path string alive for this XS call
        // (the stream is opened before it returns).
        let path_bytes = unsafe {
            PagiStr {
                ptr: path,
                len: plen,
            }
            .as_bytes()
        };
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path_bytes));
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(format!("{}: is a directory", path.display()));
        }
        Ok((
            file,
            (offset >= 0).then_some(offset as u64),
            (length >= 0).then_some(length as u64),
            bytes::Bytes::new(),
        ))
    })
}

/// An `fh` body: `fd` is the application's descriptor (dup'ed here);
/// `first` holds the bytes Perl had already read ahead from it.
#[no_mangle]
pub extern "C" fn pagi_rs_response_fd(
    id: u64,
    fd: c_int,
    offset: i64,
    length: i64,
    first: *const c_char,
    first_len: usize,
    err: *mut PagiStr,
) -> c_int {
    start_file_stream(id, err, move || {
        // SAFETY: first/first_len describe a Perl string alive for this XS
        // call (the stream is opened before it returns).
        let first = bytes::Bytes::copy_from_slice(unsafe {
            PagiStr {
                ptr: first,
                len: first_len,
            }
            .as_bytes()
        });
        // Our own descriptor: the application may close its handle as soon
        // as the send settles, and we must not close theirs.
        // SAFETY: fcntl on a caller-supplied fd; failure is checked.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(format!(
                "fh is not an open file handle: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: dup is a fresh descriptor owned by nobody else.
        let file = unsafe { std::fs::File::from_raw_fd(dup) };
        Ok((
            file,
            (offset >= 0).then_some(offset as u64),
            (length >= 0).then_some(length as u64),
            first,
        ))
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_fullflush(id: u64, _err: *mut PagiStr) -> c_int {
    guarded(-1, || match exchange(id) {
        Some(ex) => ex.fullflush() as c_int,
        None => SendOutcome::Closed as c_int,
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_want_body(id: u64) {
    guarded((), || {
        if let Some(ex) = exchange(id) {
            ex.want_body();
        }
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_finish(
    id: u64,
    err: *const c_char,
    len: usize,
    has_err: c_int,
    interested: c_int,
) -> c_int {
    guarded(0, || {
        let Some(ex) = exchange(id) else {
            return crate::exchange::FinishOutcome::AlreadyDisconnected as c_int;
        };
        // SAFETY: err/len describe the error text alive for this XS call.
        let text = (has_err != 0).then(|| {
            String::from_utf8_lossy(unsafe { PagiStr { ptr: err, len }.as_bytes() }).into_owned()
        });
        let outcome = ex.finish(text.as_deref(), interested != 0);
        // Perl forgets an uninteresting request, and later calls with its id
        // are no-ops; after a backstop or a cut-off it first reads why.
        let perl_reads_why = matches!(
            outcome,
            crate::exchange::FinishOutcome::Backstop500 | crate::exchange::FinishOutcome::Truncated
        );
        if interested == 0 && !perl_reads_why {
            pagi_rs_release(id);
        }
        outcome as c_int
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_release(id: u64) {
    with_ctx((), |ctx| {
        ctx.exchanges.remove(&id);
        ctx.sessions.remove(&id);
    });
}

use super::constants::{end_state, log, query};

#[no_mangle]
pub extern "C" fn pagi_rs_query(id: u64, what: c_int) -> i64 {
    guarded(-1, || {
        if what == query::BUFFERED {
            if let Some(ws) = session(id) {
                return ws.buffered_amount() as i64;
            }
        }
        if what == query::WS_MESSAGES_PENDING {
            return session(id).map_or(0, |ws| ws.messages_in_transit() as i64);
        }
        let Some(ex) = exchange(id) else {
            return if what == query::BUFFERED { 0 } else { -1 };
        };
        match what {
            query::BUFFERED => ex.buffered_amount() as i64,
            query::HIGH_WATER => ex.config().high_water as i64,
            query::LOW_WATER => ex.config().low_water as i64,
            query::WANT_TERMINAL => {
                ex.register_interest(crate::exchange::WANTS_TERMINAL);
                0
            }
            query::WANT_DRAIN => {
                ex.want_drain_news();
                0
            }
            query::BODY_PENDING => ex.bodies_in_mailbox() as i64,
            _ => -1,
        }
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_lifespan_event(kind: c_int, msg: *const c_char, len: usize) -> c_int {
    with_ctx(0, |ctx| {
        // SAFETY: msg/len describe the message text alive for this XS call.
        let text =
            String::from_utf8_lossy(unsafe { PagiStr { ptr: msg, len }.as_bytes() }).into_owned();
        let _ = ctx.control.send(Control::Lifespan(kind, text));
        1
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_log(level: c_int, msg: *const c_char, len: usize) {
    guarded((), || {
        // SAFETY: msg/len describe the message text alive for this XS call.
        let text = String::from_utf8_lossy(unsafe { PagiStr { ptr: msg, len }.as_bytes() });
        let text = text.trim_end();
        let category = match level & !LEVEL_BITS {
            log::FROM_CONNECTION => crate::logging::category::CONNECTION,
            log::FROM_CONNECTION_STATE => crate::logging::category::CONNECTION_STATE,
            log::FROM_TRANSPORT_STATE => crate::logging::category::TRANSPORT_STATE,
            _ => crate::logging::category::SERVER,
        };
        macro_rules! at_level {
            ($($event:tt)*) => {
                match level & LEVEL_BITS {
                    log::DEBUG => tracing::debug!($($event)*),
                    log::INFO => tracing::info!($($event)*),
                    log::WARN => tracing::warn!($($event)*),
                    _ => tracing::error!($($event)*),
                }
            };
        }
        // Only JSON lines name the category; text ones stay as they were.
        if crate::logging::is_json() {
            at_level!(category, "{text}");
        } else {
            at_level!("{text}");
        }
    })
}

/// The bits of `PAGI::RS::_log`'s first argument that are the level; the
/// rest say what the message is about (`LOG_FROM_*`).
const LEVEL_BITS: c_int = 0xf;

#[no_mangle]
pub extern "C" fn pagi_rs_embedded_source(
    name: *const c_char,
    len: usize,
    out: *mut PagiStr,
) -> c_int {
    guarded(0, || {
        // SAFETY: name/len describe the module path string alive for this call.
        let name = unsafe { PagiStr { ptr: name, len }.as_bytes() };
        match super::embedded::source(name) {
            Some(src) => {
                // SAFETY: out points at a PagiStr on the XS function's stack;
                // the source is 'static.
                unsafe { *out = PagiStr::from_bytes(src.as_bytes()) };
                1
            }
            None => 0,
        }
    })
}

// ---- Server-Sent Events ------------------------------------------------------

/// # Safety
/// When `has` is non-zero, ptr/len describe a string alive for this call.
unsafe fn optional_bytes<'a>(ptr: *const c_char, len: usize, has: c_int) -> Option<&'a [u8]> {
    // SAFETY: guaranteed by the caller.
    (has != 0).then(|| unsafe { PagiStr { ptr, len }.as_bytes() })
}

/// `sse.start`: the stream's head leaves at once; its supervisor starts.
#[no_mangle]
pub extern "C" fn pagi_rs_sse_start(
    id: u64,
    status: i64,
    hdrs: *const PagiStr,
    n: usize,
    err: *mut PagiStr,
) -> c_int {
    guarded(-1, || {
        let Some(rt) = runtime() else {
            return report(err, "no runtime".into());
        };
        let Some(ex) = exchange(id) else {
            return SendOutcome::Closed as c_int;
        };
        // SAFETY: the C layer passes 2n entries that live for this call.
        let pairs = unsafe { header_pairs(hdrs, n) };
        let result = ex.start_event_stream(status, &pairs);
        if result.is_ok() {
            let control = crate::sse::start_supervisor(&ex, ex.config().streams.clone(), &rt);
            let _ = ex.event_stream.set(control);
        }
        outcome(result, err)
    })
}

/// `sse.send`: one formatted event as a body chunk.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn pagi_rs_sse_event(
    id: u64,
    event: *const c_char,
    event_len: usize,
    has_event: c_int,
    data: *const c_char,
    data_len: usize,
    event_id: *const c_char,
    event_id_len: usize,
    has_event_id: c_int,
    retry: i64,
    err: *mut PagiStr,
) -> c_int {
    send_to(id, err, |ex| {
        // SAFETY: each pointer/length pair is a Perl string alive for this XS call.
        let ev = unsafe {
            crate::sse::Event {
                event: optional_bytes(event, event_len, has_event),
                data: PagiStr {
                    ptr: data,
                    len: data_len,
                }
                .as_bytes(),
                id: optional_bytes(event_id, event_id_len, has_event_id),
                retry: u64::try_from(retry).ok(),
            }
        };
        EVENT_WIRE.with(|cell| {
            let mut wire = cell.borrow_mut();
            crate::sse::write_event(&ev, &mut wire)?;
            let outcome = ex.body(&wire, true);
            // One huge event must not pin its buffer for the thread's life.
            if wire.capacity() > EVENT_WIRE_KEPT {
                *wire = Vec::new();
            }
            outcome
        })
    })
}

thread_local! {
    /// The wire form of the event `sse.send` is formatting: one buffer per
    /// interpreter thread, reused, because streams send many small events
    /// and `body` copies the bytes into the response's queue anyway.
    static EVENT_WIRE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The most [`EVENT_WIRE`] keeps between events.
const EVENT_WIRE_KEPT: usize = 64 * 1024;

/// `sse.comment`.
#[no_mangle]
pub extern "C" fn pagi_rs_sse_comment(
    id: u64,
    ptr: *const c_char,
    len: usize,
    err: *mut PagiStr,
) -> c_int {
    send_to(id, err, |ex| {
        // SAFETY: ptr/len describe the comment alive for this XS call.
        let comment = unsafe { PagiStr { ptr, len }.as_bytes() };
        ex.body(&crate::sse::format_comment(comment), true)
    })
}

/// `sse.keepalive`: interval in milliseconds, 0 stops it.
#[no_mangle]
pub extern "C" fn pagi_rs_sse_keepalive(
    id: u64,
    interval_ms: i64,
    ptr: *const c_char,
    len: usize,
) -> c_int {
    guarded(-1, || {
        let Some(ex) = exchange(id) else {
            return SendOutcome::Closed as c_int;
        };
        let Some(control) = ex.event_stream.get() else {
            return SendOutcome::Closed as c_int;
        };
        // SAFETY: ptr/len describe the comment alive for this XS call.
        let comment = unsafe { PagiStr { ptr, len }.as_bytes() };
        let setting = u64::try_from(interval_ms)
            .ok()
            .filter(|ms| *ms > 0)
            .map(|ms| {
                (
                    std::time::Duration::from_millis(ms),
                    crate::sse::keepalive_comment(comment),
                )
            });
        control.keepalive.send_replace(setting);
        SendOutcome::Ready as c_int
    })
}

/// `sse.close`: ends the stream; the reason goes to the access log only.
#[no_mangle]
pub extern "C" fn pagi_rs_sse_close(
    id: u64,
    reason: *const c_char,
    len: usize,
    has_reason: c_int,
    err: *mut PagiStr,
) -> c_int {
    send_to(id, err, |ex| {
        // SAFETY: reason/len describe a Perl string alive for this XS call.
        let reason = unsafe { optional_bytes(reason, len, has_reason) };
        let reason = reason.map_or("app_closed".into(), String::from_utf8_lossy);
        ex.set_end_reason(&reason);
        ex.body(b"", false)
    })
}

// ---- WebSocket ----------------------------------------------------------------

/// [`send_to`] for a WebSocket session.
fn ws_send_to(
    id: u64,
    err: *mut PagiStr,
    send: impl FnOnce(&Session) -> Result<SendOutcome, SendError>,
) -> c_int {
    send_registered(|ctx| &ctx.sessions, id, err, send)
}

#[no_mangle]
pub extern "C" fn pagi_rs_ws_accept(
    id: u64,
    sub: *const c_char,
    sub_len: usize,
    has_sub: c_int,
    hdrs: *const PagiStr,
    n: usize,
    err: *mut PagiStr,
) -> c_int {
    ws_send_to(id, err, |ws| {
        // SAFETY: the C layer passes strings and 2n header entries alive for this call.
        let (sub, pairs) =
            unsafe { (optional_bytes(sub, sub_len, has_sub), header_pairs(hdrs, n)) };
        ws.accept(sub, &pairs)
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_ws_send(
    id: u64,
    text: c_int,
    ptr: *const c_char,
    len: usize,
    err: *mut PagiStr,
) -> c_int {
    ws_send_to(id, err, |ws| {
        // SAFETY: ptr/len describe the payload alive for this XS call.
        let data = unsafe { PagiStr { ptr, len }.as_bytes() };
        ws.send(text != 0, data)
    })
}

#[no_mangle]
pub extern "C" fn pagi_rs_ws_close(
    id: u64,
    code: i64,
    ptr: *const c_char,
    len: usize,
    err: *mut PagiStr,
) -> c_int {
    ws_send_to(id, err, |ws| {
        let code = u16::try_from(code).map_err(|_| {
            SendError::Invalid(format!("websocket.close code {code} is out of range"))
        })?;
        // SAFETY: ptr/len describe the reason alive for this XS call.
        let reason = unsafe { PagiStr { ptr, len }.as_bytes() };
        ws.close(code, reason)
    })
}

/// `websocket.keepalive`: times in milliseconds; interval 0 stops it,
/// timeout 0 means no dead-peer detection.
#[no_mangle]
pub extern "C" fn pagi_rs_ws_keepalive(
    id: u64,
    interval_ms: i64,
    timeout_ms: i64,
    err: *mut PagiStr,
) -> c_int {
    ws_send_to(id, err, |ws| {
        let ms = |v: i64| {
            u64::try_from(v)
                .ok()
                .filter(|ms| *ms > 0)
                .map(std::time::Duration::from_millis)
        };
        ws.set_keepalive(ms(interval_ms).map(|interval| Keepalive {
            interval,
            timeout: ms(timeout_ms),
        }))
    })
}

/// The application left more unread than `limit` allows: that many
/// messages (--max-receive-queue), or with `in_bytes` that many bytes.
/// 1: drop the message (see Session::overflow); 0: keep it.
#[no_mangle]
pub extern "C" fn pagi_rs_ws_overflow(id: u64, limit: i64, in_bytes: c_int) -> c_int {
    guarded(1, || {
        let Some(ws) = session(id) else {
            return 1;
        };
        let limit = usize::try_from(limit).unwrap_or(0);
        c_int::from(ws.overflow(if in_bytes != 0 {
            UnreadLimit::Bytes(limit)
        } else {
            UnreadLimit::Messages(limit)
        }))
    })
}

/// The application's Future settled; see Session::app_finished.
#[no_mangle]
pub extern "C" fn pagi_rs_ws_finish(
    id: u64,
    err: *const c_char,
    len: usize,
    has_err: c_int,
) -> c_int {
    guarded(0, || {
        let Some(ws) = session(id) else {
            return crate::exchange::FinishOutcome::AlreadyDisconnected as c_int;
        };
        // SAFETY: err/len describe the error text alive for this XS call.
        let text = (has_err != 0).then(|| {
            String::from_utf8_lossy(unsafe { PagiStr { ptr: err, len }.as_bytes() }).into_owned()
        });
        ws.app_finished(text.as_deref()) as c_int
    })
}

#[cfg(test)]
mod tests {
    /// Every function C calls runs its whole body under a panic guard: the
    /// body's first statement is one of the guards (or a helper that runs
    /// its work under one).  A new export that forgets fails here.
    #[test]
    fn every_export_catches_panics() {
        const GUARDS: &[&str] = &[
            "guarded(",
            "with_ctx(",
            "send_to(",
            "ws_send_to(",
            "start_file_stream(",
        ];
        let src = include_str!("exports.rs");
        let mut checked = 0;
        for (at, _) in src.match_indices("pub extern \"C\" fn ") {
            let rest = &src[at..];
            let name = rest["pub extern \"C\" fn ".len()..]
                .split('(')
                .next()
                .unwrap_or("?");
            let body_start = rest.find("{\n").expect("a body") + 2;
            let first = rest[body_start..]
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("//"))
                .unwrap_or("");
            assert!(
                GUARDS.iter().any(|g| first.starts_with(g)),
                "{name} starts with `{first}`, outside any panic guard"
            );
            checked += 1;
        }
        assert!(checked >= 28, "found only {checked} exports");
    }
}
