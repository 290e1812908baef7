//! One HTTP/2 stream, one scope.  The request goes to the service layer
//! (or the RFC 8441 handshake) exactly as an HTTP/1.1 request does; this
//! file only does what is particular to a stream:
//! - `:authority` becomes `host`;
//! - a RST_STREAM from the client ends this stream's scope alone, and its
//!   `disconnect_detail` names the h2 error code;
//! - `pagi.connection->abort` resets this stream alone;
//! - the body goes out as the stream's send window allows, so `$send`
//!   waits on a shut window (through the exchange's high-water mark) while
//!   neighbouring streams carry on; a window that stays shut for
//!   `--timeout` resets the stream, as a client that reads nothing is
//!   closed on HTTP/1.1.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{HeaderName, HeaderValue, HOST};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::sync::{oneshot, Notify};

use super::connection::ConnShared;
use super::io::{reset_detail, RequestBody, StreamIo};
use crate::body::ResponseBody;
use crate::service::{self, log_refusal, plain_response, ConnInfo, RequestContext, ServiceError};
use crate::websocket::connection::Transport;
use crate::websocket::handshake::{self, Carrier, Handshake};

type Answer = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, ServiceError>> + Send>>;

/// How a stream's response ended early.
enum Cut {
    /// The client reset the stream, or the connection went away.
    Gone(String),
    /// The application aborted: the stream is reset by us.
    Aborted,
    /// The client granted no window for this long: the stream is reset by us.
    Stalled(Duration),
}

