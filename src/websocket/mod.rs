//! WebSocket over HTTP/1.1 (RFC 6455; Spec/Www.pod, "WebSocket").
//!
//! The path of one WebSocket:
//! - [`handshake`]: hyper hands over an upgrade request; a malformed one is
//!   answered by the server (400, or 426 for another version) without the
//!   application; otherwise the scope goes to an interpreter and the
//!   application's first send decides: accept (101), close (403), or a
//!   denial response of its own.
//! - [`session`]: the state both threads share: sends from the application,
//!   backpressure, and how the socket ended.
//! - [`connection`]: after the 101, tokio-tungstenite frames the upgraded
//!   socket; one task reads (messages, pings, keepalive, timeouts) and one
//!   writes.

pub mod connection;
pub mod handshake;
/// The queue to the writer task, woken at the end of the interpreter's batch.
mod outbox;
pub mod session;

use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What the application may leave unread when `--max-ws-message-size` is 0
/// (no limit on one message): it still has a bound.
pub const UNLIMITED_MESSAGE_BUDGET: usize = 16 << 20;

/// Bytes of received messages on their way to the interpreter past which a
/// socket is not read.  They are only latency when the interpreter keeps up,
/// so a small figure costs nothing; when it is busy, this is what piles up.
pub const TRANSIT_BUDGET: usize = 1 << 20;

/// How many `--write-high-watermark`s of unsent application data a socket
/// may hold before `websocket.send` fails instead of queueing more.
pub const SEND_BACKLOG_HIGH_WATERS: usize = 16;

/// The largest frame or message accepted even with both limits off (0):
/// tungstenite reserves the length a frame header claims, so without any
/// limit one header claiming a terabyte would abort the process.
pub const HARD_FRAME_LIMIT: usize = 1 << 30;

/// What a queued application message costs beyond its payload (its queue
/// slot, the message and its buffer's header), so that a flood of empty
/// messages is paced and bounded too.
pub const QUEUED_MESSAGE_COST: usize = 64;

/// The largest read of a WebSocket: see [`Settings::read_window`].
pub const MAX_READ_WINDOW: usize = 16 * 1024;

/// Server-wide WebSocket settings (command-line options).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--max-ws-frame-size`: larger frames fail the connection with 1009.
    pub max_frame_size: Option<usize>,
    /// `--max-ws-message-size`: a larger reassembled message fails the
    /// connection with 1009.
    pub max_message_size: Option<usize>,
    /// The most one read of the socket takes (see [`Settings::read_window`]).
    pub read_window: usize,
    /// `--ws-idle-timeout`: no frame either way for this long closes it.
    pub idle_timeout: Option<Duration>,
    /// `--timeout`: a client that takes no byte of what is written to it
    /// for this long is gone (write_stall.rs).
    pub write_timeout: Option<Duration>,
    /// How long to wait for the peer's reply to our Close frame.
    pub close_timeout: Duration,
    /// Messages read but not yet taken by the interpreter, per socket; past
    /// this the socket is not read (TCP pushes back on the client) until the
    /// interpreter catches up.  `--max-receive-queue` bounds what the app
    /// leaves unread on top of this.
    pub max_in_transit: usize,
    /// The same bound in bytes (see [`Settings::transit_budget`]): one
    /// message always passes, so what is in transit stays under this plus
    /// one message.
    pub max_in_transit_bytes: usize,
    /// Unsent application data past which `websocket.send` fails (an app
    /// that awaits its sends never gets there: it waits above the
    /// high-water mark).  A send made below it is queued whatever its size.
    pub max_send_backlog: usize,
    /// [`QUEUED_MESSAGE_COST`], counted per queued message toward the
    /// water marks and `max_send_backlog`.
    pub queued_message_cost: usize,
}

impl Settings {
    /// Bytes of received messages the application may leave unread:
    /// `--max-ws-message-size`, or [`UNLIMITED_MESSAGE_BUDGET`] when that
    /// is 0.  A message always fits in an empty queue.
    pub fn unread_budget(max_message_size: Option<usize>) -> usize {
        max_message_size.unwrap_or(UNLIMITED_MESSAGE_BUDGET)
    }

