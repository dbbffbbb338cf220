//! Rollout fault tests on the real binaries: the agent `kill -9`ed while it downloads the
//! candidate, while it shadows, and as the promotion lands; the broker killed mid-transfer. After
//! each the device serves a verified model and the rollout resumes.
//!
//! The candidate is `digits-edge` 2.0.0 with an unused 1 MiB initializer appended (the same
//! model, a file big enough to interrupt), fetched under `[rollout] max_download_bytes_per_s`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tierd_e2e::releases::{output_text, release_key, rollout_cli, sign_manifest};
use tierd_e2e::{
    edge_manifest, free_port, http_client, infer_body, repo_root, start_mosquitto, AgentOptions,
    AgentProc, RelayBroker, RelayProc,
};
use tierd_runtime::stream;

/// `src` renamed `digits-edge@version` in its own folder; with `pad` floats appended to its
/// ONNX file (through `tests/clients/pad_model.py`) when not 0. Signed with `key`.
fn model(dir: &Path, src: &Path, version: &str, pad: usize, key: &Path) -> PathBuf {
    let out_dir = dir.join(format!("digits-edge-{version}"));
    std::fs::create_dir_all(&out_dir).expect("dir");
    let mut m: toml::Table =
        toml::from_str(&std::fs::read_to_string(src).expect("manifest")).expect("toml");
    m.insert("name".into(), "digits-edge".into());
    m.insert("version".into(), version.into());
    let file = m["file"].as_str().expect("file").to_string();
    let onnx = out_dir.join(&file);
    if pad == 0 {
        std::fs::copy(src.with_file_name(&file), &onnx).expect("onnx");
    } else {
        let out = Command::new("python3")
            .arg(repo_root().join("tests/clients/pad_model.py"))
            .arg(src.with_file_name(&file))
            .arg(&onnx)
            .arg(pad.to_string())
            .output()
            .expect("python3");
        assert!(out.status.success(), "pad_model.py: {}", output_text(&out));
        let bytes = std::fs::read(&onnx).expect("padded");
        m.insert("sha256".into(), tierd_runtime::sha256_hex(&bytes).into());
    }
    let manifest = out_dir.join("digits-edge.toml");
    std::fs::write(&manifest, toml::to_string(&m).expect("toml")).expect("write");
    sign_manifest(&manifest, key);
    manifest
}

fn rollout_start(relay: &RelayProc, manifest: &Path, device: &str) {
    let m = manifest.to_str().expect("utf-8");
    let out = rollout_cli(
        relay,
        &[
            "start",
            "--manifest",
            m,
            "--devices",
            device,
            "--shadow-rate",
            "1",
        ],
    );
    assert!(out.status.success(), "rollout start: {}", output_text(&out));
}

async fn wait_rollout(relay: &RelayProc, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (status, v) = relay.get_json("/api/rollouts/digits-edge-2.0.0").await;
        if status == 200 && done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "waited 120 s for {what}; last: {v:#}\nrelay log:\n{}",
            relay.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends the evaluation stream to `url` until `stop` (answers only counted: the agent is killed
/// under it).
fn traffic(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let records = stream::read(&repo_root().join("models/eval/stream.bin")).expect("stream");
        let client = http_client();
        let mut ok = 0;
        'outer: loop {
            for r in &records {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                if let Ok(resp) = client.post(&url).json(&infer_body(&r.pixels)).send().await {
                    ok += u64::from(resp.status().is_success());
                }
            }
        }
        ok
    })
}

async fn serving(agent: &AgentProc) -> String {
    let (status, meta) = agent.get("/v2/models/digits-edge").await;
    assert_eq!(status, 200, "{meta}");
    meta["versions"][0].as_str().unwrap_or("").to_string()
}

fn part_len(state: &Path) -> u64 {
    std::fs::metadata(state.join("models/digits-edge@2.0.0/digits-edge.onnx.part"))
        .map_or(0, |m| m.len())
}

