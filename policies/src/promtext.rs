//! The one Prometheus text-exposition parser in weir (format 0.0.4, and the sample lines of OpenMetrics text).
//!
//! The router's scraper, `weir bench`, the metrics adapter and the end-to-end tests all read `/metrics` text through
//! [`samples`]. It borrows the text and allocates nothing per line: the router scrapes every pod every 100 ms, and
//! the one parser crate on crates.io (`prometheus-parse`) builds a `HashMap` per sample, pulls in `regex` and
//! `chrono`, and has not been released since 2023 — so this is hand-written, and small.
//!
//! Accepted: `# ...` comment lines (HELP/TYPE are skipped, not checked), `name value`, `name{k="v",..} value`,
//! an optional integer timestamp, label values with `\\`, `\"` and `\n` escapes, `NaN`, `+Inf`, `-Inf`. A line that
//! does not parse is skipped (a scrape of a half-broken exporter still yields its good series).

use std::borrow::Cow;

/// One sample line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// Metric name as written (`vllm:num_requests_waiting`, `x_bucket`).
    pub name: &'a str,
    /// The text between `{` and `}` (escapes not resolved), "" without labels.
    pub labels: &'a str,
    pub value: f64,
    /// Milliseconds since the Unix epoch, when the exporter wrote one.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Sample<'a> {
    /// The value of label `key`, escapes resolved (borrowed when there were none).
    pub fn label(&self, key: &str) -> Option<Cow<'a, str>> {
        self.label_pairs().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Every `(key, value)` pair in written order.
    pub fn label_pairs(&self) -> LabelPairs<'a> {
        LabelPairs { rest: self.labels }
    }
}

/// Iterator over a label block's pairs; stops at the first malformed pair.
#[derive(Debug, Clone)]
pub struct LabelPairs<'a> {
    rest: &'a str,
}

impl<'a> Iterator for LabelPairs<'a> {
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest.trim_start_matches([',', ' ', '\t']);
        if rest.is_empty() {
            return None;
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let end = closing_quote(after)?;
        let raw = &after[..end];
        self.rest = &after[end + 1..];
        Some((key, unescape(raw)))
    }
}

/// Index of the first unescaped `"` in `s`.
fn closing_quote(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

/// Parses one line; `None` for comments, blank and malformed lines.
pub fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let inner = &line[name_end + 1..];
        let close = closing_brace(inner)?;
        (&inner[..close], &inner[close + 1..])
    } else {
        ("", &line[name_end..])
    };
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next()?)?;
    let timestamp_ms = match fields.next() {
        Some(t) => Some(t.parse::<i64>().ok()?),
        None => None,
    };
    Some(Sample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// Index of the `}` closing a label block (quotes and escapes respected).
fn closing_brace(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while i < b.len() {
        match (b[i], in_quotes) {
            (b'\\', true) => i += 1,
            (b'"', _) => in_quotes = !in_quotes,
            (b'}', false) => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Every sample line of `text`, in order.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_line)
}

/// The samples of series `name` (exact name).
pub fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = Sample<'a>> {
    samples(text).filter(move |s| s.name == name)
}

/// The sum over every label set of series `name`; `None` when absent.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    series(text, name).map(|s| s.value).reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP vllm:num_requests_running Number of requests.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2
vllm:num_requests_running_extra 100
process_start_time_seconds 1.7e9 1700000000000
weird{path="a\"}b",note="x\\y\nz", spaced = "s" } +Inf
nan_one NaN
broken{a="b" 1
no_value
"#;

    #[test]
    fn parses_names_labels_values_and_timestamps() {
        let all: Vec<_> = samples(TEXT).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all[0].name, "vllm:num_requests_running");
        assert_eq!(all[0].labels, r#"engine="0",model_name="m""#);
        assert_eq!(all[0].label("model_name").as_deref(), Some("m"));
        assert_eq!(all[1].value, 2.0);
        assert_eq!(all[3].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(all[3].value, 1.7e9);
        assert!(all[5].value.is_nan());
    }

    #[test]
    fn resolves_escapes_and_keeps_braces_inside_quotes() {
        let s = samples(TEXT).find(|s| s.name == "weird").unwrap();
        assert_eq!(s.value, f64::INFINITY);
        assert_eq!(s.label("path").as_deref(), Some("a\"}b"));
        assert_eq!(s.label("note").as_deref(), Some("x\\y\nz"));
        assert_eq!(s.label("spaced").as_deref(), Some("s"));
        assert_eq!(s.label("missing"), None);
    }

    #[test]
    fn label_keys_match_whole_names() {
        let s = parse_line(r#"x{cpu_num_gpu_blocks="None",num_gpu_blocks="28000"} 1"#).unwrap();
        assert_eq!(s.label("num_gpu_blocks").as_deref(), Some("28000"));
    }

    #[test]
    fn sum_is_over_exact_names_only() {
        assert_eq!(sum(TEXT, "vllm:num_requests_running"), Some(5.0));
        assert_eq!(sum(TEXT, "vllm:num_requests"), None);
        assert_eq!(sum("", "x"), None);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse_line("broken{a=\"b\" 1").is_none());
        assert!(parse_line("no_value").is_none());
        assert!(parse_line("x 1 notatimestamp").is_none());
        assert!(parse_line("   # comment").is_none());
    }
}
