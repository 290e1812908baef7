//! Server-Sent Events load generator for `bench/bin/sse-bench`.
//!
//! Opens `--subscribers` TCP connections, then on all of them at once sends
//! `GET <path>?n=<events> HTTP/1.1` with `Accept: text/event-stream`, and
//! reads each response to its end: the HTTP head, the chunked framing (or a
//! Content-Length, or read-to-close) and the event stream inside it. Each
//! subscriber must receive exactly the events `data: 1` ... `data: <n>`, in
//! order, and a properly ended stream; anything else is reported as an
//! error and makes the exit status 1.
//!
//! Prints, wrk-style on stdout, the total events per second, timed from the
//! first response byte any subscriber saw to the last event any subscriber
//! parsed, and the p50/p99 time from sending the request to a subscriber's
//! first event.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common.rs"]
mod common;

#[derive(Parser, Debug)]
#[command(about = "Server-Sent Events load generator (events/s over many subscribers)")]
struct Args {
    /// Stream URL, e.g. http://127.0.0.1:5003/events
    url: String,

    /// Concurrent subscribers (connections).
    #[arg(short = 'c', long, default_value_t = 100)]
    subscribers: usize,

    /// Events each subscriber asks for (appended to the URL as `n=`).
    #[arg(short = 'n', long, default_value_t = 1000)]
    events: u64,

    /// Client threads (1 = a current-thread runtime).
    #[arg(short, long, default_value_t = 1)]
    threads: usize,

    /// Give up on a subscriber after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

struct Target {
    /// `host:port` to connect to and send as Host.
    authority: String,
    /// Path and query, with `n=` added.
    path: String,
}

fn parse_url(url: &str, events: u64) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    Ok(Target {
        authority: authority.to_owned(),
        path: format!("{path}{sep}n={events}"),
    })
}

/// What one subscriber saw.
struct SubStats {
    events: u64,
    sent: Instant,
    first_byte: Option<Instant>,
    first_event: Option<Instant>,
    last_event: Option<Instant>,
    error: Option<String>,
}

// ---- chunked transfer coding ------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Chunk {
    /// Reading the hex size line; `ext` once past a `;` extension.
    Size {
        size: u64,
        digits: u32,
        ext: bool,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one.
    Trailer {
        empty_line: bool,
    },
    Done,
}

/// Incremental decoder: hands the chunk payloads to `out` without copying.
struct Dechunker {
    state: Chunk,
}

impl Dechunker {
    fn new() -> Self {
        Dechunker {
            state: Chunk::Size {
                size: 0,
                digits: 0,
                ext: false,
            },
        }
    }

    fn done(&self) -> bool {
        self.state == Chunk::Done
    }

    fn feed(&mut self, mut buf: &[u8], out: &mut impl FnMut(&[u8])) -> Result<(), String> {
        while !buf.is_empty() {
            match &mut self.state {
                Chunk::Size { size, digits, ext } => {
                    let b = buf[0];
                    buf = &buf[1..];
                    match b {
                        b'\n' => {
                            if *digits == 0 {
                                return Err("chunk size line without digits".into());
                            }
                            self.state = if *size == 0 {
                                Chunk::Trailer { empty_line: true }
                            } else {
                                Chunk::Data(*size)
                            };
                        }
                        b'\r' => {}
                        _ if *ext => {}
                        b';' | b' ' | b'\t' => *ext = true,
                        _ => {
                            let d = (b as char)
                                .to_digit(16)
                                .ok_or_else(|| format!("bad chunk size byte {b:#04x}"))?;
                            if *digits >= 15 {
                                return Err("chunk size too large".into());
                            }
                            *size = *size * 16 + u64::from(d);
                            *digits += 1;
                        }
                    }
                }
                Chunk::Data(left) => {
                    let n = (*left).min(buf.len() as u64) as usize;
                    out(&buf[..n]);
                    buf = &buf[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = Chunk::DataCr;
                    }
                }
                Chunk::DataCr | Chunk::DataLf => {
                    let b = buf[0];
                    buf = &buf[1..];
                    self.state = match (self.state, b) {
                        (Chunk::DataCr, b'\r') => Chunk::DataLf,
                        (_, b'\n') => Chunk::Size {
                            size: 0,
                            digits: 0,
                            ext: false,
                        },
                        _ => return Err(format!("expected CRLF after chunk, got {b:#04x}")),
                    };
                }
                Chunk::Trailer { empty_line } => {
                    let b = buf[0];
                    buf = &buf[1..];
                    match b {
                        b'\n' if *empty_line => self.state = Chunk::Done,
                        b'\n' => *empty_line = true,
                        b'\r' => {}
                        _ => *empty_line = false,
                    }
                }
                Chunk::Done => return Err("data after the last chunk".into()),
            }
        }
        Ok(())
    }
}

// ---- event stream -----------------------------------------------------------

