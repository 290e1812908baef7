//! The line between the master and each worker: a SOCK_SEQPACKET socket
//! pair, one message per packet.  The worker says when it is ready (its
//! lifespan startup completed) or failed, proves its interpreters are alive,
//! and asks to be replaced at `--max-requests`; the master tells it to stop,
//! to retire (others take over), or to stop at once.  Either side seeing the
//! other's end close knows it is gone.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::server::{Drain, Server};

/// What a worker tells the master.
#[derive(Debug, PartialEq, Eq)]
pub enum ToMaster {
    /// Lifespan startup completed: serving.
    Ready,
    /// Lifespan startup failed, with the app's message; the worker exits 2.
    Failed(String),
    /// Every interpreter's loop turned since the last beat.
    Beat,
    /// `--max-requests` reached: start my replacement, then retire me.
    Recycle,
}

/// What the master tells a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromMaster {
    /// The server stops (TERM/INT).
    Stop,
    /// Another worker took over this one's place.
    Retire,
    /// A second INT: stop now.
    Force,
}

impl ToMaster {
    fn encode(&self) -> Vec<u8> {
        match self {
            ToMaster::Ready => b"R".to_vec(),
            ToMaster::Failed(msg) => {
                let mut v = b"F".to_vec();
                // One packet; a message longer than this is cut.
                v.extend_from_slice(&msg.as_bytes()[..msg.len().min(32 * 1024)]);
                v
            }
            ToMaster::Beat => b"B".to_vec(),
            ToMaster::Recycle => b"Q".to_vec(),
        }
    }

    fn decode(packet: &[u8]) -> Option<ToMaster> {
        match packet.first()? {
            b'R' => Some(ToMaster::Ready),
            b'F' => Some(ToMaster::Failed(
                String::from_utf8_lossy(&packet[1..]).into_owned(),
            )),
            b'B' => Some(ToMaster::Beat),
            b'Q' => Some(ToMaster::Recycle),
            _ => None,
        }
    }
}

impl FromMaster {
    fn encode(self) -> &'static [u8] {
        match self {
            FromMaster::Stop => b"S",
            FromMaster::Retire => b"D",
            FromMaster::Force => b"K",
        }
    }

    fn decode(packet: &[u8]) -> Option<FromMaster> {
        match packet.first()? {
            b'S' => Some(FromMaster::Stop),
            b'D' => Some(FromMaster::Retire),
            b'K' => Some(FromMaster::Force),
            _ => None,
        }
    }
}

/// One end of the line.
pub struct Channel(OwnedFd);

/// What reading the line gave.
pub enum Received<T> {
    Message(T),
    /// Nothing (more) to read now.
    Empty,
    /// The other side is gone.
    Closed,
}

impl Channel {
    /// (master's end, worker's end); both close on exec and do not block.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array we own.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just created and are owned here.
        unsafe {
            Ok((
                Channel(OwnedFd::from_raw_fd(fds[0])),
                Channel(OwnedFd::from_raw_fd(fds[1])),
            ))
        }
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: sends bytes we own; MSG_NOSIGNAL: a gone peer is an
        // error, not SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn recv_packet(&self) -> Received<Vec<u8>> {
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: receives into a buffer we own, without blocking.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Received::Closed,
            n if n > 0 => {
                buf.truncate(n as usize);
                Received::Message(buf)
            }
            _ => match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Received::Empty,
                _ => Received::Closed,
            },
        }
    }

    /// The master's side.
    pub fn tell_worker(&self, msg: FromMaster) -> io::Result<()> {
        self.send_packet(msg.encode())
    }

    /// The master's side: the next message from the worker.
    pub fn next_from_worker(&self) -> Received<ToMaster> {
        loop {
            match self.recv_packet() {
                Received::Message(p) => match ToMaster::decode(&p) {
                    Some(m) => return Received::Message(m),
                    None => continue,
                },
                Received::Empty => return Received::Empty,
                Received::Closed => return Received::Closed,
            }
        }
    }

    /// The worker's side.  A full line (a master not reading) loses the
    /// message; the master acts on the worker's exit anyway.
    pub fn tell_master(&self, msg: &ToMaster) {
        if let Err(e) = self.send_packet(&msg.encode()) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                tracing::debug!("cannot reach the master: {e}");
            }
        }
    }

    /// The worker's side, read on the runtime: what the master asks, or
    /// `None` once the master is gone.
    pub fn into_async(self) -> io::Result<AsyncChannel> {
        // SAFETY: the channel owns its descriptor, which stays open and the
        // same for as long as it lives, inside the AsyncFd.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)?
        };
        Ok(AsyncChannel(fd))
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

