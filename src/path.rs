//! Which requests a route owns: path normalization and per-segment prefix matching.
//!
//! The path is normalized the way RFC 3986 §6.2.2 says URIs compare: percent-encoded
//! unreserved characters are decoded (`%61pp` is `app`), and dot segments — `.` and `..`, also
//! as `%2e` — are removed. Matching and forwarding both use the normalized path, so a dot
//! segment can neither take a request out of its prefix (`/app/../admin` is `/admin`, not
//! ours) nor sneak one in past it (`/x/../app/y` is ours, forwarded as `/app/y`).
//!
//! Decoding happens once, here (RFC 3986 §2.4); what is forwarded must mean the same to a
//! backend that decodes it again. So a path that reads differently in different hands is refused
//! with 400 wherever some reading of it would touch a route: a `%` that does not start a valid
//! triplet (`%` and two hex digits, §2.1: `%%32%65` would become `%2e`), a double-encoded
//! triplet (`%252e`), an encoded slash or backslash (`%2F`, `%5C`, `\`: backends disagree on
//! whether it separates segments), an encoded NUL (`%00`: a backend may cut the path there),
//! overlong UTF-8 (`%C0%AE`: old decoders read `.`), and a dot segment with `;` parameters
//! (`..;x`: Java servers read `..`).

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::Uri;

/// How a request relates to one route.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Match {
    /// Not this route's.
    No,
    /// This route's: forward with this path and query.
    Proxy(PathAndQuery),
    /// Would be this route's under some decoding; refused.
    Bad(&'static str),
}

/// Checks a configured prefix and returns it in canonical form (no trailing slash but for `/`).
pub(crate) fn canonical_prefix(prefix: &str) -> Result<String, &'static str> {
    if !prefix.starts_with('/') {
        return Err("must start with '/'");
    }
    if prefix.contains(['?', '#', '%', '\\']) {
        return Err("must be a plain path: no '?', '#', '%' or '\\'");
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("must not contain '.' or '..' segments");
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// Whether `path` is `prefix` or below it, per segment.
pub(crate) fn under(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Matches a request URI against a route's prefixes.
pub(crate) fn match_route(prefixes: &[String], strip_prefix: bool, uri: &Uri) -> Match {
    let raw = uri.path();
    let path = normalize(raw);
    let owner = prefixes.iter().find(|p| under(p, &path));
    if let Some(reason) = ambiguity(raw, &path) {
        if owner.is_some() || some_reading_under(prefixes, raw) {
            return Match::Bad(reason);
        }
        // Far from every route: not ours to judge.
        return Match::No;
    }
    let Some(prefix) = owner else {
        return Match::No;
    };
    let unchanged = matches!(path, Cow::Borrowed(_)) && !(strip_prefix && prefix != "/");
    if unchanged {
        // The common case: forward the request's own path and query, shared, not copied.
        if let Some(pq) = uri.path_and_query() {
            return Match::Proxy(pq.clone());
        }
    }
    let forwarded: Cow<'_, str> = if strip_prefix && prefix != "/" {
        // `/app//x` is forwarded as `/x`: a path starting `//` reads as an authority to some.
        let rest = path[prefix.len()..].trim_start_matches('/');
        Cow::Owned(format!("/{rest}"))
    } else {
        path
    };
    let target = match uri.query() {
        Some(q) => format!("{forwarded}?{q}"),
        None => forwarded.into_owned(),
    };
    match PathAndQuery::try_from(target) {
        Ok(pq) => Match::Proxy(pq),
        Err(_) => Match::Bad("the path cannot be forwarded"),
    }
}

/// Why `raw` may mean one path to us and another to a backend, if it may; `normalized` is
/// `normalize(raw)`.
fn ambiguity(raw: &str, normalized: &str) -> Option<&'static str> {
    if !raw.is_ascii() {
        // RFC 9112 §3.2 and RFC 3986 allow none: a backend that maps Unicode to ASCII (NFKC,
        // "best fit") would read the full-width "．．／" as "../".
        return Some("bytes outside ASCII in the path (percent-encode them)");
    }
    if !raw.contains(['%', '\\', ';']) {
        return None;
    }
    if has_encoded_separator(raw) {
        return Some("encoded '/' or '\\' in the path");
    }
    let b = raw.as_bytes();
    for i in (0..b.len()).filter(|&i| b[i] == b'%') {
        let Some(byte) = triplet(b, i) else {
            return Some("'%' that does not start a valid escape in the path");
        };
        let next = triplet(b, i + 3).unwrap_or(0);
        match (byte, next) {
            (0, _) => return Some("encoded NUL in the path"),
            (0xC0 | 0xC1, _) | (0xE0, 0x80..=0x9F) | (0xF0, 0x80..=0x8F) => {
                return Some("overlong UTF-8 in the path")
            }
            _ => {}
        }
    }
    // `%25` then two hex digits: decoded once more, that is another escape.
    let n = normalized.as_bytes();
    let hex_at = |i: usize| n.get(i).copied().and_then(hex).is_some();
    if (0..n.len()).any(|i| n[i..].starts_with(b"%25") && hex_at(i + 3) && hex_at(i + 4)) {
        return Some("double-encoded '%' in the path");
    }
    let params = raw.contains(';')
        || b.windows(3)
            .any(|w| w[..2] == *b"%3" && w[2].eq_ignore_ascii_case(&b'b'));
    if params
        && raw.split('/').any(|seg| {
            decode_all(seg)
                .split_once(';')
                .is_some_and(|(name, _)| name == "." || name == "..")
        })
    {
        return Some("dot segment with ';' parameters in the path");
    }
    None
}

