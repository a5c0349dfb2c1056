//! Tokenization shared by the simulator and the router.
//!
//! Routing by prefix only works if the router turns a request into exactly the token ids the model server will
//! cache. [`Tokenizer`] is that seam; [`ByteTokenizer`] is the fast deterministic default (about 4 bytes per token,
//! like llm-d's tokenizer-free estimator) that `weir sim` uses, and a real HF `tokenizer.json` can stand behind the
//! same trait for real models. Chat requests are rendered with the Llama-3 template ([`render_chat`]) before
//! tokenizing, so identical leading messages give identical leading ids.
//!
//! The default tokenizer is *prefix stable*: the ids of a text are a prefix of the ids of any longer text that starts
//! with it, except possibly the last id (a partial 4-byte chunk). Special tokens are matched as whole strings.

use xxhash_rust::xxh3::xxh3_64;

/// A token id.
pub type TokenId = u32;

/// Turns text into token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, special-token strings (e.g. `<|eot_id|>`) included as single ids.
    fn encode(&self, text: &str) -> Vec<TokenId>;
    /// Text of one token id (lossy for ids that came from hashing prompt text).
    fn decode_token(&self, id: TokenId) -> String;
    /// Number of ids the model knows.
    fn vocab_size(&self) -> u32;
    /// The end-of-sequence id generation stops at.
    fn eos_token_id(&self) -> TokenId;
}

/// Llama-3 special tokens and their ids.
pub const SPECIAL_TOKENS: &[(&str, TokenId)] = &[
    ("<|begin_of_text|>", 128_000),
    ("<|end_of_text|>", 128_001),
    ("<|start_header_id|>", 128_006),
    ("<|end_header_id|>", 128_007),
    ("<|eot_id|>", 128_009),
];

/// Llama-3's vocabulary size, ids of special tokens included.
pub const LLAMA3_VOCAB: u32 = 128_256;
/// Ordinary (non-special) ids live below this.
const ORDINARY_IDS: u32 = 128_000;

/// Words the simulated model "generates"; an ordinary id `i` decodes to `WORDS[i % WORDS.len()]`. Each is about four
/// bytes, matching the ~4 bytes/token density of [`ByteTokenizer`].
const WORDS: &[&str] = &[
    " the", " and", " of", " to", " in", " is", " it", " for", " on", " as", " with", " that",
    " by", " at", " an", " be", " this", " are", " from", " or", " was", " can", " has", " we",
    " not", " but", " all", " will", " one", " may", " more", " each", " data", " time", " node",
    " pod", " GPU", " cache", " token", " block", " queue", " load", " path", " rate", " fast",
    " slow", " key", " set", " map", " run", " step", " plan", " cost", " pool", " fair", " tier",
    " user", " model", " layer", " graph", " batch", " score", ".", ",",
];

/// The default tokenizer: ~4-byte chunks (never splitting a UTF-8 character) hashed into the ordinary id range, with
/// Llama-3 special tokens recognised as whole strings.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Bytes per token the chunker aims for.
    pub const BYTES_PER_TOKEN: usize = 4;

    fn encode_plain(text: &str, out: &mut Vec<TokenId>) {
        let bytes = text.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let mut end = (start + Self::BYTES_PER_TOKEN).min(bytes.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            out.push((xxh3_64(&bytes[start..end]) % u64::from(ORDINARY_IDS)) as TokenId);
            start = end;
        }
    }
}

impl Tokenizer for ByteTokenizer {
    /// One pass over the text: every special token starts with `<|`, so only those places are tried. (Searching the
    /// whole remaining text for each special token at every match made a 50,000-message chat cost minutes: the
    /// search grew with the square of the number of specials.)
    fn encode(&self, text: &str) -> Vec<TokenId> {
        let mut out = Vec::with_capacity(text.len() / Self::BYTES_PER_TOKEN + 1);
        let bytes = text.as_bytes();
        // `plain` is where the text not yet encoded starts; `from` is where the next search for `<|` starts.
        let (mut plain, mut from) = (0, 0);
        while let Some(off) = memchr::memmem::find(&bytes[from..], b"<|") {
            let pos = from + off;
            match SPECIAL_TOKENS
                .iter()
                .find(|(s, _)| bytes[pos..].starts_with(s.as_bytes()))
            {
                Some((s, id)) => {
                    Self::encode_plain(&text[plain..pos], &mut out);
                    out.push(*id);
                    plain = pos + s.len();
                    from = plain;
                }
                None => from = pos + 1,
            }
        }
        Self::encode_plain(&text[plain..], &mut out);
        out
    }

