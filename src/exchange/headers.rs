//! The application's response and trailer headers: what is refused, what the
//! server strips, and the Content-Length the body is then held to.

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::error::SendError;

/// A response status the application may send: a final status, 200-599.
/// 1xx are interim responses (the server sends 100 Continue itself, and 101
/// belongs to websocket.accept); anything outside 100-599 is no HTTP status.
pub(super) fn final_status(status: i64) -> Result<StatusCode, SendError> {
    match status {
        200..=599 => StatusCode::from_u16(status as u16)
            .map_err(|_| SendError::Invalid(format!("status {status} is not a valid HTTP status"))),
        100..=199 => Err(SendError::Invalid(format!(
            "status {status} is informational (1xx), not a final response status (200-599)"
        ))),
        _ => Err(SendError::Invalid(format!(
            "status {status} is outside 100-599; a response status must be 200-599"
        ))),
    }
}

/// Which part of a response a list of application headers is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Section {
    /// `http.response.start`, `sse.start`.
    Head,
    /// `websocket.accept`: a 101, or over HTTP/2 a 200 to an extended
    /// CONNECT, after which the stream carries frames, not content.  Such a
    /// response may not have a Content-Length (RFC 9110 8.6 and 9.3.6):
    /// over HTTP/2 the frames would overrun it and a strict client refuse
    /// the connection.  Stripped, whatever its value.
    Accept,
    /// `http.response.trailers`.
    Trailers,
}

/// Connection-level and framing headers belong to the server (Spec/Www.pod).
/// `upgrade` is one over HTTP/2 (RFC 9113 8.2.2), but over HTTP/1.1 an app
/// may answer with it (426 Upgrade Required), so a head keeps it.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "transfer-encoding" | "keep-alive" | "proxy-connection"
    )
}

/// Fields a trailer section may not carry (RFC 9110 6.5.1): framing,
/// routing, authentication, the controls of the content, and every
/// connection-specific field (RFC 9113 8.2.2).  hyper drops the same list
/// from HTTP/1.1 trailers; over HTTP/2 it sends what it is given, and a
/// strict client refuses the whole connection for `content-length: v` in a
/// trailer.  Dropped on both, so that the app's one response reads alike.
fn forbidden_in_trailers(name: &HeaderName) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name.as_str(),
            "authorization"
                | "cache-control"
                | "content-encoding"
                | "content-length"
                | "content-range"
                | "content-type"
                | "host"
                | "max-forwards"
                | "set-cookie"
                | "te"
                | "trailer"
                | "upgrade"
        )
}

/// A field value without the spaces and tabs around it.  They are not part
/// of the value (RFC 9110 5.5): an HTTP/1.1 reader drops them as optional
/// whitespace, and HTTP/2 makes a response that carries them malformed
/// (RFC 9113 8.2.1), so they are trimmed for every protocol.  Only SP and
/// HTAB: a CR or LF at either end must still fail the send.
fn trim_field_whitespace(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Validate and convert application headers.  Anything that could split the
/// response (CR, LF, NUL, other controls, non-token names) fails the send.
/// The server's own fields are dropped (see `is_hop_by_hop` and
/// `forbidden_in_trailers`); a head's Content-Length is returned, the
/// length the body is held to.
pub(crate) fn build_headers(
    headers: &[(&[u8], &[u8])],
    section: Section,
) -> Result<(HeaderMap, Option<u64>), SendError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    let mut declared = None;
    for (name, value) in headers {
        let hname = HeaderName::from_bytes(name).map_err(|_| {
            SendError::Header(format!(
                "name {:?} is not a valid header name",
                String::from_utf8_lossy(name)
            ))
        })?;
        let value = trim_field_whitespace(value);
        let hvalue = HeaderValue::from_bytes(value).map_err(|_| {
            SendError::Header(format!(
                "value of {:?} contains a control character (CR, LF, NUL ...)",
                hname.as_str()
            ))
        })?;
        match section {
            Section::Head | Section::Accept if is_hop_by_hop(&hname) => {
                tracing::debug!(
                    "connection-specific header '{}' stripped from the response",
                    hname
                );
                continue;
            }
            Section::Accept if hname == http::header::CONTENT_LENGTH => {
                tracing::debug!("content-length stripped from websocket.accept");
                continue;
            }
            Section::Trailers if forbidden_in_trailers(&hname) => {
                tracing::debug!("header '{}' may not be a trailer; stripped", hname);
                continue;
            }
            _ => {}
        }
        if section == Section::Head && hname == http::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    SendError::Header("content-length must be a non-negative integer".into())
                })?;
            if declared.is_some_and(|d| d != n) {
                return Err(SendError::Header(
                    "conflicting content-length headers".into(),
                ));
            }
            if declared.is_some() {
                continue;
            }
            declared = Some(n);
        }
        map.append(hname, hvalue);
    }
    Ok((map, declared))
}

