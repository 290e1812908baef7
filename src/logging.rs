//! Diagnostics through `tracing`, on stderr, filtered by --log-level/-q, as
//! text for people or (--log-format json) one JSON object per line for log
//! shippers.  --error-log points stderr itself at a file, so the server's
//! lines and whatever the interpreter writes to STDERR land there alike.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::{LogFormat, LogLevel};

/// The worker number this process serves as, or `NOT_A_WORKER`.
static WORKER: AtomicI64 = AtomicI64::new(NOT_A_WORKER);
const NOT_A_WORKER: i64 = -1;

static JSON: AtomicBool = AtomicBool::new(false);

/// Name this process as worker `n` in every log line from now on (JSON
/// lines' `worker` key, the json access log's too).  A worker process calls
/// it right after the fork; a process that never does (a single-process
/// server, the master of workers) is logged with `"worker":null`.
// Until worker processes (issue 10, part 1) call it, only tests do.
#[allow(dead_code)]
pub fn set_worker_id(n: u32) {
    WORKER.store(i64::from(n), Ordering::Relaxed);
}

pub fn worker_id() -> Option<u32> {
    u32::try_from(WORKER.load(Ordering::Relaxed)).ok()
}

/// Whether server log lines are JSON (so that the interpreter's warnings
/// are routed through the log instead of written raw to STDERR).
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

pub fn init(level: LogLevel, format: LogFormat) {
    let max = match level {
        LogLevel::Debug => Level::DEBUG,
        LogLevel::Info => Level::INFO,
        LogLevel::Warn => Level::WARN,
        LogLevel::Error => Level::ERROR,
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(max);
    match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => {
            JSON.store(true, Ordering::Relaxed);
            builder.event_format(JsonLines).init()
        }
    }
}

/// A failure that stops the server before it serves (exit 1): in text,
/// `pagi-rs: <message>` as ever, for the person who started it; in JSON, an
/// error line like any other, so that the log stays parseable.
pub fn startup_error(message: &str) {
    if is_json() {
        tracing::error!("{message}");
    } else {
        eprintln!("pagi-rs: {message}");
    }
}

/// Make FILE the process's stderr (fd 2): opened for appending (created
/// 0644), before any interpreter exists, so that the server's log, Perl's
/// warnings and die messages, and the STDERR of processes the app starts
/// all go there.  O_APPEND makes each line one atomic append even when
/// several processes share the file, and lets `logrotate copytruncate`
/// work without reopening.
pub fn redirect_stderr_to(path: &Path) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| format!("cannot open error log {}: {e}", path.display()))?;
    // SAFETY: dup2 on two descriptors this process owns: `file` stays open
    // across the call, and fd 2 is replaced atomically (std's stderr is
    // unbuffered, so nothing written before is left behind in a buffer).
    let rc = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), libc::STDERR_FILENO) };
    if rc < 0 {
        return Err(format!(
            "cannot make {} the error log: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// What a JSON line is about (its `category`): the reference server's
/// class names, so that filters written for its logs keep working.
pub mod category {
    /// The server: startup, workers, signals, listeners, shutdown.
    pub const SERVER: &str = "PAGI::Server";
    /// A connection or request: the app's errors, the client's.
    pub const CONNECTION: &str = "PAGI::Server::Connection";
    /// `pagi.connection` callbacks.
    pub const CONNECTION_STATE: &str = "PAGI::Server::ConnectionState";
    /// `pagi.transport` callbacks.
    pub const TRANSPORT_STATE: &str = "PAGI::Server::TransportState";
}

/// The modules whose events are about one connection or request; every
/// other module's are the server's.
const CONNECTION_MODULES: [&str; 10] = [
    "pagi_rs::body",
    "pagi_rs::exchange",
    "pagi_rs::file",
    "pagi_rs::http1",
    "pagi_rs::http2",
    "pagi_rs::proxy",
    "pagi_rs::service",
    "pagi_rs::sse",
    "pagi_rs::websocket",
    "pagi_rs::write_stall",
];

/// The category of an event from the module `target` (a module path).
fn category_of(target: &str) -> &'static str {
    let within = |module: &str| {
        target
            .strip_prefix(module)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    };
    if CONNECTION_MODULES.iter().any(|m| within(m)) {
        category::CONNECTION
    } else {
        category::SERVER
    }
}

/// Server log events as JSON lines: `time` (RFC 3339, UTC), `level`,
/// `category`, `message`, `pid`, `worker` (in a worker process), then the
/// event's own fields: the reference server's keys, in its order.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let category = fields
            .category
            .take()
            .unwrap_or_else(|| category_of(event.metadata().target()).to_string());
        writer.write_str(&json_line(
            *event.metadata().level(),
            SystemTime::now(),
            &category,
            &fields,
        ))
    }
}

