//! `/v1/completions` and `/v1/chat/completions`: parse and validate, submit to the engine driver, answer as one JSON
//! body or as SSE (vLLM's framing: `data: <json>\n\n` per event, role chunk first for chat, one chunk per token,
//! `finish_reason` on the last token's chunk, an optional usage chunk with `"choices":[]`, then `data: [DONE]\n\n`).
//! Fault plans are acted out here: error replies, hangs, mid-stream errors and dropped connections.

use std::io;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use policies::errors::ApiError;
use policies::openai::{
    ChatCompletionRequest, CompletionRequest, GenerationParams, KvTransferParams, parse_body,
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::text::{StopScanner, token_text};
use super::{
    Fail, PodState, check_auth, check_ready, json_response, read_body, request_id_header,
    with_request_id,
};
use crate::driver::{RequestHandle, Update};
use crate::engine::{EngineRequest, Event, FinishReason, KvTransfer, Usage};
use crate::faults::{FaultPlan, error_for_status};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

/// A validated request ready to run.
struct Prepared {
    api: Api,
    /// Response id (`chatcmpl-..` / `cmpl-..`).
    id: String,
    created: u64,
    model: String,
    prompt: Vec<u32>,
    params: GenerationParams,
    /// Completions `echo`: the prompt text to prepend.
    echo: Option<String>,
    plan: FaultPlan,
}

pub(super) async fn chat(State(s): State<PodState>, headers: HeaderMap, body: Body) -> Response {
    handle(s, headers, body, Api::Chat).await
}

pub(super) async fn completions(
    State(s): State<PodState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, headers, body, Api::Completion).await
}

pub(super) async fn render_chat(
    State(s): State<PodState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    render(s, headers, body, Api::Chat).await
}

pub(super) async fn render_completion(
    State(s): State<PodState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    render(s, headers, body, Api::Completion).await
}

async fn render(s: PodState, headers: HeaderMap, body: Body, api: Api) -> Response {
    if let Err(r) = check_auth(&s, &headers) {
        return r;
    }
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ids = match api {
        Api::Chat => parse_body::<ChatCompletionRequest>(&bytes).and_then(|r| {
            s.model_ok(&r.common.model)?;
            r.prompt_ids(&*s.0.tokenizer)
        }),
        Api::Completion => parse_body::<CompletionRequest>(&bytes).and_then(|r| {
            s.model_ok(&r.common.model)?;
            r.prompt_ids(&*s.0.tokenizer)
        }),
    };
    match ids {
        Ok(ids) => json_response(
            StatusCode::OK,
            serde_json::json!({ "token_ids": ids }).to_string(),
        ),
        Err(e) => Fail(e).into_response(),
    }
}

async fn handle(s: PodState, headers: HeaderMap, body: Body, api: Api) -> Response {
    let arrived = tokio::time::Instant::now();
    let floor = s.0.cfg.min_latency;
    let res = respond(s, headers, body, api).await;
    if !floor.is_zero() {
        crate::precise::sleep_until(arrived + floor).await;
    }
    res
}

async fn respond(s: PodState, headers: HeaderMap, body: Body, api: Api) -> Response {
    if let Err(r) = check_auth(&s, &headers) {
        return r;
    }
    if let Err(r) = check_ready(&s) {
        return r;
    }
    let rid = request_id_header(&headers).unwrap_or_else(|| s.hex_id());
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(r) => return with_request_id(r, &rid),
    };
    let res = match prepare(&s, &headers, &bytes, api, &rid) {
        Ok(p) => run(s, p).await,
        Err(e) => Fail(e).into_response(),
    };
    with_request_id(res, &rid)
}

fn forced_error(headers: &HeaderMap) -> Option<u16> {
    headers
        .get("x-return-error")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok())
        .filter(|s| (400..=599).contains(s))
}

