//! What a `Host` header or an HTTP/2 `:authority` may hold: `uri-host [
//! ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2), with no userinfo.
//!
//! Apps build redirects and absolute URLs from the host, and route by it,
//! so one that carries a path, a query, userinfo or whitespace
//! (`Host: a/b`, `Host: user@x`) must not reach them.  RFC 9112 §3.2 asks
//! for 400 on an HTTP/1.1 request whose Host is invalid; RFC 9113 §8.3.1
//! forbids userinfo in `:authority`.  An empty value is valid: it is what a
//! client sends when the target has no authority.

/// Whether `value` is a valid Host field value (or `:authority`).
pub fn is_valid(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        Some(b'[') => {
            let Some(close) = value.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = &value[1..close];
            if literal.is_empty() || !literal.iter().all(|&b| in_ip_literal(b)) {
                return false;
            }
            match &value[close + 1..] {
                [] => return true,
                [b':', port @ ..] => (&[][..], port),
                _ => return false,
            }
        }
        _ => match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        },
    };
    host.iter().all(|&b| in_reg_name(b)) && port.iter().all(u8::is_ascii_digit)
}

/// The punctuation a reg-name may hold: unreserved (`-._~`), the `%` of
/// pct-encoded, and sub-delims.
const REG_NAME_PUNCTUATION: &[u8] = b"-._~%!$&'()*+,;=";

/// reg-name's bytes, one lookup each: every request's Host passes here,
/// and searching the punctuation list for each `.` of an address cost
/// about 270 instructions a request.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < REG_NAME_PUNCTUATION.len() {
        table[REG_NAME_PUNCTUATION[i] as usize] = true;
        i += 1;
    }
    table
};

/// reg-name: unreserved, pct-encoded (its `%` and hex digits) and
/// sub-delims.
fn in_reg_name(b: u8) -> bool {
    REG_NAME[usize::from(b)]
}

/// Inside `[...]`: an IPv6 address (with an RFC 6874 zone, `%25eth0`) or
/// an IPvFuture (`v1.x:y`).
fn in_ip_literal(b: u8) -> bool {
    in_reg_name(b) || b == b':'
}

#[cfg(test)]
mod tests {
    use super::{in_reg_name, is_valid, REG_NAME_PUNCTUATION};

    #[test]
    fn the_table_is_the_grammar() {
        for b in 0..=255u8 {
            let by_grammar = b.is_ascii_alphanumeric() || REG_NAME_PUNCTUATION.contains(&b);
            assert_eq!(in_reg_name(b), by_grammar, "byte {b:#04x}");
        }
    }

    #[test]
    fn names_addresses_and_ports_are_valid() {
        for ok in [
            "example.test",
            "Example.TEST.",
            "example.test:8080",
            "example.test:",
            "under_score.test",
            "xn--bcher-kva.test",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "[fe80::1%25eth0]:80",
            "[v1.fe:80]",
            "pct%41.test",
            "",
        ] {
            assert!(is_valid(ok.as_bytes()), "{ok:?}");
        }
    }

    #[test]
    fn paths_userinfo_whitespace_and_bad_ports_are_not() {
        for bad in [
            "user@example.test",
            "user:pw@example.test",
            "a/b",
            "x?y",
            "x#y",
            "x test",
            "x\ty",
            "x\\y",
            "x\"y",
            "x<y>",
            "example.test:80a",
            "example.test:8:80",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:8a",
            "[::1/64]",
            "b\u{fc}cher.test",
        ] {
            assert!(!is_valid(bad.as_bytes()), "{bad:?}");
        }
    }
}
