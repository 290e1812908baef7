//! Interpreter threads.  Each owns one PerlInterpreter running an IO::Async
//! loop; the network core talks to it through its [`mailbox::Mailbox`], and
//! it answers through direct calls into [`exports`].  The pool is built for N
//! interpreters and picks the least busy one for each request.

pub mod constants;
pub mod embedded;
pub mod exports;
pub mod ffi;
pub mod lent;
pub mod mailbox;
pub mod malloc;
pub mod messages;
pub mod scheduling;
mod thread;

pub use scheduling::Scheduling;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{AppSpec, LifespanMode};
use crate::error::StartupError;
use mailbox::Mailbox;
use messages::ToPerl;

/// What an interpreter thread reports to the main thread.
pub enum Control {
    /// The application loaded (or failed to, with Perl's error text).
    Loaded(Result<(), String>),
    /// A lifespan event: see `lifespan_kind`.
    Lifespan(i32, String),
    /// The thread has left its loop and destroyed its interpreter.
    Exited,
}

/// Lifespan event kinds sent by perl/PAGI/RS/Lifespan.pm.  DECLINED_STARTUP:
/// the app returned or raised before answering lifespan.startup; ENDED: the
/// lifespan coroutine ended after startup (with an error, if any).
pub use constants::lifespan as lifespan_kind;

pub use thread::Loaded;

/// Build an interpreter on this thread and load the application into it;
/// [`Pool::start`] runs it on an interpreter thread (in this process, or in
/// a worker forked from it).
pub fn load(spec: &LoadSpec) -> Result<Loaded, StartupError> {
    let mailbox = Arc::new(Mailbox::new().map_err(|e| StartupError::Interpreter(e.to_string()))?);
    thread::load(spec, mailbox)
}

/// Keep Future on its pure-Perl implementation, as the reference server
/// does (`PERL_FUTURE_NO_XS=1`, which Future reads when it loads, unless
/// the environment already says otherwise): Future::XS warns where
/// Future::PP does not, and it is not what this server is tested with.
/// Call before any thread exists (it sets an environment variable).
pub fn prefer_pure_perl_future() {
    if std::env::var_os(FUTURE_NO_XS).is_none() {
        std::env::set_var(FUTURE_NO_XS, "1");
    }
}

/// Future's own switch (`Future.pm`, from Future 0.50 on).
pub const FUTURE_NO_XS: &str = "PERL_FUTURE_NO_XS";

/// How each interpreter loads the application.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub app: AppSpec,
    pub args: Vec<String>,
    pub include: Vec<String>,
    pub modules: Vec<String>,
    /// Reported by pagi.transport.
    pub high_water: usize,
    pub low_water: usize,
    /// WebSocket limits, shown in the websocket scope; 0 frame size = none.
    pub max_receive_queue: usize,
    pub max_ws_frame_size: usize,
    /// Bytes of received messages an app may leave unread (one message
    /// always fits); past it the socket closes with 1008.
    pub max_unread_bytes: usize,
    /// What sends an app made without awaiting may hold back, in bytes
    /// (each counting `queued_message_cost` more): past it a send fails.
    pub send_backlog: usize,
    pub queued_message_cost: usize,
    /// Which PAGI the scopes report and the Perl side follows.
    pub spec: crate::spec::SpecVersion,
    /// Receives answered with the disconnect event after a scope ended.
    pub max_disconnect_receives: u32,
    /// `-E development`: wrap the app in PAGI::Middleware::Lint when it is
    /// installed (PAGI-Tools).
    pub lint: bool,
    /// `-l`: the interpreters' loop is IO::Async::Loop::<this>.
    pub loop_backend: Option<String>,
}

pub struct Interpreter {
    pub mailbox: Arc<Mailbox>,
    control: Mutex<mpsc::Receiver<Control>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    lifespan_active: std::sync::atomic::AtomicBool,
}

pub struct Pool {
    interpreters: Vec<Interpreter>,
    next_id: AtomicU64,
}

