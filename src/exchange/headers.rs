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

/// Connection-level and framing headers belong to the server (Spec/Www.pod).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "transfer-encoding" | "keep-alive" | "proxy-connection"
    )
}

/// Validate and convert application headers.  Anything that could split the
/// response (CR, LF, NUL, other controls, non-token names) fails the send.
pub(crate) fn build_headers(
    headers: &[(&[u8], &[u8])],
    response: bool,
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
        let hvalue = HeaderValue::from_bytes(value).map_err(|_| {
            SendError::Header(format!(
                "value of {:?} contains a control character (CR, LF, NUL ...)",
                hname.as_str()
            ))
        })?;
        if response && is_hop_by_hop(&hname) {
            tracing::debug!(
                "connection-specific header '{}' stripped from HTTP/1.1 response",
                hname
            );
            continue;
        }
        if response && hname == http::header::CONTENT_LENGTH {
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

    mod header_properties {
        use super::super::build_headers;
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
                let _ = build_headers(&[(&name, &value)], response);
            }

            #[test]
            fn valid_tokens_and_values_pass(name in token(), value in field_value()) {
                // content-length has its own rule; connection headers are stripped.
                prop_assume!(!name.eq_ignore_ascii_case(b"content-length"));
                let (map, _) = build_headers(&[(&name, &value)], false)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(map.len(), 1);
                prop_assert_eq!(map.iter().next().unwrap().1.as_bytes(), &value[..]);
            }

            #[test]
            fn a_control_in_the_value_is_refused(
                name in token(),
                before in field_value(),
                after in field_value(),
                control in prop_oneof![0u8..0x09, 0x0au8..0x20, Just(0x7fu8)],
            ) {
                let value = [&before[..], &[control], &after[..]].concat();
                prop_assert!(build_headers(&[(&name, &value)], true).is_err());
                prop_assert!(build_headers(&[(&name, &value)], false).is_err());
            }

            #[test]
            fn a_name_that_is_not_a_token_is_refused(
                before in token(),
                after in token(),
                bad in any::<u8>().prop_filter("not a tchar", |b| !TCHAR.contains(b)),
            ) {
                let name = [&before[..], &[bad], &after[..]].concat();
                prop_assert!(build_headers(&[(&name, b"v")], true).is_err());
                prop_assert!(build_headers(&[(&name, b"v")], false).is_err());
            }

            #[test]
            fn cr_lf_and_nul_never_get_through(
                name in prop::collection::vec(any::<u8>(), 1..16),
                value in prop::collection::vec(any::<u8>(), 0..32),
            ) {
                if let Ok((map, _)) = build_headers(&[(&name, &value)], false) {
                    for (n, v) in map.iter() {
                        prop_assert!(!n.as_str().bytes().any(is_control));
                        prop_assert!(!v.as_bytes().iter().any(|&b| is_control(b)));
                    }
                }
            }
        }
    }
}
