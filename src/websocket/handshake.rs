//! The WebSocket opening handshake: recognise it (RFC 6455's upgrade on
//! HTTP/1.1, RFC 8441's extended CONNECT on HTTP/2), give the application
//! its `websocket` scope and `websocket.connect`, and answer with what it
//! decides.

use std::sync::Arc;

use data_encoding::BASE64;
use http::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, Method, Response, StatusCode};
pub use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::connection::Transport;
use super::session::{Ending, Session};
use crate::body::ResponseBody;
use crate::exchange::Head;
use crate::interp::messages::ToPerl;
use crate::scope::{BodyState, ScopeKind};
use crate::server::Server;
use crate::service::{
    build_scope, log_refusal, open_exchange, plain_response, refuse_when_queue_full, CloseAfter,
    PendingHead, RequestContext, ServiceError,
};

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// What a request is, as far as WebSocket goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Not an upgrade attempt: an ordinary request, so an http app can
    /// still answer it.
    NotAttempted,
    /// A well-formed opening handshake: the application decides.
    Valid,
    /// An upgrade attempt that breaks RFC 6455 4.2.1: the server answers it
    /// and the application is never called.
    Invalid(Refusal),
}

/// The server's answer to a malformed opening handshake.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub text: &'static str,
}

/// Classify a request.  An upgrade attempt is HTTP/1.1 (RFC 6455 needs it,
/// and hyper hands over only HTTP/1.1 sockets) with `Upgrade: websocket`
/// and `Connection: upgrade`; it must then be a GET with a
/// `Sec-WebSocket-Key` of 16 bytes in base64 (else 400) and
/// `Sec-WebSocket-Version: 13` (else 426, naming the version we speak).
pub fn classify(method: &Method, version: http::Version, headers: &HeaderMap) -> Handshake {
    let attempted = version == http::Version::HTTP_11
        && has_token(headers, UPGRADE, b"websocket")
        && has_token(headers, CONNECTION, b"upgrade");
    if !attempted {
        return Handshake::NotAttempted;
    }
    if method != Method::GET {
        return Handshake::Invalid(Refusal {
            status: StatusCode::BAD_REQUEST,
            text: "Bad Request: a WebSocket handshake must be a GET request",
        });
    }
    if !has_valid_key(headers) {
        return Handshake::Invalid(Refusal {
            status: StatusCode::BAD_REQUEST,
            text: "Bad Request: missing or malformed Sec-WebSocket-Key",
        });
    }
    if !speaks_version_13(headers) {
        return Handshake::Invalid(Refusal {
            status: StatusCode::UPGRADE_REQUIRED,
            text: "Upgrade Required: this server speaks WebSocket version 13",
        });
    }
    Handshake::Valid
}

/// Exactly one `Sec-WebSocket-Key`, the base64 of 16 bytes (RFC 6455 4.1).
fn has_valid_key(headers: &HeaderMap) -> bool {
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) => BASE64
            .decode(key.as_bytes())
            .is_ok_and(|nonce| nonce.len() == 16),
        _ => false,
    }
}

/// Exactly one `Sec-WebSocket-Version`, and it is 13 (RFC 6455 4.2.1).
fn speaks_version_13(headers: &HeaderMap) -> bool {
    let mut versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    matches!(
        (versions.next(), versions.next()),
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13"
    )
}

/// The answer to a malformed handshake: text/plain, connection closed
/// (like the gate's refusals); a 426 names the version this server speaks
/// (RFC 6455 4.4) and, as RFC 9110 15.5.22 asks, the protocol to upgrade to.
pub fn refusal_response(refusal: &Refusal, version: http::Version) -> Response<ResponseBody> {
    let mut resp = plain_response(refusal.status, refusal.text);
    if refusal.status == StatusCode::UPGRADE_REQUIRED {
        let h = resp.headers_mut();
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        // HTTP/2 has no Upgrade (RFC 9113 8.2.2); the version header is the answer.
        if version != http::Version::HTTP_2 {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            // An Upgrade header needs the upgrade token in Connection (RFC 9110 7.8).
            h.insert(CONNECTION, HeaderValue::from_static("upgrade, close"));
        }
    }
    resp
}

/// Turn a malformed handshake away on either protocol: the access log
/// line, then `refusal_response`.
pub fn refuse(
    server: &Server,
    parts: &Parts,
    ctx: &RequestContext,
    refusal: &Refusal,
    version: http::Version,
) -> Response<ResponseBody> {
    log_refusal(server, parts, &ctx.conn, None, refusal.status, ctx.started);
    refusal_response(refusal, version)
}

