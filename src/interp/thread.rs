//! Interpreters and their threads: build an interpreter and load the app
//! (on the thread that will run it, or on the master's main thread before it
//! forks), run the IO::Async loop on an interpreter thread until told to
//! stop, then destroy the interpreter.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::raw::{c_char, c_int};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::embedded::BOOTSTRAP;
use super::exports;
use super::ffi::{self, PagiStr, PerlInterpreter};
use super::mailbox::Mailbox;
use super::scheduling::Scheduling;
use super::{Control, LoadSpec};
use crate::cli::AppSpec;
use crate::error::StartupError;

/// Each level of nested async resumption costs about 1 KB of C stack; the
/// 2 MiB default overflows on deep await chains.
const STACK_SIZE: usize = 64 * 1024 * 1024;

/// perl_alloc initialises process globals without a lock, and module loading
/// touches shared state: one interpreter is built and loaded at a time.
static CONSTRUCTION: Mutex<()> = Mutex::new(());

/// An interpreter built on the thread that called [`load`], with the
/// application loaded, whose loop is not running yet.  The master process
/// builds one on its main thread before any other thread exists, so that
/// every worker it forks shares the loaded code copy-on-write; the worker
/// then runs it on an interpreter thread ([`spawn_adopted`]).
pub struct Loaded {
    raw: *mut PerlInterpreter,
    pub mailbox: Arc<Mailbox>,
    /// The duplicate of the mailbox's eventfd that the loop watches.
    perl_wake_fd: RawFd,
    /// The class of the interpreter's IO::Async loop.
    loop_class: String,
}

impl Loaded {
    /// The class of the interpreter's IO::Async loop (`-l`, IO_ASYNC_LOOP
    /// or the default), for the startup line.
    pub fn loop_class(&self) -> &str {
        &self.loop_class
    }
}

// SAFETY: a Loaded is used by one thread at a time: the one that built it,
// then the one it is moved to, which makes it its context
// (pagi_interp_adopt) before using it.  Perl records no owning thread.
unsafe impl Send for Loaded {}

/// Build an interpreter on this thread and load the application into it.
/// `mailbox` is its channel from the network core.
pub fn load(spec: &LoadSpec, mailbox: Arc<Mailbox>) -> Result<Loaded, StartupError> {
    // The lock guards no data, only the order of constructions: a thread
    // that panicked holding it leaves nothing to repair.
    let _guard = CONSTRUCTION.lock().unwrap_or_else(|p| p.into_inner());
    // perl_parse may write to argv ($0): give it leaked, writable storage that
    // outlives the interpreter.
    let argv: &'static mut [*mut c_char; 4] = Box::leak(Box::new([
        CString::new("pagi-rs").unwrap().into_raw(),
        CString::new("-e").unwrap().into_raw(),
        CString::new("0").unwrap().into_raw(),
        std::ptr::null_mut(),
    ]));
    // SAFETY: pagi_sys_init ran on the main thread before any interpreter;
    // construction is serialised by CONSTRUCTION.
    let raw = unsafe { ffi::pagi_interp_new(3, argv.as_mut_ptr()) };
    if raw.is_null() {
        return Err(StartupError::Interpreter(
            "could not construct a Perl interpreter".into(),
        ));
    }
    let interp = Interp(raw);
    let thread_name = ThreadName::of_this_thread();
    let loaded = load_app(&interp, &mailbox, spec);
    // Perl names the thread after each assignment to $0 (the loader's
    // `local $0` ends with "-e"): what `ps`, `top -H`, `pkill` and
    // `killall` see for the process, or for an interpreter thread.
    thread_name.restore();
    match loaded {
        Ok((perl_wake_fd, loop_class)) => Ok(Loaded {
            raw,
            mailbox,
            perl_wake_fd,
            loop_class,
        }),
        Err(e) => {
            // SAFETY: the interpreter is current on this thread and unused after.
            unsafe { ffi::pagi_interp_free(raw) };
            Err(e)
        }
    }
}

/// A thread's name as the kernel keeps it (16 bytes with the NUL).
struct ThreadName([u8; 16]);

impl ThreadName {
    fn of_this_thread() -> ThreadName {
        let mut name = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes into the live buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
        ThreadName(name)
    }

    fn restore(&self) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
        // bytes; the buffer is 16 bytes and PR_GET_NAME terminated it.
        unsafe { libc::prctl(libc::PR_SET_NAME, self.0.as_ptr()) };
    }
}

