//! Attacks on the remote config, over the embedded broker (no authentication: anyone may
//! publish anything, retained, on any device's config topic) and the real binaries.
//!
//! The agent applies only documents signed by a relay key it pins; the relay learns versions
//! only from documents its own key signed. Every attack below must leave the device on its
//! last good config, with the reason acknowledged, and leave the relay able to push.

use std::time::Duration;

use serde_json::{json, Value};
use tierd_e2e::{
    bin_path, signing, unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc, TestClient,
};

/// A relay, an agent with its state in `state`, and the operator's pinned threshold 0.95
/// applied (signed by the relay, acked): returns its version.
async fn setup(name: &str, state: &std::path::Path) -> (RelayProc, AgentOptions, AgentProc, u64) {
    let relay = RelayProc::start(name, RelayBroker::Embedded).await;
    let options = AgentOptions::new(&format!("{name}-1"), relay.broker_port)
        .telemetry_interval_s(0.5)
        .state_dir(state);
    let agent = AgentProc::start(options.clone()).await;
    let version = operator_set(&relay, &options.device_id, json!({"threshold": 0.95})).await;
    assert!((agent.metric("tierd_threshold", "").await - 0.95).abs() < 1e-6);
    (relay, options, agent, version)
}

/// `PUT /api/devices/{device}/config`, then waits for the agent's ack that applied it.
async fn operator_set(relay: &RelayProc, device: &str, body: Value) -> u64 {
    let resp = relay.put_config(device, &body.to_string()).await;
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let view = relay
        .wait_device_config(device, "the operator's signed document applied", |v| {
            v["last_ack"]["applied"] == true
                && v["last_ack"]["version"] == v["published"]["version"]
                && v["last_ack"]["in_force"] == v["published"]["version"]
        })
        .await;
    view["published"]["version"].as_u64().expect("version")
}

/// The settings in force are still the operator's: threshold 0.95, `version`, and an unsure
/// input is still escalated and answered by the cloud.
async fn unchanged(agent: &AgentProc, version: u64) {
    assert!((agent.metric("tierd_threshold", "").await - 0.95).abs() < 1e-6);
    assert_eq!(
        agent.metric("tierd_config_version", "").await as u64,
        version
    );
    let ex = &unsure_examples()[0];
    agent
        .infer(&ex.pixels)
        .await
        .assert_ok_from("cloud", &ex.name);
}

