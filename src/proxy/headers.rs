//! Header rewriting at the proxy hop (RFC 9110 §7.6): hop-by-hop fields out; `Via`,
//! `Forwarded` (RFC 7239) and `X-Forwarded-*` in; `Upgrade` kept only for allowed protocols.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// `Proxy-*` credentials that are meant for this hop).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    // Only meaningful with an h2c upgrade (RFC 7540 §3.2.1), which is never performed.
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Fields that backends and frameworks read as what a trusted front said about the client, its
/// scheme or its URL. A client must not be able to write them past the proxy: unless the route
/// trusts the front before it, they are dropped (the proxy writes `X-Forwarded-*` and
/// `Forwarded` itself), and so are their underscore spellings (`X_Forwarded_For`), which CGI and
/// WSGI backends merge with the real field (both become `HTTP_X_FORWARDED_FOR`), and their
/// appearance as trailers.
const FORWARDING_FAMILY: [&str; 23] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-server",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "client-ip",
    "front-end-https",
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
    // Read by some frameworks and proxies for the same purposes.
    "x-forwarded",
    "forwarded-for",
    "x-cluster-client-ip",
    "x-proxyuser-ip",
    "x-host",
    "x-forwarded-client-cert",
];

/// Whether `name` is one of [`FORWARDING_FAMILY`], in any spelling of `-` as `_`.
fn is_forwarding_field(name: &str) -> bool {
    FORWARDING_FAMILY.iter().any(|f| {
        f.len() == name.len()
            && f.bytes()
                .zip(name.bytes())
                .all(|(f, c)| f == c || (f == b'-' && c == b'_'))
    })
}

/// Removes forwarding fields from a request's trailers: trailers are the client's alone.
pub(crate) fn scrub_trailers(trailers: &mut HeaderMap) {
    let names: Vec<HeaderName> = trailers
        .keys()
        .filter(|n| is_forwarding_field(n.as_str()) || HOP_BY_HOP.contains(n) || *n == header::HOST)
        .cloned()
        .collect();
    for name in names {
        trailers.remove(name);
    }
}

/// The protocols named by the client's `Upgrade` that `allowed` lists, when the client asks to
/// switch at all (`Connection: upgrade`). `h2c` is never among them: switching to it would
/// make the connection a tunnel past every per-request check (RFC 9110 §7.8 lets a server
/// ignore `Upgrade`).
pub(crate) fn allowed_upgrade(headers: &HeaderMap, allowed: &[Box<str>]) -> Option<HeaderValue> {
    if !connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return None;
    }
    let kept: Vec<&str> = list_items(headers, &header::UPGRADE)
        .filter(|p| upgrade_allowed(p, allowed))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Whether `protocol` (`name` or `name/version`) is one of `allowed`, and not `h2c`.
pub(crate) fn upgrade_allowed(protocol: &str, allowed: &[Box<str>]) -> bool {
    let name = protocol.split('/').next().unwrap_or("").trim();
    !name.eq_ignore_ascii_case("h2c") && allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// The items of a comma-separated list field, over all its lines.
fn list_items<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Every token of every `Connection` field: one field may be split over several lines, and a
/// proxy that reads only the first lets the others through (golang#46313).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    list_items(headers, &header::CONNECTION)
}

/// Removes the hop-by-hop fields and every field named by `Connection`, except `Host`: the
/// request's target is not the client's to drop (`Connection: host`).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most requests carry none of these, and a removal is a hash
    // and a probe whether the field is there or not.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| HOP_BY_HOP.contains(n))
        .cloned()
        .collect();
    if present.contains(&header::CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| n != header::HOST)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in present {
        headers.remove(name);
    }
}