/// The keys every line has; an event field of the same name is renamed
/// `field.<name>` rather than repeating a key.
const RESERVED_KEYS: [&str; 6] = ["time", "level", "category", "message", "pid", "worker"];

#[derive(Default)]
struct JsonFields {
    message: String,
    /// A `category` field: the event says what it is about.
    category: Option<String>,
    /// `,"key":value` for each field other than the message.
    rest: String,
}

impl JsonFields {
    fn key(&mut self, field: &Field) {
        self.rest.push(',');
        if RESERVED_KEYS.contains(&field.name()) {
            push_json_str(&mut self.rest, &format!("field.{}", field.name()));
        } else {
            push_json_str(&mut self.rest, field.name());
        }
        self.rest.push(':');
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if field.name() == "category" && self.category.is_none() {
            self.category = Some(value.to_string());
        } else {
            self.key(field);
            push_json_str(&mut self.rest, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // The message arrives here as fmt::Arguments, whose Debug is the
        // formatted text itself.
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.rest, "{value}");
        } else {
            // JSON has no NaN or infinity.
            push_json_str(&mut self.rest, &value.to_string());
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_str(field, &value.to_string());
    }
}

fn json_line(level: Level, now: SystemTime, category: &str, fields: &JsonFields) -> String {
    let mut out = String::with_capacity(128 + fields.message.len() + fields.rest.len());
    out.push_str("{\"time\":\"");
    push_rfc3339(&mut out, now);
    out.push_str("\",\"level\":\"");
    out.push_str(&level.as_str().to_ascii_lowercase());
    out.push_str("\",\"category\":");
    push_json_str(&mut out, category);
    out.push_str(",\"message\":");
    push_json_str(&mut out, &fields.message);
    push_pid_and_worker(&mut out);
    out.push_str(&fields.rest);
    out.push_str("}\n");
    out
}

/// `,"pid":N`, and `,"worker":N` in a worker process (a single process
/// and the master have no worker number, and their lines no such key, as
/// the reference server's): read at each line, so that a forked worker
/// reports its own pid.
pub fn push_pid_and_worker(out: &mut String) {
    let _ = write!(out, ",\"pid\":{}", std::process::id());
    if let Some(n) = worker_id() {
        let _ = write!(out, ",\"worker\":{n}");
    }
}

/// `2026-02-10T12:34:56.789Z`: RFC 3339, UTC, milliseconds.
pub fn push_rfc3339(out: &mut String, t: SystemTime) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = crate::access_log::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// `s` as a JSON string: quotes and backslashes escaped, control
/// characters (and DEL, and the line and paragraph separators that
/// JavaScript takes for newlines) as `\u` escapes, so a line stays one line.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    push_json_chars(out, s, false);
    out.push('"');
}

/// Bytes from the wire as a JSON string that says exactly what was sent:
/// UTF-8 is kept as text, and as in the text formats each byte that is not
/// UTF-8 becomes `\xhh` (four characters), with a backslash doubled so that
/// `\xhh` cannot be forged and the value reads back to the bytes.
pub fn push_json_bytes(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        push_json_chars(out, chunk.valid(), true);
        for b in chunk.invalid() {
            let _ = write!(out, "\\\\x{b:02x}");
        }
    }
    out.push('"');
}