fn has_encoded_separator(path: &str) -> bool {
    if path.contains('\\') {
        return true;
    }
    let b = path.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
                || (w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c')))
    })
}

/// Whether a naive reading of `raw` falls under one of `prefixes`: a stray `%` kept or dropped,
/// every escape decoded, again and again as a chain of decoders would, `\` taken as `/`,
/// `;parameters` kept or cut before or after decoding, empty segments kept or dropped, dot
/// segments removed.
fn some_reading_under(prefixes: &[String], raw: &str) -> bool {
    let touches = |p: &str| prefixes.iter().any(|prefix| under(prefix, p));
    let b = raw.as_bytes();
    let no_strays: Vec<u8> = (0..b.len())
        .filter(|&i| b[i] != b'%' || triplet(b, i).is_some())
        .map(|i| b[i])
        .collect();
    let no_strays = String::from_utf8_lossy(&no_strays);
    let starts = [raw, &no_strays].map(|s| [s.to_owned(), cut_params(s)]);
    starts.iter().flatten().any(|start| {
        [(false, false), (false, true), (true, false), (true, true)]
            .into_iter()
            .any(|(cut, collapse)| reading_under(&touches, start, cut, collapse))
    })
}

/// One naive reading of `start`, decoded until it settles; see `some_reading_under`.
fn reading_under(touches: &impl Fn(&str) -> bool, start: &str, cut: bool, collapse: bool) -> bool {
    const PASSES: usize = 8;
    if touches(start) {
        return true;
    }
    let mut p = start.to_owned();
    for _ in 0..PASSES {
        let mut next = decode_all(&p).replace('\\', "/");
        if cut {
            next = cut_params(&next);
        }
        if collapse {
            next = next
                .split('/')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("/");
        }
        let next = remove_dot_segments(&next);
        if touches(&next) {
            return true;
        }
        if next == p {
            return false;
        }
        p = next;
    }
    // Nested deeper than any reasonable chain of decoders: assume the worst.
    true
}

/// `path` with each segment's `;parameters` cut off, as Java servers read it.
fn cut_params(path: &str) -> String {
    path.split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
}

