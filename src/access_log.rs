//! The access log, in the reference server's formats.  A format string is
//! compiled once into atoms; lines are handed to a writer thread so that a
//! slow log destination never stalls a network task.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("Unknown access log format atom '%{0}'")]
    UnknownAtom(char),
    #[error("Unterminated %{{...}} in access log format")]
    Unterminated,
    #[error("Expected 'i' after %{{Name}} in access log format")]
    ExpectedI,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Atom {
    Literal(String),
    ClientHost,
    Dash,
    Time,
    RequestLine,
    Method,
    Path,
    Query,
    Protocol,
    Status,
    BytesDash,
    Bytes,
    SecondsFrac,
    Micros,
    Seconds,
    RequestHeader(String),
    /// How a long-lived stream (SSE, WebSocket) ended, or `-`.
    EndReason,
}

/// Everything one line can mention.
pub struct Record<'a> {
    pub client: Option<crate::service::Peer>,
    pub method: &'a str,
    pub raw_path: &'a [u8],
    pub query: &'a [u8],
    pub http_version: &'a str,
    pub status: Option<u16>,
    pub body_bytes: u64,
    pub duration: Duration,
    pub headers: &'a [(bytes::Bytes, bytes::Bytes)],
    /// How an SSE stream or a WebSocket ended: the app's `sse.close` reason
    /// or a disconnect reason.  Never set for plain HTTP.
    pub end_reason: Option<&'a str>,
}

#[derive(Clone, Debug)]
pub struct Format(Layout);

#[derive(Clone, Debug)]
enum Layout {
    Atoms(Vec<Atom>),
    /// One JSON object per request (the `json` preset).
    Json,
}

impl Format {
    pub fn parse(spec: &str) -> Result<Format, FormatError> {
        if spec == "json" {
            return Ok(Format(Layout::Json));
        }
        let expanded = match spec {
            "clf" => "%h - - [%t] \"%m %U%q\" %s %ds",
            "combined" => "%h - - [%t] \"%r\" %s %b \"%{Referer}i\" \"%{User-Agent}i\"",
            "common" => "%h - - [%t] \"%r\" %s %b",
            "tiny" => "%m %U%q %s %Dms",
            other => other,
        };
        let mut atoms = Vec::new();
        let mut lit = String::new();
        let mut chars = expanded.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                lit.push(c);
                continue;
            }
            let Some(next) = chars.next() else { break }; // a trailing lone % is dropped
            let atom = match next {
                '%' => {
                    lit.push('%');
                    continue;
                }
                'h' => Atom::ClientHost,
                'l' | 'u' => Atom::Dash,
                't' => Atom::Time,
                'r' => Atom::RequestLine,
                'm' => Atom::Method,
                'U' => Atom::Path,
                'q' => Atom::Query,
                'H' => Atom::Protocol,
                's' => Atom::Status,
                'b' => Atom::BytesDash,
                'B' => Atom::Bytes,
                'd' => Atom::SecondsFrac,
                'D' => Atom::Micros,
                'T' => Atom::Seconds,
                'R' => Atom::EndReason,
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(FormatError::Unterminated),
                        }
                    }
                    if chars.next() != Some('i') {
                        return Err(FormatError::ExpectedI);
                    }
                    Atom::RequestHeader(name.to_ascii_lowercase())
                }
                other => return Err(FormatError::UnknownAtom(other)),
            };
            if !lit.is_empty() {
                atoms.push(Atom::Literal(std::mem::take(&mut lit)));
            }
            atoms.push(atom);
        }
        if !lit.is_empty() {
            atoms.push(Atom::Literal(lit));
        }
        Ok(Format(Layout::Atoms(atoms)))
    }

    /// Whether lines name request headers, which are then kept for them.
    pub fn needs_headers(&self) -> bool {
        match &self.0 {
            Layout::Json => true,
            Layout::Atoms(atoms) => atoms.iter().any(|a| matches!(a, Atom::RequestHeader(_))),
        }
    }

    pub fn render(&self, r: &Record<'_>, now: SystemTime) -> String {
        match &self.0 {
            Layout::Atoms(atoms) => render_atoms(atoms, r, now),
            Layout::Json => render_json(r, now),
        }
    }
}

