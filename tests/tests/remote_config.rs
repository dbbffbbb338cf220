//! Remote config end to end, over the embedded broker and the real binaries: the relay tunes a
//! threshold from the agent's real telemetry and pushes it, the agent applies it live, acks it,
//! decides the next requests with it and keeps it across a restart; invalid or stale documents
//! are rejected with the reason acked and change nothing.

use std::time::Duration;

use serde_json::Value;
use tierd_e2e::{
    bin_path, confident_examples, free_port, signing, unsure_examples, AgentOptions, AgentProc,
    RelayBroker, RelayProc, TestClient,
};

fn edge_confidence(p: &[f32]) -> f32 {
    p.iter().copied().fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_tunes_pushes_and_the_agent_applies_acks_and_keeps_it() {
    let relay = RelayProc::start_with(
        "rc-tune",
        RelayBroker::Embedded,
        "[tuning]\npolicy = \"target_agreement\"\ntarget = 0.9\ndelta = 0.05\n\
         min_requests = 200\nhysteresis = 0.0\nmin_interval_s = 0.0\n",
    )
    .await;
    let state = tempfile::tempdir().expect("tempdir");
    let mut options = AgentOptions::new("rc-tune-1", relay.broker_port)
        .telemetry_interval_s(0.5)
        .audit_rate(1.0)
        .state_dir(state.path());
    // Start by escalating everything: the tuner must find the threshold from the evidence.
    options.threshold = Some(1.01);
    let mut agent = AgentProc::start(options.clone()).await;
    let confident = confident_examples();
    let unsure = unsure_examples();
    for ex in &confident {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("cloud", &ex.name);
    }
    for _ in 0..50 {
        for ex in confident.iter().chain(&unsure) {
            let r = agent.infer(&ex.pixels).await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }

    let view = relay
        .wait_device_config("rc-tune-1", "a tuned threshold applied by the agent", |v| {
            v["published"]["source"] == "tuner"
                && v["last_ack"]["applied"] == true
                && v["last_ack"]["version"] == v["published"]["version"]
        })
        .await;
    let version = view["published"]["version"].as_u64().expect("version");
    let threshold = view["published"]["settings"]["threshold"]
        .as_f64()
        .expect("threshold") as f32;
    let cert = &view["published"]["certificate"];
    assert!(
        cert["agreement_lower_bound"].as_f64().expect("bound") >= 0.9,
        "{cert:#}"
    );
    // The unsure examples always disagree with the cloud: certifying them locally at 90 % is
    // impossible, while the confident ones always agree.
    let lowest_confident = confident
        .iter()
        .map(|e| edge_confidence(&e.edge_probabilities))
        .fold(1.0, f32::min);
    let highest_unsure = unsure
        .iter()
        .map(|e| edge_confidence(&e.edge_probabilities))
        .fold(0.0, f32::max);
    assert!(
        threshold <= lowest_confident && threshold > highest_unsure,
        "tuned threshold {threshold} should separate {highest_unsure} from {lowest_confident}: {view:#}"
    );
    agent
        .proc
        .wait_for_log("remote config applied", Duration::from_secs(30))
        .await;

    // The next requests are decided with it.
    for ex in &confident {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("edge", &ex.name);
    }
    for ex in &unsure {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("cloud", &ex.name);
    }
    assert_eq!(
        agent.metric("tierd_config_version", "").await as u64,
        version
    );
    assert!((agent.metric("tierd_threshold", "").await as f32 - threshold).abs() < 1e-6);

    // It survives a restart, even with no broker to hand the retained copy back.
    let status = agent.proc.terminate(Duration::from_secs(15));
    assert!(status.success(), "agent exit: {status:?}");
    let offline = AgentOptions {
        mqtt_port: free_port(),
        ..options
    }
    .without_broker();
    let again = AgentProc::start(offline).await;
    assert_eq!(
        again.metric("tierd_config_version", "").await as u64,
        version
    );
    for ex in &confident {
        again
            .infer(&ex.pixels)
            .await
            .assert_ok_from("edge", &ex.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_rejected_with_the_reason_and_change_nothing() {
    let relay = RelayProc::start("rc-bad", RelayBroker::Embedded).await;
    let device = "rc-bad-1";
    let agent =
        AgentProc::start(AgentOptions::new(device, relay.broker_port).telemetry_interval_s(0.5))
            .await;

    // An operator pins a threshold with the CLI; it is applied and acked.
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args(["config", "set", "--device", device, "threshold=0.95"])
        .args(["--api", &relay.url("")])
        .arg("--token-file")
        .arg(&relay.token_file)
        .output()
        .expect("cloud-relay config set");
    assert!(
        out.status.success(),
        "config set failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = relay
        .wait_device_config(device, "the operator's document applied", |v| {
            v["last_ack"]["applied"] == true
                && v["last_ack"]["version"] == v["published"]["version"]
        })
        .await;
    let version = view["published"]["version"].as_u64().expect("version");
    assert_eq!(view["pinned"], true);
    assert!((agent.metric("tierd_threshold", "").await - 0.95).abs() < 1e-6);

    let client = TestClient::connect(relay.broker_port, "rc-bad-intruder").await;
    let topic = format!("tierd/v1/{device}/config");
    // Signed with the relays' key, so each is refused for its content, not its signature.
    let doc = |v: u64, settings: &str| {
        signing::sign_json(&format!(
            r#"{{"version":{v},"device_id":"{device}","settings":{settings}}}"#
        ))
    };
    for (payload, reason) in [
        (doc(version + 1, r#"{"threshold":7}"#), "threshold = 7"),
        (
            doc(version + 2, r#"{"threshhold":0.5}"#),
            "unknown field `threshhold`",
        ),
        (doc(version + 3, r#"{"threshold":"high"}"#), "invalid type"),
        (doc(version - 1, r#"{"threshold":0.5}"#), "not newer"),
        (
            signing::sign_json(&format!(
                r#"{{"version":{},"device_id":"someone-else","settings":{{}}}}"#,
                version + 4
            )),
            "for device \"someone-else\"",
        ),
    ] {
        client.publish(&topic, payload, true).await;
        relay.wait_config_rejected(device, reason, version).await;
        assert!((agent.metric("tierd_threshold", "").await - 0.95).abs() < 1e-6);
        assert_eq!(
            agent.metric("tierd_config_version", "").await as u64,
            version
        );
    }

    // `config show` prints the same view.
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args([
            "config",
            "show",
            "--device",
            device,
            "--api",
            &relay.url(""),
        ])
        .env("TIERD_RELAY_TOKEN", &relay.token)
        .output()
        .expect("cloud-relay config show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"last_ack\""),
        "{text}"
    );
    // A bad value on the command line is refused before anything is published.
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args([
            "config",
            "set",
            "--device",
            device,
            "audit_rate=3",
            "--api",
            &relay.url(""),
        ])
        .env("TIERD_RELAY_TOKEN", &relay.token)
        .output()
        .expect("cloud-relay config set");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("audit_rate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_was_offline_gets_the_config_set_meanwhile() {
    let relay = RelayProc::start("rc-offline", RelayBroker::Embedded).await;
    let device = "rc-offline-1";
    let state = tempfile::tempdir().expect("tempdir");
    let options = AgentOptions::new(device, relay.broker_port)
        .telemetry_interval_s(0.5)
        .state_dir(state.path());
    let mut agent = AgentProc::start(options.clone()).await;
    let status = agent.proc.terminate(Duration::from_secs(15));
    assert!(status.success(), "agent exit {status:?}");

    // While the device is away, an operator changes its config over the HTTP API.
    let resp = relay
        .put_config(device, r#"{"threshold": 0.42, "audit_rate": 0.1}"#)
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let published: Value = resp.json().await.expect("json");
    let version = published["published"]["version"].as_u64().expect("version");

    // It comes back, receives the retained document, applies and acknowledges it.
    let again = AgentProc::start(options).await;
    let view = relay
        .wait_device_config(device, "the document applied after reconnecting", |v| {
            v["last_ack"]["applied"] == true && v["last_ack"]["version"].as_u64() == Some(version)
        })
        .await;
    let published = view["published"]["settings"]["threshold"]
        .as_f64()
        .unwrap_or(0.0);
    assert!((published - 0.42).abs() < 1e-6, "{view:#}");
    // The next telemetry report says the device runs it.
    relay
        .wait_device_config(device, "telemetry reporting the new version", |v| {
            v["running"]["config_version"].as_u64() == Some(version)
        })
        .await;
    assert!((again.metric("tierd_threshold", "").await - 0.42).abs() < 1e-6);
    assert_eq!(
        again.metric("tierd_config_version", "").await as u64,
        version
    );
    // A bad request body is refused with a message, and nothing is published.
    let resp = relay
        .put_config(device, r#"{"threshold": "very high"}"#)
        .await;
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("threshold")),
        "{body}"
    );
}
