//! End-to-end test support: runs the real `edge-agent` and `cloud-relay` binaries (and Mosquitto)
//! as child processes, each with its own config and log file in a temporary directory.
//!
//! - The binaries are taken from the target directory the test executable lives in, so
//!   `cargo build --workspace --bins && cargo test --workspace` tests what was just built.
//! - Every process is killed when its guard is dropped, also when a test panics; a panicking test
//!   prints the tail of each process's log, so a failure explains itself.
//! - Every wait is bounded; nothing here depends on speed beyond generous limits.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long a process may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any single HTTP exchange with the agent.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The log filter every spawned daemon runs with.
pub const RUST_LOG: &str = "info,rumqttd=warn";
/// Log line of the agent once its MQTT session is up.
pub const AGENT_MQTT_READY: &str = "connected to MQTT broker";
/// Log line of the relay once it is connected and has asked for escalations.
pub const RELAY_READY: &str = "connected; taking escalations";
/// Name of the edge model as served over HTTP.
pub const EDGE_MODEL: &str = "digits-edge";
/// Set to `1` to skip (instead of fail) the Mosquitto tests where Mosquitto is not installed.
pub const SKIP_MOSQUITTO_ENV: &str = "TIERD_SKIP_MOSQUITTO";

// ---------------------------------------------------------------------------------------------
// Paths

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The committed edge model manifest (absolute).
pub fn edge_manifest() -> PathBuf {
    repo_root().join("models/edge/digits-edge.toml")
}

/// The committed cloud model manifest (absolute).
pub fn cloud_manifest() -> PathBuf {
    repo_root().join("models/cloud/digits-cloud.toml")
}

/// A workspace binary built next to the running test executable
/// (`target/debug/deps/e2e-…` → `target/debug/edge-agent`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has a folder")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
         (the end-to-end tests run the built binaries)",
        path.display()
    );
    path
}

/// A TCP port that was free a moment ago on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind 127.0.0.1:0");
    l.local_addr().expect("bound socket has an address").port()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// `path` as a TOML string literal.
fn toml_path(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Evaluation examples

/// A named input from `models/eval/examples.toml` with both models' expected probabilities.
#[derive(Debug, Clone, Deserialize)]
pub struct Example {
    pub name: String,
    pub label: usize,
    pub pixels: Vec<u8>,
    pub edge_probabilities: Vec<f32>,
    pub cloud_probabilities: Vec<f32>,
}

#[derive(Deserialize)]
struct ExampleFile {
    example: Vec<Example>,
}

/// Every example in `models/eval/examples.toml`.
pub fn examples() -> Vec<Example> {
    let path = repo_root().join("models/eval/examples.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file: ExampleFile =
        toml::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()));
    assert!(
        !file.example.is_empty(),
        "{} has no examples",
        path.display()
    );
    file.example
}

/// The example called `name`.
pub fn example(name: &str) -> Example {
    examples()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no example named {name:?} in models/eval/examples.toml"))
}

/// Examples the edge model answers confidently (and correctly).
pub fn confident_examples() -> Vec<Example> {
    let v: Vec<_> = examples()
        .into_iter()
        .filter(|e| e.name.starts_with("confident"))
        .collect();
    assert!(!v.is_empty(), "no confident* examples");
    v
}

/// Examples the edge model is unsure about (its top-1 is wrong, the cloud's is right).
pub fn unsure_examples() -> Vec<Example> {
    let v: Vec<_> = examples()
        .into_iter()
        .filter(|e| e.name.starts_with("unsure"))
        .collect();
    assert!(!v.is_empty(), "no unsure* examples");
    v
}

// ---------------------------------------------------------------------------------------------
// Assertions on probability vectors and responses

/// Index of the largest value (first on ties), as the agent computes it.
pub fn top1(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |(bi, bp), (i, &x)| {
                if x > bp {
                    (i, x)
                } else {
                    (bi, bp)
                }
            },
        )
        .0
}

/// Panics unless `got` and `expected` have the same length and differ by at most `tol` anywhere.
pub fn assert_probs_close(got: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(
        got.len(),
        expected.len(),
        "{what}: {} probabilities, expected {}: got {got:?}",
        got.len(),
        expected.len()
    );
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let diff = (g - e).abs();
        assert!(
            diff <= tol,
            "{what}: class {i} is {g}, expected {e} (|diff| {diff:e} > {tol:e})\n got      {got:?}\n expected {expected:?}"
        );
    }
}