impl Pool {
    /// Run `first` (an interpreter built and loaded on the calling thread;
    /// `forked`: in a process forked since) on an interpreter thread, and
    /// start `n - 1` more that load the app themselves; fails with Perl's
    /// error if any load fails.
    pub fn start(
        n: usize,
        first: thread::Loaded,
        forked: bool,
        spec: &LoadSpec,
        runtime: tokio::runtime::Handle,
        scheduling: Scheduling,
    ) -> Result<Pool, StartupError> {
        let thread_failed = |e: std::io::Error| {
            StartupError::Interpreter(format!("cannot start interpreter thread: {e}"))
        };
        let mut interpreters = Vec::with_capacity(n);
        let mut first = Some(first);
        for index in 0..n.max(1) {
            let (tx, rx) = mpsc::channel();
            let (mailbox, handle) = match first.take() {
                Some(loaded) => {
                    let mailbox = loaded.mailbox.clone();
                    let handle = thread::spawn_adopted(
                        index,
                        loaded,
                        tx,
                        runtime.clone(),
                        forked,
                        scheduling,
                    )
                    .map_err(thread_failed)?;
                    (mailbox, handle)
                }
                None => {
                    let mailbox = Arc::new(
                        Mailbox::new().map_err(|e| StartupError::Interpreter(e.to_string()))?,
                    );
                    let handle = thread::spawn(
                        index,
                        mailbox.clone(),
                        tx,
                        runtime.clone(),
                        spec.clone(),
                        scheduling,
                    )
                    .map_err(thread_failed)?;
                    (mailbox, handle)
                }
            };
            let interp = Interpreter {
                mailbox,
                control: Mutex::new(rx),
                thread: Mutex::new(Some(handle)),
                lifespan_active: std::sync::atomic::AtomicBool::new(false),
            };
            match interp.recv(None) {
                Some(Control::Loaded(Ok(()))) => {}
                Some(Control::Loaded(Err(e))) => return Err(StartupError::AppLoad(e)),
                _ => {
                    return Err(StartupError::Interpreter(
                        "interpreter thread died during startup".into(),
                    ))
                }
            }
            interpreters.push(interp);
        }
        Ok(Pool {
            interpreters,
            next_id: AtomicU64::new(1),
        })
    }

    /// Liveness: ask every interpreter's loop to take a message.  Returns
    /// where each loop's count of drained batches stood, for [`Pool::alive_since`].
    pub fn ping(&self) -> Vec<u64> {
        self.interpreters
            .iter()
            .map(|i| {
                let mark = i.mailbox.drains();
                i.mailbox.push(ToPerl::Ping);
                mark
            })
            .collect()
    }

    /// Whether every loop drained its mailbox since [`Pool::ping`] returned
    /// `marks`: a loop that did not is stuck (an app busy in a loop).
    pub fn alive_since(&self, marks: &[u64]) -> bool {
        self.interpreters
            .iter()
            .zip(marks)
            .all(|(i, mark)| i.mailbox.drains() > *mark)
    }

    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The interpreter with the fewest requests in flight.
    pub fn pick(&self) -> &Interpreter {
        self.interpreters
            .iter()
            .min_by_key(|i| i.mailbox.in_flight.load(Ordering::Relaxed))
            .expect("the pool has at least one interpreter")
    }

    pub fn len(&self) -> usize {
        self.interpreters.len()
    }

