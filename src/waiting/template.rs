//! The waiting page's template language: `{{name}}` placeholders, HTML-escaped when filled, and
//! sections shown only when a value is set (`{{#name}}…{{/name}}`) or empty
//! (`{{^name}}…{{/name}}`).

use std::fmt;

use super::PLACEHOLDERS;

/// A checked waiting-page template: every placeholder known, every section closed.
///
/// See the [module docs](super) for the syntax and the placeholders.
#[derive(Clone, Debug)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug)]
enum Part {
    Text(Box<str>),
    /// An index into [`PLACEHOLDERS`].
    Value(usize),
    Section {
        name: usize,
        /// Shown when the value is set (`#`), or when it is empty (`^`).
        when_set: bool,
        body: Vec<Part>,
    },
}

/// Why a template was refused: the line and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    line: usize,
    reason: String,
}

impl TemplateError {
    /// The line (from 1) where the problem is.
    pub fn line(&self) -> usize {
        self.line
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for TemplateError {}

/// A section opened and not yet closed.
struct Open {
    name: usize,
    when_set: bool,
    line: usize,
    /// The parts before the section began.
    outer: Vec<Part>,
}

impl Template {
    /// Checks `text`: a placeholder that is not one of [`PLACEHOLDERS`], a `{{` that is not
    /// closed, or a section closed out of order is an error naming its line.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut open: Vec<Open> = Vec::new();
        let mut rest = text;
        let line_at = |rest: &str| 1 + text[..text.len() - rest.len()].matches('\n').count();
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].into()));
            }
            let line = line_at(&rest[start..]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(TemplateError {
                    line,
                    reason: "\"{{\" is not closed by \"}}\"".into(),
                });
            };
            let tag = after[..end].trim();
            rest = &after[end + 2..];
            let (sigil, name) = match tag.chars().next() {
                Some(c @ ('#' | '^' | '/')) => (Some(c), tag[1..].trim()),
                _ => (None, tag),
            };
            let Some(index) = PLACEHOLDERS.iter().position(|p| *p == name) else {
                return Err(TemplateError {
                    line,
                    reason: format!(
                        "unknown placeholder {{{{{tag}}}}}; the placeholders are {}",
                        PLACEHOLDERS.join(", ")
                    ),
                });
            };
            match sigil {
                None => parts.push(Part::Value(index)),
                Some(c @ ('#' | '^')) => open.push(Open {
                    name: index,
                    when_set: c == '#',
                    line,
                    outer: std::mem::take(&mut parts),
                }),
                Some(_) => {
                    let Some(section) = open.pop() else {
                        return Err(TemplateError {
                            line,
                            reason: format!("{{{{/{name}}}}} closes no section"),
                        });
                    };
                    if section.name != index {
                        return Err(TemplateError {
                            line,
                            reason: format!(
                                "{{{{/{name}}}}} closes the section of {} opened on line {}",
                                PLACEHOLDERS[section.name], section.line
                            ),
                        });
                    }
                    let body = std::mem::replace(&mut parts, section.outer);
                    parts.push(Part::Section {
                        name: index,
                        when_set: section.when_set,
                        body,
                    });
                }
            }
        }
        if let Some(section) = open.pop() {
            return Err(TemplateError {
                line: section.line,
                reason: format!(
                    "the section of {} is never closed with {{{{/{}}}}}",
                    PLACEHOLDERS[section.name], PLACEHOLDERS[section.name]
                ),
            });
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.into()));
        }
        Ok(Template { parts })
    }

    /// Fills the template: each placeholder with its value in `values` (empty if absent),
    /// HTML-escaped.
    pub fn render(&self, values: &[(&str, &str)]) -> String {
        let mut by_index = [""; PLACEHOLDERS.len()];
        for (name, value) in values {
            if let Some(i) = PLACEHOLDERS.iter().position(|p| p == name) {
                by_index[i] = value;
            }
        }
        let mut out = String::with_capacity(2048);
        render(&self.parts, &by_index, &mut out);
        out
    }
}

fn render(parts: &[Part], values: &[&str], out: &mut String) {
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Value(i) => escape_into(values[*i], out),
            Part::Section {
                name,
                when_set,
                body,
            } => {
                if values[*name].is_empty() != *when_set {
                    render(body, values, out);
                }
            }
        }
    }
}

/// Escapes text for an HTML element or a quoted attribute value.
fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, values: &[(&str, &str)]) -> String {
        Template::parse(template).unwrap().render(values)
    }

    #[test]
    fn placeholders_are_filled_and_escaped() {
        assert_eq!(
            render(
                "<b>{{machine}}</b> {{ status }}",
                &[("machine", "<i>\"x\" & 'y'</i>")]
            ),
            "<b>&lt;i&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/i&gt;</b> "
        );
        // A value is substituted once: markup in it is never read as a placeholder either.
        assert_eq!(
            render("{{machine}}", &[("machine", "{{error}}")]),
            "{{error}}"
        );
    }

    #[test]
    fn sections_follow_whether_a_value_is_set() {
        let t = "{{#progress}}<progress value=\"{{progress}}\">{{/progress}}{{^progress}}<progress>{{/progress}}";
        assert_eq!(render(t, &[("progress", "40")]), "<progress value=\"40\">");
        assert_eq!(render(t, &[("progress", "")]), "<progress>");
        assert_eq!(render(t, &[]), "<progress>");
        // Nested sections of different names.
        let t = "{{#error}}a{{^progress}}b{{/progress}}c{{/error}}";
        assert_eq!(render(t, &[("error", "e")]), "abc");
        assert_eq!(render(t, &[("error", "e"), ("progress", "1")]), "ac");
        assert_eq!(render(t, &[]), "");
    }

    #[test]
    fn mistakes_are_refused_with_their_line() {
        for (t, line, says) in [
            ("a\n{{machin}}", 2, "unknown placeholder {{machin}}"),
            ("{{machine", 1, "not closed"),
            ("{{#error}}\n\n", 1, "never closed"),
            ("{{/error}}", 1, "closes no section"),
            ("{{#error}}\n{{#progress}}{{/error}}", 2, "opened on line 2"),
            ("{{}}", 1, "unknown placeholder"),
        ] {
            let e = Template::parse(t).unwrap_err();
            assert_eq!(e.line(), line, "{t:?}: {e}");
            assert!(e.to_string().contains(says), "{t:?}: {e}");
        }
        let e = Template::parse("{{nope}}").unwrap_err();
        assert!(e.to_string().contains("machine, status"), "lists them: {e}");
    }

    #[test]
    fn text_without_placeholders_is_kept_whole() {
        assert_eq!(render("", &[]), "");
        assert_eq!(render("plain } { text", &[]), "plain } { text");
    }
}
