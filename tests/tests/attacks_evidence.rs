//! Attacks on the tuner's evidence and the fleet view, over the embedded broker (no
//! authentication: anyone local may publish on any device's topics) and the real binaries.
//!
//! The relay believes a boot only when the device announced it with its status, refuses boots
//! from the future, refuses calibration windows that cannot be true of the device's own
//! telemetry, and acknowledges only records it filed. Each attack below must be refused with
//! a log line naming the reason and leave the device's telemetry, evidence, status and
//! answers unchanged. (On Mosquitto with the shipped ACL none of these can even be published
//! by another client: `mtls.rs`.)

use std::time::{Duration, Instant};

use serde_json::Value;
use tierd_e2e::{unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc, TestClient};
use tierd_protocol::{
    encode, BinCounts, CalibrationReport, DeviceStatus, RecordKind, Spooled, TelemetryReport,
};

fn spooled(stream_id: u64, seq: u64, kind: RecordKind, body: Vec<u8>) -> Vec<u8> {
    encode(&Spooled {
        stream_id,
        seq,
        floor: seq,
        kind,
        body,
    })
    .expect("encode")
}

fn audited_sum(device: &Value) -> u64 {
    device["calibration"]["bins"]
        .as_array()
        .map(|b| b.iter().map(|x| x["audited"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

/// Waits for `needle` in the relay's log.
async fn relay_logs(relay: &RelayProc, needle: &str) {
    let start = Instant::now();
    while !relay.proc.log().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay did not log {needle:?}:\n{}",
            relay.proc.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_evidence_boots_ghosts_and_statuses_are_refused_and_nothing_is_lost() {
    let relay = RelayProc::start("atk-evidence", RelayBroker::Embedded).await;
    let device = "atk-ev-1";
    let agent = AgentProc::start(
        AgentOptions::new(device, relay.broker_port)
            .telemetry_interval_s(0.3)
            .audit_rate(1.0),
    )
    .await;
    agent.mixed_traffic(30).await;
    let before = relay
        .wait_device(device, "telemetry with calibration evidence", |d| {
            d["calibration"]["bins"].is_array() && d["latest"]["totals"]["edge"].as_u64() > Some(0)
        })
        .await;
    let boot = before["boot_id"].as_u64().expect("boot_id");
    let stream = before["stream"]["stream_id"].as_u64().expect("stream_id");
    let threshold_before = before["calibration"]["certificate"]["threshold"].clone();
    let intruder = TestClient::connect(relay.broker_port, "atk-ev-intruder").await;
    let telemetry_topic = format!("tierd/v1/{device}/telemetry");

    // 1. The incident's calibration report: a new stream id, 100,000 fake audited agreements
    //    per bin, for the device's current boot and latest report.
    let edges: Vec<f32> =
        serde_json::from_value(before["calibration"]["edges"].clone()).expect("edges");
    let forged = CalibrationReport {
        device_id: device.into(),
        boot_id: boot,
        seq: before["last_seq"].as_u64().expect("last_seq"),
        signal: tierd_protocol::Signal::MaxProb,
        bins: vec![
            BinCounts {
                local: 100_000,
                audited: 100_000,
                audited_agree: 100_000,
                ..Default::default()
            };
            edges.len()
        ],
        edges,
        audit_rate: 1.0,
        thresholds: vec![0.9],
        model: before["latest"]["model"]
            .as_str()
            .expect("model")
            .to_string(),
        threshold: 0.9,
    };
    intruder
        .publish(
            &telemetry_topic,
            spooled(
                0xBAD,
                1,
                RecordKind::Calibration,
                encode(&forged).expect("encode"),
            ),
            false,
        )
        .await;
    relay_logs(&relay, "is implausible").await;

    // 1b. Plausible-looking evidence for a model the device does not serve: it would open a
    //     second evidence slot (and certificate) the device never asked for.
    let mut ghost_model = forged.clone();
    ghost_model.model = "ghost-edge@1.0.0".into();
    ghost_model.bins = vec![BinCounts::default(); ghost_model.edges.len()];
    intruder
        .publish(
            &telemetry_topic,
            spooled(
                0xBAD3,
                1,
                RecordKind::Calibration,
                encode(&ghost_model).expect("encode"),
            ),
            false,
        )
        .await;
    relay_logs(&relay, "which the device did not").await;

    // 2. A sniffed telemetry report re-sent with boot_id 2^63, on the device's own stream at
    //    the next seq (the real record of that seq may win the race) and on a new stream:
    //    refused and not acknowledged, so the real report of that seq still counts (before,
    //    it froze the record and the real reports were acked and lost).
    let (_, now) = relay.get_json(&format!("/api/devices/{device}")).await;
    let mut sniffed: TelemetryReport =
        serde_json::from_value(now["latest"].clone()).expect("latest report");
    sniffed.boot_id = 1 << 63;
    let next = now["stream"]["next"].as_u64().expect("next");
    for (stream, seq) in [(stream, next), (0xBAD2, 1)] {
        intruder
            .publish(
                &telemetry_topic,
                spooled(
                    stream,
                    seq,
                    RecordKind::Telemetry,
                    encode(&sniffed).expect("encode"),
                ),
                false,
            )
            .await;
    }
    relay_logs(&relay, "ahead of the relay's clock").await;

    // 3. A fabricated report for a device that never connected.
    let mut ghost = sniffed.clone();
    ghost.device_id = "ghost-99".into();
    ghost.boot_id = tierd_runtime::unix_ms();
    intruder
        .publish(
            "tierd/v1/ghost-99/telemetry",
            spooled(1, 1, RecordKind::Telemetry, encode(&ghost).expect("encode")),
            false,
        )
        .await;
    relay_logs(&relay, "not believed until the device announces it").await;

    // 4. Retained offline statuses: a huge boot, and a plausible boot the device never had.
    let status_topic = format!("tierd/v1/{device}/status");
    for boot_id in [u64::MAX / 2, tierd_runtime::unix_ms()] {
        let forged = DeviceStatus {
            online: false,
            boot_id,
            reason: "forged".into(),
            model: None,
            models: Vec::new(),
            machine: None,
        };
        intruder
            .publish(&status_topic, encode(&forged).expect("encode"), true)
            .await;
    }
    relay_logs(&relay, "offline status from").await;

    // The device keeps serving and reporting: same boot, nothing missing, the real reports
    // past the forged seq filed, the forged evidence absent, still online, no ghost.
    agent.mixed_traffic(15).await;
    let after = relay
        .wait_device(device, "three more real reports", |d| {
            d["last_seq"].as_u64() >= Some(next + 3)
        })
        .await;
    assert_eq!(after["boot_id"].as_u64(), Some(boot), "{after:#}");
    assert_eq!(after["restarts"].as_u64(), Some(0), "{after:#}");
    assert_eq!(after["missing_reports"].as_u64(), Some(0), "{after:#}");
    assert!(
        audited_sum(&after) < 1_000,
        "forged audits counted: {after:#}"
    );
    assert_eq!(after["status"]["online"], true, "{after:#}");
    assert!(
        after["models"].is_null(),
        "no evidence of a ghost model: {after:#}"
    );
    assert_eq!(after["status"]["boot_id"].as_u64(), Some(boot));
    let (status, _) = relay.get_json("/api/devices/ghost-99").await;
    assert_eq!(status, 404, "the ghost device is listed");
    // The relay's proposal moved only with the real evidence (never to escalate-nothing).
    let threshold_after = &after["calibration"]["certificate"]["threshold"];
    assert_ne!(
        threshold_after.as_f64(),
        Some(0.0),
        "before {threshold_before}, after {threshold_after}"
    );
    let r = agent.infer(&unsure_examples()[0].pixels).await;
    r.assert_ok_from("cloud", "after the attacks");
    let (_, metrics) = relay.get_text("/metrics").await;
    println!(
        "ATTACK evidence: forged calibration, future boot, ghost, forged statuses refused; {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("tierd_relay_telemetry_rejected"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
