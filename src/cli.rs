//! Command-line options.  Names, short flags and defaults follow the reference
//! server's `pagi-server`, so that `pagi-rs app.pl` is a drop-in replacement.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, Parser, ValueEnum};

/// How the lifespan protocol is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LifespanMode {
    /// Run lifespan; an app that declines it (raises or returns) is served anyway.
    Auto,
    /// Require lifespan: a declined startup is fatal.
    On,
    /// Do not run lifespan at all.
    Off,
}

/// `-E`: what the reference runner's environment modes change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EnvMode {
    /// The app is wrapped in PAGI::Middleware::Lint when PAGI-Tools is installed.
    Development,
    /// No access log unless --access-log names a file; no middleware.
    Production,
    /// No middleware; defaults otherwise as in development.
    None,
}

impl EnvMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvMode::Development => "development",
            EnvMode::Production => "production",
            EnvMode::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<EnvMode> {
        match s {
            "development" => Some(EnvMode::Development),
            "production" => Some(EnvMode::Production),
            "none" => Some(EnvMode::None),
            _ => None,
        }
    }
}

/// Log verbosity, as in the reference server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// How server log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people: `<time> <LEVEL> <message>`.
    Text,
    /// For log shippers: one JSON object per line.
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "pagi-rs",
    version,
    about = "Serve a PAGI (Perl async web) application from a Rust network core",
    disable_version_flag = true,
    override_usage = "pagi-rs [OPTIONS] [APP] [KEY=VALUE]...\n       pagi-rs [OPTIONS] -e CODE"
)]
pub struct Options {
    /// The application: a file returning a PAGI app (app.pl, app.psgi) or a
    /// module name (My::App), followed by key=value constructor arguments.
    #[arg(value_name = "APP")]
    pub positional: Vec<String>,

    /// Application file (the same as giving it as the first argument).
    #[arg(short = 'a', long = "app", value_name = "FILE")]
    pub app: Option<String>,

    /// Inline application code, like `perl -e`; must return a PAGI app.
    #[arg(short = 'e', value_name = "CODE")]
    pub eval: Option<String>,

    /// Load MODULE before evaluating -e code (Module=a,b imports a and b).
    #[arg(short = 'M', value_name = "MODULE", action = ArgAction::Append)]
    pub modules: Vec<String>,

    /// Add PATH to @INC before loading the app; repeatable.
    #[arg(short = 'I', long = "lib", value_name = "PATH", action = ArgAction::Append)]
    pub include: Vec<String>,

    /// Bind address [default: 127.0.0.1].
    #[arg(short = 'o', long)]
    pub host: Option<String>,

    /// Bind port (0 picks a free port; the startup line names it)
    /// [default: 5000].
    #[arg(short = 'p', long)]
    pub port: Option<u16>,

    /// Listen on a Unix socket at PATH instead of TCP.  A stale socket file
    /// there is replaced; the file is removed at exit.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["host", "port"])]
    pub socket: Option<PathBuf>,

    /// Permissions of the Unix socket files, in octal (e.g. 0660).
    /// Default: from the umask.
    #[arg(long, value_name = "MODE", value_parser = crate::listen::parse_socket_mode)]
    pub socket_mode: Option<u32>,

