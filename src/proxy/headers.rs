//! Header rewriting at the proxy hop (RFC 9110 §7.6): hop-by-hop fields out, `Via` and
//! `X-Forwarded-*` in.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// `Proxy-*` credentials that are meant for this hop).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
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

/// Whether the client asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    connection_tokens(headers)
        .any(|t| t.eq_ignore_ascii_case("upgrade"))
        .then(|| upgrade.clone())
}

/// Every token of every `Connection` field: one field may be split over several lines, and a
/// proxy that reads only the first lets the others through (golang#46313).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop fields and every field named by `Connection`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What the proxy knows of the request as it arrived.
pub(crate) struct Arrival<'a> {
    pub(crate) client: Option<SocketAddr>,
    pub(crate) https: bool,
    pub(crate) version: Version,
    pub(crate) authority: Option<&'a str>,
    /// Keep X-Forwarded-Proto/Host set by a trusted front.
    pub(crate) trust_forwarded: bool,
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
    remove_hop_by_hop(headers);
    if trailers {
        // The one TE value that is end-to-end in effect: the client accepts trailers.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }

    // HTTP/2 clients send :authority instead of Host; HTTP/1.1 backends need Host.
    if !headers.contains_key(header::HOST) {
        if let Some(value) = arrival
            .authority
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            headers.insert(header::HOST, value);
        }
    }
    let keep = |h: &HeaderMap, name: &HeaderName| arrival.trust_forwarded && h.contains_key(name);
    if !keep(headers, &X_FORWARDED_HOST) {
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
    if !keep(headers, &X_FORWARDED_PROTO) {
        let proto = if arrival.https { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if let Some(client) = arrival.client {
        append_forwarded_for(headers, client);
    }
    append(headers, header::VIA, via_value(arrival.version));
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
    let ip = client.ip().to_canonical();
    let mut chain = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(v) = v.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                chain.push_str(v);
                chain.push_str(", ");
            }
        }
    }
    chain.push_str(&ip.to_string());
    if let Ok(value) = HeaderValue::from_str(&chain) {
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
            https: false,
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
        for_backend(&mut h, &arrival(), None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3");
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
        let up = wants_upgrade(&h);
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
    fn via_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_static("1.1 front"));
        for_client(&mut h, None);
        assert_eq!(h[header::VIA], "1.1 front, 1.1 vmproxy");
    }
}
