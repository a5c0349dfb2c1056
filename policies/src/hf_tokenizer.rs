//! Loading a Hugging Face `tokenizer.json` as a [`Tokenizer`], so the simulator and the router can count and hash
//! exactly the ids a real model server would.
//!
//! The loader is always compiled; the tokenizer itself ([`HfTokenizer`]) needs the cargo feature `hf` (crate
//! `tokenizers` with its pure-Rust `fancy-regex` backend: no C build, no hub download, local files only). Without the
//! feature, [`load_tokenizer_file`] fails with [`HfError::FeatureDisabled`], whose message names the feature.

use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "hf")]
use crate::tokens::TokenId;
use crate::tokens::Tokenizer;

/// End-of-sequence candidates tried in order when no eos token is named: Llama-3's end of turn, SentencePiece's
/// `</s>`, GPT-style `<|endoftext|>`, Llama-3's end of text, ChatML's end of message.
pub const EOS_CANDIDATES: &[&str] = &[
    "<|eot_id|>",
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|im_end|>",
];

/// Why a `tokenizer.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// This build has no `hf` feature, so no tokenizer file can be loaded.
    #[error(
        "cannot load tokenizer file {0}: this weir was built without the `hf` cargo feature \
         (rebuild with `cargo build --features hf`)"
    )]
    FeatureDisabled(String),
    /// The file is missing or is not a tokenizer `tokenizers` can parse.
    #[error("cannot load tokenizer file {path}: {reason}")]
    Load {
        /// The file that was read.
        path: String,
        /// The parser's or file system's message.
        reason: String,
    },
    /// The tokenizer has none of the end-of-sequence tokens asked for.
    #[error("tokenizer has no end-of-sequence token among {0:?}")]
    NoEos(Vec<String>),
    /// The tokenizer cannot encode a rendered chat (e.g. a word-level model without an unknown token).
    #[error("tokenizer cannot encode a rendered chat: {0}")]
    Encode(String),
}

/// Load `path` as a shared [`Tokenizer`]; `eos` names the end-of-sequence token, or `None` for the first of
/// [`EOS_CANDIDATES`] the tokenizer knows. Fails with [`HfError::FeatureDisabled`] in builds without `hf`.
pub fn load_tokenizer_file(path: &Path, eos: Option<&str>) -> Result<Arc<dyn Tokenizer>, HfError> {
    #[cfg(feature = "hf")]
    {
        let t = HfTokenizer::from_file(path)?;
        let t = match eos {
            Some(name) => t.with_eos_token(name)?,
            None => t,
        };
        Ok(Arc::new(t))
    }
    #[cfg(not(feature = "hf"))]
    {
        let _ = eos;
        Err(HfError::FeatureDisabled(path.display().to_string()))
    }
}

/// A Hugging Face tokenizer loaded from a local `tokenizer.json`.
///
/// Text is encoded without adding special tokens (the chat template already writes `<|begin_of_text|>` and friends
/// as text); special tokens the file declares as added tokens are matched in the text and become their single ids.
#[cfg(feature = "hf")]
#[derive(Clone)]
pub struct HfTokenizer {
    /// The parsed tokenizer, truncation and padding switched off so every id of a prompt is kept.
    inner: tokenizers::Tokenizer,
    /// Id generation stops at; chosen from [`EOS_CANDIDATES`] or named by the caller.
    eos: TokenId,
    /// Ids the model knows, added tokens included.
    vocab: u32,
}

#[cfg(feature = "hf")]
impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("eos", &self.eos)
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "hf")]
impl HfTokenizer {
    /// Parse `path`; the eos id is the first of [`EOS_CANDIDATES`] the tokenizer knows.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, HfError> {
        let path = path.as_ref();
        let load_err = |reason: String| HfError::Load {
            path: path.display().to_string(),
            reason,
        };
        let mut inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| load_err(e.to_string()))?;
        inner.with_padding(None);
        let eos = EOS_CANDIDATES
            .iter()
            .find_map(|s| inner.token_to_id(s))
            .ok_or_else(|| {
                HfError::NoEos(EOS_CANDIDATES.iter().map(|s| s.to_string()).collect())
            })?;
        // Ids may be sparse; the vocabulary must cover the largest one.
        let max_id = inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m.saturating_add(1));
        let vocab = (inner.get_vocab_size(true) as u32).max(max_id);
        // Fail at load, not per request, if a rendered chat cannot be encoded.
        let probe = crate::tokens::render_chat(
            &[crate::tokens::ChatTurn {
                role: "user",
                content: "hello",
            }],
            true,
        );
        inner
            .encode_fast(probe.as_str(), false)
            .map_err(|e| HfError::Encode(e.to_string()))?;
        Ok(Self { inner, eos, vocab })
    }

    /// Use the token `name` as end of sequence instead of the default.
    pub fn with_eos_token(mut self, name: &str) -> Result<Self, HfError> {
        self.eos = self
            .inner
            .token_to_id(name)
            .ok_or_else(|| HfError::NoEos(vec![name.to_string()]))?;
        Ok(self)
    }

    /// Id of `token` if the vocabulary (added tokens included) has it.
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }
}

#[cfg(feature = "hf")]
impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Vec<TokenId> {
        // `from_file` proved a rendered chat encodes; the remaining failure (a word-level model meeting a word it
        // lacks without an unknown token) yields no ids rather than a panic.
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    fn decode_token(&self, id: TokenId) -> String {
        match self.inner.decode(&[id], false) {
            Ok(s) if !s.is_empty() => s,
            _ => self.inner.id_to_token(id).unwrap_or_default(),
        }
    }

    fn vocab_size(&self) -> u32 {
        self.vocab
    }

    fn eos_token_id(&self) -> TokenId {
        self.eos
    }
}