    /// Listen on ADDR: HOST:PORT, [IPv6]:PORT or unix:PATH (a path
    /// starting with / or . also works).  Repeatable; instead of
    /// --host/--port/--socket.
    #[arg(long, value_name = "ADDR", action = ArgAction::Append,
          conflicts_with_all = ["host", "port", "socket"])]
    pub listen: Vec<crate::listen::ListenAddr>,

    /// Set SO_REUSEPORT on TCP listeners, so that other processes can bind
    /// the same address (the kernel spreads connections across them).
    #[arg(long)]
    pub reuseport: bool,

    /// Length of each listener's queue of connections not yet accepted.
    #[arg(short = 'b', long, value_name = "N", default_value_t = crate::listen::DEFAULT_BACKLOG)]
    pub listener_backlog: u32,

    /// Application mount path, reported as root_path in every scope.
    #[arg(long, value_name = "PATH", default_value = "")]
    pub root_path: String,

    /// Behind a reverse proxy: take the client address, the scheme and the
    /// host from Forwarded or X-Forwarded-For/-Proto/-Host, on connections
    /// from a peer --forwarded-allow-ips trusts.  Default: off.
    #[arg(long)]
    pub proxy_headers: bool,

    /// Who may set the proxy headers, comma-separated: IP addresses,
    /// networks (10.0.0.0/8), `*` for everyone, `unix:` for Unix-socket
    /// peers, or other literals as a proxy writes them in place of an
    /// address.  Default: $FORWARDED_ALLOW_IPS if set, else 127.0.0.1.
    #[arg(long, value_name = "LIST")]
    pub forwarded_allow_ips: Option<String>,

    /// Write the access log to FILE (appending) instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub access_log: Option<PathBuf>,

    /// Disable the access log.
    #[arg(long)]
    pub no_access_log: bool,

    /// Access log format: clf, combined, common, tiny, json, or a format
    /// string of %-atoms.  Default: clf (json with --log-format json).
    #[arg(long, value_name = "FORMAT")]
    pub access_log_format: Option<String>,

    /// Log verbosity.
    #[arg(long, value_enum)]
    pub log_level: Option<LogLevel>,

    /// Report errors only (shorthand for --log-level error; an explicit --log-level wins).
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Server log lines: text, or json (one object per line).  Default:
    /// json in production mode (-E), text otherwise, as the reference's.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Send the server's log and the app's STDERR (Perl warnings, die
    /// messages) to FILE, appending; opened before the app is loaded.
    #[arg(long, value_name = "FILE")]
    pub error_log: Option<PathBuf>,

    /// Largest request body accepted, in bytes (0 = unlimited); larger gets 413.
    #[arg(long, value_name = "BYTES", default_value_t = 10_000_000)]
    pub max_body_size: u64,

    /// Largest request head (request line and headers), in bytes; larger gets 431.
    #[arg(long, value_name = "BYTES", default_value_t = 8192)]
    pub max_header_size: usize,

    /// Most request header lines accepted; more gets 431.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_header_count: usize,

    /// Largest number of inbound messages queued for an application that is
    /// not receiving (WebSocket); bounds memory per connection.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_receive_queue: usize,

    /// Largest WebSocket frame payload accepted, in bytes; a larger frame
    /// fails the connection with 1009.  0 = no limit.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub max_ws_frame_size: usize,

    /// Largest WebSocket message accepted, in bytes, once its frames are
    /// reassembled; a larger one fails the connection with 1009.  It also
    /// bounds the bytes of received messages an application leaves unread:
    /// past it the socket closes with 1008 (one message always fits).
    /// 0 = no limit on a message (the unread bound is then 16 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    pub max_ws_message_size: usize,

    /// Close a WebSocket with no frame in either direction for this many
    /// seconds; 0 disables.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub ws_idle_timeout: u64,

    /// Close an SSE stream that sent nothing (events, comments) for this many
    /// seconds; 0 disables.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub sse_idle_timeout: u64,

    /// Most connections open at once (WebSockets included); past it a new
    /// connection is answered 503 with Retry-After and closed.  0: from the
    /// open-file limit (ulimit -n), less a reserve for files and the
    /// interpreter's own descriptors.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_connections: usize,

    /// Most requests waiting for a busy interpreter to take them; past it a
    /// new request is answered 503 with Retry-After instead of queueing.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_queued_requests: usize,

    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Close a request that makes no progress (no body read, no response write)
    /// for this many seconds; 0 disables.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub request_timeout: u64,

    /// Keep-alive idle timeout, and the deadline for a request head: seconds
    /// to wait for the next head to be complete (trickled bytes do not
    /// extend it); 0 disables.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,

    /// Request body bytes per second a client must average once the server
    /// has waited --body-rate-grace seconds for its body; slower gets 408.
    /// Only time spent waiting for the client counts.  0 disables.
    #[arg(long, value_name = "BYTES", default_value_t = 500)]
    pub body_min_rate: u64,

    /// Seconds of waiting for a request body before --body-min-rate applies.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub body_rate_grace: u64,

    /// Lifespan protocol handling.
    #[arg(long, value_enum, default_value = "auto")]
    pub lifespan: LifespanMode,

    /// Seconds to wait for lifespan startup to complete; 0 waits forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub lifespan_startup_timeout: u64,

    /// Largest http.request event, in bytes: request-body bytes already
    /// received are joined into one event up to this size (and a larger
    /// read is split).  As the reference's --read-buffer-size.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub read_buffer_size: usize,

    /// Largest piece of a response body handed to the connection at once:
    /// an app's larger body event, and each read of a file or fh body, is
    /// cut to this size (on HTTP/1.1 chunked framing, one chunk each).  As
    /// the reference's --write-buffer-size, with a larger default.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub write_buffer_size: usize,

    /// A body $send waits once this many bytes are queued for the client.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    pub write_high_watermark: usize,

    /// ...and resumes when the queue falls below this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 16384)]
    pub write_low_watermark: usize,

    /// Which PAGI to speak: 0.6 (Www 0.6, core 0.5) or 0.3 for apps written
    /// against Www 0.3 (see README).
    #[arg(long, value_enum, value_name = "VERSION", default_value = "0.6")]
    pub spec_version: crate::spec::SpecVersion,

    /// Bound on each closing phase of a WebSocket: waiting for the peer's
    /// Close, then for the connection to close.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub ws_close_timeout: u64,

    /// Receives answered with the disconnect event again after a scope has
    /// ended; the next one fails (an app that never checks would spin).
    /// 0: no bound, as in the reference.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_disconnect_receives: u32,

    /// Serve cleartext HTTP/2 (h2c) to clients that open with the HTTP/2
    /// preface (prior knowledge), beside HTTP/1.1 on the same port.  Over
    /// TLS, h2 is always offered by ALPN.
    #[arg(long)]
    pub http2: bool,

    /// HTTP/2: most streams open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub h2_max_concurrent_streams: u32,

    /// HTTP/2: each stream's receive window, in bytes
    /// (SETTINGS_INITIAL_WINDOW_SIZE): how much of a request body a client
    /// may send before the application reads it.
    #[arg(long, value_name = "BYTES", default_value_t = 65_535)]
    pub h2_initial_window_size: u32,

    /// HTTP/2: the largest frame payload accepted (SETTINGS_MAX_FRAME_SIZE,
    /// 16384 to 16777215).
    #[arg(long, value_name = "BYTES", default_value_t = 16_384)]
    pub h2_max_frame_size: u32,

    /// HTTP/2: the largest request header list, in bytes
    /// (SETTINGS_MAX_HEADER_LIST_SIZE); larger is refused with 431.
    #[arg(long, value_name = "BYTES", default_value_t = 65_536)]
    pub h2_max_header_list_size: u32,

    /// HTTP/2 Rapid Reset defence (CVE-2023-44487): streams a client may
    /// reset in a burst, refilled at --h2-rst-rate per second; past it the
    /// connection gets GOAWAY (ENHANCE_YOUR_CALM).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub h2_rst_burst: u32,

    /// HTTP/2: client stream resets per second allowed after the burst.
    #[arg(long, value_name = "N", default_value_t = 33)]
    pub h2_rst_rate: u32,
    /// Serve HTTPS: the certificate chain, PEM, leaf first (as the
    /// reference's --ssl-cert).  Needs --ssl-key.  Default: none (cleartext).
    #[arg(long, value_name = "FILE")]
    pub ssl_cert: Option<PathBuf>,

    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).  Needs
    /// --ssl-cert.
    #[arg(long, value_name = "FILE")]
    pub ssl_key: Option<PathBuf>,

    /// CA certificates, PEM, that client certificates must chain to (the
    /// reference's ssl ca_file).  Needs --ssl-verify-client optional or
    /// required.  Default: none.
    #[arg(long, value_name = "FILE")]
    pub ssl_ca_file: Option<PathBuf>,

    /// Client certificates: off (not asked for), optional (asked for; one
    /// that does not verify fails the handshake, none is fine), or required.
    /// Default: off.
    #[arg(long, value_enum, value_name = "MODE")]
    pub ssl_verify_client: Option<crate::tls::VerifyClient>,

    /// Oldest TLS version accepted: 1.2 or 1.3 (the newest both sides
    /// support is used).  Default: 1.2.
    #[arg(long, value_enum, value_name = "VERSION")]
    pub ssl_min_version: Option<crate::tls::MinTlsVersion>,

    /// Number of Perl interpreter threads (see README for what they share).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub interpreters: usize,

    /// How the kernel schedules the interpreter threads: adaptive
    /// (SCHED_BATCH while busy: a woken interpreter does not preempt the
    /// network thread, so work gathers into larger batches; the default
    /// policy while requests come one at a time), batch or normal.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = crate::interp::Scheduling::Adaptive)]
    pub interpreter_scheduling: crate::interp::Scheduling,

    /// Network threads in each process: they accept, read, parse, frame
    /// and write for every connection.  Default: the CPUs the interpreters
    /// leave over, shared among the workers, at least one (see README,
    /// "Tuning for throughput").
    #[arg(long, value_name = "N")]
    pub network_threads: Option<usize>,

    /// Keep each serving process's threads (the whole server's, or each
    /// worker's) on N CPUs of its own, worker k on the k-th N of the CPUs
    /// the server may use (0: off).  Can be faster on a host busy with
    /// other work; a process then uses N CPUs at most, which is slower
    /// where its network thread needs a CPU of its own (see README,
    /// "Tuning for throughput").
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub cpu_affinity: usize,

    /// Worker processes: 1 serves from this process; N > 1 starts a master
    /// that loads the app once and forks N workers (see README, "Workers").
    #[arg(short = 'w', long, value_name = "N", default_value_t = 1)]
    pub workers: usize,

    /// Replace a worker after it has taken N requests (0: never).  Starts a
    /// master even with one worker.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests: u64,

    /// Add a random 0..=N to each worker's --max-requests, so that workers
    /// started together are not all replaced at once.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_requests_jitter: u64,

    /// Kill and replace a worker whose interpreter has not turned its event
    /// loop for this many seconds (an app stuck in a busy loop); 0 disables.
    #[arg(long, value_name = "SECONDS", default_value_t = 50)]
    pub heartbeat_timeout: u64,

    /// Run in the background: detach from the terminal once the server is
    /// ready (the command exits 0 then, or with the startup error's status).
    #[arg(short = 'D', long)]
    pub daemonize: bool,

    /// Write the server's (the master's) process id to FILE; removed on exit.
    #[arg(long = "pid", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Run as USER after binding (needs root); the app loads as USER.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run as GROUP after binding (needs root); default: USER's group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Environment mode: development, production or none (default: $PAGI_ENV,
    /// else development on a terminal and production otherwise).
    #[arg(short = 'E', long = "env", value_enum, value_name = "MODE")]
    pub env_mode: Option<EnvMode>,

    /// Do not wrap the app in the mode's middleware (Lint in development).
    #[arg(long, overrides_with = "default_middleware")]
    pub no_default_middleware: bool,

    /// Wrap the app in the mode's middleware (the default); the last of
    /// this and --no-default-middleware wins.
    #[arg(long, overrides_with = "no_default_middleware")]
    pub default_middleware: bool,

    /// The interpreters' IO::Async loop: IO::Async::Loop::BACKEND (Poll,
    /// Select, Epoll, ...).  Default: Poll, or IO_ASYNC_LOOP's choice.
    #[arg(short = 'l', long = "loop", value_name = "BACKEND", value_parser = parse_loop_backend)]
    pub loop_backend: Option<String>,

    /// The reference runner's server class.  pagi-rs takes the place of
    /// PAGI::Server, the only class accepted.
    #[arg(short = 's', long = "server", value_name = "CLASS")]
    pub server: Option<String>,

    /// Accepted for the reference's command lines; no effect (a file body
    /// is read from the page cache when it holds it, else off the loop).
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub sync_file_threshold: Option<i64>,

    /// Accepted for the reference's command lines: Future::XS is not used
    /// (PERL_FUTURE_NO_XS=1 unless set); a warning says so.
    #[arg(long)]
    pub future_xs: bool,

    /// Print the version and exit.
    #[arg(short = 'v', long = "version", action = ArgAction::Version)]
    pub version: Option<bool>,
}

