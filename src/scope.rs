//! The connection scope for one request: the facts the network core knows,
//! normalised the way Spec/Www.pod asks (lower-case header names, one merged
//! Cookie header, percent- and UTF-8-decoded path).  The Perl side turns this
//! into the `$scope` hash.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Version};

use crate::http1::gate::WireOrder;
use crate::interp::constants::{body, scope};

/// Whether and how the request has a body for `$receive` to deliver
/// (numbered as HTTP.pm sees it: constants.def, group body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyState {
    /// No body: the first receive returns an empty final `http.request` at once.
    Empty = body::EMPTY as isize,
    /// A body streamed by the pump, one chunk read ahead.
    Streaming = body::STREAMING as isize,
    /// A body behind `Expect: 100-continue`: nothing is read (and no 100 sent)
    /// until the application first receives.
    AwaitingContinue = body::AWAIT_CONTINUE as isize,
}

/// Which PAGI scope a request opens (the `type` key); numbered as request.c
/// and Bridge.pm see it (constants.def, group scope).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    Http = scope::HTTP as isize,
    /// `Accept: text/event-stream`, not a WebSocket upgrade (any method).
    Sse = scope::SSE as isize,
    /// A WebSocket handshake (see websocket/handshake.rs).
    WebSocket = scope::WEBSOCKET as isize,
}

impl ScopeKind {
    /// The kind of an ordinary (non-upgrade) request.
    pub fn of_request(headers: &http::HeaderMap) -> ScopeKind {
        if accepts_event_stream(headers) {
            ScopeKind::Sse
        } else {
            ScopeKind::Http
        }
    }
}

/// Whether any Accept header lists `text/event-stream` as a media range
/// (with a non-zero q; `*/*` does not count).
pub fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|range| {
            let mut parts = range.split(|b| *b == b';');
            let media = parts.next().unwrap_or_default();
            // The media first: a browser's Accept lists several ranges with
            // q values, and parsing each q cost a thousand instructions a
            // request.
            if !media
                .trim_ascii()
                .eq_ignore_ascii_case(b"text/event-stream")
            {
                return false;
            }
            // "q=0" means "not acceptable".
            !parts.any(|param| {
                let param = param.trim_ascii();
                param.len() > 2
                    && param[..2].eq_ignore_ascii_case(b"q=")
                    && std::str::from_utf8(&param[2..])
                        .ok()
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
            })
        })
}

pub struct RequestScope {
    pub kind: ScopeKind,
    pub http_version: &'static str,
    /// A standard method costs no allocation (most requests' is one).
    pub method: http::Method,
    pub scheme: &'static str,
    /// The percent-decoded path when it differs from `raw_path` (it has a
    /// `%`); see [`RequestScope::path`].  Most paths have none, and the
    /// copy was an allocation on the network thread and a cross-thread
    /// free on the interpreter's for every request.
    decoded_path: Option<Vec<u8>>,
    /// True when the path is valid UTF-8, so Perl marks it as text.
    pub path_is_utf8: bool,
    pub raw_path: Bytes,
    pub query_string: Bytes,
    pub root_path: String,
    /// The request headers as hyper parsed them (names already lower-case);
    /// handed to Perl without copying each one.
    pub headers: http::HeaderMap,
    /// The same headers in wire order, for the rare request whose order
    /// `headers` (grouped by name) loses; None otherwise.
    pub headers_in_wire_order: Option<Vec<(HeaderName, HeaderValue)>>,
    /// All Cookie headers joined by "; ", when there was more than one: the
    /// scope shows this single value at the first cookie's place.
    pub merged_cookie: Option<Bytes>,
    /// The scope's `client` (absent on a Unix socket) and `server` (see
    /// `service::ConnInfo`).
    pub client: crate::service::Peer,
    pub client_host: Option<std::sync::Arc<str>>,
    pub server_host: std::sync::Arc<[u8]>,
    pub server_port: Option<u16>,
    pub body: BodyState,
    /// The connection's TLS facts (the `tls` extension); None in cleartext.
    pub tls: Option<std::sync::Arc<crate::tls::TlsFacts>>,
}

pub fn http_version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_09 => "0.9",
        _ => "1.1",
    }
}