fn forged(version: u64, device: &str) -> String {
    format!(
        r#"{{"version":{version},"device_id":"{device}","source":"operator","settings":{{"threshold":0,"audit_rate":0,"telemetry_interval_s":86400}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_foreign_and_tampered_documents_are_refused_and_a_restart_keeps_the_last_good_one()
{
    let state = tempfile::tempdir().expect("tempdir");
    let (relay, options, mut agent, version) = setup("atk-unsigned", state.path()).await;
    let device = options.device_id.clone();
    let topic = format!("tierd/v1/{device}/config");
    let intruder = TestClient::connect(relay.broker_port, "atk-intruder").await;

    // 1. The forged document of the incident, bare, from an anonymous client.
    intruder
        .publish(&topic, forged(version + 1, &device).into_bytes(), true)
        .await;
    relay
        .wait_config_rejected(&device, "unsigned config document refused", version)
        .await;
    unchanged(&agent, version).await;

    // 2. Signed, but with a key the agent does not pin.
    let stranger = signing::stranger_signer();
    intruder
        .publish(
            &topic,
            stranger.sign_bytes(&forged(version + 2, &device)),
            true,
        )
        .await;
    relay
        .wait_config_rejected(&device, "signed by unknown key", version)
        .await;
    unchanged(&agent, version).await;

    // 3. A relay-signed envelope with its document swapped: the signature no longer covers it.
    let genuine: Value = serde_json::from_slice(&signing::sign_json(&format!(
        r#"{{"version":{},"device_id":"{device}","settings":{{"threshold":0.95}}}}"#,
        version + 3
    )))
    .expect("envelope");
    let mut tampered = genuine.clone();
    tampered["doc"] = Value::String(forged(version + 3, &device));
    intruder
        .publish(&topic, tampered.to_string().into_bytes(), true)
        .await;
    relay
        .wait_config_rejected(&device, "bad signature", version)
        .await;
    unchanged(&agent, version).await;

    // The relay learned none of them: its version line is its own.
    let (_, metrics) = relay.get_text("/metrics").await;
    let ignored = metrics
        .lines()
        .find(|l| l.starts_with("tierd_relay_config_documents_ignored_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(ignored >= 3.0, "{metrics}");

    // 4. After a restart (the broker hands the tampered document back) the last good config is
    //    still in force: applied-config.json holds the relay's signed payload, verified again.
    let status = agent.proc.terminate(Duration::from_secs(15));
    assert!(status.success(), "agent exit: {status:?}");
    let applied = std::fs::read(state.path().join("applied-config.json")).expect("applied");
    assert_eq!(signing::inner_document(&applied)["version"], version);
    agent = AgentProc::start(options.clone()).await;
    // The signed document on disk passed verification again at start (the broker may or may
    // not hand the tampered retained document back: a resumed session is not sent it again;
    // if it is, it is refused as above).
    agent
        .proc
        .wait_for_log(
            &format!("remote config restored version={version}"),
            Duration::from_secs(20),
        )
        .await;
    unchanged(&agent, version).await;

    // The relay's own pushes still apply.
    let next = operator_set(&relay, &device, json!({"audit_rate": 0.05})).await;
    assert!(next > version);
    println!("ATTACK config: unsigned, foreign-key and tampered documents refused; {ignored} ignored by the relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_last_version_does_not_lock_the_device_out() {
    let state = tempfile::tempdir().expect("tempdir");
    let (relay, options, agent, version) = setup("atk-max", state.path()).await;
    let device = options.device_id.clone();
    let topic = format!("tierd/v1/{device}/config");
    let intruder = TestClient::connect(relay.broker_port, "atk-max-intruder").await;

    intruder
        .publish(&topic, forged(u64::MAX, &device).into_bytes(), true)
        .await;
    relay
        .wait_config_rejected(&device, "unsigned", version)
        .await;
    let stranger = signing::stranger_signer();
    intruder
        .publish(
            &topic,
            stranger.sign_bytes(&forged(u64::MAX, &device)),
            true,
        )
        .await;
    relay
        .wait_config_rejected(&device, "unknown key", version)
        .await;
    unchanged(&agent, version).await;

    // The relay did not adopt u64::MAX: its next push is an ordinary version, and applied.
    let (_, view) = relay
        .get_json(&format!("/api/devices/{device}/config"))
        .await;
    assert_eq!(
        view["published"]["version"].as_u64(),
        Some(version),
        "{view:#}"
    );
    let next = operator_set(&relay, &device, json!({"threshold": 0.9})).await;
    assert!(next > version && next < u64::MAX / 2, "{next}");
    assert!((agent.metric("tierd_threshold", "").await - 0.9).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_signed_document_replayed_is_refused_as_stale() {
    let state = tempfile::tempdir().expect("tempdir");
    let (relay, options, agent, first) = setup("atk-replay", state.path()).await;
    let device = options.device_id.clone();
    // The payload the agent applied first: genuinely signed by the relay.
    let old = std::fs::read(state.path().join("applied-config.json")).expect("applied");
    assert_eq!(signing::inner_document(&old)["version"], first);
    let second = operator_set(&relay, &device, json!({"threshold": 0.8})).await;

    let intruder = TestClient::connect(relay.broker_port, "atk-replayer").await;
    intruder
        .publish(&format!("tierd/v1/{device}/config"), old, true)
        .await;
    let view = relay
        .wait_config_rejected(&device, "is not newer than the version in force", second)
        .await;
    assert_eq!(view["last_ack"]["version"].as_u64(), Some(first));
    assert!((agent.metric("tierd_threshold", "").await - 0.8).abs() < 1e-6);
    assert_eq!(
        agent.metric("tierd_config_version", "").await as u64,
        second
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_reset_recovers_a_device_whose_version_line_ended() {
    let state = tempfile::tempdir().expect("tempdir");
    let (relay, options, agent, _) = setup("atk-reset", state.path()).await;
    let device = options.device_id.clone();
    // A document at u64::MAX that the relay's own key signed (say, from a relay with a bug):
    // the agent applies it and the relay learns it; no later version exists.
    let end = signing::sign_json(&format!(
        r#"{{"version":{},"device_id":"{device}","source":"operator","settings":{{"threshold":0.5}}}}"#,
        u64::MAX
    ));
    let client = TestClient::connect(relay.broker_port, "atk-reset-key-holder").await;
    client
        .publish(&format!("tierd/v1/{device}/config"), end, true)
        .await;
    relay
        .wait_device_config(&device, "the last version applied", |v| {
            v["last_ack"]["applied"] == true && v["last_ack"]["version"].as_u64() == Some(u64::MAX)
        })
        .await;
    relay
        .wait_device_config(&device, "the relay learning it", |v| {
            v["published"]["version"].as_u64() == Some(u64::MAX)
        })
        .await;

    // The next version would wrap: the relay refuses and says what to do.
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args(["config", "set", "--device", &device, "threshold=0.9"])
        .args(["--api", &relay.url("")])
        .arg("--token-file")
        .arg(&relay.token_file)
        .output()
        .expect("cloud-relay config set");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "config set past u64::MAX succeeded");
    assert!(
        stderr.contains(&format!("cloud-relay config reset --device {device}")),
        "{stderr}"
    );

    // The reset: a new epoch, versions from the clock again, applied by the agent.
    let out = std::process::Command::new(bin_path("cloud-relay"))
        .args(["config", "reset", "--device", &device])
        .args(["--api", &relay.url("")])
        .arg("--token-file")
        .arg(&relay.token_file)
        .output()
        .expect("cloud-relay config reset");
    assert!(
        out.status.success(),
        "config reset failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = relay
        .wait_device_config(&device, "the reset document applied", |v| {
            v["published"]["epoch"] == 1
                && v["last_ack"]["applied"] == true
                && v["last_ack"]["version"] == v["published"]["version"]
        })
        .await;
    let version = view["published"]["version"].as_u64().expect("version");
    assert!(version < u64::MAX / 2, "{view:#}");
    unchanged(&agent, version).await;
    // And ordinary pushes continue in the new epoch.
    let next = operator_set(&relay, &device, json!({"threshold": 0.9})).await;
    assert!(next > version);
    assert!((agent.metric("tierd_threshold", "").await - 0.9).abs() < 1e-6);
}
