//! The WebSocket opening handshake over HTTP/1.1: recognise the upgrade,
//! give the application its `websocket` scope and `websocket.connect`, and
//! answer with what it decides.

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::session::{Ending, Session};
use crate::body::ResponseBody;
use crate::exchange::Head;
use crate::http1::{open_exchange, plain_response, ConnInfo, PendingHead, ServiceError};
use crate::interp::messages::ToPerl;
use crate::scope::{BodyState, RequestScope, ScopeKind};
use crate::server::Server;

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// A WebSocket upgrade request: HTTP/1.1 (RFC 6455 needs it, and hyper
/// hands over only HTTP/1.1 sockets) with `Upgrade: websocket`,
/// `Connection: upgrade` and a `Sec-WebSocket-Key` (the reference server's
/// test).  Anything else is an ordinary request, so an http app can still
/// answer it.
pub fn is_upgrade(version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_11
        && has_token(headers, UPGRADE, b"websocket")
        && has_token(headers, CONNECTION, b"upgrade")
        && headers.contains_key(SEC_WEBSOCKET_KEY)
}

/// Serve one upgrade request: the application decides, then either the
/// socket is handed to [`super::connection::run`] after the 101, or the
/// refusal goes out as an ordinary response.
pub async fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    server: Arc<Server>,
    started: Instant,
) -> Result<Response<ResponseBody>, ServiceError> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    let accept_key = parts
        .headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let scope = RequestScope::from_parts(
        &mut parts,
        &conn,
        &server.root_path,
        BodyState::Empty,
        ScopeKind::WebSocket,
    );
    let (interp, exchange, head_rx) = open_exchange(&server, &conn, &scope, false, started);
    let session = Session::new(
        exchange.clone(),
        interp.mailbox.clone(),
        server.websocket.clone(),
        accept_key,
    );
    interp.mailbox.push(ToPerl::Request {
        exchange: exchange.clone(),
        scope: Box::new(scope),
        session: Some(session.clone()),
    });

    let mut guard = PendingHead(Some(exchange.clone()));
    let head = head_rx.await;
    guard.0 = None;
    match head {
        Ok(Head::Upgrade(headers)) => {
            let shutdown = server.shutting_down.subscribe();
            let tracked = server.detached.enter();
            tokio::spawn(async move {
                let _tracked = tracked;
                match on_upgrade.await {
                    Ok(upgraded) => super::connection::run(session, upgraded, shutdown).await,
                    Err(e) => {
                        tracing::debug!("WebSocket upgrade failed: {e}");
                        session.end(Ending::abnormal(
                            "client_closed",
                            format!("the upgrade failed: {e}"),
                        ));
                    }
                }
            });
            let mut resp = Response::new(ResponseBody::Full(None));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *resp.headers_mut() = headers;
            Ok(resp)
        }
        Ok(Head::App(status, mut headers)) => {
            // A denial response ends the connection: the client is mid-upgrade.
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
            let mut resp = Response::new(ResponseBody::Stream(exchange));
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

    #[test]
    fn upgrade_needs_all_three_headers() {
        let full = [
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert!(is_upgrade(http::Version::HTTP_11, &headers(&full)));
        assert!(!is_upgrade(http::Version::HTTP_10, &headers(&full)));
        for skip in 0..full.len() {
            let partial: Vec<_> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            assert!(
                !is_upgrade(http::Version::HTTP_11, &headers(&partial)),
                "without {}",
                full[skip].0
            );
        }
        assert!(!is_upgrade(
            http::Version::HTTP_11,
            &headers(&[
                ("upgrade", "h2c"),
                ("connection", "upgrade"),
                ("sec-websocket-key", "x"),
            ])
        ));
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
