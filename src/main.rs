//! pagi-rs: serve a PAGI application from a Rust network core.
//!
//! The path of one request: `server` accepts the connection and picks its
//! protocol; `http1::connection` (hyper) or `http2::connection` and
//! `http2::stream` (h2) parse it and hand it to `service`, which builds the
//! scope (`scope`) and the `exchange`; an `interp::Pool` thread runs the app
//! (perl/PAGI/RS/*.pm through `interp::exports`); the app's events drive
//! the exchange, whose queue the protocol drains through
//! `body::ResponseBody` onto the wire.

mod access_log;
mod body;
mod cli;
mod error;
mod exchange;
mod file;
mod http1;
mod http2;
mod interp;
mod listen;
mod logging;
mod proxy;
mod scope;
mod server;
mod service;
mod spec;
mod sse;
mod tls;
mod websocket;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::Options;
use crate::error::StartupError;
use crate::exchange::ExchangeConfig;
use crate::interp::{LoadSpec, Pool};
use crate::server::Server;

/// Per-request allocations (scope, exchange, frames) cross threads; mimalloc
/// handles that pattern with far less contention than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let opts = Options::parse();
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
    let format = match access_log::Format::parse(opts.effective_access_log_format()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pagi-rs: {e}");
            return ExitCode::from(2);
        }
    };
    // The error log takes stderr before anything else can be said there:
    // the app's load errors and warnings, bind errors, and all that follows.
    let error_log = opts
        .error_log
        .as_deref()
        .map_or(Ok(()), logging::redirect_stderr_to);
    logging::init(opts.effective_log_level(), opts.log_format);
    if let Err(e) = error_log {
        logging::startup_error(&e);
        return ExitCode::FAILURE;
    }
    if opts.forwarded_allow_ips.is_some() && !opts.proxy_headers {
        tracing::warn!("--forwarded-allow-ips has no effect without --proxy-headers");
    }
    // Here, while this is the only thread and before Perl copies the
    // environment into %ENV: systemd's LISTEN_* variables are removed.
    let inherited = match listen::take_inherited() {
        Ok(listeners) => listeners,
        Err(e) => {
            logging::startup_error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };

    // SAFETY: once, on the main thread, before any interpreter exists.  The
    // exit guard must be in place before any application code is compiled;
    // signal forwarding before any app can set %SIG.
    unsafe {
        interp::ffi::pagi_sys_init();
        interp::ffi::pagi_install_exit_guard();
        interp::ffi::pagi_install_signal_forwarding();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        // Interpreter threads need cores too: network threads that outnumber
        // the cores left over only park and unpark waiting for them.
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        builder.worker_threads(cores.saturating_sub(opts.interpreters).max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            logging::startup_error(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
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
    };
    match run(&opts, spec, format, &runtime, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                StartupError::AppLoad(msg) => logging::startup_error(&format!(
                    "cannot load the application:\n{}",
                    msg.trim_end()
                )),
                other => logging::startup_error(&other.to_string()),
            }
            ExitCode::FAILURE
        }
    }
    // PERL_SYS_TERM is deliberately not called: the process is ending, and
    // it is only safe once every interpreter is destroyed.
}

