//! The fleet store end to end, over Mosquitto, the real binaries, SQLite and a real
//! PostgreSQL: a relay killed mid-stream and started again resumes every device where it was
//! (no report counted missing, the certificate as before, the tuner going on from the stored
//! window); two replicas on one PostgreSQL share one writer, the other takes over within
//! seconds when the writer is killed under load, keeps pushing thresholds, and both show the
//! same fleet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tierd_e2e::{
    free_port, repo_root, start_mosquitto, uncalibrated_manifest, AgentOptions, AgentProc,
    Postgres, RelayBroker, RelayProc,
};
use tierd_runtime::stream;

fn records(n: usize) -> Vec<stream::Record> {
    let mut r = stream::read(&repo_root().join("models/eval/stream.bin")).expect("stream");
    r.truncate(n);
    r
}

async fn send(agent: &AgentProc, records: &[stream::Record]) {
    for r in records {
        let out = agent.infer(&r.pixels).await;
        assert_eq!(out.status, 200, "{}", out.body);
    }
}

/// An agent whose model ships no offline certificate, escalating everything at first: its
/// evidence is all labelled, and the tuner certifies a threshold from it.
async fn escalating_agent(id: &str, port: u16, dir: &std::path::Path, every_s: f64) -> AgentProc {
    AgentProc::start(
        AgentOptions::new(id, port)
            .model(&uncalibrated_manifest(dir), Vec::new())
            .threshold(Some(1.01))
            .telemetry_interval_s(every_s)
            .state_dir(&dir.join(id)),
    )
    .await
}

fn pushed_and_applied(view: &Value) -> bool {
    view["published"]["source"] == "tuner"
        && view["last_ack"]["applied"] == true
        && view["last_ack"]["version"] == view["published"]["version"]
}

/// The counts that prove nothing was lost or counted twice: no gap, and the windows received
/// add up to the agent's own totals.
fn assert_exact(device: &Value) {
    assert_eq!(device["missing_reports"], 0, "{device:#}");
    assert_eq!(
        device["window_sums"], device["latest"]["totals"],
        "windows received must add up to the agent's totals: {device:#}"
    );
}