fn prepare(
    s: &PodState,
    headers: &HeaderMap,
    bytes: &[u8],
    api: Api,
    rid: &str,
) -> Result<Prepared, ApiError> {
    if let Some(status) = forced_error(headers) {
        return Err(error_for_status(status));
    }
    let tok = &*s.0.tokenizer;
    let max_len = s.0.cfg.max_model_len;
    let (model, prompt, params, echo) = match api {
        Api::Chat => {
            let r: ChatCompletionRequest = parse_body(bytes)?;
            s.model_ok(&r.common.model)?;
            let ids = r.prompt_ids(tok)?;
            let p = r.validate(ids.len(), max_len)?;
            (r.common.model, ids, p, None)
        }
        Api::Completion => {
            let r: CompletionRequest = parse_body(bytes)?;
            s.model_ok(&r.common.model)?;
            let ids = r.prompt_ids(tok)?;
            let p = r.validate(ids.len(), max_len)?;
            let echo = r.echo.unwrap_or(false).then(|| r.prompt_text(tok, &ids));
            (r.common.model, ids, p, echo)
        }
    };
    let plan = s.0.faults.plan(None, params.max_tokens);
    if let Some(e) = plan.error.clone() {
        return Err(e);
    }
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    Ok(Prepared {
        api,
        id: format!("{prefix}-{rid}"),
        created: crate::driver::unix_now() as u64,
        model,
        prompt,
        params,
        echo,
        plan,
    })
}

fn kv_transfer(p: &GenerationParams) -> Result<KvTransfer, ApiError> {
    let Some(k) = &p.kv_transfer_params else {
        return Ok(KvTransfer::None);
    };
    if k.do_remote_prefill {
        let missing = |f: &str| {
            ApiError::bad_request(format!(
                "kv_transfer_params.{f} is required with do_remote_prefill"
            ))
            .with_param("kv_transfer_params")
        };
        return Ok(KvTransfer::RemotePrefill {
            remote_engine_id: k
                .remote_engine_id
                .clone()
                .ok_or_else(|| missing("remote_engine_id"))?,
            remote_block_ids: k
                .remote_block_ids
                .clone()
                .ok_or_else(|| missing("remote_block_ids"))?,
            remote_host: k
                .remote_host
                .clone()
                .ok_or_else(|| missing("remote_host"))?,
            remote_port: k.remote_port.ok_or_else(|| missing("remote_port"))?,
            remote_request_id: k.remote_request_id.clone(),
        });
    }
    Ok(if k.do_remote_decode {
        KvTransfer::RemoteDecode
    } else {
        KvTransfer::None
    })
}

async fn run(s: PodState, p: Prepared) -> Response {
    if p.plan.hang {
        // Accept and never answer; the client's disconnect drops this future.
        std::future::pending::<()>().await;
    }
    let kv = match kv_transfer(&p.params) {
        Ok(kv) => kv,
        Err(e) => return Fail(e).into_response(),
    };
    let gen_seed = p.params.seed.unwrap_or_else(|| {
        let bytes: Vec<u8> = p.prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxhash_rust::xxh3::xxh3_64(&bytes)
    });
    let mut req = EngineRequest::new(
        s.0.driver.next_id(),
        p.prompt.clone(),
        p.params.max_tokens,
        gen_seed,
    );
    req.min_tokens = p.params.min_tokens;
    req.ignore_eos = p.params.ignore_eos;
    req.priority = p.params.priority;
    req.cache_salt = p.params.cache_salt.clone();
    req.stop_token_ids = p.params.stop_token_ids.clone();
    req.kv = kv;
    let handle = s.0.driver.submit(req, p.params.max_tokens);
    if p.params.stream {
        let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(64);
        tokio::spawn(stream_task(s, p, handle, tx));
        let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|x| (x, rx))
        }));
        (
            [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
            body,
        )
            .into_response()
    } else {
        full(s, p, handle).await
    }
}

/// A body that fails before any byte: hyper drops the connection (the "crash" fault).
fn crash_response() -> Response {
    let body = Body::from_stream(futures::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "injected crash",
        ))
    }));
    (StatusCode::OK, body).into_response()
}

