//! The access log, in the reference server's formats.  A format string is
//! compiled once into atoms; lines are handed to a writer thread so that a
//! slow log destination never stalls a network task.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

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
    pub client: Option<SocketAddr>,
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
pub struct Format(Vec<Atom>);

impl Format {
    pub fn parse(spec: &str) -> Result<Format, FormatError> {
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
        Ok(Format(atoms))
    }

    pub fn render(&self, r: &Record<'_>, now: SystemTime) -> String {
        let mut out = String::with_capacity(128);
        for atom in &self.0 {
            match atom {
                Atom::Literal(s) => out.push_str(s),
                Atom::ClientHost => match r.client {
                    Some(a) => {
                        let _ = write!(out, "{}", a.ip());
                    }
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
            if !self.0.contains(&Atom::EndReason) {
                out.push_str(" reason=");
                push_escaped(&mut out, reason.as_bytes());
            }
        }
        out.push('\n');
        out
    }
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
fn civil_from_days(z: i64) -> (i64, u32, u32) {
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

/// Where finished lines go.  Cloning shares the writer thread.
#[derive(Clone)]
pub struct AccessLog {
    format: Format,
    tx: mpsc::SyncSender<String>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl AccessLog {
    /// Open the access log file for appending.  Done before the server
    /// gives up root (`--user`) and before it forks workers, which each
    /// write whole lines to it.
    pub fn open(path: &std::path::Path) -> std::io::Result<std::fs::File> {
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

    /// Spawn the writer thread for `file` (stderr when None).
    pub fn start_on(format: Format, file: Option<std::fs::File>) -> std::io::Result<AccessLog> {
        let sink: Box<dyn Write + Send> = match file {
            Some(file) => Box::new(file),
            None => Box::new(std::io::stderr()),
        };
        Self::start_writing_to(format, sink)
    }

    fn start_writing_to(
        format: Format,
        mut sink: Box<dyn Write + Send>,
    ) -> std::io::Result<AccessLog> {
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUED_LINES);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dropped_seen = dropped.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    let lost = dropped_seen.swap(0, std::sync::atomic::Ordering::AcqRel);
                    if lost > 0 {
                        buf.extend_from_slice(
                            format!("pagi-rs: {lost} access log lines dropped: the log could not keep up\n")
                                .as_bytes(),
                        );
                    }
                    buf.extend_from_slice(line.as_bytes());
                    // Batch whatever else is already waiting into one write.
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(more.as_bytes());
                        if buf.len() > 60 * 1024 {
                            break;
                        }
                    }
                    let _ = sink.write_all(&buf);
                    let _ = sink.flush();
                    buf.clear();
                }
            })?;
        Ok(AccessLog {
            format,
            tx,
            dropped,
        })
    }

    pub fn write(&self, record: &Record<'_>) {
        let line = self.format.render(record, SystemTime::now());
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(headers: &'a [(bytes::Bytes, bytes::Bytes)]) -> Record<'a> {
        Record {
            client: Some("127.0.0.1:4000".parse().unwrap()),
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
    }

    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
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

    #[test]
    fn a_stalled_log_drops_and_counts_lines_instead_of_queueing_them() {
        let release =
            std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Stalled {
            release: release.clone(),
            out: out.clone(),
        };
        let log =
            AccessLog::start_writing_to(Format::parse("tiny").unwrap(), Box::new(sink)).unwrap();
        let headers = [];
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
            let record = Record {
                client: None,
                method: "GET",
                raw_path: &path,
                query: &query,
                http_version: "1.1",
                status: Some(200),
                body_bytes: 1,
                duration: Duration::from_millis(1),
                headers: &headers,
                end_reason: Some(&reason),
            };
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
    }
}
