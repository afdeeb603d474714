//! `filter`, `maxResults` and `pageToken` of the list methods: the subset of Compute Engine's
//! filter language Google documents for `instances.list` / `aggregatedList`.
//!
//! - AIP-160 comparisons: `name = "vm-1"`, `labels.team = data`, `status != RUNNING`,
//!   `labels.team:*` (has the key), joined by `AND` or by juxtaposed parenthesized expressions
//!   `(a = b) (c = d)`;
//! - the regular-expression form: `name eq "vm-.*"`, `status ne RUNNING`, or several
//!   parenthesized `(name eq x) (status ne y)`; the expression must match the whole field.
//!
//! `OR` and mixing the two forms are refused (400), as Google refuses a mixed filter.

use serde_json::Value;

/// Paging and filtering asked for by a list call.
#[derive(Debug, Default)]
pub(crate) struct Page {
    filter: Vec<Cond>,
    max_results: usize,
    offset: usize,
}

#[derive(Debug)]
enum Op {
    Eq,
    Ne,
    Has,
    ReEq,
    ReNe,
}

#[derive(Debug)]
struct Cond {
    field: String,
    op: Op,
    value: String,
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Page {
    pub(crate) fn from_query(uri: &http::Uri) -> Result<Page, String> {
        let mut page = Page {
            max_results: 500,
            ..Page::default()
        };
        for kv in uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = decode(v);
            match k {
                "filter" => page.filter = parse_filter(&v)?,
                "maxResults" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| format!("Invalid value for field 'maxResults': '{v}'"))?;
                    if n > 500 {
                        return Err(format!(
                            "Invalid value for field 'maxResults': '{v}'. Must be less than or equal to 500"
                        ));
                    }
                    // 0 means the default, as on Compute Engine.
                    page.max_results = if n == 0 { 500 } else { n };
                }
                "pageToken" if !v.is_empty() => {
                    page.offset = v
                        .strip_prefix("emu-")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| format!("Invalid value for field 'pageToken': '{v}'"))?;
                }
                _ => {}
            }
        }
        Ok(page)
    }

    /// The items of this page (after the filter) and the next page's token.
    pub(crate) fn apply(&self, items: Vec<Value>) -> Result<(Vec<Value>, Option<String>), String> {
        let kept: Vec<Value> = items
            .into_iter()
            .filter(|i| self.filter.iter().all(|c| c.holds(i)))
            .collect();
        if self.offset > kept.len() {
            return Err("Invalid value for field 'pageToken'".into());
        }
        let end = (self.offset + self.max_results).min(kept.len());
        let next = (end < kept.len()).then(|| format!("emu-{end}"));
        Ok((kept[self.offset..end].to_vec(), next))
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_owned();
        }
    }
    s.to_owned()
}

/// Splits `(a) (b) AND (c)` / `a = b AND c = d` into expressions.
fn split_terms(f: &str) -> Result<Vec<String>, String> {
    let f = f.trim();
    let mut out = Vec::new();
    if f.starts_with('(') {
        let mut depth = 0;
        let mut cur = String::new();
        let mut quote: Option<char> = None;
        for c in f.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => {
                    quote = None;
                    cur.push(c)
                }
                (Some(_), c) => cur.push(c),
                (None, '"' | '\'') => {
                    quote = Some(c);
                    cur.push(c)
                }
                (None, '(') => {
                    if depth > 0 {
                        cur.push(c);
                    }
                    depth += 1;
                }
                (None, ')') => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(std::mem::take(&mut cur));
                    } else {
                        cur.push(c);
                    }
                }
                (None, c) if depth == 0 => {
                    cur.push(c);
                    let between = cur.trim();
                    if between == "AND" {
                        cur.clear();
                    } else if between == "OR" {
                        return Err("Invalid filter: OR is not supported by the emulator".into());
                    } else if !between.is_empty()
                        && !"AND".starts_with(between)
                        && !"OR".starts_with(between)
                    {
                        return Err(format!("Invalid filter expression near '{between}'"));
                    }
                }
                (None, c) => cur.push(c),
            }
        }
        if depth != 0 || quote.is_some() {
            return Err("Invalid filter: unbalanced parentheses or quotes".into());
        }
    } else {
        for part in f.split(" AND ") {
            if part.contains(" OR ") {
                return Err("Invalid filter: OR is not supported by the emulator".into());
            }
            out.push(part.to_owned());
        }
    }
    Ok(out)
}

fn parse_filter(f: &str) -> Result<Vec<Cond>, String> {
    if f.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut conds = Vec::new();
    for term in split_terms(f)? {
        conds.push(parse_cond(term.trim())?);
    }
    let regex = conds
        .iter()
        .filter(|c| matches!(c.op, Op::ReEq | Op::ReNe))
        .count();
    if regex != 0 && regex != conds.len() {
        return Err(
            "Invalid filter: regular-expression (eq/ne) and AIP-160 comparisons cannot be mixed"
                .into(),
        );
    }
    Ok(conds)
}