/// The JSON body of an inference request for one 8x8 UINT8 input.
pub fn infer_body(pixels: &[u8]) -> Value {
    json!({
        "inputs": [{
            "name": "input",
            "shape": [1, pixels.len()],
            "datatype": "UINT8",
            "data": pixels,
        }]
    })
}

/// A response to `POST /v2/models/{name}/infer`.
#[derive(Debug, Clone)]
pub struct InferResult {
    pub status: u16,
    pub body: Value,
    /// Wall time of the whole HTTP exchange, as the client saw it.
    pub elapsed: Duration,
}

impl InferResult {
    /// `parameters.tier` (`""` when absent).
    pub fn tier(&self) -> &str {
        self.body["parameters"]["tier"].as_str().unwrap_or("")
    }

    /// `parameters.fallback_reason`, if any.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.body["parameters"]["fallback_reason"].as_str()
    }

    /// `parameters.confidence`.
    pub fn confidence(&self) -> f64 {
        self.body["parameters"]["confidence"]
            .as_f64()
            .unwrap_or_else(|| panic!("no parameters.confidence in {}", self.body))
    }

    /// `outputs[0].data` as probabilities.
    pub fn probabilities(&self) -> Vec<f32> {
        self.body["outputs"][0]["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no outputs[0].data in {}", self.body))
            .iter()
            .map(|v| {
                v.as_f64()
                    .unwrap_or_else(|| panic!("non-number {v} in outputs[0].data"))
                    as f32
            })
            .collect()
    }

    /// `error` of an error response (`""` when absent).
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    /// Panics unless the status is 200 and the answer came from `tier`.
    pub fn assert_ok_from(&self, tier: &str, what: &str) {
        assert_eq!(
            self.status, 200,
            "{what}: status {}: {}",
            self.status, self.body
        );
        assert_eq!(self.tier(), tier, "{what}: wrong tier in {}", self.body);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A running child process whose stdout and stderr go to a log file. Killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        let log = File::create(log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log2 = log
            .try_clone()
            .expect("cannot duplicate the log file handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
            exited: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self, doing: &str) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited ({status}) while {doing}; its log:\n{}",
                self.name,
                self.log_tail(60)
            );
        }
    }

    /// Waits until the log contains `needle` `count` times; panics on timeout or exit.
    pub async fn wait_for_log_count(&mut self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            self.assert_running(&format!("waiting for {needle:?} in its log"));
            if start.elapsed() > timeout {
                panic!(
                    "{} did not log {needle:?} (x{count}) within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the log contains `needle`; panics on timeout or exit.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout).await;
    }

    /// Kills the process (SIGKILL: a crash, no goodbye) and reaps it.
    pub fn kill(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// SIGTERM, then waits at most `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the process to exit by itself; kills it and panics if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exit_status() {
                return s;
            }
            if start.elapsed() > timeout {
                self.kill();
                panic!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log tail -----\n{}\n----- end of {} log -----",
                self.name,
                self.child.id(),
                self.log_tail(40),
                self.name
            );
        }
    }
}

/// A daemon command with the test environment applied.
pub fn daemon_command(binary: &str) -> Command {
    let mut cmd = Command::new(bin_path(binary));
    cmd.env("RUST_LOG", RUST_LOG)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG_STYLE");
    cmd
}

// ---------------------------------------------------------------------------------------------
// Cloud relay

/// Where a relay gets its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayBroker {
    /// Embed rumqttd on a free port.
    Embedded,
    /// Join the broker at 127.0.0.1:`port` (`[mqtt]` section).
    External(u16),
}

/// A running `cloud-relay`.
pub struct RelayProc {
    pub proc: Proc,
    /// The broker port the relay uses (its embedded one, or the external one it joined).
    pub broker_port: u16,
    /// Where its `/metrics` and `/api/devices` are served.
    pub http_port: u16,
    pub relay_id: String,
    _dir: TempDir,
}

impl RelayProc {
    /// Starts a relay and waits until it is connected and taking escalations.
    pub async fn start(relay_id: &str, broker: RelayBroker) -> RelayProc {
        Self::start_with(relay_id, broker, "").await
    }

