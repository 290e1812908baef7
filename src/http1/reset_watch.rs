//! Noticing a client that resets its connection while hyper is not reading.
//!
//! hyper reads a connection while a request is in flight only when it has
//! nothing buffered: that read is how a client leaving is seen at once.
//! Once a client pipelines, hyper holds the next head and reads nothing
//! until the response in flight is written, so an app that waits for the
//! disconnect without writing (a long poll) would never hear that its
//! client reset the connection.  A FIN there is a half-close and must wait
//! (README, "Half-close"); a reset is not, and the kernel reports it as an
//! error on the socket.  This watches a second descriptor of the socket for
//! that error alone, from the first pipelined request on: a connection that
//! never pipelines costs nothing.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::gate::Answers;

/// Resolves when the client has reset the connection, once it pipelined;
/// never when the socket cannot be watched.
pub async fn client_reset(fd: RawFd, answers: &Answers) {
    answers.pipelining_began().await;
    match watch(fd) {
        Ok(watch) => {
            // An error on the socket: nothing else sets it (a FIN does not).
            let _ = watch.ready(Interest::ERROR).await;
        }
        Err(e) => {
            tracing::debug!("cannot watch the connection for a reset: {e}");
            std::future::pending::<()>().await;
        }
    }
}

/// A second descriptor of the socket, registered for its errors alone.
fn watch(fd: RawFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is the connection's socket, which the connection task
    // owns and keeps open for as long as this future lives (it is polled
    // from that task's select and dropped with it).  The borrow is used
    // only to duplicate it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let own = borrowed.try_clone_to_owned()?;
    // SAFETY: `own` is a descriptor of our own, open until the AsyncFd
    // that owns it drops it, and its `as_raw_fd` never changes.
    unsafe { AsyncFd::register_with_interest(own, Interest::ERROR) }.map_err(|e| e.into_parts().1)
}