fn parse_cond(t: &str) -> Result<Cond, String> {
    let bad = || format!("Invalid filter expression '{t}'");
    for (sym, op) in [(" eq ", Op::ReEq), (" ne ", Op::ReNe)] {
        if let Some((f, v)) = t.split_once(sym) {
            let value = unquote(v);
            Regex::parse(&value)
                .map_err(|e| format!("Invalid regular expression '{value}': {e}"))?;
            return Ok(Cond {
                field: f.trim().to_owned(),
                op,
                value,
            });
        }
    }
    let (field, op, value) = if let Some((f, v)) = t.split_once("!=") {
        (f, Op::Ne, v)
    } else if let Some((f, v)) = t.split_once('=') {
        (f, Op::Eq, v)
    } else if let Some((f, v)) = t.split_once(':') {
        (f, Op::Has, v)
    } else {
        return Err(bad());
    };
    let field = field.trim();
    if field.is_empty() || field.contains(' ') {
        return Err(bad());
    }
    Ok(Cond {
        field: field.to_owned(),
        op,
        value: unquote(value),
    })
}

/// `labels.team` → the string at that path of the resource (numbers and booleans as text).
fn field<'a>(v: &'a Value, path: &str) -> Option<std::borrow::Cow<'a, str>> {
    let mut cur = v;
    for seg in path.split('.') {
        cur = cur.get(seg)?;
    }
    match cur {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Bool(b) => Some(std::borrow::Cow::Owned(b.to_string())),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        _ => None,
    }
}

impl Cond {
    fn holds(&self, item: &Value) -> bool {
        let got = field(item, &self.field);
        match self.op {
            Op::Eq => got.is_some_and(|g| g == self.value),
            Op::Ne => got.is_none_or(|g| g != self.value),
            Op::Has => {
                got.is_some() && (self.value == "*" || got.is_some_and(|g| g.contains(&self.value)))
            }
            Op::ReEq | Op::ReNe => {
                let re = Regex::parse(&self.value).expect("checked when parsed");
                let m = got.is_some_and(|g| re.full_match(&g));
                matches!(self.op, Op::ReEq) == m
            }
        }
    }
}

/// A small backtracking matcher for the RE2 subset filters use: literals, `.`, classes
/// `[a-z0-9-]` / `[^…]`, `\` escapes, `*` `+` `?`, groups and `|`.
#[derive(Debug)]
struct Regex(Vec<Vec<Piece>>);

#[derive(Debug, Clone)]
enum Atom {
    Char(char),
    Any,
    Class(bool, Vec<(char, char)>),
    Group(Vec<Vec<Piece>>),
}

#[derive(Debug, Clone)]
struct Piece {
    atom: Atom,
    min: usize,
    max: usize,
}

impl Regex {
    fn parse(s: &str) -> Result<Regex, String> {
        let chars: Vec<char> = s.chars().collect();
        let mut i = 0;
        let alts = parse_alts(&chars, &mut i)?;
        if i != chars.len() {
            return Err("unbalanced ')'".into());
        }
        Ok(Regex(alts))
    }

    fn full_match(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        match_alts(&self.0, &chars, 0, &mut |end| end == chars.len())
    }
}

fn parse_alts(c: &[char], i: &mut usize) -> Result<Vec<Vec<Piece>>, String> {
    let mut alts = vec![Vec::new()];
    while *i < c.len() {
        let atom = match c[*i] {
            ')' => break,
            '|' => {
                *i += 1;
                alts.push(Vec::new());
                continue;
            }
            '(' => {
                *i += 1;
                if c.get(*i) == Some(&'?') && c.get(*i + 1) == Some(&':') {
                    *i += 2;
                }
                let inner = parse_alts(c, i)?;
                if c.get(*i) != Some(&')') {
                    return Err("missing ')'".into());
                }
                *i += 1;
                Atom::Group(inner)
            }
            '.' => {
                *i += 1;
                Atom::Any
            }
            '[' => {
                *i += 1;
                let neg = c.get(*i) == Some(&'^');
                if neg {
                    *i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(&ch) = c.get(*i) else {
                        return Err("missing ']'".into());
                    };
                    if ch == ']' && !first {
                        *i += 1;
                        break;
                    }
                    first = false;
                    let lo = if ch == '\\' {
                        *i += 1;
                        *c.get(*i).ok_or("trailing '\\'")?
                    } else {
                        ch
                    };
                    *i += 1;
                    if c.get(*i) == Some(&'-') && c.get(*i + 1).is_some_and(|&n| n != ']') {
                        let hi = c[*i + 1];
                        *i += 2;
                        ranges.push((lo, hi));
                    } else {
                        ranges.push((lo, lo));
                    }
                }
                Atom::Class(neg, ranges)
            }
            '\\' => {
                *i += 1;
                let ch = *c.get(*i).ok_or("trailing '\\'")?;
                *i += 1;
                match ch {
                    'd' => Atom::Class(false, vec![('0', '9')]),
                    'w' => Atom::Class(false, vec![('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')]),
                    other => Atom::Char(other),
                }
            }
            '*' | '+' | '?' => return Err("nothing to repeat".into()),
            ch => {
                *i += 1;
                Atom::Char(ch)
            }
        };
        let (min, max) = match c.get(*i) {
            Some('*') => (0, usize::MAX),
            Some('+') => (1, usize::MAX),
            Some('?') => (0, 1),
            _ => (1, 1),
        };
        if (min, max) != (1, 1) {
            *i += 1;
        }
        alts.last_mut().expect("one").push(Piece { atom, min, max });
    }
    Ok(alts)
}

