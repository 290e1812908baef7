//! `--proxy-headers`: behind a reverse proxy, the client, scheme and host an
//! app sees come from what the proxy says about the original request, but
//! only when the connection comes from a peer `--forwarded-allow-ips` names
//! (uvicorn's option names and list syntax).  From anyone else the headers
//! are left alone: the app sees them unchanged and the scope keeps the
//! connection's own facts.
//!
//! Two header families say it:
//! - RFC 7239 `Forwarded: for=...;proto=...;host=...`, one element per hop;
//! - the de facto `X-Forwarded-For` (a list, one entry per hop),
//!   `X-Forwarded-Proto` and `X-Forwarded-Host`.
//!
//! They are never mixed.  When any X-Forwarded-* header is present that
//! family is used and `Forwarded` is ignored; `Forwarded` is used only
//! without them.  The X- family wins because it is what proxies set:
//! nginx, for one, sets X-Forwarded-* and passes a client's own
//! `Forwarded` through untouched, so preferring `Forwarded` would let any
//! client behind a default nginx choose its address.  (A proxy that sets
//! only `Forwarded` must drop incoming X-Forwarded-* headers.)
//!
//! Which hop is the client: each proxy appends the address it was
//! connected from, so the list is read from the right, skipping entries
//! the trust list covers; the first entry it does not cover is the client.
//! If every entry is trusted, or the list is `*`, the leftmost is.  The
//! proto and host go with that hop: in `Forwarded`, from the same element;
//! for X-Forwarded-Proto/-Host, the entry at the same position when the
//! list is as long as X-Forwarded-For's, otherwise the rightmost entry (the
//! one the nearest proxy set).
//!
//! Everything here is a pure function of the trust list, the peer and the
//! request headers.  A value that does not parse changes nothing: the
//! client stays the connection's peer, the scheme and the host stay as they
//! were.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::header::{HeaderName, HeaderValue, HOST};
use http::HeaderMap;

use crate::scope::{RequestScope, ScopeKind};

/// The trust list when neither `--forwarded-allow-ips` nor the environment
/// variable names one (uvicorn's default).
pub const DEFAULT_ALLOW_IPS: &str = "127.0.0.1";
/// Read when `--forwarded-allow-ips` is not given, as uvicorn does.
pub const ALLOW_IPS_ENV: &str = "FORWARDED_ALLOW_IPS";
/// The literal that trusts every Unix-socket peer (they have no address);
/// `unix:PATH` trusts the peers of the listener bound at PATH.  nginx puts
/// this same literal in X-Forwarded-For for a client that reached it over
/// a Unix socket.
pub const UNIX_PEER: &str = "unix:";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustListError {
    #[error("'{0}' is not an IP network (ADDRESS/PREFIX, e.g. 10.0.0.0/8)")]
    BadNetwork(String),
    #[error("'{entry}' has address bits set past its prefix: did you mean {masked}?")]
    HostBitsSet { entry: String, masked: String },
}

/// `--forwarded-allow-ips`, parsed: the peers whose proxy headers count,
/// and the hops in a forwarded list that are skipped as our own proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    everyone: bool,
    addresses: Vec<IpAddr>,
    networks: Vec<Network>,
    /// Entries that are not addresses: `unix:`, `unix:PATH`, or names a
    /// proxy writes in place of an address (RFC 7239's `_obfuscated`).
    literals: Vec<String>,
}

/// An IP network: the address with the bits past `prefix` zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Network {
    base: IpAddr,
    prefix: u8,
}

/// Who is on the other end of a connection, for the trust check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer<'a> {
    Ip(IpAddr),
    /// A Unix-socket connection: no address; `listener` is the path of the
    /// socket it came in on, when known.
    Unix {
        listener: Option<&'a str>,
    },
}

/// What a trusted proxy says about the original request; each part is
/// None when the proxy did not say it, or said it in a form that does not
/// parse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// The client's address; port 0 when the proxy gives none (as uvicorn).
    pub client: Option<SocketAddr>,
    /// Whether the client spoke https (or wss) to the proxy.
    pub secure: Option<bool>,
    /// The host the client asked for, as a Host header value.
    pub host: Option<HeaderValue>,
}

impl FromStr for TrustedProxies {
    type Err = TrustListError;

    /// uvicorn's syntax: comma-separated; each entry an IP address, a
    /// network, `*` (trust everyone), or a literal.  Empty entries are
    /// skipped, so an empty list trusts no one.  Unlike uvicorn, a malformed
    /// network is an error rather than a literal nothing will ever match,
    /// and `*` counts wherever it stands in the list.
    fn from_str(list: &str) -> Result<TrustedProxies, TrustListError> {
        let mut trusted = TrustedProxies::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                trusted.everyone = true;
            } else if let Some(ip) = parse_ip_entry(entry) {
                trusted.addresses.push(ip.to_canonical());
            } else if entry.contains('/') && !entry.starts_with(UNIX_PEER) {
                trusted.networks.push(Network::parse(entry)?);
            } else {
                trusted.literals.push(entry.to_string());
            }
        }
        Ok(trusted)
    }
}

/// An address entry, bare or in brackets (`[::1]`).
fn parse_ip_entry(entry: &str) -> Option<IpAddr> {
    let bare = entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or(entry);
    bare.parse().ok()
}

impl Network {
    fn parse(entry: &str) -> Result<Network, TrustListError> {
        let bad = || TrustListError::BadNetwork(entry.to_string());
        let (addr, prefix) = entry.split_once('/').ok_or_else(bad)?;
        let base: IpAddr = parse_ip_entry(addr).ok_or_else(bad)?;
        let width = address_width(base);
        let prefix: u8 = match prefix.parse() {
            Ok(p) if p <= width && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(bad()),
        };
        let network = Network { base, prefix };
        if network.masked_base() != base {
            return Err(TrustListError::HostBitsSet {
                entry: entry.to_string(),
                masked: format!("{}/{prefix}", network.masked_base()),
            });
        }
        // An IPv4-mapped network is matched as the IPv4 one, as peers are.
        Ok(match base {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Network {
                    base: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                None => network,
            },
            _ => network,
        })
    }

