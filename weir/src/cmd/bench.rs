//! `weir bench`: command-line flags, validation into a [`bench::Plan`], and printing the report.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use hyper::header::{HeaderName, HeaderValue};

use crate::bench::client::{Api, Target};
use crate::bench::report::Slo;
use crate::bench::tenants::{self, TenantLoad};
use crate::bench::workload::{Generator, Preset, SharedPrefix};
use crate::bench::{self, Mode, Plan, Source};
use policies::tenant::Tier;

/// Workload presets.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadName {
    /// A few tokens in, 1 out: proxy overhead.
    Tiny,
    /// Azure 2023 conversation lengths.
    Chat,
    /// G groups x P prompts sharing a system prompt per group (inference-perf defaults 10x10, S 100, Q 50, O 50).
    SharedPrefix,
    /// llm-d's headline shared-prefix workload: 150x5, S 6000, Q 1200, O 1000.
    SharedPrefixLlmD,
    /// Long retrieval-augmented prompts (median ~7k tokens), medium outputs.
    LongContextRag,
    /// Azure 2023 code lengths: long-ish prompts, very short outputs.
    CodeCompletion,
    /// Offline batch: medium prompts, long outputs.
    Batch,
    /// ISL 8192 / OSL 512.
    LongPromptMix,
    /// Multi-turn chat sessions (every turn resends the conversation; ~12k-token prompts, think time between
    /// turns, skewed popularity); open loop at the sessions' own times, needs --rate and --duration.
    MultiTurn,
}

/// Flags of `weir bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Base URL of any OpenAI-compatible server or router.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name; by default the first id from `GET /v1/models`.
    #[arg(long)]
    model: Option<String>,
    /// Which endpoint to call.
    #[arg(long, value_enum, default_value = "chat")]
    api: Api,
    /// Stream responses (SSE) and measure TTFT/ITL (default).
    #[arg(long, overrides_with = "no_stream")]
    stream: bool,
    /// Non-streaming requests: TTFT is the whole response time, no ITL.
    #[arg(long = "no-stream", overrides_with = "stream")]
    no_stream: bool,
    /// Workload preset.
    #[arg(long, value_enum, default_value = "chat")]
    workload: WorkloadName,
    /// Replay a JSONL trace instead of a preset: `{"t":s,"prompt_tokens":n,"output_tokens":m,"prefix_group":g}` or
    /// with a literal `"prompt"`. Open loop at the trace's times unless --concurrency is given.
    #[arg(long, conflicts_with = "workload")]
    trace: Option<std::path::PathBuf>,
    /// Trace time compression: 2 replays twice as fast.
    #[arg(long, default_value_t = 1.0)]
    trace_speed: f64,
    /// Open loop: Poisson arrivals per second (`inf` sends everything at once).
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop: this many requests always in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Stop sending after this long (measured, warm-up excluded): `30s`, `500ms`, `2m`, or seconds.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many measured requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests sent in this first stretch are not measured.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Seed for prompts, lengths and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cap on requests in flight; open-loop arrivals wait for a slot (and a warning says so).
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Per-request timeout, connect to end of body.
    #[arg(long, value_parser = parse_duration, default_value = "600s")]
    timeout: Duration,
    /// Shared-prefix groups (G).
    #[arg(long)]
    groups: Option<u32>,
    /// Shared-prefix prompts per group (P).
    #[arg(long)]
    prompts_per_group: Option<u32>,
    /// Shared-prefix system prompt tokens (S).
    #[arg(long)]
    system_tokens: Option<u32>,
    /// Shared-prefix question tokens (Q).
    #[arg(long)]
    question_tokens: Option<u32>,
    /// Shared-prefix output tokens (O).
    #[arg(long)]
    output_tokens: Option<u32>,
    /// Do not send `ignore_eos: true` (outputs may then stop early at EOS).
    #[arg(long)]
    no_ignore_eos: bool,
    /// Goodput TTFT target in milliseconds.
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// Goodput target for a request's mean inter-token latency, in milliseconds.
    #[arg(long)]
    slo_itl_ms: Option<f64>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Prometheus endpoints to scrape before and after (repeatable); default `<url>/metrics`.
    #[arg(long)]
    scrape_metrics: Vec<String>,
    /// Do not scrape any metrics endpoint.
    #[arg(long, conflicts_with = "scrape_metrics")]
    no_scrape: bool,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Bearer token (sent as `Authorization: Bearer <key>`).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Multi-tenant load from a file (YAML or JSON): per tenant its API key, tier, weight, workload, rate or
    /// concurrency, stream; see `weir/src/bench/tenants.rs`. Reports per tenant and per tier.
    #[arg(long, conflicts_with_all = ["trace", "rate", "concurrency", "preset"])]
    tenants: Option<std::path::PathBuf>,
    /// A built-in multi-tenant load: `qos` (2 interactive and 2 standard tenants at a steady rate, 3 batch tenants
    /// flooding at 10x --capacity; keys `sk-weir-bench-<tenant>`).
    #[arg(long, value_enum, conflicts_with_all = ["trace", "rate", "concurrency"])]
    preset: Option<TenantsPreset>,
    /// For --preset qos: batch-workload requests per second the fleet completes at saturation (default: 52, the
    /// simulated 8xH100 Llama-3.1-8B fleet, measured with `weir replay`).
    #[arg(long, requires = "preset")]
    capacity: Option<f64>,
    /// With --tenants/--preset: run only the tenants of these tiers (comma-separated), e.g. `interactive` for the
    /// interactive tenants alone.
    #[arg(long, value_delimiter = ',')]
    only_tiers: Vec<String>,
    /// With --tenants/--preset: print the tenants (JSON) and exit without sending anything.
    #[arg(long)]
    print_tenants: bool,
}

