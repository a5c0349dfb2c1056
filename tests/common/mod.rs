//! The end-to-end test harness: start the real `weir` binary, talk to it over HTTP, and clean up.
//!
//! Every e2e test file registered under the `weir` package (`[[test]]` in `weir/Cargo.toml`) does `mod common;` and
//! gets:
//!
//! - [`Weir`]: a running `weir <args>` process. [`Weir::start`] spawns it with stdout and stderr captured and reads
//!   the first stdout line as JSON under [`START_TIMEOUT`] (`weir sim` prints `{"endpoints":[{"url",..}]}` once
//!   bound, `weir serve` prints `{"listen":..}`); [`Weir::ready`] then polls `GET <url>/health` until 200 under
//!   [`READY_TIMEOUT`]. [`Weir::sim`] / [`Weir::sim_at`] do both for a simulator on an ephemeral port,
//!   [`Weir::fleet`] for a `--fleet` of simulated pods ([`Weir::urls`]), [`Weir::serve`] for a router. The process is
//!   killed and reaped on drop; when the test is panicking, its captured stderr is printed so the failure explains
//!   itself. [`Weir::terminate`] sends SIGTERM and [`Weir::wait_exit`] waits (bounded) for the exit status.
//! - [`run_weir`] / [`run_weir_blocking`]: run a command that stops by itself (`weir bench`, `weir replay`) to the
//!   end under a limit and return its output; [`run_bench`] adds `--json <tmp> --no-progress` and parses the
//!   report.
//! - HTTP helpers: [`post_json`] (status + body), [`post_json_full`] (+ headers), [`send_json`] (the raw response,
//!   for streams), [`post_routed`] (+ the router's `x-weir-endpoint` / `x-weir-decision-id`, JSON body),
//!   [`get_text`], [`get_status`], [`scrape`] (`/metrics` text); [`client`] for anything else; [`endpoint_id`] (the
//!   router's id of a pod URL); [`prefix_blocks`] (a pod's blocks in the router's prefix index).
//! - Parsing helpers: [`metric`] (first sample of a series), [`metric_sum`] (sum of the samples whose labels contain
//!   a filter), [`sse_data`] / [`sse_json`] (the `data:` payloads of an SSE body).
//! - [`eventually`]: poll an async condition until it holds or a limit passes (tests never sleep to wait).
//!
//! Nothing here sleeps to wait for an event: readiness, exits and conditions are polled with a deadline.

#![allow(dead_code)] // each test crate uses a different subset
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;

/// The simulator's default served model name.
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
/// How long a started process may take to print its first stdout line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started server may take to answer `GET /health` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Captured output beyond this is dropped from the front (a chatty process must not eat the test's memory).
const CAPTURE_CAP: usize = 4 << 20;
/// Interval between polls of a condition, a readiness probe or an exit.
const POLL: Duration = Duration::from_millis(20);

