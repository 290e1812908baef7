//! One HTTP/2 connection: the handshake with our SETTINGS, then an accept
//! loop that drives the connection and, in the same task, its streams.
//!
//! Why one task and not a task per stream: each stream that answered woke
//! the connection's task on its own, and tokio ran that task next (its LIFO
//! slot), so every response went out in a writev of its own.  Polled from
//! the loop, all streams the interpreter answered in one batch queue their
//! frames first, and the connection flushes them together.  Each stream
//! still watches its own reset and disconnect (stream.rs).
//!
//! The loop also owns the connection's fate: GOAWAY and a drain on
//! shutdown, GOAWAY after `--timeout` with no stream open, and GOAWAY
//! (ENHANCE_YOUR_CALM) to a client that resets streams faster than the
//! Rapid Reset budget allows.  A client has `--timeout` (10 s without it)
//! to answer either GOAWAY by acknowledging its PING or closing; one that
//! stopped reading does neither, and its connection is then reset.  Every stream the server works on counts
//! against `--h2-max-concurrent-streams`, including streams the client has
//! reset whose application has not finished: past it a new stream is
//! refused (REFUSED_STREAM) before any application sees it, so a client
//! cannot stack up work by resetting.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Notify};

use super::Settings;
use crate::server::{ConnectionSignals, Server};
use crate::service::ConnInfo;

/// How long a client has to finish the HTTP/2 handshake (its preface and
/// SETTINGS) when `--timeout` is off.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// What the streams of one connection share with its accept loop.
pub struct ConnShared {
    /// Stream futures alive (an application may outlive its stream).
    live: AtomicUsize,
    /// The moment the last stream ended (for the idle timeout).
    idle_since: Mutex<Instant>,
    resets: Mutex<ResetBudget>,
    /// A stream spent the last of the reset budget.
    calm_down: Notify,
    /// Closes (its sender drops) when the accept loop ends.
    gone: watch::Receiver<()>,
}

/// A token bucket of client stream resets: `burst` at most, refilled at
/// `per_second`.
struct ResetBudget {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled: Instant,
}

impl ResetBudget {
    fn new(burst: u32, per_second: u32) -> ResetBudget {
        ResetBudget {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            refilled: Instant::now(),
        }
    }