// ---- response shapes (field order as vLLM's pydantic models) ----

#[derive(Serialize, Clone, Copy)]
struct PromptDetails {
    cached_tokens: u32,
}

#[derive(Serialize, Clone, Copy)]
struct UsageJson {
    prompt_tokens: u32,
    total_tokens: u32,
    completion_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<Option<PromptDetails>>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    tool_calls: [(); 0],
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'a str,
    stop_reason: &'a Value,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
    stop_reason: &'a Value,
}

#[derive(Serialize)]
struct FullResponse<'a, C: Serialize> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    usage: UsageJson,
    kv_transfer_params: Option<KvTransferParams>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<&'a Value>,
}

#[derive(Serialize)]
struct Chunk<'a, C: Serialize> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageJson>,
}

/// How a request ended, in response terms.
struct Outcome {
    finish_reason: &'static str,
    stop_reason: Value,
}

fn outcome(
    reason: FinishReason,
    stop_token: Option<u32>,
    scan: &StopScanner,
    p: &GenerationParams,
) -> Outcome {
    if let Some(s) = &scan.matched {
        return Outcome {
            finish_reason: "stop",
            stop_reason: Value::String(s.clone()),
        };
    }
    match reason {
        FinishReason::Stop => Outcome {
            finish_reason: "stop",
            stop_reason: stop_token
                .filter(|t| p.stop_token_ids.contains(t))
                .map_or(Value::Null, Value::from),
        },
        FinishReason::Length => Outcome {
            finish_reason: "length",
            stop_reason: Value::Null,
        },
        FinishReason::Abort => Outcome {
            finish_reason: "abort",
            stop_reason: Value::Null,
        },
    }
}

fn usage_json(
    s: &PodState,
    prompt: u32,
    completion: u32,
    cached: u32,
    in_stream: bool,
) -> UsageJson {
    let details = if s.0.cfg.enable_prompt_tokens_details {
        Some(Some(PromptDetails {
            cached_tokens: cached,
        }))
    } else if in_stream {
        None
    } else {
        Some(None)
    };
    UsageJson {
        prompt_tokens: prompt,
        total_tokens: prompt + completion,
        completion_tokens: completion,
        prompt_tokens_details: details,
    }
}

fn handoff_params(
    s: &PodState,
    handoff: Option<crate::engine::Handoff>,
) -> Option<KvTransferParams> {
    let h = handoff?;
    Some(KvTransferParams {
        do_remote_decode: false,
        do_remote_prefill: true,
        remote_engine_id: Some(h.remote_engine_id),
        remote_block_ids: Some(h.remote_block_ids),
        remote_host: Some(s.0.cfg.advertise_host.clone()),
        remote_port: Some(s.0.cfg.http_port),
        tp_size: Some(s.0.cfg.tp),
        remote_request_id: Some(h.remote_request_id),
    })
}

fn rejected(msg: String) -> ApiError {
    ApiError::bad_request(msg)
}