/// What the user asked to serve, once the option forms are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppSpec {
    File(String),
    Module(String),
    Inline(String),
    /// No app named: serve the current directory, as the reference runner
    /// does, with PAGI-Tools' PAGI::App::Directory (`root=.` unless given).
    CurrentDirectory,
}

impl Options {
    /// `--max-connections`, with 0 resolved from the open-file limit: what
    /// it leaves after a reserve for request bodies sent from files, the
    /// access log, and the descriptors the interpreter and its app open.
    pub fn connection_limit(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct we own.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        let nofile = if ok && lim.rlim_cur != libc::RLIM_INFINITY {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            65_536
        };
        (nofile.saturating_sub(128) * 9 / 10).max(16)
    }

    /// The app to load and its key=value arguments, resolved the way the
    /// reference runner does it: `-e` wins, then `--app`, then the first
    /// positional argument that is not key=value, and with none of them
    /// the current directory (PAGI-Tools' PAGI::App::Directory).
    pub fn app_spec(&self) -> Result<(AppSpec, Vec<String>), String> {
        let mut args = self.positional.clone();
        if let Some(code) = &self.eval {
            return Ok((AppSpec::Inline(code.clone()), args));
        }
        let name = match &self.app {
            Some(file) => file.clone(),
            None => {
                if args.is_empty() || args[0].contains('=') {
                    if let Some(bad) = args.iter().find(|a| !a.contains('=')) {
                        return Err(format!(
                            "unexpected argument '{bad}': arguments after the app must be key=value"
                        ));
                    }
                    return Ok((AppSpec::CurrentDirectory, args));
                }
                args.remove(0)
            }
        };
        if let Some(bad) = args.iter().find(|a| !a.contains('=')) {
            return Err(format!(
                "unexpected argument '{bad}': arguments after the app must be key=value"
            ));
        }
        Ok((classify_app(&name), args))
    }

