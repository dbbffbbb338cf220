//! The economics end to end, over the embedded broker and the real binaries with the relay's
//! default tuning: a device is steered to a certified threshold below 1 that it applies and
//! acknowledges (from online evidence, or from its model's offline certificate), and injected
//! drift makes the relay push the conservative threshold at once.

use std::time::Duration;

use serde_json::Value;
use tierd_e2e::{
    edge_manifest, repo_root, uncalibrated_manifest, AgentOptions, AgentProc, RelayBroker,
    RelayProc,
};
use tierd_runtime::stream;

/// `n` records of an evaluation stream, in file order.
fn records(file: &str, n: usize) -> Vec<stream::Record> {
    let mut r = stream::read(&repo_root().join("models/eval").join(file)).expect("stream");
    r.truncate(n);
    r
}

async fn send(agent: &AgentProc, records: &[stream::Record]) {
    for r in records {
        let out = agent.infer(&r.pixels).await;
        assert_eq!(out.status, 200, "{}", out.body);
    }
}

fn threshold(view: &Value) -> f64 {
    view["published"]["settings"]["threshold"]
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn applied(view: &Value) -> bool {
    view["published"]["source"] == "tuner"
        && view["last_ack"]["applied"] == true
        && view["last_ack"]["version"] == view["published"]["version"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_tuning_pushes_certified_thresholds_below_one_that_agents_apply() {
    let relay = RelayProc::start("econ-push", RelayBroker::Embedded).await;
    let dir = tempfile::tempdir().expect("tempdir");

    // 1. A model with no offline certificate, started escalating everything: every request
    //    is labelled, and the online bound certifies a threshold below 1 from that evidence.
    let mut online = AgentProc::start(
        AgentOptions::new("econ-online", relay.broker_port)
            .model(&uncalibrated_manifest(dir.path()), Vec::new())
            .threshold(Some(1.01))
            .telemetry_interval_s(0.5)
            .state_dir(&dir.path().join("online")),
    )
    .await;
    send(&online, &records("stream.bin", 1_500)).await;
    let view = relay
        .wait_device_config(
            "econ-online",
            "an online-certified threshold applied",
            |v| applied(v) && threshold(v) < 1.0,
        )
        .await;
    let cert = &view["published"]["certificate"];
    assert_eq!(cert["basis"], "online", "{cert:#}");
    assert!(
        cert["agreement_lower_bound"].as_f64().expect("bound") >= 0.99,
        "{cert:#}"
    );
    assert!(
        cert["requests"].as_u64().expect("requests") >= 1_000,
        "{cert:#}"
    );
    let t = threshold(&view) as f32;
    online
        .proc
        .wait_for_log("remote config applied", Duration::from_secs(30))
        .await;
    assert!((online.metric("tierd_threshold", "").await as f32 - t).abs() < 1e-6);
    let (_, device) = relay.get_json("/api/devices/econ-online").await;
    assert_eq!(
        device["calibration"]["in_force"]["basis"], "online",
        "{device:#}"
    );
    assert!(device["calibration"]["offline"].is_null(), "{device:#}");

    // 2. The default model, with an operator's escalate-everything left in agent.toml: the
    //    relay steers it to the threshold its manifest certifies offline, without waiting
    //    for online evidence, and says which certificate is in force.
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(edge_manifest()).expect("read")).expect("toml");
    let offline_t = manifest["calibration"]["threshold"]
        .as_float()
        .expect("calibration.threshold");
    let offline = AgentProc::start(
        AgentOptions::new("econ-offline", relay.broker_port)
            .threshold(Some(1.01))
            .telemetry_interval_s(0.5)
            .state_dir(&dir.path().join("offline")),
    )
    .await;
    send(&offline, &records("stream.bin", 50)).await;
    let view = relay
        .wait_device_config(
            "econ-offline",
            "the offline-certified threshold applied",
            applied,
        )
        .await;
    assert!((threshold(&view) - offline_t).abs() < 1e-6, "{view:#}");
    let cert = &view["published"]["certificate"];
    assert_eq!(cert["basis"], "offline", "{cert:#}");
    assert_eq!(cert["model"], "digits-edge@2.0.0", "{cert:#}");
    let (_, device) = relay.get_json("/api/devices/econ-offline").await;
    let cal = &device["calibration"];
    assert_eq!(cal["in_force"]["basis"], "offline", "{device:#}");
    assert!(
        cal["offline"]["agreement_lower_bound"]
            .as_f64()
            .expect("bound")
            >= 0.99,
        "{device:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_drift_makes_the_relay_push_the_conservative_threshold() {
    let relay = RelayProc::start("econ-drift", RelayBroker::Embedded).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Every setting the defaults' but the reporting interval: the model's certified
    // threshold, the default audit rate, the relay's default tuning.
    let mut agent = AgentProc::start(
        AgentOptions::new("econ-drift-1", relay.broker_port)
            .threshold(None)
            .telemetry_interval_s(0.5)
            .state_dir(dir.path()),
    )
    .await;
    send(&agent, &records("stream.bin", 2_500)).await;
    // Clean traffic at the offline-certified threshold: nothing to push, and above all no
    // flip to escalating everything on thin online evidence.
    let (_, device) = relay.get_json("/api/devices/econ-drift-1").await;
    assert_eq!(
        device["calibration"]["in_force"]["basis"], "offline",
        "{device:#}"
    );
    assert_eq!(device["calibration"]["drift_alarms"], 0, "{device:#}");
    let (_, config) = relay.get_json("/api/devices/econ-drift-1/config").await;
    assert!(
        config["published"].is_null(),
        "pushed on clean traffic: {config:#}"
    );

    // Heavily degraded inputs: the relay detects it and pushes escalate-everything.
    let drift = records("drift.bin", 3_000);
    let mut sent = 0;
    for chunk in drift.chunks(250) {
        send(&agent, chunk).await;
        sent += chunk.len();
        let (_, c) = relay.get_json("/api/devices/econ-drift-1/config").await;
        if applied(&c) && threshold(&c) > 1.0 {
            break;
        }
    }
    let view = relay
        .wait_device_config("econ-drift-1", "the conservative threshold applied", |v| {
            applied(v) && threshold(v) > 1.0
        })
        .await;
    assert_eq!(
        view["published"]["certificate"]["basis"], "drift",
        "{view:#}"
    );
    assert!(sent <= 2_000, "drift took {sent} requests to be acted on");
    let (_, device) = relay.get_json("/api/devices/econ-drift-1").await;
    let cal = &device["calibration"];
    assert!(
        cal["drift_alarms"].as_u64().expect("alarms") >= 1,
        "{device:#}"
    );
    assert!(
        cal["last_drift"]
            .as_str()
            .expect("why")
            .contains("requests"),
        "{device:#}"
    );
    agent
        .proc
        .wait_for_log("remote config applied", Duration::from_secs(30))
        .await;
    // Applied: the next degraded requests go to the cloud.
    for r in &drift[sent..sent + 20] {
        agent
            .infer(&r.pixels)
            .await
            .assert_ok_from("cloud", "drifted input");
    }
}