/// Non-streaming: wait for the whole answer.
async fn full(s: PodState, p: Prepared, mut h: RequestHandle) -> Response {
    let tok = &*s.0.tokenizer;
    let mut scan = StopScanner::new(p.params.stop.clone());
    let mut n = 0u32;
    loop {
        let Some(u) = h.next().await else {
            return Fail(ApiError::internal("The engine stopped.")).into_response();
        };
        match u {
            Update::Rejected(m) => return Fail(rejected(m)).into_response(),
            Update::Event(Event::Token { token, .. }) => {
                if scan.matched.is_some() {
                    continue;
                }
                n += 1;
                if p.plan.crash_after.is_some_and(|c| n > c) {
                    return crash_response();
                }
                if p.plan.midstream_error_after.is_some_and(|c| n > c) {
                    return Fail(ApiError::internal("Injected failure during generation."))
                        .into_response();
                }
                scan.push(&token_text(tok, token));
                if scan.matched.is_some() {
                    h.stop();
                }
            }
            Update::Event(Event::Finished {
                reason,
                stop_token,
                usage,
                handoff,
                ..
            }) => {
                scan.flush();
                let o = outcome(reason, stop_token, &scan, &p.params);
                let completion = if scan.matched.is_some() {
                    n
                } else {
                    usage.completion_tokens
                };
                let u = usage_json(
                    &s,
                    usage.prompt_tokens,
                    completion,
                    usage.cached_tokens,
                    false,
                );
                let kv = handoff_params(&s, handoff);
                let body = match p.api {
                    Api::Chat => serde_json::to_string(&FullResponse {
                        id: &p.id,
                        object: "chat.completion",
                        created: p.created,
                        model: &p.model,
                        choices: [ChatChoice {
                            index: 0,
                            message: Message {
                                role: "assistant",
                                content: scan.text(),
                                tool_calls: [],
                            },
                            logprobs: None,
                            finish_reason: o.finish_reason,
                            stop_reason: &o.stop_reason,
                        }],
                        usage: u,
                        kv_transfer_params: kv,
                    }),
                    Api::Completion => {
                        let text = match &p.echo {
                            Some(e) => format!("{e}{}", scan.text()),
                            None => scan.text().to_string(),
                        };
                        serde_json::to_string(&FullResponse {
                            id: &p.id,
                            object: "text_completion",
                            created: p.created,
                            model: &p.model,
                            choices: [TextChoice {
                                index: 0,
                                text: &text,
                                logprobs: None,
                                finish_reason: Some(o.finish_reason),
                                stop_reason: &o.stop_reason,
                            }],
                            usage: u,
                            kv_transfer_params: kv,
                        })
                    }
                };
                return match body {
                    Ok(b) => json_response(StatusCode::OK, b),
                    Err(e) => Fail(ApiError::internal(e.to_string())).into_response(),
                };
            }
            Update::Event(Event::TransferDone { .. }) => {}
        }
    }
}

/// Formats SSE events of one streamed response.
struct Sse<'a> {
    s: &'a PodState,
    p: &'a Prepared,
}

impl Sse<'_> {
    fn event<T: Serialize>(v: &T) -> Bytes {
        let mut out = b"data: ".to_vec();
        // Serializing these plain structs cannot fail.
        let _ = serde_json::to_writer(&mut out, v);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    fn running_usage(&self, completion: u32) -> Option<UsageJson> {
        self.p
            .params
            .continuous_usage_stats
            .then(|| usage_json(self.s, self.p.prompt.len() as u32, completion, 0, true))
    }

    fn role(&self) -> Bytes {
        Self::event(&Chunk {
            id: &self.p.id,
            object: "chat.completion.chunk",
            created: self.p.created,
            model: &self.p.model,
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(""),
                },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            }],
            usage: self.running_usage(0),
        })
    }

    fn content(&self, text: &str, end: Option<&Outcome>, completion: u32) -> Bytes {
        let usage = self.running_usage(completion);
        match self.p.api {
            Api::Chat => Self::event(&Chunk {
                id: &self.p.id,
                object: "chat.completion.chunk",
                created: self.p.created,
                model: &self.p.model,
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: None,
                        content: Some(text),
                    },
                    logprobs: None,
                    finish_reason: end.map(|o| o.finish_reason),
                    stop_reason: end.map(|o| &o.stop_reason),
                }],
                usage,
            }),
            Api::Completion => Self::event(&Chunk {
                id: &self.p.id,
                object: "text_completion",
                created: self.p.created,
                model: &self.p.model,
                choices: vec![TextChoice {
                    index: 0,
                    text,
                    logprobs: None,
                    finish_reason: end.map(|o| o.finish_reason),
                    stop_reason: end.map_or(&Value::Null, |o| &o.stop_reason),
                }],
                usage,
            }),
        }
    }

    fn usage(&self, usage: &Usage, completion: u32) -> Bytes {
        let object = if self.p.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        Self::event(&Chunk::<ChatChunkChoice<'_>> {
            id: &self.p.id,
            object,
            created: self.p.created,
            model: &self.p.model,
            choices: vec![],
            usage: Some(usage_json(
                self.s,
                usage.prompt_tokens,
                completion,
                usage.cached_tokens,
                true,
            )),
        })
    }
}

