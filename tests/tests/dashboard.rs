//! The fleet dashboard in a real browser: a relay fed by a real agent (whose threshold the
//! relay's tuner moves), and headless Chromium driven over the DevTools protocol. The page
//! answers 401 with the login form until the operator logs in with the token through that
//! form; then the fleet page lists the device and its plots carry data, the device's page
//! shows the tuner's push, screenshots are taken, and the browser logged no console error,
//! exception or failed load (CSP violations included) on the dashboard pages.
//!
//! Chromium's command line cannot log in (no form posts, no cookies, and the token must not
//! be put in a URL), so the test talks the DevTools protocol over `--remote-debugging-pipe`
//! (NUL-separated JSON on file descriptors 3 and 4): no WebSocket client, no new crate.
//!
//! `TIERD_SKIP_CHROMIUM=1` skips (with a note) when Chromium is not installed; otherwise a
//! missing Chromium fails. `TIERD_DASHBOARD_SCREENSHOT=path.png` also writes the device page's
//! screenshot there; the ignored test `dashboard_screenshot_for_the_readme` makes
//! `docs/dashboard.png` from a longer run with three devices.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tierd_e2e::{
    confident_examples, unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc,
};

/// Set to skip (with a note) when Chromium is not installed.
const SKIP_CHROMIUM_ENV: &str = "TIERD_SKIP_CHROMIUM";
/// Every wait on the browser is bounded by this.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(20);

/// The Chromium binary, or `None` (after a note) when it is missing and skipping is allowed.
fn chromium_binary() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        });
        if found.is_some() {
            return found;
        }
    }
    if std::env::var_os(SKIP_CHROMIUM_ENV).is_some() {
        eprintln!(
            "\n!!! NOTE: Chromium is not installed: the dashboard's browser test is SKIPPED \
             ({SKIP_CHROMIUM_ENV}=1) !!!\n"
        );
        return None;
    }
    panic!(
        "Chromium is not installed (no chromium on PATH): run scripts/install-test-deps, or set \
         {SKIP_CHROMIUM_ENV}=1 to skip"
    );
}

/// One pipe, both ends close-on-exec: (read, write).
fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}