/// Incremental `text/event-stream` parser (WHATWG HTML, "Parsing an event
/// stream"): collects `data` fields and dispatches an event at each blank
/// line that follows at least one data field. Comments and the other fields
/// (`event`, `id`, `retry`) are accepted and ignored.
struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The previous chunk ended in CR: a leading LF belongs to that line end.
    after_cr: bool,
    first: bool,
}

impl SseParser {
    fn new() -> Self {
        SseParser {
            line: Vec::with_capacity(128),
            data: Vec::with_capacity(128),
            has_data: false,
            after_cr: false,
            first: true,
        }
    }

    /// Feeds body bytes; calls `event(data)` for each dispatched event.
    fn feed(&mut self, mut buf: &[u8], event: &mut impl FnMut(&[u8])) {
        if self.after_cr && buf.first() == Some(&b'\n') {
            buf = &buf[1..];
        }
        self.after_cr = false;
        while let Some(i) = buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.is_empty() {
                self.process_line(&buf[..i], event);
            } else {
                self.line.extend_from_slice(&buf[..i]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, event);
                self.line = line;
                self.line.clear();
            }
            let cr = buf[i] == b'\r';
            buf = &buf[i + 1..];
            if cr {
                if buf.is_empty() {
                    self.after_cr = true;
                } else if buf[0] == b'\n' {
                    buf = &buf[1..];
                }
            }
        }
        self.line.extend_from_slice(buf);
    }

    fn process_line(&mut self, mut line: &[u8], event: &mut impl FnMut(&[u8])) {
        if self.first {
            // A UTF-8 byte order mark may start the stream.
            line = line.strip_prefix(b"\xef\xbb\xbf").unwrap_or(line);
            self.first = false;
        }
        if line.is_empty() {
            if self.has_data {
                event(&self.data);
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

// ---- one subscriber ---------------------------------------------------------

enum Framing {
    Chunked(Dechunker),
    Length(u64),
    UntilClose,
}

/// Parses the response head; returns its length and the body framing.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Framing)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    if res.code != Some(200) {
        return Err(format!(
            "status {} {}",
            res.code.unwrap_or(0),
            res.reason.unwrap_or("")
        ));
    }
    let mut content_type = None;
    let mut framing = Framing::UntilClose;
    for h in res.headers.iter() {
        let value = String::from_utf8_lossy(h.value).to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.split(',').any(|v| v.trim() == "chunked") {
                framing = Framing::Chunked(Dechunker::new());
            }
        } else if h.name.eq_ignore_ascii_case("content-length")
            && !matches!(framing, Framing::Chunked(_))
        {
            let n = value
                .trim()
                .parse()
                .map_err(|_| format!("bad content-length {value:?}"))?;
            framing = Framing::Length(n);
        }
    }
    match content_type {
        Some(ct) if ct.starts_with("text/event-stream") => Ok(Some((len, framing))),
        other => Err(format!(
            "content-type {other:?}, expected text/event-stream"
        )),
    }
}

/// Parses an event's data as the decimal counter it should carry.
fn counter(data: &[u8]) -> Option<u64> {
    if data.is_empty() || data.len() > 19 {
        return None;
    }
    data.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

async fn subscribe(mut stream: TcpStream, target: &Target, want: u64) -> SubStats {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\
         Cache-Control: no-cache\r\nUser-Agent: sse-load\r\n\r\n",
        target.path, target.authority
    );
    let mut st = SubStats {
        events: 0,
        sent: Instant::now(),
        first_byte: None,
        first_event: None,
        last_event: None,
        error: None,
    };
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        st.error = Some(format!("write request: {e}"));
        return st;
    }
    st.sent = Instant::now();
    if let Err(e) = read_stream(&mut stream, want, &mut st).await {
        st.error = Some(e);
    } else if st.events != want {
        st.error = Some(format!("stream ended after {} of {want} events", st.events));
    }
    st
}

async fn read_stream(stream: &mut TcpStream, want: u64, st: &mut SubStats) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut framing = None;
    let mut sse = SseParser::new();
    let mut bad_event: Option<String> = None;
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let now = Instant::now();
        if st.first_byte.is_none() && n > 0 {
            st.first_byte = Some(now);
        }
        let mut body = &buf[..n];
        if framing.is_none() {
            if n == 0 {
                return Err("connection closed before the response head".into());
            }
            head.extend_from_slice(body);
            let Some((len, f)) = parse_head(&head)? else {
                continue;
            };
            framing = Some(f);
            // Whatever followed the head in this read is body.
            let body_start = n - (head.len() - len);
            body = &buf[body_start..n];
        }
        let mut on_event = |data: &[u8]| {
            let expected = st.events + 1;
            if bad_event.is_none() && counter(data) != Some(expected) {
                bad_event = Some(format!(
                    "event #{expected}: data {:?}, expected \"{expected}\"",
                    String::from_utf8_lossy(&data[..data.len().min(40)])
                ));
            }
            st.events += 1;
            st.first_event.get_or_insert(now);
            st.last_event = Some(now);
        };
        let finished = match framing.as_mut().expect("head parsed") {
            Framing::Chunked(d) => {
                if n == 0 {
                    return Err("connection closed before the last chunk".into());
                }
                d.feed(body, &mut |b| sse.feed(b, &mut on_event))?;
                d.done()
            }
            Framing::Length(left) => {
                if n == 0 && *left > 0 {
                    return Err("connection closed before content-length was read".into());
                }
                let take = (*left).min(body.len() as u64) as usize;
                sse.feed(&body[..take], &mut on_event);
                *left -= take as u64;
                *left == 0
            }
            Framing::UntilClose => {
                sse.feed(body, &mut on_event);
                n == 0
            }
        };
        if let Some(e) = bad_event.take() {
            return Err(e);
        }
        if st.events > want {
            return Err(format!("more than the {want} events asked for"));
        }
        if finished {
            return Ok(());
        }
    }
}