pub struct AsyncChannel(tokio::io::unix::AsyncFd<Channel>);

impl AsyncChannel {
    pub fn channel(&self) -> &Channel {
        self.0.get_ref()
    }

    /// The master's next order; `None` when the master is gone.
    pub async fn recv(&self) -> Option<FromMaster> {
        loop {
            let Ok(mut ready) = self.0.readable().await else {
                return None;
            };
            match ready.get_inner().recv_packet() {
                Received::Message(p) => {
                    if let Some(m) = FromMaster::decode(&p) {
                        return Some(m);
                    }
                }
                Received::Empty => ready.clear_ready(),
                Received::Closed => return None,
            }
        }
    }
}

/// How a worker learns that it should stop, and how: orders from the
/// master, its own signals (a TERM or INT sent to the worker itself, e.g.
/// by systemd to the whole group), the master going away, and its
/// `--max-requests`.  Resolves to the first drain asked for; a second INT
/// or the master's `Force` afterwards is reported through `force`.
pub struct Orders {
    pub channel: Arc<AsyncChannel>,
    pub force: Arc<tokio::sync::Notify>,
}

impl Orders {
    /// Wait for the order to drain.  `recycle` resolves when this worker's
    /// `--max-requests` is reached: the master is asked for a replacement,
    /// and retires this worker once it is ready.
    pub async fn drain(
        &self,
        signals: &crate::signals::AsyncSignals,
        recycle: impl std::future::Future<Output = ()>,
    ) -> Drain {
        tokio::pin!(recycle);
        let mut recycle_asked = false;
        let drain = loop {
            tokio::select! {
                order = self.channel.recv() => match order {
                    Some(FromMaster::Stop) => break Drain::Stop,
                    Some(FromMaster::Retire) => break Drain::Retire,
                    Some(FromMaster::Force) => {
                        self.force.notify_one();
                        break Drain::Stop;
                    }
                    None => {
                        tracing::warn!("the master process is gone: stopping");
                        break Drain::Stop;
                    }
                },
                sig = signals.recv() => match sig {
                    libc::SIGTERM | libc::SIGINT => {
                        tracing::info!("Received {}, shutting down", crate::signals::name(sig));
                        break Drain::Stop;
                    }
                    // The master's signals, sent to the whole group: the
                    // master acts on them.
                    _ => {}
                },
                _ = &mut recycle, if !recycle_asked => {
                    recycle_asked = true;
                    tracing::info!("--max-requests reached: asking the master for a replacement");
                    self.channel.channel().tell_master(&ToMaster::Recycle);
                }
            }
        };
        // Keep listening: a second INT, or the master's Force, stops now.
        let (channel, force) = (self.channel.clone(), self.force.clone());
        tokio::spawn(async move {
            while let Some(order) = channel.recv().await {
                if order == FromMaster::Force {
                    force.notify_one();
                }
            }
        });
        drain
    }
}

/// `--heartbeat-timeout`: every `interval`, tell the master the worker is
/// alive if every interpreter's loop took the previous ping.  A loop stuck
/// in application code stops the beats, and the master replaces the worker.
pub fn spawn_heartbeat(server: Arc<Server>, channel: Arc<AsyncChannel>, interval: Duration) {
    tokio::spawn(async move {
        let mut marks = server.pool.ping();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if server.pool.alive_since(&marks) {
                channel.channel().tell_master(&ToMaster::Beat);
                marks = server.pool.ping();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_the_line_whole_and_a_closed_end_is_seen() {
        let (master, worker) = Channel::pair().unwrap();
        worker.tell_master(&ToMaster::Ready);
        worker.tell_master(&ToMaster::Failed("the database is on fire".into()));
        worker.tell_master(&ToMaster::Beat);
        worker.tell_master(&ToMaster::Recycle);
        let mut got = Vec::new();
        while let Received::Message(m) = master.next_from_worker() {
            got.push(m);
        }
        assert_eq!(
            got,
            vec![
                ToMaster::Ready,
                ToMaster::Failed("the database is on fire".into()),
                ToMaster::Beat,
                ToMaster::Recycle
            ]
        );
        master.tell_worker(FromMaster::Retire).unwrap();
        match worker.recv_packet() {
            Received::Message(p) => assert_eq!(FromMaster::decode(&p), Some(FromMaster::Retire)),
            _ => panic!("the order did not arrive"),
        }
        drop(worker);
        assert!(matches!(master.next_from_worker(), Received::Closed));
    }
}
