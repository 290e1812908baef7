//! Typed errors of the core.  `SendError` is what a failed `$send` Future
//! carries back to the application; its text is the exception message.

use thiserror::Error;

/// Why an application's `$send` was refused.  Nothing reaches the wire when
/// one of these is returned (fail, don't mutate).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SendError {
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("invalid header: {0}")]
    Header(String),
    #[error("out of sequence: {0}")]
    Sequence(&'static str),
    #[error("cannot send file: {0}")]
    File(String),
    /// Too much is already queued toward a peer that is not reading.
    #[error("send queue full: {0}")]
    Backlog(String),
}

/// Startup failures, reported at the edge with context.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error("{0}")]
    AppLoad(String),
    #[error("lifespan startup failed: {0}")]
    LifespanFailed(String),
    #[error("lifespan startup timed out after {0}s")]
    LifespanTimeout(u64),
    #[error("interpreter failed: {0}")]
    Interpreter(String),
    /// The Perl side could not be set up before the app's own code ran: a
    /// module the bridge needs, or the `-l` event loop.
    #[error("{0}")]
    Bridge(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Listen(#[from] crate::listen::ListenError),
    /// Daemonizing, privileges, signals, the pid file, an inherited socket.
    #[error("{0}")]
    Process(String),
}