pub async fn serve(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    conn: Arc<ConnInfo>,
    server: Arc<crate::server::Server>,
    shared: Arc<ConnShared>,
) {
    let malformed = malformed_target(req.method(), req.uri())
        .or_else(|| malformed_authority(req.uri(), req.headers()))
        .or_else(|| malformed_field_value(req.headers()));
    if let Some(why) = malformed {
        tracing::debug!(
            "HTTP/2 request from {} is malformed ({why}): stream reset (PROTOCOL_ERROR)",
            conn.client
        );
        respond.send_reset(Reason::PROTOCOL_ERROR);
        return;
    }
    let close = Arc::new(Notify::new());
    let ctx = RequestContext::new(conn, close.clone());
    let departure = ctx.departure.clone();
    let (mut parts, recv) = req.into_parts();
    authority_as_host(&mut parts);
    let is_head = parts.method == Method::HEAD;
    let protocol = parts
        .extensions
        .get::<h2::ext::Protocol>()
        .map(|p| p.as_str().to_owned());

    let mut websocket: Option<(oneshot::Sender<Transport>, RecvStream)> = None;
    let answering: Answer = match handshake::classify_extended_connect(
        &parts.method,
        protocol.as_deref(),
        &parts.headers,
    ) {
        Handshake::Valid => {
            let (tx, rx) = oneshot::channel();
            websocket = Some((tx, recv));
            let carrier = Carrier::Http2 { stream: rx };
            Box::pin(handshake::handle(
                parts,
                ctx.clone(),
                server.clone(),
                carrier,
            ))
        }
        Handshake::Invalid(refusal) => {
            let resp = handshake::refuse(&server, &parts, &ctx, &refusal, Version::HTTP_2);
            Box::pin(async move { Ok(resp) })
        }
        // A CONNECT to tunnel through: not what this server does (as on
        // HTTP/1.1, see gate.rs).
        Handshake::NotAttempted if parts.method == Method::CONNECT => {
            let status = StatusCode::NOT_IMPLEMENTED;
            log_refusal(&server, &parts, &ctx.conn, None, status, ctx.started);
            let resp = plain_response(status, "Not Implemented");
            Box::pin(async move { Ok(resp) })
        }
        Handshake::NotAttempted => Box::pin(service::serve_request(
            parts,
            RequestBody::new(recv),
            ctx.clone(),
            server.clone(),
        )),
    };

    // The client may reset the stream while the application decides; then
    // the answer is dropped, and the application hears why.
    let mut answering = answering;
    let connection_gone = shared.connection_gone();
    tokio::pin!(connection_gone);
    let answered = poll_fn(|cx| {
        if let Poll::Ready(r) = answering.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        if let Poll::Ready(reset) = respond.poll_reset(cx) {
            return Poll::Ready(Err(departed(reset, &shared)));
        }
        if connection_gone.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Cut::Gone(connection_gone_detail())));
        }
        Poll::Pending
    })
    .await;
    let resp = match answered {
        Ok(Ok(resp)) => resp,
        Ok(Err(ServiceError::Aborted)) => {
            respond.send_reset(Reason::CANCEL);
            return;
        }
        Err(cut) => {
            // Dropping the answer tells the application (service.rs,
            // PendingHead); say first why, so the first word is the right one.
            if let Cut::Gone(detail) = cut {
                let _ = departure.set(detail);
            }
            drop(answering);
            return;
        }
    };

    let (head, body) = resp.into_parts();
    let status = head.status;
    let mut wire_head = http::Response::new(());
    *wire_head.status_mut() = status;
    *wire_head.headers_mut() = for_the_wire(head.headers);

    if let Some((stream_tx, recv)) = websocket {
        if status == StatusCode::OK {
            match respond.send_response(wire_head, false) {
                Ok(send) => {
                    let io: Transport = Box::new(StreamIo::new(send, recv));
                    let _ = stream_tx.send(io);
                }
                Err(e) => tracing::debug!("the WebSocket's 200 could not be sent: {e}"),
            }
            return;
        }
    }

    let exchange = match &body {
        ResponseBody::Stream(ex) => Some(ex.clone()),
        ResponseBody::Full(_) => None,
    };
    let no_body = is_head || matches!(status.as_u16(), 204 | 304) || body.is_end_stream();
    let mut send = match respond.send_response(wire_head, no_body) {
        Ok(send) => send,
        Err(e) => {
            if let Some(ex) = &exchange {
                ex.network_gone(
                    "client_closed",
                    Some(format!("the head could not be sent: {e}")),
                );
            }
            return;
        }
    };
    if no_body {
        // HEAD, 204, 304 or an empty body: the exchange counts a body that
        // never goes on the wire as delivered when it is dropped.
        return;
    }
    // The body is dropped only after the match: an unfinished body that is
    // dropped tells the exchange a generic "the connection ended", and the
    // exchange keeps the first word, which must be the reset code below.
    let mut body = body;
    let window_limit = server.keepalive_timeout;
    match send_body(&mut send, &mut body, &close, &shared, window_limit).await {
        Ok(()) => {}
        Err(Cut::Aborted) => send.send_reset(Reason::CANCEL),
        Err(Cut::Stalled(limit)) => {
            // Told before the reset and the body's drop, whose own words
            // ("the connection ended") would otherwise be the first.
            if let Some(ex) = &exchange {
                ex.cut_off(
                    "client_timeout",
                    format!(
                        "the client took no byte of the response for {}s (--timeout)",
                        limit.as_secs().max(1)
                    ),
                );
            }
            send.send_reset(Reason::CANCEL);
        }
        Err(Cut::Gone(detail)) => {
            if let Some(ex) = &exchange {
                let reason = if crate::server::is_force_closing() {
                    "server_shutdown"
                } else {
                    "client_closed"
                };
                ex.network_gone(reason, Some(detail));
            }
        }
    }
}