    /// What to listen on: `--listen`, else `--socket`, else `--host`/`--port`.
    pub fn listen_config(&self) -> crate::listen::Config {
        use crate::listen::ListenAddr;
        let (addrs, explicit) = if !self.listen.is_empty() {
            (self.listen.clone(), true)
        } else if let Some(path) = &self.socket {
            (vec![ListenAddr::Unix(path.clone())], true)
        } else {
            let tcp = ListenAddr::Tcp {
                host: self.host.clone().unwrap_or_else(|| DEFAULT_HOST.into()),
                port: self.port.unwrap_or(DEFAULT_PORT),
            };
            (vec![tcp], self.host.is_some() || self.port.is_some())
        };
        crate::listen::Config {
            addrs,
            explicit,
            socket_mode: self.socket_mode,
            backlog: self.listener_backlog,
            reuseport: self.reuseport,
        }
    }

    /// `--log-format`, defaulting as the reference's runner does: JSON
    /// lines in production, where a log shipper reads them, and text for
    /// people otherwise.
    pub fn effective_log_format(&self, mode: EnvMode) -> LogFormat {
        self.log_format.unwrap_or(match mode {
            EnvMode::Production => LogFormat::Json,
            EnvMode::Development | EnvMode::None => LogFormat::Text,
        })
    }

    /// `--access-log-format`, defaulting to the reference's `clf`, or to
    /// `json` when the server's own lines are JSON: a log stream on stderr
    /// stays one format that a shipper can parse.
    pub fn effective_access_log_format(&self, mode: EnvMode) -> &str {
        match (&self.access_log_format, self.effective_log_format(mode)) {
            (Some(spec), _) => spec,
            (None, LogFormat::Json) => "json",
            (None, LogFormat::Text) => "clf",
        }
    }

    /// Whether a master process supervises workers (`-w` above 1, or
    /// `--max-requests`, which replaces workers).
    pub fn needs_master(&self) -> bool {
        self.workers > 1 || self.max_requests > 0
    }

