//! The master process (`-w N` above 1, or `--max-requests`).
//!
//! It binds the listeners and loads the app once, on its main thread, then
//! forks the workers before any other thread exists in it, so that the
//! loaded code is shared copy-on-write.  It stays single-threaded and runs
//! no app code: one poll loop over its signal pipe and one line per worker
//! (see `worker`), with waitpid for exits.  What it does:
//!
//! - keeps `target` workers: a worker that crashes is started again (at
//!   once, then with a growing delay while the same slot keeps dying within
//!   seconds of starting); one whose lifespan startup failed (exit 2) is
//!   not, and if none is left the master exits 1 with the app's message;
//! - `--heartbeat-timeout`: kills (SIGKILL) and replaces a worker whose
//!   interpreter stopped proving that its loop turns;
//! - TERM/INT: tells every worker to stop (`--shutdown-timeout` each); a
//!   second INT stops them at once;
//! - HUP: reads the TLS files again (a renewed certificate), starts a new
//!   generation of workers from the loaded app and retires the old ones
//!   only when every new one finished its lifespan startup (if one fails,
//!   the new generation goes and the old one stays);
//! - TTIN/TTOU: one worker more or less (never below one);
//! - `--max-requests`: a worker that reached it gets a replacement, and
//!   retires once the replacement is ready;
//! - USR2: binary upgrade: runs the current binary again with the listening
//!   sockets (PAGI_RS_INHERIT), and retires its own workers and exits once
//!   the new master reports that its workers are ready;
//! - `--reuseport`: keeps each slot's own accept queue (`accept_queues`),
//!   closing it while the slot has no worker to come.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::accept_queues::{self, AcceptQueues, InheritedQueues, INHERIT_QUEUES_VAR};
use crate::error::StartupError;
use crate::interp::Loaded;
use crate::serving::{self, Prepared, Role};
use crate::signals::{self, SignalPipe};
use crate::worker::{Channel, FromMaster, Received, ToMaster};
use crate::{interp, process};

/// Environment variables of a binary upgrade (USR2), read by the new master:
/// the listening descriptors it inherits (comma-separated, in the order of
/// the listeners), where to report that it is ready, and the old master's
/// pid (its pid file is taken over, not refused).
pub const INHERIT_VAR: &str = "PAGI_RS_INHERIT";
pub const UPGRADE_FD_VAR: &str = "PAGI_RS_UPGRADE_FD";
pub const UPGRADE_FROM_VAR: &str = "PAGI_RS_UPGRADE_FROM";

/// A worker that dies within this long of starting counts as a quick exit;
/// quick exits in a row delay the next start (a crash loop).
const QUICK_EXIT: Duration = Duration::from_secs(5);
/// The longest delay between starts of a crash-looping slot.
const MAX_RESPAWN_DELAY: Duration = Duration::from_secs(30);
/// How long a forced stop (a second INT) may take before SIGKILL.
const FORCE_BOUND: Duration = Duration::from_secs(3);

/// The workers' signals that the master handles.
const MASTER_SIGNALS: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGUSR2,
    libc::SIGCHLD,
];

/// What a binary upgrade's new master inherited from the old one.
pub struct Inherited {
    pub listeners: Vec<crate::listen::BoundListener>,
    /// The workers' own accept queues (`--reuseport`), by listener.
    pub queues: InheritedQueues,
    pub old_master: Option<u32>,
}