impl Loaded {
    /// In a process forked after the load: a wake-up eventfd of its own.
    /// The inherited one is shared with the master and every sibling, whose
    /// wake-ups would cross and be swallowed.
    pub fn renew_after_fork(&self) -> std::io::Result<()> {
        self.mailbox.renew_wake_fd(self.perl_wake_fd)
    }

    /// Flush Perl's output handles, so that a fork does not write what they
    /// hold twice.  Called on the thread that holds the interpreter.
    pub fn flush_before_fork(&self) {
        // SAFETY: the interpreter is live and only this thread uses it.
        unsafe { ffi::pagi_interp_flush_before_fork(self.raw) }
    }
}

/// Run an interpreter that was built on another thread (see [`Loaded`]) on
/// a new interpreter thread.  `forked`: the process was forked since the
/// load, so the loop's kernel state and rand()'s seed are renewed.
pub fn spawn_adopted(
    index: usize,
    loaded: Loaded,
    control: mpsc::Sender<Control>,
    runtime: tokio::runtime::Handle,
    forked: bool,
    scheduling: Scheduling,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // This thread hands the interpreter over: a signal landing here must
    // not take it for this thread's interpreter.
    // SAFETY: clears this thread's Perl context; nothing uses it after.
    unsafe { ffi::pagi_interp_set_context(std::ptr::null_mut()) };
    std::thread::Builder::new()
        .name(format!("perl-{index}"))
        .stack_size(STACK_SIZE)
        .spawn(move || {
            scheduling.apply_to_this_thread();
            // SAFETY: the interpreter moved to this thread, which alone uses
            // it from now on.
            unsafe { ffi::pagi_interp_adopt(loaded.raw, c_int::from(forked)) };
            if forked {
                let interp = Interp(loaded.raw);
                if let Err(e) = interp.eval("PAGI::RS::Bridge::renew_loop_after_fork()") {
                    tracing::warn!(
                        "the event loop could not renew itself after fork: {}",
                        e.trim_end()
                    );
                }
            }
            let _ = control.send(Control::Loaded(Ok(())));
            serve_loop(loaded, control, runtime);
        })
}

/// Start an interpreter thread that builds its own interpreter and loads the
/// app (the second and further `--interpreters`).
pub fn spawn(
    index: usize,
    mailbox: Arc<Mailbox>,
    control: mpsc::Sender<Control>,
    runtime: tokio::runtime::Handle,
    spec: LoadSpec,
    scheduling: Scheduling,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("perl-{index}"))
        .stack_size(STACK_SIZE)
        .spawn(move || match load(&spec, mailbox) {
            Ok(loaded) => {
                scheduling.apply_to_this_thread();
                let _ = control.send(Control::Loaded(Ok(())));
                serve_loop(loaded, control, runtime);
            }
            Err(e) => {
                let text = match e {
                    StartupError::AppLoad(text) => text,
                    other => other.to_string(),
                };
                let _ = control.send(Control::Loaded(Err(text)));
                let _ = control.send(Control::Exited);
            }
        })
}

struct Interp(*mut PerlInterpreter);

impl Interp {
    fn call(&self, name: &str, args: &[&[u8]]) -> Result<String, String> {
        let cname = CString::new(name).expect("sub names have no NUL");
        let strs: Vec<PagiStr> = args.iter().map(|a| PagiStr::from_bytes(a)).collect();
        let mut result = PagiStr::NULL;
        // SAFETY: the interpreter is live and current on this thread; args
        // outlive the call; result points into an SV kept by calls.c until
        // the next call, and we copy it out immediately.
        let ok = unsafe {
            ffi::pagi_call(
                self.0,
                cname.as_ptr(),
                strs.as_ptr(),
                strs.len(),
                &mut result,
            )
        };
        // SAFETY: see above.
        let text = String::from_utf8_lossy(unsafe { result.as_bytes() }).into_owned();
        if ok != 0 {
            Ok(text)
        } else {
            Err(text)
        }
    }