    fn masked_base(&self) -> IpAddr {
        match self.base {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::from(a) & (u32::MAX.checked_shl(32 - u32::from(self.prefix))).unwrap_or(0),
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                u128::from(a) & (u128::MAX.checked_shl(128 - u32::from(self.prefix))).unwrap_or(0),
            )),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (base, addr, width) = match (self.base, ip) {
            (IpAddr::V4(b), IpAddr::V4(a)) => {
                (u128::from(u32::from(b)), u128::from(u32::from(a)), 32)
            }
            (IpAddr::V6(b), IpAddr::V6(a)) => (u128::from(b), u128::from(a), 128),
            _ => return false,
        };
        let shift = u32::from(width - self.prefix);
        // A /0 shifts the whole address out: every address matches.
        base.checked_shr(shift).unwrap_or(0) == addr.checked_shr(shift).unwrap_or(0)
    }
}

fn address_width(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// A hop in a forwarded list: an address (with the port the proxy saw, 0
/// when it gave none), or anything else (`unknown`, an obfuscated name,
/// `unix:`, garbage), which only a literal in the trust list can match and
/// which never becomes the client.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node<'a> {
    Addr(SocketAddr),
    Name(Cow<'a, str>),
}

impl TrustedProxies {
    /// Whether the connection's peer may set the proxy headers.
    pub fn trusts_peer(&self, peer: &Peer) -> bool {
        if self.everyone {
            return true;
        }
        match peer {
            Peer::Ip(ip) => self.trusts_ip(*ip),
            Peer::Unix { listener } => self.literals.iter().any(|literal| {
                literal == UNIX_PEER
                    || (listener.is_some() && literal.strip_prefix(UNIX_PEER) == *listener)
            }),
        }
    }

    fn trusts_ip(&self, ip: IpAddr) -> bool {
        // A v4 client of a dual-stack listener shows up as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        self.addresses.contains(&ip) || self.networks.iter().any(|n| n.contains(ip))
    }

    fn trusts_node(&self, node: &Node) -> bool {
        match node {
            Node::Addr(addr) => self.trusts_ip(addr.ip()),
            Node::Name(name) => self.literals.iter().any(|l| l == name),
        }
    }

    /// The position of the client in a list of hops, leftmost first.
    fn client_position(&self, hops: &[Node]) -> usize {
        if self.everyone {
            return 0;
        }
        hops.iter()
            .rposition(|hop| !self.trusts_node(hop))
            .unwrap_or(0)
    }
}

/// What the proxy headers say, if `peer` is trusted (None otherwise).
pub fn resolve(trusted: &TrustedProxies, peer: &Peer, headers: &HeaderMap) -> Option<Forwarded> {
    if !trusted.trusts_peer(peer) {
        return None;
    }
    let x_family = [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST]
        .into_iter()
        .any(|name| headers.contains_key(name));
    Some(if x_family {
        from_x_forwarded(trusted, headers)
    } else if headers.contains_key(FORWARDED) {
        from_forwarded(trusted, headers)
    } else {
        Forwarded::default()
    })
}

/// Show the app what the proxy said: `client`, `scheme`, and the `host`
/// header (replaced where it was, or added when the request had none).
/// `server` stays the listening socket: Www defines it as the server's own
/// address (`[path, undef]` on a Unix socket), not the name asked for.
pub fn apply(scope: &mut RequestScope, forwarded: Forwarded) {
    if let Some(client) = forwarded.client {
        scope.client = crate::service::Peer::Tcp(client);
        scope.client_host = Some(client.ip().to_string().into());
    }
    if let Some(secure) = forwarded.secure {
        scope.scheme = match (scope.kind == ScopeKind::WebSocket, secure) {
            (false, false) => "http",
            (false, true) => "https",
            (true, false) => "ws",
            (true, true) => "wss",
        };
    }
    if let Some(host) = forwarded.host {
        // HeaderMap::insert keeps the entry's place when the name is there.
        scope.headers.insert(HOST, host.clone());
        if let Some(ordered) = &mut scope.headers_in_wire_order {
            match ordered.iter_mut().find(|(name, _)| *name == HOST) {
                Some((_, value)) => *value = host,
                None => ordered.push((HOST, host)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// X-Forwarded-For / -Proto / -Host

/// A comma-separated header, every field line of it joined (RFC 9110 5.3),
/// entries trimmed.  None when absent or not visible ASCII.
fn list_entries<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Vec<&'h str>> {
    let mut entries = Vec::new();
    for line in headers.get_all(name) {
        let line = line.to_str().ok()?;
        entries.extend(line.split(',').map(|e| e.trim_matches([' ', '\t'])));
    }
    (!entries.is_empty()).then_some(entries)
}

fn from_x_forwarded(trusted: &TrustedProxies, headers: &HeaderMap) -> Forwarded {
    let hops: Option<Vec<Node>> = list_entries(headers, &X_FORWARDED_FOR)
        .map(|e| e.into_iter().map(x_forwarded_node).collect());
    let chosen = hops
        .as_deref()
        .map(|hops| (trusted.client_position(hops), hops.len()));
    let client = match (&hops, chosen) {
        (Some(hops), Some((at, _))) => match hops[at] {
            Node::Addr(addr) => Some(addr),
            Node::Name(_) => None,
        },
        _ => None,
    };
    Forwarded {
        client,
        secure: entry_for_hop(headers, &X_FORWARDED_PROTO, chosen).and_then(parse_proto),
        host: entry_for_hop(headers, &X_FORWARDED_HOST, chosen).and_then(parse_host),
    }
}

/// The X-Forwarded-Proto/-Host entry that goes with the client's hop
/// (`chosen`: its position and the number of hops): the one at the same
/// position in a list as long, else the rightmost.
fn entry_for_hop<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    chosen: Option<(usize, usize)>,
) -> Option<&'h str> {
    let entries = list_entries(headers, name)?;
    let at = match chosen {
        Some((at, hops)) if entries.len() == hops => at,
        _ => entries.len() - 1,
    };
    Some(entries[at])
}

/// An X-Forwarded-For entry: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`,
/// `[::1]:80`, or anything else (a name).
fn x_forwarded_node(entry: &str) -> Node<'_> {
    let name = || Node::Name(Cow::Borrowed(entry));
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Node::Addr(SocketAddr::new(ip, 0));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return name();
        };
        let Ok(ip) = inside.parse::<Ipv6Addr>() else {
            return name();
        };
        let port = match after {
            "" => Some(0),
            _ => after.strip_prefix(':').and_then(parse_port),
        };
        return port.map_or_else(name, |port| {
            Node::Addr(SocketAddr::new(IpAddr::V6(ip), port))
        });
    }
    if let Some((ip, port)) = entry.split_once(':') {
        if let (Ok(ip), Some(port)) = (ip.parse::<Ipv4Addr>(), parse_port(port)) {
            return Node::Addr(SocketAddr::new(IpAddr::V4(ip), port));
        }
    }
    name()
}