/// Classify an HTTP/2 request (RFC 8441 4-5): an extended CONNECT whose
/// `:protocol` is `websocket` is an attempt; it needs
/// `Sec-WebSocket-Version: 13` (else 426).  RFC 8441 has no key.
pub fn classify_extended_connect(
    method: &Method,
    protocol: Option<&str>,
    headers: &HeaderMap,
) -> Handshake {
    if method != Method::CONNECT || !protocol.is_some_and(|p| p.eq_ignore_ascii_case("websocket")) {
        return Handshake::NotAttempted;
    }
    if !speaks_version_13(headers) {
        return Handshake::Invalid(Refusal {
            status: StatusCode::UPGRADE_REQUIRED,
            text: "Upgrade Required: this server speaks WebSocket version 13",
        });
    }
    Handshake::Valid
}

/// How the handshake travels, and how the accepted stream is reached.
pub enum Carrier {
    /// RFC 6455 over HTTP/1.1: a 101 carrying `Sec-WebSocket-Accept`, after
    /// which hyper hands over the socket.
    Http1 {
        accept_key: String,
        upgrade: hyper::upgrade::OnUpgrade,
    },
    /// RFC 8441 over HTTP/2: a 200 on the extended CONNECT stream, which
    /// then carries the frames; http2/ sends the stream here once the head
    /// is out.
    Http2 {
        stream: tokio::sync::oneshot::Receiver<Transport>,
    },
}