impl RequestScope {
    pub fn from_parts(
        parts: &mut Parts,
        conn: &crate::service::ConnInfo,
        root_path: &str,
        body: BodyState,
        kind: ScopeKind,
    ) -> RequestScope {
        let raw_path = Bytes::copy_from_slice(parts.uri.path().as_bytes());
        let query_string = Bytes::copy_from_slice(parts.uri.query().unwrap_or("").as_bytes());
        let decoded_path = raw_path.contains(&b'%').then(|| percent_decode(&raw_path));
        let path_is_utf8 =
            std::str::from_utf8(decoded_path.as_deref().unwrap_or(&raw_path)).is_ok();
        let headers_in_wire_order = parts
            .extensions
            .remove::<WireOrder>()
            .and_then(|order| in_wire_order(&parts.headers, &order));
        RequestScope {
            kind,
            http_version: http_version_str(parts.version),
            method: parts.method.clone(),
            scheme: match (kind == ScopeKind::WebSocket, conn.tls.is_some()) {
                (false, false) => "http",
                (false, true) => "https",
                (true, false) => "ws",
                (true, true) => "wss",
            },
            decoded_path,
            path_is_utf8,
            raw_path,
            query_string,
            root_path: root_path.to_string(),
            merged_cookie: merged_cookie(&parts.headers),
            headers: std::mem::take(&mut parts.headers),
            headers_in_wire_order,
            client: conn.client,
            client_host: conn.client_host.clone(),
            server_host: conn.server_host.clone(),
            server_port: conn.server_port,
            body,
            tls: conn.tls.clone(),
        }
    }

    /// The scope's `path`: percent-decoded bytes.
    pub fn path(&self) -> &[u8] {
        self.decoded_path.as_deref().unwrap_or(&self.raw_path)
    }
}

/// Percent-decode; malformed escapes are kept as they are.
pub fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let decoded: Cow<[u8]> = percent_encoding::percent_decode(raw).into();
    decoded.into_owned()
}

fn merged_cookie(map: &http::HeaderMap) -> Option<Bytes> {
    let mut cookies = map.get_all(http::header::COOKIE).iter();
    let first = cookies.next()?;
    let mut rest = cookies.peekable();
    rest.peek()?;
    let mut merged = first.as_bytes().to_vec();
    for c in rest {
        merged.extend_from_slice(b"; ");
        merged.extend_from_slice(c.as_bytes());
    }
    Some(Bytes::from(merged))
}

/// `map`'s values in the order `order` names them, each name taking its next
/// value.  None unless the names account for exactly the map's values: the
/// gate and hyper parsed the same head, but if they ever disagree, grouped
/// order is better than a wrong one.
fn in_wire_order(map: &HeaderMap, order: &WireOrder) -> Option<Vec<(HeaderName, HeaderValue)>> {
    if order.0.len() != map.len() {
        return None;
    }
    // One cursor per distinct name; a head has few, and this is the rare case.
    let mut cursors: Vec<(&HeaderName, http::header::ValueIter<'_, HeaderValue>)> = Vec::new();
    let mut ordered = Vec::with_capacity(order.0.len());
    for name in &order.0 {
        let at = match cursors.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                cursors.push((name, map.get_all(name).iter()));
                cursors.len() - 1
            }
        };
        // Running out means more names than values for it; with the totals
        // equal, never running out means every value is used exactly once.
        let value = cursors[at].1.next()?;
        ordered.push((name.clone(), value.clone()));
    }
    Some(ordered)
}

/// The scope's header list: (name, value) pairs with Cookie merged, in the
/// order received, borrowing from the scope.
pub fn scope_headers(scope: &RequestScope) -> impl Iterator<Item = (&[u8], &[u8])> {
    let grouped = match &scope.headers_in_wire_order {
        None => Some(scope.headers.iter()),
        Some(_) => None,
    };
    let wire = scope
        .headers_in_wire_order
        .iter()
        .flatten()
        .map(|(name, value)| (name, value));
    let mut cookie_seen = false;
    grouped
        .into_iter()
        .flatten()
        .chain(wire)
        .filter_map(move |(name, value)| {
            if name == http::header::COOKIE {
                if let Some(merged) = &scope.merged_cookie {
                    if cookie_seen {
                        return None;
                    }
                    cookie_seen = true;
                    return Some((name.as_str().as_bytes(), &merged[..]));
                }
            }
            Some((name.as_str().as_bytes(), value.as_bytes()))
        })
}