fn match_alts(
    alts: &[Vec<Piece>],
    s: &[char],
    at: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    alts.iter().any(|seq| match_seq(seq, s, at, k))
}

fn match_seq(seq: &[Piece], s: &[char], at: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    let Some((p, rest)) = seq.split_first() else {
        return k(at);
    };
    match_rep(p, 0, rest, s, at, k)
}

fn match_rep(
    p: &Piece,
    n: usize,
    rest: &[Piece],
    s: &[char],
    at: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    // Greedy: one more repetition first, then the rest.
    if n < p.max
        && match_atom(&p.atom, s, at, &mut |next| {
            next != at && match_rep(p, n + 1, rest, s, next, k)
        })
    {
        return true;
    }
    n >= p.min && match_seq(rest, s, at, k)
}

fn match_atom(a: &Atom, s: &[char], at: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match a {
        Atom::Group(alts) => match_alts(alts, s, at, k),
        _ => {
            let Some(&ch) = s.get(at) else {
                return false;
            };
            let ok = match a {
                Atom::Char(c) => *c == ch,
                Atom::Any => true,
                Atom::Class(neg, ranges) => {
                    ranges.iter().any(|&(lo, hi)| lo <= ch && ch <= hi) != *neg
                }
                Atom::Group(_) => unreachable!(),
            };
            ok && k(at + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page(q: &str) -> Page {
        Page::from_query(&format!("/x?{q}").parse().unwrap()).unwrap()
    }

    #[test]
    fn regexes_match_whole_fields() {
        let re = Regex::parse("vm-[0-9]+").unwrap();
        assert!(re.full_match("vm-12"));
        assert!(!re.full_match("vm-12x"));
        assert!(!re.full_match("xvm-1"));
        let re = Regex::parse("(a|bc)*d?").unwrap();
        assert!(re.full_match("abcbca"));
        assert!(re.full_match("abcd"));
        assert!(!re.full_match("abce"));
        assert!(Regex::parse("a(b").is_err());
        assert!(Regex::parse("[^x]y").unwrap().full_match("zy"));
    }

    #[test]
    fn filters_and_pages() {
        let items: Vec<Value> = (0..5)
            .map(|i| {
                json!({ "name": format!("vm-{i}"), "status": if i % 2 == 0 { "RUNNING" } else { "TERMINATED" },
                        "labels": { "team": if i < 3 { "a" } else { "b" } } })
            })
            .collect();
        let names = |p: Page| -> (Vec<String>, Option<String>) {
            let (v, next) = p.apply(items.clone()).unwrap();
            (
                v.iter()
                    .map(|i| i["name"].as_str().unwrap().to_owned())
                    .collect(),
                next,
            )
        };
        assert_eq!(names(page("filter=name%20%3D%20%22vm-3%22")).0, ["vm-3"]);
        assert_eq!(
            names(page("filter=status+%3D+RUNNING+AND+labels.team+%3D+a")).0,
            ["vm-0", "vm-2"]
        );
        assert_eq!(
            names(page(
                "filter=(status%20!%3D%20RUNNING)%20(labels.team%20%3D%20%22b%22)"
            ))
            .0,
            ["vm-3"]
        );
        assert_eq!(
            names(page("filter=name%20eq%20'vm-%5B12%5D'")).0,
            ["vm-1", "vm-2"]
        );
        assert_eq!(
            names(page("filter=name%20ne%20vm-.*")).0,
            Vec::<String>::new()
        );
        assert_eq!(names(page("filter=labels.team%3A*")).0.len(), 5);
        let (first, next) = names(page("maxResults=2"));
        assert_eq!(first, ["vm-0", "vm-1"]);
        let (second, _) = names(page(&format!("maxResults=2&pageToken={}", next.unwrap())));
        assert_eq!(second, ["vm-2", "vm-3"]);
        assert!(Page::from_query(
            &"/x?filter=(name%20eq%20a)%20(status%20%3D%20b)"
                .parse()
                .unwrap()
        )
        .is_err());
        assert!(Page::from_query(&"/x?maxResults=501".parse().unwrap()).is_err());
        assert!(
            Page::from_query(&"/x?filter=a%20%3D%20b%20OR%20c%20%3D%20d".parse().unwrap()).is_err()
        );
    }
}