/// The `json` preset: the facts of the text formats under the reference
/// server's key names, with `pid` and `worker` (the `logging` module's;
/// `worker` only in a worker process) and how a stream ended (`reason`).
/// Every other key is always present; what is unknown is null.  Wire bytes go through `logging::push_json_bytes`.
fn render_json(r: &Record<'_>, now: SystemTime) -> String {
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    };
    let mut out = String::with_capacity(256 + r.raw_path.len() + r.query.len());
    out.push_str("{\"time\":\"");
    crate::logging::push_rfc3339(&mut out, now);
    out.push_str("\",\"client\":");
    match r.client {
        Some(crate::service::Peer::Tcp(a)) => {
            let _ = write!(out, "\"{}\"", a.ip());
        }
        // A Unix socket's peer has no address (the reference's word).
        Some(crate::service::Peer::Unix) => out.push_str("\"unix\""),
        None => out.push_str("null"),
    }
    out.push_str(",\"method\":");
    if r.method.is_empty() {
        out.push_str("null");
    } else {
        crate::logging::push_json_str(&mut out, r.method);
    }
    out.push_str(",\"path\":");
    crate::logging::push_json_bytes(&mut out, r.raw_path);
    out.push_str(",\"query\":");
    crate::logging::push_json_bytes(&mut out, r.query);
    out.push_str(",\"protocol\":");
    crate::logging::push_json_str(&mut out, &format!("HTTP/{}", r.http_version));
    match r.status {
        Some(s) => {
            let _ = write!(out, ",\"status\":{s}");
        }
        None => out.push_str(",\"status\":null"),
    }
    let _ = write!(
        out,
        ",\"size\":{},\"duration\":{:.6}",
        r.body_bytes,
        r.duration.as_secs_f64()
    );
    for (key, name) in [("referer", "referer"), ("user_agent", "user-agent")] {
        let _ = write!(out, ",\"{key}\":");
        match header(name) {
            Some(v) => crate::logging::push_json_bytes(&mut out, v),
            None => out.push_str("null"),
        }
    }
    out.push_str(",\"reason\":");
    match r.end_reason {
        Some(reason) => crate::logging::push_json_str(&mut out, reason),
        None => out.push_str("null"),
    }
    crate::logging::push_pid_and_worker(&mut out);
    out.push_str("}\n");
    out
}