    /// Bytes in transit to the interpreter past which a socket is not read:
    /// [`TRANSIT_BUDGET`], or less when a whole message may be no larger.
    pub fn transit_budget(max_message_size: Option<usize>) -> usize {
        Self::unread_budget(max_message_size).min(TRANSIT_BUDGET)
    }

    /// The frame limit tungstenite enforces: a frame larger than a whole
    /// message may be is refused as soon as its header is read, so its
    /// payload is never buffered; with neither limit set, the hard limit.
    pub fn effective_frame_limit(&self) -> usize {
        match (self.max_frame_size, self.max_message_size) {
            (Some(f), Some(m)) => f.min(m),
            (f, m) => f.or(m).unwrap_or(HARD_FRAME_LIMIT),
        }
    }

    /// What one read of a WebSocket takes at most: `--read-buffer-size`, but
    /// no more than [`MAX_READ_WINDOW`].  tungstenite zero-fills the whole
    /// window before every read, also the read that finds nothing (each
    /// poll of the socket after a message): at its default of 128 KiB that
    /// was 15 % of the network thread on small-message echo, and 2.5 µs of
    /// it per message.  Large messages lose nothing measurable at 16 KiB.
    pub fn read_window(read_buffer_size: usize) -> usize {
        read_buffer_size.clamp(1, MAX_READ_WINDOW)
    }

    /// What tungstenite is told: the read window and the two limits.
    pub fn tungstenite_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_window)
            .max_frame_size(Some(self.effective_frame_limit()))
            .max_message_size(Some(self.effective_message_limit()))
    }

    /// The message limit tungstenite enforces: the hard limit when off.
    pub fn effective_message_limit(&self) -> usize {
        self.max_message_size.unwrap_or(HARD_FRAME_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_limits(frame: Option<usize>, message: Option<usize>) -> Settings {
        Settings {
            max_frame_size: frame,
            max_message_size: message,
            read_window: Settings::read_window(64 * 1024),
            idle_timeout: None,
            write_timeout: None,
            close_timeout: Duration::from_secs(1),
            max_in_transit: 1,
            max_in_transit_bytes: 1,
            max_send_backlog: 1,
            queued_message_cost: 0,
        }
    }

    #[test]
    fn a_read_takes_the_read_buffer_size_up_to_the_window() {
        assert_eq!(Settings::read_window(64 * 1024), MAX_READ_WINDOW);
        assert_eq!(Settings::read_window(4096), 4096);
        assert_eq!(Settings::read_window(0), 1, "never an empty read");
    }

    #[test]
    fn tungstenite_reads_the_window_and_enforces_the_limits() {
        let config = with_limits(Some(64), Some(1000)).tungstenite_config();
        assert_eq!(config.read_buffer_size, MAX_READ_WINDOW);
        assert_eq!(config.max_frame_size, Some(64));
        assert_eq!(config.max_message_size, Some(1000));
    }

    #[test]
    fn no_frame_may_be_larger_than_a_message() {
        assert_eq!(
            with_limits(Some(64), Some(1000)).effective_frame_limit(),
            64
        );
        assert_eq!(
            with_limits(Some(5000), Some(1000)).effective_frame_limit(),
            1000
        );
        assert_eq!(with_limits(None, Some(1000)).effective_frame_limit(), 1000);
        assert_eq!(with_limits(Some(64), None).effective_frame_limit(), 64);
        assert_eq!(
            with_limits(None, None).effective_frame_limit(),
            HARD_FRAME_LIMIT,
            "with both limits off a frame header still cannot claim any length"
        );
        assert_eq!(
            with_limits(None, None).effective_message_limit(),
            HARD_FRAME_LIMIT
        );
    }

    #[test]
    fn the_unread_budget_is_the_message_limit_or_16_mib() {
        assert_eq!(Settings::unread_budget(Some(4096)), 4096);
        assert_eq!(Settings::unread_budget(None), 16 << 20);
    }

    #[test]
    fn the_transit_budget_is_1_mib_or_the_message_limit_if_smaller() {
        assert_eq!(Settings::transit_budget(Some(4096)), 4096);
        assert_eq!(Settings::transit_budget(Some(16 << 20)), 1 << 20);
        assert_eq!(Settings::transit_budget(None), 1 << 20);
    }
}