/// 1 to 5 digits, at most 65535.
fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `http`/`https` (or `ws`/`wss`), any case: whether it is secure.
fn parse_proto(proto: &str) -> Option<bool> {
    match proto.to_ascii_lowercase().as_str() {
        "http" | "ws" => Some(false),
        "https" | "wss" => Some(true),
        _ => None,
    }
}

/// A Host value (RFC 9110 7.2: uri-host [":" port]) as a header value:
/// a name or IPv4 address (letters, digits, `-._~`, %-escapes) or a
/// bracketed IPv6 address, with an optional port of 1 to 5 digits.
fn parse_host(host: &str) -> Option<HeaderValue> {
    let port_ok =
        |after: &str| after.is_empty() || after.strip_prefix(':').and_then(parse_port).is_some();
    let valid = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        inside.parse::<Ipv6Addr>().is_ok() && port_ok(after)
    } else {
        let (name, after) = match host.find(':') {
            Some(at) => host.split_at(at),
            None => (host, ""),
        };
        !name.is_empty() && reg_name(name.as_bytes()) && port_ok(after)
    };
    if !valid {
        return None;
    }
    HeaderValue::from_str(host).ok()
}

fn reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                let hex = name.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => i += 1,
            _ => return false,
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Forwarded (RFC 7239)

/// One forwarded-element: the parameters this server uses, unquoted.
#[derive(Debug, Default, PartialEq, Eq)]
struct Element<'a> {
    for_: Option<Cow<'a, str>>,
    proto: Option<Cow<'a, str>>,
    host: Option<Cow<'a, str>>,
}

fn from_forwarded(trusted: &TrustedProxies, headers: &HeaderMap) -> Forwarded {
    let mut joined = Vec::new();
    for (i, line) in headers.get_all(FORWARDED).iter().enumerate() {
        if i > 0 {
            joined.push(b',');
        }
        joined.extend_from_slice(line.as_bytes());
    }
    let Some(elements) = parse_forwarded(&joined) else {
        return Forwarded::default();
    };
    if elements.is_empty() {
        return Forwarded::default();
    }
    let hops: Vec<Node> = elements
        .iter()
        .map(|e| match &e.for_ {
            Some(value) => forwarded_node(value),
            None => Node::Name(Cow::Borrowed("")),
        })
        .collect();
    let at = trusted.client_position(&hops);
    let element = &elements[at];
    Forwarded {
        client: match hops[at] {
            Node::Addr(addr) => Some(addr),
            Node::Name(_) => None,
        },
        secure: element.proto.as_deref().and_then(parse_proto),
        host: element.host.as_deref().and_then(parse_host),
    }
}

/// RFC 7239 4: `1#forwarded-element`, each `[pair] *(";" [pair])`, a pair
/// `token "=" (token / quoted-string)`.  Whitespace is allowed around `,`
/// and `;`, not around `=`; empty list elements are skipped (RFC 9110 5.6.1).
/// None when it does not parse, when a parameter repeats in one element
/// (4: "MUST NOT occur more than once"), or when it holds anything but
/// ASCII: the hops cannot be told apart, so nothing in it is used.
fn parse_forwarded(input: &[u8]) -> Option<Vec<Element<'_>>> {
    let mut p = Cursor { input, at: 0 };
    let mut elements = Vec::new();
    loop {
        let mut element = Element::default();
        let mut pairs = 0;
        loop {
            p.skip_ows();
            match p.peek() {
                None | Some(b',') => break,
                Some(b';') => {
                    p.at += 1;
                    continue;
                }
                _ => {}
            }
            let name = p.token()?;
            p.expect(b'=')?;
            let value = if p.peek() == Some(b'"') {
                p.quoted_string()?
            } else {
                Cow::Borrowed(p.token()?)
            };
            let slot = match name.to_ascii_lowercase().as_str() {
                "for" => Some(&mut element.for_),
                "proto" => Some(&mut element.proto),
                "host" => Some(&mut element.host),
                // `by` and extensions: checked for syntax, not used.
                _ => None,
            };
            if let Some(slot) = slot {
                if slot.replace(value).is_some() {
                    return None;
                }
            }
            pairs += 1;
            p.skip_ows();
            match p.peek() {
                None | Some(b',') => break,
                Some(b';') => p.at += 1,
                Some(_) => return None,
            }
        }
        if pairs > 0 {
            elements.push(element);
        }
        match p.peek() {
            None => return Some(elements),
            Some(b',') => p.at += 1,
            Some(_) => return None,
        }
    }
}

