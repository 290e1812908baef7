//! Messages from the network core to an interpreter.  Each is turned into a
//! flat list for Perl by exports::pagi_rs_next_message; the numeric kinds
//! come from constants.def, as Bridge.pm's do.

use std::sync::Arc;

use bytes::Bytes;

use crate::exchange::Exchange;
use crate::scope::RequestScope;
use crate::websocket::session::Session;

pub enum ToPerl {
    /// A new HTTP request: build the scope and call the app.
    Request {
        exchange: Arc<Exchange>,
        scope: Box<RequestScope>,
        /// Set for a WebSocket handshake.
        session: Option<Arc<Session>>,
    },
    /// A WebSocket message (`websocket.receive`); `text` is valid UTF-8.
    WsReceive {
        id: u64,
        text: bool,
        data: Bytes,
    },
    /// The WebSocket ended (`websocket.disconnect`), once its transport closed.
    WsDisconnect {
        id: u64,
        ending: crate::websocket::session::Ending,
    },
    /// A chunk of request body (`http.request`), in the pieces it was read in.
    Body {
        id: u64,
        data: crate::body::BodyChunk,
        more: bool,
    },
    /// The request ended abnormally, with a standard reason string and
    /// maybe a detail (`disconnect_detail`).
    Disconnect {
        id: u64,
        reason: &'static str,
        detail: Option<String>,
    },
    /// The outbound buffer fell below the low-water mark after reaching the
    /// high one (sent only when a send waits or Perl has on_drain callbacks:
    /// `exchange::WaterMarks`).
    Drained {
        id: u64,
        /// A send waits for this drain; otherwise it is for on_drain only.
        settles_wait: bool,
    },
    /// A send that completes later (file, fh, fullflush) finished.
    SendDone {
        id: u64,
        error: Option<String>,
    },
    /// The response was handed to the network in full.
    Complete {
        id: u64,
    },
    /// Run the app's lifespan startup; `worker` is this worker process's
    /// number (1..N), None in a single process (the scope's `worker_num`).
    LifespanStartup {
        worker: Option<usize>,
    },
    LifespanShutdown,
    /// Nothing for Perl: its loop taking it proves the loop turns
    /// (`--heartbeat-timeout`); exports skips it.
    Ping,
    /// Leave the event loop; the interpreter is being shut down.
    Stop,
}

/// Numeric kinds, as seen by Perl (constants.def, group msg).
pub use super::constants::msg as kind;