/// RFC 9112 §3.2: exactly one valid `Host` in an HTTP/1.1 request, at most one in any other.
/// A request that breaks this is refused before it reaches anything: a proxy and its backend
/// could each pick a different one of two.
pub(crate) fn check_host(headers: &HeaderMap, version: Version) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => Err("an HTTP/1.1 request needs a Host field"),
        (None, _) => Ok(()),
        (Some(_), Some(_)) => Err("more than one Host field"),
        (Some(host), None) => {
            let valid = host
                .to_str()
                .ok()
                .is_some_and(|h| !h.contains('@') && h.parse::<http::uri::Authority>().is_ok());
            if valid {
                Ok(())
            } else {
                Err("the Host field is not a host[:port]")
            }
        }
    }
}

/// `Server-Timing` (W3C) for a response that waited for a cold start: the wait, and the start's
/// backend and readiness phases, in milliseconds.
pub(crate) fn server_timing(
    wait: std::time::Duration,
    start: Option<crate::StartTimings>,
) -> HeaderValue {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let mut v = format!(
        "vmproxy-wait;dur={:.1};desc=\"waited for the machine\"",
        ms(wait)
    );
    if let Some(t) = start {
        v.push_str(&format!(
            ", vmproxy-backend;dur={:.1};desc=\"platform start\", vmproxy-readiness;dur={:.1};desc=\"readiness probe\"",
            ms(t.backend),
            ms(t.readiness)
        ));
    }
    HeaderValue::from_str(&v).expect("digits and ASCII")
}

/// How a request's body is framed, checked before it goes anywhere (RFC 9112 §6). A request with
/// both `Transfer-Encoding` and `Content-Length` is how requests are smuggled past a proxy that
/// reads one and a backend that reads the other: refused, as nginx does. A transfer coding other
/// than `chunked` cannot be passed on decoded: 501 (RFC 9112 §6.1).
pub(crate) fn check_framing(headers: &HeaderMap) -> Result<(), Framing> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Framing::Ambiguous);
    }
    let mut codings = list_items(headers, &header::TRANSFER_ENCODING);
    match (codings.next(), codings.next()) {
        (Some(c), None) if c.eq_ignore_ascii_case("chunked") => Ok(()),
        _ => Err(Framing::UnknownCoding),
    }
}

/// Why a request's body framing is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Ambiguous,
    UnknownCoding,
}

/// What the proxy knows of the request as it arrived.
pub(crate) struct Arrival<'a> {
    pub(crate) client: Option<SocketAddr>,
    /// The connection was TLS: said by whoever accepted it, never by the request.
    pub(crate) tls: bool,
    pub(crate) version: Version,
    /// The authority of an absolute-form target (HTTP/1.1) or `:authority` (HTTP/2).
    pub(crate) authority: Option<&'a str>,
    /// Keep X-Forwarded-Proto/Host set by a trusted front.
    pub(crate) trust_forwarded: bool,
}

/// RFC 9113 §8.2.3: HTTP/2 may split `Cookie` into several fields; before they go on in
/// HTTP/1.1 they MUST be one, joined with `"; "` (many servers read only the first).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(mut value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        value.set_sensitive(
            headers
                .get(header::COOKIE)
                .is_some_and(HeaderValue::is_sensitive),
        );
        headers.insert(header::COOKIE, value);
    }
}

fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 vmproxy",
        Version::HTTP_10 => "1.0 vmproxy",
        Version::HTTP_2 => "2 vmproxy",
        Version::HTTP_3 => "3 vmproxy",
        _ => "1.1 vmproxy",
    })
}

