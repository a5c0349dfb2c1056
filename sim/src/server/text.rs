//! Output text assembly: token ids to text, and `stop` strings (cut before the match, hold back partial matches
//! while streaming so a client never sees text that a later stop match would remove).

use policies::tokens::Tokenizer;

/// Text of one generated token; special tokens (EOS) produce no text, as with vLLM's `skip_special_tokens`.
pub fn token_text(tok: &dyn Tokenizer, id: u32) -> String {
    if id >= 128_000 {
        String::new()
    } else {
        tok.decode_token(id)
    }
}

/// Accumulates output text and finds stop strings.
#[derive(Debug, Default)]
pub struct StopScanner {
    /// Stop strings (non-empty).
    stops: Vec<String>,
    /// All text kept so far (emitted + held back).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// The stop string that matched, once one has.
    pub matched: Option<String>,
}

impl StopScanner {
    /// A scanner for these stop strings.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Add a token's text; returns the text that may be shown now. After a match, returns what precedes it.
    pub fn push(&mut self, piece: &str) -> String {
        if self.matched.is_some() {
            return String::new();
        }
        self.text.push_str(piece);
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 {
            return self.take_until(self.text.len());
        }
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[from..]
                    .find(s.as_str())
                    .map(|p| (from + p, s.clone()))
            })
            .min_by_key(|(p, _)| *p);
        if let Some((pos, s)) = hit {
            let out = self.take_until(pos);
            self.text.truncate(pos);
            self.matched = Some(s);
            return out;
        }
        // Hold back the longest tail that could still become a stop string.
        let pending = &self.text[self.emitted..];
        let mut hold = 0;
        for s in &self.stops {
            let most = (s.len() - 1).min(pending.len());
            if let Some(k) = (1..=most)
                .rev()
                .find(|&k| s.is_char_boundary(k) && pending.ends_with(&s[..k]))
            {
                hold = hold.max(k);
            }
        }
        let mut safe = self.text.len() - hold;
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        self.take_until(safe)
    }

    /// Everything not yet handed out (at the end of generation).
    pub fn flush(&mut self) -> String {
        self.take_until(self.text.len())
    }

    /// The full output text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take_until(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stops_passes_through() {
        let mut s = StopScanner::new(vec![]);
        assert_eq!(s.push(" the"), " the");
        assert_eq!(s.push(" and"), " and");
        assert_eq!(s.text(), " the and");
    }

    #[test]
    fn cuts_before_stop_across_tokens() {
        let mut s = StopScanner::new(vec!["and of".into()]);
        let mut shown = s.push(" the");
        shown += &s.push(" and");
        assert_eq!(shown, " the ", "partial match held back");
        shown += &s.push(" of");
        shown += &s.push(" to");
        assert_eq!(shown, " the ");
        assert_eq!(s.matched.as_deref(), Some("and of"));
        assert_eq!(s.text(), " the ");
    }

    #[test]
    fn held_back_text_is_released_when_no_match() {
        let mut s = StopScanner::new(vec!["andx".into()]);
        let mut shown = s.push(" the and");
        shown += &s.push(" of");
        shown += &s.flush();
        assert_eq!(shown, " the and of");
        assert!(s.matched.is_none());
    }
}
