//! vLLM's Prometheus series, kept per pod and printed exactly as vLLM's Python `prometheus_client` prints them.
//!
//! Routers, the metrics adapter and the autoscaler scrape these series from real vLLM pods, so the simulator must
//! print them byte-compatibly: text format 0.0.4, labels sorted by name (`engine` before `model_name`, `le` in
//! between), counters as `_total` with their `_created` samples gathered at the end of the family under a separate
//! `gauge` header, histograms as `_bucket`/`_count`/`_sum` then `_created`, floats formatted like Go/Python
//! (`0.0`, `1e-05`, `1.7324e+09`). The exposition is hand-written: the Rust `prometheus-client` crate only speaks
//! OpenMetrics, whose framing differs from what vLLM serves.
//!
//! Updated by the engine driver once per step ([`Metrics::on_step`]) and per finished request
//! ([`Metrics::on_finished`]); no clock is read here: callers pass times in.

use std::fmt::Write as _;

/// Buckets of `vllm:time_to_first_token_seconds`.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Buckets of `vllm:inter_token_latency_seconds` and friends.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Buckets of the request latency histograms (e2e, queue, prefill, decode, inference).
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Buckets of `vllm:iteration_tokens_total`.
pub const ITERATION_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// Buckets of `weir_sim_token_lateness_seconds` (sim-only: how late tokens reach clients vs. the model schedule).
pub const LATENESS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// vLLM's `build_1_2_5_buckets(max)`: 1, 2, 5, 10, 20, 50, ... up to `max`.
pub fn buckets_1_2_5(max: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exp = 1u64;
    loop {
        for m in [1u64, 2, 5] {
            let v = m.saturating_mul(exp);
            if v > max {
                return out;
            }
            out.push(v as f64);
        }
        exp = exp.saturating_mul(10);
    }
}

/// A float as Python's `prometheus_client.utils.floatToGoString` prints it.
pub fn go_float(d: f64) -> String {
    if d == f64::INFINITY {
        return "+Inf".into();
    }
    if d == f64::NEG_INFINITY {
        return "-Inf".into();
    }
    if d.is_nan() {
        return "NaN".into();
    }
    let s = py_repr(d);
    if let Some(dot) = s.find('.')
        && d > 0.0
        && dot > 6
    {
        let mantissa = format!("{}.{}{}", &s[..1], &s[1..dot], &s[dot + 1..]);
        let mantissa = mantissa.trim_end_matches(['0', '.']);
        return format!("{mantissa}e+0{}", dot - 1);
    }
    s
}

/// Python's `repr(float)`: shortest round-trip digits, scientific below 1e-4 and from 1e16.
pub fn py_repr(d: f64) -> String {
    if d == 0.0 {
        return if d.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{d:e}"); // e.g. "1.5e-5", "-2e3"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{d}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper bounds, ascending (`+Inf` implied).
    bounds: Vec<f64>,
    /// Non-cumulative count per bound, plus one for `+Inf`.
    counts: Vec<u64>,
    /// Sum of observed values.
    sum: f64,
}

impl Histogram {
    /// An empty histogram with these upper bounds.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Record one value.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Smallest bucket bound at or above quantile `q` of the observations (`+Inf` if in the overflow bucket).
    pub fn quantile_bound(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let target = (q * total as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= target {
                return self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    }
}

/// Per-step facts the driver feeds in (mirrors the engine's `StepStats`, kept separate so this module has no engine
/// dependency).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepFacts {
    /// Tokens scheduled in the step (prefill + decode).
    pub num_scheduled_tokens: u32,
    /// Prefill tokens computed in the step.
    pub num_prefill_tokens: u32,
    /// Decode sequences in the step (one generated token each).
    pub num_decode_seqs: u32,
    /// Whole prompts of requests that produced their first token in the step (`vllm:prompt_tokens_total`).
    pub num_prompt_tokens: u32,
    /// Tokens produced in the step, first tokens included (`vllm:generation_tokens_total`).
    pub num_generation_tokens: u32,
    /// Prompt tokens looked up in the local prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the local prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens looked up remotely (P/D pull).
    pub external_queries: u64,
    /// Prompt tokens pulled from a remote engine.
    pub external_hits: u64,
    /// Requests preempted in the step.
    pub preemptions: u32,
}

/// Engine gauges sampled after each step.
#[derive(Debug, Clone, Copy, Default)]
pub struct GaugeFacts {
    /// Requests in the running batch.
    pub running: u32,
    /// Requests waiting (preempted included).
    pub waiting: u32,
    /// KV-cache usage, 0..1.
    pub kv_usage: f64,
}

/// One finished request's facts, model-time seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct FinishedFacts {
    /// `"stop"`, `"length"` or `"abort"`.
    pub reason: &'static str,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// The request's `max_tokens` (explicit or implied).
    pub max_tokens: u32,
    /// Arrival at the engine.
    pub arrival: f64,
    /// First scheduled.
    pub first_scheduled: f64,
    /// First token produced.
    pub first_token: f64,
    /// Last token produced.
    pub finished: f64,
}

/// Static facts printed in the info series.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `model_name` label (the first served model name).
    pub model_name: String,
    /// Print the legacy (pre-V1) names too.
    pub legacy: bool,
    /// Upper bound for the 1-2-5 token-count buckets.
    pub max_model_len: u32,
    /// `vllm:cache_config_info` labels, `(name, value)`; sorted on output.
    pub cache_config: Vec<(String, String)>,
    /// GPU type printed as `weir_gpu_info{gpu=".."} 1.0` (weir's own info series, in the style of vLLM's
    /// `cache_config_info`; vLLM has no GPU-type series), so a router without a `weir.dev/gpu` label learns it.
    pub gpu: Option<String>,
    /// Unix time the series were created (`_created`).
    pub created_unix: f64,
}