fn render_atoms(atoms: &[Atom], r: &Record<'_>, now: SystemTime) -> String {
    let mut out = String::with_capacity(128);
    for atom in atoms {
        match atom {
            Atom::Literal(s) => out.push_str(s),
            Atom::ClientHost => match r.client {
                Some(crate::service::Peer::Tcp(a)) => {
                    let _ = write!(out, "{}", a.ip());
                }
                // A Unix socket's peer has no address (the reference's word).
                Some(crate::service::Peer::Unix) => out.push_str("unix"),
                None => out.push('-'),
            },
            Atom::Dash => out.push('-'),
            Atom::Time => clf_time(&mut out, now),
            Atom::RequestLine => {
                out.push_str(r.method);
                out.push(' ');
                push_escaped(&mut out, r.raw_path);
                if !r.query.is_empty() {
                    out.push('?');
                    push_escaped(&mut out, r.query);
                }
                out.push_str(" HTTP/");
                out.push_str(r.http_version);
            }
            Atom::Method => out.push_str(if r.method.is_empty() { "-" } else { r.method }),
            Atom::Path => push_escaped(&mut out, r.raw_path),
            Atom::Query => {
                if !r.query.is_empty() {
                    out.push('?');
                    push_escaped(&mut out, r.query);
                }
            }
            Atom::Protocol => {
                out.push_str("HTTP/");
                out.push_str(r.http_version);
            }
            Atom::Status => match r.status {
                Some(s) => {
                    let _ = write!(out, "{s}");
                }
                None => out.push('-'),
            },
            Atom::BytesDash => {
                if r.body_bytes == 0 {
                    out.push('-');
                } else {
                    let _ = write!(out, "{}", r.body_bytes);
                }
            }
            Atom::Bytes => {
                let _ = write!(out, "{}", r.body_bytes);
            }
            Atom::SecondsFrac => {
                let _ = write!(out, "{:.3}", r.duration.as_secs_f64());
            }
            Atom::Micros => {
                let _ = write!(out, "{}", r.duration.as_micros());
            }
            Atom::Seconds => {
                let _ = write!(out, "{}", r.duration.as_secs());
            }
            Atom::EndReason => match r.end_reason {
                Some(reason) => push_escaped(&mut out, reason.as_bytes()),
                None => out.push('-'),
            },
            Atom::RequestHeader(name) => {
                match r
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                {
                    Some((_, v)) => push_escaped(&mut out, v),
                    None => out.push('-'),
                }
            }
        }
    }
    // A stream's line says how it ended even in formats without %R: an
    // sse.close reason goes to the log, never to the wire.
    if let Some(reason) = r.end_reason {
        if !atoms.contains(&Atom::EndReason) {
            out.push_str(" reason=");
            push_escaped(&mut out, reason.as_bytes());
        }
    }
    out.push('\n');
    out
}

/// Bytes from the request or the app, written so that a line stays one
/// line and says exactly what was sent: as Apache does, `"` and `\` are
/// backslash-escaped, and control characters, DEL and bytes that are not
/// UTF-8 become `\xhh`.  (An `sse.close` reason with a newline cannot forge
/// a second log line.)
fn push_escaped(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// `DD/Mon/YYYY:HH:MM:SS +0000`, always UTC.
fn clf_time(out: &mut String, now: SystemTime) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Lines waiting for the writer thread.  Past this the log is not keeping
/// up (a full disk, a stderr nobody reads): lines are dropped, counted, and
/// the count is written once the log catches up, rather than letting the
/// backlog grow the server's memory or stall its network threads.
const QUEUED_LINES: usize = 16_384;

/// Most bytes in one write(2) to a regular file.  Each write holds whole
/// lines only: with O_APPEND the kernel appends it in one piece, so lines
/// from processes that share the file never interleave.
const FILE_BATCH: usize = 64 * 1024;

/// A pipe (or a FIFO, a socket, a terminal) keeps a write whole only up to
/// PIPE_BUF bytes: past that, writers that share it can interleave.  A line
/// longer than this is written alone, and may then be split.
const PIPE_BATCH: usize = libc::PIPE_BUF;

/// Where the lines go: a file opened for appending, or stderr.  Opened
/// early (before the app loads, and before any fork: a worker process
/// inherits it and starts its own writer with `AccessLog::start_on`).
pub struct Destination {
    sink: Box<dyn Write + Send>,
    /// Most bytes per write(2) for this kind of file.
    batch: usize,
}

/// Open FILE for appending (created if missing).  A master does this
/// before it gives up root (`--user`) and forks the workers that share it.
pub fn open_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("Cannot open access log {}: {e}", path.display()),
            )
        })
}

impl Destination {
    /// FILE, appending (created if missing), or stderr when None.
    pub fn open(path: Option<&std::path::Path>) -> std::io::Result<Destination> {
        match path {
            Some(path) => Ok(Destination::from_file(open_file(path)?)),
            None => Ok(Destination {
                sink: Box::new(std::io::stderr()),
                batch: batch_for(libc::STDERR_FILENO),
            }),
        }
    }
}