/// Send the body as the window allows: the next frame is not taken from
/// the exchange until the last one is out, so a shut window holds the
/// application's `$send` at the high-water mark.
async fn send_body(
    send: &mut SendStream<Bytes>,
    body: &mut ResponseBody,
    close: &Notify,
    shared: &ConnShared,
    window_limit: Option<Duration>,
) -> Result<(), Cut> {
    loop {
        let frame = {
            let aborted = close.notified();
            tokio::pin!(aborted);
            poll_fn(|cx| {
                if aborted.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Cut::Aborted));
                }
                if let Poll::Ready(reset) = send.poll_reset(cx) {
                    return Poll::Ready(Err(departed(reset, shared)));
                }
                Pin::new(&mut *body).poll_frame(cx).map(Ok)
            })
            .await?
        };
        match frame {
            None => {
                send.send_data(Bytes::new(), true)
                    .map_err(|e| Cut::Gone(format!("the stream failed: {e}")))?;
                return Ok(());
            }
            Some(Err(_aborted)) => {
                // The exchange was cut short after its head (an app error,
                // a limit): the client must see an incomplete response.
                send.send_reset(Reason::INTERNAL_ERROR);
                return Ok(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    send_data(send, data, end, close, shared, window_limit).await?;
                    if end {
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.send_trailers(trailers)
                            .map_err(|e| Cut::Gone(format!("the stream failed: {e}")))?;
                    }
                    return Ok(());
                }
            },
        }
    }
}

/// Send `data` in pieces as the stream's window opens; with a
/// `window_limit`, a window that grants nothing for that long is a stall.
async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    close: &Notify,
    shared: &ConnShared,
    window_limit: Option<Duration>,
) -> Result<(), Cut> {
    if data.is_empty() {
        return send
            .send_data(data, end)
            .map_err(|e| Cut::Gone(format!("the stream failed: {e}")));
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let aborted = close.notified();
        tokio::pin!(aborted);
        // Made only once a piece has to wait: a window that keeps up costs
        // no timer.  Each piece times its own wait.
        let mut stall: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let granted = poll_fn(|cx| loop {
            if aborted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Cut::Aborted));
            }
            if let Poll::Ready(reset) = send.poll_reset(cx) {
                return Poll::Ready(Err(departed(reset, shared)));
            }
            match send.poll_capacity(cx) {
                Poll::Pending => {
                    if let Some(limit) = window_limit {
                        let timer =
                            stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(Cut::Stalled(limit)));
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(n))) => return Poll::Ready(Ok(n)),
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(Cut::Gone(format!("the stream failed: {e}"))))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(Cut::Gone("the stream was closed".into())))
                }
            }
        })
        .await?;
        let piece = data.split_to(granted.min(data.len()));
        send.send_data(piece, end && data.is_empty())
            .map_err(|e| Cut::Gone(format!("the stream failed: {e}")))?;
    }
    Ok(())
}

/// A stream the client reset (counted against the Rapid Reset budget), or
/// a connection that failed under it.
fn departed(reset: Result<Reason, h2::Error>, shared: &ConnShared) -> Cut {
    match reset {
        Ok(code) => {
            shared.client_reset();
            Cut::Gone(reset_detail(code))
        }
        Err(e) => Cut::Gone(match super::io::stream_reset(&e) {
            Some(code) => reset_detail(code),
            None => format!("the connection ended: {e}"),
        }),
    }
}

fn connection_gone_detail() -> String {
    if crate::server::is_force_closing() {
        "the shutdown timeout expired".into()
    } else {
        "the HTTP/2 connection ended".into()
    }
}

/// RFC 9113 8.3.1: `:authority` stands for `Host`; the scope shows it as
/// the `host` header an HTTP/1.1 app expects, first, where HTTP/1.1
/// clients put it.
/// RFC 9113 §8.3.1: a request other than a plain CONNECT carries a
/// `:path` in origin form, or `*` for OPTIONS.  h2 lets through a head
/// with no `:path` at all (the app would see an empty path), `*` on any
/// method and `?x` (which `http::Uri` shows as "/?x"); all are malformed, a
/// stream error (§8.1.1), where HTTP/1.1's gate answers such targets 400.
fn malformed_target(method: &Method, uri: &http::Uri) -> Option<&'static str> {
    // `Uri::path` is empty only when the URI has no path at all (where
    // `path_and_query` would show "/"), so the form is judged below on the
    // target as sent.
    if uri.path().is_empty() {
        // A plain CONNECT has none (h2 insists); the handshake refuses it.
        return (method != Method::CONNECT).then_some("no :path");
    }
    match uri.path_and_query().map(|target| target.as_str()) {
        Some(target) if target.starts_with('/') => None,
        Some("*") if method == Method::OPTIONS => None,
        Some("*") => Some(":path * on a method other than OPTIONS"),
        _ => Some(":path not in origin form"),
    }
}

