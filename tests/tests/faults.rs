//! Fault tests with real processes killed: the broker under load, the agent in the middle of a
//! spool write or a config apply, a long outage past the spool's cap, and a stranger flooding
//! every topic. Each prints a `RELIABILITY` line with its figures (see BENCHMARKS.md).
//!
//! They need Mosquitto (`apt-get install mosquitto`) unless `TIERD_SKIP_MOSQUITTO=1`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tierd_e2e::{
    confident_examples, examples, free_port, infer_body, rss_bytes, start_mosquitto,
    unsure_examples, AgentOptions, AgentProc, RelayBroker, RelayProc, TestClient,
};
use tierd_protocol::{encode, EscalationReply, ReplyOutcome, SpoolAck};

const EDGE_MODEL: &str = "digits-edge";

/// What a load generator saw.
#[derive(Default)]
struct Load {
    sent: AtomicU64,
    ok: AtomicU64,
    edge: AtomicU64,
    cloud: AtomicU64,
    fallback: AtomicU64,
    failed: AtomicU64,
    slowest_ms: AtomicU64,
}

/// Sends requests one after another until `stop`, recording every outcome.
fn start_load(
    agent: &AgentProc,
    stop: Arc<AtomicBool>,
) -> (Arc<Load>, tokio::task::JoinHandle<()>) {
    let load = Arc::new(Load::default());
    let (l, client) = (load.clone(), agent.client().clone());
    let url = agent.url(&format!("/v2/models/{EDGE_MODEL}/infer"));
    let inputs: Vec<Vec<u8>> = examples().into_iter().map(|e| e.pixels).collect();
    let task = tokio::spawn(async move {
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let body = infer_body(&inputs[i % inputs.len()]).to_string();
            i += 1;
            l.sent.fetch_add(1, Ordering::Relaxed);
            let t = Instant::now();
            let resp = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            l.slowest_ms
                .fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            let parsed = match resp {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                _ => None,
            };
            match parsed
                .as_ref()
                .and_then(|v| v["parameters"]["tier"].as_str())
            {
                Some(tier) => {
                    l.ok.fetch_add(1, Ordering::Relaxed);
                    match tier {
                        "edge" => &l.edge,
                        "cloud" => &l.cloud,
                        _ => &l.fallback,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    l.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    (load, task)
}

fn spool_file(state: &std::path::Path) -> std::path::PathBuf {
    state.join("spool").join("spool.bin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_killed_under_load_loses_no_request_and_no_report() {
    let port = free_port();
    let Some(mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let relay = RelayProc::start("fault-broker", RelayBroker::External(port)).await;
    let device = "fault-broker-1";
    let mut agent = AgentProc::start(
        AgentOptions::new(device, port)
            .telemetry_interval_s(0.2)
            .escalation_timeout_ms(300)
            .extra("[spool]\nresend_after_s = 1.0\nflush_timeout_s = 5.0\n"),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (load, task) = start_load(&agent, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outage = Duration::from_secs(10);
    drop(mosquitto); // SIGKILL: the broker is gone, sessions and all
    let down = Instant::now();
    tokio::time::sleep(outage).await;
    let seq_at_restart = agent.metric("tierd_telemetry_seq", "device").await as u64;
    let mosquitto = start_mosquitto(port).await.expect("mosquitto again");
    let restarted = Instant::now();
    let outage = down.elapsed();
    relay
        .wait_device(device, "the reports of the outage", |v| {
            v["last_seq"].as_u64().unwrap_or(0) >= seq_at_restart
        })
        .await;
    let drain = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    task.await.expect("load task");

    // A clean stop: the last window is spooled and flushed before MQTT closes.
    let status = agent.proc.terminate(Duration::from_secs(20));
    assert!(status.success(), "agent exit {status:?}");
    let answered = load.ok.load(Ordering::Relaxed);
    assert_eq!(
        load.failed.load(Ordering::Relaxed),
        0,
        "requests without an answer"
    );
    assert_eq!(answered, load.sent.load(Ordering::Relaxed));
    assert!(
        load.fallback.load(Ordering::Relaxed) > 0,
        "the outage was not felt"
    );
    let v = relay
        .wait_device(device, "every request counted", |v| {
            v["latest"]["totals"]["edge"].as_u64().unwrap_or(0)
                + v["latest"]["totals"]["cloud"].as_u64().unwrap_or(0)
                + v["latest"]["totals"]["edge_fallback"].as_u64().unwrap_or(0)
                == answered
        })
        .await;
    assert_eq!(v["missing_reports"], 0, "telemetry lost: {v:#}");
    assert_eq!(v["window_sums"], v["latest"]["totals"], "{v:#}");
    assert_eq!(v["restarts"], 0);
    let duplicates = v["stream"]["duplicates"].as_u64().unwrap_or(0);
    println!(
        "RELIABILITY broker-killed: outage {:.1} s, requests {answered} answered of {} sent \
         (edge {}, cloud {}, edge_fallback {}), slowest answer {} ms, reports {} delivered, \
         lost 0, duplicates {duplicates} (de-duplicated), drain after reconnect {:.1} s",
        outage.as_secs_f64(),
        load.sent.load(Ordering::Relaxed),
        load.edge.load(Ordering::Relaxed),
        load.cloud.load(Ordering::Relaxed),
        load.fallback.load(Ordering::Relaxed),
        load.slowest_ms.load(Ordering::Relaxed),
        v["reports"],
        drain.as_secs_f64(),
    );
    drop(mosquitto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_load_costs_at_most_the_timeout_then_the_cloud_returns() {
    let port = free_port();
    let Some(_mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let mut relay = RelayProc::start("fault-relay", RelayBroker::External(port)).await;
    let timeout_ms = 250;
    let agent = AgentProc::start(
        AgentOptions::new("fault-relay-1", port).escalation_timeout_ms(timeout_ms),
    )
    .await;
    let unsure = unsure_examples();
    for ex in &unsure {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("cloud", &ex.name);
    }
    relay.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        for ex in &unsure {
            let r = agent.infer(&ex.pixels).await;
            r.assert_ok_from("edge_fallback", &ex.name);
            slowest = slowest.max(r.elapsed);
        }
    }
    // Bounded by the escalation timeout, not by MQTT or the dead relay: + 100 ms of slack for
    // the HTTP round trip and the model on a loaded CI machine.
    assert!(
        slowest <= Duration::from_millis(timeout_ms + 100),
        "slowest fallback {slowest:?} with escalation_timeout_ms = {timeout_ms}"
    );
    let again = RelayProc::start("fault-relay", RelayBroker::External(port)).await;
    for ex in &unsure {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("cloud", &ex.name);
    }
    println!(
        "RELIABILITY relay-killed: {} escalations fell back, slowest {} ms (timeout {timeout_ms} ms); cloud answers again after restart",
        5 * unsure.len(),
        slowest.as_millis()
    );
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_spool_write_and_mid_config_apply_recovers() {
    let port = free_port();
    let state = tempfile::tempdir().expect("tempdir");
    let device = "fault-kill-1";
    let options = AgentOptions::new(device, port)
        .telemetry_interval_s(0.1)
        .state_dir(state.path())
        .without_broker();

    // 1. kill -9 at arbitrary moments while reports are written (every 100 ms, no broker, so
    //    nothing is ever acknowledged): every record written survives.
    let mut pending_before = 0.0;
    for round in 0..4u64 {
        let mut agent = AgentProc::start(options.clone()).await;
        let pending = agent
            .metric("tierd_spool_records", "state=\"pending\"")
            .await;
        assert!(
            pending >= pending_before,
            "round {round}: {pending} records pending after restart, {pending_before} before the kill"
        );
        tokio::time::sleep(Duration::from_millis(300 + 137 * round)).await;
        pending_before = agent
            .metric("tierd_spool_records", "state=\"pending\"")
            .await;
        agent.proc.kill();
    }
    // 2. A torn write (power lost mid-frame): half a frame of garbage at the end.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(spool_file(state.path()))
            .expect("spool file");
        f.write_all(&[0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            .expect("garbage");
    }
    let agent = AgentProc::start(options.clone()).await;
    assert!(
        agent.proc.log().contains("spool recovered with damage"),
        "{}",
        agent.proc.log_tail(20)
    );
    assert!(
        agent
            .metric("tierd_spool_records", "state=\"corrupt\"")
            .await
            >= 1.0
    );
    assert!(
        agent
            .metric("tierd_spool_records", "state=\"pending\"")
            .await
            >= pending_before
    );
    drop(agent);

    // 3. The broker and relay come: everything spooled is delivered, the corrupt tail is
    //    reported, and the relay counts no gap in the current run.
    let Some(_mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let relay = RelayProc::start("fault-kill", RelayBroker::External(port)).await;
    let mut agent = AgentProc::start(AgentOptions {
        wait_for_mqtt: true,
        ..options.clone()
    })
    .await;
    let v = relay
        .wait_device(device, "the spool drained with the corrupt count", |v| {
            v["latest"]["spool"]["corrupt"].as_u64().unwrap_or(0) >= 1
                && v["latest"]["spool"]["pending"].as_u64().unwrap_or(99) <= 4
        })
        .await;
    assert_eq!(v["missing_reports"], 0, "{v:#}");
    let delivered = v["stream"]["delivered"].as_u64().unwrap_or(0);
    assert!(delivered as f64 >= pending_before, "{v:#}");

    // 4. kill -9 right after a config document is published, several times: the applied file
    //    is always the old or the new document, never a mix, and the agent starts on it.
    let client = TestClient::connect(port, "fault-kill-operator").await;
    let topic = format!("tierd/v1/{device}/config");
    let applied = state.path().join("applied-config.json");
    let mut last = 0u64;
    for (i, delay_ms) in [0u64, 1, 3, 7, 15].into_iter().enumerate() {
        let version = 1000 + i as u64;
        let doc = format!(
            r#"{{"version":{version},"device_id":"{device}","settings":{{"threshold":0.{}}}}}"#,
            90 + i
        );
        client
            .publish(&topic, tierd_e2e::signing::sign_json(&doc), true)
            .await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        agent.proc.kill();
        if applied.exists() {
            let text = std::fs::read(&applied).expect("read applied config");
            // The signed envelope; `inner_document` panics on a torn or mixed file.
            let doc: Value = tierd_e2e::signing::inner_document(&text);
            let v = doc["version"].as_u64().expect("version");
            assert!(
                v == version || v == last || v + 1 == version,
                "version {v} after publishing {version}"
            );
            last = v;
        }
        agent = AgentProc::start(AgentOptions {
            wait_for_mqtt: true,
            ..options.clone()
        })
        .await;
        assert!(
            !agent.proc.log().contains("is not a valid config"),
            "{}",
            agent.proc.log_tail(20)
        );
    }
    println!(
        "RELIABILITY agent-killed: 4 kill -9 during spool writes + 1 torn tail: {delivered} records delivered, \
         0 lost, corrupt tail counted; 5 kill -9 during config apply: applied config never corrupt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_cap_in_a_long_outage_drops_oldest_counts_and_keeps_serving() {
    let port = free_port();
    let cap = 8192u64;
    let device = "fault-cap-1";
    let options = AgentOptions::new(device, port)
        .telemetry_interval_s(0.1)
        .extra(&format!(
            "[spool]\nmax_bytes = {cap}\nresend_after_s = 1.0\n"
        ))
        .without_broker();
    let agent = AgentProc::start(options.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (load, task) = start_load(&agent, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_early = rss_bytes(agent.proc.pid());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_late = rss_bytes(agent.proc.pid());
    let dropped = agent
        .metric("tierd_spool_records", "state=\"dropped\"")
        .await;
    let bytes = agent.metric("tierd_spool_bytes", "device").await;
    stop.store(true, Ordering::Relaxed);
    task.await.expect("load");
    assert_eq!(
        load.failed.load(Ordering::Relaxed),
        0,
        "the agent stopped serving"
    );
    assert!(dropped > 0.0, "the cap was never reached");
    assert!(
        bytes <= cap as f64,
        "spool file {bytes} bytes over its cap {cap}"
    );
    // Memory stays flat while records are dropped (the spool holds an index, not payloads).
    assert!(
        rss_late < rss_early + 8 * 1024 * 1024,
        "RSS grew from {rss_early} to {rss_late} bytes"
    );

    let Some(_mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let relay = RelayProc::start("fault-cap", RelayBroker::External(port)).await;
    let v = relay
        .wait_device(device, "the drop count reported", |v| {
            v["latest"]["spool"]["dropped"].as_u64().unwrap_or(0) >= dropped as u64
        })
        .await;
    println!(
        "RELIABILITY spool-cap: cap {cap} bytes, {} requests served during the outage, {} records dropped oldest-first, reported in telemetry (relay: spool.dropped = {}, {} report seq gaps), RSS {} -> {} KiB",
        load.ok.load(Ordering::Relaxed),
        dropped,
        v["latest"]["spool"]["dropped"],
        v["missing_reports"],
        rss_early / 1024,
        rss_late / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flooding_every_topic_breaks_nothing() {
    let port = free_port();
    let Some(_mosquitto) = start_mosquitto(port).await else {
        return;
    };
    let relay = RelayProc::start("fault-flood", RelayBroker::External(port)).await;
    let device = "fault-flood-1";
    let agent = AgentProc::start(AgentOptions::new(device, port).telemetry_interval_s(0.2)).await;
    let seq_before = relay.wait_device(device, "first report", |_| true).await["last_seq"]
        .as_u64()
        .unwrap_or(0);

    let flood = TestClient::connect(port, "fault-flood-stranger").await;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut random = |n: usize| {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    let mut published = 0;
    for round in 0..20 {
        for target in [device, "someone-else"] {
            for suffix in [
                "escalate/digits-edge",
                "reply",
                "telemetry",
                "config",
                "config/ack",
                "ack",
                "status",
            ] {
                let topic = format!("tierd/v1/{target}/{suffix}");
                let mut payloads = vec![random(1 + round * 37), vec![0u8; 0]];
                if round % 5 == 0 {
                    payloads.push(random(1024 * 1024)); // far over every limit
                }
                // Valid-looking messages that are not ours to act on.
                payloads.push(
                    encode(&EscalationReply {
                        request_id: round as u64,
                        outcome: ReplyOutcome::Answer {
                            model: "fake@1".into(),
                            probabilities: vec![1.0; 10],
                            compute_us: 1,
                        },
                    })
                    .expect("reply"),
                );
                payloads.push(
                    encode(&SpoolAck {
                        stream_id: round as u64,
                        upto: u64::MAX,
                    })
                    .expect("ack"),
                );
                payloads.push(
                    format!(r#"{{"version":{},"device_id":"someone-else","settings":{{"threshold":0.1}}}}"#, u64::MAX - round as u64)
                        .into_bytes(),
                );
                for p in payloads {
                    // Retained only where a retained message is normal, so the flood does not
                    // outlive the test on the broker.
                    flood.publish(&topic, p, false).await;
                    published += 1;
                }
            }
        }
    }

    // Both still work: local and cloud answers, telemetry still flowing and counted.
    for ex in confident_examples() {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("edge", &ex.name);
    }
    for ex in unsure_examples() {
        agent
            .infer(&ex.pixels)
            .await
            .assert_ok_from("cloud", &ex.name);
    }
    let v = relay
        .wait_device(device, "telemetry after the flood", |v| {
            v["last_seq"].as_u64().unwrap_or(0) > seq_before + 5
        })
        .await;
    assert_eq!(v["missing_reports"], 0, "{v:#}");
    let threshold = agent.metric("tierd_threshold", "signal").await;
    assert!(
        (threshold - 0.9).abs() < 1e-6,
        "the flood changed the threshold to {threshold}"
    );
    let (status, _) = relay.get_text("/health").await;
    assert_eq!(status, 200);
    let agent_log = agent.proc.log();
    let relay_log = relay.proc.log();
    assert!(agent_log.contains("rejected"), "agent logged no reject");
    assert!(relay_log.contains("rejected"), "relay logged no reject");
    println!(
        "RELIABILITY flood: {published} foreign messages on 7 topics x 2 devices (random, empty, 1 MiB, valid-looking); \
         agent {} reject lines, relay {} reject lines; answers and telemetry unaffected",
        agent_log.matches("rejected").count(),
        relay_log.matches("rejected").count()
    );
}