    pub fn effective_log_level(&self) -> LogLevel {
        match (self.log_level, self.quiet) {
            (Some(level), _) => level,
            (None, true) => LogLevel::Error,
            (None, false) => LogLevel::Info,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(class) = self
            .server
            .as_deref()
            .filter(|c| *c != REFERENCE_SERVER_CLASS)
        {
            return Err(format!(
                "--server {class}: pagi-rs takes the place of {REFERENCE_SERVER_CLASS}, \
                 the only server class it accepts"
            ));
        }
        // Every duration becomes a deadline (now + value) somewhere; a year
        // is far beyond any sensible setting and far from overflowing one.
        for (flag, secs) in [
            ("--timeout", self.timeout),
            ("--request-timeout", self.request_timeout),
            ("--shutdown-timeout", self.shutdown_timeout),
            ("--lifespan-startup-timeout", self.lifespan_startup_timeout),
            ("--ws-idle-timeout", self.ws_idle_timeout),
            ("--sse-idle-timeout", self.sse_idle_timeout),
            ("--heartbeat-timeout", self.heartbeat_timeout),
        ] {
            if secs > MAX_SECONDS {
                return Err(format!(
                    "{flag} {secs} is too large: at most {MAX_SECONDS} seconds (a year)"
                ));
            }
        }
        if !(16_384..=16_777_215).contains(&self.h2_max_frame_size) {
            return Err(format!(
                "--h2-max-frame-size {} is out of range: 16384 to 16777215 (RFC 9113 6.5.2)",
                self.h2_max_frame_size
            ));
        }
        if self.h2_initial_window_size > (1 << 31) - 1 {
            return Err(format!(
                "--h2-initial-window-size {} is too large: at most 2147483647 (RFC 9113 6.5.2)",
                self.h2_initial_window_size
            ));
        }
        if self.h2_max_concurrent_streams == 0 {
            return Err("--h2-max-concurrent-streams must be at least 1".into());
        }
        // Sizes that the server adds to, or allocates per request, are
        // bounded so that no arithmetic on them can overflow.
        for (flag, value, max) in [
            ("--max-header-size", self.max_header_size, MAX_HEADER_SIZE),
            (
                "--max-header-count",
                self.max_header_count,
                MAX_HEADER_COUNT,
            ),
            ("--interpreters", self.interpreters, MAX_INTERPRETERS),
            (
                "--network-threads",
                self.network_threads.unwrap_or(1),
                MAX_NETWORK_THREADS,
            ),
            ("--workers", self.workers, MAX_WORKERS),
            ("--cpu-affinity", self.cpu_affinity, MAX_CPUS),
            (
                "--write-high-watermark",
                self.write_high_watermark,
                MAX_WATERMARK,
            ),
            ("--max-ws-frame-size", self.max_ws_frame_size, MAX_WATERMARK),
            ("--read-buffer-size", self.read_buffer_size, MAX_READ_BUFFER),
            (
                "--write-buffer-size",
                self.write_buffer_size,
                MAX_READ_BUFFER,
            ),
            (
                "--max-receive-queue",
                self.max_receive_queue,
                MAX_RECEIVE_QUEUE,
            ),
        ] {
            if value > max {
                return Err(format!("{flag} {value} is too large: at most {max}"));
            }
        }
        if self.write_low_watermark > self.write_high_watermark {
            return Err(format!(
                "--write-low-watermark ({}) must not exceed --write-high-watermark ({})",
                self.write_low_watermark, self.write_high_watermark
            ));
        }
        if self.write_high_watermark == 0 {
            return Err("--write-high-watermark must be positive".into());
        }
        if self.read_buffer_size == 0 {
            return Err("--read-buffer-size must be positive".into());
        }
        if self.write_buffer_size == 0 {
            return Err("--write-buffer-size must be positive".into());
        }
        if self.interpreters == 0 {
            return Err("--interpreters must be at least 1".into());
        }
        if self.network_threads == Some(0) {
            return Err("--network-threads must be at least 1".into());
        }
        if self.max_requests_jitter > 0 && self.max_requests == 0 {
            return Err("--max-requests-jitter needs --max-requests".into());
        }
        if self
            .max_requests
            .checked_add(self.max_requests_jitter)
            .is_none()
        {
            return Err("--max-requests plus --max-requests-jitter is too large".into());
        }
        if self.max_queued_requests == 0 {
            return Err("--max-queued-requests must be at least 1".into());
        }
        if self.max_header_count == 0 || self.max_header_size == 0 {
            return Err("--max-header-count and --max-header-size must be positive".into());
        }
        if self.body_rate_grace > MAX_SECONDS {
            return Err(format!(
                "--body-rate-grace {} is too large: at most {MAX_SECONDS} seconds (a year)",
                self.body_rate_grace
            ));
        }
        self.trusted_proxies()?;
        if self.ws_close_timeout == 0 || self.ws_close_timeout > MAX_SECONDS {
            return Err(format!(
                "--ws-close-timeout must be between 1 and {MAX_SECONDS} seconds"
            ));
        }
        self.listen_config().validate()
    }

    /// `--proxy-headers` with its trust list (None when off): the option,
    /// else $FORWARDED_ALLOW_IPS, else 127.0.0.1, as uvicorn reads them.
    pub fn trusted_proxies(&self) -> Result<Option<crate::proxy::TrustedProxies>, String> {
        if !self.proxy_headers {
            return Ok(None);
        }
        let (list, source) = match &self.forwarded_allow_ips {
            Some(list) => (list.clone(), "--forwarded-allow-ips"),
            None => match std::env::var(crate::proxy::ALLOW_IPS_ENV) {
                Ok(list) => (list, crate::proxy::ALLOW_IPS_ENV),
                Err(std::env::VarError::NotPresent) => {
                    (crate::proxy::DEFAULT_ALLOW_IPS.to_string(), "the default")
                }
                Err(e) => return Err(format!("{}: {e}", crate::proxy::ALLOW_IPS_ENV)),
            },
        };
        list.parse().map(Some).map_err(|e| format!("{source}: {e}"))
    }

    /// `--max-ws-message-size`, with 0 meaning no limit.
    pub fn ws_message_limit(&self) -> Option<usize> {
        (self.max_ws_message_size > 0).then_some(self.max_ws_message_size)
    }

    /// The TLS the `--ssl-*` options ask for (None: cleartext), checked for
    /// options that do not go together; the files are read later.
    pub fn tls_settings(&self) -> Result<Option<crate::tls::Settings>, crate::tls::TlsError> {
        crate::tls::Settings::from_options(
            self.ssl_cert.as_deref(),
            self.ssl_key.as_deref(),
            self.ssl_ca_file.as_deref(),
            self.ssl_verify_client,
            self.ssl_min_version,
        )
    }

    /// The bound on a TLS handshake: `--timeout`, the deadline a request
    /// head has too, or a fixed bound when that is 0 (none).
    pub fn handshake_timeout(&self) -> Duration {
        Self::timeout_opt(self.timeout).unwrap_or(crate::tls::HANDSHAKE_TIMEOUT_WHEN_UNSET)
    }

    /// The request-body pace (`--body-min-rate`, `--body-rate-grace`).
    pub fn body_min_rate(&self) -> crate::body::MinRate {
        if self.body_min_rate == 0 {
            return crate::body::MinRate::OFF;
        }
        crate::body::MinRate {
            bytes_per_sec: self.body_min_rate,
            grace: Duration::from_secs(self.body_rate_grace),
        }
    }

    pub fn timeout_opt(secs: u64) -> Option<Duration> {
        (secs > 0).then(|| Duration::from_secs(secs))
    }
}

/// `--host` and `--port` when neither they, `--socket` nor `--listen` is given.
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 5000;

/// Upper bounds of numeric options (see `Options::validate`).
pub const MAX_SECONDS: u64 = 365 * 86_400;
pub const MAX_HEADER_SIZE: usize = 1 << 30;
/// The request gate parses heads into this many header slots.
pub const MAX_HEADER_COUNT: usize = 10_000;
pub const MAX_INTERPRETERS: usize = 256;
pub const MAX_NETWORK_THREADS: usize = 256;
pub const MAX_WORKERS: usize = 1024;
/// `--cpu-affinity`: the kernel's CPU set holds this many (CPU_SETSIZE).
pub const MAX_CPUS: usize = 1024;
pub const MAX_WATERMARK: usize = 1 << 40;
/// `--read-buffer-size` and `--write-buffer-size`: at most this big.
pub const MAX_READ_BUFFER: usize = 64 << 20;
pub const MAX_RECEIVE_QUEUE: usize = 1 << 30;

impl Options {
    /// The command line as the reference runner reads it: Getopt::Long,
    /// which `pagi-server` parses with, also takes a long option after one
    /// dash (`-port 8080`, `-workers=4`), which clap would read as short
    /// options (`-p ort`).
    pub fn parse_reference_spellings() -> Options {
        Options::parse_from(with_long_options_doubled(std::env::args_os()))
    }
}

/// `args` with each long option written after one dash given its second
/// dash.  Left alone: the value of the option before it, everything after
/// `--`, and `-I`, `-M` and `-e` with text joined on, which the reference
/// runner splits as Perl's own cuddled flags (`-Ilib`, `-MFoo`, `-e...`).
fn with_long_options_doubled(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let command = Options::command();
    let takes_value = |arg: &clap::Arg| arg.get_action().takes_values();
    let long_takes_value = |name: &str| {
        command
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|v| v.contains(&name))
            })
            .map(takes_value)
    };
    let short_takes_value = |c: char| {
        command
            .get_arguments()
            .find(|a| a.get_short() == Some(c))
            .is_some_and(takes_value)
    };
    let mut out = Vec::new();
    let mut value_next = false;
    let mut options_ended = false;
    for (i, arg) in args.into_iter().enumerate() {
        let taken_as_is = i == 0 || options_ended || std::mem::take(&mut value_next);
        let Some(text) = arg.to_str().filter(|_| !taken_as_is) else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            options_ended = true;
            out.push(arg);
            continue;
        }
        let spelled = match text.strip_prefix('-') {
            Some(body)
                if body.len() >= 2
                    && !body.starts_with(['-', 'I', 'M', 'e'])
                    && long_takes_value(body.split('=').next().unwrap_or(body)).is_some() =>
            {
                format!("-{text}")
            }
            _ => text.to_string(),
        };
        if let Some(long) = spelled.strip_prefix("--") {
            value_next = !long.contains('=') && long_takes_value(long).unwrap_or(false);
        } else if let Some(short) = spelled.strip_prefix('-') {
            let mut chars = short.chars();
            value_next =
                matches!((chars.next(), chars.next()), (Some(c), None) if short_takes_value(c));
        }
        out.push(OsString::from(spelled));
    }
    out
}