/// The host the app will see (`:authority`, or else the one `host` field)
/// must be a valid one (see `crate::host`): h2 takes an `:authority` with
/// userinfo, which RFC 9113 §8.3.1 forbids, and checks no `host` field.
fn malformed_authority(uri: &http::Uri, headers: &HeaderMap) -> Option<&'static str> {
    if let Some(authority) = uri.authority() {
        return (!crate::host::is_valid(authority.as_str().as_bytes()))
            .then_some(":authority is not a valid host");
    }
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("more than one host field"),
        (Some(host), None) if !crate::host::is_valid(host.as_bytes()) => {
            Some("the host field is not a valid host")
        }
        _ => None,
    }
}

/// RFC 9113 §8.2.1: a field value does not start or end with a space or
/// tab.  h2 checks none; HTTP/1.1's parser trims them, so the same header
/// would otherwise read differently to the app over the two protocols.
fn malformed_field_value(headers: &HeaderMap) -> Option<&'static str> {
    let padded = |v: &HeaderValue| {
        let bytes = v.as_bytes();
        [bytes.first(), bytes.last()]
            .into_iter()
            .flatten()
            .any(|b| matches!(b, b' ' | b'\t'))
    };
    headers
        .values()
        .any(padded)
        .then_some("a field value starts or ends with whitespace")
}

fn authority_as_host(parts: &mut Parts) {
    let Some(authority) = parts.uri.authority() else {
        return;
    };
    let Ok(host) = HeaderValue::from_str(authority.as_str()) else {
        return;
    };
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 1);
    headers.insert(HOST, host);
    let mut last_name = None;
    for (name, value) in std::mem::take(&mut parts.headers) {
        // `name` is None for further values of the previous name.
        if let Some(name) = name {
            last_name = Some(name);
        }
        match &last_name {
            Some(name) if *name != HOST => {
                headers.append(name.clone(), value);
            }
            _ => {}
        }
    }
    parts.headers = headers;
}