impl Inherited {
    /// Read and remove the upgrade variables (before any thread exists:
    /// they must not reach the workers or anything the app runs).
    pub fn from_env() -> Result<Option<Inherited>, StartupError> {
        let Some(list) = std::env::var_os(INHERIT_VAR) else {
            return Ok(None);
        };
        let report = std::env::var_os(UPGRADE_FD_VAR);
        let from = std::env::var_os(UPGRADE_FROM_VAR);
        let queue_list = std::env::var_os(INHERIT_QUEUES_VAR);
        std::env::remove_var(INHERIT_VAR);
        std::env::remove_var(UPGRADE_FD_VAR);
        std::env::remove_var(UPGRADE_FROM_VAR);
        std::env::remove_var(INHERIT_QUEUES_VAR);
        let bad = |what: String| StartupError::Process(format!("{INHERIT_VAR}: {what}"));
        // The old master handed each descriptor to this process to own;
        // adopt checks that it is a listening stream socket.
        let take = |fd: RawFd| {
            set_cloexec(fd, true);
            let mut listener = crate::listen::adopt(fd, None).map_err(|e| bad(e.to_string()))?;
            listener.origin = crate::listen::Origin::Upgrade { fd };
            Ok::<_, StartupError>(listener)
        };
        let mut listeners = Vec::new();
        for item in list.to_string_lossy().split(',').filter(|s| !s.is_empty()) {
            let fd: RawFd = item
                .parse()
                .map_err(|_| bad(format!("{item:?} is not a descriptor")))?;
            listeners.push(take(fd)?);
        }
        if listeners.is_empty() {
            return Err(bad("no descriptors".into()));
        }
        let mut queues = InheritedQueues::new();
        let queue_list = queue_list.map(|v| v.to_string_lossy().into_owned());
        for (listener, fds) in
            accept_queues::parse_inherited(queue_list.as_deref().unwrap_or(""))
                .map_err(|e| StartupError::Process(format!("{INHERIT_QUEUES_VAR}: {e}")))?
        {
            queues.insert(
                listener,
                fds.into_iter().map(take).collect::<Result<_, _>>()?,
            );
        }
        if let Some(fd) = report
            .and_then(|v| v.to_str().and_then(|s| s.parse::<RawFd>().ok()))
            .filter(|fd| *fd > 2)
        {
            set_cloexec(fd, true);
            // SAFETY: handed to this process to own, for the ready report.
            process::set_upgrade_waiter(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(Some(Inherited {
            listeners,
            queues,
            old_master: from.and_then(|v| v.to_str().and_then(|s| s.parse().ok())),
        }))
    }
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor of this process changes only its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Forked; lifespan startup running.
    Starting,
    Ready,
    /// Told to retire: another worker has its place.
    Retiring,
    /// Told to stop: the server is stopping (or its generation was dropped).
    Stopping,
}

struct Worker {
    pid: libc::pid_t,
    slot: usize,
    generation: u64,
    channel: Channel,
    state: State,
    started: Instant,
    last_beat: Instant,
    /// Asked for a replacement (`--max-requests`): it retires when that is ready.
    recycling: bool,
    /// The app's message, if its lifespan startup failed.
    failure: Option<String>,
    /// SIGKILL was sent (heartbeat, or a stop that took too long).
    killed: bool,
    /// When a stop or retirement must be over (else SIGKILL).
    deadline: Option<Instant>,
}

impl Worker {
    /// On its way out: it no longer holds its slot.
    fn leaving(&self) -> bool {
        matches!(self.state, State::Retiring | State::Stopping) || self.recycling
    }
}

#[derive(Default)]
struct Slot {
    /// Its worker failed lifespan startup (the app's message): not restarted
    /// until HUP or TTIN.
    disabled: Option<String>,
    /// Quick exits in a row (see QUICK_EXIT).
    quick_exits: u32,
    /// Not started again before this.
    respawn_at: Option<Instant>,
}

struct Upgrade {
    pid: libc::pid_t,
    ready: std::fs::File,
}

struct Master {
    prepared: Prepared,
    template: Option<Loaded>,
    /// What each worker accepts from (all shared without `--reuseport`).
    queues: AcceptQueues,
    /// The listeners as the startup line names them.
    shown: Vec<String>,
    signals: SignalPipe,
    saved: Vec<signals::Saved>,
    workers: Vec<Worker>,
    slots: Vec<Slot>,
    target: usize,
    generation: u64,
    /// HUP in progress: the generation being replaced.
    roll_from: Option<u64>,
    stopping: bool,
    forced: bool,
    announced: bool,
    upgrade: Option<Upgrade>,
    exe: PathBuf,
    argv: Vec<OsString>,
    cwd: Option<PathBuf>,
    /// A worker's deadline after Stop or Retire: the drain, lifespan
    /// shutdown, and the interpreters' stop, with room to spare.
    stop_bound: Duration,
    heartbeat: Option<Duration>,
    jitter_seed: u64,
}

/// Run the master until the server stops.
pub fn run(
    prepared: Prepared,
    template: Loaded,
    queues: AcceptQueues,
    shown: Vec<String>,
) -> Result<(), StartupError> {
    let signals = SignalPipe::open(&MASTER_SIGNALS)
        .map_err(|e| StartupError::Process(format!("cannot set up signals: {e}")))?;
    let mut saved = Vec::new();
    for sig in MASTER_SIGNALS {
        saved.push(
            signals::take_over(sig)
                .map_err(|e| StartupError::Process(format!("cannot handle signals: {e}")))?,
        );
    }
    let opts = &prepared.opts;
    let grace = Duration::from_secs(opts.shutdown_timeout);
    let mut master = Master {
        target: opts.workers.max(1),
        heartbeat: (opts.heartbeat_timeout > 0)
            .then(|| Duration::from_secs(opts.heartbeat_timeout)),
        stop_bound: grace * 2 + Duration::from_secs(10),
        prepared,
        template: Some(template),
        queues,
        shown,
        signals,
        saved,
        workers: Vec::new(),
        slots: Vec::new(),
        generation: 1,
        roll_from: None,
        stopping: false,
        forced: false,
        announced: false,
        upgrade: None,
        exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        argv: std::env::args_os().collect(),
        cwd: std::env::current_dir().ok(),
        jitter_seed: u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
    };
    master.slots.resize_with(master.target, Slot::default);
    master.reconcile();
    master.run()
}

impl Master {
    fn run(&mut self) -> Result<(), StartupError> {
        loop {
            self.wait_for_events();
            for sig in self.signals.drain() {
                self.on_signal(sig);
            }
            self.read_workers();
            self.read_upgrade();
            self.reap();
            self.check_deadlines();
            if let Some(failure) = self.all_failed() {
                self.stop_all(FromMaster::Stop);
                self.wait_all_gone();
                return Err(StartupError::LifespanFailed(failure));
            }
            // Also when a slot gave up (startup failed) after the others
            // became ready.
            if !self.stopping {
                self.announce_if_ready();
            }
            if self.stopping && self.workers.is_empty() {
                tracing::info!("Shutdown complete");
                return Ok(());
            }
            self.reconcile();
        }
    }

    fn wait_for_events(&self) {
        let mut fds = vec![libc::pollfd {
            fd: self.signals.read_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for w in &self.workers {
            fds.push(libc::pollfd {
                fd: w.channel.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(u) = &self.upgrade {
            fds.push(libc::pollfd {
                fd: u.ready.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Timers (heartbeats, delayed starts, deadlines) are checked on each
        // wake-up; a fifth of a second is precise enough for all of them.
        // SAFETY: poll reads and writes the array of pollfd we own.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
    }

    // ---- signals ---------------------------------------------------------------

    fn on_signal(&mut self, sig: libc::c_int) {
        match sig {
            libc::SIGCHLD => {}
            libc::SIGTERM | libc::SIGINT if !self.stopping => {
                tracing::info!("Received {}, shutting down", signals::name(sig));
                self.stopping = true;
                self.roll_from = None;
                self.stop_all(FromMaster::Stop);
            }
            libc::SIGINT if !self.forced => {
                tracing::warn!("Received INT again: stopping the workers now");
                self.forced = true;
                let deadline = Instant::now() + FORCE_BOUND;
                for w in &mut self.workers {
                    let _ = w.channel.tell_worker(FromMaster::Force);
                    w.deadline = Some(w.deadline.map_or(deadline, |d| d.min(deadline)));
                }
            }
            libc::SIGHUP if !self.stopping => self.begin_roll(),
            libc::SIGTTIN if !self.stopping => {
                self.target += 1;
                if self.slots.len() < self.target {
                    self.slots.resize_with(self.target, Slot::default);
                }
                self.slots[self.target - 1] = Slot::default();
                tracing::info!("Received TTIN: {} workers", self.target);
            }
            libc::SIGTTOU if !self.stopping => {
                if self.target <= 1 {
                    tracing::info!("Received TTOU: ignored, one worker is the minimum");
                    return;
                }
                self.target -= 1;
                let slot = self.target;
                tracing::info!("Received TTOU: {} workers", self.target);
                self.retire_where(|w| w.slot == slot);
                self.queues.close(slot);
            }
            libc::SIGUSR2 if !self.stopping => self.begin_upgrade(),
            _ => tracing::info!("Received {}: ignored while stopping", signals::name(sig)),
        }
    }

    fn stop_all(&mut self, order: FromMaster) {
        let deadline = Instant::now() + self.stop_bound;
        for w in &mut self.workers {
            if w.state != State::Stopping {
                let _ = w.channel.tell_worker(order);
                w.state = State::Stopping;
                w.deadline = Some(deadline);
            }
        }
    }

    fn retire_where(&mut self, which: impl Fn(&Worker) -> bool) {
        let deadline = Instant::now() + self.stop_bound;
        for w in &mut self.workers {
            if which(w) && !matches!(w.state, State::Retiring | State::Stopping) {
                // One that has not finished starting has nothing to hand
                // over: it stops.
                let order = if w.state == State::Starting {
                    FromMaster::Stop
                } else {
                    FromMaster::Retire
                };
                let _ = w.channel.tell_worker(order);
                w.state = if order == FromMaster::Stop {
                    State::Stopping
                } else {
                    State::Retiring
                };
                w.deadline = Some(deadline);
            }
        }
    }

    /// HUP: a new generation from the loaded app, then the old one retires.
    fn begin_roll(&mut self) {
        if self.roll_from.is_some() {
            tracing::info!("Received HUP: ignored, a restart is already in progress");
            return;
        }
        // Before the fork: the new workers take the master's configuration.
        crate::serving::reload_tls_on_hup(self.prepared.tls.as_deref(), "the new workers use it");
        tracing::info!(
            "Received HUP: starting {} new workers; the old ones retire when they are ready",
            self.target
        );
        for slot in &mut self.slots {
            *slot = Slot::default();
        }
        self.roll_from = Some(self.generation);
        self.generation += 1;
    }

    /// USR2: run the binary again with the listening sockets.
    fn begin_upgrade(&mut self) {
        if self.upgrade.is_some() {
            tracing::info!("Received USR2: ignored, an upgrade is already in progress");
            return;
        }
        match self.spawn_new_master() {
            Ok(upgrade) => {
                tracing::info!(
                    "Received USR2: started a new master (pid {}); this one retires when its workers are ready",
                    upgrade.pid
                );
                self.upgrade = Some(upgrade);
            }
            Err(e) => tracing::error!("Received USR2: cannot start a new master: {e}"),
        }
    }

    fn spawn_new_master(&self) -> std::io::Result<Upgrade> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (listeners, queue_list, mut passed) = self.queues.for_upgrade();
        let list = listeners
            .iter()
            .map(|fd| fd.to_string())
            .collect::<Vec<_>>()
            .join(",");
        passed.push(write.as_raw_fd());
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(self.argv.iter().skip(1))
            .env(INHERIT_VAR, list)
            .env(INHERIT_QUEUES_VAR, queue_list)
            .env(UPGRADE_FD_VAR, write.as_raw_fd().to_string())
            .env(UPGRADE_FROM_VAR, std::process::id().to_string());
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        // SAFETY: runs in the child between fork and exec, and only calls
        // fcntl (async-signal-safe) on descriptors it inherited.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &passed {
                    set_cloexec(*fd, false);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(write);
        Ok(Upgrade {
            pid: child.id() as libc::pid_t,
            ready: std::fs::File::from(read),
        })
    }

    fn read_upgrade(&mut self) {
        let Some(upgrade) = &mut self.upgrade else {
            return;
        };
        let mut fd = [libc::pollfd {
            fd: upgrade.ready.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll on one pollfd we own, without waiting.
        if unsafe { libc::poll(fd.as_mut_ptr(), 1, 0) } <= 0 {
            return;
        }
        let mut byte = [0u8];
        let got = upgrade.ready.read(&mut byte).unwrap_or(0);
        let pid = upgrade.pid;
        self.upgrade = None;
        if got == 1 && byte[0] == b'R' {
            tracing::info!("the new master (pid {pid}) is serving: retiring this master's workers");
            self.stopping = true;
            self.roll_from = None;
            self.retire_where(|_| true);
        } else {
            tracing::error!("the new master (pid {pid}) did not start; this master keeps serving");
        }
    }

    // ---- workers -----------------------------------------------------------------

    fn read_workers(&mut self) {
        let mut events = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            while let Received::Message(m) = w.channel.next_from_worker() {
                events.push((i, m));
            }
        }
        for (i, m) in events {
            self.on_message(i, m);
        }
    }

    fn on_message(&mut self, i: usize, msg: ToMaster) {
        let now = Instant::now();
        match msg {
            ToMaster::Beat => self.workers[i].last_beat = now,
            ToMaster::Failed(text) => self.workers[i].failure = Some(text),
            ToMaster::Recycle => {
                let w = &mut self.workers[i];
                if !w.leaving() {
                    tracing::info!(
                        "worker {} (pid {}) reached --max-requests: starting its replacement",
                        w.slot + 1,
                        w.pid
                    );
                    w.recycling = true;
                }
            }
            ToMaster::Ready => {
                let slot = {
                    let w = &mut self.workers[i];
                    w.last_beat = now;
                    if w.state != State::Starting {
                        return;
                    }
                    w.state = State::Ready;
                    w.slot
                };
                // A replacement for a worker at --max-requests: it retires now.
                self.retire_where(|w| w.slot == slot && w.recycling);
                self.finish_roll_if_ready();
            }
        }
    }

    /// HUP: when every worker of the new generation is ready, the old
    /// generation retires.
    fn finish_roll_if_ready(&mut self) {
        let Some(from) = self.roll_from else {
            return;
        };
        if !self.generation_ready() {
            return;
        }
        self.roll_from = None;
        let current = self.generation;
        tracing::info!("HUP: the new workers are ready; the old ones retire");
        self.retire_where(|w| w.generation <= from && w.generation < current);
    }

    /// Every slot that should have a worker has a ready one of the current
    /// generation (and at least one does).
    fn generation_ready(&self) -> bool {
        let mut any = false;
        for slot in 0..self.target {
            if self.slots[slot].disabled.is_some() {
                continue;
            }
            let ready = self.workers.iter().any(|w| {
                w.slot == slot && w.generation == self.generation && w.state == State::Ready
            });
            if !ready {
                return false;
            }
            any = true;
        }
        any
    }

    fn announce_if_ready(&mut self) {
        if self.announced || !self.generation_ready() {
            return;
        }
        self.announced = true;
        serving::announce_listening(
            &self.prepared,
            &self.shown,
            self.prepared.opts.interpreters,
            Some(self.target),
        );
        process::announce_ready();
        if self.prepared.opts.daemonize {
            process::detach_stdio();
        }
    }

    /// Start what is missing: every slot below `target` that is not
    /// disabled needs a worker of the current generation that is staying.
    fn reconcile(&mut self) {
        if self.stopping {
            return;
        }
        let now = Instant::now();
        for slot in 0..self.target {
            if self.slots[slot].disabled.is_some() {
                continue;
            }
            let held = self
                .workers
                .iter()
                .any(|w| w.slot == slot && w.generation == self.generation && !w.leaving());
            if held {
                continue;
            }
            if let Some(at) = self.slots[slot].respawn_at {
                if now < at {
                    continue;
                }
            }
            self.slots[slot].respawn_at = None;
            if let Err(e) = self.spawn(slot) {
                tracing::error!("cannot start worker {}: {e}", slot + 1);
                self.slots[slot].respawn_at = Some(now + Duration::from_secs(1));
            }
        }
    }

    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status of a child of this process.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                // The new master exited before reporting ready.
                tracing::error!(
                    "the new master (pid {pid}) exited ({}); this master keeps serving",
                    describe_status(status)
                );
                self.upgrade = None;
                continue;
            }
            if let Some(i) = self.workers.iter().position(|w| w.pid == pid) {
                let w = self.workers.remove(i);
                self.on_exit(w, status);
            }
        }
    }

    fn on_exit(&mut self, w: Worker, status: libc::c_int) {
        let number = w.slot + 1;
        let how = describe_status(status);
        if matches!(w.state, State::Retiring | State::Stopping) && !w.killed {
            tracing::info!("worker {number} (pid {}) exited ({how})", w.pid);
            return;
        }
        let startup_failed =
            w.state == State::Starting && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2;
        if startup_failed {
            let msg = w
                .failure
                .clone()
                .unwrap_or_else(|| "lifespan startup failed".into());
            self.on_startup_failure(&w, msg);
            return;
        }
        if matches!(w.state, State::Retiring | State::Stopping) {
            tracing::warn!("worker {number} (pid {}) was killed ({how})", w.pid);
            return;
        }
        let lived = w.started.elapsed();
        let slot = &mut self.slots[w.slot];
        if lived < QUICK_EXIT {
            slot.quick_exits += 1;
        } else {
            slot.quick_exits = 1;
        }
        if w.generation != self.generation || w.slot >= self.target || self.stopping {
            tracing::warn!("worker {number} (pid {}) exited ({how})", w.pid);
            return;
        }
        if slot.quick_exits >= 2 {
            let delay = (Duration::from_millis(500) * 2u32.saturating_pow(slot.quick_exits - 2))
                .min(MAX_RESPAWN_DELAY);
            slot.respawn_at = Some(Instant::now() + delay);
            self.queues.close(w.slot);
            tracing::error!(
                "worker {number} (pid {}) exited ({how}) {} times in a row within {}s of starting: crash loop; next start in {:.1}s",
                w.pid,
                slot.quick_exits,
                QUICK_EXIT.as_secs(),
                delay.as_secs_f64()
            );
        } else {
            tracing::warn!(
                "worker {number} (pid {}) exited unexpectedly ({how}); starting it again",
                w.pid
            );
        }
    }

    fn on_startup_failure(&mut self, w: &Worker, msg: String) {
        let number = w.slot + 1;
        // A replacement (HUP, --max-requests) that fails leaves the worker
        // it was to replace serving.
        if self.roll_from.is_some() && w.generation == self.generation {
            let from = self.roll_from.take().unwrap_or(w.generation);
            tracing::error!(
                "HUP: new worker {number} (pid {}) failed lifespan startup: {}; keeping the old workers",
                w.pid,
                msg.trim_end()
            );
            let dropped = self.generation;
            self.generation = from;
            let deadline = Instant::now() + self.stop_bound;
            for other in &mut self.workers {
                if other.generation == dropped && other.state != State::Stopping {
                    let _ = other.channel.tell_worker(FromMaster::Stop);
                    other.state = State::Stopping;
                    other.deadline = Some(deadline);
                }
            }
            return;
        }
        if let Some(old) = self
            .workers
            .iter_mut()
            .find(|o| o.slot == w.slot && o.recycling && o.state == State::Ready)
        {
            tracing::error!(
                "the replacement of worker {number} failed lifespan startup: {}; the old worker (pid {}) keeps serving",
                msg.trim_end(),
                old.pid
            );
            old.recycling = false;
            return;
        }
        tracing::error!(
            "worker {number} (pid {}) failed lifespan startup; not starting it again: {}",
            w.pid,
            msg.trim_end()
        );
        if let Some(slot) = self.slots.get_mut(w.slot) {
            slot.disabled = Some(msg);
        }
        self.queues.close(w.slot);
    }

    /// Every slot failed lifespan startup and nothing serves: the app's message.
    fn all_failed(&self) -> Option<String> {
        if self.stopping || self.workers.iter().any(|w| !w.leaving()) {
            return None;
        }
        let active = &self.slots[..self.target];
        if active.iter().all(|s| s.disabled.is_some()) {
            active.iter().find_map(|s| s.disabled.clone())
        } else {
            None
        }
    }

    fn wait_all_gone(&mut self) {
        let deadline = Instant::now() + self.stop_bound;
        while !self.workers.is_empty() {
            if Instant::now() > deadline {
                for w in &self.workers {
                    // SAFETY: signals a child process of ours.
                    unsafe { libc::kill(w.pid, libc::SIGKILL) };
                }
            }
            self.wait_for_events();
            self.signals.drain();
            self.reap();
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        for w in &mut self.workers {
            if w.killed {
                continue;
            }
            if let Some(timeout) = self.heartbeat {
                if now.duration_since(w.last_beat) > timeout {
                    tracing::error!(
                        "worker {} (pid {}) sent no heartbeat for {}s (its interpreter is stuck): killing it",
                        w.slot + 1,
                        w.pid,
                        timeout.as_secs()
                    );
                    // SAFETY: signals a child process of ours.
                    unsafe { libc::kill(w.pid, libc::SIGKILL) };
                    w.killed = true;
                    continue;
                }
            }
            if w.deadline.is_some_and(|d| now > d) {
                tracing::warn!(
                    "worker {} (pid {}) did not stop in time: killing it",
                    w.slot + 1,
                    w.pid
                );
                // SAFETY: signals a child process of ours.
                unsafe { libc::kill(w.pid, libc::SIGKILL) };
                w.killed = true;
            }
        }
    }

    // ---- forking ---------------------------------------------------------------

    fn spawn(&mut self, slot: usize) -> std::io::Result<()> {
        self.queues.ensure(slot);
        let (master_end, worker_end) = Channel::pair()?;
        let limit = self.request_limit();
        if let Some(t) = &self.template {
            t.flush_before_fork();
        }
        let blocked = signals::Blocked::all();
        // SAFETY: this process has one thread (the master never starts
        // another), so the child may run anything; it never returns here.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => {
                let code = self.become_worker(slot, worker_end, master_end, limit, blocked);
                std::process::exit(code)
            }
            pid => {
                drop(blocked);
                drop(worker_end);
                let now = Instant::now();
                self.workers.push(Worker {
                    pid,
                    slot,
                    generation: self.generation,
                    channel: master_end,
                    state: State::Starting,
                    started: now,
                    last_beat: now,
                    recycling: false,
                    failure: None,
                    killed: false,
                    deadline: None,
                });
                Ok(())
            }
        }
    }

    /// `--max-requests` plus this worker's share of the jitter.
    fn request_limit(&mut self) -> Option<u64> {
        let opts = &self.prepared.opts;
        if opts.max_requests == 0 {
            return None;
        }
        // xorshift: only spreading workers apart, no need for quality.
        self.jitter_seed ^= self.jitter_seed << 13;
        self.jitter_seed ^= self.jitter_seed >> 7;
        self.jitter_seed ^= self.jitter_seed << 17;
        let jitter = match opts.max_requests_jitter {
            0 => 0,
            j => self.jitter_seed % (j + 1),
        };
        Some(opts.max_requests + jitter)
    }

    /// The child's side of `spawn`: drop what is the master's, set up its
    /// own signals, and serve.  Returns the exit status.
    fn become_worker(
        &mut self,
        slot: usize,
        channel: Channel,
        master_end: Channel,
        request_limit: Option<u64>,
        blocked: signals::Blocked,
    ) -> i32 {
        // The master's descriptors: its signal pipe, the other workers'
        // lines, the upgrade pipe, whoever waits for its readiness.  Closed
        // by number: their owners are never dropped in this process.
        let mut theirs: Vec<RawFd> = self.signals.raw_fds().to_vec();
        theirs.extend(self.workers.iter().map(|w| w.channel.fd()));
        theirs.push(master_end.fd());
        theirs.extend(self.upgrade.iter().map(|u| u.ready.as_raw_fd()));
        for fd in theirs {
            // SAFETY: closes descriptors of the master's that this process
            // inherited and never uses.
            unsafe { libc::close(fd) };
        }
        std::mem::forget(master_end);
        process::forget_waiters_in_child();
        // Signals as the app left them when it loaded, then the worker's.
        for saved in &self.saved {
            let restored = if saved.was_perl() {
                saved.restore()
            } else {
                signals::reset(saved.signal())
            };
            if let Err(e) = restored {
                tracing::warn!("worker {}: signal setup: {e}", slot + 1);
            }
        }
        const WORKER_SIGNALS: [libc::c_int; 6] = [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGUSR2,
        ];
        let pipe = match SignalPipe::open(&WORKER_SIGNALS) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("worker {}: cannot set up signals: {e}", slot + 1);
                return 1;
            }
        };
        for sig in WORKER_SIGNALS {
            // The master's signals sent to the whole process group (a
            // terminal's) are the master's business: heard and ignored here.
            if let Err(e) = signals::handle(sig) {
                tracing::warn!("worker {}: signal setup: {e}", slot + 1);
            }
        }
        // SAFETY: once, in this process, before its app code runs again.
        unsafe { interp::ffi::pagi_mark_server_process() };
        crate::logging::set_worker_id((slot + 1) as u32);
        drop(blocked);
        let Some(loaded) = self.template.take() else {
            return 1;
        };
        if let Err(e) = loaded.renew_after_fork() {
            tracing::error!("worker {}: {e}", slot + 1);
            return 1;
        }
        let listeners = std::mem::take(&mut self.queues).for_worker(slot);
        let role = Role::Worker {
            number: slot + 1,
            channel,
            request_limit,
        };
        match serving::serve(&self.prepared, loaded, listeners, pipe, role) {
            Ok(()) => 0,
            Err(StartupError::LifespanFailed(_)) | Err(StartupError::LifespanTimeout(_)) => 2,
            Err(e) => {
                tracing::error!("worker {}: {e}", slot + 1);
                1
            }
        }
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!("killed by SIG{} ({sig})", signals::name(sig))
    } else {
        format!("wait status {status}")
    }
}