/// Rewrites a request's headers for the backend.
pub(crate) fn for_backend(
    headers: &mut HeaderMap,
    arrival: &Arrival<'_>,
    upgrade: Option<HeaderValue>,
) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.trim()
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    // Room for what is added below (Host, X-Forwarded-*, Forwarded, Via), so the map grows once.
    headers.reserve(6);
    remove_hop_by_hop(headers);
    if trailers {
        // The one TE value that is end-to-end in effect: the client accepts trailers.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
    remove_forged_forwarding(headers, arrival.trust_forwarded);
    if arrival.version == Version::HTTP_2 {
        join_cookies(headers);
    }

    // The target's authority is the Host: for an absolute-form target (RFC 9112 §3.2.2) and
    // for HTTP/2's :authority (RFC 9113 §8.3.1); HTTP/1.1 backends need Host.
    if let Some(value) = arrival
        .authority
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::HOST, value);
    }
    let keep = |h: &HeaderMap, name: &HeaderName| arrival.trust_forwarded && h.contains_key(name);
    if !keep(headers, &X_FORWARDED_HOST) {
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
    let proto = if arrival.tls { "https" } else { "http" };
    if !keep(headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    append_forwarded(headers, arrival.client, proto, arrival.trust_forwarded);
    if let Some(client) = arrival.client {
        append_forwarded_for(headers, client);
    }
    append(headers, header::VIA, via_value(arrival.version));
}

/// Drops what a client may have written of [`FORWARDING_FAMILY`]: the underscore spellings
/// always, the rest unless a trusted front wrote them. `X-Forwarded-For` too: many backends
/// take its first entry for the client, which a client could otherwise write.
fn remove_forged_forwarding(headers: &mut HeaderMap, trusted: bool) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let n = n.as_str();
            is_forwarding_field(n) && (n.contains('_') || !trusted)
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// Appends this hop's element to `Forwarded` (RFC 7239 §4): the client, the `Host` it asked
/// for and the protocol of its connection.
fn append_forwarded(
    headers: &mut HeaderMap,
    client: Option<SocketAddr>,
    proto: &str,
    trusted: bool,
) {
    use std::fmt::Write;
    let mut element = String::with_capacity(96);
    if let Some(client) = client {
        let _ = match client.ip().to_canonical() {
            std::net::IpAddr::V4(ip) => write!(element, "for={ip};"),
            // An IPv6 address has colons, so it is a quoted string (RFC 7239 §6).
            std::net::IpAddr::V6(ip) => write!(element, "for=\"[{ip}]\";"),
        };
    }
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        if !host.is_empty() {
            element.push_str("host=");
            push_forwarded_value(&mut element, host);
            element.push(';');
        }
    }
    element.push_str("proto=");
    element.push_str(proto);
    // From the String itself: no copy.
    if let Ok(value) = HeaderValue::try_from(element) {
        if trusted {
            append(headers, FORWARDED, value);
        } else {
            // Untrusted, the client's elements were dropped: frameworks that read the first
            // element must find the proxy's.
            headers.insert(FORWARDED, value);
        }
    }
}