/// Connection-specific fields are malformed in HTTP/2 (RFC 9113 8.2.2);
/// h2 refuses a head that has them, so they are dropped here.
fn for_the_wire(mut headers: HeaderMap) -> HeaderMap {
    for name in [
        http::header::CONNECTION,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_value_padded_with_whitespace_is_malformed() {
        let verdict = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.append("x-ok", HeaderValue::from_static("fine"));
            headers.append("x-test", HeaderValue::from_str(value).unwrap());
            malformed_field_value(&headers)
        };
        for ok in ["a", "a b", "a\tb", ""] {
            assert_eq!(verdict(ok), None, "{ok:?}");
        }
        for bad in [" a", "a ", "\ta", "a\t", " "] {
            assert_eq!(
                verdict(bad),
                Some("a field value starts or ends with whitespace"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_host_the_app_sees_must_be_valid() {
        let verdict = |uri: &str, hosts: &[&str]| {
            let mut headers = HeaderMap::new();
            for h in hosts {
                headers.append(HOST, HeaderValue::from_str(h).unwrap());
            }
            malformed_authority(&uri.parse().unwrap(), &headers)
        };
        assert_eq!(verdict("http://x.test/", &[]), None);
        assert_eq!(
            verdict("http://x.test:8080/", &["other"]),
            None,
            ":authority wins"
        );
        assert_eq!(verdict("/", &["x.test"]), None, "a host field alone");
        assert_eq!(verdict("/", &[]), None, "neither (HTTP/2 needs none)");
        assert_eq!(
            verdict("http://user:pw@x.test/", &[]),
            Some(":authority is not a valid host")
        );
        assert_eq!(
            verdict("/", &["a/b"]),
            Some("the host field is not a valid host")
        );
        assert_eq!(verdict("/", &["a", "b"]), Some("more than one host field"));
    }

    #[test]
    fn a_target_outside_origin_form_is_malformed_except_where_allowed() {
        // The URI as h2 builds it from the pseudo-headers: the scheme is
        // kept only beside an :authority; Err where h2 itself resets the
        // stream because it cannot build one.
        let h2_uri = |authority: Option<&str>, path: Option<&str>| {
            let mut parts = http::uri::Parts::default();
            if let Some(authority) = authority {
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = Some(authority.parse().unwrap());
            }
            if let Some(path) = path {
                parts.path_and_query = Some(path.parse().map_err(|_| ())?);
            }
            http::Uri::from_parts(parts).map_err(|_| ())
        };
        let verdict = |method: Method, authority, path| {
            malformed_target(&method, &h2_uri(authority, path).unwrap())
        };
        assert_eq!(
            verdict(Method::GET, Some("x"), Some("/a?b")),
            None,
            "origin form"
        );
        assert_eq!(
            verdict(Method::GET, None, Some("/a")),
            None,
            "... with no :authority"
        );
        assert_eq!(
            verdict(Method::OPTIONS, Some("x"), Some("*")),
            None,
            "* for OPTIONS"
        );
        assert_eq!(
            verdict(Method::CONNECT, Some("x"), Some("/chat")),
            None,
            "extended CONNECT"
        );
        let plain_connect: http::Uri = "x:443".parse().unwrap();
        assert_eq!(
            malformed_target(&Method::CONNECT, &plain_connect),
            None,
            "plain CONNECT"
        );
        assert_eq!(
            verdict(Method::GET, None, None),
            Some("no :path"),
            "h2 lets a head without :path through"
        );
        assert_eq!(
            verdict(Method::GET, Some("x"), Some("*")),
            Some(":path * on a method other than OPTIONS")
        );
        // Every other target is refused, by h2 or here.
        for authority in [None, Some("x")] {
            for path in ["foo", "*?x", "?x"] {
                for method in [Method::OPTIONS, Method::CONNECT] {
                    let refused = h2_uri(authority, Some(path))
                        .map_or(true, |uri| malformed_target(&method, &uri).is_some());
                    assert!(refused, "{method} {path:?} with :authority {authority:?}");
                }
            }
        }
    }

    #[test]
    fn authority_becomes_host_and_wins_over_a_host_field() {
        let req = Request::builder()
            .uri("https://example.test:8443/a?b")
            .header("host", "other")
            .body(())
            .unwrap();
        let (mut parts, _) = req.into_parts();
        authority_as_host(&mut parts);
        assert_eq!(parts.headers["host"], "example.test:8443");
        assert_eq!(parts.headers.get_all("host").iter().count(), 1);
    }

    #[test]
    fn host_comes_first_and_repeated_fields_keep_their_values() {
        let req = Request::builder()
            .uri("https://h.test/")
            .header("accept", "*/*")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let (mut parts, _) = req.into_parts();
        authority_as_host(&mut parts);
        let names: Vec<_> = parts.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "accept", "cookie"]);
        let cookies: Vec<_> = parts.headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn connection_specific_fields_never_reach_h2() {
        let mut map = HeaderMap::new();
        map.insert("connection", HeaderValue::from_static("close"));
        map.insert("keep-alive", HeaderValue::from_static("5"));
        map.insert("upgrade", HeaderValue::from_static("websocket"));
        map.insert("x-kept", HeaderValue::from_static("1"));
        let out = for_the_wire(map);
        assert_eq!(out.len(), 1);
        assert_eq!(out["x-kept"], "1");
    }
}
