//! Server-Sent Events over an HTTP/1.1 response (Spec/Www.pod, "Server-Sent
//! Events").  An SSE scope is an ordinary exchange whose body is an event
//! stream: this module formats the events, opens the stream with the headers
//! the spec asks for, and supervises it (keepalive comments, the idle
//! timeout, server shutdown).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use tokio::sync::watch;

use crate::error::SendError;
use crate::exchange::Exchange;

/// One `sse.send` event's fields, as the application gave them.
pub struct Event<'a> {
    pub event: Option<&'a [u8]>,
    pub data: &'a [u8],
    pub id: Option<&'a [u8]>,
    pub retry: Option<u64>,
}

fn has_line_break(s: &[u8]) -> bool {
    s.iter().any(|b| *b == b'\n' || *b == b'\r')
}

/// Lines of a text, split at CRLF, LF or CR, keeping empty lines (so
/// "a\n" is two lines: "a" and "").  An iterator, not a list: it runs for
/// every event a stream sends, and must not allocate.
fn lines(text: &[u8]) -> Lines<'_> {
    Lines { rest: Some(text) }
}

struct Lines<'a> {
    /// What is left to split; `None` once the last line was given.
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let text = self.rest?;
        match text.iter().position(|b| *b == b'\n' || *b == b'\r') {
            None => {
                self.rest = None;
                Some(text)
            }
            Some(i) => {
                let crlf = text[i] == b'\r' && text.get(i + 1) == Some(&b'\n');
                self.rest = Some(&text[i + if crlf { 2 } else { 1 }..]);
                Some(&text[..i])
            }
        }
    }
}

/// The wire form of an event: `event:`, one `data:` line per line of data,
/// `id:`, `retry:`, then the blank line that dispatches it.  Fails, writing
/// nothing, on a line break in `event` or `id` (it would forge fields).
#[cfg(test)]
pub fn format_event(ev: &Event<'_>) -> Result<Vec<u8>, SendError> {
    let mut out = Vec::new();
    write_event(ev, &mut out)?;
    Ok(out)
}

/// [`format_event`] into `out` (cleared first), so that a stream can reuse
/// one buffer for all its events.
pub fn write_event(ev: &Event<'_>, out: &mut Vec<u8>) -> Result<(), SendError> {
    out.clear();
    for (name, value) in [("event", ev.event), ("id", ev.id)] {
        if value.is_some_and(has_line_break) {
            return Err(SendError::Invalid(format!(
                "sse.send '{name}' must not contain newline characters"
            )));
        }
    }
    out.reserve(ev.data.len() + 32);
    if let Some(event) = ev.event.filter(|e| !e.is_empty()) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event);
        out.push(b'\n');
    }
    for line in lines(ev.data) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    if let Some(id) = ev.id.filter(|i| !i.is_empty()) {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id);
        out.push(b'\n');
    }
    if let Some(retry) = ev.retry {
        use std::io::Write;
        // Writing to a Vec cannot fail.
        let _ = writeln!(out, "retry: {retry}");
    }
    out.push(b'\n');
    Ok(())
}