const REASONS: [&str; 3] = ["abort", "length", "stop"];

/// All series of one pod.
#[derive(Debug, Clone)]
pub struct Metrics {
    cfg: MetricsConfig,
    gauges: GaugeFacts,
    prefix_queries: u64,
    prefix_hits: u64,
    external_queries: u64,
    external_hits: u64,
    preemptions: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    success: [u64; 3],
    ttft: Histogram,
    itl: Histogram,
    tpot_per_request: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    inference: Histogram,
    req_prompt_tokens: Histogram,
    req_generation_tokens: Histogram,
    req_max_tokens: Histogram,
    iteration_tokens: Histogram,
    lateness: Histogram,
    /// Unix time of the latest LoRA-info sample (vLLM's value for `vllm:lora_requests_info`).
    lora_info_time: f64,
}

impl Metrics {
    /// Zeroed series.
    pub fn new(cfg: MetricsConfig) -> Self {
        let tok = buckets_1_2_5(u64::from(cfg.max_model_len.max(1)));
        Self {
            gauges: GaugeFacts::default(),
            prefix_queries: 0,
            prefix_hits: 0,
            external_queries: 0,
            external_hits: 0,
            preemptions: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            success: [0; 3],
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            tpot_per_request: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            queue: Histogram::new(E2E_BUCKETS),
            prefill: Histogram::new(E2E_BUCKETS),
            decode: Histogram::new(E2E_BUCKETS),
            inference: Histogram::new(E2E_BUCKETS),
            req_prompt_tokens: Histogram::new(&tok),
            req_generation_tokens: Histogram::new(&tok),
            req_max_tokens: Histogram::new(&tok),
            iteration_tokens: Histogram::new(ITERATION_BUCKETS),
            lateness: Histogram::new(LATENESS_BUCKETS),
            lora_info_time: cfg.created_unix,
            cfg,
        }
    }

    /// One engine step: counters and gauges. `now_unix` stamps the LoRA info sample.
    pub fn on_step(&mut self, s: &StepFacts, g: GaugeFacts, now_unix: f64) {
        self.gauges = g;
        self.prefix_queries += s.prefix_queries;
        self.prefix_hits += s.prefix_hits;
        self.external_queries += s.external_queries;
        self.external_hits += s.external_hits;
        self.preemptions += u64::from(s.preemptions);
        // vLLM v1 semantics: a request's whole prompt when it produces its first token (cached part included,
        // recomputation after preemption not counted again), and every produced token.
        self.prompt_tokens += u64::from(s.num_prompt_tokens);
        self.generation_tokens += u64::from(s.num_generation_tokens);
        if s.num_scheduled_tokens > 0 {
            self.iteration_tokens
                .observe(f64::from(s.num_scheduled_tokens));
        }
        self.lora_info_time = now_unix;
    }