/// Built-in multi-tenant loads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TenantsPreset {
    /// Batch flood at 10x capacity against steady interactive and standard tenants.
    Qos,
}

/// Parse `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds, for clap (`weir bench`, `weir sim`): the grammar of
/// weir's config files (`router::config::parse_duration`), which also refuses values too large for a `Duration`
/// instead of panicking on them.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    router::config::parse_duration("duration", s).map_err(|e| match e {
        router::Error::InvalidConfig { reason, .. } => format!("bad duration: {reason}"),
        other => format!("bad duration {s:?}: {other}"),
    })
}

fn join(base: &str, path: &str) -> anyhow::Result<hyper::Uri> {
    let s = format!("{}{}", base.trim_end_matches('/'), path);
    let uri: hyper::Uri = s.parse().with_context(|| format!("bad URL {s:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported (no TLS), got {s:?}");
    }
    Ok(uri)
}

fn parse_header(h: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let (k, v) = h
        .split_once(':')
        .with_context(|| format!("--header {h:?}: expected `Name: value`"))?;
    Ok((
        HeaderName::from_bytes(k.trim().as_bytes())?,
        HeaderValue::from_str(v.trim())?,
    ))
}

/// `GET <url>/v1/models` and take the first id.
async fn discover_model(base: &str) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Full};
    let client = bench::client::http_client(Duration::from_secs(5));
    let req =
        hyper::Request::get(join(base, "/v1/models")?).body(Full::new(bytes::Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .context("GET /v1/models timed out")?
        .context("GET /v1/models (pass --model to skip)")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("GET /v1/models answered {status}; pass --model");
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .context("GET /v1/models listed no model; pass --model")
}

/// Run `weir bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(a: BenchArgs) -> anyhow::Result<()> {
    if a.tenants.is_some() || a.preset.is_some() {
        return run_tenants(a).await;
    }
    if !a.only_tiers.is_empty() || a.print_tenants {
        bail!("--only-tiers and --print-tenants apply to --tenants and --preset only");
    }
    let stream = !a.no_stream;
    let mode = match (a.rate, a.concurrency, &a.trace) {
        (Some(r), None, _) if r > 0.0 && !r.is_nan() => {
            if a.trace.is_some() {
                bail!("--rate does not apply to --trace (use --trace-speed)");
            }
            Mode::Open { rate: r }
        }
        (Some(r), None, _) => bail!("--rate must be > 0, got {r}"),
        (None, Some(0), _) => bail!("--concurrency must be >= 1"),
        (None, Some(c), _) => Mode::Closed { concurrency: c },
        (None, None, Some(_)) => {
            if !(a.trace_speed.is_finite() && a.trace_speed > 0.0) {
                bail!("--trace-speed must be > 0");
            }
            Mode::Trace {
                speed: a.trace_speed,
            }
        }
        (None, None, None) => bail!("give --rate (open loop) or --concurrency (closed loop)"),
        (Some(_), Some(_), _) => bail!("--rate and --concurrency are exclusive"),
    };
    if a.duration.is_none() && a.requests.is_none() && a.trace.is_none() {
        bail!("give --duration and/or --requests so the run stops by itself");
    }
    if a.requests == Some(0) {
        bail!("--requests must be >= 1");
    }
    if a.max_in_flight == 0 {
        bail!("--max-in-flight must be >= 1");
    }
    for (name, v) in [
        ("--slo-ttft-ms", a.slo_ttft_ms),
        ("--slo-itl-ms", a.slo_itl_ms),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{name} must be a positive number of milliseconds");
        }
    }
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(a.seed);
    let mut mode = mode;
    let source = match &a.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let entries = bench::workload::parse_trace(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            if entries.is_empty() {
                bail!("{}: trace has no requests", path.display());
            }
            Source::Trace(entries)
        }
        None if a.workload == WorkloadName::MultiTurn => {
            let (Mode::Open { rate }, Some(d)) = (mode, a.duration) else {
                bail!(
                    "--workload multi-turn needs --rate and --duration (sessions arrive at their own times)"
                );
            };
            mode = Mode::Trace { speed: 1.0 };
            let span = (a.warmup + d).as_secs_f64();
            let spec = sim::workload::MultiTurnSpec::DEFAULT;
            Source::Sessions(bench::workload::Sessions::multi_turn(
                &spec,
                rate,
                span,
                a.warmup.as_secs_f64(),
                &mut rng,
            ))
        }
        None => {
            let base = match a.workload {
                WorkloadName::SharedPrefixLlmD => Some(SharedPrefix::LLM_D),
                WorkloadName::SharedPrefix => Some(SharedPrefix::INFERENCE_PERF),
                _ => None,
            };
            let preset = match base {
                Some(b) => {
                    let sp = SharedPrefix {
                        groups: a.groups.unwrap_or(b.groups),
                        prompts_per_group: a.prompts_per_group.unwrap_or(b.prompts_per_group),
                        system_tokens: a.system_tokens.unwrap_or(b.system_tokens),
                        question_tokens: a.question_tokens.unwrap_or(b.question_tokens),
                        output_tokens: a.output_tokens.unwrap_or(b.output_tokens),
                    };
                    if sp.groups == 0 || sp.prompts_per_group == 0 || sp.output_tokens == 0 {
                        bail!("--groups, --prompts-per-group and --output-tokens must be >= 1");
                    }
                    Preset::SharedPrefix(sp)
                }
                None => {
                    if a.groups.is_some()
                        || a.prompts_per_group.is_some()
                        || a.system_tokens.is_some()
                        || a.question_tokens.is_some()
                        || a.output_tokens.is_some()
                    {
                        bail!(
                            "--groups/--prompts-per-group/--system-tokens/--question-tokens/--output-tokens apply to shared-prefix workloads only"
                        );
                    }
                    match a.workload {
                        WorkloadName::Tiny => Preset::Tiny,
                        WorkloadName::Chat => Preset::Chat,
                        WorkloadName::LongContextRag => Preset::LongContextRag,
                        WorkloadName::CodeCompletion => Preset::CodeCompletion,
                        WorkloadName::Batch => Preset::Batch,
                        WorkloadName::LongPromptMix => Preset::LongPromptMix,
                        WorkloadName::SharedPrefix
                        | WorkloadName::SharedPrefixLlmD
                        | WorkloadName::MultiTurn => Preset::Chat,
                    }
                }
            };
            Source::Preset(Generator::new(preset, &mut rng))
        }
    };
    let mut headers = a
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(k) = &a.api_key {
        headers.push((
            hyper::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}"))?,
        ));
    }
    let model = match &a.model {
        Some(m) => m.clone(),
        None => discover_model(&a.url).await?,
    };
    let path = match a.api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    let target = Target {
        uri: join(&a.url, path)?,
        model: model.clone(),
        api: a.api,
        stream,
        ignore_eos: !a.no_ignore_eos,
        headers,
        timeout: a.timeout,
    };
    let scrape = if a.no_scrape {
        Vec::new()
    } else if a.scrape_metrics.is_empty() {
        vec![join(&a.url, "/metrics")?]
    } else {
        a.scrape_metrics
            .iter()
            .map(|u| join(u, ""))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let want = match mode {
        Mode::Closed { concurrency } => concurrency.min(a.max_in_flight),
        _ => a.max_in_flight,
    };
    super::raise_nofile_limit(Some(want));
    let config_echo = serde_json::json!({
        "url": a.url, "model": model, "api": a.api, "stream": stream,
        "workload": a.trace.as_ref().map_or_else(|| serde_json::json!(a.workload), |p| serde_json::json!(format!("trace:{}", p.display()))),
        "mode": match mode { Mode::Open { .. } => "open", Mode::Closed { .. } => "closed", Mode::Trace { .. } => "trace" },
        "rate": a.rate, "concurrency": a.concurrency, "trace_speed": a.trace_speed,
        "duration_s": a.duration.map(|d| d.as_secs_f64()), "requests": a.requests,
        "warmup_s": a.warmup.as_secs_f64(), "seed": a.seed, "max_in_flight": a.max_in_flight,
        "timeout_s": a.timeout.as_secs_f64(), "ignore_eos": !a.no_ignore_eos,
    });
    let plan = Plan {
        target,
        mode,
        source,
        duration: a.duration,
        requests: a.requests,
        warmup: a.warmup,
        max_in_flight: a.max_in_flight,
        seed: a.seed,
        slo: Slo {
            ttft_ms: a.slo_ttft_ms,
            itl_ms: a.slo_itl_ms,
        },
        scrape,
        progress: !a.no_progress,
        config_echo,
    };
    let report = bench::run(plan).await;
    print!("{}", bench::report::table(&report));
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The tenants of `--tenants FILE` or `--preset`, narrowed by `--only-tiers`.
fn tenant_loads(a: &BenchArgs) -> anyhow::Result<Vec<TenantLoad>> {
    let all = match (&a.tenants, a.preset) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            tenants::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        (None, Some(TenantsPreset::Qos)) => {
            let cap = a.capacity.unwrap_or(tenants::QOS_CAPACITY_8XH100_8B);
            if !(cap.is_finite() && cap > 0.0) {
                bail!("--capacity must be > 0 requests per second, got {cap}");
            }
            tenants::qos_preset(cap)
        }
        (None, None) => bail!("give --tenants FILE or --preset"),
    };
    if a.only_tiers.is_empty() {
        return Ok(all);
    }
    let tiers = a
        .only_tiers
        .iter()
        .map(|t| {
            serde_json::from_value::<Tier>(serde_json::Value::String(t.clone())).map_err(|_| {
                anyhow::anyhow!("--only-tiers: unknown tier {t:?} (interactive, standard, batch)")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let some = tenants::only_tiers(all, &tiers);
    if some.is_empty() {
        bail!(
            "--only-tiers {}: no tenant of those tiers",
            a.only_tiers.join(",")
        );
    }
    Ok(some)
}

/// `weir bench --tenants FILE | --preset qos`: every tenant's load at once, reported per tenant and tier.
async fn run_tenants(a: BenchArgs) -> anyhow::Result<()> {
    let loads = tenant_loads(&a)?;
    if a.print_tenants {
        println!("{}", serde_json::to_string_pretty(&loads)?);
        return Ok(());
    }
    let Some(duration) = a.duration else {
        bail!("--tenants/--preset need --duration");
    };
    if a.requests.is_some() {
        bail!("--requests does not apply to --tenants/--preset (give --duration)");
    }
    if a.no_stream {
        bail!("--no-stream does not apply to --tenants/--preset (set `stream: false` per tenant)");
    }
    if a.slo_ttft_ms.is_some() || a.slo_itl_ms.is_some() {
        bail!("--slo-ttft-ms/--slo-itl-ms do not apply to --tenants/--preset");
    }
    if a.api_key.is_some() {
        tracing::info!("--api-key / OPENAI_API_KEY not sent: each tenant sends its own key");
    }
    let headers = a
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if headers
        .iter()
        .any(|(k, _)| k == hyper::header::AUTHORIZATION)
    {
        bail!("--header Authorization: each tenant sends its own key");
    }
    let model = match &a.model {
        Some(m) => m.clone(),
        None => discover_model(&a.url).await?,
    };
    let path = match a.api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
    };
    let target = Target {
        uri: join(&a.url, path)?,
        model: model.clone(),
        api: a.api,
        stream: true,
        ignore_eos: !a.no_ignore_eos,
        headers,
        timeout: a.timeout,
    };
    super::raise_nofile_limit(Some(
        loads
            .iter()
            .map(|t| t.max_in_flight.min(t.concurrency.unwrap_or(usize::MAX)))
            .sum(),
    ));
    let config_echo = serde_json::json!({
        "url": a.url, "model": model, "api": a.api,
        "tenants": a.tenants.as_ref().map(|p| p.display().to_string()),
        "preset": a.preset, "capacity": a.capacity, "only_tiers": a.only_tiers,
        "duration_s": duration.as_secs_f64(), "warmup_s": a.warmup.as_secs_f64(), "seed": a.seed,
        "timeout_s": a.timeout.as_secs_f64(), "ignore_eos": !a.no_ignore_eos,
        "loads": loads,
    });
    let plan = bench::TenantsPlan {
        target,
        tenants: loads,
        duration,
        warmup: a.warmup,
        seed: a.seed,
        progress: !a.no_progress,
        config_echo,
    };
    let report = bench::run_tenants(plan).await;
    print!("{}", bench::qos::markdown(&report));
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
        // Finite but too large for a Duration: an error, not a panic.
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    fn args(argv: &[&str]) -> Result<BenchArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: BenchArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .map(|c| c.a)
    }

    #[test]
    fn qos_preset_scales_and_narrows_to_tiers() {
        let all = tenant_loads(&args(&["--preset", "qos"]).unwrap()).unwrap();
        assert_eq!(all, tenants::qos_preset(tenants::QOS_CAPACITY_8XH100_8B));
        let some = tenant_loads(
            &args(&[
                "--preset",
                "qos",
                "--capacity",
                "5",
                "--only-tiers",
                "interactive,batch",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(some.len(), 5);
        assert!(some.iter().all(|t| t.tier != Tier::Standard));
        assert_eq!(some[0].rate, Some(0.5));
        let bad =
            tenant_loads(&args(&["--preset", "qos", "--only-tiers", "gold"]).unwrap()).unwrap_err();
        assert!(bad.to_string().contains("unknown tier \"gold\""), "{bad}");
        let bad =
            tenant_loads(&args(&["--preset", "qos", "--capacity", "0"]).unwrap()).unwrap_err();
        assert!(bad.to_string().contains("--capacity must be > 0"), "{bad}");
        // Multi-tenant loads exclude the single-tenant load flags.
        assert!(args(&["--preset", "qos", "--rate", "3"]).is_err());
        assert!(args(&["--tenants", "f.yaml", "--preset", "qos"]).is_err());
        assert!(
            args(&["--capacity", "3"]).is_err(),
            "--capacity needs --preset"
        );
    }

    #[test]
    fn headers_parse() {
        let (k, v) = parse_header("X-Return-Error: 503").unwrap();
        assert_eq!((k.as_str(), v.to_str().unwrap()), ("x-return-error", "503"));
        assert!(parse_header("nocolon").is_err());
    }
}