/// `-s`/`--server`: the one class the reference runner's option may name
/// here, the server pagi-rs replaces.
pub const REFERENCE_SERVER_CLASS: &str = "PAGI::Server";

/// `-l`/`--loop`: the last part of an `IO::Async::Loop::*` class name,
/// which the interpreter loads by that name, so it must be one.
fn parse_loop_backend(name: &str) -> Result<String, String> {
    let is_word = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if name.split("::").all(is_word) {
        Ok(name.to_string())
    } else {
        Err("not a loop class name (letters, digits, _ and ::), as in Poll or Epoll".into())
    }
}

/// A name with `::` is a module; one with a slash or a .pl/.psgi suffix is a
/// file; otherwise it is a file if one exists by that name, else a module.
pub fn classify_app(name: &str) -> AppSpec {
    let lower = name.to_ascii_lowercase();
    if name.contains("::") {
        AppSpec::Module(name.to_string())
    } else if name.contains('/')
        || lower.ends_with(".pl")
        || lower.ends_with(".psgi")
        || std::path::Path::new(name).is_file()
    {
        AppSpec::File(name.to_string())
    } else {
        AppSpec::Module(name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("pagi-rs").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_match_the_reference_server() {
        let o = parse(&["app.pl"]);
        let listen = o.listen_config();
        assert_eq!(
            listen.addrs,
            vec![crate::listen::ListenAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 5000
            }]
        );
        assert!(!listen.explicit);
        assert_eq!(listen.backlog, 2048);
        assert!(!listen.reuseport);
        assert_eq!(listen.socket_mode, None);
        assert_eq!(o.max_header_size, 8192);
        assert_eq!(o.max_header_count, 100);
        assert_eq!(o.max_body_size, 10_000_000);
        assert_eq!(o.timeout, 60);
        assert_eq!(o.shutdown_timeout, 30);
        assert_eq!(o.write_high_watermark, 65536);
        assert_eq!(o.write_low_watermark, 16384);
        assert_eq!(o.max_ws_frame_size, 65536);
        assert_eq!(o.max_ws_message_size, 16 << 20);
        assert_eq!(o.lifespan, LifespanMode::Auto);
        assert_eq!(o.effective_log_level(), LogLevel::Info);
        assert_eq!(o.body_min_rate, 500);
        assert_eq!(o.body_rate_grace, 20);
        assert_eq!(
            o.body_min_rate(),
            crate::body::MinRate {
                bytes_per_sec: 500,
                grace: Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn tls_options_default_to_cleartext_and_take_the_reference_names() {
        let o = parse(&["a.pl"]);
        assert!(o.tls_settings().unwrap().is_none());
        assert_eq!(o.handshake_timeout(), Duration::from_secs(60));
        let o = parse(&[
            "--ssl-cert",
            "c.pem",
            "--ssl-key",
            "k.pem",
            "--ssl-min-version",
            "TLSv1_3",
            "--timeout",
            "0",
            "a.pl",
        ]);
        let s = o.tls_settings().unwrap().unwrap();
        assert_eq!(s.min_version, crate::tls::MinTlsVersion::Tls13);
        assert_eq!(s.verify_client, crate::tls::VerifyClient::Off);
        assert_eq!(
            o.handshake_timeout(),
            crate::tls::HANDSHAKE_TIMEOUT_WHEN_UNSET
        );
        let o = parse(&[
            "--ssl-min-version",
            "1.2",
            "--ssl-verify-client",
            "optional",
            "a.pl",
        ]);
        assert_eq!(o.ssl_min_version, Some(crate::tls::MinTlsVersion::Tls12));
        assert_eq!(
            o.ssl_verify_client,
            Some(crate::tls::VerifyClient::Optional)
        );
        assert!(Options::try_parse_from(["pagi-rs", "--ssl-min-version", "1.1", "a.pl"]).is_err());
    }

    #[test]
    fn body_min_rate_zero_turns_it_off() {
        let o = parse(&["--body-min-rate", "0", "--body-rate-grace", "5", "a.pl"]);
        assert_eq!(o.body_min_rate(), crate::body::MinRate::OFF);
        let o = parse(&["--body-min-rate", "100", "--body-rate-grace", "0", "a.pl"]);
        assert_eq!(o.body_min_rate().bytes_per_sec, 100);
        assert_eq!(o.body_min_rate().grace, Duration::ZERO);
        assert!(o.validate().is_ok());
    }

    #[test]
    fn app_forms_resolve_like_the_reference_runner() {
        assert_eq!(
            parse(&["app.pl"]).app_spec().unwrap().0,
            AppSpec::File("app.pl".into())
        );
        assert_eq!(
            parse(&["x.PSGI"]).app_spec().unwrap().0,
            AppSpec::File("x.PSGI".into())
        );
        let (spec, args) = parse(&["My::App", "a=1", "b=2"]).app_spec().unwrap();
        assert_eq!(spec, AppSpec::Module("My::App".into()));
        assert_eq!(args, vec!["a=1", "b=2"]);
        let (spec, _) = parse(&["-MFoo", "-e", "Foo->app"]).app_spec().unwrap();
        assert_eq!(spec, AppSpec::Inline("Foo->app".into()));
        assert!(parse(&["My::App", "stray"]).app_spec().is_err());
        assert_eq!(
            parse(&[]).app_spec().unwrap(),
            (AppSpec::CurrentDirectory, vec![])
        );
        assert_eq!(
            parse(&["root=/srv", "show_hidden=1"]).app_spec().unwrap(),
            (
                AppSpec::CurrentDirectory,
                vec!["root=/srv".into(), "show_hidden=1".into()]
            )
        );
        assert!(parse(&["root=/srv", "stray"]).app_spec().is_err());
    }

    #[test]
    fn cuddled_perl_style_flags_parse() {
        let o = parse(&["-Ilib", "-MFoo=bar,baz", "-e", "1"]);
        assert_eq!(o.include, vec!["lib"]);
        assert_eq!(o.modules, vec!["Foo=bar,baz"]);
    }

    #[test]
    fn the_log_is_json_in_production_unless_told_otherwise() {
        let o = parse(&["a.pl"]);
        assert_eq!(o.effective_log_format(EnvMode::Production), LogFormat::Json);
        assert_eq!(
            o.effective_log_format(EnvMode::Development),
            LogFormat::Text
        );
        assert_eq!(o.effective_log_format(EnvMode::None), LogFormat::Text);
        let o = parse(&["--log-format", "text", "a.pl"]);
        assert_eq!(o.effective_log_format(EnvMode::Production), LogFormat::Text);
        let o = parse(&["--log-format", "json", "a.pl"]);
        assert_eq!(
            o.effective_log_format(EnvMode::Development),
            LogFormat::Json
        );
    }

    #[test]
    fn the_access_log_follows_a_json_server_log_unless_told_otherwise() {
        let dev = EnvMode::Development;
        let o = parse(&["a.pl"]);
        assert_eq!(o.effective_access_log_format(dev), "clf");
        assert_eq!(o.effective_access_log_format(EnvMode::Production), "json");
        assert_eq!(o.error_log, None);
        let o = parse(&["--log-format", "json", "a.pl"]);
        assert_eq!(o.effective_access_log_format(dev), "json");
        let o = parse(&["--log-format", "text", "a.pl"]);
        assert_eq!(o.effective_access_log_format(EnvMode::Production), "clf");
        let o = parse(&[
            "--log-format",
            "json",
            "--access-log-format",
            "tiny",
            "a.pl",
        ]);
        assert_eq!(o.effective_access_log_format(dev), "tiny");
        let o = parse(&["--error-log", "/var/log/x.log", "a.pl"]);
        assert_eq!(o.error_log, Some(PathBuf::from("/var/log/x.log")));
        assert!(Options::try_parse_from(["pagi-rs", "--log-format", "xml", "a.pl"]).is_err());
    }

    #[test]
    fn the_reference_runners_options_are_accepted() {
        let o = parse(&["-l", "Epoll", "-s", "PAGI::Server", "a.pl"]);
        assert_eq!(o.loop_backend.as_deref(), Some("Epoll"));
        assert!(o.validate().is_ok());
        assert_eq!(
            parse(&["--loop", "Foo::Bar_2", "a.pl"])
                .loop_backend
                .as_deref(),
            Some("Foo::Bar_2")
        );
        for bad in ["Ep;oll", "::Epoll", "Epoll::", "", "Foo:::Bar", "E poll"] {
            assert!(
                Options::try_parse_from(["pagi-rs", "-l", bad, "a.pl"]).is_err(),
                "{bad:?} refused"
            );
        }
        assert!(parse(&["-s", "Other::Server", "a.pl"]).validate().is_err());
        assert_eq!(
            parse(&["--sync-file-threshold", "-1", "a.pl"]).sync_file_threshold,
            Some(-1)
        );
        assert!(
            Options::try_parse_from(["pagi-rs", "--sync-file-threshold", "x", "a.pl"]).is_err()
        );
        assert!(parse(&["--future-xs", "a.pl"]).future_xs);
    }

    fn doubled(args: &[&str]) -> Vec<String> {
        let args = std::iter::once("pagi-rs")
            .chain(args.iter().copied())
            .map(OsString::from);
        with_long_options_doubled(args)
            .into_iter()
            .skip(1)
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn long_options_after_one_dash_are_read_as_getopt_long_reads_them() {
        assert_eq!(
            doubled(&[
                "-port",
                "8080",
                "-workers=4",
                "-lib",
                "lib",
                "-reuseport",
                "a.pl"
            ]),
            [
                "--port",
                "8080",
                "--workers=4",
                "--lib",
                "lib",
                "--reuseport",
                "a.pl"
            ]
        );
        // Left as they are: short options, cuddled values and Perl's own
        // flags; a value that looks like an option; anything after `--`;
        // a word that names no option.
        for unchanged in [
            &[
                "-p", "80", "-Ilib", "-MFoo=a", "-env", "-w4", "-D", "-l", "Epoll",
            ][..],
            &[
                "--access-log-format",
                "-host",
                "-o",
                "-port",
                "--",
                "-timeout",
            ],
            &["-frobnicate", "-x"],
        ] {
            assert_eq!(doubled(unchanged), unchanged);
        }
        let o = Options::parse_from(with_long_options_doubled(
            [
                "pagi-rs",
                "-port",
                "8080",
                "-max-requests",
                "5",
                "-no-access-log",
                "a.pl",
            ]
            .map(OsString::from),
        ));
        assert_eq!(
            (o.port, o.max_requests, o.no_access_log),
            (Some(8080), 5, true)
        );
    }

    #[test]
    fn the_last_of_the_middleware_switches_wins() {
        assert!(!parse(&["a.pl"]).no_default_middleware);
        assert!(parse(&["--no-default-middleware", "a.pl"]).no_default_middleware);
        let o = parse(&["--no-default-middleware", "--default-middleware", "a.pl"]);
        assert!(!o.no_default_middleware);
        let o = parse(&["--default-middleware", "--no-default-middleware", "a.pl"]);
        assert!(o.no_default_middleware);
    }

    #[test]
    fn quiet_is_error_level_unless_log_level_given() {
        assert_eq!(
            parse(&["-q", "a.pl"]).effective_log_level(),
            LogLevel::Error
        );
        assert_eq!(
            parse(&["-q", "--log-level", "debug", "a.pl"]).effective_log_level(),
            LogLevel::Debug
        );
    }

    #[test]
    fn unknown_option_is_an_error_naming_it() {
        let err = Options::try_parse_from(["pagi-rs", "--bogus", "a.pl"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--bogus"), "{err}");
    }

    #[test]
    fn values_that_would_overflow_are_refused_with_the_option_named() {
        for flag in [
            "--timeout",
            "--request-timeout",
            "--shutdown-timeout",
            "--lifespan-startup-timeout",
            "--ws-idle-timeout",
            "--sse-idle-timeout",
            "--ws-close-timeout",
            "--max-header-size",
            "--max-header-count",
            "--interpreters",
            "--network-threads",
            "--cpu-affinity",
            "--write-high-watermark",
            "--max-ws-frame-size",
            "--max-receive-queue",
        ] {
            let err = parse(&[flag, "18446744073709551615", "a.pl"])
                .validate()
                .unwrap_err();
            assert!(err.contains(flag), "{flag}: {err}");
        }
        let ok = parse(&["--timeout", "31536000", "--shutdown-timeout", "0", "a.pl"]);
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn listener_options_combine_as_the_reference_says() {
        use crate::listen::ListenAddr;
        let o = parse(&["-p", "0", "a.pl"]);
        assert!(o.listen_config().explicit, "a port named is explicit");
        let o = parse(&["--socket", "/tmp/a.sock", "--socket-mode", "0660", "a.pl"]);
        let c = o.listen_config();
        assert_eq!(c.addrs, vec![ListenAddr::Unix("/tmp/a.sock".into())]);
        assert_eq!(c.socket_mode, Some(0o660));
        assert!(o.validate().is_ok());
        let o = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--listen",
            "unix:/tmp/b.sock",
            "--reuseport",
            "-b",
            "16",
            "a.pl",
        ]);
        let c = o.listen_config();
        assert_eq!(c.addrs.len(), 3);
        assert_eq!((c.backlog, c.reuseport), (16, true));
        for clash in [
            &["--listen", "127.0.0.1:1", "--port", "2"][..],
            &["--listen", "127.0.0.1:1", "--host", "::1"],
            &["--listen", "127.0.0.1:1", "--socket", "/tmp/x"],
            &["--socket", "/tmp/x", "-p", "1"],
            &["--socket", "/tmp/x", "-o", "0.0.0.0"],
        ] {
            let args = std::iter::once("pagi-rs")
                .chain(clash.iter().copied())
                .chain(["a.pl"]);
            let err = Options::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains("cannot be used with"), "{clash:?}: {err}");
        }
        for bad in [
            &["--listen", "8080"][..],
            &["--socket-mode", "rw", "--socket", "/tmp/x"],
            &["-b", "-1"],
            &["-b", "many"],
        ] {
            let args = std::iter::once("pagi-rs")
                .chain(bad.iter().copied())
                .chain(["a.pl"]);
            assert!(Options::try_parse_from(args).is_err(), "{bad:?}");
        }
        let err = parse(&["--socket-mode", "0660", "a.pl"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--socket-mode needs"), "{err}");
        let err = parse(&["-b", "0", "a.pl"]).validate().unwrap_err();
        assert!(err.contains("--listener-backlog"), "{err}");
    }

    #[test]
    fn proxy_headers_are_off_unless_asked_for_and_a_bad_list_is_refused() {
        let o = parse(&["--forwarded-allow-ips", "10.0.0.0/8", "a.pl"]);
        assert_eq!(o.trusted_proxies(), Ok(None), "the list alone does nothing");
        let o = parse(&[
            "--proxy-headers",
            "--forwarded-allow-ips",
            "10.0.0.0/8, unix:",
            "a.pl",
        ]);
        assert_eq!(
            o.trusted_proxies(),
            Ok(Some("10.0.0.0/8,unix:".parse().unwrap()))
        );
        let o = parse(&[
            "--proxy-headers",
            "--forwarded-allow-ips",
            "10.0.0.0/99",
            "a.pl",
        ]);
        let err = o.validate().unwrap_err();
        assert!(
            err.starts_with("--forwarded-allow-ips: '10.0.0.0/99'"),
            "{err}"
        );
    }

    #[test]
    fn watermarks_are_checked() {
        assert!(parse(&[
            "--write-low-watermark",
            "10",
            "--write-high-watermark",
            "5",
            "a.pl"
        ])
        .validate()
        .is_err());
    }
}