    fn eval(&self, code: &str) -> Result<String, String> {
        let ccode = CString::new(code).expect("bootstrap has no NUL");
        let mut result = PagiStr::NULL;
        // SAFETY: as in `call`.
        let ok = unsafe { ffi::pagi_eval(self.0, ccode.as_ptr(), &mut result) };
        // SAFETY: as in `call`.
        let text = String::from_utf8_lossy(unsafe { result.as_bytes() }).into_owned();
        if ok != 0 {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

/// The life of an interpreter thread once its interpreter is current here:
/// take signals, run the loop until told to stop, then destroy it.
fn serve_loop(loaded: Loaded, control: mpsc::Sender<Control>, runtime: tokio::runtime::Handle) {
    let interp = Interp(loaded.raw);
    // SAFETY: called on the interpreter's own thread, which it stays on
    // until pagi_interp_free (which removes it again, before Perl closes the
    // loop's wake-up fd).
    unsafe { ffi::pagi_add_signal_target(interp.0, loaded.perl_wake_fd) };
    exports::install(loaded.mailbox.clone(), control.clone(), runtime);
    if let Err(e) = interp.call("PAGI::RS::Bridge::run", &[]) {
        tracing::error!("interpreter loop ended with an error: {}", e.trim_end());
    }
    exports::uninstall();
    // SAFETY: the interpreter is current on this thread and nothing else uses it.
    unsafe { ffi::pagi_interp_free(interp.0) };
    let _ = control.send(Control::Exited);
}

/// Load the bridge and the application; returns the wake-up descriptor the
/// loop watches and the loop's class.  What fails before the app's own
/// code runs (the bridge, the modules it needs, the `-l` loop) is
/// `Bridge`; the rest is `AppLoad`.
fn load_app(
    interp: &Interp,
    mailbox: &Mailbox,
    spec: &LoadSpec,
) -> Result<(RawFd, String), StartupError> {
    interp
        .eval(BOOTSTRAP)
        .map_err(|e| StartupError::Bridge(format!("pagi-rs bridge failed to load: {e}")))?;
    let fd = mailbox
        .dup_wake_fd()
        .map_err(|e| StartupError::Interpreter(e.to_string()))?;
    // Bridge::init's arguments: the settings in its order, then the `-I`
    // directories (where a `-l` loop class is looked for too).
    let mut settings: Vec<Vec<u8>> = [
        fd.to_string(),
        spec.high_water.to_string(),
        spec.low_water.to_string(),
        spec.max_receive_queue.to_string(),
        spec.max_ws_frame_size.to_string(),
        spec.max_unread_bytes.to_string(),
        spec.spec.www().to_string(),
        spec.spec.core().to_string(),
        spec.max_disconnect_receives.to_string(),
        spec.send_backlog.to_string(),
        spec.queued_message_cost.to_string(),
        spec.loop_backend.clone().unwrap_or_default(),
    ]
    .map(String::into_bytes)
    .into();
    settings.extend(spec.include.iter().map(|dir| dir.clone().into_bytes()));
    let settings: Vec<&[u8]> = settings.iter().map(Vec::as_slice).collect();
    let loop_class = interp
        .call("PAGI::RS::Bridge::init", &settings)
        .map_err(|e| StartupError::Bridge(e.trim_end().to_string()))?;
    let (kind, what) = match &spec.app {
        AppSpec::File(f) => ("file", f.as_str()),
        AppSpec::Module(m) => ("module", m.as_str()),
        AppSpec::Inline(code) => ("inline", code.as_str()),
        AppSpec::CurrentDirectory => ("directory", "PAGI::App::Directory"),
    };
    let mut args: Vec<Vec<u8>> = vec![kind.into(), what.into()];
    // `$0` outside the app file's loading: the server as it was invoked,
    // as the reference's is its own script (`perl_parse` left "-e").
    if let Some(program) = std::env::args_os().next() {
        use std::os::unix::ffi::OsStrExt;
        let mut arg = b"P".to_vec();
        arg.extend_from_slice(program.as_bytes());
        args.push(arg);
    }
    for i in &spec.include {
        args.push(format!("I{i}").into_bytes());
    }
    for m in &spec.modules {
        args.push(format!("M{m}").into_bytes());
    }
    for a in &spec.args {
        args.push(format!("A{a}").into_bytes());
    }
    if crate::logging::is_json() {
        interp
            .call("PAGI::RS::Loader::route_warnings_to_log", &[])
            .map_err(StartupError::Bridge)?;
    }
    if spec.lint {
        args.push(b"L".to_vec());
    }
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
    interp
        .call("PAGI::RS::Loader::load", &refs)
        .map(|_| (fd, loop_class))
        .map_err(StartupError::AppLoad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perl_once() {
        static INIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: once per process, before any interpreter; the forwarding
        // is what pagi-rs installs at startup.
        INIT.call_once(|| unsafe {
            ffi::pagi_sys_init();
            ffi::pagi_install_signal_forwarding();
        });
    }

    /// A bare interpreter (`perl -e 0`), current on the calling thread,
    /// which must free it before it exits; and the construction lock, which
    /// the test holds throughout so that tests that set `%SIG` take turns.
    fn interpreter_for_this_thread() -> (*mut PerlInterpreter, std::sync::MutexGuard<'static, ()>) {
        let argv: &'static mut [*mut c_char; 4] = Box::leak(Box::new([
            CString::new("pagi-rs-test").unwrap().into_raw(),
            CString::new("-e").unwrap().into_raw(),
            CString::new("0").unwrap().into_raw(),
            std::ptr::null_mut(),
        ]));
        let guard = CONSTRUCTION.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: as in `run`: argv is leaked, so it outlives the
        // interpreter, which stays on this thread until the caller frees it.
        let raw = unsafe { ffi::pagi_interp_new(3, argv.as_mut_ptr()) };
        assert!(!raw.is_null());
        (raw, guard)
    }

    /// A signal for which the app set a handler goes to that interpreter's
    /// thread while it lives, and to no thread once it is freed; and the
    /// freed interpreter is no longer this thread's context.
    #[test]
    fn a_freed_interpreter_gets_no_signal_and_is_no_context() {
        perl_once();
        std::thread::Builder::new()
            .stack_size(STACK_SIZE)
            .spawn(|| {
                let (raw, _guard) = interpreter_for_this_thread();
                let interp = Interp(raw);
                // SAFETY: on the interpreter's own thread.
                unsafe { ffi::pagi_add_signal_target(raw, -1) };
                // SAFETY: the test only queries the choice; nothing is sent.
                let before = unsafe { ffi::pagi_signal_target_for(libc::SIGUSR2) };
                assert_eq!(before, -1, "no handler yet: nobody to send it to");
                interp.eval("$SIG{USR2} = sub {}; 1").unwrap();
                // SAFETY: as above.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                assert_eq!(unsafe { ffi::pagi_signal_target_for(libc::SIGUSR2) }, tid);
                // SAFETY: the interpreter is current on this thread and unused after.
                unsafe { ffi::pagi_interp_free(raw) };
                assert_eq!(
                    unsafe { ffi::pagi_signal_target_for(libc::SIGUSR2) },
                    -1,
                    "a freed interpreter is no target"
                );
                assert!(
                    unsafe { ffi::pagi_current_context() }.is_null(),
                    "the context is cleared"
                );
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A signal taken by an interpreter's thread also makes its loop's
    /// wake-up fd readable: Perl only marks the signal pending, and a loop
    /// that was about to block in poll(2) must not sleep on with it.
    #[test]
    fn a_signal_for_this_interpreter_wakes_its_loop() {
        perl_once();
        std::thread::Builder::new()
            .stack_size(STACK_SIZE)
            .spawn(|| {
                let mailbox = Mailbox::new().unwrap();
                let wake_fd = mailbox.dup_wake_fd().unwrap();
                let (raw, _guard) = interpreter_for_this_thread();
                let interp = Interp(raw);
                // SAFETY: on the interpreter's own thread; wake_fd is open
                // until after the interpreter is freed.
                unsafe { ffi::pagi_add_signal_target(raw, wake_fd) };
                interp
                    .eval("$main::winches = 0; $SIG{WINCH} = sub { $main::winches++ }; 1")
                    .unwrap();
                let mut counter: u64 = 0;
                // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
                let read = |counter: &mut u64| unsafe {
                    libc::read(wake_fd, (counter as *mut u64).cast(), 8)
                };
                assert_eq!(read(&mut counter), -1, "nothing woke the loop yet");
                // SAFETY: runs the process's handler on this thread, whose
                // interpreter has a handler for the signal.
                unsafe { ffi::pagi_take_signal_here(libc::SIGWINCH) };
                assert_eq!(read(&mut counter), 8, "the signal woke the loop");
                assert_eq!(counter, 1);
                assert_eq!(
                    interp.eval("$main::winches").unwrap(),
                    "1",
                    "and the app's handler ran at the next op"
                );
                // SAFETY: the interpreter is current on this thread and unused after.
                unsafe { ffi::pagi_interp_free(raw) };
                // SAFETY: wake_fd is ours and no longer registered.
                unsafe { libc::close(wake_fd) };
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