#[cfg(test)]
mod tests {
    use crate::error::SendError;
    use crate::exchange::tests::exchange;
    use crate::exchange::{Head, SendOutcome};

    #[test]
    fn header_injection_fails_the_send_and_sends_nothing() {
        let (ex, mut rx) = exchange(false);
        for (n, v) in [
            (&b"x-a"[..], &b"ok\r\nx-evil: 1"[..]),
            (b"x-a", b"a\nb"),
            (b"x-a", b"a\0b"),
            (b"x a", b"v"),
            (b"x-a\r\n", b"v"),
        ] {
            let err = ex.start(200, &[(n, v)], false).unwrap_err();
            assert!(matches!(err, SendError::Header(_)), "{err}");
        }
        assert!(rx.try_recv().is_err(), "no head may reach the network");
        assert_eq!(
            ex.start(200, &[(b"x-a", b"fine")], false).unwrap(),
            SendOutcome::Ready
        );
    }

    #[test]
    fn invalid_status_is_refused() {
        let (ex, mut rx) = exchange(false);
        for status in [42, 99, 600, 999, 1000, -200, i64::MAX] {
            match ex.start(status, &[], false) {
                Err(SendError::Invalid(msg)) => assert!(msg.contains("100-599"), "{status}: {msg}"),
                other => panic!("{status}: {other:?}"),
            }
        }
        match ex.start(101, &[], false) {
            Err(SendError::Invalid(msg)) => assert!(msg.contains("informational"), "{msg}"),
            other => panic!("101: {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "nothing reached the network");
        for status in [200, 404, 599] {
            let (ex, _rx) = exchange(false);
            assert_eq!(ex.start(status, &[], false).unwrap(), SendOutcome::Ready);
        }
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_content_length_enforced() {
        let (ex, mut rx) = exchange(false);
        ex.start(
            200,
            &[
                (b"transfer-encoding", b"chunked"),
                (b"connection", b"close"),
                (b"content-length", b"3"),
            ],
            false,
        )
        .unwrap();
        assert!(
            rx.try_recv().is_err(),
            "the head waits for the first body event"
        );
        assert!(matches!(
            ex.body(b"abcd", false),
            Err(SendError::Invalid(_))
        ));
        assert_eq!(ex.body(b"abc", false).unwrap(), SendOutcome::Ready);
        match rx.try_recv() {
            Ok(Head::App { headers: map, .. }) => {
                assert!(map.get("transfer-encoding").is_none());
                assert!(map.get("connection").is_none());
                assert_eq!(map.get("content-length").unwrap(), "3");
            }
            _ => panic!("expected the app head"),
        }
    }

    #[test]
    fn whitespace_only_values_become_empty_and_a_trailing_cr_still_fails() {
        use super::{build_headers, Section};
        let (map, _) = build_headers(&[(b"x-a", b" \t ")], Section::Head).unwrap();
        assert_eq!(map.get("x-a").unwrap(), "");
        let (map, _) = build_headers(&[(b"x-a", b"\t a b \t")], Section::Trailers).unwrap();
        assert_eq!(map.get("x-a").unwrap(), "a b");
        for value in [&b"abc\r"[..], b"\nabc", b"abc \r\n", b"\0 abc"] {
            assert!(build_headers(&[(b"x-a", value)], Section::Head).is_err());
        }
        let (_, declared) = build_headers(&[(b"content-length", b" 12\t")], Section::Head).unwrap();
        assert_eq!(declared, Some(12), "the trimmed value is the length");
    }

    #[test]
    fn fields_that_cannot_be_trailers_are_stripped_from_trailers_only() {
        use super::{build_headers, Section};
        let server_fields: [(&[u8], &[u8]); 8] = [
            (b"content-length", b"v"),
            (b"Transfer-Encoding", b"chunked"),
            (b"connection", b"close"),
            (b"te", b"trailers"),
            (b"trailer", b"x-b"),
            (b"host", b"example"),
            (b"content-type", b"text/plain"),
            (b"upgrade", b"h2c"),
        ];
        let mut fields = server_fields.to_vec();
        fields.push((b"x-checksum", b"abc"));
        let (map, declared) = build_headers(&fields, Section::Trailers).unwrap();
        assert_eq!(declared, None, "a trailer never sets the body's length");
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map.get("x-checksum").unwrap(), "abc");
        // The head keeps what a head may carry (content-type, host, te, trailer,
        // upgrade), and still strips only the connection-level fields.
        let head: Vec<_> = server_fields
            .iter()
            .filter(|(n, _)| *n != b"content-length")
            .copied()
            .collect();
        let (map, _) = build_headers(&head, Section::Head).unwrap();
        let names: Vec<&str> = map.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["te", "trailer", "host", "content-type", "upgrade"]);
    }

    #[test]
    fn a_websocket_accept_has_no_content_length_whatever_its_value() {
        use super::{build_headers, Section};
        for value in [&b"3"[..], b"0", b"abc"] {
            let fields: [(&[u8], &[u8]); 3] = [
                (b"content-length", value),
                (b"connection", b"close"),
                (b"x-app", b"kept"),
            ];
            let (map, declared) = build_headers(&fields, Section::Accept).unwrap();
            assert_eq!(declared, None);
            assert_eq!(map.len(), 1, "{map:?}");
            assert_eq!(map.get("x-app").unwrap(), "kept");
        }
    }

    mod header_properties {
        use super::super::{build_headers, forbidden_in_trailers, Section};
        use proptest::prelude::*;

        /// RFC 9110 tchar: the bytes a header name may be made of.
        const TCHAR: &[u8] =
            b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

        fn is_control(b: u8) -> bool {
            (b < 0x20 && b != b'\t') || b == 0x7f
        }

        fn token() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(prop::sample::select(TCHAR.to_vec()), 1..24)
        }

        /// Field content: visible ASCII, spaces and tabs inside, obs-text.
        fn field_value() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(
                prop_oneof![0x21u8..=0x7e, Just(b' '), Just(b'\t'), 0x80u8..=0xff],
                0..40,
            )
            .prop_map(|mut v| {
                // Leading or trailing whitespace is not field content.
                while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                    v.remove(0);
                }
                while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
                    v.pop();
                }
                v
            })
        }

        proptest! {
            #[test]
            fn never_panics_on_any_bytes(
                name in prop::collection::vec(any::<u8>(), 0..16),
                value in prop::collection::vec(any::<u8>(), 0..32),
                response in any::<bool>(),
            ) {
                let _ = build_headers(&[(&name, &value)], if response { Section::Head } else { Section::Trailers });
            }

            #[test]
            fn valid_tokens_and_values_pass(name in token(), value in field_value()) {
                // The server's own fields are stripped from trailers.
                let parsed = http::header::HeaderName::from_bytes(&name).unwrap();
                prop_assume!(!forbidden_in_trailers(&parsed));
                let (map, _) = build_headers(&[(&name, &value)], Section::Trailers)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(map.len(), 1);
                prop_assert_eq!(map.iter().next().unwrap().1.as_bytes(), &value[..]);
            }

            #[test]
            fn spaces_and_tabs_around_a_value_are_trimmed(
                name in token(),
                value in field_value(),
                before in prop::collection::vec(prop_oneof![Just(b' '), Just(b'\t')], 0..4),
                after in prop::collection::vec(prop_oneof![Just(b' '), Just(b'\t')], 0..4),
            ) {
                let parsed = http::header::HeaderName::from_bytes(&name).unwrap();
                prop_assume!(!forbidden_in_trailers(&parsed));
                let padded = [&before[..], &value[..], &after[..]].concat();
                for section in [Section::Head, Section::Trailers] {
                    let (map, _) = build_headers(&[(&name, &padded)], section)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(map.iter().next().unwrap().1.as_bytes(), &value[..]);
                }
            }

            #[test]
            fn a_control_in_the_value_is_refused(
                name in token(),
                before in field_value(),
                after in field_value(),
                control in prop_oneof![0u8..0x09, 0x0au8..0x20, Just(0x7fu8)],
            ) {
                let value = [&before[..], &[control], &after[..]].concat();
                prop_assert!(build_headers(&[(&name, &value)], Section::Head).is_err());
                prop_assert!(build_headers(&[(&name, &value)], Section::Trailers).is_err());
            }

            #[test]
            fn a_name_that_is_not_a_token_is_refused(
                before in token(),
                after in token(),
                bad in any::<u8>().prop_filter("not a tchar", |b| !TCHAR.contains(b)),
            ) {
                let name = [&before[..], &[bad], &after[..]].concat();
                prop_assert!(build_headers(&[(&name, b"v")], Section::Head).is_err());
                prop_assert!(build_headers(&[(&name, b"v")], Section::Trailers).is_err());
            }

            #[test]
            fn cr_lf_and_nul_never_get_through(
                name in prop::collection::vec(any::<u8>(), 1..16),
                value in prop::collection::vec(any::<u8>(), 0..32),
            ) {
                if let Ok((map, _)) = build_headers(&[(&name, &value)], Section::Trailers) {
                    for (n, v) in map.iter() {
                        prop_assert!(!n.as_str().bytes().any(is_control));
                        prop_assert!(!v.as_bytes().iter().any(|&b| is_control(b)));
                    }
                }
            }
        }
    }
}