const RELAY_TOML: &str = "[rollout]\nmin_pairs = 1000\nmax_pairs = 2000\n";
/// About 5 s for the 1 MiB candidate.
const SLOW: &str = "[rollout]\nmax_download_bytes_per_s = 200000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_killed_while_downloading_shadowing_and_switching_ends_on_a_verified_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = release_key(dir.path(), "release");
    let current = model(
        dir.path(),
        &repo_root().join("models/edge/digits-edge-tiny.toml"),
        "1.0.0",
        0,
        &key,
    );
    let candidate = model(dir.path(), &edge_manifest(), "2.0.0", 262_144, &key);
    let total = std::fs::metadata(candidate.with_file_name("digits-edge.onnx"))
        .expect("onnx")
        .len();
    let relay = RelayProc::start_with("rf-relay", RelayBroker::Embedded, RELAY_TOML).await;
    let state = dir.path().join("rf-a");
    let options = AgentOptions::new("rf-a", relay.broker_port)
        .model(&current, vec![public.clone()])
        .telemetry_interval_s(0.5)
        .state_dir(&state)
        .extra(SLOW);
    let mut agent = AgentProc::start(options.clone()).await;
    rollout_start(&relay, &candidate, "rf-a");

    // 1. Killed mid-download: the partial file stays, the old model serves after the restart,
    //    and the download resumes from the bytes on disk.
    let t = Instant::now();
    while part_len(&state) < total / 5 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no download progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.proc.kill();
    let had = part_len(&state);
    assert!(had > 0 && had < total, "{had} of {total}");
    let mut agent = AgentProc::start(options.clone()).await;
    assert_eq!(serving(&agent).await, "1.0.0");
    // 1b. Killed as the download completes and verification starts (or just after): the
    //     restarted agent verifies the file again before anything runs it.
    let onnx = state.join("models/digits-edge@2.0.0/digits-edge.onnx");
    let t = Instant::now();
    while !onnx.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the download did not complete"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    agent.proc.kill();
    let first_log = agent.proc.log();
    let mut agent = AgentProc::start(options.clone()).await;
    assert_eq!(serving(&agent).await, "1.0.0");
    wait_rollout(&relay, "the shadow after the resumed download", |v| {
        v["devices"]["rf-a"]["phase"] == "Shadowing"
    })
    .await;
    let resumed = first_log
        .lines()
        .find(|l| l.contains("fetching the candidate"))
        .unwrap_or_else(|| panic!("no download after the restart:\n{first_log}"));
    assert!(resumed.contains(&format!("have={had}")), "{resumed}");
    assert!(
        agent.proc.log().contains("candidate verified"),
        "verified again after the kill:\n{}",
        agent.proc.log()
    );

    // 2. Killed while shadowing: the shadow lives in memory, so the restarted agent takes the
    //    retained document again, verifies the file it has and shadows, without fetching.
    agent.proc.kill();
    let mut agent = AgentProc::start(options.clone()).await;
    assert_eq!(serving(&agent).await, "1.0.0");
    agent
        .proc
        .wait_for_log("shadowing", Duration::from_secs(30))
        .await;
    assert!(!agent.proc.log().contains("fetching the candidate"));

    // 3. Killed as the promotion lands: whichever side of the switch the kill falls on, the
    //    restarted agent serves 2.0.0, verified, and the relay sees it promoted.
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(agent.url("/v2/models/digits-edge/infer"), stop.clone());
    let t = Instant::now();
    while !relay.proc.log().contains("stage=\"promote\"") {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no promotion:\n{}",
            relay.proc.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.proc.kill();
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.expect("traffic") >= 1000);
    let agent = AgentProc::start(options.clone()).await;
    let v = wait_rollout(&relay, "the promotion acknowledged", |v| {
        v["devices"]["rf-a"]["phase"] == "Promoted"
    })
    .await;
    assert_eq!(
        v["devices"]["rf-a"]["serving"], "digits-edge@2.0.0",
        "{v:#}"
    );
    assert_eq!(serving(&agent).await, "2.0.0");
    // And again: a plain restart stays on it.
    drop(agent);
    let agent = AgentProc::start(options).await;
    assert_eq!(serving(&agent).await, "2.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_mid_transfer_only_pauses_the_download() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = release_key(dir.path(), "release");
    let current = model(
        dir.path(),
        &repo_root().join("models/edge/digits-edge-tiny.toml"),
        "1.0.0",
        0,
        &key,
    );
    let candidate = model(dir.path(), &edge_manifest(), "2.0.0", 262_144, &key);
    let total = std::fs::metadata(candidate.with_file_name("digits-edge.onnx"))
        .expect("onnx")
        .len();
    let port = free_port();
    let Some(mut broker) = start_mosquitto(port).await else {
        return;
    };
    let relay = RelayProc::start_with("rb-relay", RelayBroker::External(port), RELAY_TOML).await;
    let state = dir.path().join("rb-a");
    let agent = AgentProc::start(
        AgentOptions::new("rb-a", port)
            .model(&current, vec![public])
            .telemetry_interval_s(0.5)
            .state_dir(&state)
            .extra(SLOW),
    )
    .await;
    rollout_start(&relay, &candidate, "rb-a");
    let t = Instant::now();
    while part_len(&state) < total / 4 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no download progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.proc.kill();
    let had = part_len(&state);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(part_len(&state), had, "nothing arrives without a broker");
    assert_eq!(serving(&agent).await, "1.0.0", "the edge serves meanwhile");
    let _broker = start_mosquitto(port).await.expect("mosquitto again");
    let v = wait_rollout(&relay, "the shadow after the broker came back", |v| {
        v["devices"]["rb-a"]["phase"] == "Shadowing"
    })
    .await;
    assert_eq!(v["devices"]["rb-a"]["serving"], "digits-edge@1.0.0");
    let log = agent.proc.log();
    assert!(
        log.contains("candidate verified"),
        "the download completed and verified:\n{log}"
    );
    assert_eq!(
        log.matches("fetching the candidate").count(),
        1,
        "one download, resumed in place:\n{log}"
    );
}
