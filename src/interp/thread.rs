//! The body of one interpreter thread: build the interpreter, load the app,
//! run the IO::Async loop until told to stop, then destroy the interpreter.

use std::ffi::CString;
use std::os::raw::c_char;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::embedded::BOOTSTRAP;
use super::exports;
use super::ffi::{self, PagiStr, PerlInterpreter};
use super::mailbox::Mailbox;
use super::{Control, LoadSpec};
use crate::cli::AppSpec;

/// Each level of nested async resumption costs about 1 KB of C stack; the
/// 2 MiB default overflows on deep await chains.
const STACK_SIZE: usize = 64 * 1024 * 1024;

/// perl_alloc initialises process globals without a lock, and module loading
/// touches shared state: one interpreter is built and loaded at a time.
static CONSTRUCTION: Mutex<()> = Mutex::new(());

pub fn spawn(
    index: usize,
    mailbox: Arc<Mailbox>,
    control: mpsc::Sender<Control>,
    runtime: tokio::runtime::Handle,
    spec: LoadSpec,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("perl-{index}"))
        .stack_size(STACK_SIZE)
        .spawn(move || run(mailbox, control, runtime, spec))
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

fn run(
    mailbox: Arc<Mailbox>,
    control: mpsc::Sender<Control>,
    runtime: tokio::runtime::Handle,
    spec: LoadSpec,
) {
    // The lock guards no data, only the order of constructions: a thread
    // that panicked holding it leaves nothing to repair.
    let guard = CONSTRUCTION.lock().unwrap_or_else(|p| p.into_inner());
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
        let _ = control.send(Control::Loaded(Err(
            "could not construct a Perl interpreter".into(),
        )));
        let _ = control.send(Control::Exited);
        return;
    }
    let interp = Interp(raw);
    // SAFETY: called on the interpreter's own thread, which it stays on
    // until pagi_interp_free (which removes it again).
    unsafe { ffi::pagi_add_signal_target(interp.0) };
    exports::install(mailbox.clone(), control.clone(), runtime);

    let loaded = load(&interp, &mailbox, &spec);
    let ok = loaded.is_ok();
    let _ = control.send(Control::Loaded(loaded));
    drop(guard);

    if ok {
        if let Err(e) = interp.call("PAGI::RS::Bridge::run", &[]) {
            tracing::error!("interpreter loop ended with an error: {}", e.trim_end());
        }
    }
    exports::uninstall();
    // SAFETY: the interpreter is current on this thread and nothing else uses it.
    unsafe { ffi::pagi_interp_free(interp.0) };
    let _ = control.send(Control::Exited);
}

fn load(interp: &Interp, mailbox: &Mailbox, spec: &LoadSpec) -> Result<(), String> {
    interp
        .eval(BOOTSTRAP)
        .map_err(|e| format!("pagi-rs bridge failed to load: {e}"))?;
    let fd = mailbox.dup_wake_fd().map_err(|e| e.to_string())?;
    interp.call(
        "PAGI::RS::Bridge::init",
        &[
            fd.to_string().as_bytes(),
            spec.high_water.to_string().as_bytes(),
            spec.low_water.to_string().as_bytes(),
            spec.max_receive_queue.to_string().as_bytes(),
            spec.max_ws_frame_size.to_string().as_bytes(),
            spec.max_unread_bytes.to_string().as_bytes(),
            spec.spec.www().as_bytes(),
            spec.spec.core().as_bytes(),
            spec.max_disconnect_receives.to_string().as_bytes(),
            spec.send_backlog.to_string().as_bytes(),
            spec.queued_message_cost.to_string().as_bytes(),
        ],
    )?;
    let (kind, what) = match &spec.app {
        AppSpec::File(f) => ("file", f.as_str()),
        AppSpec::Module(m) => ("module", m.as_str()),
        AppSpec::Inline(code) => ("inline", code.as_str()),
    };
    let mut args: Vec<Vec<u8>> = vec![kind.into(), what.into()];
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
        interp.call("PAGI::RS::Loader::route_warnings_to_log", &[])?;
    }
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
    interp.call("PAGI::RS::Loader::load", &refs).map(|_| ())
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

    /// A signal for which the app set a handler goes to that interpreter's
    /// thread while it lives, and to no thread once it is freed; and the
    /// freed interpreter is no longer this thread's context.
    #[test]
    fn a_freed_interpreter_gets_no_signal_and_is_no_context() {
        perl_once();
        std::thread::Builder::new()
            .stack_size(STACK_SIZE)
            .spawn(|| {
                let argv: &'static mut [*mut c_char; 4] = Box::leak(Box::new([
                    CString::new("pagi-rs-test").unwrap().into_raw(),
                    CString::new("-e").unwrap().into_raw(),
                    CString::new("0").unwrap().into_raw(),
                    std::ptr::null_mut(),
                ]));
                let _guard = CONSTRUCTION.lock().unwrap_or_else(|p| p.into_inner());
                // SAFETY: as in `run`: argv outlives the interpreter, which
                // stays on this thread until freed below.
                let raw = unsafe { ffi::pagi_interp_new(3, argv.as_mut_ptr()) };
                assert!(!raw.is_null());
                let interp = Interp(raw);
                // SAFETY: on the interpreter's own thread.
                unsafe { ffi::pagi_add_signal_target(raw) };
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
}