const DONE: &[u8] = b"data: [DONE]\n\n";

fn error_event(e: &ApiError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", e.vllm_json()))
}

/// Streaming: one task per response, feeding the body channel; ends (aborting the request) if the client leaves.
async fn stream_task(
    s: PodState,
    p: Prepared,
    mut h: RequestHandle,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
) {
    let sse = Sse { s: &s, p: &p };
    let tok = &*s.0.tokenizer;
    let mut scan = StopScanner::new(p.params.stop.clone());
    let mut n = 0u32;
    let mut sent_role = false;
    let mut ended: Option<Outcome> = None;
    macro_rules! send {
        ($b:expr) => {
            if tx.send(Ok($b)).await.is_err() {
                return;
            }
        };
    }
    if let Some(e) = &p.echo {
        send!(sse.content(e, None, 0));
    }
    loop {
        let u = tokio::select! {
            u = h.next() => u,
            () = tx.closed() => return,
        };
        let Some(u) = u else {
            send!(error_event(&ApiError::internal("The engine stopped.")));
            send!(Bytes::from_static(DONE));
            return;
        };
        match u {
            Update::Rejected(m) => {
                send!(error_event(&rejected(m)));
                send!(Bytes::from_static(DONE));
                return;
            }
            Update::Event(Event::Token { token, .. }) => {
                if ended.is_some() {
                    continue;
                }
                n += 1;
                if p.plan.crash_after.is_some_and(|c| n > c) {
                    let _ = tx
                        .send(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "injected crash",
                        )))
                        .await;
                    return;
                }
                if p.plan.midstream_error_after.is_some_and(|c| n > c) {
                    send!(error_event(&ApiError::internal(
                        "Injected failure during generation."
                    )));
                    send!(Bytes::from_static(DONE));
                    return;
                }
                if !sent_role && p.api == Api::Chat {
                    sent_role = true;
                    send!(sse.role());
                }
                let mut text = scan.push(&token_text(tok, token));
                if scan.matched.is_some() {
                    h.stop();
                    let o = outcome(FinishReason::Stop, None, &scan, &p.params);
                    send!(sse.content(&text, Some(&o), n));
                    ended = Some(o);
                    continue;
                }
                // The engine delivers a request's last token and its `Finished` together: peek for it so the
                // finish reason rides on this token's chunk.
                match h.try_next() {
                    Some(Update::Event(Event::Finished {
                        reason,
                        stop_token,
                        usage,
                        ..
                    })) => {
                        text.push_str(&scan.flush());
                        let o = outcome(reason, stop_token, &scan, &p.params);
                        send!(sse.content(&text, Some(&o), n));
                        if p.params.include_usage {
                            send!(sse.usage(&usage, usage.completion_tokens));
                        }
                        send!(Bytes::from_static(DONE));
                        return;
                    }
                    Some(other) => {
                        send!(sse.content(&text, None, n));
                        h.push_back(other);
                    }
                    None => send!(sse.content(&text, None, n)),
                }
            }
            Update::Event(Event::Finished {
                reason,
                stop_token,
                usage,
                ..
            }) => {
                let completion = if ended.is_some() {
                    n
                } else {
                    usage.completion_tokens
                };
                if ended.is_none() {
                    // Finished without a final token chunk (e.g. aborted): close the choice.
                    if !sent_role && p.api == Api::Chat {
                        send!(sse.role());
                    }
                    let text = scan.flush();
                    let o = outcome(reason, stop_token, &scan, &p.params);
                    send!(sse.content(&text, Some(&o), n));
                }
                if p.params.include_usage {
                    send!(sse.usage(&usage, completion));
                }
                send!(Bytes::from_static(DONE));
                return;
            }
            Update::Event(Event::TransferDone { .. }) => {}
        }
    }
}