    fn decode_token(&self, id: TokenId) -> String {
        if let Some((s, _)) = SPECIAL_TOKENS.iter().find(|(_, sid)| *sid == id) {
            return (*s).to_string();
        }
        WORDS[id as usize % WORDS.len()].to_string()
    }

    fn vocab_size(&self) -> u32 {
        LLAMA3_VOCAB
    }

    fn eos_token_id(&self) -> TokenId {
        128_009
    }
}

/// Number of distinct generation words; ids `0..generation_vocab()` decode to distinct words.
pub fn generation_vocab() -> u32 {
    WORDS.len() as u32
}

/// One chat message after content normalisation (string content, or text parts joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// Render chat turns with the Llama-3 chat template, ending with the assistant header when
/// `add_generation_prompt` is set (as vLLM does by default).
pub fn render_chat(turns: &[ChatTurn<'_>], add_generation_prompt: bool) -> String {
    let mut s =
        String::with_capacity(turns.iter().map(|t| t.content.len() + 48).sum::<usize>() + 64);
    s.push_str("<|begin_of_text|>");
    for t in turns {
        s.push_str("<|start_header_id|>");
        s.push_str(t.role);
        s.push_str("<|end_header_id|>\n\n");
        s.push_str(t.content.trim());
        s.push_str("<|eot_id|>");
    }
    if add_generation_prompt {
        s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn about_four_bytes_per_token() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(100);
        let n = ByteTokenizer.encode(&text).len();
        assert_eq!(n, text.len().div_ceil(4));
    }

    #[test]
    fn special_tokens_are_single_ids() {
        let ids = ByteTokenizer.encode("<|begin_of_text|>hi<|eot_id|>");
        assert_eq!(ids.first(), Some(&128_000));
        assert_eq!(ids.last(), Some(&128_009));
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn identical_system_prompts_share_leading_ids() {
        let sys =
            "You are a helpful assistant that answers questions about Kubernetes. ".repeat(20);
        let a = render_chat(
            &[
                ChatTurn {
                    role: "system",
                    content: &sys,
                },
                ChatTurn {
                    role: "user",
                    content: "a?",
                },
            ],
            true,
        );
        let b = render_chat(
            &[
                ChatTurn {
                    role: "system",
                    content: &sys,
                },
                ChatTurn {
                    role: "user",
                    content: "bb?",
                },
            ],
            true,
        );
        let (ta, tb) = (ByteTokenizer.encode(&a), ByteTokenizer.encode(&b));
        let common = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
        assert!(common >= sys.len() / 4, "common {common}");
    }

    /// The encoder before it was made linear: the earliest special token found by searching the rest for each one.
    fn encode_by_search(text: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            let next = SPECIAL_TOKENS
                .iter()
                .filter_map(|(s, id)| rest.find(s).map(|pos| (pos, *s, *id)))
                .min_by_key(|(pos, _, _)| *pos);
            match next {
                Some((pos, s, id)) => {
                    ByteTokenizer::encode_plain(&rest[..pos], &mut out);
                    out.push(id);
                    rest = &rest[pos + s.len()..];
                }
                None => {
                    ByteTokenizer::encode_plain(rest, &mut out);
                    return out;
                }
            }
        }
    }

    #[test]
    fn near_misses_of_special_tokens_are_plain_text() {
        let text = "<|<|eot_id|><|eot_id<|start_header_id|>x<|end_header_id|<|end_of_text|>";
        assert_eq!(ByteTokenizer.encode(text), encode_by_search(text));
        assert_eq!(
            ByteTokenizer
                .encode(text)
                .iter()
                .filter(|id| **id >= ORDINARY_IDS)
                .count(),
            3
        );
    }

    proptest! {
        #[test]
        fn same_ids_as_searching_for_each_special_token(
            parts in proptest::collection::vec(
                prop_oneof![
                    "\\PC{0,12}",
                    Just("<|".to_string()),
                    Just("<|eot_id|>".to_string()),
                    Just("<|start_header_id|>".to_string()),
                    Just("<|end_header_id|>".to_string()),
                    Just("<|begin_of_text|>".to_string()),
                ],
                0..24,
            )
        ) {
            let text = parts.concat();
            prop_assert_eq!(ByteTokenizer.encode(&text), encode_by_search(&text));
        }

        #[test]
        fn prefix_stable(a in "\\PC{0,200}", b in "\\PC{0,200}") {
            let whole = format!("{a}{b}");
            let ta = ByteTokenizer.encode(&a);
            let tw = ByteTokenizer.encode(&whole);
            // All but the last id of the prefix's encoding are shared.
            let keep = ta.len().saturating_sub(1);
            prop_assert_eq!(&ta[..keep], &tw[..keep]);
        }
    }
}
