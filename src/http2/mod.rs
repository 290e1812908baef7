//! HTTP/2 on the `h2` crate, beside `http1/` and in the same shape.
//!
//! - [`connection`]: serves one connection: the SETTINGS, the accept loop
//!   (its streams polled in the connection's own task), GOAWAY on shutdown,
//!   and the Rapid Reset defence.
//! - [`stream`]: one stream, one scope: the request goes to the
//!   protocol-neutral service layer (or the RFC 8441 handshake), and the
//!   response goes out under the stream's flow-control window.
//! - [`io`]: an h2 stream as a request body and as the byte stream under a
//!   WebSocket.
//!
//! Why `h2` directly rather than hyper's http2 server: hyper hides the
//! RST_STREAM error code (the application's `disconnect_detail` names it)
//! and the per-stream send window (`$send` waits on it), and it cannot tell
//! which streams a client resets to pace them.

pub mod connection;
pub mod io;
pub mod stream;

use std::time::Duration;

/// The client connection preface (RFC 9113 3.4) that opens h2c with prior
/// knowledge.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Server-wide HTTP/2 settings (command-line options `--h2-*`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--http2`: h2c with prior knowledge on cleartext connections.
    pub cleartext: bool,
    pub max_concurrent_streams: u32,
    pub initial_window_size: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    /// Rapid Reset defence: a token bucket of client stream resets.
    pub rst_burst: u32,
    pub rst_per_second: u32,
    /// `--timeout`: a connection with no open stream for this long is
    /// closed (GOAWAY).
    pub idle_timeout: Option<Duration>,
}

/// What the first bytes of a cleartext connection say it speaks.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http2,
    Http1,
    /// Not enough bytes yet to tell.
    Undecided,
}

/// Compare what has arrived with the preface: any difference means
/// HTTP/1.x (whose request line can never start like it).
pub fn sniff(prefix: &[u8]) -> Sniffed {
    let n = prefix.len().min(PREFACE.len());
    if prefix[..n] != PREFACE[..n] {
        Sniffed::Http1
    } else if n == PREFACE.len() {
        Sniffed::Http2
    } else {
        Sniffed::Undecided
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_decides_and_any_difference_is_http1() {
        assert_eq!(sniff(PREFACE), Sniffed::Http2);
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"),
            Sniffed::Http2
        );
        assert_eq!(sniff(b"PRI * HT"), Sniffed::Undecided);
        assert_eq!(sniff(b""), Sniffed::Undecided);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"P"), Sniffed::Undecided);
        assert_eq!(sniff(b"POST / HTTP/1.1"), Sniffed::Http1);
    }
}