// ---- main -------------------------------------------------------------------

async fn run(args: &'static Args, target: &'static Target) -> Result<bool, String> {
    // Connect everyone first, so the requests go out together.
    let connecting: Vec<_> = (0..args.subscribers)
        .map(|_| {
            tokio::spawn(async move {
                let s = TcpStream::connect(&target.authority).await?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(s)
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(args.subscribers);
    for h in connecting {
        let s = h
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connect {}: {e}", target.authority))?;
        streams.push(s);
    }

    let limit = Duration::from_secs(args.timeout);
    let handles: Vec<_> = streams
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let started = Instant::now();
                match tokio::time::timeout(limit, subscribe(s, target, args.events)).await {
                    Ok(st) => st,
                    Err(_) => SubStats {
                        events: 0,
                        sent: started,
                        first_byte: None,
                        first_event: None,
                        last_event: None,
                        error: Some(format!("timed out after {} s", args.timeout)),
                    },
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(handles.len());
    for h in handles {
        all.push(h.await.map_err(|e| e.to_string())?);
    }

    let events: u64 = all.iter().map(|s| s.events).sum();
    let first = all.iter().filter_map(|s| s.first_byte).min();
    let last = all.iter().filter_map(|s| s.last_event).max();
    let secs = match (first, last) {
        (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let mut ttfe: Vec<Duration> = all
        .iter()
        .filter_map(|s| s.first_event.map(|t| t.duration_since(s.sent)))
        .collect();
    ttfe.sort_unstable();
    let complete = all
        .iter()
        .filter(|s| s.error.is_none() && s.events == args.events)
        .count();
    let errors: Vec<&str> = all.iter().filter_map(|s| s.error.as_deref()).collect();

    println!(
        "sse-load: {}, {} subscribers x {} events",
        args.url, args.subscribers, args.events
    );
    println!("Events:           {events}");
    println!("Duration:         {secs:.3} s (first byte to last event)");
    println!(
        "Events/sec:       {:.2}",
        if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        }
    );
    println!(
        "First event p50:  {:.3} ms",
        common::percentile(&ttfe, 50.0).as_secs_f64() * 1e3
    );
    println!(
        "First event p99:  {:.3} ms",
        common::percentile(&ttfe, 99.0).as_secs_f64() * 1e3
    );
    println!(
        "Complete:         {complete}/{} subscribers got all {} events",
        args.subscribers, args.events
    );
    println!("Errors:           {}", errors.len());
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    Ok(errors.is_empty())
}

fn main() -> ExitCode {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    if args.subscribers == 0 || args.threads == 0 {
        eprintln!("sse-load: --subscribers and --threads must be positive");
        return ExitCode::from(2);
    }
    let target: &'static Target = match parse_url(&args.url, args.events) {
        Ok(t) => Box::leak(Box::new(t)),
        Err(e) => {
            eprintln!("sse-load: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match common::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args, target)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sse-load: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(body: &[u8], split: usize) -> Vec<String> {
        let mut got = Vec::new();
        let mut p = SseParser::new();
        for part in body.chunks(split) {
            p.feed(part, &mut |d| {
                got.push(String::from_utf8_lossy(d).into_owned())
            });
        }
        got
    }

    #[test]
    fn sse_line_endings_and_fields() {
        let body = b"\xef\xbb\xbfdata: 1\n\n: comment\r\nevent: x\r\ndata:2\r\n\r\ndata: a\rdata: b\r\rid: 9\n\n";
        for split in 1..body.len() {
            assert_eq!(events_of(body, split), ["1", "2", "a\nb"], "split {split}");
        }
    }

    #[test]
    fn dechunk_across_reads() {
        let wire = b"7\r\ndata: 1\r\n3;ext=1\r\n\n\nd\r\n0\r\nx: y\r\n\r\n";
        for split in 1..wire.len() {
            let mut d = Dechunker::new();
            let mut out = Vec::new();
            for part in wire.chunks(split) {
                d.feed(part, &mut |b| out.extend_from_slice(b)).unwrap();
            }
            assert!(d.done(), "split {split}");
            assert_eq!(out, b"data: 1\n\nd");
        }
    }
}
