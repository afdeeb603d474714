//! Whether a request's `Accept` prefers HTML (RFC 9110 §12.5.1): who is shown the waiting page.

use http::header::ACCEPT;
use http::HeaderMap;

/// One media range of `Accept`.
#[derive(Clone, Copy, Debug)]
struct Range {
    /// `*/*` 0, `type/*` 1, `type/subtype` 2.
    specificity: u8,
    /// The weight in thousandths (`q=0.8` is 800).
    q: u16,
    /// The range covers `text/html`.
    covers_html: bool,
    /// Its place in the header, the last tie-break.
    index: usize,
}

/// True when `text/html` is what the client wants most: it is named by `text/html` or
/// `text/*` (a bare `*/*` says nothing about a preference), with a weight above zero, and no
/// other media range has a higher weight, or an equal one with a more specific range, or an
/// equal one as specific but listed first.
///
/// Browsers navigating send `text/html,application/xhtml+xml,...;q=0.9,*/*;q=0.8`: yes.
/// curl's `*/*`, an API client's `application/json`, and `text/html;q=0.1, application/json`:
/// no.
pub(crate) fn prefers_html(headers: &HeaderMap) -> bool {
    let ranges: Vec<Range> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .enumerate()
        .filter_map(|(index, item)| parse_range(item, index))
        .collect();
    // The most specific range that covers text/html decides its weight (RFC 9110 §12.5.1).
    let Some(html) = ranges
        .iter()
        .filter(|r| r.covers_html)
        .max_by_key(|r| (r.specificity, std::cmp::Reverse(r.index)))
    else {
        return false;
    };
    if html.specificity == 0 || html.q == 0 {
        return false;
    }
    ranges.iter().filter(|r| !r.covers_html).all(|other| {
        (other.q, other.specificity, std::cmp::Reverse(other.index))
            < (html.q, html.specificity, std::cmp::Reverse(html.index))
    })
}

/// The items of a comma-separated list, commas inside quoted strings kept.
fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut items = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&value[start..]);
    items.into_iter().map(str::trim).filter(|s| !s.is_empty())
}

/// A media range and its weight; `None` for one that is malformed (it is ignored).
fn parse_range(item: &str, index: usize) -> Option<Range> {
    let mut params = item.split(';');
    let media = params.next()?.trim().to_ascii_lowercase();
    let (ty, sub) = media.split_once('/')?;
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(ty) || !token(sub) {
        return None;
    }
    let specificity = match (ty, sub) {
        ("*", "*") => 0,
        ("*", _) => return None,
        (_, "*") => 1,
        _ => 2,
    };
    let mut q = 1000;
    for param in params {
        if let Some((name, value)) = param.split_once('=') {
            if name.trim().eq_ignore_ascii_case("q") {
                q = qvalue(value.trim())?;
            }
        }
    }
    let covers_html = match specificity {
        0 => true,
        1 => ty == "text",
        _ => ty == "text" && sub == "html",
    };
    Some(Range {
        specificity,
        q,
        covers_html,
        index,
    })
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn qvalue(s: &str) -> Option<u16> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac: u16 = format!("{frac:0<3}").parse().ok()?;
    match whole {
        "0" => Some(frac),
        "1" if frac == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefers(accept: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for a in accept {
            headers.append(ACCEPT, a.parse().unwrap());
        }
        prefers_html(&headers)
    }

    const CHROME: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
    const FIREFOX: &str =
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

    #[test]
    fn browsers_navigating_prefer_html() {
        assert!(prefers(&[CHROME]));
        assert!(prefers(&[FIREFOX]));
        assert!(prefers(&["text/html"]));
        assert!(prefers(&["TEXT/HTML; Q=1.000"]));
        assert!(prefers(&["text/*"]));
        assert!(prefers(&["text/html;level=1;q=0.5, */*;q=0.1"]));
        assert!(
            prefers(&["application/json;q=0.5", "text/html"]),
            "all Accept fields count"
        );
        assert!(
            prefers(&["text/html, application/json"]),
            "a tie goes to the first listed"
        );
        assert!(prefers(&["text/html, text/plain"]));
        assert!(prefers(&["application/json;q=0.9, text/html"]));
        assert!(prefers(&[
            "text/html;foo=\"a,b/c\", application/json;q=0.5"
        ]));
    }

    #[test]
    fn others_do_not() {
        assert!(!prefers(&[]));
        assert!(!prefers(&["*/*"]), "curl: no preference at all");
        assert!(!prefers(&["application/json"]));
        assert!(!prefers(&["text/html;q=0.1, application/json"]));
        assert!(
            !prefers(&["application/json, text/html"]),
            "a tie goes to the first listed"
        );
        assert!(
            !prefers(&["text/*, application/json"]),
            "json is more specific"
        );
        assert!(!prefers(&["text/html;q=0, */*"]), "html refused outright");
        assert!(
            !prefers(&["text/*;q=0.5, text/html;q=0, */*"]),
            "the most specific range decides"
        );
        assert!(!prefers(&["image/webp,*/*;q=0.8"]), "an image fetch");
        assert!(!prefers(&["text/css,*/*;q=0.1"]), "a stylesheet fetch");
        assert!(!prefers(&["text/event-stream"]));
        assert!(!prefers(&["text/html;q=0.5, application/json;q=0.501"]));
    }

    #[test]
    fn malformed_ranges_are_ignored() {
        assert!(!prefers(&["text/html;q=2"]));
        assert!(!prefers(&["text/html;q=0.0001"]));
        assert!(!prefers(&["text/html;q=abc"]));
        assert!(!prefers(&["html"]));
        assert!(!prefers(&["*/html"]));
        assert!(prefers(&["text/html, application/json;q=1.5"]));
        assert!(prefers(&[",, text/html ,"]));
        assert_eq!(qvalue("0.8"), Some(800));
        assert_eq!(qvalue("1.0"), Some(1000));
        assert_eq!(qvalue("0"), Some(0));
        assert_eq!(qvalue("1.01"), None);
        assert_eq!(qvalue(".5"), None);
        assert_eq!(qvalue("0."), Some(0));
    }
}
