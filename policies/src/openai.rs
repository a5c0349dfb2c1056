//! OpenAI / vLLM request bodies for `/v1/chat/completions` and `/v1/completions`, and their validation.
//!
//! Both the simulator and the router parse requests with these types, so they agree on what a request means: which
//! max-token field wins, how a chat is rendered to token ids, and which inputs are rejected with which vLLM error.
//! Unknown fields are tolerated and kept in `extra` so a proxy can pass them through. [`RequestView`] is the router's
//! one view of a request: the fields it routes on read in one pass, the full typed parse only on demand. Pure: no I/O.

use crate::errors::ApiError;
use crate::tokens::{ChatTurn, TokenId, Tokenizer, render_chat};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `"choices":[]` and the request's usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Put running usage on every chunk.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// A single stop string.
    One(String),
    /// Several stop strings; the first found wins.
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings, empty ones dropped.
    pub fn strings(&self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s.clone()],
            StopSpec::Many(v) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// vLLM's `kv_transfer_params` (NIXL connector) for prefill/decode disaggregation, in requests and responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTransferParams {
    /// Prefill leg: keep the prompt's KV pinned for a remote decoder.
    #[serde(default)]
    pub do_remote_decode: bool,
    /// Decode leg: pull the prompt's KV from a remote prefiller instead of computing it.
    #[serde(default)]
    pub do_remote_prefill: bool,
    /// NIXL engine id of the prefill engine holding the blocks.
    #[serde(default)]
    pub remote_engine_id: Option<String>,
    /// Block ids to read on the prefill engine.
    #[serde(default)]
    pub remote_block_ids: Option<Vec<u32>>,
    /// Host of the prefill engine.
    #[serde(default)]
    pub remote_host: Option<String>,
    /// Side-channel port of the prefill engine (the sim uses its HTTP port).
    #[serde(default)]
    pub remote_port: Option<u16>,
    /// Tensor-parallel size of the prefill engine (newer vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tp_size: Option<u32>,
    /// Request id on the prefill engine, used to release the pinned blocks (newer vLLM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_request_id: Option<String>,
}

