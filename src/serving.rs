//! Serving from one process: the whole server (`-w 1`, no master), or one
//! worker forked by the master.  Both get an interpreter already loaded on
//! the main thread and listeners already bound; here the tokio runtime is
//! built (after any fork), the interpreter moves to its thread, lifespan
//! startup runs, and connections are served until the process is told to
//! stop.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::access_log;
use crate::cli::{EnvMode, Options};
use crate::cpu_affinity::{self, Binding};
use crate::error::StartupError;
use crate::exchange::ExchangeConfig;
use crate::interp::{LoadSpec, Loaded, Pool};
use crate::server::{Drain, RequestLimit, Server};
use crate::signals::{AsyncSignals, SignalPipe};
use crate::tls::Reloadable;
use crate::worker::{Channel, Orders, ToMaster};
use crate::{http1, http2, interp, process, server, sse, websocket};

/// Where access-log lines go, decided before the app loads (the file is
/// opened before the server gives up root).
pub enum AccessLogDest {
    Off,
    Stderr,
    File(std::fs::File),
}

/// What every serving process needs, decided before anything forks.
pub struct Prepared {
    pub opts: Options,
    pub spec: LoadSpec,
    pub format: access_log::Format,
    pub access_log: AccessLogDest,
    /// `--ssl-cert`: what every TLS connection is accepted with, read
    /// again on HUP.
    pub tls: Option<Arc<Reloadable>>,
    pub mode: EnvMode,
    pub mode_source: &'static str,
    /// The interpreters' IO::Async loop class, named in the startup line.
    pub loop_class: String,
}

/// Which process this is.
pub enum Role {
    /// The whole server.
    Single,
    /// Worker `number` (1, 2, ...) of a master.
    Worker {
        number: usize,
        channel: Channel,
        /// `--max-requests` for this worker, jitter included.
        request_limit: Option<u64>,
    },
}