/// Output of a child stream, collected by a reader thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn push(&self, bytes: &[u8]) {
        let mut b = self.0.lock();
        b.extend_from_slice(bytes);
        if b.len() > CAPTURE_CAP {
            let cut = b.len() - CAPTURE_CAP / 2;
            b.drain(..cut);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

/// A running `weir` process; killed and reaped on drop.
pub struct Weir {
    /// The process.
    child: Child,
    /// The command line, for failure messages.
    args: Vec<String>,
    /// The first stdout line as JSON (`Value::Null` until [`Weir::start`] read it).
    first: Value,
    /// The base URL: `endpoints[0].url` or `listen` from the first line.
    url: Option<String>,
    /// Everything written to stdout (the first line included).
    stdout: Captured,
    /// Everything written to stderr: shown when a test fails.
    stderr: Captured,
    /// Complete stdout lines, in order, as the reader thread sees them.
    lines: Receiver<String>,
    /// Disconnects when both reader threads reached end of file (the process closed its output).
    eof: Receiver<()>,
    /// Set once a failure message has shown stderr, so drop does not print it twice.
    shown: AtomicBool,
}

impl Weir {
    /// Spawn `weir <args>` with stdout and stderr captured by reader threads; does not wait for anything.
    pub fn spawn(args: &[&str]) -> Weir {
        Weir::spawn_env(args, &[])
    }

    /// [`Weir::spawn`] with these environment variables added.
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Weir {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn weir {args:?}: {e}"));
        let (stdout, stderr) = (Captured::default(), Captured::default());
        let (line_tx, lines) = mpsc::channel();
        let (eof_tx, eof) = mpsc::channel::<()>();
        let out = child.stdout.take().unwrap();
        let (cap, done) = (stdout.clone(), eof_tx.clone());
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                cap.push(&line);
                // The receiver may be gone (nobody waits for lines); the output is still captured.
                let _ = line_tx.send(String::from_utf8_lossy(&line).into_owned());
                line.clear();
            }
            drop(done);
        });
        let mut err = child.stderr.take().unwrap();
        let cap = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                cap.push(&buf[..n]);
            }
            drop(eof_tx);
        });
        Weir {
            child,
            args: args.iter().map(|s| s.to_string()).collect(),
            first: Value::Null,
            url: None,
            stdout,
            stderr,
            lines,
            eof,
            shown: AtomicBool::new(false),
        }
    }

    /// Spawn `weir <args>` and read its first stdout line as JSON (blocking, at most [`START_TIMEOUT`]). Panics with
    /// the process's stderr if it exits, prints something else, or says nothing in time.
    pub fn start(args: &[&str]) -> Weir {
        Weir::start_env(args, &[])
    }

    /// [`Weir::start`] with these environment variables added.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Weir {
        let mut w = Weir::spawn_env(args, env);
        let line = match w.lines.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                w.fail(&format!("printed no stdout line within {START_TIMEOUT:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                // stdout closed; let the stderr reader reach end of file too, so the message shows why.
                let _ = w.eof.recv_timeout(Duration::from_secs(5));
                w.fail("exited before printing a stdout line")
            }
        };
        w.first = serde_json::from_str(&line)
            .unwrap_or_else(|e| w.fail(&format!("first stdout line is not JSON ({e}): {line:?}")));
        w.url = w.first["endpoints"][0]["url"]
            .as_str()
            .or_else(|| w.first["listen"].as_str())
            .map(str::to_string);
        w
    }

    /// `weir sim` on an ephemeral port at `--time-scale 50`, no start-up delay, `extra` flags appended; ready.
    pub async fn sim(extra: &[&str]) -> Weir {
        Weir::sim_at("50", extra).await
    }

    /// `weir sim` at `scale` model-seconds per real second (1 = real GPU speed, for long streams); ready.
    pub async fn sim_at(scale: &str, extra: &[&str]) -> Weir {
        Weir::sim_on("0", scale, extra).await
    }

    /// `weir sim` on `port` (a fixed one: a pod coming back on its address) at `scale`, no start-up delay, `extra`
    /// flags appended; ready.
    pub async fn sim_on(port: &str, scale: &str, extra: &[&str]) -> Weir {
        let mut args = vec![
            "sim",
            "--port",
            port,
            "--time-scale",
            scale,
            "--startup-delay",
            "0",
        ];
        args.extend_from_slice(extra);
        Weir::start(&args).ready().await
    }

    /// `weir serve --listen 127.0.0.1:0 <args>`; ready.
    pub async fn serve(args: &[&str]) -> Weir {
        let mut a = vec!["serve", "--listen", "127.0.0.1:0"];
        a.extend_from_slice(args);
        Weir::start(&a).ready().await
    }

    /// `weir sim --fleet <n>xh100:llama-3.1-8b` on ephemeral ports at `scale`, no start-up delay, `extra` flags
    /// appended; every pod healthy.
    pub async fn fleet(n: usize, scale: &str, extra: &[&str]) -> Weir {
        let spec = format!("{n}xh100:llama-3.1-8b");
        let mut a = vec![
            "sim",
            "--fleet",
            &spec,
            "--base-port",
            "0",
            "--time-scale",
            scale,
            "--startup-delay",
            "0",
        ];
        a.extend_from_slice(extra);
        let w = Weir::start(&a);
        for url in w.urls() {
            let health = format!("{url}/health");
            eventually(
                READY_TIMEOUT,
                &format!("{health} to answer 200"),
                async || get_status(&health).await == 200,
            )
            .await;
        }
        w
    }

    /// Wait (at most [`READY_TIMEOUT`]) until `GET <url>/health` answers 200.
    pub async fn ready(mut self) -> Weir {
        let health = format!("{}/health", self.url());
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = client().get(&health).send().await
                && r.status() == 200
            {
                return self;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                self.fail(&format!("exited ({st}) before {health} answered 200"));
            }
            if tokio::time::Instant::now() > deadline {
                self.fail(&format!("{health} not 200 within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first stdout line as JSON.
    pub fn json(&self) -> &Value {
        &self.first
    }

    /// `endpoints[i]` of a `weir sim` endpoints line (`url`, `model`, `role`, `kv_events`, `replay`, ..).
    pub fn endpoint(&self, i: usize) -> &Value {
        &self.first["endpoints"][i]
    }

    /// The `url` of every entry of a `weir sim` endpoints line, in order.
    pub fn urls(&self) -> Vec<String> {
        self.first["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["url"].as_str().map(str::to_string))
            .collect()
    }

    /// The base URL (`http://127.0.0.1:<port>`): the first endpoint's `url`, else `listen`.
    pub fn url(&self) -> &str {
        match &self.url {
            Some(u) => u,
            None => self.fail(&format!("no url in the first stdout line {}", self.first)),
        }
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no shutdown code runs), then reap.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// Send SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM {}", self.pid());
    }

    /// Wait (bounded, polling) for the process to exit by itself and return its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if tokio::time::Instant::now() > deadline {
                self.fail(&format!("did not exit within {limit:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Everything the process wrote to stdout so far (the first line included).
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Panic with the command line, `why` and the captured stderr.
    fn fail(&self, why: &str) -> ! {
        self.shown.store(true, Ordering::SeqCst);
        panic!(
            "weir {:?} {why}\n--- stderr ---\n{}",
            self.args,
            self.stderr()
        )
    }

    /// Wait (blocking) until the process has exited and closed its output, at most `limit`; kill it and panic
    /// with its stderr if it runs longer.
    fn finish_blocking(mut self, limit: Duration) -> Output {
        match self.eof.recv_timeout(limit) {
            Err(RecvTimeoutError::Disconnected) => {}
            Ok(()) | Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                self.fail(&format!("did not stop by itself within {limit:?}"));
            }
        }
        let status = self.child.wait().unwrap();
        Output {
            status,
            stdout: self.stdout.0.lock().clone(),
            stderr: self.stderr.0.lock().clone(),
        }
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && !self.shown.load(Ordering::SeqCst) {
            eprintln!("--- stderr of weir {:?} ---\n{}", self.args, self.stderr());
        }
    }
}

/// Run `weir <args>` to completion (blocking, at most `limit`; killed and a panic past it) and return its
/// output, whatever the exit status.
pub fn run_weir_blocking(args: &[&str], limit: Duration) -> Output {
    Weir::spawn(args).finish_blocking(limit)
}

/// [`run_weir_blocking`] off the async runtime's threads.
pub async fn run_weir(args: &[&str], limit: Duration) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_weir_blocking(&args, limit)
    })
    .await
    .unwrap()
}

/// A finished `weir bench` run.
pub struct BenchRun {
    /// The `--json` report.
    pub report: Value,
    /// Wall time from spawn to exit.
    pub took: Duration,
    /// What it printed on stdout (the table).
    pub stdout: String,
}

/// Run `weir bench <args> --json <tmp> --no-progress` to completion (at most `limit`), assert it succeeded, and
/// return its report, wall time and stdout.
pub async fn run_bench(args: &[&str], limit: Duration) -> BenchRun {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "weir-bench-{}-{}.json",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    ));
    let path_s = path.to_str().unwrap().to_string();
    let mut full = vec!["bench"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--json", &path_s, "--no-progress"]);
    let started = tokio::time::Instant::now();
    let out = run_weir(&full, limit).await;
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "weir bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    BenchRun {
        report,
        took,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// A fresh HTTP client (a request taking over a minute fails the test). Fresh per call because each
/// `#[tokio::test]` has its own runtime and a pooled connection must not outlive the runtime that opened it.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// POST `body` as JSON and return the response as it arrives (for streams, headers, or a connection that breaks).
pub async fn send_json(url: &str, body: &Value) -> reqwest::Response {
    client()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// POST `body` as JSON with extra `headers`; the status and the body text.
pub async fn post_json(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, String) {
    let (st, _, text) = post_json_full(url, body, headers).await;
    (st, text)
}

/// [`post_json`] that also returns the response headers.
pub async fn post_json_full(
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut r = client().post(url).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let res = r.send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = res.status().as_u16();
    let h = res.headers().clone();
    (status, h, res.text().await.expect("body"))
}

/// A routed response: what `weir serve` says about where a request went, and the body.
#[derive(Debug)]
pub struct Routed {
    pub status: u16,
    /// `x-weir-endpoint`: the pod that answered (`host:port`, see [`endpoint_id`]); "" when absent.
    pub endpoint: String,
    /// `x-weir-decision-id`: the key of its decision record; "" when absent.
    pub decision_id: String,
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub body: Value,
}

/// POST `body` as JSON with extra `headers` through a router; see [`Routed`].
pub async fn post_routed(url: &str, body: &Value, headers: &[(&str, &str)]) -> Routed {
    let (status, h, text) = post_json_full(url, body, headers).await;
    let header = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    Routed {
        status,
        endpoint: header("x-weir-endpoint"),
        decision_id: header("x-weir-decision-id"),
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// The id `weir serve` gives a static endpoint (`x-weir-endpoint`, metric labels): its URL without `http://`.
pub fn endpoint_id(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// GET `url`; the body text (any status).
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("body")
}

/// GET `url`; the status.
pub async fn get_status(url: &str) -> u16 {
    client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
        .as_u16()
}

/// `GET <base>/metrics`: the Prometheus text.
pub async fn scrape(base: &str) -> String {
    get_text(&format!("{base}/metrics")).await
}

/// How many blocks `weir serve` at `router` holds for endpoint `id` in its prefix index (`GET /debug/prefix`, first
/// pool); 0 when the endpoint is not listed.
pub async fn prefix_blocks(router: &str, id: &str) -> u64 {
    let url = format!("{router}/debug/prefix");
    let v: Value = serde_json::from_str(&get_text(&url).await)
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"));
    v["pools"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["id"] == id)
        .and_then(|e| e["blocks"].as_u64())
        .unwrap_or(0)
}

/// The labels (the text inside `{..}`, "" without any) and value of each sample of series `name` (exact name), read
/// with weir's one Prometheus text parser.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    policies::promtext::series(text, name).map(|s| (s.labels, s.value))
}

/// The value of the first sample of series `name` (exact name, any labels). Panics when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    samples(text, name)
        .next()
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// The sum over the samples of series `name` (exact name) whose label set contains `label` ("" for all).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    samples(text, name)
        .filter(|(labels, _)| labels.contains(label))
        .map(|(_, v)| v)
        .sum()
}

/// The payloads of an SSE body's `data:` events, in order (`[DONE]` included).
pub fn sse_data(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect()
}

/// The JSON payloads of an SSE body's `data:` events (`[DONE]` left out). Panics on a payload that is not JSON.
pub fn sse_json(body: &str) -> Vec<Value> {
    sse_data(body)
        .into_iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("SSE data {d:?}: {e}")))
        .collect()
}

/// Poll `check` every 20 ms until it is true; panic naming `what` if `limit` passes first.
pub async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