/// One content part of a chat message (`{"type":"text","text":..}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentPart {
    /// Part type; only `"text"` is understood.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain string content.
    Text(String),
    /// Content parts (text only in the sim).
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` (or `developer`).
    pub role: String,
    /// Absent or null content counts as empty (assistant tool-call turns).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Anything else on the message (`name`, `tool_calls`, ...), kept for pass-through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Completions `prompt`: string | [string] | [int] | [[int]].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// One token-id prompt.
    Tokens(Vec<u32>),
    /// A batch of text prompts.
    Texts(Vec<String>),
    /// A batch of token-id prompts.
    TokenBatches(Vec<Vec<u32>>),
}

/// Sampling and vLLM-extra fields common to both APIs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommonParams {
    /// Served model name; unknown -> 404.
    pub model: String,
    /// Stream the answer as SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Only valid with `stream: true`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Output token limit; absent means `max_model_len - prompt`.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature, >= 0.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Top-k, -1 or 0 = off.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Number of choices; only 1 is supported.
    #[serde(default)]
    pub n: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Token ids that end generation.
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Sampling seed: same seed, same text.
    #[serde(default)]
    pub seed: Option<i64>,
    /// vLLM: generate at least this many tokens before EOS/stop can end the request.
    #[serde(default)]
    pub min_tokens: Option<i64>,
    /// vLLM: never stop at EOS (benchmarks use it to force the output length).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// vLLM: isolates prefix-cache sharing (mixed into the first block's hash).
    #[serde(default)]
    pub cache_salt: Option<String>,
    /// vLLM: scheduling priority, lower first (priority scheduling only).
    #[serde(default)]
    pub priority: Option<i32>,
    /// vLLM: P/D handshake.
    #[serde(default)]
    pub kv_transfer_params: Option<KvTransferParams>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Newer name of `max_tokens`; wins when both are set.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Fields shared with completions.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Unknown fields, kept for pass-through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Echo the prompt text before the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Fields shared with chat.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Unknown fields, kept for pass-through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A request reduced to what an engine needs: validated limits and options, independent of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Output tokens to generate at most (>= 1; prompt + this <= max_model_len).
    pub max_tokens: u32,
    /// Whether `max_tokens` came from the request (reported in `request_params_max_tokens`).
    pub max_tokens_explicit: bool,
    /// Minimum output tokens before EOS/stop counts.
    pub min_tokens: u32,
    /// Never stop at EOS.
    pub ignore_eos: bool,
    /// Stop strings (non-empty).
    pub stop: Vec<String>,
    /// Stop token ids.
    pub stop_token_ids: Vec<u32>,
    /// Request seed, if given.
    pub seed: Option<u64>,
    /// Scheduling priority.
    pub priority: i32,
    /// Prefix-cache salt.
    pub cache_salt: Option<String>,
    /// SSE instead of one JSON body.
    pub stream: bool,
    /// Final usage chunk.
    pub include_usage: bool,
    /// Usage on every chunk.
    pub continuous_usage_stats: bool,
    /// P/D parameters.
    pub kv_transfer_params: Option<KvTransferParams>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_param(param)
}

/// Parse a JSON body into `T`, mapping every failure (syntax, wrong type, missing field) to vLLM's 400.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request(
            "Request body is not valid UTF-8 JSON.",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => "validation error",
            _ => "JSON decode error",
        };
        ApiError::bad_request(format!("{kind}: {e}"))
    })
}

impl CommonParams {
    /// Validate everything but lengths; `max_tokens` is the API's effective max-token field.
    fn validate(
        &self,
        max_tokens: Option<i64>,
        prompt_len: usize,
        max_model_len: u32,
    ) -> Result<GenerationParams, ApiError> {
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(bad(
                "stream_options",
                "Stream options can only be defined when `stream=True`.",
            ));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(bad("n", format!("n={n} is not supported: only n=1 is.")));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(bad(
                "temperature",
                format!("temperature must be non-negative, got {t}."),
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(bad("top_p", format!("top_p must be in (0, 1], got {p}.")));
        }
        if let Some(k) = self.top_k
            && k < -1
        {
            return Err(bad(
                "top_k",
                format!("top_k must be -1 (disable), or at least 1, got {k}."),
            ));
        }
        if let Some(m) = max_tokens
            && m < 1
        {
            return Err(bad(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}."),
            ));
        }
        let min_tokens = match self.min_tokens {
            Some(m) if m < 0 => {
                return Err(bad(
                    "min_tokens",
                    format!("min_tokens must be greater than or equal to 0, got {m}."),
                ));
            }
            Some(m) => m,
            None => 0,
        };
        let max_len = i64::from(max_model_len);
        let prompt = prompt_len as i64;
        if prompt >= max_len {
            return Err(bad(
                "messages",
                format!(
                    "This model's maximum context length is {max_model_len} tokens. However, your request has \
                     {prompt_len} input tokens. Please reduce the length of the input messages."
                ),
            ));
        }
        let effective = match max_tokens {
            Some(m) if m > max_len - prompt => {
                return Err(bad(
                    "max_tokens",
                    format!(
                        "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context \
                         length is {max_model_len} tokens and your request has {prompt_len} input tokens \
                         ({m} > {max_model_len} - {prompt_len})."
                    ),
                ));
            }
            Some(m) => m,
            None => max_len - prompt,
        };
        if min_tokens > effective {
            return Err(bad(
                "min_tokens",
                format!(
                    "min_tokens must be less than or equal to max_tokens={effective}, got {min_tokens}."
                ),
            ));
        }
        let opts = self.stream_options.clone().unwrap_or_default();
        Ok(GenerationParams {
            max_tokens: effective as u32,
            max_tokens_explicit: max_tokens.is_some(),
            min_tokens: min_tokens as u32,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            stop: self
                .stop
                .as_ref()
                .map(StopSpec::strings)
                .unwrap_or_default(),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            seed: self.seed.map(|s| s as u64),
            priority: self.priority.unwrap_or(0),
            cache_salt: self.cache_salt.clone(),
            stream,
            include_usage: stream && opts.include_usage.unwrap_or(false),
            continuous_usage_stats: stream && opts.continuous_usage_stats.unwrap_or(false),
            kv_transfer_params: self.kv_transfer_params.clone(),
        })
    }
}

impl ChatCompletionRequest {
    /// The effective max-token field: `max_completion_tokens` wins over `max_tokens`.
    pub fn max_tokens(&self) -> Option<i64> {
        self.max_completion_tokens.or(self.common.max_tokens)
    }

    /// The chat rendered with the Llama-3 template (generation prompt appended), as text.
    pub fn rendered(&self) -> Result<String, ApiError> {
        if self.messages.is_empty() {
            return Err(bad(
                "messages",
                "messages must contain at least one message.",
            ));
        }
        let mut texts: Vec<(String, String)> = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let text = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(s)) => s.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(bad(
                                "messages",
                                format!(
                                    "messages[{i}]: content part type '{}' is not supported.",
                                    p.kind
                                ),
                            ));
                        }
                        match &p.text {
                            Some(t) => {
                                if !s.is_empty() {
                                    s.push('\n');
                                }
                                s.push_str(t);
                            }
                            None => {
                                return Err(bad(
                                    "messages",
                                    format!("messages[{i}]: text part without `text`."),
                                ));
                            }
                        }
                    }
                    s
                }
            };
            texts.push((m.role.clone(), text));
        }
        let turns: Vec<ChatTurn<'_>> = texts
            .iter()
            .map(|(r, c)| ChatTurn {
                role: r,
                content: c,
            })
            .collect();
        Ok(render_chat(&turns, true))
    }

    /// Token ids of the templated prompt.
    pub fn prompt_ids(&self, tok: &dyn Tokenizer) -> Result<Vec<TokenId>, ApiError> {
        Ok(tok.encode(&self.rendered()?))
    }

    /// Validate the request for a prompt of `prompt_len` tokens on a model with `max_model_len`.
    pub fn validate(
        &self,
        prompt_len: usize,
        max_model_len: u32,
    ) -> Result<GenerationParams, ApiError> {
        self.common
            .validate(self.max_tokens(), prompt_len, max_model_len)
    }
}

impl CompletionRequest {
    /// Token ids of the (single) prompt; a batch of more than one prompt is rejected with 400.
    pub fn prompt_ids(&self, tok: &dyn Tokenizer) -> Result<Vec<TokenId>, ApiError> {
        let multi = || {
            bad(
                "prompt",
                "Batched prompts (more than one prompt per request) are not supported by weir sim.",
            )
        };
        let ids = match &self.prompt {
            Prompt::Text(s) => tok.encode(s),
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Texts(v) if v.len() == 1 => tok.encode(&v[0]),
            Prompt::TokenBatches(v) if v.len() == 1 => v[0].clone(),
            Prompt::Texts(v) if v.is_empty() => Vec::new(),
            Prompt::Texts(_) | Prompt::TokenBatches(_) => return Err(multi()),
        };
        if ids.is_empty() {
            return Err(bad("prompt", "The prompt must not be empty."));
        }
        let vocab = tok.vocab_size();
        if let Some(bad_id) = ids.iter().find(|&&t| t >= vocab) {
            return Err(bad(
                "prompt",
                format!("Token id {bad_id} is out of vocabulary (size {vocab})."),
            ));
        }
        Ok(ids)
    }

    /// The prompt text to echo (token prompts are decoded).
    pub fn prompt_text(&self, tok: &dyn Tokenizer, ids: &[TokenId]) -> String {
        match &self.prompt {
            Prompt::Text(s) => s.clone(),
            Prompt::Texts(v) if v.len() == 1 => v[0].clone(),
            _ => ids.iter().map(|&t| tok.decode_token(t)).collect(),
        }
    }

    /// Validate the request for a prompt of `prompt_len` tokens on a model with `max_model_len`.
    pub fn validate(
        &self,
        prompt_len: usize,
        max_model_len: u32,
    ) -> Result<GenerationParams, ApiError> {
        self.common
            .validate(self.common.max_tokens, prompt_len, max_model_len)
    }
}

/// `POST /tokenize` body: a completion-style `prompt` or chat `messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeRequest {
    /// Optional model name (checked if present).
    #[serde(default)]
    pub model: Option<String>,
    /// Completion-style prompt text.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Chat messages (templated with the generation prompt).
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
}

