//! The server's own signals, as bytes on a pipe (the self-pipe trick).
//!
//! One handler for every signal the server acts on writes the signal's
//! number to a non-blocking pipe; the master's poll loop, or a tokio task in
//! a serving process, reads them.  The same pipe is handed to the C layer,
//! whose replacement of Perl's signal handler writes to it too: when an app
//! sets `$SIG{TERM}`, Perl's handler takes the server's place, and the
//! server still hears the signal (see src/interp/c/signals.c).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::interp::ffi;

/// The write end of the current process's pipe, for the handler.
static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: errno is thread-local; saved and restored around write(2),
    // which is async-signal-safe.  A full pipe drops the byte: enough of
    // the same signal are queued already.
    unsafe {
        let saved = *libc::__errno_location();
        let fd = WRITE_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            let byte = sig as u8;
            libc::write(fd, (&byte as *const u8).cast(), 1);
        }
        *libc::__errno_location() = saved;
    }
}

/// The read end of this process's signal pipe.
pub struct SignalPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl SignalPipe {
    /// Open the pipe and make it the one the handlers write to, for the
    /// signals in `watched` (Perl's handler included).
    pub fn open(watched: &[libc::c_int]) -> io::Result<SignalPipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        WRITE_FD.store(write.as_raw_fd(), Ordering::Release);
        let mask = watched
            .iter()
            .filter(|s| (1..64).contains(*s))
            .fold(0u64, |m, s| m | (1u64 << s));
        // SAFETY: records a descriptor and a mask for the C handler.
        unsafe { ffi::pagi_set_server_signals(write.as_raw_fd(), mask) };
        Ok(SignalPipe { read, write })
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Both ends: what a forked child that opens its own must close.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.read.as_raw_fd(), self.write.as_raw_fd()]
    }

    /// The signals received since the last call, in order.
    pub fn drain(&self) -> Vec<libc::c_int> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reads into a buffer we own from our non-blocking pipe.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend(buf[..n as usize].iter().map(|b| libc::c_int::from(*b)));
        }
        out
    }
}

/// Have the server's handler take `sig`, unless Perl's handler has it (the
/// app set `%SIG` for it): that one tells the server too.
pub fn handle(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: sigaction with a null new action only reads the current one
    // into the struct we own.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: compares a function pointer with Perl's handlers.
    if unsafe { ffi::pagi_is_perl_signal_handler(current.sa_sigaction as *mut libc::c_void) } != 0 {
        return Ok(());
    }
    install(sig, on_signal as *const () as libc::sighandler_t)
}

/// Make the server's handler take `sig` whatever had it (the master, which
/// runs no app code); returns the action it replaced, for [`restore`].
pub fn take_over(sig: libc::c_int) -> io::Result<Saved> {
    // SAFETY: sigaction with a null new action only reads the current one.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    install(sig, on_signal as *const () as libc::sighandler_t)?;
    Ok(Saved {
        sig,
        action: current,
    })
}

/// A signal's action as it was before [`take_over`].
pub struct Saved {
    sig: libc::c_int,
    action: libc::sigaction,
}

impl Saved {
    pub fn signal(&self) -> libc::c_int {
        self.sig
    }

    /// Whether it was Perl's handler (the app set `%SIG` for it while it
    /// loaded).
    pub fn was_perl(&self) -> bool {
        // SAFETY: compares a function pointer with Perl's handlers.
        unsafe {
            ffi::pagi_is_perl_signal_handler(self.action.sa_sigaction as *mut libc::c_void) != 0
        }
    }

    /// Put it back.
    pub fn restore(&self) -> io::Result<()> {
        // SAFETY: re-installs an action sigaction itself returned.
        if unsafe { libc::sigaction(self.sig, &self.action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Put `sig` back to its default action.
pub fn reset(sig: libc::c_int) -> io::Result<()> {
    install(sig, libc::SIG_DFL)
}

fn install(sig: libc::c_int, handler: libc::sighandler_t) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set the handler, an empty mask
    // and SA_RESTART (so that interrupted system calls resume), and the
    // handler only writes to a pipe.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        if sig == libc::SIGCHLD {
            act.sa_flags |= libc::SA_NOCLDSTOP;
        }
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Every signal blocked while it lives: around a fork, so that no handler
/// runs in the child before it has set up its own.
pub struct Blocked(libc::sigset_t);

impl Blocked {
    pub fn all() -> Blocked {
        // SAFETY: sigfillset/pthread_sigmask fill and swap sets we own.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            Blocked(old)
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// A signal's name for log lines.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "TERM",
        libc::SIGINT => "INT",
        libc::SIGHUP => "HUP",
        libc::SIGTTIN => "TTIN",
        libc::SIGTTOU => "TTOU",
        libc::SIGUSR2 => "USR2",
        libc::SIGCHLD => "CHLD",
        libc::SIGQUIT => "QUIT",
        libc::SIGKILL => "KILL",
        libc::SIGUSR1 => "USR1",
        libc::SIGSEGV => "SEGV",
        libc::SIGABRT => "ABRT",
        _ => "another signal",
    }
}

/// The signals in a serving process (a single process or a worker), read
/// on the runtime.
pub struct AsyncSignals {
    fd: tokio::io::unix::AsyncFd<SignalPipe>,
}

impl AsRawFd for SignalPipe {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl AsyncSignals {
    /// Must be called within the runtime.
    pub fn new(pipe: SignalPipe) -> io::Result<AsyncSignals> {
        // SAFETY: the pipe owns its descriptors, which stay open and the
        // same for as long as it lives, inside the AsyncFd.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pipe, tokio::io::Interest::READABLE)?
        };
        Ok(AsyncSignals { fd })
    }

    /// The next signal received.
    pub async fn recv(&self) -> libc::c_int {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let got = ready.get_inner().drain();
            if got.is_empty() {
                ready.clear_ready();
                continue;
            }
            // More than one at once is rare (a second INT comes seconds
            // later); give the rest back for the next call.
            for sig in &got[1..] {
                on_signal(*sig);
            }
            return got[0];
        }
    }
}