/// Lower-case names (hyper already stores them so), values as bytes, and all
/// Cookie headers merged into one joined by "; " at the first cookie's place.
pub fn normalise_headers(map: &http::HeaderMap) -> Vec<(Bytes, Bytes)> {
    let mut out: Vec<(Bytes, Bytes)> = Vec::with_capacity(map.len());
    let mut cookie_at: Option<usize> = None;
    for (name, value) in map.iter() {
        if name == http::header::COOKIE {
            if let Some(i) = cookie_at {
                let mut merged = Vec::with_capacity(out[i].1.len() + 2 + value.len());
                merged.extend_from_slice(&out[i].1);
                merged.extend_from_slice(b"; ");
                merged.extend_from_slice(value.as_bytes());
                out[i].1 = Bytes::from(merged);
                continue;
            }
            cookie_at = Some(out.len());
        }
        out.push((
            Bytes::copy_from_slice(name.as_str().as_bytes()),
            Bytes::copy_from_slice(value.as_bytes()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_is_percent_then_utf8_decoded() {
        assert_eq!(percent_decode(b"/caf%C3%A9/a%20b"), "/café/a b".as_bytes());
        let bad = percent_decode(b"/x%FFy");
        assert_eq!(bad, b"/x\xFFy");
        assert!(std::str::from_utf8(&bad).is_err());
        assert_eq!(percent_decode(b"/100%"), b"/100%", "a stray % stays");
    }

    #[test]
    fn cookies_merge_into_one_header() {
        let mut map = http::HeaderMap::new();
        map.append("cookie", "a=1".parse().unwrap());
        map.append("x-y", "z".parse().unwrap());
        map.append("cookie", "b=2; c=3".parse().unwrap());
        let h = normalise_headers(&map);
        let cookies: Vec<_> = h.iter().filter(|(n, _)| &n[..] == b"cookie").collect();
        assert_eq!(cookies.len(), 1);
        assert_eq!(&cookies[0].1[..], b"a=1; b=2; c=3");
        assert!(h.iter().any(|(n, v)| &n[..] == b"x-y" && &v[..] == b"z"));
    }

    #[test]
    fn scope_headers_merge_cookies_without_copying_the_rest() {
        let req = http::Request::get("/")
            .header("cookie", "a=1")
            .header("x-y", "z")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let (mut parts, _) = req.into_parts();
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let conn = crate::service::ConnInfo::new(addr, addr);
        let s = RequestScope::from_parts(&mut parts, &conn, "", BodyState::Empty, ScopeKind::Http);
        let h: Vec<_> = scope_headers(&s).collect();
        assert_eq!(h.iter().filter(|(n, _)| *n == b"cookie").count(), 1);
        assert!(h.contains(&(&b"cookie"[..], &b"a=1; b=2"[..])));
        assert!(h.contains(&(&b"x-y"[..], &b"z"[..])));
    }

    fn scope_of(req: http::Request<()>) -> RequestScope {
        let (mut parts, _) = req.into_parts();
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let conn = crate::service::ConnInfo::new(addr, addr);
        RequestScope::from_parts(&mut parts, &conn, "", BodyState::Empty, ScopeKind::Http)
    }

    fn wire(names: &[&str]) -> WireOrder {
        WireOrder(
            names
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap())
                .collect(),
        )
    }

    fn interleaved(order: Option<WireOrder>) -> http::Request<()> {
        let mut req = http::Request::get("/")
            .header("x-a", "1")
            .header("cookie", "c=1")
            .header("x-b", "2")
            .header("x-a", "3")
            .header("cookie", "d=2")
            .body(())
            .unwrap();
        if let Some(order) = order {
            req.extensions_mut().insert(order);
        }
        req
    }

    #[test]
    fn a_wire_order_interleaves_names_and_keeps_the_cookie_merge() {
        let s = scope_of(interleaved(Some(wire(&[
            "x-a", "cookie", "x-b", "x-a", "cookie",
        ]))));
        let h: Vec<_> = scope_headers(&s).collect();
        let want: Vec<(&[u8], &[u8])> = vec![
            (b"x-a", b"1"),
            (b"cookie", b"c=1; d=2"),
            (b"x-b", b"2"),
            (b"x-a", b"3"),
        ];
        assert_eq!(h, want);

        let without = scope_of(interleaved(None));
        assert!(without.headers_in_wire_order.is_none());
        let grouped: Vec<_> = scope_headers(&without).collect();
        assert_eq!(
            grouped[..2],
            [(&b"x-a"[..], &b"1"[..]), (b"x-a", b"3")],
            "HeaderMap order"
        );
    }

    #[test]
    fn a_wire_order_that_does_not_account_for_every_value_is_ignored() {
        for names in [
            &["x-a", "cookie", "x-b", "x-a"][..],              // one short
            &["x-a", "cookie", "x-b", "x-a", "cookie", "x-b"], // one extra
            &["x-a", "cookie", "x-b", "x-b", "cookie"],        // x-b twice, x-a once
            &["x-a", "cookie", "x-b", "x-a", "x-c"],           // a name not in the map
        ] {
            let s = scope_of(interleaved(Some(wire(names))));
            assert!(s.headers_in_wire_order.is_none(), "{names:?}");
            assert_eq!(
                scope_headers(&s).count(),
                4,
                "{names:?}: grouped, cookie merged"
            );
        }
    }

    #[test]
    fn event_stream_is_found_among_media_ranges() {
        let mut map = http::HeaderMap::new();
        assert!(!accepts_event_stream(&map));
        map.insert(
            "accept",
            "text/html, TEXT/Event-Stream;q=0.9".parse().unwrap(),
        );
        assert!(accepts_event_stream(&map));
        assert_eq!(ScopeKind::of_request(&map), ScopeKind::Sse);
        map.insert("accept", "text/event-stream;q=0, */*".parse().unwrap());
        assert!(!accepts_event_stream(&map), "q=0 refuses it");
        map.insert("accept", "text/event-streams, */*".parse().unwrap());
        assert!(!accepts_event_stream(&map));
        map.append("accept", "text/event-stream".parse().unwrap());
        assert!(accepts_event_stream(&map), "any of several Accept headers");
        map.insert(
            "accept",
            "text/html;q=0.9, */*;q=0.8, text/event-stream ; q=0.0"
                .parse()
                .unwrap(),
        );
        assert!(!accepts_event_stream(&map), "q=0 after other q values");
        map.insert(
            "accept",
            "text/html;q=0.9, text/event-stream;q=0.5".parse().unwrap(),
        );
        assert!(accepts_event_stream(&map), "a non-zero q after others");
    }

    #[test]
    fn scope_splits_path_and_query() {
        let req = http::Request::get("/a%2Fb?x=1&y=%20").body(()).unwrap();
        let (mut parts, _) = req.into_parts();
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let conn = crate::service::ConnInfo::new(addr, addr);
        let s = RequestScope::from_parts(&mut parts, &conn, "", BodyState::Empty, ScopeKind::Http);
        assert_eq!(&s.raw_path[..], b"/a%2Fb");
        assert_eq!(s.path(), b"/a/b");
        assert_eq!(&s.query_string[..], b"x=1&y=%20");
        assert_eq!(s.http_version, "1.1");
    }

    #[test]
    fn a_path_without_escapes_is_its_raw_path_uncopied() {
        let s = scope_of(http::Request::get("/plain/path").body(()).unwrap());
        assert!(s.decoded_path.is_none());
        assert_eq!(s.path(), b"/plain/path");
        assert!(s.path_is_utf8);
        assert_eq!(s.method, http::Method::GET);
    }

    #[test]
    fn an_escape_that_is_not_utf8_is_decoded_and_marked_as_bytes() {
        let s = scope_of(http::Request::get("/caf%C3%A9/%FF").body(()).unwrap());
        assert_eq!(s.path(), b"/caf\xC3\xA9/\xFF");
        assert!(!s.path_is_utf8);
        let s = scope_of(http::Request::get("/caf%C3%A9").body(()).unwrap());
        assert_eq!(s.path(), "/café".as_bytes());
        assert!(s.path_is_utf8);
    }

    #[test]
    fn an_extension_method_keeps_its_name() {
        let req = http::Request::builder()
            .method("PURGE")
            .uri("/")
            .body(())
            .unwrap();
        assert_eq!(scope_of(req).method.as_str(), "PURGE");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes, percent-encoded, decode back to themselves.
        #[test]
        fn encoded_bytes_decode_back(raw in proptest::collection::vec(any::<u8>(), 0..128)) {
            let encoded = percent_encoding::percent_encode(&raw, percent_encoding::NON_ALPHANUMERIC).to_string();
            prop_assert_eq!(percent_decode(encoded.as_bytes()), raw);
        }

        /// Whatever a client sends as a path (stray or broken escapes
        /// included), decoding never fails and never grows it.
        #[test]
        fn any_path_decodes_without_growing(raw in proptest::collection::vec(any::<u8>(), 0..128)) {
            let decoded = percent_decode(&raw);
            prop_assert!(decoded.len() <= raw.len());
            if !raw.contains(&b'%') {
                prop_assert_eq!(decoded, raw);
            }
        }
    }
}