    /// Run lifespan.startup in every interpreter; `worker` is this worker
    /// process's number, None in a single process.
    pub fn lifespan_startup(
        &self,
        mode: LifespanMode,
        timeout: Option<Duration>,
        worker: Option<usize>,
    ) -> Result<(), StartupError> {
        if mode == LifespanMode::Off {
            return Ok(());
        }
        for interp in &self.interpreters {
            interp.mailbox.push(ToPerl::LifespanStartup { worker });
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        for interp in &self.interpreters {
            loop {
                match interp.recv(deadline) {
                    None => {
                        return Err(StartupError::LifespanTimeout(
                            timeout.map(|t| t.as_secs()).unwrap_or(0),
                        ))
                    }
                    Some(Control::Lifespan(lifespan_kind::STARTUP_COMPLETE, _)) => {
                        interp.lifespan_active.store(true, Ordering::Release);
                        break;
                    }
                    Some(Control::Lifespan(lifespan_kind::STARTUP_FAILED, msg)) => {
                        return Err(StartupError::LifespanFailed(msg))
                    }
                    Some(Control::Lifespan(lifespan_kind::DECLINED_STARTUP, msg)) => {
                        if mode == LifespanMode::On {
                            return Err(StartupError::LifespanFailed(if msg.is_empty() {
                                "the application declined the lifespan protocol (--lifespan on)"
                                    .into()
                            } else {
                                format!(
                                    "the application declined the lifespan protocol: {}",
                                    msg.trim_end()
                                )
                            }));
                        }
                        if msg.is_empty() {
                            tracing::info!("Lifespan not supported, continuing without it");
                        } else {
                            tracing::info!(
                                "Lifespan not supported, continuing without it (application raised: {})",
                                msg.trim_end()
                            );
                        }
                        break;
                    }
                    Some(Control::Exited) => {
                        return Err(StartupError::Interpreter(
                            "interpreter exited during lifespan startup".into(),
                        ))
                    }
                    Some(_) => continue,
                }
            }
        }
        Ok(())
    }

    /// Run lifespan.shutdown where startup completed; bounded by `timeout`.
    pub fn lifespan_shutdown(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for interp in &self.interpreters {
            if interp.lifespan_active.load(Ordering::Acquire) {
                interp.mailbox.push(ToPerl::LifespanShutdown);
            }
        }
        for interp in &self.interpreters {
            if !interp.lifespan_active.load(Ordering::Acquire) {
                continue;
            }
            loop {
                match interp.recv(Some(deadline)) {
                    None => {
                        tracing::warn!(
                            "PAGI Server shutdown warning: Lifespan shutdown timed out after {}s",
                            timeout.as_secs()
                        );
                        break;
                    }
                    Some(Control::Lifespan(lifespan_kind::SHUTDOWN_COMPLETE, _)) => break,
                    Some(Control::Lifespan(lifespan_kind::SHUTDOWN_FAILED, msg)) => {
                        tracing::warn!("PAGI Server shutdown warning: {}", msg.trim_end());
                        break;
                    }
                    Some(Control::Lifespan(lifespan_kind::ENDED, msg)) => {
                        if !msg.is_empty() {
                            tracing::warn!("PAGI Server shutdown warning: {}", msg.trim_end());
                        }
                        break;
                    }
                    Some(Control::Exited) => break,
                    Some(_) => continue,
                }
            }
        }
    }

    /// Leave every event loop, destroy the interpreters and join the threads.
    pub fn stop(&self, timeout: Duration) {
        for interp in &self.interpreters {
            interp.mailbox.push(ToPerl::Stop);
        }
        let deadline = Instant::now() + timeout;
        for interp in &self.interpreters {
            loop {
                match interp.recv(Some(deadline)) {
                    Some(Control::Exited) => {
                        // Only ever `take`n under this lock, which cannot
                        // panic half-way: recovering from poison is sound.
                        if let Some(t) = interp
                            .thread
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .take()
                        {
                            let _ = t.join();
                        }
                        break;
                    }
                    None => {
                        tracing::warn!(
                            "an interpreter did not stop in time; exiting without waiting for it"
                        );
                        break;
                    }
                    Some(_) => continue,
                }
            }
        }
    }
}

impl Interpreter {
    fn recv(&self, deadline: Option<Instant>) -> Option<Control> {
        // The lock only serialises readers of a channel, which stays valid
        // whatever a panicking reader did: recovering from poison is sound.
        let rx = self.control.lock().unwrap_or_else(|p| p.into_inner());
        match deadline {
            None => rx.recv().ok(),
            Some(d) => rx
                .recv_timeout(d.saturating_duration_since(Instant::now()))
                .ok(),
        }
    }
}