    /// Refresh gauges without a step (after an abort or a cache reset).
    pub fn set_gauges(&mut self, g: GaugeFacts) {
        self.gauges = g;
    }

    /// One inter-token gap (model seconds).
    pub fn on_inter_token(&mut self, gap: f64) {
        self.itl.observe(gap);
    }

    /// One token's delivery lateness (real seconds past its scheduled step end).
    pub fn on_lateness(&mut self, late: f64) {
        self.lateness.observe(late.max(0.0));
    }

    /// The lateness histogram (for tests and load reports).
    pub fn lateness(&self) -> &Histogram {
        &self.lateness
    }

    /// A request finished.
    pub fn on_finished(&mut self, f: &FinishedFacts) {
        if let Some(i) = REASONS.iter().position(|r| *r == f.reason) {
            self.success[i] += 1;
        }
        self.req_prompt_tokens.observe(f64::from(f.prompt_tokens));
        self.req_generation_tokens
            .observe(f64::from(f.completion_tokens));
        self.req_max_tokens.observe(f64::from(f.max_tokens));
        if f.completion_tokens == 0 {
            // Aborted before its first token: vLLM records only the counts.
            return;
        }
        self.ttft.observe((f.first_token - f.arrival).max(0.0));
        self.e2e.observe((f.finished - f.arrival).max(0.0));
        self.queue.observe((f.first_scheduled - f.arrival).max(0.0));
        self.prefill
            .observe((f.first_token - f.first_scheduled).max(0.0));
        self.decode.observe((f.finished - f.first_token).max(0.0));
        self.inference
            .observe((f.finished - f.first_scheduled).max(0.0));
        if f.completion_tokens > 1 {
            self.tpot_per_request.observe(
                (f.finished - f.first_token).max(0.0) / f64::from(f.completion_tokens - 1),
            );
        }
    }

    /// Local prefix-cache hits so far, in tokens.
    pub fn prefix_hits(&self) -> u64 {
        self.prefix_hits
    }

    /// The full exposition, text format 0.0.4.
    pub fn render(&self) -> String {
        let mut w = Writer {
            out: String::with_capacity(48 * 1024),
            base: vec![
                ("engine", "0".to_string()),
                ("model_name", self.cfg.model_name.clone()),
            ],
            created: go_float(self.cfg.created_unix),
        };
        let g = self.gauges;
        w.gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            f64::from(g.running),
        );
        w.gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            f64::from(g.waiting),
        );
        w.gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            g.kv_usage,
        );
        if self.cfg.legacy {
            w.gauge(
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
                g.kv_usage,
            );
        }
        w.counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            self.prefix_queries,
        );
        w.counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            self.prefix_hits,
        );
        if self.cfg.legacy {
            w.counter(
                "vllm:gpu_prefix_cache_queries",
                "GPU prefix cache queries, in terms of number of queried tokens.DEPRECATED: Use vllm:prefix_cache_queries instead.",
                self.prefix_queries,
            );
            w.counter(
                "vllm:gpu_prefix_cache_hits",
                "GPU prefix cache hits, in terms of number of cached tokens.DEPRECATED: Use vllm:prefix_cache_hits instead.",
                self.prefix_hits,
            );
        }
        w.counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
            self.external_queries,
        );
        w.counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
            self.external_hits,
        );
        w.counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            self.preemptions,
        );
        w.counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            self.prompt_tokens,
        );
        w.counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            self.generation_tokens,
        );
        w.labelled_counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            "finished_reason",
            &REASONS
                .iter()
                .zip(self.success)
                .map(|(r, v)| (*r, v))
                .collect::<Vec<_>>(),
        );
        w.histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            &self.req_prompt_tokens,
        );
        w.histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            &self.req_generation_tokens,
        );
        w.histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            &self.iteration_tokens,
        );
        w.histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            &self.req_max_tokens,
        );
        w.histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &self.ttft,
        );
        if self.cfg.legacy {
            w.histogram(
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
                &self.itl,
            );
        }
        w.histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &self.itl,
        );
        w.histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            &self.tpot_per_request,
        );
        w.histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &self.e2e,
        );
        w.histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &self.queue,
        );
        w.histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            &self.inference,
        );
        w.histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &self.prefill,
        );
        w.histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            &self.decode,
        );
        // Info series.
        let mut cache: Vec<(String, String)> = self.cfg.cache_config.clone();
        cache.push(("engine".into(), "0".into()));
        cache.sort();
        let _ = writeln!(
            w.out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
        );
        let _ = writeln!(w.out, "# TYPE vllm:cache_config_info gauge");
        let _ = writeln!(
            w.out,
            "vllm:cache_config_info{{{}}} 1.0",
            join_labels(&cache)
        );
        let _ = writeln!(
            w.out,
            "# HELP vllm:lora_requests_info Running stats on lora requests."
        );
        let _ = writeln!(w.out, "# TYPE vllm:lora_requests_info gauge");
        let _ = writeln!(
            w.out,
            "vllm:lora_requests_info{{max_lora=\"0\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}} {}",
            go_float(self.lora_info_time)
        );
        if let Some(gpu) = &self.cfg.gpu {
            let _ = writeln!(w.out, "# HELP weir_gpu_info GPU type of this model server.");
            let _ = writeln!(w.out, "# TYPE weir_gpu_info gauge");
            let _ = writeln!(
                w.out,
                "weir_gpu_info{{{}}} 1.0",
                join_labels(&[("gpu".to_string(), gpu.clone())])
            );
        }
        // Sim-only: how late tokens reached clients relative to the modelled step end.
        w.base.clear();
        w.histogram(
            "weir_sim_token_lateness_seconds",
            "Simulator only: delay between a step's scheduled end and the delivery of its tokens.",
            &self.lateness,
        );
        w.out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('\n', r"\n")
        .replace('"', "\\\"")
}

