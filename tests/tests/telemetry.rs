//! Telemetry end to end: an agent answers N requests, its reports cross the embedded broker, and
//! the relay's `/api/devices` and `/metrics` show exactly N with the agent's own split per tier,
//! contiguous sequence numbers, and energy from a named meter.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tierd_e2e::{repo_root, AgentOptions, AgentProc, RelayBroker, RelayProc};

/// Samples of a scrape, as parsed by the Prometheus project's Python parser.
struct Scrape {
    samples: Vec<(String, HashMap<String, String>, f64)>,
}

/// Parses with `prometheus_client.parser` (tests/clients/prom_parse.py), which rejects text
/// that is not valid exposition format; panics with its message if so.
fn parse_prometheus(text: &str, what: &str) -> Scrape {
    let script = repo_root().join("tests/clients/prom_parse.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics to the parser");
    let out = child.wait_with_output().expect("parser finishes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named") {
        panic!("the Prometheus parser needs `pip install prometheus_client`: {stderr}");
    }
    assert!(
        out.status.success(),
        "{what} is not valid Prometheus text: {stderr}\n{text}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("parser prints JSON");
    let samples = v["samples"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let labels = s[1]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default();
            (
                s[0].as_str().unwrap_or("").to_string(),
                labels,
                s[2].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    Scrape { samples }
}

fn value_of(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .find(|(name, l, _)| {
            name == metric
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("no sample {metric}{labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_shows_exactly_what_the_agent_answered() {
    let device = "tel-e2e";
    let relay = RelayProc::start("tel-relay", RelayBroker::Embedded).await;
    let agent = AgentProc::start(
        AgentOptions::new(device, relay.broker_port)
            .telemetry_interval_s(0.3)
            .audit_rate(1.0),
    )
    .await;

    // A mix that exercises both tiers; the agent's own answers are the ground truth.
    let n = 60;
    let by_tier = agent.mixed_traffic(n).await;
    assert!(
        by_tier.get("cloud").copied().unwrap_or(0) > 0,
        "{by_tier:?}"
    );
    assert!(by_tier.get("edge").copied().unwrap_or(0) > 0, "{by_tier:?}");

    // Reports every 0.3 s: wait until the relay has one that covers all n requests.
    let start = Instant::now();
    let record = loop {
        let (status, body) = relay.get_json(&format!("/api/devices/{device}")).await;
        if status == 200 && body["latest"]["totals"]["edge"].as_u64().is_some() {
            let t = &body["latest"]["totals"];
            let answered: u64 = ["edge", "cloud", "edge_fallback"]
                .iter()
                .map(|k| t[k].as_u64().unwrap_or(0))
                .sum();
            // Audits complete in the background; wait until every local answer's audit has
            // landed in a calibration window too.
            let audited: u64 = body["calibration"]["bins"]
                .as_array()
                .map(|b| b.iter().map(|x| x["audited"].as_u64().unwrap_or(0)).sum())
                .unwrap_or(0);
            if answered == n as u64 && audited == t["edge"].as_u64().unwrap_or(u64::MAX) {
                break body;
            }
            // Equal but not done yet means audits are still landing; more is a bug.
            assert!(
                answered <= n as u64,
                "relay counts more than was sent: {body}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "relay never showed {n} requests for {device}; last answer {status}: {body}\nagent log:\n{}",
            agent.proc.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let totals = &record["latest"]["totals"];
    for tier in ["edge", "cloud", "edge_fallback"] {
        assert_eq!(
            totals[tier].as_u64(),
            Some(by_tier.get(tier).copied().unwrap_or(0)),
            "tier {tier}: relay {record}, agent answers {by_tier:?}"
        );
    }
    // Nothing lost: contiguous sequence numbers from 1, and the windows add up to the totals.
    assert_eq!(record["first_seq"], 1, "{record}");
    assert_eq!(record["missing_reports"], 0, "{record}");
    assert_eq!(record["duplicate_reports"], 0, "{record}");
    assert_eq!(record["last_seq"], record["reports"], "{record}");
    assert_eq!(record["latest"]["seq"], record["last_seq"], "{record}");
    assert_eq!(&record["window_sums"], totals, "{record}");

    // Calibration evidence: the bins account for every request exactly as answered, and every
    // local answer was audited (audit_rate 1.0); the tuner has too little evidence to move.
    let cal = &record["calibration"];
    let bins = cal["bins"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| -> u64 { bins.iter().map(|b| b[k].as_u64().unwrap_or(0)).sum() };
    let tier = |k: &str| by_tier.get(k).copied().unwrap_or(0);
    assert_eq!(sum("local"), tier("edge"), "{cal}");
    assert_eq!(
        sum("escalated"),
        tier("cloud") + tier("edge_fallback"),
        "{cal}"
    );
    assert_eq!(sum("escalated_labelled"), tier("cloud"), "{cal}");
    assert_eq!(sum("audited"), tier("edge"), "{cal}");
    assert!(sum("escalated_agree") <= sum("escalated_labelled"));
    assert!(sum("audited_agree") <= sum("audited"));
    assert_eq!(cal["edges"].as_array().map(Vec::len), Some(bins.len()));
    let cert = &cal["certificate"];
    assert_eq!(cert["insufficient_evidence"], true, "{cert}");
    assert!(
        (cert["threshold"].as_f64().unwrap_or(0.0) - 0.9).abs() < 1e-6,
        "{cert}"
    );

    // Energy: a named meter, flagged when estimated, with finite non-negative joules.
    let energy = &record["latest"]["energy"];
    let meter = energy["meter"].as_str().unwrap_or("");
    assert!(!meter.is_empty() && meter != "none", "{energy}");
    assert_eq!(
        energy["estimated"].as_bool(),
        Some(meter.starts_with("estimate")),
        "{energy}"
    );
    let total_j = energy["total_joules"].as_f64().unwrap_or(-1.0);
    assert!(total_j.is_finite() && total_j >= 0.0, "{energy}");
    assert!(record["latest"]["device"]["memory_total_bytes"].as_u64() > Some(0));

    // The fleet list holds the same device.
    let (status, list) = relay.get_json("/api/devices").await;
    assert_eq!(status, 200);
    let devices = list["devices"].as_array().cloned().unwrap_or_default();
    assert!(devices.iter().any(|d| d["device_id"] == device), "{list}");
    let (status, missing) = relay.get_json("/api/devices/nobody").await;
    assert_eq!(status, 404, "{missing}");
    assert!(missing["error"].as_str().unwrap_or("").contains("nobody"));

    // Both /metrics parse and agree with the answers.
    let (status, relay_text) = relay.get_text("/metrics").await;
    assert_eq!(status, 200);
    let relay_metrics = parse_prometheus(&relay_text, "relay /metrics");
    let (status, agent_text) = {
        let resp = agent
            .client()
            .get(agent.url("/metrics"))
            .send()
            .await
            .expect("agent /metrics");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    };
    assert_eq!(status, 200);
    let agent_metrics = parse_prometheus(&agent_text, "agent /metrics");
    for tier in ["edge", "cloud", "edge_fallback"] {
        let want = by_tier.get(tier).copied().unwrap_or(0) as f64;
        assert_eq!(
            value_of(
                &relay_metrics,
                "tierd_device_requests_total",
                &[("device", device), ("tier", tier)]
            ),
            want,
            "relay, tier {tier}"
        );
        assert_eq!(
            value_of(
                &agent_metrics,
                "tierd_requests_total",
                &[("device", device), ("tier", tier)]
            ),
            want,
            "agent, tier {tier}"
        );
    }
    // The agent's latency histogram counted every request on its path.
    let edge_count = value_of(
        &agent_metrics,
        "tierd_latency_seconds_count",
        &[("path", "edge")],
    );
    assert_eq!(edge_count, by_tier.get("edge").copied().unwrap_or(0) as f64);
    let forward_count = value_of(
        &agent_metrics,
        "tierd_latency_seconds_count",
        &[("stage", "forward")],
    );
    assert_eq!(forward_count, n as f64, "every request ran the local model");
    assert!(
        relay_text.contains("tierd_device_energy_joules_total{"),
        "{relay_text}"
    );
    assert_eq!(
        value_of(
            &relay_metrics,
            "tierd_device_telemetry_missing_reports_total",
            &[("device", device)]
        ),
        0.0
    );
}