fn run(
    opts: &Options,
    spec: LoadSpec,
    format: access_log::Format,
    runtime: &tokio::runtime::Runtime,
    inherited: Vec<listen::BoundListener>,
) -> Result<(), StartupError> {
    // Certificates and keys are read before anything else: a bad file is
    // reported before the app loads and before any port is bound.
    let tls = match opts.tls_settings()? {
        Some(settings) => Some(Arc::new(
            settings.load(tls::OFFERED_PROTOCOLS, opts.handshake_timeout())?,
        )),
        None => None,
    };
    let access_log = if opts.no_access_log {
        None
    } else {
        Some(
            access_log::AccessLog::start(format.clone(), opts.access_log.clone())
                .map_err(|e| StartupError::Interpreter(e.to_string()))?,
        )
    };
    let needs_headers = format.needs_headers();

    let pool = Pool::start(opts.interpreters, &spec, runtime.handle().clone())?;

    // Dropped at the end of run, successful or not: the Unix socket files
    // bound here are removed.
    let listen::Bound {
        listeners,
        socket_files: _socket_files,
    } = listen::bind_all(&opts.listen_config(), inherited)?;
    let shown = listen::describe_all(&listeners, tls.is_some());
    for listener in &listeners {
        // A process the app forks must not keep the server's sockets after
        // the server stops: calls.c's fork handler closes these in it.
        // SAFETY: only records a descriptor number; the handler closes it
        // in forked children, never in this process.
        if unsafe { interp::ffi::pagi_close_in_forked_children(listener.fd()) } == 0 {
            tracing::warn!("a process the app forks keeps descriptor {}", listener.fd());
        }
    }
    let listeners = {
        let _enter = runtime.enter();
        server::Listener::register_all(listeners)?
    };

    pool.lifespan_startup(
        opts.lifespan,
        Options::timeout_opt(opts.lifespan_startup_timeout),
    )?;

    let (shutting_down, shutdown_seen) = tokio::sync::watch::channel(false);
    let server = Arc::new(Server {
        pool,
        exchange_config: Arc::new(ExchangeConfig {
            high_water: opts.write_high_watermark,
            low_water: opts.write_low_watermark,
            max_body: opts.max_body_size,
            body_rate: opts.body_min_rate(),
            access_log,
            streams: sse::StreamSettings {
                idle_timeout: Options::timeout_opt(opts.sse_idle_timeout),
                shutdown: shutdown_seen,
            },
            spec: opts.spec_version,
        }),
        websocket: Arc::new(websocket::Settings {
            max_frame_size: (opts.max_ws_frame_size > 0).then_some(opts.max_ws_frame_size),
            max_message_size: opts.ws_message_limit(),
            idle_timeout: Options::timeout_opt(opts.ws_idle_timeout),
            close_timeout: Duration::from_secs(opts.ws_close_timeout),
            max_in_transit: opts.max_receive_queue.max(1),
            max_in_transit_bytes: websocket::Settings::transit_budget(opts.ws_message_limit()),
            max_send_backlog: spec.send_backlog,
            queued_message_cost: websocket::QUEUED_MESSAGE_COST,
        }),
        http2: http2::Settings {
            cleartext: opts.http2,
            max_concurrent_streams: opts.h2_max_concurrent_streams,
            initial_window_size: opts.h2_initial_window_size,
            max_frame_size: opts.h2_max_frame_size,
            max_header_list_size: opts.h2_max_header_list_size,
            rst_burst: opts.h2_rst_burst,
            rst_per_second: opts.h2_rst_rate,
            idle_timeout: Options::timeout_opt(opts.timeout),
        },
        shutting_down,
        detached: Default::default(),
        max_connections: opts.connection_limit(),
        max_queued_requests: opts.max_queued_requests,
        tls,
        root_path: opts.root_path.clone(),
        proxy_headers: opts.trusted_proxies().ok().flatten().map(Arc::new),
        max_header_size: opts.max_header_size,
        max_header_count: opts.max_header_count,
        request_timeout: Options::timeout_opt(opts.request_timeout),
        keepalive_timeout: Options::timeout_opt(opts.timeout),
        access_log_needs_headers: needs_headers,
        gate_limits: http1::gate::Limits {
            max_header_size: opts.max_header_size,
            max_header_count: opts.max_header_count,
            max_body: opts.max_body_size,
        },
    });

    tracing::info!(
        "pagi-rs {} listening on {} (pid {}, interpreters: {}, loop: IO::Async)",
        env!("CARGO_PKG_VERSION"),
        shown.join(", "),
        std::process::id(),
        server.pool.len()
    );

    let grace = Duration::from_secs(opts.shutdown_timeout);
    runtime.block_on(server::serve(
        listeners,
        server.clone(),
        shutdown_signal(),
        grace,
    ));

    server.pool.lifespan_shutdown(grace);
    server.pool.stop(Duration::from_secs(5));
    if let Some(log) = &server.exchange_config.access_log {
        log.close(access_log::CLOSE_WITHIN);
    }
    tracing::info!("Shutdown complete");
    Ok(())
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "TERM",
        _ = int.recv() => "INT",
    };
    tracing::info!("Received {name}, shutting down");
}