/// `POST /detokenize` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    /// Optional model name (checked if present).
    #[serde(default)]
    pub model: Option<String>,
    /// Ids to turn back into text.
    pub tokens: Vec<u32>,
}

/// Which OpenAI API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

impl Api {
    /// The request path of this API.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }

    /// The API served at `path`, if any.
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::Chat),
            "/v1/completions" => Some(Self::Completions),
            _ => None,
        }
    }
}

/// A typed request body, parsed in full (lazily: only cache-aware routing needs it).
#[derive(Debug, Clone, PartialEq)]
pub enum TypedRequest {
    /// A chat completion.
    Chat(ChatCompletionRequest),
    /// A text completion.
    Completion(CompletionRequest),
}

/// The fields a proxy reads from a request body; everything else passes through untouched.
#[derive(Debug, Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    messages: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    prompt: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    suffix: Option<serde::de::IgnoredAny>,
}

/// The one view of an OpenAI request a proxy works from, built once at the front door from the raw body `B` and
/// borrowed by every later step. The cheap fields (model, stream, max tokens, token estimate) are read in one
/// borrowing pass that skips the prompt; the full typed parse and the rendered prompt are computed lazily, at most
/// once, and only when a step asks for them (cache-aware routing). The body itself is kept as received, so the
/// upstream body is these bytes or one rewrite of them.
#[derive(Debug)]
pub struct RequestView<B> {
    /// Which API the request is for.
    pub api: Api,
    /// The request body exactly as received.
    pub body: B,
    /// Client-facing model name (a route or alias).
    pub model: String,
    /// SSE response requested.
    pub stream: bool,
    /// The client set `stream_options.include_usage`, so the usage chunk is theirs to see.
    pub client_wants_usage: bool,
    /// `stream_options` is present (a byte splice cannot add a second one).
    pub has_stream_options: bool,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Chat messages in the body (0 for completions): a front door refuses huge chats before any rendering or
    /// tokenizing work.
    pub messages: usize,
    /// The full parse, on first use.
    typed: std::sync::OnceLock<Result<TypedRequest, ApiError>>,
    /// The prompt as text (the chat rendered with its template), on first use.
    rendered: std::sync::OnceLock<Result<String, ApiError>>,
}