/// Headless Chromium with the DevTools protocol on a pipe, one page attached.
struct Browser {
    child: Child,
    to_browser: std::fs::File,
    from_browser: mpsc::Receiver<Value>,
    /// Events seen while waiting for something else, oldest first.
    events: VecDeque<Value>,
    /// Console errors, exceptions and failed loads, as text.
    errors: Vec<String>,
    next_id: u64,
    session: String,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(binary: &Path, log: &Path) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("tierd-chromium-")
            .tempdir()
            .expect("a temp dir for the browser profile");
        let (child_reads, we_write) = pipe();
        let (we_read, child_writes) = pipe();
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--password-store=basic",
            "--hide-scrollbars",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(log).expect("browser log"),
        ))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .append(true)
                .open(log)
                .expect("browser log"),
        ));
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2): the
        // protocol's ends become descriptors 3 (commands in) and 4 (answers out), without
        // close-on-exec. They are copied high first, so neither source is 3 or 4 itself.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::fcntl(child_reads, libc::F_DUPFD, 10);
                let w = libc::fcntl(child_writes, libc::F_DUPFD, 10);
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("chromium starts");
        // SAFETY: the descriptors came from pipe2 above and are owned here from now on.
        let (to_browser, mut reader) = unsafe {
            libc::close(child_reads);
            libc::close(child_writes);
            (
                std::fs::File::from_raw_fd(we_write),
                std::fs::File::from_raw_fd(we_read),
            )
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..msg.len() - 1]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to_browser,
            from_browser: rx,
            events: VecDeque::new(),
            errors: Vec::new(),
            next_id: 0,
            session: String::new(),
            log: log.to_owned(),
            _profile: profile,
        };
        let targets = b.call(None, "Target.getTargets", json!({}));
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .unwrap_or_else(|| panic!("no page target: {targets}"))
            .to_string();
        let attached = b.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": page, "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            b.page(domain, json!({}));
        }
        b.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        b
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The next message from the browser, or a panic after the timeout.
    fn recv(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.from_browser.recv_timeout(left) {
            Ok(v) => v,
            Err(_) => panic!(
                "the browser did not answer ({waiting_for}) within {BROWSER_TIMEOUT:?}; its log:\n{}",
                self.log_tail()
            ),
        }
    }

    /// Sends a command (to the page's session, or the browser's) and waits for its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("JSON");
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("{method} not sent: {e}; log:\n{}", self.log_tail()));
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        loop {
            let v = self.recv(deadline, method);
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
            self.note(v);
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    /// Keeps an event: console errors, exceptions and failed loads are also written down.
    fn note(&mut self, v: Value) {
        let p = &v["params"];
        let error = match v["method"].as_str() {
            Some("Runtime.consoleAPICalled")
                if matches!(p["type"].as_str(), Some("error" | "assert")) =>
            {
                Some(format!("console.{}: {}", p["type"], p["args"]))
            }
            Some("Runtime.exceptionThrown") => {
                Some(format!("exception: {}", p["exceptionDetails"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => Some(format!(
                "{} error: {} ({})",
                p["entry"]["source"].as_str().unwrap_or("log"),
                p["entry"]["text"].as_str().unwrap_or(""),
                p["entry"]["url"].as_str().unwrap_or("")
            )),
            Some("Network.loadingFailed") => Some(format!("load failed: {p}")),
            _ => None,
        };
        if let Some(e) = error {
            self.errors.push(e);
        }
        self.events.push_back(v);
    }

    /// Waits for the event `method` (one already seen counts), dropping those before it.
    fn wait_event(&mut self, method: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            let e = self.events.remove(i).expect("present");
            self.events.drain(..i);
            return e;
        }
        self.events.clear();
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        loop {
            let v = self.recv(deadline, method);
            let hit = v["method"] == method;
            self.note(v);
            if hit {
                return self.events.pop_back().expect("just noted");
            }
        }
    }

    /// Navigates and waits for the page's load event.
    fn open(&mut self, url: &str) {
        self.events.clear();
        let r = self.page("Page.navigate", json!({ "url": url }));
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
        self.wait_event("Page.loadEventFired");
    }

    /// Evaluates `expr` in the page (DevTools evaluation, not subject to the page's CSP).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.page(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Types `text` into the focused field and presses Enter, as a person would.
    fn type_and_enter(&mut self, text: &str) {
        self.page("Input.insertText", json!({ "text": text }));
        for kind in ["keyDown", "keyUp"] {
            let mut key = json!({ "type": kind, "key": "Enter", "code": "Enter",
                                  "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13 });
            if kind == "keyDown" {
                key["text"] = json!("\r");
            }
            self.page("Input.dispatchKeyEvent", key);
        }
    }

    /// A PNG of the whole page.
    fn screenshot(&mut self, path: &Path) -> usize {
        // A short viewport first, so the page's own height is what is measured.
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 400, "deviceScaleFactor": 1, "mobile": false }),
        );
        let height = self
            .eval("Math.ceil(document.documentElement.scrollHeight)")
            .as_f64()
            .unwrap_or(1000.0)
            .clamp(400.0, 4000.0);
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let shot = self.page("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, &png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        png.len()
    }

    fn close(mut self) {
        self.next_id += 1;
        let msg = json!({ "id": self.next_id, "method": "Browser.close", "params": {} });
        let mut bytes = serde_json::to_vec(&msg).expect("JSON");
        bytes.push(0);
        let _ = self.to_browser.write_all(&bytes);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Standard base64 (the screenshot's encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// What the page's plots hold, counted in the DOM.
const PLOTS_JS: &str = r#"JSON.stringify({
  path: location.pathname,
  plots: [...document.querySelectorAll('svg.plot')].map(s => ({
    title: s.getAttribute('aria-label'),
    points: +s.dataset.points,
    lines: [...s.querySelectorAll('polyline.series')].filter(p => p.getAttribute('points').trim().length > 0).length,
    bars: s.querySelectorAll('rect.bar').length,
    markers: s.querySelectorAll('line.marker').length,
  })),
  rows: [...document.querySelectorAll('tr.device')].map(r => r.dataset.device),
  login: !!document.querySelector('form[action="/login"]'),
  css: getComputedStyle(document.body).margin,
})"#;

fn plots(b: &mut Browser) -> Value {
    let text = b.eval(PLOTS_JS);
    serde_json::from_str(text.as_str().expect("a JSON string")).expect("JSON")
}

fn plot<'a>(state: &'a Value, title_starts: &str) -> &'a Value {
    state["plots"]
        .as_array()
        .and_then(|p| {
            p.iter().find(|p| {
                p["title"]
                    .as_str()
                    .is_some_and(|t| t.starts_with(title_starts))
            })
        })
        .unwrap_or_else(|| panic!("no plot {title_starts:?}: {state:#}"))
}

/// A relay whose tuner pushes at once (no hysteresis, no interval) from little evidence.
const TUNING: &str = "[tuning]\npolicy = \"target_agreement\"\ntarget = 0.9\ndelta = 0.05\n\
                      min_requests = 200\nhysteresis = 0.0\nmin_interval_s = 0.0\n";

/// An agent that escalates everything until the relay's tuner moves its threshold, auditing
/// `audit_rate` of its local answers.
async fn start_agent(device: &str, relay: &RelayProc, audit_rate: f64) -> AgentProc {
    let mut options = AgentOptions::new(device, relay.broker_port)
        .telemetry_interval_s(0.3)
        .audit_rate(audit_rate);
    options.threshold = Some(1.01);
    AgentProc::start(options).await
}

/// `rounds` of every confident and every unsure example, `pause` between rounds.
async fn traffic(agent: &AgentProc, rounds: usize, pause: Duration) {
    let (confident, unsure) = (confident_examples(), unsure_examples());
    for _ in 0..rounds {
        for ex in confident.iter().chain(&unsure) {
            let r = agent.infer(&ex.pixels).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        tokio::time::sleep(pause).await;
    }
}

/// Logs in through the form and checks both pages in the browser; returns the device page's
/// plot state. `shot` is where the device page's screenshot goes.
fn check_in_browser(
    chromium: &Path,
    relay: &RelayProc,
    devices: &[&str],
    dir: &Path,
    fleet_shot: &Path,
    device_shot: &Path,
) -> Value {
    let mut b = Browser::start(chromium, &dir.join("chromium.log"));
    // Not logged in: the login form, with a 401.
    b.open(&relay.url("/"));
    let before = plots(&mut b);
    assert!(
        before["login"] == true && before["plots"] == json!([]),
        "{before:#}"
    );
    // The 401 of that first page is the one error expected; what follows must have none.
    b.errors.clear();
    b.eval("document.getElementById('token').focus()");
    b.type_and_enter(&relay.token);
    b.wait_event("Page.loadEventFired");

    let fleet = plots(&mut b);
    assert_eq!(fleet["path"], "/", "{fleet:#}");
    assert_eq!(fleet["css"], "0px", "the stylesheet applies: {fleet:#}");
    for d in devices {
        assert!(
            fleet["rows"].as_array().unwrap().iter().any(|r| r == d),
            "{d} not listed: {fleet:#}"
        );
    }
    let mix = plot(&fleet, "Fleet requests by tier");
    assert!(
        mix["points"].as_u64() > Some(0) && mix["bars"].as_u64() > Some(0),
        "{fleet:#}"
    );
    let rate = plot(&fleet, "Fleet escalation rate");
    assert!(rate["lines"].as_u64() > Some(0), "{fleet:#}");
    assert!(
        rate["markers"].as_u64() > Some(0),
        "the tuner's push is marked: {fleet:#}"
    );
    let size = b.screenshot(fleet_shot);
    assert!(size > 10_000, "{size} bytes");

    b.open(&relay.url(&format!("/devices/{}", devices[0])));
    let device = plots(&mut b);
    assert_eq!(device["login"], false, "still logged in: {device:#}");
    let esc = plot(&device, "Escalation rate and threshold");
    assert!(
        esc["lines"].as_u64() >= Some(2) && esc["markers"].as_u64() > Some(0),
        "{device:#}"
    );
    for title in [
        "Requests by tier",
        "Agreement with the cloud",
        "Latency per path",
        "Energy per local inference",
    ] {
        let p = plot(&device, title);
        assert!(
            p["points"].as_u64() > Some(0),
            "{title} has no data: {device:#}"
        );
    }
    let size = b.screenshot(device_shot);
    assert!(size > 10_000, "{size} bytes");
    let errors = std::mem::take(&mut b.errors);
    b.close();
    assert!(
        errors.is_empty(),
        "the browser logged errors on the dashboard:\n{}",
        errors.join("\n")
    );
    device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_logs_in_and_plots_the_fleet_in_chromium() {
    let Some(chromium) = chromium_binary() else {
        return;
    };
    let started = Instant::now();
    let device = "dash-e2e";
    let relay = RelayProc::start_with("dash-relay", RelayBroker::Embedded, TUNING).await;
    let agent = start_agent(device, &relay, 1.0).await;

    // Without a session the pages answer 401 (with the login form), with one 200.
    let plain = tierd_e2e::http_client();
    let resp = plain.get(relay.url("/")).send().await.expect("GET /");
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().await.unwrap_or_default().contains("/login"));

    traffic(&agent, 40, Duration::from_millis(20)).await;
    relay
        .wait_device_config(device, "a tuned threshold pushed", |v| {
            v["published"]["source"] == "tuner"
        })
        .await;
    // Some traffic at the tuned threshold, so the plots show the change.
    traffic(&agent, 10, Duration::from_millis(20)).await;
    relay
        .wait_device(device, "the latest traffic reported", |v| {
            v["latest"]["threshold"].as_f64().is_some_and(|t| t < 1.0)
                && v["latest"]["window"]["edge"].as_u64() > Some(0)
        })
        .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let device_shot = std::env::var_os("TIERD_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("device.png"));
    check_in_browser(
        &chromium,
        &relay,
        &[device],
        dir.path(),
        &dir.path().join("fleet.png"),
        &device_shot,
    );
    eprintln!("dashboard suite: {:.1} s", started.elapsed().as_secs_f64());
}

/// Makes the README's screenshot (`docs/dashboard.png`, and `docs/dashboard-device.png`'s
/// source in the temp dir) from a longer run: three devices with different traffic, the tuner
/// moving each. `cargo test -p tierd-e2e --test dashboard -- --ignored`; then shrink the PNG
/// (e.g. `pngquant`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes docs/dashboard.png; slow"]
async fn dashboard_screenshot_for_the_readme() {
    let Some(chromium) = chromium_binary() else {
        return;
    };
    let relay = RelayProc::start_with("dash-shot", RelayBroker::Embedded, TUNING).await;
    let names = ["orchard-01", "orchard-02", "lab-07"];
    let mut agents = Vec::new();
    for name in names {
        // Fewer audits than the suite's: the cloud calls they save show in the cost figures.
        agents.push(start_agent(name, &relay, 0.25).await);
    }
    let (confident, unsure) = (confident_examples(), unsure_examples());
    // Most of a minute of traffic in phases: mostly easy inputs, one device with more hard
    // ones for a while, one quieter, so the tiers and rates differ and move.
    for phase in 0..45 {
        for (i, agent) in agents.iter().enumerate() {
            let hard_per_8 = match i {
                0 => 1,
                1 => 2,
                _ if (15..30).contains(&phase) => 4,
                _ => 1,
            };
            let n = if i == 1 && phase % 4 == 0 { 4 } else { 16 };
            for k in 0..n {
                let ex = if k % 8 < hard_per_8 {
                    &unsure[k % unsure.len()]
                } else {
                    &confident[k % confident.len()]
                };
                let r = agent.infer(&ex.pixels).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        }
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    for name in names {
        relay
            .wait_device_config(name, "a tuned threshold pushed", |v| {
                v["published"]["source"] == "tuner"
            })
            .await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let docs = tierd_e2e::repo_root().join("docs");
    check_in_browser(
        &chromium,
        &relay,
        &names,
        dir.path(),
        &docs.join("dashboard.png"),
        &docs.join("dashboard-device.png"),
    );
}