async fn kill_and_restart_keeps_everything(extra: &str, tag: &str) {
    let port = free_port();
    let Some(_mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let mut relay = RelayProc::start_with(tag, RelayBroker::External(port), extra).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = format!("{tag}-dev");
    let agent = escalating_agent(&id, port, dir.path(), 0.3).await;
    let data = records(1_600);
    send(&agent, &data[..1_200]).await;
    relay
        .wait_device_config(&id, "a tuned threshold applied", pushed_and_applied)
        .await;
    // Quiet: no requests, so the evidence stands still; the reports keep coming.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, before) = relay.get_json(&format!("/api/devices/{id}")).await;
    let requests_before = before["calibration"]["requests"]
        .as_u64()
        .expect("requests");
    assert!(requests_before >= 1_000, "{before:#}");

    relay.kill();
    // Reports pile up in the agent's spool meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.restart().await;

    let (_, restored) = relay.get_json(&format!("/api/devices/{id}")).await;
    assert_eq!(
        restored["calibration"]["certificate"], before["calibration"]["certificate"],
        "the certificate after the restart is the one before"
    );
    assert_eq!(
        restored["calibration"]["in_force"],
        before["calibration"]["in_force"]
    );
    assert_eq!(restored["restarts"], 0, "{restored:#}");
    let last = before["last_seq"].as_u64().expect("last_seq");
    let after = relay
        .wait_device(&id, "the spooled reports delivered", |v| {
            v["last_seq"].as_u64().unwrap_or(0) >= last + 8
        })
        .await;
    assert_exact(&after);
    let (_, metrics) = relay.get_text("/metrics").await;
    let missing = metrics
        .lines()
        .find(|l| l.starts_with("tierd_device_telemetry_missing_reports_total{") && l.contains(&id))
        .unwrap_or_else(|| panic!("no missing-reports series for {id}:\n{metrics}"));
    assert!(missing.ends_with(" 0"), "{missing}");

    // The tuner goes on from the stored window, not from scratch.
    send(&agent, &data[1_200..]).await;
    let grown = relay
        .wait_device(&id, "the new evidence filed", |v| {
            v["calibration"]["requests"].as_u64().unwrap_or(0) > requests_before
        })
        .await;
    assert_exact(&grown);
    let (_, config) = relay.get_json(&format!("/api/devices/{id}/config")).await;
    assert!(pushed_and_applied(&config), "{config:#}");
    println!(
        "STORE {tag}: killed and restarted; {} reports, 0 missing, certificate kept ({} requests), evidence grew to {}",
        grown["reports"], requests_before, grown["calibration"]["requests"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_on_sqlite_resumes_every_stream_and_keeps_its_certificate() {
    kill_and_restart_keeps_everything("", "store-sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_on_postgres_resumes_every_stream_and_keeps_its_certificate() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let extra = format!("[store]\nurl = {:?}\n", pg.url);
    kill_and_restart_keeps_everything(&extra, "store-pg").await;
}

async fn role(relay: &RelayProc) -> String {
    let (_, v) = relay.get_json("/api/replica").await;
    v["role"].as_str().unwrap_or_default().to_string()
}

/// Sends the records round and round until `stop`.
fn load(agent: &AgentProc, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let (client, url) = (
        agent.client().clone(),
        agent.url(&format!("/v2/models/{}/infer", tierd_e2e::EDGE_MODEL)),
    );
    let bodies: Vec<String> = records(400)
        .iter()
        .map(|r| tierd_e2e::infer_body(&r.pixels).to_string())
        .collect();
    tokio::spawn(async move {
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let body = bodies[sent as usize % bodies.len()].clone();
            let ok = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            assert!(ok, "the agent must answer every request");
            sent += 1;
        }
        sent
    })
}

/// Both replicas show the same `/api/devices`, byte for byte: polled, since the writer's
/// memory runs up to one batch ahead of the store and the follower up to one refresh behind.
async fn assert_same_fleet(a: &RelayProc, b: &RelayProc) {
    let start = Instant::now();
    loop {
        let (_, va) = a.get_json("/api/devices").await;
        let (_, vb) = b.get_json("/api/devices").await;
        if va == vb && va["devices"].as_array().is_some_and(|d| !d.is_empty()) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the replicas show different fleets:\n{va:#}\n---\n{vb:#}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_killed_under_load_is_replaced_within_seconds_and_nothing_is_lost() {
    let Some(pg) = Postgres::start().await else {
        return;
    };
    let port = free_port();
    let Some(_mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let extra = format!(
        "[store]\nurl = {:?}\nlease_ms = 300\nrefresh_ms = 300\n\n[metrics]\nmax_device_series = 1\n\n[metrics.groups]\nreplicas = [\"replica-*\"]\n",
        pg.url
    );
    let mut a = RelayProc::start_with("replica-a", RelayBroker::External(port), &extra).await;
    let b = RelayProc::start_with("replica-b", RelayBroker::External(port), &extra).await;
    assert_eq!(role(&a).await, "writer");
    assert_eq!(role(&b).await, "follower");
    // Changes go to the writer; the follower says where it is.
    let resp = b.put_config("any-device", "{\"threshold\": 0.9}").await;
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["writer"], "replica-a", "{body:#}");

    let dir = tempfile::tempdir().expect("tempdir");
    let first = escalating_agent("replica-dev-1", port, dir.path(), 1.0).await;
    send(&first, &records(1_200)).await;
    a.wait_device_config(
        "replica-dev-1",
        "a tuned threshold applied",
        pushed_and_applied,
    )
    .await;
    // Both replicas show the same fleet once the follower has read the last batch.
    assert_same_fleet(&a, &b).await;

    // Under load, the writer dies.
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&first, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill();
    let killed = Instant::now();
    while role(&b).await != "writer" {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the follower did not take over; its log:\n{}",
            b.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = killed.elapsed();
    // A device that appears after the takeover gets its threshold from the new writer.
    let second = escalating_agent("replica-dev-2", port, dir.path(), 1.0).await;
    send(&second, &records(1_200)).await;
    let pushed = b
        .wait_device_config(
            "replica-dev-2",
            "a tuned threshold from the new writer",
            pushed_and_applied,
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = running.await.expect("load");

    // Every report of both devices arrived exactly once at whichever replica wrote.
    for (agent, id) in [(&first, "replica-dev-1"), (&second, "replica-dev-2")] {
        let seq = agent.metric("tierd_telemetry_seq", "device").await as u64;
        let v = b
            .wait_device(id, "every report filed", |v| {
                v["last_seq"].as_u64().unwrap_or(0) >= seq
            })
            .await;
        assert_exact(&v);
        assert_eq!(v["restarts"], 0, "{v:#}");
    }
    // Metrics: fleet-level series cover both devices; per-device ones are capped at one.
    let (_, metrics) = b.get_text("/metrics").await;
    let line = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{metrics}"))
            .to_string()
    };
    assert!(
        line("tierd_fleet_model_devices{").ends_with(" 2"),
        "{metrics}"
    );
    assert!(line("tierd_fleet_model_devices{").contains("group=\"replicas\""));
    assert!(line("tierd_relay_store_writer").ends_with(" 1"));
    assert!(line("tierd_metrics_device_series_omitted").ends_with(" 1"));
    assert!(metrics.contains("device=\"replica-dev-1\""));
    assert!(!metrics.contains("device=\"replica-dev-2\""), "{metrics}");
    // The killed replica comes back as a follower and shows the writer's fleet.
    a.restart().await;
    assert_eq!(role(&a).await, "follower");
    assert_same_fleet(&a, &b).await;
    println!(
        "REPLICAS: writer killed under load ({sent} requests); follower took over in {} ms; \
         new writer pushed {} to a new device; 0 reports missing or counted twice",
        takeover.as_millis(),
        pushed["published"]["settings"]["threshold"]
    );
}
