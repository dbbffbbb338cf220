//! Model rollout over the air, end to end on the real binaries and the embedded broker: the
//! operator's `cloud-relay rollout start`, the chunked download, verification on the device
//! (size, sha256, model-release signature, golden vectors), the shadow on live traffic, the
//! relay's exact verdict, and the switch, with traffic flowing the whole time.
//!
//! The pair: `digits-edge` 1.0.0 is the tiny model (`digits-edge-tiny.onnx`, 83 % accurate,
//! escalating about half the traffic at 99 % agreement) and `digits-edge` 2.0.0 the shipped one
//! (95 %, about a sixth); rolled out one way it must be promoted, the other way rolled back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tierd_e2e::releases::{output_text, release_key, rollout_cli, sign_manifest};
use tierd_e2e::{edge_manifest, repo_root, AgentOptions, AgentProc, RelayBroker, RelayProc};
use tierd_runtime::stream;

/// The committed manifest `src` renamed `digits-edge@version`, with its ONNX file, in a folder
/// of its own under `dir`, signed with `key`.
fn signed_model(dir: &Path, src: &Path, version: &str, key: &Path) -> PathBuf {
    let out_dir = dir.join(format!("digits-edge-{version}"));
    std::fs::create_dir_all(&out_dir).expect("dir");
    let mut m: toml::Table =
        toml::from_str(&std::fs::read_to_string(src).expect("manifest")).expect("toml");
    m.insert("name".into(), "digits-edge".into());
    m.insert("version".into(), version.into());
    let file = m["file"].as_str().expect("file").to_string();
    std::fs::copy(src.with_file_name(&file), out_dir.join(&file)).expect("onnx");
    let manifest = out_dir.join("digits-edge.toml");
    std::fs::write(&manifest, toml::to_string(&m).expect("toml")).expect("write");
    sign_manifest(&manifest, key);
    manifest
}

fn tiny() -> PathBuf {
    repo_root().join("models/edge/digits-edge-tiny.toml")
}

/// Sends the evaluation stream round and round to `agent` until `stop`, counting answers and
/// failures, and remembering every model version that answered.
fn traffic(
    agent: Arc<AgentProc>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>, Vec<String>)> {
    tokio::spawn(async move {
        let records = stream::read(&repo_root().join("models/eval/stream.bin")).expect("stream");
        let (mut n, mut failures, mut versions) = (0u64, Vec::new(), Vec::<String>::new());
        'outer: loop {
            for r in &records {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                let out = agent.infer(&r.pixels).await;
                n += 1;
                if out.status != 200 {
                    failures.push(format!("{}: {}", out.status, out.body));
                }
                let v = out.body["model_version"].as_str().unwrap_or("").to_string();
                if !versions.contains(&v) {
                    versions.push(v);
                }
            }
        }
        (n, failures, versions)
    })
}