fn join_labels(kv: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in kv.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_label(&mut out, k, v);
    }
    out
}

/// `k="v"` with the value escaped as the text format requires.
fn push_label(out: &mut String, k: &str, v: &str) {
    out.push_str(k);
    out.push_str("=\"");
    if v.contains(['\\', '\n', '"']) {
        out.push_str(&escape(v));
    } else {
        out.push_str(v);
    }
    out.push('"');
}

/// A sample value: integral values below 10^6 (most samples: counts, bucket totals) without the general
/// shortest-round-trip formatting, which is the same text for them (`5.0`) at a fraction of the cost.
fn push_float(out: &mut String, v: f64) {
    // `-0.0` prints as `-0.0`, so it takes the general path.
    if v.is_sign_positive() && v < 1e6 && v.fract() == 0.0 {
        out.push_str(itoa::Buffer::new().format(v as u64));
        out.push_str(".0");
    } else {
        out.push_str(&go_float(v));
    }
}

/// The exposition being written. Scraped every 50-200 ms by every router in front of the pod, and rendered on the
/// pod's own runtime thread, so it writes straight into one buffer: a render allocating per line took ~1 ms per
/// scrape, a stall every request on the pod waited out.
struct Writer {
    out: String,
    /// Base labels (`engine`, `model_name`) in name order; empty for unlabelled series.
    base: Vec<(&'static str, String)>,
    /// `_created` value, formatted once.
    created: String,
}

impl Writer {
    /// `{...}`: the base labels and `extra` in name order (Python sorts label names; `le` and `finished_reason` fall
    /// between `engine` and `model_name`); nothing when there are no labels.
    fn labels(&mut self, extra: Option<(&str, &str)>) {
        let Writer { out, base, .. } = self;
        if base.is_empty() && extra.is_none() {
            return;
        }
        out.push('{');
        let mut pending = extra;
        let mut first = true;
        let mut sep = |out: &mut String| {
            if !std::mem::take(&mut first) {
                out.push(',');
            }
        };
        for (k, v) in base.iter() {
            if let Some((ek, ev)) = pending
                && ek < *k
            {
                sep(out);
                push_label(out, ek, ev);
                pending = None;
            }
            sep(out);
            push_label(out, k, v);
        }
        if let Some((ek, ev)) = pending {
            sep(out);
            push_label(out, ek, ev);
        }
        out.push('}');
    }