impl Destination {
    /// An access log file already opened for appending: by a master before
    /// it gives up root (`--user`) and forks the workers that write to it.
    pub fn from_file(file: std::fs::File) -> Destination {
        let batch = batch_for(std::os::fd::AsRawFd::as_raw_fd(&file));
        Destination {
            sink: Box::new(file),
            batch,
        }
    }
}

/// FILE_BATCH for a regular file, PIPE_BATCH for anything else.
fn batch_for(fd: std::os::fd::RawFd) -> usize {
    // SAFETY: libc::stat is plain data, for which all-zero bytes are a
    // valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes the stat struct we own; a descriptor that
    // is not open makes it fail with EBADF, nothing worse.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    if ok && (st.st_mode & libc::S_IFMT) == libc::S_IFREG {
        FILE_BATCH
    } else {
        PIPE_BATCH
    }
}

/// How long a stopping server waits for the access log to take its last
/// lines before it exits without them.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(5);

enum Entry {
    Line(String),
    /// Everything queued before this is written; then the thread ends.
    Close,
}

/// Where finished lines go.  Cloning shares the writer thread.
#[derive(Clone)]
pub struct AccessLog {
    format: Format,
    tx: mpsc::SyncSender<Entry>,
    dropped: Arc<AtomicU64>,
    writer: Arc<Mutex<Option<WriterThread>>>,
}

struct WriterThread {
    handle: std::thread::JoinHandle<()>,
    /// Disconnected when the thread ends (its sender is dropped with it).
    ended: mpsc::Receiver<()>,
}

