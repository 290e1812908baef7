//! HTTP/1.1 (and 1.0) through hyper's http1 server.
//!
//! - [`gate`]: a strict request-head parser in front of hyper: the limits
//!   (414/431), framing refusals (400/413/501), half-close, wire order.
//! - [`connection`]: serves one connection, sends each request to the
//!   service layer (or the RFC 6455 handshake), and says on the wire what
//!   HTTP/1.1 needs said about the connection.
//! - [`segments`]: under the gate, writes whole TCP segments while a
//!   response body streams in bulk.
//! - [`reset_watch`]: notices a client that resets its connection while a
//!   pipelined request keeps hyper from reading.
//!
//! `http2/` has the same shape for HTTP/2.

pub mod connection;
pub mod gate;
pub mod reset_watch;
pub mod segments;