/// Serve until told to stop.  In a worker, a failed lifespan startup has
/// been reported to the master when this returns its error.
pub fn serve(
    prepared: &Prepared,
    loaded: Loaded,
    listeners: Vec<crate::listen::BoundListener>,
    signals: SignalPipe,
    role: Role,
) -> Result<(), StartupError> {
    let opts = &prepared.opts;
    bind_cpus(opts.cpu_affinity, &role);
    let runtime = build_runtime(opts)?;
    let forked = matches!(role, Role::Worker { .. });
    let pool = Pool::start(
        opts.interpreters,
        loaded,
        forked,
        &prepared.spec,
        runtime.handle().clone(),
        opts.interpreter_scheduling,
    )?;
    let access_log = match &prepared.access_log {
        AccessLogDest::Off => None,
        AccessLogDest::Stderr => Some(
            access_log::Destination::open(None)
                .and_then(|dest| access_log::AccessLog::start_on(prepared.format.clone(), dest)),
        ),
        AccessLogDest::File(file) => Some(access_log::AccessLog::start_on(
            prepared.format.clone(),
            access_log::Destination::from_file(
                file.try_clone()
                    .map_err(|e| StartupError::Process(format!("access log: {e}")))?,
            ),
        )),
    }
    .transpose()
    .map_err(|e| StartupError::Interpreter(e.to_string()))?;
    let shown = crate::listen::describe_all(&listeners, prepared.tls.is_some());
    let request_limit = match &role {
        Role::Worker {
            request_limit: Some(n),
            ..
        } => Some(*n),
        _ => None,
    };
    let server = Arc::new(build_server(prepared, pool, access_log, request_limit));

    let entered = runtime.enter();
    for listener in &listeners {
        // A process the app forks must not keep the server's sockets after
        // the server stops: calls.c's fork handler closes these in it.
        // SAFETY: only records a descriptor number; the handler closes it
        // in forked children, never in this process.
        if unsafe { interp::ffi::pagi_close_in_forked_children(listener.fd()) } == 0 {
            tracing::warn!("a process the app forks keeps descriptor {}", listener.fd());
        }
    }
    let tokio_listeners = server::Listener::register_all(listeners)?;
    let signals = AsyncSignals::new(signals)
        .map_err(|e| StartupError::Process(format!("cannot watch signals: {e}")))?;
    let worker = match role {
        Role::Single => None,
        Role::Worker {
            number, channel, ..
        } => {
            // SAFETY: as for the listeners above.
            unsafe { interp::ffi::pagi_close_in_forked_children(channel.fd()) };
            let channel = Arc::new(
                channel
                    .into_async()
                    .map_err(|e| StartupError::Process(format!("cannot watch the master: {e}")))?,
            );
            if opts.heartbeat_timeout > 0 {
                let interval = Duration::from_millis(opts.heartbeat_timeout * 1000 / 5)
                    .max(Duration::from_millis(100));
                crate::worker::spawn_heartbeat(server.clone(), channel.clone(), interval);
            }
            Some((number, channel))
        }
    };

    if let Err(e) = server.pool.lifespan_startup(
        opts.lifespan,
        Options::timeout_opt(opts.lifespan_startup_timeout),
        worker.as_ref().map(|(number, _)| *number),
    ) {
        if let Some((_, channel)) = &worker {
            channel
                .channel()
                .tell_master(&ToMaster::Failed(failure_text(&e)));
        }
        server.pool.stop(Duration::from_secs(5));
        return Err(e);
    }

    drop(entered);
    let grace = Duration::from_secs(opts.shutdown_timeout);
    match worker {
        None => {
            announce_listening(prepared, &shown, server.pool.len(), None);
            process::announce_ready();
            if opts.daemonize {
                process::detach_stdio();
            }
            let shutdown = async {
                loop {
                    let sig = signals.recv().await;
                    match sig {
                        libc::SIGTERM | libc::SIGINT => {
                            tracing::info!("Received {}, shutting down", crate::signals::name(sig));
                            return Drain::Stop;
                        }
                        // This future runs on the thread that blocks on the
                        // runtime, not a network one: reading the files holds
                        // up no connection.
                        libc::SIGHUP if prepared.tls.is_some() => reload_tls_on_hup(
                            prepared.tls.as_deref(),
                            "the next connections use it",
                        ),
                        _ => tracing::info!(
                            "Received {}: ignored (restarts and upgrades need --workers 2 or more)",
                            crate::signals::name(sig)
                        ),
                    }
                }
            };
            runtime.block_on(server::serve(
                tokio_listeners,
                server.clone(),
                shutdown,
                second_interrupt(&signals),
                grace,
            ));
        }
        Some((number, channel)) => {
            tracing::info!("worker {number} (pid {}) ready", std::process::id());
            channel.channel().tell_master(&ToMaster::Ready);
            if opts.daemonize {
                process::detach_stdio();
            }
            let orders = Orders {
                channel,
                force: Arc::new(tokio::sync::Notify::new()),
            };
            let recycle = {
                let server = server.clone();
                async move {
                    match &server.request_limit {
                        Some(limit) => limit.reached.notified().await,
                        None => std::future::pending().await,
                    }
                }
            };
            let force = {
                let forced = orders.force.clone();
                let second = second_interrupt(&signals);
                async move {
                    tokio::select! {
                        _ = forced.notified() => {}
                        _ = second => {}
                    }
                }
            };
            runtime.block_on(server::serve(
                tokio_listeners,
                server.clone(),
                orders.drain(&signals, recycle),
                force,
                grace,
            ));
        }
    }

    server.pool.lifespan_shutdown(grace);
    server.pool.stop(Duration::from_secs(5));
    if let Some(log) = &server.exchange_config.access_log {
        log.close(access_log::CLOSE_WITHIN);
    }
    tracing::info!("Shutdown complete");
    Ok(())
}

/// The app's message for the master, without the server's wording around it.
fn failure_text(e: &StartupError) -> String {
    match e {
        StartupError::LifespanFailed(msg) => msg.trim_end().to_string(),
        other => other.to_string(),
    }
}

