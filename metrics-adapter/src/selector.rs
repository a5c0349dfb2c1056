//! Kubernetes label selectors as the HPA sends them (`labelSelector`, `metricLabelSelector`): `k=v`, `k==v`,
//! `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, comma-separated and ANDed. Hand-written: the grammar is a
//! few lines and the Rust Kubernetes crates only build selectors, they do not parse them.

use std::collections::BTreeMap;

use crate::Error;

/// One requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Req>);

fn invalid(selector: &str, reason: impl Into<String>) -> Error {
    Error::Selector {
        selector: selector.to_string(),
        reason: reason.into(),
    }
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set(sel: &str, rest: &str) -> Result<Vec<String>, Error> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| invalid(sel, "a set must be written (a,b)"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let mut reqs = Vec::new();
        for term in terms(s)
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let key_ok = |k: &str| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            };
            let req = if let Some(k) = term.strip_prefix('!') {
                Req::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                Req::Ne(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Req::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Req::NotIn(k.trim().to_string(), set(s, rest)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Req::In(k.trim().to_string(), set(s, rest)?)
            } else {
                Req::Exists(term.to_string())
            };
            let key = match &req {
                Req::Eq(k, _)
                | Req::Ne(k, _)
                | Req::In(k, _)
                | Req::NotIn(k, _)
                | Req::Exists(k)
                | Req::NotExists(k) => k,
            };
            if !key_ok(key) {
                return Err(invalid(s, format!("bad key in `{term}`")));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => labels.get(k) == Some(v),
            Req::Ne(k, v) => labels.get(k) != Some(v),
            Req::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Req::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Req::Exists(k) => labels.contains_key(k),
            Req::NotExists(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_every_operator() {
        let l = labels(&[
            ("app", "vllm"),
            ("llm-d.ai/role", "decode"),
            ("weir.dev/gpu", "H100"),
        ]);
        let yes = [
            "",
            "app=vllm",
            "app==vllm,llm-d.ai/role=decode",
            "app!=other",
            "weir.dev/gpu in (H100, A100-80)",
            "weir.dev/gpu notin (L4)",
            "app",
            "!missing",
        ];
        for s in yes {
            assert!(Selector::parse(s).unwrap().matches(&l), "{s}");
        }
        let no = [
            "app=x",
            "app!=vllm",
            "weir.dev/gpu in (L4)",
            "weir.dev/gpu notin (H100)",
            "missing",
            "!app",
        ];
        for s in no {
            assert!(!Selector::parse(s).unwrap().matches(&l), "{s}");
        }
    }

    #[test]
    fn rejects_malformed_selectors() {
        assert!(Selector::parse("a in x").is_err());
        assert!(Selector::parse("=v").is_err());
        assert!(Selector::parse("a b=c").is_err());
    }
}
