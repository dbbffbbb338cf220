//! An `edge-agent` process: its config ([`AgentOptions`]) and its HTTP API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::clients::read_response;
use crate::clients::{http_client, infer_body, InferResult};
use crate::fixtures::{
    assert_probs_close, edge_manifest, toml_path, unsure_examples, AGENT_MQTT_READY, EDGE_MODEL,
    READY_TIMEOUT,
};
use crate::processes::{daemon_command, free_port, Proc};

/// What to put in an agent's config.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub device_id: String,
    /// Broker port on 127.0.0.1.
    pub mqtt_port: u16,
    /// `cascade.threshold`; `None` leaves it unset (the manifest's certified threshold).
    pub threshold: Option<f32>,
    pub escalation_timeout_ms: u64,
    pub max_body_bytes: Option<usize>,
    /// Wait for the agent's "connected to MQTT broker" before returning from start.
    pub wait_for_mqtt: bool,
    /// `telemetry.interval_s`.
    pub telemetry_interval_s: f64,
    /// `cascade.audit_rate` (the agent's default, 0.02, unless set).
    pub audit_rate: f64,
    /// `state_dir` (spool, applied config); default: a fresh folder beside the config. Set it
    /// to keep state across a restart.
    pub state_dir: Option<PathBuf>,
    /// Appended to agent.toml (whole sections, e.g. `[spool]`).
    pub extra: String,
    /// Extra keys inside `[mqtt]` (e.g. TLS files).
    pub mqtt_extra: String,
    /// `[remote_config] trusted_keys`: the test relays' key unless set.
    pub trusted_keys: Vec<String>,
    /// `[model]`: the manifest (the committed edge model unless set) and `trusted_keys`.
    pub manifest: Option<PathBuf>,
    pub model_keys: Vec<String>,
    /// Environment variables of the agent process.
    pub env: Vec<(String, String)>,
}

impl AgentOptions {
    /// Threshold 0.9, a generous 5 s escalation timeout, and waiting for MQTT.
    pub fn new(device_id: &str, mqtt_port: u16) -> Self {
        AgentOptions {
            device_id: device_id.to_owned(),
            mqtt_port,
            threshold: Some(0.9),
            escalation_timeout_ms: 5000,
            max_body_bytes: None,
            wait_for_mqtt: true,
            telemetry_interval_s: 30.0,
            audit_rate: 0.02,
            state_dir: None,
            extra: String::new(),
            mqtt_extra: String::new(),
            trusted_keys: vec![crate::signing::relay_public_key().to_string()],
            manifest: None,
            model_keys: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Sets an environment variable of the agent process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Adds keys to the `[mqtt]` section (e.g. `ca_file = "..."`).
    pub fn mqtt(mut self, keys: &str) -> Self {
        self.mqtt_extra.push_str(keys);
        self.mqtt_extra.push('\n');
        self
    }

    /// Runs `manifest` and requires it signed by one of `keys` (`[model] trusted_keys`).
    pub fn model(mut self, manifest: &Path, keys: Vec<String>) -> Self {
        self.manifest = Some(manifest.to_path_buf());
        self.model_keys = keys;
        self
    }

    /// Pins these relay keys instead of the test relays' one (empty: none).
    pub fn trusted_keys(mut self, keys: Vec<String>) -> Self {
        self.trusted_keys = keys;
        self
    }

    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    /// Appends whole TOML sections to agent.toml.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Audit this fraction of local answers, with no per-second cap in the way.
    /// `cascade.threshold` (`None`: unset, so the manifest's certified threshold).
    pub fn threshold(mut self, t: Option<f32>) -> Self {
        self.threshold = t;
        self
    }

    pub fn audit_rate(mut self, rate: f64) -> Self {
        self.audit_rate = rate;
        self
    }

    pub fn telemetry_interval_s(mut self, s: f64) -> Self {
        self.telemetry_interval_s = s;
        self
    }

    pub fn escalation_timeout_ms(mut self, ms: u64) -> Self {
        self.escalation_timeout_ms = ms;
        self
    }

    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = Some(n);
        self
    }

    /// Do not wait for the MQTT session (for agents whose broker is absent on purpose).
    pub fn without_broker(mut self) -> Self {
        self.wait_for_mqtt = false;
        self
    }

    /// The agent.toml these options describe, serving HTTP on `http_port`.
    pub fn toml(&self, http_port: u16) -> String {
        let body = self
            .max_body_bytes
            .map(|n| format!("max_body_bytes = {n}\n"))
            .unwrap_or_default();
        let state = self
            .state_dir
            .as_ref()
            .map_or_else(|| "\"state\"".to_string(), |d| toml_path(d));
        format!(
            "device_id = \"{}\"\nstate_dir = {state}\n\n\
             [http]\nlisten = \"127.0.0.1:{http_port}\"\n{body}\n\
             [model]\nmanifest = {}\ntrusted_keys = {:?}\n\n\
             [cascade]\n{}signal = \"max_prob\"\nescalation_timeout_ms = {}\n\
             audit_rate = {:?}\nmax_audits_per_second = 10000\n\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {}\n{}\n\
             [telemetry]\ninterval_s = {:?}\n\n\
             [remote_config]\ntrusted_keys = {:?}\n\n{}",
            self.device_id,
            toml_path(self.manifest.as_deref().unwrap_or(&edge_manifest())),
            self.model_keys,
            self.threshold
                .map_or_else(String::new, |t| format!("threshold = {t:?}\n")),
            self.escalation_timeout_ms,
            self.audit_rate,
            self.mqtt_port,
            self.mqtt_extra,
            self.telemetry_interval_s,
            self.trusted_keys,
            self.extra,
        )
    }
}

/// A running `edge-agent` and an HTTP client for it.
pub struct AgentProc {
    pub proc: Proc,
    pub http_port: u16,
    pub options: AgentOptions,
    client: reqwest::Client,
    _dir: TempDir,
}

impl AgentProc {
    /// Starts an agent, waits until `GET /v2/health/ready` answers ready and (unless told not to)
    /// until its MQTT session is up.
    pub async fn start(options: AgentOptions) -> AgentProc {
        let client = http_client();
        for attempt in 1..=3 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("tierd-agent-{}-", options.device_id))
                .tempdir()
                .expect("cannot create a temp dir");
            let http_port = free_port();
            let config_path = dir.path().join("agent.toml");
            std::fs::write(&config_path, options.toml(http_port)).expect("cannot write agent.toml");
            let mut cmd = daemon_command("edge-agent");
            cmd.arg("run").arg("--config").arg(&config_path);
            cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
            let mut proc = Proc::spawn(
                &format!("edge-agent {}", options.device_id),
                cmd,
                &dir.path().join("agent.log"),
            );
            let ready_url = format!("http://127.0.0.1:{http_port}/v2/health/ready");
            let start = Instant::now();
            let ready = loop {
                if proc.exit_status().is_some() {
                    if proc.log().contains("cannot listen") && attempt < 3 {
                        break false; // port race: retry with another port
                    }
                    proc.assert_running("starting");
                }
                let answer = client
                    .get(&ready_url)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if let Ok(resp) = answer {
                    if resp.status().is_success() {
                        let body: Value = resp.json().await.unwrap_or(Value::Null);
                        if body["ready"] == json!(true) {
                            break true;
                        }
                    }
                }
                if start.elapsed() > READY_TIMEOUT {
                    panic!(
                        "edge-agent {} not ready at {ready_url} within {READY_TIMEOUT:?}; its log:\n{}",
                        options.device_id,
                        proc.log_tail(60)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if !ready {
                continue;
            }
            if options.wait_for_mqtt {
                proc.wait_for_log(AGENT_MQTT_READY, READY_TIMEOUT).await;
            }
            return AgentProc {
                proc,
                http_port,
                options,
                client,
                _dir: dir,
            };
        }
        unreachable!("the last attempt either returns or panics")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The agent's HTTP client (shares connections across calls).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The value of the first sample of metric `name` on `/metrics` whose line contains
    /// `label` (`""` for any).
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics");
        let text = body.as_str().unwrap_or_default();
        text.lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(label))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} {label} in /metrics:\n{text}"))
    }