struct Cursor<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.at).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    /// 1*tchar (RFC 9110 5.6.2).
    fn token(&mut self) -> Option<&'a str> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        if self.at == start {
            return None;
        }
        // tchars are ASCII.
        std::str::from_utf8(&self.input[start..self.at]).ok()
    }

    /// DQUOTE *( qdtext / quoted-pair ) DQUOTE, unescaped; ASCII only.
    fn quoted_string(&mut self) -> Option<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.at;
        let mut unescaped: Option<Vec<u8>> = None;
        loop {
            let byte = self.peek()?;
            self.at += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let escaped = self
                        .peek()
                        .filter(|b| *b == b'\t' || (b' '..=b'~').contains(b))?;
                    self.at += 1;
                    let buf =
                        unescaped.get_or_insert_with(|| self.input[start..self.at - 2].to_vec());
                    buf.push(escaped);
                }
                b'\t' | b' '..=b'~' => {
                    if let Some(buf) = &mut unescaped {
                        buf.push(byte);
                    }
                }
                _ => return None,
            }
        }
        match unescaped {
            None => std::str::from_utf8(&self.input[start..self.at - 1])
                .ok()
                .map(Cow::Borrowed),
            Some(buf) => String::from_utf8(buf).ok().map(Cow::Owned),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 7239 6: `node = nodename [":" node-port]`, a nodename being an IPv4
/// address, a bracketed IPv6 address, `unknown` or an obfuscated `_name`;
/// a port digits or an obfuscated `_name` (port 0 then).  Only an address
/// can become the client; anything else is a name.
fn forwarded_node(value: &str) -> Node<'_> {
    let name = || Node::Name(Cow::Borrowed(value));
    let (ip, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return name();
        };
        let Ok(ip) = inside.parse::<Ipv6Addr>() else {
            return name();
        };
        (IpAddr::V6(ip), after)
    } else {
        let (host, after) = match value.find(':') {
            Some(at) => value.split_at(at),
            None => (value, ""),
        };
        let Ok(ip) = host.parse::<Ipv4Addr>() else {
            return name();
        };
        (IpAddr::V4(ip), after)
    };
    let port = match port {
        "" => Some(0),
        _ => port.strip_prefix(':').and_then(|p| {
            if is_obfuscated(p) {
                Some(0)
            } else {
                parse_port(p)
            }
        }),
    };
    port.map_or_else(name, |port| Node::Addr(SocketAddr::new(ip, port)))
}