/// Appends a `Forwarded` parameter value: a token as it is, anything else as a quoted string.
fn push_forwarded_value(out: &mut String, v: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if v.chars().all(tchar) {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Rewrites a response's headers for the client.
pub(crate) fn for_client(headers: &mut HeaderMap, upgraded: Option<HeaderValue>) {
    remove_hop_by_hop(headers);
    if let Some(upgrade) = upgraded {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
    append(headers, header::VIA, via_value(Version::HTTP_11));
}

/// Appends the client's address to the chain and writes the whole chain back as one field.
fn append_forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    use std::fmt::Write;
    let ip = client.ip().to_canonical();
    let mut chain = String::with_capacity(48);
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(v) = v.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                chain.push_str(v);
                chain.push_str(", ");
            }
        }
    }
    let _ = write!(chain, "{ip}");
    if let Ok(value) = HeaderValue::try_from(chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// Appends `value` to a comma-separated list field, keeping it one line.
fn append(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    let existing: Vec<&[u8]> = headers
        .get_all(&name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if existing.is_empty() {
        headers.insert(name, value);
        return;
    }
    let mut joined = existing.join(&b", "[..]);
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(value.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival() -> Arrival<'static> {
        Arrival {
            client: Some(([10, 1, 2, 3], 5555).into()),
            tls: false,
            version: Version::HTTP_11,
            authority: None,
            trust_forwarded: false,
        }
    }

    #[test]
    fn removes_every_connection_named_field() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-one"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("X-Two"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("x-three", HeaderValue::from_static("3"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        for_backend(&mut h, &arrival(), None);
        for gone in [
            "connection",
            "x-one",
            "x-two",
            "keep-alive",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h["x-three"], "3");
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers;q=1"));
        for_backend(&mut h, &arrival(), None);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn forwarded_for_is_appended_and_written_back() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        let untrusted = h.clone();
        // Behind a trusted front: appended to, one field.
        let trusted = Arrival {
            trust_forwarded: true,
            ..arrival()
        };
        for_backend(&mut h, &trusted, None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3");
        // Otherwise what the client wrote is dropped: the client's address alone.
        let mut h = untrusted;
        for_backend(&mut h, &arrival(), None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(h[header::HOST], "example.com");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[header::VIA], "1.1 vmproxy");
    }

    #[test]
    fn mapped_ipv4_is_written_as_ipv4() {
        let mut h = HeaderMap::new();
        let client: SocketAddr = "[::ffff:192.0.2.7]:80".parse().unwrap();
        for_backend(
            &mut h,
            &Arrival {
                client: Some(client),
                ..arrival()
            },
            None,
        );
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.7");
    }

    #[test]
    fn host_from_authority_for_http2() {
        let mut h = HeaderMap::new();
        for_backend(
            &mut h,
            &Arrival {
                authority: Some("example.com:8443"),
                version: Version::HTTP_2,
                ..arrival()
            },
            None,
        );
        assert_eq!(h[header::HOST], "example.com:8443");
        assert_eq!(h[header::VIA], "2 vmproxy");
    }

    #[test]
    fn http2_cookie_fields_go_on_as_one() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let h2 = Arrival {
            version: Version::HTTP_2,
            ..arrival()
        };
        let mut one = h.clone();
        for_backend(&mut one, &h2, None);
        assert_eq!(one.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(one[header::COOKIE], "a=1; b=2");
        // HTTP/1.1 sends one Cookie field (RFC 6265 §5.4): what came is passed on as it came.
        for_backend(&mut h, &arrival(), None);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 2);
    }

    #[test]
    fn connection_cannot_remove_what_the_proxy_adds() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-forwarded-for, via"),
        );
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("9.9.9.9"));
        for_backend(&mut h, &arrival(), None);
        // The named field goes (it was the client's to drop), but the proxy's own entry stays.
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(h[header::VIA], "1.1 vmproxy");
    }

    #[test]
    fn upgrade_is_kept_only_when_performed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let up = allowed_upgrade(&h, &["websocket".into()]);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        for_backend(&mut h, &arrival(), up);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_proto_and_host_are_overwritten_unless_trusted() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("proxy.internal"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(
            &X_FORWARDED_HOST,
            HeaderValue::from_static("spoofed.example"),
        );
        let mut untrusted = h.clone();
        for_backend(&mut untrusted, &arrival(), None);
        assert_eq!(untrusted[&X_FORWARDED_PROTO], "http");
        assert_eq!(untrusted[&X_FORWARDED_HOST], "proxy.internal");
        for_backend(
            &mut h,
            &Arrival {
                trust_forwarded: true,
                ..arrival()
            },
            None,
        );
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "spoofed.example");
    }

    #[test]
    fn framing_is_one_way_or_refused() {
        let mut h = HeaderMap::new();
        assert_eq!(check_framing(&h), Ok(()));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("Chunked"),
        );
        assert_eq!(check_framing(&h), Ok(()));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(check_framing(&h), Err(Framing::Ambiguous));
        h.remove(header::CONTENT_LENGTH);
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert_eq!(check_framing(&h), Err(Framing::UnknownCoding));
    }

    #[test]
    fn via_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_static("1.1 front"));
        for_client(&mut h, None);
        assert_eq!(h[header::VIA], "1.1 front, 1.1 vmproxy");
    }
}