    /// `name{labels} ` (a sample line up to its value).
    fn series(&mut self, name: &str, suffix: &str, extra: Option<(&str, &str)>) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        self.labels(extra);
        self.out.push(' ');
    }

    /// `name{labels} value\n`.
    fn sample(&mut self, name: &str, suffix: &str, extra: Option<(&str, &str)>, v: f64) {
        self.series(name, suffix, extra);
        push_float(&mut self.out, v);
        self.out.push('\n');
    }

    /// `name_created{labels} <creation time>\n`.
    fn created(&mut self, name: &str, extra: Option<(&str, &str)>) {
        self.series(name, "_created", extra);
        let Writer { out, created, .. } = self;
        out.push_str(created);
        out.push('\n');
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        let _ = write!(self.out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
        self.sample(name, "", None, v);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.labelled_counter_inner(name, help, &[(None, v)]);
    }

    fn labelled_counter(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        let rows: Vec<(Option<(&str, &str)>, u64)> = values
            .iter()
            .map(|(lv, v)| (Some((label, *lv)), *v))
            .collect();
        self.labelled_counter_inner(name, help, &rows);
    }

    fn labelled_counter_inner(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Option<(&str, &str)>, u64)],
    ) {
        let _ = write!(
            self.out,
            "# HELP {name}_total {help}\n# TYPE {name}_total counter\n"
        );
        for (l, v) in rows {
            self.sample(name, "_total", *l, *v as f64);
        }
        let _ = write!(
            self.out,
            "# HELP {name}_created {help}\n# TYPE {name}_created gauge\n"
        );
        for (l, _) in rows {
            self.created(name, *l);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        let _ = write!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut acc = 0u64;
        let mut le = String::new();
        for (i, c) in h.counts.iter().enumerate() {
            acc += c;
            le.clear();
            match h.bounds.get(i) {
                Some(b) => push_float(&mut le, *b),
                None => le.push_str("+Inf"),
            }
            self.sample(name, "_bucket", Some(("le", &le)), acc as f64);
        }
        self.sample(name, "_count", None, acc as f64);
        self.sample(name, "_sum", None, h.sum);
        let _ = write!(
            self.out,
            "# HELP {name}_created {help}\n# TYPE {name}_created gauge\n"
        );
        self.created(name, None);
    }
}