#[cfg(not(feature = "hf"))]
#[cfg(test)]
mod tests_without_feature {
    use super::*;

    #[test]
    fn loading_names_the_missing_feature() {
        let err = load_tokenizer_file(Path::new("/nonexistent/tokenizer.json"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`hf` cargo feature"), "{err}");
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    }
}

#[cfg(feature = "hf")]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{ChatTurn, SPECIAL_TOKENS, render_chat};
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::{AddedToken, Tokenizer as Hf};

    const WORDS: &[&str] = &[
        "[UNK]",
        "you",
        "are",
        "a",
        "helpful",
        "assistant",
        "hello",
        "world",
        "system",
        "user",
        "why",
        "is",
        "the",
        "sky",
        "blue",
        "?",
        ".",
        "!",
    ];

    /// A word-level tokenizer over [`WORDS`] with Llama-3's special tokens added at their real ids, saved as
    /// `tokenizer.json` in a fresh temp dir.
    fn tiny_tokenizer_file(tag: &str) -> std::path::PathBuf {
        let model = WordLevel::builder()
            .vocab(
                WORDS
                    .iter()
                    .enumerate()
                    .map(|(i, w)| (w.to_string(), i as u32))
                    .collect(),
            )
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tok = Hf::new(model);
        tok.with_pre_tokenizer(Some(Whitespace {}));
        // Added tokens take the next free ids after the words.
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|(s, _)| AddedToken::from(*s, true))
            .collect();
        tok.add_special_tokens(&specials);
        let dir = std::env::temp_dir().join(format!("weir-hf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        tok.save(&path, false).unwrap();
        path
    }

    fn id(t: &HfTokenizer, s: &str) -> TokenId {
        t.token_to_id(s).unwrap()
    }

    #[test]
    fn round_trips_words_and_specials() {
        let t = HfTokenizer::from_file(tiny_tokenizer_file("rt")).unwrap();
        let ids = t.encode("hello world !");
        assert_eq!(ids, vec![id(&t, "hello"), id(&t, "world"), id(&t, "!")]);
        let back: Vec<String> = ids.iter().map(|&i| t.decode_token(i)).collect();
        assert_eq!(back, ["hello", "world", "!"]);
        assert_eq!(t.encode("zebra"), vec![0], "unknown word maps to [UNK]");
        assert_eq!(t.vocab_size(), (WORDS.len() + SPECIAL_TOKENS.len()) as u32);
        assert_eq!(t.eos_token_id(), id(&t, "<|eot_id|>"));
        assert_eq!(t.decode_token(t.eos_token_id()), "<|eot_id|>");
    }

    #[test]
    fn special_tokens_in_text_are_single_ids() {
        let t = HfTokenizer::from_file(tiny_tokenizer_file("sp")).unwrap();
        let ids = t
            .encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>");
        assert_eq!(
            ids,
            vec![
                id(&t, "<|begin_of_text|>"),
                id(&t, "<|start_header_id|>"),
                id(&t, "user"),
                id(&t, "<|end_header_id|>"),
                id(&t, "hello"),
                id(&t, "<|eot_id|>"),
            ]
        );
        // Specials are not ordinary words: each has its own id past the word vocabulary.
        for (s, _) in SPECIAL_TOKENS {
            assert!(id(&t, s) >= WORDS.len() as u32, "{s}");
        }
    }

    #[test]
    fn identical_system_prompts_share_leading_ids() {
        let t = HfTokenizer::from_file(tiny_tokenizer_file("px")).unwrap();
        let sys = "you are a helpful assistant . ".repeat(10);
        let chat = |q: &str| {
            render_chat(
                &[
                    ChatTurn {
                        role: "system",
                        content: &sys,
                    },
                    ChatTurn {
                        role: "user",
                        content: q,
                    },
                ],
                true,
            )
        };
        let (a, b) = (
            t.encode(&chat("why is the sky blue ?")),
            t.encode(&chat("hello !")),
        );
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        // <|begin_of_text|>, header (3 ids), 60 system words, <|eot_id|>, user header (3 ids).
        assert_eq!(common, 1 + 3 + 60 + 1 + 3);
        assert_ne!(a[common], b[common]);
    }

    #[test]
    fn eos_is_configurable_and_checked() {
        let path = tiny_tokenizer_file("eos");
        let t = HfTokenizer::from_file(&path)
            .unwrap()
            .with_eos_token("<|end_of_text|>")
            .unwrap();
        assert_eq!(t.eos_token_id(), id(&t, "<|end_of_text|>"));
        let err = HfTokenizer::from_file(&path)
            .unwrap()
            .with_eos_token("</nope>")
            .unwrap_err();
        assert!(matches!(err, HfError::NoEos(_)), "{err}");
        let shared = load_tokenizer_file(&path, Some("<|end_of_text|>")).unwrap();
        assert_eq!(shared.eos_token_id(), t.eos_token_id());
    }

    #[test]
    fn bad_files_are_errors() {
        let missing = HfTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(matches!(missing, HfError::Load { .. }), "{missing}");
        let dir = std::env::temp_dir().join(format!("weir-hf-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("tokenizer.json");
        std::fs::write(&bad, b"{\"not\": \"a tokenizer\"}").unwrap();
        let err = HfTokenizer::from_file(&bad).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
