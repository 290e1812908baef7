//! pagi-rs: serve a PAGI application from a Rust network core.
//!
//! The path of one request: `server` accepts the connection and picks its
//! protocol; `http1::connection` (hyper) or `http2::connection` and
//! `http2::stream` (h2) parse it and hand it to `service`, which builds the
//! scope (`scope`) and the `exchange`; an `interp::Pool` thread runs the app
//! (perl/PAGI/RS/*.pm through `interp::exports`); the app's events drive
//! the exchange, whose queue the protocol drains through
//! `body::ResponseBody` onto the wire.
//!
//! The processes: `main` binds the listeners and loads the app on its main
//! thread (`interp::load`), then either serves from this process
//! (`serving`), or becomes the master (`supervisor`) that forks workers,
//! each serving from its copy of the loaded app (`serving`, `worker`).
//! `process` holds daemonizing, the pid file, privileges and `-E`;
//! `signals` the server's own signal handling.

mod accept_queues;
mod access_log;
mod allocator;
mod body;
mod cli;
mod cpu_affinity;
mod dormant;
mod error;
mod exchange;
mod file;
mod host;
mod http1;
mod http2;
mod interp;
mod listen;
mod logging;
mod process;
mod proxy;
mod scope;
mod server;
mod service;
mod serving;
mod signals;
mod spec;
mod sse;
mod supervisor;
mod tls;
mod websocket;
mod worker;
mod write_stall;

use std::process::ExitCode;
use std::sync::Arc;

use crate::cli::{EnvMode, Options};
use crate::error::StartupError;
use crate::interp::LoadSpec;
use crate::serving::{AccessLogDest, Prepared, Role};
use crate::supervisor::Inherited;

/// mimalloc, for allocations that cross threads (see allocator.rs).
#[global_allocator]
static GLOBAL: allocator::Allocator = allocator::Allocator;