/// Value of one sample line `name{labels} value` in an exposition (test and tooling helper); `labels` must match
/// the text between the braces exactly, or be empty for an unlabelled series.
pub fn sample_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(MetricsConfig {
            model_name: "llama".into(),
            legacy: false,
            max_model_len: 1000,
            cache_config: vec![
                ("block_size".into(), "16".into()),
                ("num_gpu_blocks".into(), "100".into()),
            ],
            created_unix: 1_732_400_000.25,
            gpu: Some("H100".into()),
        })
    }

    #[test]
    fn floats_print_like_python() {
        assert_eq!(go_float(0.0), "0.0");
        assert_eq!(go_float(5.0), "5.0");
        assert_eq!(go_float(0.001), "0.001");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(2560.0), "2560.0");
        assert_eq!(go_float(1_732_400_000.25), "1.73240000025e+09");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
        assert_eq!(go_float(1e20), "1e+20");
    }

    /// The integer fast path prints exactly what the general formatting prints, on both sides of its bounds.
    #[test]
    fn sample_values_fast_path_matches_go_float() {
        let mut vals: Vec<f64> = (0..2000u32).map(f64::from).collect();
        vals.extend([
            999_999.0,
            1e6,
            1_000_001.0,
            123_456_789.0,
            0.5,
            2.25,
            -0.0,
            -3.0,
            1e-7,
            7.5,
            1e16,
        ]);
        vals.extend(
            TTFT_BUCKETS
                .iter()
                .chain(E2E_BUCKETS)
                .chain(LATENESS_BUCKETS),
        );
        for v in vals {
            let mut s = String::new();
            push_float(&mut s, v);
            assert_eq!(s, go_float(v), "{v}");
        }
    }

    /// A model name that needs escaping is escaped once, in every labelled series.
    #[test]
    fn label_values_are_escaped_once() {
        let mut m = metrics();
        m.cfg.model_name = "a\"b\\c,d".into();
        let text = m.render();
        assert!(
            text.contains(r#"vllm:num_requests_running{engine="0",model_name="a\"b\\c,d"} 0.0"#),
            "{text}"
        );
        assert!(text.contains(r#"vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="a\"b\\c,d"} 0.0"#));
    }

    #[test]
    fn one_two_five_buckets() {
        assert_eq!(
            buckets_1_2_5(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
    }

    #[test]
    fn counters_have_total_and_created_and_sorted_labels() {
        let mut m = metrics();
        m.on_step(
            &StepFacts {
                prefix_queries: 64,
                prefix_hits: 32,
                num_prefill_tokens: 10,
                ..Default::default()
            },
            GaugeFacts {
                running: 2,
                waiting: 1,
                kv_usage: 0.5,
            },
            1.0,
        );
        let t = m.render();
        assert!(t.contains(
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n\
             # TYPE vllm:prefix_cache_hits_total counter\n\
             vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"llama\"} 32.0\n\
             # HELP vllm:prefix_cache_hits_created"
        ));
        assert_eq!(
            sample_value(
                &t,
                "vllm:num_requests_running",
                "engine=\"0\",model_name=\"llama\""
            ),
            Some(2.0)
        );
        assert!(t.contains("vllm:request_success_total{engine=\"0\",finished_reason=\"stop\",model_name=\"llama\"} 0.0"));
        assert!(t.contains(
            "vllm:cache_config_info{block_size=\"16\",engine=\"0\",num_gpu_blocks=\"100\"} 1.0"
        ));
        assert!(t.contains("\nweir_gpu_info{gpu=\"H100\"} 1.0\n"));
        assert!(!t.contains("gpu_cache_usage_perc"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_le_between_labels() {
        let mut m = metrics();
        m.on_finished(&FinishedFacts {
            reason: "length",
            prompt_tokens: 30,
            completion_tokens: 3,
            max_tokens: 3,
            arrival: 0.0,
            first_scheduled: 0.001,
            first_token: 0.05,
            finished: 0.07,
        });
        let t = m.render();
        let l = |le: &str| format!("engine=\"0\",le=\"{le}\",model_name=\"llama\"");
        assert_eq!(
            sample_value(&t, "vllm:time_to_first_token_seconds_bucket", &l("0.04")),
            Some(0.0)
        );
        assert_eq!(
            sample_value(&t, "vllm:time_to_first_token_seconds_bucket", &l("0.06")),
            Some(1.0)
        );
        assert_eq!(
            sample_value(&t, "vllm:time_to_first_token_seconds_bucket", &l("+Inf")),
            Some(1.0)
        );
        assert_eq!(
            sample_value(&t, "vllm:request_prompt_tokens_bucket", &l("50.0")),
            Some(1.0)
        );
        assert_eq!(
            sample_value(
                &t,
                "vllm:request_success_total",
                "engine=\"0\",finished_reason=\"length\",model_name=\"llama\""
            ),
            Some(1.0)
        );
        // _count before _sum, then the _created family.
        let c = t.find("vllm:e2e_request_latency_seconds_count").unwrap();
        let s = t.find("vllm:e2e_request_latency_seconds_sum").unwrap();
        let cr = t
            .find("# TYPE vllm:e2e_request_latency_seconds_created gauge")
            .unwrap();
        assert!(c < s && s < cr);
    }

    #[test]
    fn legacy_names_only_when_asked() {
        let mut cfg = metrics().cfg;
        cfg.legacy = true;
        let t = Metrics::new(cfg).render();
        assert!(t.contains("vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"llama\"} 0.0"));
        assert!(t.contains("vllm:gpu_prefix_cache_hits_total{"));
        assert!(t.contains("vllm:time_per_output_token_seconds_bucket{"));
    }

    #[test]
    fn lateness_quantile() {
        let mut m = metrics();
        for _ in 0..99 {
            m.on_lateness(0.0003);
        }
        m.on_lateness(0.02);
        assert_eq!(m.lateness().quantile_bound(0.99), 0.0005);
        assert_eq!(m.lateness().quantile_bound(1.0), 0.025);
        assert!(
            m.render()
                .contains("weir_sim_token_lateness_seconds_bucket{le=\"0.0005\"} 99.0")
        );
    }
}