/// The wire form of `sse.comment`: every line starts with ':' (added when
/// missing), and a blank line ends it.
pub fn format_comment(comment: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(comment.len() + 4);
    for line in lines(comment) {
        if !line.starts_with(b":") {
            out.push(b':');
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// The keepalive comment: one line, ':' added when missing (":\n\n" when empty).
pub fn keepalive_comment(comment: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(comment.len() + 3);
    if !comment.starts_with(b":") {
        out.push(b':');
    }
    out.extend_from_slice(comment);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Headers `sse.start` adds when the application did not set them.
pub fn add_stream_headers(map: &mut HeaderMap) {
    let defaults: [(HeaderName, &'static str); 2] = [
        (http::header::CONTENT_TYPE, "text/event-stream"),
        (http::header::CACHE_CONTROL, "no-cache"),
    ];
    for (name, value) in defaults {
        if !map.contains_key(&name) {
            map.insert(name, HeaderValue::from_static(value));
        }
    }
}

/// What the application asked of keepalive comments; `None` = off.
pub type KeepaliveSetting = Option<(Duration, Bytes)>;

/// The stream's control channel, held by its exchange.
pub struct StreamControl {
    pub keepalive: watch::Sender<KeepaliveSetting>,
}

/// Server-side limits for every event stream.
#[derive(Clone)]
pub struct StreamSettings {
    /// `--sse-idle-timeout`: no event sent for this long closes the stream.
    pub idle_timeout: Option<Duration>,
    /// Becomes true when the server starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// Watches one event stream until it ends: sends keepalive comments when
/// nothing else went out for an interval, applies the idle timeout, and
/// closes the stream when the server shuts down.  It sleeps until the next
/// deadline rather than waking for every event: when a deadline comes, the
/// time since the last progress says whether anything is due.
pub async fn supervise(
    ex: Arc<Exchange>,
    mut keepalive: watch::Receiver<KeepaliveSetting>,
    mut settings: StreamSettings,
) {
    const FAR: Duration = Duration::from_secs(86_400 * 365);
    loop {
        // Registered before the check, so an end in between is not missed.
        let ended = ex.end_signal();
        if ex.has_ended() {
            return;
        }
        let idle = ex.since_progress();
        if let Some(limit) = settings.idle_timeout {
            if idle >= limit {
                tracing::warn!(
                    "SSE idle timeout ({}s) - closing the stream",
                    limit.as_secs()
                );
                ex.set_end_reason("idle_timeout");
                ex.cut_off(
                    "idle_timeout",
                    format!("nothing sent for {}s (--sse-idle-timeout)", limit.as_secs()),
                );
                return;
            }
        }
        let setting = keepalive.borrow_and_update().clone();
        let until_keepalive = setting
            .as_ref()
            .map_or(FAR, |(every, _)| every.saturating_sub(idle));
        let until_idle = settings
            .idle_timeout
            .map_or(FAR, |limit| limit.saturating_sub(idle));
        tokio::select! {
            _ = tokio::time::sleep(until_keepalive.min(until_idle)) => {
                if let Some((every, comment)) = setting {
                    // Outside the water marks: a keepalive never waits.  With
                    // bytes still queued the connection is not idle, and a
                    // client that stopped reading must not pile comments up.
                    if ex.since_progress() >= every && ex.buffered_amount() == 0 {
                        let _ = ex.body(&comment, true);
                    }
                }
            }
            changed = keepalive.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            // Err (the server dropped its sender) is no shutdown: branch off.
            Ok(_) = settings.shutdown.wait_for(|down| *down) => {
                ex.server_abort("server_shutdown", Some("the server is shutting down".into()), None);
                return;
            }
            _ = ended => return,
        }
    }
}

/// Open the stream's control channel and start its supervisor.
pub fn start_supervisor(
    ex: &Arc<Exchange>,
    settings: StreamSettings,
    runtime: &tokio::runtime::Handle,
) -> StreamControl {
    let (tx, rx) = watch::channel(None);
    runtime.spawn(supervise(ex.clone(), rx, settings));
    StreamControl { keepalive: tx }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(event: Option<&'a str>, data: &'a str, id: Option<&'a str>) -> Event<'a> {
        Event {
            event: event.map(str::as_bytes),
            data: data.as_bytes(),
            id: id.map(str::as_bytes),
            retry: None,
        }
    }

    #[test]
    fn event_fields_in_order_then_a_blank_line() {
        let mut ev = event(Some("tick"), "1", Some("7"));
        ev.retry = Some(3000);
        assert_eq!(
            format_event(&ev).unwrap(),
            b"event: tick\ndata: 1\nid: 7\nretry: 3000\n\n"
        );
    }

    #[test]
    fn lines_split_at_crlf_lf_or_cr_and_keep_empty_ones() {
        let split = |t: &str| -> Vec<String> {
            lines(t.as_bytes())
                .map(|l| String::from_utf8(l.to_vec()).unwrap())
                .collect()
        };
        assert_eq!(split(""), [""]);
        assert_eq!(split("a"), ["a"]);
        assert_eq!(split("a\n"), ["a", ""]);
        assert_eq!(split("a\r\nb"), ["a", "b"]);
        assert_eq!(split("a\r\rb"), ["a", "", "b"], "CR CR is two breaks");
        assert_eq!(split("a\n\rb"), ["a", "", "b"], "LF CR is two breaks");
        assert_eq!(split("\r\n"), ["", ""]);
        assert_eq!(split("\r"), ["", ""]);
    }

    #[test]
    fn a_reused_buffer_holds_only_the_latest_event() {
        let mut wire = Vec::new();
        write_event(&event(Some("first"), "one\ntwo", Some("1")), &mut wire).unwrap();
        write_event(&event(None, "x", None), &mut wire).unwrap();
        assert_eq!(wire, b"data: x\n\n");
        assert!(write_event(&event(Some("a\nb"), "x", None), &mut wire).is_err());
        assert!(wire.is_empty(), "a refused event leaves nothing to send");
    }

    #[test]
    fn multi_line_data_is_one_data_line_per_line() {
        let out = format_event(&event(None, "a\nb\r\nc\rd\n", None)).unwrap();
        assert_eq!(out, b"data: a\ndata: b\ndata: c\ndata: d\ndata: \n\n");
        assert_eq!(format_event(&event(None, "", None)).unwrap(), b"data: \n\n");
    }

    #[test]
    fn empty_event_and_id_are_left_out() {
        let out = format_event(&event(Some(""), "x", Some(""))).unwrap();
        assert_eq!(out, b"data: x\n\n");
    }

    #[test]
    fn line_breaks_in_event_or_id_are_refused() {
        for ev in [
            event(Some("a\nb"), "x", None),
            event(None, "x", Some("1\r")),
        ] {
            assert!(matches!(format_event(&ev), Err(SendError::Invalid(_))));
        }
    }

    #[test]
    fn comments_get_a_colon_per_line() {
        assert_eq!(format_comment(b"hello"), b":hello\n\n");
        assert_eq!(format_comment(b":already"), b":already\n\n");
        assert_eq!(format_comment(b"a\nb"), b":a\n:b\n\n");
        assert_eq!(&keepalive_comment(b"")[..], b":\n\n");
        assert_eq!(&keepalive_comment(b"ping")[..], b":ping\n\n");
    }

    /// A stream whose client took every queued byte, and one whose client
    /// took nothing: keepalive comments go to the first only.
    #[tokio::test]
    async fn keepalive_comments_only_when_nothing_is_queued() {
        let settings = || StreamSettings {
            idle_timeout: None,
            shutdown: watch::channel(false).1,
        };
        let every = Duration::from_millis(20);
        let comment = keepalive_comment(b"ka");
        let runtime = tokio::runtime::Handle::current();
        let mut streams = Vec::new();
        for client_reads in [true, false] {
            let (ex, _head) = crate::exchange::tests::exchange(false);
            ex.start_event_stream(200, &[]).unwrap();
            ex.body(b"data: 1\n\n", true).unwrap();
            if client_reads {
                assert!(crate::exchange::tests::poll(&ex).is_ready());
            }
            let control = start_supervisor(&ex, settings(), &runtime);
            control
                .keepalive
                .send_replace(Some((every, comment.clone())));
            streams.push((ex, control));
        }
        tokio::time::sleep(every * 5).await;
        let (reading, _) = &streams[0];
        let (stalled, _) = &streams[1];
        assert!(
            reading.buffered_amount() >= comment.len(),
            "an idle stream gets comments"
        );
        assert_eq!(stalled.buffered_amount(), 9, "a stalled one gets none");
    }

    #[test]
    fn stream_headers_fill_in_only_what_is_missing() {
        let mut map = HeaderMap::new();
        map.insert(
            "content-type",
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        add_stream_headers(&mut map);
        assert_eq!(map["content-type"], "text/event-stream; charset=utf-8");
        assert_eq!(map["cache-control"], "no-cache");
        assert!(
            map.get("connection").is_none(),
            "connection headers belong to http1/, not to every protocol"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// What an EventSource makes of one dispatch (WHATWG "Interpreting an
    /// event stream"): lines end at CRLF, LF or CR; `data` lines are joined
    /// with LF; the blank line dispatches.  Returns (event, data, id, events).
    fn interpret(wire: &[u8]) -> (String, String, String, usize) {
        let text = String::from_utf8(wire.to_vec()).unwrap();
        let (mut event, mut data, mut id, mut dispatched) =
            (String::new(), Vec::new(), String::new(), 0);
        let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
        for line in normalised.split('\n') {
            if line.is_empty() {
                dispatched += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "data" => data.push(value.to_string()),
                "id" => id = value.to_string(),
                _ => {}
            }
        }
        // The text ends with "\n\n": the split leaves one more empty piece.
        (event, data.join("\n"), id, dispatched - 1)
    }

    proptest! {
        /// Any data and any field values without line breaks reach the
        /// client as exactly one event carrying them (data's CRLF and CR
        /// read as LF, as EventSource reads them).
        #[test]
        fn one_send_is_one_event_with_its_fields(
            data in "(?s:.{0,40})",
            event in "[^\r\n]{0,12}",
            id in "[^\r\n]{0,12}",
        ) {
            let ev = Event { event: Some(event.as_bytes()), data: data.as_bytes(), id: Some(id.as_bytes()), retry: None };
            let wire = format_event(&ev).unwrap();
            let (e, d, i, n) = interpret(&wire);
            prop_assert_eq!(n, 1, "{:?}", String::from_utf8_lossy(&wire));
            prop_assert_eq!(d, data.replace("\r\n", "\n").replace('\r', "\n"));
            prop_assert_eq!(e, event);
            prop_assert_eq!(i, id);
        }

        /// A line break in `event` or `id` would forge a field: refused.
        #[test]
        fn a_line_break_in_event_or_id_is_refused(
            before in "[a-z]{0,5}", brk in "\r|\n|\r\n", after in "[a-z]{0,5}", in_id in any::<bool>(),
        ) {
            let bad = format!("{before}{brk}{after}");
            let ev = if in_id {
                Event { event: None, data: b"x", id: Some(bad.as_bytes()), retry: None }
            } else {
                Event { event: Some(bad.as_bytes()), data: b"x", id: None, retry: None }
            };
            prop_assert!(format_event(&ev).is_err());
        }

        /// A comment never becomes an event, whatever it says.
        #[test]
        fn a_comment_dispatches_nothing(comment in "(?s:.{0,40})") {
            let (_, data, _, n) = interpret(&format_comment(comment.as_bytes()));
            prop_assert_eq!(data, "");
            prop_assert_eq!(n, 1, "only the closing blank line");
        }
    }
}
