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
pub mod session;

use std::time::Duration;

/// Server-wide WebSocket settings (command-line options).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--max-ws-frame-size`: larger frames fail the connection with 1009.
    pub max_frame_size: Option<usize>,
    /// `--ws-idle-timeout`: no frame either way for this long closes it.
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the peer's reply to our Close frame.
    pub close_timeout: Duration,
    /// Messages read but not yet taken by the interpreter, per socket; past
    /// this the socket is not read (TCP pushes back on the client) until the
    /// interpreter catches up.  `--max-receive-queue` bounds what the app
    /// leaves unread on top of this.
    pub max_in_transit: usize,
}