/// Resolves on an INT after the drain began: stop at once.
async fn second_interrupt(signals: &AsyncSignals) {
    while signals.recv().await != libc::SIGINT {}
}

/// The startup line: where the server listens, and how it runs.
pub fn announce_listening(
    prepared: &Prepared,
    shown: &[String],
    interpreters: usize,
    workers: Option<usize>,
) {
    let workers = workers
        .map(|n| format!(", workers: {n}"))
        .unwrap_or_default();
    tracing::info!(
        "mode: {} ({})",
        prepared.mode.as_str(),
        prepared.mode_source
    );
    tracing::info!(
        "pagi-rs {} listening on {} (pid {}{workers}, interpreters: {interpreters}, loop: {})",
        env!("CARGO_PKG_VERSION"),
        shown.join(", "),
        std::process::id(),
        prepared.loop_class,
    );
}

/// HUP with TLS: read the certificate, key and CA files again (a renewed
/// certificate, as certbot's deploy hook leaves it) and log the outcome.
/// `taken_up` says who serves the renewed certificate.  A file that cannot
/// be used is an error in the log and changes nothing: the certificate in
/// force stays.
pub fn reload_tls_on_hup(tls: Option<&Reloadable>, taken_up: &str) {
    let Some(tls) = tls else { return };
    match tls.reload() {
        Ok(fresh) => tracing::info!(
            "Received HUP: TLS certificate reloaded ({}); {taken_up}",
            fresh.certificate()
        ),
        Err(e) => tracing::error!(
            "Received HUP: TLS certificate not reloaded, the one in force stays ({}): {e}",
            tls.current().certificate()
        ),
    }
}

/// `--cpu-affinity`: done before the runtime's and the interpreters'
/// threads start, so that they inherit it.  A process that cannot be bound
/// serves unbound: the option is a speed-up, not a requirement.
fn bind_cpus(per_process: usize, role: &Role) {
    if per_process == 0 {
        return;
    }
    let slot = match role {
        Role::Single => 0,
        Role::Worker { number, .. } => number.saturating_sub(1),
    };
    match cpu_affinity::bind_this_process(per_process, slot) {
        Ok(Binding::Bound(cpus)) => tracing::info!(
            "threads kept on CPU {} (--cpu-affinity {per_process})",
            cpu_affinity::cpu_list(&cpus)
        ),
        Ok(Binding::AllAllowed { allowed }) => tracing::warn!(
            "--cpu-affinity {per_process}: the server may use only {allowed} CPU(s), so this process's threads stay on all of them"
        ),
        Err(e) => tracing::warn!(
            "--cpu-affinity {per_process}: cannot bind this process's threads to CPUs ({e}); they run wherever the kernel puts them"
        ),
    }
}

fn build_runtime(opts: &Options) -> Result<tokio::runtime::Runtime, StartupError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let from_env = std::env::var_os("TOKIO_WORKER_THREADS").is_some();
    let share = CpuShare {
        cpus,
        workers: opts.workers,
        interpreters: opts.interpreters,
    };
    if let Some(n) = network_threads(opts.network_threads, from_env, share) {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| StartupError::Process(format!("cannot start the runtime: {e}")))
}

/// What one process may take of the machine: its share of the CPUs and
/// the interpreter threads that use part of it.
#[derive(Clone, Copy, Debug)]
struct CpuShare {
    cpus: usize,
    /// Processes serving side by side (`-w`), each with its own threads.
    workers: usize,
    /// Interpreter threads in each process.
    interpreters: usize,
}