/// `"_" 1*(ALPHA / DIGIT / "." / "_" / "-")`.
fn is_obfuscated(s: &str) -> bool {
    s.len() > 1
        && s.starts_with('_')
        && s[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(list: &str) -> TrustedProxies {
        list.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn local() -> Peer<'static> {
        Peer::Ip("127.0.0.1".parse().unwrap())
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn host(s: &str) -> Option<HeaderValue> {
        Some(HeaderValue::from_str(s).unwrap())
    }

    /// What the default trust list makes of these headers from 127.0.0.1.
    fn seen(pairs: &[(&str, &[u8])]) -> Forwarded {
        resolve(&trust(DEFAULT_ALLOW_IPS), &local(), &headers(pairs)).unwrap()
    }

    // --- the trust list ---------------------------------------------------

    #[test]
    fn the_list_takes_addresses_networks_star_and_literals() {
        let t = trust(" 10.0.0.1 , 192.168.0.0/16,::1, 2001:db8::/32,[fe80::1], unix:, _proxy ,,");
        let ip = |s: &str| Peer::Ip(s.parse().unwrap());
        assert!(t.trusts_peer(&ip("10.0.0.1")));
        assert!(!t.trusts_peer(&ip("10.0.0.2")));
        assert!(t.trusts_peer(&ip("192.168.255.1")));
        assert!(!t.trusts_peer(&ip("192.169.0.1")));
        assert!(t.trusts_peer(&ip("::1")));
        assert!(t.trusts_peer(&ip("2001:db8:ffff::9")));
        assert!(!t.trusts_peer(&ip("2001:db9::1")));
        assert!(t.trusts_peer(&ip("fe80::1")), "brackets are accepted");
        assert!(t.trusts_peer(&Peer::Unix { listener: None }));
        assert!(!t.everyone);
        assert!(
            trust("127.0.0.1, *").trusts_peer(&ip("203.0.113.9")),
            "* anywhere"
        );
        assert!(trust("*").everyone);
    }

    #[test]
    fn the_default_trusts_ipv4_loopback_only() {
        let t = trust(DEFAULT_ALLOW_IPS);
        assert!(t.trusts_peer(&local()));
        assert!(!t.trusts_peer(&Peer::Ip("127.0.0.2".parse().unwrap())));
        assert!(!t.trusts_peer(&Peer::Ip("::1".parse().unwrap())));
        assert!(!t.trusts_peer(&Peer::Unix { listener: None }));
    }

    #[test]
    fn an_empty_list_trusts_no_one() {
        for list in ["", " ", ",,"] {
            let t = trust(list);
            assert!(!t.trusts_peer(&local()), "{list:?}");
            assert!(resolve(&t, &local(), &headers(&[("x-forwarded-for", b"1.2.3.4")])).is_none());
        }
    }

    #[test]
    fn an_ipv4_mapped_peer_is_matched_as_ipv4() {
        let mapped = Peer::Ip("::ffff:127.0.0.1".parse().unwrap());
        assert!(trust("127.0.0.1").trusts_peer(&mapped));
        assert!(trust("127.0.0.0/8").trusts_peer(&mapped));
        assert!(trust("::ffff:127.0.0.0/104").trusts_peer(&mapped));
        assert!(trust("::ffff:127.0.0.1").trusts_peer(&local()));
    }

    #[test]
    fn networks_of_every_prefix_length() {
        let t = trust("0.0.0.0/0");
        assert!(t.trusts_peer(&Peer::Ip("203.0.113.7".parse().unwrap())));
        assert!(
            !t.trusts_peer(&Peer::Ip("::7".parse().unwrap())),
            "families do not mix"
        );
        assert!(trust("::/0").trusts_peer(&Peer::Ip("2001:db8::1".parse().unwrap())));
        assert!(trust("10.1.2.3/32").trusts_peer(&Peer::Ip("10.1.2.3".parse().unwrap())));
        assert!(!trust("10.1.2.3/32").trusts_peer(&Peer::Ip("10.1.2.4".parse().unwrap())));
        let t = trust("2001:db8::1/128");
        assert!(t.trusts_peer(&Peer::Ip("2001:db8::1".parse().unwrap())));
        assert!(!t.trusts_peer(&Peer::Ip("2001:db8::2".parse().unwrap())));
    }

    #[test]
    fn a_malformed_network_is_an_error_naming_it() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/+8",
            "nonsense/8",
            "::/129",
            "/8",
        ] {
            let err = bad.parse::<TrustedProxies>().unwrap_err();
            assert_eq!(err, TrustListError::BadNetwork(bad.into()), "{bad}");
            assert!(err.to_string().contains(bad));
        }
        let err = "10.0.0.1/8".parse::<TrustedProxies>().unwrap_err();
        assert!(
            err.to_string().contains("did you mean 10.0.0.0/8?"),
            "{err}"
        );
        assert!(
            "unix:/run/app.sock".parse::<TrustedProxies>().is_ok(),
            "a path, not a network"
        );
    }

    // --- Unix-socket peers (no address) -------------------------------------

    #[test]
    fn a_unix_socket_peer_is_trusted_only_by_a_unix_literal() {
        let any = Peer::Unix { listener: None };
        let app = Peer::Unix {
            listener: Some("/run/app.sock"),
        };
        assert!(!trust("127.0.0.1, ::1, 0.0.0.0/0").trusts_peer(&app));
        assert!(trust("unix:").trusts_peer(&any));
        assert!(trust("unix:").trusts_peer(&app));
        assert!(trust("unix:/run/app.sock").trusts_peer(&app));
        assert!(!trust("unix:/run/other.sock").trusts_peer(&app));
        assert!(!trust("unix:/run/app.sock").trusts_peer(&any));
        assert!(trust("*").trusts_peer(&any));
        let fwd = resolve(
            &trust("unix:"),
            &app,
            &headers(&[
                ("x-forwarded-for", b"198.51.100.4"),
                ("x-forwarded-proto", b"https"),
            ]),
        )
        .unwrap();
        assert_eq!(fwd.client, addr("198.51.100.4:0"));
        assert_eq!(fwd.secure, Some(true));
        assert!(resolve(
            &trust("127.0.0.1"),
            &app,
            &headers(&[("x-forwarded-for", b"1.2.3.4")])
        )
        .is_none());
    }

    #[test]
    fn nginx_on_a_unix_socket_writes_unix_and_the_literal_skips_it() {
        // nginx reached over a Unix socket by another proxy appends "unix:".
        let h = headers(&[("x-forwarded-for", b"203.0.113.5, unix:")]);
        let f = resolve(&trust("unix:"), &Peer::Unix { listener: None }, &h).unwrap();
        assert_eq!(f.client, addr("203.0.113.5:0"));
        let f = resolve(&trust("127.0.0.1"), &local(), &h).unwrap();
        assert_eq!(
            f.client, None,
            "an untrusted unix: hop is the client, and it has no address"
        );
    }

    // --- who is trusted -------------------------------------------------------

    #[test]
    fn an_untrusted_peer_changes_nothing() {
        let h = headers(&[
            ("x-forwarded-for", b"1.2.3.4"),
            ("x-forwarded-proto", b"https"),
            ("forwarded", b"for=5.6.7.8"),
        ]);
        assert_eq!(resolve(&trust("10.0.0.1"), &local(), &h), None);
        assert_eq!(resolve(&trust("10.0.0.0/8, unix:"), &local(), &h), None);
    }

    #[test]
    fn a_trusted_peer_without_proxy_headers_changes_nothing() {
        assert_eq!(seen(&[("x-other", b"1")]), Forwarded::default());
    }

    // --- X-Forwarded-For ----------------------------------------------------

    #[test]
    fn x_forwarded_for_is_walked_from_the_right_skipping_trusted_hops() {
        let h = headers(&[(
            "x-forwarded-for",
            b"9.9.9.9, 203.0.113.1, 10.0.0.2, 10.0.0.1",
        )]);
        let t = trust("127.0.0.1, 10.0.0.0/8");
        assert_eq!(
            resolve(&t, &local(), &h).unwrap().client,
            addr("203.0.113.1:0")
        );
        // Only the direct peer trusted: the rightmost entry is the client.
        assert_eq!(
            seen(&[("x-forwarded-for", b"9.9.9.9, 10.0.0.1")]).client,
            addr("10.0.0.1:0")
        );
        // Every hop trusted: the leftmost.
        let all = headers(&[("x-forwarded-for", b"10.0.0.3, 10.0.0.2")]);
        assert_eq!(
            resolve(&t, &local(), &all).unwrap().client,
            addr("10.0.0.3:0")
        );
        // `*`: the leftmost, whatever the hops.
        assert_eq!(
            resolve(&trust("*"), &local(), &h).unwrap().client,
            addr("9.9.9.9:0")
        );
    }

    #[test]
    fn several_x_forwarded_for_lines_are_one_list() {
        let h = headers(&[
            ("x-forwarded-for", b"198.51.100.1"),
            ("x-forwarded-for", b"10.0.0.1"),
        ]);
        let t = trust("127.0.0.1, 10.0.0.1");
        assert_eq!(
            resolve(&t, &local(), &h).unwrap().client,
            addr("198.51.100.1:0")
        );
    }

    #[test]
    fn x_forwarded_for_entries_with_ports_and_ipv6() {
        for (entry, want) in [
            (&b"203.0.113.9"[..], "203.0.113.9:0"),
            (b"203.0.113.9:4711", "203.0.113.9:4711"),
            (b"2001:db8::7", "[2001:db8::7]:0"),
            (b"[2001:db8::7]", "[2001:db8::7]:0"),
            (b"[2001:db8::7]:443", "[2001:db8::7]:443"),
            (b"  203.0.113.9\t", "203.0.113.9:0"),
        ] {
            assert_eq!(
                seen(&[("x-forwarded-for", entry)]).client,
                addr(want),
                "{entry:?}"
            );
        }
    }

    #[test]
    fn a_malformed_x_forwarded_for_leaves_the_client_alone() {
        for bad in [
            &b""[..],
            b" ",
            b"unknown",
            b"_hidden",
            b"not an address",
            b"203.0.113.9:",
            b"203.0.113.9:65536",
            b"203.0.113.9:-1",
            b"203.0.113.9:80:80",
            b"[2001:db8::7",
            b"[2001:db8::7]x",
            b"[203.0.113.9]",
            b"[2001:db8::7]:99999",
            b"1.2.3.4.5",
            b"1.2.3.4, garbage",
            b"caf\xc3\xa9",
            b"\xff\xfe",
        ] {
            let f = seen(&[("x-forwarded-for", bad), ("x-forwarded-proto", b"https")]);
            assert_eq!(f.client, None, "{bad:?}");
            assert_eq!(
                f.secure,
                Some(true),
                "{bad:?}: the other headers still count"
            );
        }
    }

    // --- X-Forwarded-Proto / -Host ------------------------------------------

    #[test]
    fn x_forwarded_proto_sets_the_scheme() {
        for (value, want) in [
            (&b"https"[..], Some(true)),
            (b"HTTPS", Some(true)),
            (b" wss ", Some(true)),
            (b"http", Some(false)),
            (b"ws", Some(false)),
            (b"ftp", None),
            (b"", None),
            (b"https;", None),
            (b"h ttps", None),
            (b"\xff", None),
        ] {
            assert_eq!(
                seen(&[("x-forwarded-proto", value)]).secure,
                want,
                "{value:?}"
            );
        }
    }

    #[test]
    fn x_forwarded_host_sets_the_host() {
        for (value, want) in [
            (&b"example.com"[..], host("example.com")),
            (b"Example.COM:8443", host("Example.COM:8443")),
            (b"203.0.113.9", host("203.0.113.9")),
            (b"[2001:db8::1]:443", host("[2001:db8::1]:443")),
            (b"xn--caf-dma.example", host("xn--caf-dma.example")),
            (b"a%2Db.example", host("a%2Db.example")),
            (b"", None),
            (b"example.com:", None),
            (b"example.com:99999", None),
            (b"example.com:80:80", None),
            (b"exa mple.com", None),
            (b"user@example.com", None),
            (b"example.com/path", None),
            (b"[2001:db8::1", None),
            (b"[nonsense]", None),
            (b"a%2", None),
            (b"a%zz", None),
            (b"caf\xc3\xa9.example", None),
        ] {
            assert_eq!(seen(&[("x-forwarded-host", value)]).host, want, "{value:?}");
        }
    }

    #[test]
    fn proto_and_host_lists_follow_the_client_hop() {
        let t = trust("127.0.0.1, 10.0.0.0/8");
        // Two proxies, each appended its own view: the client's hop is the first.
        let h = headers(&[
            ("x-forwarded-for", b"203.0.113.1, 10.0.0.1"),
            ("x-forwarded-proto", b"https, http"),
            ("x-forwarded-host", b"www.example, internal"),
        ]);
        let f = resolve(&t, &local(), &h).unwrap();
        assert_eq!((f.secure, f.host), (Some(true), host("www.example")));
        // Only the direct peer trusted: its hop is the second.
        let f = seen(&[
            ("x-forwarded-for", b"203.0.113.1, 10.0.0.1"),
            ("x-forwarded-proto", b"https, http"),
        ]);
        assert_eq!(f.secure, Some(false));
        // Lengths differ: the rightmost, which the nearest proxy set.
        let f = resolve(
            &t,
            &local(),
            &headers(&[
                ("x-forwarded-for", b"203.0.113.1, 10.0.0.1"),
                ("x-forwarded-proto", b"http, http, https"),
            ]),
        )
        .unwrap();
        assert_eq!(f.secure, Some(true));
        // No X-Forwarded-For at all: the rightmost.
        assert_eq!(
            seen(&[("x-forwarded-proto", b"http, https")]).secure,
            Some(true)
        );
    }

    // --- Forwarded (RFC 7239) ----------------------------------------------

    #[test]
    fn forwarded_sets_client_scheme_and_host() {
        let f = seen(&[(
            "forwarded",
            b"for=192.0.2.60;proto=https;host=example.com;by=203.0.113.43",
        )]);
        assert_eq!(f.client, addr("192.0.2.60:0"));
        assert_eq!(f.secure, Some(true));
        assert_eq!(f.host, host("example.com"));
    }

    #[test]
    fn forwarded_rfc_7239_examples() {
        // Section 4 and 7.1.
        for (value, want) in [
            (&br#"for="_gazonk""#[..], None),
            (
                br#"For="[2001:db8:cafe::17]:4711""#,
                addr("[2001:db8:cafe::17]:4711"),
            ),
            (
                b"for=192.0.2.60;proto=http;by=203.0.113.43",
                addr("192.0.2.60:0"),
            ),
            (
                b"for=192.0.2.43, for=198.51.100.17",
                addr("198.51.100.17:0"),
            ),
            (b"for=unknown", None),
            (br#"for="192.0.2.43:47011""#, addr("192.0.2.43:47011")),
            (br#"for="192.0.2.43:_hidden""#, addr("192.0.2.43:0")),
            (br#"for="[2001:db8::1]:_p-1.x""#, addr("[2001:db8::1]:0")),
        ] {
            assert_eq!(seen(&[("forwarded", value)]).client, want, "{value:?}");
        }
    }

    #[test]
    fn forwarded_is_walked_from_the_right_and_each_hop_keeps_its_proto_and_host() {
        let h = headers(&[(
            "forwarded",
            b"for=198.51.100.1;proto=http, for=203.0.113.1;proto=https;host=shop.example, for=10.0.0.1;proto=http;host=internal",
        )]);
        let t = trust("127.0.0.1, 10.0.0.0/8");
        let f = resolve(&t, &local(), &h).unwrap();
        assert_eq!(f.client, addr("203.0.113.1:0"));
        assert_eq!((f.secure, f.host), (Some(true), host("shop.example")));
        let f = resolve(&trust("*"), &local(), &h).unwrap();
        assert_eq!(
            (f.client, f.secure, f.host),
            (addr("198.51.100.1:0"), Some(false), None)
        );
        // An element without `for`: an unknown hop, untrusted, no client;
        // the proxy that wrote it still says how it was reached.
        let f = seen(&[("forwarded", b"for=198.51.100.1, proto=https;host=a.example")]);
        assert_eq!(
            (f.client, f.secure, f.host),
            (None, Some(true), host("a.example"))
        );
        // An obfuscated hop our list names is skipped like an address.
        let h = headers(&[("forwarded", br#"for=198.51.100.1, for="_edge:_x""#)]);
        let f = resolve(&trust("127.0.0.1, _edge:_x"), &local(), &h).unwrap();
        assert_eq!(f.client, addr("198.51.100.1:0"));
    }

    #[test]
    fn forwarded_syntax_quotes_case_whitespace_and_lines() {
        for value in [
            &b"FOR=192.0.2.1;PROTO=HTTPS;HOST=a.example"[..],
            br#"for="192.0.2.1";proto="https";host="a.example""#,
            br#"for="19\2.0.2.1";proto=https;host="a\.example""#,
            b" for=192.0.2.1 ; proto=https ;host=a.example ",
            b"for=192.0.2.1;;proto=https;host=a.example;",
            b";for=192.0.2.1;proto=https;host=a.example",
            b", ,for=192.0.2.1;proto=https;host=a.example,",
            b"for=192.0.2.1;proto=https;host=a.example;by=_x;ext=\"quoted, with; separators\"",
        ] {
            let f = seen(&[("forwarded", value)]);
            assert_eq!(
                (f.client, f.secure, f.host),
                (addr("192.0.2.1:0"), Some(true), host("a.example")),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        // Several lines are one list.
        let f = seen(&[
            ("forwarded", b"for=192.0.2.1"),
            ("forwarded", b"for=198.51.100.2"),
        ]);
        assert_eq!(f.client, addr("198.51.100.2:0"));
    }

    #[test]
    fn malformed_forwarded_changes_nothing() {
        for bad in [
            &b""[..],
            b"for",
            b"for=",
            b"=192.0.2.1",
            b"for =192.0.2.1",
            b"for= 192.0.2.1",
            b"for=192.0.2.1 proto=https",
            b"for=[2001:db8::1]",
            b"for=192.0.2.1:80",
            br#"for="192.0.2.1"x"#,
            br#"for="192.0.2.1"#,
            br#"for="192.0.2.1\"#,
            b"for=192.0.2.1;for=198.51.100.1",
            b"for=192.0.2.1;proto=https;PROTO=http",
            b"for=\"caf\xc3\xa9\"",
            b"for=\xff",
            b"for=\"a\x80b\"",
            b"for=192.0.2.1,@",
            b"for=192.0.2.1;@=x",
        ] {
            assert_eq!(
                seen(&[("forwarded", bad), ("x-other", b"1")]),
                Forwarded::default(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Values that parse as syntax but not as what they stand for.
        for (value, want) in [
            (&br#"for="[2001:db8::1""#[..], Forwarded::default()),
            (br#"for="2001:db8::1""#, Forwarded::default()),
            (br#"for="[192.0.2.1]""#, Forwarded::default()),
            (br#"for="192.0.2.1:99999""#, Forwarded::default()),
            (br#"for="192.0.2.1:_""#, Forwarded::default()),
            (br#"for="192.0.2.1:_a b""#, Forwarded::default()),
            (b"for=192.0.2.256", Forwarded::default()),
            (
                b"proto=gopher;host=a.example",
                Forwarded {
                    host: host("a.example"),
                    ..Default::default()
                },
            ),
            (
                br#"proto=https;host="a b""#,
                Forwarded {
                    secure: Some(true),
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(
                seen(&[("forwarded", value)]),
                want,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    // --- precedence ------------------------------------------------------------

    #[test]
    fn x_forwarded_headers_win_over_forwarded_and_are_never_mixed_with_it() {
        let f = seen(&[
            (
                "forwarded",
                b"for=192.0.2.1;proto=https;host=forged.example",
            ),
            ("x-forwarded-for", b"198.51.100.7"),
        ]);
        assert_eq!(
            (f.client, f.secure, f.host),
            (addr("198.51.100.7:0"), None, None)
        );
        // Any one X- header selects the family, even a malformed one.
        let f = seen(&[
            ("forwarded", b"for=192.0.2.1"),
            ("x-forwarded-proto", b"bogus"),
        ]);
        assert_eq!(f, Forwarded::default());
        // Without X- headers, Forwarded counts.
        assert_eq!(
            seen(&[("forwarded", b"for=192.0.2.1")]).client,
            addr("192.0.2.1:0")
        );
    }

    // --- the scope ----------------------------------------------------------------

    fn scope(req: http::Request<()>, kind: ScopeKind) -> RequestScope {
        let (mut parts, _) = req.into_parts();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let conn = crate::service::ConnInfo::new(peer, server);
        RequestScope::from_parts(&mut parts, &conn, "", crate::scope::BodyState::Empty, kind)
    }

    #[test]
    fn apply_sets_client_scheme_and_the_host_header_in_place() {
        let req = http::Request::get("/")
            .header("host", "backend:5000")
            .header("x-a", "1")
            .body(())
            .unwrap();
        let mut s = scope(req, ScopeKind::Http);
        apply(
            &mut s,
            Forwarded {
                client: addr("[2001:db8::5]:0"),
                secure: Some(true),
                host: host("www.example"),
            },
        );
        assert_eq!(
            s.client,
            crate::service::Peer::Tcp("[2001:db8::5]:0".parse().unwrap())
        );
        assert_eq!(s.client_host.as_deref(), Some("2001:db8::5"));
        assert_eq!(s.scheme, "https");
        let h: Vec<_> = crate::scope::scope_headers(&s).collect();
        let want: Vec<(&[u8], &[u8])> = vec![(b"host", b"www.example"), (b"x-a", b"1")];
        assert_eq!(h, want);
        assert_eq!(
            (&*s.server_host, s.server_port),
            (&b"127.0.0.1"[..], Some(5000)),
            "server is the socket"
        );
    }

    #[test]
    fn apply_maps_the_scheme_onto_websocket_scopes() {
        for (secure, want) in [(true, "wss"), (false, "ws")] {
            let mut s = scope(
                http::Request::get("/ws").body(()).unwrap(),
                ScopeKind::WebSocket,
            );
            apply(
                &mut s,
                Forwarded {
                    secure: Some(secure),
                    ..Default::default()
                },
            );
            assert_eq!(s.scheme, want);
        }
    }

    #[test]
    fn apply_adds_a_host_when_there_was_none_and_keeps_wire_order() {
        let mut s = scope(http::Request::get("/").body(()).unwrap(), ScopeKind::Http);
        apply(
            &mut s,
            Forwarded {
                host: host("a.example"),
                ..Default::default()
            },
        );
        assert_eq!(s.headers.get(HOST).unwrap(), "a.example");

        let mut s = scope(
            http::Request::get("/")
                .header("x-a", "1")
                .header("x-b", "2")
                .body(())
                .unwrap(),
            ScopeKind::Http,
        );
        s.headers.append("x-a", HeaderValue::from_static("3"));
        s.headers_in_wire_order = Some(vec![
            (
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("1"),
            ),
            (
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("2"),
            ),
            (
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("3"),
            ),
        ]);
        apply(
            &mut s,
            Forwarded {
                host: host("a.example"),
                ..Default::default()
            },
        );
        let names: Vec<_> = crate::scope::scope_headers(&s).map(|(n, _)| n).collect();
        let want: Vec<&[u8]> = vec![b"x-a", b"x-b", b"x-a", b"host"];
        assert_eq!(names, want);
    }

    #[test]
    fn apply_with_nothing_said_changes_nothing() {
        let req = || {
            http::Request::get("/")
                .header("host", "h")
                .body(())
                .unwrap()
        };
        let mut s = scope(req(), ScopeKind::Sse);
        apply(&mut s, Forwarded::default());
        let before = scope(req(), ScopeKind::Sse);
        assert_eq!(
            (s.client, s.scheme, &s.headers),
            (before.client, before.scheme, &before.headers)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes a proxy (or a client posing as one) sends, parsing
        /// never panics, and what it yields is well-formed.
        #[test]
        fn any_header_bytes_are_safe(
            value in proptest::collection::vec(any::<u8>(), 0..96),
            which in 0usize..4,
            list in "[0-9a-f.:/,* \\[\\]unix]{0,24}",
        ) {
            let name = ["forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"][which];
            let Ok(value) = HeaderValue::from_bytes(&value) else { return Ok(()) };
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), value);
            let trusted: TrustedProxies = list.parse().unwrap_or_default();
            for peer in [Peer::Ip("127.0.0.1".parse().unwrap()), Peer::Unix { listener: Some("/s") }] {
                if let Some(f) = resolve(&trusted, &peer, &h) {
                    if let Some(host) = f.host {
                        prop_assert!(host.to_str().is_ok());
                        prop_assert!(!host.is_empty());
                    }
                }
            }
        }

        /// Quoted Forwarded values round-trip through escaping.
        #[test]
        fn quoted_values_unescape(raw in "[ -~]{0,32}") {
            let quoted: String = raw.chars().flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                _ => vec![c],
            }).collect();
            let header = format!("for=\"{quoted}\"");
            let parsed = parse_forwarded(header.as_bytes());
            prop_assert!(parsed.is_some());
            let parsed = parsed.unwrap();
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(parsed[0].for_.as_deref(), Some(raw.as_str()));
        }
    }
}