/// Every valid escape decoded, as a naive backend does; invalid UTF-8 becomes U+FFFD.
fn decode_all(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(byte) = triplet(b, i) {
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte `b[i..]` encodes, if it starts with a valid triplet.
fn triplet(b: &[u8], i: usize) -> Option<u8> {
    match b.get(i..i + 3)? {
        [b'%', h, l] => Some(hex(*h)? << 4 | hex(*l)?),
        _ => None,
    }
}

/// RFC 3986 normalization of a path: unreserved characters decoded, dot segments removed, one
/// leading slash. Borrows when there is nothing to do, which is the common case.
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    let needs_decoding = path.contains('%');
    let has_dots = path.split('/').any(|s| s == "." || s == "..");
    if !needs_decoding && !has_dots && path.starts_with('/') && !path.starts_with("//") {
        return Cow::Borrowed(path);
    }
    let decoded: Cow<'_, str> = if needs_decoding {
        Cow::Owned(decode_unreserved(path))
    } else {
        Cow::Borrowed(path)
    };
    Cow::Owned(remove_dot_segments(&decoded))
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    // Bytes, not chars: a path may hold raw UTF-8, which must pass through whole.
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match triplet(b, i) {
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(c);
                i += 3;
            }
            Some(_) => {
                // Kept encoded, in the canonical upper-case form.
                out.extend_from_slice(&b[i..i + 3].to_ascii_uppercase());
                i += 3;
            }
            None => {
                // A `%` that starts no escape stands for itself: encoded, so that it cannot
                // join what follows into a new escape (`%%32%65` is `%252e`, never `%2e`).
                out.extend_from_slice(b"%25");
                i += 1;
            }
        }
    }
    // Only ASCII was replaced, by ASCII: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §5.2.4, on an absolute path; `..` above the root stays at the root.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    // One leading slash, even when dots left empty segments first (`/..//x` is `/x`).
    let first = out.iter().position(|s| !s.is_empty()).unwrap_or(out.len());
    let mut s = String::with_capacity(path.len() + 1);
    for seg in &out[first..] {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(prefix: &str, strip: bool, uri: &str) -> Match {
        match_route(
            &[canonical_prefix(prefix).unwrap()],
            strip,
            &uri.parse().unwrap(),
        )
    }

    fn proxied(s: &str) -> Match {
        Match::Proxy(s.parse().unwrap())
    }

    #[test]
    fn per_segment() {
        assert_eq!(m("/app", false, "/app"), proxied("/app"));
        assert_eq!(m("/app", false, "/app/"), proxied("/app/"));
        assert_eq!(m("/app", false, "/app/x?y=1"), proxied("/app/x?y=1"));
        assert_eq!(m("/app", false, "/apple"), Match::No);
        assert_eq!(m("/app/", false, "/app/x"), proxied("/app/x"));
        assert_eq!(m("/", false, "/anything"), proxied("/anything"));
        assert_eq!(m("/app", false, "/"), Match::No);
    }

    #[test]
    fn strip() {
        assert_eq!(m("/app", true, "/app/x?q"), proxied("/x?q"));
        assert_eq!(m("/app", true, "/app"), proxied("/"));
        assert_eq!(m("/app", true, "/app?q=1"), proxied("/?q=1"));
        assert_eq!(m("/", true, "/x"), proxied("/x"));
    }

    #[test]
    fn dot_segments_cannot_escape_or_skip() {
        assert_eq!(m("/app", false, "/app/../admin"), Match::No);
        assert_eq!(m("/app", false, "/app/%2e%2e/admin"), Match::No);
        assert_eq!(m("/app", false, "/app/%2E%2e/admin"), Match::No);
        assert_eq!(m("/app", false, "/app/.%2e/admin"), Match::No);
        assert_eq!(m("/app", false, "/app/x/../../admin"), Match::No);
        assert_eq!(m("/app", false, "/app/x/../y"), proxied("/app/y"));
        assert_eq!(m("/app", false, "/admin/../app/x"), proxied("/app/x"));
        assert_eq!(m("/app", false, "/admin/%2e%2e/app/x"), proxied("/app/x"));
        assert_eq!(m("/app", false, "/./app/./x"), proxied("/app/x"));
        assert_eq!(m("/app", false, "/../../app"), proxied("/app"));
        assert_eq!(m("/app", true, "/app/x/../../../etc"), Match::No);
        assert_eq!(m("/app", false, "/app/.."), Match::No);
        assert_eq!(m("/app", false, "/app/x/.."), proxied("/app/"));
    }

    #[test]
    fn unreserved_encodings_are_the_same_path() {
        assert_eq!(m("/app", false, "/%61pp/x"), proxied("/app/x"));
        assert_eq!(m("/app", false, "/app/a%20b"), proxied("/app/a%20b"));
        assert_eq!(m("/app", false, "/app/%7euser"), proxied("/app/~user"));
        assert_eq!(
            m("/app", false, "/app/%e2%82%ac"),
            proxied("/app/%E2%82%AC")
        );
        // Raw UTF-8, which `http` accepts, is no request target (RFC 9112 §3.2): refused.
        assert!(matches!(m("/app", false, "/app/€%41"), Match::Bad(_)));
    }

    #[test]
    fn encoded_separators_are_refused_near_a_route() {
        assert!(matches!(
            m("/app", false, "/app/x%2F..%2F..%2Fadmin"),
            Match::Bad(_)
        ));
        assert!(matches!(m("/app", false, "/app%2fx"), Match::Bad(_)));
        assert!(matches!(m("/app", false, "/x%2F..%2Fapp/y"), Match::Bad(_)));
        assert!(matches!(m("/app", false, "/app/a%5Cb"), Match::Bad(_)));
        assert!(matches!(m("/app", false, "/app\\x"), Match::Bad(_)));
        // Far from any route: not ours to judge.
        assert_eq!(m("/app", false, "/other%2Fthing"), Match::No);
    }

    #[test]
    fn a_percent_that_starts_no_escape_is_refused_near_a_route() {
        for uri in [
            // Decoded once, these would forward `/app/%2e%2e/admin/x` and `/app/x/../..`.
            "/app/%%32%65%%32%65/admin/x",
            "/app/x%2%66..%2%66..",
            "/app/%",
            "/app/%2",
            "/app/%zz",
            "/app/%%",
            "/app%",
            "/x/%zz/../../app/y",
            "/%%36%31pp/x",
            // `/app/%%` to a backend that merges `//` before removing dot segments.
            "/x//../app/%%",
        ] {
            assert!(matches!(m("/app", false, uri), Match::Bad(_)), "{uri}");
            assert!(matches!(m("/app", true, uri), Match::Bad(_)), "{uri}");
        }
        assert_eq!(m("/app", false, "/other/%zz"), Match::No);
        assert!(matches!(m("/", false, "/other/%zz"), Match::Bad(_)));
        // Normalizing it alone keeps it a literal '%', never part of a new escape.
        assert_eq!(normalize("/a/%%32%65"), "/a/%252e");
        assert_eq!(normalize("/a/%252e"), "/a/%252e");
    }

    #[test]
    fn double_decodings_are_refused_near_a_route() {
        for uri in [
            "/app/%252e%252e/admin",
            "/app/%25%32%65",
            "/app/%00",
            "/app/x%00/../../admin",
            "/app/%c0%ae%c0%ae/admin",
            "/app/%e0%80%ae",
        ] {
            assert!(matches!(m("/app", false, uri), Match::Bad(_)), "{uri}");
        }
        assert_eq!(m("/app", false, "/other/%00"), Match::No);
        // A literal '%' that no second decoding can read as an escape is fine.
        assert_eq!(m("/app", false, "/app/100%25"), proxied("/app/100%25"));
        assert_eq!(m("/app", false, "/app/%25zz"), proxied("/app/%25zz"));
        assert_eq!(m("/app", false, "/app/%3f"), proxied("/app/%3F"));
        assert_eq!(m("/app", false, "/app/%C3%A9"), proxied("/app/%C3%A9"));
    }

    #[test]
    fn dot_segments_with_parameters_are_refused_near_a_route() {
        // Tomcat and Spring read `..;x` as `..`.
        for uri in [
            "/app/..;/admin",
            "/app/..;jsessionid=1/admin",
            "/app/.;/x",
            "/app/%2e%2e;/admin",
            "/app/..%3B/admin",
            "/x/..;/app/y",
        ] {
            assert!(matches!(m("/app", false, uri), Match::Bad(_)), "{uri}");
        }
        assert_eq!(m("/app", false, "/other/..;/x"), Match::No);
        assert_eq!(m("/app", false, "/app/x;v=1/y"), proxied("/app/x;v=1/y"));
        assert_eq!(m("/app", false, "/app/...;x"), proxied("/app/...;x"));
    }

    #[test]
    fn encoded_and_real_dots_mix() {
        assert_eq!(m("/app", false, "/app/%2e./admin"), Match::No);
        assert_eq!(m("/app", false, "/app/.%2E/admin"), Match::No);
        assert_eq!(m("/app", false, "/x/.%2e/app/y"), proxied("/app/y"));
        assert_eq!(m("/app", false, "/app/%2e/x"), proxied("/app/x"));
    }

    #[test]
    fn raw_bytes_outside_ascii_are_refused_near_a_route() {
        let uri: Uri = "/app/x".parse().unwrap();
        let raw = http::uri::Builder::new()
            .path_and_query(
                http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from_static(
                    "/app/\u{ff0e}\u{ff0e}\u{ff0f}admin".as_bytes(),
                ))
                .unwrap(),
            )
            .build()
            .unwrap();
        assert!(matches!(
            match_route(&["/app".into()], false, &uri),
            Match::Proxy(_)
        ));
        assert!(matches!(
            match_route(&["/app".into()], false, &raw),
            Match::Bad(_)
        ));
        // Percent-encoded, the same characters are a plain path for the machine to read.
        let encoded: Uri = "/app/%EF%BC%8E%EF%BC%8E%EF%BC%8Fadmin".parse().unwrap();
        assert!(matches!(
            match_route(&["/app".into()], false, &encoded),
            Match::Proxy(_)
        ));
    }

    #[test]
    fn one_leading_slash() {
        assert_eq!(m("/app", false, "//app/x"), proxied("/app/x"));
        assert_eq!(m("/app", false, "/..//app/x"), proxied("/app/x"));
        assert_eq!(m("/app", true, "/app//x"), proxied("/x"));
        assert_eq!(normalize("/.//"), "/");
        assert_eq!(m("/app", false, "/app//x"), proxied("/app//x"));
    }

    #[test]
    fn prefixes_are_checked() {
        assert_eq!(canonical_prefix("/app/").unwrap(), "/app");
        assert_eq!(canonical_prefix("/").unwrap(), "/");
        assert!(canonical_prefix("app").is_err());
        assert!(canonical_prefix("/a/../b").is_err());
        assert!(canonical_prefix("/a%2f").is_err());
        assert!(canonical_prefix("/a?b").is_err());
    }

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(normalize("/app/x/y"), Cow::Borrowed(_)));
        assert!(matches!(normalize("/app/x.y/.hidden"), Cow::Borrowed(_)));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// What a naive backend does to a path it is given: every valid `%XX` decoded, once.
    fn decode_once(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The file a naive backend serves for `path`: decoded once, `\` taken as `/`, empty and
    /// `.` segments dropped, `..` popped; with `tomcat`, `;parameters` cut off each segment too.
    fn served(path: &str, tomcat: bool) -> String {
        let decoded = decode_once(path).replace('\\', "/");
        let mut out: Vec<&str> = Vec::new();
        for seg in decoded.split('/') {
            let seg = if tomcat {
                seg.split(';').next().unwrap()
            } else {
                seg
            };
            match seg {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        format!("/{}", out.join("/"))
    }

    /// Every `%` starts an upper-case triplet of a byte that must stay encoded.
    fn canonical(path: &str) -> bool {
        let b = path.as_bytes();
        (0..b.len()).filter(|&i| b[i] == b'%').all(|i| {
            triplet(b, i).is_some_and(|c| {
                !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'))
            }) && !b[i + 1..i + 3].iter().any(u8::is_ascii_lowercase)
        })
    }

    /// Request paths made of what escapes are made of.
    fn request_path() -> impl Strategy<Value = String> {
        let start = prop_oneof![
            1 => Just(""),
            1 => Just("/"),
            1 => Just("/app"),
            3 => Just("/app/"),
            1 => Just("/x/../app/"),
        ];
        // Weighted towards `%` and what can follow it, so escapes get built often.
        #[rustfmt::skip]
        const PIECES: &[(usize, &str)] = &[
            (8, "%"), (4, "2"), (3, "e"), (1, "E"), (1, "5"), (1, "f"), (1, "F"), (1, "c"),
            (1, "C"), (1, "3"), (1, "b"), (1, "0"), (1, "6"), (5, "."), (4, "/"), (1, "\\"),
            (2, ";"), (1, "a"), (1, "p"), (1, "x"), (2, "%2e"), (1, "%2E"), (2, "%25"),
            (2, "%32"), (2, "%65"), (1, "%2f"), (1, "%5C"), (1, "%3b"), (1, "%00"), (2, ".."),
            (1, "/app"), (1, "%61"),
        ];
        let pool: Vec<&str> = PIECES
            .iter()
            .flat_map(|&(w, s)| std::iter::repeat_n(s, w))
            .collect();
        let piece = prop::sample::select(pool);
        // Short segments, so that one is often exactly a dot segment once decoded.
        let segment = prop::collection::vec(piece, 0..6).prop_map(|p| p.concat());
        (start, prop::collection::vec(segment, 0..4)).prop_map(|(start, segments)| {
            let p = format!("{start}{}", segments.join("/"));
            if p.starts_with('/') {
                p
            } else {
                format!("/{p}")
            }
        })
    }

    fn app() -> Vec<String> {
        vec!["/app".to_owned()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn normalize_is_idempotent_and_canonical(p in request_path()) {
            let once = normalize(&p).into_owned();
            prop_assert_eq!(normalize(&once), once.as_str());
            prop_assert!(canonical(&once), "{:?} normalized to {:?}", p, once);
        }

        #[test]
        fn forwarded_paths_stay_under_the_route(p in request_path(), strip in any::<bool>()) {
            let Ok(uri) = p.parse::<Uri>() else { return Ok(()) };
            let Match::Proxy(pq) = match_route(&app(), strip, &uri) else { return Ok(()) };
            let fwd = pq.path();
            // Decoding what we forward once more changes nothing a second time.
            prop_assert!(canonical(fwd), "{:?} forwarded as {:?}", p, fwd);
            let once = decode_once(fwd);
            prop_assert_eq!(decode_once(&once), once.clone(), "{:?} forwarded as {:?}", p, fwd);
            // However the backend reads it, it stays under the route.
            let joined = if strip { format!("/app{fwd}") } else { fwd.to_owned() };
            for tomcat in [false, true] {
                let seen = served(&joined, tomcat);
                prop_assert!(under("/app", &seen), "{:?} forwarded as {:?}, served as {:?}", p, fwd, seen);
            }
            // What we forward is a fixed point: a proxy in front of the backend would not change it.
            let again = match_route(&["/".to_owned()], false, &fwd.parse().unwrap());
            prop_assert_eq!(again, Match::Proxy(pq.clone()), "{:?} forwarded as {:?}", p, fwd);
        }

        #[test]
        fn a_stray_percent_near_the_route_is_refused(p in request_path(), strip in any::<bool>()) {
            let b = p.as_bytes();
            let stray = (0..b.len()).any(|i| b[i] == b'%' && triplet(b, i).is_none());
            let Ok(uri) = p.parse::<Uri>() else { return Ok(()) };
            if !stray {
                return Ok(());
            }
            let got = match_route(&app(), strip, &uri);
            prop_assert!(!matches!(got, Match::Proxy(_)), "{:?} proxied: {:?}", p, got);
            if got == Match::No {
                // Not ours only if no naive reading, decoding once or twice, makes it ours.
                for tomcat in [false, true] {
                    for read in [served(&p, tomcat), served(&decode_once(&p), tomcat)] {
                        prop_assert!(!under("/app", &read), "{:?} passed on, read as {:?}", p, read);
                    }
                }
            }
        }

        #[test]
        fn matching_is_idempotent(p in request_path()) {
            let Ok(uri) = p.parse::<Uri>() else { return Ok(()) };
            let Match::Proxy(pq) = match_route(&app(), false, &uri) else { return Ok(()) };
            let again = match_route(&app(), false, &pq.as_str().parse().unwrap());
            prop_assert_eq!(again, Match::Proxy(pq.clone()), "{:?} forwarded as {:?}", p, pq);
        }
    }
}