/// The network threads of one process: `--network-threads` when given,
/// else none set here when TOKIO_WORKER_THREADS is (tokio reads it), else
/// the CPUs every process's interpreters leave over, shared among the
/// worker processes (rounded up), at least one.  Interpreter threads need
/// cores too: on a 2-core machine one network thread beside one
/// interpreter served WebSocket echo 5-24 % faster than two, though two
/// served hello world and request bodies faster (bench/README.md, session
/// 39), so the choice is the operator's.  Shared, because each worker
/// sized by the whole machine would put `-w N` on N cores at N x (N - 1)
/// network threads: threads to wake and cores to cross, not work done.
fn network_threads(asked: Option<usize>, tokio_env_set: bool, share: CpuShare) -> Option<usize> {
    match asked {
        Some(n) => Some(n),
        None if tokio_env_set => None,
        None => {
            let workers = share.workers.max(1);
            let left_over = share
                .cpus
                .saturating_sub(workers.saturating_mul(share.interpreters));
            Some(left_over.div_ceil(workers).max(1))
        }
    }
}

fn build_server(
    prepared: &Prepared,
    pool: Pool,
    access_log: Option<access_log::AccessLog>,
    request_limit: Option<u64>,
) -> Server {
    let opts = &prepared.opts;
    // Request headers are copied for each request only when a log line
    // will name them: with the log off (production's default) a format
    // that would (json, combined) must cost nothing.
    let needs_headers = access_log.is_some() && prepared.format.needs_headers();
    let (shutting_down, shutdown_seen) = tokio::sync::watch::channel(false);
    Server {
        pool,
        exchange_config: Arc::new(ExchangeConfig {
            high_water: opts.write_high_watermark,
            low_water: opts.write_low_watermark,
            max_body: opts.max_body_size,
            read_buffer_size: opts.read_buffer_size,
            write_buffer_size: opts.write_buffer_size,
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
            read_window: websocket::Settings::read_window(opts.read_buffer_size),
            idle_timeout: Options::timeout_opt(opts.ws_idle_timeout),
            write_timeout: Options::timeout_opt(opts.timeout),
            close_timeout: Duration::from_secs(opts.ws_close_timeout),
            max_in_transit: opts.max_receive_queue.max(1),
            max_in_transit_bytes: websocket::Settings::transit_budget(opts.ws_message_limit()),
            max_send_backlog: prepared.spec.send_backlog,
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
        tls: prepared.tls.clone(),
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
        retiring: AtomicBool::new(false),
        request_limit: request_limit.map(|limit| RequestLimit {
            limit,
            reached: tokio::sync::Notify::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::{network_threads, CpuShare};

    fn default_for(cpus: usize, workers: usize, interpreters: usize) -> Option<usize> {
        let share = CpuShare {
            cpus,
            workers,
            interpreters,
        };
        network_threads(None, false, share)
    }

    #[test]
    fn network_threads_are_the_cpus_the_interpreters_leave_over() {
        assert_eq!(default_for(8, 1, 1), Some(7));
        assert_eq!(default_for(8, 1, 2), Some(6));
        assert_eq!(default_for(2, 1, 1), Some(1));
        assert_eq!(default_for(2, 1, 4), Some(1), "at least one");
        assert_eq!(default_for(1, 1, 1), Some(1));
    }

    #[test]
    fn workers_share_the_cpus_left_over() {
        assert_eq!(default_for(8, 8, 1), Some(1), "one core a worker");
        assert_eq!(default_for(8, 2, 1), Some(3), "(8 - 2) / 2");
        assert_eq!(default_for(8, 3, 1), Some(2), "5 / 3 rounded up");
        assert_eq!(default_for(16, 4, 2), Some(2), "(16 - 8) / 4");
        assert_eq!(default_for(2, 2, 1), Some(1), "at least one");
        assert_eq!(default_for(4, 16, 1), Some(1), "more workers than cores");
        assert_eq!(
            default_for(8, 0, 1),
            Some(7),
            "0 workers counts as one process"
        );
    }

    #[test]
    fn the_option_wins_and_tokio_env_is_left_to_tokio() {
        let share = CpuShare {
            cpus: 2,
            workers: 2,
            interpreters: 1,
        };
        assert_eq!(network_threads(Some(3), false, share), Some(3));
        assert_eq!(network_threads(Some(3), true, share), Some(3));
        assert_eq!(network_threads(None, true, share), None);
    }
}