fn push_json_chars(out: &mut String, s: &str, double_backslashes: bool) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' if double_backslashes => out.push_str("\\\\\\\\"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Held by tests that read or set the process-wide worker number.
    pub(crate) static WORKER_LOCK: Mutex<()> = Mutex::new(());

    /// A strict decoder of the JSON this module writes (a flat object of
    /// strings, numbers, booleans and null), so that the tests do not trust
    /// the encoder to check itself.  Err on anything JSON does not allow.
    pub(crate) fn decode_object(line: &str) -> Result<Vec<(String, Value)>, String> {
        let mut p = Parser {
            s: line.as_bytes(),
            i: 0,
        };
        p.expect(b'{')?;
        let mut out = Vec::new();
        if p.peek() == Some(b'}') {
            p.i += 1;
        } else {
            loop {
                let k = p.string()?;
                p.expect(b':')?;
                let v = p.value()?;
                out.push((k, v));
                match p.next() {
                    Some(b',') => continue,
                    Some(b'}') => break,
                    other => return Err(format!("expected , or }} at {}: {other:?}", p.i)),
                }
            }
        }
        if p.i != p.s.len() {
            return Err(format!("trailing bytes at {}", p.i));
        }
        Ok(out)
    }

    #[derive(Debug, PartialEq)]
    pub(crate) enum Value {
        Str(String),
        Num(String),
        Bool(bool),
        Null,
    }

    impl Value {
        pub(crate) fn str(&self) -> &str {
            match self {
                Value::Str(s) => s,
                other => panic!("not a string: {other:?}"),
            }
        }
    }

    pub(crate) fn get<'a>(obj: &'a [(String, Value)], key: &str) -> &'a Value {
        let mut found = obj.iter().filter(|(k, _)| k == key);
        let v = &found.next().unwrap_or_else(|| panic!("no key {key}")).1;
        assert!(found.next().is_none(), "key {key} repeated");
        v
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }
        fn next(&mut self) -> Option<u8> {
            let b = self.peek();
            self.i += 1;
            b
        }
        fn expect(&mut self, want: u8) -> Result<(), String> {
            match self.next() {
                Some(b) if b == want => Ok(()),
                other => Err(format!(
                    "expected {} at {}: {other:?}",
                    want as char, self.i
                )),
            }
        }
        fn hex4(&mut self) -> Result<u32, String> {
            let h = self.s.get(self.i..self.i + 4).ok_or("short \\u")?;
            self.i += 4;
            u32::from_str_radix(std::str::from_utf8(h).map_err(|e| e.to_string())?, 16)
                .map_err(|e| e.to_string())
        }
        fn string(&mut self) -> Result<String, String> {
            self.expect(b'"')?;
            let mut out = String::new();
            loop {
                let start = self.i;
                while let Some(b) = self.peek() {
                    if b == b'"' || b == b'\\' || b < 0x20 {
                        break;
                    }
                    self.i += 1;
                }
                out.push_str(
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?,
                );
                match self.next() {
                    Some(b'"') => return Ok(out),
                    Some(b'\\') => match self.next() {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'u') => {
                            let hi = self.hex4()?;
                            let c = if (0xd800..0xdc00).contains(&hi) {
                                self.expect(b'\\')?;
                                self.expect(b'u')?;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err("unpaired surrogate".into());
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            out.push(char::from_u32(c).ok_or("bad \\u")?);
                        }
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    other => return Err(format!("raw control byte or end: {other:?}")),
                }
            }
        }
        fn value(&mut self) -> Result<Value, String> {
            match self.peek() {
                Some(b'"') => Ok(Value::Str(self.string()?)),
                Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                    self.i += 4;
                    Ok(Value::Null)
                }
                Some(b't') if self.s[self.i..].starts_with(b"true") => {
                    self.i += 4;
                    Ok(Value::Bool(true))
                }
                Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                    self.i += 5;
                    Ok(Value::Bool(false))
                }
                Some(b'-' | b'0'..=b'9') => {
                    let start = self.i;
                    while matches!(
                        self.peek(),
                        Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    ) {
                        self.i += 1;
                    }
                    let n = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                    n.parse::<f64>().map_err(|e| format!("{n}: {e}"))?;
                    Ok(Value::Num(n.into()))
                }
                other => Err(format!("unexpected {other:?} at {}", self.i)),
            }
        }
    }

    /// Undo `push_json_bytes`'s `\\` and `\xhh` in a decoded value.
    pub(crate) fn unescape_wire(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut it = s.bytes();
        while let Some(b) = it.next() {
            if b != b'\\' {
                out.push(b);
                continue;
            }
            match it.next() {
                Some(b'\\') => out.push(b'\\'),
                Some(b'x') => {
                    let hex = [it.next().unwrap(), it.next().unwrap()];
                    out.push(u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap());
                }
                other => panic!("stray backslash before {other:?}"),
            }
        }
        out
    }

    /// Run `f` under the JSON formatter and return what it wrote.
    fn capture(f: impl FnOnce()) -> String {
        let buf = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .event_format(JsonLines)
            .with_writer(move || SharedBuf(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_event_has_the_common_keys_and_its_own_fields() {
        let _worker = WORKER_LOCK.lock().unwrap();
        let out = capture(|| {
            tracing::warn!(
                peer = "10.0.0.1:5",
                streams = 7u64,
                delta = -2i64,
                ok = true,
                ratio = 0.5f64,
                pid = "spoofed",
                "client \"x\" reset\nstreams"
            )
        });
        assert!(
            out.ends_with("}\n") && out.matches('\n').count() == 1,
            "{out:?}"
        );
        let obj = decode_object(out.trim_end()).unwrap();
        let keys: Vec<&str> = obj.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&keys[..5], ["time", "level", "category", "message", "pid"]);
        assert!(
            !keys.contains(&"worker"),
            "no worker key outside a worker process"
        );
        assert_eq!(get(&obj, "level").str(), "warn");
        assert_eq!(
            get(&obj, "category").str(),
            "PAGI::Server",
            "this test module is the server's"
        );
        assert_eq!(get(&obj, "message").str(), "client \"x\" reset\nstreams");
        assert_eq!(
            get(&obj, "pid"),
            &Value::Num(std::process::id().to_string())
        );
        assert_eq!(get(&obj, "peer").str(), "10.0.0.1:5");
        assert_eq!(get(&obj, "streams"), &Value::Num("7".into()));
        assert_eq!(get(&obj, "delta"), &Value::Num("-2".into()));
        assert_eq!(get(&obj, "ok"), &Value::Bool(true));
        assert_eq!(get(&obj, "ratio"), &Value::Num("0.5".into()));
        assert_eq!(
            get(&obj, "field.pid").str(),
            "spoofed",
            "a field named like a common key does not replace it"
        );
        let time = get(&obj, "time").str();
        assert_eq!(time.len(), 24, "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    }

    #[test]
    fn the_worker_number_is_read_at_each_line() {
        let _worker = WORKER_LOCK.lock().unwrap();
        let before = capture(|| tracing::info!("before"));
        set_worker_id(3);
        let after = capture(|| tracing::info!("after"));
        WORKER.store(NOT_A_WORKER, Ordering::Relaxed);
        let before = decode_object(before.trim_end()).unwrap();
        let after = decode_object(after.trim_end()).unwrap();
        assert!(before.iter().all(|(k, _)| k != "worker"), "{before:?}");
        assert_eq!(get(&after, "worker"), &Value::Num("3".into()));
        let keys: Vec<&str> = after.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys[4..6], ["pid", "worker"], "worker follows pid");
    }

    #[test]
    fn an_event_names_its_category_or_gets_its_modules() {
        let _worker = WORKER_LOCK.lock().unwrap();
        let out = capture(|| {
            let category = category::TRANSPORT_STATE;
            tracing::error!(category, category = "ignored", "callback died")
        });
        let obj = decode_object(out.trim_end()).unwrap();
        assert_eq!(get(&obj, "category").str(), category::TRANSPORT_STATE);
        assert_eq!(
            obj.iter().filter(|(k, _)| k.contains("category")).count(),
            2,
            "a second category field is kept, renamed: {obj:?}"
        );
        assert_eq!(category_of("pagi_rs::exchange::send"), category::CONNECTION);
        assert_eq!(category_of("pagi_rs::http2"), category::CONNECTION);
        assert_eq!(category_of("pagi_rs::supervisor"), category::SERVER);
        assert_eq!(
            category_of("pagi_rs::server"),
            category::SERVER,
            "accepting is the server's"
        );
        assert_eq!(
            category_of("pagi_rs::http1x"),
            category::SERVER,
            "a module, not a prefix"
        );
        assert_eq!(category_of("h2::proto"), category::SERVER);
    }

    #[test]
    fn an_error_log_that_cannot_be_opened_is_named_and_stderr_is_left_alone() {
        // (The path that works replaces the test harness's own stderr: it
        // is proved by t/96-logs.t on the real binary.)
        let err = redirect_stderr_to(Path::new("/nonexistent-dir/pagi-rs/error.log")).unwrap_err();
        assert_eq!(
            err,
            "cannot open error log /nonexistent-dir/pagi-rs/error.log: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn rfc3339_in_utc_with_milliseconds() {
        let mut s = String::new();
        push_rfc3339(
            &mut s,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_770_726_896_042),
        );
        assert_eq!(s, "2026-02-10T12:34:56.042Z");
    }

    #[test]
    fn json_strings_escape_what_json_requires() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\u{1}\u{7f}\u{2028}é\t");
        assert_eq!(s, r#""a\"b\\c\u0001\u007f\u2028é\t""#);
        let mut w = String::new();
        push_json_bytes(&mut w, b"a\\xff\xff\"");
        assert_eq!(w, r#""a\\\\xff\\xff\"""#);
        let decoded = decode_object(&format!("{{\"k\":{w}}}")).unwrap();
        assert_eq!(unescape_wire(get(&decoded, "k").str()), b"a\\xff\xff\"");
    }
}