async fn wait_rollout(
    relay: &RelayProc,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (status, v) = relay.get_json(&format!("/api/rollouts/{id}")).await;
        if status == 200 && done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "waited 120 s for {what}; last: {v:#}\nrelay log:\n{}",
            relay.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const RELAY_TOML: &str = "[rollout]\nmin_pairs = 1000\nmax_pairs = 2000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_better_model_is_shadowed_certified_and_promoted_canary_first_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = release_key(dir.path(), "release");
    let current = signed_model(dir.path(), &tiny(), "1.0.0", &key);
    let candidate = signed_model(dir.path(), &edge_manifest(), "2.0.0", &key);
    let relay = RelayProc::start_with("ro-relay", RelayBroker::Embedded, RELAY_TOML).await;
    let start = |id: &str| {
        AgentOptions::new(id, relay.broker_port)
            .model(&current, vec![public.clone()])
            .telemetry_interval_s(0.5)
            .state_dir(&dir.path().join(id))
    };
    let a = Arc::new(AgentProc::start(start("ro-a")).await);
    let b = Arc::new(AgentProc::start(start("ro-b")).await);
    let stop = Arc::new(AtomicBool::new(false));
    let ta = traffic(a.clone(), stop.clone());
    let tb = traffic(b.clone(), stop.clone());

    let out = rollout_cli(
        &relay,
        &[
            "start",
            "--manifest",
            candidate.to_str().expect("utf-8"),
            "--devices",
            "ro-a,ro-b",
            "--canary",
            "ro-a",
            "--shadow-rate",
            "1",
        ],
    );
    assert!(out.status.success(), "rollout start: {}", output_text(&out));
    let started: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(started["spec"]["id"], "digits-edge-2.0.0", "{started:#}");
    assert_eq!(started["waves"], serde_json::json!([["ro-a"], ["ro-b"]]));

    // The canary first: b waits until a is promoted.
    let v = wait_rollout(&relay, "digits-edge-2.0.0", "the canary promoted", |v| {
        v["devices"]["ro-a"]["phase"] == "Promoted"
    })
    .await;
    let a_state = &v["devices"]["ro-a"];
    assert_eq!(a_state["serving"], "digits-edge@2.0.0", "{v:#}");
    let j = &a_state["judgement"];
    eprintln!("canary verdict: {}", j["verdict"]["why"]);
    assert_eq!(j["verdict"]["verdict"], "promote", "{j:#}");
    assert!(j["pairs"].as_u64().expect("pairs") >= 1000, "{j:#}");
    let (cand, cur) = (&j["candidate"], &j["current"]);
    assert!(
        cand["escalation_rate"].as_f64() <= cur["escalation_rate"].as_f64(),
        "{j:#}"
    );
    assert!(
        cand["agreement_lower_bound"].as_f64().expect("lb") >= 0.99,
        "{j:#}"
    );

    let v = wait_rollout(&relay, "digits-edge-2.0.0", "every wave promoted", |v| {
        v["state"]["state"] == "done"
    })
    .await;
    assert_eq!(
        v["devices"]["ro-b"]["serving"], "digits-edge@2.0.0",
        "{v:#}"
    );
    stop.store(true, Ordering::Relaxed);
    for (name, t) in [("ro-a", ta), ("ro-b", tb)] {
        let (n, failures, versions) = t.await.expect("traffic");
        assert!(
            failures.is_empty(),
            "{name}: {} of {n} requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
        assert_eq!(versions, ["1.0.0", "2.0.0"], "{name}: {n} requests");
    }
    for agent in [&a, &b] {
        let (status, meta) = agent.get("/v2/models/digits-edge").await;
        assert_eq!(
            (status, &meta["versions"]),
            (200, &serde_json::json!(["2.0.0"]))
        );
    }
    // The status announced the new version; the relay's evidence of it starts over.
    let d = relay
        .wait_device("ro-a", "telemetry of the new version", |d| {
            d["latest"]["model"] == "digits-edge@2.0.0"
                && d["calibration"]["model"] == "digits-edge@2.0.0"
        })
        .await;
    assert_eq!(d["status"]["model"]["model"], "digits-edge@2.0.0", "{d:#}");

    // A restart comes back on the promoted model, verified again.
    let mut a = Arc::try_unwrap(a).unwrap_or_else(|_| panic!("agent a still shared"));
    a.proc.terminate(Duration::from_secs(15));
    let again = AgentProc::start(start("ro-a")).await;
    let (_, meta) = again.get("/v2/models/digits-edge").await;
    assert_eq!(meta["versions"], serde_json::json!(["2.0.0"]));
    assert!(again
        .proc
        .log()
        .contains("serving the model a rollout promoted"));

    // The operator's view.
    let out = rollout_cli(&relay, &["status"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list["rollouts"][0]["state"]["state"], "done", "{list:#}");
    assert_eq!(list["rollouts"][0]["stages"]["promote"], 2, "{list:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worse_model_is_rolled_back_and_never_answers_outside_the_shadow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = release_key(dir.path(), "release");
    let current = signed_model(dir.path(), &edge_manifest(), "2.0.0", &key);
    let candidate = signed_model(dir.path(), &tiny(), "2.0.1", &key);
    let relay = RelayProc::start_with("ro-worse", RelayBroker::Embedded, RELAY_TOML).await;
    let start = |id: &str| {
        AgentOptions::new(id, relay.broker_port)
            .model(&current, vec![public.clone()])
            .telemetry_interval_s(0.5)
            .state_dir(&dir.path().join(id))
    };
    let a = Arc::new(AgentProc::start(start("rw-a")).await);
    let b = Arc::new(AgentProc::start(start("rw-b")).await);
    let stop = Arc::new(AtomicBool::new(false));
    let ta = traffic(a.clone(), stop.clone());
    let out = rollout_cli(
        &relay,
        &[
            "start",
            "--manifest",
            candidate.to_str().expect("utf-8"),
            "--id",
            "tiny",
            "--devices",
            "rw-a,rw-b",
            "--canary",
            "rw-a",
            "--shadow-rate",
            "1",
        ],
    );
    assert!(out.status.success(), "rollout start: {}", output_text(&out));
    let v = wait_rollout(&relay, "tiny", "the rollout halted", |v| {
        v["state"]["state"] == "halted" && v["devices"]["rw-a"]["phase"] == "RolledBack"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let why = v["state"]["why"].as_str().expect("why");
    eprintln!("halted: {why}");
    assert!(why.contains("certified worse"), "{v:#}");
    assert_eq!(v["devices"]["rw-a"]["serving"], "digits-edge@2.0.0");
    // The second wave never started.
    assert_eq!(v["devices"]["rw-b"]["stage"], "waiting", "{v:#}");
    assert_eq!(v["devices"]["rw-b"]["doc_version"], 0);
    let (n, failures, versions) = ta.await.expect("traffic");
    assert!(failures.is_empty(), "{} of {n} failed", failures.len());
    assert_eq!(
        versions,
        ["2.0.0"],
        "only the current model answered ({n} requests)"
    );
    assert!(a
        .proc
        .log()
        .contains("rolled back: the candidate is dropped"));
    let (_, meta) = b.get("/v2/models/digits-edge").await;
    assert_eq!(meta["versions"], serde_json::json!(["2.0.0"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_foreign_signed_candidates_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = release_key(dir.path(), "release");
    let (foreign_key, _) = release_key(dir.path(), "foreign");
    let current = signed_model(dir.path(), &tiny(), "1.0.0", &key);
    let relay = RelayProc::start_with("ro-bad", RelayBroker::Embedded, RELAY_TOML).await;
    let agent = AgentProc::start(
        AgentOptions::new("rb-a", relay.broker_port)
            .model(&current, vec![public.clone()])
            .telemetry_interval_s(0.5)
            .state_dir(&dir.path().join("rb-a")),
    )
    .await;
    let start = |manifest: &Path, id: &str| {
        rollout_cli(
            &relay,
            &[
                "start",
                "--manifest",
                manifest.to_str().expect("utf-8"),
                "--id",
                id,
                "--devices",
                "rb-a",
            ],
        )
    };
    // A model file that does not match its manifest: the relay refuses to ship it.
    let tampered = signed_model(dir.path(), &edge_manifest(), "2.0.0", &key);
    let onnx = tampered.with_file_name("digits-edge.onnx");
    let mut bytes = std::fs::read(&onnx).expect("onnx");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&onnx, bytes).expect("write");
    let out = start(&tampered, "tampered");
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("sha256"),
        "{}",
        output_text(&out)
    );
    // A manifest whose golden vectors the model does not reproduce: refused before shipping.
    let wrong = signed_model(&dir.path().join("g"), &edge_manifest(), "2.0.0", &key);
    let mut m: toml::Table =
        toml::from_str(&std::fs::read_to_string(&wrong).expect("read")).expect("toml");
    let golden = m["golden"].as_array_mut().expect("golden");
    let outputs = golden[0]
        .as_table_mut()
        .and_then(|g| g.get_mut("outputs"))
        .and_then(|o| o.as_array_mut())
        .expect("outputs");
    outputs[0] = toml::Value::Float(0.5);
    outputs[1] = toml::Value::Float(0.5);
    std::fs::write(&wrong, toml::to_string(&m).expect("toml")).expect("write");
    let out = start(&wrong, "golden");
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("golden vector"),
        "{}",
        output_text(&out)
    );
    // Signed by a key the device does not trust: fetched, then refused on the device, and the
    // rollout halts with the device's reason; the current model keeps serving.
    let foreign = signed_model(
        &dir.path().join("f"),
        &edge_manifest(),
        "2.0.0",
        &foreign_key,
    );
    let out = start(&foreign, "foreign");
    assert!(out.status.success(), "{}", output_text(&out));
    let v = wait_rollout(&relay, "foreign", "the device's refusal", |v| {
        v["state"]["state"] == "halted"
    })
    .await;
    let why = v["state"]["why"].as_str().expect("why");
    assert!(
        why.contains("unknown key") || why.contains("signed by"),
        "{v:#}"
    );
    assert_eq!(v["devices"]["rb-a"]["phase"], "Failed", "{v:#}");
    assert_eq!(v["devices"]["rb-a"]["serving"], "digits-edge@1.0.0");
    let r = agent.infer(&[0u8; 64]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["model_version"], "1.0.0");
    // Unknown rollouts and actions are named.
    let out = rollout_cli(&relay, &["pause", "nope"]);
    assert!(
        !out.status.success() && output_text(&out).contains("no rollout named"),
        "{}",
        output_text(&out)
    );
}
