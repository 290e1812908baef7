//! Each worker's own accept queue: `--reuseport` with worker processes.
//!
//! Without it every worker accepts from the sockets the master bound: a
//! new connection wakes every worker, and the one that gets there first
//! takes it.  With it, each TCP address the master bound gets one
//! SO_REUSEPORT socket per worker slot; the kernel spreads new connections
//! over them by a hash of their addresses, and each worker accepts from its
//! own only (as the reference server's workers do).
//!
//! The master binds the queues and holds every one, so:
//! - a queue outlives its worker: the replacement of a worker that
//!   crashed, reached `--max-requests` or was rolled by HUP accepts what
//!   waited in it (closing it would reset those connections);
//! - they are bound before `--user`/`--group` drops privileges, so a port
//!   below 1024 works;
//! - a binary upgrade (USR2) hands them all to the new master.
//!
//! A queue that no worker will serve soon is closed, since what the kernel
//! puts in it would wait for nothing: its slot failed lifespan startup, is
//! in a crash loop's delay, or was removed by TTOU.  Closing resets the
//! connections waiting in it, unless Linux's `net.ipv4.tcp_migrate_req`
//! moves them to another queue.  The last queue of an address is never
//! closed.  A slot without a queue binds a new one when its worker starts;
//! when the kernel refuses (after `--user`, a socket of another user cannot
//! join the group), the worker shares another slot's queue.
//!
//! Unix sockets, and sockets systemd passed in, stay shared: a socket file
//! has one queue, and systemd's socket is the one that outlives restarts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::listen::{BoundListener, ListenError, Listening, Origin};

/// The variable a binary upgrade's new master reads the old one's queues
/// from: `FD:FD,FD;FD:FD` — for each listener passed in `PAGI_RS_INHERIT`
/// (by its descriptor), its other queues' descriptors.
pub const INHERIT_QUEUES_VAR: &str = "PAGI_RS_INHERIT_QUEUES";

/// The sockets the workers accept from, one entry per listener in the
/// order they were given.
#[derive(Default)]
pub struct AcceptQueues {
    entries: Vec<Entry>,
    backlog: u32,
}

enum Entry {
    /// Every worker accepts from this socket.
    Shared(BoundListener),
    /// One queue per worker slot at `local`; `None` where it is closed.
    PerSlot {
        local: SocketAddr,
        queues: Vec<Option<BoundListener>>,
        /// Slots already warned that they share another's queue.
        warned: Vec<usize>,
    },
}

/// The queues a binary upgrade passed in, by the descriptor of the
/// listener they belong to.
pub type InheritedQueues = HashMap<RawFd, Vec<BoundListener>>;

impl AcceptQueues {
    /// Every listener shared by every worker (no `--reuseport`, or one
    /// process).
    pub fn shared(listeners: Vec<BoundListener>) -> AcceptQueues {
        AcceptQueues {
            entries: listeners.into_iter().map(Entry::Shared).collect(),
            backlog: 0,
        }
    }

    /// A queue for each of `slots` workers at every TCP address bound here
    /// (or passed by a binary upgrade together with its queues); every
    /// other listener shared.  A queue that cannot be bound now is an
    /// error: this runs before the server starts.
    pub fn per_worker(
        listeners: Vec<BoundListener>,
        slots: usize,
        backlog: u32,
        mut inherited: InheritedQueues,
    ) -> Result<AcceptQueues, ListenError> {
        let mut entries = Vec::with_capacity(listeners.len());
        for listener in listeners {
            let local = match &listener.socket {
                Listening::Tcp { local, .. } => *local,
                Listening::Unix { .. } => {
                    entries.push(Entry::Shared(listener));
                    continue;
                }
            };
            let mut queues = match listener.origin {
                Origin::Bound => vec![Some(listener)],
                Origin::Upgrade { fd } if inherited.contains_key(&fd) => {
                    let more = inherited.remove(&fd).unwrap_or_default();
                    std::iter::once(listener).chain(more).map(Some).collect()
                }
                Origin::Upgrade { .. } | Origin::Systemd { .. } => {
                    entries.push(Entry::Shared(listener));
                    continue;
                }
            };
            if queues.len() > slots {
                // The old master ran more workers: their queues would
                // wait for nobody.
                tracing::info!(
                    "{local}: closing {} accept queues the previous master's workers used",
                    queues.len() - slots
                );
                queues.truncate(slots);
            }
            while queues.len() < slots {
                let queue = crate::listen::bind_queue(local, backlog).map_err(|source| {
                    ListenError::Bind {
                        addr: format!("{local} (a worker's own accept queue, --reuseport)"),
                        source,
                    }
                })?;
                queues.push(Some(queue));
            }
            entries.push(Entry::PerSlot {
                local,
                queues,
                warned: Vec::new(),
            });
        }
        Ok(AcceptQueues { entries, backlog })
    }