fn main() -> ExitCode {
    let opts = Options::parse_reference_spellings();
    if let Err(e) = opts.validate() {
        eprintln!("pagi-rs: {e}");
        return ExitCode::from(2);
    }
    let (app, args) = match opts.app_spec() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pagi-rs: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread exists: these set environment variables and
    // Perl's allocator's limits.  The mode comes first: it chooses the
    // logs' default format.
    let process::ResolvedMode {
        mode,
        source: mode_source,
        not_a_mode,
    } = process::resolve_env_mode(&opts);
    let format = match access_log::Format::parse(opts.effective_access_log_format(mode)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pagi-rs: {e}");
            return ExitCode::from(2);
        }
    };
    interp::malloc::keep_freed_memory();
    interp::prefer_pure_perl_future();
    // The error log takes stderr before anything else can be said there:
    // the app's load errors and warnings, bind errors, and all that follows.
    let error_log = opts
        .error_log
        .as_deref()
        .map_or(Ok(()), logging::redirect_stderr_to);
    logging::init(opts.effective_log_level(), opts.effective_log_format(mode));
    if let Err(e) = error_log {
        logging::startup_error(&e);
        return ExitCode::FAILURE;
    }
    if opts.forwarded_allow_ips.is_some() && !opts.proxy_headers {
        tracing::warn!("--forwarded-allow-ips has no effect without --proxy-headers");
    }
    if let Some(value) = not_a_mode {
        tracing::warn!(
            "PAGI_ENV={value} is not a mode (development, production, none); using none"
        );
    }
    warn_of_reference_only_settings(&opts);
    // Here, while this is the only thread and before Perl copies the
    // environment into %ENV: systemd's LISTEN_* variables and a binary
    // upgrade's are removed.
    let systemd = match listen::take_inherited() {
        Ok(listeners) => listeners,
        Err(e) => {
            logging::startup_error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };
    let upgrade = match Inherited::from_env() {
        Ok(i) => i,
        Err(e) => {
            logging::startup_error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };
    // A binary upgrade's new master runs where the old one did, detached
    // already if it was.
    if opts.daemonize && upgrade.is_none() {
        if let Err(e) = process::daemonize() {
            logging::startup_error(&format!("cannot daemonize: {e}"));
            return ExitCode::FAILURE;
        }
    }
    let pid_file = match &opts.pid_file {
        Some(path) => {
            match process::PidFile::create(path, upgrade.as_ref().and_then(|i| i.old_master)) {
                Ok(f) => Some(f),
                Err(e) => {
                    logging::startup_error(&e.to_string());
                    process::announce_failure(1);
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };

    // SAFETY: once, on the main thread, before any interpreter exists.  The
    // exit guard must be in place before any application code is compiled;
    // signal forwarding before any app can set %SIG; the method cache's
    // switch before any interpreter thread reads it.
    unsafe {
        interp::ffi::pagi_sys_init();
        interp::ffi::pagi_method_cache_setup(libc::c_int::from(method_cache_wanted()));
        interp::ffi::pagi_install_exit_guard();
        interp::ffi::pagi_install_signal_forwarding();
    }
    let spec = LoadSpec {
        app,
        args,
        include: opts.include.clone(),
        modules: opts.modules.clone(),
        high_water: opts.write_high_watermark,
        low_water: opts.write_low_watermark,
        max_receive_queue: opts.max_receive_queue,
        max_ws_frame_size: opts.max_ws_frame_size,
        max_unread_bytes: websocket::Settings::unread_budget(opts.ws_message_limit()),
        send_backlog: opts
            .write_high_watermark
            .saturating_mul(websocket::SEND_BACKLOG_HIGH_WATERS),
        queued_message_cost: websocket::QUEUED_MESSAGE_COST,
        spec: opts.spec_version,
        max_disconnect_receives: opts.max_disconnect_receives,
        lint: mode == EnvMode::Development && !opts.no_default_middleware,
        loop_backend: opts.loop_backend.clone(),
    };
    let code = match run(opts, spec, format, mode, mode_source, systemd, upgrade) {
        Ok(()) => 0,
        Err(e) => {
            match &e {
                StartupError::AppLoad(msg) => logging::startup_error(&format!(
                    "cannot load the application:\n{}",
                    msg.trim_end()
                )),
                other => logging::startup_error(&other.to_string()),
            }
            1
        }
    };
    process::announce_failure(code);
    drop(pid_file);
    ExitCode::from(code)
    // PERL_SYS_TERM is deliberately not called: the process is ending, and
    // it is only safe once every interpreter is destroyed.
}

/// The reference server's settings that a command line or environment
/// carried over may hold and that change nothing here: said once at
/// startup, so that nobody tunes them in vain.
fn warn_of_reference_only_settings(opts: &Options) {
    if opts.future_xs {
        tracing::warn!(
            "--future-xs is unavailable: Future::XS is not used ({}=1 unless the environment \
             sets it, as in the reference server); continuing without it",
            interp::FUTURE_NO_XS
        );
    }
    if std::env::var_os("PAGI_FUTURE_XS").is_some_and(|v| !v.is_empty() && v != "0") {
        tracing::warn!("PAGI_FUTURE_XS is ignored: Future::XS is not used");
    }
    if let Some(bytes) = opts.sync_file_threshold {
        tracing::info!(
            "--sync-file-threshold {bytes} has no effect: a file body is read at once when the \
             page cache holds it, and off the event loop otherwise, whatever its size"
        );
    }
}

/// Whether the interpreters cache the methods that call_method finds
/// (src/interp/c/method_cache.c): yes, unless `PAGI_RS_METHOD_CACHE=0`, the
/// switch for ruling the cache out when chasing a problem.
fn method_cache_wanted() -> bool {
    std::env::var_os("PAGI_RS_METHOD_CACHE").is_none_or(|v| v != "0")
}

fn run(
    opts: Options,
    spec: LoadSpec,
    format: access_log::Format,
    mode: EnvMode,
    mode_source: &'static str,
    systemd: Vec<listen::BoundListener>,
    upgrade: Option<Inherited>,
) -> Result<(), StartupError> {
    // Certificates and keys are read before anything else: a bad file is
    // reported before the app loads and before any port is bound.
    let tls = match opts.tls_settings()? {
        Some(settings) => Some(Arc::new(tls::Reloadable::load(
            settings,
            tls::OFFERED_PROTOCOLS,
            opts.handshake_timeout(),
        )?)),
        None => None,
    };
    // Production (-E) logs no requests unless told where to.
    let access_log = if opts.no_access_log
        || (mode == EnvMode::Production && opts.access_log.is_none())
    {
        AccessLogDest::Off
    } else if let Some(path) = &opts.access_log {
        AccessLogDest::File(
            access_log::open_file(path).map_err(|e| StartupError::Interpreter(e.to_string()))?,
        )
    } else {
        AccessLogDest::Stderr
    };
    // A binary upgrade's sockets, like systemd's, are taken over rather
    // than bound again: the addresses they serve match the options.
    let mut inherited = systemd;
    let mut inherited_queues = accept_queues::InheritedQueues::new();
    if let Some(upgrade) = upgrade {
        inherited.extend(upgrade.listeners);
        inherited_queues = upgrade.queues;
    }
    let listen_config = opts.listen_config();
    // With --reuseport, workers get accept queues of their own, bound
    // with the listeners (before --user drops the right to).
    let master = opts.needs_master();
    let queue_slots = (opts.reuseport && master).then_some(opts.workers.max(1));
    let tls_configured = tls.is_some();
    let listen = move || -> Result<_, StartupError> {
        let listen::Bound {
            listeners,
            socket_files,
        } = listen::bind_all(&listen_config, inherited)?;
        // The master names them once; a single process does in serve.
        let shown = if master {
            listen::describe_all(&listeners, tls_configured)
        } else {
            Vec::new()
        };
        let queues = match queue_slots {
            Some(slots) => accept_queues::AcceptQueues::per_worker(
                listeners,
                slots,
                listen_config.backlog,
                inherited_queues,
            )?,
            None => accept_queues::AcceptQueues::shared(listeners),
        };
        Ok((queues, shown, socket_files))
    };
    // The app loads before anything is bound (a broken app never holds the
    // port), except under --user/--group: binding a privileged port needs
    // root, and the app must not load as root.
    let (loaded, bound) = if opts.user.is_some() || opts.group.is_some() {
        let bound = listen()?;
        process::drop_privileges(opts.user.as_deref(), opts.group.as_deref())
            .map_err(StartupError::Process)?;
        (interp::load(&spec)?, bound)
    } else {
        let loaded = interp::load(&spec)?;
        (loaded, listen()?)
    };
    // `_socket_files` is dropped when run returns, successful or not: the
    // Unix socket files this process bound are removed (by this process
    // only, never by a worker).
    let (queues, shown, _socket_files) = bound;
    let prepared = Prepared {
        opts,
        spec,
        format,
        access_log,
        tls,
        mode,
        mode_source,
        loop_class: loaded.loop_class().to_string(),
    };
    if prepared.opts.needs_master() {
        if queues.per_worker_addresses() > 0 {
            tracing::info!(
                "--reuseport: each worker accepts from an accept queue of its own on {} of the addresses",
                queues.per_worker_addresses()
            );
        }
        return supervisor::run(prepared, loaded, queues, shown);
    }
    const SERVER_SIGNALS: [libc::c_int; 4] =
        [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2];
    let signal_pipe = signals::SignalPipe::open(&SERVER_SIGNALS)
        .map_err(|e| StartupError::Process(format!("cannot set up signals: {e}")))?;
    for sig in SERVER_SIGNALS {
        signals::handle(sig)
            .map_err(|e| StartupError::Process(format!("cannot handle signals: {e}")))?;
    }
    serving::serve(
        &prepared,
        loaded,
        queues.into_listeners(),
        signal_pipe,
        Role::Single,
    )
}
