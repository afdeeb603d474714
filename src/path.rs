//! Which requests a route owns: path normalization and per-segment prefix matching.
//!
//! The path is normalized the way RFC 3986 §6.2.2 says URIs compare: percent-encoded
//! unreserved characters are decoded (`%61pp` is `app`), and dot segments — `.` and `..`, also
//! as `%2e` — are removed. Matching and forwarding both use the normalized path, so a dot
//! segment can neither take a request out of its prefix (`/app/../admin` is `/admin`, not
//! ours) nor sneak one in past it (`/x/../app/y` is ours, forwarded as `/app/y`). An encoded
//! slash or backslash (`%2F`, `%5C`) is refused with 400 wherever decoding it would touch a
//! route, since backends disagree on whether it separates segments.

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
    let Some(prefix) = prefixes.iter().find(|p| under(p, &path)) else {
        if has_encoded_separator(raw) {
            let decoded = decode_separators(raw);
            let decoded = normalize(&decoded);
            if prefixes.iter().any(|p| under(p, &decoded)) {
                return Match::Bad("encoded '/' or '\\' in the path");
            }
        }
        return Match::No;
    };
    if has_encoded_separator(raw) {
        return Match::Bad("encoded '/' or '\\' in the path");
    }
    let unchanged = matches!(path, Cow::Borrowed(_)) && !(strip_prefix && prefix != "/");
    if unchanged {
        // The common case: forward the request's own path and query, shared, not copied.
        if let Some(pq) = uri.path_and_query() {
            return Match::Proxy(pq.clone());
        }
    }
    let forwarded: Cow<'_, str> = if strip_prefix && prefix != "/" {
        let rest = &path[prefix.len()..];
        if rest.is_empty() {
            Cow::Borrowed("/")
        } else {
            Cow::Owned(rest.to_owned())
        }
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

fn decode_separators(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find(['%', '\\']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix('\\') {
            out.push('/');
            rest = after;
        } else if tail.len() >= 3
            && (tail[1..3].eq_ignore_ascii_case("2f") || tail[1..3].eq_ignore_ascii_case("5c"))
        {
            out.push('/');
            rest = &tail[3..];
        } else {
            out.push('%');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// RFC 3986 normalization of a path: unreserved characters decoded, dot segments removed.
/// Borrows when there is nothing to do, which is the common case.
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    let needs_decoding = path.contains('%');
    let has_dots = path.split('/').any(|s| s == "." || s == "..");
    if !needs_decoding && !has_dots && path.starts_with('/') {
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
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h << 4 | l) as char;
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                    out.push(c);
                } else {
                    // Keep it encoded, in the canonical upper-case form.
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
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
    let mut s = String::with_capacity(path.len() + 1);
    for seg in &out {
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