    /// How many addresses have a queue per worker.
    pub fn per_worker_addresses(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, Entry::PerSlot { .. }))
            .count()
    }

    /// Before `slot`'s worker starts: give it a queue of its own where it
    /// has none, or say that it shares one.
    pub fn ensure(&mut self, slot: usize) {
        let backlog = self.backlog;
        for entry in &mut self.entries {
            let Entry::PerSlot {
                local,
                queues,
                warned,
            } = entry
            else {
                continue;
            };
            if queues.len() <= slot {
                queues.resize_with(slot + 1, || None);
            }
            if queues[slot].is_some() {
                continue;
            }
            match crate::listen::bind_queue(*local, backlog) {
                Ok(queue) => {
                    queues[slot] = Some(queue);
                    warned.retain(|s| *s != slot);
                }
                Err(e) if !warned.contains(&slot) => {
                    warned.push(slot);
                    tracing::warn!(
                        "{local}: worker {} shares another worker's accept queue: cannot bind its own: {e}",
                        slot + 1
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// `slot` will have no worker for a while (or ever): close its queues,
    /// unless one is the last open queue of its address.
    pub fn close(&mut self, slot: usize) {
        for entry in &mut self.entries {
            let Entry::PerSlot { local, queues, .. } = entry else {
                continue;
            };
            let open = queues.iter().filter(|q| q.is_some()).count();
            if open > 1 {
                if let Some(queue) = queues.get_mut(slot).and_then(Option::take) {
                    tracing::debug!("{local}: closed worker {}'s accept queue", slot + 1);
                    drop(queue);
                }
            }
        }
    }

    /// In `slot`'s worker, after the fork: the listeners it serves, in
    /// order (its own queue, else the first open one), closing the rest.
    pub fn for_worker(self, slot: usize) -> Vec<BoundListener> {
        self.entries
            .into_iter()
            .filter_map(|entry| match entry {
                Entry::Shared(listener) => Some(listener),
                Entry::PerSlot { mut queues, .. } => {
                    let own = queues.get_mut(slot).and_then(Option::take);
                    own.or_else(|| queues.into_iter().flatten().next())
                }
            })
            .collect()
    }

    /// The listeners of a single process (no workers): all of them.
    pub fn into_listeners(self) -> Vec<BoundListener> {
        self.for_worker(0)
    }

    /// What a binary upgrade passes to the new master: one descriptor per
    /// listener (for `PAGI_RS_INHERIT`), the value of
    /// [`INHERIT_QUEUES_VAR`] (empty when there are no queues), and every
    /// descriptor to leave open across the exec.
    pub fn for_upgrade(&self) -> (Vec<RawFd>, String, Vec<RawFd>) {
        let mut listeners = Vec::new();
        let mut queues_var = Vec::new();
        let mut all = Vec::new();
        for entry in &self.entries {
            match entry {
                Entry::Shared(listener) => listeners.push(listener.fd()),
                Entry::PerSlot { queues, .. } => {
                    let mut open = queues.iter().flatten().map(BoundListener::fd);
                    // One is open at least: the last is never closed.
                    let Some(first) = open.next() else { continue };
                    listeners.push(first);
                    let rest: Vec<RawFd> = open.collect();
                    if !rest.is_empty() {
                        queues_var.push(format!("{first}:{}", join(&rest)));
                        all.extend(&rest);
                    }
                }
            }
        }
        all.extend(&listeners);
        (listeners, queues_var.join(";"), all)
    }
}

fn join(fds: &[RawFd]) -> String {
    fds.iter()
        .map(RawFd::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// [`INHERIT_QUEUES_VAR`]'s value: for each listener's descriptor, its
/// queues' descriptors.
pub fn parse_inherited(value: &str) -> Result<Vec<(RawFd, Vec<RawFd>)>, String> {
    let fd = |s: &str| {
        s.trim()
            .parse::<RawFd>()
            .ok()
            .filter(|fd| *fd > 2)
            .ok_or_else(|| format!("{s:?} is not a descriptor"))
    };
    value
        .split(';')
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (listener, queues) = item
                .split_once(':')
                .ok_or_else(|| format!("{item:?} is not LISTENER:QUEUE,..."))?;
            let queues = queues.split(',').map(fd).collect::<Result<Vec<_>, _>>()?;
            Ok((fd(listener)?, queues))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::fd::AsRawFd;

    /// A listener with SO_REUSEPORT at a port the kernel picks on a
    /// loopback address of the test's own: picking a port for a socket
    /// with SO_REUSEPORT, the kernel may hand out one that another such
    /// socket of this user holds, joining the two tests' groups.
    fn loopback_listener(test: u8) -> BoundListener {
        let addr = SocketAddr::from(([127, 47, 0, test], 0));
        crate::listen::bind_queue(addr, 16).unwrap()
    }

    fn local(l: &BoundListener) -> SocketAddr {
        match &l.socket {
            Listening::Tcp { local, .. } => *local,
            Listening::Unix { .. } => unreachable!("a TCP listener"),
        }
    }

    fn unix_listener() -> BoundListener {
        let path =
            std::env::temp_dir().join(format!("pagi-queues-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        BoundListener {
            socket: Listening::Unix {
                listener: std::os::unix::net::UnixListener::bind(&path).unwrap(),
                path,
            },
            origin: Origin::Bound,
        }
    }

    #[test]
    fn each_slot_gets_a_socket_of_its_own_at_the_same_address() {
        let first = loopback_listener(1);
        let addr = local(&first);
        let queues = AcceptQueues::per_worker(vec![first], 3, 16, HashMap::new()).unwrap();
        assert_eq!(queues.per_worker_addresses(), 1);
        let (inherit, var, all) = queues.for_upgrade();
        assert_eq!(inherit.len(), 1);
        assert_eq!(all.len(), 3, "every queue is passed on: {var}");
        assert_eq!(parse_inherited(&var).unwrap()[0].1.len(), 2);
        let mut queues = queues;
        for slot in 0..3 {
            queues.ensure(slot);
        }
        assert_eq!(queues.for_upgrade().2.len(), 3, "ensure binds nothing more");
        let AcceptQueues { entries, .. } = queues;
        let mut fds = HashSet::new();
        let Entry::PerSlot { queues, .. } = &entries[0] else {
            panic!("a TCP listener bound here gets queues");
        };
        for q in queues.iter().flatten() {
            assert_eq!(local(q), addr);
            fds.insert(q.fd());
        }
        assert_eq!(fds.len(), 3, "three sockets, not one shared");
    }

    #[test]
    fn a_worker_takes_its_own_queue_and_closes_the_others() {
        let first = loopback_listener(2);
        let queues = AcceptQueues::per_worker(vec![first], 2, 16, HashMap::new()).unwrap();
        let (_, var, _) = queues.for_upgrade();
        let second_fd = parse_inherited(&var).unwrap()[0].1[0];
        let mine = queues.for_worker(1);
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].fd(), second_fd, "slot 1 gets the second queue");
    }

    #[test]
    fn closing_keeps_the_last_queue_and_a_slot_without_one_shares() {
        let first = loopback_listener(3);
        let first_fd = first.fd();
        let mut queues = AcceptQueues::per_worker(vec![first], 2, 16, HashMap::new()).unwrap();
        queues.close(1);
        queues.close(0);
        let (inherit, var, _) = queues.for_upgrade();
        assert_eq!(inherit, vec![first_fd], "the last queue stays open");
        assert_eq!(var, "", "no other queue is left");
        // Slot 1 lost its queue; its worker takes the one left.
        assert_eq!(queues.for_worker(1)[0].fd(), first_fd);
    }

    #[test]
    fn a_closed_queue_is_bound_again_when_its_slot_starts() {
        let first = loopback_listener(4);
        let mut queues = AcceptQueues::per_worker(vec![first], 2, 16, HashMap::new()).unwrap();
        queues.close(1);
        assert_eq!(queues.for_upgrade().2.len(), 1);
        queues.ensure(1);
        queues.ensure(2);
        assert_eq!(queues.for_upgrade().2.len(), 3, "slots 1 and 2 bound");
    }

    #[test]
    fn unix_and_systemd_listeners_stay_shared() {
        let unix = unix_listener();
        let mut from_systemd = loopback_listener(5);
        from_systemd.origin = Origin::Systemd {
            fd: from_systemd.fd(),
            name: None,
        };
        let fds = vec![unix.fd(), from_systemd.fd()];
        let queues =
            AcceptQueues::per_worker(vec![unix, from_systemd], 3, 16, HashMap::new()).unwrap();
        assert_eq!(queues.per_worker_addresses(), 0);
        let (inherit, var, _) = queues.for_upgrade();
        assert_eq!((inherit, var.as_str()), (fds.clone(), ""));
        let mine: Vec<RawFd> = queues.for_worker(2).iter().map(|l| l.fd()).collect();
        assert_eq!(mine, fds);
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("pagi-queues-test-{}.sock", std::process::id())),
        );
    }

    #[test]
    fn an_upgrade_takes_over_the_old_masters_queues() {
        let first = loopback_listener(6);
        let addr = local(&first);
        let second = crate::listen::bind_queue(addr, 16).unwrap();
        let third = crate::listen::bind_queue(addr, 16).unwrap();
        let (second_fd, third_fd) = (second.fd(), third.fd());
        let mut passed = first;
        passed.origin = Origin::Upgrade { fd: passed.fd() };
        let inherited = HashMap::from([(passed.fd(), vec![second, third])]);
        // The new master runs two workers: the third queue is closed.
        let queues = AcceptQueues::per_worker(vec![passed], 2, 16, inherited).unwrap();
        let (_, var, all) = queues.for_upgrade();
        assert_eq!(all.len(), 2);
        assert_eq!(parse_inherited(&var).unwrap()[0].1, vec![second_fd]);
        assert!(!all.contains(&third_fd));
    }

    #[test]
    fn the_upgrade_variable_is_read_strictly() {
        assert_eq!(
            parse_inherited("3:7,8;4:9").unwrap(),
            vec![(3, vec![7, 8]), (4, vec![9])]
        );
        assert_eq!(parse_inherited("").unwrap(), vec![]);
        for bad in ["3", "3:", "x:7", "3:7,y", "1:7", "3:2"] {
            assert!(parse_inherited(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_kernel_spreads_connections_over_the_queues() {
        let first = loopback_listener(7);
        let addr = local(&first);
        let queues = AcceptQueues::per_worker(vec![first], 2, 64, HashMap::new()).unwrap();
        let AcceptQueues { entries, .. } = queues;
        let Entry::PerSlot { queues, .. } = entries.into_iter().next().unwrap() else {
            panic!("a TCP listener bound here gets queues");
        };
        let sockets: Vec<std::net::TcpListener> = queues
            .into_iter()
            .flatten()
            .map(|q| match q.socket {
                Listening::Tcp { listener, .. } => listener,
                Listening::Unix { .. } => unreachable!(),
            })
            .collect();
        let clients: Vec<_> = (0..16)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut accepted = [0usize; 2];
        for (i, s) in sockets.iter().enumerate() {
            while s.accept().is_ok() {
                accepted[i] += 1;
            }
        }
        assert_eq!(accepted[0] + accepted[1], clients.len());
        assert!(
            accepted.iter().all(|n| *n > 0),
            "both queues took connections: {accepted:?} (fd {})",
            sockets[0].as_raw_fd()
        );
    }
}