    /// Like [`RelayProc::start`], with `extra` appended to relay.toml (whole sections, e.g.
    /// `[tuning]`), and `http_port` chosen by the caller if given.
    pub async fn start_with(relay_id: &str, broker: RelayBroker, extra: &str) -> RelayProc {
        // A port found free may be taken by the time the relay binds it; try a few.
        for attempt in 1..=3 {
            let dir = tempfile::Builder::new()
                .prefix(&format!("tierd-relay-{relay_id}-"))
                .tempdir()
                .expect("cannot create a temp dir");
            let (broker_port, broker_section) = match broker {
                RelayBroker::Embedded => {
                    let port = free_port();
                    (
                        port,
                        format!("[embedded_broker]\nlisten = \"127.0.0.1:{port}\"\n"),
                    )
                }
                RelayBroker::External(port) => (
                    port,
                    format!("[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n"),
                ),
            };
            let http_port = free_port();
            let config = format!(
                "relay_id = \"{relay_id}\"\nstate_dir = \"state\"\n\n[model]\nmanifest = {}\n\n\
                 [http]\nlisten = \"127.0.0.1:{http_port}\"\n\n{broker_section}\n{extra}\n",
                toml_path(&cloud_manifest())
            );
            let config_path = dir.path().join("relay.toml");
            std::fs::write(&config_path, &config).expect("cannot write relay.toml");
            let mut cmd = daemon_command("cloud-relay");
            cmd.arg("run").arg("--config").arg(&config_path);
            let mut proc = Proc::spawn(
                &format!("cloud-relay {relay_id}"),
                cmd,
                &dir.path().join("relay.log"),
            );
            let start = Instant::now();
            loop {
                if proc.log().contains(RELAY_READY) {
                    return RelayProc {
                        proc,
                        broker_port,
                        http_port,
                        relay_id: relay_id.to_owned(),
                        _dir: dir,
                    };
                }
                if proc.exit_status().is_some() {
                    let log = proc.log();
                    if log.contains("cannot listen") && attempt < 3 {
                        break; // port race: retry with another port
                    }
                    proc.assert_running("starting");
                }
                if start.elapsed() > READY_TIMEOUT {
                    panic!(
                        "cloud-relay {relay_id} did not log {RELAY_READY:?} within {READY_TIMEOUT:?}; its log:\n{}",
                        proc.log_tail(60)
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Kills the relay (SIGKILL).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Sends SIGTERM and waits for the exit (a graceful stop).
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.terminate(Duration::from_secs(15))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// GET on the relay's HTTP API: status and body text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = http_client()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on relay {}: {e}", self.relay_id));
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// Polls `GET path` until it answers 200 with a body for which `done` holds; panics with
    /// the last body and the relay's log after 40 s.
    pub async fn wait_json(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let limit = Duration::from_secs(40);
        let start = Instant::now();
        loop {
            let (status, v) = self.get_json(path).await;
            if status == 200 && done(&v) {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "waited {limit:?} for {what} on {path}; last: {v:#}\nrelay log:\n{}",
                self.proc.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET on the relay's HTTP API, parsed as JSON.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(path).await;
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: body is not JSON ({e}): {text}"));
        (status, body)
    }
}

// ---------------------------------------------------------------------------------------------
// Edge agent

/// What to put in an agent's config.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub device_id: String,
    /// Broker port on 127.0.0.1.
    pub mqtt_port: u16,
    pub threshold: f32,
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
}

impl AgentOptions {
    /// Threshold 0.9, a generous 5 s escalation timeout, and waiting for MQTT.
    pub fn new(device_id: &str, mqtt_port: u16) -> Self {
        AgentOptions {
            device_id: device_id.to_owned(),
            mqtt_port,
            threshold: 0.9,
            escalation_timeout_ms: 5000,
            max_body_bytes: None,
            wait_for_mqtt: true,
            telemetry_interval_s: 30.0,
            audit_rate: 0.02,
            state_dir: None,
            extra: String::new(),
        }
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
             [model]\nmanifest = {}\n\n\
             [cascade]\nthreshold = {:?}\nsignal = \"max_prob\"\nescalation_timeout_ms = {}\n\
             audit_rate = {:?}\nmax_audits_per_second = 10000\n\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {}\n\n\
             [telemetry]\ninterval_s = {:?}\n\n{}",
            self.device_id,
            toml_path(&edge_manifest()),
            self.threshold,
            self.escalation_timeout_ms,
            self.audit_rate,
            self.mqtt_port,
            self.telemetry_interval_s,
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

/// A client with bounded timeouts for talking to an agent.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build()
        .expect("cannot build the HTTP client")
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
}

async fn read_response(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("cannot read the response body: {e}"));
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// Overrides where the Mosquitto binary is looked for (a path; if it is not a file, Mosquitto
/// counts as not installed).
pub const MOSQUITTO_BIN_ENV: &str = "TIERD_MOSQUITTO";

/// The Mosquitto broker binary, if installed: `$TIERD_MOSQUITTO`, else `/usr/sbin/mosquitto`, else
/// `mosquitto` on `PATH`.
pub fn mosquitto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(MOSQUITTO_BIN_ENV) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let standard = PathBuf::from("/usr/sbin/mosquitto");
    if standard.is_file() {
        return Some(standard);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    })
}

/// A running Mosquitto with a throwaway config; logs everything (including each PUBLISH it sends,
/// so tests can see which client got what).
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    _dir: TempDir,
}

/// Starts Mosquitto on 127.0.0.1:`port` and waits until it accepts connections.
///
/// Returns `None` (after printing a note) only when Mosquitto is not installed and
/// `TIERD_SKIP_MOSQUITTO=1`; without that variable a missing Mosquitto fails the test.
pub async fn start_mosquitto(port: u16) -> Option<Mosquitto> {
    let Some(binary) = mosquitto_binary() else {
        if std::env::var(SKIP_MOSQUITTO_ENV).as_deref() == Ok("1") {
            eprintln!(
                "SKIPPED: mosquitto is not installed and {SKIP_MOSQUITTO_ENV}=1; \
                 this Mosquitto test did not run"
            );
            return None;
        }
        panic!(
            "mosquitto is not installed (looked at ${MOSQUITTO_BIN_ENV} if set, else \
             /usr/sbin/mosquitto and PATH): `apt-get install mosquitto`, \
             or set {SKIP_MOSQUITTO_ENV}=1 to skip these tests"
        );
    };
    let dir = tempfile::Builder::new()
        .prefix("tierd-mosquitto-")
        .tempdir()
        .expect("cannot create a temp dir");
    let conf = format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         log_dest stderr\n\
         log_type all\n\
         connection_messages true\n"
    );
    let conf_path = dir.path().join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("cannot write mosquitto.conf");
    let mut cmd = Command::new(binary);
    cmd.arg("-c").arg(&conf_path);
    let mut proc = Proc::spawn("mosquitto", cmd, &dir.path().join("mosquitto.log"));
    let start = Instant::now();
    while !port_accepts(port) {
        proc.assert_running("starting");
        if start.elapsed() > READY_TIMEOUT {
            panic!(
                "mosquitto does not accept connections on port {port} after {READY_TIMEOUT:?}; its log:\n{}",
                proc.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Some(Mosquitto {
        proc,
        port,
        _dir: dir,
    })
}

impl Mosquitto {
    /// Waits until Mosquitto has acknowledged a subscription from `client_id`
    /// (e.g. `cloud-relay-r1`, `edge-agent-dev-1`).
    pub async fn wait_for_suback(&mut self, client_id: &str) {
        self.proc
            .wait_for_log(&format!("Sending SUBACK to {client_id}"), READY_TIMEOUT)
            .await;
    }

    /// How many PUBLISH packets on a topic containing `topic_part` Mosquitto sent to `client_id`.
    pub fn publishes_sent_to(&self, client_id: &str, topic_part: &str) -> usize {
        let prefix = format!("Sending PUBLISH to {client_id} ");
        self.proc
            .log()
            .lines()
            .filter(|l| l.contains(&prefix) && l.contains(topic_part))
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// A foreign MQTT client

/// An MQTT v5 client of the test itself (not a tierd component), on 127.0.0.1:`port`.
pub struct TestClient {
    pub client: rumqttc::v5::AsyncClient,
    task: tokio::task::JoinHandle<()>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TestClient {
    /// Connects and waits for the CONNACK.
    pub async fn connect(port: u16, client_id: &str) -> TestClient {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(4 * 1024 * 1024));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 1024);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::Event;
            let mut tx = Some(tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(READY_TIMEOUT, rx)
            .await
            .expect("test MQTT client: no CONNACK")
            .expect("test MQTT client task ended");
        TestClient {
            client,
            task,
            acked,
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let before = self.acked.load(std::sync::atomic::Ordering::Relaxed);
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                retain,
                payload,
            )
            .await
            .expect("test MQTT client: publish");
        let start = Instant::now();
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) <= before {
            assert!(start.elapsed() < READY_TIMEOUT, "no PUBACK for {topic}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resident memory of a process, from /proc (bytes).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