    /// Spend one token; false when there was none left.
    fn spend(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts a stream's future while it lives.
pub struct LiveStream(Arc<ConnShared>);

impl Drop for LiveStream {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConnShared {
    fn new(settings: &Settings, gone: watch::Receiver<()>) -> Arc<ConnShared> {
        Arc::new(ConnShared {
            live: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            resets: Mutex::new(ResetBudget::new(
                settings.rst_burst,
                settings.rst_per_second,
            )),
            calm_down: Notify::new(),
            gone,
        })
    }

    pub fn stream_opened(self: &Arc<Self>) -> LiveStream {
        self.live.fetch_add(1, Ordering::AcqRel);
        LiveStream(self.clone())
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The client reset one of our streams: spend from the budget.
    pub fn client_reset(&self) {
        if !lock(&self.resets).spend(Instant::now()) {
            self.calm_down.notify_one();
        }
    }

    /// Resolves when the connection under the streams has ended.
    pub fn connection_gone(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut gone = self.gone.clone();
        async move { while gone.changed().await.is_ok() {} }
    }
}

/// Serve HTTP/2 on `io` (after the preface was seen, or ALPN chose h2).
/// `fd`, the TCP socket under `io` where there is one, is set to reset on
/// close when the client leaves a GOAWAY unanswered.
pub async fn serve<IO>(
    io: IO,
    conn: Arc<ConnInfo>,
    server: Arc<Server>,
    mut signals: ConnectionSignals,
    fd: Option<RawFd>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &server.http2;
    let client = conn.client;
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_window_size(settings.initial_window_size)
        // The connection window must not be the bottleneck of the streams'
        // own windows; it also bounds what one connection can buffer.
        .initial_connection_window_size(settings.initial_window_size.max(1 << 20))
        .max_frame_size(settings.max_frame_size)
        .max_header_list_size(settings.max_header_list_size)
        .enable_connect_protocol();
    let handshake = builder.handshake::<IO, Bytes>(io);
    let limit = settings.idle_timeout.unwrap_or(HANDSHAKE_LIMIT);
    let mut h2conn = tokio::select! {
        done = tokio::time::timeout(limit, handshake) => match done {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!("HTTP/2 handshake with {client} failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("HTTP/2 handshake with {client} timed out");
                return;
            }
        },
        _ = signals.force.wait_for(|f| *f) => return,
    };

    let (gone_tx, gone_rx) = watch::channel(());
    let shared = ConnShared::new(settings, gone_rx);
    let max_streams = settings.max_concurrent_streams as usize;
    let idle_limit = settings.idle_timeout;
    let mut draining = false;
    let mut idle_check = Box::pin(tokio::time::sleep(idle_limit.unwrap_or(Duration::MAX / 4)));
    // Armed by the server's own GOAWAY (idle, Rapid Reset): h2 then waits
    // for the client's PING acknowledgement, or its close, for ever.
    let goaway_limit = idle_limit.unwrap_or(HANDSHAKE_LIMIT);
    let mut goaway_unanswered = Box::pin(tokio::time::sleep(Duration::MAX / 4));
    let mut awaiting_close = false;
    let mut streams: FuturesUnordered<StreamTask> = FuturesUnordered::new();
    loop {
        let next = tokio::select! {
            // Streams before the connection, so that whatever they queued
            // goes out in the connection's one flush below.
            biased;
            _ = signals.force.wait_for(|f| *f) => break,
            _ = signals.drain.wait_for(|d| *d), if !draining => {
                draining = true;
                // GOAWAY: no new streams; the open ones finish.
                h2conn.graceful_shutdown();
                continue;
            }
            _ = shared.calm_down.notified() => {
                tracing::warn!(
                    "HTTP/2 client {client} reset streams faster than --h2-rst-burst/--h2-rst-rate allow: GOAWAY (ENHANCE_YOUR_CALM)"
                );
                h2conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                draining = true;
                awaiting_close = true;
                goaway_unanswered.as_mut().reset(tokio::time::Instant::now() + goaway_limit);
                continue;
            }
            _ = &mut goaway_unanswered, if awaiting_close => {
                tracing::debug!(
                    "HTTP/2 connection from {client}: GOAWAY unanswered for {}s: reset",
                    goaway_limit.as_secs()
                );
                if let Some(fd) = fd {
                    crate::write_stall::reset_on_close(fd);
                }
                break;
            }
            _ = &mut idle_check, if idle_limit.is_some() && !draining => {
                let limit = idle_limit.unwrap_or_default();
                let idle_for = lock(&shared.idle_since).elapsed();
                if shared.live() == 0 && idle_for >= limit {
                    tracing::debug!("HTTP/2 connection from {client} idle for {}s: GOAWAY", limit.as_secs());
                    draining = true;
                    h2conn.graceful_shutdown();
                    awaiting_close = true;
                    goaway_unanswered.as_mut().reset(tokio::time::Instant::now() + goaway_limit);
                } else {
                    let wait = if shared.live() == 0 { limit - idle_for } else { limit };
                    idle_check.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                continue;
            }
            Some(()) = streams.next(), if !streams.is_empty() => continue,
            next = h2conn.accept() => next,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::debug!("HTTP/2 connection from {client} ended: {e}");
                break;
            }
            Some(Ok((req, mut respond))) => {
                if shared.live() >= max_streams {
                    // Streams the client reset whose applications still run:
                    // no new work until they finish.
                    respond.send_reset(Reason::REFUSED_STREAM);
                    continue;
                }
                let live = shared.stream_opened();
                let (conn, server, shared) = (conn.clone(), server.clone(), shared.clone());
                streams.push(Box::pin(async move {
                    let _live = live;
                    super::stream::serve(req, respond, conn, server, shared).await
                }));
            }
        }
    }
    // Streams whose applications still run hear that the connection is
    // gone, and are driven here until they finish.
    drop(gone_tx);
    drop(h2conn);
    while streams.next().await.is_some() {}
}

/// A stream's future, polled by its connection's task (boxed: it is
/// several kilobytes, and the set moves it otherwise).
type StreamTask = Pin<Box<dyn Future<Output = ()> + Send>>;