impl AccessLog {
    /// Start the writer thread for an opened destination.
    pub fn start_on(format: Format, dest: Destination) -> std::io::Result<AccessLog> {
        let (tx, rx) = mpsc::sync_channel::<Entry>(QUEUED_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let dropped_seen = dropped.clone();
        let (ended_tx, ended) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let _ended = ended_tx;
                write_lines(rx, dest, &dropped_seen);
            })?;
        Ok(AccessLog {
            format,
            tx,
            dropped,
            writer: Arc::new(Mutex::new(Some(WriterThread { handle, ended }))),
        })
    }

    pub fn write(&self, record: &Record<'_>) {
        let line = self.format.render(record, SystemTime::now());
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(Entry::Line(line)) {
            self.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Write out every line logged so far and end the writer thread,
    /// waiting at most `within` for a log destination that does not take
    /// them (then its lines are lost, and this says so).  Lines logged
    /// after this are dropped.  The first call does the work; later ones
    /// return at once.
    pub fn close(&self, within: Duration) {
        let Some(writer) = self.writer.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        let deadline = Instant::now() + within;
        // A full queue means the thread is busy writing; SyncSender has no
        // send-with-timeout, so try again until it has room or time is up.
        let mut entry = Entry::Close;
        loop {
            match self.tx.try_send(entry) {
                Ok(()) | Err(mpsc::TrySendError::Disconnected(_)) => break,
                Err(mpsc::TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return not_drained(within);
                    }
                    entry = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match writer.ended.recv_timeout(left) {
            Err(mpsc::RecvTimeoutError::Timeout) => not_drained(within),
            _ => {
                let _ = writer.handle.join();
            }
        }
    }
}

fn not_drained(within: Duration) {
    tracing::error!(
        "the access log did not take its last lines within {}s: they are lost",
        within.as_secs()
    );
}

/// The writer thread: whole lines, batched, each batch one write(2) of at
/// most `dest.batch` bytes (a longer line alone).
fn write_lines(rx: mpsc::Receiver<Entry>, dest: Destination, dropped: &AtomicU64) {
    let mut out = Batcher {
        buf: Vec::with_capacity(dest.batch),
        dest,
    };
    while let Ok(first) = rx.recv() {
        // This entry and whatever else is already waiting, in as few
        // writes as whole lines allow.
        let mut next = Some(first);
        let mut closing = false;
        while let Some(entry) = next.take() {
            let Entry::Line(line) = entry else {
                closing = true;
                break;
            };
            // Said where the gap is, as soon as the log takes lines again.
            let lost = dropped.swap(0, Ordering::AcqRel);
            if lost > 0 {
                out.add(
                    format!(
                        "pagi-rs: {lost} access log lines dropped: the log could not keep up\n"
                    )
                    .as_bytes(),
                );
            }
            out.add(line.as_bytes());
            next = rx.try_recv().ok();
        }
        out.flush();
        if closing {
            return;
        }
    }
}

struct Batcher {
    buf: Vec<u8>,
    dest: Destination,
}

impl Batcher {
    /// Queue a whole line, first writing out the batch if the line would
    /// take it past the limit.
    fn add(&mut self, line: &[u8]) {
        if !self.buf.is_empty() && self.buf.len() + line.len() > self.dest.batch {
            self.write_out();
        }
        self.buf.extend_from_slice(line);
    }

    fn write_out(&mut self) {
        // A failed write (a full disk, a closed pipe) loses its lines; the
        // server goes on serving.
        let _ = self.dest.sink.write_all(&self.buf);
        self.buf.clear();
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.write_out();
        }
        let _ = self.dest.sink.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(headers: &'a [(bytes::Bytes, bytes::Bytes)]) -> Record<'a> {
        Record {
            client: Some(crate::service::Peer::Tcp("127.0.0.1:4000".parse().unwrap())),
            method: "GET",
            raw_path: b"/a%20b",
            query: b"x=1",
            http_version: "1.1",
            status: Some(200),
            body_bytes: 13,
            duration: Duration::from_micros(2500),
            headers,
            end_reason: None,
        }
    }

    /// A sink that holds every write until released, like a stderr
    /// nobody reads.
    struct Stalled {
        release: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        /// Set once the writer thread is inside a write, so stuck.
        stuck: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.stuck.store(true, std::sync::atomic::Ordering::Release);
            let (lock, cv) = &*self.release;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            self.out.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that records each write(2) it would have made, optionally
    /// taking its time over each.
    #[derive(Clone, Default)]
    struct Recording {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        delay: Duration,
    }

    impl Write for Recording {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.delay);
            self.writes.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn recording_log(format: &str, batch: usize, delay: Duration) -> (AccessLog, Recording) {
        let rec = Recording {
            delay,
            ..Default::default()
        };
        let dest = Destination {
            sink: Box::new(rec.clone()),
            batch,
        };
        (
            AccessLog::start_on(Format::parse(format).unwrap(), dest).unwrap(),
            rec,
        )
    }

    #[test]
    fn each_write_is_whole_lines_within_the_batch_size() {
        // Lines of many lengths, a few longer than the pipe batch, through
        // a sink slow enough that they queue up and are batched.
        let (log, rec) = recording_log("%U", PIPE_BATCH, Duration::from_micros(200));
        let mut sent = Vec::new();
        for i in 0..3000usize {
            let path = format!(
                "/{i}/{}",
                "p".repeat((i * 37) % 700 + if i % 500 == 0 { 5000 } else { 0 })
            );
            let mut r = record(&[]);
            r.raw_path = path.as_bytes();
            log.write(&r);
            sent.push(path);
        }
        log.close(Duration::from_secs(30));
        let writes = rec.writes.lock().unwrap();
        assert!(
            writes.len() < sent.len(),
            "lines were batched: {} writes",
            writes.len()
        );
        for w in writes.iter() {
            assert!(w.ends_with(b"\n"), "a write ends a line");
            assert!(
                w.len() <= PIPE_BATCH || w.iter().filter(|&&b| b == b'\n').count() == 1,
                "a write over PIPE_BUF ({}) is one line alone",
                w.len()
            );
        }
        let all: Vec<u8> = writes.concat();
        let got: Vec<&str> = std::str::from_utf8(&all).unwrap().lines().collect();
        assert_eq!(got, sent, "every line, in order, once");
    }

    #[test]
    fn close_writes_every_queued_line_and_ends_the_thread() {
        let (log, rec) = recording_log("%U", FILE_BATCH, Duration::from_millis(2));
        for i in 0..5000 {
            let path = format!("/burst/{i}");
            let mut r = record(&[]);
            r.raw_path = path.as_bytes();
            log.write(&r);
        }
        log.close(Duration::from_secs(30));
        let lines = rec.writes.lock().unwrap().concat();
        assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 5000);
        assert!(
            log.writer.lock().unwrap().is_none(),
            "the thread was joined"
        );
        log.close(Duration::from_secs(1)); // a second close is a no-op
        log.write(&record(&[])); // and a late line neither blocks nor panics
    }

    #[test]
    fn close_gives_up_on_a_stalled_destination() {
        let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let sink = Stalled {
            release: release.clone(),
            out: Default::default(),
            stuck: Default::default(),
        };
        let dest = Destination {
            sink: Box::new(sink),
            batch: FILE_BATCH,
        };
        let log = AccessLog::start_on(Format::parse("tiny").unwrap(), dest).unwrap();
        log.write(&record(&[]));
        let started = Instant::now();
        log.close(Duration::from_millis(300));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        let (lock, cv) = &*release;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }

    #[test]
    fn a_regular_file_is_batched_larger_than_a_pipe() {
        let dir = std::env::temp_dir().join(format!("pagi-rs-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::File::create(dir.join("log")).unwrap();
        assert_eq!(
            batch_for(std::os::fd::AsRawFd::as_raw_fd(&file)),
            FILE_BATCH
        );
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array we own; both
        // are closed below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(batch_for(fds[1]), PIPE_BATCH);
        // SAFETY: the two descriptors pipe() just gave us.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_json_preset_says_what_the_text_formats_say() {
        let _worker = crate::logging::tests::WORKER_LOCK.lock().unwrap();
        let h = [
            (
                bytes::Bytes::from_static(b"user-agent"),
                bytes::Bytes::from_static(b"curl/8"),
            ),
            (
                bytes::Bytes::from_static(b"Referer"),
                bytes::Bytes::from_static(b"http://x/"),
            ),
        ];
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_770_726_896_042);
        let line = Format::parse("json").unwrap().render(&record(&h), t);
        assert_eq!(
            line,
            format!(
                "{{\"time\":\"2026-02-10T12:34:56.042Z\",\"client\":\"127.0.0.1\",\"method\":\"GET\",\
                 \"path\":\"/a%20b\",\"query\":\"x=1\",\"protocol\":\"HTTP/1.1\",\"status\":200,\
                 \"size\":13,\"duration\":0.002500,\"referer\":\"http://x/\",\"user_agent\":\"curl/8\",\
                 \"reason\":null,\"pid\":{}}}\n",
                std::process::id()
            )
        );
        let mut r = record(&[]);
        r.client = None;
        r.status = None;
        r.method = "";
        r.end_reason = Some("close_1000");
        let line = Format::parse("json").unwrap().render(&r, t);
        let obj = crate::logging::tests::decode_object(line.trim_end()).unwrap();
        use crate::logging::tests::{get, Value};
        assert_eq!(get(&obj, "client"), &Value::Null);
        assert_eq!(get(&obj, "status"), &Value::Null);
        assert_eq!(get(&obj, "method"), &Value::Null);
        assert_eq!(get(&obj, "user_agent"), &Value::Null);
        assert_eq!(get(&obj, "reason").str(), "close_1000");
        assert!(Format::parse("json").unwrap().needs_headers());
        assert!(Format::parse("combined").unwrap().needs_headers());
        assert!(!Format::parse("clf").unwrap().needs_headers());
    }

    #[test]
    fn a_stalled_log_drops_and_counts_lines_instead_of_queueing_them() {
        let release =
            std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stuck = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = Stalled {
            release: release.clone(),
            out: out.clone(),
            stuck: stuck.clone(),
        };
        let dest = Destination {
            sink: Box::new(sink),
            batch: FILE_BATCH,
        };
        let log = AccessLog::start_on(Format::parse("tiny").unwrap(), dest).unwrap();
        let headers = [];
        // Stall the writer first.  Were it still taking lines while the
        // queue fills, it could note the drops (and reset their count)
        // before the assertion below looks: a late-scheduled writer thread
        // made this test fail on a busy machine.
        log.write(&record(&headers));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !stuck.load(std::sync::atomic::Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never wrote"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let started = std::time::Instant::now();
        for _ in 0..(QUEUED_LINES * 2) {
            log.write(&record(&headers));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "writes never block"
        );
        assert!(log.dropped.load(std::sync::atomic::Ordering::Acquire) > 0);
        {
            let (lock, cv) = &*release;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        log.write(&record(&headers));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
            if text.contains("access log lines dropped") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no notice of the dropped lines"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn clf_matches_the_reference_layout() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_770_726_896); // 2026-02-10 12:34:56
        let line = Format::parse("clf").unwrap().render(&record(&[]), t);
        assert_eq!(
            line,
            "127.0.0.1 - - [10/Feb/2026:12:34:56 +0000] \"GET /a%20b?x=1\" 200 0.003s\n"
        );
    }

    #[test]
    fn a_unix_socket_peer_is_logged_as_unix() {
        let mut r = record(&[]);
        r.client = Some(crate::service::Peer::Unix);
        let line = Format::parse("%h %s")
            .unwrap()
            .render(&r, SystemTime::UNIX_EPOCH);
        assert_eq!(line, "unix 200\n");
        r.client = None;
        let line = Format::parse("%h %s")
            .unwrap()
            .render(&r, SystemTime::UNIX_EPOCH);
        assert_eq!(line, "- 200\n");
    }

    #[test]
    fn combined_and_custom_atoms() {
        let h = [(
            bytes::Bytes::from_static(b"user-agent"),
            bytes::Bytes::from_static(b"curl/8"),
        )];
        let t = SystemTime::UNIX_EPOCH;
        let line = Format::parse("combined").unwrap().render(&record(&h), t);
        assert!(
            line.ends_with("\"GET /a%20b?x=1 HTTP/1.1\" 200 13 \"-\" \"curl/8\"\n"),
            "{line}"
        );
        let tiny = Format::parse("%m %s %D %B %% %H")
            .unwrap()
            .render(&record(&h), t);
        assert_eq!(tiny, "GET 200 2500 13 % HTTP/1.1\n");
    }

    #[test]
    fn stream_lines_say_how_the_stream_ended() {
        let t = SystemTime::UNIX_EPOCH;
        let mut r = record(&[]);
        r.end_reason = Some("job_done");
        let tiny = Format::parse("tiny").unwrap().render(&r, t);
        assert_eq!(tiny, "GET /a%20b?x=1 200 2500ms reason=job_done\n");
        let own = Format::parse("%s %R").unwrap().render(&r, t);
        assert_eq!(own, "200 job_done\n", "no suffix when the format places it");
        r.end_reason = None;
        assert_eq!(Format::parse("%s %R").unwrap().render(&r, t), "200 -\n");
    }

    #[test]
    fn bad_formats_are_rejected_with_the_reference_wording() {
        assert_eq!(
            Format::parse("%Z").unwrap_err(),
            FormatError::UnknownAtom('Z')
        );
        assert_eq!(Format::parse("%{X").unwrap_err(), FormatError::Unterminated);
        assert_eq!(Format::parse("%{X}o").unwrap_err(), FormatError::ExpectedI);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_494), (2026, 2, 10));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A finished GET with the given wire bytes, as the properties vary them.
    fn sample_record<'a>(
        path: &'a [u8],
        query: &'a [u8],
        headers: &'a [(bytes::Bytes, bytes::Bytes)],
        reason: &'a str,
    ) -> Record<'a> {
        Record {
            client: None,
            method: "GET",
            raw_path: path,
            query,
            http_version: "1.1",
            status: Some(200),
            body_bytes: 1,
            duration: Duration::from_millis(1),
            headers,
            end_reason: Some(reason),
        }
    }

    /// Undo `push_escaped`.
    fn unescape(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut it = s.bytes();
        while let Some(b) = it.next() {
            if b != b'\\' {
                out.push(b);
                continue;
            }
            match it.next() {
                Some(b'x') => {
                    let hex = [it.next().unwrap(), it.next().unwrap()];
                    out.push(u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap());
                }
                Some(other) => out.push(other),
                None => panic!("dangling backslash"),
            }
        }
        out
    }

    proptest! {
        /// Whatever bytes a client or an app put in a path, a query, a
        /// header or an sse.close reason, the record is one line with no
        /// control characters, and the path can be read back exactly.
        #[test]
        fn a_record_is_one_line_that_says_exactly_what_was_sent(
            path in proptest::collection::vec(any::<u8>(), 0..64),
            query in proptest::collection::vec(any::<u8>(), 0..32),
            agent in proptest::collection::vec(any::<u8>(), 0..32),
            reason in ".{0,16}",
        ) {
            let headers = [(bytes::Bytes::from_static(b"user-agent"), bytes::Bytes::from(agent))];
            let record = sample_record(&path, &query, &headers, &reason);
            for spec in ["combined", "clf", "%U|%{User-Agent}i|%R"] {
                let line = Format::parse(spec).unwrap().render(&record, SystemTime::UNIX_EPOCH);
                prop_assert!(line.ends_with('\n'));
                let body = &line[..line.len() - 1];
                prop_assert!(!body.chars().any(char::is_control), "{spec}: {line:?}");
            }
            let line = Format::parse("%U").unwrap().render(&record, SystemTime::UNIX_EPOCH);
            let shown = line.strip_suffix('\n').unwrap();
            let shown = shown.split(" reason=").next().unwrap();
            prop_assert_eq!(unescape(shown), path);
        }

        /// The json preset: whatever the bytes, one line that a strict JSON
        /// decoder accepts, with the path, query, user agent and reason
        /// reading back exactly.
        #[test]
        fn a_json_record_is_one_valid_line_that_reads_back(
            path in proptest::collection::vec(any::<u8>(), 0..64),
            query in proptest::collection::vec(any::<u8>(), 0..32),
            agent in proptest::collection::vec(any::<u8>(), 0..32),
            reason in proptest::collection::vec(any::<char>(), 0..16),
        ) {
            let reason: String = reason.into_iter().collect();
            use crate::logging::tests::{decode_object, get, unescape_wire};
            let headers = [(bytes::Bytes::from_static(b"user-agent"), bytes::Bytes::from(agent.clone()))];
            let record = sample_record(&path, &query, &headers, &reason);
            let line = Format::parse("json").unwrap().render(&record, SystemTime::UNIX_EPOCH);
            prop_assert!(line.ends_with('\n'));
            let body = &line[..line.len() - 1];
            prop_assert!(!body.contains('\n') && !body.chars().any(char::is_control), "{line:?}");
            let obj = decode_object(body).map_err(|e| TestCaseError::fail(format!("{e}: {line:?}")))?;
            prop_assert_eq!(unescape_wire(get(&obj, "path").str()), path);
            prop_assert_eq!(unescape_wire(get(&obj, "query").str()), query);
            prop_assert_eq!(unescape_wire(get(&obj, "user_agent").str()), agent);
            prop_assert_eq!(get(&obj, "reason").str(), reason.as_str());
        }
    }
}