fn invalid(message: impl Into<String>, param: Option<&str>, code: &str) -> ApiError {
    ApiError::invalid_request(message, param, code)
}

impl<B: AsRef<[u8]>> RequestView<B> {
    /// Checks the body is a JSON object with what `api` needs and reads the fields a proxy routes on; errors are
    /// OpenAI-shaped 400s.
    pub fn parse(api: Api, body: B) -> Result<Self, ApiError> {
        let raw = body.as_ref();
        if std::str::from_utf8(raw).is_err() {
            return Err(invalid(
                "Request body is not valid UTF-8.",
                None,
                "invalid_json",
            ));
        }
        let p: Peek<'_> = serde_json::from_slice(raw).map_err(|e| {
            let msg = if e.is_data() {
                format!("Invalid request body: {e}")
            } else {
                format!("We could not parse the JSON body of your request: {e}")
            };
            invalid(msg, None, "invalid_json")
        })?;
        let model = match p.model {
            Some(m) if !m.is_empty() => m.into_owned(),
            _ => {
                return Err(invalid(
                    "You must provide a model parameter.",
                    Some("model"),
                    "missing_required_parameter",
                ));
            }
        };
        match api {
            Api::Chat if p.messages.is_none() => {
                return Err(invalid(
                    "Missing required parameter: 'messages'.",
                    Some("messages"),
                    "missing_required_parameter",
                ));
            }
            Api::Chat if p.messages.as_ref().is_some_and(Vec::is_empty) => {
                return Err(invalid(
                    "'messages' must not be empty.",
                    Some("messages"),
                    "invalid_value",
                ));
            }
            Api::Completions if p.prompt.is_none() => {
                return Err(invalid(
                    "Missing required parameter: 'prompt'.",
                    Some("prompt"),
                    "missing_required_parameter",
                ));
            }
            Api::Completions if p.suffix.is_some() => {
                return Err(invalid(
                    "suffix is not currently supported",
                    Some("suffix"),
                    "unsupported_parameter",
                ));
            }
            _ => {}
        }
        let stream = p.stream.unwrap_or(false);
        if p.stream_options.is_some() && !stream {
            return Err(invalid(
                "Stream options can only be defined when `stream=True`.",
                Some("stream_options"),
                "invalid_value",
            ));
        }
        let client_wants_usage = p
            .stream_options
            .as_ref()
            .and_then(|s| s.include_usage)
            .unwrap_or(false);
        Ok(Self {
            api,
            model,
            stream,
            client_wants_usage,
            has_stream_options: p.stream_options.is_some(),
            max_tokens: p.max_completion_tokens.or(p.max_tokens),
            messages: p.messages.as_ref().map_or(0, Vec::len),
            body,
            typed: std::sync::OnceLock::new(),
            rendered: std::sync::OnceLock::new(),
        })
    }

    /// Prompt tokens estimated from the body size (about 4 bytes per token), before any tokenizer runs.
    pub fn estimated_prompt_tokens(&self) -> u32 {
        u32::try_from(self.body.as_ref().len() / 4).unwrap_or(u32::MAX)
    }

    /// The estimated cost of the request in tokens: the prompt estimate plus the output limit.
    pub fn estimated_tokens(&self) -> u64 {
        u64::from(self.estimated_prompt_tokens()) + u64::from(self.max_tokens.unwrap_or(0))
    }

    /// The client asked for a stream but not for its usage chunk: a proxy that must count tokens asks the server
    /// for usage anyway and strips the chunk on the way back.
    pub fn needs_usage_injected(&self) -> bool {
        self.stream && !self.client_wants_usage
    }

    /// The full typed parse of the body (vLLM's 400 on failure), computed on first use.
    pub fn typed(&self) -> Result<&TypedRequest, &ApiError> {
        self.typed
            .get_or_init(|| match self.api {
                Api::Chat => parse_body(self.body.as_ref()).map(TypedRequest::Chat),
                Api::Completions => parse_body(self.body.as_ref()).map(TypedRequest::Completion),
            })
            .as_ref()
    }

    /// The prompt as text (a chat rendered with its template; a single text prompt as is), computed on first use.
    /// Token-id prompts have no text: they are an error here, read them with [`Self::prompt_ids`].
    pub fn rendered(&self) -> Result<&str, &ApiError> {
        self.rendered
            .get_or_init(|| match self.typed() {
                Err(e) => Err(e.clone()),
                Ok(TypedRequest::Chat(c)) => c.rendered(),
                Ok(TypedRequest::Completion(c)) => match &c.prompt {
                    Prompt::Text(s) => Ok(s.clone()),
                    Prompt::Texts(v) if v.len() == 1 => Ok(v[0].clone()),
                    _ => Err(bad("prompt", "The prompt is not a single text.")),
                },
            })
            .as_deref()
    }

    /// Token ids of the prompt under `tok` (the pod's tokenizer), from the rendered text or the token-id prompt.
    pub fn prompt_ids(&self, tok: &dyn Tokenizer) -> Result<Vec<TokenId>, ApiError> {
        match self.typed().map_err(Clone::clone)? {
            TypedRequest::Chat(_) => Ok(tok.encode(self.rendered().map_err(Clone::clone)?)),
            TypedRequest::Completion(c) => c.prompt_ids(tok),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::ByteTokenizer;

    fn chat(body: &str) -> ChatCompletionRequest {
        parse_body(body.as_bytes()).unwrap()
    }

    #[test]
    fn max_completion_tokens_wins() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":7}"#,
        );
        assert_eq!(r.validate(10, 100).unwrap().max_tokens, 7);
    }

    #[test]
    fn absent_max_tokens_fills_context() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let p = r.validate(10, 100).unwrap();
        assert_eq!(p.max_tokens, 90);
        assert!(!p.max_tokens_explicit);
    }

    #[test]
    fn text_parts_render_like_strings() {
        let a = chat(r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#);
        let b = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hello"}]}]}"#,
        );
        assert_eq!(
            a.prompt_ids(&ByteTokenizer).unwrap(),
            b.prompt_ids(&ByteTokenizer).unwrap()
        );
    }

    #[test]
    fn unknown_fields_are_kept() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"frequency_penalty":0.5}"#,
        );
        assert_eq!(
            r.extra.get("frequency_penalty"),
            Some(&serde_json::json!(0.5))
        );
    }

    #[test]
    fn rejects_bad_inputs_naming_the_param() {
        let cases = [
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""n":2"#, "n"),
            (r#""temperature":-1"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""top_k":-5"#, "top_k"),
            (
                r#""stream_options":{"include_usage":true}"#,
                "stream_options",
            ),
            (r#""max_tokens":95"#, "max_tokens"),
            (r#""min_tokens":20,"max_tokens":10"#, "min_tokens"),
        ];
        for (extra, param) in cases {
            let r = chat(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#
            ));
            let e = r.validate(10, 100).unwrap_err();
            assert_eq!(e.status, 400, "{extra}");
            assert_eq!(e.param.as_deref(), Some(param), "{extra}");
        }
    }

    #[test]
    fn too_long_message_gives_both_numbers() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":95}"#);
        let e = r.validate(10, 100).unwrap_err();
        assert!(
            e.message.contains("95") && e.message.contains("100") && e.message.contains("10 input"),
            "{}",
            e.message
        );
    }

    #[test]
    fn wrong_types_and_bad_json_are_400() {
        for body in [
            r#"{"model":"m","messages":"nope"}"#,
            "{not json",
            r#"{"messages":[]}"#,
        ] {
            let e = parse_body::<ChatCompletionRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.kind, "BadRequestError");
        }
        let e = parse_body::<ChatCompletionRequest>(&[0xff, 0xfe]).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn completion_prompt_forms() {
        let tok = ByteTokenizer;
        let p = |s: &str| parse_body::<CompletionRequest>(s.as_bytes()).unwrap();
        assert_eq!(
            p(r#"{"model":"m","prompt":[1,2,3]}"#)
                .prompt_ids(&tok)
                .unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":[[4,5]]}"#)
                .prompt_ids(&tok)
                .unwrap(),
            vec![4, 5]
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":["abcdefgh"]}"#)
                .prompt_ids(&tok)
                .unwrap(),
            p(r#"{"model":"m","prompt":"abcdefgh"}"#)
                .prompt_ids(&tok)
                .unwrap()
        );
        let e = p(r#"{"model":"m","prompt":["a","b"]}"#)
            .prompt_ids(&tok)
            .unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("prompt")));
        let e = p(r#"{"model":"m","prompt":[999999999]}"#)
            .prompt_ids(&tok)
            .unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn stop_and_stream_options() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stop":"END",
                "stream_options":{"include_usage":true}}"#,
        );
        let p = r.validate(3, 100).unwrap();
        assert!(p.stream && p.include_usage && !p.continuous_usage_stats);
        assert_eq!(p.stop, vec!["END".to_string()]);
    }

    #[test]
    fn kv_transfer_params_round_trip() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                "kv_transfer_params":{"do_remote_prefill":true,"remote_block_ids":[1,2],"remote_engine_id":"e",
                "remote_host":"10.0.0.1","remote_port":8001,"tp_size":1}}"#,
        );
        let kv = r.common.kv_transfer_params.unwrap();
        assert!(kv.do_remote_prefill && !kv.do_remote_decode);
        assert_eq!(kv.remote_block_ids, Some(vec![1, 2]));
        assert_eq!(kv.remote_port, Some(8001));
    }

    #[test]
    fn view_rejects_bad_bodies_with_openai_errors() {
        let p = |api, b: &'static [u8]| RequestView::parse(api, b).unwrap_err();
        let e = p(Api::Chat, b"{not json");
        assert_eq!((e.status, e.code.as_deref()), (400, Some("invalid_json")));
        assert_eq!(p(Api::Chat, b"[1,2]").status, 400);
        let e = p(
            Api::Chat,
            br#"{"messages":[{"role":"user","content":"x"}]}"#,
        );
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = p(Api::Chat, br#"{"model":"m"}"#);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = p(
            Api::Completions,
            br#"{"model":"m","prompt":"x","suffix":"y"}"#,
        );
        assert_eq!(e.code.as_deref(), Some("unsupported_parameter"));
        let e = p(
            Api::Completions,
            br#"{"model":"m","prompt":"x","stream_options":{}}"#,
        );
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        assert_eq!(
            p(Api::Completions, b"{\"model\":\"m\xff\",\"prompt\":\"x\"}").status,
            400
        );
        assert_eq!(
            p(Api::Completions, br#"{"model":7,"prompt":"x"}"#).status,
            400
        );
    }

    #[test]
    fn view_reads_routing_fields_and_parses_the_rest_once_on_demand() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hello"}],"stream":true,"max_tokens":5,"max_completion_tokens":9}"#;
        let v = RequestView::parse(Api::Chat, &body[..]).unwrap();
        assert_eq!(
            (v.model.as_str(), v.stream, v.max_tokens),
            ("m", true, Some(9))
        );
        assert!(v.needs_usage_injected());
        assert_eq!(v.estimated_tokens(), (body.len() / 4) as u64 + 9);
        let first: *const str = v.rendered().unwrap();
        let second: *const str = v.rendered().unwrap();
        assert!(std::ptr::eq(first, second), "rendered once");
        assert!(v.rendered().unwrap().contains("hello"));
        let tok = ByteTokenizer;
        assert_eq!(
            v.prompt_ids(&tok).unwrap(),
            chat(std::str::from_utf8(body).unwrap())
                .prompt_ids(&tok)
                .unwrap()
        );
        let v = RequestView::parse(Api::Completions, &br#"{"model":"m","prompt":[1,2,3]}"#[..])
            .unwrap();
        assert_eq!(v.prompt_ids(&tok).unwrap(), vec![1, 2, 3]);
        assert!(v.rendered().is_err());
        assert!(!v.needs_usage_injected());
    }
}