    /// `GET path` → (status, JSON body or the text as a JSON string).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
        read_response(resp).await
    }

    /// `POST path` with raw bytes and extra headers.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> InferResult {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let start = Instant::now();
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
        let (status, body) = read_response(resp).await;
        InferResult {
            status,
            body,
            elapsed: start.elapsed(),
        }
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> InferResult {
        self.post_raw(path, body.to_string().into_bytes(), &[])
            .await
    }

    /// Infers one UINT8 input with the edge model's name.
    pub async fn infer(&self, pixels: &[u8]) -> InferResult {
        self.post_json(
            &format!("/v2/models/{EDGE_MODEL}/infer"),
            &infer_body(pixels),
        )
        .await
    }

    /// `n` requests, every third an unsure example and the rest confident ones, each answered
    /// 200; returns how many each tier answered.
    pub async fn mixed_traffic(&self, n: usize) -> std::collections::HashMap<String, u64> {
        let (unsure, confident) = (
            crate::fixtures::unsure_examples(),
            crate::fixtures::confident_examples(),
        );
        let mut by_tier = std::collections::HashMap::new();
        for i in 0..n {
            let ex = if i % 3 == 0 {
                &unsure[i % unsure.len()]
            } else {
                &confident[i % confident.len()]
            };
            let r = self.infer(&ex.pixels).await;
            assert_eq!(r.status, 200, "{}", r.body);
            *by_tier.entry(r.tier().to_string()).or_default() += 1;
        }
        by_tier
    }
}

/// Sends `requests` of the unsure examples at once, different inputs interleaved (a mixed-up
/// correlation would hand one request another's answer), and asserts each was answered by the
/// cloud with the cloud model's probabilities (within `tol`).
pub async fn assert_concurrent_cloud_answers(agent: &Arc<AgentProc>, requests: usize, tol: f32) {
    let unsure = unsure_examples();
    let mut tasks = Vec::new();
    for i in 0..requests {
        let ex = unsure[i % unsure.len()].clone();
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            let r = agent.infer(&ex.pixels).await;
            (i, ex, r)
        }));
    }
    for t in tasks {
        let (i, ex, r) = t.await.expect("request task");
        let what = format!("request {i} ({})", ex.name);
        r.assert_ok_from("cloud", &what);
        assert_probs_close(&r.probabilities(), &ex.cloud_probabilities, tol, &what);
    }
}