/// Serve one WebSocket handshake: the application decides, then either the
/// stream goes to [`super::connection::run`] after the accepting head, or
/// the refusal goes out as an ordinary response.
pub async fn handle(
    mut parts: Parts,
    ctx: RequestContext,
    server: Arc<Server>,
    carrier: Carrier,
) -> Result<Response<ResponseBody>, ServiceError> {
    if let Some(busy) = refuse_when_queue_full(&server, &parts, &ctx) {
        return Ok(busy);
    }
    let scope = build_scope(
        &mut parts,
        &ctx,
        &server,
        BodyState::Empty,
        ScopeKind::WebSocket,
    );
    let (interp, exchange, head_rx) = open_exchange(&server, &ctx, &scope, false);
    let session = Session::new(
        exchange.clone(),
        interp.mailbox.clone(),
        server.websocket.clone(),
    );
    interp.mailbox.push(ToPerl::Request {
        exchange: exchange.clone(),
        scope: Box::new(scope),
        session: Some(session.clone()),
    });

    let mut guard = PendingHead(Some(exchange.clone()), ctx.departure.clone());
    let head = head_rx.await;
    guard.0 = None;
    match head {
        Ok(Head::Upgrade(mut headers)) => {
            let shutdown = server.shutting_down.subscribe();
            let tracked = server.detached.enter();
            let status = match carrier {
                Carrier::Http1 {
                    accept_key,
                    upgrade,
                } => {
                    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
                    if let Ok(key) = HeaderValue::from_str(&accept_key) {
                        headers.insert(SEC_WEBSOCKET_ACCEPT, key);
                    }
                    tokio::spawn(async move {
                        let _tracked = tracked;
                        match upgrade.await {
                            Ok(upgraded) => {
                                let transport: Transport =
                                    Box::new(hyper_util::rt::TokioIo::new(upgraded));
                                super::connection::run(session, transport, shutdown).await
                            }
                            Err(e) => {
                                tracing::debug!("WebSocket upgrade failed: {e}");
                                session.end(Ending::abnormal(
                                    "client_closed",
                                    format!("the upgrade failed: {e}"),
                                ));
                            }
                        }
                    });
                    StatusCode::SWITCHING_PROTOCOLS
                }
                Carrier::Http2 { stream } => {
                    tokio::spawn(async move {
                        let _tracked = tracked;
                        match stream.await {
                            Ok(transport) => {
                                super::connection::run(session, transport, shutdown).await
                            }
                            Err(_) => session.end(Ending::abnormal(
                                "client_closed",
                                "the stream ended before the WebSocket was accepted".to_string(),
                            )),
                        }
                    });
                    StatusCode::OK
                }
            };
            let mut resp = Response::new(ResponseBody::Full(None));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            Ok(resp)
        }
        Ok(Head::App {
            status, headers, ..
        }) => {
            // A denial response ends the connection: the client is mid-upgrade.
            let mut resp = Response::new(ResponseBody::Stream(exchange));
            resp.extensions_mut().insert(CloseAfter);
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            Ok(resp)
        }
        Ok(Head::Generated(status, text)) => Ok(plain_response(status, text)),
        Ok(Head::Abort) | Err(_) => Err(ServiceError::Aborted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(*n, HeaderValue::from_static(v));
        }
        map
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn valid() -> Vec<(&'static str, &'static str)> {
        vec![
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", KEY),
            ("sec-websocket-version", "13"),
        ]
    }

    fn classify_get(pairs: &[(&'static str, &'static str)]) -> Handshake {
        classify(&Method::GET, http::Version::HTTP_11, &headers(pairs))
    }

    fn status_of(h: Handshake) -> Option<StatusCode> {
        match h {
            Handshake::Invalid(r) => Some(r.status),
            _ => None,
        }
    }

    #[test]
    fn a_well_formed_handshake_is_valid() {
        assert_eq!(classify_get(&valid()), Handshake::Valid);
    }

    #[test]
    fn without_upgrade_and_connection_it_is_an_ordinary_request() {
        for skip in ["upgrade", "connection"] {
            let partial: Vec<_> = valid().into_iter().filter(|(n, _)| *n != skip).collect();
            assert_eq!(
                classify_get(&partial),
                Handshake::NotAttempted,
                "without {skip}"
            );
        }
        let h2c: Vec<_> = valid()
            .into_iter()
            .map(|(n, v)| if n == "upgrade" { (n, "h2c") } else { (n, v) })
            .collect();
        assert_eq!(classify_get(&h2c), Handshake::NotAttempted);
        // RFC 6455 needs HTTP/1.1; hyper cannot hand over an HTTP/1.0 socket.
        assert_eq!(
            classify(&Method::GET, http::Version::HTTP_10, &headers(&valid())),
            Handshake::NotAttempted
        );
    }

    #[test]
    fn an_attempt_that_is_not_a_get_is_400() {
        for method in [Method::POST, Method::HEAD, Method::PUT] {
            assert_eq!(
                status_of(classify(
                    &method,
                    http::Version::HTTP_11,
                    &headers(&valid())
                )),
                Some(StatusCode::BAD_REQUEST),
                "{method}"
            );
        }
    }

    #[test]
    fn a_missing_or_malformed_key_is_400() {
        let with_key = |key: Option<&'static str>| {
            let mut pairs: Vec<_> = valid()
                .into_iter()
                .filter(|(n, _)| *n != "sec-websocket-key")
                .collect();
            pairs.extend(key.map(|k| ("sec-websocket-key", k)));
            classify_get(&pairs)
        };
        assert_eq!(status_of(with_key(None)), Some(StatusCode::BAD_REQUEST));
        for bad in [
            "",
            "x",
            "not base64 at all!!!!!!=",
            "dGhlIHNhbXBsZSBub25jZQ",   // unpadded
            "dGhlIHNhbXBsZSBub25jZSE=", // 17 bytes
            "dGhlIHNhbXBsZSBub25j",     // 15 bytes
            "dGhlIHNhbXBsZSBub25jZR==", // trailing bits set
        ] {
            assert_eq!(
                status_of(with_key(Some(bad))),
                Some(StatusCode::BAD_REQUEST),
                "key {bad:?}"
            );
        }
        let mut twice = valid();
        twice.push(("sec-websocket-key", KEY));
        assert_eq!(
            status_of(classify_get(&twice)),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn a_version_other_than_13_is_426_naming_13() {
        let with_version = |v: Option<&'static str>| {
            let mut pairs: Vec<_> = valid()
                .into_iter()
                .filter(|(n, _)| *n != "sec-websocket-version")
                .collect();
            pairs.extend(v.map(|v| ("sec-websocket-version", v)));
            classify_get(&pairs)
        };
        for v in [None, Some("8"), Some("12"), Some("13, 8"), Some("")] {
            let Handshake::Invalid(refusal) = with_version(v) else {
                panic!("version {v:?} was accepted")
            };
            assert_eq!(refusal.status, StatusCode::UPGRADE_REQUIRED, "{v:?}");
            let resp = refusal_response(&refusal, http::Version::HTTP_11);
            assert_eq!(resp.headers()["sec-websocket-version"], "13");
            assert_eq!(resp.headers()["upgrade"], "websocket");
            assert_eq!(resp.headers()["connection"], "upgrade, close");
            assert_eq!(resp.headers()["content-type"], "text/plain");
        }
        let mut twice = valid();
        twice.push(("sec-websocket-version", "13"));
        assert_eq!(
            status_of(classify_get(&twice)),
            Some(StatusCode::UPGRADE_REQUIRED)
        );
    }

    #[test]
    fn a_bad_method_is_reported_before_a_bad_key_and_a_bad_key_before_the_version() {
        let pairs = [("upgrade", "websocket"), ("connection", "upgrade")];
        let Handshake::Invalid(r) =
            classify(&Method::POST, http::Version::HTTP_11, &headers(&pairs))
        else {
            panic!("accepted")
        };
        assert!(r.text.contains("GET"), "{}", r.text);
        let Handshake::Invalid(r) = classify_get(&pairs) else {
            panic!("accepted")
        };
        assert!(r.text.contains("Sec-WebSocket-Key"), "{}", r.text);
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
